"""The split ledger's rules every store applies, so they cannot drift apart: what a settlement
or a charge credits to whom, which payouts the store records, and what resolving one does to
its payee's running totals; and likewise for payment links, which links and link invoices the
store records and what a settlement adds to its link."""

from __future__ import annotations

from dataclasses import dataclass, replace

from gateway.errors import DuplicatePayout, StoreError
from gateway.ports import (
    InvoiceRecord,
    InvoiceState,
    Msat,
    PaymentHash,
    PaymentLink,
    Payout,
    PayoutState,
    Split,
)
from gateway.splits import ledger_entries

Entries = list[tuple[str, Msat]]


def invoice_source(payment_hash: bytes) -> str:
    return f"invoice:{payment_hash.hex()}"


def charge_source(reservation_id: int) -> str:
    return f"charge:{reservation_id:d}"


def settlement_entries(before: InvoiceRecord, after: InvoiceRecord) -> Entries:
    """The ledger entries of the update from ``before`` to ``after``: those of the amount
    paid (the invoice's amount when the node reported none) when an invoice with a split
    that buys no credit becomes SETTLED, else none. SETTLED is final: once per payment hash.
    A credit purchase is split when the credit is spent (``charge_entries``)."""
    if before.buys_credit or not before.split or before.state is InvoiceState.SETTLED:
        return []
    if after.state is not InvoiceState.SETTLED:
        return []
    return ledger_entries(before.split, after.amount_paid_msat or after.amount_msat)


def charge_entries(split: Split, charged_msat: int) -> Entries:
    """The ledger entries of a charge to a credit account on a route with ``split``."""
    return ledger_entries(split, charged_msat) if split else []


def earned(entries: Entries) -> Entries:
    """The payees' shares among ``entries`` (not the merchant's part), sorted by name: the
    order the stores lock payee rows in."""
    return [(payee, share) for payee, share in entries if payee]


def check_new_payout(payout: Payout) -> None:
    """A payout ``begin_payout`` may record."""
    if payout.state is not PayoutState.PENDING:
        raise ValueError(f"a payout begins PENDING, not {payout.state.value}")
    if not payout.payee:
        raise ValueError("a payout names its payee")
    if payout.amount_msat < 1:
        raise ValueError(f"a payout pays at least 1 msat, got {payout.amount_msat}")
    if payout.fee_reserve_msat < 0:
        raise ValueError(f"fee_reserve_msat must be >= 0, got {payout.fee_reserve_msat}")


def duplicate_payout(payment_hash: PaymentHash) -> DuplicatePayout:
    return DuplicatePayout(f"a payout of payment hash {payment_hash.hex()} is already recorded")


def check_resolution(state: PayoutState, fee_msat: Msat) -> None:
    """``finish_payout``'s arguments."""
    if state is PayoutState.PENDING:
        raise ValueError("a payout is finished as SUCCEEDED or FAILED, not PENDING")
    if fee_msat < 0:
        raise ValueError(f"fee_msat must be >= 0, got {fee_msat}")


def resolved(
    pending: Payout, state: PayoutState, fee_msat: Msat, now: float, failure: str
) -> Payout:
    """``pending`` resolved: SUCCEEDED with its fee (``StoreError`` above the fee reserve: the
    payment's limit), FAILED with its failure and no fee."""
    if state is PayoutState.FAILED:
        return replace(pending, state=state, fee_msat=Msat(0), resolved_at=now, failure=failure)
    if fee_msat > pending.fee_reserve_msat:
        raise StoreError(
            f"fee_msat {fee_msat} is above the payout's fee reserve {pending.fee_reserve_msat}"
        )
    return replace(pending, state=state, fee_msat=fee_msat, resolved_at=now, failure="")


@dataclass(frozen=True, slots=True)
class PayeeChange:
    """What resolving a payout adds to its payee's running totals (``pending`` is taken
    off); ``last_payout_at``: None, or the time it becomes if that is later."""

    pending: int
    paid: int
    fees: int
    merchant_fees: int
    last_payout_at: float | None


def payee_change(payout: Payout) -> PayeeChange:
    """The change to its payee of ``payout``, just resolved."""
    if payout.state is not PayoutState.SUCCEEDED:
        return PayeeChange(payout.debit_msat, 0, 0, 0, None)
    fee = payout.fee_msat
    return PayeeChange(
        pending=payout.debit_msat,
        paid=payout.amount_msat,
        fees=fee if payout.payee_pays_fee else 0,
        merchant_fees=0 if payout.payee_pays_fee else fee,
        last_payout_at=payout.created_at,
    )


def check_new_link(link: PaymentLink) -> None:
    """A link ``add_link`` may record: bounds of at least 1 msat, nothing paid yet."""
    if not link.link_id:
        raise ValueError("a payment link needs an id")
    if not 1 <= link.min_msat <= link.max_msat:
        raise ValueError(
            f"a payment link takes 1 <= min_msat <= max_msat, got {link.min_msat} and "
            f"{link.max_msat}"
        )
    if link.paid_count or link.paid_msat or link.last_paid_at is not None:
        raise ValueError("a new payment link has no payment yet")


def check_link_invoice(record: InvoiceRecord) -> None:
    """An invoice ``add_link_invoice`` may record: one of a link (service ``link:<id>``), and
    like every link or tip invoice, neither split nor buying credit."""
    if not record.link_id:
        raise ValueError(f"not a payment link's invoice: service {record.service!r}")
    if record.buys_credit or record.split:
        raise ValueError("a payment link's invoice is never split and buys no credit")


@dataclass(frozen=True, slots=True)
class LinkPayment:
    """What a settlement adds to its payment link: one payment of ``amount_msat``, and
    ``last_paid_at`` becomes ``at`` if that is later."""

    link_id: str
    amount_msat: Msat
    at: float


def link_payment(before: InvoiceRecord, after: InvoiceRecord, now: float) -> LinkPayment | None:
    """The payment the update from ``before`` to ``after`` adds to its link: when a link's
    invoice becomes SETTLED, the amount paid (the invoice's when the node reported none) at
    its ``settled_at`` (``now`` without one); else None. SETTLED is final: once per hash."""
    if not before.link_id or before.state is InvoiceState.SETTLED:
        return None
    if after.state is not InvoiceState.SETTLED:
        return None
    at = now if after.settled_at is None else after.settled_at
    return LinkPayment(before.link_id, after.amount_paid_msat or after.amount_msat, at)
