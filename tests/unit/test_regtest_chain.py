"""The regtest harness's btcd RPC client against a local stand-in for btcd's HTTP server: few
calls in flight, a busy answer retried (a few times), anything not JSON-RPC reported as such."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from regtest.chain import BtcdRpc, RpcError


def busy() -> web.Response:
    """btcd's answer when it serves as many HTTP clients as it may."""
    return web.Response(status=503, text="503 Too busy.  Try again later.\n")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class FakeBtcd:
    """Answers ``getblockhash n`` with ``"hash-n"``, after answering the first ``busy_first``
    requests as btcd does when it serves as many clients as it may; counts what it served."""

    def __init__(self, busy_first: int = 0) -> None:
        self.busy_first = busy_first
        self.requests = 0
        self.serving = 0
        self.most_served = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if self.requests <= self.busy_first:
            return busy()
        self.serving += 1
        self.most_served = max(self.most_served, self.serving)
        try:
            body = await request.json()
            await asyncio.sleep(0.001)
            return web.json_response(
                {"result": f"hash-{body['params'][0]}", "error": None, "id": body["id"]}
            )
        finally:
            self.serving -= 1


@contextlib.asynccontextmanager
async def serve(handler: Handler) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/", handler)
    server = TestServer(app)
    await server.start_server()
    try:
        yield str(server.make_url("/"))
    finally:
        await server.close()


async def call_once(url: str, method: str, *, busy_retries: int = 8) -> object:
    rpc = BtcdRpc(url, "regtest", "regtest", None, busy_retries=busy_retries, busy_pause=0.001)
    try:
        return await rpc.call(method, 7)
    finally:
        await rpc.close()


async def test_many_calls_at_once_stay_within_the_limit_and_busy_answers_are_retried() -> None:
    btcd = FakeBtcd(busy_first=5)
    async with serve(btcd.handle) as url:
        rpc = BtcdRpc(url, "regtest", "regtest", None, max_concurrent=3, busy_pause=0.001)
        try:
            hashes = await asyncio.gather(*(rpc.call("getblockhash", h) for h in range(540)))
        finally:
            await rpc.close()
    assert hashes == [f"hash-{h}" for h in range(540)]
    assert btcd.most_served == 3
    assert btcd.requests == 540 + 5


async def test_busy_for_good_fails_after_the_retries() -> None:
    requests = 0

    async def always_busy(request: web.Request) -> web.StreamResponse:
        nonlocal requests
        requests += 1
        return busy()

    async with serve(always_busy) as url:
        with pytest.raises(RpcError) as failure:
            await call_once(url, "getblockhash", busy_retries=3)
    assert requests == 4
    message = str(failure.value)
    assert "btcd getblockhash: still busy (HTTP 503) after 4 tries" in message
    assert "Too busy" in message


async def test_an_answer_that_is_not_json_is_reported_with_its_status_and_start() -> None:
    async def proxy_error(request: web.Request) -> web.StreamResponse:
        return web.Response(status=502, text="<html>Bad Gateway" + " " * 500 + "</html>")

    async with serve(proxy_error) as url:
        with pytest.raises(RpcError) as failure:
            await call_once(url, "getblock")
    message = str(failure.value)
    assert message.startswith("btcd getblock: HTTP 502 with a body that is not a JSON-RPC reply")
    assert "<html>Bad Gateway" in message
    assert "</html>" not in message  # only the start of a long body


async def test_a_json_rpc_error_is_raised_with_its_message() -> None:
    async def unknown_block(request: web.Request) -> web.StreamResponse:
        error = {"code": -5, "message": "Block not found"}
        return web.json_response({"result": None, "error": error, "id": 1}, status=500)

    async with serve(unknown_block) as url:
        with pytest.raises(RpcError, match=r"btcd getblock: .*Block not found"):
            await call_once(url, "getblock")
