"""Credit routes over HTTP on all three front ends (aiohttp middleware, ASGI middleware under
uvicorn, reverse proxy), over the fake node and the memory store: the balance header on
every response, what is charged (the price, a reported cost, nothing for a failure), each
charge finished exactly once, the credit 402's headers, and the token info and withdraw
endpoints' answers to bad requests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from typing import Any
from wsgiref.simple_server import WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIEnvironment

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiohttp.typedefs import Handler
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from gateway.client import bolt11
from gateway.errors import ConfigError
from gateway.ports import Msat
from gateway.pricing import CreditTerms, Rule
from gateway.service import CreditCharge, Withdrawer
from gateway.web import aiohttp as aiohttp_middleware
from gateway.web import asgi
from gateway.web.asgi import ASGIApp, L402Middleware, Receive, Scope, Send
from gateway.web.credit import TOKEN_INFO_PATH, WITHDRAW_PATH
from gateway.web.proxy import build_proxy
from tests.fakes import FakeGateway, FakePayer, make_invoice
from tests.integration.asgi_helpers import uvicorn_serving
from tests.integration.test_expect_continue import BODY, continued, exchange, refused_first
from tests.integration.test_proxy_backends import _Quiet

PROBLEM_JSON = "application/problem+json"
PRICE = 1_000
CREDIT = 10_000  # what a purchase buys: ten requests at the full price
BALANCE = "L402-Balance-Msat"
COST = "L402-Cost-Msat"
RULES = (
    Rule(
        "/credit/*",
        price_msat=Msat(PRICE),
        service="credit",
        credit=CreditTerms(Msat(CREDIT), Msat(PRICE), Msat(100 * CREDIT)),
    ),
    Rule(
        "/metered/*",
        price_msat=Msat(PRICE),
        service="metered",
        credit=CreditTerms(Msat(CREDIT), Msat(PRICE), Msat(100 * CREDIT), metered=True),
    ),
    Rule("/paid/*", price_msat=Msat(PRICE), service="paid"),
)
FRONT_ENDS = ("aiohttp", "asgi", "proxy")
# reservation id, status ("unserved": the handler never had the request), cost
Finished = tuple[int, int | str | None, str | int | None]


# --- the same application on each front end -------------------------------------------------


async def aiohttp_handler(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name == "fail":
        return web.json_response({}, status=503)
    if name == "forbidden":
        raise web.HTTPForbidden(text="no")
    if name == "raise":
        raise RuntimeError("the handler broke")
    if name == "cost":
        aiohttp_middleware.report_cost(request, int(request.query["msat"]))
    if name == "stream":  # sends its response itself, having reported its cost
        aiohttp_middleware.report_cost(request, int(request.query["msat"]))
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"streamed")
        return response
    if name == "stream-broken":  # the body went out, then the handler fails
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"streamed")
        raise ConnectionResetError("the client left")
    if name == "socket":
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        await socket.send_str("hello")
        await socket.close()
        return socket
    return web.json_response({"bytes": len(await request.read())})


@web.middleware
async def blocking(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The application's own check, ahead of every handler."""
    if "X-Blocked" in request.headers:
        raise web.HTTPForbidden(text="blocked by the application")
    return await handler(request)


def aiohttp_app(gateway: FakeGateway, *, sub_applications: bool = False) -> web.Application:
    """The application; its routes in a sub-application each, or its own."""
    app = web.Application(middlewares=[blocking])
    for prefix in ("/credit", "/metered", "/paid"):
        if sub_applications:
            sub = web.Application()
            sub.router.add_route("*", "/{name}", aiohttp_handler)
            app.add_subapp(prefix, sub)
        else:
            app.router.add_route("*", prefix + "/{name}", aiohttp_handler)
    aiohttp_middleware.setup_l402(app, gateway)
    return app


async def starlette_handler(request: Request) -> Response:
    name = request.path_params["name"]
    if name == "fail":
        return JSONResponse({}, status_code=503)
    if name == "forbidden":
        return JSONResponse({}, status_code=403)
    if name == "cost":
        asgi.report_cost(request.scope, int(request.query_params["msat"]))
    if name == "forged":
        return JSONResponse({}, headers={BALANCE: "999999"})
    return JSONResponse({"bytes": len(await request.body())})


async def starlette_socket(socket: WebSocket) -> None:
    await socket.accept()
    await socket.send_text("hello")
    await socket.close()


def asgi_app() -> ASGIApp:
    starlette = Starlette(
        routes=[
            WebSocketRoute("/credit/socket", starlette_socket),
            *(
                Route(prefix + "/{name}", starlette_handler, methods=["GET", "POST"])
                for prefix in ("/credit", "/metered", "/paid")
            ),
        ]
    )

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/credit/raise":
            raise RuntimeError("the app broke before answering")  # no Starlette 500 first
        await starlette(scope, receive, send)

    return app


async def upstream_handler(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name == "fail":
        return web.json_response({}, status=503)
    if name == "forbidden":
        return web.json_response({}, status=403)
    if name == "slow":
        await asyncio.sleep(5)
    headers = {COST: request.query["msat"]} if "msat" in request.query else {}
    if name == "forged":
        headers[BALANCE] = "999999"
    if name == "stream":  # longer than the proxy reads in one go: streamed to the client
        return web.Response(body=b"x" * 200_000, headers=headers)
    body = json.dumps({"bytes": len(await request.read())})
    return web.Response(text=body, content_type="application/json", headers=headers)


def upstream_app() -> web.Application:
    app = web.Application()
    for prefix in ("/credit", "/metered", "/paid"):
        app.router.add_route("*", prefix + "/{name}", upstream_handler)
    return app


@dataclass
class Front:
    """One front end serving the application, and the charges finished through it."""

    url: str
    port: int
    gateway: FakeGateway
    http: aiohttp.ClientSession
    finished: list[Finished] = field(default_factory=list)

    def spy(self) -> None:
        """Record every ``finish_charge`` of the running service."""
        service = self.gateway.service
        assert service is not None
        real = service.finish_charge

        async def finish_charge(
            charge: CreditCharge, *, status: int | None, cost: str | int | None, served: bool = True
        ) -> int | None:
            self.finished.append((charge.reservation_id, status if served else "unserved", cost))
            return await real(charge, status=status, cost=cost, served=served)

        service.finish_charge = finish_charge  # type: ignore[method-assign]

    async def get(
        self,
        path: str,
        authorization: str | None = None,
        *,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        data: bytes | None = None,
    ) -> tuple[aiohttp.ClientResponse, bytes]:
        """``method path``, with ``authorization``: the response and its body."""
        headers = dict(headers or {})
        if authorization:
            headers["Authorization"] = authorization
        async with self.http.request(
            method, self.url + path, headers=headers, data=data
        ) as response:
            return response, await response.read()

    async def buy(self, path: str = "/credit/ok") -> str:
        """Buy credit on ``path``'s route; the ``Authorization`` value that spends it."""
        response, body = await self.get(path)
        assert response.status == 402, body
        return self.gateway.pay(json.loads(body))

    async def balance(self, authorization: str) -> int:
        response, body = await self.get(TOKEN_INFO_PATH, authorization)
        assert response.status == 200, body
        info = json.loads(body)
        assert info["reserved_msat"] == 0  # nothing left held
        balance: int = info["balance_msat"]
        return balance


@contextlib.asynccontextmanager
async def serving(
    kind: str, gateway: FakeGateway, upstream: str | None = None, **proxy_options: Any
) -> AsyncIterator[Front]:
    """``kind``'s front end on a loopback port (a proxy in front of ``upstream``, or of the
    test's own upstream application), the spy on its service."""
    async with contextlib.AsyncExitStack() as stack:

        async def started(app: web.Application) -> str:
            server = TestServer(app)
            await server.start_server()
            stack.push_async_callback(server.close)
            return str(server.make_url("")).rstrip("/")

        if kind in ("aiohttp", "aiohttp-subapps"):
            url = await started(aiohttp_app(gateway, sub_applications=kind != "aiohttp"))
        elif kind == "asgi":
            url = await stack.enter_async_context(
                uvicorn_serving(L402Middleware(asgi_app(), gateway))
            )
        else:
            upstream = upstream or await started(upstream_app())
            url = await started(build_proxy(upstream, gateway, **proxy_options))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        front = Front(url, int(url.rsplit(":", 1)[1]), gateway, http)
        front.spy()
        yield front


# --- the balance header and what is charged ---------------------------------------------------


@pytest.mark.parametrize("kind", FRONT_ENDS)
async def test_every_credit_response_carries_the_balance_after_it(kind: str) -> None:
    async with serving(kind, FakeGateway(RULES)) as front:
        authorization = await front.buy()
        expected = CREDIT
        # Served, refused by the application, missing: each charged the price. (The aiohttp
        # middleware prices the application's routes: a path none takes is neither priced
        # nor charged; a backend or an ASGI app answers 404 for it itself.)
        routed = kind != "aiohttp"
        for name in ("ok", "forbidden", "no/such/route", "ok"):
            response, body = await front.get(f"/credit/{name}", authorization)
            if name == "no/such/route" and not routed:
                assert (response.status, BALANCE in response.headers) == (404, False)
                continue
            expected -= PRICE
            assert response.headers[BALANCE] == str(expected), (name, response.status, body)
        # A backend failure is not charged, and still says the balance.
        response, _ = await front.get("/credit/fail", authorization)
        assert (response.status, response.headers[BALANCE]) == (503, str(expected))
        assert await front.balance(authorization) == expected
        statuses = [200, 403, 404, 200, 503] if routed else [200, 403, 200, 503]
        assert [status for _, status, _ in front.finished] == statuses
        # A token route's responses carry no balance.
        paid = await front.buy("/paid/ok")
        response, _ = await front.get("/paid/ok", paid)
        assert response.status == 200
        assert BALANCE not in response.headers


@pytest.mark.parametrize("kind", FRONT_ENDS)
async def test_the_credit_402_says_what_it_buys_and_what_a_request_costs(kind: str) -> None:
    async with serving(kind, FakeGateway(RULES)) as front:
        response, body = await front.get("/credit/ok")
        assert response.status == 402
        assert response.headers["L402-Credit-Msat"] == str(CREDIT)
        assert response.headers["L402-Price-Msat"] == str(PRICE)
        assert BALANCE not in response.headers  # no token: no balance yet
        problem = json.loads(body)
        assert (problem["credit_msat"], problem["price_msat"], problem["balance_msat"]) == (
            CREDIT,
            PRICE,
            None,
        )
        assert problem["amount_msat"] == CREDIT
        # Spent down to less than the price: the top-up 402 carries the balance too.
        authorization = front.gateway.pay(problem)
        for _ in range(CREDIT // PRICE):
            assert (await front.get("/credit/ok", authorization))[0].status == 200
        response, body = await front.get("/credit/ok", authorization)
        assert response.status == 402, body
        assert response.headers[BALANCE] == "0"
        assert json.loads(body)["balance_msat"] == 0
        # A token route's 402 has none of it.
        response, body = await front.get("/paid/ok")
        assert "L402-Credit-Msat" not in response.headers
        assert "credit_msat" not in json.loads(body)


@pytest.mark.parametrize("kind", FRONT_ENDS)
async def test_a_metered_route_charges_the_reported_cost(kind: str) -> None:
    async with serving(kind, FakeGateway(RULES)) as front:
        authorization = await front.buy("/metered/cost?msat=1")
        expected = CREDIT
        for cost in (300, 0, 1000):
            response, _ = await front.get(f"/metered/cost?msat={cost}", authorization)
            expected -= cost
            assert response.status == 200
            assert response.headers[BALANCE] == str(expected)
            assert COST not in response.headers
        assert await front.balance(authorization) == expected
        assert [cost for _, _, cost in front.finished] == (
            ["300", "0", "1000"] if kind == "proxy" else [300, 0, 1000]
        )


@pytest.mark.parametrize("kind", ["aiohttp", "asgi"])
async def test_an_application_that_raises_is_not_charged(kind: str) -> None:
    async with serving(kind, FakeGateway(RULES)) as front:
        authorization = await front.buy()
        response, _ = await front.get("/credit/raise", authorization)
        assert response.status == 500
        assert await front.balance(authorization) == CREDIT
        assert [status for _, status, _ in front.finished] == [None]


async def test_an_asgi_websocket_is_charged_when_its_handshake_is_answered() -> None:
    async with serving("asgi", FakeGateway(RULES)) as front:
        authorization = await front.buy()
        url = front.url.replace("http", "ws", 1) + "/credit/socket"
        async with front.http.ws_connect(url, headers={"Authorization": authorization}) as ws:
            assert ws._response.headers[BALANCE] == str(CREDIT - PRICE)
            assert await ws.receive_str() == "hello"
        assert [status for _, status, _ in front.finished] == [101]
        # Refused before it is accepted: the 402 carries the credit headers.
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await front.http.ws_connect(url)
        assert refused.value.status == 402
        assert refused.value.headers is not None
        assert refused.value.headers["L402-Credit-Msat"] == str(CREDIT)
        assert await front.balance(authorization) == CREDIT - PRICE


async def test_a_streaming_aiohttp_handler_is_charged_when_it_prepares() -> None:
    async with serving("aiohttp", FakeGateway(RULES)) as front:
        authorization = await front.buy("/metered/ok")
        response, body = await front.get("/metered/stream?msat=250", authorization)
        assert (response.status, body) == (200, b"streamed")
        assert response.headers[BALANCE] == str(CREDIT - 250)
        assert await front.balance(authorization) == CREDIT - 250
        assert front.finished == [(front.finished[0][0], 200, 250)]


async def test_a_streamed_response_is_charged_though_its_handler_raises_after() -> None:
    async with serving("aiohttp", FakeGateway(RULES)) as front:
        authorization = await front.buy()
        url = front.url + "/credit/stream-broken"
        async with front.http.get(url, headers={"Authorization": authorization}) as response:
            assert response.status == 200
            assert response.headers[BALANCE] == str(CREDIT - PRICE)
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()  # cut off
        assert await front.balance(authorization) == CREDIT - PRICE
        assert [status for _, status, _ in front.finished] == [200]


async def test_an_aiohttp_websocket_is_charged_at_its_handshake() -> None:
    async with serving("aiohttp", FakeGateway(RULES)) as front:
        authorization = await front.buy()
        url = front.url.replace("http", "ws", 1) + "/credit/socket"
        async with front.http.ws_connect(url, headers={"Authorization": authorization}) as ws:
            assert ws._response.headers[BALANCE] == str(CREDIT - PRICE)
            assert await ws.receive_str() == "hello"
        assert await front.balance(authorization) == CREDIT - PRICE
        assert [status for _, status, _ in front.finished] == [101]


@pytest.mark.parametrize("kind", ["asgi", "proxy"])
async def test_a_backends_own_balance_header_never_reaches_the_client(kind: str) -> None:
    async with serving(kind, FakeGateway(RULES)) as front:
        authorization = await front.buy()
        response, _ = await front.get("/credit/forged", authorization)
        assert response.status == 200
        assert response.headers.getall(BALANCE) == [str(CREDIT - PRICE)]
        paid = await front.buy("/paid/ok")
        response, _ = await front.get("/paid/forged", paid)
        assert response.status == 200
        assert BALANCE not in response.headers


# --- the reverse proxy ------------------------------------------------------------------------


async def test_the_proxy_charges_a_streamed_response_before_it_starts() -> None:
    async with serving("proxy", FakeGateway(RULES)) as front:
        authorization = await front.buy("/metered/ok")
        response, body = await front.get("/metered/stream?msat=400", authorization)
        assert (response.status, len(body)) == (200, 200_000)
        assert response.headers[BALANCE] == str(CREDIT - 400)
        assert COST not in response.headers


@pytest.mark.parametrize("cost", ["-5", "abc", "1001", "1.5"])
async def test_the_proxy_charges_the_price_for_a_cost_it_cannot_take(cost: str) -> None:
    async with serving("proxy", FakeGateway(RULES)) as front:
        authorization = await front.buy("/metered/ok")
        response, _ = await front.get(f"/metered/cost?msat={cost}", authorization)
        assert response.status == 200
        assert COST not in response.headers
        assert response.headers[BALANCE] == str(CREDIT - PRICE)


async def test_the_proxy_strips_the_cost_header_on_any_route() -> None:
    async with serving("proxy", FakeGateway(RULES)) as front:
        authorization = await front.buy("/paid/ok")
        response, _ = await front.get("/paid/ok?msat=5", authorization)
        assert response.status == 200
        assert COST not in response.headers


# Credit routes that also charge a failed request: a request nobody served is still free.
CHARGING_FAILURES = tuple(
    replace(rule, credit=replace(rule.credit, charge_failures=True)) if rule.credit else rule
    for rule in RULES
)


@pytest.mark.parametrize(("rules", "charged"), [(RULES, 0), (CHARGING_FAILURES, PRICE)])
async def test_an_unreachable_upstream_is_charged_only_where_failures_are(
    rules: tuple[Rule, ...], charged: int
) -> None:
    with socket_without_listener() as upstream:
        async with serving("proxy", FakeGateway(rules), upstream=upstream) as front:
            authorization = await front.buy()
            response, _ = await front.get("/credit/ok", authorization)
            assert (response.status, response.headers[BALANCE]) == (502, str(CREDIT - charged))
            assert [status for _, status, _ in front.finished] == [None]


async def test_an_upstream_that_times_out_is_not_charged() -> None:
    async with serving("proxy", FakeGateway(RULES), upstream_timeout=0.3) as front:
        authorization = await front.buy()
        response, _ = await front.get("/credit/slow", authorization)
        assert response.status == 502
        assert response.headers[BALANCE] == str(CREDIT)
        assert [status for _, status, _ in front.finished] == [None]


@contextlib.contextmanager
def socket_without_listener() -> Iterator[str]:
    """The URL of a loopback port that nothing listens on (held bound, never listening)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def _wsgi_metered(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), (COST, "250")])
    return [b"computed"]


@pytest.fixture
def wsgi_metered() -> Iterator[str]:
    server: WSGIServer = make_server("127.0.0.1", 0, _wsgi_metered, handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


async def test_the_proxy_charges_a_wsgi_backends_reported_cost(wsgi_metered: str) -> None:
    async with serving("proxy", FakeGateway(RULES), upstream=wsgi_metered) as front:
        authorization = await front.buy("/metered/x")
        for expected in (CREDIT - 250, CREDIT - 500):
            response, body = await front.get("/metered/x", authorization)
            assert (response.status, body) == (200, b"computed")
            assert COST not in response.headers
            assert response.headers[BALANCE] == str(expected)
        assert [cost for _, _, cost in front.finished] == ["250", "250"]


async def test_credit_routes_in_sub_applications_are_charged() -> None:
    async with serving("aiohttp-subapps", FakeGateway(RULES)) as front:
        authorization = await front.buy()
        for name in ("ok", "stream?msat=0"):  # answered, and sent by the handler itself
            response, _ = await front.get(f"/credit/{name}", authorization)
            assert response.status == 200
        assert await front.balance(authorization) == CREDIT - 2 * PRICE


async def test_credit_routes_need_setup_l402_on_the_main_application() -> None:
    sub = web.Application()
    sub.router.add_get("/{name}", aiohttp_handler)
    aiohttp_middleware.setup_l402(sub, FakeGateway(RULES))
    main = web.Application()
    main.add_subapp("/credit", sub)
    server = TestServer(main)
    try:
        with pytest.raises(ConfigError, match="setup_l402 on the main application"):
            await server.start_server()
    finally:
        await server.close()


# --- Expect: 100-continue ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["aiohttp", "proxy"])
async def test_a_charge_made_before_100_continue_is_finished_once(kind: str) -> None:
    async with serving(kind, FakeGateway(RULES), max_body_bytes=2000) as front:
        authorization = await front.buy()
        assert json.loads(await continued(front.port, "/credit/upload", authorization)) == {
            "bytes": 1000
        }
        assert [status for _, status, _ in front.finished] == [200]
        assert await front.balance(authorization) == CREDIT - PRICE


@pytest.mark.parametrize("rules", [RULES, CHARGING_FAILURES], ids=["", "charging_failures"])
async def test_a_body_refused_before_100_continue_is_not_charged(rules: tuple[Rule, ...]) -> None:
    async with serving("proxy", FakeGateway(rules), max_body_bytes=2000) as front:
        authorization = await front.buy()
        problem = await refused_first(
            front.port, "/credit/upload", 413, headers={"Authorization": authorization}, length=2001
        )
        assert problem["status"] == 413
        assert [status for _, status, _ in front.finished] == ["unserved"]
        assert await front.balance(authorization) == CREDIT
        # Without Expect, the same body is refused before the upstream gets it.
        response, _ = await front.get(
            "/credit/upload", authorization, method="POST", data=b"x" * 2001
        )
        assert (response.status, response.headers[BALANCE]) == (413, str(CREDIT))
        assert [status for _, status, _ in front.finished] == ["unserved"] * 2


@pytest.mark.parametrize("rules", [RULES, CHARGING_FAILURES], ids=["", "charging_failures"])
async def test_a_charge_held_before_100_continue_is_released_if_a_middleware_answers(
    rules: tuple[Rule, ...],
) -> None:
    """The decision on an Expect request holds its price before the application's own
    middlewares run: when one of them answers, the handler never had the request."""
    async with serving("aiohttp", FakeGateway(rules)) as front:
        authorization = await front.buy()
        headers = {"Authorization": authorization, "X-Blocked": "1"}
        async with exchange(front.port, "/credit/upload", headers) as http:
            assert await http.status() == b"HTTP/1.1 100 Continue\r\n"
            assert await http.status() == b"\r\n"
            http.writer.write(BODY)
            assert (await http.status()).startswith(b"HTTP/1.1 403 ")
            head, body = await http.response()
        assert body == b"blocked by the application"
        assert f"{BALANCE}: {CREDIT}\r\n".lower().encode() in head.lower()
        assert [status for _, status, _ in front.finished] == ["unserved"]
        assert await front.balance(authorization) == CREDIT
        # Without Expect the middleware answers before any decision: nothing is held.
        response, _ = await front.get("/credit/upload", authorization, headers={"X-Blocked": "1"})
        assert response.status == 403
        assert await front.balance(authorization) == CREDIT


# --- the token info and withdraw endpoints ----------------------------------------------------


@pytest.mark.parametrize("kind", FRONT_ENDS)
async def test_token_info_reports_the_account(kind: str) -> None:
    async with serving(kind, FakeGateway(RULES)) as front:
        authorization = await front.buy()
        await front.get("/credit/first", authorization)
        await front.get("/credit/second", authorization)
        response, body = await front.get(TOKEN_INFO_PATH, authorization)
        assert response.status == 200
        assert response.headers["Cache-Control"] == "no-store"
        info = json.loads(body)
        assert info["service"] == "credit"
        assert (info["credited_msat"], info["spent_msat"], info["balance_msat"]) == (
            CREDIT,
            2 * PRICE,
            CREDIT - 2 * PRICE,
        )
        assert [(use["path"], use["amount_msat"]) for use in info["recent"]] == [
            ("/credit/second", PRICE),
            ("/credit/first", PRICE),
        ]


@pytest.mark.parametrize("kind", FRONT_ENDS)
async def test_token_info_refuses_what_it_cannot_answer(kind: str) -> None:
    async with serving(kind, FakeGateway(RULES)) as front:
        response, body = await front.get(TOKEN_INFO_PATH, method="POST")
        assert (response.status, response.headers["Allow"]) == (405, "GET")
        response, body = await front.get(TOKEN_INFO_PATH)
        assert response.status == 401, body
        assert json.loads(body)["detail"]
        response, body = await front.get(TOKEN_INFO_PATH, "L402 bm90IGEgbWFjYXJvb24=:00")
        assert response.status == 401, body
        # A token bought on a token route has no account.
        paid = await front.buy("/paid/ok")
        response, body = await front.get(TOKEN_INFO_PATH, paid)
        assert response.status == 404
        assert json.loads(body)["detail"] == "this token has no credit account"


@pytest.mark.parametrize("kind", FRONT_ENDS)
async def test_withdraw_refuses_bad_requests(kind: str) -> None:
    async with serving(kind, FakeGateway(RULES)) as front:
        authorization = await front.buy()
        json_type = {"Content-Type": "application/json"}

        async def post(data: bytes, headers: dict[str, str] | None = None) -> tuple[int, str]:
            response, body = await front.get(
                WITHDRAW_PATH,
                authorization,
                method="POST",
                data=data,
                headers=headers or json_type,
            )
            detail: str = json.loads(body)["detail"]
            return response.status, detail

        response, _ = await front.get(WITHDRAW_PATH, authorization)
        assert (response.status, response.headers["Allow"]) == (405, "POST")
        assert (await post(b'{"invoice": "lnbc1"}', {"Content-Type": "text/plain"}))[0] == 415
        assert await post(b"{not json") == (400, "body must be JSON")
        for shape in (b"{}", b"[]", b'{"invoice": 5}', b'{"invoice": " "}'):
            assert await post(shape) == (400, 'body must be {"invoice": "<BOLT11 invoice>"}')
        assert (await post(b'{"invoice": "' + b"x" * 20_000 + b'"}'))[0] == 413
        # Well formed, but withdrawals are off by default.
        assert await post(b'{"invoice": "lnbcrt1"}') == (404, "withdrawals are not enabled")


@pytest.mark.parametrize("kind", FRONT_ENDS)
async def test_a_withdrawal_pays_the_holders_invoice_from_the_balance(kind: str) -> None:
    gateway = FakeGateway(RULES)
    payer = FakePayer()
    gateway.options["withdrawer"] = Withdrawer(
        store=gateway.store, payer=payer, decode=bolt11.decode, clock=gateway.clock
    )
    holder_key = "22" * 32  # the holder's node, not the gateway's

    async def withdraw(amount_msat: int, authorization: str | None) -> tuple[int, Any]:
        invoice = make_invoice(secrets.token_bytes(32), amount_msat, key=holder_key)
        response, body = await front.get(
            WITHDRAW_PATH,
            authorization,
            method="POST",
            data=json.dumps({"invoice": invoice}).encode(),
            headers={"Content-Type": "application/json"},
        )
        return response.status, json.loads(body)

    async with serving(kind, gateway) as front:
        authorization = await front.buy()
        status, outcome = await withdraw(5_000, authorization)
        assert status == 200, outcome
        assert (outcome["state"], outcome["amount_msat"], outcome["balance_msat"]) == (
            "SUCCEEDED",
            5_000,
            CREDIT - 5_000,
        )
        assert sum(payer.paid.values()) == 1
        assert await front.balance(authorization) == CREDIT - 5_000
        # More than the balance leaves for the fee reserve: refused, nothing paid.
        status, problem = await withdraw(CREDIT - 5_000, authorization)
        assert status == 400
        assert "balance" in problem["detail"]
        assert (await withdraw(1_000, None))[0] == 401
        assert sum(payer.paid.values()) == 1
