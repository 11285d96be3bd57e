"""A settlement watcher killed by an unexpected exception, on real LND: its supervisor logs the
traceback and restarts it, the settlement it was recording when it died is recorded all the
same (the restart resumes from the stored cursor, which had not moved past it), and readiness
is back once it has caught up."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from gateway.lnd.client import LndClient
from gateway.ports import Invoice, InvoiceState
from gateway.runtime import running_runtime
from gateway.service import L402Service
from gateway.service.decisions import PaymentChallenge, RequestInfo
from gateway.supervisor import TaskState
from gateway.watcher import InvoiceWatcher
from regtest.network import Network
from tests.regtest.gateway_helpers import MAX_FEE, gateway_config, wait_for_invoice

pytestmark = pytest.mark.regtest

WATCHER = "l402-invoice-watcher"
FAULT = "injected fault while recording a settlement"


async def _challenge(service: L402Service, request: RequestInfo) -> PaymentChallenge:
    decision = await service.authorize(request)
    assert isinstance(decision, PaymentChallenge), decision
    return decision


async def test_a_watcher_killed_by_a_bug_is_restarted_and_loses_no_settlement(
    network: Network,
    bob: LndClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    record = InvoiceWatcher.record
    faults = 0

    async def record_or_fail(self: InvoiceWatcher, invoice: Invoice) -> None:
        nonlocal faults
        # The first settlement the stream brings kills the watcher before it is stored.
        if invoice.state is InvoiceState.SETTLED and not faults:
            faults += 1
            raise RuntimeError(FAULT)
        await record(self, invoice)

    monkeypatch.setattr(InvoiceWatcher, "record", record_or_fail)
    caplog.set_level(logging.INFO)
    config = gateway_config(network, tmp_path / "gateway.db")
    request = RequestInfo(method="GET", path="/api/premium/fortune", client="127.0.0.1")
    async with running_runtime(config) as runtime:
        async with asyncio.timeout(30):
            while not (await runtime.readiness.check()).ready:  # noqa: ASYNC110 - polling
                await asyncio.sleep(0.05)
        challenges = [await _challenge(runtime.service, request) for _ in range(3)]
        for challenge in challenges:
            await bob.send_payment(challenge.invoice, max_fee_msat=MAX_FEE, payment_timeout=30)

        for challenge in challenges:
            await wait_for_invoice(
                tmp_path / "gateway.db", bytes.fromhex(challenge.payment_hash), "SETTLED", 30
            )
        (watcher,) = [task for task in runtime.health() if task.name == WATCHER]
        assert watcher.restarts == 1
        assert watcher.state is TaskState.RUNNING
        assert watcher.last_error == f"RuntimeError: {FAULT}"
        # The supervisor logged the bug with its traceback, as an error.
        (logged,) = [r for r in caplog.records if r.exc_info and FAULT in str(r.exc_info[1])]
        assert logged.levelno == logging.ERROR
        assert faults == 1
        # Caught up again after the restart: ready.
        async with asyncio.timeout(30):
            while not (report := await runtime.readiness.check()).ready:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert {check.name: check.ok for check in report.checks}["watcher"] is True
