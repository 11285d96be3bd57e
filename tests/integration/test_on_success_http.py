"""Pay on success over HTTP, in process: the reverse proxy (``build_proxy``) in front of a real
aiohttp backend on a loopback port, the fake node with hold invoices, the memory store, and
the hold executor running stored requests with the ``UpstreamRunner``.

What a payer sees: the 402 that keeps its request (``L402-Settle``), the request run once
when the payment is held, the stored answer on every retry with the credential, the refund
when the backend fails (503, too slow, unreachable, an answer too large), the limits on what
is kept (413, before 100 Continue too). And the front ends that cannot keep a request
(aiohttp middleware without a loader, ASGI) refusing such routes at startup.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from starlette.applications import Starlette

from gateway import l402
from gateway.config import ServerConfig
from gateway.errors import ConfigError
from gateway.ports import InvoiceState, Msat, PaymentHash, StoredRequest
from gateway.pricing import Rule
from gateway.runtime import running_runtime
from gateway.service import Deny, L402Service, PaidToken, RequestInfo
from gateway.service.on_success import HoldExecutor, HoldTerms, RunFailed
from gateway.supervisor import Supervisor
from gateway.web import ON_SUCCESS_NEEDS_PROXY
from gateway.web.aiohttp import setup_l402
from gateway.web.asgi import L402Middleware, l402_lifespan
from gateway.web.held import UpstreamRunner
from gateway.web.paywall import REDEEM_PATH
from gateway.web.proxy import build_proxy
from gateway.web.responses import BALANCE_HEADER, COST_HEADER, token_header_value
from tests.config_files import load_text, placeholder_lnd
from tests.fakes import FakeGateway
from tests.integration.asgi_helpers import startup_fails
from tests.integration.test_credit_http import socket_without_listener
from tests.integration.test_expect_continue import Exchange, exchange, refused_first

PRICE = 5_000
PROBLEM_JSON = "application/problem+json"
TERMS = HoldTerms(backend_timeout=1.0, max_request_bytes=1_000, max_response_bytes=1_000)
RULES = (
    Rule("/orders/*", price_msat=Msat(PRICE), service="orders", settle_on_success=True),
    Rule(
        "/accepted/*",
        price_msat=Msat(PRICE),
        service="accepted",
        settle_on_success=True,
        settle_statuses=frozenset({202}),
    ),
    Rule("/paid/*", price_msat=Msat(PRICE), service="paid"),
)
Seen = tuple[str, str, tuple[tuple[str, str], ...], bytes]  # method, target, headers, body
StarletteLifespan = Callable[[Starlette], AbstractAsyncContextManager[Mapping[str, Any]]]


# --- the backend ------------------------------------------------------------------------------


@dataclass
class Backend:
    """A real aiohttp application: what each name answers, and every request it got."""

    seen: list[Seen] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append((request.method, request.path_qs, tuple(request.headers.items()), body))
        name = request.match_info["name"]
        if name == "fail":
            return web.json_response({"error": "busy"}, status=503)
        if name == "slow":
            await asyncio.sleep(3)
        if name == "big":
            return web.Response(body=b"x" * 1_001)
        if name == "accepted":
            return web.json_response({"queued": True}, status=202)
        headers = {"Location": "/orders/1", COST_HEADER: "1", BALANCE_HEADER: "7", "X-Run": "1"}
        answer = {"run": len(self.seen), "bytes": len(body)}
        return web.json_response(answer, status=201, headers=headers)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{prefix}/{name}", self.handle)
        return app


class HoldGateway(FakeGateway):
    """``FakeGateway`` whose service keeps pay-on-success requests, with the hold executor
    running them against ``upstream`` (as ``running_runtime`` wires it)."""

    def __init__(self, upstream: str, terms: HoldTerms = TERMS) -> None:
        super().__init__(RULES)
        self.upstream = upstream
        self.terms = terms

    @contextlib.asynccontextmanager
    async def __call__(self) -> AsyncIterator[L402Service]:
        async with UpstreamRunner(self.upstream, connections=4) as runner:
            executor = HoldExecutor(
                backend=self.backend,
                store=self.store,
                clock=self.clock,
                runner=runner,
                pricing=self.pricing,
                terms=self.terms,
                poll_interval=0.05,
                initial_backoff=0.01,
            )
            self.options = {"hold_backend": self.backend, "hold": self.terms}
            self.options["on_held"] = executor.wake
            async with Supervisor(initial_backoff=0.01) as supervisor:
                supervisor.start("l402-hold-executor", executor.run)
                async with super().__call__() as service:
                    yield service


@dataclass
class Front:
    url: str
    port: int
    gateway: HoldGateway
    backend: Backend
    http: aiohttp.ClientSession

    async def send(
        self,
        path: str,
        *,
        method: str = "POST",
        authorization: str | None = None,
        headers: dict[str, str] | None = None,
        data: Any = None,
    ) -> tuple[aiohttp.ClientResponse, bytes]:
        headers = dict(headers or {})
        if authorization:
            headers["Authorization"] = authorization
        async with self.http.request(
            method, self.url + path, headers=headers, data=data
        ) as response:
            return response, await response.read()

    async def challenge(self, path: str, **options: Any) -> dict[str, Any]:
        response, body = await self.send(path, **options)
        assert response.status == 402, body
        assert response.headers["L402-Settle"] == f"on-success; timeout={TERMS.backend_timeout:g}"
        problem: dict[str, Any] = json.loads(body)
        return problem

    async def paid(self, challenge: dict[str, Any], final: InvoiceState) -> str:
        """The payer's HTLC for ``challenge`` is held; once the gateway ended it in ``final``,
        the credential (the preimage known only if it settled)."""
        payment_hash = bytes.fromhex(challenge["payment_hash"])
        self.gateway.backend.hold_payment(payment_hash)
        async with asyncio.timeout(5):
            async for invoice in self.gateway.backend.subscribe_single_invoice(
                PaymentHash(payment_hash)
            ):
                if invoice.state is final:
                    break
        held = await self.gateway.store.get_held_request(PaymentHash(payment_hash))
        assert held is not None
        return f"L402 {challenge['macaroon']}:{held.preimage.hex()}"

    async def redeem(self, challenge: dict[str, Any]) -> dict[str, Any]:
        response, body = await self.send(
            REDEEM_PATH,
            headers={"Content-Type": "application/json"},
            data=json.dumps({"macaroon": challenge["macaroon"]}),
        )
        assert response.status == 200, body
        document: dict[str, Any] = json.loads(body)
        return document


@contextlib.asynccontextmanager
async def serving(
    upstream: str | None = None, terms: HoldTerms = TERMS, **proxy_options: Any
) -> AsyncIterator[Front]:
    async with contextlib.AsyncExitStack() as stack:

        async def started(app: web.Application) -> str:
            server = TestServer(app)
            await server.start_server()
            stack.push_async_callback(server.close)
            return str(server.make_url("")).rstrip("/")

        backend = Backend()
        upstream = upstream or await started(backend.app())
        gateway = HoldGateway(upstream, terms)
        proxy_options.setdefault("max_held_body_bytes", terms.max_request_bytes)
        url = await started(build_proxy(upstream, gateway, **proxy_options))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        yield Front(url, int(url.rsplit(":", 1)[1]), gateway, backend, http)


def header_names(seen: Seen) -> list[str]:
    return [name.lower() for name, _ in seen[2]]


# --- paid, run once, replayed -----------------------------------------------------------------


async def test_a_paid_request_runs_once_and_every_retry_gets_its_stored_answer() -> None:
    async with serving() as front:
        challenge = await front.challenge(
            "/orders/new?size=2", data=b'{"item": 1}', headers={"X-Order": "a"}
        )
        assert front.backend.seen == []  # nothing runs before the payment is held
        assert (await front.redeem(challenge))["state"] == "pending"
        credential = await front.paid(challenge, InvoiceState.SETTLED)
        ((method, target, headers, body),) = front.backend.seen
        assert (method, target, body) == ("POST", "/orders/new?size=2", b'{"item": 1}')
        sent = dict(headers)
        assert sent["X-Order"] == "a"
        token = json.loads(sent["X-L402-Token"])
        assert token["payment_hash"] == challenge["payment_hash"]
        assert token["service"] == "orders"
        assert "Authorization" not in sent
        # The payer retries, with another body even: the stored answer, never a second run.
        for data in (b'{"item": 1}', b'{"item": 2}', b""):
            response, answer = await front.send(
                "/orders/new?size=2", authorization=credential, data=data
            )
            assert response.status == 201
            assert json.loads(answer) == {"run": 1, "bytes": 11}
            assert response.headers["Location"] == "/orders/1"
            assert response.headers["X-Run"] == "1"
            # Only the gateway's own cost and balance headers ever reach a client.
            assert COST_HEADER not in response.headers
            assert BALANCE_HEADER not in response.headers
        assert len(front.backend.seen) == 1
        redeemed = await front.redeem(challenge)
        assert redeemed["state"] == "settled"
        assert "failure" not in redeemed


async def test_the_credential_answers_only_the_request_it_paid_for() -> None:
    async with serving() as front:
        challenge = await front.challenge("/orders/new?q=a+b%25", data=b"{}")
        credential = await front.paid(challenge, InvoiceState.SETTLED)
        # The target as sent, compared undecoded: the same request is answered.
        response, _ = await front.send("/orders/new?q=a+b%25", authorization=credential)
        assert response.status == 201
        for path, method in (
            ("/orders/other?q=a+b%25", "POST"),
            ("/orders/new?q=a+b%25", "PUT"),
            ("/orders/new?q=a%20b%25", "POST"),
            ("/orders/new", "POST"),
        ):
            response, body = await front.send(path, method=method, authorization=credential)
            assert response.status == 409, body
            assert json.loads(body)["detail"] == "this token paid for another request"
        assert len(front.backend.seen) == 1


async def test_a_route_settles_on_its_own_statuses() -> None:
    async with serving() as front:
        challenge = await front.challenge("/accepted/accepted")
        credential = await front.paid(challenge, InvoiceState.SETTLED)
        response, body = await front.send("/accepted/accepted", authorization=credential)
        assert (response.status, json.loads(body)) == (202, {"queued": True})
        # 201 is a success, but not one this route settles on: refunded.
        challenge = await front.challenge("/accepted/created")
        await front.paid(challenge, InvoiceState.CANCELED)
        redeemed = await front.redeem(challenge)
        assert (redeemed["state"], redeemed["failure"]) == ("refunded", "backend failed with 201")


async def test_the_held_request_carries_the_headers_an_ordinary_paid_request_would() -> None:
    """The stored request's headers are those ``send`` forwards: the same function."""
    cookie = "session=s1; L402=secret:00; theme=dark"
    headers = {
        "X-Order": "a",
        "Cookie": cookie,
        "X-L402-Token": "forged",
        "X-Forwarded-For": "9.9.9.9",
    }
    async with serving() as front:
        challenge = await front.challenge("/orders/x", data=b"body", headers=headers)
        await front.paid(challenge, InvoiceState.SETTLED)
        response, body = await front.send("/paid/x", method="GET")
        assert response.status == 402
        authorization = front.gateway.pay(json.loads(body))
        response, _ = await front.send(
            "/paid/x", authorization=authorization, data=b"body", headers=headers
        )
        assert response.status == 201
        held, forwarded = front.backend.seen
        assert header_names(held) == header_names(forwarded)
        held_headers, forwarded_headers = dict(held[2]), dict(forwarded[2])
        for name in ("X-Order", "Cookie", "X-Forwarded-For", "X-Forwarded-Proto", "Host"):
            assert held_headers[name] == forwarded_headers[name], name
        assert held_headers["Cookie"] == "session=s1; theme=dark"  # the L402 cookie is not
        assert held_headers["X-Forwarded-For"] == "127.0.0.1"  # not the client's claim
        assert json.loads(held_headers["X-L402-Token"])["service"] == "orders"  # not forged


async def test_the_paywall_page_of_such_a_route_carries_the_settle_header_too() -> None:
    async with serving() as front:
        response, body = await front.send(
            "/orders/page", method="GET", headers={"Accept": "text/html"}
        )
        assert response.status == 402, body
        assert response.headers["Content-Type"].startswith("text/html")
        assert response.headers["L402-Settle"] == "on-success; timeout=1"
        # An ordinary route's challenge has none.
        response, _ = await front.send("/paid/x", method="GET")
        assert response.status == 402
        assert "L402-Settle" not in response.headers


# --- refunded ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "failure"),
    [
        ("fail", "backend failed with 503"),
        ("slow", "backend timed out after 1 s"),
        ("big", "response over 1000 bytes"),
    ],
)
async def test_a_failed_request_is_refunded_and_its_credential_gets_a_new_challenge(
    name: str, failure: str
) -> None:
    async with serving() as front:
        challenge = await front.challenge(f"/orders/{name}")
        await front.paid(challenge, InvoiceState.CANCELED)
        payment_hash = PaymentHash(bytes.fromhex(challenge["payment_hash"]))
        record = await front.gateway.store.get_invoice(payment_hash)
        assert record is not None
        assert record.state is InvoiceState.CANCELED
        assert front.gateway.backend.settled[payment_hash] == 0
        redeemed = await front.redeem(challenge)
        assert (redeemed["state"], redeemed["failure"]) == ("refunded", failure)
        # The payer never learnt the preimage; its macaroon gets a fresh challenge saying why.
        guessed = f"L402 {challenge['macaroon']}:{'00' * 32}"
        response, body = await front.send(f"/orders/{name}", authorization=guessed)
        assert response.status == 402, body
        assert json.loads(body)["detail"] == l402.ChallengeReason.REFUNDED
        assert json.loads(body)["payment_hash"] != challenge["payment_hash"]
        assert len(front.backend.seen) == 1


async def test_an_unreachable_backend_is_refunded() -> None:
    with socket_without_listener() as nowhere:
        async with serving(upstream=nowhere) as front:
            challenge = await front.challenge("/orders/new")
            await front.paid(challenge, InvoiceState.CANCELED)
            redeemed = await front.redeem(challenge)
            assert (redeemed["state"], redeemed["failure"]) == ("refunded", "backend unreachable")


# --- what is kept, and the limits -------------------------------------------------------------


async def test_a_body_over_the_limit_gets_413_and_no_invoice() -> None:
    async with serving() as front:

        async def chunked(parts: int) -> AsyncIterator[bytes]:
            for _ in range(parts):
                yield b"x" * 100

        for data in (b"x" * 1_001, chunked(11)):
            response, body = await front.send("/orders/new", data=data)
            assert response.status == 413, body
            assert json.loads(body)["detail"] == (
                "body over 1000 bytes: this request's body is read before it is priced "
                "(a pay-on-success route keeps it until paid; a POST's may name another method)"
            )
        assert front.gateway.backend.invoices == {}
        # At the limit it is kept, and a chunked one reaches the backend whole.
        for data in (b"x" * 1_000, chunked(10)):
            challenge = await front.challenge("/orders/new", data=data)
            await front.paid(challenge, InvoiceState.SETTLED)
            assert front.backend.seen[-1][3] == b"x" * 1_000
            assert dict(front.backend.seen[-1][2])["Content-Length"] == "1000"


@pytest.mark.parametrize("expect", [True, False])
async def test_an_encoded_separator_is_refused_before_anything_is_kept(expect: bool) -> None:
    async with serving() as front:
        if expect:
            problem = await refused_first(front.port, "/orders/a%2Fb", 400)
        else:
            response, body = await front.send("/orders/a%2Fb", data=b"x")
            assert response.status == 400
            problem = json.loads(body)
        assert problem["detail"] == "path must not contain an encoded '/' or '\\'"
        assert front.gateway.backend.invoices == {}


async def test_the_servers_body_limit_caps_what_is_kept() -> None:
    async with serving(max_body_bytes=500) as front:
        response, body = await front.send("/orders/new", data=b"x" * 501)
        assert response.status == 413
        assert json.loads(body)["detail"].startswith(
            "body over 500 bytes: this request's body is read"
        )


async def test_100_continue_is_sent_for_a_body_that_is_kept() -> None:
    async with (
        serving() as front,
        exchange(front.port, "/orders/new", length=1_000) as http,
    ):
        assert await http.status() == b"HTTP/1.1 100 Continue\r\n"
        assert await http.status() == b"\r\n"
        http.writer.write(b"b" * 1_000)
        assert (await http.status()).startswith(b"HTTP/1.1 402 ")
        head, body = await http.response()
        assert b"\r\nl402-settle: on-success; timeout=1\r\n" in head.lower()
        challenge = json.loads(body)
        await front.paid(challenge, InvoiceState.SETTLED)
        assert front.backend.seen[0][3] == b"b" * 1_000


async def test_a_body_over_the_limit_is_refused_before_100_continue() -> None:
    async with serving() as front:
        problem = await refused_first(front.port, "/orders/new", 413, length=1_001)
        assert problem["detail"].startswith("body over 1000 bytes")
        assert front.gateway.backend.invoices == {}


async def test_a_replay_before_100_continue_is_the_final_answer() -> None:
    async with serving() as front:
        challenge = await front.challenge("/orders/new", data=b"b" * 1_000)
        credential = await front.paid(challenge, InvoiceState.SETTLED)
        async with exchange(
            front.port, "/orders/new", {"Authorization": credential}, length=1_000
        ) as http:
            assert (await http.status()).startswith(b"HTTP/1.1 201 ")
            head, body = await http.response()
            assert b"\r\nconnection: close\r\n" in head.lower()
            assert json.loads(body) == {"run": 1, "bytes": 1_000}
        assert len(front.backend.seen) == 1


@contextlib.asynccontextmanager
async def uploading(port: int, client: str, *, expect: bool = True) -> AsyncIterator[Exchange]:
    """A raw ``POST /orders/new`` from ``client`` (its X-Forwarded-For) declaring a body of
    1000 bytes; without ``Expect: 100-continue``, 10 of them go at once."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = ["POST /orders/new HTTP/1.1", "Host: x", "Content-Length: 1000"]
    lines += [f"X-Forwarded-For: {client}", *(["Expect: 100-continue"] if expect else [])]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if expect else b"x" * 10))
    try:
        yield Exchange(reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def slow_upload(stack: contextlib.AsyncExitStack, port: int, client: str) -> Exchange:
    """An upload from ``client`` that got 100 Continue and sent 10 bytes of its body (which
    is being read now), kept open by ``stack``; tried again (up to 5 s) while refused with
    429."""
    async with asyncio.timeout(5):
        while True:
            async with contextlib.AsyncExitStack() as attempt:
                http = await attempt.enter_async_context(uploading(port, client))
                line = await http.status()
                if line == b"HTTP/1.1 100 Continue\r\n":
                    assert await http.status() == b"\r\n"
                    http.writer.write(b"x" * 10)
                    stack.push_async_exit(attempt.pop_all())
                    return http
                assert line.startswith(b"HTTP/1.1 429 "), line
            await asyncio.sleep(0.02)


async def test_slow_bodies_to_keep_count_against_the_clients_unpaid_requests() -> None:
    """A pay-on-success challenge reads the body before the 402: those reads are requests
    without a paid token under way, capped per client like the forwarded ones."""
    one, other = "198.51.100.1", "198.51.100.2"
    terms = dataclasses.replace(TERMS, max_outstanding_per_client=8)
    async with (
        serving(terms=terms, unpaid_requests_per_client=2, trust_forwarded_for=True) as front,
        contextlib.AsyncExitStack() as stack,
    ):
        first = await slow_upload(stack, front.port, one)
        second = await slow_upload(stack, front.port, one)
        # The third is refused at once, its body unread (the connection closes), no invoice.
        for expect in (False, True):
            async with uploading(front.port, one, expect=expect) as third:
                assert (await third.status()).startswith(b"HTTP/1.1 429 ")
                head, body = await third.response()
                assert b"\r\nretry-after: 1\r\n" in head.lower()
                assert b"\r\nconnection: close\r\n" in head.lower()
                detail = "2 requests without a paid token are under way"
                assert json.loads(body)["detail"] == detail
        assert front.gateway.backend.invoices == {}
        # Another client is not affected.
        await front.challenge("/orders/new", data=b"x" * 1_000, headers={"X-Forwarded-For": other})
        assert len(front.gateway.backend.invoices) == 1
        # A finished upload frees its slot...
        first.writer.write(b"x" * 990)
        assert (await first.status()).startswith(b"HTTP/1.1 402 ")
        third = await slow_upload(stack, front.port, one)
        # ... and so does one cut short.
        second.writer.close()
        fourth = await slow_upload(stack, front.port, one)
        async with uploading(front.port, one) as fifth:
            assert (await fifth.status()).startswith(b"HTTP/1.1 429 ")
        for http in (third, fourth):
            http.writer.write(b"x" * 990)
            assert (await http.status()).startswith(b"HTTP/1.1 402 ")
        assert len(front.gateway.backend.invoices) == 4


# --- the runner on its own --------------------------------------------------------------------


TOKEN = PaidToken("ab" * 32, "cd" * 32, "orders", 0, None, None, PRICE)


async def test_the_runner_sends_the_request_verbatim_with_the_token() -> None:
    backend = Backend()
    server = TestServer(backend.app())
    await server.start_server()
    try:
        upstream = str(server.make_url("")).rstrip("/")
        async with UpstreamRunner(upstream, token_header="X-Paid") as runner:
            request = StoredRequest(
                "POST", "/orders/a%20b?q=%2F", (("X-Order", "a"), ("X-Paid", "forged")), b"hi"
            )
            response = await runner.run(request, TOKEN, timeout=5, max_response_bytes=1_000)
        ((method, target, headers, body),) = backend.seen
        assert (method, target, body) == ("POST", "/orders/a%20b?q=%2F", b"hi")
        names = [name.lower() for name, _ in headers]
        assert "user-agent" not in names
        assert "accept-encoding" not in names
        assert dict(headers)["X-Paid"] == token_header_value(TOKEN)
        assert response.status == 201
        assert json.loads(response.body) == {"run": 1, "bytes": 2}
        kept = dict(response.headers)
        assert kept["Location"] == "/orders/1"
        assert COST_HEADER not in kept
        assert BALANCE_HEADER not in kept
    finally:
        await server.close()


async def test_the_runner_says_why_there_is_no_answer() -> None:
    loop_errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, error: loop_errors.append(error))
    backend = Backend()
    server = TestServer(backend.app())
    await server.start_server()
    try:
        upstream = str(server.make_url("")).rstrip("/")
        async with UpstreamRunner(upstream) as runner:
            for target, failure in (
                ("/orders/slow", "backend timed out after 0.5 s"),
                ("/orders/big", "response over 1000 bytes"),
            ):
                with pytest.raises(RunFailed) as raised:
                    await runner.run(
                        StoredRequest("GET", target, ()),
                        TOKEN,
                        timeout=0.5,
                        max_response_bytes=1_000,
                    )
                assert raised.value.reason == failure
    finally:
        await server.close()
    with socket_without_listener() as nowhere:
        async with UpstreamRunner(nowhere) as runner:
            with pytest.raises(RunFailed) as raised:
                await runner.run(
                    StoredRequest("GET", "/x", ()), TOKEN, timeout=5, max_response_bytes=10
                )
            assert raised.value.reason == "backend unreachable"
            with pytest.raises(RunFailed) as raised:
                await runner.run(
                    StoredRequest("GET", "/x", (("X-Bad", "a\r\nX-Smuggled: 1"),)),
                    TOKEN,
                    timeout=5,
                    max_response_bytes=10,
                )
            assert raised.value.reason == "the stored request cannot be sent"
    # The deadlines of the run and of its connection fall together: neither is an error of
    # the event loop's.
    await asyncio.sleep(0.1)
    assert loop_errors == []


async def test_the_runner_frames_what_it_sends_and_what_has_no_body() -> None:
    # A POST without a body says Content-Length: 0; a length on a HEAD's, a 204's or a
    # 304's answer is another response's, not one over the limit.
    heads: list[bytes] = []
    answers = {
        b"HEAD": b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n",
        b"PUT": b"HTTP/1.1 204 No Content\r\nContent-Length: 5000\r\n\r\n",
        b"POST": b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5000\r\n\r\n",
    }

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        heads.append(head)
        writer.write(answers[head.split(b" ", 1)[0]])
        await writer.drain()
        writer.close()

    listening = await asyncio.start_server(answer, "127.0.0.1", 0)
    async with listening:
        upstream = f"http://127.0.0.1:{listening.sockets[0].getsockname()[1]}"
        async with UpstreamRunner(upstream) as runner:
            for method, status in (("HEAD", 200), ("PUT", 204), ("POST", 304)):
                response = await runner.run(
                    StoredRequest(method, "/orders/x", ()), TOKEN, timeout=5, max_response_bytes=10
                )
                assert (response.status, response.body) == (status, b"")
    assert b"\r\nContent-Length: 0\r\n" in heads[2]  # the POST's
    assert b"Content-Length" not in heads[0]  # the HEAD's


# --- front ends that cannot keep a request ------------------------------------------------------


@pytest.fixture
def gateway() -> FakeGateway:
    return FakeGateway(RULES)


async def test_the_aiohttp_middleware_without_a_loader_refuses_to_start(
    gateway: FakeGateway,
) -> None:
    app = web.Application()
    setup_l402(app, gateway)
    server = TestServer(app)
    with pytest.raises(ConfigError, match=re.escape(ON_SUCCESS_NEEDS_PROXY)):
        await server.start_server()
    await server.close()
    assert (gateway.entered, gateway.exited) == (1, 1)


async def test_the_asgi_middleware_refuses_to_start(gateway: FakeGateway) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("never reached")

    assert await startup_fails(L402Middleware(app, gateway))
    assert (gateway.entered, gateway.exited) == (1, 1)
    lifespan: StarletteLifespan = l402_lifespan(gateway)
    with pytest.raises(ConfigError, match=re.escape(ON_SUCCESS_NEEDS_PROXY)):
        async with lifespan(Starlette()):
            pass
    assert (gateway.entered, gateway.exited) == (2, 2)


async def test_the_middlewares_start_without_on_success_routes() -> None:
    gateway = FakeGateway(RULES[2:])
    app = web.Application()
    setup_l402(app, gateway)
    server = TestServer(app)
    await server.start_server()
    await server.close()
    lifespan: StarletteLifespan = l402_lifespan(gateway)
    async with lifespan(Starlette()) as state:
        assert state["l402_service"] is not None


# --- the runtime's wiring ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settle", "watch", "executor"),
    [("on_success", True, True), ("on_success", False, False), ("on_payment", True, False)],
)
async def test_the_runtime_runs_the_hold_executor_where_it_watches(
    tmp_path: Path, settle: str, watch: bool, executor: bool
) -> None:
    """Over an LND address nothing listens on: the tasks run (and retry), the service
    keeps requests with the ``[hold]`` terms, and the node's refusal is a 503."""
    lnd = placeholder_lnd(tmp_path).replace("[lnd]\n", '[lnd]\nhost = "127.0.0.1:9"\ntimeout = 2\n')
    config = load_text(
        tmp_path,
        f'{lnd}[store]\nurl = "memory:"\n[server]\nupstream = "http://127.0.0.1:9"\n'
        f'[[routes]]\npattern = "/a"\nprice_msat = 5\nsettle = "{settle}"\n',
    )
    async with running_runtime(config, watch=watch) as runtime:
        names = {task.name for task in runtime.health()}
        async with asyncio.timeout(5):
            # Where it watches, the task l402-leader starts the watcher and the executor.
            while watch and "l402-invoice-watcher" not in names:
                await asyncio.sleep(0.005)
                names = {task.name for task in runtime.health()}
        assert ("l402-hold-executor" in names) is executor
        if settle != "on_success":
            return
        loaded: list[bool] = []

        async def stored_request() -> StoredRequest:
            loaded.append(True)
            return StoredRequest("POST", "/a", ())

        info = RequestInfo("POST", "/a", "192.0.2.1", stored_request=stored_request)
        decision = await runtime.service.authorize(info)
        assert isinstance(decision, Deny)
        assert decision.status == 503  # not 501: the service was given the hold terms
        assert loaded == [True]


async def test_the_runtime_refuses_on_success_routes_without_an_upstream(tmp_path: Path) -> None:
    """A configuration built in code skips ``load_config``'s check: the runtime's holds."""
    config = load_text(
        tmp_path,
        f'{placeholder_lnd(tmp_path)}[store]\nurl = "memory:"\n[server]\nupstream = "http://b"\n'
        '[[routes]]\npattern = "/a"\nprice_msat = 5\nsettle = "on_success"\n',
    )
    config = dataclasses.replace(config, server=ServerConfig())
    with pytest.raises(ConfigError, match=r"need \[server\] upstream"):
        async with running_runtime(config):
            pass
