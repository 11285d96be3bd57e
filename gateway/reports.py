"""The JSON shape of the store's records the operator reads: one function per record, used
by the command line (``accounts --json``, ``webhooks list|show --json``) and the admin
dashboard (``/api/accounts``, ``/api/webhooks``), so both give the same keys.

It needs only ``gateway.ports``: the web and command-line layers may both import it.
Amounts are integer msat, times unix seconds, ids hex.
"""

from __future__ import annotations

from typing import Any

from gateway.ports import Account, CreditTotals, WebhookDelivery

__all__ = ["account_json", "credit_totals_json", "delivery_json", "unaccounted_msat"]


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
