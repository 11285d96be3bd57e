"""Admission of the client connections of ``l402-gateway serve``, with bounds on what a
client may hold (``gateway.web.server`` accepts them):

- ``header_timeout``: a request's headers must be complete that long after their first byte;
- ``idle_timeout``: aiohttp's ``keepalive_timeout``, from a connection's opening or its last
  response until the next request's headers are complete;
- ``send_timeout``: a response the client reads nothing more of for that long (the socket's
  buffers full, the transport's too) closes the connection: a client that stops reading
  would otherwise hold it, and the upstream connection and unpaid slot behind it, forever.
  Nor may it take less than ``min_send_rate`` bytes a second over that time (a trickle).
  A connection closed with bytes still unsent gets the same time to take them;
- ``max_connections``: at the cap, a new connection closes the one idle the longest (a
  slowloris or an idle keep-alive client), or gets a 503 when every one has a request under
  way;
- ``max_connections_per_client``: per peer address (an IPv6 /64 counts as one); a peer over
  it gets a 503.

``Connections`` also counts the sockets accepted but not yet closed, which may pass the cap
by ``ACCEPT_HEADROOM`` (a newcomer and the idle connection it replaces overlap for a moment).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import socket
import struct
import sys
import termios
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.web_request import BaseRequest

from gateway.service import client_key

log = logging.getLogger(__name__)

# Sockets accepted beyond max_connections at most: newcomers not yet admitted, and the idle
# connections they replace until their sockets are closed (asyncio does that a loop
# iteration later).
ACCEPT_HEADROOM = 64
REPORT_INTERVAL = 60.0  # seconds between two log lines about the same trouble (with a count)
# SIOCOUTQ, the same request as TIOCOUTQ on Linux; elsewhere the ioctl fails on a socket.
_SEND_QUEUE: int | None = getattr(termios, "TIOCOUTQ", None)
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s
_BUSY_TEXT = b"too many connections: retry\n"
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: text/plain\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_BUSY_TEXT), _BUSY_TEXT)
)


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """See the module's docstring; ``l402-gateway serve`` takes them from ``[server]``."""

    header_timeout: float = 10.0
    idle_timeout: float = 15.0
    send_timeout: float = 30.0
    min_send_rate: int = 1024
    max_connections: int = 1000
    max_connections_per_client: int = 0  # 0: no cap (behind a proxy every peer is the proxy)
    ipv6_prefix: int = 64


class Throttled:
    """Counts events, logging at most one line per ``interval`` (with the count since)."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._next = 0.0
        self.unreported = 0

    def due(self) -> bool:
        """Count one event; True when it should be logged (then ``unreported`` is the number
        of events counted but not logged before it)."""
        now = time.monotonic()
        if now < self._next:
            self.unreported += 1
            return False
        self._next = now + self._interval
        return True

    def reported(self) -> None:
        self.unreported = 0


class Connection(web.RequestHandler):
    """aiohttp's protocol for one connection, admitted by (and reported to) ``Connections``,
    with a deadline on each request's headers.

    One timer per connection watches the deadlines, moved on only when it fires: a timer
    started and cancelled for every request cost a kept-alive client's request more.
    """

    def __init__(
        self,
        manager: web.Server,
        *,
        loop: asyncio.AbstractEventLoop,
        connections: Connections,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._event_loop = loop
        self._connections = connections
        self.made = False
        self.client: str | None = None  # the peer's key once admitted
        self._header_timer: asyncio.TimerHandle | None = None
        # When the first byte of the request whose headers are awaited came; None between
        # requests.
        self._headers_since: float | None = None
        # Runs while writing is paused (the client reads too little), with what was unsent
        # when it was set: moved on when the client has read some since.
        self._send_timer: asyncio.TimerHandle | None = None
        self._send_buffered = 0
        # aiohttp lets go of the transport when it closes it, before it is closed.
        self._socket: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made = True
        if isinstance(transport, asyncio.Transport):
            self._socket = transport
        super().connection_made(transport)
        if self._task_handler is not None:  # it closes the transport when it ends
            self._task_handler.add_done_callback(lambda _task: self._watch_closing())
        self._connections.admit(self, transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._socket = None
        self._stop_header_timer()
        self._stop_send_timer()
        self._connections.release(self)
        if self.made:  # else the server's acceptor counts it closed
            self._connections.socket_closed()  # asyncio closes it right after this returns
        super().connection_lost(exc)

    def force_close(self) -> None:
        super().force_close()
        self._watch_closing()

    def _watch_closing(self) -> None:
        # asyncio closes a transport only once its buffer is sent, and writing is paused only
        # above 64 KiB: a client that reads nothing would hold a closed connection with less
        # than that unsent forever.
        transport = self._socket
        if (
            self._send_timer is None
            and transport is not None
            and transport.is_closing()
            and transport.get_write_buffer_size()
        ):
            self._watch_send()

    def idle(self) -> bool:
        """No request under way: none parsed yet, or aiohttp waits for the next one's headers
        (its own idle test, ``RequestHandler._process_keepalive``)."""
        waiter = self._waiter
        return self._request_count == 0 or (waiter is not None and not waiter.done())

    def data_received(self, data: bytes) -> None:
        if data and self._headers_since is None and self.idle():
            self._headers_since = since = self._event_loop.time()
            if self._header_timer is None:
                self._header_timer = self._event_loop.call_at(
                    since + self._connections.limits.header_timeout, self._headers_late
                )
        super().data_received(data)

    def _headers_late(self) -> None:
        self._header_timer = None
        since = self._headers_since
        if since is None:  # between requests: the next one's first byte starts a timer
            return
        due = since + self._connections.limits.header_timeout
        if self._event_loop.time() < due:  # a later request's headers
            self._header_timer = self._event_loop.call_at(due, self._headers_late)
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done():  # its headers are still not in
            self._connections.headers_late()
            self.force_close()

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._watch_send()

    def _watch_send(self) -> None:
        transport = self._socket
        self._send_buffered = _unsent(transport) if transport is not None else 0
        self._send_timer = self._event_loop.call_later(
            self._connections.limits.send_timeout, self._send_due
        )

    def resume_writing(self) -> None:
        self._stop_send_timer()
        super().resume_writing()

    def _stop_send_timer(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _send_due(self) -> None:
        self._send_timer = None
        transport = self._socket
        if transport is None:
            return
        limits = self._connections.limits
        if self._send_buffered - _unsent(transport) >= limits.min_send_rate * limits.send_timeout:
            self._watch_send()
            return
        self._connections.send_stalled()
        sock = transport.get_extra_info("socket")
        if sock is not None:  # a reset: the system would otherwise go on sending its queue
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
        transport.abort()  # a close would wait for the buffer the client does not read

    def finish_response(
        self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> Coroutine[Any, Any, tuple[web.StreamResponse, bool]]:
        # The request is answered: done before its response is written, as aiohttp's own
        # coroutine (no coroutine of its own around it, on every response).
        self._headers_since = None
        self._connections.went_idle(self)
        return super().finish_response(request, resp, start_time)


def _unsent(transport: asyncio.Transport) -> int:
    """Bytes written to ``transport`` that the client has not taken yet: its buffer and, where
    the system tells (Linux), the socket's send queue. The transport's buffer alone moves
    only when the send queue has room for a third of itself again, which for a slow reader
    of a large response takes many seconds."""
    unsent = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is not None and _SEND_QUEUE is not None:
        with contextlib.suppress(OSError):
            queued = fcntl.ioctl(sock.fileno(), _SEND_QUEUE, b"\0" * 4)
            unsent += int.from_bytes(queued, sys.byteorder, signed=True)
    return unsent


class Connections:
    """The open connections: counted in total and per client, in the order they went idle;
    and the accepted sockets not yet closed."""

    def __init__(self, limits: ServerLimits) -> None:
        self.limits = limits
        self.on_room: Callable[[], None] = lambda: None  # when room() may have turned true
        # In the order they went idle (moved to the end after each response).
        self._open: OrderedDict[Connection, None] = OrderedDict()
        self._per_client: dict[str, int] = {}
        self._sockets = 0
        self._refused = Throttled(REPORT_INTERVAL)
        self._slow = Throttled(REPORT_INTERVAL)
        self._stalled = Throttled(REPORT_INTERVAL)

    def __len__(self) -> int:
        return len(self._open)

    def room(self) -> bool:
        """Whether another socket may be accepted."""
        return self._sockets < self.limits.max_connections + ACCEPT_HEADROOM

    def socket_accepted(self) -> None:
        self._sockets += 1

    def socket_closed(self) -> None:
        self._sockets -= 1
        if self.room():
            self.on_room()

    def admit(self, connection: Connection, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        address = peer[0] if isinstance(peer, tuple) else str(peer)
        client = client_key(address, self.limits.ipv6_prefix)
        per_client = self.limits.max_connections_per_client
        if per_client and self._per_client.get(client, 0) >= per_client:
            self._refuse(connection, transport, f"{client} has {per_client} open")
            return
        if len(self._open) >= self.limits.max_connections:
            victim = next((c for c in self._open if c.idle()), None)
            if victim is None:
                self._refuse(
                    connection, transport, f"all {len(self._open)} have a request under way"
                )
                return
            self.release(victim)
            victim.force_close()
        connection.client = client
        self._open[connection] = None
        self._per_client[client] = self._per_client.get(client, 0) + 1

    def _refuse(self, connection: Connection, transport: asyncio.BaseTransport, why: str) -> None:
        if self._refused.due():
            log.warning(
                "refusing connections (503): %s; %d more refused since the last report",
                why,
                self._refused.unreported,
            )
            self._refused.reported()
        if isinstance(transport, asyncio.WriteTransport):
            transport.write(_BUSY)
        connection.force_close()

    def went_idle(self, connection: Connection) -> None:
        if connection in self._open:  # else released already
            self._open.move_to_end(connection)

    def headers_late(self) -> None:
        _report_closed(
            self._slow, "whose request headers took over %gs", self.limits.header_timeout
        )

    def send_stalled(self) -> None:
        _report_closed(
            self._stalled,
            "whose client read too little of its response (less than min_send_rate) for %gs",
            self.limits.send_timeout,
        )

    def release(self, connection: Connection) -> None:
        client = connection.client
        if client is None:
            return
        connection.client = None
        del self._open[connection]
        left = self._per_client[client] - 1
        if left:
            self._per_client[client] = left
        else:
            del self._per_client[client]


def _report_closed(events: Throttled, why: str, seconds: float) -> None:
    """Log a connection closed ``why`` (after ``seconds``), at most once per interval."""
    if events.due():
        log.info(
            f"closed a connection {why}; %d more since the last report",
            seconds,
            events.unreported,
        )
        events.reported()
