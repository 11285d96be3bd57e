"""The JSON shape of the store's records the operator reads: one function per record, used
by the command line (``accounts --json``, ``webhooks list|show --json``, ``payees --json``,
``payouts --json``, ``links --json``) and the admin dashboard (``/api/accounts``,
``/api/webhooks``), so both give the same keys. The ledgers' totals say whether they
reconcile the same way: ``reconciles`` and ``unaccounted_msat``, what ``received`` holds
beyond its parts.

It needs only ``gateway.ports``: the web and command-line layers may both import it.
Amounts are integer msat, times unix seconds, ids hex.
"""

from __future__ import annotations

from typing import Any

from gateway.ports import (
    Account,
    CreditTotals,
    PayeeBalance,
    PaymentLink,
    Payout,
    SplitTotals,
    WebhookDelivery,
)

__all__ = [
    "account_json",
    "credit_totals_json",
    "delivery_json",
    "link_json",
    "payee_balance_json",
    "payout_json",
    "split_reconciliation",
    "split_totals_json",
    "unaccounted_msat",
]


def account_json(account: Account) -> dict[str, Any]:
    """One credit account."""
    return {
        "token_id": account.token_id.hex(),
        "service": account.service,
        "credited_msat": account.credited_msat,
        "spent_msat": account.spent_msat,
        "reserved_msat": account.reserved_msat,
        "withdrawn_msat": account.withdrawn_msat,
        "balance_msat": account.balance_msat,
        "created_at": account.created_at,
        "last_used_at": account.last_used_at,
    }


def unaccounted_msat(totals: CreditTotals) -> int:
    """What ``received`` holds beyond its parts; anything but 0 is a bookkeeping error."""
    return totals.received_msat - (
        totals.consumed_msat
        + totals.withdrawn_msat
        + totals.pending_withdrawals_msat
        + totals.reserved_msat
        + totals.outstanding_msat
    )


def credit_totals_json(totals: CreditTotals) -> dict[str, Any]:
    """The totals over every credit account; ``reconciles``: received equals its parts."""
    return {
        "accounts": totals.accounts,
        "received_msat": totals.received_msat,
        "consumed_msat": totals.consumed_msat,
        "withdrawn_msat": totals.withdrawn_msat,
        "pending_withdrawals_msat": totals.pending_withdrawals_msat,
        "reserved_msat": totals.reserved_msat,
        "outstanding_msat": totals.outstanding_msat,
        "reconciles": unaccounted_msat(totals) == 0,
        "unaccounted_msat": unaccounted_msat(totals),
    }


def delivery_json(delivery: WebhookDelivery) -> dict[str, Any]:
    """One event's delivery to one endpoint; ``type`` is the event's (as in its body)."""
    return {
        "event_id": delivery.event_id,
        "endpoint": delivery.endpoint,
        "type": delivery.event_type,
        "state": delivery.state.value,
        "attempts": delivery.attempts,
        "next_attempt_at": delivery.next_attempt_at,
        "last_status": delivery.last_status,
        "last_error": delivery.last_error,
        "delivered_at": delivery.delivered_at,
    }


def split_reconciliation(totals: SplitTotals) -> tuple[int, int, int]:
    """(kept, fees, unaccounted) of the split ledger: what the merchant kept after the routing
    fees it bore, every routing fee, and what ``received`` holds beyond ``kept + paid +
    accrued + pending + fees`` (anything but 0 is a bookkeeping error)."""
    kept = totals.kept_msat - totals.merchant_fees_msat
    fees = totals.payee_fees_msat + totals.merchant_fees_msat
    parts = kept + totals.paid_msat + totals.accrued_msat + totals.pending_msat + fees
    return kept, fees, totals.received_msat - parts


def payee_balance_json(balance: PayeeBalance, destination: str | None) -> dict[str, Any]:
    """One payee's ledger row; ``destination`` None: no longer configured. ``earned_msat`` =
    accrued + pending + paid + ``fees_msat`` (the routing fees the payee bore);
    ``merchant_fees_msat`` are those the merchant bore for its payouts."""
    return {
        "payee": balance.payee,
        "destination": destination,
        "earned_msat": balance.earned_msat,
        "accrued_msat": balance.accrued_msat,
        "pending_msat": balance.pending_msat,
        "paid_msat": balance.paid_msat,
        "fees_msat": balance.fees_msat,
        "merchant_fees_msat": balance.merchant_fees_msat,
        "last_payout_at": balance.last_payout_at,
    }


def split_totals_json(totals: SplitTotals) -> dict[str, Any]:
    """The split ledger's totals over every split route; ``reconciles``: received = kept
    (after the merchant's routing fees) + paid + accrued + pending + fees (all of them)."""
    kept, fees, unaccounted = split_reconciliation(totals)
    return {
        "received_msat": totals.received_msat,
        "kept_msat": totals.kept_msat,
        "earned_msat": totals.earned_msat,
        "paid_msat": totals.paid_msat,
        "pending_msat": totals.pending_msat,
        "accrued_msat": totals.accrued_msat,
        "payee_fees_msat": totals.payee_fees_msat,
        "merchant_fees_msat": totals.merchant_fees_msat,
        "kept_after_fees_msat": kept,
        "fees_msat": fees,
        "reconciles": unaccounted == 0,
        "unaccounted_msat": unaccounted,
    }


def payout_json(payout: Payout) -> dict[str, Any]:
    """One payout to a payee."""
    return {
        "payment_hash": payout.payment_hash.hex(),
        "payee": payout.payee,
        "destination": payout.destination,
        "payment_request": payout.payment_request,
        "amount_msat": payout.amount_msat,
        "fee_reserve_msat": payout.fee_reserve_msat,
        "payee_pays_fee": payout.payee_pays_fee,
        "state": payout.state.value,
        "created_at": payout.created_at,
        "fee_msat": payout.fee_msat,
        "resolved_at": payout.resolved_at,
        "failure": payout.failure,
    }


def link_json(link: PaymentLink, now: float) -> dict[str, Any]:
    """One payment link and its ``state`` at ``now``; ``open_payment_hash``: a single-use
    link's invoice that can pay it (null before its page or a wallet asked for one)."""
    return {
        "link_id": link.link_id,
        "state": link.state(now).value,
        "memo": link.memo,
        "min_msat": link.min_msat,
        "max_msat": link.max_msat,
        "fixed": link.fixed,
        "single_use": link.single_use,
        "created_at": link.created_at,
        "expires_at": link.expires_at,
        "canceled_at": link.canceled_at,
        "paid_count": link.paid_count,
        "paid_msat": link.paid_msat,
        "last_paid_at": link.last_paid_at,
        "open_payment_hash": None if link.open_hash is None else link.open_hash.hex(),
    }
