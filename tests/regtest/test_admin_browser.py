"""The admin dashboard of ``l402-gateway serve`` (two workers, ``[admin] listen``) in a real
headless Chromium (Debian's, driven by Playwright), showing a regtest run: bob pays three
requests of two services through the proxy, one challenge stays unpaid.

The page is refused without the admin credential (401, Basic) and, with it, shows the
revenue chart, the invoices and the node's inbound liquidity, loading nothing but itself
under its Content-Security-Policy. Screenshots go to ``test-artifacts/`` at the repository
root: ``admin-refused.png``, ``admin-dashboard.png`` (48 hours), ``admin-dashboard-30d.png``
and ``admin-dashboard-premium.png`` (one service). Without ``/usr/bin/chromium`` (``make
browser`` installs it) the test skips, and fails in CI.
"""

from __future__ import annotations

import asyncio
import base64
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from playwright.async_api import (
    ConsoleMessage,
    HttpCredentials,
    Request,
    ViewportSize,
    async_playwright,
)
from playwright.async_api import Error as PlaywrightError

from gateway import l402
from gateway.health import LIVE_PATH
from gateway.lnd.client import LndClient
from gateway.store import SqliteStore
from regtest.network import CHANNEL_SAT, Network
from regtest.processes import free_ports, wait_for_http
from tests.regtest.browser_helpers import CHROMIUM_ARGS, require_chromium, screenshot
from tests.regtest.gateway_helpers import (
    bake_gateway_macaroon,
    l402_challenge,
    pay,
    serving,
    start_serve,
    wait_for_invoice,
)

pytestmark = pytest.mark.regtest

DESKTOP = ViewportSize(width=1280, height=900)
PASSWORD = "regtest admin password"
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def chromium() -> Path:
    return require_chromium()


def _config(network: Network, tmp_path: Path, port: int, admin_port: int, upstream: str) -> Path:
    node = network.alice
    macaroon = bake_gateway_macaroon(network, tmp_path / "gateway.macaroon")
    password_file = tmp_path / "admin.password"
    password_file.write_text(PASSWORD + "\n")
    password_file.chmod(0o600)
    config_file = tmp_path / "gateway.toml"
    config_file.write_text(
        f"""
[server]
listen = "127.0.0.1:{port}"
upstream = "{upstream}"
workers = 2
[lnd]
host = "{node.rpc_host}"
tls_cert = "{node.tls_cert}"
macaroon = "{macaroon}"
[store]
url = "sqlite://{tmp_path / "gateway.db"}"
[admin]
listen = "127.0.0.1:{admin_port}"
password_file = "{password_file}"
[[routes]]
pattern = "/api/premium/*"
price_msat = 10000
service = "premium"
[[routes]]
pattern = "/api/echo"
price_msat = 5000
service = "echo"
"""
    )
    return config_file


@pytest_asyncio.fixture
async def upstream() -> AsyncIterator[str]:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(text=f"resource {request.path}")

    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    async with serving(app) as url:
        yield url


async def _until_refused(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """Poll the admin listener until it answers 401 (it refuses without the credential)."""
    async with asyncio.timeout(TIMEOUT), aiohttp.ClientSession() as http:
        while True:
            assert process.poll() is None, log.read_text()
            try:
                async with http.get(url) as response:
                    if response.status == 401:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)


async def _paid(http: aiohttp.ClientSession, bob: LndClient, network: Network, url: str) -> bytes:
    async with http.get(url) as challenged:
        assert challenged.status == 402
        challenge = l402_challenge(challenged.headers)
    authorization = await pay(bob, network, challenge)
    async with http.get(url, headers={"Authorization": authorization}) as ok:
        assert ok.status == 200, await ok.text()
    macaroon = l402.decode_b64(challenge.macaroon_b64)
    return l402.Identifier.decode(macaroon.identifier).payment_hash


async def test_dashboard_shows_a_regtest_run_in_chromium(
    network: Network,
    tmp_path: Path,
    upstream: str,
    chromium: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    port, admin_port = free_ports(2)
    config_file = _config(network, tmp_path, port, admin_port, upstream)
    log = tmp_path / "serve.log"
    process = start_serve(config_file, log)
    url, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}/"
    try:
        await wait_for_http(url + LIVE_PATH, process, log)
        await _until_refused(admin, process, log)
        async with aiohttp.ClientSession() as http, LndClient(network.bob.settings()) as bob:
            paid = [
                await _paid(http, bob, network, url + "/api/premium/one"),
                await _paid(http, bob, network, url + "/api/premium/two"),
                await _paid(http, bob, network, url + "/api/echo"),
            ]
            async with http.get(url + "/api/premium/unpaid") as unpaid:
                assert unpaid.status == 402
        for payment_hash in paid:
            await wait_for_invoice(tmp_path / "gateway.db", payment_hash, "SETTLED")

        # The JSON agrees with the store.
        auth = {"Authorization": "Basic " + base64.b64encode(f"admin:{PASSWORD}".encode()).decode()}
        async with aiohttp.ClientSession(headers=auth) as http:
            async with http.get(admin + "api/revenue") as response:
                assert response.status == 200
                revenue = await response.json()
            async with http.get(admin + "api/liquidity") as response:
                liquidity = await response.json()
        store = await SqliteStore.open(tmp_path / "gateway.db")
        try:
            stored = await store.revenue(revenue["since"], 3600)
        finally:
            await store.close()
        assert [(b["service"], b["settled"], b["amount_msat"]) for b in revenue["buckets"]] == [
            (bucket.service, bucket.settled, bucket.amount_msat) for bucket in stored
        ]
        assert sum(b["amount_msat"] for b in revenue["buckets"]) == 25_000
        # alice's channels from carol and bob, their remote sides' reserves taken off.
        assert liquidity["known"] is True
        assert liquidity["channels"] == 2
        assert 0 < liquidity["largest_msat"] < liquidity["total_msat"] < 2 * CHANNEL_SAT * 1000

        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(
                executable_path=str(chromium), headless=True, args=CHROMIUM_ARGS
            )
            try:
                # No credential: refused. Headless Chromium has no one to ask for a password:
                # it fails the navigation on the 401 and stays on its blank page
                # (_until_refused saw the 401 itself).
                stranger = await browser.new_context(viewport=DESKTOP)
                page = await stranger.new_page()
                with pytest.raises(PlaywrightError, match="ERR_INVALID_AUTH_CREDENTIALS"):
                    await page.goto(admin)
                assert page.url == "about:blank"
                await stranger.close()
                # A wrong password: Chromium shows the 401 page.
                stranger = await browser.new_context(
                    viewport=DESKTOP,
                    http_credentials=HttpCredentials(username="admin", password="x"),
                )
                page = await stranger.new_page()
                refusal = await page.goto(admin)
                assert refusal is not None
                assert refusal.status == 401
                body = await page.text_content("body") or ""
                assert "the admin credential is required" in body
                assert "Revenue" not in body
                await screenshot(page, "admin-refused.png", capsys)
                await stranger.close()

                # The operator.
                operator = await browser.new_context(
                    viewport=DESKTOP,
                    http_credentials={"username": "admin", "password": PASSWORD},
                )
                page = await operator.new_page()
                console: list[str] = []
                requests: list[str] = []

                def on_console(message: ConsoleMessage) -> None:
                    console.append(f"{message.type}: {message.text}")

                def on_request(request: Request) -> None:
                    requests.append(request.url)

                page.on("console", on_console)
                page.on("request", on_request)
                shown = await page.goto(admin)
                assert shown is not None
                assert shown.status == 200
                headers = await shown.all_headers()
                assert headers["content-security-policy"].startswith(
                    "default-src 'none'; style-src 'nonce-"
                )
                chart = page.locator("#revenue-chart")
                await chart.wait_for()
                services = [
                    await bar.get_attribute("data-service") or ""
                    for bar in await page.locator("rect.bar").all()
                ]
                assert sorted(services) == ["echo", "premium"]  # all paid within this hour
                assert await page.text_content("#revenue-total") == "25"
                # The style applied (a nonce'd <style>, allowed by the CSP): the chart is
                # laid out at the page's width, not the SVG's default 300 px.
                box = await chart.bounding_box()
                assert box is not None
                assert box["width"] > 900
                rows = await page.locator("#invoices-table tbody tr").all_text_contents()
                assert sum("SETTLED" in row for row in rows) == 3
                assert sum("OPEN" in row for row in rows) == 1
                assert any("GET /api/premium/unpaid" in row for row in rows)
                inbound = await page.text_content("#inbound-total") or ""
                assert inbound.endswith(" sat")
                await screenshot(page, "admin-dashboard.png", capsys)

                await page.click("#range-30d")
                await page.wait_for_url("**/?range=30d")
                assert "30 days, per day" in (await page.text_content("#revenue h2") or "")
                assert await page.locator("rect.bar").count() == 2
                await screenshot(page, "admin-dashboard-30d.png", capsys)

                await page.goto(admin + "?range=48h&service=premium")
                services = [
                    await bar.get_attribute("data-service") or ""
                    for bar in await page.locator("rect.bar").all()
                ]
                assert services == ["premium"]
                assert await page.text_content("#revenue-total") == "20"
                await screenshot(page, "admin-dashboard-premium.png", capsys)

                # Nothing but the pages themselves was loaded; no CSP report, no error.
                assert all(request.startswith(admin) for request in requests), requests
                assert [line for line in console if not line.startswith(("log:", "info:"))] == []
                await operator.close()
            finally:
                await browser.close()
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()
