"""The ASGI middleware's answers to requests and WebSocket handshakes: a real Starlette app
served by a real uvicorn on a loopback port, over the fake invoice backend and the memory
store, with the gateway opened either way (by the middleware itself, or by ``l402_lifespan``).
Its lifespan handling: test_asgi_lifespan.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import pytest_asyncio
from fastapi import FastAPI
from fastapi import Request as FastAPIRequest
from fastapi.exceptions import FastAPIDeprecationWarning
from starlette.applications import Starlette
from starlette.middleware import Middleware

from gateway import l402
from gateway.service import L402Service, PaidToken
from gateway.web.asgi import (
    DENIAL_RESPONSE_EXTENSION,
    STATE_KEY,
    ASGIApp,
    GatewayFactory,
    L402Middleware,
    Message,
    Receive,
    Scope,
    Send,
    l402_lifespan,
    request_info,
)
from tests.integration.asgi_helpers import (
    BURST,
    PRICE,
    PROBLEM_JSON,
    ROUTES,
    Harness,
    starlette_app,
    uvicorn_serving,
)

# Tells the test-only shim in front of the middleware to hide the WebSocket Denial Response
# extension, as a server without it would.
NO_DENIAL_HEADER = "x-test-no-denial-response"


def without_denial_response(app: ASGIApp) -> ASGIApp:
    """Hide the Denial Response extension from ``app`` when the test asks for it."""

    async def shim(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and (NO_DENIAL_HEADER.encode(), b"1") in scope["headers"]:
            extensions = dict(scope.get("extensions") or {})
            extensions.pop(DENIAL_RESPONSE_EXTENSION, None)
            scope = {**scope, "extensions": extensions}
        await app(scope, receive, send)

    return shim


@pytest.fixture(scope="module", params=["middleware", "l402_lifespan"])
def opened_by(request: pytest.FixtureRequest) -> str:
    """Who opens the gateway: the middleware given the factory, or the app's lifespan."""
    return str(request.param)


@pytest.fixture(scope="module")
def harness(opened_by: str) -> Harness:
    """One per way (``opened_by``), so their invoices and rate limits stay apart."""
    return Harness()


@pytest_asyncio.fixture(scope="module")
async def base_url(harness: Harness, opened_by: str) -> AsyncIterator[str]:
    app: ASGIApp
    if opened_by == "middleware":
        app = L402Middleware(
            starlette_app(harness.events), harness.gateway, trust_forwarded_for=True
        )
    else:
        app = Starlette(
            routes=ROUTES,
            lifespan=l402_lifespan(harness.gateway),
            middleware=[Middleware(L402Middleware, trust_forwarded_for=True)],
        )
    async with uvicorn_serving(without_denial_response(app)) as url:
        yield url


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def _client(address: str) -> dict[str, str]:
    """Each test is its own client (trusted X-Forwarded-For), so rate limits stay apart."""
    return {"X-Forwarded-For": address}


async def test_priced_route_without_credential_is_402_problem_json_with_both_challenges(
    http: aiohttp.ClientSession, base_url: str, harness: Harness
) -> None:
    async with http.get(f"{base_url}/paid/weather", headers=_client("10.0.0.1")) as response:
        assert response.status == 402
        assert response.content_type == PROBLEM_JSON
        assert response.headers["Cache-Control"] == "no-store"
        challenges = response.headers.getall("WWW-Authenticate")
        problem = await response.json(content_type=PROBLEM_JSON)
    assert [value.split(" ", 1)[0] for value in challenges] == ["L402", "LSAT"]
    l402_challenge, lsat_challenge = (l402.parse_challenge(value) for value in challenges)
    assert l402_challenge.scheme == "L402"
    assert lsat_challenge.scheme == "LSAT"
    assert l402_challenge.macaroon_b64 == lsat_challenge.macaroon_b64 == problem["macaroon"]
    assert l402_challenge.invoice == lsat_challenge.invoice == problem["invoice"]
    assert problem["status"] == 402
    assert problem["title"] == "Payment Required"
    assert problem["detail"] == "payment required"
    assert problem["amount_msat"] == PRICE
    invoice = harness.backend.invoices[bytes.fromhex(problem["payment_hash"])]
    assert invoice.memo == "weather: GET /paid/weather"
    assert invoice.amount_msat == PRICE


async def test_paid_request_reaches_handler_with_token_in_request_state(
    http: aiohttp.ClientSession, base_url: str, harness: Harness
) -> None:
    headers = _client("10.0.0.2")
    async with http.get(f"{base_url}/paid/weather", headers=headers) as response:
        assert response.status == 402
        payment_hash = (await response.json(content_type=PROBLEM_JSON))["payment_hash"]
        authorization = await harness.credential(response)

    async with http.get(
        f"{base_url}/paid/weather", headers={**headers, "Authorization": authorization}
    ) as response:
        assert response.status == 200
        body = await response.json()
    assert body["path"] == "/paid/weather"
    token = body["token"]
    assert token["payment_hash"] == payment_hash
    assert token["service"] == "weather"
    assert token["amount_msat"] == PRICE
    assert len(token["token_id"]) == 64

    # The token is for the service, not one path; the legacy LSAT scheme works too.
    lsat = authorization.replace("L402 ", "LSAT ", 1)
    async with http.get(
        f"{base_url}/paid/forecast", headers={**headers, "Authorization": lsat}
    ) as response:
        assert response.status == 200
        assert (await response.json())["token"]["token_id"] == token["token_id"]


async def test_free_and_unpriced_routes_pass_with_no_token(
    http: aiohttp.ClientSession, base_url: str, harness: Harness
) -> None:
    invoices_before = len(harness.backend.invoices)
    for path in ("/free", "/unpriced"):
        async with http.get(f"{base_url}{path}", headers=_client("10.0.0.3")) as response:
            assert response.status == 200
            assert await response.json() == {"path": path, "token": None}
    async with http.get(f"{base_url}/missing", headers=_client("10.0.0.3")) as response:
        assert response.status == 404  # not priced: the app's own 404
    assert len(harness.backend.invoices) == invoices_before


@pytest.mark.parametrize(
    ("authorization", "reason"),
    [
        ("L402 not-a-credential", "credentials must be <macaroon>:<hex preimage>"),
        ("LSAT AAAA:" + "00" * 32, "only binary V2 macaroons are supported"),
    ],
)
async def test_invalid_credential_is_401_with_reason(
    http: aiohttp.ClientSession, base_url: str, authorization: str, reason: str
) -> None:
    headers = {**_client("10.0.0.4"), "Authorization": authorization}
    async with http.get(f"{base_url}/paid/weather", headers=headers) as response:
        assert response.status == 401
        assert response.content_type == PROBLEM_JSON
        # RFC 9110: a 401 names its scheme, and offers no invoice.
        assert response.headers.getall("WWW-Authenticate") == [
            f'L402 realm="l402-gateway", error="invalid_token", error_description="{reason}"'
        ]
        problem = await response.json(content_type=PROBLEM_JSON)
    assert problem["status"] == 401
    assert problem["detail"] == reason


async def test_wrong_preimage_is_401(
    http: aiohttp.ClientSession, base_url: str, harness: Harness
) -> None:
    headers = _client("10.0.0.5")
    async with http.get(f"{base_url}/paid/weather", headers=headers) as response:
        macaroon = l402.parse_challenge(response.headers["WWW-Authenticate"]).macaroon_b64
    forged = f"L402 {macaroon}:{'ab' * 32}"
    async with http.get(
        f"{base_url}/paid/weather", headers={**headers, "Authorization": forged}
    ) as response:
        assert response.status == 401
        problem = await response.json(content_type=PROBLEM_JSON)
    assert problem["detail"] == "preimage does not match the payment hash"


async def test_backend_unavailable_is_503_with_retry_after(
    http: aiohttp.ClientSession, base_url: str, harness: Harness
) -> None:
    harness.backend.unavailable = True
    try:
        async with http.get(f"{base_url}/paid/weather", headers=_client("10.0.0.6")) as response:
            assert response.status == 503
            assert response.headers["Retry-After"] == "5"
            problem = await response.json(content_type=PROBLEM_JSON)
    finally:
        harness.backend.unavailable = False
    assert problem["detail"] == "Lightning node unavailable"


async def test_too_many_challenges_is_429_per_client(
    http: aiohttp.ClientSession, base_url: str
) -> None:
    greedy = _client("10.0.0.7")
    for _ in range(BURST):
        async with http.get(f"{base_url}/paid/weather", headers=greedy) as response:
            assert response.status == 402
    async with http.get(f"{base_url}/paid/weather", headers=greedy) as response:
        assert response.status == 429
        assert response.headers["Retry-After"] == "2"  # one token at 0.5/s
        problem = await response.json(content_type=PROBLEM_JSON)
    assert problem["detail"] == "too many payment challenges"
    # Another client (the last X-Forwarded-For hop, added by the trusted proxy) still gets
    # challenges; what the client put before it does not matter.
    other = _client("10.0.0.7, 10.0.0.8")
    async with http.get(f"{base_url}/paid/weather", headers=other) as response:
        assert response.status == 402


async def test_request_body_on_priced_route_does_not_break_the_connection(
    http: aiohttp.ClientSession, base_url: str
) -> None:
    headers = _client("10.0.0.9")
    async with http.post(
        f"{base_url}/paid/upload", data=b"x" * 200_000, headers=headers
    ) as response:
        assert response.status == 402
    async with http.get(f"{base_url}/free", headers=headers) as response:
        assert response.status == 200


async def test_websocket_on_free_route_passes_through(
    http: aiohttp.ClientSession, base_url: str
) -> None:
    async with http.ws_connect(f"{base_url}/ws/free", headers=_client("10.0.1.1")) as ws:
        assert await ws.receive_json() == {"token": None}


async def test_websocket_on_priced_route_gets_the_402_handshake_then_pays(
    http: aiohttp.ClientSession, base_url: str, harness: Harness
) -> None:
    headers = _client("10.0.1.2")
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(f"{base_url}/ws/paid", headers=headers)
    assert refused.value.status == 402
    assert refused.value.headers is not None
    challenges = refused.value.headers.getall("WWW-Authenticate")
    assert [value.split(" ", 1)[0] for value in challenges] == ["L402", "LSAT"]
    challenge = l402.parse_challenge(challenges[0])
    payment_hash = next(
        h for h, i in harness.backend.invoices.items() if i.payment_request == challenge.invoice
    )
    preimage = harness.backend.pay(payment_hash)

    authorization = f"L402 {challenge.macaroon_b64}:{preimage.hex()}"
    async with http.ws_connect(
        f"{base_url}/ws/paid", headers={**headers, "Authorization": authorization}
    ) as ws:
        token = (await ws.receive_json())["token"]
    assert token["payment_hash"] == payment_hash.hex()
    assert token["amount_msat"] == PRICE


async def test_websocket_invalid_credential_gets_401_handshake(
    http: aiohttp.ClientSession, base_url: str
) -> None:
    headers = {**_client("10.0.1.3"), "Authorization": "L402 garbage"}
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(f"{base_url}/ws/paid", headers=headers)
    assert refused.value.status == 401
    assert refused.value.headers is not None
    assert refused.value.headers.getall("WWW-Authenticate") == [
        'L402 realm="l402-gateway", error="invalid_token", '
        'error_description="credentials must be <macaroon>:<hex preimage>"'
    ]


async def test_websocket_without_denial_extension_is_refused_with_403(
    http: aiohttp.ClientSession, base_url: str
) -> None:
    headers = {**_client("10.0.1.4"), NO_DENIAL_HEADER: "1"}
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(f"{base_url}/ws/paid", headers=headers)
    assert refused.value.status == 403
    async with http.ws_connect(f"{base_url}/ws/free", headers=headers) as ws:
        assert await ws.receive_json() == {"token": None}


# --- the scope -> RequestInfo mapping, without a server ---------------------------------


def _scope(**overrides: Any) -> Scope:
    scope: Scope = {
        "type": "http",
        "method": "POST",
        "path": "/paid/caf\u00e9 au lait",
        "raw_path": b"/paid/caf%C3%A9%20au%20lait",
        "query_string": b"n=3&q=a%26b+c",
        "client": ("192.0.2.1", 51000),
        "headers": [
            (b"host", b"example.com"),
            (b"authorization", b"Basic dXNlcjpwYXNz"),
            (b"x-forwarded-for", b"203.0.113.9, 10.0.0.1"),
            (b"authorization", b"L402 mac:00"),
        ],
    }
    scope.update(overrides)
    return scope


def test_request_info_takes_every_authorization_value_and_the_decoded_path() -> None:
    info = request_info(_scope())
    assert info.method == "POST"
    assert info.path == "/paid/caf\u00e9 au lait"
    assert info.query == "n=3&q=a%26b+c"
    assert info.authorization == ("Basic dXNlcjpwYXNz", "L402 mac:00")
    assert ("host", "example.com") in info.headers
    assert info.client == "192.0.2.1"  # X-Forwarded-For is not trusted by default


def test_request_info_client_address() -> None:
    assert request_info(_scope(), trust_forwarded_for=True).client == "10.0.0.1"
    assert request_info(_scope(client=None)).client == "unknown"
    assert request_info(_scope(client=None, headers=[]), True).client == "unknown"


def test_request_info_for_a_websocket_handshake_is_a_get() -> None:
    scope = _scope(type="websocket")
    del scope["method"]
    assert request_info(scope).method == "GET"


async def test_other_scope_types_pass_through_untouched() -> None:
    seen: list[Scope] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope)

    async def receive() -> Message:
        raise AssertionError("not called")

    async def send(message: Message) -> None:
        raise AssertionError("not called")

    def factory() -> contextlib.AbstractAsyncContextManager[L402Service]:
        raise AssertionError("the gateway is only opened by lifespan")

    gateway: GatewayFactory = factory
    scope: Scope = {"type": "custom.protocol"}
    await L402Middleware(app, gateway)(scope, receive, send)
    assert seen == [scope]
    assert STATE_KEY not in scope


async def test_head_on_priced_route_is_402_without_body(
    http: aiohttp.ClientSession, base_url: str
) -> None:
    async with http.head(f"{base_url}/paid/weather", headers=_client("10.0.0.10")) as response:
        assert response.status == 402
        assert len(response.headers.getall("WWW-Authenticate")) == 2
        assert await response.read() == b""


# --- an application mounted at a root path ---------------------------------------------------


async def test_a_root_path_application_is_priced_whichever_spelling_reaches_the_route(
    http: aiohttp.ClientSession,
) -> None:
    """``FastAPI(root_path=...)`` routes ``/api/paid/x`` and ``/paid/x`` to the same handler
    (Starlette strips the root path when the path has it): both are priced."""
    harness = Harness()
    with pytest.warns(FastAPIDeprecationWarning, match="root_path"):
        app = FastAPI(root_path="/api", lifespan=l402_lifespan(harness.gateway))
    app.add_middleware(L402Middleware)

    @app.get("/paid/{name}")
    async def paid(name: str, request: FastAPIRequest) -> dict[str, Any]:
        token: PaidToken = request.state.l402_token
        return {"name": name, "amount_msat": token.amount_msat}

    async with uvicorn_serving(app) as url:
        for path in ("/paid/rain", "/api/paid/rain"):
            async with http.get(f"{url}{path}") as response:
                assert response.status == 402, path
                authorization = await harness.credential(response)
            retry = http.get(f"{url}{path}", headers={"Authorization": authorization})
            async with retry as response:
                assert response.status == 200, path
                assert await response.json() == {"name": "rain", "amount_msat": PRICE}


async def test_a_root_path_application_wrapped_from_outside_is_priced_too(
    http: aiohttp.ClientSession,
) -> None:
    """``L402Middleware(FastAPI(root_path=...))``: FastAPI sets the root path in the scope
    inside itself, after the middleware; the middleware takes it from the application."""
    harness = Harness()
    with pytest.warns(FastAPIDeprecationWarning, match="root_path"):
        inner = FastAPI(root_path="/api")

    @inner.get("/paid/{name}")
    async def paid(name: str) -> dict[str, str]:
        return {"name": name}

    async with uvicorn_serving(L402Middleware(inner, harness.gateway)) as url:
        for path in ("/paid/rain", "/api/paid/rain"):
            async with http.get(f"{url}{path}") as response:
                assert response.status == 402, path


async def test_rules_of_the_routes_price_an_application_behind_a_root_path(
    http: aiohttp.ClientSession,
) -> None:
    """Under ``uvicorn --root-path /api`` the path the middleware gets has the root path in
    front (``/api/paid/x``), and the rules name the application's routes (``/paid/*``)."""
    harness = Harness()
    app = L402Middleware(starlette_app(harness.events), harness.gateway)
    async with uvicorn_serving(app, root_path="/api") as url:
        async with http.get(f"{url}/paid/rain") as response:
            assert response.status == 402
            authorization = await harness.credential(response)
        async with http.get(f"{url}/paid/rain", headers={"Authorization": authorization}) as paid:
            assert paid.status == 200
            assert (await paid.json())["token"]["amount_msat"] == PRICE
        async with http.get(f"{url}/free") as response:
            assert response.status == 200


async def test_a_request_target_without_a_leading_slash_is_refused_under_uvicorn() -> None:
    """uvicorn (h11) passes ``GET paid/rain`` on with the path ``paid/rain``, which no rule
    sees; a framework that routes it as ``/paid/rain`` (Werkzeug's) would serve it unpaid."""
    harness = Harness()
    app = L402Middleware(starlette_app(harness.events), harness.gateway)
    async with uvicorn_serving(app) as url:
        port = urlsplit(url).port
        assert port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET paid/rain HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        response = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), head
    assert json.loads(body)["detail"] == "path must start with '/'"
