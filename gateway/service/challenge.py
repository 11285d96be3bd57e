"""Issuing a payment challenge: price the request, create the invoice on the node, mint a
macaroon bound to its payment hash, and record both in the store (with the account, on a
credit route)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from gateway import errors, l402
from gateway.ports import (
    HELD_UNFINISHED,
    Clock,
    HeldRequest,
    HeldState,
    HoldInvoiceBackend,
    InvoiceBackend,
    InvoiceRecord,
    InvoiceState,
    Msat,
    NewInvoice,
    PaymentHash,
    Preimage,
    Store,
    StoredRequest,
    StoreOperations,
)
from gateway.pricing import MAX_PRICE_MSAT, PriceRequest, Rule
from gateway.service.credit import requested_credit
from gateway.service.decisions import (
    FREE,
    Decision,
    Deny,
    PaidToken,
    PaymentChallenge,
    Refusal,
    RequestInfo,
)
from gateway.service.on_success import HoldTerms
from gateway.service.rate_limiter import ClientLimiter, client_key, rate_limited
from gateway.text import printable

log = logging.getLogger(__name__)

MEMO_LIMIT = 120
# A broken price function fails every request: one log line per route this often, not one
# per request.
PRICE_LOG_INTERVAL = 60.0


@dataclass(frozen=True, slots=True)
class TopUp:
    """A challenge for more credit: the account of ``token_id`` holds ``balance_msat``, too
    little for this request's ``price_msat``."""

    token_id: bytes
    balance_msat: int
    price_msat: Msat


@dataclass(frozen=True, slots=True)
class _Held:
    """A pay-on-success challenge's request, and the preimage of its hold invoice."""

    request: StoredRequest
    preimage: Preimage
    payment_hash: PaymentHash
    client: str


class _OverCap(Exception):
    """Rolls back a challenge's writes: its held request would pass a cap."""

    def __init__(self, deny: Deny) -> None:
        super().__init__(deny.reason)
        self.deny = deny


class ChallengeIssuer:
    """Creates the invoice and the token of every payment challenge the service sends."""

    def __init__(
        self,
        *,
        backend: InvoiceBackend,
        store: Store,
        clock: Clock,
        location: str,
        invoice_expiry: int,
        rate_limiter: ClientLimiter | None,
        max_pending_invoices: int,
        merchant: str = "",
        fiat: Callable[[int], str] | None = None,
        hold_backend: HoldInvoiceBackend | None = None,
        hold: HoldTerms | None = None,
        on_held: Callable[[], None] | None = None,
    ) -> None:
        self._backend = backend
        self._hold_backend = hold_backend
        self._hold = hold
        self._on_held = on_held
        self._merchant = merchant
        self._fiat = fiat
        self._store = store
        self._clock = clock
        self._location = location
        self._invoice_expiry = invoice_expiry
        self._limiter = rate_limiter
        # Many addresses, each within its budget, can still ask for more invoices than the
        # node writes; queued on its database they delay settling the invoices being paid.
        # Waiters are served in arrival order, so a buyer waits behind at most one request
        # per open connection. Shared with the tip jars and payment links (``Tips``).
        self.invoice_slots = asyncio.Semaphore(max_pending_invoices)
        self._price_log_after: dict[str, float] = {}  # pattern -> when to log it again
        self._price_failures: dict[str, int] = {}  # pattern -> failures not logged

    async def challenge(
        self,
        request: RequestInfo,
        rule: Rule,
        reason: l402.ChallengeReason,
        *,
        top_up: TopUp | None = None,
    ) -> Decision:
        """Create an invoice for ``rule``'s price and mint a token bound to its payment hash.

        On a credit route the invoice buys credit (``requested_credit``) for the account of
        the new token, or with ``top_up`` for the account of the token that ran out: the new
        macaroon then carries that token's id. A price function may return 0 to let a request
        through for free.

        On a pay-on-success route the invoice is a hold invoice and the request is stored
        with it, within the caps of ``HoldTerms`` (503 over all clients, 429 for one).
        """
        if rule.settle_on_success and (
            self._hold is None or self._hold_backend is None or request.stored_request is None
        ):
            return Deny(501, Refusal.HOLD_UNAVAILABLE)
        price = top_up.price_msat if top_up is not None else await self.price(request, rule)
        if isinstance(price, Deny):
            return price
        if price == 0:
            return FREE
        amount = price
        what = f"{request.method.upper()} {request.path}"
        if rule.credit is not None:
            balance = top_up.balance_msat if top_up is not None else 0
            bought = requested_credit(request.headers, rule.credit, price - balance)
            if isinstance(bought, Deny):
                return bought
            amount = bought
            what = f"{amount} msat of credit ({what})"
        if self._limiter is not None:
            limited = await rate_limited(self._limiter, request.client, Refusal.TOO_MANY_CHALLENGES)
            if limited is not None:
                return limited
        held: _Held | None = None
        if rule.settle_on_success:
            prepared = await self._prepare_held(request)
            if isinstance(prepared, Deny):
                return prepared
            held = prepared
        memo = printable(f"{rule.service}: {what}", MEMO_LIMIT)
        expiry = (
            self._invoice_expiry
            if self._hold is None or held is None
            else self._hold.invoice_expiry
        )
        try:
            async with self.invoice_slots:
                invoice = await self._add_invoice(amount, memo, expiry, held)
        except errors.BackendUnavailable as error:
            log.warning("cannot create invoice: %s", error)
            return Deny(503, Refusal.NODE_UNAVAILABLE, retry_after=5)
        except errors.BackendPermissionDenied as error:
            log.error("the node refused to create an invoice (check the macaroon): %s", error)
            return Deny(503, Refusal.NODE_REFUSED_INVOICE, retry_after=30)
        except errors.BackendError as error:
            log.error("cannot create invoice: %s", error)
            return Deny(502, Refusal.NODE_FAILED_INVOICE)

        now = self._clock.now()
        token_id = top_up.token_id if top_up is not None else secrets.token_bytes(32)
        root_key = secrets.token_bytes(32)
        valid_until = int(now) + rule.lifetime
        caveats = [l402.services_caveat(rule.service, rule.tier)]
        if rule.capabilities:
            caveats.append(l402.capabilities_caveat(rule.service, sorted(rule.capabilities)))
        caveats.append(l402.valid_until_caveat(rule.service, valid_until))
        macaroon = l402.mint_token(
            root_key, invoice.payment_hash, token_id, caveats, location=self._location
        )
        record = InvoiceRecord(
            payment_hash=invoice.payment_hash,
            payment_request=invoice.payment_request,
            amount_msat=amount,
            token_id=token_id,
            service=rule.service,
            method=request.method.upper(),
            path=request.path,
            state=InvoiceState.OPEN,
            created_at=now,
            expires_at=now + expiry,
            add_index=invoice.add_index,
            buys_credit=rule.credit is not None,
            # A credit purchase is split as the credit is spent (settle_reservation), not
            # when it is paid.
            split=rule.split if rule.credit is None else (),
        )
        key_id = hashlib.sha256(macaroon.identifier).digest()
        try:
            # One unit of work: a root key is only ever stored with its tracked invoice.
            async with self._store.transaction() as tx:
                await tx.add_invoice(record)
                await tx.put_root_key(key_id, token_id, root_key)
                if rule.credit is not None:
                    await tx.open_account(token_id, rule.service)
                if held is not None:
                    # Again, counted with the writes: concurrent challenges passed the first
                    # count together while their invoices were being made.
                    over = await self._over_cap(tx, held.client)
                    if over is not None:
                        raise _OverCap(over)
                    grant = PaidToken(
                        token_id=token_id.hex(),
                        payment_hash=invoice.payment_hash.hex(),
                        service=rule.service,
                        tier=rule.tier,
                        capabilities=rule.capabilities or None,
                        valid_until=valid_until,
                        amount_msat=amount,
                    )
                    await tx.add_held_request(
                        HeldRequest(
                            payment_hash=held.payment_hash,
                            preimage=held.preimage,
                            token_id=token_id,
                            client=held.client,
                            grant=grant.grant(),
                            request=held.request,
                            state=HeldState.WAITING,
                            created_at=now,
                            expires_at=record.expires_at,
                            updated_at=now,
                        )
                    )
        except _OverCap as refused:
            assert held is not None
            await self._drop_hold_invoice(held.payment_hash)
            return refused.deny
        except errors.StoreError:
            log.exception("store failed while issuing a challenge")
            if held is not None:
                await self._drop_hold_invoice(held.payment_hash)
            return Deny(503, Refusal.STORE_UNAVAILABLE, retry_after=5)
        if held is not None and self._on_held is not None:
            self._on_held()
        return PaymentChallenge(
            reason=reason,
            macaroon=l402.encode_b64(macaroon),
            invoice=invoice.payment_request,
            payment_hash=invoice.payment_hash.hex(),
            amount_msat=amount,
            expires_at=record.expires_at,
            service=rule.service,
            method=record.method,
            path=request.path,
            lifetime=rule.lifetime,
            issued_at=now,
            title=rule.title,
            description=rule.description,
            merchant=self._merchant,
            fiat=self._fiat(amount) if self._fiat is not None else "",
            credit=rule.credit is not None,
            price_msat=price if rule.credit is not None else 0,
            balance_msat=top_up.balance_msat if top_up is not None else None,
            settle_timeout=None
            if held is None or self._hold is None
            else self._hold.backend_timeout,
        )

    async def _prepare_held(self, request: RequestInfo) -> _Held | Deny:
        """Within the caps, the request to keep and the preimage of its hold invoice."""
        assert request.stored_request is not None
        # Keyed as the rate limit keys clients (its IPv6 prefix, as configured).
        client = (
            client_key(request.client)
            if self._limiter is None
            else self._limiter.bucket_of(request.client)
        )
        try:
            over = await self._over_cap(self._store, client)
        except errors.StoreError:
            log.exception("store failed while counting pay-on-success requests")
            return Deny(503, Refusal.STORE_UNAVAILABLE, retry_after=5)
        if over is not None:
            return over
        stored = await request.stored_request()
        if isinstance(stored, Deny):
            return stored
        preimage = Preimage(secrets.token_bytes(32))
        payment_hash = PaymentHash(hashlib.sha256(preimage).digest())
        return _Held(stored, preimage, payment_hash, client)

    async def _over_cap(self, store: StoreOperations, client: str) -> Deny | None:
        """The refusal of one more unfinished held request, if it would pass a cap."""
        assert self._hold is not None
        if await store.count_held_requests(HELD_UNFINISHED) >= self._hold.max_outstanding:
            return Deny(503, Refusal.TOO_MANY_HELD, retry_after=self._hold.invoice_expiry)
        if (
            await store.count_held_requests(HELD_UNFINISHED, client)
            >= self._hold.max_outstanding_per_client
        ):
            return Deny(
                429, Refusal.TOO_MANY_HELD_FOR_CLIENT, retry_after=self._hold.invoice_expiry
            )
        return None

    async def _drop_hold_invoice(self, payment_hash: PaymentHash) -> None:
        """Cancel a hold invoice the store refused to track (unpaid, it expires anyway)."""
        assert self._hold_backend is not None
        try:
            await self._hold_backend.cancel_invoice(payment_hash)
        except errors.BackendError as error:
            log.warning("cannot cancel an untracked hold invoice: %s", error)

    async def _add_invoice(
        self, amount: Msat, memo: str, expiry: int, held: _Held | None
    ) -> NewInvoice:
        if held is None:
            return await self._backend.add_invoice(amount, memo, expiry)
        assert self._hold_backend is not None
        assert self._hold is not None
        return await self._hold_backend.add_hold_invoice(
            held.payment_hash, amount, memo, expiry, cltv_expiry=self._hold.cltv_expiry
        )

    async def price(self, request: RequestInfo, rule: Rule) -> Msat | Deny:
        """The price of ``request`` by ``rule``: fixed, or what its price function says (a
        failing or invalid one is logged and answered with 503)."""
        if rule.price_msat is not None:
            return rule.price_msat
        assert rule.price_function is not None
        # The adapter left the credentials out of the headers (RequestInfo).
        price_request = PriceRequest(request.method, request.path, request.query, request.headers)
        try:
            price = await rule.price_function(price_request)
        except Exception as error:  # user code: any failure is a 503
            self._price_failed(rule, f"failed: {type(error).__name__}: {error}")
            return Deny(503, Refusal.PRICE_FUNCTION_FAILED, retry_after=30)
        if (
            not isinstance(price, int)
            or isinstance(price, bool)
            or not 0 <= price <= MAX_PRICE_MSAT
        ):
            shown = repr(price)[:80]
            self._price_failed(rule, f"returned {shown}, not 0 to {MAX_PRICE_MSAT} msat")
            return Deny(503, Refusal.INVALID_PRICE, retry_after=30)
        return Msat(price)

    def _price_failed(self, rule: Rule, what: str) -> None:
        """Log a price function's failure in one line, at most once per route per
        ``PRICE_LOG_INTERVAL``, with how many went unlogged since."""
        now = self._clock.now()
        if now < self._price_log_after.get(rule.pattern, -math.inf):
            self._price_failures[rule.pattern] = self._price_failures.get(rule.pattern, 0) + 1
            return
        self._price_log_after[rule.pattern] = now + PRICE_LOG_INTERVAL
        unlogged = self._price_failures.pop(rule.pattern, 0)
        log.error(
            "price function for %s %s (answering 503)%s",
            rule.pattern,
            printable(what, 300),
            f"; {unlogged} more failures since the last report" if unlogged else "",
        )
