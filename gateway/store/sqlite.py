"""``SqliteStore``: the embedded default ``Store``, one SQLite file in WAL mode.

Threading: ``sqlite3`` blocks, so each store owns one dedicated worker thread
(a ``ThreadPoolExecutor`` with ``max_workers=1``) that opens the connection, runs every
statement and closes it. The event loop only ever awaits that thread, which runs what it is
given in order: each operation is atomic with respect to the others (the few of several
statements in a transaction of their own), and each write is committed before its coroutine
returns.

Transactions: ``transaction()`` holds the store's ``TransactionGate`` from ``BEGIN IMMEDIATE``
(the write lock, against other processes too) to ``COMMIT`` or ``ROLLBACK``, and the store's
own calls made meanwhile wait for it. A failed or cancelled transaction always queues its
rollback, so it never leaves the connection inside one.

Opening the file, its safety checks and the schema migrations are in ``sqlite_file``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from gateway.errors import StoreClosed, StoreError
from gateway.ports import (
    Clock,
    Cursor,
    InvoiceRecord,
    InvoiceState,
    InvoiceUpdate,
    Msat,
    PaymentHash,
    StoreOperations,
    SystemClock,
)
from gateway.store.gate import TransactionGate
from gateway.store.sqlite_file import Synchronous, connect, describe

T = TypeVar("T")

# ON CONFLICT (pk) DO NOTHING rather than INSERT OR IGNORE: OR IGNORE would also silently drop
# a row that breaks a NOT NULL constraint, where we want the error.
_PUT_ROOT_KEY = """
    INSERT INTO root_keys (key_id, token_id, root_key, created_at) VALUES (?, ?, ?, ?)
    ON CONFLICT (key_id) DO NOTHING
"""
_GET_ROOT_KEY_ROW = "SELECT token_id, root_key FROM root_keys WHERE key_id = ?"
_REVOKE = "DELETE FROM root_keys WHERE token_id = ?"
_ADD_INVOICE = """
    INSERT INTO invoices (
        payment_hash, payment_request, amount_msat, token_id, service, method, path,
        state, created_at, expires_at, add_index, settle_index, amount_paid_msat, settled_at
    ) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (payment_hash) DO NOTHING
"""
# Writes what ``InvoiceRecord.updated`` decided (the state rules are not repeated in SQL).
_SET_STATE = """
    UPDATE invoices SET state = ?, settle_index = ?, amount_paid_msat = ?, settled_at = ?
    WHERE payment_hash = ?
"""
_GET_INVOICE = """
    SELECT payment_hash, payment_request, amount_msat, token_id, service, method, path,
           state, created_at, expires_at, add_index, settle_index, amount_paid_msat, settled_at
    FROM invoices WHERE payment_hash = ?
"""
# LIMIT -1 is SQLite for "no limit".
_LIST_INVOICES = """
    SELECT payment_hash, payment_request, amount_msat, token_id, service, method, path,
           state, created_at, expires_at, add_index, settle_index, amount_paid_msat, settled_at
    FROM invoices ORDER BY created_at DESC, rowid DESC LIMIT ?
"""
_LIST_INVOICES_IN_STATE = """
    SELECT payment_hash, payment_request, amount_msat, token_id, service, method, path,
           state, created_at, expires_at, add_index, settle_index, amount_paid_msat, settled_at
    FROM invoices WHERE state = ? ORDER BY created_at DESC, rowid DESC LIMIT ?
"""
_LIST_OVERDUE = """
    SELECT payment_hash, payment_request, amount_msat, token_id, service, method, path,
           state, created_at, expires_at, add_index, settle_index, amount_paid_msat, settled_at
    FROM invoices WHERE state = 'OPEN' AND expires_at < ? ORDER BY expires_at, rowid LIMIT ?
"""
_PRUNABLE = """
    SELECT payment_hash, token_id FROM invoices
    WHERE state IN ('CANCELED', 'EXPIRED') AND expires_at < ? LIMIT ?
"""
_PRUNE_ROOT_KEYS = "DELETE FROM root_keys WHERE token_id = ?"
# The state is tested again, though the transaction already holds the write lock.
_PRUNE_INVOICE = "DELETE FROM invoices WHERE payment_hash = ? AND state IN ('CANCELED', 'EXPIRED')"
_GET_CURSOR = "SELECT add_index, settle_index FROM cursor WHERE id = 0"
_SAVE_CURSOR = """
    UPDATE cursor SET add_index = max(add_index, ?), settle_index = max(settle_index, ?)
    WHERE id = 0
"""


class _SqliteOperations:
    """The ``StoreOperations`` as statements; ``_run`` says where and how each one runs."""

    _clock: Clock

    async def _run(
        self, operation: str, function: Callable[[sqlite3.Connection], T], *, atomic: bool = False
    ) -> T:
        """Run ``function`` on the worker; ``atomic``: it runs several statements that must
        commit together (a transaction of their own unless one is open)."""
        raise NotImplementedError

    async def put_root_key(self, key_id: bytes, token_id: bytes, root_key: bytes) -> None:
        created_at = self._clock.now()

        def put(connection: sqlite3.Connection) -> None:
            inserted = connection.execute(
                _PUT_ROOT_KEY, (key_id, token_id, root_key, created_at)
            ).rowcount
            if inserted:
                return
            row = connection.execute(_GET_ROOT_KEY_ROW, (key_id,)).fetchone()
            if row is not None and (bytes(row[0]), bytes(row[1])) != (token_id, root_key):
                raise StoreError(f"a different root key is already stored under {key_id.hex()}")

        await self._run("put_root_key", put)

    async def get_root_key(self, key_id: bytes) -> bytes | None:
        def get(connection: sqlite3.Connection) -> bytes | None:
            row = connection.execute(_GET_ROOT_KEY_ROW, (key_id,)).fetchone()
            return None if row is None else bytes(row[1])

        return await self._run("get_root_key", get)

    async def revoke_token(self, token_id: bytes) -> bool:
        def revoke(connection: sqlite3.Connection) -> bool:
            return connection.execute(_REVOKE, (token_id,)).rowcount > 0

        return await self._run("revoke_token", revoke)

    async def add_invoice(self, record: InvoiceRecord) -> None:
        values = (
            record.payment_hash,
            record.payment_request,
            record.amount_msat,
            record.token_id,
            record.service,
            record.method,
            record.path,
            record.state.value,
            record.created_at,
            record.expires_at,
            record.add_index,
            record.settle_index,
            record.amount_paid_msat,
            record.settled_at,
        )

        def add(connection: sqlite3.Connection) -> None:
            connection.execute(_ADD_INVOICE, values)

        await self._run("add_invoice", add)

    async def apply_update(self, update: InvoiceUpdate) -> InvoiceRecord | None:
        def apply(connection: sqlite3.Connection) -> InvoiceRecord | None:
            row = connection.execute(_GET_INVOICE, (update.payment_hash,)).fetchone()
            if row is None:
                return None
            record = _record(row)
            updated = record.updated(update)
            if updated != record:
                connection.execute(
                    _SET_STATE,
                    (
                        updated.state.value,
                        updated.settle_index,
                        updated.amount_paid_msat,
                        updated.settled_at,
                        updated.payment_hash,
                    ),
                )
            return updated

        return await self._run("apply_update", apply, atomic=True)

    async def get_invoice(self, payment_hash: PaymentHash) -> InvoiceRecord | None:
        def get(connection: sqlite3.Connection) -> InvoiceRecord | None:
            row = connection.execute(_GET_INVOICE, (payment_hash,)).fetchone()
            return None if row is None else _record(row)

        return await self._run("get_invoice", get)

    async def list_invoices(
        self, state: InvoiceState | None = None, limit: int | None = None
    ) -> list[InvoiceRecord]:
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        sql_limit = -1 if limit is None else limit

        def list_(connection: sqlite3.Connection) -> list[InvoiceRecord]:
            if state is None:
                rows = connection.execute(_LIST_INVOICES, (sql_limit,))
            else:
                rows = connection.execute(_LIST_INVOICES_IN_STATE, (state.value, sql_limit))
            return [_record(row) for row in rows]

        return await self._run("list_invoices", list_)

    async def list_overdue(self, expired_before: float, limit: int) -> list[InvoiceRecord]:
        def list_(connection: sqlite3.Connection) -> list[InvoiceRecord]:
            rows = connection.execute(_LIST_OVERDUE, (expired_before, max(0, limit)))
            return [_record(row) for row in rows]

        return await self._run("list_overdue", list_)

    async def prune_unpaid(self, expired_before: float, limit: int) -> int:
        """An invoice and its root key go together."""

        def prune(connection: sqlite3.Connection) -> int:
            doomed = connection.execute(_PRUNABLE, (expired_before, max(0, limit))).fetchall()
            connection.executemany(_PRUNE_ROOT_KEYS, ((token_id,) for _, token_id in doomed))
            deleted = connection.executemany(
                _PRUNE_INVOICE, ((payment_hash,) for payment_hash, _ in doomed)
            ).rowcount
            return max(0, deleted)

        return await self._run("prune_unpaid", prune, atomic=True)

    async def get_cursor(self) -> Cursor:
        def get(connection: sqlite3.Connection) -> Cursor:
            add_index, settle_index = connection.execute(_GET_CURSOR).fetchone()
            return Cursor(add_index=int(add_index), settle_index=int(settle_index))

        return await self._run("get_cursor", get)

    async def save_cursor(self, cursor: Cursor) -> None:
        def save(connection: sqlite3.Connection) -> None:
            connection.execute(_SAVE_CURSOR, (cursor.add_index, cursor.settle_index))

        await self._run("save_cursor", save)


class _SqliteTransaction(_SqliteOperations):
    """The operations of one open transaction: queued straight to the worker, inside it."""

    def __init__(self, store: SqliteStore, clock: Clock) -> None:
        self._store: SqliteStore | None = store
        self._clock = clock

    async def _run(
        self, operation: str, function: Callable[[sqlite3.Connection], T], *, atomic: bool = False
    ) -> T:
        if self._store is None:
            raise RuntimeError("the transaction has ended; start another one")
        return await self._store._queue(operation, function, atomic=False)

    def end(self) -> None:
        self._store = None


class SqliteStore(_SqliteOperations):
    """A ``Store`` in one SQLite file. Create it with ``await SqliteStore.open(path)``."""

    def __init__(
        self,
        path: Path,
        connection: sqlite3.Connection,
        executor: concurrent.futures.ThreadPoolExecutor,
        clock: Clock,
    ) -> None:
        """Internal: use ``open()``, which makes the connection in the executor's thread."""
        self._path = path
        self._connection = connection
        self._executor = executor
        self._clock = clock
        self._gate = TransactionGate()
        self._closed = False

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        clock: Clock | None = None,
        synchronous: Synchronous = "NORMAL",
        read_only: bool = False,
    ) -> SqliteStore:
        """Open (or create) the database at ``path`` and bring its schema up to date.

        A new file gets mode 0600, since it holds token root keys (SQLite gives its WAL and
        shared-memory files the same mode); an existing one readable by others is tightened
        to 0600 with a warning. The directory must exist. ``path`` must be the database
        itself: a directory, a symbolic link, a device or a file that is not an SQLite
        database is refused with ``ConfigError`` before anything is changed.

        ``read_only`` opens an existing database as it is, for reading: nothing is created,
        migrated or chmodded, and a missing file is a ``ConfigError``.

        ``synchronous`` is SQLite's durability setting. With WAL, ``NORMAL`` (the default)
        makes every returned write survive a crash or kill of this process: the commit is in
        the WAL file before the call returns, only not yet fsynced. A power cut or OS crash
        can roll back the commits made since the last checkpoint (the file stays consistent).
        For invoices and the cursor that is harmless: the watcher replays from the older
        cursor and every write is idempotent. For a root key it means a token minted just
        before the power cut stops verifying, and its holder must pay for a new one; an
        unpaid challenge is simply reissued. That narrow case does not justify an fsync per
        challenge by default; ``"FULL"`` buys it for operators who want it.
        """
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be 'NORMAL' or 'FULL', got {synchronous!r}")
        file = Path(path)
        executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="gateway-sqlite"
        )
        future = executor.submit(connect, file, synchronous, read_only)
        try:
            connection = await asyncio.wrap_future(future)
        except BaseException:
            # Failed or cancelled: a connection the thread still finishes opening is closed
            # there, then the thread exits.
            executor.submit(_close_if_opened, future)
            executor.shutdown(wait=False)
            raise
        return cls(file, connection, executor, clock or SystemClock())

    @property
    def path(self) -> Path:
        return self._path

    def _check_open(self, operation: str) -> None:
        if self._closed:
            raise StoreClosed(f"{operation}: the store at {self._path} is closed")

    async def _run(
        self, operation: str, function: Callable[[sqlite3.Connection], T], *, atomic: bool = False
    ) -> T:
        self._check_open(operation)
        async with self._gate.turn():  # one made before close() still runs, before it
            return await self._queue(operation, function, atomic=atomic)

    def _queue(
        self, operation: str, function: Callable[[sqlite3.Connection], T], *, atomic: bool
    ) -> asyncio.Future[T]:
        """Queue ``function`` on the worker thread now, bypassing the gate (for the store's
        own calls once through it, and for its open transaction); it runs in order."""
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self._executor, self._call, operation, function, atomic)

    def _call(self, operation: str, function: Callable[[sqlite3.Connection], T], atomic: bool) -> T:
        """Runs in the worker thread: the one place sqlite3 errors become ``StoreError``."""
        try:
            if not atomic:
                return function(self._connection)
            # IMMEDIATE: the write lock first, so a read-then-write never meets another
            # process's write in between (SQLITE_BUSY_SNAPSHOT).
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                result = function(self._connection)
                self._connection.execute("COMMIT")
            except BaseException:
                _rollback(self._connection)
                raise
            return result
        except sqlite3.Error as error:
            raise StoreError(f"{operation} failed on {self._path}: {describe(error)}") from error

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[StoreOperations]:
        self._check_open("transaction")
        async with self._gate.transaction():
            transaction = _SqliteTransaction(self, self._clock)
            try:
                await self._queue("begin", _begin, atomic=False)
                yield transaction
                transaction.end()
                await self._queue("commit", _commit, atomic=False)
            except BaseException:
                # Queued after whatever of this transaction still runs (a BEGIN or COMMIT the
                # worker had started when the wait was cancelled); shielded, so a second
                # cancellation cannot unqueue it and leave the connection inside a transaction.
                transaction.end()
                await asyncio.shield(self._queue("rollback", _rollback, atomic=False))
                raise

    async def close(self) -> None:
        """Let an open transaction end, finish the queued operations, close the connection and
        stop the thread.

        Later calls raise ``StoreClosed``; closing twice is harmless.
        """
        if self._closed:
            return
        self._closed = True
        try:
            async with self._gate.turn():
                pass  # an open transaction ends first; nothing new can begin (closed)
        finally:
            future = self._executor.submit(self._call, "close", _close, False)
            # The worker runs what is queued, the close last, then exits.
            self._executor.shutdown(wait=False)
            # Shielded: a cancelled close() must not cancel the queued close of the connection.
            await asyncio.shield(asyncio.wrap_future(future))
            self._executor.shutdown(wait=True)  # joins the thread, which is exiting already


def _begin(connection: sqlite3.Connection) -> None:
    connection.execute("BEGIN IMMEDIATE")


def _commit(connection: sqlite3.Connection) -> None:
    try:
        connection.execute("COMMIT")
    except BaseException:
        _rollback(connection)  # a failed COMMIT (say SQLITE_BUSY) leaves it open
        raise


def _rollback(connection: sqlite3.Connection) -> None:
    """Roll back the open transaction, if any (a BEGIN that failed opened none)."""
    if connection.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            connection.execute("ROLLBACK")


def _close(connection: sqlite3.Connection) -> None:
    connection.close()


def _close_if_opened(future: concurrent.futures.Future[sqlite3.Connection]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().close()


def _record(row: Sequence[Any]) -> InvoiceRecord:
    return InvoiceRecord(
        payment_hash=PaymentHash(bytes(row[0])),
        payment_request=str(row[1]),
        amount_msat=Msat(int(row[2])),
        token_id=bytes(row[3]),
        service=str(row[4]),
        method=str(row[5]),
        path=str(row[6]),
        state=InvoiceState(row[7]),
        created_at=float(row[8]),
        expires_at=float(row[9]),
        add_index=int(row[10]),
        settle_index=int(row[11]),
        amount_paid_msat=Msat(int(row[12])),
        settled_at=None if row[13] is None else float(row[13]),
    )
