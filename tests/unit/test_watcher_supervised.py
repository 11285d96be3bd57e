"""The watcher under its supervisor: an unexpected exception (an invoice state the LND client
cannot map raises ``KeyError``) is logged with its traceback, the watcher restarted, and no
settlement lost."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator

import pytest

from gateway.events import InvoiceEvents
from gateway.ports import Invoice, InvoiceRecord, InvoiceState, Msat, PaymentHash
from gateway.store import MemoryStore
from gateway.supervisor import Supervisor, TaskState
from gateway.watcher import InvoiceWatcher
from tests.fakes import FakeInvoiceBackend

TIMEOUT = 5.0
NAME = "l402-invoice-watcher"


class MapsASettlementBadlyOnce(FakeInvoiceBackend):
    """A node whose settlement of ``unmappable`` the client cannot map the first time it is
    streamed (as if LND had sent a state the client's enum lacks): the stream raises
    ``KeyError`` instead of yielding it."""

    unmappable: PaymentHash | None = None

    async def subscribe_invoices(
        self, add_index: int = 0, settle_index: int = 0
    ) -> AsyncGenerator[Invoice, None]:
        async for invoice in super().subscribe_invoices(add_index, settle_index):
            if invoice.state is InvoiceState.SETTLED and invoice.payment_hash == self.unmappable:
                self.unmappable = None
                raise KeyError("SETTLED_BUT_NEW")
            yield invoice


class LooksUpBadlyOnce(FakeInvoiceBackend):
    """A node whose first lookup the client cannot map: reconciliation raises ``KeyError``."""

    failed = False

    async def lookup_invoice(self, payment_hash: PaymentHash) -> Invoice:
        if not self.failed:
            self.failed = True
            raise KeyError("ACCEPTED_BUT_NEW")
        return await super().lookup_invoice(payment_hash)


async def track(backend: FakeInvoiceBackend, store: MemoryStore) -> PaymentHash:
    """An invoice on the node, recorded in the store as a challenge records it."""
    new = await backend.add_invoice(Msat(1000), "test", 600)
    now = backend.clock.now()
    await store.add_invoice(
        InvoiceRecord(
            payment_hash=new.payment_hash,
            payment_request=new.payment_request,
            amount_msat=Msat(1000),
            token_id=bytes(32),
            service="api",
            method="GET",
            path="/x",
            state=InvoiceState.OPEN,
            created_at=now,
            expires_at=now + 600,
            add_index=new.add_index,
        )
    )
    return new.payment_hash


async def settled(events: AsyncIterator[InvoiceRecord], count: int) -> set[PaymentHash]:
    """The hashes of the next ``count`` settlements published."""
    hashes: set[PaymentHash] = set()
    async with asyncio.timeout(TIMEOUT):
        async for record in events:
            if record.state is InvoiceState.SETTLED:
                hashes.add(record.payment_hash)
                if len(hashes) == count:
                    return hashes
    raise AssertionError("the subscription ended")


async def test_a_crash_in_the_stream_is_logged_restarted_and_loses_no_settlement(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend, store, events = MapsASettlementBadlyOnce(), MemoryStore(), InvoiceEvents()
    watcher = InvoiceWatcher(backend, store, events=events, initial_backoff=0.001)
    first, crashing, during = [await track(backend, store) for _ in range(3)]
    backend.unmappable = crashing
    with events.subscribe("test") as subscription:
        async with Supervisor(initial_backoff=0.05) as supervisor:
            supervisor.start(NAME, watcher.run)
            await asyncio.wait_for(watcher.connected.wait(), TIMEOUT)
            backend.pay(first)  # recorded: settle index 1
            assert await settled(subscription, 1) == {first}
            backend.pay(crashing)  # the stream raises KeyError on it
            await asyncio.wait_for(backend.wait_subscriptions(2), TIMEOUT)
            backend.pay(during)  # while the watcher is down or just back
            assert await settled(subscription, 2) == {crashing, during}
            (health,) = supervisor.health()
    assert [await state(store, h) for h in (first, crashing, during)] == [InvoiceState.SETTLED] * 3
    # Resumed from the stored cursor: LND replayed what came after the first settlement.
    assert backend.subscriptions[1][1] == 1
    assert (await store.get_cursor()).settle_index == 3
    assert (health.state, health.restarts) == (TaskState.RUNNING, 1)
    assert health.last_error == "KeyError: 'SETTLED_BUT_NEW'"
    crash = [r for r in caplog.records if r.name == "gateway.supervisor"]
    assert len(crash) == 1
    assert crash[0].levelno == logging.ERROR
    assert f"task {NAME} crashed" in crash[0].getMessage()
    assert crash[0].exc_info is not None
    assert isinstance(crash[0].exc_info[1], KeyError)


async def test_a_crash_in_reconciliation_ends_the_watcher_for_its_supervisor(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend, store = LooksUpBadlyOnce(), MemoryStore()
    paid = await track(backend, store)
    backend.pay(paid)  # before any subscription: only reconciliation can find it
    watcher = InvoiceWatcher(backend, store, initial_backoff=0.001)
    async with Supervisor(initial_backoff=0.001) as supervisor:
        supervisor.start(NAME, watcher.run)
        await asyncio.wait_for(watcher.connected.wait(), TIMEOUT)
        (health,) = supervisor.health()
        # the crashed run closed its subscription; the restarted one has its own
        assert (backend.connections, backend.live_streams) == (2, 1)
    assert await state(store, paid) is InvoiceState.SETTLED
    assert (health.restarts, health.last_error) == (1, "KeyError: 'ACCEPTED_BUT_NEW'")
    assert any(r.exc_info and isinstance(r.exc_info[1], KeyError) for r in caplog.records)


async def state(store: MemoryStore, payment_hash: PaymentHash) -> InvoiceState:
    record = await store.get_invoice(payment_hash)
    assert record is not None
    return record.state
