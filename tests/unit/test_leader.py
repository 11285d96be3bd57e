"""Leadership (``gateway.leader``): the leases, and the loop that runs the singleton tasks only
while the lease is held, on its own and inside ``running_runtime``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from gateway import runtime
from gateway.config import Config, LndConfig, RouteConfig, StoreConfig
from gateway.leader import Leadership, PostgresLease, SoleLease, lease_for
from gateway.store.memory import MemoryStore
from gateway.supervisor import Supervisor, TaskState
from tests.fakes import FakeClock, FakeInvoiceBackend, fake_lnd_client


class FakeLease:
    """A lease the test grants and takes away by hand."""

    def __init__(self) -> None:
        self._granted = asyncio.Event()
        self._taken = asyncio.Event()
        self.acquired = 0
        self.released = 0

    def grant(self) -> None:
        self._taken.clear()
        self._granted.set()

    def take_away(self) -> None:
        self._granted.clear()
        self._taken.set()

    async def acquire(self) -> None:
        await self._granted.wait()
        self.acquired += 1

    async def lost(self) -> None:
        await self._taken.wait()

    async def release(self) -> None:
        self.released += 1


async def _until(condition: Callable[[], bool]) -> None:
    """Wait until ``condition`` holds: the tasks start and stop in tasks of their own."""
    async with asyncio.timeout(5):
        while not condition():  # noqa: ASYNC110 - nothing sets an event to wait on
            await asyncio.sleep(0.005)


async def test_a_sole_lease_is_held_at_once_and_never_lost() -> None:
    lease = SoleLease()
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
    assert (lease.acquired, lease.released) == (2, 1)  # released once, on the way out


async def test_a_failure_to_begin_releases_the_lease_and_ends_the_run() -> None:
    lease = FakeLease()
    lease.grant()

    async def begin(term: Supervisor) -> None:
        raise RuntimeError("register failed")

    with pytest.raises(RuntimeError, match="register failed"):
        await Leadership(lease, begin).run()
    assert lease.released == 1


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
    assert lease.released == 1
