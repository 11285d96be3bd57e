"""The proxy's lean upstream client (``gateway.web.upstream``) against a raw HTTP server that
answers as scripted: kept-alive reuse, streaming, interim responses, an upstream that closes
an idle connection, malformed and smuggling responses, the connection cap."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable, Coroutine

import pytest
import uvloop

from gateway.web.upstream import MAX_HEAD_BYTES, LeanPool, UpstreamError, request_bytes

MALFORMED = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"HTTP/1.1 200 OK\r\nX-Bad: a\x00b\r\nContent-Length: 1\r\n\r\na",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"1\r\na\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n X-Folded: yes\r\nContent-Length: 1\r\n\r\na",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
    b"NOT HTTP AT ALL\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nsho",  # closed within the body
]

Answer = Callable[[int, bytes], bytes | None]  # (request number, head) -> bytes; None: close


class RawServer:
    """Answers each request head with ``answer``; counts connections and requests."""

    def __init__(self, answer: Answer, *, close_after_each: bool = False) -> None:
        self.answer = answer
        self.close_after_each = close_after_each
        self.connections = 0
        self.open = 0
        self.most_open = 0
        self.heads: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                self.heads.append(head)
                reply = self.answer(len(self.heads), head)
                if reply is None:
                    return
                writer.write(reply)
                await writer.drain()
                if self.close_after_each:
                    return
        finally:
            self.open -= 1
            writer.close()


@contextlib.asynccontextmanager
async def raw_server(server: RawServer) -> AsyncIterator[str]:
    listening = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    async with listening:
        yield f"http://127.0.0.1:{listening.sockets[0].getsockname()[1]}"


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def fetch(
    pool: LeanPool, path: str = "/x", seconds: float = 30
) -> tuple[int, str | None, dict[str, str], bytes]:
    head = request_bytes("GET", path, pool.host_header, [("X-Test", "1")])
    got = await pool.send(head, seconds)
    try:
        body = b"".join([chunk async for chunk in got.iter_chunks()])
        return got.status, got.reason, dict(got.headers), body
    finally:
        pool.release(got)


async def test_requests_share_one_kept_alive_connection_and_reach_it_verbatim() -> None:
    server = RawServer(lambda n, _head: ok(b"answer %d" % n))
    async with raw_server(server) as url:
        pool = LeanPool(url, 4, 1024)
        for number in (1, 2, 3):
            status, reason, headers, body = await fetch(pool, f"/a%2Fb?q={number}")
            assert (status, reason, body) == (200, "OK", b"answer %d" % number)
            assert headers["Content-Length"] == str(len(body))
        pool.close()
    assert server.connections == 1
    host = url.removeprefix("http://").encode()
    assert server.heads[0] == b"GET /a%2Fb?q=1 HTTP/1.1\r\nHost: " + host + b"\r\nX-Test: 1\r\n\r\n"


async def test_a_chunked_or_long_body_is_streamed_and_interim_responses_are_skipped() -> None:
    big = bytes(range(256)) * 400  # over the whole limit: streamed
    chunked = (
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\nTrailer-Thing: x\r\n\r\n"
    )
    server = RawServer(lambda n, _head: chunked if n == 1 else ok(big))
    async with raw_server(server) as url:
        pool = LeanPool(url, 4, 1024)
        status, _reason, headers, body = await fetch(pool)
        assert (status, body) == (200, b"hello world")
        assert "Link" not in headers  # the interim response's
        assert (await fetch(pool))[3] == big
        pool.close()
    assert server.connections == 1


async def test_an_idle_connection_the_upstream_closed_is_replaced_once() -> None:
    # Each response says keep-alive, then the server closes: the next request finds the
    # connection gone before any answer, and is sent again on a new one.
    server = RawServer(lambda n, _head: ok(b"n%d" % n), close_after_each=True)
    async with raw_server(server) as url:
        pool = LeanPool(url, 4, 1024)
        assert (await fetch(pool))[3] == b"n1"
        await asyncio.sleep(0.05)  # the close arrives
        assert (await fetch(pool))[3] == b"n2"
        pool.close()
    assert server.connections == 2


async def test_connection_close_and_unasked_bytes_end_a_connection() -> None:
    replies = {
        1: ok(b"one", b"Connection: close\r\n"),
        2: ok(b"two") + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra",
        3: ok(b"three"),
    }
    server = RawServer(lambda n, _head: replies[n])
    async with raw_server(server) as url:
        pool = LeanPool(url, 4, 1024)
        assert [(await fetch(pool))[3] for _ in range(3)] == [b"one", b"two", b"three"]
        pool.close()
    assert server.connections == 3


@pytest.mark.parametrize("reply", MALFORMED)
async def test_a_malformed_or_cut_response_is_an_upstream_error(reply: bytes) -> None:
    server = RawServer(lambda n, _head: reply if n == 1 else None, close_after_each=True)
    async with raw_server(server) as url:
        pool = LeanPool(url, 4, 1024)
        with pytest.raises(UpstreamError):
            await fetch(pool)
        pool.close()


async def test_an_unreachable_upstream_is_an_upstream_error() -> None:
    listening = await asyncio.start_server(lambda _r, _w: None, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    listening.close()
    await listening.wait_closed()
    pool = LeanPool(f"http://127.0.0.1:{port}", 4, 1024)
    with pytest.raises(UpstreamError, match="cannot connect"):
        await fetch(pool)


async def test_no_more_connections_than_the_limit() -> None:
    release = asyncio.Event()
    server = RawServer(lambda n, _head: ok(b"x"))
    original = server.handle

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        await original(reader, writer)

    server.handle = slow  # type: ignore[method-assign]
    async with raw_server(server) as url:
        pool = LeanPool(url, 2, 1024)
        tasks = [asyncio.create_task(fetch(pool)) for _ in range(6)]
        await asyncio.sleep(0.1)
        release.set()
        assert [result[3] for result in await asyncio.gather(*tasks)] == [b"x"] * 6
        pool.close()
    assert server.most_open <= 2


def test_a_line_break_in_a_header_is_refused() -> None:
    with pytest.raises(ValueError, match="line break"):
        request_bytes("GET", "/", "h", [("X-A", "1\r\nX-Smuggled: 1")])
    with pytest.raises(ValueError, match="line break"):
        request_bytes("GET", "/", "h", [("X-A", "1\nb")])
    assert request_bytes("GET", "/p", "h:1", [("X-A", "é")]) == (
        "GET /p HTTP/1.1\r\nHost: h:1\r\nX-A: é\r\n\r\n".encode()
    )


async def test_a_connection_cut_short_frees_its_place_under_the_limit() -> None:
    replies = {1: ok(b"short")[:-2], 2: ok(b"after")}
    server = RawServer(lambda n, _head: replies[n], close_after_each=True)
    async with raw_server(server) as url:
        pool = LeanPool(url, 1, 1024)
        with pytest.raises(UpstreamError):
            await fetch(pool)
        async with asyncio.timeout(5):  # it would wait forever for a place never freed
            assert (await fetch(pool))[3] == b"after"
        pool.close()


async def test_a_body_of_no_stated_length_ends_with_the_connection() -> None:
    reply = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhello world"
    server = RawServer(lambda n, _head: reply, close_after_each=True)
    async with raw_server(server) as url:
        pool = LeanPool(url, 1, 1024)
        assert (await fetch(pool))[3] == b"hello world"
        assert (await fetch(pool))[3] == b"hello world"  # not kept: a new connection
        pool.close()
    assert server.connections == 2


async def test_a_response_head_over_the_cap_is_an_upstream_error() -> None:
    huge = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (4 * MAX_HEAD_BYTES) + b"\r\n\r\n"
    server = RawServer(lambda n, _head: huge, close_after_each=True)
    async with raw_server(server) as url:
        pool = LeanPool(url, 1, 1024)
        with pytest.raises(UpstreamError, match="response head over"):
            await fetch(pool)
        pool.close()


async def test_a_body_slower_than_the_timeout_times_out_and_frees_its_place() -> None:
    done = asyncio.Event()

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n")
        await done.wait()
        writer.close()
        await writer.wait_closed()

    listening = await asyncio.start_server(trickle, "127.0.0.1", 0)
    async with listening:
        pool = LeanPool(f"http://127.0.0.1:{listening.sockets[0].getsockname()[1]}", 1, 1024)
        with pytest.raises(TimeoutError):
            await fetch(pool, seconds=0.3)
        assert pool._count == 0  # the cut connection is not kept
        pool.close()
        done.set()
        await asyncio.sleep(0.05)  # the server's side closes


def test_every_case_on_uvloop_too() -> None:
    """``serve`` runs on uvloop when installed, whose transports are not asyncio's classes:
    the cases above again, each on a uvloop loop of its own."""
    cases: list[Callable[[], Coroutine[None, None, None]]] = [
        test_requests_share_one_kept_alive_connection_and_reach_it_verbatim,
        test_a_chunked_or_long_body_is_streamed_and_interim_responses_are_skipped,
        test_an_idle_connection_the_upstream_closed_is_replaced_once,
        test_connection_close_and_unasked_bytes_end_a_connection,
        test_an_unreachable_upstream_is_an_upstream_error,
        test_no_more_connections_than_the_limit,
        test_a_connection_cut_short_frees_its_place_under_the_limit,
        test_a_body_of_no_stated_length_ends_with_the_connection,
        test_a_response_head_over_the_cap_is_an_upstream_error,
        test_a_body_slower_than_the_timeout_times_out_and_frees_its_place,
        *(
            functools.partial(test_a_malformed_or_cut_response_is_an_upstream_error, reply)
            for reply in MALFORMED
        ),
    ]
    for case in cases:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(case())
            assert isinstance(runner.get_loop(), uvloop.Loop)


@contextlib.asynccontextmanager
async def delayed_server(delays: list[float]) -> AsyncIterator[str]:
    """Answers the n-th request (over all connections) ``delays[n - 1]`` seconds late."""
    answered = 0

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal answered
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                answered += 1
                number = answered
                await asyncio.sleep(delays[number - 1])
                writer.write(ok(b"n%d" % number))
                await writer.drain()
        writer.close()

    listening = await asyncio.start_server(answer, "127.0.0.1", 0)
    async with listening:
        yield f"http://127.0.0.1:{listening.sockets[0].getsockname()[1]}"


async def test_a_kept_alive_request_has_its_own_deadline_past_an_earlier_ones() -> None:
    # One timer per connection, moved on when it fires: the second request is still waiting
    # when the first one's deadline passes, and must not be cut there.
    async with delayed_server([0.0, 0.6]) as url:
        pool = LeanPool(url, 1, 1024)
        assert (await fetch(pool, seconds=0.2))[3] == b"n1"  # its timer: at 0.2 s
        assert (await fetch(pool, seconds=2.0))[3] == b"n2"  # still waiting then
        pool.close()


async def test_a_kept_alive_request_with_a_shorter_deadline_times_out_on_time() -> None:
    async with delayed_server([0.0, 2.0]) as url:
        pool = LeanPool(url, 1, 1024)
        assert (await fetch(pool, seconds=30))[3] == b"n1"
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):
            await fetch(pool, seconds=0.1)
        assert loop.time() - started < 1.0  # not the first request's 30 s
        assert pool._count == 0
        pool.close()
