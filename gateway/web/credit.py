"""The credit endpoints the middlewares answer themselves (never priced), framework-neutral.

Both take the token as the L402 ``Authorization`` header (a cookie is not accepted: a
withdrawal must not be something another site can make a browser do)::

    GET /.well-known/l402/token
    Authorization: L402 <macaroon>:<hex preimage>

    200 {"token_id", "service", "balance_msat", "credited_msat", "spent_msat",
         "reserved_msat", "withdrawn_msat", "valid_until",
         "recent": [{"at", "method", "path", "amount_msat"}, ...]}   (the last 20 charges)
    401 missing or invalid credential   404 the token has no credit account
    405 not GET   503 store unavailable / gateway not started

    POST /.well-known/l402/withdraw
    Authorization: L402 <macaroon>:<hex preimage>
    Content-Type: application/json

    {"invoice": "<BOLT11 for at most the balance minus the fee reserve>"}

    200 {"state": "SUCCEEDED", "payment_hash", "amount_msat", "fee_msat", "balance_msat"}
    202 the same with "state": "PENDING" (not finished in time; the gateway finishes it)
    502 the same with "state": "FAILED" (not paid: the balance is back)
    400 not JSON, no invoice, or an invoice the gateway refuses (the detail says why)
    401 missing or invalid credential   404 withdrawals are not enabled / no credit account
    405 not POST   413 body too large   415 not JSON   503 unavailable

Errors are problem+json, as everywhere else.
"""

from __future__ import annotations

import json
from typing import Protocol

from gateway.ports import WithdrawalState
from gateway.service import Deny, TokenInfo, WithdrawalOutcome
from gateway.web.responses import HttpResponse, render

__all__ = [
    "MAX_WITHDRAW_BODY",
    "TOKEN_INFO_PATH",
    "WITHDRAW_PATH",
    "handle_token_info",
    "handle_withdraw",
]

TOKEN_INFO_PATH = "/.well-known/l402/token"  # noqa: S105 - a path
WITHDRAW_PATH = "/.well-known/l402/withdraw"
# A BOLT11 invoice with many route hints runs to a few kilobytes.
MAX_WITHDRAW_BODY = 16 * 1024
_JSON_HEADERS = (("Content-Type", "application/json"), ("Cache-Control", "no-store"))
_WITHDRAW_SHAPE = 'body must be {"invoice": "<BOLT11 invoice>"}'
_NOT_STARTED = Deny(503, "gateway is not started", retry_after=1)
# What a withdrawal's state answers with.
_WITHDRAWAL_STATUS = {
    WithdrawalState.SUCCEEDED: 200,
    WithdrawalState.PENDING: 202,
    WithdrawalState.FAILED: 502,
}


class CreditService(Protocol):
    """What the handlers ask of ``L402Service``."""

    async def token_info(self, authorization: tuple[str, ...]) -> TokenInfo | Deny: ...
    async def withdraw(
        self, authorization: tuple[str, ...], payment_request: str
    ) -> WithdrawalOutcome | Deny: ...


def _method_not_allowed(allowed: str) -> HttpResponse:
    response = render(Deny(405, f"use {allowed}"))
    return HttpResponse(405, (*response.headers, ("Allow", allowed)), response.body)


def _json(status: int, document: dict[str, object]) -> HttpResponse:
    return HttpResponse(status, _JSON_HEADERS, json.dumps(document).encode())


async def handle_token_info(
    service: CreditService | None, *, method: str, authorization: tuple[str, ...]
) -> HttpResponse:
    """Answer ``GET TOKEN_INFO_PATH``. Never raises on client input."""
    if method.upper() != "GET":
        return _method_not_allowed("GET")
    if service is None:
        return render(_NOT_STARTED)
    info = await service.token_info(authorization)
    if isinstance(info, Deny):
        return render(info)
    return _json(
        200,
        {
            "token_id": info.token_id,
            "service": info.service,
            "balance_msat": info.balance_msat,
            "credited_msat": info.credited_msat,
            "spent_msat": info.spent_msat,
            "reserved_msat": info.reserved_msat,
            "withdrawn_msat": info.withdrawn_msat,
            "valid_until": info.valid_until,
            "recent": [
                {
                    "at": charge.at,
                    "method": charge.method,
                    "path": charge.path,
                    "amount_msat": charge.amount_msat,
                }
                for charge in info.recent
            ],
            # null: withdrawals are not enabled
            "withdrawal_fee_min_msat": info.withdrawals and info.withdrawals.fee_min_msat,
            "withdrawal_fee_ppm": info.withdrawals and info.withdrawals.fee_ppm,
        },
    )


async def handle_withdraw(
    service: CreditService | None,
    *,
    method: str,
    content_type: str | None,
    authorization: tuple[str, ...],
    body: bytes,
) -> HttpResponse:
    """Answer ``POST WITHDRAW_PATH`` (the caller reads at most ``MAX_WITHDRAW_BODY + 1``
    bytes of the body). Never raises on client input."""
    if method.upper() != "POST":
        return _method_not_allowed("POST")
    if (content_type or "").split(";", 1)[0].strip().lower() != "application/json":
        return render(Deny(415, "Content-Type must be application/json"))
    if len(body) > MAX_WITHDRAW_BODY:
        return render(Deny(413, f"body over {MAX_WITHDRAW_BODY} bytes"))
    try:
        payload = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return render(Deny(400, "body must be JSON"))
    invoice = payload.get("invoice") if isinstance(payload, dict) else None
    if not isinstance(invoice, str) or not invoice.strip():
        return render(Deny(400, _WITHDRAW_SHAPE))
    if service is None:
        return render(_NOT_STARTED)
    outcome = await service.withdraw(authorization, invoice.strip())
    if isinstance(outcome, Deny):
        return render(outcome)
    return _json(
        _WITHDRAWAL_STATUS[outcome.state],
        {
            "state": outcome.state.value,
            "payment_hash": outcome.payment_hash,
            "amount_msat": outcome.amount_msat,
            "fee_msat": outcome.fee_msat,
            "balance_msat": outcome.balance_msat,
        },
    )
