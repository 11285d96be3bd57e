"""The core's side of the browser paywall: redeem(), and the L402 cookie as a credential, over
the fake node and the memory store."""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Sequence
from typing import Any

import pytest

from gateway import errors, l402
from gateway.ports import InvoiceRecord, InvoiceState, InvoiceUpdate, Msat, PaymentHash
from gateway.pricing import Pricing, Rule
from gateway.service import (
    MAX_REDEEM_MACAROON_CHARS,
    REDEEM_LOOKUP_INTERVAL,
    Allow,
    Decision,
    Deny,
    L402Service,
    PaymentChallenge,
    RateLimiter,
    RedeemResult,
    RedeemState,
    RequestInfo,
)
from gateway.store import MemoryStore
from tests.fakes import FakeClock, FakeInvoiceBackend

PREMIUM = "/api/premium/fortune"
CLIENT = "10.0.0.1"
LIFETIME = 3600
EXPIRY = 600
RULES = (
    Rule(
        "/api/premium/*",
        price_msat=Msat(10_000),
        lifetime=LIFETIME,
        service="premium",
        capabilities=frozenset({"read"}),
    ),
    Rule("/api/other/*", price_msat=Msat(1_000), service="other"),
)


class BrokenStore(MemoryStore):
    """Fails every root-key and invoice read once ``broken`` is set."""

    broken = False

    async def get_root_key(self, key_id: bytes) -> bytes | None:
        if self.broken:
            raise errors.StoreError("disk on fire")
        return await super().get_root_key(key_id)

    async def get_invoice(self, payment_hash: PaymentHash) -> InvoiceRecord | None:
        if self.broken:
            raise errors.StoreError("disk on fire")
        return await super().get_invoice(payment_hash)


class Env:
    def __init__(
        self, rules: Sequence[Rule] = RULES, clock: FakeClock | None = None, **options: Any
    ) -> None:
        self.clock = clock or FakeClock()
        self.backend = FakeInvoiceBackend(self.clock)
        self.store = BrokenStore()
        self.service = L402Service(
            pricing=Pricing(rules),
            backend=self.backend,
            store=self.store,
            clock=self.clock,
            invoice_expiry=EXPIRY,
            **options,
        )

    async def ask(
        self,
        path: str = PREMIUM,
        authorization: Sequence[str] = (),
        cookies: Sequence[str] = (),
    ) -> Decision:
        return await self.service.authorize(
            RequestInfo("GET", path, CLIENT, tuple(authorization), cookies=tuple(cookies))
        )

    async def challenge(self, path: str = PREMIUM) -> PaymentChallenge:
        decision = await self.ask(path)
        assert isinstance(decision, PaymentChallenge)
        return decision

    def pay(self, challenge: PaymentChallenge) -> str:
        """Settle at the node (the store learns it only through a watcher, absent here)."""
        return self.backend.pay(bytes.fromhex(challenge.payment_hash)).hex()

    async def settle_in_store(self, challenge: PaymentChallenge) -> None:
        invoice = self.backend.invoices[bytes.fromhex(challenge.payment_hash)]
        await self.store.apply_update(
            InvoiceUpdate(
                invoice.payment_hash,
                invoice.state,
                invoice.settle_index,
                invoice.amount_paid_msat,
                1.0,
            )
        )

    async def redeem(self, macaroon: str) -> RedeemResult:
        result = await self.service.redeem(macaroon, client=CLIENT)
        assert isinstance(result, RedeemResult), result
        return result


def _url_safe(macaroon: l402.Macaroon) -> str:
    return base64.urlsafe_b64encode(macaroon.serialize()).rstrip(b"=").decode()


# --- redeem ---------------------------------------------------------------------------------


async def test_unpaid_is_pending_and_asks_the_node_at_most_every_few_seconds() -> None:
    env = Env()
    challenge = await env.challenge()
    result = await env.redeem(challenge.macaroon)
    assert result == RedeemResult(RedeemState.PENDING, challenge.expires_at)
    assert result.credential is None
    assert env.backend.lookups == 1
    for _ in range(10):  # a page polling every second: the store answers
        env.clock.advance(0.4)
        assert (await env.redeem(challenge.macaroon)).state is RedeemState.PENDING
    assert env.backend.lookups == 1
    env.clock.advance(REDEEM_LOOKUP_INTERVAL)
    await env.redeem(challenge.macaroon)
    assert env.backend.lookups == 2


async def test_paid_gives_the_credential_for_the_cookie() -> None:
    env = Env()
    challenge = await env.challenge()
    preimage = env.pay(challenge)
    await env.settle_in_store(challenge)
    env.clock.advance(100)
    result = await env.redeem(challenge.macaroon)
    assert result.state is RedeemState.SETTLED
    assert result.path == PREMIUM
    assert result.max_age == LIFETIME - 100
    assert result.credential is not None
    macaroon_text, preimage_hex = result.credential.split(":")
    assert preimage_hex == preimage
    assert set(macaroon_text) <= set(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    )
    assert l402.decode_b64(macaroon_text) == l402.decode_b64(challenge.macaroon)
    # The credential is a working one, as a cookie and as an Authorization header.
    assert isinstance(await env.ask(cookies=[result.credential]), Allow)
    assert isinstance(await env.ask(authorization=[f"L402 {result.credential}"]), Allow)


async def test_paid_at_the_node_before_the_watcher_saw_it() -> None:
    env = Env()
    challenge = await env.challenge()
    await env.redeem(challenge.macaroon)  # pending; the node was asked just now
    env.pay(challenge)
    env.clock.advance(1)
    assert (await env.redeem(challenge.macaroon)).state is RedeemState.PENDING
    env.clock.advance(REDEEM_LOOKUP_INTERVAL)
    result = await env.redeem(challenge.macaroon)
    assert result.state is RedeemState.SETTLED
    # ... and the store learned it on the way.
    record = await env.store.get_invoice(PaymentHash(bytes.fromhex(challenge.payment_hash)))
    assert record is not None
    assert record.state is InvoiceState.SETTLED


async def test_a_settled_invoice_asks_the_node_once_for_its_preimage() -> None:
    env = Env()
    challenge = await env.challenge()
    env.pay(challenge)
    await env.settle_in_store(challenge)
    for _ in range(5):
        assert (await env.redeem(challenge.macaroon)).state is RedeemState.SETTLED
    assert env.backend.lookups == 1


async def test_expired_and_canceled() -> None:
    env = Env()
    challenge = await env.challenge()
    env.clock.advance(EXPIRY)
    assert (await env.redeem(challenge.macaroon)).state is RedeemState.EXPIRED
    other = await env.challenge()
    env.backend.cancel(bytes.fromhex(other.payment_hash))
    assert (await env.redeem(other.macaroon)).state is RedeemState.CANCELED
    # once the store knows, the node is not asked
    invoice = env.backend.invoices[bytes.fromhex(other.payment_hash)]
    await env.store.apply_update(
        InvoiceUpdate(invoice.payment_hash, InvoiceState.CANCELED, 0, Msat(0), None)
    )
    lookups = env.backend.lookups
    assert (await env.redeem(other.macaroon)).state is RedeemState.CANCELED
    assert env.backend.lookups == lookups


async def test_paid_after_the_token_lifetime_is_expired() -> None:
    env = Env()
    challenge = await env.challenge()
    env.pay(challenge)
    env.clock.advance(LIFETIME)
    assert (await env.redeem(challenge.macaroon)).state is RedeemState.EXPIRED


async def test_attenuated_macaroon_redeems_with_its_caveats() -> None:
    env = Env()
    challenge = await env.challenge()
    env.pay(challenge)
    narrowed = l402.decode_b64(challenge.macaroon).add_caveat(
        l402.valid_until_caveat("premium", int(env.clock.now()) + 60)
    )
    result = await env.redeem(l402.encode_b64(narrowed))
    assert result.state is RedeemState.SETTLED
    assert result.max_age == 60
    assert result.credential is not None
    assert l402.decode_b64(result.credential.split(":")[0]) == narrowed


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not base64!",
        "QUJD",  # valid base64, not a macaroon
        "A" * (MAX_REDEEM_MACAROON_CHARS + 4),
        "é",
        "AgEMbDQwMi1nYXRld2F5",  # a truncated macaroon
        l402.encode_b64(l402.mint(b"k", b"not an L402 identifier", [])),
    ],
)
async def test_garbage_is_400(text: str) -> None:
    result = await Env().service.redeem(text, client=CLIENT)
    assert isinstance(result, Deny)
    assert result.status == 400
    assert result.reason


async def test_not_our_macaroon_is_401() -> None:
    env = Env()
    challenge = await env.challenge()
    macaroon = l402.decode_b64(challenge.macaroon)
    identifier = l402.Identifier.decode(macaroon.identifier)
    # Same identifier, signed with another root key: forged.
    forged = l402.mint_token(
        bytes(32), identifier.payment_hash, identifier.token_id, ["services=premium:0"]
    )
    # A payment hash alone is not enough: a fresh token id has no root key here.
    unknown = l402.mint_token(bytes(32), identifier.payment_hash, bytes(32), ["services=x:0"])
    # A caveat swapped in without re-signing.
    tampered = dataclasses.replace(macaroon, caveats=(b"services=premium:9", *macaroon.caveats[1:]))
    for candidate, reason in (
        (forged, "invalid macaroon signature"),
        (unknown, "unknown or revoked token"),
        (tampered, "invalid macaroon signature"),
    ):
        result = await env.service.redeem(l402.encode_b64(candidate), client=CLIENT)
        assert isinstance(result, Deny)
        assert (result.status, result.reason) == (401, reason)


async def test_revoked_token_is_401() -> None:
    env = Env()
    challenge = await env.challenge()
    env.pay(challenge)
    assert (await env.redeem(challenge.macaroon)).state is RedeemState.SETTLED
    token_id = l402.Identifier.decode(l402.decode_b64(challenge.macaroon).identifier).token_id
    assert await env.service.revoke(token_id)
    result = await env.service.redeem(challenge.macaroon, client=CLIENT)
    assert isinstance(result, Deny)
    assert (result.status, result.reason) == (401, "unknown or revoked token")


async def test_unknown_caveat_appended_by_the_holder_is_401() -> None:
    env = Env()
    challenge = await env.challenge()
    env.pay(challenge)
    widened = l402.decode_b64(challenge.macaroon).add_caveat("premium_whatever=1")
    result = await env.service.redeem(l402.encode_b64(widened), client=CLIENT)
    assert isinstance(result, Deny)
    assert result.status == 401


async def test_node_or_store_down_is_503() -> None:
    env = Env()
    challenge = await env.challenge()
    env.pay(challenge)
    env.backend.unavailable = True
    assert await env.service.redeem(challenge.macaroon, client=CLIENT) == Deny(
        503, "Lightning node unavailable", retry_after=5
    )

    env.store.broken = True
    result = await env.service.redeem(challenge.macaroon, client=CLIENT)
    assert isinstance(result, Deny)
    assert result.status == 503


async def test_settled_without_a_valid_preimage_stays_pending() -> None:
    env = Env()
    challenge = await env.challenge()
    env.pay(challenge)
    payment_hash = bytes.fromhex(challenge.payment_hash)
    invoice = env.backend.invoices[payment_hash]
    env.backend.invoices[payment_hash] = dataclasses.replace(invoice, preimage=None)
    assert (await env.redeem(challenge.macaroon)).state is RedeemState.PENDING


async def test_an_invoice_the_store_has_expired_is_expired_without_asking_the_node() -> None:
    env = Env()
    challenge = await env.challenge()
    payment_hash = PaymentHash(bytes.fromhex(challenge.payment_hash))
    await env.store.apply_update(
        InvoiceUpdate(payment_hash, InvoiceState.EXPIRED, 0, Msat(0), None)
    )
    assert (await env.redeem(challenge.macaroon)).state is RedeemState.EXPIRED
    assert env.backend.lookups == 0


# --- redeem limits -----------------------------------------------------------------------


async def test_redeem_is_rate_limited_per_client() -> None:
    clock = FakeClock()
    env = Env(clock=clock, redeem_limiter=RateLimiter(1.0, 3, 100, clock))
    challenge = await env.challenge()
    for _ in range(3):
        await env.redeem(challenge.macaroon)
    refused = await env.service.redeem(challenge.macaroon, client=CLIENT)
    assert refused == Deny(429, "too many redeem requests", retry_after=1)
    # the same /64 is the same client; another address has its own budget
    assert await env.service.redeem(challenge.macaroon, client="2001:db8::1") != refused
    for _ in range(2):
        await env.service.redeem(challenge.macaroon, client="2001:db8::2")
    assert await env.service.redeem(challenge.macaroon, client="2001:db8::3") == refused
    clock.advance(1)
    await env.redeem(challenge.macaroon)


async def test_a_refused_redeem_does_no_work() -> None:
    clock = FakeClock()
    env = Env(clock=clock, redeem_limiter=RateLimiter(1.0, 1, 100, clock))
    challenge = await env.challenge()
    await env.redeem(challenge.macaroon)
    env.store.broken = True  # any store access would be a 503
    result = await env.service.redeem("garbage!", client=CLIENT)
    assert isinstance(result, Deny)
    assert result.status == 429


async def test_node_lookups_are_bounded_over_all_invoices() -> None:
    # Cycling through many unpaid invoices (each asked about once) must not multiply the
    # per-invoice interval: past the budget the store answers.
    env = Env(redeem_lookups_per_second=3.0)
    challenges = [await env.challenge() for _ in range(20)]
    states = [(await env.redeem(c.macaroon)).state for c in challenges]
    assert states == [RedeemState.PENDING] * 20
    assert env.backend.lookups == 3
    env.clock.advance(1)
    for challenge in challenges[3:]:
        await env.redeem(challenge.macaroon)
    assert env.backend.lookups == 6


async def test_a_lookup_refused_by_the_budget_is_not_counted_against_the_invoice() -> None:
    env = Env(redeem_lookups_per_second=1.0)
    first, second = await env.challenge(), await env.challenge()
    await env.redeem(first.macaroon)  # takes the budget
    env.pay(second)
    assert (await env.redeem(second.macaroon)).state is RedeemState.PENDING  # from the store
    env.clock.advance(1)  # budget back; the invoice's own interval has not run
    assert (await env.redeem(second.macaroon)).state is RedeemState.SETTLED


async def test_a_settled_invoice_gets_its_preimage_past_the_lookup_budget() -> None:
    env = Env(redeem_lookups_per_second=1.0)
    spender, paid = await env.challenge(), await env.challenge()
    env.pay(paid)
    await env.settle_in_store(paid)
    await env.redeem(spender.macaroon)  # the budget is gone
    assert (await env.redeem(paid.macaroon)).state is RedeemState.SETTLED


@pytest.mark.parametrize("rate", [0.0, -1.0, float("nan")])
def test_a_bad_lookup_budget_is_refused(rate: float) -> None:
    with pytest.raises(ValueError, match="rate"):
        Env(redeem_lookups_per_second=rate)


# --- the cookie as a credential ----------------------------------------------------------


async def _paid_credential(env: Env, path: str = PREMIUM) -> str:
    challenge = await env.challenge(path)
    preimage = env.pay(challenge)
    return f"{challenge.macaroon}:{preimage}"


async def test_cookie_is_a_credential() -> None:
    env = Env()
    credential = await _paid_credential(env)
    decision = await env.ask(cookies=[credential])
    assert isinstance(decision, Allow)
    assert decision.token is not None
    assert decision.token.service == "premium"


async def test_a_bad_cookie_gets_a_challenge_not_a_401() -> None:
    env = Env()
    credential = await _paid_credential(env)
    macaroon, _ = credential.split(":")
    for bad in ("garbage", f"{macaroon}:{'00' * 32}", "a:b:c", f"{macaroon}:zz"):
        decision = await env.ask(cookies=[bad])
        assert isinstance(decision, PaymentChallenge), bad
        assert decision.reason == "payment required"


async def test_an_expired_cookie_says_so_in_the_challenge() -> None:
    env = Env()
    credential = await _paid_credential(env)
    env.clock.advance(LIFETIME)
    decision = await env.ask(cookies=[credential])
    assert isinstance(decision, PaymentChallenge)
    assert decision.reason == "token expired"


async def test_first_cookie_that_verifies_wins() -> None:
    env = Env()
    good = await _paid_credential(env)
    other_service = await _paid_credential(env, "/api/other/x")
    decision = await env.ask(cookies=["junk", other_service, good])
    assert isinstance(decision, Allow)
    assert decision.token is not None
    assert decision.token.service == "premium"


async def test_authorization_header_wins_over_the_cookie() -> None:
    env = Env()
    good = await _paid_credential(env)
    macaroon, _ = good.split(":")
    wrong = f"L402 {macaroon}:{'00' * 32}"
    refused = await env.ask(authorization=[wrong], cookies=[good])
    assert isinstance(refused, Deny)
    assert (refused.status, refused.reason) == (401, "preimage does not match the payment hash")
    decision = await env.ask(authorization=[f"L402 {good}"], cookies=["junk"])
    assert isinstance(decision, Allow)
    # Another scheme's Authorization (say, the site's own login) does not hide the cookie.
    decision = await env.ask(authorization=["Basic dXNlcjpwYXNz"], cookies=[good])
    assert isinstance(decision, Allow)


async def test_cookie_store_failure_is_503() -> None:
    env = Env()
    good = await _paid_credential(env)

    env.store.broken = True
    decision = await env.ask(cookies=[good])
    assert isinstance(decision, Deny)
    assert decision.status == 503


def test_challenge_says_what_it_buys() -> None:
    challenge = PaymentChallenge(l402.ChallengeReason.PAYMENT_REQUIRED, "m", "i", "h", 1, 2.0)
    assert (challenge.service, challenge.method, challenge.path, challenge.lifetime) == (
        "",
        "",
        "",
        0,
    )


async def test_challenge_carries_what_it_buys() -> None:
    env = Env()
    challenge = await env.challenge()
    assert challenge.service == "premium"
    assert challenge.method == "GET"
    assert challenge.path == PREMIUM
    assert challenge.lifetime == LIFETIME
    assert challenge.issued_at == env.clock.now()
    assert challenge.expires_at == env.clock.now() + EXPIRY


def test_redeem_result_repr_hides_the_credential() -> None:
    result = RedeemResult(RedeemState.SETTLED, 1.0, credential="mac:" + "ab" * 32)
    assert "ab" * 32 not in repr(result)
