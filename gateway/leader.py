"""Leadership: which of the gateway processes sharing a store runs the tasks only one may run.

The invoice watcher, the invoice sweeper, the withdrawal resolver, the hold executor and the
webhook sender each act for the whole store: one of each must run. ``Leadership`` runs them
in the watching process of an instance only while it holds a ``Lease``, stops them when the
lease is lost and waits to get it again. It lets go of the lease only once they have stopped.

- ``SoleLease``: a SQLite or memory store has one watching process (``[server] workers``
  share one machine, only the first watches): it leads at once, for ever.
- ``PostgresLease``: the session advisory lock ``LEADER_LOCK`` on a connection of its own
  (``connect_dedicated``, outside the pool; it must reach PostgreSQL directly, not through a
  transaction-pooling proxy, which would share the session). Every instance tries to take
  it every ``poll`` seconds, and keeps trying while the database cannot be reached. The
  holder checks its connection every ``check`` seconds (a ``SELECT 1`` answered within
  ``check`` seconds) and gives up leading after two failed checks in a row (one is a blip),
  or after one that finds its session closed: the lock went with it.

How long an old and a new leader can run side by side:

- The old leader lets go (shutdown, or two failed checks on a session that still lives): not
  at all. It stops its tasks first (the hold executor lets requests in flight finish, for up
  to their backend timeout) and only then closes its session, freeing the lock.
- Its process dies: not at all; the kernel closes the socket and the lock is free at once.
- Its session ends while it runs (an administrator terminates the backend, the database
  restarts): the lock is free at once, and the old leader notices at its next check: it runs
  beside the new leader for up to ``check`` seconds plus the time its tasks take to stop.
- Its host is cut off from the database: it stops leading at most four ``check`` periods
  after its last answer (two checks, each a wait and a timeout), while the server gives up
  on the session (TCP keepalives and ``tcp_user_timeout``) after eight; only tasks taking
  longer than the other four to stop overlap, and those cannot write to the store.

The stored states make an overlap harmless: the watcher's and the resolver's writes are
idempotent, a held request moves between states only once.
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
# The server gives up on a silent holder after _KEEPALIVE_IDLE + _KEEPALIVE_COUNT check
# periods (TCP keepalives; tcp_user_timeout where it has data unacknowledged): 8, against the
# holder's own at most 4 (_FAILED_CHECKS checks, each a wait and a timeout).
_KEEPALIVE_IDLE = 5
_KEEPALIVE_COUNT = 3
_FAILED_CHECKS = 2
# What can fail on the dedicated connection: the server, the driver, the network, a timeout.
_CONNECTION_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)


class Lease(Protocol):
    """The right to run the store's singleton tasks, held by one process at a time."""

    async def acquire(self) -> None:
        """Return once this process holds the lease."""

    def asked(self) -> bool:
        """Whether ``acquire`` has had an answer yet, held or not."""

    async def lost(self) -> None:
        """Return when the lease held is lost (or may be: ``release`` lets it go for sure)."""

    async def release(self) -> None:
        """Give the lease up, held or not."""


class SoleLease:
    """The lease of a store no other process leads: held at once, never lost."""

    async def acquire(self) -> None:
        return

    def asked(self) -> bool:
        return True

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
        self._asked = False
        self._unreachable = False  # the last try failed: logged once per outage

    async def acquire(self) -> None:
        while True:
            try:
                connection = self._connection or await self._connect()
                self._connection = connection
                held = await connection.fetchval(
                    "SELECT pg_try_advisory_lock($1)", LEADER_LOCK, timeout=self._check
                )
            except errors.StoreClosed:
                raise
            except (*_CONNECTION_ERRORS, errors.StoreError) as error:
                # Not leading yet (say the database restarts): asked again after a poll, not
                # after the supervisor's backoff, so that failover is not delayed.
                if not self._unreachable:
                    log.warning(
                        "leader lease on %s: cannot ask for it (%r); trying every %gs",
                        self._store.url_for_display,
                        error,
                        self._poll,
                    )
                self._unreachable = True
                self._drop()
            else:
                self._asked = True
                self._unreachable = False
                if held:
                    return
            await asyncio.sleep(self._poll)

    def asked(self) -> bool:
        return self._asked

    async def lost(self) -> None:
        connection = self._connection
        assert connection is not None, "lost() before acquire()"
        failed = 0
        while True:
            await asyncio.sleep(self._check)
            try:
                await connection.fetchval("SELECT 1", timeout=self._check)
            except _CONNECTION_ERRORS as error:
                failed += 1
                # A closed session freed the lock already; a live one may have had a blip.
                if connection.is_closed() or failed >= _FAILED_CHECKS:
                    log.warning(
                        "leader lease on %s: %d check(s) of its connection failed: %r",
                        self._store.url_for_display,
                        failed,
                        error,
                    )
                    # The connection stays open: a lock still held is kept until the
                    # singleton tasks have stopped (``Leadership.run`` then releases it).
                    return
            else:
                failed = 0

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
        # The server gives up on a vanished holder (and frees the lock) only after the
        # holder's own checks have stopped it (_KEEPALIVE_IDLE). Keepalives do not run while
        # the server has data unacknowledged: tcp_user_timeout (ms) bounds that alike.
        interval = math.ceil(self._check)
        try:
            await connection.execute(
                "SELECT set_config('tcp_keepalives_idle', $1, false),"
                " set_config('tcp_keepalives_interval', $2, false),"
                " set_config('tcp_keepalives_count', $3, false),"
                " set_config('tcp_user_timeout', $4, false),"
                " set_config('application_name', 'l402-gateway leader', false)",
                str(_KEEPALIVE_IDLE * interval),
                str(interval),
                str(_KEEPALIVE_COUNT),
                str((_KEEPALIVE_IDLE + _KEEPALIVE_COUNT) * interval * 1000),
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

    def leading(self) -> bool | None:
        """Whether this process holds the lease and runs the singletons; None until the
        lease has been asked for (not knowing yet whether another instance leads)."""
        if self._term is None and not self._lease.asked():
            return None
        return self._term is not None

    def health(self) -> tuple[TaskHealth, ...]:
        """The singleton tasks, while leading (none otherwise)."""
        return () if self._term is None else self._term.health()

    async def run(self) -> None:
        """Lead whenever the lease is held, until cancelled or ``begin`` fails. The lease is
        released only after the term's tasks have stopped: while they run, no other process
        may lead, as long as this one holds the lease."""
        try:
            while True:
                await self._lease.acquire()
                log.info("leader: this instance now runs the watcher")
                term = Supervisor(self._clock)
                self._term = term
                try:
                    await self._begin(term)
                    await self._lease.lost()
                finally:
                    self._term = None
                    await _stop_through_cancellation(term)
                await self._lease.release()
                log.warning("leader: this instance lost leadership; its singleton tasks stopped")
        finally:
            await self._lease.release()


async def _stop_through_cancellation(term: Supervisor) -> None:
    """Stop ``term``'s tasks and wait until they have all ended, even when the caller is
    cancelled meanwhile (again): the lease must not be let go while they still run. A
    cancellation that arrived is raised once they have."""
    stopping = asyncio.ensure_future(term.stop())
    cancelled = False
    while not stopping.done():
        try:
            await asyncio.shield(stopping)
        except asyncio.CancelledError:
            cancelled = True
    stopping.result()
    if cancelled:
        raise asyncio.CancelledError
