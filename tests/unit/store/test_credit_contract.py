"""The credit part of the ``Store`` contract (accounts, reservations, charges, withdrawals),
run against every implementation (memory, and SQLite in tmp_path); at the end, what only the
SQLite store promises: atomic debits across processes sharing the file."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from gateway import l402
from gateway.ports import (
    Account,
    Charge,
    CreditTotals,
    InvoiceRecord,
    InvoiceState,
    InvoiceUpdate,
    Msat,
    PaymentHash,
    Reservation,
    Reserved,
    Store,
    Withdrawal,
    WithdrawalState,
)
from gateway.store import SqliteStore, StoreClosed, StoreError
from tests.fakes import NOW, FakeClock

PENDING, SUCCEEDED, FAILED = (
    WithdrawalState.PENDING,
    WithdrawalState.SUCCEEDED,
    WithdrawalState.FAILED,
)
START = NOW  # where the shared clock starts
FAR_FUTURE = 1e12
TOKEN = hashlib.sha256(b"token").digest()
OTHER_TOKEN = hashlib.sha256(b"other token").digest()


def payment_hash(n: int) -> PaymentHash:
    return PaymentHash(hashlib.sha256(b"credit invoice %d" % n).digest())


def credit_invoice(n: int, token_id: bytes = TOKEN, **changes: object) -> InvoiceRecord:
    record = InvoiceRecord(
        payment_hash=payment_hash(n),
        payment_request=f"lnbcrt{n}n1fake",
        amount_msat=Msat(10_000),
        token_id=token_id,
        service="weather",
        method="GET",
        path="/forecast",
        state=InvoiceState.OPEN,
        created_at=START + n,
        expires_at=START + 600 + n,
        add_index=n + 1,
        buys_credit=True,
    )
    return dataclasses.replace(record, **changes)  # type: ignore[arg-type]


def settled(
    n: int, paid: int = 10_000, state: InvoiceState = InvoiceState.SETTLED
) -> InvoiceUpdate:
    return InvoiceUpdate(payment_hash(n), state, n + 1, Msat(paid), START + 10 + n)


async def fund(store: Store, n: int, amount: int, token_id: bytes = TOKEN) -> None:
    """An account holding ``amount`` more, bought as a challenge or top-up buys it."""
    await store.open_account(token_id, "weather")
    await store.add_invoice(credit_invoice(n, token_id, amount_msat=Msat(amount)))
    await store.apply_update(settled(n, amount))


async def account(store: Store, token_id: bytes = TOKEN) -> Account:
    got = await store.get_account(token_id)
    assert got is not None
    return got


async def balance(store: Store, token_id: bytes = TOKEN) -> int:
    return (await account(store, token_id)).balance_msat


def amounts(account: Account) -> tuple[int, int, int, int, int]:
    return (
        account.credited_msat,
        account.spent_msat,
        account.reserved_msat,
        account.withdrawn_msat,
        account.balance_msat,
    )


def withdrawal(n: int, amount: int, fee_reserve: int, token_id: bytes = TOKEN) -> Withdrawal:
    return Withdrawal(
        payment_hash=PaymentHash(hashlib.sha256(b"withdrawal %d" % n).digest()),
        token_id=token_id,
        payment_request=f"lnbcrt{n}n1withdraw",
        amount_msat=Msat(amount),
        fee_reserve_msat=Msat(fee_reserve),
        state=PENDING,
        created_at=START + n,
    )


# --- accounts and crediting ------------------------------------------------------------------


async def test_an_account_opens_empty_and_opening_it_again_keeps_it(
    store: Store, clock: FakeClock
) -> None:
    assert await store.get_account(TOKEN) is None
    await store.open_account(TOKEN, "weather")
    opened = Account(TOKEN, "weather", Msat(0), Msat(0), Msat(0), Msat(0), START)
    assert await store.get_account(TOKEN) == opened

    await fund(store, 1, 5000)
    clock.current += 60
    await store.open_account(TOKEN, "another service")
    assert await account(store) == dataclasses.replace(opened, credited_msat=Msat(5000))


async def test_settling_a_credit_invoice_credits_its_account_once(store: Store) -> None:
    await store.open_account(TOKEN, "weather")
    await store.add_invoice(credit_invoice(1))
    await store.apply_update(settled(1, paid=0, state=InvoiceState.ACCEPTED))
    assert (await account(store)).credited_msat == 0  # held, not yet paid

    got = await store.apply_update(settled(1, paid=10_250))
    assert got is not None
    assert got.buys_credit
    # replays of every kind: the watcher, strict verification, a restart's catch-up
    for state in InvoiceState:
        await store.apply_update(settled(1, paid=99_999, state=state))
    await store.apply_update(settled(1, paid=10_250))

    assert amounts(await account(store)) == (10_250, 0, 0, 0, 10_250)


async def test_settlements_racing_credit_once(store: Store) -> None:
    await store.open_account(TOKEN, "weather")
    await store.add_invoice(credit_invoice(1))
    await asyncio.gather(*(store.apply_update(settled(1)) for _ in range(20)))
    assert (await account(store)).credited_msat == 10_000


async def test_the_invoice_amount_is_credited_when_no_amount_paid_is_reported(
    store: Store,
) -> None:
    await store.open_account(TOKEN, "weather")
    await store.add_invoice(credit_invoice(1, amount_msat=Msat(7000)))
    await store.apply_update(settled(1, paid=0))
    assert (await account(store)).credited_msat == 7000


async def test_an_expired_credit_invoice_settled_late_still_credits(store: Store) -> None:
    await store.open_account(TOKEN, "weather")
    await store.add_invoice(credit_invoice(1))
    await store.apply_update(settled(1, paid=0, state=InvoiceState.EXPIRED))
    await store.apply_update(settled(1))
    assert (await account(store)).credited_msat == 10_000


@pytest.mark.parametrize("state", [InvoiceState.CANCELED, InvoiceState.EXPIRED])
async def test_an_unpaid_credit_invoice_credits_nothing(store: Store, state: InvoiceState) -> None:
    await store.open_account(TOKEN, "weather")
    await store.add_invoice(credit_invoice(1))
    await store.apply_update(settled(1, paid=0, state=state))
    assert (await account(store)).credited_msat == 0


async def test_an_invoice_that_buys_no_credit_credits_nothing(store: Store) -> None:
    await store.open_account(TOKEN, "weather")
    await store.add_invoice(credit_invoice(1, buys_credit=False))
    got = await store.apply_update(settled(1))
    assert got is not None
    assert (got.state, got.buys_credit) == (InvoiceState.SETTLED, False)
    assert (await account(store)).credited_msat == 0
    assert (await store.credit_totals()).received_msat == 0


async def test_a_top_up_credits_the_same_account(store: Store) -> None:
    await fund(store, 1, 10_000)
    await store.add_invoice(credit_invoice(2, amount_msat=Msat(25_000)))  # same token id
    await store.apply_update(settled(2, 25_000))
    assert (await account(store)).credited_msat == 35_000


async def test_a_settlement_opens_a_missing_account(store: Store, clock: FakeClock) -> None:
    # A challenge opens it; should one ever not have, the payment is still credited.
    await store.add_invoice(credit_invoice(1))
    await store.apply_update(settled(1))
    assert await store.get_account(TOKEN) == Account(
        TOKEN, "weather", Msat(10_000), Msat(0), Msat(0), Msat(0), clock.now()
    )


async def test_buys_credit_round_trips(store: Store) -> None:
    await store.add_invoice(credit_invoice(1))
    await store.add_invoice(credit_invoice(2, buys_credit=False))
    assert await store.get_invoice(payment_hash(1)) == credit_invoice(1)
    assert await store.get_invoice(payment_hash(2)) == credit_invoice(2, buys_credit=False)
    assert [record.buys_credit for record in await store.list_invoices()] == [False, True]


async def test_the_open_credit_invoices_of_a_token_are_listed_newest_first(
    store: Store,
) -> None:
    await fund(store, 1, 10_000)  # settled: not listed
    for n in (2, 3, 4, 5):
        await store.add_invoice(credit_invoice(n))
    await store.add_invoice(credit_invoice(6, buys_credit=False))  # buys no credit
    await store.add_invoice(credit_invoice(7, token_id=OTHER_TOKEN))  # another account
    for n, state in ((8, InvoiceState.CANCELED), (9, InvoiceState.EXPIRED)):
        await store.add_invoice(credit_invoice(n))
        await store.apply_update(settled(n, paid=0, state=state))
    await store.add_invoice(credit_invoice(10))
    await store.apply_update(settled(10, paid=0, state=InvoiceState.ACCEPTED))
    # Created in the same instant as 5, after it: newer (the insertion order breaks ties).
    await store.add_invoice(credit_invoice(11, created_at=START + 5))

    listed = await store.list_open_credit_invoices(TOKEN, 3)
    assert listed == [
        credit_invoice(11, created_at=START + 5),
        credit_invoice(5),
        credit_invoice(4),
    ]
    everything = await store.list_open_credit_invoices(TOKEN, 100)
    assert [record.payment_hash for record in everything] == [
        payment_hash(n) for n in (11, 5, 4, 3, 2)
    ]
    assert await store.list_open_credit_invoices(TOKEN, 0) == []
    assert await store.list_open_credit_invoices(OTHER_TOKEN, 3) == [
        credit_invoice(7, token_id=OTHER_TOKEN)
    ]
    assert await store.list_open_credit_invoices(hashlib.sha256(b"nobody").digest(), 3) == []

    async with store.transaction() as tx:  # a transaction sees its own writes
        await tx.add_invoice(credit_invoice(12, created_at=START + 50))
        assert [record.payment_hash for record in await tx.list_open_credit_invoices(TOKEN, 1)] == [
            payment_hash(12)
        ]
    await store.apply_update(settled(12))
    assert await store.list_open_credit_invoices(TOKEN, 1) == [listed[0]]


# --- reservations ----------------------------------------------------------------------------


async def test_reserve_then_settle(store: Store, clock: FakeClock) -> None:
    await fund(store, 1, 1000)
    clock.current += 5
    reserved = await store.reserve(TOKEN, Msat(300), START + 335)
    reservation = reserved.reservation
    assert reservation is not None
    assert reserved == Reserved(
        Reservation(reservation.reservation_id, TOKEN, Msat(300), START + 335), Msat(700)
    )
    held = await account(store)
    assert amounts(held) == (1000, 0, 300, 0, 700)
    assert held.last_used_at == START + 5

    clock.current += 1
    assert await store.settle_reservation(reservation.reservation_id, Msat(200), "GET", "/a") == 800
    assert amounts(await account(store)) == (1000, 200, 0, 0, 800)
    assert await store.list_charges(TOKEN, 10) == [Charge(TOKEN, START + 6, "GET", "/a", Msat(200))]

    # once only: the reservation is gone
    assert (
        await store.settle_reservation(reservation.reservation_id, Msat(100), "GET", "/a") is None
    )
    assert amounts(await account(store)) == (1000, 200, 0, 0, 800)


async def test_settling_for_nothing_releases_and_records_no_charge(store: Store) -> None:
    await fund(store, 1, 1000)
    reservation = (await store.reserve(TOKEN, Msat(400), FAR_FUTURE)).reservation
    assert reservation is not None
    assert await store.settle_reservation(reservation.reservation_id, Msat(0), "GET", "/") == 1000
    assert amounts(await account(store)) == (1000, 0, 0, 0, 1000)
    assert await store.list_charges(TOKEN, 10) == []


async def test_reservation_ids_are_distinct(store: Store) -> None:
    await fund(store, 1, 1000)
    ids = set()
    for _ in range(5):
        reservation = (await store.reserve(TOKEN, Msat(100), FAR_FUTURE)).reservation
        assert reservation is not None
        ids.add(reservation.reservation_id)
        await store.settle_reservation(reservation.reservation_id, Msat(0), "GET", "/")
    assert len(ids) == 5  # a settled id is not handed out again


async def test_reserve_is_refused_when_the_balance_is_short_and_writes_nothing(
    store: Store, clock: FakeClock
) -> None:
    await fund(store, 1, 500)
    before = await account(store)
    clock.current += 5
    assert await store.reserve(TOKEN, Msat(501), FAR_FUTURE) == Reserved(None, Msat(500))
    assert await account(store) == before  # last_used_at included
    assert await store.release_expired_reservations(FAR_FUTURE * 2, 100) == 0

    exact = await store.reserve(TOKEN, Msat(500), FAR_FUTURE)
    assert exact.reservation is not None
    assert exact.balance_msat == 0
    assert await store.reserve(TOKEN, Msat(1), FAR_FUTURE) == Reserved(None, Msat(0))


async def test_reserve_without_an_account_is_refused(store: Store) -> None:
    assert await store.reserve(TOKEN, Msat(1), FAR_FUTURE) == Reserved(None, Msat(0))
    assert await store.get_account(TOKEN) is None


async def test_negative_amounts_are_refused(store: Store) -> None:
    await fund(store, 1, 1000)
    with pytest.raises(ValueError, match="amount_msat"):
        await store.reserve(TOKEN, Msat(-1), FAR_FUTURE)
    reservation = (await store.reserve(TOKEN, Msat(100), FAR_FUTURE)).reservation
    assert reservation is not None
    with pytest.raises(ValueError, match="charged_msat"):
        await store.settle_reservation(reservation.reservation_id, Msat(-1), "GET", "/")
    assert amounts(await account(store)) == (1000, 0, 100, 0, 900)


async def test_charging_more_than_reserved_is_refused_and_changes_nothing(store: Store) -> None:
    await fund(store, 1, 1000)
    reservation = (await store.reserve(TOKEN, Msat(100), FAR_FUTURE)).reservation
    assert reservation is not None
    with pytest.raises(ValueError, match="above"):
        await store.settle_reservation(reservation.reservation_id, Msat(101), "GET", "/")
    assert amounts(await account(store)) == (1000, 0, 100, 0, 900)
    assert await store.settle_reservation(reservation.reservation_id, Msat(100), "GET", "/") == 900


async def test_concurrent_reserves_take_exactly_what_the_balance_covers(store: Store) -> None:
    await fund(store, 1, 10 * 1000 + 999)
    results = await asyncio.gather(
        *(store.reserve(TOKEN, Msat(1000), FAR_FUTURE) for _ in range(40))
    )
    granted = [result for result in results if result.reservation is not None]
    assert len(granted) == 10
    assert all(result.balance_msat >= 0 for result in results)
    assert amounts(await account(store)) == (10_999, 0, 10_000, 0, 999)

    # and settling them all concurrently charges each once
    settles = [
        store.settle_reservation(result.reservation.reservation_id, Msat(600), "GET", "/")
        for result in granted
        if result.reservation is not None
    ]
    await asyncio.gather(*settles)
    assert amounts(await account(store)) == (10_999, 6000, 0, 0, 4999)
    assert len(await store.list_charges(TOKEN, 100)) == 10


async def test_expired_reservations_are_released_oldest_first(store: Store) -> None:
    await fund(store, 1, 1000)
    ids = []
    for expires_at in (START + 30, START + 10, START + 20):
        reservation = (await store.reserve(TOKEN, Msat(100), expires_at)).reservation
        assert reservation is not None
        ids.append(reservation.reservation_id)
    assert await balance(store) == 700

    assert await store.release_expired_reservations(START + 25, 1) == 1  # the one due at +10
    assert await store.settle_reservation(ids[1], Msat(100), "GET", "/") is None
    assert await store.release_expired_reservations(START + 25, 10) == 1  # +20; +30 is not due
    assert await store.release_expired_reservations(START + 30, 10) == 0  # strictly before
    assert amounts(await account(store)) == (1000, 0, 100, 0, 900)
    assert await store.settle_reservation(ids[0], Msat(50), "GET", "/") == 950
    assert await store.release_expired_reservations(FAR_FUTURE, 0) == 0


# --- usage and listings ----------------------------------------------------------------------


async def charge(store: Store, token_id: bytes, amount: int, path: str) -> None:
    reservation = (await store.reserve(token_id, Msat(amount), FAR_FUTURE)).reservation
    assert reservation is not None
    await store.settle_reservation(reservation.reservation_id, Msat(amount), "POST", path)


async def test_charges_are_listed_newest_first_per_account(store: Store, clock: FakeClock) -> None:
    await fund(store, 1, 10_000)
    await fund(store, 2, 10_000, OTHER_TOKEN)
    for n in range(4):
        clock.current = START + 100 + n
        await charge(store, TOKEN, 10 + n, f"/{n}")
        await charge(store, OTHER_TOKEN, 1, "/other")
    await charge(store, TOKEN, 99, "/same instant as /3")

    listed = await store.list_charges(TOKEN, 3)
    assert listed == [
        Charge(TOKEN, START + 103, "POST", "/same instant as /3", Msat(99)),
        Charge(TOKEN, START + 103, "POST", "/3", Msat(13)),
        Charge(TOKEN, START + 102, "POST", "/2", Msat(12)),
    ]
    assert len(await store.list_charges(TOKEN, 100)) == 5
    assert await store.list_charges(TOKEN, 0) == []
    assert await store.list_charges(b"nobody", 10) == []


async def test_charges_older_than_the_cutoff_are_pruned_oldest_first(
    store: Store, clock: FakeClock
) -> None:
    await fund(store, 1, 10_000)
    await fund(store, 2, 10_000, OTHER_TOKEN)
    for n in range(3):
        clock.current = START + 100 + n
        await charge(store, TOKEN, 10 + n, f"/{n}")
        await charge(store, OTHER_TOKEN, 1, f"/other {n}")
    before = (await store.list_accounts(), await store.credit_totals())

    assert await store.prune_charges(START + 102, 0) == 0
    assert await store.prune_charges(START + 100, 10) == 0  # strictly older than the cutoff
    assert await store.prune_charges(START + 102, 1) == 1  # one of the two at +100
    assert await store.prune_charges(START + 102, 10) == 3  # the other, and both at +101
    assert await store.prune_charges(START + 102, 10) == 0  # again: harmless
    assert await store.list_charges(TOKEN, 10) == [
        Charge(TOKEN, START + 102, "POST", "/2", Msat(12))
    ]
    assert await store.list_charges(OTHER_TOKEN, 10) == [
        Charge(OTHER_TOKEN, START + 102, "POST", "/other 2", Msat(1))
    ]
    # history only: the balances and the totals are what they were
    assert (await store.list_accounts(), await store.credit_totals()) == before
    assert amounts(await account(store)) == (10_000, 33, 0, 0, 9_967)

    assert await store.prune_charges(FAR_FUTURE, 10) == 2
    assert await store.list_charges(TOKEN, 10) == []
    assert (await store.list_accounts(), await store.credit_totals()) == before


async def test_pruning_charges_in_a_failed_transaction_keeps_them(store: Store) -> None:
    await fund(store, 1, 10_000)
    await charge(store, TOKEN, 10, "/kept")
    kept = await store.list_charges(TOKEN, 10)
    assert len(kept) == 1

    async def prune_then_abort() -> None:
        async with store.transaction() as tx:
            assert await tx.prune_charges(FAR_FUTURE, 10) == 1
            assert await tx.list_charges(TOKEN, 10) == []  # it sees its own delete
            raise Abort

    with pytest.raises(Abort):
        await prune_then_abort()
    assert await store.list_charges(TOKEN, 10) == kept

    async with store.transaction() as tx:
        assert await tx.prune_charges(FAR_FUTURE, 10) == 1
    assert await store.list_charges(TOKEN, 10) == []


async def test_accounts_are_listed_most_recently_used_first(store: Store, clock: FakeClock) -> None:
    tokens = [hashlib.sha256(b"account %d" % n).digest() for n in range(3)]
    for n, token_id in enumerate(tokens):
        clock.current = START + n
        await fund(store, n, 1000, token_id)
    assert [a.token_id for a in await store.list_accounts()] == tokens[::-1]

    clock.current = START + 50
    await store.reserve(tokens[0], Msat(1), FAR_FUTURE)  # used: now the most recent
    listed = await store.list_accounts()
    assert [a.token_id for a in listed] == [tokens[0], tokens[2], tokens[1]]
    assert listed[0].last_used_at == START + 50
    assert [a.token_id for a in await store.list_accounts(limit=1)] == [tokens[0]]
    assert await store.list_accounts(limit=0) == []
    with pytest.raises(ValueError, match="limit"):
        await store.list_accounts(limit=-1)


# --- withdrawals -----------------------------------------------------------------------------


async def test_a_withdrawal_debits_amount_and_fee_reserve_then_refunds_the_unused_fee(
    store: Store,
) -> None:
    await fund(store, 1, 10_000)
    pending = withdrawal(1, 6000, 1000)
    assert await store.begin_withdrawal(pending) == 3000
    assert amounts(await account(store)) == (10_000, 0, 0, 7000, 3000)
    assert await store.list_withdrawals() == [pending]

    done = await store.finish_withdrawal(pending.payment_hash, SUCCEEDED, Msat(250), START + 99)
    assert done == dataclasses.replace(
        pending, state=SUCCEEDED, fee_msat=Msat(250), resolved_at=START + 99
    )
    assert amounts(await account(store)) == (10_000, 0, 0, 6250, 3750)
    # once only: a later report changes nothing
    again = await store.finish_withdrawal(pending.payment_hash, FAILED, Msat(0), START + 500)
    assert again == done
    assert amounts(await account(store)) == (10_000, 0, 0, 6250, 3750)
    assert await store.list_withdrawals() == [done]


async def test_a_failed_withdrawal_refunds_everything_once(store: Store) -> None:
    await fund(store, 1, 10_000)
    pending = withdrawal(1, 6000, 1000)
    await store.begin_withdrawal(pending)
    failed = await store.finish_withdrawal(pending.payment_hash, FAILED, Msat(300), START + 9)
    # nothing paid: no fee recorded, whatever the caller passed
    assert failed == dataclasses.replace(pending, state=FAILED, resolved_at=START + 9)
    assert amounts(await account(store)) == (10_000, 0, 0, 0, 10_000)
    await store.finish_withdrawal(pending.payment_hash, FAILED, Msat(0), START + 10)
    await store.finish_withdrawal(pending.payment_hash, SUCCEEDED, Msat(0), START + 11)
    assert amounts(await account(store)) == (10_000, 0, 0, 0, 10_000)


async def test_a_withdrawal_the_balance_does_not_cover_writes_nothing(store: Store) -> None:
    await fund(store, 1, 10_000)
    await store.reserve(TOKEN, Msat(2000), FAR_FUTURE)
    before = await account(store)
    assert await store.begin_withdrawal(withdrawal(1, 7001, 1000)) is None  # 8001 > 8000
    assert await account(store) == before
    assert await store.list_withdrawals() == []
    assert await store.begin_withdrawal(withdrawal(2, 1, 0, OTHER_TOKEN)) is None  # no account
    assert await store.list_withdrawals() == []
    assert await store.begin_withdrawal(withdrawal(1, 7000, 1000)) == 0  # exactly covered


async def test_a_duplicate_withdrawal_hash_raises_and_writes_nothing(store: Store) -> None:
    await fund(store, 1, 10_000)
    first = withdrawal(1, 1000, 100)
    await store.begin_withdrawal(first)
    before = await account(store)
    with pytest.raises(StoreError, match="already recorded"):
        await store.begin_withdrawal(dataclasses.replace(first, amount_msat=Msat(5)))
    assert await account(store) == before
    assert await store.list_withdrawals() == [first]


async def test_finishing_a_withdrawal_is_checked(store: Store) -> None:
    await fund(store, 1, 10_000)
    pending = withdrawal(1, 1000, 100)
    await store.begin_withdrawal(pending)
    before = await account(store)
    assert (
        await store.finish_withdrawal(withdrawal(2, 1, 1).payment_hash, FAILED, Msat(0), 1) is None
    )
    with pytest.raises(ValueError, match="PENDING"):
        await store.finish_withdrawal(pending.payment_hash, PENDING, Msat(0), 1.0)
    with pytest.raises(ValueError, match="fee_msat"):
        await store.finish_withdrawal(pending.payment_hash, SUCCEEDED, Msat(-1), 1.0)
    with pytest.raises(StoreError):  # a fee above the limit set for it: never written
        await store.finish_withdrawal(pending.payment_hash, SUCCEEDED, Msat(101), 1.0)
    with pytest.raises(ValueError, match="PENDING"):
        await store.begin_withdrawal(dataclasses.replace(withdrawal(3, 1, 1), state=FAILED))
    assert await account(store) == before
    assert await store.list_withdrawals() == [pending]


async def test_withdrawals_are_listed_newest_first_and_filtered(store: Store) -> None:
    await fund(store, 1, 100_000)
    await fund(store, 2, 100_000, OTHER_TOKEN)
    mine = [withdrawal(n, 1000, 100) for n in range(3)]
    theirs = withdrawal(9, 1000, 100, OTHER_TOKEN)
    tie = dataclasses.replace(withdrawal(10, 1000, 100), created_at=mine[2].created_at)
    for pending in (*mine, theirs, tie):
        await store.begin_withdrawal(pending)
    succeeded = await store.finish_withdrawal(mine[1].payment_hash, SUCCEEDED, Msat(1), 5.0)
    assert succeeded is not None

    assert await store.list_withdrawals() == [theirs, tie, mine[2], succeeded, mine[0]]
    assert await store.list_withdrawals(limit=2) == [theirs, tie]
    assert await store.list_withdrawals(PENDING) == [theirs, tie, mine[2], mine[0]]
    assert await store.list_withdrawals(PENDING, TOKEN, 2) == [tie, mine[2]]
    assert await store.list_withdrawals(token_id=OTHER_TOKEN) == [theirs]
    assert await store.list_withdrawals(SUCCEEDED) == [succeeded]
    assert await store.list_withdrawals(FAILED) == []
    assert await store.list_withdrawals(limit=0) == []


# --- totals ----------------------------------------------------------------------------------


async def test_credit_totals_reconcile(store: Store) -> None:
    assert await store.credit_totals() == CreditTotals(*[0] * 7)  # type: ignore[arg-type]
    await fund(store, 1, 50_000)
    await fund(store, 2, 20_000, OTHER_TOKEN)
    await store.open_account(b"empty" * 4, "weather")
    await charge(store, TOKEN, 3000, "/a")
    await charge(store, OTHER_TOKEN, 500, "/b")
    await store.reserve(TOKEN, Msat(700), FAR_FUTURE)  # under way
    for n, (amount, reserve) in enumerate(((10_000, 1000), (4000, 100), (2000, 200))):
        await store.begin_withdrawal(withdrawal(n, amount, reserve))
    await store.finish_withdrawal(withdrawal(0, 0, 0).payment_hash, SUCCEEDED, Msat(300), 1)
    await store.finish_withdrawal(withdrawal(1, 0, 0).payment_hash, FAILED, Msat(0), 1)

    totals = await store.credit_totals()
    assert totals == CreditTotals(
        accounts=3,
        received_msat=Msat(70_000),
        consumed_msat=Msat(3500),
        withdrawn_msat=Msat(10_300),
        pending_withdrawals_msat=Msat(2200),
        reserved_msat=Msat(700),
        outstanding_msat=Msat(70_000 - 3500 - 10_300 - 2200 - 700),
    )
    assert totals.received_msat == (
        totals.consumed_msat
        + totals.withdrawn_msat
        + totals.pending_withdrawals_msat
        + totals.reserved_msat
        + totals.outstanding_msat
    )
    assert totals.outstanding_msat == sum(a.balance_msat for a in await store.list_accounts())


# --- pruning ---------------------------------------------------------------------------------


def root_key(n: int) -> bytes:
    return hashlib.sha256(b"root key %d" % n).digest()


def mint(n: int, token_id: bytes = TOKEN) -> l402.Macaroon:
    """The macaroon a challenge mints with invoice ``n``."""
    return l402.mint_token(root_key(n), payment_hash(n), token_id, ["weather_tier=0"])


async def add_key(store: Store, n: int, token_id: bytes = TOKEN) -> bytes:
    """Store the root key of invoice ``n`` as a challenge does: under sha256 of the identifier
    of the macaroon it mints; returns that key id."""
    key_id = hashlib.sha256(mint(n, token_id).identifier).digest()
    await store.put_root_key(key_id, token_id, root_key(n))
    return key_id


async def add_top_up(store: Store, n: int, state: InvoiceState) -> bytes:
    """A top-up challenge of ``TOKEN`` (its invoice and root key), moved to ``state``."""
    await store.add_invoice(credit_invoice(n, expires_at=100.0 + n))
    key_id = await add_key(store, n)
    if state is not InvoiceState.OPEN:
        await store.apply_update(
            settled(n, paid=0 if state is not InvoiceState.SETTLED else 1000, state=state)
        )
    return key_id


async def test_an_unpaid_top_up_is_pruned_with_its_own_root_key_only(store: Store) -> None:
    await fund(store, 1, 10_000)
    first_key = await add_key(store, 1)
    # two top-ups minted with the same token id: one expires unpaid, one is still open
    expired_key = await add_top_up(store, 2, InvoiceState.EXPIRED)
    open_key = await add_top_up(store, 3, InvoiceState.OPEN)

    assert await store.prune_unpaid(FAR_FUTURE, 10) == 1
    assert await store.get_invoice(payment_hash(2)) is None
    assert await store.get_root_key(expired_key) is None
    assert await store.get_invoice(payment_hash(1)) is not None
    assert await store.get_root_key(first_key) == root_key(1)
    assert await store.get_root_key(open_key) == root_key(3)
    assert (await account(store)).balance_msat == 10_000


async def test_expired_unpaid_top_ups_never_pile_up_root_keys(store: Store) -> None:
    """A holder asking for top-ups it never pays leaves nothing behind once they are pruned,
    in batches; the paid token, and a paid top-up, keep their keys and still verify."""
    await fund(store, 1, 10_000)
    paid_key = await add_key(store, 1)
    paid_top_up = await add_top_up(store, 2, InvoiceState.SETTLED)
    unpaid = {
        n: await add_top_up(store, n, InvoiceState.EXPIRED if n % 2 else InvoiceState.CANCELED)
        for n in range(3, 51)
    }

    pruned = [await store.prune_unpaid(FAR_FUTURE, 20) for _ in range(4)]
    assert pruned == [20, 20, 8, 0]
    assert [await store.get_root_key(key_id) for key_id in unpaid.values()] == [None] * 48
    assert [r.payment_hash for r in await store.list_invoices()] == [
        payment_hash(2),
        payment_hash(1),
    ]
    for n, key_id in ((1, paid_key), (2, paid_top_up)):
        stored = await store.get_root_key(key_id)
        assert stored == root_key(n)
        assert mint(n).verify_signature(stored)
    assert (await account(store)).balance_msat == 11_000


async def test_pruning_a_top_up_in_a_failed_transaction_keeps_its_root_key(
    store: Store,
) -> None:
    await fund(store, 1, 10_000)
    key_id = await add_top_up(store, 2, InvoiceState.EXPIRED)

    async def prune_then_abort() -> None:
        async with store.transaction() as tx:
            assert await tx.prune_unpaid(FAR_FUTURE, 10) == 1
            assert await tx.get_root_key(key_id) is None
            raise Abort

    with pytest.raises(Abort):
        await prune_then_abort()
    assert await store.get_root_key(key_id) == root_key(2)
    assert await store.get_invoice(payment_hash(2)) is not None


async def test_revoking_a_token_removes_the_root_keys_of_all_its_invoices(store: Store) -> None:
    await fund(store, 1, 10_000)
    keys = [
        await add_key(store, 1),
        await add_top_up(store, 2, InvoiceState.SETTLED),
        await add_top_up(store, 3, InvoiceState.OPEN),
        await add_top_up(store, 4, InvoiceState.EXPIRED),
    ]
    other = await add_key(store, 5, OTHER_TOKEN)

    assert await store.revoke_token(TOKEN) is True
    assert [await store.get_root_key(key_id) for key_id in keys] == [None] * 4
    assert await store.get_root_key(other) == root_key(5)


async def test_an_unpaid_credit_challenge_is_pruned_with_its_empty_account(store: Store) -> None:
    await store.open_account(TOKEN, "weather")
    await store.add_invoice(credit_invoice(1, expires_at=100.0))
    key_id = await add_key(store, 1)
    await store.apply_update(settled(1, paid=0, state=InvoiceState.CANCELED))
    await fund(store, 2, 1000, OTHER_TOKEN)  # another token's account stays

    assert await store.prune_unpaid(FAR_FUTURE, 10) == 1
    assert await store.get_root_key(key_id) is None
    assert await store.get_account(TOKEN) is None
    assert [a.token_id for a in await store.list_accounts()] == [OTHER_TOKEN]


async def test_a_key_no_invoice_names_goes_with_its_tokens_last_invoice(store: Store) -> None:
    """A root key stored under another id (one an older gateway wrote, say) is the token's:
    it stays while any invoice of the token remains."""
    await store.open_account(TOKEN, "weather")
    for n in (1, 2):
        await store.add_invoice(credit_invoice(n, expires_at=100.0 + n))
        await store.apply_update(settled(n, paid=0, state=InvoiceState.EXPIRED))
    key_id = hashlib.sha256(b"a key of the token").digest()
    await store.put_root_key(key_id, TOKEN, root_key(0))

    assert await store.prune_unpaid(FAR_FUTURE, 1) == 1
    assert await store.get_root_key(key_id) == root_key(0)  # the other invoice remains
    assert await store.prune_unpaid(FAR_FUTURE, 1) == 1
    assert await store.get_root_key(key_id) is None
    assert await store.get_account(TOKEN) is None


# --- transactions and close ------------------------------------------------------------------


class Abort(Exception):
    pass


async def test_credit_writes_in_a_failed_transaction_leave_nothing(store: Store) -> None:
    await fund(store, 1, 10_000)
    before = (await account(store), await store.credit_totals())

    async def everything_then_abort() -> None:
        async with store.transaction() as tx:
            await tx.open_account(OTHER_TOKEN, "weather")
            await tx.add_invoice(credit_invoice(2))
            await tx.apply_update(settled(2))
            reserved = await tx.reserve(TOKEN, Msat(100), FAR_FUTURE)
            assert reserved.reservation is not None
            await tx.settle_reservation(reserved.reservation.reservation_id, Msat(50), "GET", "/")
            await tx.begin_withdrawal(withdrawal(1, 1000, 10))
            await tx.finish_withdrawal(withdrawal(1, 0, 0).payment_hash, SUCCEEDED, Msat(1), 1)
            assert (await tx.credit_totals()).accounts == 2  # it sees its own writes
            raise Abort

    with pytest.raises(Abort):
        await everything_then_abort()
    assert (await account(store), await store.credit_totals()) == before
    assert await store.list_charges(TOKEN, 10) == []
    assert await store.list_withdrawals() == []


async def test_a_challenge_opens_its_account_with_its_invoice(store: Store) -> None:
    async with store.transaction() as tx:
        await tx.add_invoice(credit_invoice(1))
        await tx.open_account(TOKEN, "weather")
    await store.apply_update(settled(1))
    assert (await account(store)).balance_msat == 10_000


CALLS: dict[str, Callable[[Store], Awaitable[object]]] = {
    "open_account": lambda s: s.open_account(TOKEN, "weather"),
    "get_account": lambda s: s.get_account(TOKEN),
    "reserve": lambda s: s.reserve(TOKEN, Msat(1), 1.0),
    "settle_reservation": lambda s: s.settle_reservation(1, Msat(0), "GET", "/"),
    "release_expired_reservations": lambda s: s.release_expired_reservations(1.0, 1),
    "list_charges": lambda s: s.list_charges(TOKEN, 1),
    "prune_charges": lambda s: s.prune_charges(1.0, 1),
    "list_accounts": lambda s: s.list_accounts(),
    "credit_totals": lambda s: s.credit_totals(),
    "begin_withdrawal": lambda s: s.begin_withdrawal(withdrawal(1, 1, 1)),
    "finish_withdrawal": lambda s: s.finish_withdrawal(payment_hash(1), FAILED, Msat(0), 1.0),
    "list_withdrawals": lambda s: s.list_withdrawals(),
    "list_open_credit_invoices": lambda s: s.list_open_credit_invoices(TOKEN, 1),
}


@pytest.mark.parametrize("call", sorted(CALLS))
async def test_credit_calls_after_close_raise_store_closed(store: Store, call: str) -> None:
    await store.close()
    with pytest.raises(StoreClosed, match="closed"):
        await CALLS[call](store)


# --- SQLite only: one file shared by several stores and processes -----------------------------


async def test_two_stores_on_one_file_never_overdraw(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    first, second = await SqliteStore.open(path), await SqliteStore.open(path)
    try:
        await fund(first, 1, 10 * 1000)
        results = await asyncio.gather(
            *(store.reserve(TOKEN, Msat(1000), FAR_FUTURE) for store in (first, second) * 20)
        )
        assert sum(result.reservation is not None for result in results) == 10
        assert amounts(await account(second)) == (10_000, 0, 10_000, 0, 0)
        await asyncio.gather(*(s.apply_update(settled(1)) for s in (first, second) * 10))
        assert (await account(first)).credited_msat == 10_000  # credited once
    finally:
        await first.close()
        await second.close()


RESERVER = """
import asyncio, sys
from gateway.ports import Msat
from gateway.store import SqliteStore

async def main() -> None:
    store = await SqliteStore.open(sys.argv[1])
    token_id = bytes.fromhex(sys.argv[2])
    print("ready", flush=True)
    sys.stdin.readline()  # start together
    results = await asyncio.gather(
        *(store.reserve(token_id, Msat(1000), 1e12) for _ in range(int(sys.argv[3])))
    )
    await store.close()
    print(sum(result.reservation is not None for result in results), flush=True)

asyncio.run(main())
"""


async def test_two_processes_reserving_on_one_file_take_exactly_the_balance(
    tmp_path: Path,
) -> None:
    path = tmp_path / "gateway.db"
    store = await SqliteStore.open(path)
    try:
        await fund(store, 1, 25 * 1000 + 500)
        children = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                RESERVER,
                str(path),
                TOKEN.hex(),
                "40",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            for _ in range(2)
        ]
        for child in children:
            assert child.stdout is not None
            assert await asyncio.wait_for(child.stdout.readline(), timeout=60) == b"ready\n"
        outputs = await asyncio.gather(*(child.communicate(b"go\n") for child in children))
        for child, (_, stderr) in zip(children, outputs, strict=True):
            assert child.returncode == 0, stderr.decode()
        granted = [int(stdout) for stdout, _ in outputs]
        assert sum(granted) == 25, granted
        assert amounts(await account(store)) == (25_500, 0, 25_000, 0, 500)
        assert await store.release_expired_reservations(FAR_FUTURE * 2, 100) == 25
        assert amounts(await account(store)) == (25_500, 0, 0, 0, 25_500)
    finally:
        await store.close()
