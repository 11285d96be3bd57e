"""Oversized requests against the aiohttp middleware, the ASGI middleware (under uvicorn) and
the reverse proxy, over the fakes: each gets a 4xx with a reason, never a 5xx, and the
server keeps answering.

Requests are written as raw bytes on a loopback socket; a body is streamed only until the
server answers, as a real client would stop when the server does.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
import pytest_asyncio
from aiohttp.test_utils import BaseTestServer, TestServer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway import l402
from gateway.examples import demo_api
from gateway.service import PaymentChallenge, RequestInfo
from gateway.web.aiohttp import setup_l402
from gateway.web.asgi import L402Middleware
from gateway.web.paywall import REDEEM_PATH
from gateway.web.proxy import build_proxy
from tests.demo_rules import ECHO, HEALTH, PREMIUM
from tests.fakes import FakeGateway
from tests.integration.asgi_helpers import uvicorn_serving

KiB = 1024
MiB = 1024 * KiB
BODY_LIMIT = 1 * MiB  # the aiohttp app's client_max_size and the proxy's max_body_bytes
HUGE_BODY = 32 * MiB
PRICED_GET = "/api/premium/fortune"
PRICED_POST = ECHO.pattern
RULES = (HEALTH, PREMIUM, ECHO)
PROBLEM_JSON = "application/problem+json"


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def detail(self) -> str:
        assert self.headers.get("content-type", "").startswith(PROBLEM_JSON), self
        detail = json.loads(self.body)["detail"]
        assert isinstance(detail, str)
        return detail


@dataclass
class Oversized:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: int = 0  # bytes of body to offer
    chunked: bool = False


async def _send_body(writer: asyncio.StreamWriter, request: Oversized) -> None:
    chunk = bytes(256 * KiB)
    sent = 0
    with contextlib.suppress(ConnectionError):
        while sent < request.body:
            piece = chunk[: request.body - sent]
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if request.chunked else piece)
            await writer.drain()
            sent += len(piece)
        if request.chunked:
            writer.write(b"0\r\n\r\n")
            await writer.drain()


async def exchange(port: int, request: Oversized) -> Response:
    """Send ``request`` as raw bytes; the response, read while the body is still going out."""
    head = [f"{request.method} {request.target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    head += [f"{name}: {value}" for name, value in request.headers]
    if request.chunked:
        head.append("Transfer-Encoding: chunked")
    elif request.body:
        head.append(f"Content-Length: {request.body}")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
    sending = asyncio.create_task(_send_body(writer, request))
    try:
        async with asyncio.timeout(30):
            status_line = await reader.readline()
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            length = headers.get("content-length")
            body = await (reader.readexactly(int(length)) if length else reader.read())
    finally:
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sending
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return Response(int(status_line.split()[1]), headers, body)


@dataclass
class Target:
    name: str
    port: int
    paid_post: str  # an Authorization value that opens PRICED_POST


async def _paid(gateway: FakeGateway) -> str:
    assert gateway.service is not None
    challenge = await gateway.service.authorize(RequestInfo("POST", PRICED_POST, "setup"))
    assert isinstance(challenge, PaymentChallenge)
    return gateway.pay(dataclasses.asdict(challenge))


def _port(server: BaseTestServer) -> int:
    assert server.port is not None
    return server.port


@contextlib.asynccontextmanager
async def _aiohttp() -> AsyncIterator[Target]:
    gateway = FakeGateway(RULES)
    app = demo_api(client_max_size=BODY_LIMIT)
    setup_l402(app, gateway)
    async with TestServer(app) as server:
        yield Target("aiohttp", _port(server), await _paid(gateway))


@contextlib.asynccontextmanager
async def _proxy() -> AsyncIterator[Target]:
    gateway = FakeGateway(RULES)
    async with (
        TestServer(demo_api(client_max_size=HUGE_BODY)) as upstream,
        TestServer(
            build_proxy(str(upstream.make_url("")), gateway, max_body_bytes=BODY_LIMIT)
        ) as server,
    ):
        yield Target("proxy", _port(server), await _paid(gateway))


async def _echo(request: Request) -> JSONResponse:
    return JSONResponse({"bytes": len(await request.body())})


@contextlib.asynccontextmanager
async def _asgi() -> AsyncIterator[Target]:
    gateway = FakeGateway(RULES)
    app = Starlette(
        routes=[
            Route("/health", _echo),
            Route(PRICED_GET, _echo),
            Route(PRICED_POST, _echo, methods=["POST"]),
        ]
    )
    async with uvicorn_serving(L402Middleware(app, gateway)) as url:
        yield Target("asgi", int(url.rsplit(":", 1)[1]), await _paid(gateway))


@pytest_asyncio.fixture(scope="module", params=["aiohttp", "asgi", "proxy"])
async def target(request: pytest.FixtureRequest) -> AsyncIterator[Target]:
    servers = {"aiohttp": _aiohttp, "asgi": _asgi, "proxy": _proxy}
    async with servers[request.param]() as served:
        yield served


PREIMAGE_HEX = "00" * 32
TINY = l402.encode_b64(l402.mint(b"key", b"id", []))  # parses; any verifier refuses it
# Under 64 KiB per request, so the whole head reaches the server in one read: uvicorn's h11
# refuses only an *incomplete* head over 16 KiB, and its reset races the 400.
BIG = 48 * KiB
FLOODS: dict[str, Callable[[], Oversized]] = {
    "48 KiB Authorization": lambda: Oversized(
        "GET", PRICED_GET, [("Authorization", f"L402 {'A' * BIG}:{PREIMAGE_HEX}")]
    ),
    "48 KiB cookie": lambda: Oversized("GET", PRICED_GET, [("Cookie", "L402=" + "A" * BIG)]),
    "48 KiB path": lambda: Oversized("GET", "/api/premium/" + "a" * BIG, []),
    "4000 headers": lambda: Oversized("GET", PRICED_GET, [(f"X-{i}", "x") for i in range(4000)]),
    "150 Authorization headers": lambda: Oversized(
        "GET", PRICED_GET, [("Authorization", f"L402 {TINY}:{i:064x}") for i in range(150)]
    ),
}
# aiohttp's parser (the middleware's and the proxy's server) stops them all with a 400; the
# ASGI server lets them through to the middleware, which answers them itself.
ASGI_ANSWERS = {
    "48 KiB Authorization": (401, "authorization header is too large"),
    "48 KiB cookie": (402, "payment required"),
    "48 KiB path": (402, "payment required"),
    "4000 headers": (402, "payment required"),
    "150 Authorization headers": (401, "several L402 credentials in one request"),
}


@pytest.mark.parametrize("case", sorted(FLOODS))
async def test_header_and_url_floods_get_a_4xx_with_a_reason(target: Target, case: str) -> None:
    response = await exchange(target.port, FLOODS[case]())
    if target.name == "asgi":
        assert (response.status, response.detail()) == ASGI_ANSWERS[case]
    else:
        assert response.status == 400
        assert response.body.strip(), "no reason given"
    await _still_serving(target)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_huge_body_on_a_priced_route_without_credential_is_402(
    target: Target, chunked: bool
) -> None:
    response = await exchange(
        target.port, Oversized("POST", PRICED_POST, [], HUGE_BODY, chunked=chunked)
    )
    assert response.status == 402
    assert response.detail() == "payment required"
    await _still_serving(target)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_huge_body_on_redeem_is_413(target: Target, chunked: bool) -> None:
    headers = [("Content-Type", "application/json")]
    response = await exchange(
        target.port, Oversized("POST", REDEEM_PATH, headers, HUGE_BODY, chunked=chunked)
    )
    assert response.status == 413
    assert response.detail() == "body over 8192 bytes"
    await _still_serving(target)


# Not the ASGI middleware: there the application decides how much body it reads.
@pytest.mark.parametrize("target", ["aiohttp", "proxy"], indirect=True)
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_huge_body_with_a_valid_token_is_413(target: Target, chunked: bool) -> None:
    headers = [("Authorization", target.paid_post)]
    response = await exchange(
        target.port, Oversized("POST", PRICED_POST, headers, HUGE_BODY, chunked=chunked)
    )
    assert response.status == 413
    assert response.body.strip(), "no reason given"
    await _still_serving(target)


async def _still_serving(target: Target) -> None:
    response = await exchange(target.port, Oversized("GET", "/health", []))
    assert response.status == 200
    paid = await exchange(
        target.port, Oversized("POST", PRICED_POST, [("Authorization", target.paid_post)], 5)
    )
    assert paid.status == 200, paid
