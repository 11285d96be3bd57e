"""``SqliteStore``: the embedded default ``Store``, one SQLite file in WAL mode.

Threading: ``sqlite3`` blocks, so each store owns one dedicated worker thread
(a ``ThreadPoolExecutor`` with ``max_workers=1``) that opens the connection, runs every
statement and closes it. The event loop only ever awaits that thread. One thread and one
connection also serialise the store's operations, so each method is atomic with respect to the
others without any lock, and each write is committed (autocommit, one statement or one explicit
transaction) before its coroutine returns.

Schema: ``MIGRATIONS`` is the ordered list of steps; the database's ``PRAGMA user_version`` is
the number of steps applied. ``open()`` applies the missing ones in one transaction and refuses
a database whose version is newer than this code knows (``SchemaVersionError``). Append new
steps; never edit a released one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import logging
import os
import sqlite3
import stat
import time
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from gateway.errors import ConfigError, SchemaVersionError, StoreClosed, StoreError
from gateway.ports import (
    Clock,
    Cursor,
    InvoiceRecord,
    InvoiceState,
    InvoiceUpdate,
    Msat,
    PaymentHash,
    SystemClock,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

Synchronous = Literal["NORMAL", "FULL"]

# How long a statement waits for another process's write lock before failing (seconds).
BUSY_TIMEOUT = 5.0

# Step n (1-based) brings the schema from user_version n-1 to n. Statements, not scripts:
# ``executescript`` would commit the open transaction and break the all-or-nothing migration.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: token root keys, issued invoices, the watcher's cursor
    (
        """
        CREATE TABLE root_keys (
            key_id     BLOB PRIMARY KEY NOT NULL,  -- sha256(macaroon identifier)
            token_id   BLOB NOT NULL,
            root_key   BLOB NOT NULL,
            created_at REAL NOT NULL               -- unix seconds
        )
        """,
        "CREATE INDEX root_keys_token_id ON root_keys (token_id)",
        """
        CREATE TABLE invoices (
            payment_hash     BLOB PRIMARY KEY NOT NULL,
            payment_request  TEXT NOT NULL,
            amount_msat      INTEGER NOT NULL,
            token_id         BLOB NOT NULL,
            service          TEXT NOT NULL,
            method           TEXT NOT NULL,
            path             TEXT NOT NULL,
            state            TEXT NOT NULL
                             CHECK (state IN ('OPEN', 'ACCEPTED', 'SETTLED', 'CANCELED')),
            created_at       REAL NOT NULL,
            expires_at       REAL NOT NULL,
            add_index        INTEGER NOT NULL,
            settle_index     INTEGER NOT NULL,
            amount_paid_msat INTEGER NOT NULL,
            settled_at       REAL
        )
        """,
        "CREATE INDEX invoices_created_at ON invoices (created_at)",
        "CREATE INDEX invoices_state_created_at ON invoices (state, created_at)",
        """
        CREATE TABLE cursor (
            id           INTEGER PRIMARY KEY CHECK (id = 0),
            add_index    INTEGER NOT NULL,
            settle_index INTEGER NOT NULL
        )
        """,
        "INSERT INTO cursor (id, add_index, settle_index) VALUES (0, 0, 0)",
    ),
    # 2: the EXPIRED state, and an index to find overdue and prunable invoices by expiry.
    # A CHECK constraint cannot be altered, so the table is rebuilt, keeping its rowids
    # (they order the invoices created in the same instant).
    (
        """
        CREATE TABLE invoices_v2 (
            payment_hash     BLOB PRIMARY KEY NOT NULL,
            payment_request  TEXT NOT NULL,
            amount_msat      INTEGER NOT NULL,
            token_id         BLOB NOT NULL,
            service          TEXT NOT NULL,
            method           TEXT NOT NULL,
            path             TEXT NOT NULL,
            state            TEXT NOT NULL CHECK (
                                 state IN ('OPEN', 'ACCEPTED', 'SETTLED', 'CANCELED', 'EXPIRED')
                             ),
            created_at       REAL NOT NULL,
            expires_at       REAL NOT NULL,
            add_index        INTEGER NOT NULL,
            settle_index     INTEGER NOT NULL,
            amount_paid_msat INTEGER NOT NULL,
            settled_at       REAL
        )
        """,
        """
        INSERT INTO invoices_v2 (
            rowid, payment_hash, payment_request, amount_msat, token_id, service, method, path,
            state, created_at, expires_at, add_index, settle_index, amount_paid_msat, settled_at
        )
        SELECT rowid, payment_hash, payment_request, amount_msat, token_id, service, method,
               path, state, created_at, expires_at, add_index, settle_index, amount_paid_msat,
               settled_at
        FROM invoices
        """,
        "DROP TABLE invoices",
        "ALTER TABLE invoices_v2 RENAME TO invoices",
        "CREATE INDEX invoices_created_at ON invoices (created_at)",
        "CREATE INDEX invoices_state_created_at ON invoices (state, created_at)",
        "CREATE INDEX invoices_state_expires_at ON invoices (state, expires_at)",
    ),
)

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
# Whether the row takes the update: a terminal row never does; EXPIRED (ours) yields only to
# the node's SETTLED or CANCELED, and is entered only from OPEN (never over a held payment).
_MOVES = """
    (state NOT IN ('SETTLED', 'CANCELED') AND CASE
        WHEN state = 'EXPIRED' THEN :state IN ('SETTLED', 'CANCELED')
        WHEN :state = 'EXPIRED' THEN state = 'OPEN'
        ELSE 1 END)
"""
# A row that does not move keeps every field; otherwise the update's fields win and
# settle_index only grows. SET expressions see the row as it was, so _MOVES tests the old
# state. The WHERE matches any tracked hash, so rowcount tells "tracked" from "unknown" in
# one statement.
_APPLY_UPDATE = f"""
    UPDATE invoices SET
        state = CASE WHEN {_MOVES} THEN :state ELSE state END,
        amount_paid_msat = CASE WHEN {_MOVES} THEN :amount_paid_msat ELSE amount_paid_msat END,
        settled_at = CASE WHEN {_MOVES} THEN :settled_at ELSE settled_at END,
        settle_index = CASE WHEN {_MOVES}
                       THEN max(settle_index, :settle_index) ELSE settle_index END
    WHERE payment_hash = :payment_hash
"""  # noqa: S608 - _MOVES is a constant; every value is a bound parameter
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


class SqliteStore:
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
        future = executor.submit(_connect, file, synchronous, read_only)
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

    async def _run(self, operation: str, function: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise StoreClosed(f"{operation}: the store at {self._path} is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, operation, function)

    def _call(self, operation: str, function: Callable[[sqlite3.Connection], T]) -> T:
        """Runs in the worker thread: the one place sqlite3 errors become ``StoreError``."""
        try:
            return function(self._connection)
        except sqlite3.Error as error:
            raise StoreError(f"{operation} failed on {self._path}: {_describe(error)}") from error

    async def put_root_key(self, key_id: bytes, token_id: bytes, root_key: bytes) -> None:
        """Store a root key; storing the same one again is a no-op.

        A *different* root key under an existing ``key_id`` raises ``StoreError``: the
        identifier embeds a random token id, so that is a bug, and keeping either key
        silently would leave a minted macaroon unverifiable.
        """
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

    async def apply_update(self, update: InvoiceUpdate) -> bool:
        """Apply a node-reported change; a SETTLED or CANCELED invoice never changes again."""
        values = {
            "payment_hash": update.payment_hash,
            "state": update.state.value,
            "settle_index": update.settle_index,
            "amount_paid_msat": update.amount_paid_msat,
            "settled_at": update.settled_at,
        }

        def apply(connection: sqlite3.Connection) -> bool:
            return connection.execute(_APPLY_UPDATE, values).rowcount > 0

        return await self._run("apply_update", apply)

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
        """One transaction per batch: an invoice and its root key go together."""

        def prune(connection: sqlite3.Connection) -> int:
            connection.execute("BEGIN IMMEDIATE")
            try:
                doomed = connection.execute(_PRUNABLE, (expired_before, max(0, limit))).fetchall()
                connection.executemany(_PRUNE_ROOT_KEYS, ((token_id,) for _, token_id in doomed))
                deleted = connection.executemany(
                    _PRUNE_INVOICE, ((payment_hash,) for payment_hash, _ in doomed)
                ).rowcount
                connection.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    connection.execute("ROLLBACK")
                raise
            return max(0, deleted)

        return await self._run("prune_unpaid", prune)

    async def get_cursor(self) -> Cursor:
        def get(connection: sqlite3.Connection) -> Cursor:
            add_index, settle_index = connection.execute(_GET_CURSOR).fetchone()
            return Cursor(add_index=int(add_index), settle_index=int(settle_index))

        return await self._run("get_cursor", get)

    async def save_cursor(self, cursor: Cursor) -> None:
        def save(connection: sqlite3.Connection) -> None:
            connection.execute(_SAVE_CURSOR, (cursor.add_index, cursor.settle_index))

        await self._run("save_cursor", save)

    async def close(self) -> None:
        """Finish the queued operations, close the connection and stop the thread.

        Later calls raise ``StoreClosed``; closing twice is harmless.
        """
        if self._closed:
            return
        self._closed = True
        future = self._executor.submit(self._call, "close", _close)
        # The worker runs what is queued, the close last, then exits.
        self._executor.shutdown(wait=False)
        # Shielded: a cancelled close() must not cancel the queued close of the connection.
        await asyncio.shield(asyncio.wrap_future(future))
        self._executor.shutdown(wait=True)  # joins the thread, which is exiting already


def _connect(path: Path, synchronous: Synchronous, read_only: bool) -> sqlite3.Connection:
    """Runs in the worker thread: create the file, connect, configure, migrate."""
    try:
        if read_only:
            _check_existing(path, tighten=False)
        else:
            _create_private_file(path)
    except OSError as error:
        raise StoreError(f"cannot open the database file {path}: {error}") from error
    try:
        # isolation_level=None: autocommit; transactions only where we say BEGIN.
        connection = sqlite3.connect(
            f"file:{urllib.parse.quote(str(path))}?mode=ro" if read_only else path,
            timeout=BUSY_TIMEOUT,
            isolation_level=None,
            uri=read_only,
        )
    except sqlite3.Error as error:
        raise StoreError(f"cannot open {path}: {_describe(error)}") from error
    try:
        if read_only:
            _check_readable(connection, path)
        else:
            _configure(connection, path, synchronous)
            _migrate(connection, path)
    except BaseException:
        connection.close()
        raise
    return connection


# The first 16 bytes of every SQLite 3 database file.
_SQLITE_HEADER = b"SQLite format 3\x00"


def _create_private_file(path: Path) -> None:
    """Create the database file with mode 0600, or check the existing one and tighten it."""
    try:
        # O_EXCL: an existing name, a dangling symbolic link included, is never followed.
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        _check_existing(path, tighten=True)
        return
    except (FileNotFoundError, NotADirectoryError):
        # Not made for the operator: a typo in the path would put the root keys elsewhere.
        raise ConfigError(
            f"store: cannot create the database {path}: {path.parent} is not an existing "
            "directory (create it, mode 0700, or fix store.url)"
        ) from None
    try:
        os.fchmod(descriptor, 0o600)  # exactly 0600, whatever the umask
    finally:
        os.close(descriptor)


def _check_existing(path: Path, *, tighten: bool) -> None:
    """Refuse an existing ``path`` that is not an SQLite database file (before any chmod);
    with ``tighten``, make it and its WAL and shared-memory files 0600."""
    _check_regular(path, missing_ok=False)
    # O_NOFOLLOW and O_NONBLOCK: swapped for a link or a pipe since the check, the file is
    # refused here instead of followed or waited on.
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        descriptor = os.open(path, flags)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise ConfigError(
                f"store: {path} is a symbolic link; name the database itself"
            ) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise ConfigError(f"store: {path} is not a regular file")
        # An empty file is a new database (another process may be creating it right now).
        if not _SQLITE_HEADER.startswith(os.pread(descriptor, len(_SQLITE_HEADER), 0)):
            raise ConfigError(
                f"store: {path} is not an SQLite database; store.url must name the "
                "gateway's database file"
            )
        if tighten:
            _tighten(descriptor, path)
    finally:
        os.close(descriptor)
    for suffix in ("-wal", "-shm", "-journal"):
        companion = path.with_name(path.name + suffix)
        if _check_regular(companion, missing_ok=True) and tighten:
            descriptor = os.open(companion, flags)
            try:
                _tighten(descriptor, companion)
            finally:
                os.close(descriptor)


def _check_regular(path: Path, *, missing_ok: bool) -> bool:
    """True when ``path`` is a regular file (not a link); ConfigError when it is something
    else, or missing (unless ``missing_ok``: then False)."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        if missing_ok:
            return False
        raise ConfigError(f"store: no database at {path} (check store.url)") from None
    if stat.S_ISLNK(mode):
        raise ConfigError(f"store: {path} is a symbolic link; name the database itself")
    if stat.S_ISDIR(mode):
        raise ConfigError(f"store: {path} is a directory, not a database file")
    if not stat.S_ISREG(mode):
        raise ConfigError(f"store: {path} is not a regular file")
    return True


def _tighten(descriptor: int, path: Path) -> None:
    mode = stat.S_IMODE(os.fstat(descriptor).st_mode)
    if mode & 0o077:
        log.warning(
            "database file %s holds root keys but had mode %o; setting it to 600", path, mode
        )
        os.fchmod(descriptor, 0o600)


def _check_readable(connection: sqlite3.Connection, path: Path) -> None:
    """A database opened read-only: one a gateway has set up, and not a newer one."""
    try:
        version = _user_version(connection)
    except sqlite3.Error as error:
        raise StoreError(f"cannot read {path}: {_describe(error)}") from error
    if version == 0:
        raise ConfigError(f"store: {path} is not a gateway database (it has no gateway schema)")
    # An older schema is read as it is (the gateway migrates it when it next starts).
    _check_version(version, path)


def _configure(connection: sqlite3.Connection, path: Path, synchronous: Synchronous) -> None:
    try:
        # Refuse a newer schema before changing anything in the file (journal mode included).
        _check_version(_user_version(connection), path)
        journal_mode = _switch_to_wal(connection)
        if str(journal_mode).lower() != "wal":
            raise StoreError(
                f"{path}: SQLite refused WAL journal mode (got {journal_mode!r}); "
                "is the file on a network filesystem?"
            )
        # WAL files inherit the database file's permissions (0600).
        connection.execute(f"PRAGMA synchronous = {synchronous}")
        connection.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
    except sqlite3.Error as error:
        raise StoreError(f"cannot configure {path}: {_describe(error)}") from error


def _switch_to_wal(connection: sqlite3.Connection) -> object:
    """Set WAL mode, retrying while another connection holds the lock.

    Changing the journal mode answers SQLITE_BUSY at once, without the busy handler, when
    another connection (say a second gateway opening the same new file) is using it.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT
    while True:
        try:
            (journal_mode,) = connection.execute("PRAGMA journal_mode = WAL").fetchone()
            return journal_mode
        except sqlite3.OperationalError as error:
            if getattr(error, "sqlite_errorname", "") != "SQLITE_BUSY":
                raise
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _migrate(connection: sqlite3.Connection, path: Path) -> None:
    """Apply the missing ``MIGRATIONS`` steps, all in one transaction (or none)."""
    latest = len(MIGRATIONS)
    try:
        # IMMEDIATE takes the write lock first, so two processes opening an old file at once
        # migrate it one after the other; the second sees the new version and does nothing.
        connection.execute("BEGIN IMMEDIATE")
        try:
            current = _user_version(connection)
            _check_version(current, path)
            for number in range(current + 1, latest + 1):
                for statement in MIGRATIONS[number - 1]:
                    connection.execute(statement)
                # user_version is in the file header, so it commits or rolls back with the rest
                connection.execute(f"PRAGMA user_version = {number:d}")
            connection.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
            raise
    except sqlite3.Error as error:
        raise StoreError(f"cannot migrate {path} to schema {latest}: {_describe(error)}") from error
    if current < latest:
        log.info("migrated database %s from schema %d to %d", path, current, latest)


def _user_version(connection: sqlite3.Connection) -> int:
    (version,) = connection.execute("PRAGMA user_version").fetchone()
    return int(version)


def _check_version(version: int, path: Path) -> None:
    if version > len(MIGRATIONS):
        raise SchemaVersionError(
            f"{path} has schema version {version}, but this gateway knows only up to "
            f"{len(MIGRATIONS)}: it was written by a newer gateway; upgrade this one "
            "(downgrading a database is not supported)"
        )


def _close(connection: sqlite3.Connection) -> None:
    connection.close()


def _close_if_opened(future: concurrent.futures.Future[sqlite3.Connection]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().close()


def _describe(error: sqlite3.Error) -> str:
    name = getattr(error, "sqlite_errorname", None)
    return f"{name or type(error).__name__}: {error}"


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
