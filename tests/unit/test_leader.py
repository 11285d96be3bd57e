"""Leadership (``gateway.leader``): the leases, and the loop that runs the singleton tasks only
while the lease is held, on its own and inside ``running_runtime``."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import asyncpg
import pytest

from gateway import errors, runtime
from gateway.config import (
    Config,
    LndConfig,
    RouteConfig,
    StoreConfig,
    WebhookEndpointConfig,
    WebhooksConfig,
)
from gateway.leader import Leadership, PostgresLease, SoleLease, lease_for
from gateway.store.memory import MemoryStore
from gateway.supervisor import Supervisor, TaskState
from gateway.webhooks import WebhookSender
from tests.fakes import FakeClock, FakeInvoiceBackend, fake_lnd_client


class FakeLease:
    """A lease the test grants and takes away by hand."""

    def __init__(self) -> None:
        self._granted = asyncio.Event()
        self._taken = asyncio.Event()
        self.acquired = 0
        self.released = 0
        self.asking = False
        self.log: list[str] = []  # what happened, with the singletons' own entries

    def grant(self) -> None:
        self._taken.clear()
        self._granted.set()

    def take_away(self) -> None:
        self._granted.clear()
        self._taken.set()

    async def acquire(self) -> None:
        self.asking = True  # not held yet: asked, answered "no" until granted
        await self._granted.wait()
        self.acquired += 1

    def asked(self) -> bool:
        return self.asking

    async def lost(self) -> None:
        await self._taken.wait()

    async def release(self) -> None:
        self.released += 1
        self.log.append("released")


async def _until(condition: Callable[[], bool]) -> None:
    """Wait until ``condition`` holds: the tasks start and stop in tasks of their own."""
    async with asyncio.timeout(5):
        while not condition():  # noqa: ASYNC110 - nothing sets an event to wait on
            await asyncio.sleep(0.005)


async def test_a_sole_lease_is_held_at_once_and_never_lost() -> None:
    lease = SoleLease()
    assert lease.asked()
    await asyncio.wait_for(lease.acquire(), 1)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(lease.lost(), 0.05)
    await lease.release()


async def test_lease_for_picks_the_lease_by_what_the_store_can_do() -> None:
    class Dedicated(MemoryStore):
        url_for_display = "postgresql://gateway@db/gateway"

        async def connect_dedicated(self) -> asyncpg.Connection:
            raise NotImplementedError

    assert isinstance(lease_for(MemoryStore(), poll=1, check=1), SoleLease)
    assert isinstance(lease_for(Dedicated(), poll=1, check=1), PostgresLease)


async def test_the_singletons_run_only_while_the_lease_is_held() -> None:
    lease = FakeLease()
    runs: list[str] = []
    stopped: list[str] = []

    async def singleton() -> None:
        runs.append("started")
        try:
            await asyncio.Event().wait()
        finally:
            stopped.append("stopped")

    async def begin(term: Supervisor) -> None:
        term.start("l402-invoice-watcher", singleton)

    leadership = Leadership(lease, begin)
    assert leadership.leading() is None  # the lease not asked for yet: it cannot tell
    async with Supervisor() as supervisor:
        supervisor.start("l402-leader", leadership.run)
        await asyncio.sleep(0.02)
        assert (runs, leadership.leading(), leadership.health()) == ([], False, ())

        lease.grant()
        await _until(lambda: runs == ["started"])
        assert leadership.leading()
        assert [(t.name, t.state) for t in leadership.health()] == [
            ("l402-invoice-watcher", TaskState.RUNNING)
        ]

        lease.take_away()
        await _until(lambda: stopped == ["stopped"])
        await _until(lambda: not leadership.leading())
        assert leadership.health() == ()

        lease.grant()  # the lease again: a fresh term
        await _until(lambda: runs == ["started", "started"])
        assert leadership.leading()
    assert stopped == ["stopped", "stopped"]
    assert (lease.acquired, lease.released) == (2, 2)  # when lost, and on the way out


async def test_the_lease_is_released_only_once_the_singletons_have_stopped() -> None:
    """A lease still held keeps other instances from leading until this term's tasks are
    gone: lost, and on the way out."""
    lease = FakeLease()

    async def slow_to_stop() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0.05)  # say the hold executor finishing a request
            lease.log.append("stopped")

    async def begin(term: Supervisor) -> None:
        term.start("l402-hold-executor", slow_to_stop)

    leadership = Leadership(lease, begin)
    async with Supervisor() as supervisor:
        supervisor.start("l402-leader", leadership.run)
        lease.grant()
        await _until(lambda: leadership.leading() is True)
        lease.take_away()
        await _until(lambda: "released" in lease.log)
        assert lease.log == ["stopped", "released"]
        lease.grant()
        await _until(lambda: leadership.leading() is True)
    assert lease.log == ["stopped", "released", "stopped", "released"]


async def test_a_second_cancellation_does_not_release_the_lease_before_the_tasks_stop() -> None:
    lease = FakeLease()
    stopping = asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            stopping.set()
            await asyncio.sleep(0.1)  # the hold executor finishing a request
            lease.log.append("stopped")

    async def begin(term: Supervisor) -> None:
        term.start("l402-hold-executor", slow_to_stop)

    leadership = Leadership(lease, begin)
    run = asyncio.create_task(leadership.run())
    lease.grant()
    await _until(lambda: leadership.leading() is True)
    run.cancel()
    await stopping.wait()
    run.cancel()  # again, while the tasks are stopping
    with pytest.raises(asyncio.CancelledError):
        await run
    assert lease.log == ["stopped", "released"]


async def test_a_failure_to_begin_releases_the_lease_and_ends_the_run() -> None:
    lease = FakeLease()
    lease.grant()

    async def begin(term: Supervisor) -> None:
        raise RuntimeError("register failed")

    with pytest.raises(RuntimeError, match="register failed"):
        await Leadership(lease, begin).run()
    assert lease.released == 1


# --- PostgresLease, on a fake connection ------------------------------------------------------


class FakeConnection:
    """The lease's dedicated connection: the lock held or not, checks failing on demand."""

    def __init__(self) -> None:
        self.held = True
        self.failing = 0  # the next checks to time out
        self.checks = 0
        self.closed = False
        self.executed: list[tuple[object, ...]] = []

    async def execute(self, query: str, *args: object, **_timeout: float) -> str:
        self.executed.append((query, *args))
        return "SELECT 1"

    async def fetchval(self, query: str, *args: object, **_timeout: float) -> object:
        self.checks += query == "SELECT 1"
        if self.closed:
            raise asyncpg.InterfaceError("connection is closed")
        if query != "SELECT 1":
            return self.held
        if self.failing:
            self.failing -= 1
            raise TimeoutError
        return 1

    def is_closed(self) -> bool:
        return self.closed

    async def close(self, **_timeout: float) -> None:
        self.closed = True

    def terminate(self) -> None:
        self.closed = True


class FakeDedicated:
    """A store whose first ``refusals`` connections are refused (a database restarting)."""

    url_for_display = "postgresql://gateway@db/gateway"

    def __init__(self, refusals: int = 0) -> None:
        self.refusals = refusals
        self.connections: list[FakeConnection] = []

    async def connect_dedicated(self) -> asyncpg.Connection:
        if self.refusals:
            self.refusals -= 1
            raise errors.StoreError("connect_dedicated: connection refused")
        self.connections.append(FakeConnection())
        return cast(asyncpg.Connection, self.connections[-1])


async def test_a_lease_keeps_asking_while_the_database_cannot_be_reached(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Not a failure for the supervisor's backoff: asked again every poll, logged once."""
    store = FakeDedicated(refusals=2)
    lease = PostgresLease(store, poll=0.01, check=1)
    assert not lease.asked()
    await asyncio.wait_for(lease.acquire(), 1)
    assert lease.asked()
    assert store.refusals == 0
    warnings = [r for r in caplog.records if r.name == "gateway.leader"]
    assert [(r.levelno, r.exc_info) for r in warnings] == [(logging.WARNING, None)]
    assert "connection refused" in warnings[0].getMessage()
    await lease.release()


async def test_a_closed_store_still_ends_the_lease() -> None:
    store = FakeDedicated()

    async def closed() -> asyncpg.Connection:
        raise errors.StoreClosed("closed")

    store.connect_dedicated = closed  # type: ignore[method-assign]
    with pytest.raises(errors.StoreClosed):
        await PostgresLease(store, poll=0.01, check=1).acquire()


async def test_a_lease_is_lost_after_two_failed_checks_in_a_row_and_kept_open() -> None:
    store = FakeDedicated()
    lease = PostgresLease(store, poll=0.01, check=0.01)
    await lease.acquire()
    (connection,) = store.connections
    connection.failing = 1  # a blip
    losing = asyncio.create_task(lease.lost())
    await _until(lambda: connection.checks >= 5)
    assert not losing.done()
    connection.failing = 2
    await asyncio.wait_for(losing, 1)
    # Still open: the lock, if held, is kept until the singletons have stopped.
    assert not connection.closed
    await lease.release()
    assert connection.closed


async def test_a_closed_session_loses_the_lease_at_the_first_check() -> None:
    store = FakeDedicated()
    lease = PostgresLease(store, poll=0.01, check=0.01)
    await lease.acquire()
    (connection,) = store.connections
    connection.closed = True  # the server ended the session: the lock is free already
    await asyncio.wait_for(lease.lost(), 1)
    assert connection.checks == 1


async def test_the_server_gives_up_on_a_silent_holder_after_the_holder_itself() -> None:
    store = FakeDedicated()
    check = 1.0
    await PostgresLease(store, poll=1, check=check).acquire()
    ((query, idle, interval, count, user_timeout),) = store.connections[0].executed
    assert "tcp_user_timeout" in str(query)
    budget = int(str(idle)) + int(str(count)) * int(str(interval))
    assert int(str(user_timeout)) == budget * 1000
    # The holder stops after two failed checks, each a wait and a timeout.
    assert budget > 2 * 2 * check


# --- in running_runtime ----------------------------------------------------------------------


def _config(tmp_path: Path) -> Config:
    (tmp_path / "tls.cert").write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    return Config(
        lnd=LndConfig(tls_cert=tmp_path / "tls.cert", macaroon_hex="00"),
        store=StoreConfig(url=f"sqlite:{tmp_path / 'g.db'}"),
        routes=(RouteConfig(pattern="/api/*", price_msat=10_000),),
    )


async def test_running_runtime_runs_the_watcher_and_sweeper_only_while_it_leads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.leader")
    clock = FakeClock()
    monkeypatch.setattr(runtime, "LndClient", fake_lnd_client(FakeInvoiceBackend(clock)))
    lease = FakeLease()
    monkeypatch.setattr(runtime, "lease_for", lambda _store, **_timing: lease)
    singletons = {"l402-invoice-watcher", "l402-invoice-sweeper"}

    def names(running: runtime.Runtime) -> set[str]:
        return {task.name for task in running.health()}

    async with runtime.running_runtime(_config(tmp_path), clock=clock) as running:
        await asyncio.sleep(0.02)
        assert names(running) == {"l402-leader", "l402-liquidity"}
        report = await running.readiness.check()
        assert report.as_json()["checks"]["watcher"] == {  # type: ignore[index]
            "ok": True,
            "detail": "runs on the leader (another instance leads)",
        }

        lease.grant()
        await _until(lambda: singletons <= names(running))
        assert "leader: this instance now runs the watcher" in caplog.text

        lease.take_away()
        await _until(lambda: not singletons & names(running))
        assert "leader: this instance lost leadership" in caplog.text
        assert not singletons & {task.get_name() for task in asyncio.all_tasks()}

        lease.grant()
        await _until(lambda: singletons <= names(running))
    assert lease.released == 2  # when lost, and on the way out


def _webhook_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    monkeypatch.setenv("CRM_SECRET", "whsec_" + base64.b64encode(b"k" * 32).decode())
    crm = WebhookEndpointConfig(
        name="crm", url="http://127.0.0.1:9/hooks", events=("*",), secret_env="CRM_SECRET"
    )
    config = _config(tmp_path)
    return Config(
        lnd=config.lnd,
        store=config.store,
        routes=config.routes,
        webhooks=WebhooksConfig(retention=3600),
        webhook=(crm,),
    )


async def test_a_sole_gateway_registers_its_endpoints_before_it_serves_and_leads_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests may write events from the first moment: new endpoints are registered by then;
    and a sole gateway never reports its watcher as another instance's."""
    monkeypatch.setattr(runtime, "LndClient", fake_lnd_client(FakeInvoiceBackend()))
    registered: list[str] = []
    register = WebhookSender.register

    async def recorded(self: WebhookSender) -> None:
        await register(self)
        registered.append("registered")

    monkeypatch.setattr(WebhookSender, "register", recorded)
    async with runtime.running_runtime(_webhook_config(tmp_path, monkeypatch)) as running:
        assert registered == ["registered"]
        # Before the task l402-leader has started anything (private: no await may come first).
        watcher = running.readiness._watcher()
        assert (watcher.ok, watcher.detail) == (False, "not started")
        await _until(lambda: "l402-webhook-sender" in {t.name for t in running.health()})
    assert registered == ["registered"]  # not again by the leader


async def test_a_sole_gateway_whose_endpoints_cannot_be_registered_does_not_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime, "LndClient", fake_lnd_client(FakeInvoiceBackend()))

    async def failing(self: WebhookSender) -> None:
        raise errors.StoreError("disk full")

    monkeypatch.setattr(WebhookSender, "register", failing)
    entered: list[Any] = []
    with pytest.raises(errors.StoreError, match="disk full"):
        async with runtime.running_runtime(_webhook_config(tmp_path, monkeypatch)) as running:
            entered.append(running)
    assert entered == []
