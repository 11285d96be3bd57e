"""Framework-neutral rendering of decisions, the token header, the rate-limit address."""

from __future__ import annotations

import json

import pytest

from gateway import l402
from gateway.service import Deny, PaidToken, PaymentChallenge
from gateway.web.responses import client_address, content_length, render, token_header_value

MACAROON = l402.encode_b64(
    l402.mint_token(bytes(32), bytes(32), bytes(32), ["services=api:0"], location="x")
)
CHALLENGE = PaymentChallenge(
    reason=l402.ChallengeReason.EXPIRED,
    macaroon=MACAROON,
    invoice="lnbcrt10n1fake",
    payment_hash="ab" * 32,
    amount_msat=1000,
    expires_at=1_800_000_600.75,
)


def test_challenge_is_402_problem_json_with_both_schemes() -> None:
    response = render(CHALLENGE)
    assert response.status == 402
    headers = list(response.headers)
    assert ("Content-Type", "application/problem+json") in headers
    assert ("Cache-Control", "no-store") in headers
    challenges = [value for name, value in headers if name == "WWW-Authenticate"]
    assert [value.split(" ")[0] for value in challenges] == ["L402", "LSAT"]
    assert not any(name == "Retry-After" for name, _ in headers)
    assert json.loads(response.body) == {
        "type": "about:blank",
        "title": "Payment Required",
        "status": 402,
        "detail": "token expired",
        "invoice": "lnbcrt10n1fake",
        "macaroon": MACAROON,
        "payment_hash": "ab" * 32,
        "amount_msat": 1000,
        "expires_at": 1_800_000_600,
    }


@pytest.mark.parametrize(
    ("status", "title"),
    [
        (400, "Bad Request"),
        (401, "Unauthorized"),
        (429, "Too Many Requests"),
        (500, "Internal Server Error"),
        (502, "Bad Gateway"),
        (503, "Service Unavailable"),
    ],
)
def test_deny(status: int, title: str) -> None:
    response = render(Deny(status, "why", retry_after=7 if status in (429, 503) else None))
    assert response.status == status
    body = json.loads(response.body)
    assert body == {"type": "about:blank", "title": title, "status": status, "detail": "why"}
    names = [name for name, _ in response.headers]
    # RFC 9110: a 401 carries a challenge; no other refusal does.
    assert ("WWW-Authenticate" in names) is (status == 401)
    assert ("Retry-After" in names) is (status in (429, 503))
    if status in (429, 503):
        assert ("Retry-After", "7") in response.headers


def test_401_carries_a_parameter_only_challenge_and_no_invoice() -> None:
    response = render(Deny(401, "unknown or revoked token", realm="api.example"))
    challenges = [value for name, value in response.headers if name == "WWW-Authenticate"]
    assert challenges == [
        'L402 realm="api.example", error="invalid_token", '
        'error_description="unknown or revoked token"'
    ]
    assert "invoice" not in json.loads(response.body)
    # Our own client sees nothing to pay in it.
    with pytest.raises(l402.MalformedToken, match="challenge has no invoice"):
        l402.parse_challenge(challenges[0])
    # Without a realm from the core: the default location.
    (default,) = [v for n, v in render(Deny(401, "x")).headers if n == "WWW-Authenticate"]
    assert default.startswith('L402 realm="l402-gateway", error="invalid_token"')


def test_401_challenge_cannot_be_broken_out_of() -> None:
    response = render(Deny(401, 'bad" , LSAT macaroon="x\r\nSet-Cookie: a=b', realm='r"\n'))
    (value,) = [v for n, v in response.headers if n == "WWW-Authenticate"]
    assert value == (
        'L402 realm="r", error="invalid_token", '
        'error_description="bad , LSAT macaroon=xSet-Cookie: a=b"'
    )
    # The detail keeps the whole reason: JSON escapes it.
    assert json.loads(response.body)["detail"] == 'bad" , LSAT macaroon="x\r\nSet-Cookie: a=b'


def test_token_header_value_is_compact_json() -> None:
    token = PaidToken(
        token_id="01" * 32,
        payment_hash="02" * 32,
        service="api",
        tier=1,
        capabilities=frozenset({"write", "read"}),
        valid_until=1_800_003_600,
        amount_msat=2000,
    )
    value = token_header_value(token)
    assert " " not in value
    assert json.loads(value) == {
        "token_id": "01" * 32,
        "payment_hash": "02" * 32,
        "service": "api",
        "tier": 1,
        "capabilities": ["read", "write"],
        "valid_until": 1_800_003_600,
        "amount_msat": 2000,
    }
    unlimited = PaidToken("01" * 32, "02" * 32, "api", 0, None, None, 1)
    assert json.loads(token_header_value(unlimited))["capabilities"] is None


@pytest.mark.parametrize(
    ("peer", "forwarded", "trusted", "expected"),
    [
        ("192.0.2.1", None, False, "192.0.2.1"),
        ("192.0.2.1", "203.0.113.9", False, "192.0.2.1"),  # not trusted: ignored
        ("192.0.2.1", "203.0.113.9", True, "203.0.113.9"),
        # The trusted proxy appended the last hop; the first came from the client.
        ("192.0.2.1", "198.51.100.7, 203.0.113.9", True, "203.0.113.9"),
        ("192.0.2.1", "a,b , c ", True, "c"),
        ("192.0.2.1", "", True, "192.0.2.1"),
        ("192.0.2.1", " , ", True, "192.0.2.1"),
        (None, None, False, "unknown"),
        (None, None, True, "unknown"),
    ],
)
def test_client_address(
    peer: str | None, forwarded: str | None, trusted: bool, expected: str
) -> None:
    assert client_address(peer, forwarded, trusted) == expected


@pytest.mark.parametrize(
    ("value", "length"),
    [
        ("0", 0),
        ("1234", 1234),
        ("9" * 19, 10**19 - 1),
        (None, None),
        ("", None),
        ("\u00b2", None),  # isdigit() takes it, int() does not
        ("\u0661", None),  # an Arabic-Indic one: int() would take it
        ("9" * 4301, None),  # int() refuses so many digits
        ("1 2", None),
        ("-1", None),
        ("+1", None),
    ],
)
def test_a_content_length_is_ascii_digits_or_none(value: str | None, length: int | None) -> None:
    assert content_length(value) == length
