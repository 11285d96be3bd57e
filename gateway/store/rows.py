"""Rows <-> records, shared by the SQL stores (``SqliteStore``, ``PostgresStore``): both
select the same columns in the same order, so one converter reads a row of either (an
``sqlite3`` tuple or an ``asyncpg`` record), and one builds the values a record is written as.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Protocol, overload

from gateway.ports import (
    Account,
    Charge,
    DeliveryState,
    HeldRequest,
    HeldState,
    InvoiceRecord,
    InvoiceState,
    Msat,
    PayeeBalance,
    PaymentHash,
    PaymentLink,
    Payout,
    PayoutState,
    Preimage,
    SplitTotals,
    StoredRequest,
    StoredResponse,
    WebhookDelivery,
    WebhookEvent,
    Withdrawal,
    WithdrawalState,
)
from gateway.splits import decode_split, encode_split


class Row(Protocol):
    """A result row read by position."""

    @overload
    def __getitem__(self, index: int, /) -> Any: ...
    @overload
    def __getitem__(self, index: slice, /) -> Sequence[Any]: ...


def check_limit(limit: int | None) -> None:
    """A listing's ``limit``: None (no limit) or at least 0."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")


def invoice_record(row: Row) -> InvoiceRecord:
    return InvoiceRecord(
        payment_hash=PaymentHash(bytes(row[0])),
        payment_request=str(row[1]),
        amount_msat=Msat(int(row[2])),
        token_id=bytes(row[3]),
        service=str(row[4]),
        method=str(row[5]),
        path=str(row[6]),
        state=InvoiceState(row[7]),
        created_at=float(row[8]),
        expires_at=float(row[9]),
        add_index=int(row[10]),
        settle_index=int(row[11]),
        amount_paid_msat=Msat(int(row[12])),
        settled_at=None if row[13] is None else float(row[13]),
        buys_credit=bool(row[14]),
        split=decode_split(str(row[15])),
        comment=str(row[16]),
    )


def invoice_values(record: InvoiceRecord) -> tuple[object, ...]:
    """In the order of ``invoice_record``'s columns."""
    return (
        record.payment_hash,
        record.payment_request,
        record.amount_msat,
        record.token_id,
        record.service,
        record.method,
        record.path,
        record.state.value,
        record.created_at,
        record.expires_at,
        record.add_index,
        record.settle_index,
        record.amount_paid_msat,
        record.settled_at,
        record.buys_credit,
        encode_split(record.split),
        record.comment,
    )


def payment_link(row: Row) -> PaymentLink:
    return PaymentLink(
        link_id=str(row[0]),
        memo=str(row[1]),
        min_msat=Msat(int(row[2])),
        max_msat=Msat(int(row[3])),
        single_use=bool(row[4]),
        created_at=float(row[5]),
        expires_at=None if row[6] is None else float(row[6]),
        canceled_at=None if row[7] is None else float(row[7]),
        paid_count=int(row[8]),
        paid_msat=Msat(int(row[9])),
        last_paid_at=None if row[10] is None else float(row[10]),
        open_hash=None if row[11] is None else PaymentHash(bytes(row[11])),
    )


def link_values(link: PaymentLink) -> tuple[object, ...]:
    """In the order of ``payment_link``'s columns."""
    return (
        link.link_id,
        link.memo,
        link.min_msat,
        link.max_msat,
        link.single_use,
        link.created_at,
        link.expires_at,
        link.canceled_at,
        link.paid_count,
        link.paid_msat,
        link.last_paid_at,
        link.open_hash,
    )


def account(row: Row) -> Account:
    return Account(
        token_id=bytes(row[0]),
        service=str(row[1]),
        credited_msat=Msat(int(row[2])),
        spent_msat=Msat(int(row[3])),
        reserved_msat=Msat(int(row[4])),
        withdrawn_msat=Msat(int(row[5])),
        created_at=float(row[6]),
        last_used_at=None if row[7] is None else float(row[7]),
    )


def charge(row: Row) -> Charge:
    return Charge(bytes(row[0]), float(row[1]), str(row[2]), str(row[3]), Msat(int(row[4])))


def withdrawal_values(withdrawal: Withdrawal) -> tuple[object, ...]:
    return (
        withdrawal.payment_hash,
        withdrawal.token_id,
        withdrawal.payment_request,
        withdrawal.amount_msat,
        withdrawal.fee_reserve_msat,
        withdrawal.state.value,
        withdrawal.created_at,
        withdrawal.fee_msat,
        withdrawal.resolved_at,
    )


def withdrawal(row: Row) -> Withdrawal:
    return Withdrawal(
        payment_hash=PaymentHash(bytes(row[0])),
        token_id=bytes(row[1]),
        payment_request=str(row[2]),
        amount_msat=Msat(int(row[3])),
        fee_reserve_msat=Msat(int(row[4])),
        state=WithdrawalState(row[5]),
        created_at=float(row[6]),
        fee_msat=Msat(int(row[7])),
        resolved_at=None if row[8] is None else float(row[8]),
    )


def payout_values(payout: Payout) -> tuple[object, ...]:
    """In the order of ``PAYOUT_COLUMNS``."""
    return (
        payout.payment_hash,
        payout.payee,
        payout.destination,
        payout.payment_request,
        payout.amount_msat,
        payout.fee_reserve_msat,
        payout.payee_pays_fee,
        payout.state.value,
        payout.created_at,
        payout.fee_msat,
        payout.resolved_at,
        payout.failure,
    )


def payout(row: Row) -> Payout:
    return Payout(
        payment_hash=PaymentHash(bytes(row[0])),
        payee=str(row[1]),
        destination=str(row[2]),
        payment_request=str(row[3]),
        amount_msat=Msat(int(row[4])),
        fee_reserve_msat=Msat(int(row[5])),
        payee_pays_fee=bool(row[6]),
        state=PayoutState(row[7]),
        created_at=float(row[8]),
        fee_msat=Msat(int(row[9])),
        resolved_at=None if row[10] is None else float(row[10]),
        failure=str(row[11]),
    )


def payee_balance(row: Row) -> PayeeBalance:
    return PayeeBalance(
        payee=str(row[0]),
        earned_msat=Msat(int(row[1])),
        paid_msat=Msat(int(row[2])),
        fees_msat=Msat(int(row[3])),
        pending_msat=Msat(int(row[4])),
        merchant_fees_msat=Msat(int(row[5])),
        last_payout_at=None if row[6] is None else float(row[6]),
    )


def split_totals(row: Row) -> SplitTotals:
    """From a row of received, kept, earned, paid, pending, accrued, payee fees and merchant
    fees, in ``SplitTotals``' order."""
    return SplitTotals(*(Msat(int(value)) for value in row[:8]))


def headers_text(headers: tuple[tuple[str, str], ...]) -> str:
    # ensure_ascii: a lone surrogate (a header byte decoded with surrogateescape) becomes a
    # \u escape, which UTF-8 text (SQLite's, PostgreSQL's) can hold and json.loads gives back.
    return json.dumps([[name, value] for name, value in headers], ensure_ascii=True)


def headers(text: str) -> tuple[tuple[str, str], ...]:
    return tuple((str(name), str(value)) for name, value in json.loads(text))


def response_values(response: StoredResponse | None) -> tuple[object, ...]:
    if response is None:
        return (None, None, None)
    return (response.status, headers_text(response.headers), response.body)


def held_values(held: HeldRequest) -> tuple[object, ...]:
    request = held.request
    return (
        held.payment_hash,
        held.preimage,
        held.token_id,
        held.client,
        held.grant,
        held.state.value,
        None if request is None else request.method,
        None if request is None else request.target,
        None if request is None else headers_text(request.headers),
        None if request is None else request.body,
        held.created_at,
        held.expires_at,
        held.updated_at,
        *response_values(held.response),
        held.failure,
        held.keep_until,
        held.delivered_at,
    )


def held_request(row: Row) -> HeldRequest:
    method, target, request_headers, request_body = row[6:10]
    status, response_headers, response_body = row[13:16]
    return HeldRequest(
        payment_hash=PaymentHash(bytes(row[0])),
        preimage=Preimage(bytes(row[1])),
        token_id=bytes(row[2]),
        client=str(row[3]),
        grant=str(row[4]),
        request=None
        if method is None
        else StoredRequest(str(method), str(target), headers(request_headers), bytes(request_body)),
        state=HeldState(row[5]),
        created_at=float(row[10]),
        expires_at=float(row[11]),
        updated_at=float(row[12]),
        response=None
        if status is None
        else StoredResponse(int(status), headers(response_headers), bytes(response_body)),
        failure=str(row[16]),
        keep_until=None if row[17] is None else float(row[17]),
        delivered_at=None if row[18] is None else float(row[18]),
    )


def webhook_event(row: Row) -> WebhookEvent:
    return WebhookEvent(
        int(row[0]), str(row[1]), str(row[2]), str(row[3]), float(row[4]), str(row[5])
    )


def delivery(row: Row) -> WebhookDelivery:
    return WebhookDelivery(
        event_id=int(row[0]),
        endpoint=str(row[1]),
        event_type=str(row[2]),
        state=DeliveryState(row[3]),
        attempts=int(row[4]),
        next_attempt_at=float(row[5]),
        last_status=None if row[6] is None else int(row[6]),
        last_error=str(row[7]),
        delivered_at=None if row[8] is None else float(row[8]),
    )
