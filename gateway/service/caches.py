"""What the core remembers between requests: root keys read from the store, the
decisions already made for a credential, and the request lines found free.

The first two bound how long a revocation made by another process goes unseen (the root-key
cache age); a revocation through this service clears them. A free request line depends on
no credential.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from gateway.ports import Clock
from gateway.service.decisions import Allow

# (Authorization values, method, path): the request line and credential a decision answers.
AllowedKey = tuple[tuple[str, ...], str, str]
# What an AllowedCache files an entry under: 24 characters of the last credential instead
# of the whole of it, whose hash over 400-odd characters cost a paid request about a tenth of
# the gateway's share. The entry keeps the whole credential and counts for that one only.
# In "L402 <macaroon>:<64 hex preimage>" they are the macaroon's last ones, its signature:
# the preimage is the same in every macaroon a holder derives from one token (attenuated
# for others), the signature differs. A constant slice: none built per request.
FiledKey = tuple[str, str, str]
CREDENTIAL_TAIL = slice(-89, -65)
ALLOWED_CACHE_SIZE = 50_000
# Any client adds to the free request lines, paid or not: at most this many, so the set
# holds a few MB at most.
FREE_LINES_SIZE = 4_096
# No cache keeps a longer path (it is resolved each time): an entry's size stays bounded
# whatever the paths a client sends.
CACHED_PATH_LIMIT = 512


@dataclass(frozen=True, slots=True)
class KnownToken:
    """A token's root key and its invoice's facts, as read from the store at ``fetched_at``."""

    root_key: bytes
    amount_msat: int
    settled: bool
    fetched_at: float
    buys_credit: bool = False  # its invoice bought credit (a credit route's token)


class RootKeyCache:
    """Root keys (and invoice facts) recently read from the store, with a maximum age."""

    def __init__(self, max_age: float, capacity: int = 100_000) -> None:
        self._max_age = max_age
        self._capacity = capacity
        self._entries: OrderedDict[bytes, KnownToken] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key_id: bytes, now: float) -> KnownToken | None:
        entry = self._entries.get(key_id)
        if entry is None:
            return None
        # A clock that stepped back also makes an entry stale.
        if not entry.fetched_at <= now < self.stale_at(entry):
            del self._entries[key_id]
            return None
        self._entries.move_to_end(key_id)
        return entry

    def stale_at(self, entry: KnownToken) -> float:
        return entry.fetched_at + self._max_age

    def put(self, key_id: bytes, entry: KnownToken) -> None:
        self._entries[key_id] = entry
        self._entries.move_to_end(key_id)
        # From the least recently used end, drop entries past their age as well as the
        # surplus: memory follows the tokens used within max_age, not the capacity.
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if len(self._entries) <= self._capacity and entry.fetched_at < self.stale_at(oldest):
                break
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


def fits_cache(key: AllowedKey) -> bool:
    """Whether a decision on ``key`` may be kept: a single Authorization value (with more,
    the one filed under, the last, need not be the credential, and a paying client could
    file its decision where another client's is: the same request line and 24 characters)
    and a path of at most ``CACHED_PATH_LIMIT`` characters."""
    return len(key[0]) == 1 and len(key[2]) <= CACHED_PATH_LIMIT


def filed_under(key: AllowedKey) -> FiledKey:
    authorization, method, path = key
    return (authorization[-1][CREDENTIAL_TAIL] if authorization else "", method, path)


@dataclass(frozen=True, slots=True)
class AllowedEntry:
    authorization: tuple[str, ...]
    allow: Allow
    # Valid in [since, until): from the root-key read it rests on until that read is too old
    # to trust (a revocation elsewhere) or the token expires, whichever comes first.
    since: float
    until: float


class AllowedCache:
    """Allowed (credential, method, path) -> the decision, valid as long as the root-key read
    it rests on and the token itself: revocations take effect exactly as without this cache.

    Evicted oldest-first, never reordered: a hit stays a dict lookup and one clock read.
    ``entries`` is public for the paid hot path (``L402Service.allowed_again``), which reads
    it without a method call: an entry filed under ``filed_under(key)`` counts only for its
    own credential and within its ``[since, until)``.
    """

    def __init__(self, clock: Clock, capacity: int = ALLOWED_CACHE_SIZE) -> None:
        self._now = clock.now  # bound once: read on every hit
        self._capacity = capacity
        self.entries: dict[FiledKey, AllowedEntry] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: AllowedKey) -> Allow | None:
        filed = filed_under(key)
        entry = self.entries.get(filed)
        if entry is None or entry.authorization != key[0]:
            return None
        if entry.since <= self._now() < entry.until:
            return entry.allow
        del self.entries[filed]
        return None

    def put(self, key: AllowedKey, allow: Allow, since: float, until: float, now: float) -> None:
        """Files ``allow`` when ``fits_cache(key)``."""
        if not fits_cache(key):
            return
        # A float bound (a token's expiry is whole seconds): the hit's comparison with the
        # clock then has no int to convert.
        self.entries[filed_under(key)] = AllowedEntry(key[0], allow, since, float(until))
        # Oldest first, drop the expired entries (all expire within the root-key cache age)
        # as well as the surplus, so memory follows the tokens in recent use.
        while self.entries:
            oldest = next(iter(self.entries))
            if len(self.entries) <= self._capacity and now < self.entries[oldest].until:
                break
            del self.entries[oldest]

    def clear(self) -> None:
        self.entries.clear()


class FreeLines(dict[tuple[str, str], None]):
    """Request lines (method, path) the pricing found free: the same answer for any
    credential, so a repeat skips describing the request and matching the rules (which cost
    a free route's request half again the handler's own time). A dict, so that the test on
    every request is ``in``, with no method call.

    The pricing never changes while the service runs, so an entry never goes stale; the
    oldest is dropped for a new one when full.
    """

    def __init__(self, capacity: int = FREE_LINES_SIZE, path_limit: int = CACHED_PATH_LIMIT):
        super().__init__()
        self._capacity = capacity
        self._path_limit = path_limit

    def add(self, method: str, path: str) -> None:
        if len(path) > self._path_limit:
            return
        if len(self) >= self._capacity:
            del self[next(iter(self))]
        self[method, path] = None
