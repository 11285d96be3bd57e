"""Payment link pages in a real headless Chromium (Debian's, driven by Playwright) against
``l402-gateway serve`` on the regtest network:

- a single-use link made with ``l402-gateway links create``: the page shows the amount, the
  memo and the QR code of its invoice; bob's node pays the invoice shown, and the page says
  "Paid" by itself, without a navigation or a reload;
- a reusable link: the page shows its LNURL; a wallet (lnbits' ``lnurl`` library, in a venv of
  its own) gets an invoice from it and bob pays that; the page counts "Received 1 payment";
- a single-use link open in the browser while a wallet takes an invoice over its LNURL: the
  page switches to the wallet's invoice by itself, the one it showed first can no longer be
  paid, and the link is paid exactly once.

Screenshots before and after (390x844, a phone) go to ``test-artifacts/`` at the repository
root. Without ``/usr/bin/chromium`` (``make browser`` installs it) the tests skip, and fail
in CI.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from playwright.async_api import BrowserContext, Page, Response, ViewportSize, async_playwright

from gateway import errors
from gateway.client import bolt11
from gateway.lnd.client import LndClient
from gateway.ports import InvoiceState, LinkState, Msat, PaymentHash
from regtest.network import Network
from tests.interop.lnurl_venv import LnurlWallet, require_lnurl_wallet
from tests.regtest.browser_helpers import CHROMIUM_ARGS, require_chromium, screenshot
from tests.regtest.gateway_helpers import MAX_FEE
from tests.regtest.tips_helpers import TipsGateway, bob_pays, tips_gateway

pytestmark = pytest.mark.regtest

PHONE = ViewportSize(width=390, height=844)
PAID_LIMIT = 5.0  # seconds from the payment's success to "paid" on screen (the issue: 1-2 s)
LINK_SAT = 2000
MEMO = "Table 4: two flat whites"


@pytest.fixture(scope="module")
def chromium() -> Path:
    return require_chromium()


@pytest.fixture(scope="module")
def wallet() -> LnurlWallet:
    return require_lnurl_wallet()


@dataclass
class Browser:
    context: BrowserContext
    page: Page
    problems: list[str]  # console errors, script errors, failed responses
    documents: list[str]  # URLs of every document the page loaded


@pytest_asyncio.fixture
async def browser(chromium: Path, tmp_path: Path) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(chromium),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport=PHONE,
            device_scale_factor=2,
            is_mobile=True,
            has_touch=True,
        )
        try:
            page = context.pages[0] if context.pages else await context.new_page()
            seen = Browser(context, page, [], [])
            page.on(
                "console",
                lambda message: (
                    seen.problems.append(f"console {message.type}: {message.text}")
                    if message.type in ("error", "warning")
                    else None
                ),
            )
            page.on("pageerror", lambda error: seen.problems.append(f"page error: {error}"))
            page.on(
                "request",
                lambda request: (
                    seen.documents.append(request.url)
                    if request.resource_type == "document"
                    else None
                ),
            )

            def on_response(response: Response) -> None:
                if response.status >= 400 and not response.url.endswith("/favicon.ico"):
                    seen.problems.append(f"{response.status} {response.url}")

            page.on("response", on_response)
            yield seen
        finally:
            await context.close()


async def _open(browser: Browser, gateway: TipsGateway, link: dict[str, str]) -> str:
    """Open the link's page (its URL as ``links create`` printed it); check what every page
    shows; return the text of ``#invoice`` (what the QR code holds)."""
    page = browser.page
    url = link["url"]
    assert url == f"{gateway.url}/.well-known/l402/links/{link['link_id']}"
    response = await page.goto(url)
    assert response is not None
    assert response.status == 200
    headers = await response.all_headers()
    assert headers["content-type"].startswith("text/html")
    assert "script-src 'nonce-" in headers["content-security-policy"]
    await page.wait_for_selector("#link[data-state=open]")
    assert await page.is_visible("#qr svg")
    assert await page.text_content("#status") == "Waiting for payment"
    shown = ((await page.text_content("#invoice")) or "").strip()
    assert await page.get_attribute("#qr", "href") == f"lightning:{shown}"
    return shown


def _digits(text: str | None) -> str:
    return re.sub(r"[^0-9]", "", text or "")


async def test_single_use_link_page_shows_paid_without_reloading(
    network: Network,
    bob: LndClient,
    browser: Browser,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with tips_gateway(network, tmp_path) as gateway:
        link = await gateway.cli_json(
            "links", "create", "--amount", f"{LINK_SAT}sat", "--memo", MEMO
        )
        page = browser.page
        invoice = await _open(browser, gateway, link)
        assert invoice.startswith("lnbcrt")  # a fixed single-use link: its BOLT11 invoice
        assert await page.text_content("#memo") == MEMO
        assert _digits(await page.text_content("#amount")) == str(LINK_SAT)
        assert await page.get_attribute("#link", "data-single-use") == "1"
        before = await screenshot(page, "link-open.png", capsys)

        paid_at = time.monotonic()
        payment = await bob_pays(bob, invoice)
        await page.wait_for_selector("#link[data-state=paid]", timeout=PAID_LIMIT * 1000)
        shown_in = time.monotonic() - paid_at
        assert await page.text_content("#status") == "Paid"
        assert await page.is_hidden("#qr")
        after = await screenshot(page, "link-paid.png", capsys)
        # No navigation: the page the browser opened, once.
        assert browser.documents == [link["url"]]
        assert page.url == link["url"]
        assert browser.problems == []

        record = await gateway.settled(payment.payment_hash)
        assert (record.service, record.amount_paid_msat) == (
            f"link:{link['link_id']}",
            LINK_SAT * 1000,
        )
        stored = await gateway.wait_link(link["link_id"], 1)
        assert stored.state(time.time()) is LinkState.PAID
        (listed,) = [
            row for row in await gateway.cli_json("links") if row["link_id"] == link["link_id"]
        ]
        assert listed["state"].upper() == "PAID"

        # Opened again, the page says paid from the start and offers nothing to pay.
        response = await page.reload()
        assert response is not None
        assert response.status in (200, 410)
        assert await page.get_attribute("#link", "data-state") == "paid"
        assert await page.is_hidden("#qr")
        gateway.assert_log_clean()
    assert before.stat().st_size > 0
    assert after.stat().st_size > 0
    with capsys.disabled():
        print(f"the page showed paid {shown_in:.2f}s after bob's payment succeeded")


async def test_reusable_link_page_counts_a_payment_made_over_lnurl(
    network: Network,
    bob: LndClient,
    wallet: LnurlWallet,
    browser: Browser,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with tips_gateway(network, tmp_path) as gateway:
        link = await gateway.cli_json(
            "links",
            "create",
            "--min",
            "100sat",
            "--max",
            "5000sat",
            "--reusable",
            "--memo",
            "Tips for the band",
        )
        page = browser.page
        lnurl = await _open(browser, gateway, link)
        assert lnurl.upper() == link["lnurl"].upper()  # a reusable link shows its LNURL
        assert await page.get_attribute("#link", "data-single-use") == "0"
        await screenshot(page, "link-reusable-open.png", capsys)

        seen = await wallet.pay_request(lnurl, 3_000_000)
        assert (seen["min_sendable"], seen["max_sendable"]) == (100_000, 5_000_000)
        paid_at = time.monotonic()
        await bob_pays(bob, seen["action"]["pr"])
        await page.wait_for_function(
            "() => document.getElementById('status').textContent === 'Received 1 payment'",
            timeout=PAID_LIMIT * 1000,
        )
        shown_in = time.monotonic() - paid_at
        assert await page.get_attribute("#link", "data-state") == "open"  # it takes more
        await screenshot(page, "link-reusable-paid.png", capsys)
        assert browser.documents == [link["url"]]
        assert browser.problems == []
        stored = await gateway.wait_link(link["link_id"], 1)
        assert stored.paid_msat == 3_000_000
        gateway.assert_log_clean()
    with capsys.disabled():
        print(f"the reusable link's page counted the payment {shown_in:.2f}s after it succeeded")


async def test_single_use_page_follows_the_invoice_a_wallet_took_over_lnurl(
    network: Network,
    alice: LndClient,
    bob: LndClient,
    wallet: LnurlWallet,
    browser: Browser,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A single-use link shown in a browser and scanned as an LNURL by a wallet at once: the
    wallet's invoice (with the metadata's hash) replaces the page's, which the node cancels;
    the page shows the new one by itself; paying the old one fails; the link is paid once."""
    async with tips_gateway(network, tmp_path) as gateway:
        link = await gateway.cli_json(
            "links", "create", "--amount", f"{LINK_SAT}sat", "--memo", MEMO
        )
        page = browser.page
        first = await _open(browser, gateway, link)
        seen = await wallet.pay_request(link["lnurl"], LINK_SAT * 1000)
        second = seen["action"]["pr"]
        assert second != first
        await page.wait_for_function(
            "(invoice) => document.getElementById('invoice').textContent.trim() === invoice",
            arg=second,
            timeout=PAID_LIMIT * 1000,
        )
        assert await page.get_attribute("#qr", "href") == f"lightning:{second}"
        await screenshot(page, "link-replaced.png", capsys)

        with pytest.raises(errors.PaymentFailed):
            await bob.send_payment(first, max_fee_msat=Msat(MAX_FEE), payment_timeout=30)
        payment = await bob_pays(bob, second)
        await page.wait_for_selector("#link[data-state=paid]", timeout=PAID_LIMIT * 1000)
        assert browser.documents == [link["url"]]
        assert browser.problems == []
        await gateway.settled(payment.payment_hash)
        stored = await gateway.wait_link(link["link_id"], 1)
        assert (stored.paid_count, stored.paid_msat) == (1, LINK_SAT * 1000)
        # The node cancelled the page's first invoice. (The store learns it when the sweeper
        # looks at it after its expiry: LND's SubscribeInvoices reports no cancellation.)
        first_hash = PaymentHash(bolt11.decode(first).payment_hash)
        assert (await alice.lookup_invoice(first_hash)).state is InvoiceState.CANCELED
        old = await gateway.invoice(first_hash)
        assert old is not None
        assert old.state in (InvoiceState.OPEN, InvoiceState.CANCELED)
        gateway.assert_log_clean()
