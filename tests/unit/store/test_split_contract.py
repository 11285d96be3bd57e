"""The revenue split part of the ``Store`` contract (the ledger written with settlements and
charges, payouts, the payees' totals), run against every implementation (memory, SQLite in
tmp_path, PostgreSQL); at the end, what only the SQL stores promise: debits from several
stores on one database, and migrations that keep the data of the schema before."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from gateway.errors import DuplicatePayout
from gateway.ports import (
    InvoiceRecord,
    InvoiceState,
    InvoiceUpdate,
    Msat,
    PayeeBalance,
    PaymentHash,
    Payout,
    PayoutState,
    Share,
    Split,
    SplitTotals,
    Store,
)
from gateway.store import (
    PostgresStore,
    SqliteStore,
    StoreClosed,
    StoreError,
    postgres_schema,
    sqlite_file,
)
from tests.fakes import NOW, FakeClock
from tests.unit.store.test_sqlite_store import user_version

PENDING, SUCCEEDED, FAILED = PayoutState.PENDING, PayoutState.SUCCEEDED, PayoutState.FAILED
START = NOW  # where the shared clock starts
FAR_FUTURE = 1e12
TOKEN = hashlib.sha256(b"split token").digest()
CAROL_30 = (Share("carol", 300_000),)
CAROL_AND_DAVE = (Share("carol", 300_000), Share("dave", fixed_msat=Msat(1000)))
ZERO = Msat(0)


def payment_hash(n: int) -> PaymentHash:
    return PaymentHash(hashlib.sha256(b"split invoice %d" % n).digest())


def invoice(n: int, split: Split = CAROL_30, **changes: object) -> InvoiceRecord:
    record = InvoiceRecord(
        payment_hash=payment_hash(n),
        payment_request=f"lnbcrt{n}n1split",
        amount_msat=Msat(10_000),
        token_id=hashlib.sha256(b"token %d" % n).digest(),
        service="weather",
        method="GET",
        path="/forecast",
        state=InvoiceState.OPEN,
        created_at=START + n,
        expires_at=START + 600 + n,
        add_index=n + 1,
        split=split,
    )
    return dataclasses.replace(record, **changes)  # type: ignore[arg-type]


def settled(
    n: int, paid: int = 10_000, state: InvoiceState = InvoiceState.SETTLED
) -> InvoiceUpdate:
    return InvoiceUpdate(payment_hash(n), state, n + 1, Msat(paid), START + 10 + n)


async def earn(store: Store, n: int, paid: int = 10_000, split: Split = CAROL_30) -> None:
    """A settled payment of ``paid`` on a route with ``split``."""
    await store.add_invoice(invoice(n, split, amount_msat=Msat(paid)))
    await store.apply_update(settled(n, paid))


def payout(
    n: int,
    amount: int,
    fee_reserve: int = 100,
    *,
    payee: str = "carol",
    payee_pays_fee: bool = False,
    created_at: float = START,
) -> Payout:
    return Payout(
        payment_hash=PaymentHash(hashlib.sha256(b"payout %d" % n).digest()),
        payee=payee,
        destination="02" + "ab" * 32,
        payment_request="",
        amount_msat=Msat(amount),
        fee_reserve_msat=Msat(fee_reserve),
        payee_pays_fee=payee_pays_fee,
        state=PENDING,
        created_at=created_at,
    )


async def payee(store: Store, name: str = "carol") -> PayeeBalance:
    got = await store.get_payee(name)
    assert got is not None
    return got


def amounts(balance: PayeeBalance) -> tuple[int, int, int, int, int, int]:
    """earned, paid, fees, pending, merchant fees, accrued."""
    return (
        balance.earned_msat,
        balance.paid_msat,
        balance.fees_msat,
        balance.pending_msat,
        balance.merchant_fees_msat,
        balance.accrued_msat,
    )


def nothing() -> SplitTotals:
    return SplitTotals(ZERO, ZERO, ZERO, ZERO, ZERO, ZERO, ZERO, ZERO)


async def reconciled(store: Store) -> SplitTotals:
    """The totals, checked: their identities hold and they are the payees' sums."""
    totals = await store.split_totals()
    assert totals.received_msat == totals.kept_msat + totals.earned_msat
    assert totals.earned_msat == (
        totals.paid_msat + totals.payee_fees_msat + totals.pending_msat + totals.accrued_msat
    )
    payees = await store.list_payees()
    assert totals.earned_msat == sum(p.earned_msat for p in payees)
    assert totals.accrued_msat == sum(p.accrued_msat for p in payees)
    assert totals.merchant_fees_msat == sum(p.merchant_fees_msat for p in payees)
    return totals


async def payout_events(store: Store) -> list[tuple[str, str, dict[str, object]]]:
    return [
        (event.type, event.resource, json.loads(event.payload)["data"])
        for event in await store.list_webhook_events(limit=1000)
        if event.type.startswith("payout.")
    ]


# --- the split kept with its invoice ---------------------------------------------------------


async def test_an_invoice_keeps_its_split(store: Store) -> None:
    await store.add_invoice(invoice(1, CAROL_AND_DAVE))
    await store.add_invoice(invoice(2, ()))
    assert await store.get_invoice(payment_hash(1)) == invoice(1, CAROL_AND_DAVE)
    assert [record.split for record in await store.list_invoices()] == [(), CAROL_AND_DAVE]
    got = await store.apply_update(settled(1))
    assert got is not None
    assert got.split == CAROL_AND_DAVE


# --- the ledger written with settlements -----------------------------------------------------


async def test_a_settlement_credits_each_share_once(store: Store, clock: FakeClock) -> None:
    assert await store.list_payees() == []
    assert await store.split_totals() == nothing()
    await store.add_invoice(invoice(1, CAROL_AND_DAVE))
    await store.apply_update(settled(1, paid=0, state=InvoiceState.ACCEPTED))
    assert await store.list_payees() == []  # held, not yet paid

    await store.apply_update(settled(1, paid=10_001))
    # replays of every kind: the watcher, strict verification, a restart's catch-up
    for state in InvoiceState:
        clock.current += 1
        await store.apply_update(settled(1, paid=99_999, state=state))

    assert await store.list_payees() == [
        PayeeBalance("carol", Msat(3000), ZERO, ZERO, ZERO, ZERO, None),
        PayeeBalance("dave", Msat(1000), ZERO, ZERO, ZERO, ZERO, None),
    ]
    totals = await reconciled(store)
    assert (totals.received_msat, totals.kept_msat, totals.earned_msat) == (10_001, 6001, 4000)
    assert totals.accrued_msat == 4000


async def test_settlements_racing_split_once(store: Store) -> None:
    await store.add_invoice(invoice(1))
    await asyncio.gather(*(store.apply_update(settled(1)) for _ in range(20)))
    assert amounts(await payee(store)) == (3000, 0, 0, 0, 0, 3000)
    assert (await store.split_totals()).received_msat == 10_000


async def test_the_invoice_amount_is_split_when_no_amount_paid_is_reported(
    store: Store,
) -> None:
    await store.add_invoice(invoice(1, amount_msat=Msat(7000)))
    await store.apply_update(settled(1, paid=0))
    assert (await payee(store)).earned_msat == 2100
    assert (await store.split_totals()).received_msat == 7000


async def test_shares_add_up_over_payments(store: Store) -> None:
    for n in range(1, 6):
        await earn(store, n, paid=10_000 + n)
    # floor(10_00n * 0.3) each: 3000 three times, then 3001 twice
    assert (await payee(store)).earned_msat == 15_002
    totals = await reconciled(store)
    assert (totals.received_msat, totals.kept_msat) == (50_015, 35_013)


@pytest.mark.parametrize(
    "state", [InvoiceState.CANCELED, InvoiceState.EXPIRED, InvoiceState.ACCEPTED]
)
async def test_an_unpaid_invoice_splits_nothing(store: Store, state: InvoiceState) -> None:
    await store.add_invoice(invoice(1))
    await store.apply_update(settled(1, paid=0, state=state))
    assert await store.list_payees() == []
    assert await store.split_totals() == nothing()


async def test_an_invoice_without_a_split_writes_nothing_to_the_ledger(store: Store) -> None:
    await earn(store, 1, split=())
    assert await store.list_payees() == []
    assert await store.split_totals() == nothing()


async def test_the_merchant_keeps_the_rest_and_a_share_of_nothing_makes_no_row(
    store: Store,
) -> None:
    split = (Share("carol", fixed_msat=Msat(700)), Share("dave", 500_000))
    await earn(store, 1, paid=500, split=split)  # carol's fixed share takes it all
    assert [p.payee for p in await store.list_payees()] == ["carol"]
    assert await store.get_payee("dave") is None
    await earn(store, 2, paid=1501, split=split)  # 700 + floor(750.5): 51 and the .5 kept
    assert [amounts(p)[0] for p in await store.list_payees()] == [1200, 750]
    totals = await reconciled(store)
    assert (totals.received_msat, totals.kept_msat) == (2001, 51)
    await earn(store, 3, paid=999, split=(Share("erin", 1000),))  # 0.999 msat: nothing
    assert await store.get_payee("erin") is None
    totals = await reconciled(store)
    assert (totals.received_msat, totals.kept_msat) == (3000, 1050)


async def test_a_credit_purchase_is_not_split_when_it_settles(store: Store) -> None:
    await store.open_account(TOKEN, "weather")
    await store.add_invoice(invoice(1, token_id=TOKEN, buys_credit=True))
    await store.apply_update(settled(1))
    assert await store.list_payees() == []
    assert await store.split_totals() == nothing()
    account = await store.get_account(TOKEN)
    assert account is not None
    assert account.balance_msat == 10_000


async def charge(store: Store, charged: int, split: Split = CAROL_30, held: int = 5000) -> int:
    """Reserve ``held`` of TOKEN's balance and charge ``charged`` of it; the reservation id."""
    reserved = await store.reserve(TOKEN, Msat(held), FAR_FUTURE)
    assert reserved.reservation is not None
    reservation_id = reserved.reservation.reservation_id
    balance = await store.settle_reservation(
        reservation_id, Msat(charged), "GET", "/forecast", split=split
    )
    assert balance is not None
    return reservation_id


async def test_a_charge_to_credit_is_split(store: Store) -> None:
    await store.open_account(TOKEN, "weather")
    await store.add_invoice(invoice(1, token_id=TOKEN, buys_credit=True, amount_msat=Msat(20_000)))
    await store.apply_update(settled(1, paid=20_000))
    reservation_id = await charge(store, 1001, CAROL_AND_DAVE)
    await charge(store, 0, CAROL_AND_DAVE)  # a release: nothing charged, nothing split
    await charge(store, 2000, ())  # a route without a split
    assert amounts(await payee(store)) == (300, 0, 0, 0, 0, 300)
    assert amounts(await payee(store, "dave")) == (701, 0, 0, 0, 0, 701)
    totals = await reconciled(store)
    assert (totals.received_msat, totals.kept_msat) == (1001, 0)
    # the reservation is gone: settling it again changes nothing
    again = await store.settle_reservation(
        reservation_id, Msat(1001), "GET", "/forecast", split=CAROL_AND_DAVE
    )
    assert again is None
    assert (await store.split_totals()) == totals
    account = await store.get_account(TOKEN)
    assert account is not None
    assert account.spent_msat == 3001


async def test_a_refused_charge_splits_nothing(store: Store) -> None:
    await store.open_account(TOKEN, "weather")
    await store.add_invoice(invoice(1, token_id=TOKEN, buys_credit=True))
    await store.apply_update(settled(1))
    reserved = await store.reserve(TOKEN, Msat(100), FAR_FUTURE)
    assert reserved.reservation is not None
    with pytest.raises(ValueError, match="above"):
        await store.settle_reservation(
            reserved.reservation.reservation_id, Msat(101), "GET", "/", split=CAROL_30
        )
    assert await store.split_totals() == nothing()


# --- payouts ---------------------------------------------------------------------------------


async def test_a_payout_moves_its_debit_to_pending(store: Store) -> None:
    await earn(store, 1)
    assert await store.begin_payout(payout(1, 2000, payee_pays_fee=False))
    assert amounts(await payee(store)) == (3000, 0, 0, 2000, 0, 1000)
    assert await store.begin_payout(payout(2, 800, fee_reserve=200, payee_pays_fee=True))
    assert amounts(await payee(store)) == (3000, 0, 0, 3000, 0, 0)
    assert [p.payment_hash for p in await store.list_payouts(state=PENDING)] == [
        payout(2, 0).payment_hash,
        payout(1, 0).payment_hash,
    ]
    assert await store.list_payouts() == [
        payout(2, 800, fee_reserve=200, payee_pays_fee=True),
        payout(1, 2000),
    ]
    await reconciled(store)


async def test_a_payout_above_the_accrued_is_refused_and_writes_nothing(store: Store) -> None:
    await earn(store, 1)
    assert not await store.begin_payout(payout(1, 3001))
    # the fee reserve counts when the payee pays the fee, not otherwise
    assert not await store.begin_payout(payout(2, 2901, fee_reserve=100, payee_pays_fee=True))
    assert not await store.begin_payout(payout(3, 1, payee="nobody"))
    assert amounts(await payee(store)) == (3000, 0, 0, 0, 0, 3000)
    assert await store.list_payouts() == []
    assert await store.begin_payout(payout(4, 3000, fee_reserve=100_000))
    assert (await payee(store)).accrued_msat == 0


async def test_a_duplicate_payout_hash_raises_and_writes_nothing(store: Store) -> None:
    await earn(store, 1)
    assert await store.begin_payout(payout(1, 1000))
    with pytest.raises(DuplicatePayout, match="already recorded"):
        await store.begin_payout(payout(1, 500))
    await store.finish_payout(payout(1, 0).payment_hash, FAILED, ZERO, START + 1, "no route")
    with pytest.raises(DuplicatePayout, match="already recorded"):  # never sent again, even failed
        await store.begin_payout(payout(1, 500))
    assert amounts(await payee(store)) == (3000, 0, 0, 0, 0, 3000)
    assert len(await store.list_payouts()) == 1


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"state": SUCCEEDED}, "begins PENDING"),
        ({"payee": ""}, "names its payee"),
        ({"amount_msat": ZERO}, "at least 1 msat"),
        ({"fee_reserve_msat": Msat(-1)}, "fee_reserve_msat"),
    ],
)
async def test_a_bad_payout_is_refused(
    store: Store, changes: dict[str, object], reason: str
) -> None:
    await earn(store, 1)
    with pytest.raises(ValueError, match=reason):
        await store.begin_payout(dataclasses.replace(payout(1, 100), **changes))  # type: ignore[arg-type]
    assert await store.list_payouts() == []


@pytest.mark.parametrize("payee_pays_fee", [False, True])
async def test_a_succeeded_payout_is_paid_and_its_fee_borne_by_whom_the_terms_say(
    store: Store, payee_pays_fee: bool
) -> None:
    await earn(store, 1)
    started = payout(1, 2000, fee_reserve=300, payee_pays_fee=payee_pays_fee)
    assert await store.begin_payout(started)
    done = await store.finish_payout(started.payment_hash, SUCCEEDED, Msat(120), START + 5)
    assert done == dataclasses.replace(
        started, state=SUCCEEDED, fee_msat=Msat(120), resolved_at=START + 5
    )
    if payee_pays_fee:  # the unused reserve is accrued again
        assert amounts(await payee(store)) == (3000, 2000, 120, 0, 0, 880)
    else:
        assert amounts(await payee(store)) == (3000, 2000, 0, 0, 120, 1000)
    assert (await payee(store)).last_payout_at == START
    totals = await reconciled(store)
    assert (totals.paid_msat, totals.pending_msat) == (2000, 0)
    assert (totals.payee_fees_msat, totals.merchant_fees_msat) == (
        (120, 0) if payee_pays_fee else (0, 120)
    )


@pytest.mark.parametrize("payee_pays_fee", [False, True])
async def test_a_failed_payout_is_accrued_again(store: Store, payee_pays_fee: bool) -> None:
    await earn(store, 1)
    started = payout(1, 2000, fee_reserve=300, payee_pays_fee=payee_pays_fee)
    assert await store.begin_payout(started)
    done = await store.finish_payout(
        started.payment_hash, FAILED, Msat(50), START + 5, "no route to the payee"
    )
    assert done == dataclasses.replace(
        started, state=FAILED, resolved_at=START + 5, failure="no route to the payee"
    )
    assert amounts(await payee(store)) == (3000, 0, 0, 0, 0, 3000)
    assert (await payee(store)).last_payout_at is None
    assert await store.list_payouts(state=FAILED) == [done]
    await reconciled(store)


async def test_finishing_a_payout_happens_once(store: Store) -> None:
    await earn(store, 1)
    assert await store.begin_payout(payout(1, 2000))
    hash_ = payout(1, 0).payment_hash
    done = await store.finish_payout(hash_, SUCCEEDED, Msat(10), START + 5)
    after = await payee(store)
    # a retry, a racing resolver, a contradicting late answer: all return it as it is
    assert await store.finish_payout(hash_, SUCCEEDED, Msat(10), START + 6) == done
    assert await store.finish_payout(hash_, FAILED, ZERO, START + 7, "late") == done
    racing = await asyncio.gather(
        *(store.finish_payout(hash_, FAILED, ZERO, START + 8) for _ in range(5))
    )
    assert racing == [done] * 5
    assert await payee(store) == after
    assert len(await payout_events(store)) == 1


async def test_racing_finishes_resolve_a_payout_once(store: Store) -> None:
    await earn(store, 1)
    assert await store.begin_payout(payout(1, 2000))
    hash_ = payout(1, 0).payment_hash
    results = await asyncio.gather(
        *(
            store.finish_payout(hash_, state, Msat(10), START + 5)
            for state in (SUCCEEDED, FAILED) * 5
        )
    )
    assert len({result for result in results}) == 1
    (resolved,) = {result for result in results}
    assert resolved is not None
    earned, paid, *_ = amounts(await payee(store))
    assert (earned, paid) == (3000, 2000 if resolved.state is SUCCEEDED else 0)
    assert len(await payout_events(store)) == 1
    await reconciled(store)


async def test_finishing_a_payout_is_checked(store: Store) -> None:
    await earn(store, 1)
    assert await store.begin_payout(payout(1, 2000, fee_reserve=300))
    hash_ = payout(1, 0).payment_hash
    assert await store.finish_payout(payout(9, 0).payment_hash, SUCCEEDED, ZERO, START) is None
    with pytest.raises(ValueError, match="not PENDING"):
        await store.finish_payout(hash_, PENDING, ZERO, START)
    with pytest.raises(ValueError, match="fee_msat"):
        await store.finish_payout(hash_, SUCCEEDED, Msat(-1), START)
    with pytest.raises(StoreError, match="above the payout's fee reserve"):
        await store.finish_payout(hash_, SUCCEEDED, Msat(301), START)
    assert amounts(await payee(store)) == (3000, 0, 0, 2000, 0, 1000)
    assert [p.state for p in await store.list_payouts()] == [PENDING]
    assert await payout_events(store) == []


async def test_the_latest_payout_time_only_grows(store: Store) -> None:
    await earn(store, 1)
    late = payout(1, 1000, created_at=START + 100)
    early = payout(2, 1000, created_at=START + 50)
    for started in (late, early):
        assert await store.begin_payout(started)
    await store.finish_payout(late.payment_hash, SUCCEEDED, ZERO, START + 101)
    await store.finish_payout(early.payment_hash, SUCCEEDED, ZERO, START + 102)
    assert (await payee(store)).last_payout_at == START + 100


async def test_concurrent_payouts_never_debit_more_than_accrued(store: Store) -> None:
    await earn(store, 1, paid=100_000)  # carol: 30_000
    results = await asyncio.gather(
        *(
            store.begin_payout(payout(n, 4000, fee_reserve=1000, payee_pays_fee=n % 2 == 0))
            for n in range(20)
        )
    )
    debited = sum(4000 + (1000 if n % 2 == 0 else 0) for n, began in enumerate(results) if began)
    assert debited <= 30_000
    assert debited > 30_000 - 5000  # refused only once what is left does not cover one
    balance = await payee(store)
    assert (balance.pending_msat, balance.accrued_msat) == (debited, 30_000 - debited)
    assert len(await store.list_payouts()) == sum(results)
    await reconciled(store)


async def test_payouts_are_listed_newest_first_and_filtered(store: Store) -> None:
    await earn(store, 1, paid=100_000, split=CAROL_AND_DAVE)
    for n, name in enumerate(["carol", "dave", "carol", "carol"]):
        assert await store.begin_payout(payout(n, 100 + n, payee=name, created_at=START + n))
    await store.finish_payout(payout(2, 0).payment_hash, SUCCEEDED, ZERO, START + 9)

    def numbers(payouts: list[Payout]) -> list[int]:
        return [p.amount_msat - 100 for p in payouts]

    assert numbers(await store.list_payouts()) == [3, 2, 1, 0]
    assert numbers(await store.list_payouts(payee="carol")) == [3, 2, 0]
    assert numbers(await store.list_payouts(state=PENDING)) == [3, 1, 0]
    assert numbers(await store.list_payouts("carol", SUCCEEDED)) == [2]
    assert numbers(await store.list_payouts(payee="carol", limit=2)) == [3, 2]
    assert await store.list_payouts(limit=0) == []
    assert await store.list_payouts(payee="erin") == []
    with pytest.raises(ValueError, match="limit"):
        await store.list_payouts(limit=-1)


async def test_the_ledger_reconciles_after_a_mixed_history(store: Store) -> None:
    await store.open_account(TOKEN, "weather")
    await store.add_invoice(invoice(0, token_id=TOKEN, buys_credit=True, amount_msat=Msat(50_000)))
    await store.apply_update(settled(0, paid=50_000))
    for n in range(1, 8):
        await earn(store, n, paid=9_999 + n, split=CAROL_AND_DAVE)
        await charge(store, 1_234 * n, CAROL_AND_DAVE, held=10_000)
    await earn(store, 8, split=())
    outcomes = [(SUCCEEDED, 40), (FAILED, 0), (SUCCEEDED, 0), None, (SUCCEEDED, 300)]
    for n, outcome in enumerate(outcomes):
        name = "carol" if n % 2 == 0 else "dave"
        started = payout(n, 3000 + n, fee_reserve=300, payee=name, payee_pays_fee=n < 3)
        assert await store.begin_payout(started)
        if outcome is not None:
            await store.finish_payout(started.payment_hash, outcome[0], Msat(outcome[1]), START)
    totals = await reconciled(store)
    kept_after_fees = totals.kept_msat - totals.merchant_fees_msat
    assert totals.received_msat == (
        kept_after_fees
        + totals.paid_msat
        + totals.pending_msat
        + totals.accrued_msat
        + totals.payee_fees_msat
        + totals.merchant_fees_msat
    )
    charged = sum(1_234 * n for n in range(1, 8))
    assert totals.received_msat == sum(9_999 + n for n in range(1, 8)) + charged
    assert (totals.paid_msat, totals.pending_msat) == (3000 + 3002 + 3004, 3003)
    assert (totals.payee_fees_msat, totals.merchant_fees_msat) == (40, 300)


async def test_resolved_payouts_write_their_events(store: Store) -> None:
    await earn(store, 1)
    ok, failed = payout(1, 1000), payout(2, 500, payee_pays_fee=True)
    for started in (ok, failed):
        assert await store.begin_payout(started)
    assert await payout_events(store) == []
    await store.finish_payout(ok.payment_hash, SUCCEEDED, Msat(7), START + 5)
    await store.finish_payout(failed.payment_hash, FAILED, ZERO, START + 6, "payee offline")
    await store.finish_payout(ok.payment_hash, SUCCEEDED, Msat(7), START + 7)  # again
    assert await payout_events(store) == [
        (
            "payout.succeeded",
            "payee:carol",
            {
                "payee": "carol",
                "payment_hash": ok.payment_hash.hex(),
                "amount_msat": 1000,
                "fee_msat": 7,
            },
        ),
        (
            "payout.failed",
            "payee:carol",
            {
                "payee": "carol",
                "payment_hash": failed.payment_hash.hex(),
                "amount_msat": 500,
                "fee_msat": 0,
                "failure": "payee offline",
            },
        ),
    ]


class Abort(Exception):
    pass


async def test_ledger_writes_in_a_failed_transaction_leave_nothing(store: Store) -> None:
    await store.open_account(TOKEN, "weather")
    await store.add_invoice(invoice(0, token_id=TOKEN, buys_credit=True))
    await store.apply_update(settled(0))
    await earn(store, 1)
    assert await store.begin_payout(payout(1, 1000))
    before = (await store.list_payees(), await store.split_totals(), await store.list_payouts())

    async def everything_then_abort() -> None:
        async with store.transaction() as tx:
            await tx.add_invoice(invoice(2, CAROL_AND_DAVE))
            await tx.apply_update(settled(2))
            reserved = await tx.reserve(TOKEN, Msat(1000), FAR_FUTURE)
            assert reserved.reservation is not None
            await tx.settle_reservation(
                reserved.reservation.reservation_id, Msat(500), "GET", "/", split=CAROL_30
            )
            assert await tx.begin_payout(payout(2, 500))
            await tx.finish_payout(payout(1, 0).payment_hash, SUCCEEDED, ZERO, START)
            assert len(await tx.list_payees()) == 2  # it sees its own writes
            raise Abort

    with pytest.raises(Abort):
        await everything_then_abort()
    after = (await store.list_payees(), await store.split_totals(), await store.list_payouts())
    assert after == before
    assert await payout_events(store) == []


CALLS: dict[str, Callable[[Store], Awaitable[object]]] = {
    "begin_payout": lambda s: s.begin_payout(payout(1, 1)),
    "finish_payout": lambda s: s.finish_payout(payout(1, 1).payment_hash, FAILED, ZERO, 1.0),
    "get_payee": lambda s: s.get_payee("carol"),
    "list_payees": lambda s: s.list_payees(),
    "list_payouts": lambda s: s.list_payouts(),
    "split_totals": lambda s: s.split_totals(),
}


@pytest.mark.parametrize("call", sorted(CALLS))
async def test_split_calls_after_close_raise_store_closed(store: Store, call: str) -> None:
    await store.close()
    with pytest.raises(StoreClosed, match="closed"):
        await CALLS[call](store)


# --- SQL only: several stores on one database ------------------------------------------------


async def test_payouts_from_two_stores_never_debit_more_than_accrued(
    two_stores: tuple[Store, Store],
) -> None:
    first, second = two_stores
    await earn(first, 1, paid=100_000)  # carol: 30_000
    results = await asyncio.gather(
        *(store.begin_payout(payout(n, 1000)) for n, store in enumerate((first, second) * 20))
    )
    assert sum(results) == 30
    assert amounts(await payee(second)) == (30_000, 0, 0, 30_000, 0, 0)
    hashes = [payout(n, 0).payment_hash for n, began in enumerate(results) if began]
    # resolved from both at once, each once: half paid, half accrued again
    await asyncio.gather(
        *(
            store.finish_payout(hash_, SUCCEEDED if i % 2 else FAILED, ZERO, START)
            for i, hash_ in enumerate(hashes)
            for store in (first, second)
        )
    )
    assert amounts(await payee(first)) == (30_000, 15_000, 0, 0, 0, 15_000)
    # a settlement by both at once is split once
    await first.add_invoice(invoice(2))
    await asyncio.gather(*(store.apply_update(settled(2)) for store in (first, second) * 5))
    assert (await payee(second)).earned_msat == 33_000
    assert len(await payout_events(first)) == 30
    await reconciled(second)


# --- migrations keep the data of the schema before -------------------------------------------

PREVIOUS_SQLITE = 5  # the last schema without splits


def make_v5_by_hand(path: Path) -> None:
    """A database as the fifth schema left it: a settled invoice, an account with credit."""
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("BEGIN")
        for step in sqlite_file.MIGRATIONS[:PREVIOUS_SQLITE]:
            for statement in step:
                connection.execute(statement)
        connection.execute(
            "INSERT INTO invoices VALUES (?, 'lnbcrt1n1split', 10000, ?, 'weather', 'GET',"
            " '/forecast', 'SETTLED', ?, ?, 2, 2, 10000, ?, 0)",
            (payment_hash(1), invoice(1).token_id, START + 1, START + 601, START + 11),
        )
        connection.execute(
            "INSERT INTO accounts VALUES (?, 'weather', 5000, 1000, 0, 0, ?, NULL)",
            (TOKEN, START),
        )
        connection.execute(f"PRAGMA user_version = {PREVIOUS_SQLITE}")
        connection.execute("COMMIT")
    finally:
        connection.close()


V5_INVOICE = dataclasses.replace(
    invoice(1, ()),
    state=InvoiceState.SETTLED,
    settle_index=2,
    amount_paid_msat=Msat(10_000),
    settled_at=START + 11,
)


async def test_a_version_5_sqlite_database_is_read_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    make_v5_by_hand(path)
    reader = await SqliteStore.open(path, read_only=True)
    try:
        assert await reader.list_invoices() == [V5_INVOICE]  # no split
        assert await reader.list_payees() == []
        assert await reader.list_payouts() == []
        assert await reader.split_totals() == nothing()
    finally:
        await reader.close()
    assert user_version(path) == PREVIOUS_SQLITE


async def test_a_version_5_sqlite_database_migrates_keeping_its_data(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    make_v5_by_hand(path)
    opened = await SqliteStore.open(path)
    try:
        assert await opened.list_invoices() == [V5_INVOICE]
        account = await opened.get_account(TOKEN)
        assert account is not None
        assert account.balance_msat == 4000
        await opened.apply_update(settled(1))  # settled before: not split now
        assert await opened.split_totals() == nothing()
        await earn(opened, 2)
        assert await opened.begin_payout(payout(1, 3000))
        assert amounts(await payee(opened)) == (3000, 0, 0, 3000, 0, 0)
    finally:
        await opened.close()
    assert user_version(path) == len(sqlite_file.MIGRATIONS)
    connection = sqlite3.connect(path)
    try:
        tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master")}
    finally:
        connection.close()
    assert {"split_entries", "payees", "payouts"} <= tables


@pytest.mark.postgres
async def test_a_version_1_postgres_database_migrates_keeping_its_data(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as patched:  # a gateway that knows only the first schema
        patched.setattr(postgres_schema, "LATEST", 1)
        old = await PostgresStore.open(postgres_url)
        await old.close()
    connection = await asyncpg.connect(postgres_url)
    try:
        assert await connection.fetchval("SELECT version FROM schema_version") == 1
        await connection.execute(
            "INSERT INTO invoices (payment_hash, payment_request, amount_msat, token_id, service,"
            " method, path, state, created_at, expires_at, add_index, settle_index,"
            " amount_paid_msat, settled_at, buys_credit)"
            " VALUES ($1, 'lnbcrt1n1split', 10000, $2, 'weather', 'GET', '/forecast', 'SETTLED',"
            " $3, $4, 2, 2, 10000, $5, false)",
            payment_hash(1),
            invoice(1).token_id,
            START + 1,
            START + 601,
            START + 11,
        )
    finally:
        await connection.close()

    opened = await PostgresStore.open(postgres_url)
    try:
        assert await opened.list_invoices() == [V5_INVOICE]
        await earn(opened, 2)
        assert amounts(await payee(opened)) == (3000, 0, 0, 0, 0, 3000)
    finally:
        await opened.close()
    connection = await asyncpg.connect(postgres_url)
    try:
        version = await connection.fetchval("SELECT version FROM schema_version")
    finally:
        await connection.close()
    assert version == postgres_schema.LATEST == len(postgres_schema.MIGRATIONS)
