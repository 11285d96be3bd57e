"""Method overrides on the aiohttp and ASGI middlewares: a token paid for one method must not
open a route its override would make the application read as another, priced differently,
not even after the cheaper request was cached as allowed."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from yarl import URL

from gateway.ports import Msat
from gateway.pricing import Rule
from gateway.web.aiohttp import setup_l402
from gateway.web.asgi import L402Middleware
from tests.fakes import FakeGateway
from tests.integration.asgi_helpers import uvicorn_serving

DOC = "/api/doc"
RULES = (
    Rule(DOC, methods=frozenset({"GET"}), price_msat=Msat(10_000), service="read"),
    Rule(DOC, methods=frozenset({"POST"}), price_msat=Msat(1_000), service="write"),
)
Serve = Callable[[FakeGateway], contextlib.AbstractAsyncContextManager[str]]


@contextlib.asynccontextmanager
async def aiohttp_app(gateway: FakeGateway) -> AsyncIterator[str]:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"method": request.method})

    app = web.Application()
    app.router.add_route("*", DOC, handler)
    setup_l402(app, gateway)
    async with TestServer(app) as server:
        yield str(server.make_url(""))


@contextlib.asynccontextmanager
async def asgi_app(gateway: FakeGateway) -> AsyncIterator[str]:
    async def handler(request: Request) -> JSONResponse:
        return JSONResponse({"method": request.method})

    app = Starlette(routes=[Route(DOC, handler, methods=["GET", "POST"])])
    async with uvicorn_serving(L402Middleware(app, gateway)) as url:
        yield url


@pytest.mark.parametrize("serve", [aiohttp_app, asgi_app], ids=["aiohttp", "asgi"])
async def test_an_override_is_priced_even_after_the_request_was_allowed(serve: Serve) -> None:
    gateway = FakeGateway(RULES)
    async with serve(gateway) as base, aiohttp.ClientSession(base) as http:
        async with http.post(DOC) as response:
            assert response.status == 402
            write = {"Authorization": gateway.pay(await response.json(content_type=None))}
        for _ in range(2):  # the second answer comes from the allowed-request cache
            async with http.post(DOC, headers=write) as response:
                assert response.status == 200
        overrides: list[Callable[[], Awaitable[aiohttp.ClientResponse]]] = [
            lambda: http.post(DOC, headers={**write, "X-HTTP-Method-Override": "GET"}),
            lambda: http.post(DOC + "?_method=GET", headers=write),
            # Sent as written (yarl would decode the key): the ASGI scope has it raw.
            lambda: http.post(URL(f"{base}{DOC}?%5Fmethod=GET", encoded=True), headers=write),
            lambda: http.post(DOC + "?.method=GET", headers=write),  # PHP's _method
        ]
        for send in overrides:
            response = await send()
            assert response.status == 400, await response.text()
            assert "several priced routes" in (await response.json(content_type=None))["detail"]
            response.release()
