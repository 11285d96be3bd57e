"""In-process invoice events: the invoice states the gateway records, as an async stream, so a
feature reacts to a settlement instead of polling the store::

    with events.subscribe("credit ledger") as subscription:
        ...  # catch up from the store first: subscribed, so nothing falls in between
        async for record in subscription:
            if record.state is InvoiceState.SETTLED:
                ...

What is published: ``apply_and_publish()`` writes a reported update through the store
(``Store.apply_update``, where the state rules live) and, once that has committed, publishes
the stored record if it is now in the reported state (a stale report the rules refused is
not). The watcher reports every state change the node gives for a tracked invoice (not its
add events: the gateway records an invoice OPEN when it makes it); the sweeper the EXPIRED it
records, or the node's answer.

Delivery is in order, at least once, and in this process only: the node may replay a report
after a reconnect, and a settlement that strict settlement or a redeem recorded first is
still published when the watcher sees it. React idempotently, keyed by the payment hash.

A slow subscriber never blocks the publisher, and never loses an event silently: each
subscription queues at most ``capacity`` events; when one more arrives it is cut off, with a
warning. It still gets what was queued, then its iteration raises ``EventsLost``: what it
missed is in the store, so it catches up from there and subscribes again. A worker that
only needs waking (it reads the store itself) runs ``wake_on(events, name, wake, when)``,
which does that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from types import TracebackType

from gateway.errors import GatewayError
from gateway.ports import InvoiceRecord, InvoiceUpdate, Store

log = logging.getLogger(__name__)

DEFAULT_CAPACITY = 1024


class EventsLost(GatewayError):
    """A subscriber fell more than its queue's capacity behind and was cut off; what it
    missed is in the store."""


class InvoiceEvents:
    """Publishes recorded invoice states to the subscriptions open at the time."""

    def __init__(self) -> None:
        self._subscriptions: set[Subscription] = set()

    def subscribe(self, name: str, capacity: int = DEFAULT_CAPACITY) -> Subscription:
        """A subscription to every event published from now on; ``name`` is for the logs."""
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        subscription = Subscription(self, name, capacity)
        self._subscriptions.add(subscription)
        return subscription

    def publish(self, record: InvoiceRecord) -> None:
        """Queue ``record`` for every subscriber; never waits."""
        for subscription in list(self._subscriptions):
            subscription.offer(record)

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)


class Subscription:
    """One subscriber's bounded queue of events: iterate it with ``async for``; a context
    manager that unsubscribes on exit."""

    def __init__(self, events: InvoiceEvents, name: str, capacity: int) -> None:
        self.name = name
        self._events = events
        # None wakes a reader waiting on an empty queue when the subscription closes.
        self._queue: asyncio.Queue[InvoiceRecord | None] = asyncio.Queue(maxsize=capacity)
        self._lost = False
        self._closed = False

    def offer(self, record: InvoiceRecord) -> None:
        """Queue one event; a full queue cuts the subscription off instead of waiting."""
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            log.warning(
                "invoice event subscriber %r fell %d events behind and was cut off; "
                "it must catch up from the store",
                self.name,
                self._queue.maxsize,
            )
            self._lost = True
            self.close()

    def close(self) -> None:
        """Unsubscribe; iteration ends once the queued events have been read."""
        if self._closed:
            return
        self._closed = True
        self._events.unsubscribe(self)
        with contextlib.suppress(asyncio.QueueFull):  # full: nobody is waiting
            self._queue.put_nowait(None)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> InvoiceRecord:
        while True:
            # Closed and drained: nothing more will come (a closed queue is never added to).
            if self._closed and self._queue.empty():
                if self._lost:
                    raise EventsLost(f"invoice event subscriber {self.name!r} fell behind")
                raise StopAsyncIteration
            record = await self._queue.get()
            if record is not None:
                return record


async def apply_and_publish(
    store: Store, update: InvoiceUpdate, events: InvoiceEvents
) -> InvoiceRecord | None:
    """Apply ``update`` through ``store``; once committed, publish the stored record if it is
    now in the update's state. Returns the stored record, None if the hash is not tracked."""
    record = await store.apply_update(update)
    if record is not None and record.state is update.state:
        events.publish(record)
    return record


async def wake_on(
    events: InvoiceEvents,
    name: str,
    wake: Callable[[], None],
    when: Callable[[InvoiceRecord], bool] = lambda record: True,
) -> None:
    """Call ``wake`` for every published event ``when`` accepts, until cancelled: for a
    worker that reads the store itself. Cut off for falling behind, it wakes too (what it
    missed is in the store) and subscribes again."""
    while True:
        try:
            with events.subscribe(name) as subscription:
                async for record in subscription:
                    if when(record):
                        wake()
        except EventsLost:
            wake()
