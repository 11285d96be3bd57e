"""Prepaid credit in the core: buying credit, spending it request by request, topping it up,
metered costs, the token info and the credential check withdrawals share; over the fake node
and both stores (the regtest tests run the same paths against real LND)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, cast

import pytest

from gateway import errors, l402
from gateway.expiry import InvoiceSweeper
from gateway.ports import InvoiceState, InvoiceUpdate, Msat, PaymentHash, Reserved, Store
from gateway.pricing import CreditTerms, PriceRequest, Pricing, Rule
from gateway.service import (
    CREDIT_AMOUNT_HEADER,
    Allow,
    CreditCharge,
    Decision,
    Deny,
    L402Service,
    PaymentChallenge,
    Refusal,
    RequestInfo,
    TokenInfo,
)
from gateway.service.withdraw import WithdrawalOutcome, Withdrawer
from gateway.store import MemoryStore, SqliteStore
from gateway.store import sqlite as sqlite_store
from tests.fakes import FakeClock, FakeInvoiceBackend

CREDIT_PATH = "/api/generate"
TOKEN_PATH = "/api/premium"
METERED_PATH = "/api/metered"
PRICED_PATH = "/api/priced"
TERMS = CreditTerms(Msat(5_000), Msat(1_000), Msat(50_000))
LIFETIME = 3600
RESERVATION_SECONDS = 60.0


async def priced_by_query(request: PriceRequest) -> int:
    """The price the query names (``n=<msat>``); ``n=fail`` raises."""
    value = request.query.removeprefix("n=")
    if value == "fail":
        raise RuntimeError("pricing failed")
    return int(value)


RULES = (
    Rule(
        CREDIT_PATH,
        price_msat=Msat(1_000),
        service="gen",
        lifetime=LIFETIME,
        credit=TERMS,
    ),
    Rule(
        METERED_PATH,
        price_msat=Msat(1_000),
        service="gen",
        credit=CreditTerms(Msat(5_000), Msat(1_000), Msat(50_000), metered=True),
    ),
    Rule(
        PRICED_PATH,
        price_function=priced_by_query,
        service="gen",
        credit=CreditTerms(Msat(5_000), Msat(5_000), Msat(500_000), charge_failures=True),
    ),
    Rule(TOKEN_PATH, price_msat=Msat(10_000), service="gen"),
)


class Env:
    """A service over the fake node and a store, with helpers to buy and spend credit."""

    def __init__(self, store: Store, clock: FakeClock, rules: Sequence[Rule] = RULES) -> None:
        self.clock = clock
        self.backend = FakeInvoiceBackend(clock)
        self.store = store
        self.options: dict[str, Any] = {"reservation_seconds": RESERVATION_SECONDS}
        self.service = self.build(rules)

    def build(self, rules: Sequence[Rule] = RULES, **options: Any) -> L402Service:
        return L402Service(
            pricing=Pricing(rules),
            backend=self.backend,
            store=self.store,
            clock=self.clock,
            **{**self.options, **options},
        )

    async def ask(
        self,
        path: str = CREDIT_PATH,
        authorization: str | None = None,
        *,
        headers: Sequence[tuple[str, str]] = (),
        query: str = "",
        cookies: Sequence[str] = (),
    ) -> Decision:
        return await self.service.authorize(
            RequestInfo(
                "GET",
                path,
                "203.0.113.7",
                (authorization,) if authorization else (),
                query,
                tuple(headers),
                tuple(cookies),
            )
        )

    async def challenge(self, path: str = CREDIT_PATH, **kwargs: Any) -> PaymentChallenge:
        decision = await self.ask(path, **kwargs)
        assert isinstance(decision, PaymentChallenge), decision
        return decision

    async def allow(self, path: str = CREDIT_PATH, **kwargs: Any) -> Allow:
        decision = await self.ask(path, **kwargs)
        assert isinstance(decision, Allow), decision
        return decision

    async def charge(self, path: str = CREDIT_PATH, **kwargs: Any) -> CreditCharge:
        charge = (await self.allow(path, **kwargs)).charge
        assert charge is not None
        return charge

    def pay(self, challenge: PaymentChallenge) -> str:
        """Pay the invoice (the store does not know yet); the Authorization that follows."""
        preimage = self.backend.pay(bytes.fromhex(challenge.payment_hash))
        return f"L402 {challenge.macaroon}:{preimage.hex()}"

    async def settle(self, challenge: PaymentChallenge) -> str:
        """Pay the invoice and apply the settlement as the watcher would."""
        authorization = self.pay(challenge)
        invoice = self.backend.invoices[bytes.fromhex(challenge.payment_hash)]
        await self.store.apply_update(InvoiceUpdate.of(invoice))
        return authorization

    async def buy(self, path: str = CREDIT_PATH, **kwargs: Any) -> str:
        return await self.settle(await self.challenge(path, **kwargs))

    async def balance(self, authorization: str) -> int:
        info = await self.service.token_info((authorization,))
        assert isinstance(info, TokenInfo), info
        return info.balance_msat


def token_id_of(challenge: PaymentChallenge) -> bytes:
    return l402.Identifier.decode(l402.decode_b64(challenge.macaroon).identifier).token_id


def token_id_of_credential(authorization: str) -> bytes:
    macaroon = authorization.removeprefix("L402 ").split(":")[0]
    return l402.Identifier.decode(l402.decode_b64(macaroon).identifier).token_id


@pytest.fixture(params=["memory", "sqlite"])
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    """An Env over each store."""
    clock = FakeClock()
    store: Store = (
        MemoryStore(clock)
        if request.param == "memory"
        else await SqliteStore.open(tmp_path / "gateway.db", clock=clock)
    )
    yield Env(store, clock)
    await store.close()


@pytest.fixture
def memory_env() -> Env:
    clock = FakeClock()
    return Env(MemoryStore(clock), clock)


@pytest.fixture
async def sqlite_env(tmp_path: Path) -> AsyncIterator[Env]:
    clock = FakeClock()
    store = await SqliteStore.open(tmp_path / "gateway.db", clock=clock)
    yield Env(store, clock)
    await store.close()


async def _store_cancelled(*_: Any, **__: Any) -> Any:
    """A store write whose own task was cancelled (SQLite's committer, at shutdown)."""
    raise asyncio.CancelledError


# --- buying, spending, topping up ----------------------------------------------------------


async def test_a_challenge_buys_credit_for_a_new_account(env: Env) -> None:
    challenge = await env.challenge()
    assert (challenge.credit, challenge.amount_msat, challenge.price_msat) == (True, 5_000, 1_000)
    assert challenge.balance_msat is None
    assert challenge.reason is l402.ChallengeReason.PAYMENT_REQUIRED
    invoice = env.backend.invoices[bytes.fromhex(challenge.payment_hash)]
    assert (invoice.amount_msat, invoice.memo) == (
        5_000,
        f"gen: 5000 msat of credit (GET {CREDIT_PATH})",
    )
    record = await env.store.get_invoice(PaymentHash(bytes.fromhex(challenge.payment_hash)))
    assert record is not None
    assert record.buys_credit
    assert record.amount_msat == 5_000
    account = await env.store.get_account(token_id_of(challenge))
    assert account is not None
    assert (account.service, account.balance_msat) == ("gen", 0)


async def test_spending_draws_exact_prices_then_a_top_up_keeps_the_token(env: Env) -> None:
    challenge = await env.challenge()
    authorization = await env.settle(challenge)
    for expected in (4_000, 3_000, 2_000, 1_000, 0):
        charge = await env.charge(authorization=authorization)
        assert (charge.reserved_msat, charge.balance_msat) == (1_000, expected)
        assert (charge.method, charge.path, charge.metered) == ("GET", CREDIT_PATH, False)
        assert await env.service.finish_charge(charge, status=200, cost=None) == expected

    top_up = await env.challenge(authorization=authorization)
    assert top_up.reason is l402.ChallengeReason.CREDIT_EXHAUSTED
    assert (top_up.credit, top_up.amount_msat, top_up.price_msat) == (True, 5_000, 1_000)
    assert top_up.balance_msat == 0
    assert token_id_of(top_up) == token_id_of(challenge)
    assert top_up.payment_hash != challenge.payment_hash

    new_authorization = await env.settle(top_up)
    old = await env.charge(authorization=authorization)  # the old credential works again
    assert old.balance_msat == 4_000
    new = await env.charge(authorization=new_authorization)  # so does the new one
    assert (new.token_id, new.balance_msat) == (token_id_of(challenge), 3_000)
    info = await env.service.token_info((new_authorization,))
    assert isinstance(info, TokenInfo)
    assert (info.credited_msat, info.reserved_msat) == (10_000, 2_000)


async def test_a_hold_counts_against_the_balance_until_it_ends(env: Env) -> None:
    authorization = await env.buy(headers=[(CREDIT_AMOUNT_HEADER, "1000")])
    held = await env.charge(authorization=authorization)
    refused = await env.challenge(authorization=authorization)
    assert (refused.reason, refused.balance_msat) == (l402.ChallengeReason.CREDIT_EXHAUSTED, 0)
    assert await env.service.finish_charge(held, status=503, cost=None) == 1_000  # not charged
    assert (await env.charge(authorization=authorization)).balance_msat == 0


async def test_a_payment_the_watcher_has_not_seen_is_credited_not_charged_again(
    env: Env,
) -> None:
    challenge = await env.challenge()
    authorization = env.pay(challenge)  # the store still has the invoice OPEN
    charge = await env.charge(authorization=authorization)
    assert charge.balance_msat == 4_000
    lookups = env.backend.lookups
    # Credited once: the next requests do not ask the node again.
    assert (await env.charge(authorization=authorization)).balance_msat == 3_000
    assert env.backend.lookups == lookups
    # A replayed settlement does not credit it twice.
    invoice = env.backend.invoices[bytes.fromhex(challenge.payment_hash)]
    await env.store.apply_update(InvoiceUpdate.of(invoice))
    assert await env.balance(authorization) == 3_000


async def spend_to_zero(env: Env, authorization: str) -> None:
    """Charge ``authorization``'s 5000 msat of credit, request by request."""
    for _ in range(5):
        charge = await env.charge(authorization=authorization)
        await env.service.finish_charge(charge, status=200, cost=None)
    assert await env.balance(authorization) == 0


async def test_a_paid_top_up_serves_the_old_credential_before_the_watcher_sees_it(
    env: Env,
) -> None:
    authorization = await env.buy()
    await spend_to_zero(env, authorization)
    top_up = await env.challenge(authorization=authorization)
    assert top_up.reason is l402.ChallengeReason.CREDIT_EXHAUSTED
    new_authorization = env.pay(top_up)  # the store still has the top-up OPEN

    # The client goes on presenting the old credential: served, not sent another invoice.
    charge = await env.charge(authorization=authorization)
    assert (charge.token_id, charge.balance_msat) == (token_id_of(top_up), 4_000)
    assert await env.service.finish_charge(charge, status=200, cost=None) == 4_000
    record = await env.store.get_invoice(PaymentHash(bytes.fromhex(top_up.payment_hash)))
    assert record is not None
    assert record.state is InvoiceState.SETTLED
    # Credited once: the watcher's report and the new credential change nothing more.
    lookups = env.backend.lookups
    invoice = env.backend.invoices[bytes.fromhex(top_up.payment_hash)]
    await env.store.apply_update(InvoiceUpdate.of(invoice))
    assert (await env.charge(authorization=new_authorization)).balance_msat == 3_000
    assert (await env.charge(authorization=authorization)).balance_msat == 2_000
    assert env.backend.lookups == lookups
    info = await env.service.token_info((authorization,))
    assert isinstance(info, TokenInfo)
    assert info.credited_msat == 10_000


async def test_an_older_paid_top_up_is_found_among_newer_unpaid_ones(env: Env) -> None:
    authorization = await env.buy()
    await spend_to_zero(env, authorization)
    first = await env.challenge(authorization=authorization)
    await env.challenge(authorization=authorization)  # a second 402, left unpaid
    env.pay(first)
    assert (await env.charge(authorization=authorization)).balance_msat == 4_000


async def test_an_unpaid_top_up_is_still_a_402_and_the_node_is_asked_at_most_three_times(
    env: Env,
) -> None:
    authorization = await env.buy()
    await spend_to_zero(env, authorization)
    top_ups: list[PaymentChallenge] = []
    for open_top_ups in range(6):
        if open_top_ups == 4:  # the node no longer knows the newest: skipped, not a 503
            del env.backend.invoices[bytes.fromhex(top_ups[-1].payment_hash)]
        lookups = env.backend.lookups
        top_ups.append(await env.challenge(authorization=authorization))
        # None while the account has no OPEN top-up, then one per top-up, never above 3.
        assert env.backend.lookups - lookups == min(open_top_ups, 3)
        assert top_ups[-1].reason is l402.ChallengeReason.CREDIT_EXHAUSTED

    # Past their expiry they are no longer asked about (they could only be paid before it).
    env.clock.advance(600)
    lookups = env.backend.lookups
    await env.challenge(authorization=authorization)
    assert env.backend.lookups == lookups
    assert await env.balance(authorization) == 0


async def test_an_unconfirmable_purchase_is_a_503_not_another_invoice(memory_env: Env) -> None:
    env = memory_env
    authorization = env.pay(await env.challenge())
    env.backend.unavailable = True
    decision = await env.ask(authorization=authorization)
    assert decision == Deny(503, Refusal.SETTLEMENT_UNCONFIRMED, retry_after=5)


async def test_a_token_bought_per_token_tops_up_an_account_of_its_own(env: Env) -> None:
    token_challenge = await env.challenge(TOKEN_PATH)
    authorization = await env.settle(token_challenge)
    top_up = await env.challenge(authorization=authorization)
    assert top_up.reason is l402.ChallengeReason.CREDIT_EXHAUSTED
    assert (top_up.balance_msat, token_id_of(top_up)) == (0, token_id_of(token_challenge))
    await env.settle(top_up)
    assert (await env.charge(authorization=authorization)).balance_msat == 4_000


async def test_a_credit_token_does_not_open_a_route_billed_per_token(env: Env) -> None:
    authorization = await env.buy()
    decision = await env.challenge(TOKEN_PATH, authorization=authorization)
    assert (decision.credit, decision.amount_msat) == (False, 10_000)
    assert token_id_of(decision) != token_id_of_credential(authorization)


async def test_an_expired_token_gets_a_fresh_challenge(memory_env: Env) -> None:
    env = memory_env
    challenge = await env.challenge()
    authorization = await env.settle(challenge)
    env.clock.advance(LIFETIME + 1)
    fresh = await env.challenge(authorization=authorization)
    assert fresh.reason is l402.ChallengeReason.EXPIRED
    assert token_id_of(fresh) != token_id_of(challenge)
    assert await env.balance(authorization) == 5_000  # still the holder's, to withdraw


async def test_a_cookie_credential_is_charged_too(memory_env: Env) -> None:
    env = memory_env
    authorization = await env.buy()
    charge = await env.charge(cookies=[authorization.removeprefix("L402 ")])
    assert charge.balance_msat == 4_000


async def test_the_store_failing_to_hold_credit_is_a_503(memory_env: Env) -> None:
    env = memory_env
    authorization = await env.buy()

    async def broken(*_: Any, **__: Any) -> Any:
        raise errors.StoreError("disk gone")

    cast(Any, env.store).reserve = broken
    decision = await env.ask(authorization=authorization)
    assert decision == Deny(503, Refusal.STORE_UNAVAILABLE, retry_after=5)


async def assert_nothing_held(env: Env, authorization: str, request: asyncio.Task[Any]) -> None:
    """``request`` ends cancelled, and its token's account holds nothing: all 5000 msat left."""
    with pytest.raises(asyncio.CancelledError):
        await request
    # Grouped writes commit in order: this one commits after the hold and its undo.
    assert await env.store.settle_reservation(0, Msat(0), "GET", CREDIT_PATH) is None
    account = await env.store.get_account(token_id_of_credential(authorization))
    assert account is not None
    assert (account.reserved_msat, account.balance_msat) == (0, 5_000)


async def test_a_request_cancelled_while_holding_credit_leaves_nothing_held(
    sqlite_env: Env,
) -> None:
    env = sqlite_env
    authorization = await env.buy()
    reserving = asyncio.Event()
    reserve = env.store.reserve

    async def signalled(*args: Any) -> Any:
        reserving.set()
        return await reserve(*args)  # SQLite commits it even once its caller stops waiting

    cast(Any, env.store).reserve = signalled
    request = asyncio.create_task(env.ask(authorization=authorization))
    await reserving.wait()
    request.cancel()  # the client left
    await assert_nothing_held(env, authorization, request)


async def test_a_request_cancelled_as_its_hold_comes_in_leaves_nothing_held(
    sqlite_env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled in the loop turn the store hands it the hold, before it could take it."""
    env = sqlite_env
    authorization = await env.buy()
    request: asyncio.Task[Any] | None = None
    settle = sqlite_store._settle_future

    def settle_then_cancel(future: asyncio.Future[Any], result: Any, error: Any) -> None:
        settle(future, result, error)
        if request is not None and isinstance(result, Reserved):
            request.cancel()  # the client left, seen in the same turn

    monkeypatch.setattr(sqlite_store, "_settle_future", settle_then_cancel)
    request = asyncio.create_task(env.ask(authorization=authorization))
    await assert_nothing_held(env, authorization, request)


async def test_a_hold_the_store_cancels_is_a_503(memory_env: Env) -> None:
    env = memory_env
    authorization = await env.buy()
    cast(Any, env.store).reserve = _store_cancelled
    decision = await env.ask(authorization=authorization)
    assert decision == Deny(503, Refusal.STORE_UNAVAILABLE, retry_after=5)


# --- never answered from a cache -----------------------------------------------------------


async def test_allowed_again_never_answers_a_credit_route(memory_env: Env) -> None:
    env = memory_env
    authorization = await env.buy()
    for balance in (4_000, 3_000):
        assert (await env.charge(authorization=authorization)).balance_msat == balance
        assert env.service.allowed_again((authorization,), "GET", CREDIT_PATH) is None


async def test_the_verification_is_remembered_within_the_root_key_cache_age(
    memory_env: Env,
) -> None:
    env = memory_env
    challenge = await env.challenge()
    authorization = await env.settle(challenge)
    await env.charge(authorization=authorization)
    reads = 0
    get_root_key = env.store.get_root_key

    async def counted(key_id: bytes) -> bytes | None:
        nonlocal reads
        reads += 1
        return await get_root_key(key_id)

    cast(Any, env.store).get_root_key = counted
    await env.charge(authorization=authorization)
    assert reads == 0
    # A revocation through the service is seen at once.
    await env.service.revoke(token_id_of(challenge))
    decision = await env.ask(authorization=authorization)
    assert isinstance(decision, Deny)
    assert decision.status == 401


# --- the amount bought ---------------------------------------------------------------------


@pytest.mark.parametrize(("asked", "amount"), [("1000", 1_000), (" 50000 ", 50_000), ("7", None)])
async def test_the_client_may_ask_for_an_amount_within_bounds(
    memory_env: Env, asked: str, amount: int | None
) -> None:
    decision = await memory_env.ask(headers=[("l402-credit-msat", asked)])
    if amount is None:
        assert isinstance(decision, Deny)
        assert decision.status == 400
        assert decision.reason.startswith(Refusal.CREDIT_AMOUNT_OUT_OF_BOUNDS)
        assert "1000 to 50000 msat" in decision.reason
    else:
        assert isinstance(decision, PaymentChallenge)
        assert decision.amount_msat == amount


@pytest.mark.parametrize("asked", ["50001", "0"])
async def test_an_amount_out_of_bounds_is_refused(memory_env: Env, asked: str) -> None:
    decision = await memory_env.ask(headers=[(CREDIT_AMOUNT_HEADER, asked)])
    assert isinstance(decision, Deny)
    assert decision.status == 400
    assert decision.reason.startswith(Refusal.CREDIT_AMOUNT_OUT_OF_BOUNDS)


@pytest.mark.parametrize("asked", [["abc"], ["-1000"], ["1e4"], ["2.5"], [""], ["1000", "2000"]])
async def test_an_amount_that_is_no_whole_number_is_refused(
    memory_env: Env, asked: list[str]
) -> None:
    decision = await memory_env.ask(headers=[(CREDIT_AMOUNT_HEADER, value) for value in asked])
    assert decision == Deny(400, Refusal.CREDIT_AMOUNT_INVALID)
    assert not memory_env.backend.invoices


async def test_a_top_up_buys_the_amount_asked_for(memory_env: Env) -> None:
    env = memory_env
    authorization = await env.buy(headers=[(CREDIT_AMOUNT_HEADER, "1000")])
    await env.charge(authorization=authorization)
    top_up = await env.challenge(
        authorization=authorization, headers=[(CREDIT_AMOUNT_HEADER, "20000")]
    )
    assert (top_up.amount_msat, top_up.balance_msat) == (20_000, 0)


# --- price functions -----------------------------------------------------------------------


async def test_a_price_function_prices_every_request(memory_env: Env) -> None:
    env = memory_env
    challenge = await env.challenge(PRICED_PATH, query="n=700")
    assert (challenge.amount_msat, challenge.price_msat) == (5_000, 700)
    authorization = await env.settle(challenge)
    first = await env.charge(PRICED_PATH, authorization=authorization, query="n=1200")
    second = await env.charge(PRICED_PATH, authorization=authorization, query="n=300")
    assert (first.reserved_msat, second.reserved_msat) == (1_200, 300)
    assert second.balance_msat == 3_500
    free = await env.allow(PRICED_PATH, authorization=authorization, query="n=0")
    assert free.charge is None
    assert free.token is not None
    failed = await env.ask(PRICED_PATH, authorization=authorization, query="n=fail")
    assert failed == Deny(503, Refusal.PRICE_FUNCTION_FAILED, retry_after=30)


async def test_an_invoice_always_buys_enough_for_the_request(memory_env: Env) -> None:
    env = memory_env
    # The route buys 5000 by default; a request priced above it gets an invoice for its price.
    challenge = await env.challenge(PRICED_PATH, query="n=7000")
    assert (challenge.amount_msat, challenge.price_msat) == (7_000, 7_000)
    authorization = await env.settle(challenge)
    await env.charge(PRICED_PATH, authorization=authorization, query="n=6000")
    top_up = await env.challenge(PRICED_PATH, authorization=authorization, query="n=9000")
    assert (top_up.amount_msat, top_up.balance_msat, top_up.price_msat) == (8_000, 1_000, 9_000)


# --- finishing a charge --------------------------------------------------------------------


async def test_a_metered_route_charges_the_reported_cost(env: Env) -> None:
    authorization = await env.buy(METERED_PATH)
    for cost, balance in (("250", 4_750), (0, 4_750), (1_000, 3_750), (" 5 ", 3_745)):
        charge = await env.charge(METERED_PATH, authorization=authorization)
        assert charge.metered
        assert await env.service.finish_charge(charge, status=200, cost=cost) == balance
    info = await env.service.token_info((authorization,))
    assert isinstance(info, TokenInfo)
    # A charge of 0 is no usage.
    assert [charge.amount_msat for charge in info.recent] == [5, 1_000, 250]


@pytest.mark.parametrize(
    "cost", ["-5", "abc", "1.5", "1001", 1_001, -1, None, True, "", "\uff11\uff10"]
)
async def test_a_bad_cost_report_is_logged_and_charged_the_hold(
    memory_env: Env, caplog: pytest.LogCaptureFixture, cost: Any
) -> None:
    env = memory_env
    authorization = await env.buy(METERED_PATH)
    charge = await env.charge(METERED_PATH, authorization=authorization)
    with caplog.at_level(logging.WARNING, logger="gateway.service.credit"):
        balance = await env.service.finish_charge(charge, status=200, cost=cost)
    assert balance == 4_000
    (record,) = caplog.records
    assert METERED_PATH in record.getMessage()
    assert "\n" not in record.getMessage()


@pytest.mark.parametrize(
    ("status", "charged"), [(200, 1_000), (404, 1_000), (500, 0), (503, 0), (None, 0)]
)
async def test_failures_are_not_charged(memory_env: Env, status: int | None, charged: int) -> None:
    env = memory_env
    authorization = await env.buy()
    charge = await env.charge(authorization=authorization)
    assert await env.service.finish_charge(charge, status=status, cost=None) == 5_000 - charged


@pytest.mark.parametrize("status", [502, None])
async def test_a_route_may_charge_failures(memory_env: Env, status: int | None) -> None:
    env = memory_env
    authorization = await env.buy(PRICED_PATH, query="n=100")
    charge = await env.charge(PRICED_PATH, authorization=authorization, query="n=800")
    assert charge.charge_failures
    assert await env.service.finish_charge(charge, status=status, cost=None) == 4_200


@pytest.mark.parametrize("status", [200, 413, None])
async def test_a_request_nobody_served_is_not_charged(memory_env: Env, status: int | None) -> None:
    env = memory_env
    authorization = await env.buy(PRICED_PATH, query="n=100")
    charge = await env.charge(PRICED_PATH, authorization=authorization, query="n=800")
    assert charge.charge_failures
    assert await env.service.finish_charge(charge, status=status, cost=None, served=False) == 5_000


async def test_a_metered_failure_is_not_charged_whatever_it_reports(memory_env: Env) -> None:
    env = memory_env
    authorization = await env.buy(METERED_PATH)
    charge = await env.charge(METERED_PATH, authorization=authorization)
    assert await env.service.finish_charge(charge, status=500, cost="700") == 5_000


async def test_a_hold_the_sweeper_released_is_not_charged(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    authorization = await env.buy()
    charge = await env.charge(authorization=authorization)
    env.clock.advance(RESERVATION_SECONDS + 1)
    sweeper = InvoiceSweeper(env.backend, env.store, env.clock, retention=0)
    result = await sweeper.sweep()
    assert (result.released, result.busy) == (1, False)
    with caplog.at_level(logging.WARNING, logger="gateway.service.credit"):
        assert await env.service.finish_charge(charge, status=200, cost=None) is None
    # Not silent: the operator learns reservation_seconds is shorter than a request took.
    assert "reservation_seconds" in caplog.text
    assert "uncharged" in caplog.text
    assert await env.balance(authorization) == 5_000
    assert (await sweeper.sweep()).released == 0


async def test_a_store_failure_while_charging_is_logged_not_raised(
    memory_env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    env = memory_env
    authorization = await env.buy()
    charge = await env.charge(authorization=authorization)

    async def broken(*_: Any, **__: Any) -> Any:
        raise errors.StoreError("disk gone")

    cast(Any, env.store).settle_reservation = broken
    with caplog.at_level(logging.ERROR, logger="gateway.service.credit"):
        assert await env.service.finish_charge(charge, status=200, cost=None) is None
    assert CREDIT_PATH in caplog.text


async def test_a_charge_the_store_cancels_is_logged_not_raised(
    memory_env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    env = memory_env
    authorization = await env.buy()
    charge = await env.charge(authorization=authorization)
    cast(Any, env.store).settle_reservation = _store_cancelled
    with caplog.at_level(logging.ERROR, logger="gateway.service.credit"):
        assert await env.service.finish_charge(charge, status=200, cost=None) is None
    assert "cancelled" in caplog.text
    assert CREDIT_PATH in caplog.text


# --- token info and the credential check ---------------------------------------------------


async def test_token_info_reads_the_account(env: Env) -> None:
    challenge = await env.challenge()
    authorization = await env.settle(challenge)
    for _ in range(3):
        env.clock.advance(1)
        charge = await env.charge(authorization=authorization)
        await env.service.finish_charge(charge, status=200, cost=None)
    held = await env.charge(authorization=authorization)
    info = await env.service.token_info((authorization,))
    assert isinstance(info, TokenInfo)
    assert info.token_id == token_id_of(challenge).hex()
    assert (info.service, info.balance_msat, info.credited_msat) == ("gen", 1_000, 5_000)
    assert (info.spent_msat, info.reserved_msat, info.withdrawn_msat) == (3_000, 1_000, 0)
    assert info.valid_until == int(challenge.issued_at or 0) + LIFETIME
    assert [charge.at for charge in info.recent] == sorted(
        (charge.at for charge in info.recent), reverse=True
    )
    assert [(c.method, c.path, c.amount_msat) for c in info.recent] == [
        ("GET", CREDIT_PATH, 1_000)
    ] * 3
    assert await env.service.account_of((authorization,)) == token_id_of(challenge)
    assert held.reserved_msat == 1_000


async def test_token_info_shows_the_latest_charges_only(memory_env: Env) -> None:
    env = memory_env
    authorization = await env.buy(headers=[(CREDIT_AMOUNT_HEADER, "50000")])
    for _ in range(25):
        charge = await env.charge(authorization=authorization)
        await env.service.finish_charge(charge, status=200, cost=None)
    info = await env.service.token_info((authorization,))
    assert isinstance(info, TokenInfo)
    assert len(info.recent) == 20


async def test_the_credential_check_ignores_expiry_and_request_scope(memory_env: Env) -> None:
    env = memory_env
    challenge = await env.challenge()
    authorization = await env.settle(challenge)
    env.clock.advance(10 * LIFETIME)
    assert await env.service.account_of((authorization,)) == token_id_of(challenge)


def _forged(authorization: str) -> str:
    macaroon, preimage = authorization.removeprefix("L402 ").split(":")
    decoded = l402.decode_b64(macaroon)
    forged = l402.mint(b"\x00" * 32, decoded.identifier, decoded.caveats, decoded.location)
    return f"L402 {l402.encode_b64(forged)}:{preimage}"


async def test_the_credential_check_refuses_what_is_not_a_paid_token(memory_env: Env) -> None:
    env = memory_env
    authorization = await env.buy()
    macaroon = authorization.removeprefix("L402 ").split(":")[0]
    unpaid = await env.challenge()
    cases = {
        (): Refusal.CREDENTIAL_REQUIRED,
        ("Bearer abc",): Refusal.CREDENTIAL_REQUIRED,
        (f"L402 {macaroon}:{'00' * 32}",): "preimage does not match the payment hash",
        (_forged(authorization),): Refusal.INVALID_SIGNATURE,
        (f"L402 {unpaid.macaroon}:{'11' * 32}",): "preimage does not match the payment hash",
    }
    for value, reason in cases.items():
        decision = await env.service.token_info(value)
        assert decision == Deny(401, reason, realm="l402-gateway"), value
    malformed = await env.service.account_of(("L402 !!!:zz",))
    assert isinstance(malformed, Deny)
    assert malformed.status == 401


async def test_a_revoked_token_has_no_account_to_read(memory_env: Env) -> None:
    env = memory_env
    challenge = await env.challenge()
    authorization = await env.settle(challenge)
    await env.service.revoke(token_id_of(challenge))
    decision = await env.service.account_of((authorization,))
    assert decision == Deny(401, Refusal.UNKNOWN_OR_REVOKED, realm="l402-gateway")


async def test_a_token_without_an_account_is_a_404(memory_env: Env) -> None:
    env = memory_env
    authorization = await env.buy(TOKEN_PATH)
    assert await env.service.token_info((authorization,)) == Deny(404, Refusal.NO_CREDIT_ACCOUNT)


async def test_token_info_store_failure_is_a_503(memory_env: Env) -> None:
    env = memory_env
    authorization = await env.buy()

    async def broken(*_: Any, **__: Any) -> Any:
        raise errors.StoreError("disk gone")

    cast(Any, env.store).get_account = broken
    assert await env.service.token_info((authorization,)) == Deny(
        503, Refusal.STORE_UNAVAILABLE, retry_after=5
    )


# --- withdrawals ---------------------------------------------------------------------------


class RecordingWithdrawer:
    def __init__(self) -> None:
        self.calls: list[tuple[bytes, str]] = []

    async def withdraw(self, token_id: bytes, payment_request: str) -> WithdrawalOutcome | Deny:
        self.calls.append((token_id, payment_request))
        return Deny(400, "recorded")


async def test_withdrawals_are_not_enabled_without_a_withdrawer(memory_env: Env) -> None:
    env = memory_env
    authorization = await env.buy()
    assert await env.service.withdraw((authorization,), "lnbcrt1") == Deny(
        404, Refusal.WITHDRAWALS_DISABLED
    )


async def test_a_withdrawal_goes_to_the_withdrawer_with_the_account(memory_env: Env) -> None:
    env = memory_env
    withdrawer = RecordingWithdrawer()
    env.service = env.build(withdrawer=cast(Withdrawer, withdrawer))
    challenge = await env.challenge()
    authorization = await env.settle(challenge)
    assert await env.service.withdraw((authorization,), "lnbcrt1") == Deny(400, "recorded")
    assert withdrawer.calls == [(token_id_of(challenge), "lnbcrt1")]
    refused = await env.service.withdraw((_forged(authorization),), "lnbcrt1")
    assert isinstance(refused, Deny)
    assert refused.status == 401
    assert len(withdrawer.calls) == 1


# --- the hot path: charge_again -------------------------------------------------------------


async def test_charge_again_holds_the_price_of_a_request_line_verified_before(env: Env) -> None:
    authorization = await env.buy()
    key = ((authorization,), "GET", CREDIT_PATH)
    assert await env.service.charge_again(*key) is None  # nothing verified yet
    first = await env.charge(authorization=authorization)
    await env.service.finish_charge(first, status=200, cost=None)
    again = await env.service.charge_again(*key)
    assert again is not None
    assert again.charge is not None
    assert (again.charge.reserved_msat, again.charge.balance_msat) == (1_000, 3_000)
    await env.service.finish_charge(again.charge, status=200, cost=None)
    assert await env.balance(authorization) == 3_000
    # Another request line, or a balance that does not cover the price: authorize answers.
    assert await env.service.charge_again((authorization,), "POST", CREDIT_PATH) is None
    for _ in range(3):
        held = await env.service.charge_again(*key)
        assert held is not None
        assert held.charge is not None
        await env.service.finish_charge(held.charge, status=200, cost=None)
    assert await env.service.charge_again(*key) is None
    assert await env.balance(authorization) == 0


async def test_charge_again_keeps_no_rule_for_more_than_one_authorization_value(env: Env) -> None:
    """The rule map is keyed by the request's whole Authorization: with more than one value
    (each up to aiohttp's 8 KB) nothing is kept, as in the decision cache."""
    authorization = await env.buy()
    both = (authorization, "Bearer " + "x" * 8000)
    for values in (both, (authorization,)):
        request = RequestInfo("GET", CREDIT_PATH, "203.0.113.7", values)
        decision = await env.service.authorize(request)
        assert isinstance(decision, Allow), decision
        assert decision.charge is not None
        await env.service.finish_charge(decision.charge, status=200, cost=None)
    assert list(env.service._credit_rules) == [((authorization,), "GET", CREDIT_PATH)]


async def test_charge_again_knows_no_price_function_route_and_no_revoked_token(env: Env) -> None:
    authorization = await env.buy(PRICED_PATH, query="n=5000")
    await env.allow(PRICED_PATH, authorization=authorization, query="n=1000")
    assert await env.service.charge_again((authorization,), "GET", PRICED_PATH) is None
    bought = await env.buy()
    await env.allow(authorization=bought)
    await env.service.revoke(token_id_of_credential(bought))
    assert await env.service.charge_again((bought,), "GET", CREDIT_PATH) is None
