"""In-process stand-ins for fast tests. Never the only proof of a feature: the regtest
tests run the same paths against real LND nodes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from typing import Any

from gateway import errors
from gateway.ports import (
    Invoice,
    InvoiceState,
    Msat,
    NewInvoice,
    PaymentHash,
    Preimage,
)
from gateway.pricing import Pricing, Rule
from gateway.service import L402Service
from gateway.store import MemoryStore
from gateway.watcher import InvoiceWatcher


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.current = start

    def now(self) -> float:
        return self.current

    def advance(self, seconds: float) -> None:
        self.current += seconds


class FakeInvoiceBackend:
    """Creates invoices with known preimages and lets a test settle them.

    ``subscribe_invoices`` behaves like LND's: it replays invoices added after ``add_index``
    and settled after ``settle_index`` (0: no replay), then streams live events. Failures:
    ``unavailable`` makes every call fail; ``fail_subscriptions = n`` makes the next ``n``
    subscriptions fail at once; ``disconnect()`` breaks the live streams.
    """

    def __init__(self, clock: FakeClock | None = None) -> None:
        self.clock = clock or FakeClock()
        self.invoices: dict[bytes, Invoice] = {}
        self.preimages: dict[bytes, Preimage] = {}
        self.unavailable = False
        self.fail_subscriptions = 0
        self.subscriptions: list[tuple[int, int]] = []  # (add_index, settle_index) per call
        self.connections = 0  # subscriptions that went live
        self.lookups = 0  # lookup_invoice calls
        self._changed = asyncio.Condition()
        self._add_index = 0
        self._settle_index = 0
        self._streams: set[asyncio.Queue[Invoice | None]] = set()

    def _check(self) -> None:
        if self.unavailable:
            raise errors.BackendUnavailable("fake node is down")

    def _publish(self, invoice: Invoice) -> None:
        for queue in self._streams:
            queue.put_nowait(invoice)

    async def add_invoice(self, amount_msat: Msat, memo: str, expiry: int) -> NewInvoice:
        self._check()
        preimage = Preimage(secrets.token_bytes(32))
        payment_hash = PaymentHash(hashlib.sha256(preimage).digest())
        self._add_index += 1
        invoice = Invoice(
            payment_hash=payment_hash,
            payment_request=f"lnbcrtfake{payment_hash.hex()}",
            memo=memo,
            amount_msat=amount_msat,
            amount_paid_msat=Msat(0),
            state=InvoiceState.OPEN,
            created_at=int(self.clock.now()),
            settled_at=None,
            expiry=expiry,
            add_index=self._add_index,
            settle_index=0,
        )
        self.invoices[payment_hash] = invoice
        self.preimages[payment_hash] = preimage
        self._publish(invoice)
        return NewInvoice(payment_hash, invoice.payment_request, self._add_index)

    def pay(self, payment_hash: bytes) -> Preimage:
        """Settle an invoice as if a payer had paid it; returns the preimage the payer learns."""
        invoice = self.invoices[payment_hash]
        self._settle_index += 1
        settled = dataclasses.replace(
            invoice,
            amount_paid_msat=invoice.amount_msat,
            state=InvoiceState.SETTLED,
            settled_at=int(self.clock.now()),
            settle_index=self._settle_index,
            preimage=self.preimages[payment_hash],
        )
        self.invoices[payment_hash] = settled
        self._publish(settled)
        return self.preimages[payment_hash]

    def cancel(self, payment_hash: bytes) -> None:
        """Cancel an open invoice, as LND does when it expires."""
        canceled = dataclasses.replace(self.invoices[payment_hash], state=InvoiceState.CANCELED)
        self.invoices[payment_hash] = canceled
        self._publish(canceled)

    def disconnect(self) -> None:
        """Break every live subscription: each fails with BackendUnavailable."""
        for queue in self._streams:
            queue.put_nowait(None)

    async def wait_connections(self, total: int) -> None:
        """Wait until ``total`` subscriptions have gone live since the fake was made."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.connections >= total)

    async def wait_subscriptions(self, total: int) -> None:
        """Wait until ``subscribe_invoices`` has been called ``total`` times, failed or not."""
        async with self._changed:
            await self._changed.wait_for(lambda: len(self.subscriptions) >= total)

    async def lookup_invoice(self, payment_hash: PaymentHash) -> Invoice:
        self.lookups += 1
        self._check()
        try:
            return self.invoices[payment_hash]
        except KeyError:
            raise errors.InvoiceNotFound("no such invoice") from None

    async def subscribe_invoices(
        self, add_index: int = 0, settle_index: int = 0
    ) -> AsyncGenerator[Invoice, None]:
        self.subscriptions.append((add_index, settle_index))
        async with self._changed:
            self._changed.notify_all()
        self._check()
        if self.fail_subscriptions > 0:
            self.fail_subscriptions -= 1
            raise errors.BackendUnavailable("fake subscription refused")
        queue: asyncio.Queue[Invoice | None] = asyncio.Queue()
        replay = sorted(self.invoices.values(), key=lambda invoice: invoice.add_index)
        for invoice in replay:
            if (add_index and invoice.add_index > add_index) or (
                settle_index and invoice.settle_index > settle_index
            ):
                queue.put_nowait(invoice)
        self._streams.add(queue)
        self.connections += 1
        async with self._changed:
            self._changed.notify_all()
        try:
            while True:
                event = await queue.get()
                if event is None:
                    raise errors.BackendUnavailable("fake subscription broken")
                self._check()
                yield event
        finally:
            self._streams.discard(queue)


class FakeGateway:
    """A ``GatewayFactory`` for the web adapters: an ``L402Service`` over the fakes.

    Each entry builds the service (and runs an ``InvoiceWatcher``, as ``running_gateway``
    does); ``entered`` and ``exited`` count the lifecycle.
    """

    def __init__(self, rules: Sequence[Rule], **options: Any) -> None:
        self.clock = FakeClock()
        self.backend = FakeInvoiceBackend(self.clock)
        self.store = MemoryStore()
        self.pricing = Pricing(rules)
        self.options = options
        self.entered = 0
        self.exited = 0
        self.service: L402Service | None = None

    @contextlib.asynccontextmanager
    async def __call__(self) -> AsyncIterator[L402Service]:
        self.entered += 1
        self.service = L402Service(
            pricing=self.pricing,
            backend=self.backend,
            store=self.store,
            clock=self.clock,
            **self.options,
        )
        watcher = InvoiceWatcher(self.backend, self.store, initial_backoff=0.01)
        task = asyncio.create_task(watcher.run())
        try:
            yield self.service
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            self.service = None
            self.exited += 1

    def pay(self, challenge: Mapping[str, Any]) -> str:
        """Pay a 402's problem+json body; the ``Authorization`` value for the retry."""
        preimage = self.backend.pay(bytes.fromhex(challenge["payment_hash"]))
        return f"L402 {challenge['macaroon']}:{preimage.hex()}"
