"""What the core needs from the outside world, as small Protocols and frozen values.

Amounts are integer millisatoshis everywhere. Optional abilities (hold invoices, paying)
are separate Protocols so a backend can lack them honestly.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import NewType, Protocol

PaymentHash = NewType("PaymentHash", bytes)
Preimage = NewType("Preimage", bytes)
Msat = NewType("Msat", int)


class InvoiceState(enum.Enum):
    OPEN = "OPEN"
    ACCEPTED = "ACCEPTED"  # hold invoice: HTLCs locked in, waiting for settle or cancel
    SETTLED = "SETTLED"
    CANCELED = "CANCELED"


class PaymentStatus(enum.Enum):
    INITIATED = "INITIATED"
    IN_FLIGHT = "IN_FLIGHT"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"


@dataclass(frozen=True, slots=True)
class NewInvoice:
    """An invoice the node has just created."""

    payment_hash: PaymentHash
    payment_request: str
    add_index: int


@dataclass(frozen=True, slots=True)
class Invoice:
    """An invoice as the node reports it, in any state."""

    payment_hash: PaymentHash
    payment_request: str
    memo: str
    amount_msat: Msat
    amount_paid_msat: Msat
    state: InvoiceState
    created_at: int
    settled_at: int | None
    expiry: int
    add_index: int
    settle_index: int
    # Secret once settled; kept out of repr so it never lands in a log line.
    preimage: Preimage | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class NodeInfo:
    pubkey: str
    alias: str
    network: str
    block_height: int
    synced_to_chain: bool
    num_active_channels: int
    version: str


@dataclass(frozen=True, slots=True)
class DecodedPaymentRequest:
    destination: str
    payment_hash: PaymentHash
    amount_msat: Msat
    timestamp: int
    expiry: int
    description: str
    cltv_expiry: int


@dataclass(frozen=True, slots=True)
class Payment:
    """The final state of an outgoing payment."""

    payment_hash: PaymentHash
    status: PaymentStatus
    amount_msat: Msat
    fee_msat: Msat
    # Pubkeys of the successful route, first hop to destination.
    route: tuple[str, ...]
    preimage: Preimage | None = field(default=None, repr=False)


class InvoiceBackend(Protocol):
    """Creates invoices and reports their state changes."""

    async def add_invoice(self, amount_msat: Msat, memo: str, expiry: int) -> NewInvoice: ...

    async def lookup_invoice(self, payment_hash: PaymentHash) -> Invoice: ...

    def subscribe_invoices(
        self, add_index: int = 0, settle_index: int = 0
    ) -> AsyncGenerator[Invoice, None]: ...


class HoldInvoiceBackend(Protocol):
    """Invoices whose preimage the caller holds and reveals (or not) after payment."""

    async def add_hold_invoice(
        self, payment_hash: PaymentHash, amount_msat: Msat, memo: str, expiry: int
    ) -> NewInvoice: ...

    async def settle_invoice(self, preimage: Preimage) -> None: ...

    async def cancel_invoice(self, payment_hash: PaymentHash) -> None: ...

    def subscribe_single_invoice(
        self, payment_hash: PaymentHash
    ) -> AsyncGenerator[Invoice, None]: ...


class Payer(Protocol):
    """Pays BOLT11 payment requests."""

    async def send_payment(
        self, payment_request: str, *, max_fee_msat: Msat, payment_timeout: float
    ) -> Payment: ...
