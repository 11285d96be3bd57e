"""The HTTP server of ``l402-gateway serve``: aiohttp's, with bounds on what a client may hold.

aiohttp closes a connection that is idle (no request under way) for ``keepalive_timeout``,
but a client trickling a request's headers keeps it that long too, and nothing caps the
number of connections: at the open file limit ``accept()`` fails with EMFILE (asyncio logs a
traceback for each attempt, up to its backlog's worth a second) and the gateway's own
sockets, to the upstream and to LND, fail with it. Here:

- ``header_timeout``: a request's headers must be complete that long after their first byte;
- ``idle_timeout``: aiohttp's ``keepalive_timeout``, from a connection's opening or its last
  response until the next request's headers are complete;
- ``max_connections``: at the cap, a new connection closes the one idle the longest (a
  slowloris or an idle keep-alive client), or gets a 503 when every one has a request under
  way. ``connection_limit`` derives the cap from ``RLIMIT_NOFILE``, leaving the descriptors
  of the upstream pools, the store and the LND channel;
- connections are accepted here, not by asyncio's server, so that sockets accepted but not
  yet closed never pass the cap by more than ``ACCEPT_HEADROOM`` (a newcomer and the idle
  connection it replaces overlap for a moment): accepting pauses until some close;
- ``max_connections_per_client``: per peer address (an IPv6 /64 counts as one); a peer over
  it gets a 503;
- running out of descriptors or buffers on ``accept()`` anyway (other processes, a lower
  ``max_connections`` than configured) pauses accepting for a second and is logged once per
  ``REPORT_INTERVAL``, with a count.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import resource
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.web_request import BaseRequest

log = logging.getLogger(__name__)

BACKLOG = 128  # the listen() backlog: connections the kernel queues for accept()
# Descriptors kept for everything but connections: the store, the LND channel, log files,
# the listening sockets, DNS lookups.
RESERVED_FILES = 64
# Sockets accepted beyond max_connections at most: newcomers not yet admitted, and the idle
# connections they replace until their sockets are closed (asyncio does that a loop
# iteration later).
ACCEPT_HEADROOM = 64
ACCEPT_RETRY = 1.0  # seconds accepting pauses after running out of descriptors (as asyncio)
REPORT_INTERVAL = 60.0  # seconds between two log lines about the same exhaustion
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_BUSY_TEXT = b"too many connections: retry\n"
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: text/plain\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_BUSY_TEXT), _BUSY_TEXT)
)


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """See the module's docstring; ``serve`` takes them from ``[server]``."""

    header_timeout: float = 10.0
    idle_timeout: float = 15.0
    max_connections: int = 1000
    max_connections_per_client: int = 0  # 0: no cap (behind a proxy every peer is the proxy)
    ipv6_prefix: int = 64


def client_key(address: str, ipv6_prefix: int = 64) -> str:
    """One key per client: an IPv6 client commonly holds a whole /64, so its addresses share
    the key of their ``ipv6_prefix``; an IPv4-mapped address is its IPv4 address."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv4Address):
        return str(parsed)
    if parsed.ipv4_mapped is not None:
        return str(parsed.ipv4_mapped)
    bits = int(parsed) >> (128 - ipv6_prefix) << (128 - ipv6_prefix)
    return f"{ipaddress.IPv6Address(bits)}/{ipv6_prefix}"


def connection_limit(
    configured: int, upstream_connections: int, open_files: int | None = None
) -> int:
    """The most client connections to accept: ``configured``, or when 0 what the open file
    limit leaves after the upstream pools, ``RESERVED_FILES`` and ``ACCEPT_HEADROOM``.

    ``ValueError`` when the limit leaves none.
    """
    if open_files is None:
        open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if open_files == resource.RLIM_INFINITY:
            open_files = 1 << 20
    room = open_files - RESERVED_FILES - ACCEPT_HEADROOM - upstream_connections
    if configured:
        if configured > room:
            log.warning(
                "[server] max_connections %d is more than the open file limit %d leaves "
                "(%d, after %d upstream connections): raise the limit (ulimit -n)",
                configured,
                open_files,
                max(room, 0),
                upstream_connections,
            )
        return configured
    if room < 1:
        raise ValueError(
            f"the open file limit {open_files} leaves no descriptor for client connections "
            f"after {upstream_connections} upstream ones and {RESERVED_FILES + ACCEPT_HEADROOM} "
            "reserved: raise it (ulimit -n) or lower [server] upstream_connections and "
            "paid_upstream_connections"
        )
    return room


class _Throttled:
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


class _Connection(web.RequestHandler):
    """aiohttp's protocol for one connection, admitted by (and reported to) ``_Connections``,
    with a timer on each request's headers."""

    def __init__(
        self,
        manager: web.Server,
        *,
        loop: asyncio.AbstractEventLoop,
        connections: _Connections,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._event_loop = loop
        self._connections = connections
        self.made = False
        self.client: str | None = None  # the peer's key once admitted
        self._header_timer: asyncio.TimerHandle | None = None
        self._responses = 0  # tells a header timer whether its request was answered

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made = True
        super().connection_made(transport)
        self._connections.admit(self, transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_header_timer()
        self._connections.release(self)
        if self.made:  # else _Acceptor counts it closed
            self._connections.socket_closed()  # asyncio closes it right after this returns
        super().connection_lost(exc)

    def idle(self) -> bool:
        """No request under way: none parsed yet, or aiohttp waits for the next one's headers
        (its own idle test, ``RequestHandler._process_keepalive``)."""
        waiter = self._waiter
        return self._request_count == 0 or (waiter is not None and not waiter.done())

    def data_received(self, data: bytes) -> None:
        if data and self._header_timer is None and self.idle():
            self._header_timer = self._event_loop.call_later(
                self._connections.limits.header_timeout, self._headers_late, self._responses
            )
        super().data_received(data)

    def _headers_late(self, responses: int) -> None:
        self._header_timer = None
        # Only the request whose first bytes started the timer, if its headers are not done.
        waiter = self._waiter
        if responses == self._responses and waiter is not None and not waiter.done():
            self._connections.headers_late()
            self.force_close()

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    async def finish_response(
        self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            self._responses += 1
            self._stop_header_timer()
            self._connections.went_idle(self)


class _Connections:
    """The open connections: counted in total and per client, in the order they went idle;
    and the accepted sockets not yet closed."""

    def __init__(self, limits: ServerLimits) -> None:
        self.limits = limits
        self.on_room: Callable[[], None] = lambda: None  # when room() may have turned true
        # Insertion order is the order they went idle (re-inserted after each response).
        self._open: dict[_Connection, None] = {}
        self._per_client: dict[str, int] = {}
        self._sockets = 0
        self._refused = _Throttled(REPORT_INTERVAL)
        self._slow = _Throttled(REPORT_INTERVAL)

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

    def admit(self, connection: _Connection, transport: asyncio.BaseTransport) -> None:
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

    def _refuse(self, connection: _Connection, transport: asyncio.BaseTransport, why: str) -> None:
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

    def went_idle(self, connection: _Connection) -> None:
        if connection in self._open:
            del self._open[connection]
            self._open[connection] = None

    def headers_late(self) -> None:
        if self._slow.due():
            log.info(
                "closed a connection whose request headers took over %gs; %d more since the "
                "last report",
                self.limits.header_timeout,
                self._slow.unreported,
            )
            self._slow.reported()

    def release(self, connection: _Connection) -> None:
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


class _Acceptor:
    """Accepts connections on the listening sockets while ``_Connections`` has room.

    asyncio's own server accepts up to its backlog of sockets per loop iteration and hands
    them to the protocol an iteration or two later, so they could pass any cap by hundreds;
    and it reports each EMFILE with a traceback.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sockets: list[socket.socket],
        protocol: Callable[[], _Connection],
        connections: _Connections,
    ) -> None:
        self._loop = loop
        self._sockets = sockets
        self._protocol = protocol
        self._connections = connections
        self._reading = False
        self._closed = False
        self._pending: set[asyncio.Task[None]] = set()
        self._exhausted = _Throttled(REPORT_INTERVAL)

    def resume(self) -> None:
        if self._reading or self._closed:
            return
        self._reading = True
        for sock in self._sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def pause(self) -> None:
        if not self._reading:
            return
        self._reading = False
        for sock in self._sockets:
            self._loop.remove_reader(sock.fileno())

    def _accept(self, sock: socket.socket) -> None:
        connections = self._connections
        for _ in range(BACKLOG):
            if not connections.room():
                self.pause()  # resumed when a socket closes
                return
            try:
                conn, _address = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as error:
                if error.errno not in _EXHAUSTED:
                    raise  # the loop logs it
                self._report(error)
                self.pause()
                self._loop.call_later(ACCEPT_RETRY, self.resume)
                return
            conn.setblocking(False)
            connections.socket_accepted()
            task = self._loop.create_task(self._connect(conn))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _connect(self, conn: socket.socket) -> None:
        made: list[_Connection] = []

        def protocol() -> _Connection:
            made.append(self._protocol())
            return made[0]

        try:
            await self._loop.connect_accepted_socket(protocol, conn)
        except BaseException as error:
            if not made or not made[0].made:  # else connection_lost counts it closed
                conn.close()
                self._connections.socket_closed()
            if not isinstance(error, OSError):
                raise
            log.debug("could not set up an accepted connection: %s", error)

    def _report(self, error: OSError) -> None:
        if self._exhausted.due():
            log.warning(
                "accept() out of system resources: %s (%s); accepting again in %gs; %d more "
                "since the last report",
                error.strerror,
                errno.errorcode.get(error.errno or 0, "?"),
                ACCEPT_RETRY,
                self._exhausted.unreported,
            )
            self._exhausted.reported()

    async def close(self) -> None:
        self._closed = True
        self.pause()
        for sock in self._sockets:
            sock.close()
        for task in list(self._pending):
            task.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)


async def _bind(host: str, port: int, reuse_port: bool) -> list[socket.socket]:
    """Listening sockets on every address ``host`` has (as asyncio's create_server binds)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _name, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


@contextlib.asynccontextmanager
async def listening(
    app: web.Application,
    host: str,
    port: int,
    limits: ServerLimits,
    *,
    reuse_port: bool = False,
    shutdown_timeout: float = 60.0,
) -> AsyncIterator[list[socket.socket]]:
    """Serve ``app`` on ``host:port`` for the block (startup and cleanup included); yields
    the listening sockets (their names hold the port when ``port`` is 0)."""
    loop = asyncio.get_running_loop()
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        manager = runner.server
        assert manager is not None  # set by setup()
        sockets = await _bind(host, port, reuse_port)

        def connection() -> _Connection:
            return _Connection(
                manager,
                loop=loop,
                connections=connections,
                keepalive_timeout=limits.idle_timeout,
            )

        connections = _Connections(limits)
        acceptor = _Acceptor(loop, sockets, connection, connections)
        connections.on_room = acceptor.resume
        acceptor.resume()
        try:
            yield sockets
        finally:
            await acceptor.close()  # no new connections; the open ones end in cleanup()
    finally:
        await runner.cleanup()


async def serve(
    app: web.Application, host: str, port: int, limits: ServerLimits, *, reuse_port: bool
) -> None:
    """``listening`` until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with listening(app, host, port, limits, reuse_port=reuse_port):
        await stop.wait()
