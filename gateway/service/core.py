"""``L402Service``: the core's entry points, ``authorize()``, ``redeem()`` and ``revoke()``,
and for credit routes ``finish_charge()``, ``token_info()`` and ``withdraw()``."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from urllib.parse import unquote

from gateway import errors, l402
from gateway.ports import (
    NO_METER,
    Clock,
    HeldRequest,
    HeldState,
    HoldInvoiceBackend,
    InvoiceBackend,
    InvoiceRecord,
    Meter,
    PaymentHash,
    Store,
)
from gateway.pricing import Pricing, Refused, Rule
from gateway.service.caches import (
    ALLOWED_CACHE_SIZE,
    CREDENTIAL_TAIL,
    AllowedKey,
    FreeLines,
    fits_cache,
)
from gateway.service.challenge import ChallengeIssuer, TopUp
from gateway.service.credit import RESERVATION_SECONDS, CreditLedger, TokenInfo
from gateway.service.decisions import (
    FREE,
    Allow,
    CreditCharge,
    Decision,
    Deny,
    PaidToken,
    PaymentChallenge,
    Refusal,
    RequestInfo,
)
from gateway.service.on_success import HoldTerms
from gateway.service.rate_limiter import ClientLimiter
from gateway.service.redeem import REDEEM_LOOKUPS_PER_SECOND, Redeemer, RedeemResult
from gateway.service.verify import TokenVerifier
from gateway.service.withdraw import WithdrawalOutcome, Withdrawer

log = logging.getLogger(__name__)

# At most this many cookie credentials are tried (a browser may hold one per priced path).
MAX_COOKIE_CREDENTIALS = 4
# A pay-on-success token whose request ended in one of these states paid nothing.
_REFUNDED = frozenset({HeldState.FAILED, HeldState.CANCELED})
# ... and in one of these, its stored response is the payer's.
_ANSWERED = frozenset({HeldState.SUCCEEDED, HeldState.SETTLED})


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
        rate_limiter: ClientLimiter | None = None,
        max_pending_invoices: int = 16,
        redeem_limiter: ClientLimiter | None = None,
        redeem_lookups_per_second: float = REDEEM_LOOKUPS_PER_SECOND,
        merchant: str = "",
        fiat: Callable[[int], str] | None = None,
        reservation_seconds: float = RESERVATION_SECONDS,
        withdrawer: Withdrawer | None = None,
        hold_backend: HoldInvoiceBackend | None = None,
        hold: HoldTerms | None = None,
        on_held: Callable[[], None] | None = None,
        meter: Meter = NO_METER,
    ) -> None:
        self.pricing = pricing
        self._meter = meter
        self._store = store
        self._clock = clock
        self._location = location
        self._hold = hold
        self._issuer = ChallengeIssuer(
            backend=backend,
            store=store,
            clock=clock,
            location=location,
            invoice_expiry=invoice_expiry,
            rate_limiter=rate_limiter,
            max_pending_invoices=max_pending_invoices,
            merchant=merchant,
            fiat=fiat,
            hold_backend=hold_backend,
            hold=hold,
            on_held=on_held,
        )
        self._verifier = TokenVerifier(
            backend=backend,
            store=store,
            clock=clock,
            strict_settlement=strict_settlement,
            root_key_cache_seconds=root_key_cache_seconds,
        )
        self._allowed_entries = self._verifier.allowed.entries
        self._now = clock.now
        self._count_paid = None if meter is NO_METER else meter.paid_request
        self._free = FreeLines()
        # The rule of each credit request line verified so far (``charge_again``); its
        # verification's validity is the verifier's cache's.
        self._credit_rules: dict[AllowedKey, Rule] = {}
        self._credit = CreditLedger(
            backend=backend,
            store=store,
            clock=clock,
            location=location,
            reservation_seconds=reservation_seconds,
        )
        self._withdrawer = withdrawer
        self._redeemer = Redeemer(
            pricing=pricing,
            backend=backend,
            store=store,
            clock=clock,
            location=location,
            limiter=redeem_limiter,
            lookups_per_second=redeem_lookups_per_second,
        )

    @property
    def invoice_slots(self) -> asyncio.Semaphore:
        """The invoices being made on the node at once (``max_pending_invoices``): what
        else makes invoices on the same node (``Tips``) takes its turn here too."""
        return self._issuer.invoice_slots

    async def authorize(self, request: RequestInfo) -> Decision:
        """``Allow`` a free route or a valid paid token, answer a missing or insufficient one
        with a ``PaymentChallenge``, ``Deny`` the rest (the package docstring lists why).

        On a credit route a valid token's Allow holds the request's price from its balance
        (``Allow.charge``, to be ended with ``finish_charge``); a balance that does not cover
        it gets a top-up challenge for the same account."""
        decision = await self._authorize(request)
        self._count(decision)
        return decision

    def _count(self, decision: Decision | RedeemResult) -> None:
        meter = self._meter
        if isinstance(decision, PaymentChallenge):
            meter.challenge_issued(decision.service)
        elif isinstance(decision, Allow):
            if decision.token is not None:
                meter.paid_request(decision.token.service)
        elif isinstance(decision, Deny):
            label = refusal_label(decision.reason)
            meter.refused(decision.status, label)
            limit = _RATE_LIMITS.get(label)
            if limit is not None:
                meter.rate_limited(limit)

    async def _authorize(self, request: RequestInfo) -> Decision:
        rule = self.pricing.resolve(request.method, request.path, request.method_overrides)
        if isinstance(rule, Refused):
            return Deny(rule.status, rule.reason)
        if rule is None:
            if self._cacheable(request):
                self._free.add(request.method, request.path)
            return FREE
        if rule.settle_on_success:
            return await self._authorize_held(request, rule)
        decision = await self._verified(request, rule)
        if rule.credit is None or not isinstance(decision, Allow) or decision.token is None:
            return decision
        spent = await self._spend(request, rule, decision.token)
        if isinstance(spent, Allow) and rule.price_msat is not None and self._cacheable(request):
            self._remember_credit_rule((request.authorization, request.method, request.path), rule)
        return spent

    async def allowed_whatever_body(self, request: RequestInfo) -> Allow | None:
        """The Allow for a POST whose body may name another method (``body_may_reprice``),
        decided before its body is read: when every method the body could name leaves one
        priced rule, and the request's credential is a valid token for it, no body changes
        the answer. None otherwise (no such credential; a credit or pay-on-success rule,
        which charge per reading; readings priced apart): the body is to be read first and
        the request authorized with the method it names."""
        pricing = self.pricing
        every = (*request.method_overrides, *pricing.override_methods)
        rule = pricing.resolve(request.method, request.path, every)
        if not isinstance(rule, Rule) or rule.credit is not None or rule.settle_on_success:
            return None
        # Unpriced, or priced the same, without the body: not refused (an unmatched path).
        unread = pricing.resolve(request.method, request.path, request.method_overrides)
        if unread is not None and unread != rule:
            return None
        try:
            credential = l402.parse_authorization(request.authorization)
        except l402.MalformedToken:
            return None
        headers = (
            [request.authorization]
            if credential is not None
            else [(f"L402 {value}",) for value in request.cookies[:MAX_COOKIE_CREDENTIALS]]
        )
        for header in headers:
            try:
                candidate = l402.parse_authorization(header)
                if candidate is None:  # pragma: no cover - the scheme is ours
                    continue
                verified = await self._verifier.verify(candidate, request, rule)
            except (l402.L402Error, errors.StoreError):
                continue  # authorize() answers it, with the body read
            if isinstance(verified, Allow) and verified.token is not None:
                self._count(verified)
                return verified
        return None

    def _cacheable(self, request: RequestInfo) -> bool:
        """Whether the decision on ``request`` may answer the next one with the same
        credential and request line: not when an override, in its headers, query or body (so
        read for each request), could price it otherwise."""
        return not request.method_overrides and not self.pricing.body_may_reprice(
            request.method, request.path
        )

    async def _authorize_held(self, request: RequestInfo, rule: Rule) -> Decision:
        """A pay-on-success route: a request without a credential is stored with a hold
        invoice (the challenge); a paid token gets its request's stored response, never a
        new run. Never remembered in the decision caches: each answer reads the store."""
        if self._hold is None:
            return Deny(501, Refusal.HOLD_UNAVAILABLE)
        try:
            credential = l402.parse_authorization(request.authorization)
        except l402.MalformedToken as error:
            return Deny(401, error.reason, realm=self._location)
        reason = l402.ChallengeReason.PAYMENT_REQUIRED
        try:
            if credential is not None:
                try:
                    verified = await self._verifier.verify(credential, request, rule)
                except l402.L402Error as error:
                    if await self._refunded(credential):
                        reason = l402.ChallengeReason.REFUNDED
                    elif isinstance(error, l402.TokenInsufficient):
                        reason = error.reason
                    else:
                        return Deny(401, error.reason, realm=self._location)
                else:
                    return await self._replay(request, rule, verified)
            else:
                # The first cookie that verifies; the others are ignored, never a 401.
                for value in request.cookies[:MAX_COOKIE_CREDENTIALS]:
                    cookie: l402.Credential | None = None
                    try:
                        cookie = l402.parse_authorization((f"L402 {value}",))
                        if cookie is None:  # pragma: no cover - the scheme is ours
                            continue
                        verified = await self._verifier.verify(cookie, request, rule)
                    except l402.TokenInsufficient as error:
                        reason = error.reason
                    except l402.L402Error as error:
                        log.debug("ignoring an L402 cookie: %s", error.reason)
                        if cookie is not None and await self._refunded(cookie):
                            reason = l402.ChallengeReason.REFUNDED
                    else:
                        return await self._replay(request, rule, verified)
        except errors.StoreError:
            log.exception("store failed while verifying a pay-on-success token")
            return Deny(503, Refusal.STORE_UNAVAILABLE, retry_after=5)
        return await self._issuer.challenge(request, rule, reason)

    async def _refunded(self, credential: l402.Credential) -> bool:
        """Whether the credential's macaroon paid for a request that failed (its payment
        was or is being given back)."""
        try:
            identifier = l402.identifier_of(credential)
        except l402.L402Error:
            return False
        held = await self._store.get_held_request(PaymentHash(identifier.payment_hash))
        return held is not None and held.state in _REFUNDED

    async def _replay(self, request: RequestInfo, rule: Rule, verified: Allow | Deny) -> Decision:
        """The stored response of the request a verified token paid for: 409 for another
        request, 410 once it is no longer kept."""
        if isinstance(verified, Deny) or verified.token is None:
            return verified
        assert self._hold is not None  # checked by the caller
        token = verified.token
        payment_hash = PaymentHash(bytes.fromhex(token.payment_hash))
        held = await self._store.get_held_request(payment_hash)
        if held is None:
            record = await self._store.get_invoice(payment_hash)
            if record is not None and self._held_route(record):
                return Deny(410, Refusal.RESPONSE_GONE)
            # Bought elsewhere: it paid for no request of this route.
            return await self._issuer.challenge(
                request, rule, l402.ChallengeReason.PAYMENT_REQUIRED
            )
        if not _same_request(held, request):
            return Deny(409, Refusal.PAID_FOR_ANOTHER_REQUEST)
        if held.state not in _ANSWERED or held.response is None:
            return Deny(410, Refusal.RESPONSE_GONE)
        now = self._clock.now()
        await self._store.mark_held_delivered(
            payment_hash, now, now + self._hold.delivered_retention
        )
        return Allow(token, replay=held.response)

    def _held_route(self, record: InvoiceRecord) -> bool:
        rule = self.pricing.resolve(record.method, record.path)
        return isinstance(rule, Rule) and rule.settle_on_success

    async def charge_again(
        self, authorization: tuple[str, ...], method: str, path: str
    ) -> Allow | None:
        """On a credit route with a fixed price, the hold for a credential and request line
        verified before: a paying client's hot path, with no request description to build
        and no route to resolve. None when there is nothing to go on, or the hold was not
        made (``authorize`` then gives the answer: a top-up challenge, a 503)."""
        key = (authorization, method, path)
        rule = self._credit_rules.get(key)
        if rule is None or rule.credit is None or rule.price_msat is None:
            return None
        verified = self._verifier.verified.get(key)
        if verified is None or verified.token is None:
            return None
        try:
            held = await self._credit.hold(
                verified.token, rule.credit, rule.price_msat, method, path, split=rule.split
            )
        except errors.StoreError:
            return None
        if not isinstance(held, Allow):
            return None
        self._meter.paid_request(verified.token.service)
        return held

    def _remember_credit_rule(self, key: AllowedKey, rule: Rule) -> None:
        if not fits_cache(key):
            return
        if len(self._credit_rules) >= ALLOWED_CACHE_SIZE:
            self._credit_rules.clear()  # rare: as many request lines as the decision caches
        self._credit_rules[key] = rule

    async def _verified(self, request: RequestInfo, rule: Rule) -> Decision:
        """The decision on the request's credential alone, remembered for the next request."""
        cache_key: AllowedKey | None = (
            (request.authorization, request.method, request.path)
            if self._cacheable(request)
            else None
        )
        if cache_key is not None:
            cached = self._verifier.cache_for(rule).get(cache_key)
            if cached is not None:
                return cached
        try:
            credential = l402.parse_authorization(request.authorization)
        except l402.MalformedToken as error:
            return Deny(401, error.reason, realm=self._location)
        if credential is None:
            if request.cookies:
                return await self._authorize_cookies(request, rule)
            return await self._issuer.challenge(
                request, rule, l402.ChallengeReason.PAYMENT_REQUIRED
            )
        try:
            return await self._verifier.verify(credential, request, rule, cache_key)
        except l402.TokenInsufficient as error:
            return await self._issuer.challenge(request, rule, error.reason)
        except l402.L402Error as error:
            return Deny(401, error.reason, realm=self._location)
        except errors.StoreError:
            log.exception("store failed while verifying a token")
            return Deny(503, Refusal.STORE_UNAVAILABLE, retry_after=5)

    async def _spend(self, request: RequestInfo, rule: Rule, token: PaidToken) -> Decision:
        """Hold the request's price from the token's credit, or challenge for a top-up."""
        assert rule.credit is not None
        price = await self._issuer.price(request, rule)  # a price function: per request
        if isinstance(price, Deny):
            return price
        if price == 0:
            return Allow(token)
        try:
            spent = await self._credit.spend(
                token, rule.credit, price, request.method, request.path, split=rule.split
            )
        except errors.StoreError:
            log.exception("store failed while holding credit")
            return Deny(503, Refusal.STORE_UNAVAILABLE, retry_after=5)
        except errors.BackendError as error:
            log.warning(
                "cannot confirm a credit purchase for the account of %s: %s", token.token_id, error
            )
            return Deny(503, Refusal.SETTLEMENT_UNCONFIRMED, retry_after=5)
        if isinstance(spent, Allow):
            return spent
        top_up = TopUp(bytes.fromhex(token.token_id), spent.balance_msat, price)
        return await self._issuer.challenge(
            request, rule, l402.ChallengeReason.CREDIT_EXHAUSTED, top_up=top_up
        )

    async def finish_charge(
        self,
        charge: CreditCharge,
        *,
        status: int | None,
        cost: str | int | None,
        served: bool = True,
    ) -> int | None:
        """End the credit held for a request (``Allow.charge``) once its response status is
        known, before the response goes out; returns the balance after it, for the
        ``L402-Balance-Msat`` header (None when the hold was already released, or the store
        failed: the response still goes out).

        ``status`` None means the request got no answer (the handler raised, the backend was
        unreachable or timed out). Such a failure, or a 5xx, is not charged unless the route
        charges failures. ``served`` False: the request never reached the handler or backend
        (the gateway or an application's middleware answered it), nothing is charged. A
        metered route is charged ``cost``, the backend's report (a whole
        number of msat, at most what was held); anything else is logged and the hold is
        charged in full. Never raises for what the backend reports, nor for the store: it
        raises nothing but the caller's own ``CancelledError``, and the charge is still
        written then (the store writes it all the same).
        """
        return await self._credit.finish(charge, status=status, cost=cost, served=served)

    async def token_info(self, authorization: tuple[str, ...]) -> TokenInfo | Deny:
        """The credit account of the credential in ``authorization`` (the request's
        ``Authorization`` values): balance, totals, the presented macaroon's expiry and the
        latest charges, and the withdrawal terms when withdrawals are enabled. Deny as
        ``account_of``."""
        info = await self._credit.token_info(authorization)
        if isinstance(info, Deny) or self._withdrawer is None:
            return info
        return dataclasses.replace(info, withdrawals=self._withdrawer.terms)

    async def account_of(self, authorization: tuple[str, ...]) -> bytes | Deny:
        """The token id (the account) of the L402 credential in ``authorization``.

        The macaroon's signature is checked with its stored root key and the preimage with
        its payment hash; its caveats are not (no request to scope, and an expired token's
        balance is still its holder's). Deny: 401 for a missing, malformed, unknown or
        forged credential, 404 when the token has no credit account, 503 when the store
        fails.
        """
        return await self._credit.account_of(authorization)

    async def withdraw(
        self, authorization: tuple[str, ...], payment_request: str
    ) -> WithdrawalOutcome | Deny:
        """Pay ``payment_request`` from the balance of the credential's account (the
        ``Withdrawer`` checks and pays it). Deny 404 when withdrawals are not enabled, else
        as ``account_of`` or the withdrawer."""
        if self._withdrawer is None:
            return Deny(404, Refusal.WITHDRAWALS_DISABLED)
        token_id = await self.account_of(authorization)
        if isinstance(token_id, Deny):
            return token_id
        return await self._withdrawer.withdraw(token_id, payment_request)

    async def challenge(
        self, request: RequestInfo, rule: Rule, reason: l402.ChallengeReason
    ) -> Decision:
        """A fresh invoice and token for ``rule`` (``ChallengeIssuer.challenge``)."""
        decision = await self._issuer.challenge(request, rule, reason)
        self._count(decision)
        return decision

    def allowed_again(self, authorization: tuple[str, ...], method: str, path: str) -> Allow | None:
        """The Allow already verified for this exact credential and request line, or the one
        of a request line found free before (any credential), if any.

        Adapters call it first: on the hot path of a paying client, or of any client on a
        free route, it is the whole decision, with no request description to build. Never one
        for a credit route: each of its requests must hold its price (``authorize``); nor for
        a request with a method override (adapters do not ask then).
        """
        # The cache's lookup inlined (``filed_under``, ``AllowedCache.get``), and the meter
        # skipped when off: this is the whole decision on a paying client's hot path, where
        # each call shows.
        entry = self._allowed_entries.get(
            (authorization[-1][CREDENTIAL_TAIL] if authorization else "", method, path)
        )
        now = self._now  # an attribute read, then a call: the method lookup would not specialize
        if (
            entry is not None
            and entry.authorization == authorization
            and entry.since <= now() < entry.until
        ):
            allowed = entry.allow
            if self._count_paid is not None and allowed.token is not None:  # meter off: one test
                self._count_paid(allowed.token.service)
            return allowed
        return FREE if (method, path) in self._free else None

    async def _authorize_cookies(self, request: RequestInfo, rule: Rule) -> Decision:
        """The first cookie credential that verifies; else a fresh challenge (never a 401)."""
        reason = l402.ChallengeReason.PAYMENT_REQUIRED
        for value in request.cookies[:MAX_COOKIE_CREDENTIALS]:
            try:
                credential = l402.parse_authorization((f"L402 {value}",))
                if credential is None:  # pragma: no cover - the scheme is ours
                    continue
                return await self._verifier.verify(credential, request, rule)
            except l402.TokenInsufficient as error:
                reason = error.reason
            except l402.L402Error as error:
                log.debug("ignoring an L402 cookie: %s", error.reason)
            except errors.StoreError:
                log.exception("store failed while verifying a token")
                return Deny(503, Refusal.STORE_UNAVAILABLE, retry_after=5)
        return await self._issuer.challenge(request, rule, reason)

    async def redeem(self, macaroon_b64: str, *, client: str) -> RedeemResult | Deny:
        """The state of the invoice a challenge's macaroon is bound to, for the paywall page.

        Only the holder of the macaroon can ask (its signature must check out with the stored
        root key; a payment hash alone is not enough), and once the invoice is settled it
        gets the full credential: the macaroon with the invoice's preimage. Cheap by design
        (see ``Redeemer``); ``client`` is the address the redeem rate limit applies to.

        Deny: 400 for text that is not a macaroon, 401 for a macaroon that is not one of
        ours (unknown, revoked, forged), 429 when the client asks too often, 503 when the
        store or the node cannot answer.
        """
        result = await self._redeemer.redeem(macaroon_b64, client=client)
        self._count(result)
        return result

    async def revoke(self, token_id: bytes) -> bool:
        """Revoke a token everywhere its root key is stored; True if it existed."""
        revoked = await self._store.revoke_token(token_id)
        self._verifier.forget()
        self._redeemer.forget()
        return revoked


_REFUSALS = {refusal.value: refusal.name.lower() for refusal in Refusal}
_RATE_LIMITS = {
    Refusal.TOO_MANY_CHALLENGES.name.lower(): "challenges",
    Refusal.TOO_MANY_REDEEMS.name.lower(): "redeems",
    Refusal.TOO_MANY_HELD_FOR_CLIENT.name.lower(): "held",
}


def refusal_label(reason: str) -> str:
    """A refusal's metrics label: the ``Refusal``'s name; "other" for any other text (a
    token error's, a route's own): a bounded vocabulary, whatever the reason says."""
    return _REFUSALS.get(reason, "other")


def _same_request(held: HeldRequest, request: RequestInfo) -> bool:
    """Whether ``request`` asks for what ``held`` stored: the same method and target (path
    and query, kept after the run), compared exactly when the adapter gives the request's
    raw target, else decoded."""
    stored = held.request
    if stored is None or stored.method != request.method:
        return False
    if request.target:
        return stored.target == request.target
    path, _, query = stored.target.partition("?")
    return unquote(path) == request.path and unquote(query) == unquote(request.query)
