"""The reverse proxy on a loopback port in front of demo_api() on another, over the fakes."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import BaseTestServer, TestClient, TestServer

from gateway.cli.serve import MalformedRequestLog
from gateway.examples import demo_api
from gateway.web.proxy import build_proxy
from tests.demo_rules import ECHO, HEALTH, PREMIUM_READ, QUOTE
from tests.fakes import FakeGateway
from tests.integration.test_aiohttp_middleware import raw_get

PROBLEM_JSON = "application/problem+json"
TIMEOUT = 5.0
MiB = 1024 * 1024
RULES = (HEALTH, PREMIUM_READ, ECHO, QUOTE)
Client = TestClient[web.Request, web.Application]


@dataclass
class Upstream:
    """Hooks of the extra upstream routes that let a test see streaming happen."""

    first_chunk_received: asyncio.Event
    first_chunk_read: asyncio.Event


def upstream_app(hooks: Upstream) -> web.Application:
    app = demo_api(client_max_size=16 * MiB)

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {"bytes": len(body), "headers": [[k, v] for k, v in request.headers.items()]}
        )

    async def status(request: web.Request) -> web.Response:
        response = web.Response(
            status=int(request.match_info["code"]),
            reason="Custom Reason",
            text="body of the status page",
            headers={
                "X-Custom": "kept",
                "Keep-Alive": "timeout=5",
                "X-Hop": "dropped",
                "Location": "/elsewhere",
            },
        )
        response.headers["Connection"] = "X-Hop"
        response.headers.add("Set-Cookie", "a=1")
        response.headers.add("Set-Cookie", "b=2")
        return response

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        await response.write(b"first chunk;")
        await asyncio.wait_for(hooks.first_chunk_read.wait(), TIMEOUT)
        await response.write(b"second chunk")
        await response.write_eof()
        return response

    async def upload(request: web.Request) -> web.Response:
        first = await request.content.readany()
        hooks.first_chunk_received.set()
        rest = await request.read()
        return web.json_response({"bytes": len(first) + len(rest)})

    async def broken(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": request.match_info["length"]})
        await response.prepare(request)
        await response.write(b"x" * 10)
        assert request.transport is not None
        request.transport.close()  # the upstream dies mid-body
        return response

    async def login(_request: web.Request) -> web.Response:
        response = web.Response(text="welcome")
        response.set_cookie("session", "alice-only")
        return response

    app.router.add_route("*", "/public/echo", echo)
    app.router.add_get("/public/login", login)
    app.router.add_get("/api/broken/{length}", broken)
    app.router.add_get("/api/status/{code}", status)
    app.router.add_get("/api/stream", stream)
    app.router.add_post("/api/upload", upload)
    return app


@dataclass
class Setup:
    client: Client
    gateway: FakeGateway
    hooks: Upstream

    async def pay(self, path: str, method: str = "GET") -> str:
        response = await self.client.request(method, path)
        assert response.status == 402, await response.text()
        return self.gateway.pay(await response.json(content_type=PROBLEM_JSON))


@pytest_asyncio.fixture
async def upstream() -> AsyncIterator[tuple[BaseTestServer, Upstream]]:
    hooks = Upstream(asyncio.Event(), asyncio.Event())
    async with TestServer(upstream_app(hooks)) as server:
        yield server, hooks


async def proxy_for(upstream: BaseTestServer, gateway: FakeGateway, **options: Any) -> Client:
    app = build_proxy(str(upstream.make_url("")), gateway, **options)
    return TestClient(TestServer(app))


@pytest_asyncio.fixture
async def setup(upstream: tuple[BaseTestServer, Upstream]) -> AsyncIterator[Setup]:
    server, hooks = upstream
    gateway = FakeGateway(RULES)
    async with await proxy_for(server, gateway) as client:
        yield Setup(client, gateway, hooks)


def headers_of(echo: dict[str, Any]) -> dict[str, str]:
    return {name.lower(): value for name, value in echo["headers"]}


async def test_paid_get_is_forwarded_with_the_token_facts(setup: Setup) -> None:
    authorization = await setup.pay("/api/premium/fortune")
    response = await setup.client.get(
        "/api/premium/fortune", headers={"Authorization": authorization}
    )
    assert response.status == 200
    fortune = await response.json()
    assert fortune["paid"]["service"] == "premium"
    assert fortune["paid"]["amount_msat"] == 10_000


async def test_token_header_reaches_upstream_but_not_the_credential(setup: Setup) -> None:
    authorization = await setup.pay("/api/echo")
    response = await setup.client.get(
        "/api/echo", headers={"Authorization": authorization, "X-L402-Token": '{"tier": 99}'}
    )
    assert response.status == 200
    echoed = {k.lower(): v for k, v in (await response.json())["headers"].items()}
    assert "authorization" not in echoed
    token = json.loads(echoed["x-l402-token"])
    macaroon = authorization.split(" ")[1].rsplit(":", 1)[0]
    assert token == {
        "token_id": token["token_id"],
        "payment_hash": token["payment_hash"],
        "service": "echo",
        "tier": 0,
        "capabilities": None,
        "valid_until": int(setup.gateway.clock.now()) + 3600,
        "amount_msat": 1_000,
    }
    assert token["payment_hash"] in {h.hex() for h in setup.gateway.backend.invoices}
    assert macaroon not in json.dumps(echoed)
    preimage = authorization.rsplit(":", 1)[1]
    assert preimage not in json.dumps(echoed)


async def test_client_token_header_and_authorization_are_dropped_on_free_routes(
    setup: Setup,
) -> None:
    response = await setup.client.post(
        "/public/echo",
        headers=[
            ("X-L402-Token", '{"service": "forged"}'),
            ("x-l402-token", "again"),
            ("Authorization", "Bearer upstream-secret"),
        ],
    )
    assert response.status == 200
    echoed = headers_of(await response.json())
    assert "x-l402-token" not in echoed
    assert "authorization" not in echoed


async def test_hop_by_hop_headers_are_stripped(setup: Setup) -> None:
    response = await setup.client.get(
        "/public/echo",
        headers={
            "Connection": "X-Foo, close",
            "X-Foo": "hop",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic c2VjcmV0",
            "Upgrade": "websocket",
            "X-Kept": "end-to-end",
        },
    )
    assert response.status == 200
    echoed = headers_of(await response.json())
    for name in ("x-foo", "keep-alive", "te", "proxy-authorization", "upgrade"):
        assert name not in echoed, name
    assert echoed.get("connection", "keep-alive").lower() != "x-foo, close"
    assert echoed["x-kept"] == "end-to-end"


# A client's claims of where it is and how it connected, each in a header some backend
# trusts (Rack, chi, nginx's realip, Express's request-ip, Werkzeug's ProxyFix).
CLAIMS = [
    ("X-Forwarded-For", "198.51.100.1"),
    ("X-Forwarded-For", "198.51.100.2"),
    ("Forwarded", "for=10.0.0.5;proto=https"),
    ("X-Real-IP", "10.0.0.5"),
    ("True-Client-IP", "10.0.0.5"),
    ("X-Client-IP", "10.0.0.5"),
    ("Client-IP", "10.0.0.5"),
    ("X-Cluster-Client-IP", "10.0.0.5"),
    ("CF-Connecting-IP", "10.0.0.5"),
    ("Fastly-Client-IP", "10.0.0.5"),
    ("X-Forwarded", "for=10.0.0.5"),
    ("Forwarded-For", "10.0.0.5"),
    ("X-Forwarded-Ssl", "on"),
    ("X-Forwarded-Scheme", "https"),
    ("X-Forwarded-Port", "443"),
    ("X-Forwarded-Prefix", "/admin"),
    ("X-Forwarded-Server", "trusted.example"),
    ("Front-End-Https", "on"),
    ("X-Url-Scheme", "https"),
]


async def test_forwarded_headers(setup: Setup) -> None:
    """The upstream learns the client from the gateway alone: X-Forwarded-For, -Proto and
    -Host, set afresh; none of the client's own claims reach it."""
    response = await setup.client.get("/public/echo", headers=CLAIMS)
    echoed = headers_of(await response.json())
    assert echoed["x-forwarded-for"] == "127.0.0.1"
    for name, _ in CLAIMS[2:]:
        assert name.lower() not in echoed, name
    assert echoed["x-forwarded-proto"] == "http"
    assert echoed["x-forwarded-host"] == f"{setup.client.host}:{setup.client.port}"
    # The upstream is addressed by its own name.
    assert echoed["host"] != echoed["x-forwarded-host"]
    response = await setup.client.get("/public/echo", headers={"X-Forwarded-Proto": "https"})
    assert headers_of(await response.json())["x-forwarded-proto"] == "http"


async def test_a_trusted_proxys_forwarded_proto_and_host_are_kept(
    upstream: tuple[BaseTestServer, Upstream],
) -> None:
    server, _hooks = upstream
    async with await proxy_for(server, FakeGateway(RULES), trust_forwarded_for=True) as client:
        forwarded = {
            "X-Forwarded-For": "198.51.100.1",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "api.example.com",
        }
        response = await client.get("/public/echo", headers=forwarded)
        echoed = headers_of(await response.json())
        assert echoed["x-forwarded-for"] == "198.51.100.1, 127.0.0.1"  # the trusted chain
        assert echoed["x-forwarded-proto"] == "https"
        assert echoed["x-forwarded-host"] == "api.example.com"
        # A chain: the last value is the one the trusted proxy added.
        chained = {"X-Forwarded-Proto": "gopher, https", "X-Forwarded-Host": "a.test, b.test"}
        echoed = headers_of(await (await client.get("/public/echo", headers=chained)).json())
        assert (echoed["x-forwarded-proto"], echoed["x-forwarded-host"]) == ("https", "b.test")
        # No header, or a scheme that is no web scheme: the gateway's own view.
        bogus = {"X-Forwarded-Proto": "javascript"}
        echoed = headers_of(await (await client.get("/public/echo", headers=bogus)).json())
        assert echoed["x-forwarded-proto"] == "http"
        assert echoed["x-forwarded-host"] == f"{client.host}:{client.port}"


async def test_no_headers_are_added_to_the_request(setup: Setup) -> None:
    response = await setup.client.post(
        "/public/echo",
        data=b"x",
        skip_auto_headers=("Accept-Encoding", "User-Agent", "Accept", "Content-Type"),
    )
    echoed = headers_of(await response.json())
    for name in ("accept-encoding", "user-agent", "accept", "content-type"):
        assert name not in echoed, name


async def test_large_body_is_streamed_to_upstream(setup: Setup) -> None:
    authorization = await setup.pay("/api/echo", "POST")
    body = io.BytesIO(b"\x01" * (5 * MiB))
    response = await setup.client.post(
        "/api/echo", data=body, headers={"Authorization": authorization}
    )
    assert response.status == 200
    echoed = await response.json()
    assert echoed["bytes"] == 5 * MiB
    assert echoed["method"] == "POST"
    forwarded = {k.lower(): v for k, v in echoed["headers"].items()}
    assert forwarded["content-length"] == str(5 * MiB)
    assert "transfer-encoding" not in forwarded


async def test_chunked_body_is_streamed_as_it_arrives(setup: Setup) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"a" * 1000
        # The upstream has the first chunk before the client sends the rest: no buffering.
        await asyncio.wait_for(setup.hooks.first_chunk_received.wait(), TIMEOUT)
        for _ in range(10):
            yield b"b" * 100_000

    response = await setup.client.post("/api/upload", data=body())
    assert response.status == 200
    assert (await response.json())["bytes"] == 1_001_000


async def test_response_is_streamed(setup: Setup) -> None:
    response = await setup.client.get("/api/stream")
    assert response.status == 200
    first = b""
    async with asyncio.timeout(TIMEOUT):
        while len(first) < len(b"first chunk;"):
            first += await response.content.readany()
    assert first == b"first chunk;"
    setup.hooks.first_chunk_read.set()
    assert await response.read() == b"second chunk"


@pytest.mark.parametrize("chunked", [False, True])
async def test_body_over_the_limit_is_413(
    upstream: tuple[BaseTestServer, Upstream], chunked: bool
) -> None:
    server, _ = upstream
    gateway = FakeGateway(RULES)
    async with await proxy_for(server, gateway, max_body_bytes=MiB) as client:
        ok = await client.post("/public/echo", data=io.BytesIO(b"x" * MiB))
        assert ok.status == 200
        assert headers_of(await ok.json())["content-length"] == str(MiB)

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(4):
                yield b"y" * (MiB // 2)

        response = await client.post(
            "/public/echo", data=chunks() if chunked else io.BytesIO(b"y" * (2 * MiB))
        )
        assert response.status == 413
        assert response.content_type == PROBLEM_JSON
        body = await response.json(content_type=PROBLEM_JSON)
        assert body["status"] == 413
        assert body["title"] == "Content Too Large"


async def test_upstream_down_is_502() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    gateway = FakeGateway(RULES)
    app = build_proxy(f"http://127.0.0.1:{port}", gateway)
    async with TestClient(TestServer(app)) as client:
        response = await client.get("/health")
        assert response.status == 502
        assert response.content_type == PROBLEM_JSON
        body = await response.json(content_type=PROBLEM_JSON)
        assert body == {
            "type": "about:blank",
            "title": "Bad Gateway",
            "status": 502,
            "detail": "upstream unavailable",
        }


async def test_upstream_status_and_headers_pass_through(setup: Setup) -> None:
    for code in (200, 201, 302, 404, 418, 500, 503):
        response = await setup.client.get(f"/api/status/{code}", allow_redirects=False)
        assert response.status == code
        assert response.reason == "Custom Reason"
        assert response.headers["X-Custom"] == "kept"
        assert response.headers.getall("Set-Cookie") == ["a=1", "b=2"]
        assert "X-Hop" not in response.headers
        assert "Keep-Alive" not in response.headers
        assert await response.text() == "body of the status page"


async def test_upstream_404_and_redirects_are_passed_back(setup: Setup) -> None:
    response = await setup.client.get("/nowhere")
    assert response.status == 404
    response = await setup.client.get("/api/status/302", allow_redirects=False)
    assert response.status == 302
    assert response.headers["Location"] == "/elsewhere"  # the proxy did not follow it


async def test_proxy_prices_head_like_get(setup: Setup) -> None:
    response = await setup.client.head("/api/premium/fortune")
    assert response.status == 402


@pytest.mark.parametrize(
    "target",
    [
        "/api/x/../premium/fortune",
        "/api/x/%2e%2e/premium/fortune",
        "/api/./premium/fortune",
        "//api/premium/fortune",
    ],
)
async def test_no_free_way_around_a_price(setup: Setup, target: str) -> None:
    # The upstream URL is normalized on its way out (or by the backend): a path that the
    # rules saw as unpriced must not become a priced one.
    response = await raw_get(setup.client, target)
    assert response.startswith(b"HTTP/1.1 400 "), response[:200]
    assert b"fortune" not in response.split(b"\r\n\r\n", 1)[1]


async def test_an_encoded_separator_is_refused_before_any_price(setup: Setup) -> None:
    # Before the decision: no invoice for it (with Expect: test_expect_continue).
    response = await setup.client.post("/api%2Fecho", data=b"hello")
    assert response.status == 400
    assert "encoded" in (await response.json(content_type=PROBLEM_JSON))["detail"]
    assert setup.gateway.backend.invoices == {}


async def test_the_proxy_runs_no_middleware_by_default(setup: Setup) -> None:
    # aiohttp runs every request through a chain of its own once there is one.
    assert not setup.client.app.middlewares


async def test_query_string_is_forwarded(setup: Setup) -> None:
    authorization = await setup.pay("/api/quote?n=3")
    response = await setup.client.get("/api/quote?n=3", headers={"Authorization": authorization})
    assert response.status == 200
    assert len((await response.json())["quotes"]) == 3


async def test_401_through_the_proxy_carries_a_challenge_without_an_invoice(
    setup: Setup,
) -> None:
    authorization = await setup.pay("/api/premium/fortune")
    macaroon = authorization.split(" ")[1].rsplit(":", 1)[0]
    invoices = len(setup.gateway.backend.invoices)
    response = await setup.client.get(
        "/api/premium/fortune", headers={"Authorization": f"L402 {macaroon}:{'00' * 32}"}
    )
    assert response.status == 401
    assert response.headers.getall("WWW-Authenticate") == [
        'L402 realm="l402-gateway", error="invalid_token", '
        'error_description="preimage does not match the payment hash"'
    ]
    assert len(setup.gateway.backend.invoices) == invoices  # a 401 mints no invoice


async def test_402_through_the_proxy_never_reaches_upstream(setup: Setup) -> None:
    response = await setup.client.post("/api/echo", data=b"x" * 1000)
    assert response.status == 402
    assert len(response.headers.getall("WWW-Authenticate")) == 2


async def test_lifecycle(upstream: tuple[BaseTestServer, Upstream]) -> None:
    server, _ = upstream
    gateway = FakeGateway(RULES)
    async with await proxy_for(server, gateway) as client:
        assert (gateway.entered, gateway.exited) == (1, 0)
        assert (await client.get("/health")).status == 200
    assert (gateway.entered, gateway.exited) == (1, 1)


async def test_head_of_a_free_route(setup: Setup) -> None:
    get = await setup.client.get("/health")
    head = await setup.client.head("/health")
    assert head.status == 200
    assert head.headers["Content-Length"] == get.headers["Content-Length"]
    assert await head.read() == b""


async def test_upstream_dying_mid_body_is_not_a_clean_truncated_response(setup: Setup) -> None:
    # A large body is streamed: the client has its 200 when the upstream dies.
    response = await setup.client.get(f"/api/broken/{1024 * 1024}")
    assert response.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()


async def test_upstream_dying_within_a_small_body_is_a_502(setup: Setup) -> None:
    # A small body is read whole before anything is sent, so the failure can still be told.
    response = await setup.client.get("/api/broken/100")
    assert response.status == 502
    assert (await response.json())["detail"] == "upstream unavailable"


@pytest.mark.parametrize("code", [204, 304])
async def test_bodiless_statuses_pass_through(setup: Setup, code: int) -> None:
    response = await setup.client.get(f"/api/status/{code}")
    assert response.status == code
    assert response.headers["X-Custom"] == "kept"
    assert await response.read() == b""


async def test_upstream_cookies_are_never_kept_by_the_proxy(
    upstream: tuple[BaseTestServer, Upstream],
) -> None:
    # By host name: a client cookie jar would keep cookies set by it (not by an IP address)
    # and send one client's session along with everybody's requests.
    server, _ = upstream
    url = str(server.make_url("")).replace("127.0.0.1", "localhost")
    async with TestClient(TestServer(build_proxy(url, FakeGateway(RULES)))) as client:
        login = await client.get("/public/login")
        assert login.headers["Set-Cookie"].startswith("session=alice-only")  # for its client
        client.session.cookie_jar.clear()  # now another client, without the cookie
        echo = await client.get("/public/echo")
        assert "cookie" not in headers_of(await echo.json())


async def test_a_malformed_request_is_one_info_line_without_its_bytes(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    """At most one a report interval (0.5 s here): a flood of them is a count."""
    server_log = logging.getLogger("aiohttp.server")
    log_filter = MalformedRequestLog(interval=0.5)
    server_log.addFilter(log_filter)
    secret = "L402 " + "s" * 20_000
    try:
        for pause in (0, 0, 0, 0.6, 0):
            await asyncio.sleep(pause)
            response = await setup.client.get("/health", headers={"Authorization": secret})
            assert response.status == 400
    finally:
        server_log.removeFilter(log_filter)
    records = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert [record.getMessage() for record in records] == [
        f"rejected a malformed request from 127.0.0.1: LineTooLong; {left_out} more since the "
        "last report"
        for left_out in (0, 2)
    ]
    assert [(r.levelno, r.exc_info) for r in records] == [(logging.INFO, None)] * 2
    assert "sss" not in caplog.text
