"""``Readiness`` on its own: each check's verdict, the optional tasks, timeouts."""

from __future__ import annotations

import asyncio

from gateway import errors
from gateway.health import Readiness
from gateway.ports import Invoice, PaymentHash
from gateway.store.memory import MemoryStore
from gateway.supervisor import TaskHealth, TaskState
from tests.fakes import FakeInvoiceBackend


def _task(name: str, state: TaskState, error: str | None = None) -> TaskHealth:
    return TaskHealth(name, state, 1 if error else 0, error, 0.0)


def _readiness(
    backend: FakeInvoiceBackend, *tasks: TaskHealth, caught_up: bool | None = True
) -> Readiness:
    return Readiness(
        backend,
        MemoryStore(),
        lambda: tasks,
        watcher_caught_up=None if caught_up is None else (lambda: caught_up),
        cache_seconds=0,
        timeout=0.2,
    )


WATCHER = _task("l402-invoice-watcher", TaskState.RUNNING)


async def test_a_backing_off_fiat_rate_is_shown_but_never_fails_readiness() -> None:
    fiat = _task("l402-fiat-rate", TaskState.BACKING_OFF, "BackendError: rate source down")
    report = await _readiness(FakeInvoiceBackend(), WATCHER, fiat).check()
    assert report.ready
    tasks = report.as_json()["checks"]["tasks"]  # type: ignore[index]
    assert tasks == {
        "ok": True,
        "detail": "l402-fiat-rate: backing off (BackendError: rate source down)",
    }


async def test_a_backing_off_sweeper_fails_readiness() -> None:
    sweeper = _task("l402-invoice-sweeper", TaskState.BACKING_OFF, "StoreError: disk full")
    report = await _readiness(FakeInvoiceBackend(), WATCHER, sweeper).check()
    assert not report.ready
    assert [check.name for check in report.checks if not check.ok] == ["tasks"]


async def test_a_watcher_not_started_or_not_caught_up_fails_readiness() -> None:
    assert not (await _readiness(FakeInvoiceBackend()).check()).ready  # no watcher task
    report = await _readiness(FakeInvoiceBackend(), WATCHER, caught_up=False).check()
    assert [check.name for check in report.checks if not check.ok] == ["watcher"]
    assert (await _readiness(FakeInvoiceBackend(), caught_up=None).check()).ready


async def test_a_watching_process_that_does_not_lead_reports_the_watcher_as_the_leaders() -> None:
    readiness = Readiness(
        FakeInvoiceBackend(),
        MemoryStore(),
        lambda: (),
        watcher_caught_up=lambda: False,
        leading=lambda: False,
        cache_seconds=0,
    )
    report = await readiness.check()
    assert report.ready
    watcher = report.checks[2]
    assert (watcher.name, watcher.detail) == (
        "watcher",
        "runs on the leader (another instance leads)",
    )


async def test_a_watching_process_that_has_not_asked_for_the_lease_yet_is_not_ready() -> None:
    """It cannot tell yet whether another instance leads (or it will)."""
    readiness = Readiness(
        FakeInvoiceBackend(),
        MemoryStore(),
        lambda: (),
        watcher_caught_up=lambda: False,
        leading=lambda: None,
        cache_seconds=0,
    )
    report = await readiness.check()
    assert [check.name for check in report.checks if not check.ok] == ["watcher"]
    assert report.checks[2].detail == "not started: asking for the leader lease"


async def test_a_node_that_does_not_answer_in_time_is_not_ready() -> None:
    class Silent(FakeInvoiceBackend):
        async def lookup_invoice(self, payment_hash: PaymentHash) -> Invoice:
            await asyncio.sleep(10)
            raise errors.InvoiceNotFound("never")

    report = await _readiness(Silent(), WATCHER).check()
    lnd = report.checks[0]
    assert (lnd.name, lnd.ok, lnd.detail) == ("lnd", False, "no answer within 0.2s")
