"""The lean upstream client's connections of one request each (``keep_alive=False``): how
the proxy sends anything but a GET without a body. Against a server that parses each request
strictly (llhttp) and records it: bodies of stated and unknown length, flow control on a
large body, HEAD, an answer before the body is all sent, a body that fails, the cap."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine

import httptools
import pytest
import uvloop

from gateway.web.upstream import LeanPool, UpstreamError, request_bytes


class Received:
    """One request as the server parsed it."""

    def __init__(self) -> None:
        self.method = ""
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.complete = False

    # httptools' callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode().lower()] = value.decode()

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


Reply = Callable[[Received], bytes]


class StrictServer:
    """Reads requests with llhttp and answers each complete one with ``reply``; with
    ``answer_at_head``, answers as soon as the head is in and closes."""

    def __init__(self, reply: Reply, *, answer_at_head: bool = False, read_pause: float = 0.0):
        self.reply = reply
        self.answer_at_head = answer_at_head
        self.read_pause = read_pause
        self.reading = asyncio.Event()  # set when a connection's pause is over
        self.requests: list[Received] = []
        self.connections = 0
        self.open = 0
        self.most_open = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        received = Received()
        self.requests.append(received)
        parser = httptools.HttpRequestParser(received)
        try:
            await asyncio.sleep(self.read_pause)
            self.reading.set()
            while not received.complete:
                data = await reader.read(65536)
                if not data:
                    return
                parser.feed_data(data)
                received.method = parser.get_method().decode()
                if self.answer_at_head and received.headers:
                    break
            writer.write(self.reply(received))
            await writer.drain()
        finally:
            self.open -= 1
            writer.close()


@contextlib.asynccontextmanager
async def strict_server(server: StrictServer) -> AsyncIterator[LeanPool]:
    listening = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    async with listening:
        port = listening.sockets[0].getsockname()[1]
        yield LeanPool(f"http://127.0.0.1:{port}", 2, 1024, keep_alive=False)


def echo(received: Received) -> bytes:
    body = bytes(received.body)
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


async def chunks_of(*parts: bytes, pause: float = 0.0) -> AsyncIterator[bytes]:
    for part in parts:
        await asyncio.sleep(pause)
        yield part


async def post(
    pool: LeanPool, body: AsyncIterator[bytes] | None, headers: list[tuple[str, str]]
) -> tuple[int, bytes]:
    head = request_bytes("POST", "/hook", pool.host_header, [*headers, ("Connection", "close")])
    chunked = ("Transfer-Encoding", "chunked") in headers
    answer = await pool.send(head, 30, body, chunked=chunked)
    try:
        return answer.status, await answer.read()
    finally:
        pool.release(answer)


async def test_a_body_of_stated_length_goes_whole_on_a_connection_of_its_own() -> None:
    server = StrictServer(echo)
    async with strict_server(server) as pool:
        for number in range(3):
            body = b"x" * (1000 * number + 1)
            got = await post(
                pool, chunks_of(body[:500], body[500:]), [("Content-Length", str(len(body)))]
            )
            assert got == (200, body)
    assert server.connections == 3
    for received in server.requests:
        assert received.headers["connection"] == "close"
        assert "transfer-encoding" not in received.headers


async def test_a_body_of_unknown_length_goes_as_chunks() -> None:
    server = StrictServer(echo)
    async with strict_server(server) as pool:
        got = await post(
            pool,
            chunks_of(b"hello", b"", b" ", b"world" * 3000),
            [("Transfer-Encoding", "chunked")],
        )
    assert got == (200, b"hello " + b"world" * 3000)
    assert server.requests[0].headers["transfer-encoding"] == "chunked"


async def test_a_large_body_is_written_only_as_fast_as_the_upstream_takes_it() -> None:
    total = 64 * 1024 * 1024
    produced = 0
    taken_while_paused = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal produced
        while produced < total:
            produced += 65536
            yield b"b" * 65536

    def length(received: Received) -> bytes:
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%d" % (
            len(str(len(received.body))),
            len(received.body),
        )

    server = StrictServer(length, read_pause=0.5)  # reads nothing for half a second
    async with strict_server(server) as pool:
        sending = asyncio.create_task(post(pool, body(), [("Content-Length", str(total))]))
        await server.reading.wait()  # all the client's body taken by then is buffered
        taken_while_paused = produced
        assert await sending == (200, str(total).encode())
    # The kernel's socket buffers hold some megabytes; the rest waits for the reader.
    assert taken_while_paused < total // 4


async def test_a_response_to_head_ends_with_its_headers() -> None:
    server = StrictServer(lambda _r: b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    async with strict_server(server) as pool:
        head = request_bytes("HEAD", "/doc", pool.host_header, [("Connection", "close")])
        answer = await pool.send(head, 5, bodiless=True)
        assert (answer.status, answer.headers["Content-Length"]) == (200, "100")
        assert await answer.read() == b""
        pool.release(answer)
    assert server.requests[0].method == "HEAD"


async def test_an_answer_before_the_body_is_all_sent_is_the_answer() -> None:
    refused = (
        b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbig!"
    )
    server = StrictServer(lambda _r: refused, answer_at_head=True)
    reading = True

    async def endless() -> AsyncIterator[bytes]:
        nonlocal reading
        try:
            while True:
                await asyncio.sleep(0.01)  # a slow upload
                yield b"z" * 1024
        finally:
            reading = False

    async with strict_server(server) as pool:
        got = await asyncio.wait_for(post(pool, endless(), [("Transfer-Encoding", "chunked")]), 5)
        assert got == (413, b"big!")
        assert pool._count == 0
        await asyncio.sleep(0)  # the writer's cancellation is delivered
        assert not reading  # the client's body is no longer read


async def test_a_body_that_fails_fails_the_exchange_and_frees_its_place() -> None:
    async def failing() -> AsyncIterator[bytes]:
        yield b"part"
        raise RuntimeError("the client went away")

    server = StrictServer(echo)
    async with strict_server(server) as pool:
        with pytest.raises(UpstreamError, match="not sent whole"):
            await post(pool, failing(), [("Content-Length", "100")])
        assert pool._count == 0
        assert await post(pool, chunks_of(b"ok"), [("Content-Length", "2")]) == (200, b"ok")


async def test_nothing_is_sent_for_a_body_that_fails_before_its_first_bytes() -> None:
    # The head leaves with the body's first bytes: a client gone (or too slow) before any
    # arrived has the upstream start no request.
    received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = b""
        with contextlib.suppress(ConnectionError):  # the exchange cut short: a reset
            while chunk := await reader.read(65536):
                data += chunk
        received.set_result(data)
        writer.close()

    async def gone() -> AsyncIterator[bytes]:
        raise RuntimeError("the client went away")
        yield b""  # pragma: no cover - an async generator that fails at once

    listening = await asyncio.start_server(record, "127.0.0.1", 0)
    async with listening:
        port = listening.sockets[0].getsockname()[1]
        pool = LeanPool(f"http://127.0.0.1:{port}", 1, 1024, keep_alive=False)
        with pytest.raises(UpstreamError, match="not sent whole"):
            await post(pool, gone(), [("Content-Length", "10")])
        assert await asyncio.wait_for(received, 5) == b""


async def test_no_more_connections_than_the_limit() -> None:
    server = StrictServer(echo)
    async with strict_server(server) as pool:  # a limit of 2
        bodies = [b"%d" % n for n in range(6)]
        got = await asyncio.gather(
            *(post(pool, chunks_of(b, pause=0.05), [("Content-Length", "1")]) for b in bodies)
        )
    assert got == [(200, b) for b in bodies]
    assert (server.connections, server.most_open) == (6, 2)


async def test_a_connection_cut_short_is_reset_not_left_to_drain() -> None:
    # The upstream reads nothing and never answers: at the deadline the connection must go
    # at once, not wait (unbounded, outside the pool's count) for the upstream to take the
    # buffered body.
    total = 16 * 1024 * 1024
    took: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    stalled = asyncio.Event()

    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await stalled.wait()
        try:
            while await reader.read(1 << 20):
                pass
            took.set_result("the end of the body")
        except ConnectionResetError:
            took.set_result("a reset")
        writer.close()

    async def body() -> AsyncIterator[bytes]:
        for _ in range(total // 65536):
            yield b"s" * 65536

    listening = await asyncio.start_server(stall, "127.0.0.1", 0)
    async with listening:
        pool = LeanPool(
            f"http://127.0.0.1:{listening.sockets[0].getsockname()[1]}", 1, 1024, keep_alive=False
        )
        head = request_bytes("POST", "/", pool.host_header, [("Content-Length", str(total))])
        with pytest.raises(TimeoutError):
            await pool.send(head, 0.3, body())
        assert pool._count == 0
        stalled.set()  # reads now: what was sent before the reset, then the reset
        assert await asyncio.wait_for(took, 5) == "a reset"


async def test_a_kept_alive_pool_takes_no_body() -> None:
    pool = LeanPool("http://127.0.0.1:9", 1, 1024)
    with pytest.raises(ValueError, match="connection of its own"):
        await pool.send(b"POST / HTTP/1.1\r\n\r\n", 1, chunks_of(b"x"))


def test_the_cases_on_uvloop_too() -> None:
    cases: list[Callable[[], Coroutine[None, None, None]]] = [
        test_a_body_of_stated_length_goes_whole_on_a_connection_of_its_own,
        test_a_body_of_unknown_length_goes_as_chunks,
        test_a_large_body_is_written_only_as_fast_as_the_upstream_takes_it,
        test_a_response_to_head_ends_with_its_headers,
        test_an_answer_before_the_body_is_all_sent_is_the_answer,
        test_a_body_that_fails_fails_the_exchange_and_frees_its_place,
        test_a_connection_cut_short_is_reset_not_left_to_drain,
    ]
    for case in cases:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(case())
            assert isinstance(runner.get_loop(), uvloop.Loop)
