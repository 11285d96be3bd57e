"""The paywall page and the redeem endpoint, framework-neutral: who gets HTML, what the page
holds, its security headers, and every answer of the redeem handler."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from http.cookies import SimpleCookie

import pytest
import segno

from gateway import l402
from gateway.fiat import FiatRate
from gateway.ports import Msat
from gateway.pricing import Pricing, Rule
from gateway.service import (
    Deny,
    L402Service,
    PaymentChallenge,
    RedeemResult,
    RedeemState,
    RequestInfo,
)
from gateway.store import MemoryStore
from gateway.web.pages import content_security_policy
from gateway.web.paywall import (
    MAX_REDEEM_BODY,
    REDEEM_PATH,
    handle_redeem,
    prefers_html,
    redeem_cookie,
    render_challenge,
    render_paywall,
)
from gateway.web.responses import HttpResponse
from tests.fakes import FakeClock, FakeInvoiceBackend

CHROME = (
    "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,"
    "image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7"
)
FIREFOX = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
SAFARI = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
INVOICE = "lnbcrt100n1p4svv73pp5jwr6dq9dukxw8klrg39qqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqsdqq"
MACAROON = l402.encode_b64(
    l402.mint_token(bytes(32), bytes(32), bytes(32), ["services=premium:0"], location="x")
)
CHALLENGE = PaymentChallenge(
    reason=l402.ChallengeReason.PAYMENT_REQUIRED,
    macaroon=MACAROON,
    invoice=INVOICE,
    payment_hash="ab" * 32,
    amount_msat=10_000,
    expires_at=1_800_000_600.0,
    service="premium",
    method="GET",
    path="/api/premium/fortune",
    lifetime=3600,
    issued_at=1_800_000_000.0,
)


def header(response: HttpResponse, name: str) -> list[str]:
    return [value for key, value in response.headers if key.lower() == name.lower()]


# --- who gets HTML -----------------------------------------------------------------------


@pytest.mark.parametrize("accept", [CHROME, FIREFOX, SAFARI, "text/html", "text/*"])
@pytest.mark.parametrize("method", ["GET", "HEAD", "get"])
def test_browsers_get_html(accept: str, method: str) -> None:
    assert prefers_html(method, accept)


@pytest.mark.parametrize(
    "accept",
    [
        None,
        "",
        "*/*",
        "application/json",
        "application/problem+json",
        "application/json, text/plain, */*",  # axios, fetch() from a script
        "text/html;q=0.5, application/json",
        "text/html, application/json",  # a tie: JSON
        "text/html, */*",  # a tie again
        "application/*, text/html;q=0.9",
        "text/html;q=0",
        "text/html;q=nan",
        "text/html;q=2, application/json;q=0.1",
        "text/html;q=abc",
        "text/plain",
        ",,,;;;=",
    ],
)
def test_everyone_else_gets_json(accept: str | None) -> None:
    assert not prefers_html("GET", accept)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
def test_only_get_and_head_get_the_page(method: str) -> None:
    assert not prefers_html(method, CHROME)


def test_render_challenge_picks_the_form() -> None:
    page = render_challenge(CHALLENGE, method="GET", accept=CHROME)
    assert header(page, "Content-Type") == ["text/html; charset=utf-8"]
    problem = render_challenge(CHALLENGE, method="GET", accept="application/json")
    assert header(problem, "Content-Type") == ["application/problem+json"]
    assert json.loads(problem.body)["invoice"] == INVOICE
    # A Deny is problem+json for browsers too.
    denied = render_challenge(Deny(401, "bad token"), method="GET", accept=CHROME)
    assert denied.status == 401
    assert header(denied, "Content-Type") == ["application/problem+json"]


# --- the page ----------------------------------------------------------------------------


def test_page_status_and_headers() -> None:
    page = render_paywall(CHALLENGE, nonce="n0nce")
    assert page.status == 402
    assert header(page, "Content-Type") == ["text/html; charset=utf-8"]
    assert header(page, "Cache-Control") == ["no-store"]
    assert header(page, "Content-Security-Policy") == [content_security_policy("n0nce")]
    assert header(page, "X-Content-Type-Options") == ["nosniff"]
    assert header(page, "X-Frame-Options") == ["DENY"]
    assert header(page, "Referrer-Policy") == ["no-referrer"]
    assert header(page, "WWW-Authenticate") == list(CHALLENGE.www_authenticate())


def test_csp_allows_nothing_external() -> None:
    policy = content_security_policy("abc")
    directives = dict(part.strip().split(" ", 1) for part in policy.split(";"))
    assert directives == {
        "default-src": "'none'",
        "style-src": "'nonce-abc'",
        "script-src": "'nonce-abc'",
        "connect-src": "'self'",
        "base-uri": "'none'",
        "form-action": "'none'",
        "frame-ancestors": "'none'",
    }


def test_every_page_gets_a_fresh_nonce_on_its_script_and_style() -> None:
    nonces = set()
    for _ in range(3):
        page = render_paywall(CHALLENGE)
        (policy,) = header(page, "Content-Security-Policy")
        match = re.search(r"script-src 'nonce-([A-Za-z0-9_-]{16,})'", policy)
        assert match is not None
        nonce = match.group(1)
        nonces.add(nonce)
        text = page.body.decode()
        tags = re.findall(r"<(script|style)\b([^>]*)>", text)
        assert sorted(name for name, _ in tags) == ["script", "style"]
        for _, attributes in tags:
            assert attributes == f' nonce="{nonce}"'
    assert len(nonces) == 3


def test_page_shows_price_purchase_invoice_qr_and_controls() -> None:
    text = render_paywall(CHALLENGE, nonce="n").body.decode()
    assert '<span class="amount">10</span> <span class="unit">sat</span>' in text
    assert "msat" not in text.split("<body>")[1].split("<script")[0]  # whole sats: no msat line
    assert '<code id="what">GET /api/premium/fortune</code>' in text
    assert '<dd id="lifetime">1 hour</dd>' in text
    assert '<dd id="service">premium</dd>' in text
    assert f'<code id="invoice" aria-labelledby="invoice-label">{INVOICE}</code>' in text
    assert text.count(f'href="lightning:{INVOICE}"') == 2  # the QR code and the button
    assert 'id="copy"' in text
    assert 'id="pay-webln" type="button" hidden' in text  # shown by the script, with webln
    assert 'id="status"' in text
    assert 'role="status"' in text
    assert 'id="fresh" class="button primary" type="button" hidden' in text
    assert f'data-macaroon="{MACAROON}"' in text
    assert f'data-redeem="{REDEEM_PATH}"' in text
    assert 'data-expires-in="600"' in text
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in text
    # The QR code: segno's own SVG of the upper-case lightning: URI, inline.
    expected = segno.make(f"LIGHTNING:{INVOICE.upper()}", error="l", micro=False).svg_inline(
        scale=1,
        border=3,
        omitsize=True,
        dark="#000",
        light="#fff",
        title="Lightning invoice QR code",
    )
    assert expected in text
    assert "{{" not in text


def test_page_has_no_external_references() -> None:
    text = render_paywall(CHALLENGE, nonce="n").body.decode()
    assert not re.search(r"[a-z][a-z0-9+.-]*://|\bsrc\s*=|url\(|@import", text, re.IGNORECASE)
    hrefs = re.findall(r"\bhref\s*=\s*\"([^\"]*)\"", text)
    assert hrefs
    assert all(href.startswith("lightning:") for href in hrefs)
    assert "fetch(redeemUrl" in text  # the one request the page makes, to its own origin
    # Inline event handlers and style attributes would be blocked by the CSP.
    assert not re.search(r"\son[a-z]+\s*=|\sstyle\s*=", text, re.IGNORECASE)


@pytest.mark.parametrize(
    ("amount", "main", "msat"),
    [
        (10_000, "10", None),
        (21_000_000, "21,000", None),
        (10_500, "10.5", "10,500 msat"),
        (1, "0.001", "1 msat"),
        (1_234_567, "1,234.567", "1,234,567 msat"),
    ],
)
def test_price_in_sat_with_msat_when_fractional(amount: int, main: str, msat: str | None) -> None:
    challenge = dataclasses.replace(CHALLENGE, amount_msat=amount)
    text = render_paywall(challenge, nonce="n").body.decode()
    assert f'<span class="amount">{main}</span>' in text
    assert f"<title>Payment required · {main} sat</title>" in text
    if msat is None:
        assert '<p class="msat">' not in text
    else:
        assert f'<p class="msat">{msat}</p>' in text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (1, "1 second"),
        (90, "1 minute 30 seconds"),
        (3600, "1 hour"),
        (7260, "2 hours 1 minute"),
        (86400 * 30, "30 days"),
        (90061, "1 day 1 hour"),
    ],
)
def test_lifetime_in_words(seconds: int, text: str) -> None:
    challenge = dataclasses.replace(CHALLENGE, lifetime=seconds)
    assert f'<dd id="lifetime">{text}</dd>' in render_paywall(challenge).body.decode()


def test_reason_is_shown_when_it_is_not_the_first_visit() -> None:
    first = render_paywall(CHALLENGE).body.decode()
    assert 'class="reason"' not in first
    again = dataclasses.replace(CHALLENGE, reason=l402.ChallengeReason.EXPIRED)
    assert "Your access has expired" in render_paywall(again).body.decode()
    other = dataclasses.replace(CHALLENGE, reason=l402.ChallengeReason.MISSING_CAPABILITY)
    assert "(token lacks a required capability)" in render_paywall(other).body.decode()


def test_everything_from_the_request_is_escaped_and_never_expanded() -> None:
    hostile = dataclasses.replace(
        CHALLENGE,
        path='/a/"><script>alert(1)</script>{{js}}{{nonce}}',
        service="<b>svc</b>",
    )
    text = render_paywall(hostile, nonce="n", redeem_url='/x"y').body.decode()
    assert "<script>alert(1)" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;{{js}}{{nonce}}" in text
    assert "&lt;b&gt;svc&lt;/b&gt;" in text
    assert 'data-redeem="/x&quot;y"' in text
    assert text.count("<script") == 1


def test_expires_in_counts_from_the_challenge() -> None:
    text = render_paywall(CHALLENGE, now=CHALLENGE.expires_at - 42).body.decode()
    assert 'data-expires-in="42"' in text
    late = render_paywall(CHALLENGE, now=CHALLENGE.expires_at + 5).body.decode()
    assert 'data-expires-in="0"' in late


# --- the cookie --------------------------------------------------------------------------


def test_redeem_cookie_attributes() -> None:
    result = RedeemResult(
        RedeemState.SETTLED,
        1.0,
        credential="AgE-_x:" + "ab" * 32,
        path="/p/page",
        max_age=99,
        scope="/p",
        service="premium",
    )
    value = redeem_cookie(result)
    assert value == (
        f"L402-premium=AgE-_x:{'ab' * 32}; Path=/p; Max-Age=99; Secure; HttpOnly; SameSite=Strict"
    )
    parsed = SimpleCookie()
    parsed.load(value)
    assert parsed["L402-premium"].value == f"AgE-_x:{'ab' * 32}"
    session = RedeemResult(RedeemState.SETTLED, 1.0, credential="m:00", path="/")
    assert "Max-Age" not in redeem_cookie(session)
    # What the token opens, cut to what a Set-Cookie header can carry.
    unsafe = RedeemResult(RedeemState.SETTLED, 1.0, credential="m:00", scope="/a/b;Domain=x")
    assert "; Path=/a; " in redeem_cookie(unsafe)
    with pytest.raises(ValueError, match="settled"):
        redeem_cookie(RedeemResult(RedeemState.PENDING, 1.0))


# --- the redeem handler ------------------------------------------------------------------


def service() -> tuple[L402Service, FakeInvoiceBackend, FakeClock]:
    clock = FakeClock()
    backend = FakeInvoiceBackend(clock)
    rules = (Rule("/paid/*", price_msat=Msat(5_000), service="svc", lifetime=600),)
    return (
        L402Service(pricing=Pricing(rules), backend=backend, store=MemoryStore(), clock=clock),
        backend,
        clock,
    )


async def redeem(
    svc: L402Service | None,
    body: bytes | str,
    *,
    method: str = "POST",
    content_type: str | None = "application/json",
    fetch_site: str | None = "same-origin",
) -> HttpResponse:
    return await handle_redeem(
        svc,
        method=method,
        content_type=content_type,
        fetch_site=fetch_site,
        body=body.encode() if isinstance(body, str) else body,
        client="10.0.0.1",
    )


def problem(response: HttpResponse) -> tuple[int, str]:
    assert header(response, "Content-Type") == ["application/problem+json"]
    return response.status, json.loads(response.body)["detail"]


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ("", "body must be JSON"),
        ("{", "body must be JSON"),
        (b"\xff\xfe", "body must be JSON"),
        ("[" * 100_000 + "]" * 100_000, None),  # too deep or too long: never a 500
        ("[]", 'body must be {"macaroon": "<base64>"}'),
        ("null", 'body must be {"macaroon": "<base64>"}'),
        ('{"macaroon": 5}', 'body must be {"macaroon": "<base64>"}'),
        ('{"mac": "x"}', 'body must be {"macaroon": "<base64>"}'),
        ('{"macaroon": "%%%"}', "macaroon must be base64 text"),
        ('{"macaroon": "QUJD"}', None),
    ],
)
async def test_garbage_is_400_or_413(body: str | bytes, detail: str | None) -> None:
    svc, _, _ = service()
    status, reason = problem(await redeem(svc, body))
    assert status in (400, 413)
    if detail is not None:
        assert (status, reason) == (400, detail)


async def test_method_content_type_size_and_origin_are_checked() -> None:
    svc, _, _ = service()
    body = json.dumps({"macaroon": MACAROON})
    response = await redeem(svc, body, method="GET")
    assert problem(response)[0] == 405
    assert header(response, "Allow") == ["POST"]
    assert problem(await redeem(svc, body, content_type="text/plain"))[0] == 415
    assert problem(await redeem(svc, body, content_type=None))[0] == 415
    assert problem(await redeem(svc, b"x" * (MAX_REDEEM_BODY + 1)))[0] == 413
    assert problem(await redeem(svc, body, fetch_site="cross-site"))[0] == 403
    assert problem(await redeem(svc, body, fetch_site="same-site"))[0] == 403
    # Not one of ours, but a well-formed request from the page itself or a script.
    for site in ("same-origin", "none", None):
        assert problem(await redeem(svc, body, fetch_site=site))[0] == 401
    charset = "application/json; charset=utf-8"
    assert problem(await redeem(svc, body, content_type=charset))[0] == 401
    assert problem(await redeem(None, body)) == (503, "gateway is not started")


async def test_pending_then_settled_with_the_cookie() -> None:
    svc, backend, clock = service()
    decision = await svc.authorize(RequestInfo("GET", "/paid/thing", "127.0.0.1"))
    assert isinstance(decision, PaymentChallenge)
    body = json.dumps({"macaroon": decision.macaroon})
    pending = await redeem(svc, body)
    assert pending.status == 200
    assert header(pending, "Cache-Control") == ["no-store"]
    assert header(pending, "Set-Cookie") == []
    document = json.loads(pending.body)
    assert document["state"] == "pending"
    assert document["expires_at"] == int(decision.expires_at)
    preimage = backend.pay(bytes.fromhex(decision.payment_hash))
    clock.advance(10)
    settled = await redeem(svc, body)
    assert settled.status == 200
    assert json.loads(settled.body)["state"] == "settled"
    (cookie,) = header(settled, "Set-Cookie")
    parsed = SimpleCookie()
    parsed.load(cookie)
    morsel = parsed["L402-svc"]
    assert morsel.value.endswith(":" + preimage.hex())
    assert morsel["path"] == "/paid"  # every page of the service, not only this one
    assert morsel["max-age"] == "590"
    assert morsel["secure"] is True
    assert morsel["httponly"] is True
    assert morsel["samesite"] == "Strict"


async def test_a_page_off_https_gets_the_credential_only_when_it_asks() -> None:
    svc, backend, clock = service()
    decision = await svc.authorize(RequestInfo("GET", "/paid/thing", "127.0.0.1"))
    assert isinstance(decision, PaymentChallenge)
    asking = json.dumps({"macaroon": decision.macaroon, "credential": True})
    assert "credential" not in json.loads((await redeem(svc, asking)).body)  # not paid yet
    preimage = backend.pay(bytes.fromhex(decision.payment_hash))
    clock.advance(10)
    document = json.loads((await redeem(svc, asking)).body)
    assert document["state"] == "settled"
    assert document["credential"].endswith(":" + preimage.hex())
    (cookie,) = header(await redeem(svc, asking), "Set-Cookie")
    assert cookie.startswith(f"L402-svc={document['credential']};")
    for body in ({"macaroon": decision.macaroon}, {"macaroon": decision.macaroon, "credential": 1}):
        assert "credential" not in json.loads((await redeem(svc, json.dumps(body))).body)


@pytest.mark.parametrize(
    ("deny", "title"),
    [
        (Deny(429, "too many payment challenges", retry_after=3), "Too many requests"),
        (Deny(503, "node unavailable", retry_after=5), "Temporarily unavailable"),
        (Deny(500, "boom"), "Internal Server Error"),
    ],
)
def test_a_browser_told_to_come_back_later_gets_a_page(deny: Deny, title: str) -> None:
    page = render_challenge(deny, method="GET", accept=CHROME)
    assert page.status == deny.status
    assert header(page, "Content-Type") == ["text/html; charset=utf-8"]
    assert header(page, "Retry-After") == (
        [] if deny.retry_after is None else [str(deny.retry_after)]
    )
    assert "script-src 'nonce-" in header(page, "Content-Security-Policy")[0]
    assert f"<title>{title}</title>" in page.body.decode()
    # Other clients, and refusals that waiting does not cure, keep problem+json.
    assert header(render_challenge(deny, method="GET", accept="*/*"), "Content-Type") == [
        "application/problem+json"
    ]
    for status in (400, 401, 403):
        refusal = render_challenge(Deny(status, "no"), method="GET", accept=CHROME)
        assert header(refusal, "Content-Type") == ["application/problem+json"]


def test_the_page_says_what_is_sold_and_by_whom() -> None:
    challenge = dataclasses.replace(
        CHALLENGE, title="Premium <b>", description="All & more", merchant='Shop "x"'
    )
    text = render_paywall(challenge).body.decode()
    assert "<title>Premium &lt;b&gt; · " in text
    assert '<h1 class="title" id="title">Premium &lt;b&gt;</h1>' in text
    assert '<p class="description" id="description">All &amp; more</p>' in text
    assert '<span id="merchant">Shop &quot;x&quot;</span>' in text
    plain = render_paywall(CHALLENGE).body.decode()
    assert "<title>Payment required · " in plain
    assert 'id="title"' not in plain
    assert 'id="merchant"' not in plain


async def test_the_price_in_fiat_reaches_the_page() -> None:
    clock = FakeClock()
    rules = (Rule("/paid/*", price_msat=Msat(10_000_000)),)
    fiat = FiatRate("EUR", clock, per_btc=90_000.0)
    svc = L402Service(
        pricing=Pricing(rules),
        backend=FakeInvoiceBackend(clock),
        store=MemoryStore(),
        clock=clock,
        fiat=fiat.display,
    )
    decision = await svc.authorize(RequestInfo("GET", "/paid/x", "127.0.0.1"))
    assert isinstance(decision, PaymentChallenge)
    assert decision.fiat == "\u2248 9.00 EUR"
    assert '<p class="fiat" id="fiat">\u2248 9.00 EUR</p>' in render_paywall(decision).body.decode()
    assert 'id="fiat"' not in render_paywall(CHALLENGE).body.decode()  # no rate: no line


def test_the_paywall_stays_in_its_layer() -> None:
    """Framework-neutral: the ASGI middleware imports it, so no aiohttp (nor grpc, storage)."""
    probe = "import json, sys, gateway.web.paywall; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(  # noqa: S603 - our own interpreter and module name
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    loaded = json.loads(result.stdout)
    banned = ("aiohttp", "grpc", "sqlite3", "gateway.lnd", "gateway.store", "gateway.cli")
    assert [name for name in loaded if name.startswith(banned)] == []
