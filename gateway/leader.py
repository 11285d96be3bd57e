"""Leadership: which of the gateway processes sharing a store runs the tasks only one may run.

The invoice watcher, the invoice sweeper, the withdrawal resolver, the hold executor and the
webhook sender each act for the whole store: one of each must run. ``Leadership`` runs them
in the watching process of an instance only while it holds a ``Lease``, stops them when the
lease is lost and waits to get it again.

- ``SoleLease``: a SQLite or memory store has one watching process (``[server] workers``
  share one machine, only the first watches): it leads at once, for ever.
- ``PostgresLease``: the session advisory lock ``LEADER_LOCK`` on a connection of its own
  (``connect_dedicated``, outside the pool; it must reach PostgreSQL directly, not through a
  transaction-pooling proxy, which would share the session). Every instance tries to take
  it every ``poll`` seconds; the holder checks its connection every ``check`` seconds (a
  ``SELECT 1`` answered within ``check`` seconds) and gives up leading when it fails.

PostgreSQL releases the lock when the holder's session ends: at once when its process dies
(the kernel closes the socket) or an administrator terminates the backend, and for a host
that vanished when the server's TCP keepalives give up on it, set on the connection to take
longer than the holder's own checks. So an old leader cut off from the database stops within
about two ``check`` periods, before the lock is free; one whose session was ended while it
could still reach the server (a terminated backend) keeps running at most ``check`` seconds
beside the new leader. The stored states make that harmless: the watcher's and the
resolver's writes are idempotent, a held request moves between states only once.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Protocol, runtime_checkable

import asyncpg

from gateway import errors
from gateway.ports import Clock, Store
from gateway.supervisor import Supervisor, TaskHealth

__all__ = [
    "LEADER_LOCK",
    "DedicatedConnections",
    "Leadership",
    "Lease",
    "PostgresLease",
    "SoleLease",
    "lease_for",
]

log = logging.getLogger(__name__)

# The advisory lock key of leadership: "L402LEAD" in ASCII (the store's own keys begin with
# "L402" too: ``gateway.store.postgres_schema``).
LEADER_LOCK = 0x4C34_3032_4C45_4144
# A dead peer is given up after idle + count * interval seconds without an answer.
_KEEPALIVE_COUNT = 3
# What can fail on the dedicated connection: the server, the driver, the network, a timeout.
_CONNECTION_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


class Lease(Protocol):
    """The right to run the store's singleton tasks, held by one process at a time."""

    async def acquire(self) -> None:
        """Return once this process holds the lease (``StoreError`` if it cannot tell)."""

    async def lost(self) -> None:
        """Return when the lease held is lost."""

    async def release(self) -> None:
        """Give the lease up, held or not."""


class SoleLease:
    """The lease of a store no other process leads: held at once, never lost."""

    async def acquire(self) -> None:
        return

    async def lost(self) -> None:
        await asyncio.Event().wait()  # never set: held until cancelled

    async def release(self) -> None:
        return


@runtime_checkable
class DedicatedConnections(Protocol):
    """A store that opens connections of its own outside its pool (``PostgresStore``)."""

    url_for_display: str

    async def connect_dedicated(self) -> asyncpg.Connection:
        """A new connection, closed by its user."""


class PostgresLease:
    """The session advisory lock ``LEADER_LOCK`` on a dedicated connection (module docstring)."""

    def __init__(self, store: DedicatedConnections, *, poll: float, check: float) -> None:
        if not (math.isfinite(poll) and poll > 0 and math.isfinite(check) and check > 0):
            raise ValueError("poll and check must be positive")
        self._store = store
        self._poll = poll
        self._check = check
        self._connection: asyncpg.Connection | None = None

    async def acquire(self) -> None:
        while True:
            try:
                connection = self._connection or await self._connect()
                self._connection = connection
                held = await connection.fetchval(
                    "SELECT pg_try_advisory_lock($1)", LEADER_LOCK, timeout=self._check
                )
            except _CONNECTION_ERRORS as error:
                self._drop()
                raise errors.StoreError(
                    f"leader lease on {self._store.url_for_display}: {error!r}"
                ) from None
            if held:
                return
            await asyncio.sleep(self._poll)

    async def lost(self) -> None:
        connection = self._connection
        assert connection is not None, "lost() before acquire()"
        while True:
            await asyncio.sleep(self._check)
            try:
                await connection.fetchval("SELECT 1", timeout=self._check)
            except _CONNECTION_ERRORS as error:
                log.warning(
                    "leader lease on %s: its connection failed: %r",
                    self._store.url_for_display,
                    error,
                )
                self._drop()
                return

    async def release(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        # Closing the session releases the lock; a connection that cannot say goodbye in
        # time is dropped, which the server notices too.
        try:
            await connection.close(timeout=self._check)
        except _CONNECTION_ERRORS:
            connection.terminate()

    async def _connect(self) -> asyncpg.Connection:
        connection = await self._store.connect_dedicated()
        # The server gives up on a vanished holder (and frees the lock) after the holder's
        # own checks have stopped it: 2 + 3 check periods against its at most 2.
        interval = math.ceil(self._check)
        try:
            await connection.execute(
                "SELECT set_config('tcp_keepalives_idle', $1, false),"
                " set_config('tcp_keepalives_interval', $2, false),"
                " set_config('tcp_keepalives_count', $3, false),"
                " set_config('application_name', 'l402-gateway leader', false)",
                str(2 * interval),
                str(interval),
                str(_KEEPALIVE_COUNT),
                timeout=self._check,
            )
        except BaseException:
            connection.terminate()
            raise
        return connection

    def _drop(self) -> None:
        """Abandon the connection without a goodbye (it may hang): its lock goes with it."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.terminate()


def lease_for(store: Store, *, poll: float, check: float) -> Lease:
    """A ``PostgresLease`` for a store that other instances share (``DedicatedConnections``),
    else a ``SoleLease``."""
    if isinstance(store, DedicatedConnections):
        return PostgresLease(store, poll=poll, check=check)
    return SoleLease()


class Leadership:
    """Runs the singleton tasks while this process holds ``lease``: ``run()`` (one supervised
    task) takes the lease, calls ``begin`` with a fresh ``Supervisor`` to start them on, and
    when the lease is lost stops them all and waits for the lease again."""

    def __init__(
        self,
        lease: Lease,
        begin: Callable[[Supervisor], Awaitable[None]],
        clock: Clock | None = None,
    ) -> None:
        self._lease = lease
        self._begin = begin
        self._clock = clock
        self._term: Supervisor | None = None  # the singletons' supervisor, while leading

    def leading(self) -> bool:
        """Whether this process holds the lease and runs the singletons."""
        return self._term is not None

    def health(self) -> tuple[TaskHealth, ...]:
        """The singleton tasks, while leading (none otherwise)."""
        return () if self._term is None else self._term.health()

    async def run(self) -> None:
        """Lead whenever the lease is held, until cancelled or the lease fails (``StoreError``);
        the lease is released on the way out."""
        try:
            while True:
                await self._lease.acquire()
                log.info("leader: this instance now runs the watcher")
                try:
                    async with Supervisor(self._clock) as term:
                        self._term = term
                        await self._begin(term)
                        await self._lease.lost()
                finally:
                    self._term = None
                log.warning("leader: this instance lost leadership; its singleton tasks stopped")
        finally:
            await self._lease.release()
