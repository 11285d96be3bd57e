"""The core: decide what to do with a request, and issue challenges.

``authorize()`` returns one of three decisions:

- ``Allow``: free route, or a valid paid token (the handler gets the token's facts);
- ``Challenge``: 402 with a fresh invoice and macaroon (no credential, or one that is valid
  but insufficient: expired, or for another service or capability);
- ``Deny``: 401 for an invalid credential, 429 when a client asks for too many challenges,
  503 when the Lightning node or the store cannot serve the challenge, 400 for a request
  the rules cannot price unambiguously (``Pricing.resolve``: a backend may read such a path
  or method override as a priced route the literal request did not match), 500 when a
  price function fails.

Browsers send their credential in the ``L402`` cookie instead (``RequestInfo.cookies``); an
``Authorization`` credential wins over it. A cookie that does not verify is ignored, not
refused: a browser cannot drop a stale cookie by itself, so it gets a fresh challenge.
``redeem()`` serves the paywall page: given the macaroon of a challenge it answers whether
the invoice is paid and, once it is, the credential for that cookie.

Depends only on ``gateway.l402``, ``gateway.pricing`` and ``gateway.ports``.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import hashlib
import hmac
import ipaddress
import logging
import math
import re
import secrets
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from gateway import errors, l402
from gateway.ports import (
    Clock,
    InvoiceBackend,
    InvoiceRecord,
    InvoiceState,
    InvoiceUpdate,
    Msat,
    PaymentHash,
    Preimage,
    Store,
)
from gateway.pricing import MAX_PRICE_MSAT, PriceRequest, Pricing, Refused, Rule
from gateway.text import printable

log = logging.getLogger(__name__)
_T = TypeVar("_T")

MEMO_LIMIT = 120
# Request headers a price function (user code, which may log what it gets) never sees.
_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization"})
COOKIE_NAME = "L402"
# At most this many L402 cookies are tried (a browser may hold one per priced path).
MAX_COOKIE_CREDENTIALS = 4
# redeem(): the macaroon of a challenge, as base64 text of a sane size.
MAX_REDEEM_MACAROON_CHARS = 4096
_B64_TEXT = re.compile(r"[A-Za-z0-9+/_\-]+=*")
# redeem() asks the node about an invoice the store still has open at most this often (the
# watcher normally reports the settlement first); settled preimages are remembered.
REDEEM_LOOKUP_INTERVAL = 5.0
_REDEEM_MEMORY = 10_000
# Default budget of those lookups over all clients, per second (the bucket holds one second).
REDEEM_LOOKUPS_PER_SECOND = 10.0
_NODE = "node"  # the one key of that budget's bucket
# A cookie Path must be ASCII without ';', ',', spaces, '%' (the path here is decoded; the
# browser matches the encoded one) or control characters; other paths are cut at the last
# '/' before such a character.
_COOKIE_PATH_CHARS = re.compile(r"[A-Za-z0-9\-._~/!$&'()*+=:@]*")


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """The parts of an HTTP request the core looks at."""

    method: str
    path: str
    client: str
    authorization: tuple[str, ...] = ()
    query: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    # Values of the L402 cookies (``<macaroon>:<hex preimage>``), most specific path first.
    cookies: tuple[str, ...] = field(default=(), repr=False)
    # Methods the request asks the backend to read it as instead (override headers, _method).
    method_overrides: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PaidToken:
    """A verified token, as the protected handler sees it."""

    token_id: str
    payment_hash: str
    service: str
    tier: int
    capabilities: frozenset[str] | None  # None: the token is not limited to capabilities
    valid_until: int | None
    amount_msat: int


@dataclass(frozen=True, slots=True)
class Allow:
    token: PaidToken | None  # None on a free route


@dataclass(frozen=True, slots=True)
class Challenge:
    reason: str
    macaroon: str  # standard base64
    invoice: str
    payment_hash: str
    amount_msat: int
    expires_at: float
    # What the payment buys, for the paywall page.
    service: str = ""
    method: str = ""
    path: str = ""
    lifetime: int = 0  # seconds the token is valid once issued
    issued_at: float | None = None  # the service clock when the challenge was made

    def www_authenticate(self) -> tuple[str, ...]:
        """One header per scheme: L402, and LSAT for older clients."""
        return tuple(
            l402.format_challenge(self.macaroon, self.invoice, scheme)
            for scheme in ("L402", "LSAT")
        )


@dataclass(frozen=True, slots=True)
class Deny:
    status: int
    reason: str
    retry_after: int | None = None
    realm: str | None = None  # a 401's challenge realm: the macaroon location


Decision = Allow | Challenge | Deny


class RedeemState(enum.Enum):
    PENDING = "pending"  # not paid yet, still payable
    SETTLED = "settled"  # paid: the credential is in the result
    EXPIRED = "expired"  # the invoice (or the token's lifetime) ran out unpaid
    CANCELED = "canceled"


@dataclass(frozen=True, slots=True)
class RedeemResult:
    """What ``L402Service.redeem`` found out about a challenge's invoice."""

    state: RedeemState
    expires_at: float  # when the invoice stops being payable
    # Once SETTLED: ``<url-safe macaroon>:<hex preimage>``, for the L402 cookie.
    credential: str | None = field(default=None, repr=False)
    cookie_path: str = "/"
    max_age: int | None = None  # seconds of token lifetime left (None: no valid_until)


class RateLimiter:
    """A token bucket per client address, so unpaid traffic cannot flood the node.

    An IPv6 client commonly holds a whole /64 (or more), so IPv6 addresses share one bucket
    per ``ipv6_prefix``; an IPv4-mapped IPv6 address counts as its IPv4 address, and a
    client that is not an IP address (say ``"unknown"``) is its own key.
    """

    def __init__(
        self, rate: float, burst: int, max_clients: int, clock: Clock, ipv6_prefix: int = 64
    ) -> None:
        if not (math.isfinite(rate) and rate > 0) or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        if not 1 <= ipv6_prefix <= 128:
            raise ValueError("ipv6_prefix must be between 1 and 128")
        self._rate = rate
        self._burst = float(burst)
        self._max_clients = max_clients
        self._clock = clock
        self._ipv6_prefix = ipv6_prefix
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def bucket_of(self, client: str) -> str:
        """The key of ``client``'s bucket."""
        try:
            address = ipaddress.ip_address(client)
        except ValueError:
            return client
        if isinstance(address, ipaddress.IPv4Address):
            return str(address)
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        # The zone (fe80::1%eth0) names an interface of ours, not a different client.
        bits = int(address) >> (128 - self._ipv6_prefix) << (128 - self._ipv6_prefix)
        return f"{ipaddress.IPv6Address(bits)}/{self._ipv6_prefix}"

    def acquire(self, client: str) -> float:
        """Take one token: 0.0 if granted, else the seconds until one is available."""
        client = self.bucket_of(client)
        now = self._clock.now()
        tokens, last = self._buckets.pop(client, (self._burst, now))
        # A wall clock stepping back (NTP) must not read as a wait of that many seconds.
        tokens = min(self._burst, tokens + max(0.0, now - last) * self._rate)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self._rate
        self._buckets[client] = (tokens, now)
        while len(self._buckets) > self._max_clients:
            self._buckets.popitem(last=False)
        return wait


@dataclass(frozen=True, slots=True)
class _KnownToken:
    root_key: bytes
    amount_msat: int
    settled: bool
    fetched_at: float


class _TokenCache:
    """Root keys (and invoice facts) recently read from the store, with a maximum age.

    The age bounds how long a revocation made by another process goes unseen here.
    """

    def __init__(self, max_age: float, capacity: int = 100_000) -> None:
        self._max_age = max_age
        self._capacity = capacity
        self._entries: OrderedDict[bytes, _KnownToken] = OrderedDict()

    def get(self, key_id: bytes, now: float) -> _KnownToken | None:
        entry = self._entries.get(key_id)
        if entry is None:
            return None
        # A clock that stepped back also makes an entry stale.
        if not entry.fetched_at <= now < self.stale_at(entry):
            del self._entries[key_id]
            return None
        self._entries.move_to_end(key_id)
        return entry

    def stale_at(self, entry: _KnownToken) -> float:
        return entry.fetched_at + self._max_age

    def put(self, key_id: bytes, entry: _KnownToken) -> None:
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


_AllowedKey = tuple[tuple[str, ...], str, str]
ALLOWED_CACHE_SIZE = 50_000


@dataclass(frozen=True, slots=True)
class _AllowedEntry:
    allow: Allow
    # Valid in [since, until): from the root-key read it rests on until that read is too old
    # to trust (a revocation elsewhere) or the token expires, whichever comes first.
    since: float
    until: float


class L402Service:
    """Issues L402 challenges and verifies L402 credentials for priced routes."""

    def __init__(
        self,
        *,
        pricing: Pricing,
        backend: InvoiceBackend,
        store: Store,
        clock: Clock,
        location: str = "l402-gateway",
        invoice_expiry: int = 600,
        strict_settlement: bool = False,
        root_key_cache_seconds: float = 5.0,
        rate_limiter: RateLimiter | None = None,
        max_pending_invoices: int = 16,
        redeem_limiter: RateLimiter | None = None,
        redeem_lookups_per_second: float = REDEEM_LOOKUPS_PER_SECOND,
    ) -> None:
        self.pricing = pricing
        self._backend = backend
        self._store = store
        self._clock = clock
        self._now = clock.now  # bound once: read on every cached hit
        self._location = location
        self._invoice_expiry = invoice_expiry
        self._strict = strict_settlement
        self._cache = _TokenCache(root_key_cache_seconds)
        # Allowed (credential, method, path) -> the decision, valid as long as the root-key
        # read it rests on and the token itself: revocations take effect exactly as without
        # this cache (a local one clears it). Evicted oldest-first, never reordered: a hit
        # stays a dict lookup and one clock read.
        self._allowed: dict[_AllowedKey, _AllowedEntry] = {}
        self._limiter = rate_limiter
        self._lookups: OrderedDict[bytes, float] = OrderedDict()  # hash -> last node lookup
        self._preimages: OrderedDict[bytes, Preimage] = OrderedDict()
        self._redeem_limiter = redeem_limiter
        # One budget over all clients for redeem's lookups of still-open invoices: the
        # per-invoice interval alone is multiplied by every invoice a client cycles through.
        if not (math.isfinite(redeem_lookups_per_second) and redeem_lookups_per_second > 0):
            raise ValueError("redeem_lookups_per_second: the rate must be positive")
        self._redeem_lookups = RateLimiter(
            redeem_lookups_per_second, max(1, math.ceil(redeem_lookups_per_second)), 1, clock
        )
        # Many addresses, each within its budget, can still ask for more invoices than the
        # node writes; queued on its database they delay settling the invoices being paid.
        # Waiters are served in arrival order, so a buyer waits behind at most one request
        # per open connection.
        self._invoice_slots = asyncio.Semaphore(max_pending_invoices)

    async def authorize(self, request: RequestInfo) -> Decision:
        rule = self.pricing.resolve(request.method, request.path, request.method_overrides)
        if isinstance(rule, Refused):
            return Deny(400, rule.reason)
        if rule is None:
            return Allow(None)
        # A decision made without an override must not answer a request that has one.
        cache_key = (
            None
            if request.method_overrides
            else (request.authorization, request.method, request.path)
        )
        if cache_key is not None:
            cached = self.allowed_again(*cache_key)
            if cached is not None:
                return cached
        try:
            credential = l402.parse_authorization(request.authorization)
        except l402.MalformedToken as error:
            return Deny(401, error.reason, realm=self._location)
        if credential is None:
            if request.cookies:
                return await self._authorize_cookies(request, rule)
            return await self.challenge(request, rule, "payment required")
        try:
            return await self._verify(credential, request, rule, cache_key)
        except l402.TokenInsufficient as error:
            return await self.challenge(request, rule, error.reason)
        except l402.L402Error as error:
            return Deny(401, error.reason, realm=self._location)
        except errors.StoreError:
            log.exception("store failed while verifying a token")
            return Deny(503, "token store unavailable", retry_after=5)

    def allowed_again(self, authorization: tuple[str, ...], method: str, path: str) -> Allow | None:
        """The Allow already verified for this exact credential and request line, if any.

        Adapters call it first: on the hot path of a paying client it is the whole decision,
        with no request description to build.
        """
        key = (authorization, method, path)
        entry = self._allowed.get(key)
        if entry is None:
            return None
        if entry.since <= self._now() < entry.until:
            return entry.allow
        del self._allowed[key]
        return None

    async def _authorize_cookies(self, request: RequestInfo, rule: Rule) -> Decision:
        """The first L402 cookie that verifies; else a fresh challenge (never a 401)."""
        reason = "payment required"
        for value in request.cookies[:MAX_COOKIE_CREDENTIALS]:
            try:
                credential = l402.parse_authorization((f"L402 {value}",))
                if credential is None:  # pragma: no cover - the scheme is ours
                    continue
                return await self._verify(credential, request, rule)
            except l402.TokenInsufficient as error:
                reason = error.reason
            except l402.L402Error as error:
                log.debug("ignoring an L402 cookie: %s", error.reason)
            except errors.StoreError:
                log.exception("store failed while verifying a token")
                return Deny(503, "token store unavailable", retry_after=5)
        return await self.challenge(request, rule, reason)

    async def _verify(
        self,
        credential: l402.Credential,
        request: RequestInfo,
        rule: Rule,
        cache_key: _AllowedKey | None = None,
    ) -> Allow | Deny:
        identifier = l402.identifier_of(credential)
        now = self._clock.now()
        known = self._cache.get(identifier.key_id, now)
        if known is None:
            known = await self._load_token(identifier, now)
        scope = l402.RequestScope(
            service=rule.service,
            method=request.method.upper(),
            path=request.path,
            required_capabilities=rule.capabilities,
        )
        verified = l402.verify_token(credential, known.root_key, scope, now)
        if verified.tier < rule.tier:  # tiers are ordered privilege levels
            raise l402.TokenInsufficient("token tier is too low")
        if self._strict and not known.settled:
            confirmed = await self._confirm_settled(identifier, now)
            if isinstance(confirmed, Deny):
                return confirmed
            known = confirmed
        allow = Allow(
            PaidToken(
                token_id=verified.token_id.hex(),
                payment_hash=verified.payment_hash.hex(),
                service=verified.service,
                tier=verified.tier,
                capabilities=verified.capabilities,
                valid_until=verified.valid_until,
                amount_msat=known.amount_msat,
            )
        )
        if cache_key is not None:
            until = self._cache.stale_at(known)
            if verified.valid_until is not None:
                until = min(until, verified.valid_until)
            self._allowed[cache_key] = _AllowedEntry(allow, known.fetched_at, until)
            # Oldest first, drop the expired entries (all expire within the root-key cache
            # age) as well as the surplus, so memory follows the tokens in recent use.
            while self._allowed:
                oldest = next(iter(self._allowed))
                if len(self._allowed) <= ALLOWED_CACHE_SIZE and now < self._allowed[oldest].until:
                    break
                del self._allowed[oldest]
        return allow

    async def _load_token(self, identifier: l402.Identifier, now: float) -> _KnownToken:
        root_key = await self._store.get_root_key(identifier.key_id)
        if root_key is None:
            raise l402.TokenRejected("unknown or revoked token")
        record = await self._store.get_invoice(PaymentHash(identifier.payment_hash))
        known = _KnownToken(
            root_key=root_key,
            amount_msat=record.amount_msat if record is not None else 0,
            settled=record is not None and record.state is InvoiceState.SETTLED,
            fetched_at=now,
        )
        self._cache.put(identifier.key_id, known)
        return known

    async def _confirm_settled(self, identifier: l402.Identifier, now: float) -> _KnownToken | Deny:
        """Strict mode: the watcher may lag the payer by milliseconds, so ask the node."""
        payment_hash = PaymentHash(identifier.payment_hash)
        try:
            invoice = await self._backend.lookup_invoice(payment_hash)
        except errors.InvoiceNotFound:
            raise l402.TokenRejected("invoice is unknown to the node") from None
        except errors.BackendError as error:
            # The token may be good: a 401 would make the client throw it away.
            log.warning("cannot confirm settlement of %s: %s", payment_hash.hex(), error)
            return Deny(503, "settlement could not be confirmed", retry_after=5)
        if invoice.state is not InvoiceState.SETTLED:
            raise l402.TokenRejected("invoice is not settled")
        await self._store.apply_update(InvoiceUpdate.of(invoice))
        root_key = await self._store.get_root_key(identifier.key_id)
        if root_key is None:
            raise l402.TokenRejected("unknown or revoked token")
        known = _KnownToken(root_key, invoice.amount_msat, True, now)
        self._cache.put(identifier.key_id, known)
        return known

    async def challenge(self, request: RequestInfo, rule: Rule, reason: str) -> Decision:
        """Create an invoice for ``rule``'s price and mint a token bound to its payment hash.

        A price function may return 0 to let a request through for free.
        """
        price = await self._price(request, rule)
        if isinstance(price, Deny):
            return price
        if price == 0:
            return Allow(None)
        if self._limiter is not None:
            wait = self._limiter.acquire(request.client)
            if wait > 0:
                return Deny(429, "too many payment challenges", retry_after=math.ceil(wait))
        memo = printable(f"{rule.service}: {request.method.upper()} {request.path}", MEMO_LIMIT)
        try:
            async with self._invoice_slots:
                invoice = await self._backend.add_invoice(price, memo, self._invoice_expiry)
        except errors.BackendUnavailable as error:
            log.warning("cannot create invoice: %s", error)
            return Deny(503, "Lightning node unavailable", retry_after=5)
        except errors.BackendPermissionDenied as error:
            log.error("the node refused to create an invoice (check the macaroon): %s", error)
            return Deny(503, "Lightning node refused to create an invoice", retry_after=30)
        except errors.BackendError as error:
            log.error("cannot create invoice: %s", error)
            return Deny(502, "Lightning node failed to create an invoice")

        now = self._clock.now()
        token_id = secrets.token_bytes(32)
        root_key = secrets.token_bytes(32)
        caveats = [l402.services_caveat(rule.service, rule.tier)]
        if rule.capabilities:
            caveats.append(l402.capabilities_caveat(rule.service, sorted(rule.capabilities)))
        caveats.append(l402.valid_until_caveat(rule.service, int(now) + rule.lifetime))
        macaroon = l402.mint_token(
            root_key, invoice.payment_hash, token_id, caveats, location=self._location
        )
        record = InvoiceRecord(
            payment_hash=invoice.payment_hash,
            payment_request=invoice.payment_request,
            amount_msat=price,
            token_id=token_id,
            service=rule.service,
            method=request.method.upper(),
            path=request.path,
            state=InvoiceState.OPEN,
            created_at=now,
            expires_at=now + self._invoice_expiry,
            add_index=invoice.add_index,
        )
        key_id = hashlib.sha256(macaroon.identifier).digest()
        try:
            # The invoice first: a root key is only ever stored for a tracked invoice.
            await self._store.add_invoice(record)
            await self._store.put_root_key(key_id, token_id, root_key)
        except errors.StoreError:
            log.exception("store failed while issuing a challenge")
            return Deny(503, "token store unavailable", retry_after=5)
        return Challenge(
            reason=reason,
            macaroon=l402.encode_b64(macaroon),
            invoice=invoice.payment_request,
            payment_hash=invoice.payment_hash.hex(),
            amount_msat=price,
            expires_at=record.expires_at,
            service=rule.service,
            method=record.method,
            path=request.path,
            lifetime=rule.lifetime,
            issued_at=now,
        )

    async def _price(self, request: RequestInfo, rule: Rule) -> Msat | Deny:
        if rule.price_msat is not None:
            return rule.price_msat
        assert rule.price_function is not None
        headers = tuple(
            (name, value if name.lower() != "cookie" else without_l402_cookie(value) or "")
            for name, value in request.headers
            if name.lower() not in _SECRET_HEADERS
        )
        price_request = PriceRequest(request.method, request.path, request.query, headers)
        try:
            price = await rule.price_function(price_request)
        except Exception:
            log.exception("price function for %s failed", rule.pattern)
            return Deny(500, "price function failed")
        if (
            not isinstance(price, int)
            or isinstance(price, bool)
            or not 0 <= price <= MAX_PRICE_MSAT
        ):
            log.error("price function for %s returned %r", rule.pattern, price)
            return Deny(500, "price function returned an invalid price")
        return Msat(price)

    async def redeem(self, macaroon_b64: str, *, client: str) -> RedeemResult | Deny:
        """The state of the invoice a challenge's macaroon is bound to, for the paywall page.

        Only the holder of the macaroon can ask (its signature must check out with the stored
        root key; a payment hash alone is not enough), and once the invoice is settled it
        gets the full credential: the macaroon with the invoice's preimage. Cheap by design:
        no invoice is created, the store answers, and the node is asked about a still-open
        invoice at most every ``REDEEM_LOOKUP_INTERVAL`` seconds and within one budget of
        ``redeem_lookups_per_second`` over all clients (past it the store answers; the
        watcher normally reports the settlement first), and about a settled one once, for
        its preimage. ``client`` is the address the redeem rate limit applies to.

        Deny: 400 for text that is not a macaroon, 401 for a macaroon that is not one of
        ours (unknown, revoked, forged), 429 when the client asks too often, 503 when the
        store or the node cannot answer.
        """
        if self._redeem_limiter is not None:
            wait = self._redeem_limiter.acquire(client)
            if wait > 0:
                return Deny(429, "too many redeem requests", retry_after=math.ceil(wait))
        if not (
            0 < len(macaroon_b64) <= MAX_REDEEM_MACAROON_CHARS and _B64_TEXT.fullmatch(macaroon_b64)
        ):
            return Deny(400, "macaroon must be base64 text")
        try:
            macaroon = l402.decode_b64(macaroon_b64)
            identifier = l402.Identifier.decode(macaroon.identifier)
        except l402.MalformedToken as error:
            return Deny(400, error.reason)
        try:
            return await self._redeem(macaroon, identifier)
        except l402.L402Error as error:
            return Deny(401, error.reason, realm=self._location)
        except errors.StoreError:
            log.exception("store failed while redeeming a token")
            return Deny(503, "token store unavailable", retry_after=5)
        except errors.BackendError as error:
            log.warning("cannot look up an invoice to redeem: %s", error)
            return Deny(503, "Lightning node unavailable", retry_after=5)

    async def _redeem(self, macaroon: l402.Macaroon, identifier: l402.Identifier) -> RedeemResult:
        root_key = await self._store.get_root_key(identifier.key_id)
        if root_key is None:
            raise l402.TokenRejected("unknown or revoked token")
        if not macaroon.verify_signature(root_key):
            raise l402.TokenRejected("invalid macaroon signature")
        payment_hash = PaymentHash(identifier.payment_hash)
        record = await self._store.get_invoice(payment_hash)
        if record is None:
            raise l402.TokenRejected("unknown invoice")
        now = self._clock.now()
        pending = RedeemResult(RedeemState.PENDING, record.expires_at)
        preimage = self._preimages.get(payment_hash)
        if preimage is None:
            if record.state is InvoiceState.CANCELED:
                return RedeemResult(RedeemState.CANCELED, record.expires_at)
            if record.state is InvoiceState.EXPIRED:
                return RedeemResult(RedeemState.EXPIRED, record.expires_at)
            if record.state is not InvoiceState.SETTLED:
                last = self._lookups.get(payment_hash)
                if last is not None and 0 <= now - last < REDEEM_LOOKUP_INTERVAL:
                    return self._unpaid(record.expires_at, now)
                if self._redeem_lookups.acquire(_NODE) > 0:
                    return self._unpaid(record.expires_at, now)
                self._remember(self._lookups, payment_hash, now)
            invoice = await self._backend.lookup_invoice(payment_hash)
            if invoice.state is InvoiceState.CANCELED:
                return RedeemResult(RedeemState.CANCELED, record.expires_at)
            if invoice.state is not InvoiceState.SETTLED:
                return self._unpaid(record.expires_at, now)
            if invoice.preimage is None or not hmac.compare_digest(
                hashlib.sha256(invoice.preimage).digest(), payment_hash
            ):
                log.error("the node reported no valid preimage for %s", payment_hash.hex())
                return pending
            if record.state is not InvoiceState.SETTLED:
                await self._store.apply_update(InvoiceUpdate.of(invoice))
            preimage = invoice.preimage
            self._lookups.pop(payment_hash, None)
            self._remember(self._preimages, payment_hash, preimage)
        # The token must still be good for the request it was issued for.
        rule = self.pricing.match(record.method, record.path)
        scope = l402.RequestScope(
            service=record.service,
            method=record.method,
            path=record.path,
            required_capabilities=rule.capabilities if rule is not None else frozenset(),
        )
        try:
            caveats = [l402.Caveat.parse(raw) for raw in macaroon.caveats]
        except l402.MalformedToken:
            raise l402.TokenRejected("malformed caveat") from None
        try:
            granted = l402.check_caveats(caveats, scope, now)
        except l402.TokenInsufficient as error:
            if error.reason == "token expired":
                return RedeemResult(RedeemState.EXPIRED, record.expires_at)
            raise l402.TokenRejected(error.reason) from None
        encoded = base64.urlsafe_b64encode(macaroon.serialize()).rstrip(b"=").decode("ascii")
        return RedeemResult(
            state=RedeemState.SETTLED,
            expires_at=record.expires_at,
            credential=f"{encoded}:{preimage.hex()}",
            cookie_path=cookie_path(record.path),
            max_age=None if granted.valid_until is None else max(1, int(granted.valid_until - now)),
        )

    @staticmethod
    def _unpaid(expires_at: float, now: float) -> RedeemResult:
        state = RedeemState.EXPIRED if now >= expires_at else RedeemState.PENDING
        return RedeemResult(state, expires_at)

    @staticmethod
    def _remember(memory: OrderedDict[bytes, _T], key: bytes, value: _T) -> None:
        memory[key] = value
        memory.move_to_end(key)
        while len(memory) > _REDEEM_MEMORY:
            memory.popitem(last=False)

    async def revoke(self, token_id: bytes) -> bool:
        """Revoke a token everywhere its root key is stored; True if it existed."""
        revoked = await self._store.revoke_token(token_id)
        self._cache.clear()
        self._allowed.clear()
        self._preimages.clear()
        return revoked


def cookie_path(path: str) -> str:
    """A ``Path`` cookie attribute for ``path``: itself when it is safe to put in a
    ``Set-Cookie`` header and matches the URL a browser sends, else its longest safe
    directory (a wider cookie scope is harmless: the token's caveats decide what it opens).
    """
    safe = _COOKIE_PATH_CHARS.match(path)
    end = safe.end() if safe is not None else 0
    if end == len(path) and path.startswith("/"):
        return path
    cut = path.rfind("/", 0, end)
    return path[:cut] if cut > 0 else "/"


def l402_cookie_values(cookie_headers: Iterable[str]) -> tuple[str, ...]:
    """The values of every ``L402`` cookie in a request's ``Cookie`` headers, in order."""
    values: list[str] = []
    for header in cookie_headers:
        for pair in header.split(";"):
            name, sep, value = pair.partition("=")
            if sep and name.strip() == COOKIE_NAME:
                value = value.strip()
                if len(value) > 1 and value[0] == value[-1] == '"':
                    value = value[1:-1]
                if value:
                    values.append(value)
    return tuple(values)


def without_l402_cookie(cookie_header: str) -> str | None:
    """A ``Cookie`` header value without the L402 cookie (a bearer secret); None if empty."""
    kept = [
        pair.strip()
        for pair in cookie_header.split(";")
        if pair.strip() and pair.partition("=")[0].strip() != COOKIE_NAME
    ]
    return "; ".join(kept) or None
