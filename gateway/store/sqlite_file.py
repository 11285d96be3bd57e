"""Opening the SQLite database file: its safety checks, the connection's settings, and the
schema with its migrations. ``SqliteStore`` (``gateway.store.sqlite``) runs the queries.

Schema: ``MIGRATIONS`` is the ordered list of steps; the database's ``PRAGMA user_version`` is
the number of steps applied. ``connect()`` applies the missing ones in one transaction and
refuses a database whose version is newer than this code knows (``SchemaVersionError``).
Append new steps; never edit a released one.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sqlite3
import stat
import time
import urllib.parse
from pathlib import Path
from typing import Literal

from gateway.errors import ConfigError, SchemaVersionError, StoreError

log = logging.getLogger(__name__)

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
    # 3: prepaid credit. Invoices that buy credit; an account per token id, whose CHECKs are
    # the last line against a balance going negative; the reservations of requests under way
    # (AUTOINCREMENT: an id is never reused, so a late settle cannot hit another request's);
    # the charges (usage history); withdrawals. Pruning finds a token's invoices by token id.
    (
        "ALTER TABLE invoices ADD COLUMN buys_credit INTEGER NOT NULL DEFAULT 0",
        "CREATE INDEX invoices_token_id ON invoices (token_id)",
        """
        CREATE TABLE accounts (
            token_id       BLOB PRIMARY KEY NOT NULL,
            service        TEXT NOT NULL,
            credited_msat  INTEGER NOT NULL CHECK (credited_msat >= 0),
            spent_msat     INTEGER NOT NULL CHECK (spent_msat >= 0),
            reserved_msat  INTEGER NOT NULL CHECK (reserved_msat >= 0),
            withdrawn_msat INTEGER NOT NULL CHECK (withdrawn_msat >= 0),
            created_at     REAL NOT NULL,
            last_used_at   REAL,
            CHECK (credited_msat - spent_msat - reserved_msat - withdrawn_msat >= 0)
        ) WITHOUT ROWID
        """,
        """
        CREATE TABLE reservations (
            id          INTEGER PRIMARY KEY AUTOINCREMENT,
            token_id    BLOB NOT NULL,
            amount_msat INTEGER NOT NULL CHECK (amount_msat >= 0),
            expires_at  REAL NOT NULL
        )
        """,
        "CREATE INDEX reservations_expires_at ON reservations (expires_at)",
        """
        CREATE TABLE charges (
            token_id    BLOB NOT NULL,
            at          REAL NOT NULL,
            method      TEXT NOT NULL,
            path        TEXT NOT NULL,
            amount_msat INTEGER NOT NULL CHECK (amount_msat > 0)
        )
        """,
        "CREATE INDEX charges_token_id_at ON charges (token_id, at)",
        "CREATE INDEX charges_at ON charges (at)",  # the sweeper prunes the oldest
        """
        CREATE TABLE withdrawals (
            payment_hash     BLOB PRIMARY KEY NOT NULL,
            token_id         BLOB NOT NULL,
            payment_request  TEXT NOT NULL,
            amount_msat      INTEGER NOT NULL CHECK (amount_msat >= 0),
            fee_reserve_msat INTEGER NOT NULL CHECK (fee_reserve_msat >= 0),
            fee_msat         INTEGER NOT NULL
                             CHECK (fee_msat >= 0 AND fee_msat <= fee_reserve_msat),
            state            TEXT NOT NULL CHECK (state IN ('PENDING', 'SUCCEEDED', 'FAILED')),
            created_at       REAL NOT NULL,
            resolved_at      REAL
        )
        """,
        "CREATE INDEX withdrawals_state_created_at ON withdrawals (state, created_at)",
    ),
    # 4: pay-on-success requests, each with its hold invoice's preimage (secret like a root
    # key). The stored request: method, target, headers as JSON text of [name, value] pairs,
    # body; once it ran or never will, its headers are [] and its body empty (method and
    # target stay, for the replay's check). The response is NULL until the backend answered
    # with a success. The executor finds them by state, the caps count them per client, pruning
    # goes by keep_until.
    (
        """
        CREATE TABLE held_requests (
            payment_hash     BLOB PRIMARY KEY NOT NULL,
            preimage         BLOB NOT NULL,
            token_id         BLOB NOT NULL,
            client           TEXT NOT NULL,
            token_grant      TEXT NOT NULL,
            state            TEXT NOT NULL CHECK (
                                 state IN ('WAITING', 'RUNNING', 'SUCCEEDED', 'FAILED',
                                           'SETTLED', 'CANCELED', 'EXPIRED')
                             ),
            method           TEXT,
            target           TEXT,
            request_headers  TEXT,
            request_body     BLOB,
            created_at       REAL NOT NULL,
            expires_at       REAL NOT NULL,
            updated_at       REAL NOT NULL,
            status           INTEGER,
            response_headers TEXT,
            response_body    BLOB,
            failure          TEXT NOT NULL,
            keep_until       REAL,
            delivered_at     REAL,
            CHECK ((target IS NULL) = (method IS NULL)
                   AND (request_headers IS NULL) = (method IS NULL)
                   AND (request_body IS NULL) = (method IS NULL)),
            CHECK ((response_headers IS NULL) = (status IS NULL)
                   AND (response_body IS NULL) = (status IS NULL))
        )
        """,
        "CREATE INDEX held_requests_state_created_at ON held_requests (state, created_at)",
        "CREATE INDEX held_requests_client_state ON held_requests (client, state)",
        "CREATE INDEX held_requests_keep_until ON held_requests (keep_until)",
    ),
    # 5: webhooks. ``events`` is the outbox, written in the transaction of the change that
    # causes each event (AUTOINCREMENT: ids grow in commit order under the write lock and
    # are never reused, so a cursor past an id has seen every event up to it; but a restored
    # backup or a fresh database repeats them, so the webhook-id is a random ``webhook_id``
    # given at insert). A delivery per (endpoint, event); each endpoint's fan-out cursor.
    (
        """
        CREATE TABLE events (
            id         INTEGER PRIMARY KEY AUTOINCREMENT,
            type       TEXT NOT NULL,
            resource   TEXT NOT NULL,
            payload    TEXT NOT NULL,  -- the JSON body sent
            created_at REAL NOT NULL,
            webhook_id TEXT NOT NULL CHECK (length(webhook_id) = 32)  -- random hex: msg_<it>
        )
        """,
        "CREATE INDEX events_created_at ON events (created_at)",
        """
        CREATE TABLE webhook_deliveries (
            event_id        INTEGER NOT NULL,
            endpoint        TEXT NOT NULL,
            event_type      TEXT NOT NULL,
            state           TEXT NOT NULL CHECK (state IN ('PENDING', 'DELIVERED', 'DEAD')),
            attempts        INTEGER NOT NULL CHECK (attempts >= 0),
            next_attempt_at REAL NOT NULL,
            last_status     INTEGER,
            last_error      TEXT NOT NULL,
            delivered_at    REAL,
            PRIMARY KEY (endpoint, event_id)
        ) WITHOUT ROWID
        """,
        "CREATE INDEX webhook_deliveries_state ON webhook_deliveries (state, event_id)",
        "CREATE INDEX webhook_deliveries_event_id ON webhook_deliveries (event_id)",
        """
        CREATE TABLE webhook_endpoints (
            name   TEXT PRIMARY KEY NOT NULL,
            cursor INTEGER NOT NULL  -- the last event id fanned out to it
        ) WITHOUT ROWID
        """,
    ),
    # 6: revenue splits. Each invoice keeps its route's split (``gateway.splits.encode_split``;
    # '' for none). The ledger: an entry per payee share of each split payment and one with
    # payee '' for the merchant's part, keyed by the payment ("invoice:<hash hex>" or
    # "charge:<reservation id>"), so a payment is split once; each payee's running totals,
    # whose CHECKs are the last line against an accrued going negative; the payouts.
    (
        "ALTER TABLE invoices ADD COLUMN split TEXT NOT NULL DEFAULT ''",
        """
        CREATE TABLE split_entries (
            source     TEXT NOT NULL,
            payee      TEXT NOT NULL,  -- '': the merchant's part
            share_msat INTEGER NOT NULL CHECK (share_msat >= 0),
            at         REAL NOT NULL,
            PRIMARY KEY (source, payee)
        ) WITHOUT ROWID
        """,
        """
        CREATE TABLE payees (
            payee              TEXT PRIMARY KEY NOT NULL,
            earned_msat        INTEGER NOT NULL CHECK (earned_msat >= 0),
            paid_msat          INTEGER NOT NULL CHECK (paid_msat >= 0),
            fees_msat          INTEGER NOT NULL CHECK (fees_msat >= 0),
            pending_msat       INTEGER NOT NULL CHECK (pending_msat >= 0),
            merchant_fees_msat INTEGER NOT NULL CHECK (merchant_fees_msat >= 0),
            last_payout_at     REAL,
            CHECK (earned_msat - paid_msat - fees_msat - pending_msat >= 0)
        ) WITHOUT ROWID
        """,
        """
        CREATE TABLE payouts (
            payment_hash     BLOB PRIMARY KEY NOT NULL,
            payee            TEXT NOT NULL,
            destination      TEXT NOT NULL,
            payment_request  TEXT NOT NULL,
            amount_msat      INTEGER NOT NULL CHECK (amount_msat > 0),
            fee_reserve_msat INTEGER NOT NULL CHECK (fee_reserve_msat >= 0),
            payee_pays_fee   INTEGER NOT NULL,
            state            TEXT NOT NULL CHECK (state IN ('PENDING', 'SUCCEEDED', 'FAILED')),
            created_at       REAL NOT NULL,
            fee_msat         INTEGER NOT NULL
                             CHECK (fee_msat >= 0 AND fee_msat <= fee_reserve_msat),
            resolved_at      REAL,
            failure          TEXT NOT NULL
        )
        """,
        "CREATE INDEX payouts_payee_created_at ON payouts (payee, created_at)",
        "CREATE INDEX payouts_state_created_at ON payouts (state, created_at)",
        "CREATE INDEX payouts_created_at ON payouts (created_at)",
    ),
    # 7: tips and payment links. Each invoice keeps its payer's comment (LUD-12; '' for
    # none). A payment link with its running totals (settlements add to them, once each) and,
    # single use, the one invoice that may pay it now (``open_hash``); listed newest first.
    (
        "ALTER TABLE invoices ADD COLUMN comment TEXT NOT NULL DEFAULT ''",
        """
        CREATE TABLE payment_links (
            link_id      TEXT PRIMARY KEY NOT NULL,
            memo         TEXT NOT NULL,
            min_msat     INTEGER NOT NULL CHECK (min_msat >= 1),
            max_msat     INTEGER NOT NULL CHECK (max_msat >= min_msat),
            single_use   INTEGER NOT NULL,
            created_at   REAL NOT NULL,
            expires_at   REAL,                 -- NULL: never
            canceled_at  REAL,
            paid_count   INTEGER NOT NULL CHECK (paid_count >= 0),
            paid_msat    INTEGER NOT NULL CHECK (paid_msat >= 0),
            last_paid_at REAL,
            open_hash    BLOB
        )
        """,
        "CREATE INDEX payment_links_created_at ON payment_links (created_at)",
    ),
)

# The columns steps added to the invoices, with the value an older row reads as
# (``_read_as_latest`` stands in for them): step, column, value.
_INVOICE_COLUMNS = ((3, "buys_credit", "0"), (6, "split", "''"), (7, "comment", "''"))
_INVOICES_AS_LATEST = "CREATE TEMP VIEW invoices AS SELECT *, {columns} FROM main.invoices"


def connect(path: Path, synchronous: Synchronous, read_only: bool) -> sqlite3.Connection:
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
        raise StoreError(f"cannot open {path}: {describe(error)}") from error
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


def connect_nonblocking(path: Path, synchronous: Synchronous) -> sqlite3.Connection:
    """A second connection to a database ``connect`` opened, for the event loop's own thread:
    it never waits for a lock (a busy database is an ``SQLITE_BUSY`` error at once) and never
    checkpoints the WAL (a checkpoint writes, and with ``FULL`` syncs, the database file)."""
    try:
        connection = sqlite3.connect(path, timeout=0, isolation_level=None)
    except sqlite3.Error as error:
        raise StoreError(f"cannot open {path}: {describe(error)}") from error
    try:
        connection.execute(f"PRAGMA synchronous = {synchronous}")
        connection.execute("PRAGMA wal_autocheckpoint = 0")
    except sqlite3.Error as error:
        connection.close()
        raise StoreError(f"cannot configure {path}: {describe(error)}") from error
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
            try:
                descriptor = os.open(companion, flags)
            except FileNotFoundError:
                continue  # a rollback journal lives only as long as a write transaction
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
        raise StoreError(f"cannot read {path}: {describe(error)}") from error
    if version == 0:
        raise ConfigError(f"store: {path} is not a gateway database (it has no gateway schema)")
    # An older schema is read as it is (the gateway migrates it when it next starts).
    _check_version(version, path)
    try:
        _read_as_latest(connection, version)
    except sqlite3.Error as error:
        raise StoreError(f"cannot read {path}: {describe(error)}") from error


def _read_as_latest(connection: sqlite3.Connection, version: int) -> None:
    """Let a read-only connection to an older schema run the current queries: what it lacks
    appears empty, as TEMP objects (they live in the connection, never in the file, and
    shadow the file's tables of the same name). The invoices lack the columns of the later
    steps of ``_INVOICE_COLUMNS``; the other steps add tables (a later step that changes an
    existing table needs its own stand-in here)."""
    missing = [f"{value} AS {column}" for step, column, value in _INVOICE_COLUMNS if version < step]
    if missing:
        connection.execute(_INVOICES_AS_LATEST.format(columns=", ".join(missing)))
    for step in MIGRATIONS[max(version, 2) :]:
        for statement in step:
            if statement.lstrip().startswith("CREATE TABLE"):
                connection.execute(statement.replace("CREATE TABLE", "CREATE TEMP TABLE", 1))


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
        raise StoreError(f"cannot configure {path}: {describe(error)}") from error


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
        raise StoreError(f"cannot migrate {path} to schema {latest}: {describe(error)}") from error
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


def describe(error: sqlite3.Error) -> str:
    name = getattr(error, "sqlite_errorname", None)
    return f"{name or type(error).__name__}: {error}"
