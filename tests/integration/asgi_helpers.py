"""Shared pieces of the ASGI tests: a real uvicorn on a loopback port, and a gateway over the
fake node and the memory store whose opening and closing is logged next to the app's own."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
import uvicorn
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
from gateway.web.asgi import ASGIApp
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
# Generous: a loaded machine may take seconds to start or stop a server.
SERVER_TIMEOUT = 30


@contextlib.asynccontextmanager
async def uvicorn_serving(
    app: ASGIApp, lifespan: Literal["on", "off", "auto"] = "on", root_path: str = ""
) -> AsyncIterator[str]:
    """Run uvicorn for real on a free loopback port until the block ends (``root_path``: its
    ``--root-path``); yields its URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            lifespan=lifespan,
            http="h11",
            ws="wsproto",  # the WebSocket Denial Response extension
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=5,
            root_path=root_path,
        )
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            async with asyncio.timeout(SERVER_TIMEOUT):
                while not server.started:
                    if task.done():
                        task.result()
                        raise AssertionError("uvicorn stopped during startup")
                    await asyncio.sleep(0.01)
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            async with asyncio.timeout(SERVER_TIMEOUT):
                await task


async def startup_fails(app: ASGIApp) -> bool:
    """Drive uvicorn's own lifespan runner through startup (``Server.serve`` would call
    ``sys.exit`` on a failed startup); True if uvicorn would exit."""
    lifespan = LifespanOn(uvicorn.Config(app, lifespan="on", log_config=None))
    await lifespan.startup()
    if not lifespan.should_exit:
        await lifespan.shutdown()
    return lifespan.should_exit


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

    async def paid_get(self, http: aiohttp.ClientSession, url: str) -> Any:
        """GET ``url`` (a 402), pay through the fake node, GET it again: the 200's JSON."""
        async with http.get(url) as response:
            assert response.status == 402
            authorization = await self.credential(response)
        async with http.get(url, headers={"Authorization": authorization}) as response:
            assert response.status == 200
            return await response.json()

    async def credential(self, response: aiohttp.ClientResponse, scheme: str = "L402") -> str:
        """Pay a 402 through the fake node; the Authorization value for the retry."""
        challenge = l402.parse_challenge(response.headers.getall("WWW-Authenticate")[0])
        problem = await response.json(content_type=PROBLEM_JSON)
        preimage = self.backend.pay(bytes.fromhex(problem["payment_hash"]))
        return f"{scheme} {challenge.macaroon_b64}:{preimage.hex()}"


def token_json(token: PaidToken | None) -> dict[str, Any] | None:
    if token is None:
        return None
    return {
        "token_id": token.token_id,
        "payment_hash": token.payment_hash,
        "service": token.service,
        "amount_msat": token.amount_msat,
    }


def own_lifespan(
    events: list[str], *, fail_startup: bool = False
) -> Callable[[object], contextlib.AbstractAsyncContextManager[None]]:
    """The application's own ``lifespan=``, logging to ``events`` (or failing its startup)."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: object) -> AsyncIterator[None]:
        if fail_startup:
            raise RuntimeError("the app's own startup broke")
        events.append("app startup")
        yield
        events.append("app shutdown")

    return lifespan


async def echo_token(request: Request) -> JSONResponse:
    return JSONResponse({"path": request.url.path, "token": token_json(request.state.l402_token)})


async def websocket_token(socket: WebSocket) -> None:
    await socket.accept()
    await socket.send_json({"token": token_json(socket.state.l402_token)})
    await socket.close()


# Free, unpriced and priced routes, HTTP and WebSocket, each answering with its token.
ROUTES = (
    Route("/free", echo_token),
    Route("/unpriced", echo_token),
    Route("/paid/{name}", echo_token, methods=["GET", "POST"]),
    WebSocketRoute("/ws/free", websocket_token),
    WebSocketRoute("/ws/paid", websocket_token),
)


def starlette_app(events: list[str], *, fail_startup: bool = False) -> Starlette:
    return Starlette(routes=ROUTES, lifespan=own_lifespan(events, fail_startup=fail_startup))
