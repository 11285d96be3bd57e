"""``Store.revenue`` (the admin dashboard's chart), run against every store."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from gateway.ports import InvoiceState, Msat, RevenueBucket, Store
from gateway.store import MemoryStore, PostgresStore, SqliteStore
from gateway.store.credit import SETTLED_AFTER_EXPIRY
from tests.unit.store.test_store_contract import make_record, make_update

HOUR = 3600
DAY = 86_400
T0 = 1_700_006_400  # a multiple of HOUR and of DAY (2023-11-15T00:00Z)


@pytest_asyncio.fixture(
    params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    opened: Store
    if request.param == "memory":
        opened = MemoryStore()
    elif request.param == "sqlite":
        opened = await SqliteStore.open(tmp_path / "gateway.db")
    else:
        opened = await PostgresStore.open(request.getfixturevalue("postgres_url"))
    try:
        yield opened
    finally:
        await opened.close()


async def settle(
    store: Store, n: int, at: float | None, paid: int, service: str = "weather"
) -> None:
    await store.add_invoice(make_record(n, service=service, created_at=T0 - 10 + n))
    await store.apply_update(make_update(n, InvoiceState.SETTLED, n, paid, at))


async def test_an_empty_store_has_no_revenue(store: Store) -> None:
    assert await store.revenue(0, HOUR) == []


async def test_sums_settled_invoices_per_hour_and_service(store: Store) -> None:
    await settle(store, 1, T0 + 10.5, 1000)
    await settle(store, 2, T0 + HOUR - 0.25, 2000)  # the same hour, its last moment
    await settle(store, 3, T0 + HOUR, 4000)  # the next hour begins
    await settle(store, 4, T0 + 20, 8000, service="maps")

    assert await store.revenue(T0, HOUR) == [
        RevenueBucket(T0, "maps", 1, Msat(8000)),
        RevenueBucket(T0, "weather", 2, Msat(3000)),
        RevenueBucket(T0 + HOUR, "weather", 1, Msat(4000)),
    ]
    # Per day: one bucket per service.
    assert await store.revenue(T0, DAY) == [
        RevenueBucket(T0, "maps", 1, Msat(8000)),
        RevenueBucket(T0, "weather", 3, Msat(7000)),
    ]


async def test_since_leaves_out_earlier_settlements_and_other_states(store: Store) -> None:
    await settle(store, 1, T0 - 1, 1000)  # before since
    await settle(store, 2, T0, 2000)  # at since: counted
    await store.add_invoice(make_record(3, created_at=T0 + 5))  # OPEN
    await store.add_invoice(make_record(4, created_at=T0 + 5))
    await store.apply_update(make_update(4, InvoiceState.CANCELED))
    await store.add_invoice(make_record(5, created_at=T0 + 5))
    await store.apply_update(make_update(5, InvoiceState.ACCEPTED, 0, 5000, None))

    assert await store.revenue(T0, HOUR) == [RevenueBucket(T0, "weather", 1, Msat(2000))]


async def test_a_settlement_without_a_time_counts_at_its_creation(store: Store) -> None:
    record = make_record(1, created_at=T0 + 2 * HOUR + 1)
    await store.add_invoice(record)
    await store.apply_update(make_update(1, InvoiceState.SETTLED, 1, 0, None))

    # Nothing reported paid: the invoice's amount, as a credit purchase counts it.
    assert await store.revenue(T0, HOUR) == [
        RevenueBucket(T0 + 2 * HOUR, "weather", 1, record.amount_msat)
    ]


async def test_an_invoice_added_settled_counts(store: Store) -> None:
    record = make_record(
        1,
        state=InvoiceState.SETTLED,
        amount_paid_msat=Msat(777),
        settled_at=float(T0 + 5),
        settle_index=1,
    )
    await store.add_invoice(dataclasses.replace(record))

    assert await store.revenue(T0, DAY) == [RevenueBucket(T0, "weather", 1, Msat(777))]


async def test_the_bucket_must_be_a_second_or_more(store: Store) -> None:
    with pytest.raises(ValueError, match="bucket_seconds"):
        await store.revenue(0, 0)


async def test_revenue_reads_inside_a_transaction(store: Store) -> None:
    await settle(store, 1, T0 + 1, 1000)
    async with store.transaction() as tx:
        assert await tx.revenue(T0, HOUR) == [RevenueBucket(T0, "weather", 1, Msat(1000))]


async def test_an_invoice_expired_long_before_since_is_not_read(store: Store) -> None:
    # No node settles an invoice this long past its expiry: the query skips such rows.
    late = make_record(1, created_at=T0 - 20 * DAY, expires_at=T0 - SETTLED_AFTER_EXPIRY - 1)
    held = make_record(2, created_at=T0 - 14 * DAY, expires_at=T0 - SETTLED_AFTER_EXPIRY + 1)
    for n, record in ((1, late), (2, held)):
        await store.add_invoice(record)
        await store.apply_update(make_update(n, InvoiceState.SETTLED, n, 1000 * n, T0 + 5))

    assert await store.revenue(T0, DAY) == [RevenueBucket(T0, "weather", 1, Msat(2000))]
