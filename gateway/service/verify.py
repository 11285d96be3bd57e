"""Verifying a presented credential against the stored root key, with the caches in front.

Offline by default: the HMAC chain, ``sha256(preimage) == payment_hash`` and the caveats
prove the payment. With ``strict_settlement`` the invoice must also be known SETTLED, and the
node is asked when the store has not seen the settlement yet.
"""

from __future__ import annotations

import logging

from gateway import errors, l402
from gateway.ports import Clock, InvoiceBackend, InvoiceState, InvoiceUpdate, PaymentHash, Store
from gateway.pricing import Rule
from gateway.service.caches import AllowedCache, AllowedKey, KnownToken, RootKeyCache
from gateway.service.decisions import Allow, Deny, PaidToken, Refusal, RequestInfo

log = logging.getLogger(__name__)


class TokenVerifier:
    """Turns a credential for a priced request into ``Allow``, or raises an ``l402`` error."""

    def __init__(
        self,
        *,
        backend: InvoiceBackend,
        store: Store,
        clock: Clock,
        strict_settlement: bool,
        root_key_cache_seconds: float,
    ) -> None:
        self._backend = backend
        self._store = store
        self._clock = clock
        self._strict = strict_settlement
        self._root_keys = RootKeyCache(root_key_cache_seconds)
        # Decisions on token routes: final, an adapter may answer a request from them.
        self.allowed = AllowedCache(clock)
        # Verified tokens on credit routes: never a final decision (each request must hold
        # its price), so kept apart from ``allowed``.
        self.verified = AllowedCache(clock)

    def cache_for(self, rule: Rule) -> AllowedCache:
        """Where a verification for ``rule`` is remembered."""
        return self.allowed if rule.credit is None else self.verified

    def forget(self) -> None:
        """Drop every cached root key and decision (after a revocation)."""
        self._root_keys.clear()
        self.allowed.clear()
        self.verified.clear()

    async def verify(
        self,
        credential: l402.Credential,
        request: RequestInfo,
        rule: Rule,
        cache_key: AllowedKey | None = None,
    ) -> Allow | Deny:
        """``Allow`` with the token's facts, or ``Deny`` when strict settlement cannot be
        confirmed; an ``l402`` error for a token that does not authorize the request, and
        ``StoreError`` when the store fails. An Allow is remembered under ``cache_key`` (in
        ``cache_for(rule)``).

        A token that bought credit opens credit routes only: on a route billed per token it
        is insufficient (its purchase may have been far below the route's price)."""
        identifier = l402.identifier_of(credential)
        now = self._clock.now()
        known = self._root_keys.get(identifier.key_id, now)
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
            raise l402.TokenInsufficient(l402.ChallengeReason.TIER_TOO_LOW)
        if known.buys_credit and rule.credit is None:
            raise l402.TokenInsufficient(l402.ChallengeReason.PAYMENT_REQUIRED)
        if self._strict and not known.settled:
            confirmed = await self._confirm_settled(identifier, now, known.buys_credit)
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
            until = self._root_keys.stale_at(known)
            if verified.valid_until is not None:
                until = min(until, verified.valid_until)
            self.cache_for(rule).put(cache_key, allow, known.fetched_at, until, now)
        return allow

    async def _load_token(self, identifier: l402.Identifier, now: float) -> KnownToken:
        root_key = await self._store.get_root_key(identifier.key_id)
        if root_key is None:
            raise l402.TokenRejected(Refusal.UNKNOWN_OR_REVOKED)
        record = await self._store.get_invoice(PaymentHash(identifier.payment_hash))
        known = KnownToken(
            root_key=root_key,
            amount_msat=record.amount_msat if record is not None else 0,
            settled=record is not None and record.state is InvoiceState.SETTLED,
            buys_credit=record is not None and record.buys_credit,
            fetched_at=now,
        )
        self._root_keys.put(identifier.key_id, known)
        return known

    async def _confirm_settled(
        self, identifier: l402.Identifier, now: float, buys_credit: bool
    ) -> KnownToken | Deny:
        """Strict mode: the watcher may lag the payer by milliseconds, so ask the node."""
        payment_hash = PaymentHash(identifier.payment_hash)
        try:
            invoice = await self._backend.lookup_invoice(payment_hash)
        except errors.InvoiceNotFound:
            raise l402.TokenRejected(Refusal.INVOICE_UNKNOWN_TO_NODE) from None
        except errors.BackendError as error:
            # The token may be good: a 401 would make the client throw it away.
            log.warning("cannot confirm settlement of %s: %s", payment_hash.hex(), error)
            return Deny(503, Refusal.SETTLEMENT_UNCONFIRMED, retry_after=5)
        if invoice.state is not InvoiceState.SETTLED:
            raise l402.TokenRejected(Refusal.INVOICE_NOT_SETTLED)
        await self._store.apply_update(InvoiceUpdate.of(invoice))
        root_key = await self._store.get_root_key(identifier.key_id)
        if root_key is None:
            raise l402.TokenRejected(Refusal.UNKNOWN_OR_REVOKED)
        known = KnownToken(root_key, invoice.amount_msat, True, now, buys_credit)
        self._root_keys.put(identifier.key_id, known)
        return known
