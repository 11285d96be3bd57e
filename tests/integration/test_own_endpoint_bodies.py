"""The bodies of the gateway's own endpoints (redeem, withdraw) through each front end: one
trickled in too slowly gets 408 and its connection closes; a client leaving mid-body, or a
malformed chunked body, is no server error (no 500, no traceback of the gateway's)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import traceback
from collections.abc import AsyncIterator

import pytest
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.test_utils import TestServer
from starlette.applications import Starlette

import gateway.web.aiohttp as aiohttp_adapter
import gateway.web.asgi as asgi_adapter
from gateway.examples import demo_api
from gateway.web.aiohttp import setup_l402
from gateway.web.asgi import L402Middleware, Message
from gateway.web.connections import ServerLimits
from gateway.web.credit import WITHDRAW_PATH
from gateway.web.paywall import REDEEM_PATH
from gateway.web.proxy import build_proxy
from gateway.web.server import listening
from tests.demo_rules import ECHO
from tests.fakes import FakeGateway
from tests.integration.test_redeem_limits import http_scope

DEADLINE = 0.5
OWN_PATHS = [REDEEM_PATH, WITHDRAW_PATH]


@pytest.fixture(params=["aiohttp", "proxy"])
def front_end(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def short_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aiohttp_adapter, "OWN_BODY_TIMEOUT", DEADLINE)
    monkeypatch.setattr(asgi_adapter, "OWN_BODY_TIMEOUT", DEADLINE)


@contextlib.asynccontextmanager
async def serving(front_end: str) -> AsyncIterator[int]:
    """The port of the front end, served as ``serve`` serves (aiohttp's test server cancels
    a handler whose client left; ``serve``, like ``web.run_app``, lets it run on)."""
    gateway = FakeGateway((ECHO,))
    async with TestServer(demo_api()) as upstream:
        if front_end == "aiohttp":
            app = demo_api()
            setup_l402(app, gateway)
        else:
            app = build_proxy(str(upstream.make_url("")), gateway)
        async with listening(app, "127.0.0.1", 0, ServerLimits()) as sockets:
            yield int(sockets[0].getsockname()[1])


def head(path: str, extra: str) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Sec-Fetch-Site: same-origin\r\n{extra}\r\n"
    ).encode()


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    return int(raw.split(b" ", 2)[1]), raw


@pytest.mark.usefixtures("short_deadline")
@pytest.mark.parametrize("path", OWN_PATHS)
async def test_a_trickled_body_gets_408_and_the_connection_closes(
    front_end: str, path: str
) -> None:
    async with serving(front_end) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        writer.write(head(path, "Content-Length: 100\r\n") + b'{"m')
        await writer.drain()

        async def trickle() -> None:
            with contextlib.suppress(ConnectionError):
                while True:
                    await asyncio.sleep(0.1)
                    writer.write(b" ")
                    await writer.drain()

        trickling = asyncio.create_task(trickle())
        try:
            status, raw = await read_answer(reader)
            assert status == 408
            assert b"connection: close" in raw.lower()
            assert time.monotonic() - started < DEADLINE + 3
            await reader.read()  # the gateway closes the connection: EOF, not a hang
        finally:
            trickling.cancel()
            writer.close()


@pytest.mark.parametrize("path", OWN_PATHS)
async def test_a_client_leaving_mid_body_is_no_server_error(
    front_end: str, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    async with serving(front_end) as port:
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            # 100 Continue: the handler has the request; it then reads a body cut short.
            writer.write(head(path, "Content-Length: 100\r\nExpect: 100-continue\r\n"))
            assert (await read_answer(reader))[0] == 100
            writer.write(b'{"inv')
            await writer.drain()
            writer.close()
        # Still serving; the server ends (and logs) its requests before the context exits.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /.well-known/l402/live HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert (await read_answer(reader))[0] == 200
        writer.close()
    assert [record.getMessage() for record in caplog.records] == []


@pytest.mark.parametrize("path", OWN_PATHS)
async def test_a_malformed_chunked_body_is_a_400(
    front_end: str, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    async with serving(front_end) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head(path, "Transfer-Encoding: chunked\r\n") + b"zz\r\n{}\r\n0\r\n\r\n")
        status, _ = await read_answer(reader)
        writer.close()
    assert status == 400
    # Only aiohttp's parser reports it (``serve`` keeps its 400s out of the log); the
    # handler reading the body raised nothing.
    for record in caplog.records:
        assert record.exc_info is not None
        assert isinstance(record.exc_info[1], HttpProcessingError)
        frames = traceback.extract_tb(record.exc_info[2])
        assert not [frame for frame in frames if "/gateway/" in frame.filename]


@pytest.mark.usefixtures("short_deadline")
@pytest.mark.parametrize("path", OWN_PATHS)
async def test_asgi_a_body_that_does_not_come_gets_408(path: str) -> None:
    gateway = FakeGateway((ECHO,))
    app = L402Middleware(Starlette())
    sent: list[Message] = []

    async def receive() -> Message:
        await asyncio.sleep(0.2)
        return {"type": "http.request", "body": b" ", "more_body": True}

    async def send(message: Message) -> None:
        sent.append(message)

    headers = {"Content-Type": "application/json", "Content-Length": "100"}
    async with gateway() as service:
        scope = http_scope(service, "POST", path, "192.0.2.1", headers)
        started = time.monotonic()
        await asyncio.wait_for(app(scope, receive, send), 10)
    assert time.monotonic() - started < DEADLINE + 1
    assert sent[0]["status"] == 408
    assert (b"connection", b"close") in [(k.lower(), v) for k, v in sent[0]["headers"]]


async def test_a_prompt_body_is_still_read_whole() -> None:
    """The deadline does not cut a body that arrives in time (the redeem answers on it)."""
    async with serving("aiohttp") as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = b'{"macaroon": "not a macaroon"}'
        writer.write(head(REDEEM_PATH, f"Content-Length: {len(body)}\r\n") + body)
        status, _ = await read_answer(reader)
        writer.close()
    assert status == 400  # read whole, then refused as no macaroon: not a 408


@pytest.mark.parametrize("length", ["100000", "12345678901234567890"])
async def test_asgi_a_body_stated_too_large_is_refused_unread(length: str) -> None:
    gateway = FakeGateway((ECHO,))
    app = L402Middleware(Starlette())
    sent: list[Message] = []

    async def receive() -> Message:
        raise AssertionError("the body is not read")

    async def send(message: Message) -> None:
        sent.append(message)

    headers = {"Content-Type": "application/json", "Content-Length": length}
    async with gateway() as service:
        await app(http_scope(service, "POST", REDEEM_PATH, "192.0.2.1", headers), receive, send)
    assert sent[0]["status"] == 413
