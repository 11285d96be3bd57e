"""Paid tokens kept for reuse, and payments begun but not yet turned into tokens.

**Scope: which requests a token is sent with.** A token is kept with the *origin*
(``scheme://host[:port]``) and the *path* of the request that bought it. It is offered to a
later request iff that request has the same origin and its path

* matches the token's ``<service>_paths`` caveats (all of them) when the macaroon has any:
  the server said exactly where the token is good; otherwise
* starts with the token's *scope*: the bought path up to and including its last ``/``
  (``/api/premium/fortune`` -> ``/api/premium/``, ``/api/echo`` -> ``/api/``),

and the method is allowed by its ``<service>_methods`` caveats (if any), the token has not
expired by its ``<service>_valid_until`` caveats, and the path is not on the token's refused
list. Several candidates: a token that already worked for exactly this path wins, then the
longest scope (or literal glob prefix), then the newest. The query string plays no part. The
``services=`` caveat names services, not URLs, so it cannot place a URL; a guess that is
wrong costs one round trip, never a payment:

* a 402 for a token at a path it never worked for puts the path on that token's refused list
  (the token stays good for the paths it covers); a 402 where it *had* worked (expired early,
  capability withdrawn), or any 401 (bad or revoked token), drops the token;
* a success records the path among the paths the token worked for.

**Pending payments.** Before a payment starts, an entry (URL, macaroon, invoice, payment
hash) is written durably; once the payer returns the preimage, the token replaces the entry in
one atomic write. An entry left by a crash is resolved by asking the payer about the payment
hash (see :meth:`gateway.client.L402Client.recover`).

**The file.** ``TokenCache(path)`` persists both as JSON (``version`` 1), written to a
temporary file in the same directory (mode 0600), fsynced and renamed over the old one, the
directory fsynced; the directory is created with mode 0700. Each change re-reads the file
under an exclusive ``flock`` on ``<file>.lock``, so processes sharing the file do not lose
each other's entries. The file holds preimages (bearer secrets): keep it private.
``TokenCache()`` keeps everything in memory only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway import l402
from gateway.client.offer import token_valid_until
from gateway.errors import TokenCacheError

__all__ = ["CachedToken", "PendingPayment", "TokenCache", "scope_of", "split_url"]

_VERSION = 1
_MAX_PATHS = 64  # worked / refused paths kept per token
_DEFAULT_PORTS = {"http": 80, "https": 443}
_HEX64 = frozenset("0123456789abcdef")


def split_url(url: str) -> tuple[str, str]:
    """``(origin, path)``: ``http://Host:80/a/b?q`` -> ``("http://host", "/a/b")``."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    if not scheme or not host:
        raise ValueError(f"not an absolute URL: {url!r}")
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"bad port in URL: {url!r}") from None
    origin = f"{scheme}://{host}"
    if port is not None and port != _DEFAULT_PORTS.get(scheme):
        origin += f":{port}"
    return origin, parts.path or "/"


def scope_of(path: str) -> str:
    """The path up to and including its last ``/``."""
    return path[: path.rfind("/") + 1] or "/"


def _url_without_query(url: str) -> str:
    origin, path = split_url(url)
    return origin + path


def _caveat_lists(macaroon: l402.Macaroon, suffix: str) -> tuple[tuple[str, ...], ...]:
    lists = []
    for raw in macaroon.caveats:
        try:
            caveat = l402.Caveat.parse(raw)
        except l402.MalformedToken:
            continue
        if caveat.key.endswith(suffix) and len(caveat.key) > len(suffix):
            lists.append(tuple(item for item in caveat.value.split(",") if item))
    return tuple(lists)


@dataclass(frozen=True, slots=True)
class CachedToken:
    """A paid token and where it is (and is not) good."""

    origin: str
    scope: str
    url: str
    scheme: str
    macaroon_b64: str
    payment_hash: bytes
    amount_msat: int
    created_at: float
    preimage: bytes = field(repr=False)
    worked: tuple[str, ...] = ()
    refused: tuple[str, ...] = ()
    # Derived from the macaroon's caveats.
    valid_until: int | None = field(init=False)
    path_globs: tuple[tuple[str, ...], ...] = field(init=False)
    methods: tuple[tuple[str, ...], ...] = field(init=False)

    def __post_init__(self) -> None:
        macaroon = l402.decode_b64(self.macaroon_b64)  # MalformedToken if it is not one
        object.__setattr__(self, "valid_until", token_valid_until(macaroon))
        object.__setattr__(self, "path_globs", _caveat_lists(macaroon, "_paths"))
        methods = tuple(tuple(m.upper() for m in ms) for ms in _caveat_lists(macaroon, "_methods"))
        object.__setattr__(self, "methods", methods)

    @property
    def authorization(self) -> str:
        """The ``Authorization`` header value that presents this token."""
        return f"{self.scheme} {self.macaroon_b64}:{self.preimage.hex()}"

    def expired(self, now: float) -> bool:
        return self.valid_until is not None and now >= self.valid_until

    def fit(self, path: str, method: str) -> tuple[int, int] | None:
        """How well the token fits the request; None if it does not apply."""
        if path in self.refused:
            return None
        if not all(method.upper() in allowed for allowed in self.methods):
            return None
        if self.path_globs:
            if not all(any(fnmatchcase(path, g) for g in globs) for globs in self.path_globs):
                return None
            literal = max(len(g.split("*", 1)[0]) for globs in self.path_globs for g in globs)
            fit = (1, literal)
        elif path.startswith(self.scope):
            fit = (1, len(self.scope))
        else:
            return None
        return (2, len(path)) if path in self.worked else fit


@dataclass(frozen=True, slots=True)
class PendingPayment:
    """A payment about to start (or started): enough to finish the token if it went through."""

    origin: str
    scope: str
    url: str
    method: str
    scheme: str
    macaroon_b64: str
    invoice: str
    payment_hash: bytes
    amount_msat: int
    destination: str
    description: str
    created_at: float

    def covers(self, url: str) -> bool:
        """Whether a token bought by this payment would be offered for ``url``."""
        origin, path = split_url(url)
        return origin == self.origin and path.startswith(self.scope)


@dataclass
class _State:
    tokens: dict[bytes, CachedToken] = field(default_factory=dict)
    pending: dict[bytes, PendingPayment] = field(default_factory=dict)


def _hex(value: object, size: int = 32) -> bytes:
    if not isinstance(value, str) or len(value) != 2 * size or not set(value) <= _HEX64:
        raise ValueError("expected lower-case hex")
    return bytes.fromhex(value)


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError("expected an integer")
    return value


def _float(value: object) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ValueError("expected a number")
    return float(value)


def _paths(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("expected a list of strings")
    return tuple(value[-_MAX_PATHS:])


def _token_json(token: CachedToken) -> dict[str, Any]:
    return {
        "origin": token.origin,
        "scope": token.scope,
        "url": token.url,
        "scheme": token.scheme,
        "macaroon": token.macaroon_b64,
        "preimage": token.preimage.hex(),
        "payment_hash": token.payment_hash.hex(),
        "amount_msat": token.amount_msat,
        "created_at": token.created_at,
        "worked": list(token.worked),
        "refused": list(token.refused),
    }


def _token_from(raw: Any) -> CachedToken:
    return CachedToken(
        origin=_str(raw["origin"]),
        scope=_str(raw["scope"]),
        url=_str(raw["url"]),
        scheme=_str(raw["scheme"]),
        macaroon_b64=_str(raw["macaroon"]),
        preimage=_hex(raw["preimage"]),
        payment_hash=_hex(raw["payment_hash"]),
        amount_msat=_int(raw["amount_msat"]),
        created_at=_float(raw["created_at"]),
        worked=_paths(raw["worked"]),
        refused=_paths(raw["refused"]),
    )


def _pending_json(entry: PendingPayment) -> dict[str, Any]:
    return {
        "origin": entry.origin,
        "scope": entry.scope,
        "url": entry.url,
        "method": entry.method,
        "scheme": entry.scheme,
        "macaroon": entry.macaroon_b64,
        "invoice": entry.invoice,
        "payment_hash": entry.payment_hash.hex(),
        "amount_msat": entry.amount_msat,
        "destination": entry.destination,
        "description": entry.description,
        "created_at": entry.created_at,
    }


def _pending_from(raw: Any) -> PendingPayment:
    return PendingPayment(
        origin=_str(raw["origin"]),
        scope=_str(raw["scope"]),
        url=_str(raw["url"]),
        method=_str(raw["method"]),
        scheme=_str(raw["scheme"]),
        macaroon_b64=_str(raw["macaroon"]),
        invoice=_str(raw["invoice"]),
        payment_hash=_hex(raw["payment_hash"]),
        amount_msat=_int(raw["amount_msat"]),
        destination=_str(raw["destination"]),
        description=_str(raw["description"]),
        created_at=_float(raw["created_at"]),
    )


def _serialize(state: _State) -> bytes:
    document = {
        "version": _VERSION,
        "tokens": [_token_json(t) for t in state.tokens.values()],
        "pending": [_pending_json(p) for p in state.pending.values()],
    }
    return json.dumps(document, indent=1).encode() + b"\n"


def _parse(data: bytes, path: Path) -> _State:
    try:
        document = json.loads(data)
        if not isinstance(document, dict) or document.get("version") != _VERSION:
            raise ValueError(f"not a version {_VERSION} token cache")
        tokens = [_token_from(raw) for raw in document["tokens"]]
        pending = [_pending_from(raw) for raw in document["pending"]]
    except (ValueError, KeyError, TypeError, l402.L402Error) as error:
        # Never start over silently: the file may hold a payment that is not yet a token.
        raise TokenCacheError(f"token cache {path} is corrupt: {error}") from None
    return _State(
        tokens={t.payment_hash: t for t in tokens},
        pending={p.payment_hash: p for p in pending},
    )


class TokenCache:
    """Tokens and pending payments, in memory or in a JSON file (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str] | None = None, *, max_tokens: int = 1000):
        self._path = Path(path).expanduser() if path is not None else None
        self._max_tokens = max_tokens
        self._state = _State()
        self._stamp: tuple[int, int, int] | None = None

    @property
    def path(self) -> Path | None:
        return self._path

    # -- reading ---------------------------------------------------------------------------

    def _current(self) -> _State:
        """The state, re-read from the file when it changed since the last read."""
        if self._path is None:
            return self._state
        try:
            stat = self._path.stat()
        except FileNotFoundError:
            self._state, self._stamp = _State(), None
            return self._state
        except OSError as error:
            raise TokenCacheError(f"token cache {self._path}: {error.strerror}") from None
        stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            try:
                data = self._path.read_bytes()
            except OSError as error:
                raise TokenCacheError(f"token cache {self._path}: {error.strerror}") from None
            self._state, self._stamp = _parse(data, self._path), stamp
        return self._state

    def tokens(self) -> list[CachedToken]:
        return list(self._current().tokens.values())

    def pending(self, origin: str | None = None) -> list[PendingPayment]:
        """Pending payments, oldest first, optionally only those of ``origin``."""
        entries = sorted(self._current().pending.values(), key=lambda p: p.created_at)
        return [p for p in entries if origin is None or p.origin == origin]

    def find(self, url: str, method: str, now: float) -> CachedToken | None:
        """The token to send with this request, if any (see "Scope" in the module docstring)."""
        origin, path = split_url(url)
        best: tuple[tuple[int, int, float], CachedToken] | None = None
        for token in self._current().tokens.values():
            if token.origin != origin or token.expired(now):
                continue
            fit = token.fit(path, method)
            if fit is None:
                continue
            rank = (*fit, token.created_at)
            if best is None or rank > best[0]:
                best = (rank, token)
        return best[1] if best else None

    # -- changing --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        assert self._path is not None
        directory = self._path.parent
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(
                self._path.with_name(self._path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600
            )
        except OSError as error:
            raise TokenCacheError(f"token cache {self._path}: {error.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _mutate(self, change: Callable[[_State], bool]) -> None:
        """Apply ``change`` (True: something changed) to the current state and persist it."""
        if self._path is None:
            change(self._state)
            return
        with self._locked():
            self._stamp = None  # re-read under the lock
            state = self._current()
            if change(state):
                self._write(_serialize(state))

    def _write(self, data: bytes) -> None:
        assert self._path is not None
        directory = self._path.parent
        try:
            fd, temporary = tempfile.mkstemp(
                prefix=f".{self._path.name}.", suffix=".tmp", dir=directory
            )
        except OSError as error:
            raise TokenCacheError(f"token cache {self._path}: {error.strerror}") from None
        try:
            with os.fdopen(fd, "wb") as file:
                os.fchmod(file.fileno(), 0o600)
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self._path)
            directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(directory_fd)
            finally:
                os.close(directory_fd)
        except OSError as error:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise TokenCacheError(f"token cache {self._path}: {error.strerror}") from None
        self._stamp = None

    def add_pending(self, entry: PendingPayment) -> None:
        """Record a payment about to start; on return it is durable."""

        def change(state: _State) -> bool:
            state.pending[entry.payment_hash] = entry
            return True

        self._mutate(change)

    def drop_pending(self, payment_hash: bytes) -> None:
        def change(state: _State) -> bool:
            return state.pending.pop(payment_hash, None) is not None

        self._mutate(change)

    def store(self, token: CachedToken, now: float) -> None:
        """Keep a paid token and clear its pending entry, in one write.

        Expired tokens are dropped, and the oldest ones beyond ``max_tokens``.
        """

        def change(state: _State) -> bool:
            state.pending.pop(token.payment_hash, None)
            state.tokens[token.payment_hash] = token
            for key, old in list(state.tokens.items()):
                if old.expired(now):
                    del state.tokens[key]
            surplus = len(state.tokens) - self._max_tokens
            if surplus > 0:
                for old in sorted(state.tokens.values(), key=lambda t: t.created_at)[:surplus]:
                    del state.tokens[old.payment_hash]
            return True

        self._mutate(change)

    def remove(self, payment_hash: bytes) -> None:
        def change(state: _State) -> bool:
            return state.tokens.pop(payment_hash, None) is not None

        self._mutate(change)

    def refused(self, payment_hash: bytes, url: str, status: int) -> None:
        """The server answered ``status`` (401 or 402) to the token at ``url``."""
        _, path = split_url(url)

        def change(state: _State) -> bool:
            token = state.tokens.get(payment_hash)
            if token is None:
                return False
            if status != 402 or path in token.worked:
                del state.tokens[payment_hash]
            elif path not in token.refused:
                refused = (*token.refused, path)[-_MAX_PATHS:]
                state.tokens[payment_hash] = replace(token, refused=refused)
            else:
                return False
            return True

        self._mutate(change)

    def worked(self, payment_hash: bytes, url: str) -> None:
        """The token was accepted at ``url``."""
        _, path = split_url(url)
        token = self._current().tokens.get(payment_hash)
        if token is None or path in token.worked:
            return  # nothing to record: no write

        def change(state: _State) -> bool:
            token = state.tokens.get(payment_hash)
            if token is None or path in token.worked:
                return False
            worked = (*token.worked, path)[-_MAX_PATHS:]
            refused = tuple(p for p in token.refused if p != path)
            state.tokens[payment_hash] = replace(token, worked=worked, refused=refused)
            return True

        self._mutate(change)


def new_token(
    url: str, scheme: str, macaroon_b64: str, preimage: bytes, amount_msat: int, now: float
) -> CachedToken:
    """A token bought at ``url``, scoped as the module docstring says."""
    origin, path = split_url(url)
    macaroon = l402.decode_b64(macaroon_b64)
    payment_hash = l402.Identifier.decode(macaroon.identifier).payment_hash
    return CachedToken(
        origin=origin,
        scope=scope_of(path),
        url=_url_without_query(url),
        scheme=scheme,
        macaroon_b64=macaroon_b64,
        payment_hash=payment_hash,
        amount_msat=amount_msat,
        created_at=now,
        preimage=preimage,
    )
