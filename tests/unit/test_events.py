"""Invoice events: bounded per-subscriber queues, a slow subscriber cut off loudly, and what
the watcher and the sweeper publish."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging

import pytest

from gateway.events import (
    DEFAULT_CAPACITY,
    EventsLost,
    InvoiceEvents,
    Subscription,
    apply_and_publish,
    wake_on,
)
from gateway.expiry import EXPIRY_GRACE, InvoiceSweeper
from gateway.ports import InvoiceRecord, InvoiceState, InvoiceUpdate, Msat, PaymentHash
from gateway.store import MemoryStore
from gateway.watcher import InvoiceWatcher
from tests.fakes import FakeInvoiceBackend

OPEN, SETTLED, CANCELED, EXPIRED = (
    InvoiceState.OPEN,
    InvoiceState.SETTLED,
    InvoiceState.CANCELED,
    InvoiceState.EXPIRED,
)


def make_record(n: int, state: InvoiceState = OPEN) -> InvoiceRecord:
    return InvoiceRecord(
        payment_hash=PaymentHash(hashlib.sha256(b"%d" % n).digest()),
        payment_request=f"lnbcrt{n}n1fake",
        amount_msat=Msat(1000),
        token_id=bytes(32),
        service="api",
        method="GET",
        path="/x",
        state=state,
        created_at=1000.0 + n,
        expires_at=1600.0 + n,
        add_index=n,
    )


def update(record: InvoiceRecord, state: InvoiceState, settle_index: int = 0) -> InvoiceUpdate:
    return InvoiceUpdate(record.payment_hash, state, settle_index, Msat(0), None)


async def received(subscription: Subscription) -> list[InvoiceRecord]:
    """Everything queued for ``subscription`` (which this closes)."""
    subscription.close()
    return [record async for record in subscription]


# --- the stream ------------------------------------------------------------------------------


async def test_every_subscriber_gets_every_event_in_order() -> None:
    events = InvoiceEvents()
    early = events.subscribe("early")
    events.publish(make_record(1))
    late = events.subscribe("late")
    events.publish(make_record(2))
    events.publish(make_record(3))
    assert [r.add_index for r in await received(early)] == [1, 2, 3]
    assert [r.add_index for r in await received(late)] == [2, 3]  # from subscribing on


async def test_a_waiting_subscriber_wakes_for_an_event_and_for_its_close() -> None:
    events = InvoiceEvents()
    with events.subscribe("reader") as subscription:
        reader = asyncio.ensure_future(anext(subscription))
        await asyncio.sleep(0)
        events.publish(make_record(1))
        assert await reader == make_record(1)
        closing = asyncio.ensure_future(anext(subscription))
        await asyncio.sleep(0)
        subscription.close()
        with pytest.raises(StopAsyncIteration):
            await closing


async def test_leaving_the_block_unsubscribes() -> None:
    events = InvoiceEvents()
    with events.subscribe("brief") as subscription:
        events.publish(make_record(1))
    events.publish(make_record(2))
    assert await received(subscription) == [make_record(1)]


async def test_a_slow_subscriber_is_cut_off_loudly_without_slowing_anyone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    events = InvoiceEvents()
    slow = events.subscribe("slow ledger", capacity=2)
    keeping_up = events.subscribe("fast")
    for n in range(1, 5):
        events.publish(make_record(n))  # never waits, whoever lags
    assert [r.add_index for r in await received(keeping_up)] == [1, 2, 3, 4]

    # What was queued still arrives; then the loss is raised, not hidden.
    assert [await anext(slow), await anext(slow)] == [make_record(1), make_record(2)]
    with pytest.raises(EventsLost, match="slow ledger"):
        await anext(slow)
    (warning,) = [r for r in caplog.records if r.name == "gateway.events"]
    assert warning.levelno == logging.WARNING
    assert "'slow ledger' fell 2 events behind" in warning.getMessage()
    events.publish(make_record(5))  # no longer subscribed
    with pytest.raises(EventsLost):
        await anext(slow)


def test_a_subscription_holds_at_least_one_event() -> None:
    with pytest.raises(ValueError, match="capacity"):
        InvoiceEvents().subscribe("none", capacity=0)


async def test_wake_on_wakes_for_what_it_wants_and_after_falling_behind(
    caplog: pytest.LogCaptureFixture,
) -> None:
    events = InvoiceEvents()
    woken: asyncio.Queue[int] = asyncio.Queue()
    task = asyncio.create_task(
        wake_on(events, "worker", lambda: woken.put_nowait(1), lambda r: r.state is SETTLED)
    )
    try:
        await asyncio.sleep(0)  # it runs until it waits for its first event: subscribed
        assert len(events._subscriptions) == 1
        events.publish(make_record(1))  # not one it wants
        events.publish(make_record(2, SETTLED))
        await asyncio.wait_for(woken.get(), 5)
        # Cut off: it wakes anyway (what it missed is in the store) and subscribes again
        # before it waits.
        for n in range(DEFAULT_CAPACITY + 1):
            events.publish(make_record(10 + n))
        await asyncio.wait_for(woken.get(), 5)
        assert len(events._subscriptions) == 1
        events.publish(make_record(3, SETTLED))
        await asyncio.wait_for(woken.get(), 5)
        assert woken.empty()  # once each: never for the events it does not want
        assert f"'worker' fell {DEFAULT_CAPACITY} events behind" in caplog.text
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert not events._subscriptions  # cancelled: unsubscribed


# --- apply_and_publish ----------------------------------------------------------------------


async def test_a_recorded_state_is_published_once_the_store_has_it() -> None:
    store, events = MemoryStore(), InvoiceEvents()
    record = make_record(1)
    await store.add_invoice(record)
    subscription = events.subscribe("test")

    settled = await apply_and_publish(store, update(record, SETTLED, 1), events)
    assert settled is not None
    assert settled.state is SETTLED
    (event,) = await received(subscription)
    assert event == settled == await store.get_invoice(record.payment_hash)


async def test_stale_and_untracked_reports_are_not_published_repeats_are() -> None:
    store, events = MemoryStore(), InvoiceEvents()
    record = make_record(1)
    await store.add_invoice(record)
    subscription = events.subscribe("test")

    assert await apply_and_publish(store, update(make_record(2), SETTLED, 1), events) is None
    await apply_and_publish(store, update(record, SETTLED, 1), events)
    await apply_and_publish(store, update(record, OPEN), events)  # stale: refused
    await apply_and_publish(store, update(record, SETTLED, 1), events)  # a replay
    assert [r.state for r in await received(subscription)] == [SETTLED, SETTLED]


# --- who publishes ------------------------------------------------------------------------


async def test_the_watcher_publishes_a_settlement_recorded_first_by_someone_else() -> None:
    # Strict settlement or a redeem may record it before the watcher sees it.
    backend, store, events = FakeInvoiceBackend(), MemoryStore(), InvoiceEvents()
    new = await backend.add_invoice(Msat(1000), "test", 600)
    await store.add_invoice(dataclasses.replace(make_record(1), payment_hash=new.payment_hash))
    backend.pay(new.payment_hash)
    settled = backend.invoices[new.payment_hash]
    await store.apply_update(InvoiceUpdate.of(settled))
    subscription = events.subscribe("test")

    await InvoiceWatcher(backend, store, events=events).record(settled)

    assert [(r.payment_hash, r.state) for r in await received(subscription)] == [
        (new.payment_hash, SETTLED)
    ]


async def test_the_sweeper_publishes_what_it_records() -> None:
    backend, store, events = FakeInvoiceBackend(), MemoryStore(), InvoiceEvents()
    hashes = []
    for n in (1, 2):
        new = await backend.add_invoice(Msat(1000), "test", 600)
        now = backend.clock.now()
        await store.add_invoice(
            dataclasses.replace(make_record(n), payment_hash=new.payment_hash, expires_at=now + 600)
        )
        hashes.append(new.payment_hash)
    canceled, expired = hashes
    backend.cancel(canceled)
    backend.clock.advance(600 + EXPIRY_GRACE + 1)
    subscription = events.subscribe("test")

    await InvoiceSweeper(backend, store, backend.clock, retention=0, events=events).sweep()

    assert [(r.payment_hash, r.state) for r in await received(subscription)] == [
        (canceled, CANCELED),
        (expired, EXPIRED),
    ]
