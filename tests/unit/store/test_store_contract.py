"""The ``Store`` contract, run against every implementation (memory, and SQLite in tmp_path)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from gateway.ports import (
    Cursor,
    InvoiceRecord,
    InvoiceState,
    InvoiceUpdate,
    Msat,
    PaymentHash,
    Store,
    StoreOperations,
)
from gateway.store import MemoryStore, PostgresStore, SqliteStore, StoreClosed, StoreError

OPEN, ACCEPTED, SETTLED, CANCELED, EXPIRED = (
    InvoiceState.OPEN,
    InvoiceState.ACCEPTED,
    InvoiceState.SETTLED,
    InvoiceState.CANCELED,
    InvoiceState.EXPIRED,
)


def payment_hash(n: int) -> PaymentHash:
    return PaymentHash(hashlib.sha256(b"invoice %d" % n).digest())


def make_record(n: int, **changes: Any) -> InvoiceRecord:
    record = InvoiceRecord(
        payment_hash=payment_hash(n),
        payment_request=f"lnbcrt{n}n1fake",
        amount_msat=Msat(1000 * n + 1),
        token_id=hashlib.sha256(b"token %d" % n).digest(),
        service="weather",
        method="GET",
        path=f"/forecast/{n}",
        state=OPEN,
        created_at=1_700_000_000.25 + n,
        expires_at=1_700_003_600.5 + n,
        add_index=n + 1,
    )
    return dataclasses.replace(record, **changes)


def make_update(
    n: int,
    state: InvoiceState,
    settle_index: int = 0,
    paid: int = 0,
    settled_at: float | None = None,
) -> InvoiceUpdate:
    return InvoiceUpdate(
        payment_hash=payment_hash(n),
        state=state,
        settle_index=settle_index,
        amount_paid_msat=Msat(paid),
        settled_at=settled_at,
    )


async def _opened(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if kind == "memory":
        return MemoryStore()
    if kind == "sqlite":
        return await SqliteStore.open(tmp_path / "gateway.db")
    return await PostgresStore.open(request.getfixturevalue("postgres_url"))


@pytest_asyncio.fixture(
    params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    opened = await _opened(request.param, request, tmp_path)
    try:
        yield opened
    finally:
        await opened.close()


@pytest_asyncio.fixture(params=["memory", "sqlite"])
async def serialised_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """The stores that run their transactions one at a time, their own calls waiting for an
    open one; ``PostgresStore`` runs them beside each other on pooled connections (READ
    COMMITTED, row and advisory locks where a write needs them): its counterparts are in
    test_postgres_store.py."""
    opened = await _opened(request.param, request, tmp_path)
    try:
        yield opened
    finally:
        await opened.close()


# --- root keys -------------------------------------------------------------------------------


async def test_root_key_round_trip(store: Store) -> None:
    await store.put_root_key(b"k1" * 16, b"t1" * 16, b"r1" * 16)
    assert await store.get_root_key(b"k1" * 16) == b"r1" * 16
    assert await store.get_root_key(b"k2" * 16) is None


async def test_put_root_key_again_is_a_no_op(store: Store) -> None:
    await store.put_root_key(b"k" * 32, b"t" * 32, b"r" * 32)
    await store.put_root_key(b"k" * 32, b"t" * 32, b"r" * 32)
    assert await store.get_root_key(b"k" * 32) == b"r" * 32


async def test_a_different_root_key_under_the_same_id_is_refused(store: Store) -> None:
    await store.put_root_key(b"k" * 32, b"t" * 32, b"r" * 32)
    with pytest.raises(StoreError, match="different root key"):
        await store.put_root_key(b"k" * 32, b"t" * 32, b"X" * 32)
    assert await store.get_root_key(b"k" * 32) == b"r" * 32


async def test_revoke_deletes_the_token_keys_once(store: Store) -> None:
    await store.put_root_key(b"a" * 32, b"t" * 32, b"r1" * 16)
    await store.put_root_key(b"b" * 32, b"t" * 32, b"r2" * 16)
    await store.put_root_key(b"c" * 32, b"u" * 32, b"r3" * 16)

    assert await store.revoke_token(b"t" * 32) is True
    assert await store.revoke_token(b"t" * 32) is False

    assert await store.get_root_key(b"a" * 32) is None
    assert await store.get_root_key(b"b" * 32) is None
    assert await store.get_root_key(b"c" * 32) == b"r3" * 16


async def test_revoking_an_unknown_token_is_false(store: Store) -> None:
    assert await store.revoke_token(b"nobody" * 5) is False


# --- invoices --------------------------------------------------------------------------------


async def test_invoice_round_trip_keeps_every_field(store: Store) -> None:
    plain = make_record(1)
    settled = make_record(
        2,
        state=SETTLED,
        settle_index=7,
        amount_paid_msat=Msat(2001),
        settled_at=1_700_000_123.75,
    )
    await store.add_invoice(plain)
    await store.add_invoice(settled)

    assert await store.get_invoice(plain.payment_hash) == plain
    assert await store.get_invoice(settled.payment_hash) == settled
    assert await store.get_invoice(payment_hash(3)) is None


async def test_add_invoice_again_changes_nothing(store: Store) -> None:
    original = make_record(1)
    await store.add_invoice(original)
    await store.add_invoice(original)
    await store.add_invoice(make_record(1, state=SETTLED, settle_index=9))
    await store.add_invoice(make_record(1, amount_msat=Msat(5), path="/other"))

    assert await store.get_invoice(original.payment_hash) == original
    assert await store.list_invoices() == [original]


async def test_apply_update_to_an_unknown_hash_is_none(store: Store) -> None:
    assert await store.apply_update(make_update(1, SETTLED, 1, 1001, 5.0)) is None
    assert await store.get_invoice(payment_hash(1)) is None
    assert await store.list_invoices() == []


async def test_apply_update_walks_the_states(store: Store) -> None:
    record = make_record(1)
    await store.add_invoice(record)

    accepted = dataclasses.replace(record, state=ACCEPTED, amount_paid_msat=Msat(1001))
    assert await store.apply_update(make_update(1, ACCEPTED, paid=1001)) == accepted
    assert await store.get_invoice(record.payment_hash) == accepted

    settled = dataclasses.replace(
        record,
        state=SETTLED,
        settle_index=4,
        amount_paid_msat=Msat(1001),
        settled_at=1_700_000_500.5,
    )
    assert await store.apply_update(make_update(1, SETTLED, 4, 1001, 1_700_000_500.5)) == settled
    assert await store.get_invoice(record.payment_hash) == settled


async def test_accepted_may_return_to_open(store: Store) -> None:
    # A hold invoice whose HTLCs are cancelled before settlement goes back to OPEN in LND.
    await store.add_invoice(make_record(1))
    await store.apply_update(make_update(1, ACCEPTED, paid=1001))
    assert await store.apply_update(make_update(1, OPEN)) == await store.get_invoice(
        payment_hash(1)
    )
    got = await store.get_invoice(payment_hash(1))
    assert got is not None
    assert (got.state, got.amount_paid_msat) == (OPEN, 0)


@pytest.mark.parametrize("terminal", [SETTLED, CANCELED])
@pytest.mark.parametrize("later", [OPEN, ACCEPTED, SETTLED, CANCELED, EXPIRED])
async def test_a_terminal_state_never_changes(
    store: Store, terminal: InvoiceState, later: InvoiceState
) -> None:
    await store.add_invoice(make_record(1))
    paid, settled_at = (1001, 1_700_000_500.0) if terminal is SETTLED else (0, None)
    await store.apply_update(make_update(1, terminal, 5, paid, settled_at))
    before = await store.get_invoice(payment_hash(1))

    # a replayed or stale event: the hash is tracked, so the record comes back, unmoved
    assert await store.apply_update(make_update(1, later, 3, 0, None)) == before
    assert await store.apply_update(make_update(1, later, 9, 77, 1.0)) == before

    after = await store.get_invoice(payment_hash(1))
    assert after == before
    assert after is not None
    assert after.state is terminal


async def test_open_becomes_expired(store: Store) -> None:
    record = make_record(1)
    await store.add_invoice(record)
    expired = dataclasses.replace(record, state=EXPIRED)
    assert await store.apply_update(make_update(1, EXPIRED)) == expired
    assert await store.get_invoice(record.payment_hash) == expired


@pytest.mark.parametrize("later", [OPEN, ACCEPTED, EXPIRED])
async def test_expired_never_goes_back(store: Store, later: InvoiceState) -> None:
    await store.add_invoice(make_record(1))
    await store.apply_update(make_update(1, EXPIRED))
    before = await store.get_invoice(payment_hash(1))

    assert await store.apply_update(make_update(1, later, 3, 77, 1.0)) == before

    assert await store.get_invoice(payment_hash(1)) == before


async def test_expired_still_takes_a_late_settlement(store: Store) -> None:
    record = make_record(1)
    await store.add_invoice(record)
    await store.apply_update(make_update(1, EXPIRED))

    settled = dataclasses.replace(
        record,
        state=SETTLED,
        settle_index=7,
        amount_paid_msat=Msat(1001),
        settled_at=1_700_009_000.5,
    )
    assert await store.apply_update(make_update(1, SETTLED, 7, 1001, 1_700_009_000.5)) == settled
    assert await store.get_invoice(record.payment_hash) == settled


async def test_expired_yields_to_the_nodes_cancel(store: Store) -> None:
    await store.add_invoice(make_record(1))
    await store.apply_update(make_update(1, EXPIRED))
    await store.apply_update(make_update(1, CANCELED))
    got = await store.get_invoice(payment_hash(1))
    assert got is not None
    assert got.state is CANCELED


async def test_an_accepted_invoice_is_never_marked_expired(store: Store) -> None:
    # HTLCs are held: only the node's settle or cancel may end it.
    await store.add_invoice(make_record(1))
    await store.apply_update(make_update(1, ACCEPTED, paid=1001))
    await store.apply_update(make_update(1, EXPIRED))
    got = await store.get_invoice(payment_hash(1))
    assert got is not None
    assert (got.state, got.amount_paid_msat) == (ACCEPTED, 1001)


async def test_an_invoice_added_settled_stays_settled(store: Store) -> None:
    await store.add_invoice(make_record(1, state=SETTLED, settle_index=3))
    await store.apply_update(make_update(1, OPEN, 0))
    got = await store.get_invoice(payment_hash(1))
    assert got is not None
    assert (got.state, got.settle_index) == (SETTLED, 3)


async def test_settle_index_never_goes_down(store: Store) -> None:
    await store.add_invoice(make_record(1, settle_index=6))
    await store.apply_update(make_update(1, ACCEPTED, settle_index=2))
    got = await store.get_invoice(payment_hash(1))
    assert got is not None
    assert (got.state, got.settle_index) == (ACCEPTED, 6)

    await store.apply_update(make_update(1, SETTLED, settle_index=8, paid=1001, settled_at=9.5))
    got = await store.get_invoice(payment_hash(1))
    assert got is not None
    assert got.settle_index == 8


async def test_list_is_newest_first_and_ties_go_to_the_later_insert(store: Store) -> None:
    middle = make_record(1, created_at=200.0)
    oldest = make_record(2, created_at=100.0)
    newest = make_record(3, created_at=300.0)
    tie_first = make_record(4, created_at=200.0)
    tie_second = make_record(5, created_at=200.0)
    for record in (middle, oldest, newest, tie_first, tie_second):
        await store.add_invoice(record)

    assert await store.list_invoices() == [newest, tie_second, tie_first, middle, oldest]


async def test_list_filters_by_state_and_limits(store: Store) -> None:
    for n in range(6):
        await store.add_invoice(make_record(n, created_at=float(n)))
    for n in (1, 3, 4):
        await store.apply_update(make_update(n, SETTLED, n, 1, 10.0))
    await store.apply_update(make_update(5, CANCELED))

    def numbers(records: list[InvoiceRecord]) -> list[int]:
        return [record.add_index - 1 for record in records]

    assert numbers(await store.list_invoices()) == [5, 4, 3, 2, 1, 0]
    assert numbers(await store.list_invoices(SETTLED)) == [4, 3, 1]
    assert numbers(await store.list_invoices(OPEN)) == [2, 0]
    assert numbers(await store.list_invoices(CANCELED)) == [5]
    assert await store.list_invoices(ACCEPTED) == []
    assert numbers(await store.list_invoices(limit=2)) == [5, 4]
    assert numbers(await store.list_invoices(SETTLED, limit=2)) == [4, 3]
    assert numbers(await store.list_invoices(state=OPEN, limit=10)) == [2, 0]
    assert await store.list_invoices(limit=0) == []


async def test_a_negative_limit_is_refused(store: Store) -> None:
    with pytest.raises(ValueError, match="limit"):
        await store.list_invoices(limit=-1)


# --- cursor ----------------------------------------------------------------------------------


async def test_cursor_starts_at_zero(store: Store) -> None:
    assert await store.get_cursor() == Cursor(0, 0)


async def test_cursor_only_grows_per_index(store: Store) -> None:
    await store.save_cursor(Cursor(add_index=5, settle_index=1))
    assert await store.get_cursor() == Cursor(5, 1)

    await store.save_cursor(Cursor(add_index=3, settle_index=4))
    assert await store.get_cursor() == Cursor(5, 4)

    await store.save_cursor(Cursor(0, 0))
    assert await store.get_cursor() == Cursor(5, 4)

    await store.save_cursor(Cursor(5, 4))
    await store.save_cursor(Cursor(6, 7))
    assert await store.get_cursor() == Cursor(6, 7)


# --- overdue and pruned invoices -------------------------------------------------------------


def expiring(n: int, state: InvoiceState, expires_at: float) -> InvoiceRecord:
    return make_record(n, state=state, expires_at=expires_at)


async def add_with_key(store: Store, record: InvoiceRecord) -> bytes:
    """Store the invoice and its token's root key, as a challenge does; returns the key id."""
    key_id = hashlib.sha256(b"key " + record.payment_hash).digest()
    await store.add_invoice(record)
    await store.put_root_key(key_id, record.token_id, b"r" * 32)
    return key_id


async def test_list_overdue_is_open_past_the_time_earliest_first(store: Store) -> None:
    await store.add_invoice(expiring(1, OPEN, 300.0))
    await store.add_invoice(expiring(2, OPEN, 100.0))
    await store.add_invoice(expiring(3, OPEN, 200.0))
    await store.add_invoice(expiring(4, OPEN, 400.0))  # not before 400: not yet
    for n, state in enumerate((ACCEPTED, SETTLED, CANCELED, EXPIRED), start=5):
        await store.add_invoice(expiring(n, state, 50.0))

    overdue = await store.list_overdue(400.0, 10)
    assert [record.payment_hash for record in overdue] == [payment_hash(n) for n in (2, 3, 1)]
    assert overdue[0] == expiring(2, OPEN, 100.0)
    assert [r.payment_hash for r in await store.list_overdue(400.0, 2)] == [
        payment_hash(2),
        payment_hash(3),
    ]
    assert await store.list_overdue(400.0, 0) == []
    assert await store.list_overdue(100.0, 10) == []


async def test_prune_deletes_unpaid_invoices_and_their_root_keys(store: Store) -> None:
    canceled = await add_with_key(store, expiring(1, CANCELED, 100.0))
    expired = await add_with_key(store, expiring(2, EXPIRED, 150.0))
    recent = await add_with_key(store, expiring(3, CANCELED, 500.0))  # within the retention

    assert await store.prune_unpaid(200.0, 10) == 2

    assert await store.get_invoice(payment_hash(1)) is None
    assert await store.get_invoice(payment_hash(2)) is None
    assert await store.get_root_key(canceled) is None
    assert await store.get_root_key(expired) is None
    assert await store.get_invoice(payment_hash(3)) is not None
    assert await store.get_root_key(recent) == b"r" * 32
    # idempotent: nothing left to prune
    assert await store.prune_unpaid(200.0, 10) == 0


@pytest.mark.parametrize("state", [OPEN, ACCEPTED, SETTLED])
async def test_prune_never_touches_an_open_or_paid_invoice(
    store: Store, state: InvoiceState
) -> None:
    key_id = await add_with_key(store, expiring(1, state, 100.0))
    assert await store.prune_unpaid(1e12, 10) == 0
    got = await store.get_invoice(payment_hash(1))
    assert got is not None
    assert got.state is state
    assert await store.get_root_key(key_id) == b"r" * 32


async def test_an_expired_invoice_settled_late_is_kept(store: Store) -> None:
    key_id = await add_with_key(store, expiring(1, OPEN, 100.0))
    await store.apply_update(make_update(1, EXPIRED))
    await store.apply_update(make_update(1, SETTLED, 2, 1001, 90.0))
    assert await store.prune_unpaid(1e12, 10) == 0
    assert await store.get_root_key(key_id) == b"r" * 32


async def test_prune_goes_in_batches_of_the_limit(store: Store) -> None:
    keys = [await add_with_key(store, expiring(n, CANCELED, 100.0 + n)) for n in range(7)]
    assert await store.prune_unpaid(1000.0, 3) == 3
    assert len(await store.list_invoices()) == 4
    assert await store.prune_unpaid(1000.0, 3) == 3
    assert await store.prune_unpaid(1000.0, 3) == 1
    assert await store.prune_unpaid(1000.0, 3) == 0
    assert await store.list_invoices() == []
    assert [await store.get_root_key(key_id) for key_id in keys] == [None] * 7
    assert await store.prune_unpaid(1000.0, 0) == 0


async def test_prune_keeps_other_tokens_root_keys(store: Store) -> None:
    await add_with_key(store, expiring(1, CANCELED, 100.0))
    await store.put_root_key(b"k" * 32, b"another token" * 2, b"x" * 32)
    await store.prune_unpaid(1000.0, 10)
    assert await store.get_root_key(b"k" * 32) == b"x" * 32


# --- concurrency -----------------------------------------------------------------------------


async def test_concurrent_writes_leave_consistent_results(store: Store) -> None:
    count = 100
    rng = random.Random(402)

    # 100 distinct adds racing 100 conflicting re-adds of the same hashes
    firsts = [make_record(n) for n in range(count)]
    seconds = [make_record(n, path="/conflict", amount_msat=Msat(1)) for n in range(count)]
    adds: list[Awaitable[None]] = [store.add_invoice(record) for record in firsts + seconds]
    await asyncio.gather(*adds)

    stored = await store.list_invoices()
    assert len(stored) == count
    for record in stored:
        n = record.add_index - 1
        assert record in (firsts[n], seconds[n])

    # 100 settlements racing stale OPEN replays, cursor saves and reads, in random order
    settles = [make_update(n, SETTLED, n + 1, 1000 * n + 1, 500.0 + n) for n in range(count)]
    stale = [make_update(n, OPEN, 0) for n in range(count)]

    async def tracked(update: InvoiceUpdate) -> bool:
        return await store.apply_update(update) is not None

    calls: list[Awaitable[object]] = [tracked(u) for u in settles + stale]
    calls += [store.save_cursor(Cursor(n, count - n)) for n in range(count)]
    calls += [store.get_invoice(payment_hash(n)) for n in range(count)]
    rng.shuffle(calls)
    results = await asyncio.gather(*calls)

    assert results.count(True) == 2 * count  # every update found its invoice
    assert await store.get_cursor() == Cursor(count - 1, count)
    assert len(await store.list_invoices(OPEN)) == 0
    settled = await store.list_invoices(SETTLED)
    assert len(settled) == count
    for record in settled:
        n = record.add_index - 1
        assert record.settle_index == n + 1
        assert record.amount_paid_msat == 1000 * n + 1
        assert record.settled_at == 500.0 + n


# --- transactions ----------------------------------------------------------------------------


class Abort(Exception):
    """Raised inside a transaction to make it roll back."""


async def write_everything(tx: StoreOperations) -> None:
    """One write of each kind, on a store that holds ``seed``'s rows."""
    await tx.add_invoice(make_record(2))
    await tx.put_root_key(b"k2" * 16, b"t2" * 16, b"r2" * 16)
    await tx.apply_update(make_update(1, SETTLED, 3, 1001, 9.5))
    await tx.revoke_token(b"t1" * 16)
    await tx.save_cursor(Cursor(7, 3))
    assert await tx.prune_unpaid(1e12, 10) == 1


async def seed(store: Store) -> None:
    await store.add_invoice(make_record(1))
    await store.put_root_key(b"k1" * 16, b"t1" * 16, b"r1" * 16)
    await store.add_invoice(make_record(3, state=CANCELED))


async def snapshot(
    store: Store,
) -> tuple[list[InvoiceRecord], bytes | None, bytes | None, Cursor]:
    return (
        await store.list_invoices(),
        await store.get_root_key(b"k1" * 16),
        await store.get_root_key(b"k2" * 16),
        await store.get_cursor(),
    )


async def test_a_transaction_commits_its_writes_together(store: Store) -> None:
    await seed(store)
    async with store.transaction() as tx:
        await write_everything(tx)
        # its reads see its own writes
        assert await tx.get_root_key(b"k2" * 16) == b"r2" * 16
        assert await tx.get_cursor() == Cursor(7, 3)
    invoices, old_key, new_key, cursor = await snapshot(store)
    assert [record.state for record in invoices] == [OPEN, SETTLED]  # 3 was pruned
    assert (old_key, new_key, cursor) == (None, b"r2" * 16, Cursor(7, 3))


@pytest.mark.parametrize("failure", ["exception", "store error", "cancellation"])
async def test_a_failed_transaction_leaves_nothing_written(store: Store, failure: str) -> None:
    await seed(store)
    before = await snapshot(store)
    inside = asyncio.Event()

    async def work() -> None:
        async with store.transaction() as tx:
            await write_everything(tx)
            if failure == "exception":
                raise Abort
            if failure == "store error":  # a different root key under an existing id
                await tx.put_root_key(b"k2" * 16, b"t2" * 16, b"other" * 6)
            inside.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(work())
    if failure == "cancellation":
        await inside.wait()
        task.cancel()
    with pytest.raises(
        {"exception": Abort, "store error": StoreError}.get(failure, asyncio.CancelledError)
    ):
        await task
    assert await snapshot(store) == before


async def test_a_challenge_is_stored_whole_or_not_at_all(store: Store) -> None:
    # challenge(): the invoice and its token's root key, one unit of work.
    await store.put_root_key(b"k" * 32, b"t" * 32, b"r" * 32)

    async def challenge() -> None:
        async with store.transaction() as tx:
            await tx.add_invoice(make_record(1))
            await tx.put_root_key(b"k" * 32, b"t" * 32, b"X" * 32)

    with pytest.raises(StoreError, match="different root key"):
        await challenge()
    assert await store.get_invoice(payment_hash(1)) is None


async def test_concurrent_transactions_run_one_after_the_other(serialised_store: Store) -> None:
    store = serialised_store

    # Read, yield to the loop, write what was read plus one: interleaved, updates are lost.
    async def increment() -> None:
        async with store.transaction() as tx:
            cursor = await tx.get_cursor()
            await asyncio.sleep(0)
            await tx.add_invoice(make_record(cursor.add_index))
            await tx.save_cursor(Cursor(cursor.add_index + 1, 0))

    await asyncio.gather(*(increment() for _ in range(20)))
    assert await store.get_cursor() == Cursor(20, 0)
    assert len(await store.list_invoices()) == 20


async def test_store_calls_wait_for_an_open_transaction(serialised_store: Store) -> None:
    store = serialised_store
    written = asyncio.Event()
    release = asyncio.Event()

    async def work() -> None:
        async with store.transaction() as tx:
            await tx.add_invoice(make_record(1))
            await tx.save_cursor(Cursor(5, 5))
            written.set()
            await release.wait()
            raise Abort

    task = asyncio.create_task(work())
    await written.wait()
    read = asyncio.ensure_future(store.get_invoice(payment_hash(1)))
    write = asyncio.ensure_future(store.save_cursor(Cursor(2, 2)))
    await asyncio.sleep(0.05)
    assert not read.done()
    assert not write.done()  # nor could the rollback undo it
    release.set()
    with pytest.raises(Abort):
        await task
    assert await read is None  # never saw the uncommitted row
    await write
    assert await store.get_cursor() == Cursor(2, 2)


async def test_transactions_refuse_to_nest_or_to_deadlock(store: Store) -> None:
    async with store.transaction() as tx:
        with pytest.raises(RuntimeError, match="do not nest"):
            async with store.transaction():
                pass
        with pytest.raises(RuntimeError, match="transaction's methods"):
            await store.get_cursor()
        await tx.save_cursor(Cursor(1, 1))
    assert await store.get_cursor() == Cursor(1, 1)


async def test_a_transaction_cannot_be_used_after_it_ends(store: Store) -> None:
    async with store.transaction() as tx:
        pass
    with pytest.raises(RuntimeError, match="ended"):
        await tx.get_cursor()


async def test_close_lets_an_open_transaction_and_the_calls_waiting_on_it_finish(
    serialised_store: Store,
) -> None:
    store = serialised_store
    written = asyncio.Event()

    async def work() -> None:
        async with store.transaction() as tx:
            await tx.save_cursor(Cursor(3, 3))
            written.set()
            await asyncio.sleep(0.05)
            await tx.save_cursor(Cursor(4, 4))

    task = asyncio.create_task(work())
    await written.wait()
    queued = asyncio.ensure_future(store.get_cursor())  # made before close(): it still runs
    await asyncio.sleep(0)
    await store.close()
    await task  # committed, not cut off
    assert await queued == Cursor(4, 4)
    with pytest.raises(StoreClosed):
        async with store.transaction():
            pass


# --- close -----------------------------------------------------------------------------------

CALLS: dict[str, Callable[[Store], Awaitable[object]]] = {
    "put_root_key": lambda s: s.put_root_key(b"k", b"t", b"r"),
    "get_root_key": lambda s: s.get_root_key(b"k"),
    "revoke_token": lambda s: s.revoke_token(b"t"),
    "add_invoice": lambda s: s.add_invoice(make_record(1)),
    "apply_update": lambda s: s.apply_update(make_update(1, SETTLED)),
    "get_invoice": lambda s: s.get_invoice(payment_hash(1)),
    "list_invoices": lambda s: s.list_invoices(),
    "get_cursor": lambda s: s.get_cursor(),
    "save_cursor": lambda s: s.save_cursor(Cursor(1, 1)),
    "list_overdue": lambda s: s.list_overdue(1.0, 1),
    "prune_unpaid": lambda s: s.prune_unpaid(1.0, 1),
    "transaction": lambda s: s.transaction().__aenter__(),
}


@pytest.mark.parametrize("call", sorted(CALLS))
async def test_use_after_close_raises_store_closed(store: Store, call: str) -> None:
    await store.close()
    with pytest.raises(StoreClosed, match="closed"):
        await CALLS[call](store)


async def test_close_twice_is_harmless(store: Store) -> None:
    await store.close()
    await store.close()


async def test_close_waits_for_writes_already_started(store: Store, tmp_path: Path) -> None:
    pending = [asyncio.ensure_future(store.add_invoice(make_record(n))) for n in range(20)]
    await asyncio.sleep(0)  # let them start
    await store.close()
    await asyncio.gather(*pending)  # none failed
    if isinstance(store, SqliteStore):
        reopened = await SqliteStore.open(tmp_path / "gateway.db")
        try:
            assert len(await reopened.list_invoices()) == 20
        finally:
            await reopened.close()
