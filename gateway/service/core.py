"""``L402Service``: the core's entry points, ``authorize()``, ``redeem()`` and ``revoke()``."""

from __future__ import annotations

import logging
from collections.abc import Callable

from gateway import errors, l402
from gateway.ports import Clock, InvoiceBackend, Store
from gateway.pricing import Pricing, Refused, Rule
from gateway.service.caches import AllowedKey
from gateway.service.challenge import ChallengeIssuer
from gateway.service.decisions import Allow, Decision, Deny, Refusal, RequestInfo
from gateway.service.rate_limiter import RateLimiter
from gateway.service.redeem import REDEEM_LOOKUPS_PER_SECOND, Redeemer, RedeemResult
from gateway.service.verify import TokenVerifier

log = logging.getLogger(__name__)

# At most this many cookie credentials are tried (a browser may hold one per priced path).
MAX_COOKIE_CREDENTIALS = 4


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
        merchant: str = "",
        fiat: Callable[[int], str] | None = None,
    ) -> None:
        self.pricing = pricing
        self._store = store
        self._location = location
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
        )
        self._verifier = TokenVerifier(
            backend=backend,
            store=store,
            clock=clock,
            strict_settlement=strict_settlement,
            root_key_cache_seconds=root_key_cache_seconds,
        )
        self._allowed = self._verifier.allowed
        self._redeemer = Redeemer(
            pricing=pricing,
            backend=backend,
            store=store,
            clock=clock,
            location=location,
            limiter=redeem_limiter,
            lookups_per_second=redeem_lookups_per_second,
        )

    async def authorize(self, request: RequestInfo) -> Decision:
        """``Allow`` a free route or a valid paid token, answer a missing or insufficient one
        with a ``PaymentChallenge``, ``Deny`` the rest (the package docstring lists why)."""
        rule = self.pricing.resolve(request.method, request.path, request.method_overrides)
        if isinstance(rule, Refused):
            return Deny(rule.status, rule.reason)
        if rule is None:
            return Allow(None)
        # A decision made without an override must not answer a request that has one.
        cache_key: AllowedKey | None = (
            None
            if request.method_overrides
            else (request.authorization, request.method, request.path)
        )
        if cache_key is not None:
            cached = self._allowed.get(cache_key)
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

    async def challenge(
        self, request: RequestInfo, rule: Rule, reason: l402.ChallengeReason
    ) -> Decision:
        """A fresh invoice and token for ``rule`` (``ChallengeIssuer.challenge``)."""
        return await self._issuer.challenge(request, rule, reason)

    def allowed_again(self, authorization: tuple[str, ...], method: str, path: str) -> Allow | None:
        """The Allow already verified for this exact credential and request line, if any.

        Adapters call it first: on the hot path of a paying client it is the whole decision,
        with no request description to build.
        """
        return self._allowed.get((authorization, method, path))

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
        return await self._redeemer.redeem(macaroon_b64, client=client)

    async def revoke(self, token_id: bytes) -> bool:
        """Revoke a token everywhere its root key is stored; True if it existed."""
        revoked = await self._store.revoke_token(token_id)
        self._verifier.forget()
        self._redeemer.forget()
        return revoked
