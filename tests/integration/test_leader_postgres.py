"""Leadership and the global rate limit across instances sharing a real PostgreSQL database:
one ``PostgresStore`` per instance, as separate gateway processes have."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from gateway import runtime
from gateway.config import (
    MIN_CHALLENGES_PER_SECOND,
    Config,
    LndConfig,
    RateLimitConfig,
    RouteConfig,
    StoreConfig,
)
from gateway.leader import LEADER_LOCK, Leadership, PostgresLease
from gateway.ports import SystemClock
from gateway.service import Deny, PaymentChallenge, RequestInfo
from gateway.service.rate_limiter import GlobalRateLimiter
from gateway.store.postgres import PostgresStore
from gateway.supervisor import Supervisor
from tests.fakes import FakeInvoiceBackend, fake_lnd_client

pytestmark = pytest.mark.postgres

# The defaults of [store] leader_poll and leader_check.
POLL = CHECK = 1.0
# How long another instance may take to lead once the leader's session ended: a poll, and
# some slack for a loaded machine.
TAKEOVER = POLL + 1.0


@pytest_asyncio.fixture
async def stores(postgres_url: str) -> AsyncIterator[list[PostgresStore]]:
    """Two instances' stores on one database."""
    opened = [await PostgresStore.open(postgres_url) for _ in range(2)]
    try:
        yield opened
    finally:
        for store in opened:
            await store.close()


@pytest_asyncio.fixture
async def admin(postgres_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection of the database's administrator."""
    connection = await asyncpg.connect(postgres_url)
    try:
        yield connection
    finally:
        await connection.close()


async def _leader_pid(admin: asyncpg.Connection) -> int | None:
    """The backend holding ``LEADER_LOCK``: pg_locks shows a bigint key as its two halves."""
    pid: int | None = await admin.fetchval(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND classid = $1 AND objid = $2 AND objsubid = 1",
        LEADER_LOCK >> 32,
        LEADER_LOCK & 0xFFFF_FFFF,
    )
    return pid


def _leases(stores: list[PostgresStore]) -> list[PostgresLease]:
    return [PostgresLease(store, poll=POLL, check=CHECK) for store in stores]


async def test_one_instance_leads_and_another_takes_over_when_it_lets_go(
    stores: list[PostgresStore], admin: asyncpg.Connection
) -> None:
    first, second = _leases(stores)
    await asyncio.wait_for(first.acquire(), 5)
    waiting = asyncio.create_task(second.acquire())
    try:
        await asyncio.sleep(2 * POLL)  # it tried again, in vain
        assert not waiting.done()
        assert await _leader_pid(admin) is not None
        await first.release()
        await asyncio.wait_for(waiting, TAKEOVER)
    finally:
        waiting.cancel()
        for lease in (first, second):
            await lease.release()
    assert await _leader_pid(admin) is None


async def test_a_terminated_leader_loses_the_lease_and_another_takes_over(
    stores: list[PostgresStore], admin: asyncpg.Connection
) -> None:
    """``pg_terminate_backend``: the leader's session ends as when its process is killed."""
    first, second = _leases(stores)
    await asyncio.wait_for(first.acquire(), 5)
    waiting = asyncio.create_task(second.acquire())
    losing = asyncio.create_task(first.lost())
    try:
        await asyncio.sleep(0.1)
        old = await _leader_pid(admin)
        assert old is not None
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", old)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(asyncio.gather(waiting, losing), TAKEOVER)
        assert loop.time() - started < TAKEOVER
        new = await _leader_pid(admin)
        assert new is not None
        assert new != old
        # The old leader tries again: the lock is taken.
        retrying = asyncio.create_task(first.acquire())
        await asyncio.sleep(2 * POLL)
        assert not retrying.done()
        retrying.cancel()
    finally:
        for task in (waiting, losing):
            task.cancel()
        for lease in (first, second):
            await lease.release()


async def test_no_other_instance_leads_while_the_old_leaders_tasks_are_stopping(
    stores: list[PostgresStore], admin: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The leader's checks fail on a session that still lives (its lock still held), and its
    tasks take long to stop, say the hold executor finishing requests in flight: another
    instance's would recover (fail, refund) them meanwhile."""
    checks_fail = True
    fetchval = asyncpg.Connection.fetchval

    async def failing_checks(
        connection: asyncpg.Connection, query: str, *args: object, **options: Any
    ) -> Any:
        if query == "SELECT 1" and checks_fail:
            raise TimeoutError  # no answer in time
        return await fetchval(connection, query, *args, **options)

    monkeypatch.setattr(asyncpg.Connection, "fetchval", failing_checks)
    stopping, stop = asyncio.Event(), asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            stopping.set()
            await stop.wait()

    async def begin_old(term: Supervisor) -> None:
        term.start("l402-hold-executor", slow_to_stop)

    async def begin_new(term: Supervisor) -> None:
        return

    old = Leadership(PostgresLease(stores[0], poll=0.05, check=0.05), begin_old)
    new = Leadership(PostgresLease(stores[1], poll=0.05, check=CHECK), begin_new)
    async with Supervisor() as supervisor:
        supervisor.start("old", old.run)
        await _until(lambda: old.leading() is True)
        supervisor.start("new", new.run)
        await _until(lambda: new.leading() is False)  # asked, in vain

        await asyncio.wait_for(stopping.wait(), 5)  # two failed checks: the old one stops
        checks_fail = False
        await asyncio.sleep(0.5)  # ten polls of the new instance, in vain
        assert new.leading() is False
        holder = await _leader_pid(admin)
        assert holder is not None

        stop.set()  # the old term's tasks are gone: its session, and lock, go with them
        async with asyncio.timeout(5):
            while await _leader_pid(admin) in (None, holder):  # noqa: ASYNC110 - nothing sets an event
                await asyncio.sleep(0.01)
        # Whichever instance took the lock (the old one asks again at once) leads.
        await _until(lambda: bool(new.leading()) != bool(old.leading()))


async def test_the_rate_limit_holds_across_instances(stores: list[PostgresStore]) -> None:
    """A client's burst spread over two instances stays within burst + rate * elapsed."""
    rate, burst = 20.0, 10
    clock = SystemClock()
    limiters = [GlobalRateLimiter("challenge", store, rate, burst, 1000, clock) for store in stores]
    loop = asyncio.get_running_loop()
    started = loop.time()
    granted = 0
    while loop.time() - started < 1.0:
        waits = await asyncio.gather(
            *(random.choice(limiters).admit("10.0.0.1") for _ in range(20))
        )
        granted += sum(wait == 0.0 for wait in waits)
    elapsed = loop.time() - started
    assert burst <= granted <= burst + rate * elapsed + 1
    # Another client has a bucket of its own.
    assert await limiters[1].admit("10.0.0.2") == 0.0


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not condition():  # noqa: ASYNC110 - nothing sets an event to wait on
            await asyncio.sleep(0.01)


def _gateway_config(
    tmp_path: Path, postgres_url: str, limits: RateLimitConfig | None = None
) -> Config:
    (tmp_path / "tls.cert").write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    return Config(
        lnd=LndConfig(tls_cert=tmp_path / "tls.cert", macaroon_hex="00"),
        store=StoreConfig(url=postgres_url, leader_poll=0.1, leader_check=0.1),
        routes=(RouteConfig(pattern="/api/*", price_msat=10_000),),
        rate_limit=limits or RateLimitConfig(),
    )


async def test_two_gateways_share_a_clients_challenge_budget(
    tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime, "LndClient", fake_lnd_client(FakeInvoiceBackend()))
    limits = RateLimitConfig(challenges_per_second=MIN_CHALLENGES_PER_SECOND, burst=3)
    config = _gateway_config(tmp_path, postgres_url, limits)
    request = RequestInfo("GET", "/api/x", "10.0.0.1")
    async with (
        runtime.running_runtime(config) as first,
        runtime.running_runtime(config, watch=False) as second,
    ):
        decisions = [await gateway.service.authorize(request) for gateway in (first, second) * 3]
    assert [type(decision) for decision in decisions] == [PaymentChallenge] * 3 + [Deny] * 3
    assert {decision.status for decision in decisions if isinstance(decision, Deny)} == {429}


async def test_of_two_gateways_one_watches_and_the_other_takes_over_when_it_stops(
    tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime, "LndClient", fake_lnd_client(FakeInvoiceBackend()))
    config = _gateway_config(tmp_path, postgres_url)

    def watching(gateway: runtime.Runtime) -> bool:
        return any(task.name == "l402-invoice-watcher" for task in gateway.health())

    async with contextlib.AsyncExitStack() as first_stack:
        first = await first_stack.enter_async_context(runtime.running_runtime(config))
        await _until(lambda: watching(first))
        async with runtime.running_runtime(config) as second:
            await asyncio.sleep(0.5)  # five polls, in vain
            assert not watching(second)
            report = await second.readiness.check()
            assert report.as_json()["checks"]["watcher"] == {  # type: ignore[index]
                "ok": True,
                "detail": "runs on the leader (another instance leads)",
            }
            await first_stack.aclose()  # the first gateway stops: its session ends
            await _until(lambda: watching(second))
