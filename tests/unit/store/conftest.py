"""The store every contract suite here runs against, on a clock the test moves by hand
(``clock``, a ``FakeClock`` at ``tests.fakes.NOW``): memory, SQLite and PostgreSQL. A suite
that needs other stores defines its own ``store`` fixture, which takes precedence.
``two_stores``: two stores on one database, for what only the SQL stores promise across
processes and instances."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from gateway.ports import Store
from gateway.store import MemoryStore, PostgresStore, SqliteStore
from tests.fakes import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest_asyncio.fixture(
    params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> AsyncIterator[Store]:
    opened: Store
    if request.param == "memory":
        opened = MemoryStore(clock=clock)
    elif request.param == "sqlite":
        opened = await SqliteStore.open(tmp_path / "gateway.db", clock=clock)
    else:
        opened = await PostgresStore.open(request.getfixturevalue("postgres_url"), clock=clock)
    try:
        yield opened
    finally:
        await opened.close()


@pytest_asyncio.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def two_stores(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[Store, Store]]:
    """Two stores on one database: two processes (SQLite) or two instances (PostgreSQL)."""
    first: Store
    second: Store
    if request.param == "sqlite":
        first = await SqliteStore.open(tmp_path / "gateway.db")
        second = await SqliteStore.open(tmp_path / "gateway.db")
    else:
        url = request.getfixturevalue("postgres_url")
        first, second = await PostgresStore.open(url), await PostgresStore.open(url)
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()
