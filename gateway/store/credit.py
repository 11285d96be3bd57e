"""The rules both stores apply, so they cannot drift apart: what a settlement credits, what a
resolved withdrawal gives back, the arguments the store refuses, and which root key goes with
a pruned invoice."""

from __future__ import annotations

from gateway.errors import StoreError
from gateway.l402 import Identifier
from gateway.ports import (
    InvoiceRecord,
    InvoiceState,
    Msat,
    PaymentHash,
    Withdrawal,
    WithdrawalState,
)


def credit_bought(before: InvoiceRecord, after: InvoiceRecord) -> Msat:
    """What the update from ``before`` to ``after`` credits to the account of its token: the
    amount paid (the invoice's amount when the node reported none) when an invoice that buys
    credit becomes SETTLED, else 0. SETTLED is final, so this is once per payment hash."""
    if not before.buys_credit or before.state is InvoiceState.SETTLED:
        return Msat(0)
    if after.state is not InvoiceState.SETTLED:
        return Msat(0)
    return after.amount_paid_msat or after.amount_msat


def refund(resolved: Withdrawal) -> Msat:
    """What a resolved withdrawal gives back to the balance: the unused fee reserve when it
    succeeded, everything when it failed."""
    if resolved.state is WithdrawalState.SUCCEEDED:
        return Msat(resolved.fee_reserve_msat - resolved.fee_msat)
    return Msat(resolved.amount_msat + resolved.fee_reserve_msat)


def check_amount(name: str, amount_msat: int) -> None:
    if amount_msat < 0:
        raise ValueError(f"{name} must be >= 0, got {amount_msat}")


def check_pending(withdrawal: Withdrawal) -> None:
    """A withdrawal ``begin_withdrawal`` may record."""
    if withdrawal.state is not WithdrawalState.PENDING:
        raise ValueError(f"a withdrawal begins PENDING, not {withdrawal.state.value}")
    check_amount("amount_msat", withdrawal.amount_msat)
    check_amount("fee_reserve_msat", withdrawal.fee_reserve_msat)


def resolution_fee(state: WithdrawalState, fee_msat: Msat) -> Msat:
    """The fee a withdrawal resolved to ``state`` records: none when it failed."""
    if state is WithdrawalState.PENDING:
        raise ValueError("a withdrawal is finished as SUCCEEDED or FAILED, not PENDING")
    check_amount("fee_msat", fee_msat)
    return fee_msat if state is WithdrawalState.SUCCEEDED else Msat(0)


def duplicate_withdrawal(payment_hash: PaymentHash) -> StoreError:
    return StoreError(f"a withdrawal of payment hash {payment_hash.hex()} is already recorded")


def invoice_key_id(payment_hash: bytes, token_id: bytes) -> bytes | None:
    """The key id of the root key stored with the invoice of ``payment_hash``: a challenge
    stores it under sha256 of the macaroon identifier it mints, which embeds the invoice's
    payment hash and token id (``Identifier.key_id``). So pruning an unpaid top-up removes
    its own root key, never the key of another invoice of the token (a paid one, say).
    None when the two cannot form an identifier: no token was minted with them."""
    try:
        return Identifier(0, payment_hash, token_id).key_id
    except ValueError:
        return None


# ``revenue`` reads only invoices whose expiry is at most this long before its ``since``: a
# node takes no payment for an expired invoice, and a held one (pay on success) is settled
# or cancelled within its CLTV delta (at most 2016 blocks, about 14 days). A day more for
# the node's clock against ours.
SETTLED_AFTER_EXPIRY = 15 * 86_400


def check_bucket(bucket_seconds: int) -> None:
    """``revenue``'s bucket length: a whole number of seconds, at least one."""
    if bucket_seconds < 1:
        raise ValueError(f"bucket_seconds must be >= 1, got {bucket_seconds}")
