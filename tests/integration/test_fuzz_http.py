"""Fuzzed requests through the three ways to mount the gateway, over the fakes: never a 5xx.

The aiohttp middleware and the reverse proxy get raw bytes over a loopback socket (so the
server's own HTTP parser is in the path, and nothing client-side tidies the request up); the
ASGI middleware is called in-process with the scope a server would build. The fuzzed parts
are the method, the request target, the ``Authorization`` values, the ``Cookie`` values
(mutations of a genuine paid credential as well as garbage) and ``Accept``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import unquote

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer
from hypothesis import given
from hypothesis import strategies as st

from gateway.examples import demo_api
from gateway.service import PaymentChallenge, RequestInfo
from gateway.web.aiohttp import setup_l402
from gateway.web.asgi import L402Middleware, Message, Receive, Scope, Send
from gateway.web.proxy import build_proxy
from tests.demo_rules import ECHO, HEALTH, PREMIUM_READ
from tests.fakes import FakeGateway
from tests.unit.test_fuzz import EDITS, apply_edits, examples

PRICED = "/api/premium/fortune"
RULES = (HEALTH, PREMIUM_READ, ECHO)

SEGMENTS = st.sampled_from(
    [
        *("api", "premium", "fortune", "echo", "health", ".well-known", "l402", "redeem"),
        *("", ".", "..", "%2e%2e", "%2F", "%00", "%", "%zz", "é", "*", "a;b", "~", "\\"),
    ]
)
TARGETS = st.one_of(
    st.lists(SEGMENTS, max_size=5).map(lambda parts: "/" + "/".join(parts)),
    st.tuples(st.sampled_from([PRICED, "/health"]), st.text(max_size=12)).map("?".join),
    st.sampled_from(["*", "http://other.example/api/echo", "//api/echo", ""]),
    st.text(max_size=20),
)
METHODS = st.one_of(
    st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "get"]),
    st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ-!#", min_size=1, max_size=8),
)
# A credential value: mutated from the genuine one (in the test), the genuine one, or garbage.
CREDENTIALS: st.SearchStrategy[tuple[str, object]] = st.one_of(
    st.tuples(st.just("mutate"), EDITS),
    st.tuples(st.just("genuine"), st.just([])),
    st.tuples(st.just("garbage"), st.text(max_size=60)),
)
ACCEPTS = st.sampled_from([None, "text/html", "application/json", "text/html;q=x, */*;q=2"])


@dataclass
class Fuzzed:
    method: str
    target: str
    authorization: list[tuple[str, object]]
    cookies: list[tuple[str, object]]
    accept: str | None
    body: bytes


REQUESTS = st.builds(
    Fuzzed,
    method=METHODS,
    target=TARGETS,
    authorization=st.lists(CREDENTIALS, max_size=2),
    cookies=st.lists(CREDENTIALS, max_size=2),
    accept=ACCEPTS,
    body=st.sampled_from([b"", b"{}", b'{"macaroon": "AgE"}', b"\xff" * 64]),
)

Headers = list[tuple[str, str]]
Sender = Callable[[str, str, Headers, bytes], Awaitable[int]]


@dataclass
class Mounted:
    send: Sender
    credential: str  # "<macaroon>:<hex preimage>" of a paid token for PRICED


def _value(kind: str, payload: object, credential: str) -> str:
    if kind == "garbage":
        assert isinstance(payload, str)
        return payload
    if kind == "genuine":
        return credential
    assert isinstance(payload, list)
    return apply_edits(credential, payload)


def _headers(request: Fuzzed, credential: str) -> Headers:
    headers = [
        ("Authorization", "L402 " + _value(kind, payload, credential))
        for kind, payload in request.authorization
    ]
    headers += [
        ("Cookie", "L402=" + _value(kind, payload, credential)) for kind, payload in request.cookies
    ]
    if request.accept is not None:
        headers.append(("Accept", request.accept))
    return headers


async def _raw_status(port: int, method: str, target: str, headers: Headers, body: bytes) -> int:
    """Send one request as raw bytes (CR and LF kept out of the fuzzed parts); its status."""

    def line(text: str) -> bytes:
        return text.replace("\r", " ").replace("\n", " ").encode("utf-8", "surrogatepass")

    head = [line(f"{method} {target} HTTP/1.1"), b"Host: 127.0.0.1", b"Connection: close"]
    head += [line(f"{name}: {value}") for name, value in headers]
    head.append(b"Content-Length: %d" % len(body))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    version, status, *_ = status_line.split(b" ", 2)
    assert version.startswith(b"HTTP/1."), status_line
    return int(status)


async def _pay(send: Sender, gateway: FakeGateway) -> str:
    """A paid credential for PRICED, checked to open it through ``send``."""
    assert gateway.service is not None
    challenge = await gateway.service.authorize(RequestInfo("GET", PRICED, "setup"))
    assert isinstance(challenge, PaymentChallenge)
    authorization = gateway.pay(dataclasses.asdict(challenge))
    assert await send("GET", PRICED, [("Authorization", authorization)], b"") == 200
    return authorization.removeprefix("L402 ")


@contextlib.asynccontextmanager
async def _aiohttp_target() -> AsyncIterator[tuple[Sender, FakeGateway]]:
    gateway = FakeGateway(RULES)
    app = demo_api()
    setup_l402(app, gateway)
    async with TestServer(app) as server:
        port = server.port
        assert port is not None
        yield lambda m, t, h, b: _raw_status(port, m, t, h, b), gateway


@contextlib.asynccontextmanager
async def _proxy_target() -> AsyncIterator[tuple[Sender, FakeGateway]]:
    gateway = FakeGateway(RULES)
    async with (
        TestServer(demo_api()) as upstream,
        TestServer(build_proxy(str(upstream.make_url("")), gateway)) as proxy,
    ):
        port = proxy.port
        assert port is not None
        yield lambda m, t, h, b: _raw_status(port, m, t, h, b), gateway


async def _asgi_app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return  # no lifespan support: the middleware answers it alone
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


@contextlib.asynccontextmanager
async def _asgi_target() -> AsyncIterator[tuple[Sender, FakeGateway]]:
    gateway = FakeGateway(RULES)
    middleware = L402Middleware(_asgi_app, gateway)
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    outbox: asyncio.Queue[Message] = asyncio.Queue()

    async def send_out(message: Message) -> None:
        await outbox.put(message)

    lifespan = asyncio.create_task(middleware({"type": "lifespan"}, inbox.get, send_out))
    await inbox.put({"type": "lifespan.startup"})
    assert (await outbox.get())["type"] == "lifespan.startup.complete"

    async def call(method: str, target: str, headers: Headers, body: bytes) -> int:
        raw_path, _, query = target.partition("?")
        scope: Scope = {
            "type": "http",
            "method": method,
            "path": unquote(raw_path),  # as uvicorn decodes it
            "raw_path": raw_path.encode("utf-8", "surrogatepass"),
            "query_string": query.encode("utf-8", "surrogatepass"),
            "root_path": "",
            "headers": [
                (name.lower().encode(), value.encode("utf-8", "surrogatepass"))
                for name, value in headers
            ],
            "client": ("127.0.0.1", 40000),
        }
        pending = [{"type": "http.request", "body": body, "more_body": False}]
        sent: list[Message] = []

        async def receive() -> Message:
            return pending.pop() if pending else {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            sent.append(message)

        await middleware(scope, receive, send)
        return int(sent[0]["status"])

    try:
        yield call, gateway
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        assert (await outbox.get())["type"] == "lifespan.shutdown.complete"
        await lifespan


TARGET_KINDS = {"aiohttp": _aiohttp_target, "asgi": _asgi_target, "proxy": _proxy_target}


@pytest_asyncio.fixture(scope="module", params=sorted(TARGET_KINDS))
async def mounted(request: pytest.FixtureRequest) -> AsyncIterator[Mounted]:
    async with TARGET_KINDS[request.param]() as (send, gateway):
        yield Mounted(send, await _pay(send, gateway))


@examples(150)
@given(request=REQUESTS)
async def test_fuzzed_requests_never_get_a_5xx(mounted: Mounted, request: Fuzzed) -> None:
    headers = _headers(request, mounted.credential)
    status = await mounted.send(request.method, request.target, headers, request.body)
    assert 200 <= status < 500, (status, request)
