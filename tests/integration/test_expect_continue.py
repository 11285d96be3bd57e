"""``Expect: 100-continue`` on all three front ends, with a raw socket client: a request that
will not be served gets its final answer (402, 413, 429) first, so the client never uploads
the body for nothing; an allowed one gets 100 Continue, then its response."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.ports import Msat
from gateway.pricing import Rule
from gateway.web.aiohttp import TOKEN, setup_l402
from gateway.web.asgi import L402Middleware
from tests.fakes import FakeGateway
from tests.integration.asgi_helpers import Harness, uvicorn_serving
from tests.integration.test_proxy import RULES as PROXY_RULES
from tests.integration.test_proxy import Upstream, proxy_for, upstream_app

PROBLEM_JSON = "application/problem+json"
BODY = b"b" * 1000


class Exchange:
    """One raw connection: the head goes first, the body only after 100 Continue."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def status(self) -> bytes:
        async with asyncio.timeout(5):
            return await self.reader.readline()

    async def response(self) -> tuple[bytes, bytes]:
        """The rest of a response: its header block and its body."""
        async with asyncio.timeout(5):
            head = await self.reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            return head, await self.reader.readexactly(length)


@contextlib.asynccontextmanager
async def exchange(
    port: int, path: str, headers: dict[str, str] | None = None, length: int = len(BODY)
) -> AsyncIterator[Exchange]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [f"POST {path} HTTP/1.1", "Host: x", f"Content-Length: {length}"]
    lines += ["Expect: 100-continue", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    try:
        yield Exchange(reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def refused_first(port: int, path: str, status: int, **options: Any) -> dict[str, Any]:
    """The first line is the final ``status``, the connection closes after it; its body."""
    async with exchange(port, path, **options) as http:
        assert await http.status() == f"HTTP/1.1 {status} ".encode() + _phrase(status) + b"\r\n"
        head, body = await http.response()
        assert b"\r\nconnection: close\r\n" in head.lower(), head
        problem: dict[str, Any] = json.loads(body)
        return problem


async def continued(port: int, path: str, authorization: str | None = None) -> bytes:
    """100 Continue first; then the body goes and the final response's body comes back."""
    headers = {"Authorization": authorization} if authorization else {}
    async with exchange(port, path, headers) as http:
        assert await http.status() == b"HTTP/1.1 100 Continue\r\n"
        assert await http.status() == b"\r\n"
        http.writer.write(BODY)
        assert (await http.status()).startswith(b"HTTP/1.1 200 ")
        return (await http.response())[1]


def _phrase(status: int) -> bytes:
    # Python's own phrase, as aiohttp writes it: 413 is "Content Too Large" from Python 3.13
    # (RFC 9110), "Request Entity Too Large" before.
    return HTTPStatus(status).phrase.encode()


# --- the aiohttp middleware ----------------------------------------------------------------

RULES = (Rule("/api/*", price_msat=Msat(2_000), service="api"), Rule("/sub/*", price_msat=Msat(1)))


async def received(request: web.Request) -> web.Response:
    token = request.get(TOKEN)
    return web.json_response(
        {"bytes": len(await request.read()), "service": token.service if token else None}
    )


def middleware_app(gateway: FakeGateway) -> web.Application:
    app = web.Application()
    app.router.add_post("/api/upload", received)
    app.router.add_post("/free/upload", received)
    sub = web.Application()
    sub.router.add_post("/upload", received)
    app.add_subapp("/sub", sub)
    setup_l402(app, gateway)
    return app


async def test_aiohttp_middleware_answers_402_before_100_continue() -> None:
    gateway = FakeGateway(RULES)
    async with TestClient(TestServer(middleware_app(gateway))) as client:
        port = client.port
        assert port is not None
        problem = await refused_first(port, "/api/upload", 402)
        assert problem["amount_msat"] == 2_000
        assert len(gateway.backend.invoices) == 1  # decided once, before 100 Continue
        # A route of a sub-application too.
        assert (await refused_first(port, "/sub/upload", 402))["amount_msat"] == 1
        # Allowed: a free route, and a paid request, get 100 Continue.
        assert json.loads(await continued(port, "/free/upload")) == {
            "bytes": len(BODY),
            "service": None,
        }
        authorization = gateway.pay(problem)
        paid = json.loads(await continued(port, "/api/upload", authorization))
        assert paid == {"bytes": len(BODY), "service": "api"}
        assert len(gateway.backend.invoices) == 2


# --- the reverse proxy ---------------------------------------------------------------------


async def test_proxy_answers_402_413_and_429_before_100_continue() -> None:
    hooks = Upstream(asyncio.Event(), asyncio.Event())
    gateway = FakeGateway(PROXY_RULES)
    async with TestServer(upstream_app(hooks)) as upstream:
        proxy = await proxy_for(
            upstream, gateway, max_body_bytes=2000, unpaid_requests_per_client=1
        )
        async with proxy as client:
            port = client.port
            assert port is not None
            problem = await refused_first(port, "/api/echo", 402)
            # Refused before any price, and before 100 Continue: no invoice for it.
            assert "encoded" in (await refused_first(port, "/api%2Fecho", 400))["detail"]
            assert len(gateway.backend.invoices) == 1
            assert (await refused_first(port, "/public/echo", 413, length=2001))["status"] == 413
            assert json.loads(await continued(port, "/public/echo"))["bytes"] == len(BODY)
            authorization = gateway.pay(problem)
            assert json.loads(await continued(port, "/api/echo", authorization))["bytes"] == len(
                BODY
            )
            # One unpaid request under way (its body not yet sent) is this client's share.
            async with exchange(port, "/api/upload", length=10) as slow:
                assert await slow.status() == b"HTTP/1.1 100 Continue\r\n"
                assert await slow.status() == b"\r\n"
                slow.writer.write(b"12345")
                await asyncio.wait_for(hooks.first_chunk_received.wait(), 5)
                assert (await refused_first(port, "/public/echo", 429))["status"] == 429
                slow.writer.write(b"67890")
                assert (await slow.status()).startswith(b"HTTP/1.1 200 ")


# --- the ASGI middleware under uvicorn -----------------------------------------------------


async def receiving(request: Request) -> JSONResponse:
    token = request.state.l402_token
    body = await request.body()  # uvicorn sends 100 Continue on this first receive()
    return JSONResponse({"bytes": len(body), "service": token.service if token else None})


@contextlib.asynccontextmanager
async def uvicorn_port(harness: Harness) -> AsyncIterator[int]:
    starlette = Starlette(routes=[Route("/paid/upload", receiving, methods=["POST"])])
    async with uvicorn_serving(L402Middleware(starlette, harness.gateway)) as url:
        port = urlsplit(url).port
        assert port is not None
        yield port


async def test_asgi_middleware_answers_402_before_100_continue() -> None:
    harness = Harness()
    async with uvicorn_port(harness) as port:
        async with exchange(port, "/paid/upload") as http:
            # The middleware decides before the app's first receive(): no 100 Continue.
            assert await http.status() == b"HTTP/1.1 402 Payment Required\r\n"
            _head, body = await http.response()
            problem = json.loads(body)
        preimage = harness.backend.pay(bytes.fromhex(problem["payment_hash"]))
        authorization = f"L402 {problem['macaroon']}:{preimage.hex()}"
        paid = json.loads(await continued(port, "/paid/upload", authorization))
        assert paid == {"bytes": len(BODY), "service": "weather"}
