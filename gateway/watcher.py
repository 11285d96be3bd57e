"""Settlement tracking: follow the node's invoice stream and record every state change.

The watcher subscribes from the cursor stored with the invoices, so after a disconnect or a
restart LND replays exactly what was missed (indices strictly greater than the cursor). After
each (re)connection it also reconciles the invoices still open in the store with
LookupInvoice, which covers what a subscription cannot replay: invoices created before the
very first subscription (cursor 0 means "no replay") and hold-invoice transitions. Until a
first settlement is recorded (settle index 0: LND replays no settlement), the add replay
starts before the oldest unsettled tracked invoice, so a settlement that lands while the
subscription is being set up is not lost either.

An add event (state OPEN) changes nothing: the gateway records each invoice OPEN when it makes
it, and a stale add must not take a held (ACCEPTED) invoice back to OPEN. Its indices are saved
with the next state change, or with the first event ``cursor_delay`` seconds later: a restart
may replay that much more, adds that again change nothing.

Each recorded state is published to ``InvoiceEvents`` subscribers once the store has it. A
node or store failure is retried here, with capped exponential backoff; anything else (say
an invoice state the LND client cannot map) ends ``run()``, for its supervisor to log and
restart: the restart resumes from the stored cursor, so nothing recorded is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections.abc import AsyncGenerator

from gateway import errors
from gateway.events import InvoiceEvents, apply_and_publish
from gateway.ports import (
    NO_METER,
    Cursor,
    Invoice,
    InvoiceBackend,
    InvoiceState,
    InvoiceUpdate,
    Meter,
    PaymentHash,
    Store,
)

log = logging.getLogger(__name__)

_UNSETTLED = (InvoiceState.OPEN, InvoiceState.ACCEPTED)
# EXPIRED is the gateway's guess, not the node's: a settlement of one must still be replayed.
_MAY_SETTLE = (*_UNSETTLED, InvoiceState.EXPIRED)
# Seconds an add event's cursor may wait: one write a second for any number of challenges.
CURSOR_DELAY = 1.0


class InvoiceWatcher:
    """Keeps the store's invoice states in step with the node. Run it as one task."""

    def __init__(
        self,
        backend: InvoiceBackend,
        store: Store,
        *,
        initial_backoff: float = 0.5,
        max_backoff: float = 30.0,
        events: InvoiceEvents | None = None,
        meter: Meter = NO_METER,
        cursor_delay: float = CURSOR_DELAY,
    ) -> None:
        self._backend = backend
        self._cursor_delay = cursor_delay
        self._seen = Cursor()  # the highest indices of the events recorded
        self._cursor_due = -math.inf  # when an add event's indices are saved at the latest
        self._meter = meter
        self._store = store
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._events = events or InvoiceEvents()
        self._healthy = False
        # Set once the store has been reconciled with the node after (re)connecting.
        self.connected = asyncio.Event()

    async def run(self) -> None:
        """Follow the node until cancelled, reconnecting with capped exponential backoff after
        a node or store failure; any other exception ends it."""
        backoff = self._initial_backoff
        while True:
            self._healthy = False
            try:
                await self._follow()
                reason = "ended"
            except (errors.BackendError, errors.StoreError) as error:
                reason = f"failed: {error}"
            finally:
                self.connected.clear()  # also when cancelled: a stopped watcher is not connected
            if self._healthy:
                backoff = self._initial_backoff
            log.warning("invoice subscription %s; retrying in %.1fs", reason, backoff)
            self._meter.watcher_reconnect()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff)

    async def _follow(self) -> None:
        cursor = await self._store.get_cursor()
        stream = self._backend.subscribe_invoices(
            await self._replay_from(cursor), cursor.settle_index
        )
        # The stream starts on first iteration, in a task of its own; reconcile alongside it,
        # here, once the subscription has been asked for (a refused one then fails before a
        # reconciliation could count as a healthy connection). Both write idempotently, so
        # their order does not matter; an error either one does not handle ends both.
        streaming = asyncio.create_task(self._consume(stream))
        try:
            await asyncio.sleep(0)  # the streaming task takes its first step
            if not streaming.done():
                await self.reconcile()
            await streaming
        finally:
            streaming.cancel()
            await asyncio.gather(streaming, return_exceptions=True)

    async def _consume(self, stream: AsyncGenerator[Invoice, None]) -> None:
        try:
            async for invoice in stream:
                await self.record(invoice)
                self._meter.watcher_event()
                self._healthy = True
        finally:
            await stream.aclose()

    async def _replay_from(self, cursor: Cursor) -> int:
        """The add index to subscribe from.

        Settle index 0 makes the node replay no settlement at all, and reconciliation cannot
        see one that lands between its lookup and the subscription starting on the node. So
        until a settlement has been recorded, the replay starts before the oldest unsettled
        tracked invoice: an add replay carries the invoice's current state, settled or not.
        """
        if cursor.settle_index:
            return cursor.add_index
        unsettled = [
            record.add_index
            for state in _MAY_SETTLE
            for record in await self._store.list_invoices(state=state)
        ]
        # 0 means "no replay": the node's very first invoice cannot be replayed this way.
        starts = [index - 1 for index in unsettled if index > 1]
        if cursor.add_index:
            starts.append(cursor.add_index)
        return min(starts, default=0)

    async def reconcile(self) -> int:
        """Look up every unsettled tracked invoice on the node; returns how many changed.

        A failure is logged, not raised: the stream's own failure drives the reconnect.
        """
        changed = 0
        answered = False
        try:
            for state in _UNSETTLED:
                for record in await self._store.list_invoices(state=state):
                    try:
                        invoice = await self._backend.lookup_invoice(record.payment_hash)
                    except errors.InvoiceNotFound:
                        answered = True
                        log.warning(
                            "tracked invoice %s is unknown to the node", record.payment_hash.hex()
                        )
                        continue
                    answered = True
                    if invoice.state is not record.state:
                        await self._apply(invoice)
                        changed += 1
            if not answered:
                await self._prove_reachable()
        except (errors.BackendError, errors.StoreError) as error:
            log.warning("reconciliation failed: %s", error)
            return changed
        self._healthy = True
        self.connected.set()
        self._meter.watcher_event()
        if changed:
            log.info("reconciliation updated %d invoice(s)", changed)
        return changed

    async def _prove_reachable(self) -> None:
        """Nothing to look up, yet "caught up" must mean the node answered: gRPC connects
        lazily, so the subscription being asked for proves nothing. A random hash is not
        found by a reachable node."""
        with contextlib.suppress(errors.InvoiceNotFound):
            await self._backend.lookup_invoice(PaymentHash(secrets.token_bytes(32)))

    async def record(self, invoice: Invoice) -> None:
        """Apply one invoice event and advance the cursor past it (an add event's: within
        ``cursor_delay``)."""
        opened = invoice.state is InvoiceState.OPEN
        if not opened:
            await self._apply(invoice)
        self._seen = Cursor(
            max(self._seen.add_index, invoice.add_index),
            max(self._seen.settle_index, invoice.settle_index),
        )
        now = time.monotonic()
        if opened and now < self._cursor_due:
            return
        self._cursor_due = now + self._cursor_delay
        await self._store.save_cursor(self._seen)

    async def _apply(self, invoice: Invoice) -> None:
        await apply_and_publish(self._store, InvoiceUpdate.of(invoice), self._events)
