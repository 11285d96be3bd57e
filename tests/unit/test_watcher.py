"""Settlement tracking: the invoice stream, the cursor, reconciliation and reconnects."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator

import pytest

from gateway import errors
from gateway.events import InvoiceEvents, Subscription
from gateway.ports import (
    Cursor,
    Invoice,
    InvoiceRecord,
    InvoiceState,
    InvoiceUpdate,
    Msat,
    NewInvoice,
    PaymentHash,
)
from gateway.store import MemoryStore
from gateway.watcher import InvoiceWatcher
from tests.fakes import FakeInvoiceBackend

TIMEOUT = 5.0


async def track(backend: FakeInvoiceBackend, store: MemoryStore, amount: int = 1000) -> NewInvoice:
    """Create an invoice on the node and record it in the store, as a challenge does."""
    new = await backend.add_invoice(Msat(amount), "test", 600)
    await store.add_invoice(
        InvoiceRecord(
            payment_hash=new.payment_hash,
            payment_request=new.payment_request,
            amount_msat=Msat(amount),
            token_id=bytes(32),
            service="api",
            method="GET",
            path="/x",
            state=InvoiceState.OPEN,
            created_at=backend.clock.now(),
            expires_at=backend.clock.now() + 600,
            add_index=new.add_index,
        )
    )
    return new


async def state(store: MemoryStore, payment_hash: PaymentHash) -> InvoiceState:
    record = await store.get_invoice(payment_hash)
    assert record is not None
    return record.state


class WatchedStore(MemoryStore):
    """A memory store that tells waiting tests when the watcher wrote to it."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = asyncio.Condition()
        self.cursor_saved = Cursor()

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def apply_update(self, update: InvoiceUpdate) -> InvoiceRecord | None:
        record = await super().apply_update(update)
        await self._notify()
        return record

    async def save_cursor(self, cursor: Cursor) -> None:
        await super().save_cursor(cursor)
        self.cursor_saved = await self.get_cursor()
        await self._notify()

    async def wait_cursor(self, cursor: Cursor) -> None:
        async with asyncio.timeout(TIMEOUT), self.changed:
            await self.changed.wait_for(lambda: self.cursor_saved == cursor)


class Running:
    """``watcher.run()`` as a task, cancelled and awaited at the end."""

    def __init__(self, watcher: InvoiceWatcher) -> None:
        self.watcher = watcher
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> asyncio.Task[None]:
        self.task = asyncio.create_task(self.watcher.run())
        return self.task

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task


@pytest.fixture
async def env() -> AsyncIterator[tuple[FakeInvoiceBackend, WatchedStore]]:
    store = WatchedStore()
    yield FakeInvoiceBackend(), store
    await store.close()


async def published(subscription: Subscription) -> list[InvoiceRecord]:
    """The events published to ``subscription`` so far (it is closed)."""
    subscription.close()
    return [record async for record in subscription]


# --- record(): one event ------------------------------------------------------------------


async def test_record_applies_a_settlement_and_advances_the_cursor(
    env: tuple[FakeInvoiceBackend, WatchedStore],
) -> None:
    backend, store = env
    events = InvoiceEvents()
    subscription = events.subscribe("test")
    watcher = InvoiceWatcher(backend, store, events=events)
    new = await track(backend, store, 2500)
    backend.pay(new.payment_hash)
    await watcher.record(backend.invoices[new.payment_hash])
    record = await store.get_invoice(new.payment_hash)
    assert record is not None
    assert record.state is InvoiceState.SETTLED
    assert record.amount_paid_msat == 2500
    assert record.settle_index == 1
    assert record.settled_at == backend.clock.now()
    assert await store.get_cursor() == Cursor(add_index=1, settle_index=1)
    assert await published(subscription) == [record]


async def test_untracked_invoices_are_ignored_but_advance_the_cursor(
    env: tuple[FakeInvoiceBackend, WatchedStore],
) -> None:
    backend, store = env
    events = InvoiceEvents()
    subscription = events.subscribe("test")
    watcher = InvoiceWatcher(backend, store, events=events)
    new = await backend.add_invoice(Msat(1), "someone else's", 600)  # not from the gateway
    backend.pay(new.payment_hash)
    await watcher.record(backend.invoices[new.payment_hash])
    assert await store.get_invoice(new.payment_hash) is None
    assert await store.list_invoices() == []
    assert await store.get_cursor() == Cursor(1, 1)
    assert await published(subscription) == []


async def test_cursor_never_goes_back(env: tuple[FakeInvoiceBackend, WatchedStore]) -> None:
    backend, store = env
    watcher = InvoiceWatcher(backend, store)
    first = await track(backend, store)
    second = await track(backend, store)
    backend.pay(second.payment_hash)
    await watcher.record(backend.invoices[second.payment_hash])
    await watcher.record(backend.invoices[first.payment_hash])  # an older, OPEN event
    assert await store.get_cursor() == Cursor(2, 1)


async def test_an_add_event_writes_nothing_and_its_cursor_waits(
    env: tuple[FakeInvoiceBackend, WatchedStore],
) -> None:
    backend, store = env
    events = InvoiceEvents()
    subscription = events.subscribe("test")
    applied: list[InvoiceUpdate] = []
    apply_update = store.apply_update

    async def counted(update: InvoiceUpdate) -> InvoiceRecord | None:
        applied.append(update)
        return await apply_update(update)

    store.apply_update = counted  # type: ignore[method-assign]
    watcher = InvoiceWatcher(backend, store, events=events, cursor_delay=3600)
    first, second, third = [await track(backend, store) for _ in range(3)]
    await watcher.record(backend.invoices[first.payment_hash])
    assert await store.get_cursor() == Cursor(1, 0)  # the first event saves at once
    await watcher.record(backend.invoices[second.payment_hash])
    assert await store.get_cursor() == Cursor(1, 0)  # within the delay: not yet
    backend.pay(third.payment_hash)
    await watcher.record(backend.invoices[third.payment_hash])
    assert await store.get_cursor() == Cursor(3, 1)  # a state change saves what was seen
    assert [update.payment_hash for update in applied] == [third.payment_hash]
    assert [record.state for record in await published(subscription)] == [InvoiceState.SETTLED]


async def test_an_add_event_is_saved_once_the_delay_has_passed(
    env: tuple[FakeInvoiceBackend, WatchedStore],
) -> None:
    backend, store = env
    watcher = InvoiceWatcher(backend, store, cursor_delay=0)
    for _ in range(2):
        new = await track(backend, store)
        await watcher.record(backend.invoices[new.payment_hash])
        assert await store.get_cursor() == Cursor(new.add_index, 0)


async def test_a_stale_add_event_leaves_a_held_invoice_accepted(
    env: tuple[FakeInvoiceBackend, WatchedStore],
) -> None:
    backend, store = env
    new = await track(backend, store)
    await store.apply_update(
        InvoiceUpdate(new.payment_hash, InvoiceState.ACCEPTED, 0, Msat(0), None)
    )
    await InvoiceWatcher(backend, store).record(backend.invoices[new.payment_hash])  # OPEN
    assert await state(store, new.payment_hash) is InvoiceState.ACCEPTED


# --- reconcile() ---------------------------------------------------------------------------


async def test_reconcile_fixes_what_settled_while_nobody_watched(
    env: tuple[FakeInvoiceBackend, WatchedStore],
) -> None:
    backend, store = env
    paid = await track(backend, store)
    canceled = await track(backend, store)
    still_open = await track(backend, store)
    backend.pay(paid.payment_hash)
    backend.cancel(canceled.payment_hash)
    watcher = InvoiceWatcher(backend, store)
    assert not watcher.connected.is_set()
    assert await watcher.reconcile() == 2
    assert await state(store, paid.payment_hash) is InvoiceState.SETTLED
    assert await state(store, canceled.payment_hash) is InvoiceState.CANCELED
    assert await state(store, still_open.payment_hash) is InvoiceState.OPEN
    assert watcher.connected.is_set()
    assert await watcher.reconcile() == 0  # idempotent


async def test_reconcile_skips_invoices_the_node_does_not_know(
    env: tuple[FakeInvoiceBackend, WatchedStore], caplog: pytest.LogCaptureFixture
) -> None:
    backend, store = env
    lost = await track(backend, store)
    paid = await track(backend, store)
    del backend.invoices[lost.payment_hash]
    backend.pay(paid.payment_hash)
    assert await InvoiceWatcher(backend, store).reconcile() == 1
    assert await state(store, lost.payment_hash) is InvoiceState.OPEN
    assert "unknown to the node" in caplog.text


async def test_reconcile_with_the_node_down_logs_and_returns(
    env: tuple[FakeInvoiceBackend, WatchedStore], caplog: pytest.LogCaptureFixture
) -> None:
    backend, store = env
    await track(backend, store)
    backend.unavailable = True
    watcher = InvoiceWatcher(backend, store)
    assert await watcher.reconcile() == 0
    assert not watcher.connected.is_set()
    assert "reconciliation failed" in caplog.text


async def test_with_nothing_to_reconcile_caught_up_waits_for_the_node_to_answer(
    env: tuple[FakeInvoiceBackend, WatchedStore],
) -> None:
    backend, store = env
    backend.unavailable = True
    watcher = InvoiceWatcher(backend, store)
    assert await watcher.reconcile() == 0
    assert not watcher.connected.is_set()
    assert backend.lookups == 1  # the node was asked, though no invoice is open
    backend.unavailable = False
    assert await watcher.reconcile() == 0
    assert watcher.connected.is_set()


# --- run(): the stream ----------------------------------------------------------------------


async def test_run_follows_settlements(env: tuple[FakeInvoiceBackend, WatchedStore]) -> None:
    backend, store = env
    events = InvoiceEvents()
    subscription = events.subscribe("test")
    watcher = InvoiceWatcher(backend, store, events=events)
    async with Running(watcher):
        await backend.wait_connections(1)
        await asyncio.wait_for(watcher.connected.wait(), TIMEOUT)
        new = await track(backend, store, 7000)
        backend.pay(new.payment_hash)
        other = await backend.add_invoice(Msat(5), "not ours", 600)
        backend.pay(other.payment_hash)
        await store.wait_cursor(Cursor(2, 2))
        assert await state(store, new.payment_hash) is InvoiceState.SETTLED
    # The add event changed nothing (the gateway recorded the invoice OPEN): not published.
    assert [(r.payment_hash, r.state) for r in await published(subscription)] == [
        (new.payment_hash, InvoiceState.SETTLED),
    ]
    assert backend.subscriptions == [(0, 0)]


async def test_run_reconciles_on_start(env: tuple[FakeInvoiceBackend, WatchedStore]) -> None:
    backend, store = env
    new = await track(backend, store)
    backend.pay(new.payment_hash)  # before any subscription: nothing will replay it
    watcher = InvoiceWatcher(backend, store)
    async with Running(watcher):
        await asyncio.wait_for(watcher.connected.wait(), TIMEOUT)
        assert await state(store, new.payment_hash) is InvoiceState.SETTLED


async def test_run_resumes_from_the_stored_cursor(
    env: tuple[FakeInvoiceBackend, WatchedStore],
) -> None:
    backend, store = env
    watcher = InvoiceWatcher(backend, store, initial_backoff=0.001)
    first = await track(backend, store)
    backend.pay(first.payment_hash)
    await watcher.record(backend.invoices[first.payment_hash])
    assert await store.get_cursor() == Cursor(1, 1)
    async with Running(watcher):
        await backend.wait_connections(1)
        backend.disconnect()
        # While disconnected: settled, and a new invoice; the resubscription replays both.
        second = await track(backend, store)
        third = await track(backend, store)
        backend.pay(third.payment_hash)
        await backend.wait_connections(2)
        await store.wait_cursor(Cursor(3, 2))
        assert await state(store, third.payment_hash) is InvoiceState.SETTLED
        assert await state(store, second.payment_hash) is InvoiceState.OPEN
    assert backend.subscriptions[0] == (1, 1)


async def test_a_cancellation_is_not_streamed_but_found_on_reconnecting(
    env: tuple[FakeInvoiceBackend, WatchedStore],
) -> None:
    backend, store = env
    watcher = InvoiceWatcher(backend, store, initial_backoff=0.001)
    canceled = await track(backend, store)
    paid = await track(backend, store)
    async with Running(watcher):
        await backend.wait_connections(1)
        await asyncio.wait_for(watcher.connected.wait(), TIMEOUT)
        backend.cancel(canceled.payment_hash)  # LND's stream does not report it
        backend.pay(paid.payment_hash)  # but does report this, after it
        await store.wait_cursor(Cursor(2, 1))
        assert await state(store, canceled.payment_hash) is InvoiceState.OPEN
        backend.disconnect()
        await backend.wait_connections(2)  # connected was cleared when the stream broke
        await asyncio.wait_for(watcher.connected.wait(), TIMEOUT)  # reconciled
        assert await state(store, canceled.payment_hash) is InvoiceState.CANCELED


class SubscribesLate(FakeInvoiceBackend):
    """A node that registers a subscription a moment after it is asked for, as LND over gRPC
    does, and in that moment settles ``paid`` (reconciliation has just seen it OPEN)."""

    paid: PaymentHash

    def __init__(self) -> None:
        super().__init__()
        self.looked_up = asyncio.Event()

    async def lookup_invoice(self, payment_hash: PaymentHash) -> Invoice:
        invoice = await super().lookup_invoice(payment_hash)
        self.looked_up.set()
        return invoice

    async def subscribe_invoices(
        self, add_index: int = 0, settle_index: int = 0
    ) -> AsyncGenerator[Invoice, None]:
        await self.looked_up.wait()
        self.pay(self.paid)
        async for invoice in super().subscribe_invoices(add_index, settle_index):
            yield invoice


async def test_a_settlement_while_subscribing_is_not_missed_before_any_settle_index() -> None:
    backend, store = SubscribesLate(), WatchedStore()
    await backend.add_invoice(Msat(1), "not the gateway's", 600)
    tracked = await track(backend, store)
    backend.paid = tracked.payment_hash
    # Its add event was seen; no settlement ever was, and LND replays none after index 0.
    await store.save_cursor(Cursor(tracked.add_index, 0))
    async with Running(InvoiceWatcher(backend, store)):
        await store.wait_cursor(Cursor(tracked.add_index, 1))
    assert await state(store, tracked.payment_hash) is InvoiceState.SETTLED
    assert backend.subscriptions == [(tracked.add_index - 1, 0)]


def backoffs(caplog: pytest.LogCaptureFixture) -> list[float]:
    """The delays run() announced, from its log records (the exact float is an argument)."""
    delays = []
    for record in caplog.records:
        if record.name == "gateway.watcher" and "retrying in" in record.msg:
            assert isinstance(record.args, tuple)
            delay = record.args[-1]
            assert isinstance(delay, float)
            delays.append(delay)
    return delays


async def test_run_backs_off_exponentially_with_a_cap_then_resets(
    env: tuple[FakeInvoiceBackend, WatchedStore], caplog: pytest.LogCaptureFixture
) -> None:
    backend, store = env
    caplog.set_level(logging.WARNING, logger="gateway.watcher")
    backend.fail_subscriptions = 5
    watcher = InvoiceWatcher(backend, store, initial_backoff=0.001, max_backoff=0.004)
    async with Running(watcher):
        await backend.wait_connections(1)
        await asyncio.wait_for(watcher.connected.wait(), TIMEOUT)
        assert len(backend.subscriptions) == 6
        assert backoffs(caplog) == [0.001, 0.002, 0.004, 0.004, 0.004]
        # A healthy connection breaks: the next wait starts over from the initial backoff.
        backend.fail_subscriptions = 2
        backend.disconnect()
        await backend.wait_connections(2)
        assert backoffs(caplog)[5:] == [0.001, 0.002, 0.004]
        assert len(backend.subscriptions) == 9
    assert "fake subscription refused" in caplog.text


async def test_run_survives_the_node_going_away_entirely(
    env: tuple[FakeInvoiceBackend, WatchedStore],
) -> None:
    backend, store = env
    watcher = InvoiceWatcher(backend, store, initial_backoff=0.001, max_backoff=0.002)
    async with Running(watcher):
        await backend.wait_connections(1)
        backend.unavailable = True
        backend.disconnect()
        await asyncio.wait_for(backend.wait_subscriptions(4), TIMEOUT)
        assert not watcher.connected.is_set()
        backend.unavailable = False
        await backend.wait_connections(2)
        await asyncio.wait_for(watcher.connected.wait(), TIMEOUT)


async def test_run_retries_after_a_store_error(
    env: tuple[FakeInvoiceBackend, WatchedStore],
) -> None:
    backend, _ = env

    class FlakyStore(MemoryStore):
        failures = 2

        async def get_cursor(self) -> Cursor:
            if self.failures:
                self.failures -= 1
                raise errors.StoreError("locked")
            return await super().get_cursor()

    store = FlakyStore()
    watcher = InvoiceWatcher(backend, store, initial_backoff=0.001)
    async with Running(watcher):
        await backend.wait_connections(1)
    assert store.failures == 0


async def test_cancellation_stops_cleanly(
    env: tuple[FakeInvoiceBackend, WatchedStore], caplog: pytest.LogCaptureFixture
) -> None:
    backend, store = env
    await track(backend, store)
    watcher = InvoiceWatcher(backend, store, initial_backoff=0.001)
    # Cancelled while streaming, while backing off, and before it ever ran.
    async with Running(watcher):
        await backend.wait_connections(1)
        await asyncio.wait_for(watcher.connected.wait(), TIMEOUT)
    assert backend.live_streams == 0  # the subscription was closed
    assert not watcher.connected.is_set()
    backend.fail_subscriptions = 1_000
    async with Running(watcher):
        await asyncio.wait_for(backend.wait_subscriptions(3), TIMEOUT)
    task = asyncio.create_task(watcher.run())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
