"""A lean HTTP/1.1 client for the proxy's upstream calls.

aiohttp's client spends about three times the CPU of a raw exchange on a call (building a
``ClientRequest``, merging headers, timers, its response object): on a paid request it was
the largest share of the proxy's CPU. Here the request's head is one write of the headers
``send`` already prepared, and the response is parsed by llhttp (``httptools``, strict: no
leniency towards a malformed response).

A GET without a body goes over kept-alive connections. Any other request (a body, another
method) goes over a connection of its own, from a pool made with ``keep_alive=False``, and
must say ``Connection: close``: an upstream that leaves a body unread (a route that expects
none) would read it as a request of its own, and a response to HEAD cannot be told from
the next one's start. The body is streamed as it is written (framed as chunks when its
length is not stated), while the response is awaited: an upstream may answer before
reading all of it.

A response is read whole when its ``Content-Length`` is at most ``whole_limit``; any other
is streamed, read from the upstream only as fast as the client takes it. A GET on a
kept-alive connection the upstream closed before answering is sent again once, on a new
connection (a GET is idempotent; aiohttp's client does the same).

A response must be in by its deadline. Each connection has one timer for that, moved on only
when it fires (a new timer per request cost a paid request more than its header parsing).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import cast

import aiohttp
import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.web.responses import content_length

CONNECT_TIMEOUT = 10.0  # seconds, as the sock_connect of the proxy's aiohttp sessions
IDLE_SECONDS = 15.0  # a connection idle longer is closed rather than reused (as aiohttp)
_BUFFERED_CHUNKS = 16  # body chunks held for a slow client before reading pauses
MAX_HEAD_BYTES = 64 * 1024  # a response's status line and headers (llhttp has no cap)
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close sends a reset


_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


class UpstreamError(aiohttp.ClientConnectionError):
    """The upstream closed, reset or garbled the connection: an aiohttp ``ClientError``,
    handled as the proxy handles aiohttp's."""


class LeanResponse(asyncio.Protocol):
    """One upstream connection (kept alive or not) and the response it is reading (one at a
    time), and the request body it is writing, if any."""

    def __init__(self, loop: asyncio.AbstractEventLoop, whole_limit: int) -> None:
        self._loop = loop
        self._whole_limit = whole_limit
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self.closed = False
        self.pooled = False  # counted in its pool's connections
        self.idle_since = 0.0
        self._waiting = False  # a request was sent, its response is not complete
        self._head: asyncio.Future[None] = loop.create_future()
        self._head.set_result(None)
        self._end: asyncio.Future[None] = self._head
        self.deadline = 0.0  # loop time the response under way must be in by
        self._timer: asyncio.TimerHandle | None = None  # at or before the deadline
        self._timer_at = 0.0
        self._writable: asyncio.Future[None] | None = None  # while the transport's buffer is full
        self._body_writer: asyncio.Task[None] | None = None

    def start(self, deadline: float, *, bodiless: bool = False) -> None:
        """A new exchange, due by ``deadline``: what the previous one read is forgotten.
        A ``bodiless`` response (to HEAD) ends with its headers."""
        self._bodiless = bodiless
        self.received = False  # a byte of this response arrived
        self._head_bytes = 0
        self.deadline = deadline
        if self._timer is None or deadline < self._timer_at:
            self._arm(deadline)
        self.status = 0
        self.reason = ""
        self._pairs: list[tuple[str, str]] = []
        self.headers = _NO_HEADERS
        self._body: list[bytes] = []
        self.chunks: deque[bytes] | None = None  # when streamed
        self._chunk_ready: asyncio.Future[None] | None = None
        self._paused = False
        self.complete = False
        self._keep_alive = False
        # All of the response in; a streamed one's headers are in earlier (its own future).
        self._head = self._end = self._loop.create_future()
        self._waiting = True

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not an asyncio.Transport subclass).
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self._waiting:  # nothing asked: not a connection to trust again
            self.close()
            return
        self.received = True
        if self.status == 0:  # its head is not in yet (bounded to this cap plus one read)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._fail(UpstreamError(f"response head over {MAX_HEAD_BYTES} bytes"))
                return
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("the upstream switched protocols"))
        except httptools.HttpParserError as error:
            self._fail(UpstreamError(f"malformed response from the upstream: {error}"))

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._writable is not None:
            if not self._writable.done():
                self._writable.set_result(None)
            self._writable = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._stop_timer()
        self.resume_writing()  # a body writer waiting for room stops at the close
        if not self._waiting:
            return
        if exc is None and self._ends_at_close():
            self.on_message_complete()  # a body of no stated length ends with the connection
        else:
            self._fail(UpstreamError(f"the upstream closed the connection ({exc or 'EOF'})"))

    def _ends_at_close(self) -> bool:
        """The headers are in and give the body no length (HTTP/1.0 style): llhttp cannot
        be told of the end of the stream, so the close is taken as the body's end here."""
        headers = self.headers
        return (
            self.status >= 200
            and "Content-Length" not in headers
            and ("Transfer-Encoding" not in headers)
        )

    # llhttp's callbacks (none changes a response once it is complete)
    def on_message_begin(self) -> None:
        if not self._waiting:  # more after the response, in the same read
            self.close()

    def on_status(self, status: bytes) -> None:
        if self._waiting:
            self.reason = status.decode("utf-8", "surrogateescape")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._waiting:
            self._pairs.append(
                (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
            )

    def on_headers_complete(self) -> None:
        if not self._waiting:
            return
        status = self._parser.get_status_code()
        if status < 200:  # 100 Continue, 103 Early Hints: the answer follows
            self._pairs = []
            return
        self.status = status
        self.headers = CIMultiDictProxy(CIMultiDict(self._pairs))
        if self._bodiless:  # what follows is not this response's (the connection closes)
            self.on_message_complete()
            self._keep_alive = False
            return
        length = content_length(self.headers.get("Content-Length"))
        if length is None or length > self._whole_limit:
            self.chunks = deque()
            self._end = self._loop.create_future()
            self._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        if not self._waiting:
            return
        if self.chunks is None:
            self._body.append(body)
            return
        self.chunks.append(body)
        self._wake()
        if len(self.chunks) >= _BUFFERED_CHUNKS and self._transport is not None:
            self._transport.pause_reading()  # the client takes it slower than it comes
            self._paused = True

    def on_message_complete(self) -> None:
        if self.status < 200 or not self._waiting:
            return
        self.complete = True
        self._keep_alive = self._parser.should_keep_alive()
        self._waiting = False
        if not self._head.done():
            self._head.set_result(None)
        if not self._end.done():  # a whole response's is its head's
            self._end.set_result(None)
        self._wake()

    def _wake(self) -> None:
        if self._chunk_ready is not None and not self._chunk_ready.done():
            self._chunk_ready.set_result(None)

    def _fail(self, error: Exception) -> None:
        self._waiting = False
        for waiter in (self._head, self._end):
            if not waiter.done():
                waiter.set_exception(error)
        if not self._end.cancelled():  # its waiter cancelled (a deadline of the caller's)
            self._end.exception()  # retrieved: a streamed body raises it, a whole one never asks
        self._wake()
        self.close()

    def close(self) -> None:
        self.closed = True
        self._stop_timer()
        transport = self._transport
        if transport is None:
            return
        clean = self.complete and self._body_writer is None
        self._stop_body()
        if clean and not transport.get_write_buffer_size():
            transport.close()
        else:
            # Cut short: reset. A close would wait, unbounded, for the upstream to take what
            # is still buffered (the socket held past the pool's count), and the kernel would
            # go on sending it after; a reset tells the upstream at once.
            with contextlib.suppress(OSError, ValueError):  # closed already (uvloop: no fd)
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
            transport.abort()

    def _time_up(self) -> None:
        self._timer = None
        if not self._waiting:  # idle since: the next request starts a timer of its own
            return
        if self._loop.time() < self.deadline:  # a later request's deadline
            self._arm(self.deadline)
            return
        self._fail(TimeoutError("the upstream's response did not arrive in time"))

    def _arm(self, deadline: float) -> None:
        self._stop_timer()
        self._timer = self._loop.call_at(deadline, self._time_up)
        self._timer_at = deadline

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def send(
        self,
        request: bytes,
        deadline: float,
        body: AsyncIterable[bytes] | None = None,
        *,
        chunked: bool = False,
        bodiless: bool = False,
    ) -> None:
        """``request``'s head written; with a ``body`` (framed as chunks if ``chunked``), by
        a task of its own, with the body, until it ends or the connection closes."""
        self.start(deadline, bodiless=bodiless)
        assert self._transport is not None
        if body is None:
            self._transport.write(request)
        else:
            self._body_writer = self._loop.create_task(self._write_body(request, body, chunked))

    async def _write_body(self, head: bytes, body: AsyncIterable[bytes], chunked: bool) -> None:
        """``head``, then ``body`` as the upstream takes it, until it ends or the connection
        does; a failure of ``body`` fails the response under way.

        The head leaves with the body's first bytes (one write, as aiohttp's client does): a
        client whose body fails before any of it arrives (gone, too slow) has the upstream
        start no request for it."""
        transport = self._transport
        assert transport is not None
        unsent = head
        try:
            async for chunk in body:
                if self.closed or transport.is_closing():
                    return
                if not chunk:  # as a chunk it would end the body
                    continue
                # One write, not writelines: Python 3.12.1's never pauses the protocol (no
                # flow control, the whole body buffered).
                if chunked:
                    transport.write(b"".join((unsent, b"%x\r\n" % len(chunk), chunk, b"\r\n")))
                else:
                    transport.write(unsent + chunk if unsent else chunk)
                unsent = b""
                if self._writable is not None:
                    await self._writable
            if not self.closed:
                transport.write(unsent + b"0\r\n\r\n" if chunked else unsent)
        except Exception as error:  # the client's body: too large, too slow, cut short
            self._body_writer = None  # ends here, not to be cancelled
            self._fail(UpstreamError(f"the request body was not sent whole: {error!r}"))
        else:
            self._body_writer = None  # all of it written

    def _stop_body(self) -> None:
        """The body's writing stopped, if still under way (the exchange is over)."""
        if self._body_writer is not None:
            self._body_writer.cancel()
            self._body_writer = None

    async def wait_head(self) -> None:
        """Until the headers are in (a streamed body) or all of the response is."""
        await self._head

    @property
    def content_length(self) -> int | None:
        return content_length(self.headers.get("Content-Length"))

    async def read(self) -> bytes:
        """The whole body: in when ``wait_head`` returned, unless it is streamed."""
        if self.chunks is not None:
            return b"".join([chunk async for chunk in self.iter_chunks()])
        return b"".join(self._body)

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; raises ``UpstreamError`` when it is cut short,
        ``TimeoutError`` when it is not all in by the deadline."""
        chunks = self.chunks
        if chunks is None:  # read whole already
            if self._body:
                yield b"".join(self._body)
            return
        while True:
            while chunks:
                yield chunks.popleft()
                if self._paused and len(chunks) < _BUFFERED_CHUNKS // 2:
                    self._paused = False
                    if self._transport is not None and not self.closed:
                        self._transport.resume_reading()
            if self._end.done():
                self._end.result()
                return
            self._chunk_ready = self._loop.create_future()
            await self._chunk_ready

    def reusable(self) -> bool:
        return self.complete and self._keep_alive and not self.closed


def request_bytes(method: str, target: str, host: str, headers: Iterable[tuple[str, str]]) -> bytes:
    """The request's head, as one write; ``ValueError`` when a header holds a line break
    (it would end the head early: a request smuggled in)."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in headers]
    joined = "".join(lines)
    if "\n" in joined or "\r" in joined:
        raise ValueError("a request header holds a line break")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")


class LeanPool:
    """Connections to ``base`` (the upstream URL), at most ``limit`` open, kept alive unless
    ``keep_alive`` is false; a request finding all of them busy waits for one to be free (or
    closed)."""

    def __init__(self, base: str, limit: int, whole_limit: int, *, keep_alive: bool = True) -> None:
        url = URL(base)
        assert url.host is not None  # the config checked it
        assert url.port is not None
        self._host = url.host
        self._port = url.port
        self._ssl = ssl.create_default_context() if url.scheme == "https" else None
        self.host_header = url.host_port_subcomponent or url.host
        self._whole_limit = whole_limit
        self._limit = limit
        self._keep_alive = keep_alive
        self._count = 0  # connections open or being opened
        self._idle: list[LeanResponse] = []
        # Requests waiting for a connection: given a free one, or None when one closed.
        self._waiters: deque[asyncio.Future[LeanResponse | None]] = deque()

    async def _connection(self) -> tuple[LeanResponse, bool]:
        """A free connection (waiting for one at the limit), and whether it was used
        before."""
        connection = self._reuse()
        if connection is not None:
            return connection, True
        while self._count >= self._limit:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                handed = await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    # Handed over as this one left: on to the next waiting request.
                    left = waiter.result()
                    if left is None:
                        self._hand_over(None)
                    else:
                        self.release(left)
                raise
            if handed is not None:
                return handed, True
        return await self._connect(), False

    async def _connect(self) -> LeanResponse:
        loop = asyncio.get_running_loop()
        self._count += 1
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                _, connection = await loop.create_connection(
                    lambda: LeanResponse(loop, self._whole_limit),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                )
        except OSError as error:
            self._closed_one()
            reason = str(error) or type(error).__name__  # a TimeoutError says nothing
            raise UpstreamError(f"cannot connect to the upstream: {reason}") from error
        except BaseException:
            self._closed_one()
            raise
        connection.pooled = True
        return connection

    def _reuse(self) -> LeanResponse | None:
        cutoff = time.monotonic() - IDLE_SECONDS
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed and connection.idle_since > cutoff:
                return connection
            self._forget(connection)
        return None

    def _forget(self, connection: LeanResponse) -> None:
        connection.close()
        if connection.pooled:  # counted once
            connection.pooled = False
            self._closed_one()

    def _closed_one(self) -> None:
        self._count -= 1
        self._hand_over(None)

    def _hand_over(self, connection: LeanResponse | None) -> bool:
        """Give ``connection`` (None: room for a new one) to the first waiting request."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return True
        return False

    def release(self, connection: LeanResponse) -> None:
        """Done with ``connection`` (from ``send``): reused when its response was read to
        its end (on a kept-alive pool), else closed."""
        if not self._keep_alive or not connection.reusable():
            self._forget(connection)
            return
        connection.idle_since = time.monotonic()
        if not self._hand_over(connection):
            self._idle.append(connection)

    async def send(
        self,
        request: bytes,
        seconds: float,
        body: AsyncIterable[bytes] | None = None,
        *,
        chunked: bool = False,
        bodiless: bool = False,
    ) -> LeanResponse:
        """``request`` sent (with ``body``, framed as chunks if ``chunked``, on a pool that
        does not keep connections alive), its response's head in: the connection reading the
        response, which the caller hands back to ``release`` when done with it. The
        response's head and body must be in ``seconds`` from now (``TimeoutError``); a
        ``bodiless`` one (to HEAD) ends with its head."""
        if body is not None and self._keep_alive:
            raise ValueError("a request body goes over a connection of its own")
        deadline = asyncio.get_running_loop().time() + seconds
        connection = self._reuse()
        reused = connection is not None
        try:
            if connection is None:
                async with asyncio.timeout_at(deadline):
                    connection, reused = await self._connection()
            connection.send(request, deadline, body, chunked=chunked, bodiless=bodiless)
            try:
                await connection.wait_head()
            except UpstreamError:
                if not reused or connection.received:
                    raise
                # Closed while idle, before this request reached it: once more, anew.
                self._forget(connection)
                connection = None
                async with asyncio.timeout_at(deadline):
                    connection = await self._connect()
                connection.send(request, deadline)
                await connection.wait_head()
        except BaseException:
            if connection is not None:
                self.release(connection)
            raise
        return connection

    def close(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()
