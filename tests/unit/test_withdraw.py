"""Withdrawals over the fake paying node and the memory store: the checks, the order (debit
committed before paying), definite and unknown outcomes, and the resolver after a crash.
The same paths run against real LND in tests/regtest/test_credit_withdraw_regtest.py."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
from pathlib import Path

import pytest

from gateway import errors
from gateway.client import bolt11
from gateway.config import Config, CreditConfig, LndConfig
from gateway.ports import (
    Account,
    InvoiceRecord,
    InvoiceState,
    InvoiceUpdate,
    Msat,
    Payment,
    PaymentHash,
    PaymentStatus,
    Withdrawal,
    WithdrawalState,
)
from gateway.runtime import payer_settings
from gateway.service.decisions import Deny, Refusal
from gateway.service.withdraw import (
    EXPIRY_MARGIN,
    ORPHAN_AFTER,
    WithdrawalOutcome,
    WithdrawalRefusal,
    Withdrawer,
    fee_reserve,
)
from gateway.store import MemoryStore
from tests import bolt11_encode
from tests.fakes import NODE_KEY, FakeClock, FakePayer, make_invoice

HOLDER_KEY = "22" * 32  # the token holder's node, which makes the invoices to withdraw to
CREDIT = 100_000
FEE_MIN = 1_000
FEE_PPM = 5_000


class World:
    """A funded account, the gateway's paying node and a withdrawer over them."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.store = MemoryStore(self.clock)
        self.payer = FakePayer()
        self.token_id = secrets.token_bytes(32)

    def withdrawer(self, payer: FakePayer | None = None, **options: float) -> Withdrawer:
        return Withdrawer(
            store=self.store,
            payer=payer or self.payer,
            decode=bolt11.decode,
            clock=self.clock,
            fee_min_msat=FEE_MIN,
            fee_ppm=FEE_PPM,
            **options,
        )

    async def fund(self, amount_msat: int = CREDIT) -> None:
        """Open the account and settle an invoice that buys ``amount_msat`` of credit."""
        await self.store.open_account(self.token_id, "premium")
        payment_hash = PaymentHash(secrets.token_bytes(32))
        now = self.clock.now()
        await self.store.add_invoice(
            InvoiceRecord(
                payment_hash=payment_hash,
                payment_request="lnbcrt...",
                amount_msat=Msat(amount_msat),
                token_id=self.token_id,
                service="premium",
                method="GET",
                path="/api/premium/fortune",
                state=InvoiceState.OPEN,
                created_at=now,
                expires_at=now + 600,
                add_index=1,
                buys_credit=True,
            )
        )
        await self.store.apply_update(
            InvoiceUpdate(payment_hash, InvoiceState.SETTLED, 1, Msat(amount_msat), now)
        )

    def invoice(
        self,
        amount_msat: int | None,
        *,
        network: str = "regtest",
        created_at: float | None = None,
        expiry: int = 600,
        key: str = HOLDER_KEY,
    ) -> tuple[PaymentHash, str]:
        """A holder's invoice: its payment hash and text."""
        payment_hash = PaymentHash(hashlib.sha256(secrets.token_bytes(32)).digest())
        text = make_invoice(
            payment_hash,
            amount_msat,
            network=network,
            created_at=self.clock.now() if created_at is None else created_at,
            expiry=expiry,
            key=key,
        )
        return payment_hash, text

    async def balance(self) -> int:
        account = await self.store.get_account(self.token_id)
        assert account is not None
        return account.balance_msat

    async def state(self, payment_hash: bytes) -> WithdrawalState:
        (withdrawal,) = [
            w for w in await self.store.list_withdrawals() if w.payment_hash == payment_hash
        ]
        return withdrawal.state

    async def resolved(self, payment_hash: bytes) -> None:
        """Wait (up to 5 s) until the withdrawal is no longer PENDING."""
        for _ in range(500):
            if await self.state(payment_hash) is not WithdrawalState.PENDING:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"withdrawal {payment_hash.hex()} still PENDING")


@pytest.fixture
async def world() -> World:
    world = World()
    await world.fund()
    return world


class StalledPayer(FakePayer):
    """A process that dies between the commit and the payment: the send never reaches the
    node (unless it is cancelled, which it records)."""

    def __init__(self) -> None:
        super().__init__()
        self.cancelled = 0

    async def send_payment(
        self, payment_request: str, *, max_fee_msat: Msat, payment_timeout: float
    ) -> Payment:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        raise AssertionError("unreachable")


class RetryingNodePayer(FakePayer):
    """LND: a hash whose payment FAILED may be paid again. Each lookup takes a round trip;
    the first send fails (no route), a later one succeeds."""

    async def lookup_payment(self, payment_hash: PaymentHash) -> Payment | None:
        known = self.payments.get(payment_hash)
        await asyncio.sleep(0.01)
        return known

    async def send_payment(
        self, payment_request: str, *, max_fee_msat: Msat, payment_timeout: float
    ) -> Payment:
        self.fail_with = None if self.fee_limits else "FAILURE_REASON_NO_ROUTE"
        return await super().send_payment(
            payment_request, max_fee_msat=max_fee_msat, payment_timeout=payment_timeout
        )


class FlakyStore(MemoryStore):
    """A store whose first ``failures`` account reads after a withdrawal begins fail."""

    def __init__(self, clock: FakeClock, failures: int) -> None:
        super().__init__(clock)
        self.failures = failures
        self.failing = False

    async def begin_withdrawal(self, withdrawal: Withdrawal) -> Msat | None:
        self.failing = True
        return await super().begin_withdrawal(withdrawal)

    async def get_account(self, token_id: bytes) -> Account | None:
        if self.failing and self.failures:
            self.failures -= 1
            raise errors.StoreError("database is locked")
        return await super().get_account(token_id)


class StallingStore(MemoryStore):
    """The process stalls (``stall`` seconds on the clock) right after the debit commits."""

    def __init__(self, clock: FakeClock, stall: float) -> None:
        super().__init__(clock)
        self.clock = clock
        self.stall = stall

    async def begin_withdrawal(self, withdrawal: Withdrawal) -> Msat | None:
        balance = await super().begin_withdrawal(withdrawal)
        self.clock.advance(self.stall)
        return balance


def test_the_fee_reserve_is_the_ppm_rounded_up_and_at_least_the_minimum() -> None:
    assert fee_reserve(10_000, FEE_MIN, FEE_PPM) == FEE_MIN
    assert fee_reserve(1_000_000, FEE_MIN, FEE_PPM) == 5_000
    assert fee_reserve(1_000_001, 0, FEE_PPM) == 5_001
    assert fee_reserve(1, 0, 0) == 0


async def test_a_withdrawal_pays_the_invoice_once_with_the_reserve_as_fee_limit(
    world: World,
) -> None:
    world.payer.fee_msat = Msat(300)
    payment_hash, invoice = world.invoice(50_000)

    outcome = await world.withdrawer().withdraw(world.token_id, invoice)

    assert outcome == WithdrawalOutcome(
        WithdrawalState.SUCCEEDED, payment_hash.hex(), 50_000, 300, CREDIT - 50_300
    )
    assert world.payer.paid[payment_hash] == 1
    assert world.payer.fee_limits == [FEE_MIN]
    assert await world.balance() == CREDIT - 50_300
    assert await world.state(payment_hash) is WithdrawalState.SUCCEEDED
    totals = await world.store.credit_totals()
    assert totals.withdrawn_msat == 50_300
    assert totals.outstanding_msat == CREDIT - 50_300


async def test_lightning_prefix_and_whitespace_are_accepted(world: World) -> None:
    payment_hash, invoice = world.invoice(10_000)
    outcome = await world.withdrawer().withdraw(world.token_id, f"  lightning:{invoice}\n")
    assert isinstance(outcome, WithdrawalOutcome)
    assert outcome.state is WithdrawalState.SUCCEEDED
    assert world.payer.paid[payment_hash] == 1


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("garbage", WithdrawalRefusal.NOT_BOLT11),
        ("empty", WithdrawalRefusal.NOT_BOLT11),
        ("bad checksum", WithdrawalRefusal.NOT_BOLT11),
        ("huge", WithdrawalRefusal.NOT_BOLT11),
        ("mainnet", WithdrawalRefusal.OTHER_NETWORK),
        ("testnet", WithdrawalRefusal.OTHER_NETWORK),
        ("expired", WithdrawalRefusal.EXPIRED),
        ("expiring", WithdrawalRefusal.EXPIRED),
        ("amountless", WithdrawalRefusal.AMOUNTLESS),
        ("above balance", WithdrawalRefusal.ABOVE_BALANCE),
        ("reserve above balance", WithdrawalRefusal.ABOVE_BALANCE),
        ("own node", WithdrawalRefusal.OWN_NODE),
    ],
)
async def test_a_bad_invoice_is_refused_with_its_reason_and_nothing_moves(
    world: World, case: str, reason: WithdrawalRefusal
) -> None:
    now = world.clock.now()
    _, good = world.invoice(10_000)
    invoices = {
        "garbage": "hello",
        "empty": "  ",
        "bad checksum": good[:-1] + ("q" if good[-1] != "q" else "p"),
        "huge": "lnbcrt1" + "q" * 9000,
        "mainnet": world.invoice(10_000, network="mainnet")[1],
        "testnet": world.invoice(10_000, network="testnet")[1],
        "expired": world.invoice(10_000, created_at=now - 700, expiry=600)[1],
        "expiring": world.invoice(10_000, expiry=EXPIRY_MARGIN - 1)[1],
        "amountless": world.invoice(None)[1],
        "above balance": world.invoice(CREDIT + 1)[1],
        # The amount alone fits, with the fee reserve it does not.
        "reserve above balance": world.invoice(CREDIT - FEE_MIN + 1)[1],
        "own node": world.invoice(10_000, key=NODE_KEY)[1],
    }

    outcome = await world.withdrawer().withdraw(world.token_id, invoices[case])

    assert isinstance(outcome, Deny)
    assert outcome.status == 400
    assert outcome.reason.startswith(reason)
    assert await world.balance() == CREDIT
    assert await world.store.list_withdrawals() == []
    assert world.payer.fee_limits == []  # nothing sent


async def test_an_invoice_without_a_payment_secret_gets_400_and_nothing_is_debited(
    world: World,
) -> None:
    """LND pays no invoice without a payment secret (``s``): refused before the debit, not
    debited, refused by the node and FAILED."""
    payment_hash = hashlib.sha256(secrets.token_bytes(32)).digest()
    data = bolt11_encode.int_words(int(world.clock.now()), 7)
    data += bolt11_encode.field("p", bolt11_encode.words_of(payment_hash))
    data += bolt11_encode.field("d", bolt11_encode.words_of(b"withdrawal"))
    data += bolt11_encode.field("x", bolt11_encode.int_words(600))
    data += bolt11_encode.field("c", bolt11_encode.int_words(80))
    invoice = bolt11_encode.sign("lnbcrt100n", data, HOLDER_KEY)  # 10,000 msat
    assert bolt11.decode(invoice).amount_msat == 10_000

    outcome = await world.withdrawer().withdraw(world.token_id, invoice)

    assert isinstance(outcome, Deny)
    assert outcome.status == 400
    assert outcome.reason == "the invoice has no payment secret (LND will not pay it)"
    assert outcome == Deny(400, WithdrawalRefusal.SECRETLESS)
    assert await world.balance() == CREDIT
    assert await world.store.list_withdrawals() == []
    assert world.payer.fee_limits == []  # nothing sent


async def test_the_refusals_name_the_networks_and_the_amounts(world: World) -> None:
    withdrawer = world.withdrawer()
    other = await withdrawer.withdraw(world.token_id, world.invoice(1_000, network="mainnet")[1])
    assert isinstance(other, Deny)
    assert other.reason == f"{WithdrawalRefusal.OTHER_NETWORK} (mainnet; the node is on regtest)"
    above = await withdrawer.withdraw(world.token_id, world.invoice(CREDIT)[1])
    assert isinstance(above, Deny)
    assert above.reason == (
        f"{WithdrawalRefusal.ABOVE_BALANCE} ({CREDIT} + {FEE_MIN} msat > {CREDIT} msat)"
    )


async def test_an_invoice_may_be_withdrawn_to_up_to_the_whole_balance(world: World) -> None:
    payment_hash, invoice = world.invoice(CREDIT - FEE_MIN)
    outcome = await world.withdrawer().withdraw(world.token_id, invoice)
    assert isinstance(outcome, WithdrawalOutcome)
    assert outcome.state is WithdrawalState.SUCCEEDED
    assert outcome.balance_msat == FEE_MIN  # the unused fee reserve came back
    assert world.payer.paid[payment_hash] == 1


async def test_a_token_without_an_account_gets_404(world: World) -> None:
    outcome = await world.withdrawer().withdraw(secrets.token_bytes(32), world.invoice(1_000)[1])
    assert outcome == Deny(404, WithdrawalRefusal.NO_ACCOUNT)


async def test_an_invoice_paid_before_is_refused(world: World) -> None:
    payment_hash, invoice = world.invoice(10_000)
    withdrawer = world.withdrawer()
    first = await withdrawer.withdraw(world.token_id, invoice)
    assert isinstance(first, WithdrawalOutcome)
    again = await withdrawer.withdraw(world.token_id, invoice)
    assert again == Deny(400, WithdrawalRefusal.ALREADY_PAID)
    assert world.payer.paid[payment_hash] == 1
    assert await world.balance() == CREDIT - 10_000


async def test_the_same_invoice_twice_at_once_is_paid_once(world: World) -> None:
    payment_hash, invoice = world.invoice(10_000)
    withdrawer = world.withdrawer()
    outcomes = await asyncio.gather(
        withdrawer.withdraw(world.token_id, invoice), withdrawer.withdraw(world.token_id, invoice)
    )
    assert Deny(400, WithdrawalRefusal.ALREADY_PAID) in outcomes
    assert world.payer.paid[payment_hash] == 1
    assert await world.balance() == CREDIT - 10_000


async def test_two_withdrawals_at_once_never_take_more_than_the_balance(world: World) -> None:
    withdrawer = world.withdrawer()
    amount = CREDIT // 2
    outcomes = await asyncio.gather(
        withdrawer.withdraw(world.token_id, world.invoice(amount)[1]),
        withdrawer.withdraw(world.token_id, world.invoice(amount)[1]),
    )
    assert sum(isinstance(o, WithdrawalOutcome) for o in outcomes) == 1
    assert any(
        isinstance(o, Deny) and o.reason.startswith(WithdrawalRefusal.ABOVE_BALANCE)
        for o in outcomes
    )
    assert sum(world.payer.paid.values()) == 1
    assert await world.balance() == CREDIT - amount


async def test_a_failed_payment_gives_the_balance_back(world: World) -> None:
    world.payer.fail_with = "FAILURE_REASON_NO_ROUTE"
    payment_hash, invoice = world.invoice(10_000)
    outcome = await world.withdrawer().withdraw(world.token_id, invoice)
    assert outcome == WithdrawalOutcome(
        WithdrawalState.FAILED, payment_hash.hex(), 10_000, 0, CREDIT
    )
    assert await world.state(payment_hash) is WithdrawalState.FAILED
    assert world.payer.paid[payment_hash] == 0


@pytest.mark.parametrize(
    "error",
    [
        errors.BackendBadRequest("invalid payment request"),
        errors.BackendBadRequest("payment request must contain either a payment address or"),
        errors.BackendPermissionDenied("permission denied"),
    ],
)
async def test_a_payment_the_node_refuses_to_start_fails(
    world: World, error: errors.BackendError
) -> None:
    world.payer.refuse = error
    _, invoice = world.invoice(10_000)
    outcome = await world.withdrawer().withdraw(world.token_id, invoice)
    assert isinstance(outcome, WithdrawalOutcome)
    assert outcome.state is WithdrawalState.FAILED
    assert await world.balance() == CREDIT


@pytest.mark.parametrize(
    "error",
    [
        # LND's answer when it has a payment of that hash in flight or paid
        errors.InvoiceAlreadyExists("payment is in transition"),
        errors.BackendUnavailable("connection reset"),  # it may have reached the node
        # A stream lost after the node took the payment, before it recorded it: a lookup at
        # once finds nothing, and the payment goes through all the same.
        errors.BackendError("Stream removed"),
        errors.BackendError("an answer nobody classified"),
    ],
)
async def test_an_error_that_is_no_definite_failure_leaves_it_pending(
    world: World, error: errors.BackendError
) -> None:
    world.payer.refuse = error
    payment_hash, invoice = world.invoice(10_000)
    outcome = await world.withdrawer().withdraw(world.token_id, invoice)
    assert isinstance(outcome, WithdrawalOutcome)
    assert outcome.state is WithdrawalState.PENDING
    assert outcome.balance_msat == CREDIT - 10_000 - FEE_MIN
    assert await world.state(payment_hash) is WithdrawalState.PENDING


class RacedPayer(FakePayer):
    """Another process's payment of the hash reaches the node just before this one's, which
    the node refuses with an error that does not say why."""

    async def send_payment(
        self, payment_request: str, *, max_fee_msat: Msat, payment_timeout: float
    ) -> Payment:
        payment_hash = PaymentHash(bolt11.decode(payment_request).payment_hash)
        self.payments[payment_hash] = Payment(
            payment_hash, PaymentStatus.IN_FLIGHT, Msat(0), Msat(0), ()
        )
        raise errors.BackendError("payment is in transition")


async def test_a_refusal_is_no_failure_while_the_node_has_a_payment_of_the_hash(
    world: World,
) -> None:
    payment_hash, invoice = world.invoice(10_000)
    outcome = await world.withdrawer(RacedPayer()).withdraw(world.token_id, invoice)
    assert isinstance(outcome, WithdrawalOutcome)
    assert outcome.state is WithdrawalState.PENDING
    assert await world.state(payment_hash) is WithdrawalState.PENDING


async def test_a_slow_payment_answers_pending_and_finishes_in_the_background(
    world: World,
) -> None:
    world.payer.hold = asyncio.Event()
    payment_hash, invoice = world.invoice(10_000)
    withdrawer = world.withdrawer(wait_seconds=0.01)

    outcome = await withdrawer.withdraw(world.token_id, invoice)

    assert outcome == WithdrawalOutcome(
        WithdrawalState.PENDING, payment_hash.hex(), 10_000, 0, CREDIT - 11_000
    )
    # The resolver leaves alone what this process is paying.
    world.clock.advance(ORPHAN_AFTER + 1)
    await withdrawer.resolve_pending()
    assert await world.state(payment_hash) is WithdrawalState.PENDING
    world.payer.hold.set()
    await world.resolved(payment_hash)
    assert await world.state(payment_hash) is WithdrawalState.SUCCEEDED
    assert world.payer.paid[payment_hash] == 1
    assert await world.balance() == CREDIT - 10_000


async def test_a_lost_connection_is_resolved_from_the_node_after_a_restart(world: World) -> None:
    world.payer.drop_connection = True  # the node paid; the process never learnt it
    payment_hash, invoice = world.invoice(10_000)
    outcome = await world.withdrawer().withdraw(world.token_id, invoice)
    assert isinstance(outcome, WithdrawalOutcome)
    assert outcome.state is WithdrawalState.PENDING

    await world.withdrawer().resolve_pending()  # a fresh process's resolver

    assert await world.state(payment_hash) is WithdrawalState.SUCCEEDED
    assert world.payer.paid[payment_hash] == 1
    assert await world.balance() == CREDIT - 10_000


async def test_a_crash_before_the_payment_is_sent_is_failed_by_the_resolver_never_sent(
    world: World,
) -> None:
    stalled = StalledPayer()
    dying = world.withdrawer(stalled, wait_seconds=0.01)
    payment_hash, invoice = world.invoice(10_000)
    outcome = await dying.withdraw(world.token_id, invoice)
    assert isinstance(outcome, WithdrawalOutcome)
    assert outcome.state is WithdrawalState.PENDING
    await dying.close()  # the process is gone; the debit and the PENDING row are committed

    resolver = world.withdrawer()
    world.clock.advance(ORPHAN_AFTER - 1)
    await resolver.resolve_pending()
    # Too young: the process that began it may still send it, within its send window.
    assert await world.state(payment_hash) is WithdrawalState.PENDING
    assert await world.balance() == CREDIT - 11_000

    world.clock.advance(1)
    await resolver.resolve_pending()
    await resolver.resolve_pending()
    await world.withdrawer().resolve_pending()

    assert await world.state(payment_hash) is WithdrawalState.FAILED
    assert world.payer.fee_limits == []  # never sent
    assert world.payer.payments == {}
    assert await world.balance() == CREDIT
    totals = await world.store.credit_totals()
    assert (totals.withdrawn_msat, totals.pending_withdrawals_msat) == (0, 0)
    # Its invoice is refused from now on: a payment of it now could not be told apart.
    again = await world.withdrawer().withdraw(world.token_id, invoice)
    assert again == Deny(400, WithdrawalRefusal.ALREADY_PAID)
    assert world.payer.fee_limits == []


async def test_two_resolvers_never_get_an_orphan_both_refunded_and_paid(world: World) -> None:
    """Two processes' resolvers find the same withdrawal the node never saw. Were each to
    send it, the node (which pays a hash again after a FAILED attempt) could fail one send
    and pay the other: paid, and refunded by the FAILED one."""
    payer = RetryingNodePayer()
    first, second = world.withdrawer(payer), world.withdrawer(payer)
    payment_hash, invoice = world.invoice(50_000)
    checked = await first._check(world.token_id, invoice)
    assert isinstance(checked, Withdrawal)
    await world.store.begin_withdrawal(checked)  # and its process dies before sending
    world.clock.advance(ORPHAN_AFTER + 1)

    await asyncio.gather(first.resolve_pending(), second.resolve_pending())

    assert await world.state(payment_hash) is WithdrawalState.FAILED
    assert payer.paid[payment_hash] == 0
    assert payer.fee_limits == []  # neither sent it
    assert await world.balance() == CREDIT


async def test_a_send_is_cancelled_when_its_window_ends_and_then_failed_by_the_resolver(
    world: World,
) -> None:
    """The send window is half of orphan_after: a send that has not reached the node by
    then never will, so a resolver may finish it FAILED later."""
    stalled = StalledPayer()
    withdrawer = world.withdrawer(stalled, orphan_after=0.2)  # a window of 0.1 s
    payment_hash, invoice = world.invoice(10_000)

    outcome = await withdrawer.withdraw(world.token_id, invoice)

    assert isinstance(outcome, WithdrawalOutcome)
    assert outcome.state is WithdrawalState.PENDING
    assert stalled.cancelled == 1
    world.clock.advance(0.2)
    await world.withdrawer(stalled, orphan_after=0.2).resolve_pending()
    assert await world.state(payment_hash) is WithdrawalState.FAILED
    assert await world.balance() == CREDIT


async def test_a_withdrawal_past_its_send_window_before_sending_fails_unsent() -> None:
    world = World()
    world.store = StallingStore(world.clock, stall=ORPHAN_AFTER / 2)
    await world.fund()
    payment_hash, invoice = world.invoice(10_000)

    outcome = await world.withdrawer().withdraw(world.token_id, invoice)

    assert outcome == WithdrawalOutcome(
        WithdrawalState.FAILED, payment_hash.hex(), 10_000, 0, CREDIT
    )
    assert world.payer.fee_limits == []
    assert await world.state(payment_hash) is WithdrawalState.FAILED


@pytest.mark.parametrize(("failures", "fee"), [(1, 0), (2, 0), (1, 300), (2, 300)])
async def test_a_recorded_outcome_is_answered_final_when_the_balance_read_fails(
    failures: int, fee: int
) -> None:
    """Once the outcome is recorded, a failing balance read never turns it into PENDING:
    the balance is read again, or (the store failing twice) the balance while PENDING plus
    what finishing gave back."""
    world = World()
    world.store = FlakyStore(world.clock, failures)
    await world.fund()
    world.payer.fee_msat = Msat(fee)
    world.payer.fail_with = None if fee else "FAILURE_REASON_NO_ROUTE"
    state = WithdrawalState.SUCCEEDED if fee else WithdrawalState.FAILED
    payment_hash, invoice = world.invoice(10_000)

    outcome = await world.withdrawer().withdraw(world.token_id, invoice)

    expected = CREDIT - 10_000 - fee if fee else CREDIT
    assert outcome == WithdrawalOutcome(state, payment_hash.hex(), 10_000, fee, expected)
    assert await world.state(payment_hash) is state


async def test_an_unexpected_error_on_one_withdrawal_does_not_stop_the_others(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.payer.drop_connection = True  # all paid; the process never learnt it
    hashes = []
    for _ in range(3):
        payment_hash, invoice = world.invoice(10_000)
        await world.withdrawer().withdraw(world.token_id, invoice)
        hashes.append(payment_hash)
    broken = hashes[1]
    lookup = world.payer.lookup_payment

    async def lookup_failing_on_one(payment_hash: PaymentHash) -> Payment | None:
        if payment_hash == broken:
            raise RuntimeError("unexpected")
        return await lookup(payment_hash)

    world.payer.lookup_payment = lookup_failing_on_one  # type: ignore[method-assign]

    with caplog.at_level(logging.ERROR, logger="gateway.service.withdraw"):
        await world.withdrawer().resolve_pending()

    states = [await world.state(payment_hash) for payment_hash in hashes]
    assert states == [WithdrawalState.SUCCEEDED, WithdrawalState.PENDING, WithdrawalState.SUCCEEDED]
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert broken.hex() in record.getMessage()
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], RuntimeError)


@pytest.mark.parametrize("status", [PaymentStatus.IN_FLIGHT, PaymentStatus.INITIATED])
async def test_the_resolver_waits_while_the_payment_is_in_flight(
    world: World, status: PaymentStatus
) -> None:
    world.payer.drop_connection = True
    payment_hash, invoice = world.invoice(10_000)
    await world.withdrawer().withdraw(world.token_id, invoice)
    paid = world.payer.payments[payment_hash]
    world.payer.payments[payment_hash] = Payment(
        paid.payment_hash, status, paid.amount_msat, Msat(0), ()
    )
    world.clock.advance(ORPHAN_AFTER * 10)
    world.payer.drop_connection = False

    resolver = world.withdrawer()
    await resolver.resolve_pending()
    assert await world.state(payment_hash) is WithdrawalState.PENDING
    assert world.payer.paid[payment_hash] == 1  # not sent again

    world.payer.payments[payment_hash] = paid  # it went through
    await resolver.resolve_pending()
    assert await world.state(payment_hash) is WithdrawalState.SUCCEEDED
    assert await world.balance() == CREDIT - 10_000


async def test_a_payment_that_failed_while_the_gateway_was_down_is_never_sent_again(
    world: World,
) -> None:
    world.payer.refuse = errors.BackendUnavailable("connection reset")
    payment_hash, invoice = world.invoice(10_000)
    await world.withdrawer().withdraw(world.token_id, invoice)
    world.payer.refuse = None
    # What the node knows: it tried, and the payment failed.
    world.payer.payments[payment_hash] = Payment(
        payment_hash, PaymentStatus.FAILED, Msat(10_000), Msat(0), ()
    )
    world.clock.advance(ORPHAN_AFTER * 10)

    await world.withdrawer().resolve_pending()

    assert await world.state(payment_hash) is WithdrawalState.FAILED
    assert world.payer.fee_limits == []  # no payment was sent
    assert await world.balance() == CREDIT


async def test_an_unreachable_node_gets_503_and_nothing_is_debited(world: World) -> None:
    world.payer.unavailable = True
    outcome = await world.withdrawer().withdraw(world.token_id, world.invoice(10_000)[1])
    assert outcome == Deny(503, Refusal.NODE_UNAVAILABLE, retry_after=5)
    assert await world.balance() == CREDIT


async def test_the_resolver_task_resolves_and_survives_an_unreachable_node(world: World) -> None:
    world.payer.drop_connection = True
    payment_hash, invoice = world.invoice(10_000)
    await world.withdrawer().withdraw(world.token_id, invoice)
    world.payer.unavailable = True
    resolver = world.withdrawer(resolve_interval=0.01)
    task = asyncio.create_task(resolver.run())
    try:
        await asyncio.sleep(0.05)
        assert await world.state(payment_hash) is WithdrawalState.PENDING
        world.payer.unavailable = False
        await world.resolved(payment_hash)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert await world.state(payment_hash) is WithdrawalState.SUCCEEDED
    assert world.payer.paid[payment_hash] == 1


def test_the_payer_connection_is_read_only_with_withdrawals_on(tmp_path: Path) -> None:
    cert = tmp_path / "tls.cert"
    cert.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    macaroon = tmp_path / "payment.macaroon"
    lnd = LndConfig(tls_cert=cert, macaroon_hex="0201")
    missing = CreditConfig(withdrawals=True, payment_macaroon=macaroon)
    assert payer_settings(Config(lnd=lnd, credit=CreditConfig(payment_macaroon=macaroon))) is None
    with pytest.raises(errors.ConfigError, match=r"\[credit\] cannot read .*payment.macaroon"):
        payer_settings(Config(lnd=lnd, credit=missing))
    macaroon.write_bytes(b"\x02\x01")
    settings = payer_settings(Config(lnd=lnd, credit=missing))
    assert settings is not None
    assert (settings.host, settings.macaroon) == (lnd.host, b"\x02\x01")
