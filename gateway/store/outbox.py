"""The webhook events both stores write, so they cannot drift apart: which change makes which
event, its resource (what orders a receiver's events) and its JSON payload.

Each function gets the row before and after one write and returns the events to insert in
that same write: an event exists exactly when its change was committed. Payloads name the
payment hash, token id (hex), service, payee, tip jar or payment link, amounts in msat and a
payer's comment; never a preimage, root key, macaroon, request headers or body.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from typing import Any

from gateway.ports import (
    SETTLED_BY_NODE,
    HeldRequest,
    HeldState,
    InvoiceRecord,
    InvoiceState,
    PaymentLink,
    Payout,
    PayoutState,
    Withdrawal,
    WithdrawalState,
)
from gateway.store.credit import credit_bought

# The last_error of the PENDING deliveries made DEAD when their endpoint is forgotten.
ENDPOINT_REMOVED = "the endpoint is no longer configured"


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to insert; the store gives it its id."""

    type: str
    resource: str
    payload: str


def timestamp(now: float) -> str:
    """ISO 8601 UTC with milliseconds, e.g. 2026-11-26T04:40:20.123Z."""
    moment = datetime.datetime.fromtimestamp(now, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _event(kind: str, resource: str, now: float, data: dict[str, Any]) -> NewEvent:
    body = {"type": kind, "timestamp": timestamp(now), "data": data}
    return NewEvent(kind, resource, json.dumps(body, separators=(",", ":"), sort_keys=True))


def invoice_events(
    before: InvoiceRecord, after: InvoiceRecord, now: float, link: PaymentLink | None = None
) -> list[NewEvent]:
    """The events of ``apply_update`` moving ``before`` to ``after``: none unless its state
    really changed to SETTLED, EXPIRED or CANCELED (a replayed report writes nothing).

    A settled invoice: ``invoice.settled`` (with the payer's comment, if any), then what it
    was for: ``credit.deposited``, ``tip.received`` (a tip jar's), ``link.paid`` (a payment
    link's; ``link`` is the link as this settlement left it, None when it is unknown) or
    ``token.bought`` (a challenge's)."""
    if after.state is before.state:
        return []
    resource = f"invoice:{after.payment_hash.hex()}"
    data: dict[str, Any] = {
        "payment_hash": after.payment_hash.hex(),
        "token_id": after.token_id.hex(),
        "service": after.service,
        "amount_msat": after.amount_msat,
    }
    if after.state is InvoiceState.EXPIRED:
        return [_event("invoice.expired", resource, now, data)]
    if after.state is InvoiceState.CANCELED:
        return [_event("invoice.canceled", resource, now, data)]
    if after.state is not InvoiceState.SETTLED:
        return []
    paid = {**data, "amount_paid_msat": after.amount_paid_msat, "settled_at": after.settled_at}
    comment = {"comment": after.comment} if after.comment else {}
    events = [_event("invoice.settled", resource, now, {**paid, **comment})]
    # As the credit and the link count it: the amount when the node reported none paid.
    received = after.amount_paid_msat or after.amount_msat
    if credit := credit_bought(before, after):
        account = f"account:{after.token_id.hex()}"
        deposit = {**data, "amount_msat": credit}
        events.append(_event("credit.deposited", account, now, deposit))
    elif jar := after.tip_jar:
        tip = {
            "jar": jar,
            "payment_hash": after.payment_hash.hex(),
            "amount_paid_msat": received,
            "comment": after.comment,
            "settled_at": after.settled_at,
        }
        events.append(_event("tip.received", f"tip:{jar}", now, tip))
    elif after.link_id:
        if link is not None:
            payment = {
                "link_id": link.link_id,
                "payment_hash": after.payment_hash.hex(),
                "amount_paid_msat": received,
                "comment": after.comment,
                "paid_count": link.paid_count,
            }
            events.append(_event("link.paid", f"link:{link.link_id}", now, payment))
    elif not after.buys_credit:
        events.append(_event("token.bought", resource, now, paid))
    return events


def held_events(after: HeldRequest) -> list[NewEvent]:
    """The events of ``move_held_request`` writing ``after`` (a move that happened): a
    pay-on-success request settled (the payer paid) or cancelled (refunded). One recorded
    CANCELED because the node settled its invoice (``SETTLED_BY_NODE``) was paid all the
    same: ``request.settled``, with that ``reason``."""
    settled_by_node = after.state is HeldState.CANCELED and after.failure == SETTLED_BY_NODE
    if after.state is HeldState.SETTLED or settled_by_node:
        kind = "request.settled"
    elif after.state is HeldState.CANCELED:
        kind = "request.refunded"
    else:
        return []
    data: dict[str, Any] = {
        "payment_hash": after.payment_hash.hex(),
        "token_id": after.token_id.hex(),
    }
    if after.request is not None:
        # The method and the path only: the query may carry the caller's data.
        data["method"] = after.request.method
        data["path"] = after.request.target.split("?", 1)[0]
    if after.response is not None:
        data["status"] = after.response.status
    if kind == "request.refunded" or settled_by_node:
        data["reason"] = after.failure
    return [_event(kind, f"invoice:{after.payment_hash.hex()}", after.updated_at, data)]


def withdrawal_events(resolved: Withdrawal, now: float) -> list[NewEvent]:
    """The events of ``finish_withdrawal`` resolving a PENDING withdrawal."""
    if resolved.state is not WithdrawalState.SUCCEEDED:
        return []
    data: dict[str, Any] = {
        "payment_hash": resolved.payment_hash.hex(),
        "token_id": resolved.token_id.hex(),
        "amount_msat": resolved.amount_msat,
        "fee_msat": resolved.fee_msat,
    }
    return [_event("credit.withdrawn", f"account:{resolved.token_id.hex()}", now, data)]


def payout_events(resolved: Payout, now: float) -> list[NewEvent]:
    """The event of ``finish_payout`` resolving a PENDING payout: ``payout.succeeded`` or
    ``payout.failed`` (with its failure), ordered by payee."""
    data: dict[str, Any] = {
        "payee": resolved.payee,
        "payment_hash": resolved.payment_hash.hex(),
        "amount_msat": resolved.amount_msat,
        "fee_msat": resolved.fee_msat,
    }
    if resolved.state is PayoutState.SUCCEEDED:
        kind = "payout.succeeded"
    elif resolved.state is PayoutState.FAILED:
        kind = "payout.failed"
        data["failure"] = resolved.failure
    else:
        return []
    return [_event(kind, f"payee:{resolved.payee}", now, data)]
