"""In-process stand-ins for fast tests. Never the only proof of a feature: the regtest
tests run the same paths against real LND nodes."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import AsyncGenerator

from gateway import errors
from gateway.ports import (
    Invoice,
    InvoiceState,
    Msat,
    NewInvoice,
    PaymentHash,
    Preimage,
)


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.current = start

    def now(self) -> float:
        return self.current

    def advance(self, seconds: float) -> None:
        self.current += seconds


class FakeInvoiceBackend:
    """Creates invoices with known preimages and lets a test settle them."""

    def __init__(self, clock: FakeClock | None = None) -> None:
        self.clock = clock or FakeClock()
        self.invoices: dict[bytes, Invoice] = {}
        self.preimages: dict[bytes, Preimage] = {}
        self.unavailable = False
        self._add_index = 0
        self._settle_index = 0
        self._events: asyncio.Queue[Invoice] = asyncio.Queue()

    def _check(self) -> None:
        if self.unavailable:
            raise errors.BackendUnavailable("fake node is down")

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
        self._events.put_nowait(invoice)
        return NewInvoice(payment_hash, invoice.payment_request, self._add_index)

    def pay(self, payment_hash: bytes) -> Preimage:
        """Settle an invoice as if a payer had paid it; returns the preimage the payer learns."""
        invoice = self.invoices[payment_hash]
        self._settle_index += 1
        settled = Invoice(
            payment_hash=invoice.payment_hash,
            payment_request=invoice.payment_request,
            memo=invoice.memo,
            amount_msat=invoice.amount_msat,
            amount_paid_msat=invoice.amount_msat,
            state=InvoiceState.SETTLED,
            created_at=invoice.created_at,
            settled_at=int(self.clock.now()),
            expiry=invoice.expiry,
            add_index=invoice.add_index,
            settle_index=self._settle_index,
            preimage=self.preimages[payment_hash],
        )
        self.invoices[payment_hash] = settled
        self._events.put_nowait(settled)
        return self.preimages[payment_hash]

    async def lookup_invoice(self, payment_hash: PaymentHash) -> Invoice:
        self._check()
        try:
            return self.invoices[payment_hash]
        except KeyError:
            raise errors.InvoiceNotFound("no such invoice") from None

    async def subscribe_invoices(
        self, add_index: int = 0, settle_index: int = 0
    ) -> AsyncGenerator[Invoice, None]:
        self._check()
        while True:
            invoice = await self._events.get()
            self._check()
            yield invoice
