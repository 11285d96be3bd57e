"""The payout worker over the fake paying node, a fake LNURL-pay client and the memory store:
when payees are paid (thresholds, schedule, pay now), how much (who bears the fee, LNURL
bounds), failures and backoff, and exactly once across a crash. The same paths run against
real LND in tests/regtest/test_splits_regtest.py."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
from pathlib import Path
from typing import Any

import coincurve
import pytest

from gateway import errors
from gateway.client import bolt11
from gateway.destinations import is_pubkey
from gateway.lnd.client import KEYSEND_RECORD, LndClient
from gateway.lnd.protos import lightning_pb2, router_pb2
from gateway.ports import (
    InvoiceRecord,
    InvoiceState,
    InvoiceUpdate,
    Msat,
    PayeeBalance,
    Payment,
    PaymentHash,
    PaymentStatus,
    Payout,
    PayoutState,
    Preimage,
    Share,
    Split,
    Store,
)
from gateway.service.outgoing import ORPHAN_AFTER
from gateway.service.payout import PayeeTerms, Payouts
from gateway.store import MemoryStore
from gateway.store.postgres import PostgresStore
from gateway.store.sqlite import SqliteStore
from tests.fakes import NODE_PUBKEY, FakeClock, FakePayer, make_invoice

CAROL_KEY = "33" * 32  # the payee's node
CAROL = coincurve.PrivateKey(bytes.fromhex(CAROL_KEY)).public_key.format().hex()
CAROL_SPLIT: Split = (Share("carol", ppm=300_000),)
ADDRESS = "dave@pay.example"
RETRY = 10.0


class FakePayRequests:
    """An LNURL-pay service, as ``LnurlPayClient`` shows it: invoices of CAROL_KEY's node.
    ``fail`` makes every call raise; ``offset`` skews the invoices' amount; ``repeat``
    answers the first invoice again; ``fixed`` is answered instead of a new invoice;
    ``crash`` raises it from ``bounds``. ``forgotten`` lists the destinations dropped."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.bounds_msat = (1_000, 1_000_000_000)
        self.fail: str | None = None
        self.offset = 0
        self.repeat = False
        self.fixed: str | None = None
        self.crash: Exception | None = None
        self.issued: list[tuple[str, int, PaymentHash]] = []  # (destination, amount, hash)
        self.forgotten: list[str] = []
        self._first: str | None = None

    def forget(self, destination: str) -> None:
        self.forgotten.append(destination)

    async def bounds(self, destination: str) -> tuple[Msat, Msat]:
        if self.crash is not None:
            raise self.crash
        if self.fail is not None:
            raise errors.PayoutDestinationError(self.fail)
        least, most = self.bounds_msat
        return Msat(least), Msat(most)

    async def invoice(self, destination: str, amount_msat: Msat) -> str:
        if self.fail is not None:
            raise errors.PayoutDestinationError(self.fail)
        if self.repeat and self._first is not None:
            return self._first
        if self.fixed is not None:
            return self.fixed
        payment_hash = PaymentHash(hashlib.sha256(secrets.token_bytes(32)).digest())
        text = make_invoice(
            payment_hash, amount_msat + self.offset, created_at=self.clock.now(), key=CAROL_KEY
        )
        self.issued.append((destination, amount_msat, payment_hash))
        self._first = self._first or text
        return text


class World:
    def __init__(self, fee_msat: int = 0) -> None:
        self.clock = FakeClock()
        self.store: Store = MemoryStore(self.clock)
        self.node = FakePayer(fee_msat=fee_msat)
        self.requests = FakePayRequests(self.clock)
        self._index = 0

    def payouts(
        self, *payees: PayeeTerms, node: FakePayer | None = None, **options: Any
    ) -> Payouts:
        return Payouts(
            store=self.store,
            node=node or self.node,
            pay_requests=self.requests,
            decode=bolt11.decode,
            payees=payees or (carol(),),
            clock=self.clock,
            retry_initial=RETRY,
            retry_max=4 * RETRY,
            **options,
        )

    async def earn(self, amount_msat: int = 10_000, split: Split = CAROL_SPLIT) -> None:
        """Settle a paid request of ``amount_msat`` on a route with ``split``."""
        self._index += 1
        payment_hash = PaymentHash(secrets.token_bytes(32))
        now = self.clock.now()
        await self.store.add_invoice(
            InvoiceRecord(
                payment_hash=payment_hash,
                payment_request="lnbcrt...",
                amount_msat=Msat(amount_msat),
                token_id=secrets.token_bytes(32),
                service="premium",
                method="GET",
                path="/api/premium/fortune",
                state=InvoiceState.OPEN,
                created_at=now,
                expires_at=now + 600,
                add_index=self._index,
                split=split,
            )
        )
        await self.store.apply_update(
            InvoiceUpdate(payment_hash, InvoiceState.SETTLED, self._index, Msat(amount_msat), now)
        )

    async def payee(self, name: str = "carol") -> PayeeBalance:
        balance = await self.store.get_payee(name)
        assert balance is not None
        return balance

    async def payouts_of(self, name: str = "carol") -> list[Payout]:
        return list(reversed(await self.store.list_payouts(payee=name)))  # oldest first

    async def reconciles(self) -> None:
        totals = await self.store.split_totals()
        assert totals.received_msat == totals.kept_msat + totals.earned_msat
        assert totals.earned_msat == (
            totals.paid_msat + totals.payee_fees_msat + totals.pending_msat + totals.accrued_msat
        )


def carol(**terms: Any) -> PayeeTerms:
    defaults: dict[str, Any] = {"name": "carol", "destination": CAROL, "threshold_msat": 10_000}
    return PayeeTerms(**defaults | terms)


@pytest.fixture
def world() -> World:
    return World()


async def run_pass(payouts: Payouts) -> None:
    """One pass of the worker's ``run()``."""
    await payouts.run_once()


def test_a_keysend_destination_is_a_compressed_public_key() -> None:
    assert is_pubkey(CAROL)
    assert not is_pubkey(CAROL.upper())  # as the configuration: lower case only
    assert not is_pubkey("04" + CAROL[2:])
    assert not is_pubkey(CAROL[:-1])
    assert not is_pubkey(ADDRESS)


async def test_thirty_percent_of_twenty_payments_is_paid_in_threshold_batches(
    world: World,
) -> None:
    world.node.fee_msat = Msat(100)
    payouts = world.payouts(carol(threshold_msat=10_000))
    for _ in range(20):
        await world.earn(10_000)  # carol's share: 3,000 msat
        await run_pass(payouts)

    assert [amount for _, amount, _ in world.node.keysends] == [12_000] * 5
    assert {dest.hex() for dest, _, _ in world.node.keysends} == {CAROL}
    # Every keysend carries its own preimage, whose hash is the payment's.
    preimages = [preimage for _, _, preimage in world.node.keysends]
    assert len(set(preimages)) == 5
    hashes = [payout.payment_hash for payout in await world.payouts_of()]
    assert hashes == [hashlib.sha256(preimage).digest() for preimage in preimages]
    assert all(world.node.paid[h] == 1 for h in hashes)
    balance = await world.payee()
    assert (balance.earned_msat, balance.paid_msat, balance.accrued_msat) == (60_000, 60_000, 0)
    # The merchant bore the routing fees, the payee got every msat.
    assert (balance.fees_msat, balance.merchant_fees_msat) == (0, 500)
    assert world.node.fee_limits == [2_000] * 5  # max(2000 msat, 1% of 12,000)
    totals = await world.store.split_totals()
    assert (totals.received_msat, totals.kept_msat) == (200_000, 140_000)
    assert (totals.paid_msat, totals.merchant_fees_msat, totals.payee_fees_msat) == (60_000, 500, 0)
    await world.reconciles()


async def test_a_payee_that_pays_the_fee_gets_the_accrued_less_the_fee_limit(
    world: World,
) -> None:
    world.node.fee_msat = Msat(100)
    payouts = world.payouts(carol(payee_pays_fee=True))
    for _ in range(4):
        await world.earn(10_000)
    await run_pass(payouts)

    (payout,) = await world.payouts_of()
    assert (payout.amount_msat, payout.fee_reserve_msat, payout.fee_msat) == (10_000, 2_000, 100)
    assert payout.payee_pays_fee
    balance = await world.payee()
    assert (balance.paid_msat, balance.fees_msat, balance.merchant_fees_msat) == (10_000, 100, 0)
    assert balance.accrued_msat == 12_000 - 10_100  # the unused fee limit is accrued again
    await world.reconciles()


async def test_a_payee_that_would_get_nothing_after_the_fee_limit_is_not_paid(
    world: World,
) -> None:
    payouts = world.payouts(carol(payee_pays_fee=True, threshold_msat=1_000))
    await world.earn(5_000)  # 1,500 msat accrued, less than the 2,000 msat fee limit
    await run_pass(payouts)
    assert world.node.keysends == []
    assert await payouts.pay_now() == []


async def test_a_failed_payout_is_accrued_again_and_retried_after_a_backoff(
    world: World,
) -> None:
    world.node.fail_with = "FAILURE_REASON_NO_ROUTE"
    payouts = world.payouts()
    for _ in range(4):
        await world.earn(10_000)

    await run_pass(payouts)
    (failed,) = await world.payouts_of()
    assert failed.state is PayoutState.FAILED
    assert failed.failure == "FAILURE_REASON_NO_ROUTE"
    assert (await world.payee()).accrued_msat == 12_000

    await run_pass(payouts)  # backing off
    world.clock.advance(RETRY - 1)
    await run_pass(payouts)
    assert len(world.node.keysends) == 1

    world.clock.advance(1)
    await run_pass(payouts)  # fails again: now twice the wait
    assert len(world.node.keysends) == 2
    world.clock.advance(2 * RETRY - 1)
    await run_pass(payouts)
    assert len(world.node.keysends) == 2

    world.node.fail_with = None  # the route is back
    world.clock.advance(1)
    await run_pass(payouts)
    states = [payout.state for payout in await world.payouts_of()]
    assert states == [PayoutState.FAILED, PayoutState.FAILED, PayoutState.SUCCEEDED]
    balance = await world.payee()
    assert (balance.paid_msat, balance.accrued_msat, balance.pending_msat) == (12_000, 0, 0)
    await world.reconciles()

    # The success reset the backoff: a failure now waits the initial time again.
    world.node.fail_with = "FAILURE_REASON_NO_ROUTE"
    for _ in range(4):
        await world.earn(10_000)
    await run_pass(payouts)
    world.node.fail_with = None
    world.clock.advance(RETRY)
    await run_pass(payouts)
    assert (await world.payee()).paid_msat == 24_000


async def test_the_backoff_stops_doubling_at_retry_max(world: World) -> None:
    world.node.fail_with = "FAILURE_REASON_NO_ROUTE"
    payouts = world.payouts()
    for _ in range(4):
        await world.earn(10_000)
    sends = []
    for _ in range(60):
        await run_pass(payouts)
        sends.append(len(world.node.keysends))
        world.clock.advance(RETRY)
    # Tries at 0, 10, 30, 70, 110, 150... s: the wait doubles to 40 s and stays there.
    tried_at = [10 * i for i in range(60) if i == 0 or sends[i] > sends[i - 1]]
    assert tried_at[:7] == [0, 10, 30, 70, 110, 150, 190]


async def test_an_unreachable_payee_keeps_its_accrued_until_it_is_paid(world: World) -> None:
    """The node down: the send is refused before it starts (nothing in flight)."""
    world.node.refuse = errors.BackendUnavailable("LND at fake: connection refused")
    payouts = world.payouts()
    for _ in range(4):
        await world.earn(10_000)
    await run_pass(payouts)
    (payout,) = await world.payouts_of()
    # The node may have received it: the resolver decides, after orphan_after.
    assert payout.state is PayoutState.PENDING
    world.node.refuse = None
    world.clock.advance(ORPHAN_AFTER)
    await run_pass(payouts)  # resolved FAILED (never seen), then, backing off, not paid
    assert [p.state for p in await world.payouts_of()] == [PayoutState.FAILED]
    world.clock.advance(RETRY)
    await run_pass(payouts)
    assert [p.state for p in await world.payouts_of()] == [
        PayoutState.FAILED,
        PayoutState.SUCCEEDED,
    ]
    balance = await world.payee()
    assert (balance.earned_msat, balance.paid_msat, balance.accrued_msat) == (12_000, 12_000, 0)


async def test_a_stream_lost_before_the_node_recorded_the_payout_neither_fails_nor_repays_it(
    world: World,
) -> None:
    """The node took the keysend, the stream broke before the node recorded it: a lookup
    at once finds nothing, yet the payment goes through. It must stay PENDING (not FAILED,
    which would credit it back and pay it again)."""
    node = world.node
    original = node.send_keysend
    recorded_late: list[Payment] = []

    async def stream_lost(*args: Any, **kwargs: Any) -> Payment:
        payment = await original(*args, **kwargs)
        recorded_late.append(node.payments.pop(payment.payment_hash))
        raise errors.BackendError("LND at fake: Stream removed")

    node.send_keysend = stream_lost  # type: ignore[method-assign]
    payouts = world.payouts()
    for _ in range(4):
        await world.earn(10_000)
    await run_pass(payouts)
    (payout,) = await world.payouts_of()
    assert payout.state is PayoutState.PENDING
    (payment,) = recorded_late
    node.payments[payment.payment_hash] = payment  # the node records it after all
    node.send_keysend = original  # type: ignore[method-assign]
    await run_pass(payouts)
    assert [p.state for p in await world.payouts_of()] == [PayoutState.SUCCEEDED]
    assert len(node.keysends) == 1
    balance = await world.payee()
    assert (balance.paid_msat, balance.accrued_msat) == (12_000, 0)


async def test_a_payout_recorded_but_never_sent_is_failed_after_orphan_after_never_sent(
    world: World,
) -> None:
    """The process died between begin_payout and the send."""
    for _ in range(4):
        await world.earn(10_000)
    preimage = secrets.token_bytes(32)
    orphan = Payout(
        payment_hash=PaymentHash(hashlib.sha256(preimage).digest()),
        payee="carol",
        destination=CAROL,
        payment_request="",
        amount_msat=Msat(12_000),
        fee_reserve_msat=Msat(2_000),
        payee_pays_fee=False,
        state=PayoutState.PENDING,
        created_at=world.clock.now(),
    )
    assert await world.store.begin_payout(orphan)
    assert (await world.payee()).pending_msat == 12_000

    restarted = world.payouts()
    world.clock.advance(ORPHAN_AFTER - 1)
    await run_pass(restarted)
    # Too young: the process that began it may still send it; and carol waits for it.
    assert [p.state for p in await world.payouts_of()] == [PayoutState.PENDING]
    assert world.node.keysends == []

    world.clock.advance(1)
    await restarted.resolve_pending()
    await world.payouts().resolve_pending()
    (resolved,) = await world.payouts_of()
    assert resolved.state is PayoutState.FAILED
    assert resolved.failure == "never sent"
    assert world.node.keysends == []
    assert world.node.payments == {}
    balance = await world.payee()
    assert (balance.pending_msat, balance.accrued_msat) == (0, 12_000)
    await world.reconciles()


class StalledNode(FakePayer):
    """A send that never reaches the node (unless cancelled, which it counts)."""

    def __init__(self) -> None:
        super().__init__()
        self.cancelled = 0

    async def send_keysend(
        self,
        dest: bytes,
        amount_msat: Msat,
        preimage: Preimage,
        *,
        max_fee_msat: Msat,
        payment_timeout: float,
    ) -> Payment:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        raise AssertionError("unreachable")


async def test_a_send_is_cancelled_when_its_window_ends_and_then_failed_by_the_resolver(
    world: World,
) -> None:
    stalled = StalledNode()
    payouts = world.payouts(node=stalled, orphan_after=0.2)  # a window of 0.1 s
    for _ in range(4):
        await world.earn(10_000)
    made = await payouts.pay_now()
    assert [p.state for p in made] == [PayoutState.PENDING]
    assert stalled.cancelled == 1
    world.clock.advance(0.2)
    await world.payouts(node=stalled, orphan_after=0.2).resolve_pending()
    (payout,) = await world.payouts_of()
    assert payout.state is PayoutState.FAILED
    assert (await world.payee()).accrued_msat == 12_000


async def test_a_payout_in_flight_at_a_crash_is_finished_once_and_never_sent_again(
    world: World,
) -> None:
    world.node.hold = asyncio.Event()  # the payment stays in flight
    dying = world.payouts()
    for _ in range(4):
        await world.earn(10_000)
    task = asyncio.create_task(dying.pay_now())
    for _ in range(50):
        await asyncio.sleep(0)
    assert len(world.node.keysends) == 1
    task.cancel()  # the process dies: the node's payment goes on
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await dying.close()
    world.node.hold = None  # the next payments go through at once
    (payout,) = await world.payouts_of()
    assert payout.state is PayoutState.PENDING
    assert world.node.payments[payout.payment_hash].status is PaymentStatus.IN_FLIGHT

    restarted = world.payouts()
    world.clock.advance(ORPHAN_AFTER * 10)
    for _ in range(4):
        await world.earn(10_000)  # carol is due again, but has a payout under way
    await run_pass(restarted)
    assert [p.state for p in await world.payouts_of()] == [PayoutState.PENDING]
    assert await restarted.pay_now() == []
    assert len(world.node.keysends) == 1

    # The node's payment went through.
    in_flight = world.node.payments[payout.payment_hash]
    world.node.payments[payout.payment_hash] = Payment(
        payout.payment_hash, PaymentStatus.SUCCEEDED, in_flight.amount_msat, Msat(50), ()
    )
    await asyncio.gather(restarted.resolve_pending(), world.payouts().resolve_pending())
    await restarted.resolve_pending()
    (first, *later) = await world.payouts_of()
    assert (first.state, first.fee_msat) == (PayoutState.SUCCEEDED, 50)
    balance = await world.payee()
    assert balance.paid_msat == 12_000
    # The first payout's hash was sent once; the next pass pays the rest anew.
    await run_pass(restarted)
    assert len(world.node.keysends) == 2
    assert world.node.keysends[1][1] == 12_000
    assert (await world.payee()).paid_msat == 24_000
    assert later == []
    await world.reconciles()


async def test_a_lost_connection_is_resolved_from_the_node_after_a_restart(world: World) -> None:
    world.node.drop_connection = True  # the node paid; the process never learnt it
    for _ in range(4):
        await world.earn(10_000)
    (payout,) = await world.payouts().pay_now()
    assert payout.state is PayoutState.PENDING
    await world.payouts().resolve_pending()
    (resolved,) = await world.payouts_of()
    assert resolved.state is PayoutState.SUCCEEDED
    assert world.node.paid[payout.payment_hash] == 1
    assert (await world.payee()).paid_msat == 12_000


async def test_a_lightning_address_payee_is_paid_the_invoice_its_service_gives(
    world: World,
) -> None:
    world.node.fee_msat = Msat(7)
    dave = PayeeTerms(name="dave", destination=ADDRESS, threshold_msat=10_000)
    payouts = world.payouts(dave)
    split: Split = (Share("dave", ppm=123_450),)
    await world.earn(100_000, split)  # 12,345 msat: paid as 12 sat

    await run_pass(payouts)

    ((destination, amount, payment_hash),) = world.requests.issued
    assert (destination, amount) == (ADDRESS, 12_000)
    (payout,) = await world.payouts_of("dave")
    assert payout.payment_hash == payment_hash
    assert payout.destination == ADDRESS
    assert bolt11.decode(payout.payment_request).payment_hash == payment_hash
    assert (payout.state, payout.amount_msat, payout.fee_msat) == (PayoutState.SUCCEEDED, 12_000, 7)
    assert world.node.paid[payment_hash] == 1
    assert world.node.keysends == []
    balance = await world.payee("dave")
    assert (balance.paid_msat, balance.accrued_msat) == (12_000, 345)
    await world.reconciles()


async def test_an_lnurl_amount_is_clamped_to_max_sendable_and_waits_for_min_sendable(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    dave = PayeeTerms(name="dave", destination=ADDRESS, threshold_msat=1_000)
    payouts = world.payouts(dave)
    split: Split = (Share("dave", ppm=1_000_000),)
    world.requests.bounds_msat = (5_500, 20_000)
    await world.earn(5_000, split)
    with caplog.at_level(logging.WARNING, logger="gateway.service.payout"):
        for _ in range(3):
            await run_pass(payouts)  # below minSendable: not due
    assert world.requests.issued == []
    warned = [r.getMessage() for r in caplog.records if "below what its service" in r.getMessage()]
    assert warned == [  # once, not on every pass
        "payee dave: 5000 msat accrued is due but below what its service accepts "
        "(5500 to 20000 msat, whole sat); it waits for more"
    ]

    world.requests.bounds_msat = (1_000, 15_500)
    await world.earn(25_000, split)  # 30,000 msat accrued
    await run_pass(payouts)
    await run_pass(payouts)
    assert [amount for _, amount, _ in world.requests.issued] == [15_000, 15_000]
    balance = await world.payee("dave")
    assert (balance.paid_msat, balance.accrued_msat) == (30_000, 0)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("service down", "dave's service: HTTP 503"),
        ("wrong amount", "the service's invoice is for 12001 msat, not 12000 msat"),
        ("repeated invoice", "paid, or tried, before"),
    ],
)
async def test_an_lnurl_service_that_gives_no_usable_invoice_is_backed_off_nothing_moves(
    world: World, case: str, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    dave = PayeeTerms(name="dave", destination=ADDRESS, threshold_msat=10_000)
    split: Split = (Share("dave", ppm=1_000_000),)
    payouts = world.payouts(dave)
    await world.earn(12_000, split)
    if case == "repeated invoice":
        world.requests.repeat = True
        await run_pass(payouts)  # paid once
        await world.earn(12_000, split)
    elif case == "wrong amount":
        world.requests.offset = 1
    else:
        world.requests.fail = "dave's service: HTTP 503"
    paid_before = (await world.payee("dave")).paid_msat

    with caplog.at_level(logging.WARNING, logger="gateway.service.payout"):
        await run_pass(payouts)

    assert reason in caplog.text
    if case != "service down":  # the worker's check failed: the payRequest is dropped
        assert world.requests.forgotten == [ADDRESS]
    balance = await world.payee("dave")
    assert (balance.paid_msat, balance.pending_msat, balance.accrued_msat) == (
        paid_before,
        0,
        12_000,
    )
    world.requests.fail = None
    world.requests.offset = 0
    world.requests.repeat = False
    world.clock.advance(RETRY - 1)
    await run_pass(payouts)
    assert (await world.payee("dave")).paid_msat == paid_before  # backing off
    world.clock.advance(1)
    await run_pass(payouts)
    assert (await world.payee("dave")).paid_msat == paid_before + 12_000


@pytest.mark.parametrize(
    "kind", ["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
async def test_an_invoice_whose_hash_a_payout_recorded_is_refused_and_backed_off(
    world: World,
    caplog: pytest.LogCaptureFixture,
    kind: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """A service repeats an invoice of a payout that FAILED never sent: the node has never
    seen its hash, the store has (``DuplicatePayout``, in every store). Never paid again:
    backed off as a bad invoice."""
    if kind == "sqlite":
        world.store = await SqliteStore.open(tmp_path / "gateway.db", clock=world.clock)
    elif kind == "postgres":
        url = request.getfixturevalue("postgres_url")
        world.store = await PostgresStore.open(url, clock=world.clock)
    try:
        await _repeated_hash_refused(world, caplog)
    finally:
        await world.store.close()


async def _repeated_hash_refused(world: World, caplog: pytest.LogCaptureFixture) -> None:
    dave = PayeeTerms(name="dave", destination=ADDRESS, threshold_msat=10_000)
    split: Split = (Share("dave", ppm=1_000_000),)
    await world.earn(12_000, split)
    payment_hash = PaymentHash(secrets.token_bytes(32))
    text = make_invoice(payment_hash, 12_000, created_at=world.clock.now(), key=CAROL_KEY)
    orphan = Payout(
        payment_hash=payment_hash,
        payee="dave",
        destination=ADDRESS,
        payment_request=text,
        amount_msat=Msat(12_000),
        fee_reserve_msat=Msat(2_000),
        payee_pays_fee=False,
        state=PayoutState.PENDING,
        created_at=world.clock.now(),
    )
    assert await world.store.begin_payout(orphan)
    await world.store.finish_payout(
        payment_hash, PayoutState.FAILED, Msat(0), world.clock.now(), failure="never sent"
    )
    with pytest.raises(errors.DuplicatePayout, match="already recorded"):
        await world.store.begin_payout(orphan)
    world.requests.fixed = text
    payouts = world.payouts(dave)

    with caplog.at_level(logging.WARNING, logger="gateway.service.payout"):
        await run_pass(payouts)
        await run_pass(payouts)  # backing off: not asked again

    assert caplog.text.count("recorded for a payout before: refused; trying again in 10 s") == 1
    assert world.requests.forgotten == [ADDRESS]
    assert world.node.payments == {}
    balance = await world.payee("dave")
    assert (balance.pending_msat, balance.accrued_msat) == (0, 12_000)
    world.requests.fixed = None
    world.clock.advance(RETRY)
    await run_pass(payouts)
    assert (await world.payee("dave")).paid_msat == 12_000


async def test_an_unexpected_error_for_one_payee_backs_it_off_and_pays_the_others(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    dave = PayeeTerms(name="dave", destination=ADDRESS, threshold_msat=1_000)
    split: Split = (Share("carol", ppm=300_000), Share("dave", ppm=100_000))
    payouts = world.payouts(carol(threshold_msat=1_000), dave)
    world.requests.crash = RecursionError("maximum recursion depth exceeded")
    await world.earn(10_000, split)
    with caplog.at_level(logging.ERROR, logger="gateway.service.payout"):
        await run_pass(payouts)
        await world.earn(10_000, split)
        await run_pass(payouts)  # dave backs off: not tried again at once
    failures = [r for r in caplog.records if "failed unexpectedly" in r.getMessage()]
    assert [r.getMessage() for r in failures] == [
        "payee dave: the payout failed unexpectedly; trying again after a backoff"
    ]
    assert [amount for _, amount, _ in world.node.keysends] == [3_000, 3_000]  # carol's
    world.requests.crash = None
    world.clock.advance(RETRY)
    await run_pass(payouts)
    assert (await world.payee("dave")).paid_msat == 2_000


async def test_the_first_pass_warns_of_ledger_payees_no_longer_configured(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    split: Split = (Share("carol", ppm=300_000), Share("erin", ppm=100_000))
    await world.earn(10_000, split)
    payouts = world.payouts(carol(threshold_msat=1_000_000))
    with caplog.at_level(logging.WARNING, logger="gateway.service.payout"):
        await run_pass(payouts)
        await run_pass(payouts)
    warned = [r.getMessage() for r in caplog.records if "no [[payee]]" in r.getMessage()]
    assert warned == [
        "payee erin has 1000 msat accrued but no [[payee]] configures it: not paid until one "
        "does again"
    ]


async def test_pay_now_pays_the_whole_accrued_regardless_of_threshold(world: World) -> None:
    dave = PayeeTerms(name="dave", destination=ADDRESS, threshold_msat=1_000_000)
    payouts = world.payouts(carol(threshold_msat=1_000_000), dave)
    split: Split = (Share("carol", ppm=300_000), Share("dave", fixed_msat=Msat(1_500)))
    await world.earn(10_000, split)
    await run_pass(payouts)
    assert world.node.fee_limits == []  # neither is due

    with pytest.raises(ValueError, match="erin"):
        await payouts.pay_now("erin")
    (only_carol,) = await payouts.pay_now("carol")
    assert (only_carol.payee, only_carol.amount_msat) == ("carol", 3_000)
    assert only_carol.state is PayoutState.SUCCEEDED
    made = await payouts.pay_now()
    assert [(p.payee, p.amount_msat, p.state) for p in made] == [
        ("dave", 1_000, PayoutState.SUCCEEDED)  # whole satoshis: 500 msat stay accrued
    ]
    assert await payouts.pay_now() == []
    assert (await world.payee("dave")).accrued_msat == 500
    await world.reconciles()


async def test_a_payee_is_paid_on_schedule_with_every(world: World) -> None:
    payouts = world.payouts(carol(threshold_msat=1_000_000, every=3600))
    await world.earn(3_000)  # 900 msat: too little for a scheduled payout
    await run_pass(payouts)
    world.clock.advance(3600)
    await run_pass(payouts)
    assert world.node.keysends == []

    await world.earn(1_000)  # 1,200 msat
    await run_pass(payouts)
    assert [amount for _, amount, _ in world.node.keysends] == [1_200]

    await world.earn(10_000)
    world.clock.advance(3599)
    await run_pass(payouts)
    assert len(world.node.keysends) == 1  # an hour after the last payout, not before
    world.clock.advance(1)
    await run_pass(payouts)
    assert [amount for _, amount, _ in world.node.keysends] == [1_200, 3_000]


async def test_a_payee_whose_destination_is_the_gateways_own_node_is_never_paid(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    payouts = world.payouts(carol(destination=NODE_PUBKEY), carol(name="erin"))
    split: Split = (Share("carol", ppm=300_000), Share("erin", ppm=300_000))
    for _ in range(4):
        await world.earn(10_000, split)
    with caplog.at_level(logging.ERROR, logger="gateway.service.payout"):
        await run_pass(payouts)
        with pytest.raises(errors.PayoutDestinationError, match="the gateway's own node"):
            await payouts.pay_now("carol")
    assert "payee carol: its destination is the gateway's own node" in caplog.text
    assert [dest.hex() for dest, _, _ in world.node.keysends] == [CAROL]  # erin's only
    assert (await world.payee("carol")).accrued_msat == 12_000


async def test_payouts_are_logged_without_their_preimage(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.node.fee_msat = Msat(21)
    for _ in range(4):
        await world.earn(10_000)
    with caplog.at_level(logging.DEBUG):
        (payout,) = await world.payouts().pay_now()
    ((_, _, preimage),) = world.node.keysends
    assert preimage.hex() not in caplog.text
    done = [r.getMessage() for r in caplog.records if "SUCCEEDED" in r.getMessage()]
    assert done == [
        f"payout {payout.payment_hash.hex()} to carol SUCCEEDED: 12000 msat, fee 21 msat"
    ]


async def test_run_pays_when_woken_by_a_settlement(world: World) -> None:
    payouts = world.payouts(interval=3600)
    task = asyncio.create_task(payouts.run())
    try:
        await asyncio.sleep(0.01)
        for _ in range(4):
            await world.earn(10_000)
        payouts.wake()
        for _ in range(500):
            if world.node.keysends:
                break
            await asyncio.sleep(0.01)
        assert [amount for _, amount, _ in world.node.keysends] == [12_000]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await payouts.close()


async def test_the_worker_waits_for_an_unreachable_node(world: World) -> None:
    world.node.unavailable = True
    payouts = world.payouts()
    for _ in range(4):
        await world.earn(10_000)
    await run_pass(payouts)
    with pytest.raises(errors.BackendUnavailable):
        await payouts.pay_now()
    world.node.unavailable = False
    await run_pass(payouts)
    assert (await world.payee()).paid_msat == 12_000


class _Call:
    """A SendPaymentV2 call's stream, as grpc.aio gives it."""

    def __init__(self, messages: list[lightning_pb2.Payment]) -> None:
        self.messages = messages

    def __aiter__(self) -> _Call:
        return self

    async def __anext__(self) -> lightning_pb2.Payment:
        if not self.messages:
            raise StopAsyncIteration
        return self.messages.pop(0)

    def cancel(self) -> None:
        pass


class _Router:
    def __init__(self) -> None:
        self.requests: list[router_pb2.SendPaymentRequest] = []

    def SendPaymentV2(self, request: router_pb2.SendPaymentRequest, **_options: object) -> _Call:
        self.requests.append(request)
        return _Call(
            [
                lightning_pb2.Payment(
                    payment_hash=request.payment_hash.hex(),
                    status=lightning_pb2.Payment.SUCCEEDED,
                    value_msat=request.amt_msat,
                    fee_msat=3,
                )
            ]
        )


async def test_the_lnd_client_sends_a_keysend_with_the_preimage_record() -> None:
    client = LndClient.__new__(LndClient)
    router = _Router()
    client._router = router  # type: ignore[assignment]
    client._metadata = ()  # type: ignore[assignment]
    client._timeout = 5.0
    client._host = "fake:10009"
    preimage = Preimage(secrets.token_bytes(32))

    payment = await client.send_keysend(
        bytes.fromhex(CAROL), Msat(12_000), preimage, max_fee_msat=Msat(2_000), payment_timeout=60
    )

    (request,) = router.requests
    assert request.dest == bytes.fromhex(CAROL)
    assert (request.amt_msat, request.fee_limit_msat, request.timeout_seconds) == (
        12_000,
        2_000,
        60,
    )
    assert request.payment_hash == hashlib.sha256(preimage).digest()
    assert dict(request.dest_custom_records) == {KEYSEND_RECORD: preimage}
    assert KEYSEND_RECORD == 5482373484
    assert request.no_inflight_updates
    assert request.payment_request == ""
    assert (payment.status, payment.fee_msat) == (PaymentStatus.SUCCEEDED, 3)
    assert payment.payment_hash == request.payment_hash
