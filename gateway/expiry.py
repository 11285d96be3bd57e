"""Ending unpaid invoices: record the ones past their expiry, and prune them after a while.

LND's SubscribeInvoices never reports a cancellation, so without this an invoice nobody pays
stays OPEN in the store for ever, and every challenge's invoice and root key stay with it.
LND cancels an expired invoice itself (v0.21: LookupInvoice reports CANCELED within tens of
milliseconds of the expiry). Each pass of the ``InvoiceSweeper``:

1. asks the node (LookupInvoice) about at most ``max_lookups`` OPEN invoices past their
   expiry plus ``grace``, one at a time, and records the answer: CANCELED (or SETTLED,
   ACCEPTED) as reported; still OPEN, or unknown to the node (LND may delete canceled
   invoices), as EXPIRED, a state of ours that a later SETTLED or CANCELED still replaces;
2. when ``retention`` is positive, deletes CANCELED and EXPIRED invoices whose expiry is
   more than ``retention`` seconds ago, with their tokens' root keys, in batches of
   ``batch``, at most ``max_batches`` per pass. Settled invoices are never deleted;
3. gives credit held for requests back to its accounts once the hold expired (the request
   outlasted it, or the process serving it died before charging it), in the same batches;
4. when ``usage_retention`` is positive, deletes the credit accounts' charges (their usage
   history) made more than ``usage_retention`` seconds ago, in the same batches. Balances
   are not touched: the accounts' totals hold the money, a charge is only its record;
5. when ``webhook_retention`` (``[webhooks] retention``) is positive, deletes the webhook
   outbox's events written more than that many seconds ago that no configured endpoint
   (``webhook_endpoints``) still has to send, with their deliveries, in the same batches.
   Events are written whatever the configuration (every expired invoice makes one), so this
   runs with no endpoint configured too: then nothing holds them back but the retention,
   which they still wait out (``webhooks redeliver ID --endpoint NAME`` can send one to an
   endpoint added later). An endpoint no longer configured holds nothing back;
6. with ``rate_buckets`` (the rate limits shared through PostgreSQL), deletes the buckets
   untouched for ``rate_bucket_idle`` seconds, the longest any limit takes to refill one:
   they are full again, as a missing bucket is.

A pass that reached one of those bounds is followed by the next one after ``busy_pause``
rather than ``interval``, so a backlog drains at a bounded pace: on regtest a full pass (500
lookups, one at a time) took 0.47 s, so about 700 invoices a second, more than LND creates.
The states it records are published to ``InvoiceEvents`` subscribers.

Run ``run()`` as one supervised task (one per store: with several workers, the one that runs
the watcher). A failed pass ends it: its ``Supervisor`` logs the error and restarts it after
a jittered, capped backoff.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass

from gateway import errors
from gateway.events import InvoiceEvents, apply_and_publish
from gateway.ports import (
    Clock,
    InvoiceBackend,
    InvoiceState,
    InvoiceUpdate,
    Msat,
    RateBuckets,
    Store,
)

log = logging.getLogger(__name__)

# Past its expiry, an invoice is looked up after this many more seconds: LND cancels it
# within milliseconds, and the two hosts' clocks may differ a little.
EXPIRY_GRACE = 5.0


@dataclass(frozen=True, slots=True)
class SweepResult:
    """What one pass did."""

    looked_up: int = 0
    expired: int = 0  # recorded EXPIRED (the node still said OPEN, or did not know it)
    updated: int = 0  # recorded as the node reported it (CANCELED, SETTLED, ACCEPTED)
    pruned: int = 0  # invoices deleted with their root keys
    released: int = 0  # expired credit reservations given back to their accounts
    charges_pruned: int = 0  # credit charges (usage history) deleted past usage_retention
    events_pruned: int = 0  # webhook events deleted past webhook_retention
    rate_buckets_pruned: int = 0  # shared rate limit buckets deleted, full again
    busy: bool = False  # a bound was reached: more work is waiting


class InvoiceSweeper:
    """Records expired invoices and prunes unpaid ones. Run ``run()`` as one task."""

    def __init__(
        self,
        backend: InvoiceBackend,
        store: Store,
        clock: Clock,
        *,
        retention: float,
        usage_retention: float = 0.0,
        webhook_retention: float = 0.0,
        webhook_endpoints: Collection[str] = (),
        interval: float = 60.0,
        grace: float = EXPIRY_GRACE,
        max_lookups: int = 500,
        batch: int = 500,
        max_batches: int = 20,
        busy_pause: float = 0.2,
        events: InvoiceEvents | None = None,
        rate_buckets: RateBuckets | None = None,
        rate_bucket_idle: float = 0.0,
    ) -> None:
        if interval <= 0 or busy_pause <= 0:
            raise ValueError("interval and busy_pause must be positive")
        if min(retention, usage_retention, webhook_retention, grace, rate_bucket_idle) < 0:
            raise ValueError(
                "retention, usage_retention, webhook_retention, grace and rate_bucket_idle "
                "must be >= 0"
            )
        if max_lookups < 1 or batch < 1 or max_batches < 1:
            raise ValueError("max_lookups, batch and max_batches must be at least 1")
        self._backend = backend
        self._store = store
        self._clock = clock
        self._retention = retention
        self._usage_retention = usage_retention
        self._webhook_retention = webhook_retention
        self._webhook_endpoints = frozenset(webhook_endpoints)
        self._interval = interval
        self._grace = grace
        self._max_lookups = max_lookups
        self._batch = batch
        self._max_batches = max_batches
        self._busy_pause = busy_pause
        self._events = events or InvoiceEvents()
        self._rate_buckets = rate_buckets
        self._rate_bucket_idle = rate_bucket_idle

    async def run(self) -> None:
        """Sweep every ``interval`` (after a busy pass, ``busy_pause``) until cancelled or a
        pass fails."""
        while True:
            result = await self.sweep()
            await asyncio.sleep(self._busy_pause if result.busy else self._interval)

    async def sweep(self) -> SweepResult:
        """One pass: record what the node says about overdue invoices, then prune."""
        now = self._clock.now()
        overdue = await self._store.list_overdue(now - self._grace, self._max_lookups)
        expired = updated = 0
        for record in overdue:
            try:
                invoice = await self._backend.lookup_invoice(record.payment_hash)
            except errors.InvoiceNotFound:
                # LND deletes only canceled invoices, never a settled one.
                log.warning(
                    "expired invoice %s is unknown to the node; recording it EXPIRED",
                    record.payment_hash.hex(),
                )
                update = InvoiceUpdate(record.payment_hash, InvoiceState.EXPIRED, 0, Msat(0), None)
            else:
                update = InvoiceUpdate.of(invoice)
                if invoice.state is InvoiceState.OPEN:
                    log.info(
                        "the node still reports invoice %s OPEN %.0fs past its expiry; "
                        "recording it EXPIRED",
                        record.payment_hash.hex(),
                        now - record.expires_at,
                    )
                    update = dataclasses.replace(update, state=InvoiceState.EXPIRED)
            await apply_and_publish(self._store, update, self._events)
            if update.state is InvoiceState.EXPIRED:
                expired += 1
            else:
                updated += 1
        busy = len(overdue) >= self._max_lookups
        pruned = charges_pruned = events_pruned = buckets_pruned = 0
        if self._retention > 0:
            pruned, busy_pruning = await self._in_batches(
                lambda limit: self._store.prune_unpaid(now - self._retention, limit)
            )
            busy |= busy_pruning
        released, busy_releasing = await self._in_batches(
            lambda limit: self._store.release_expired_reservations(now, limit)
        )
        busy |= busy_releasing
        if self._usage_retention > 0:
            charges_pruned, busy_pruning = await self._in_batches(
                lambda limit: self._store.prune_charges(now - self._usage_retention, limit)
            )
            busy |= busy_pruning
        if self._webhook_retention > 0:
            before = now - self._webhook_retention
            events_pruned, busy_pruning = await self._in_batches(
                lambda limit: self._store.prune_webhook_events(
                    before, limit, self._webhook_endpoints
                )
            )
            busy |= busy_pruning
        if self._rate_buckets is not None:
            buckets = self._rate_buckets
            buckets_pruned, busy_pruning = await self._in_batches(
                lambda limit: buckets.prune_rate_buckets(now - self._rate_bucket_idle, limit)
            )
            busy |= busy_pruning
        result = SweepResult(
            looked_up=len(overdue),
            expired=expired,
            updated=updated,
            pruned=pruned,
            released=released,
            charges_pruned=charges_pruned,
            events_pruned=events_pruned,
            rate_buckets_pruned=buckets_pruned,
            busy=busy,
        )
        if expired or updated or pruned or charges_pruned or events_pruned:
            log.info(
                "invoice sweep: %d expired, %d updated from the node, %d pruned, "
                "%d credit charges pruned, %d webhook events pruned",
                expired,
                updated,
                pruned,
                charges_pruned,
                events_pruned,
            )
        if released:
            log.warning(
                "released %d expired credit reservations uncharged (requests that outlasted "
                "[credit] reservation_seconds, or whose process stopped)",
                released,
            )
        return result

    async def _in_batches(self, delete: Callable[[int], Awaitable[int]]) -> tuple[int, bool]:
        """Run ``delete(batch)`` until a batch comes back short or ``max_batches`` ran: how
        many went, and whether the bound was reached (more may be waiting)."""
        total = 0
        for _ in range(self._max_batches):
            count = await delete(self._batch)
            total += count
            if count < self._batch:
                return total, False
        return total, True
