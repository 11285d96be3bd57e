"""The HTTP server of ``l402-gateway serve``: aiohttp's, with bounds on what a client may hold.

aiohttp closes a connection that is idle (no request under way) for ``keepalive_timeout``,
but a client trickling a request's headers keeps it that long too, and nothing caps the
number of connections: at the open file limit ``accept()`` fails with EMFILE (asyncio logs a
traceback for each attempt, up to a backlog's worth a second) and the gateway's own
sockets, to the upstream and to LND, fail with it. Here:

- the connections are admitted and bounded by ``gateway.web.connections`` (header and idle
  timeouts, ``max_connections`` in all and per client); ``connection_limit`` derives the cap
  from ``RLIMIT_NOFILE``, leaving the descriptors of the upstream pools, the store and the
  LND channel;
- connections are accepted here, not by asyncio's server, so that sockets accepted but not
  yet closed never pass the cap by more than ``ACCEPT_HEADROOM``: accepting pauses until
  some close;
- running out of descriptors or buffers on ``accept()`` anyway (other processes, a lower
  ``max_connections`` than configured) pauses accepting for a second and is logged once per
  ``REPORT_INTERVAL``, with a count.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import resource
import signal
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway.web.access_log import ACCESS_LOGGER, AccessLog
from gateway.web.connections import (
    ACCEPT_HEADROOM,
    REPORT_INTERVAL,
    Connection,
    Connections,
    ServerLimits,
    Throttled,
)

log = logging.getLogger(__name__)

# The listen() backlog (the kernel caps it at net.core.somaxconn). A burst of connections
# past it is answered with SYN cookies, and a client whose handshake's last ACK was dropped
# for a full queue gets a reset when its data arrives (seen with 500 clients at once).
LISTEN_BACKLOG = 4096
ACCEPT_BATCH = 128  # sockets accepted per loop iteration at most
# Descriptors kept for everything but connections: the store, the LND channel, log files,
# the listening sockets, DNS lookups.
RESERVED_FILES = 64
ACCEPT_RETRY = 1.0  # seconds accepting pauses after running out of descriptors (as asyncio)
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_BIND_ERRNOS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES})


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


class _Acceptor:
    """Accepts connections on the listening sockets while ``Connections`` has room.

    asyncio's own server accepts up to its backlog of sockets per loop iteration and hands
    them to the protocol an iteration or two later, so they could pass any cap by hundreds;
    and it reports each EMFILE with a traceback.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sockets: list[socket.socket],
        protocol: Callable[[], Connection],
        connections: Connections,
    ) -> None:
        self._loop = loop
        self._sockets = sockets
        self._protocol = protocol
        self._connections = connections
        self._reading = False
        self._closed = False
        self._pending: set[asyncio.Task[None]] = set()
        self._exhausted = Throttled(REPORT_INTERVAL)

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
        for _ in range(ACCEPT_BATCH):
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
        made: list[Connection] = []

        def protocol() -> Connection:
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
            sock.listen(LISTEN_BACKLOG)
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
    access_log: bool = False,
) -> AsyncIterator[list[socket.socket]]:
    """Serve ``app`` on ``host:port`` for the block (startup and cleanup included); yields
    the listening sockets (their names hold the port when ``port`` is 0). With
    ``access_log`` each request is logged (``gateway.web.access_log``)."""
    loop = asyncio.get_running_loop()
    # Given to each connection: the runner's own access log settings never reach them.
    logging_kwargs: dict[str, Any] = (
        {"access_log_class": AccessLog, "access_log": ACCESS_LOGGER}
        if access_log
        else {"access_log": None}
    )
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        manager = runner.server
        assert manager is not None  # set by setup()
        sockets = await _bind(host, port, reuse_port)

        def connection() -> Connection:
            return Connection(
                manager,
                loop=loop,
                connections=connections,
                keepalive_timeout=limits.idle_timeout,
                # A body reaches the handler as sent: the proxy forwards it with the
                # client's Content-Length and Content-Encoding, which an inflated body would
                # not match (the rest read by the upstream as another request).
                auto_decompress=False,
                **logging_kwargs,
            )

        connections = Connections(limits)
        acceptor = _Acceptor(loop, sockets, connection, connections)
        connections.on_room = acceptor.resume
        acceptor.resume()
        try:
            yield sockets
        finally:
            await acceptor.close()  # no new connections; the open ones end in cleanup()
    finally:
        await runner.cleanup()


@dataclass(frozen=True, slots=True)
class Listener:
    """A further application served beside the main one, on an address of its own (the
    admin dashboard, say): ``what`` names it in a bind error (``[admin] listen``)."""

    what: str
    app: web.Application
    host: str
    port: int
    limits: ServerLimits


class ListenError(OSError):
    """A ``Listener``'s address could not be bound; the message names it."""


async def serve(
    app: web.Application,
    host: str,
    port: int,
    limits: ServerLimits,
    *,
    reuse_port: bool,
    others: Sequence[Listener] = (),
    access_log: bool = False,
) -> None:
    """``listening`` until SIGTERM or SIGINT; ``others`` listen too once ``app`` has started
    (each without SO_REUSEPORT: one process serves them; never access-logged). A bind error
    of one of them is a ``ListenError`` naming it."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with (
        listening(app, host, port, limits, reuse_port=reuse_port, access_log=access_log),
        contextlib.AsyncExitStack() as stack,
    ):
        for other in others:
            try:
                await stack.enter_async_context(
                    listening(other.app, other.host, other.port, other.limits)
                )
            except OSError as error:
                if isinstance(error, socket.gaierror) or error.errno in _BIND_ERRNOS:
                    raise ListenError(
                        error.errno or 0, f"{other.what}: {error.strerror or error}"
                    ) from None
                raise
        await stop.wait()
