"""Redeem: the paywall page asks whether a challenge's invoice is paid and, once it is, gets
the full credential (the macaroon with the invoice's preimage) for the browser to keep."""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import logging
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TypeVar

from gateway import errors, l402
from gateway.ports import (
    Clock,
    HeldState,
    InvoiceBackend,
    InvoiceState,
    InvoiceUpdate,
    PaymentHash,
    Preimage,
    Store,
)
from gateway.pricing import Pricing
from gateway.service.decisions import Deny, Refusal
from gateway.service.rate_limiter import ClientLimiter, RateLimiter, rate_limited

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# The macaroon of a challenge, as base64 text of a sane size.
MAX_REDEEM_MACAROON_CHARS = 4096
_B64_TEXT = re.compile(r"[A-Za-z0-9+/_\-]+=*")
# The node is asked about an invoice the store still has open at most this often (the
# watcher normally reports the settlement first); settled preimages are remembered.
REDEEM_LOOKUP_INTERVAL = 5.0
_REDEEM_MEMORY = 10_000
# Default budget of those lookups over all clients, per second (the bucket holds one second).
REDEEM_LOOKUPS_PER_SECOND = 10.0
_NODE = "node"  # the one key of that budget's bucket
_GLOB = re.compile(r"[*?\[]")  # where a route pattern stops being literal


class RedeemState(enum.Enum):
    PENDING = "pending"  # not paid yet, still payable
    SETTLED = "settled"  # paid: the credential is in the result
    EXPIRED = "expired"  # the invoice (or the token's lifetime) ran out unpaid
    CANCELED = "canceled"
    REFUNDED = "refunded"  # pay on success: the request failed, the held payment went back


@dataclass(frozen=True, slots=True)
class RedeemResult:
    """What ``L402Service.redeem`` found out about a challenge's invoice."""

    state: RedeemState
    expires_at: float  # when the invoice stops being payable
    # Once SETTLED: ``<url-safe macaroon>:<hex preimage>``, the credential a browser keeps.
    credential: str | None = field(default=None, repr=False)
    path: str = "/"  # the request path the token was bought for
    max_age: int | None = None  # seconds of token lifetime left (None: no valid_until)
    # What the token opens, for the browser's cookie: the path prefix shared by every route
    # of its service and the path it was bought on, and the grant its caveats carry.
    scope: str = "/"
    service: str = ""
    tier: int = 0
    capabilities: frozenset[str] | None = None
    failure: str = ""  # REFUNDED: why the paid request failed, fixed text


# Pay on success: what a held request's state means to the payer before it is settled. A
# FAILED one is being cancelled: refunded already, as far as the payer is concerned.
_HELD_PENDING = frozenset({HeldState.WAITING, HeldState.RUNNING, HeldState.SUCCEEDED})
_HELD_REFUNDED = frozenset({HeldState.FAILED, HeldState.CANCELED})


class Redeemer:
    """Answers redeem requests cheaply: no invoice is created, the store answers, and the node
    is asked about a still-open invoice at most every ``REDEEM_LOOKUP_INTERVAL`` seconds and
    within one budget of ``lookups_per_second`` over all clients (past it the store answers;
    the watcher normally reports the settlement first), and about a settled one once, for its
    preimage."""

    def __init__(
        self,
        *,
        pricing: Pricing,
        backend: InvoiceBackend,
        store: Store,
        clock: Clock,
        location: str,
        limiter: ClientLimiter | None,
        lookups_per_second: float,
    ) -> None:
        self._pricing = pricing
        self._backend = backend
        self._store = store
        self._clock = clock
        self._location = location
        self._limiter = limiter
        # One budget over all clients for lookups of still-open invoices: the per-invoice
        # interval alone is multiplied by every invoice a client cycles through.
        if not (math.isfinite(lookups_per_second) and lookups_per_second > 0):
            raise ValueError("redeem_lookups_per_second: the rate must be positive")
        self._lookup_budget = RateLimiter(
            lookups_per_second, max(1, math.ceil(lookups_per_second)), 1, clock
        )
        self._lookups: OrderedDict[bytes, float] = OrderedDict()  # hash -> last node lookup
        self._preimages: OrderedDict[bytes, Preimage] = OrderedDict()

    def forget(self) -> None:
        """Drop the remembered preimages (after a revocation)."""
        self._preimages.clear()

    async def redeem(self, macaroon_b64: str, *, client: str) -> RedeemResult | Deny:
        """The state of the invoice ``macaroon_b64`` is bound to (see L402Service.redeem)."""
        if self._limiter is not None:
            limited = await rate_limited(self._limiter, client, Refusal.TOO_MANY_REDEEMS)
            if limited is not None:
                return limited
        if not (
            0 < len(macaroon_b64) <= MAX_REDEEM_MACAROON_CHARS and _B64_TEXT.fullmatch(macaroon_b64)
        ):
            return Deny(400, Refusal.MACAROON_NOT_BASE64)
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
            return Deny(503, Refusal.STORE_UNAVAILABLE, retry_after=5)
        except errors.BackendError as error:
            log.warning("cannot look up an invoice to redeem: %s", error)
            return Deny(503, Refusal.NODE_UNAVAILABLE, retry_after=5)

    async def _redeem(self, macaroon: l402.Macaroon, identifier: l402.Identifier) -> RedeemResult:
        root_key = await self._store.get_root_key(identifier.key_id)
        if root_key is None:
            raise l402.TokenRejected(Refusal.UNKNOWN_OR_REVOKED)
        if not macaroon.verify_signature(root_key):
            raise l402.TokenRejected(Refusal.INVALID_SIGNATURE)
        payment_hash = PaymentHash(identifier.payment_hash)
        record = await self._store.get_invoice(payment_hash)
        if record is None:
            raise l402.TokenRejected(Refusal.UNKNOWN_INVOICE)
        now = self._clock.now()
        pending = RedeemResult(RedeemState.PENDING, record.expires_at)
        preimage = self._preimages.get(payment_hash)
        # A hold invoice's preimage is ours: the held request says where it stands.
        held = await self._store.get_held_request(payment_hash)
        if held is not None:
            if held.state is HeldState.WAITING:
                return _unpaid(record.expires_at, now)
            if held.state in _HELD_PENDING:
                return pending
            if held.state in _HELD_REFUNDED:
                return RedeemResult(RedeemState.REFUNDED, record.expires_at, failure=held.failure)
            if held.state is HeldState.EXPIRED:
                return RedeemResult(RedeemState.EXPIRED, record.expires_at)
            preimage = held.preimage
        if preimage is None:
            if record.state is InvoiceState.CANCELED:
                return RedeemResult(RedeemState.CANCELED, record.expires_at)
            if record.state is InvoiceState.EXPIRED:
                return RedeemResult(RedeemState.EXPIRED, record.expires_at)
            if record.state is not InvoiceState.SETTLED:
                last = self._lookups.get(payment_hash)
                if last is not None and 0 <= now - last < REDEEM_LOOKUP_INTERVAL:
                    return _unpaid(record.expires_at, now)
                if self._lookup_budget.acquire(_NODE) > 0:
                    return _unpaid(record.expires_at, now)
                _remember(self._lookups, payment_hash, now)
            invoice = await self._backend.lookup_invoice(payment_hash)
            if invoice.state is InvoiceState.CANCELED:
                return RedeemResult(RedeemState.CANCELED, record.expires_at)
            if invoice.state is not InvoiceState.SETTLED:
                return _unpaid(record.expires_at, now)
            if invoice.preimage is None or not hmac.compare_digest(
                hashlib.sha256(invoice.preimage).digest(), payment_hash
            ):
                log.error("the node reported no valid preimage for %s", payment_hash.hex())
                return pending
            if record.state is not InvoiceState.SETTLED:
                await self._store.apply_update(InvoiceUpdate.of(invoice))
            preimage = invoice.preimage
            self._lookups.pop(payment_hash, None)
            _remember(self._preimages, payment_hash, preimage)
        # The token must still be good for the request it was issued for.
        rule = self._pricing.match(record.method, record.path)
        scope = l402.RequestScope(
            service=record.service,
            method=record.method,
            path=record.path,
            required_capabilities=rule.capabilities if rule is not None else frozenset(),
        )
        try:
            caveats = [l402.Caveat.parse(raw) for raw in macaroon.caveats]
        except l402.MalformedToken:
            raise l402.TokenRejected(Refusal.MALFORMED_CAVEAT) from None
        try:
            granted = l402.check_caveats(caveats, scope, now)
        except l402.TokenInsufficient as error:
            if error.reason is l402.ChallengeReason.EXPIRED:
                return RedeemResult(RedeemState.EXPIRED, record.expires_at)
            raise l402.TokenRejected(error.reason) from None
        encoded = base64.urlsafe_b64encode(macaroon.serialize()).rstrip(b"=").decode("ascii")
        return RedeemResult(
            state=RedeemState.SETTLED,
            expires_at=record.expires_at,
            credential=f"{encoded}:{preimage.hex()}",
            path=record.path,
            max_age=None if granted.valid_until is None else max(1, int(granted.valid_until - now)),
            scope=service_scope(self._pricing, record.service, record.path),
            service=granted.service,
            tier=granted.tier,
            capabilities=granted.capabilities,
        )


def service_scope(pricing: Pricing, service: str, bought_path: str) -> str:
    """The longest path prefix (a cookie ``Path``: whole segments, no trailing ``/``) of
    ``bought_path`` and of every path a priced route of ``service`` matches."""
    literal: list[tuple[str, bool]] = [(bought_path, True)]  # (prefix, whole path?)
    for rule in pricing.rules:
        if rule.service == service and not rule.free:
            glob = _GLOB.search(rule.pattern)
            literal.append((rule.pattern[: glob.start()] if glob else rule.pattern, glob is None))
    # By character on purpose: the loop below cuts it back to whole segments.
    scope = os.path.commonprefix([prefix for prefix, _ in literal])  # noqa: RUF071
    if len(scope) > 1 and scope.endswith("/"):
        scope = scope[:-1]
    while scope != "/" and not all(_under(scope, prefix, whole) for prefix, whole in literal):
        cut = scope.rfind("/")
        scope = scope[:cut] if cut > 0 else "/"
    return scope if scope.startswith("/") else "/"


def _under(scope: str, prefix: str, whole: bool) -> bool:
    """Whether every path starting with ``prefix`` (exactly ``prefix`` if ``whole``) is in
    the cookie path ``scope`` (RFC 6265 5.1.4: equal, or followed by ``/``)."""
    if not prefix.startswith(scope):
        return False
    if len(prefix) == len(scope):
        return whole
    return prefix[len(scope)] == "/"


def _unpaid(expires_at: float, now: float) -> RedeemResult:
    state = RedeemState.EXPIRED if now >= expires_at else RedeemState.PENDING
    return RedeemResult(state, expires_at)


def _remember(memory: OrderedDict[bytes, _T], key: bytes, value: _T) -> None:
    memory[key] = value
    memory.move_to_end(key)
    while len(memory) > _REDEEM_MEMORY:
        memory.popitem(last=False)
