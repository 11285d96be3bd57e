"""The admin dashboard over the fakes: refused without the admin credential, and with it the
revenue chart, invoices, accounts, liquidity and dead webhook deliveries of paid requests
made through the reverse proxy, as a page and as JSON."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway import errors
from gateway.liquidity import NEEDS_PERMISSION
from gateway.ports import (
    AdminSlot,
    DeliveryState,
    InvoiceRecord,
    InvoiceState,
    Liquidity,
    Msat,
    PaymentHash,
)
from gateway.pricing import Rule
from gateway.reports import credit_totals_json
from gateway.store.memory import MemoryStore
from gateway.web.admin import GUESS_BURST, build_admin
from gateway.web.proxy import build_proxy
from tests.fakes import FakeGateway

PASSWORD = "correct horse battery staple"
RULES = [
    Rule("/weather/*", price_msat=Msat(21_000), service="weather"),
    Rule("/maps/*", price_msat=Msat(5_500), service="maps"),
]
LIQUIDITY = Liquidity(
    total_msat=Msat(7_000_000_000), largest_msat=Msat(4_000_000_000), channels=2, known=True
)
TIMEOUT = 5.0


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


AUTH = {"Authorization": basic("admin", PASSWORD)}


@dataclass
class Dashboard:
    gateway: FakeGateway
    slot: AdminSlot
    http: aiohttp.ClientSession
    proxy: str
    admin: str

    async def get(self, path: str, **headers: str) -> tuple[int, Any, aiohttp.ClientResponse]:
        async with self.http.get(self.admin + path, headers=headers) as response:
            if response.content_type == "application/json":
                return response.status, await response.json(), response
            return response.status, await response.text(), response

    async def paid_request(self, path: str) -> bytes:
        """A challenge for ``path``, paid, and the retry with the credential; the hash."""
        async with self.http.get(self.proxy + path) as challenged:
            assert challenged.status == 402
            challenge = await challenged.json()
        authorization = self.gateway.pay(challenge)
        payment_hash = bytes.fromhex(challenge["payment_hash"])
        await self.settled(payment_hash)
        async with self.http.get(self.proxy + path, headers={"Authorization": authorization}) as ok:
            assert ok.status == 200
        return payment_hash

    async def unpaid_challenge(self, path: str) -> bytes:
        async with self.http.get(self.proxy + path) as challenged:
            assert challenged.status == 402
            return bytes.fromhex((await challenged.json())["payment_hash"])

    async def settled(self, payment_hash: bytes) -> None:
        async with asyncio.timeout(TIMEOUT):
            while True:
                record = await self.gateway.store.get_invoice(PaymentHash(payment_hash))
                if record is not None and record.state is InvoiceState.SETTLED:
                    return
                await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(slot: AdminSlot | None = None) -> AsyncIterator[Dashboard]:
    gateway = FakeGateway(RULES)

    async def upstream_answer(_request: web.Request) -> web.Response:
        return web.Response(text="the resource")

    upstream = web.Application()
    upstream.router.add_get("/{tail:.*}", upstream_answer)

    async def liquidity() -> Liquidity:
        return LIQUIDITY

    if slot is None:
        slot = AdminSlot(store=gateway.store, liquidity=liquidity)
    admin = build_admin(slot, PASSWORD, clock=gateway.clock)
    async with TestServer(upstream) as backend:
        proxy = build_proxy(str(backend.make_url("/")), gateway)
        async with (
            TestServer(proxy) as proxy_server,
            TestServer(admin) as admin_server,
            aiohttp.ClientSession() as http,
        ):
            yield Dashboard(
                gateway,
                slot,
                http,
                str(proxy_server.make_url("")).rstrip("/"),
                str(admin_server.make_url("")).rstrip("/"),
            )


@pytest_asyncio.fixture
async def dashboard() -> AsyncIterator[Dashboard]:
    async with running() as running_dashboard:
        yield running_dashboard


# --- the credential ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        basic("admin", "wrong"),
        basic("root", PASSWORD),
        basic("admin", PASSWORD + "x"),
        basic("admin", PASSWORD)[:-2],  # broken base64
        "Bearer " + PASSWORD,
        "Basic",
    ],
)
@pytest.mark.parametrize("path", ["/", "/api/revenue", "/api/invoices", "/nowhere"])
async def test_refused_without_the_admin_credential(
    dashboard: Dashboard, authorization: str | None, path: str
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    status, body, response = await dashboard.get(path, **headers)
    assert status == 401
    assert response.headers["WWW-Authenticate"] == (
        'Basic realm="l402-gateway admin", charset="UTF-8"'
    )
    assert response.headers["Cache-Control"] == "no-store"
    assert "the admin credential is required" in body
    assert PASSWORD not in body


async def test_the_scheme_is_case_insensitive(dashboard: Dashboard) -> None:
    status, _, _ = await dashboard.get(
        "/api/liquidity", Authorization=AUTH["Authorization"].replace("Basic", "bAsIc")
    )
    assert status == 200


async def test_guessing_is_slowed_down_but_never_the_operator(dashboard: Dashboard) -> None:
    wrong = {"Authorization": basic("admin", "guess")}
    statuses = [(await dashboard.get("/", **wrong))[0] for _ in range(GUESS_BURST)]
    assert statuses == [401] * GUESS_BURST
    status, body, response = await dashboard.get("/", **wrong)
    assert status == 429
    assert response.headers["Retry-After"] == "1"
    assert "too many attempts" in body
    assert (await dashboard.get("/api/liquidity", **AUTH))[0] == 200  # the right one passes
    dashboard.gateway.clock.advance(1.0)  # one more guess a second
    assert (await dashboard.get("/", **wrong))[0] == 401
    assert (await dashboard.get("/", **wrong))[0] == 429


async def test_requests_without_a_credential_are_no_guesses(dashboard: Dashboard) -> None:
    """Behind a TLS proxy every client has the proxy's address: bare requests, however many,
    neither use up the guesses nor keep a browser from its login prompt."""
    for _ in range(3 * GUESS_BURST):
        status, _, response = await dashboard.get("/")
        assert status == 401
        assert response.headers["WWW-Authenticate"].startswith("Basic")
    wrong = {"Authorization": basic("admin", "guess")}
    statuses = [(await dashboard.get("/", **wrong))[0] for _ in range(GUESS_BURST + 1)]
    assert statuses == [401] * GUESS_BURST + [429]


@pytest.mark.parametrize(("method", "path", "status"), [("POST", "/", 405), ("GET", "/x", 404)])
async def test_the_routers_own_answers_have_the_common_headers(
    dashboard: Dashboard, method: str, path: str, status: int
) -> None:
    """A method other than GET (405) or an unknown path (404), with the credential: the
    same security headers as every other answer."""
    async with dashboard.http.request(method, dashboard.admin + path, headers=AUTH) as response:
        assert response.status == status
        headers = response.headers
    assert headers["Cache-Control"] == "no-store"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["Referrer-Policy"] == "no-referrer"


def test_an_empty_password_is_refused() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        build_admin(AdminSlot(), "")


# --- the page ------------------------------------------------------------------------------


async def test_the_page_shows_what_was_paid(dashboard: Dashboard) -> None:
    first = await dashboard.paid_request("/weather/today")
    await dashboard.paid_request("/weather/tomorrow")
    await dashboard.paid_request("/maps/tile")
    unpaid = await dashboard.unpaid_challenge("/maps/other")

    status, page, response = await dashboard.get("/", **AUTH)
    assert status == 200
    assert response.content_type == "text/html"
    csp = response.headers["Content-Security-Policy"]
    nonce = re.fullmatch(r"default-src 'none'; style-src 'nonce-([^']+)'; img-src data:; .*", csp)
    assert nonce is not None
    assert f'<style nonce="{nonce.group(1)}">' in page
    assert "<script" not in page
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["Cache-Control"] == "no-store"
    # Nothing to load: no src, no stylesheet link, no URL but the SVG namespace and own links.
    assert " src=" not in page
    assert "<link" not in page
    assert set(re.findall(r"https?://[^\"' ]+", page)) == {"http://www.w3.org/2000/svg"}

    # The chart: one bar segment per service in the current hour, with its facts.
    bars = re.findall(r'<rect class="bar"[^>]*data-service="([^"]+)"[^>]*>', page)
    assert sorted(bars) == ["maps", "weather"]
    assert "weather: 2 paid, 42 sat" in page
    assert "maps: 1 paid, 5.5 sat" in page
    assert '<th class="num" id="revenue-total">47.5</th>' in page
    # Invoices, newest first, with their states.
    assert page.index(unpaid.hex()[:16]) < page.index(first.hex()[:16])
    assert page.count('"state state-SETTLED"') == 3
    assert page.count('"state state-OPEN"') == 1
    assert "GET /weather/today" in page
    # Tokens per service and state, liquidity, no dead webhook, no credit account.
    assert 'id="tokens-table"' in page
    assert '<dd id="inbound-total">7,000,000 sat</dd>' in page
    assert '<dd id="inbound-largest">4,000,000 sat</dd>' in page
    assert 'id="webhooks-table-empty"' in page
    assert 'id="accounts-table-empty"' in page


async def test_range_and_service_are_chosen_by_query(dashboard: Dashboard) -> None:
    await dashboard.paid_request("/weather/today")
    await dashboard.paid_request("/maps/tile")

    _, hourly, _ = await dashboard.get("/", **AUTH)
    assert hourly.count('<rect class="bar"') == 2
    assert "Revenue, 48 hours, per hour" in hourly
    _, daily, _ = await dashboard.get("/?range=30d", **AUTH)
    assert "Revenue, 30 days, per day" in daily
    assert daily.count('<rect class="bar"') == 2
    assert 'href="/?range=48h"' in daily  # the links keep the other choice
    _, maps, _ = await dashboard.get("/?range=30d&service=maps", **AUTH)
    assert re.findall(r'data-service="([^"]+)"', maps) == ["maps"]
    assert 'href="/?range=30d&amp;service=weather"' in maps  # the other service, offered

    status, body, _ = await dashboard.get("/?range=1y", **AUTH)
    assert status == 400
    assert "range must be one of 48h, 30d" in body
    status, body, _ = await dashboard.get("/api/revenue?service=%1b%5b31m", **AUTH)
    assert status == 400
    assert "service must be printable" in body


async def test_an_empty_period_says_so(dashboard: Dashboard) -> None:
    status, page, _ = await dashboard.get("/", **AUTH)
    assert status == 200
    assert "No settled invoices in this period" in page
    assert 'id="invoices-table-empty"' in page
    assert 'id="tokens-table-empty"' in page


async def test_revenue_outside_the_range_is_left_out(dashboard: Dashboard) -> None:
    await dashboard.paid_request("/weather/today")
    dashboard.gateway.clock.advance(3 * 86_400)  # the hour chart no longer reaches it

    _, hourly, _ = await dashboard.get("/api/revenue?range=48h", **AUTH)
    assert hourly["buckets"] == []
    _, daily, _ = await dashboard.get("/api/revenue?range=30d", **AUTH)
    assert [bucket["amount_msat"] for bucket in daily["buckets"]] == [21_000]


async def test_client_chosen_text_is_escaped(dashboard: Dashboard) -> None:
    store = dashboard.gateway.store
    now = dashboard.gateway.clock.now()
    await store.add_invoice(
        InvoiceRecord(
            payment_hash=PaymentHash(b"\x01" * 32),
            payment_request="lnbcrt1fake",
            amount_msat=Msat(1000),
            token_id=b"\x02" * 32,
            service="weather",
            method="GET",
            path='/weather/<script>alert("x")</script>\x1b[31m\u202e',
            state=InvoiceState.OPEN,
            created_at=now,
            expires_at=now + 600,
            add_index=1,
        )
    )
    _, page, _ = await dashboard.get("/", **AUTH)
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;\\x1b[31m\\u202e" in page


# --- JSON ----------------------------------------------------------------------------------


async def test_json_endpoints_give_the_same_data(dashboard: Dashboard) -> None:
    weather = await dashboard.paid_request("/weather/today")
    await dashboard.paid_request("/maps/tile")
    now = dashboard.gateway.clock.now()
    hour = int(now // 3600) * 3600

    status, revenue, _ = await dashboard.get("/api/revenue", **AUTH)
    assert status == 200
    assert revenue == {
        "range": "48h",
        "bucket_seconds": 3600,
        "since": hour - 47 * 3600,
        "service": None,
        "buckets": [
            {"start": hour, "service": "maps", "settled": 1, "amount_msat": 5500},
            {"start": hour, "service": "weather", "settled": 1, "amount_msat": 21000},
        ],
    }
    _, invoices, _ = await dashboard.get("/api/invoices", **AUTH)
    assert [entry["state"] for entry in invoices["invoices"]] == ["SETTLED", "SETTLED"]
    assert invoices["invoices"][1]["payment_hash"] == weather.hex()
    assert {(t["service"], t["state"], t["count"]) for t in invoices["totals"]} == {
        ("maps", "SETTLED", 1),
        ("weather", "SETTLED", 1),
    }
    _, accounts, _ = await dashboard.get("/api/accounts", **AUTH)
    assert accounts["accounts"] == []
    # The same keys as `l402-gateway accounts --json` (one function: gateway.reports).
    assert accounts["totals"] == credit_totals_json(await dashboard.gateway.store.credit_totals())
    assert accounts["totals"]["accounts"] == 0
    assert accounts["totals"]["reconciles"] is True
    _, liquidity, _ = await dashboard.get("/api/liquidity", **AUTH)
    assert liquidity == {
        "known": True,
        "total_msat": 7_000_000_000,
        "largest_msat": 4_000_000_000,
        "channels": 2,
    }
    _, webhooks, _ = await dashboard.get("/api/webhooks", **AUTH)
    assert webhooks == {"dead": []}


async def test_dead_webhook_deliveries_are_listed(dashboard: Dashboard) -> None:
    store = dashboard.gateway.store
    clock = dashboard.gateway.clock
    subscriptions = {"orders": frozenset({"invoice.settled"})}
    await store.fan_out_webhook_events(subscriptions, clock.now(), 100)  # its cursor starts
    await dashboard.paid_request("/weather/today")
    assert await store.fan_out_webhook_events(subscriptions, clock.now(), 100) == 1
    pending = await store.next_webhook_delivery("orders")
    assert pending is not None
    delivery, _event = pending
    dead = await store.record_webhook_attempt(
        delivery.event_id,
        "orders",
        delivered=False,
        now=clock.now(),
        status=500,
        error="answered 500",
        max_attempts=1,  # given up on at once
        initial_backoff=1.0,
        max_backoff=1.0,
    )
    assert dead is not None
    assert dead.state is DeliveryState.DEAD

    _, webhooks, _ = await dashboard.get("/api/webhooks", **AUTH)
    # The same keys as `l402-gateway webhooks list --json` (one function: gateway.reports).
    assert webhooks["dead"] == [
        {
            "event_id": delivery.event_id,
            "endpoint": "orders",
            "type": "invoice.settled",
            "state": "DEAD",
            "attempts": 1,
            "next_attempt_at": dead.next_attempt_at,
            "last_status": 500,
            "last_error": "answered 500",
            "delivered_at": None,
        }
    ]
    _, page, _ = await dashboard.get("/", **AUTH)
    assert 'id="webhooks-table"' in page
    assert "answered 500" in page


# --- when the data is not there ------------------------------------------------------------


async def test_before_the_gateway_runs_it_answers_503() -> None:
    async with running(AdminSlot()) as dashboard:
        status, body, response = await dashboard.get("/", **AUTH)
        assert status == 503
        assert response.headers["Retry-After"] == "1"
        assert "not running" in body


class _BrokenStore(MemoryStore):
    async def list_invoices(
        self,
        state: InvoiceState | None = None,
        limit: int | None = None,
        service: str | None = None,
    ) -> list[InvoiceRecord]:
        raise errors.StoreError("database is locked")


async def test_a_failing_store_answers_503() -> None:
    async with running(AdminSlot(store=_BrokenStore())) as dashboard:
        status, body, _ = await dashboard.get("/", **AUTH)
        assert status == 503
        assert "the store is unavailable" in body
        assert "locked" not in body


async def test_liquidity_not_measured_or_failing_is_said() -> None:
    async def failing() -> Liquidity:
        raise errors.BackendUnavailable("node down")

    async with running() as dashboard:
        dashboard.slot.liquidity = None
        _, page, _ = await dashboard.get("/", **AUTH)
        assert "Unknown: not measured by this gateway" in page
        dashboard.slot.liquidity = failing
        _, page, _ = await dashboard.get("/", **AUTH)
        assert "Unknown: the node could not say: BackendUnavailable" in page
        _, body, _ = await dashboard.get("/api/liquidity", **AUTH)
        assert body == {"known": False, "detail": "the node could not say: BackendUnavailable"}

        async def unknown() -> Liquidity:
            return Liquidity(Msat(0), Msat(0), 0, known=False, reason=NEEDS_PERMISSION)

        dashboard.slot.liquidity = unknown
        _, page, _ = await dashboard.get("/", **AUTH)
        assert "Unknown: ListChannels needs offchain:read" in page

        async def down() -> Liquidity:
            return Liquidity(Msat(0), Msat(0), 0, known=False, reason="the node is unavailable")

        dashboard.slot.liquidity = down  # not a missing permission: not said to be one
        _, page, _ = await dashboard.get("/", **AUTH)
        assert "Unknown: the node is unavailable" in page
        assert "offchain:read" not in page
        _, body, _ = await dashboard.get("/api/liquidity", **AUTH)
        assert body == {"known": False, "detail": "the node is unavailable"}
