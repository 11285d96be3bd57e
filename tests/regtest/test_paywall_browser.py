"""The browser paywall in a real headless Chromium (Debian's, driven by Playwright) against a
gateway on the regtest network: the page is paid by bob's node and unlocks by itself.

Screenshots of the locked and the unlocked page (390x844, a phone) go to ``test-artifacts/``
at the repository root. Without ``/usr/bin/chromium`` (``make browser`` installs it) the tests
skip, and fail in CI.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp import web
from playwright.async_api import (
    BrowserContext,
    ConsoleMessage,
    Page,
    Request,
    Response,
    ViewportSize,
    async_playwright,
)

from gateway.config import Config, PaywallConfig
from gateway.examples import demo_api
from gateway.fiat import FiatRate
from gateway.lnd.client import LndClient
from gateway.ports import Msat
from gateway.pricing import Rule
from gateway.runtime import running_gateway
from gateway.service import RateLimiter
from gateway.web.aiohttp import TOKEN, setup_l402
from gateway.web.paywall import REDEEM_PATH
from gateway.web.proxy import build_proxy
from regtest.network import Network
from tests.fakes import FakeGateway
from tests.regtest.browser_helpers import CHROMIUM_ARGS, require_chromium, screenshot
from tests.regtest.gateway_helpers import (
    MAX_FEE,
    PREMIUM_PRICE,
    OffsetClock,
    gateway_config,
    serving,
    wait_for_invoice,
)

pytestmark = pytest.mark.regtest

LAN_HOST = "paywall.test"
# A name that is not localhost: no secure context over plain HTTP, as on a LAN address.
PAYWALL_CHROMIUM_ARGS = [*CHROMIUM_ARGS, f"--host-resolver-rules=MAP {LAN_HOST} 127.0.0.1"]
PHONE = ViewportSize(width=390, height=844)
ARTICLE = "/api/premium/article"
SECOND = "/api/premium/second"  # another page of the same service
UNLOCK_LIMIT = 5.0  # seconds from the payment's success to the resource on screen


async def _article(request: web.Request) -> web.Response:
    """A priced HTML page, as a site would have one (the token facts are in a header behind
    the proxy, on the request with the middleware)."""
    token = request.get(TOKEN)
    facts = request.headers.get("X-L402-Token")
    service = token.service if token else json.loads(facts)["service"] if facts else "none"
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Premium article</title>
<style>body{{font:17px/1.55 system-ui,sans-serif;margin:0;padding:24px 20px;color:#15171a}}
h1{{font-size:1.7rem;line-height:1.2;margin:0 0 12px}}
.badge{{display:inline-block;background:#e8f6ef;color:#0f7b55;border-radius:999px;
padding:4px 12px;font-size:.85rem;font-weight:600;margin-bottom:16px}}</style></head>
<body><main id="premium-article"><span class="badge">Paid with Lightning</span>
<h1>The premium article</h1>
<p>Thank you for paying. This content was unlocked by an L402 token bought with a
Lightning payment, kept by your browser in an HttpOnly cookie.</p>
<p id="paid-service">service: {service}</p></main></body></html>"""
    return web.Response(text=body, content_type="text/html")


def _app() -> web.Application:
    app = demo_api()
    app.router.add_get(ARTICLE, _article)
    app.router.add_get(SECOND, _article)
    return app


@contextlib.asynccontextmanager
async def _middleware_gateway(config: Config) -> AsyncIterator[str]:
    app = _app()
    setup_l402(app, lambda: running_gateway(config, clock=OffsetClock()))
    async with serving(app) as url:
        yield url


@contextlib.asynccontextmanager
async def _proxy_gateway(config: Config) -> AsyncIterator[str]:
    async with serving(_app()) as upstream:
        proxy = build_proxy(upstream, lambda: running_gateway(config, clock=OffsetClock()))
        async with serving(proxy) as url:
            yield url


@pytest.fixture(scope="module")
def chromium() -> Path:
    return require_chromium()


@dataclass
class Browser:
    context: BrowserContext
    page: Page
    console: list[str]
    errors: list[str]
    documents: list[str]  # URLs of every document the page loaded
    redeems: list[str]
    failed: list[str]  # responses >= 400 other than the paywall's 402 and /favicon.ico


@pytest_asyncio.fixture
async def browser(chromium: Path, tmp_path: Path) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # a fresh profile: no cookies, no cache
            executable_path=str(chromium),
            headless=True,
            args=PAYWALL_CHROMIUM_ARGS,
            viewport=PHONE,
            device_scale_factor=2,
            is_mobile=True,
            has_touch=True,
        )
        try:
            page = context.pages[0] if context.pages else await context.new_page()
            seen = Browser(context, page, [], [], [], [], [])

            def on_console(message: ConsoleMessage) -> None:
                seen.console.append(f"{message.type}: {message.text}")

            def on_request(request: Request) -> None:
                if request.resource_type == "document":
                    seen.documents.append(request.url)
                elif request.url.endswith(REDEEM_PATH):
                    seen.redeems.append(request.method)

            page.on("console", on_console)
            page.on("pageerror", lambda error: seen.errors.append(str(error)))

            def on_response(response: Response) -> None:
                expected = (
                    response.status == 402 and response.request.resource_type == "document"
                ) or (response.status == 404 and response.url.endswith("/favicon.ico"))
                if response.status >= 400 and not expected:
                    seen.failed.append(f"{response.status} {response.url}")

            page.on("request", on_request)
            page.on("response", on_response)
            yield seen
        finally:
            await context.close()


async def _open_locked(browser: Browser, url: str) -> str:
    """Open the priced page; check that it is the paywall, working; return its invoice."""
    page = browser.page
    response = await page.goto(url)
    assert response is not None
    assert response.status == 402
    headers = await response.all_headers()
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert "script-src 'nonce-" in headers["content-security-policy"]
    await page.wait_for_selector("#countdown:not(:empty)")  # the script runs (CSP allows it)
    invoice = (await page.text_content("#invoice")) or ""
    assert invoice.startswith("lnbcrt")
    assert f'invoice="{invoice}"' in headers["www-authenticate"]
    assert await page.get_attribute("#open-wallet", "href") == f"lightning:{invoice}"
    assert await page.is_visible("#qr svg")
    assert await page.evaluate("() => window.isSecureContext")  # 127.0.0.1 is trustworthy
    return invoice


def _no_page_errors_but(browser: Browser, *statuses: int) -> None:
    """``_no_page_errors``, but documents with these statuses are expected."""
    browser.failed[:] = [line for line in browser.failed if int(line.split()[0]) not in statuses]
    _no_page_errors(browser)


def _no_page_errors(browser: Browser) -> None:
    """No script error, no CSP violation, no failed request but the expected ones."""
    problems = [
        line
        for line in browser.console
        if not line.startswith(("log:", "info:", "debug:"))
        and "Failed to load resource" not in line  # responses are checked one by one
    ]
    assert problems == []
    assert browser.errors == []
    assert browser.failed == []


async def test_paywall_unlocks_after_bob_pays(
    network: Network,
    bob: LndClient,
    browser: Browser,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = gateway_config(network, tmp_path / "gateway.db")
    routes = tuple(
        dataclasses.replace(route, title="Premium articles", description="Every article, 1 h.")
        if route.service == "premium"
        else route
        for route in base.routes
    )
    # A rate source as an operator would point at: JSON with the number inside.
    fetched = asyncio.Event()

    async def rate(request: web.Request) -> web.Response:
        fetched.set()
        return web.json_response({"bitcoin": {"eur": 90_000}})

    rates = web.Application()
    rates.router.add_get("/rate", rate)
    async with serving(rates) as rate_url:
        paywall = PaywallConfig(
            merchant="Example Shop",
            fiat_currency="EUR",
            fiat_rate_url=rate_url + "/rate",
            fiat_rate_field="bitcoin.eur",
        )
        config = dataclasses.replace(base, routes=routes, paywall=paywall)
        async with _middleware_gateway(config) as url:
            await asyncio.wait_for(fetched.wait(), 10)
            await asyncio.sleep(0.2)  # the rate is kept once the answer is read
            await _pay_and_unlock(network, bob, browser, config, url, capsys)


async def _pay_and_unlock(
    network: Network,
    bob: LndClient,
    browser: Browser,
    config: Config,
    url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Open the locked article, check what the page says, pay with bob, check the unlock."""
    page = browser.page
    invoice = await _open_locked(browser, url + ARTICLE)
    fiat = FiatRate("EUR", OffsetClock(), per_btc=90_000).display(PREMIUM_PRICE)
    assert fiat.startswith("\u2248 0.0")
    assert await page.text_content("#fiat") == fiat
    assert await page.title() == f"Premium articles · {PREMIUM_PRICE // 1000} sat"
    assert await page.text_content("h1") == "Premium articles"
    assert await page.is_visible("#description")
    assert await page.text_content("#merchant") == "Example Shop"
    assert await page.is_hidden("#pay-webln")  # no window.webln here
    assert (await page.text_content("#status") or "").startswith("Waiting for payment")
    assert await page.text_content(".amount") == str(PREMIUM_PRICE // 1000)
    locked = await screenshot(page, "paywall-locked.png", capsys)

    payment = await bob.send_payment(
        invoice,
        max_fee_msat=Msat(MAX_FEE),
        payment_timeout=30,
        last_hop_pubkey=network.carol.pubkey,
    )
    assert payment.preimage is not None
    paid_at = time.monotonic()
    await page.wait_for_selector("#premium-article", timeout=UNLOCK_LIMIT * 1000)
    unlocked_in = time.monotonic() - paid_at
    assert unlocked_in < UNLOCK_LIMIT
    assert page.url == url + ARTICLE
    assert await page.text_content("#paid-service") == "service: premium"
    unlocked = await screenshot(page, "paywall-unlocked.png", capsys)
    with capsys.disabled():
        print(f"unlocked {unlocked_in:.2f}s after the payment succeeded")

    # One navigation to unlock, no reload loop; the page polled the redeem endpoint.
    assert browser.documents == [url + ARTICLE, url + ARTICLE]
    assert browser.redeems
    assert set(browser.redeems) == {"POST"}
    _no_page_errors(browser)

    # Another page of the service opens without paying again.
    response = await page.goto(url + SECOND)
    assert response is not None
    assert response.status == 200
    assert await page.text_content("#paid-service") == "service: premium"

    (cookie,) = await browser.context.cookies()
    assert cookie["name"].startswith("L402-premium")
    assert cookie["value"].endswith(":" + payment.preimage.hex())
    assert cookie["path"] == "/api/premium"  # every page of the service
    assert cookie["httpOnly"] is True
    assert cookie["secure"] is True
    assert cookie["sameSite"] == "Strict"
    assert "L402" not in await page.evaluate("() => document.cookie")

    # The cookie keeps working: a plain reload shows the resource, not a new invoice.
    response = await page.reload()
    assert response is not None
    assert response.status == 200
    record = await wait_for_invoice(
        Path(config.store.url.removeprefix("sqlite://")), payment.payment_hash, "SETTLED"
    )
    assert record.path == ARTICLE

    await _open_locked(browser, url + "/api/echo")  # another service still asks
    assert await page.text_content("#service") == "echo"
    assert locked.stat().st_size > 0
    assert unlocked.stat().st_size > 0


async def test_webln_button_pays_through_the_proxy(
    network: Network,
    bob: LndClient,
    browser: Browser,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A WebLN wallet (a stand-in that pays with bob's node) behind the "Pay with WebLN"
    button, and the reverse proxy instead of the middleware."""
    paid: list[str] = []

    async def pay_with_bob(invoice: str) -> str:
        payment = await bob.send_payment(
            invoice,
            max_fee_msat=Msat(MAX_FEE),
            payment_timeout=30,
            last_hop_pubkey=network.carol.pubkey,
        )
        assert payment.preimage is not None
        paid.append(invoice)
        return payment.preimage.hex()

    await browser.context.expose_function("payWithBob", pay_with_bob)
    await browser.context.add_init_script(
        """window.webln = {
            enabled: false,
            async enable() { this.enabled = true; },
            async sendPayment(invoice) {
                if (!this.enabled) throw new Error("not enabled");
                return { preimage: await window.payWithBob(invoice) };
            },
        };"""
    )
    config = gateway_config(network, tmp_path / "gateway.db")
    async with _proxy_gateway(config) as url:
        page = browser.page
        invoice = await _open_locked(browser, url + ARTICLE)
        await page.wait_for_selector("#pay-webln", state="visible")
        await screenshot(page, "paywall-locked-webln.png", capsys)
        await page.click("#pay-webln")
        await page.wait_for_selector("#premium-article", timeout=30_000)
        assert paid == [invoice]
        assert await page.text_content("#paid-service") == "service: premium"
        assert len(browser.documents) == 2
        _no_page_errors(browser)


async def test_expired_invoice_offers_a_fresh_one(
    network: Network, browser: Browser, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = gateway_config(network, tmp_path / "gateway.db")
    config = dataclasses.replace(base, l402=dataclasses.replace(base.l402, invoice_expiry=3))
    async with _middleware_gateway(config) as url:
        page = browser.page
        first = await _open_locked(browser, url + ARTICLE)
        await page.wait_for_selector("#fresh", state="visible", timeout=10_000)
        assert await page.text_content("#status") == "This invoice has expired."
        assert await page.is_hidden("#open-wallet")
        await screenshot(page, "paywall-expired.png", capsys)
        async with page.expect_navigation():
            await page.click("#fresh")
        await page.wait_for_selector("#countdown:not(:empty)")
        second = await page.text_content("#invoice")
        assert second
        assert second != first
        assert await page.is_visible("#open-wallet")
        _no_page_errors(browser)


async def test_off_https_the_page_warns_then_hands_over_the_credential(
    network: Network,
    bob: LndClient,
    browser: Browser,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Plain HTTP on a name that is not localhost: Chromium drops the Secure cookie, so the
    page shows no invoice until asked to, and once paid shows the credential instead of
    sending the user to a fresh invoice (paid, no access)."""
    config = gateway_config(network, tmp_path / "gateway.db")
    async with _middleware_gateway(config) as local:
        url = local.replace("127.0.0.1", LAN_HOST) + ARTICLE
        page = browser.page
        response = await page.goto(url)
        assert response is not None
        assert response.status == 402
        assert not await page.evaluate("() => window.isSecureContext")
        await page.wait_for_selector("#insecure", state="visible")
        for hidden in ("#qr", "#open-wallet", "#invoice", "#status"):
            assert await page.is_hidden(hidden), hidden
        await screenshot(page, "paywall-insecure.png", capsys)

        await page.click("#pay-anyway")
        await page.wait_for_selector("#qr svg", state="visible")
        invoice = (await page.text_content("#invoice")) or ""
        assert invoice.startswith("lnbcrt")
        payment = await bob.send_payment(
            invoice,
            max_fee_msat=Msat(MAX_FEE),
            payment_timeout=30,
            last_hop_pubkey=network.carol.pubkey,
        )
        assert payment.preimage is not None
        await page.wait_for_selector("#credential", state="visible", timeout=UNLOCK_LIMIT * 1000)
        credential = (await page.text_content("#credential")) or ""
        assert credential.endswith(":" + payment.preimage.hex())
        assert await page.is_hidden("#qr")
        assert await page.is_hidden("#fresh")
        await screenshot(page, "paywall-insecure-paid.png", capsys)
        # No navigation to a fresh invoice; the browser indeed kept no cookie.
        assert browser.documents == [url]
        assert await browser.context.cookies() == []
        _no_page_errors(browser)

        # The credential it shows opens the resource (the page's own fetch, so its origin).
        answer = await page.evaluate(
            """async (credential) => {
                const response = await fetch(location.href, {
                    headers: { Authorization: `L402 ${credential}` },
                });
                return [response.status, await response.text()];
            }""",
            credential,
        )
        assert answer[0] == 200
        assert "The premium article" in answer[1]


async def test_a_busy_gateway_shows_a_page_not_json(
    browser: Browser, capsys: pytest.CaptureFixture[str]
) -> None:
    """429 and 503 reach a browser as a page that says what happened and when to come back
    (over the fakes: no node needed to be refused)."""
    # One challenge, then one more every two seconds.
    limiter = RateLimiter(0.5, 1, 100, OffsetClock())
    fake = FakeGateway((Rule("/api/premium/*", price_msat=Msat(10_000)),), rate_limiter=limiter)
    app = _app()
    setup_l402(app, fake)
    async with serving(app) as url:
        page = browser.page
        await _open_locked(browser, url + ARTICLE)
        response = await page.reload()
        assert response is not None
        assert response.status == 429
        headers = await response.all_headers()
        assert headers["content-type"] == "text/html; charset=utf-8"
        assert 1 <= int(headers["retry-after"]) <= 2
        assert await page.text_content("h1") == "Too many requests"
        assert await page.is_disabled("#retry")  # not before Retry-After
        assert (await page.text_content("#retry-status") or "").startswith("You can try again in")
        await screenshot(page, "paywall-429.png", capsys)
        await page.wait_for_selector("#retry:enabled", timeout=5_000)
        async with page.expect_navigation():
            await page.click("#retry")
        await page.wait_for_selector("#countdown:not(:empty)")  # the paywall again

        fake.backend.unavailable = True
        await asyncio.sleep(2)  # the bucket refills: this one reaches the node
        response = await page.reload()
        assert response is not None
        assert response.status == 503
        assert await page.text_content("h1") == "Temporarily unavailable"
        assert await page.text_content("#busy-detail")
        await screenshot(page, "paywall-503.png", capsys)
        _no_page_errors_but(browser, 429, 503)
