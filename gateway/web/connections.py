"""Admission of the client connections of ``l402-gateway serve``, with bounds on what a
client may hold (``gateway.web.server`` accepts them):

- ``header_timeout``: a request's headers must be complete that long after their first byte;
- ``idle_timeout``: aiohttp's ``keepalive_timeout``, from a connection's opening or its last
  response until the next request's headers are complete;
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
import logging
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

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made = True
        super().connection_made(transport)
        self._connections.admit(self, transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_header_timer()
        self._connections.release(self)
        if self.made:  # else the server's acceptor counts it closed
            self._connections.socket_closed()  # asyncio closes it right after this returns
        super().connection_lost(exc)

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

    def finish_response(
        self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> Coroutine[Any, Any, tuple[web.StreamResponse, bool]]:
        # The request is answered: done before its response is written, as aiohttp's own
        # coroutine (no coroutine of its own around it, on every response).
        self._headers_since = None
        self._connections.went_idle(self)
        return super().finish_response(request, resp, start_time)


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
        if self._slow.due():
            log.info(
                "closed a connection whose request headers took over %gs; %d more since the "
                "last report",
                self.limits.header_timeout,
                self._slow.unreported,
            )
            self._slow.reported()

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
