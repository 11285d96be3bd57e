"""The ASGI middleware in front of real Starlette and FastAPI apps, served by a real uvicorn on
a loopback port, over the fake invoice backend and the memory store."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
import pytest
import pytest_asyncio
import uvicorn
from fastapi import FastAPI
from fastapi import Request as FastAPIRequest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from uvicorn.lifespan.on import LifespanOn

from gateway import errors, l402
from gateway.ports import Msat
from gateway.pricing import Pricing, Rule
from gateway.service import L402Service, PaidToken, RateLimiter
from gateway.store import MemoryStore
from gateway.web.asgi import (
    DENIAL_RESPONSE_EXTENSION,
    NOT_STARTED,
    STATE_KEY,
    ASGIApp,
    GatewayFactory,
    L402Middleware,
    Message,
    Receive,
    Scope,
    Send,
    request_info,
)
from tests.fakes import FakeClock, FakeInvoiceBackend

PRICE = Msat(21_000)
PROBLEM_JSON = "application/problem+json"
RULES = (
    Rule(pattern="/free"),
    Rule(pattern="/ws/free"),
    Rule(pattern="/paid/*", price_msat=PRICE, service="weather"),
    Rule(pattern="/ws/paid", price_msat=PRICE, service="weather"),
)
# The fake clock never moves, so a client's bucket never refills: burst is all it gets.
BURST = 3
# Tells the test-only shim in front of the middleware to hide the WebSocket Denial Response
# extension, as a server without it would.
NO_DENIAL_HEADER = "x-test-no-denial-response"


@dataclass
class Harness:
    """The fake node and store behind one gateway, and a log of lifespan events."""

    clock: FakeClock = field(default_factory=FakeClock)
    store: MemoryStore = field(default_factory=MemoryStore)
    events: list[str] = field(default_factory=list)
    fail_on_enter: bool = False
    fail_on_exit: bool = False
    backend: FakeInvoiceBackend = field(init=False)

    def __post_init__(self) -> None:
        self.backend = FakeInvoiceBackend(self.clock)

    @contextlib.asynccontextmanager
    async def gateway(self) -> AsyncIterator[L402Service]:
        if self.fail_on_enter:
            raise errors.ConfigError("no such node")
        self.events.append("gateway enter")
        try:
            yield L402Service(
                pricing=Pricing(RULES),
                backend=self.backend,
                store=self.store,
                clock=self.clock,
                rate_limiter=RateLimiter(0.5, BURST, 1000, self.clock),
            )
        finally:
            self.events.append("gateway exit")
        if self.fail_on_exit:
            raise errors.StoreError("could not flush")

    async def credential(self, response: aiohttp.ClientResponse, scheme: str = "L402") -> str:
        """Pay a 402 through the fake node; the Authorization value for the retry."""
        challenge = l402.parse_challenge(response.headers.getall("WWW-Authenticate")[0])
        problem = await response.json(content_type=PROBLEM_JSON)
        preimage = self.backend.pay(bytes.fromhex(problem["payment_hash"]))
        return f"{scheme} {challenge.macaroon_b64}:{preimage.hex()}"


def _token_json(token: PaidToken | None) -> dict[str, Any] | None:
    if token is None:
        return None
    return {
        "token_id": token.token_id,
        "payment_hash": token.payment_hash,
        "service": token.service,
        "amount_msat": token.amount_msat,
    }


def starlette_app(events: list[str], *, fail_startup: bool = False) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        if fail_startup:
            raise RuntimeError("the app's own startup broke")
        events.append("app startup")
        yield
        events.append("app shutdown")

    async def handler(request: Request) -> JSONResponse:
        return JSONResponse(
            {"path": request.url.path, "token": _token_json(request.state.l402_token)}
        )

    async def websocket(socket: WebSocket) -> None:
        await socket.accept()
        await socket.send_json({"token": _token_json(socket.state.l402_token)})
        await socket.close()

    return Starlette(
        routes=[
            Route("/free", handler),
            Route("/unpriced", handler),
            Route("/paid/{name}", handler, methods=["GET", "POST"]),
            WebSocketRoute("/ws/free", websocket),
            WebSocketRoute("/ws/paid", websocket),
        ],
        lifespan=lifespan,
    )


def without_denial_response(app: ASGIApp) -> ASGIApp:
    """Hide the Denial Response extension from ``app`` when the test asks for it."""

    async def shim(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and (NO_DENIAL_HEADER.encode(), b"1") in scope["headers"]:
            extensions = dict(scope.get("extensions") or {})
            extensions.pop(DENIAL_RESPONSE_EXTENSION, None)
            scope = {**scope, "extensions": extensions}
        await app(scope, receive, send)

    return shim


@dataclass
class Served:
    server: uvicorn.Server
    task: asyncio.Task[None]
    url: str


def _server(app: ASGIApp, lifespan: Literal["on", "off", "auto"]) -> uvicorn.Server:
    return uvicorn.Server(
        uvicorn.Config(
            app,
            lifespan=lifespan,
            http="h11",
            ws="wsproto",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=5,
        )
    )


@contextlib.asynccontextmanager
async def serving(
    app: ASGIApp, lifespan: Literal["on", "off", "auto"] = "on"
) -> AsyncIterator[Served]:
    """Run uvicorn for real on a free loopback port until the block ends."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = _server(app, lifespan)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            async with asyncio.timeout(10):
                while not server.started:
                    if task.done():
                        task.result()
                        raise AssertionError("uvicorn stopped during startup")
                    await asyncio.sleep(0.01)
            yield Served(server, task, f"http://127.0.0.1:{port}")
        finally:
            server.should_exit = True
            async with asyncio.timeout(10):
                await task


async def startup_fails(app: ASGIApp) -> bool:
    """Drive uvicorn's own lifespan runner through startup (``Server.serve`` would call
    ``sys.exit`` on a failed startup); True if uvicorn would exit."""
    lifespan = LifespanOn(uvicorn.Config(app, lifespan="on", log_config=None))
    await lifespan.startup()
    if not lifespan.should_exit:
        await lifespan.shutdown()
    return lifespan.should_exit


@pytest.fixture(scope="module")
def harness() -> Harness:
    return Harness()


@pytest_asyncio.fixture(scope="module")
async def base_url(harness: Harness) -> AsyncIterator[str]:
    app = L402Middleware(starlette_app(harness.events), harness.gateway, trust_forwarded_for=True)
    async with serving(without_denial_response(app)) as served:
        yield served.url


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


# --- lifespan: each test runs its own server --------------------------------------------


async def test_gateway_opens_before_and_closes_after_the_apps_own_lifespan_once() -> None:
    harness = Harness()
    app = L402Middleware(starlette_app(harness.events), harness.gateway)
    async with serving(app) as served:
        assert harness.events == ["gateway enter", "app startup"]
        async with aiohttp.ClientSession() as http:
            for _ in range(3):
                async with http.get(f"{served.url}/paid/x") as response:
                    assert response.status == 402
        assert app.service is not None
    assert harness.events == ["gateway enter", "app startup", "app shutdown", "gateway exit"]
    assert app.service is None


async def test_fastapi_add_middleware_and_request_state() -> None:
    harness = Harness()

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        harness.events.append("app startup")
        yield
        harness.events.append("app shutdown")

    app = FastAPI(lifespan=lifespan)
    app.add_middleware(L402Middleware, gateway=harness.gateway)

    @app.get("/paid/{name}")
    async def paid(name: str, request: FastAPIRequest) -> dict[str, Any]:
        token: PaidToken = request.state.l402_token
        return {"name": name, "token_id": token.token_id, "amount_msat": token.amount_msat}

    async with serving(app) as served, aiohttp.ClientSession() as http:
        async with http.get(f"{served.url}/paid/rain") as response:
            assert response.status == 402
            authorization = await harness.credential(response)
        async with http.get(
            f"{served.url}/paid/rain", headers={"Authorization": authorization}
        ) as response:
            assert response.status == 200
            body = await response.json()
    assert body["name"] == "rain"
    assert body["amount_msat"] == PRICE
    assert len(body["token_id"]) == 64
    assert harness.events == ["gateway enter", "app startup", "app shutdown", "gateway exit"]


async def test_app_without_lifespan_support_still_gets_the_gateway() -> None:
    harness = Harness()

    async def bare(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            raise RuntimeError(f"unsupported scope {scope['type']}")
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async with serving(L402Middleware(bare, harness.gateway)) as served:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{served.url}/paid/x") as response:
                assert response.status == 402
            async with http.get(f"{served.url}/free") as response:
                assert response.status == 204
        assert harness.events == ["gateway enter"]
    assert harness.events == ["gateway enter", "gateway exit"]


async def test_gateway_startup_failure_is_reported_and_the_app_never_starts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    harness = Harness(fail_on_enter=True)
    with caplog.at_level(logging.INFO):
        assert await startup_fails(L402Middleware(starlette_app(harness.events), harness.gateway))
    assert harness.events == []
    uvicorn_errors = [r.getMessage() for r in caplog.records if r.name == "uvicorn.error"]
    assert "L402 gateway failed to start: ConfigError('no such node')" in uvicorn_errors
    assert "Application startup failed. Exiting." in uvicorn_errors


async def test_app_startup_failure_closes_the_gateway_again() -> None:
    harness = Harness()
    app = L402Middleware(starlette_app(harness.events, fail_startup=True), harness.gateway)
    assert await startup_fails(app)
    assert harness.events == ["gateway enter", "gateway exit"]
    assert app.service is None


async def test_gateway_failing_to_close_is_reported_as_shutdown_failed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    harness = Harness(fail_on_exit=True)
    with caplog.at_level(logging.INFO):
        async with serving(L402Middleware(starlette_app(harness.events), harness.gateway)):
            pass
    assert harness.events == ["gateway enter", "app startup", "app shutdown", "gateway exit"]
    uvicorn_errors = [r.getMessage() for r in caplog.records if r.name == "uvicorn.error"]
    assert "L402 gateway failed to stop: StoreError('could not flush')" in uvicorn_errors
    assert "Application shutdown failed. Exiting." in uvicorn_errors


async def test_lifespan_off_answers_503_gateway_not_started(
    caplog: pytest.LogCaptureFixture,
) -> None:
    harness = Harness()
    app = L402Middleware(starlette_app(harness.events), harness.gateway)
    with caplog.at_level(logging.WARNING, logger="gateway.web.asgi"):
        async with serving(app, lifespan="off") as served, aiohttp.ClientSession() as http:
            for path in ("/paid/x", "/free", "/free"):
                async with http.get(f"{served.url}{path}") as response:
                    assert response.status == 503
                    assert "Retry-After" not in response.headers
                    problem = await response.json(content_type=PROBLEM_JSON)
                    assert problem["detail"] == NOT_STARTED
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(f"{served.url}/ws/free")
            assert refused.value.status == 503
    assert harness.events == []  # neither the gateway nor the app's own lifespan ran
    warnings = [r for r in caplog.records if r.name == "gateway.web.asgi"]
    assert len(warnings) == 1
    assert "not started" in warnings[0].getMessage()


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


# --- lifespan edge cases, driven directly over ASGI -------------------------------------


class LifespanDriver:
    """Plays the server's side of one lifespan scope."""

    def __init__(self, app: ASGIApp) -> None:
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.outbox: asyncio.Queue[Message] = asyncio.Queue()
        self.task = asyncio.ensure_future(
            app({"type": "lifespan", "state": {}}, self.inbox.get, self.outbox.put)
        )

    async def exchange(self, kind: str) -> Message:
        await self.inbox.put({"type": f"lifespan.{kind}"})
        async with asyncio.timeout(5):
            return await self.outbox.get()


async def test_app_returning_early_leaves_the_lifespan_to_the_middleware() -> None:
    harness = Harness()

    async def returns(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return  # takes no part in lifespan
        raise AssertionError("no requests here")

    driver = LifespanDriver(L402Middleware(returns, harness.gateway))
    assert (await driver.exchange("startup"))["type"] == "lifespan.startup.complete"
    assert harness.events == ["gateway enter"]
    assert (await driver.exchange("shutdown"))["type"] == "lifespan.shutdown.complete"
    await driver.task
    assert harness.events == ["gateway enter", "gateway exit"]


async def test_one_lifespan_at_a_time() -> None:
    harness = Harness()
    app = L402Middleware(starlette_app(harness.events), harness.gateway)
    first = LifespanDriver(app)
    assert (await first.exchange("startup"))["type"] == "lifespan.startup.complete"
    second = LifespanDriver(app)
    failed = await second.exchange("startup")
    assert failed == {
        "type": "lifespan.startup.failed",
        "message": "L402 gateway is already started by another lifespan",
    }
    await second.task
    assert app.service is not None  # the first lifespan's gateway is untouched
    assert (await first.exchange("shutdown"))["type"] == "lifespan.shutdown.complete"
    await first.task
    assert harness.events == ["gateway enter", "app startup", "app shutdown", "gateway exit"]
    # ... and after it ended, a new lifespan may open the gateway again.
    third = LifespanDriver(app)
    assert (await third.exchange("startup"))["type"] == "lifespan.startup.complete"
    assert (await third.exchange("shutdown"))["type"] == "lifespan.shutdown.complete"
    await third.task
    assert harness.events.count("gateway enter") == 2
    assert harness.events.count("gateway exit") == 2
