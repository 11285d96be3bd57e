"""``/metrics`` over HTTP, over the fakes: the proxy's own path (answered before pricing,
never forwarded) and the listener of its own; what a paying client's requests show."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.metrics import PrometheusMeter
from gateway.ports import MetricsSlot, Msat
from gateway.pricing import Rule
from gateway.web.metrics import metrics_listener
from gateway.web.proxy import build_proxy
from tests.fakes import FakeGateway
from tests.unit.test_metrics import _sample

# Every path is priced: a /metrics answered 200 was not.
EVERYTHING = Rule("/*", price_msat=Msat(1_000), service="all")


@dataclass
class Running:
    gateway: FakeGateway
    session: aiohttp.ClientSession
    base: str
    upstream_hits: list[str]
    slot: MetricsSlot


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def running(
    *, path: str = "/metrics", listen_port: int | None = None
) -> AsyncIterator[Running]:
    gateway = FakeGateway([EVERYTHING])
    meter = PrometheusMeter(gateway.store.invoice_totals)
    gateway.options["meter"] = meter
    slot = MetricsSlot(meter=meter, exposition=meter.exposition)
    hits: list[str] = []

    async def anything(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(text="upstream")

    upstream = web.Application()
    upstream.router.add_route("*", "/{tail:.*}", anything)
    async with TestServer(upstream) as backend_server:
        app = build_proxy(
            str(backend_server.make_url("/")), gateway, metrics=slot, metrics_path=path
        )
        if listen_port is not None:
            app.cleanup_ctx.append(metrics_listener("127.0.0.1", listen_port, slot))
        async with TestServer(app) as proxy_server, aiohttp.ClientSession() as session:
            base = str(proxy_server.make_url("")).rstrip("/")
            yield Running(gateway, session, base, hits, slot)


async def _scrape(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url) as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        return await response.text()


async def test_the_metrics_path_is_answered_by_the_gateway_and_counts_a_paid_flow() -> None:
    async with running() as proxy:
        session = proxy.session
        async with session.get(proxy.base + "/data") as response:
            assert response.status == 402
            challenge = await response.json()
        authorization = proxy.gateway.pay(challenge)
        for _ in range(2):
            async with session.get(
                proxy.base + "/data", headers={"Authorization": authorization}
            ) as response:
                assert response.status == 200
        text = await _scrape(session, proxy.base + "/metrics")
        assert proxy.upstream_hits == ["/data", "/data"]  # /metrics never went upstream
        assert _sample(text, "l402_challenges_issued_total", service="all") == 1
        assert _sample(text, "l402_paid_requests_total", service="all") == 2
        assert _sample(text, "l402_upstream_request_duration_seconds_count") == 2
        assert _sample(text, "l402_invoices_issued", service="all") == 1
        async with session.post(proxy.base + "/metrics") as response:
            assert response.status == 405


async def test_every_response_is_counted_by_status_the_proxys_own_refusals_too() -> None:
    async with running() as proxy:
        session = proxy.session
        async with session.get(proxy.base + "/data") as response:
            assert response.status == 402
        # Refused by the proxy itself, before the core: an encoded separator.
        async with session.get(proxy.base + "/a%2Fb") as response:
            assert response.status == 400
        async with session.get(proxy.base + "/.well-known/l402/live") as response:
            assert response.status == 200
        await _scrape(session, proxy.base + "/metrics")
        text = await _scrape(session, proxy.base + "/metrics")
        assert _sample(text, "l402_responses_total", status="402") == 1
        assert _sample(text, "l402_responses_total", status="400") == 1
        assert _sample(text, "l402_responses_total", status="200") == 1  # scrapes not counted


async def test_an_unreachable_upstream_is_counted_as_an_upstream_error() -> None:
    gateway = FakeGateway([Rule("/free/*")])
    meter = PrometheusMeter(gateway.store.invoice_totals)
    slot = MetricsSlot(meter=meter, exposition=meter.exposition)
    closed = f"http://127.0.0.1:{_free_port()}"
    app = build_proxy(closed, gateway, metrics=slot, metrics_path="/metrics")
    async with TestServer(app) as server, aiohttp.ClientSession() as session:
        async with session.get(server.make_url("/free/x")) as response:
            assert response.status == 502
        text = await _scrape(session, str(server.make_url("/metrics")))
    assert _sample(text, "l402_upstream_errors_total", error="connection") == 1


async def test_the_listener_of_its_own_serves_metrics_and_nothing_else() -> None:
    port = _free_port()
    async with running(path="", listen_port=port) as proxy:
        session = proxy.session
        async with session.get(proxy.base + "/data") as response:
            assert response.status == 402
        text = await _scrape(session, f"http://127.0.0.1:{port}/metrics")
        assert _sample(text, "l402_challenges_issued_total", service="all") == 1
        async with session.get(f"http://127.0.0.1:{port}/data") as response:
            assert response.status == 404
        # Without a path on the main listener, /metrics there is an ordinary priced path.
        async with session.get(proxy.base + "/metrics") as response:
            assert response.status == 402


async def test_metrics_are_503_while_the_gateway_is_not_running() -> None:
    async with running() as proxy:
        proxy.slot.exposition = None
        async with proxy.session.get(proxy.base + "/metrics") as response:
            assert response.status == 503
