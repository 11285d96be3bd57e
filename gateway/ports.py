"""What the core needs from the outside world, as small Protocols and frozen values.

Amounts are integer millisatoshis everywhere. Optional abilities (hold invoices, paying)
are separate Protocols so a backend can lack them honestly.
"""

from __future__ import annotations

import enum
import time
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
    # Ours, not the node's: past its expiry the node still reported it OPEN, or no longer knew
    # it. Never goes back to OPEN; a SETTLED or CANCELED from the node still replaces it.
    EXPIRED = "EXPIRED"


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

    async def lookup_payment(self, payment_hash: PaymentHash) -> Payment | None:
        """The current state of an outgoing payment (any status, IN_FLIGHT included).

        None when this payer never started a payment with that hash. A paying client uses it
        to learn, after a crash, whether a payment it had begun went through.
        """


class Clock(Protocol):
    """Wall-clock time in seconds since the epoch (injected so tests can move it)."""

    def now(self) -> float: ...


class SystemClock:
    """The real clock."""

    def now(self) -> float:
        return time.time()


@dataclass(frozen=True, slots=True)
class InvoiceRecord:
    """An invoice the gateway issued for a challenge, as the store tracks it."""

    payment_hash: PaymentHash
    payment_request: str
    amount_msat: Msat
    token_id: bytes
    service: str
    method: str
    path: str
    state: InvoiceState
    created_at: float
    expires_at: float
    add_index: int
    settle_index: int = 0
    amount_paid_msat: Msat = Msat(0)
    settled_at: float | None = None


@dataclass(frozen=True, slots=True)
class InvoiceUpdate:
    """A state change of a tracked invoice, as reported by the node."""

    payment_hash: PaymentHash
    state: InvoiceState
    settle_index: int
    amount_paid_msat: Msat
    settled_at: float | None

    @classmethod
    def of(cls, invoice: Invoice) -> InvoiceUpdate:
        """The update an invoice reported by the node makes to its tracked record."""
        return cls(
            payment_hash=invoice.payment_hash,
            state=invoice.state,
            settle_index=invoice.settle_index,
            amount_paid_msat=invoice.amount_paid_msat,
            settled_at=float(invoice.settled_at) if invoice.settled_at else None,
        )


@dataclass(frozen=True, slots=True)
class Cursor:
    """The highest add and settle indices the watcher has processed."""

    add_index: int = 0
    settle_index: int = 0


class Store(Protocol):
    """Durable state: token root keys, issued invoices and the watcher's cursor.

    Every write is idempotent, so a replayed event or a retried request is harmless.
    """

    async def put_root_key(self, key_id: bytes, token_id: bytes, root_key: bytes) -> None:
        """Store a token's root key under ``key_id`` = sha256(macaroon identifier)."""

    async def get_root_key(self, key_id: bytes) -> bytes | None: ...

    async def revoke_token(self, token_id: bytes) -> bool:
        """Delete the token's root key; True if there was one."""

    async def add_invoice(self, record: InvoiceRecord) -> None:
        """Record a newly issued invoice; a second call for the same hash changes nothing."""

    async def apply_update(self, update: InvoiceUpdate) -> bool:
        """Move a tracked invoice to a new state; False if the hash is not tracked.

        A terminal state (SETTLED, CANCELED) is never overwritten by an older one. EXPIRED
        is only entered from OPEN and only left for SETTLED or CANCELED.
        """

    async def get_invoice(self, payment_hash: PaymentHash) -> InvoiceRecord | None: ...

    async def list_invoices(
        self, state: InvoiceState | None = None, limit: int | None = None
    ) -> list[InvoiceRecord]:
        """Newest first, optionally only those in ``state``."""

    async def list_overdue(self, expired_before: float, limit: int) -> list[InvoiceRecord]:
        """OPEN invoices whose ``expires_at`` is before ``expired_before``, the earliest
        expiry first, at most ``limit`` of them."""

    async def prune_unpaid(self, expired_before: float, limit: int) -> int:
        """Delete at most ``limit`` CANCELED or EXPIRED invoices whose ``expires_at`` is before
        ``expired_before``, with their tokens' root keys; returns how many invoices went.

        A settled invoice and its root key are never deleted; running it again is harmless.
        """

    async def get_cursor(self) -> Cursor: ...

    async def save_cursor(self, cursor: Cursor) -> None:
        """Advance the cursor; each index only ever grows."""

    async def close(self) -> None: ...
