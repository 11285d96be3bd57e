"""The aiohttp middleware on a real loopback server: demo_api() + setup_l402(), over the fakes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

from gateway import l402
from gateway.examples import demo_api
from gateway.ports import Msat
from gateway.pricing import CreditTerms, Rule
from gateway.service import PaidToken, RateLimiter
from gateway.web.aiohttp import TOKEN, _priced, _ServiceSlot, setup_l402
from tests.demo_rules import HEALTH, PREMIUM_READ, QUOTE
from tests.fakes import FakeGateway

FORTUNE = "/api/premium/fortune"
PROBLEM_JSON = "application/problem+json"
RULES = (HEALTH, PREMIUM_READ, QUOTE)


async def whoami(request: web.Request) -> web.Response:
    token = request.get(TOKEN)
    assert token is None or isinstance(token, PaidToken)
    return web.json_response({"token_id": token.token_id if token else None})


def app_for(gateway: FakeGateway, **options: Any) -> web.Application:
    app = demo_api()
    app.router.add_get("/api/premium/whoami", whoami)
    setup_l402(app, gateway, **options)
    return app


@pytest_asyncio.fixture
async def gateway() -> FakeGateway:
    return FakeGateway(RULES)


@pytest_asyncio.fixture
async def client(gateway: FakeGateway) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    async with TestClient(TestServer(app_for(gateway))) as client:
        yield client


async def challenge(client: TestClient[web.Request, web.Application], path: str = FORTUNE) -> Any:
    response = await client.get(path)
    assert response.status == 402, await response.text()
    return await response.json(content_type=PROBLEM_JSON)


async def paid(client: TestClient[web.Request, web.Application], gateway: FakeGateway) -> str:
    return gateway.pay(await challenge(client))


async def test_402_with_problem_json_and_both_challenges(
    client: TestClient[web.Request, web.Application], gateway: FakeGateway
) -> None:
    response = await client.get(FORTUNE)
    assert response.status == 402
    assert response.content_type == PROBLEM_JSON
    assert response.headers["Cache-Control"] == "no-store"
    body = await response.json(content_type=PROBLEM_JSON)
    assert body["type"] == "about:blank"
    assert body["title"] == "Payment Required"
    assert body["status"] == 402
    assert body["detail"] == "payment required"
    assert body["amount_msat"] == 10_000
    assert body["expires_at"] == int(gateway.clock.now()) + 600
    assert bytes.fromhex(body["payment_hash"]) in gateway.backend.invoices
    l402_value, lsat_value = response.headers.getall("WWW-Authenticate")
    for value, scheme in ((l402_value, "L402"), (lsat_value, "LSAT")):
        parsed = l402.parse_challenge(value)
        assert parsed.scheme == scheme
        assert parsed.macaroon_b64 == body["macaroon"]
        assert parsed.invoice == body["invoice"]


async def test_pay_then_200_and_the_handler_sees_the_token(
    client: TestClient[web.Request, web.Application], gateway: FakeGateway
) -> None:
    authorization = await paid(client, gateway)
    response = await client.get("/api/premium/whoami", headers={"Authorization": authorization})
    assert response.status == 200
    token_id = (await response.json())["token_id"]
    macaroon = l402.decode_b64(authorization.split(" ")[1].rsplit(":", 1)[0])
    assert token_id == l402.Identifier.decode(macaroon.identifier).token_id.hex()
    # demo_api's own handler reads the same token.
    response = await client.get(FORTUNE, headers={"Authorization": authorization})
    assert response.status == 200
    fortune = await response.json()
    assert fortune["paid"]["service"] == "premium"
    assert fortune["paid"]["capabilities"] == ["read"]
    assert fortune["paid"]["amount_msat"] == 10_000


async def test_free_and_unpriced_routes(
    client: TestClient[web.Request, web.Application], gateway: FakeGateway
) -> None:
    response = await client.get("/health")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}
    response = await client.post("/api/echo", data=b"abc")
    assert response.status == 200
    assert (await response.json())["bytes"] == 3
    assert (await client.get("/nowhere")).status == 404
    assert gateway.backend.invoices == {}


async def test_head_of_a_paid_get_route_is_priced(
    client: TestClient[web.Request, web.Application],
) -> None:
    response = await client.head(FORTUNE)
    assert response.status == 402


async def raw_get(client: TestClient[web.Request, web.Application], target: str) -> bytes:
    """Send the request target exactly as given (an HTTP client would normalize it)."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    response = await reader.read()
    writer.close()
    await writer.wait_closed()
    return response


@pytest.mark.parametrize(
    "target",
    ["/api/x/../premium/fortune", "/api/x/%2e%2e/premium/fortune", "//api/premium/fortune"],
)
async def test_unnormalized_paths_are_refused(gateway: FakeGateway, target: str) -> None:
    async def anything(_request: web.Request) -> web.Response:
        raise AssertionError("must not run")

    app = web.Application()
    app.router.add_get("/{tail:.*}", anything)  # a route that takes any path
    setup_l402(app, gateway)
    async with TestClient(TestServer(app)) as client:
        response = await raw_get(client, target)
    assert response.startswith(b"HTTP/1.1 400 "), response
    assert b"application/problem+json" in response


async def test_a_request_no_route_takes_is_not_priced(
    client: TestClient[web.Request, web.Application], gateway: FakeGateway
) -> None:
    # The price is the routes': no route, nothing served, nothing to pay for.
    assert (await client.get("/api/premium/no/such/route")).status == 404
    response = await client.delete(FORTUNE)
    assert response.status == 405
    assert "GET" in response.headers["Allow"]
    assert gateway.backend.invoices == {}
    await challenge(client)  # the route itself is priced


async def test_401_reasons(
    client: TestClient[web.Request, web.Application], gateway: FakeGateway
) -> None:
    authorization = await paid(client, gateway)
    macaroon = authorization.split(" ")[1].rsplit(":", 1)[0]
    cases = {
        f"L402 {macaroon}:{'00' * 32}": "preimage does not match the payment hash",
        "L402 !!!": "credentials must be <macaroon>:<hex preimage>",
        f"L402 {l402.encode_b64(_foreign())}:{'11' * 32}": "unknown or revoked token",
    }
    for value, reason in cases.items():
        response = await client.get(FORTUNE, headers={"Authorization": value})
        assert response.status == 401, value
        assert response.content_type == PROBLEM_JSON
        # RFC 9110: a 401 names its scheme, and offers no invoice.
        assert response.headers.getall("WWW-Authenticate") == [
            f'L402 realm="l402-gateway", error="invalid_token", error_description="{reason}"'
        ]
        body = await response.json(content_type=PROBLEM_JSON)
        assert body["status"] == 401
        assert body["title"] == "Unauthorized"
        assert body["detail"] == reason
    # Revoked.
    assert gateway.service is not None
    token_id = l402.Identifier.decode(l402.decode_b64(macaroon).identifier).token_id
    assert await gateway.service.revoke(token_id)
    response = await client.get(FORTUNE, headers={"Authorization": authorization})
    assert response.status == 401
    assert (await response.json(content_type=PROBLEM_JSON))["detail"] == "unknown or revoked token"


def _foreign() -> l402.Macaroon:
    """A well-formed token this gateway never issued."""
    return l402.mint_token(bytes(32), bytes(32), bytes(32), ["services=premium:0"])


async def test_expired_token_gets_402_with_the_reason(
    client: TestClient[web.Request, web.Application], gateway: FakeGateway
) -> None:
    authorization = await paid(client, gateway)
    gateway.clock.advance(3600)
    response = await client.get(FORTUNE, headers={"Authorization": authorization})
    assert response.status == 402
    assert (await response.json(content_type=PROBLEM_JSON))["detail"] == "token expired"
    assert len(response.headers.getall("WWW-Authenticate")) == 2


@pytest_asyncio.fixture(scope="module")
async def shared() -> AsyncIterator[TestClient[web.Request, web.Application]]:
    async with TestClient(TestServer(app_for(FakeGateway(RULES)))) as client:
        yield client


async def test_429_with_retry_after_then_recovery() -> None:
    gateway = FakeGateway(RULES)
    gateway.options["rate_limiter"] = RateLimiter(1.0, 2, 100, gateway.clock)
    async with TestClient(TestServer(app_for(gateway))) as client:
        for _ in range(2):
            await challenge(client)
        response = await client.get(FORTUNE)
        assert response.status == 429
        assert response.headers["Retry-After"] == "1"
        body = await response.json(content_type=PROBLEM_JSON)
        assert body["title"] == "Too Many Requests"
        assert (await client.get("/health")).status == 200
        gateway.clock.advance(1)
        await challenge(client)


async def test_rate_limit_uses_the_hop_the_trusted_proxy_added() -> None:
    gateway = FakeGateway(RULES)
    gateway.options["rate_limiter"] = RateLimiter(1.0, 1, 100, gateway.clock)
    app = app_for(gateway, trust_forwarded_for=True)
    async with TestClient(TestServer(app)) as client:
        # The load balancer appends the peer it saw; what the client sent comes first.
        spoofed = {"X-Forwarded-For": "198.51.100.1, 203.0.113.5"}
        assert (await client.get(FORTUNE, headers=spoofed)).status == 402
        spoofed = {"X-Forwarded-For": "198.51.100.2, 203.0.113.5"}
        assert (await client.get(FORTUNE, headers=spoofed)).status == 429
        other = {"X-Forwarded-For": "203.0.113.6"}
        assert (await client.get(FORTUNE, headers=other)).status == 402


async def test_503_when_the_node_is_down(
    client: TestClient[web.Request, web.Application], gateway: FakeGateway
) -> None:
    gateway.backend.unavailable = True
    response = await client.get(FORTUNE)
    assert response.status == 503
    assert int(response.headers["Retry-After"]) > 0
    body = await response.json(content_type=PROBLEM_JSON)
    assert body["detail"] == "Lightning node unavailable"
    assert (await client.get("/health")).status == 200


async def test_lifecycle_enters_on_startup_and_exits_on_cleanup() -> None:
    gateway = FakeGateway(RULES)
    app = app_for(gateway)
    assert (gateway.entered, gateway.exited) == (0, 0)
    async with TestClient(TestServer(app)) as client:
        assert (gateway.entered, gateway.exited) == (1, 0)
        assert gateway.service is not None
        await challenge(client)
    assert (gateway.entered, gateway.exited) == (1, 1)
    assert gateway.service is None


async def test_handler_errors_pass_through(gateway: FakeGateway) -> None:
    async def conflict(_request: web.Request) -> web.Response:
        raise web.HTTPConflict(text=json.dumps({"why": "busy"}))

    app = app_for(gateway)
    app.router.add_get("/api/premium/conflict", conflict)
    async with TestClient(TestServer(app)) as client:
        authorization = await paid(client, gateway)
        headers = {"Authorization": authorization}
        response = await client.get("/api/premium/conflict", headers=headers)
        assert response.status == 409
        assert await response.json(content_type=None) == {"why": "busy"}


async def test_503_problem_while_the_gateway_is_not_running() -> None:
    # A request still in flight when the application stops (the gateway closes first).
    async def handler(_request: web.Request) -> web.StreamResponse:
        raise AssertionError("must not run")

    priced = _priced(_ServiceSlot(), handler)
    response = await priced(make_mocked_request("GET", FORTUNE))
    assert response.status == 503
    assert response.content_type == PROBLEM_JSON
    assert response.headers["Retry-After"] == "1"


async def test_only_credit_routes_hook_every_response() -> None:
    # A charge must be finished before a handler's own response goes out; without credit
    # routes nothing is hooked, so no response pays for the signal.
    credit_rule = Rule(
        "/api/premium/*",
        price_msat=Msat(1_000),
        service="premium",
        credit=CreditTerms(amount_msat=Msat(3_000), min_msat=Msat(1_000), max_msat=Msat(9_000)),
    )
    for rules, hooked in ((RULES, False), ((credit_rule,), True)):
        app = app_for(FakeGateway(rules))
        async with TestClient(TestServer(app)) as client:
            assert (await client.get("/health")).status == 200
            assert bool(app.on_response_prepare) is hooked
