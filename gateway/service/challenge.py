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
from gateway.ports import Clock, InvoiceBackend, InvoiceRecord, InvoiceState, Msat, Store
from gateway.pricing import MAX_PRICE_MSAT, PriceRequest, Rule
from gateway.service.credit import requested_credit
from gateway.service.decisions import Allow, Decision, Deny, PaymentChallenge, Refusal, RequestInfo
from gateway.service.rate_limiter import RateLimiter
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
        rate_limiter: RateLimiter | None,
        max_pending_invoices: int,
        merchant: str = "",
        fiat: Callable[[int], str] | None = None,
    ) -> None:
        self._backend = backend
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
        # per open connection.
        self._invoice_slots = asyncio.Semaphore(max_pending_invoices)
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
        """
        price = top_up.price_msat if top_up is not None else await self.price(request, rule)
        if isinstance(price, Deny):
            return price
        if price == 0:
            return Allow(None)
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
            wait = self._limiter.acquire(request.client)
            if wait > 0:
                return Deny(429, Refusal.TOO_MANY_CHALLENGES, retry_after=math.ceil(wait))
        memo = printable(f"{rule.service}: {what}", MEMO_LIMIT)
        try:
            async with self._invoice_slots:
                invoice = await self._backend.add_invoice(amount, memo, self._invoice_expiry)
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
            amount_msat=amount,
            token_id=token_id,
            service=rule.service,
            method=request.method.upper(),
            path=request.path,
            state=InvoiceState.OPEN,
            created_at=now,
            expires_at=now + self._invoice_expiry,
            add_index=invoice.add_index,
            buys_credit=rule.credit is not None,
        )
        key_id = hashlib.sha256(macaroon.identifier).digest()
        try:
            # One unit of work: a root key is only ever stored with its tracked invoice.
            async with self._store.transaction() as tx:
                await tx.add_invoice(record)
                await tx.put_root_key(key_id, token_id, root_key)
                if rule.credit is not None:
                    await tx.open_account(token_id, rule.service)
        except errors.StoreError:
            log.exception("store failed while issuing a challenge")
            return Deny(503, Refusal.STORE_UNAVAILABLE, retry_after=5)
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
