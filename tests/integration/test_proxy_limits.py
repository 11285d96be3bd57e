"""Unpaid traffic must not starve paying customers of the proxy: a pool of upstream
connections of their own, a cap on one client's unpaid requests, slow bodies cut with 408."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.examples import demo_api
from gateway.ports import Msat
from gateway.pricing import CreditTerms, Rule
from gateway.web.connections import ServerLimits
from gateway.web.proxy import build_proxy
from gateway.web.server import listening
from tests.fakes import FakeGateway
from tests.integration.test_proxy import PROBLEM_JSON, RULES, Client

FORTUNE = "/api/premium/fortune"
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Backend:
    """demo_api() plus ``/hold``, which reads the whole body: a slow one holds its upstream
    connection. ``arrived`` counts the requests it has started."""

    def __init__(self) -> None:
        self.arrived = asyncio.Queue[None]()
        self.app = demo_api()
        self.app.router.add_route("*", "/hold", self.hold)

    async def hold(self, request: web.Request) -> web.Response:
        self.arrived.put_nowait(None)
        return web.json_response({"bytes": len(await request.read())})


# /hold priced: a paid slow upload.
PAID_HOLD = Rule("/hold", price_msat=Msat(1), service="hold")


@contextlib.asynccontextmanager
async def proxy(
    rules: tuple[Rule, ...] = RULES, **options: Any
) -> AsyncIterator[tuple[Client, FakeGateway, Backend]]:
    backend = Backend()
    gateway = FakeGateway(rules)
    async with TestServer(backend.app) as upstream:
        app = build_proxy(str(upstream.make_url("")), gateway, **options)
        async with Client(TestServer(app)) as client:
            yield client, gateway, backend


@contextlib.asynccontextmanager
async def slow_upload(
    client: Client, headers: str = "", length: int = 1000
) -> AsyncIterator[Streams]:
    """A POST /hold whose headers and first 5 bytes are sent; the test sends the rest."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        f"POST /hold HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n{headers}\r\n".encode()
        + b"12345"
    )
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def status_and_head(reader: asyncio.StreamReader, limit: float = 5) -> tuple[int, bytes]:
    async with asyncio.timeout(limit):
        head = await reader.readuntil(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head


async def paid_fortune(client: Client, gateway: FakeGateway) -> None:
    response = await client.get(FORTUNE)
    assert response.status == 402
    authorization = gateway.pay(await response.json(content_type=PROBLEM_JSON))
    async with asyncio.timeout(2):
        response = await client.get(FORTUNE, headers={"Authorization": authorization})
        assert response.status == 200
        assert (await response.json())["paid"]["service"] == "premium"


async def test_slow_unpaid_uploads_holding_the_upstream_pool_do_not_stall_paid_ones() -> None:
    async with proxy(upstream_connections=2, unpaid_requests_per_client=0) as (
        client,
        gateway,
        backend,
    ):
        async with slow_upload(client), slow_upload(client):
            for _ in range(2):
                await asyncio.wait_for(backend.arrived.get(), 5)
            # The unpaid connections for requests with a body are all taken: another such
            # request waits for one.
            waiting = asyncio.create_task(client.post("/hold", data=b"x"))
            await asyncio.sleep(0.3)
            assert not waiting.done()
            await paid_fortune(client, gateway)
        assert (await asyncio.wait_for(waiting, 5)).status == 200


@pytest.mark.parametrize("stall", [True, False])
async def test_a_body_slower_than_the_minimum_rate_gets_408(stall: bool) -> None:
    async with proxy(body_timeout=0.3, min_body_rate=100) as (client, _gateway, backend):
        async with slow_upload(client) as (reader, writer):
            await asyncio.wait_for(backend.arrived.get(), 5)

            async def trickle() -> None:
                while not stall:  # 50 bytes a second
                    await asyncio.sleep(0.2)
                    writer.write(b"x" * 10)

            dripping = asyncio.create_task(trickle())
            try:
                status, head = await status_and_head(reader, limit=10)
            finally:
                dripping.cancel()
            assert status == 408
            assert b"\r\nConnection: close\r\n" in head
        # A body at the rate is not cut: 1000 bytes in 10 parts, 100 ms apart.
        async with slow_upload(client, length=1005) as (reader, writer):
            for _ in range(10):
                await asyncio.sleep(0.1)
                writer.write(b"y" * 100)
            status, _head = await status_and_head(reader)
            assert status == 200


async def test_one_clients_unpaid_requests_at_once_are_capped() -> None:
    async with (
        proxy(unpaid_requests_per_client=2, trust_forwarded_for=True) as (
            client,
            gateway,
            backend,
        ),
        slow_upload(client) as first,
        slow_upload(client),
    ):
        for _ in range(2):
            await asyncio.wait_for(backend.arrived.get(), 5)
        refused = await client.get("/health")
        assert refused.status == 429
        assert refused.headers["Retry-After"] == "1"
        problem = await refused.json(content_type=PROBLEM_JSON)
        assert problem["detail"] == "2 requests without a paid token are under way"
        # Not paid requests, nor another client.
        await paid_fortune(client, gateway)
        other = await client.get("/health", headers={"X-Forwarded-For": "198.51.100.7"})
        assert other.status == 200
        first[1].write(b"z" * 995)
        status, _head = await status_and_head(first[0])
        assert status == 200
        assert (await client.get("/health")).status == 200


async def test_one_tokens_requests_at_once_are_capped() -> None:
    async with proxy((*RULES, PAID_HOLD), requests_per_token=2) as (client, gateway, backend):
        response = await client.post("/hold")
        assert response.status == 402
        authorization = gateway.pay(await response.json(content_type=PROBLEM_JSON))
        paid = f"Authorization: {authorization}\r\n"
        async with slow_upload(client, paid) as first, slow_upload(client, paid):
            for _ in range(2):
                await asyncio.wait_for(backend.arrived.get(), 5)
            refused = await client.post(
                "/hold", data=b"x", headers={"Authorization": authorization}
            )
            assert refused.status == 429
            assert refused.headers["Retry-After"] == "1"
            problem = await refused.json(content_type=PROBLEM_JSON)
            assert problem["detail"] == "2 requests with this token are under way"
            # Another token's requests, and unpaid ones, go on.
            await paid_fortune(client, gateway)
            assert (await client.get("/health")).status == 200
            first[1].write(b"z" * 995)
            status, _head = await status_and_head(first[0])
            assert status == 200
            response = await client.post(
                "/hold", data=b"x", headers={"Authorization": authorization}
            )
            assert response.status == 200


# /hold billed from a prepaid balance: ten requests at the full price.
CREDIT_HOLD = Rule(
    "/hold",
    price_msat=Msat(1_000),
    service="hold",
    credit=CreditTerms(Msat(10_000), Msat(1_000), Msat(100_000)),
)


@pytest.mark.parametrize("charge_failures", [False, True])
async def test_a_credit_request_over_its_tokens_cap_is_not_charged(charge_failures: bool) -> None:
    """The 429 releases the price its decision held: only the request served is charged
    (also where failures are, as the backend never had it)."""
    assert CREDIT_HOLD.credit is not None
    terms = replace(CREDIT_HOLD.credit, charge_failures=charge_failures)
    rules = (*RULES, replace(CREDIT_HOLD, credit=terms))
    async with proxy(rules, requests_per_token=1) as (client, gateway, backend):
        response = await client.post("/hold")
        assert response.status == 402
        authorization = gateway.pay(await response.json(content_type=PROBLEM_JSON))
        paid = f"Authorization: {authorization}\r\n"
        async with slow_upload(client, paid) as first:
            await asyncio.wait_for(backend.arrived.get(), 5)
            refused = await client.post(
                "/hold", data=b"x", headers={"Authorization": authorization}
            )
            assert refused.status == 429
            # The first request's price is held, the refused one's released.
            assert refused.headers["L402-Balance-Msat"] == "9000"
            first[1].write(b"z" * 995)
            status, head = await status_and_head(first[0])
            assert status == 200
            assert b"L402-Balance-Msat: 9000\r\n" in head
        response = await client.post("/hold", data=b"x", headers={"Authorization": authorization})
        assert (response.status, response.headers["L402-Balance-Msat"]) == (200, "8000")


async def test_forwarded_body_is_whole_with_the_limits_on() -> None:
    async with proxy(body_timeout=5, min_body_rate=1) as (client, _gateway, _backend):
        response = await client.post("/hold", data=b"q" * 300_000)
        assert response.status == 200
        assert json.loads(await response.text()) == {"bytes": 300_000}


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/hold", "application/octet-stream"),  # forwarded as it comes
        (FORTUNE, "application/x-www-form-urlencoded"),  # read first: it may name a method
    ],
)
async def test_a_client_leaving_mid_body_is_no_upstream_or_server_error(
    path: str, content_type: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Served as ``serve`` serves it (aiohttp's test server would cancel the handler): no
    warning that the upstream failed, no error with a traceback; the next client is served."""
    caplog.set_level(logging.WARNING)
    backend = Backend()
    async with TestServer(backend.app) as upstream:
        app = build_proxy(str(upstream.make_url("")), FakeGateway(RULES))
        async with listening(app, "127.0.0.1", 0, ServerLimits()) as sockets:
            port = sockets[0].getsockname()[1]
            for _ in range(2):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(
                    f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                    "Content-Length: 100\r\nExpect: 100-continue\r\n\r\n".encode()
                )
                assert (await status_and_head(reader))[0] == 100
                writer.write(b"_method=GE")
                await writer.drain()
                writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await status_and_head(reader))[0] == 200
            writer.close()
    assert [record.getMessage() for record in caplog.records] == []
