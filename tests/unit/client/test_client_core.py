"""L402Client and Exchange against a fake payer: budgets, reuse, refusals, crash recovery."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from gateway.client import (
    Budget,
    BudgetExceeded,
    InvoiceRejected,
    L402Client,
    Offer,
    PaymentDeclined,
    PaymentInFlight,
    PaymentUnverified,
    PendingPayment,
    Retry,
    TokenCache,
)
from gateway.errors import BackendUnavailable, PaymentFailed
from gateway.lnd.client import LndClient
from gateway.ports import Payer, PaymentStatus
from tests.fakes import NODE_PUBKEY, NOW
from tests.unit.client.client_helpers import Challenge, FakePayer, fake_clock, make_challenge

URL = "http://api.test/api/premium/fortune"
BUDGET = Budget(max_price_msat=50_000)


def _lnd_client_is_a_payer(lnd: LndClient) -> Payer:
    return lnd  # mypy checks that LndClient implements the Payer Protocol


def client_for(
    payer: FakePayer,
    cache: TokenCache | None = None,
    budget: Budget = BUDGET,
    **options: object,
) -> L402Client:
    return L402Client(
        payer,
        network="regtest",
        budget=budget,
        cache=cache or TokenCache(),
        clock=fake_clock(),
        **options,  # type: ignore[arg-type]
    )


async def authorize(client: L402Client, challenge: Challenge, url: str = URL) -> bool:
    """Run authorize for a 402 carrying ``challenge``; True if it paid."""
    _, payment = await client.authorize(url, "GET", challenge.www_authenticate, challenge.body)
    return payment is not None


async def test_pays_once_and_logs_the_payment() -> None:
    payer = FakePayer(fee_msat=1_000)
    client = client_for(payer)
    challenge = payer.learn(make_challenge(10_000))
    token, payment = await client.authorize(URL, "GET", challenge.www_authenticate, challenge.body)
    assert payment is not None
    assert token.preimage == challenge.preimage
    assert token.authorization == f"L402 {challenge.macaroon_b64}:{challenge.preimage.hex()}"
    assert len(payer.calls) == 1
    invoice, max_fee, timeout = payer.calls[0]
    assert (invoice, max_fee, timeout) == (challenge.invoice, 5_000, 60.0)
    assert client.spending_log == (payment,)
    assert payment.time == NOW
    assert payment.url == URL
    assert payment.method == "GET"
    assert payment.payment_hash == challenge.payment_hash.hex()
    assert (payment.amount_msat, payment.fee_msat) == (10_000, 1_000)
    assert payment.destination == NODE_PUBKEY
    assert payment.description == "premium: GET /api/premium/fortune"
    assert not payment.recovered
    assert client.spent_msat == 11_000
    assert await client.cache.pending() == []

    # Another 402 in the same scope: the cached token, nothing paid.
    again = payer.learn(make_challenge(10_000))
    reused, paid = await client.authorize(
        "http://api.test/api/premium/other", "GET", again.www_authenticate, again.body
    )
    assert (reused, paid) == (token, None)
    assert len(payer.calls) == 1


async def test_over_the_price_limit_nothing_is_paid() -> None:
    payer = FakePayer()
    client = client_for(payer, budget=Budget(max_price_msat=9_999))
    challenge = payer.learn(make_challenge(10_000))
    with pytest.raises(BudgetExceeded, match=r"over the limit of 9\.999 sat") as caught:
        await authorize(client, challenge)
    assert caught.value.limit == "max_price"
    assert caught.value.offer is not None
    assert caught.value.offer.amount_msat == 10_000
    assert payer.calls == []
    assert await client.cache.pending() == []
    assert await client.cache.tokens() == []
    assert client.spending_log == ()


async def test_total_budget_counts_prices_and_fees() -> None:
    payer = FakePayer(fee_msat=500)
    budget = Budget(max_price_msat=10_000, max_fee_msat=1_000, max_total_msat=22_000)
    client = client_for(payer, budget=budget)
    await authorize(client, payer.learn(make_challenge(10_000)), "http://a.test/x")
    assert client.spent_msat == 10_500
    # 10_500 + 10_000 + 1_000 (worst-case fee) = 21_500 fits.
    await authorize(client, payer.learn(make_challenge(10_000)), "http://b.test/x")
    assert client.spent_msat == 21_000
    with pytest.raises(BudgetExceeded, match="total budget") as caught:
        await authorize(client, payer.learn(make_challenge(1)), "http://c.test/x")
    assert caught.value.limit == "max_total"
    assert len(payer.calls) == 2


async def test_concurrent_payments_cannot_overshoot_the_total() -> None:
    payer = FakePayer(fee_msat=0)
    gate = asyncio.Event()
    sending = asyncio.Event()

    async def hold() -> None:
        sending.set()  # the first payment has reserved its budget and reached the payer
        await gate.wait()

    payer.before_send = hold
    budget = Budget(max_price_msat=10_000, max_fee_msat=1_000, max_total_msat=15_000)
    client = client_for(payer, budget=budget)
    first = asyncio.create_task(authorize(client, payer.learn(make_challenge()), "http://a.test/"))
    await asyncio.wait_for(sending.wait(), 5)
    with pytest.raises(BudgetExceeded):  # 11_000 reserved by the first: 22_000 > 15_000
        await authorize(client, payer.learn(make_challenge()), "http://b.test/")
    gate.set()
    assert await first


async def test_concurrent_402s_in_one_scope_pay_once() -> None:
    payer = FakePayer()
    client = client_for(payer)
    challenges = [payer.learn(make_challenge()) for _ in range(5)]
    results = await asyncio.gather(*(authorize(client, c) for c in challenges))
    assert sorted(results) == [False, False, False, False, True]
    assert len(payer.calls) == 1


async def test_budget_limits() -> None:
    assert Budget(max_price_msat=1).fee_limit(100) == 5_000
    assert Budget(max_price_msat=1).fee_limit(10_000_000) == 100_000
    assert Budget(max_price_msat=1, max_fee_msat=0).fee_limit(10_000_000) == 0
    with pytest.raises(ValueError, match="non-negative"):
        Budget(max_price_msat=-1)
    with pytest.raises(ValueError, match="non-negative"):
        Budget(max_price_msat=1, max_total_msat=-5)


async def test_invoice_checks_run_before_anything_is_paid() -> None:
    payer = FakePayer()
    client = client_for(payer)
    for challenge in (
        make_challenge(network="mainnet"),
        make_challenge(created_at=NOW - 3600),
        make_challenge(10_000, invoice_amount=11_000),
    ):
        with pytest.raises(InvoiceRejected):
            await authorize(client, payer.learn(challenge))
    assert payer.calls == []
    assert await client.cache.pending() == []


async def test_confirm_hook_can_decline() -> None:
    payer = FakePayer()
    seen: list[Offer] = []

    async def confirm(offer: Offer) -> bool:
        seen.append(offer)
        return offer.amount_msat < 5_000

    client = client_for(payer, confirm=confirm)
    with pytest.raises(PaymentDeclined) as caught:
        await authorize(client, payer.learn(make_challenge(10_000)))
    assert caught.value.offer == seen[0]
    assert payer.calls == []
    assert await authorize(client, payer.learn(make_challenge(4_000)))


async def test_failed_payment_drops_the_pending_entry(tmp_path: Path) -> None:
    payer = FakePayer()
    payer.fail = True
    client = client_for(payer, TokenCache(tmp_path / "tokens.json"))
    with pytest.raises(PaymentFailed):
        await authorize(client, payer.learn(make_challenge()))
    assert await TokenCache(tmp_path / "tokens.json").pending() == []
    assert client.spending_log == ()
    assert client.spent_msat == 0


async def test_pending_entry_is_on_disk_while_the_payment_is_in_flight(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    payer = FakePayer()
    seen_pending: list[int] = []

    async def check() -> None:
        seen_pending.append(len(await TokenCache(path).pending()))

    payer.before_send = check
    client = client_for(payer, TokenCache(path))
    assert await authorize(client, payer.learn(make_challenge()))
    assert seen_pending == [1]
    assert await TokenCache(path).pending() == []
    assert len(await TokenCache(path).tokens()) == 1


async def test_crash_between_paying_and_storing_never_pays_twice(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    payer = FakePayer()
    payer.crash = True  # the node pays, but the client never hears back
    first = client_for(payer, TokenCache(path))
    paid_challenge = payer.learn(make_challenge(10_000))
    with pytest.raises(BackendUnavailable):
        await authorize(first, paid_challenge)
    assert payer.payments[paid_challenge.payment_hash].status is PaymentStatus.SUCCEEDED
    (entry,) = await TokenCache(path).pending()
    assert entry.payment_hash == paid_challenge.payment_hash
    assert await TokenCache(path).tokens() == []

    # A new process: the cache file is all it has. A fresh 402 in the same scope arrives.
    payer.crash = False
    second = client_for(payer, TokenCache(path))
    fresh = payer.learn(make_challenge(10_000))
    token, payment = await second.authorize(
        "http://api.test/api/premium/other", "GET", fresh.www_authenticate, fresh.body
    )
    assert payment is None  # nothing paid now ...
    assert token.payment_hash == paid_challenge.payment_hash  # ... the earlier payment's token
    assert token.preimage == paid_challenge.preimage
    assert len(payer.calls) == 1
    assert payer.lookups == [paid_challenge.payment_hash]
    (recovered,) = second.spending_log
    assert recovered.recovered
    assert recovered.payment_hash == paid_challenge.payment_hash.hex()
    assert second.spent_msat == 11_000
    assert await TokenCache(path).pending() == []


async def test_recover_at_start_up(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    payer = FakePayer()
    payer.crash = True
    crashed = client_for(payer, TokenCache(path))
    succeeded = payer.learn(make_challenge())
    with pytest.raises(BackendUnavailable):
        await authorize(crashed, succeeded, "http://a.test/x")
    # Another pending entry whose payment never reached the node.
    never = make_challenge()
    cache = TokenCache(path)
    await cache.add_pending(
        dataclasses.replace(
            (await cache.pending())[0],
            payment_hash=never.payment_hash,
            macaroon_b64=never.macaroon_b64,
            url="http://b.test/x",
            origin="http://b.test",
        )
    )
    restarted = client_for(FakePayer(), TokenCache(path))
    restarted.payer = payer
    entries = await restarted.recover()
    assert [e.payment_hash for e in entries] == [succeeded.payment_hash.hex()]
    assert await TokenCache(path).pending() == []
    assert await restarted.cache.find("http://a.test/y", "GET", NOW) is not None
    assert await restarted.recover() == []


async def test_unknown_payment_is_dropped_and_the_fresh_402_paid(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    payer = FakePayer()
    lost = make_challenge()
    client = client_for(payer, TokenCache(path))
    # As if the process died after writing the pending entry, before the payer saw it.
    await client.cache.add_pending(_pending_for(lost))
    assert await authorize(client, payer.learn(make_challenge()))
    assert payer.lookups == [lost.payment_hash]
    assert len(payer.calls) == 1
    assert await client.cache.pending() == []


def _pending_for(challenge: Challenge) -> PendingPayment:
    return PendingPayment(
        origin="http://api.test",
        scope="/api/premium/",
        url=URL,
        method="GET",
        scheme="L402",
        macaroon_b64=challenge.macaroon_b64,
        invoice=challenge.invoice,
        payment_hash=challenge.payment_hash,
        amount_msat=challenge.amount_msat,
        destination=NODE_PUBKEY,
        description="x",
        created_at=NOW,
    )


async def test_in_flight_payment_is_waited_for_not_paid_again(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    payer = FakePayer()
    payer.in_flight = True
    first = client_for(payer, TokenCache(path))
    in_flight = payer.learn(make_challenge())
    with pytest.raises(BackendUnavailable):
        await authorize(first, in_flight)
    payer.in_flight = False

    impatient = client_for(payer, TokenCache(path), in_flight_wait=0)
    with pytest.raises(PaymentInFlight, match="still in flight"):
        await authorize(impatient, payer.learn(make_challenge()))
    assert len(payer.calls) == 1
    # Another scope of the origin is not blocked by it.
    assert await authorize(impatient, payer.learn(make_challenge()), "http://api.test/other")
    assert len(payer.calls) == 2

    patient = client_for(payer, TokenCache(path), in_flight_wait=10)
    loop = asyncio.get_running_loop()
    loop.call_later(0.3, payer.finish_in_flight)
    fresh = make_challenge()
    token, payment = await patient.authorize(URL, "GET", fresh.www_authenticate, fresh.body)
    assert payment is None
    assert token.payment_hash == in_flight.payment_hash
    assert len(payer.calls) == 2


async def test_wrong_preimage_is_unverified() -> None:
    payer = FakePayer()
    challenge = make_challenge()
    payer.known[challenge.payment_hash] = b"\0" * 32
    client = client_for(payer)
    with pytest.raises(PaymentUnverified, match="without the matching preimage"):
        await authorize(client, challenge)
    assert await client.cache.tokens() == []
    assert await client.cache.pending() == []


# -- the Exchange loop ---------------------------------------------------------------------


class Server:
    """Answers like the gateway: 200 for a known token, else 402 with a fresh challenge."""

    def __init__(self, payer: FakePayer) -> None:
        self.payer = payer
        self.accepted: set[str] = set()
        self.revoked: set[str] = set()
        self.requests: list[str | None] = []
        self.body_reads = 0

    async def answer(self, authorization: str | None) -> tuple[int, list[str]]:
        self.requests.append(authorization)
        if authorization in self.revoked:
            return 401, []
        if authorization in self.accepted:
            return 200, []
        self.last = self.payer.learn(make_challenge())
        self.accepted.add(f"L402 {self.last.macaroon_b64}:{self.last.preimage.hex()}")
        return 402, self.last.www_authenticate

    async def read_body(self) -> bytes:
        self.body_reads += 1
        return self.last.body


async def run(client: L402Client, server: Server, url: str = URL) -> int:
    exchange = await client.exchange(url, "get")
    authorization = exchange.authorization
    while True:
        status, www = await server.answer(authorization)
        retry = await exchange.step(status, www, server.read_body)
        if retry is None:
            return status
        authorization = retry.authorization


async def test_exchange_pays_then_reuses() -> None:
    payer = FakePayer()
    server = Server(payer)
    client = client_for(payer)
    assert await run(client, server) == 200
    assert len(server.requests) == 2
    assert server.requests[0] is None
    assert await run(client, server) == 200
    assert len(server.requests) == 3  # sent the cached token straight away
    assert len(payer.calls) == 1
    (token,) = await client.cache.tokens()
    assert token.worked == ("/api/premium/fortune",)
    assert server.body_reads == 1


async def test_exchange_refused_cached_token_pays_once_more() -> None:
    payer = FakePayer()
    server = Server(payer)
    client = client_for(payer)
    await run(client, server)
    server.accepted.clear()  # the server no longer takes the token (expired early)
    assert await run(client, server) == 200
    assert len(payer.calls) == 2
    assert len(await client.cache.tokens()) == 1  # the refused one was dropped (it had worked here)


async def test_exchange_401_for_a_cached_token_retries_without_it() -> None:
    payer = FakePayer()
    server = Server(payer)
    client = client_for(payer)
    await run(client, server)
    server.revoked |= server.accepted
    assert await run(client, server) == 200
    assert server.requests[-3:][1] is None  # 401, then without a token, then with a new one
    assert len(payer.calls) == 2


async def test_exchange_never_pays_twice_for_one_request() -> None:
    payer = FakePayer()

    class Refusing(Server):
        async def answer(self, authorization: str | None) -> tuple[int, list[str]]:
            status, www = await super().answer(authorization)
            self.accepted.clear()
            return (402, www) if status == 200 else (status, www)

    server = Refusing(payer)
    client = client_for(payer)
    exchange = await client.exchange(URL, "GET")
    status, www = await server.answer(exchange.authorization)
    retry = await exchange.step(status, www, server.read_body)
    assert isinstance(retry, Retry)
    assert retry.authorization is not None
    assert exchange.paid is not None
    status, www = await server.answer(retry.authorization)
    assert status == 402
    assert await exchange.step(status, www, server.read_body) is None  # give the 402 back
    assert len(payer.calls) == 1


async def test_exchange_ignores_402_without_l402_and_other_statuses() -> None:
    payer = FakePayer()
    client = client_for(payer)

    async def no_body() -> bytes:
        raise AssertionError("body read")

    exchange = await client.exchange(URL, "GET")
    assert await exchange.step(402, ['Payment realm="other"'], no_body) is None
    assert await exchange.step(401, [], no_body) is None  # no token was sent
    assert await exchange.step(500, [], no_body) is None
    assert payer.calls == []
