"""Credit over HTTP, framework-neutral: the credit 402 (problem+json and paywall page) and
every answer of the token info and withdraw handlers, over a stub service."""

from __future__ import annotations

import dataclasses
import json

import pytest

from gateway import l402
from gateway.ports import Charge, Msat, WithdrawalState
from gateway.service import Deny, TokenInfo, WithdrawalOutcome, WithdrawalTerms
from gateway.web.credit import MAX_WITHDRAW_BODY, handle_token_info, handle_withdraw
from gateway.web.paywall import render_challenge
from gateway.web.responses import HttpResponse
from tests.unit.test_paywall import CHALLENGE, FIREFOX

CREDIT_CHALLENGE = dataclasses.replace(
    CHALLENGE, amount_msat=100_000, credit=True, price_msat=1_500
)
TOP_UP = dataclasses.replace(
    CREDIT_CHALLENGE, reason=l402.ChallengeReason.CREDIT_EXHAUSTED, balance_msat=500
)
AUTHORIZATION = ("L402 mac:00",)
JSON = "application/json"


def headers(response: HttpResponse) -> dict[str, str]:
    return dict(response.headers)


# --- the credit 402 ---------------------------------------------------------------------------


def test_a_credit_402_says_what_it_buys_and_what_a_request_costs() -> None:
    response = render_challenge(CREDIT_CHALLENGE, method="GET", accept=None)
    assert response.status == 402
    assert headers(response)["L402-Credit-Msat"] == "100000"
    assert headers(response)["L402-Price-Msat"] == "1500"
    assert "L402-Balance-Msat" not in headers(response)
    problem = json.loads(response.body)
    assert (problem["credit_msat"], problem["price_msat"], problem["balance_msat"]) == (
        100_000,
        1_500,
        None,
    )


def test_a_top_up_402_carries_the_balance() -> None:
    response = render_challenge(TOP_UP, method="GET", accept=None)
    assert headers(response)["L402-Balance-Msat"] == "500"
    assert json.loads(response.body)["balance_msat"] == 500


def test_a_token_route_402_has_no_credit_fields() -> None:
    response = render_challenge(CHALLENGE, method="GET", accept=None)
    assert not {"L402-Credit-Msat", "L402-Price-Msat"} & set(headers(response))
    assert "credit_msat" not in json.loads(response.body)


def test_the_paywall_page_says_it_buys_credit() -> None:
    response = render_challenge(TOP_UP, method="GET", accept=FIREFOX)
    page = response.body.decode()
    assert headers(response)["Content-Type"].startswith("text/html")
    assert (headers(response)["L402-Credit-Msat"], headers(response)["L402-Balance-Msat"]) == (
        "100000",
        "500",
    )
    assert "Buy credit" in page
    assert '<dd id="credit">100 sat, at most 1.5 sat a request</dd>' in page
    assert '<dd id="balance">0.5 sat</dd>' in page
    assert "Your credit has run out" in page
    # A token route's page buys access, not credit.
    plain = render_challenge(CHALLENGE, method="GET", accept=FIREFOX).body.decode()
    assert "Buy credit" not in plain
    assert '<dd id="credit"></dd>' in plain


# --- the handlers -----------------------------------------------------------------------------


INFO = TokenInfo(
    token_id="ab" * 32,
    service="api",
    balance_msat=7_000,
    credited_msat=10_000,
    spent_msat=3_000,
    reserved_msat=0,
    withdrawn_msat=0,
    valid_until=1_900_000_000,
    recent=(Charge(bytes(32), 1_800_000_000.5, "GET", "/api/x", Msat(3_000)),),
)


class StubService:
    """Answers token info and withdrawals as told; records what it was asked."""

    def __init__(self, answer: TokenInfo | WithdrawalOutcome | Deny) -> None:
        self.answer = answer
        self.asked: list[tuple[object, ...]] = []

    async def token_info(self, authorization: tuple[str, ...]) -> TokenInfo | Deny:
        self.asked.append((authorization,))
        assert isinstance(self.answer, TokenInfo | Deny)
        return self.answer

    async def withdraw(
        self, authorization: tuple[str, ...], payment_request: str
    ) -> WithdrawalOutcome | Deny:
        self.asked.append((authorization, payment_request))
        assert isinstance(self.answer, WithdrawalOutcome | Deny)
        return self.answer


async def test_token_info_is_the_account_as_json() -> None:
    service = StubService(INFO)
    response = await handle_token_info(service, method="GET", authorization=AUTHORIZATION)
    assert response.status == 200
    assert headers(response) == {"Content-Type": JSON, "Cache-Control": "no-store"}
    assert json.loads(response.body) == {
        "token_id": "ab" * 32,
        "service": "api",
        "balance_msat": 7_000,
        "credited_msat": 10_000,
        "spent_msat": 3_000,
        "reserved_msat": 0,
        "withdrawn_msat": 0,
        "valid_until": 1_900_000_000,
        "recent": [
            {"at": 1_800_000_000.5, "method": "GET", "path": "/api/x", "amount_msat": 3_000}
        ],
        "withdrawal_fee_min_msat": None,
        "withdrawal_fee_ppm": None,
    }
    assert service.asked == [(AUTHORIZATION,)]


async def test_token_info_names_the_withdrawal_terms_when_withdrawals_are_enabled() -> None:
    info = dataclasses.replace(INFO, withdrawals=WithdrawalTerms(fee_min_msat=2_000, fee_ppm=7))
    response = await handle_token_info(StubService(info), method="GET", authorization=AUTHORIZATION)
    document = json.loads(response.body)
    assert (document["withdrawal_fee_min_msat"], document["withdrawal_fee_ppm"]) == (2_000, 7)


@pytest.mark.parametrize("status", [401, 404, 503])
async def test_token_info_renders_the_service_refusal(status: int) -> None:
    service = StubService(Deny(status, "why"))
    response = await handle_token_info(service, method="GET", authorization=())
    assert (response.status, json.loads(response.body)["detail"]) == (status, "why")


async def test_token_info_wants_get_and_a_started_gateway() -> None:
    service = StubService(INFO)
    response = await handle_token_info(service, method="POST", authorization=AUTHORIZATION)
    assert (response.status, headers(response)["Allow"]) == (405, "GET")
    assert service.asked == []
    response = await handle_token_info(None, method="GET", authorization=AUTHORIZATION)
    assert (response.status, headers(response)["Retry-After"]) == (503, "1")


def outcome(state: WithdrawalState) -> WithdrawalOutcome:
    return WithdrawalOutcome(
        state=state, payment_hash="cd" * 32, amount_msat=5_000, fee_msat=3, balance_msat=1_997
    )


@pytest.mark.parametrize(
    ("state", "status"),
    [
        (WithdrawalState.SUCCEEDED, 200),
        (WithdrawalState.PENDING, 202),
        (WithdrawalState.FAILED, 502),
    ],
)
async def test_a_withdrawal_answers_with_its_state(state: WithdrawalState, status: int) -> None:
    service = StubService(outcome(state))
    response = await withdraw(service, b'{"invoice": " lnbcrt50n1x \\n"}')
    assert response.status == status
    assert json.loads(response.body) == {
        "state": state.value,
        "payment_hash": "cd" * 32,
        "amount_msat": 5_000,
        "fee_msat": 3,
        "balance_msat": 1_997,
    }
    assert service.asked == [(AUTHORIZATION, "lnbcrt50n1x")]


async def withdraw(
    service: StubService | None, body: bytes, *, method: str = "POST", content_type: str = JSON
) -> HttpResponse:
    return await handle_withdraw(
        service, method=method, content_type=content_type, authorization=AUTHORIZATION, body=body
    )


@pytest.mark.parametrize(
    ("method", "content_type", "body", "status", "detail"),
    [
        ("GET", JSON, b"", 405, "use POST"),
        ("POST", "text/plain", b'{"invoice": "x"}', 415, "Content-Type must be application/json"),
        ("POST", None, b'{"invoice": "x"}', 415, "Content-Type must be application/json"),
        ("POST", JSON, b"x" * (MAX_WITHDRAW_BODY + 1), 413, f"body over {MAX_WITHDRAW_BODY} bytes"),
        ("POST", JSON, b"{", 400, "body must be JSON"),
        ("POST", JSON, b"\xff", 400, "body must be JSON"),
        ("POST", JSON, b'{"invoice": "lnbc1"', 400, "body must be JSON"),
        ("POST", JSON, b'"lnbc1"', 400, 'body must be {"invoice": "<BOLT11 invoice>"}'),
        ("POST", JSON, b'{"invoice": null}', 400, 'body must be {"invoice": "<BOLT11 invoice>"}'),
        ("POST", JSON, b'{"invoice": ""}', 400, 'body must be {"invoice": "<BOLT11 invoice>"}'),
    ],
)
async def test_a_bad_withdrawal_request_is_refused_before_the_service(
    method: str, content_type: str | None, body: bytes, status: int, detail: str
) -> None:
    service = StubService(outcome(WithdrawalState.SUCCEEDED))
    response = await handle_withdraw(
        service,
        method=method,
        content_type=content_type,
        authorization=AUTHORIZATION,
        body=body,
    )
    assert (response.status, json.loads(response.body)["detail"]) == (status, detail)
    assert service.asked == []


async def test_a_withdrawal_refused_by_the_service_is_rendered() -> None:
    service = StubService(Deny(404, "withdrawals are not enabled"))
    response = await withdraw(
        service, b'{"invoice": "lnbcrt1"}', content_type=f"{JSON}; charset=utf-8"
    )
    assert (response.status, json.loads(response.body)["detail"]) == (
        404,
        "withdrawals are not enabled",
    )
    response = await withdraw(None, b'{"invoice": "lnbcrt1"}')
    assert response.status == 503
