"""Routes an aiohttp application sets up in less usual ways stay priced behind ``setup_l402``:
routes its startup handlers add, a request an application's middleware hands to another
route after the Expect decision, and sub-applications (the gateway set up once)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.errors import ConfigError
from gateway.ports import Msat
from gateway.pricing import Pricing, Rule, TrailingSlash
from gateway.web.aiohttp import setup_l402
from tests.demo_rules import PREMIUM_READ
from tests.fakes import FakeGateway

PREMIUM = b"PREMIUM-CONTENT"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def premium(request: web.Request) -> web.Response:
    return web.Response(body=PREMIUM)


async def free(request: web.Request) -> web.Response:
    return web.Response(text="free")


async def test_routes_added_by_startup_handlers_are_priced() -> None:
    app = web.Application()
    app.router.add_get("/api/premium/fortune", premium)

    async def register(app: web.Application) -> None:
        app.router.add_get("/api/premium/report", premium)

    async def context(app: web.Application) -> AsyncIterator[None]:
        app.router.add_get("/api/premium/context", premium)
        yield

    # Before setup_l402 and after it: aiohttp runs startup handlers after every cleanup
    # context, whatever the order they were added in.
    app.on_startup.append(register)
    setup_l402(app, FakeGateway((PREMIUM_READ,)))
    app.cleanup_ctx.append(context)
    async with TestClient(TestServer(app)) as client:
        for path in ("/api/premium/fortune", "/api/premium/report", "/api/premium/context"):
            response = await client.get(path)
            assert response.status == 402, path
            assert PREMIUM not in await response.read()


async def test_a_decision_made_before_100_continue_serves_only_its_own_request_line() -> None:
    """A middleware that hands the handler of another path a clone of the request (an alias)
    after the Expect decision: the clone is decided on its own path."""

    @web.middleware
    async def alias(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path != "/latest":
            return await handler(request)
        inner = request.clone(rel_url="/api/premium/fortune")
        match = await request.app.router.resolve(inner)
        response: web.StreamResponse = await match.handler(inner)
        return response

    app = web.Application(middlewares=[alias])
    app.router.add_get("/api/premium/fortune", premium)
    app.router.add_get("/{tail:.*}", free)  # a free fallback the alias path resolves to first
    setup_l402(app, FakeGateway((PREMIUM_READ,)))
    async with TestClient(TestServer(app)) as client:
        assert client.port is not None
        assert (await client.get("/latest")).status == 402
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        head = "GET /latest HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nConnection: close"
        writer.write(f"{head}\r\n\r\n".encode())
        response = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    assert PREMIUM not in response
    final = response.split(b"\r\n\r\n", 1)[1] if response.startswith(b"HTTP/1.1 100") else response
    assert final.startswith(b"HTTP/1.1 402 "), response


async def test_setup_on_both_an_application_and_its_sub_application_is_refused() -> None:
    api = web.Application()
    api.router.add_get("/premium/fortune", premium)
    setup_l402(api, FakeGateway((PREMIUM_READ,)))
    app = web.Application()
    setup_l402(app, FakeGateway((Rule("/shop/*", price_msat=Msat(1_000)),)))
    app.add_subapp("/api", api)
    with pytest.raises(ConfigError, match="sub-applications"):
        async with TestServer(app):
            pass


async def test_a_sub_application_priced_by_the_main_one_alone_is_priced() -> None:
    api = web.Application()
    api.router.add_get("/premium/fortune", premium)
    app = web.Application()
    app.add_subapp("/api", api)
    setup_l402(app, FakeGateway((PREMIUM_READ,)))
    async with TestClient(TestServer(app)) as client:
        assert (await client.get("/api/premium/fortune")).status == 402


@pytest.mark.parametrize("separator", ["%2F", "%2f", "%5C"])
async def test_an_encoded_separator_the_router_keeps_is_refused(separator: str) -> None:
    """aiohttp routes ``/api/7%2Fpreview`` to ``/api/{id}`` (one segment, the priced
    route) while its decoded path matches the free ``/api/*/preview``: refused, with the
    paying client's repeat (a cached decision for the decoded path) too."""
    app = web.Application()
    app.router.add_get("/api/{id}", premium)
    app.router.add_get("/api/{id}/preview", free)
    gateway = FakeGateway(())
    # Trailing slashes significant, as aiohttp routes them.
    gateway.pricing = Pricing(
        (Rule("/api/*/preview"), Rule("/api/*", price_msat=Msat(1_000))),
        trailing_slash=TrailingSlash.SIGNIFICANT,
    )
    setup_l402(app, gateway)
    async with TestClient(TestServer(app)) as client:
        for _ in range(2):  # the second: after the decoded path's free decision was cached
            assert (await client.get("/api/7/preview")).status == 200
            response = await client.get(f"/api/7{separator}preview")
            assert response.status == 400
            assert "encoded '/'" in (await response.json())["detail"]
            assert PREMIUM not in await response.read()
        assert (await client.get("/api/7")).status == 402
        assert (await client.get("/api/seven%20days/preview")).status == 200
