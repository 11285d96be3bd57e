"""The redeem endpoint's per-client rate limit through each front end (aiohttp middleware,
ASGI middleware, reverse proxy): 429 with Retry-After once a client's budget is spent, and
each front end passing the client's own address (peer, or trusted X-Forwarded-For hop)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import BaseTestServer, TestClient, TestServer
from starlette.applications import Starlette

from gateway.examples import demo_api
from gateway.service import L402Service, RateLimiter
from gateway.web.aiohttp import setup_l402
from gateway.web.asgi import SERVICE_STATE_KEY, L402Middleware, Message, Scope
from gateway.web.paywall import REDEEM_PATH
from gateway.web.proxy import build_proxy
from tests.demo_rules import ECHO
from tests.fakes import FakeGateway

RULES = (ECHO,)
BURST = 2
JSON = {"Content-Type": "application/json", "Sec-Fetch-Site": "same-origin"}

Client = TestClient[web.Request, web.Application]


def limited_gateway() -> FakeGateway:
    gateway = FakeGateway(RULES)
    # A refill far slower than the test: only the burst is available.
    gateway.options["redeem_limiter"] = RateLimiter(0.01, BURST, 100, gateway.clock)
    return gateway


async def macaroon_of(client: Client) -> str:
    response = await client.get("/api/echo")
    assert response.status == 402
    document: dict[str, Any] = await response.json(content_type=None)
    return str(document["macaroon"])


async def redeem(client: Client, macaroon: str, **headers: str) -> aiohttp.ClientResponse:
    return await client.post(
        REDEEM_PATH, data=json.dumps({"macaroon": macaroon}), headers={**JSON, **headers}
    )


async def assert_limited(client: Client, macaroon: str, **headers: str) -> None:
    """The client's burst is answered, then 429 with Retry-After."""
    for _ in range(BURST):
        assert (await redeem(client, macaroon, **headers)).status == 200
    refused = await redeem(client, macaroon, **headers)
    assert refused.status == 429
    assert int(refused.headers["Retry-After"]) >= 1
    problem = await refused.json(content_type="application/problem+json")
    assert problem["detail"] == "too many redeem requests"


def aiohttp_app(gateway: FakeGateway, trust_forwarded_for: bool) -> web.Application:
    app = demo_api()
    setup_l402(app, gateway, trust_forwarded_for=trust_forwarded_for)
    return app


@pytest.fixture(params=["aiohttp", "proxy"])
def front_end(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@contextlib.asynccontextmanager
async def serve(front_end: str, gateway: FakeGateway, trust: bool) -> AsyncIterator[Client]:
    if front_end == "aiohttp":
        async with TestClient(TestServer(aiohttp_app(gateway, trust))) as client:
            yield client
        return
    upstream: BaseTestServer = TestServer(demo_api())
    async with upstream:
        app = build_proxy(str(upstream.make_url("")), gateway, trust_forwarded_for=trust)
        async with TestClient(TestServer(app)) as client:
            yield client


async def test_redeem_is_limited_per_peer_address(front_end: str) -> None:
    gateway = limited_gateway()
    async with serve(front_end, gateway, trust=False) as client:
        macaroon = await macaroon_of(client)
        await assert_limited(client, macaroon)
        # an untrusted X-Forwarded-For does not buy a fresh budget
        refused = await redeem(client, macaroon, **{"X-Forwarded-For": "198.51.100.9"})
        assert refused.status == 429


async def test_redeem_is_limited_per_trusted_forwarded_address(front_end: str) -> None:
    gateway = limited_gateway()
    async with serve(front_end, gateway, trust=True) as client:
        macaroon = await macaroon_of(client)
        await assert_limited(client, macaroon, **{"X-Forwarded-For": "198.51.100.1"})
        # another client behind the trusted proxy has its own budget; the same /64 does not
        await assert_limited(client, macaroon, **{"X-Forwarded-For": "x, 2001:db8:1:2::1"})
        refused = await redeem(client, macaroon, **{"X-Forwarded-For": "2001:db8:1:2::99"})
        assert refused.status == 429


# --- ASGI --------------------------------------------------------------------------------


async def asgi_call(app: L402Middleware, scope: Scope, body: bytes = b"") -> list[Message]:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def http_scope(
    service: L402Service, method: str, path: str, client: str, headers: dict[str, str]
) -> Scope:
    return {
        "type": "http",
        "method": method,
        "path": path,
        "root_path": "",
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": (client, 40000),
        "state": {SERVICE_STATE_KEY: service},  # what l402_lifespan leaves for requests
    }


@pytest.mark.parametrize("trust", [False, True])
async def test_asgi_redeem_is_limited_per_client(trust: bool) -> None:
    gateway = limited_gateway()
    app = L402Middleware(Starlette(), trust_forwarded_for=trust)
    async with gateway() as service:
        sent = await asgi_call(app, http_scope(service, "GET", "/api/echo", "192.0.2.1", {}))
        assert sent[0]["status"] == 402
        body = json.dumps({"macaroon": json.loads(sent[1]["body"])["macaroon"]}).encode()

        async def status(peer: str, **headers: str) -> tuple[int, dict[bytes, bytes]]:
            scope = http_scope(service, "POST", REDEEM_PATH, peer, {**JSON, **headers})
            start = (await asgi_call(app, scope, body))[0]
            return start["status"], dict(start["headers"])

        forwarded = {"X-Forwarded-For": "198.51.100.1"}
        for _ in range(BURST):
            assert (await status("192.0.2.1", **forwarded))[0] == 200
        code, headers = await status("192.0.2.1", **forwarded)
        assert code == 429
        assert int(headers[b"retry-after"]) >= 1
        # another peer: its own budget, unless the forwarded address is trusted (then the
        # forwarded address is the client, and it is the same one)
        assert (await status("192.0.2.2", **forwarded))[0] == (429 if trust else 200)
        assert (await status("192.0.2.1", **{"X-Forwarded-For": "198.51.100.2"}))[0] == (
            200 if trust else 429
        )
