"""What only the SQLite store promises: durability, file safety, schema migrations."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import socket
import sqlite3
import stat
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from gateway.errors import ConfigError
from gateway.ports import (
    HELD_UNFINISHED,
    Cursor,
    HeldRequest,
    HeldState,
    InvoiceRecord,
    InvoiceState,
    InvoiceUpdate,
    Msat,
    PaymentHash,
    Preimage,
    Reserved,
    StoredRequest,
)
from gateway.store import SchemaVersionError, SqliteStore, StoreError, sqlite_file
from gateway.store import sqlite as sqlite_module


def record(n: int) -> InvoiceRecord:
    return InvoiceRecord(
        payment_hash=PaymentHash(hashlib.sha256(b"%d" % n).digest()),
        payment_request=f"lnbcrt{n}n1fake",
        amount_msat=Msat(21_000),
        token_id=b"t" * 32,
        service="svc",
        method="GET",
        path="/",
        state=InvoiceState.OPEN,
        created_at=1000.5 + n,
        expires_at=4600.5 + n,
        add_index=n,
    )


@contextlib.contextmanager
def raw(path: Path) -> Iterator[sqlite3.Connection]:
    """A plain sqlite3 connection in autocommit mode, closed on exit."""
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        yield connection
    finally:
        connection.close()


def user_version(path: Path) -> int:
    with raw(path) as connection:
        (version,) = connection.execute("PRAGMA user_version").fetchone()
        return int(version)


def columns(path: Path, table: str) -> list[str]:
    with raw(path) as connection:
        return [row[1] for row in connection.execute(f"PRAGMA table_info({table})")]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    directory = tmp_path / "state" / "nested"
    directory.mkdir(mode=0o700, parents=True)
    return directory / "gateway.db"


@pytest_asyncio.fixture
async def store(db_path: Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(db_path)
    try:
        yield opened
    finally:
        await opened.close()


# --- durability ------------------------------------------------------------------------------


async def test_everything_survives_close_and_reopen(db_path: Path) -> None:
    first = await SqliteStore.open(db_path)
    await first.put_root_key(b"k" * 32, b"t" * 32, b"r" * 32)
    await first.put_root_key(b"gone" * 8, b"u" * 32, b"s" * 32)
    await first.revoke_token(b"u" * 32)
    await first.add_invoice(record(1))
    await first.add_invoice(record(2))
    await first.apply_update(
        InvoiceUpdate(record(2).payment_hash, InvoiceState.SETTLED, 3, Msat(21_000), 2000.25)
    )
    await first.save_cursor(Cursor(2, 3))
    before = await first.list_invoices()
    await first.close()

    second = await SqliteStore.open(db_path)
    try:
        assert await second.get_root_key(b"k" * 32) == b"r" * 32
        assert await second.get_root_key(b"gone" * 8) is None
        assert await second.list_invoices() == before
        assert [r.state for r in before] == [InvoiceState.SETTLED, InvoiceState.OPEN]
        assert await second.get_cursor() == Cursor(2, 3)
    finally:
        await second.close()


CHILD = """
import asyncio, hashlib, os, sys
from gateway.ports import Cursor, InvoiceRecord, InvoiceState, Msat, PaymentHash
from gateway.store import SqliteStore

async def main() -> None:
    store = await SqliteStore.open(sys.argv[1])
    await store.put_root_key(b"k" * 32, b"t" * 32, b"r" * 32)
    await store.add_invoice(InvoiceRecord(
        payment_hash=PaymentHash(hashlib.sha256(b"7").digest()),
        payment_request="lnbcrt7n1fake", amount_msat=Msat(21000), token_id=b"t" * 32,
        service="svc", method="GET", path="/", state=InvoiceState.OPEN,
        created_at=1007.5, expires_at=4607.5, add_index=7,
    ))
    await store.save_cursor(Cursor(7, 0))
    print("ok", flush=True)
    if sys.argv[2] == "exit":
        os._exit(0)  # no close, no atexit, no flushing of anything
    await asyncio.sleep(60)  # the parent SIGKILLs us while the connection is open

asyncio.run(main())
"""


@pytest.mark.parametrize("death", ["exit", "sigkill"])
async def test_a_returned_write_survives_the_process_dying(db_path: Path, death: str) -> None:
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        str(db_path),
        death,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert child.stdout is not None
    line = await asyncio.wait_for(child.stdout.readline(), timeout=60)
    if death == "sigkill" and line == b"ok\n":
        child.kill()
    _, stderr = await child.communicate()
    assert line == b"ok\n", stderr.decode()
    assert child.returncode == (0 if death == "exit" else -9)

    reopened = await SqliteStore.open(db_path)
    try:
        assert await reopened.get_invoice(record(7).payment_hash) == record(7)
        assert await reopened.get_root_key(b"k" * 32) == b"r" * 32
        assert await reopened.get_cursor() == Cursor(7, 0)
    finally:
        await reopened.close()


# --- the file --------------------------------------------------------------------------------


async def test_a_missing_directory_is_refused_not_created(tmp_path: Path) -> None:
    path = tmp_path / "typo" / "nested" / "gateway.db"
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'typo' / 'nested'} is not an existing"):
        await SqliteStore.open(path)
    assert list(tmp_path.iterdir()) == []


async def test_the_file_and_its_wal_are_mode_0600(store: SqliteStore, db_path: Path) -> None:
    await store.add_invoice(record(1))  # makes sure the WAL and shared-memory files exist
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
    for suffix in ("-wal", "-shm"):
        companion = db_path.with_name(db_path.name + suffix)
        assert stat.S_IMODE(companion.stat().st_mode) == 0o600, suffix


async def test_a_new_file_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        opened = await SqliteStore.open(tmp_path / "gateway.db")
    finally:
        os.umask(old)
    await opened.close()
    assert stat.S_IMODE((tmp_path / "gateway.db").stat().st_mode) == 0o600


async def test_an_existing_world_readable_file_is_tightened(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "gateway.db"
    path.touch()
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="gateway.store.sqlite_file"):
        opened = await SqliteStore.open(path)
    await opened.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "mode 644" in caplog.text


async def test_wal_journal_mode_is_on(store: SqliteStore, db_path: Path) -> None:
    with raw(db_path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_a_corrupt_database_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    path.write_bytes(b"SQLite format 3\x00" + b"but the rest is garbage" * 100)
    with pytest.raises(StoreError, match=r"gateway\.db") as caught:
        await SqliteStore.open(path)
    assert isinstance(caught.value.__cause__, sqlite3.DatabaseError)


# --- what the path names: only our database is opened, and only it is chmodded -------------


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@contextlib.contextmanager
def unix_socket(path: Path) -> Iterator[None]:
    listener = socket.socket(socket.AF_UNIX)
    try:
        listener.bind(str(path))
        yield
    finally:
        listener.close()


async def test_a_directory_is_refused_and_left_alone(tmp_path: Path) -> None:
    directory = tmp_path / "gateway.db"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    with pytest.raises(ConfigError, match=r"gateway\.db is a directory"):
        await SqliteStore.open(directory)
    assert mode_of(directory) == 0o755


async def test_a_symlink_is_refused_and_its_target_left_alone(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.db"
    await (await SqliteStore.open(target)).close()
    target.chmod(0o644)
    link = tmp_path / "gateway.db"
    link.symlink_to(target)
    with pytest.raises(ConfigError, match=r"gateway\.db is a symbolic link"):
        await SqliteStore.open(link)
    assert mode_of(target) == 0o644


async def test_a_dangling_symlink_is_refused_and_nothing_created(tmp_path: Path) -> None:
    link = tmp_path / "gateway.db"
    link.symlink_to(tmp_path / "target.db")
    with pytest.raises(ConfigError, match="symbolic link"):
        await SqliteStore.open(link)
    assert not (tmp_path / "target.db").exists()


async def test_a_socket_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    with unix_socket(path):
        before = mode_of(path)
        with pytest.raises(ConfigError, match="not a regular file"):
            await SqliteStore.open(path)
        assert mode_of(path) == before


async def test_a_file_that_is_not_a_database_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"this is not an sqlite database, not even close" * 100)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match=r"notes\.txt is not an SQLite database"):
        await SqliteStore.open(path)
    assert mode_of(path) == 0o644
    assert path.read_bytes() == b"this is not an sqlite database, not even close" * 100


async def test_an_existing_wal_readable_by_others_is_tightened(store: SqliteStore) -> None:
    await store.add_invoice(record(1))  # the WAL now holds it
    wal = store.path.with_name(store.path.name + "-wal")
    wal.chmod(0o644)  # as an older gateway may have left it
    second = await SqliteStore.open(store.path)
    try:
        assert mode_of(wal) == 0o600
    finally:
        await second.close()


async def test_a_symlinked_wal_is_refused_and_its_target_left_alone(db_path: Path) -> None:
    await (await SqliteStore.open(db_path)).close()
    target = db_path.parent / "someone-elses-file"
    target.write_bytes(b"x")
    target.chmod(0o644)
    db_path.with_name(db_path.name + "-wal").symlink_to(target)
    with pytest.raises(ConfigError, match=r"gateway\.db-wal is a symbolic link"):
        await SqliteStore.open(db_path)
    assert mode_of(target) == 0o644
    assert target.read_bytes() == b"x"


# --- read-only ---------------------------------------------------------------------------------


async def test_read_only_reads_without_creating_or_changing_anything(db_path: Path) -> None:
    writer = await SqliteStore.open(db_path)
    try:
        await writer.add_invoice(record(1))
        db_path.chmod(0o640)
        reader = await SqliteStore.open(db_path, read_only=True)
        try:
            assert await reader.list_invoices() == [record(1)]
            with pytest.raises(StoreError, match="readonly"):
                await reader.add_invoice(record(2))
        finally:
            await reader.close()
    finally:
        await writer.close()
    assert mode_of(db_path) == 0o640


async def test_read_only_does_not_create_a_missing_database(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no database at .*gateway\.db"):
        await SqliteStore.open(tmp_path / "gateway.db", read_only=True)
    assert list(tmp_path.iterdir()) == []


async def test_read_only_does_not_migrate_an_older_database(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    make_v1_by_hand(path)
    reader = await SqliteStore.open(path, read_only=True)
    try:
        assert [r.payment_hash for r in await reader.list_invoices()] == [record(1).payment_hash]
    finally:
        await reader.close()
    assert user_version(path) == 1


def other_sqlite_database(path: Path) -> None:
    with raw(path) as connection:
        connection.execute("CREATE TABLE notes (text TEXT)")


def newer_database(path: Path) -> None:
    with raw(path) as connection:
        connection.execute(f"PRAGMA user_version = {len(sqlite_file.MIGRATIONS) + 1}")


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (Path.mkdir, ConfigError, "is a directory"),
        (lambda path: path.write_text("hello"), ConfigError, "not an SQLite database"),
        (Path.touch, ConfigError, "not a gateway database"),
        (other_sqlite_database, ConfigError, "not a gateway database"),
        (newer_database, SchemaVersionError, "newer gateway"),
    ],
)
async def test_read_only_refuses_what_is_not_a_gateway_database(
    tmp_path: Path, make: Callable[[Path], object], error: type[Exception], message: str
) -> None:
    path = tmp_path / "gateway.db"
    make(path)
    path.chmod(0o755)
    with pytest.raises(error, match=message):
        await SqliteStore.open(path, read_only=True)
    assert mode_of(path) == 0o755


async def test_read_only_refuses_a_symlink(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    path.symlink_to(tmp_path / "target.db")
    with pytest.raises(ConfigError, match="symbolic link"):
        await SqliteStore.open(path, read_only=True)
    assert not (tmp_path / "target.db").exists()


async def test_an_unknown_synchronous_setting_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="synchronous"):
        await SqliteStore.open(tmp_path / "gateway.db", synchronous="OFF")  # type: ignore[arg-type]


async def test_full_synchronous_is_accepted(tmp_path: Path) -> None:
    opened = await SqliteStore.open(tmp_path / "gateway.db", synchronous="FULL")
    try:
        await opened.add_invoice(record(1))
        assert await opened.get_invoice(record(1).payment_hash) == record(1)
    finally:
        await opened.close()


async def test_close_stops_the_worker_thread(tmp_path: Path) -> None:
    before = set(threading.enumerate())
    opened = await SqliteStore.open(tmp_path / "gateway.db")
    await opened.get_cursor()
    started = [t for t in set(threading.enumerate()) - before if t.name.startswith("gateway-")]
    assert len(started) == 1
    await opened.close()
    assert not started[0].is_alive()


# --- errors and the event loop ---------------------------------------------------------------


async def test_sqlite_errors_become_store_errors_with_context(
    store: SqliteStore, db_path: Path
) -> None:
    with raw(db_path) as connection:
        connection.execute("DROP TABLE invoices")
    with pytest.raises(
        StoreError, match=r"get_invoice failed on .*gateway\.db.*invoices"
    ) as caught:
        await store.get_invoice(record(1).payment_hash)
    assert isinstance(caught.value.__cause__, sqlite3.OperationalError)


async def test_waiting_for_a_lock_does_not_block_the_loop(
    store: SqliteStore, db_path: Path
) -> None:
    with raw(db_path) as other_process:
        other_process.execute("BEGIN IMMEDIATE")  # holds the write lock
        writing = asyncio.ensure_future(store.add_invoice(record(1)))
        # The loop keeps running while the store's thread waits on the lock...
        await asyncio.sleep(0.2)
        assert not writing.done()
        # ...so it can release the lock, and the write goes through.
        other_process.execute("COMMIT")
        await asyncio.wait_for(writing, timeout=sqlite_file.BUSY_TIMEOUT)
    assert await store.get_invoice(record(1).payment_hash) == record(1)


async def test_a_lock_held_too_long_is_a_store_error(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_file, "BUSY_TIMEOUT", 0.05)
    opened = await SqliteStore.open(db_path)
    try:
        with raw(db_path) as other_process:
            other_process.execute("BEGIN IMMEDIATE")
            with pytest.raises(StoreError, match=r"add_invoice failed.*locked"):
                await opened.add_invoice(record(1))
            other_process.execute("ROLLBACK")
    finally:
        await opened.close()


# --- transactions against other processes ---------------------------------------------------


def can_write(path: Path) -> bool:
    """Whether another process could take the write lock right now."""
    connection = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        connection.execute("BEGIN IMMEDIATE")
        connection.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        connection.close()


async def test_a_transaction_holds_the_write_lock_until_it_ends(
    store: SqliteStore, db_path: Path
) -> None:
    async with store.transaction() as tx:
        await tx.get_cursor()  # a read first: the lock is taken at BEGIN all the same
        assert not can_write(db_path)
        await tx.add_invoice(record(1))
    assert can_write(db_path)
    with raw(db_path) as other_process:
        assert other_process.execute("SELECT count(*) FROM invoices").fetchone() == (1,)


async def test_a_transaction_cancelled_while_it_begins_leaves_no_transaction_open(
    store: SqliteStore, db_path: Path
) -> None:
    async def work() -> None:
        async with store.transaction() as tx:
            await tx.add_invoice(record(1))

    with raw(db_path) as other_process:
        other_process.execute("BEGIN IMMEDIATE")  # the BEGIN waits in the worker thread
        task = asyncio.create_task(work())
        await asyncio.sleep(0.1)
        task.cancel()
        other_process.execute("ROLLBACK")
        with pytest.raises(asyncio.CancelledError):
            await task
    await store.save_cursor(Cursor(1, 1))  # autocommit again: visible to others at once
    assert can_write(db_path)
    with raw(db_path) as other_process:
        assert other_process.execute("SELECT add_index FROM cursor").fetchone() == (1,)
        assert other_process.execute("SELECT count(*) FROM invoices").fetchone() == (0,)


# --- schema migrations -----------------------------------------------------------------------


def make_v1_by_hand(path: Path) -> None:
    """A database as the first schema left it, with a row in it, no store code involved."""
    with raw(path) as connection:
        connection.execute("BEGIN")
        for statement in sqlite_file.MIGRATIONS[0]:
            connection.execute(statement)
        connection.execute(
            "INSERT INTO invoices VALUES (?, 'lnbcrt1', 21000, ?, 'svc', 'GET', '/', 'OPEN',"
            " 1001.5, 4601.5, 1, 0, 0, NULL)",
            (record(1).payment_hash, b"t" * 32),
        )
        connection.execute("PRAGMA user_version = 1")
        connection.execute("COMMIT")


async def test_a_version_0_database_is_migrated_to_the_latest(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    with raw(path) as connection:  # an existing, empty SQLite file at user_version 0
        connection.execute("CREATE TABLE unrelated (x)")
    assert user_version(path) == 0

    opened = await SqliteStore.open(path)
    try:
        await opened.add_invoice(record(1))
        assert await opened.list_invoices() == [record(1)]
    finally:
        await opened.close()
    assert user_version(path) == len(sqlite_file.MIGRATIONS)
    assert "unrelated" in {t for (t,) in _tables(path)}


def _tables(path: Path) -> list[tuple[str]]:
    with raw(path) as connection:
        return list(connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))


async def test_an_older_database_is_migrated_in_order_keeping_its_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "gateway.db"
    make_v1_by_hand(path)
    shipped = len(sqlite_file.MIGRATIONS)
    step_2 = ("ALTER TABLE invoices ADD COLUMN note TEXT", "UPDATE invoices SET note = 'v2'")
    step_3 = ("UPDATE invoices SET note = note || '+v3'",)
    monkeypatch.setattr(sqlite_file, "MIGRATIONS", (*sqlite_file.MIGRATIONS, step_2, step_3))

    opened = await SqliteStore.open(path)
    try:
        got = await opened.get_invoice(record(1).payment_hash)
        assert got is not None
        assert (got.payment_request, got.created_at) == ("lnbcrt1", 1001.5)
    finally:
        await opened.close()

    assert user_version(path) == shipped + 2
    with raw(path) as connection:
        assert connection.execute("SELECT note FROM invoices").fetchall() == [("v2+v3",)]


async def test_a_failed_migration_leaves_the_database_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "gateway.db"
    make_v1_by_hand(path)
    broken = ("ALTER TABLE invoices ADD COLUMN note TEXT", "THIS IS NOT SQL")
    broken_step = len(sqlite_file.MIGRATIONS) + 1
    monkeypatch.setattr(sqlite_file, "MIGRATIONS", (*sqlite_file.MIGRATIONS, broken))

    with pytest.raises(StoreError, match=f"cannot migrate .* to schema {broken_step}") as caught:
        await SqliteStore.open(path)
    assert isinstance(caught.value.__cause__, sqlite3.OperationalError)
    assert user_version(path) == 1
    assert "note" not in columns(path, "invoices")


async def test_a_version_1_database_takes_expired_invoices_after_the_migration(
    tmp_path: Path,
) -> None:
    path = tmp_path / "gateway.db"
    make_v1_by_hand(path)
    with raw(path) as connection:  # a second row created in the same instant as the first
        connection.execute(
            "INSERT INTO invoices VALUES (?, 'lnbcrt2', 21000, ?, 'svc', 'GET', '/', 'SETTLED',"
            " 1001.5, 4601.5, 2, 1, 21000, 1002.0)",
            (record(2).payment_hash, b"u" * 32),
        )
        with pytest.raises(sqlite3.IntegrityError):  # schema 1 knows no EXPIRED
            connection.execute("UPDATE invoices SET state = 'EXPIRED'")

    opened = await SqliteStore.open(path)
    try:
        # rows and their order (the later insert first among equal times) survive the rebuild
        listed = await opened.list_invoices()
        assert [(r.payment_request, r.state) for r in listed] == [
            ("lnbcrt2", InvoiceState.SETTLED),
            ("lnbcrt1", InvoiceState.OPEN),
        ]
        assert await opened.apply_update(
            InvoiceUpdate(record(1).payment_hash, InvoiceState.EXPIRED, 0, Msat(0), None)
        )
        got = await opened.get_invoice(record(1).payment_hash)
        assert got is not None
        assert got.state is InvoiceState.EXPIRED
    finally:
        await opened.close()
    with raw(path) as connection:
        plans = [
            " ".join(str(row[-1]) for row in connection.execute(f"EXPLAIN QUERY PLAN {sql}", args))
            for sql, args in (
                (sqlite_module._LIST_OVERDUE, (1.0, 10)),
                (sqlite_module._PRUNABLE, (1.0, 10)),
            )
        ]
    for plan in plans:  # found through the index, not by reading every invoice
        assert "invoices_state_expires_at" in plan, plan


async def test_a_newer_database_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    newer = len(sqlite_file.MIGRATIONS) + 1
    with raw(path) as connection:
        connection.execute(f"PRAGMA user_version = {newer}")
    before = path.read_bytes()

    with pytest.raises(SchemaVersionError, match=f"schema version {newer}.*newer gateway"):
        await SqliteStore.open(path)

    assert path.read_bytes() == before  # not even switched to WAL
    assert user_version(path) == newer


async def test_a_current_database_is_opened_as_is(db_path: Path) -> None:
    for _ in range(2):
        opened = await SqliteStore.open(db_path)
        await opened.close()
    assert user_version(db_path) == len(sqlite_file.MIGRATIONS)


async def test_two_stores_opening_one_new_file_at_once_both_work(tmp_path: Path) -> None:
    # Racy by nature (switching to WAL answers SQLITE_BUSY without waiting): many rounds.
    for round_number in range(200):
        db_path = tmp_path / f"race-{round_number}.db"
        first, second = await asyncio.gather(SqliteStore.open(db_path), SqliteStore.open(db_path))
        try:
            await first.add_invoice(record(1))
            assert await second.get_invoice(record(1).payment_hash) == record(1)
        finally:
            await first.close()
            await second.close()


def make_v2_by_hand(path: Path) -> None:
    """A database as the second schema left it, an open and a settled invoice in it."""
    with raw(path) as connection:
        connection.execute("BEGIN")
        for step in sqlite_file.MIGRATIONS[:2]:
            for statement in step:
                connection.execute(statement)
        for n, state, paid, settled_at in ((1, "OPEN", 0, None), (2, "SETTLED", 21000, 1003.0)):
            connection.execute(
                "INSERT INTO invoices VALUES (?, ?, 21000, ?, 'svc', 'GET', '/', ?, ?, ?, ?, ?,"
                " ?, ?)",
                (
                    record(n).payment_hash,
                    f"lnbcrt{n}n1fake",
                    b"t" * 32,
                    state,
                    1000.5 + n,
                    4600.5 + n,
                    n,
                    1 if paid else 0,
                    paid,
                    settled_at,
                ),
            )
        connection.execute("PRAGMA user_version = 2")
        connection.execute("COMMIT")


V2_INVOICES = [
    dataclasses.replace(
        record(2),
        state=InvoiceState.SETTLED,
        settle_index=1,
        amount_paid_msat=Msat(21000),
        settled_at=1003.0,
    ),
    record(1),
]


async def test_a_version_2_database_migrates_to_3_keeping_its_invoices(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    make_v2_by_hand(path)
    opened = await SqliteStore.open(path)
    try:
        assert await opened.list_invoices() == V2_INVOICES  # none of them buys credit
        assert await opened.list_accounts() == []
        # and it takes credit: a settled purchase credits its account
        await opened.open_account(b"c" * 32, "svc")
        await opened.add_invoice(
            dataclasses.replace(record(3), token_id=b"c" * 32, buys_credit=True)
        )
        await opened.apply_update(
            InvoiceUpdate(record(3).payment_hash, InvoiceState.SETTLED, 2, Msat(21000), 9.0)
        )
        account = await opened.get_account(b"c" * 32)
        assert account is not None
        assert account.balance_msat == 21000
    finally:
        await opened.close()
    assert user_version(path) == len(sqlite_file.MIGRATIONS)
    assert "buys_credit" in columns(path, "invoices")
    with raw(path) as connection:
        plans = {
            name: " ".join(
                str(row[-1]) for row in connection.execute(f"EXPLAIN QUERY PLAN {sql}", args)
            )
            for name, sql, args in (
                ("prune key", sqlite_module._PRUNE_ROOT_KEY, (b"k",)),
                ("prune keys", sqlite_module._PRUNE_ROOT_KEYS, (b"t", b"t")),
                ("reserve", sqlite_module._RESERVE, (1, 1.0, b"t", 1)),
                ("charges", sqlite_module._LIST_CHARGES, (b"t", 20)),
                ("expired", sqlite_module._EXPIRED_RESERVATIONS, (1.0, 10)),
            )
        }
    # by index or key, never by reading the whole table
    assert "(key_id=?)" in plans["prune key"], plans
    assert "invoices_token_id" in plans["prune keys"], plans
    assert "PRIMARY KEY" in plans["reserve"], plans
    assert "charges_token_id_at" in plans["charges"], plans
    assert "reservations_expires_at" in plans["expired"], plans


async def test_read_only_reads_a_version_2_database_as_holding_no_credit(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    make_v2_by_hand(path)
    before = path.read_bytes()
    reader = await SqliteStore.open(path, read_only=True)
    try:
        assert await reader.list_invoices() == V2_INVOICES
        assert await reader.list_accounts() == []
        assert await reader.get_account(b"t" * 32) is None
        assert (await reader.credit_totals()).received_msat == 0
        assert await reader.list_withdrawals() == []
    finally:
        await reader.close()
    assert user_version(path) == 2
    assert path.read_bytes() == before


# --- group commit of reservations and charges -------------------------------------------


async def _funded(store: SqliteStore, amount: int) -> bytes:
    token_id = b"g" * 32
    funding = dataclasses.replace(record(900), token_id=token_id, buys_credit=True)
    async with store.transaction() as tx:
        await tx.open_account(token_id, "svc")
        await tx.add_invoice(funding)
    await store.apply_update(
        InvoiceUpdate(funding.payment_hash, InvoiceState.SETTLED, 1, Msat(amount), 2000.0)
    )
    return token_id


async def _challenge_writes(store: SqliteStore, first: int, count: int) -> None:
    """What a challenge writes, ``count`` times: its invoice and root key in one transaction,
    each on the loop's connection while the database is free."""
    for n in range(first, first + count):
        async with store.transaction() as transaction:
            await transaction.add_invoice(record(n))
            await transaction.put_root_key(b"k%d" % n, b"t" * 32, b"r" * 32)
        await asyncio.sleep(0)  # a server's loop turns between requests


@pytest.mark.parametrize("stores", [1, 2])
async def test_the_wal_stays_bounded_under_challenge_writes(
    db_path: Path, monkeypatch: pytest.MonkeyPatch, stores: int
) -> None:
    # Unpaid requests each leave about 43 KB of WAL: without checkpoints of the transactions'
    # commits it grew without bound (905 MB after 20000 challenges). With two stores (as two
    # worker processes), each one's writes go on while the other checkpoints.
    monkeypatch.setattr(sqlite_module, "CHECKPOINT_EVERY", 8)
    opened = [await SqliteStore.open(db_path) for _ in range(stores)]
    wal = Path(f"{db_path}-wal")
    try:
        await _challenge_writes(opened[0], 0, 7)  # not a checkpoint yet
        before_any = wal.stat().st_size
        for round_ in range(1, 20):
            await asyncio.gather(
                *(_challenge_writes(s, 1000 * round_ + 100 * i, 7) for i, s in enumerate(opened))
            )
        assert wal.stat().st_size <= 3 * stores * before_any
    finally:
        for one in opened:
            await one.close()
    assert await _count_invoices(db_path) == 7 + 19 * 7 * stores


async def test_a_long_reader_does_not_hold_up_the_stores_writes(
    store: SqliteStore, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A checkpoint holds this store's own calls back while it waits for other readers (a
    # backup's read transaction): briefly, not for the 5 s lock timeout.
    monkeypatch.setattr(sqlite_module, "CHECKPOINT_EVERY", 8)
    with raw(db_path) as reader:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM invoices").fetchone()
        slowest = 0.0
        for n in range(40):
            started = time.monotonic()
            await _challenge_writes(store, n, 1)
            slowest = max(slowest, time.monotonic() - started)
        reader.execute("COMMIT")
    assert slowest < 1.0
    assert await store.get_invoice(record(39).payment_hash) is not None


async def _count_invoices(path: Path) -> int:
    with raw(path) as connection:
        (count,) = connection.execute("SELECT count(*) FROM invoices").fetchone()
        return int(count)


async def test_reservations_made_at_once_are_committed_together(store: SqliteStore) -> None:
    token_id = await _funded(store, 100_000)
    statements: list[str] = []
    # Groups run on the loop's own connection, or on the worker's when that one is busy.
    await store._queue("trace", lambda c: c.set_trace_callback(statements.append), atomic=False)
    assert store._loop_connection is not None
    store._loop_connection.set_trace_callback(statements.append)
    results = await asyncio.gather(*(store.reserve(token_id, Msat(1_000), 9e9) for _ in range(40)))
    assert all(result.reservation is not None for result in results)
    assert statements.count("COMMIT") == 1
    assert statements.count("BEGIN IMMEDIATE") == 1
    assert sorted(result.balance_msat for result in results)[0] == 60_000


async def test_one_failing_operation_leaves_the_rest_of_its_group_committed(
    store: SqliteStore,
) -> None:
    token_id = await _funded(store, 10_000)
    held = await store.reserve(token_id, Msat(1_000), 9e9)
    assert held.reservation is not None
    first, overcharge, second = await asyncio.gather(
        store.reserve(token_id, Msat(2_000), 9e9),
        store.settle_reservation(held.reservation.reservation_id, Msat(5_000), "GET", "/"),
        store.reserve(token_id, Msat(3_000), 9e9),
        return_exceptions=True,
    )
    assert isinstance(overcharge, ValueError)
    assert isinstance(first, Reserved)
    assert isinstance(second, Reserved)
    account = await store.get_account(token_id)
    assert account is not None
    assert (account.reserved_msat, account.spent_msat) == (6_000, 0)


async def test_an_operation_failing_after_a_write_leaves_none_of_it_the_others_stand(
    store: SqliteStore,
) -> None:
    def half_then_fail(connection: sqlite3.Connection) -> None:
        connection.execute("UPDATE cursor SET add_index = 7 WHERE id = 0")
        raise ValueError("a check after the write")

    def move(connection: sqlite3.Connection) -> None:
        connection.execute("UPDATE cursor SET settle_index = 5 WHERE id = 0")

    failing, moved = await asyncio.gather(
        store._run_grouped("half", half_then_fail),
        store._run_grouped("move", move),
        return_exceptions=True,
    )
    assert isinstance(failing, ValueError)
    assert moved is None
    assert await store.get_cursor() == Cursor(0, 5)


async def _begun_times(statements: list[str], times: int) -> None:
    """Wait until the loop's connection has tried to begin ``times`` times."""
    async with asyncio.timeout(5):
        while True:  # the trace callback is not awaitable: look after each loop step
            if statements.count("BEGIN IMMEDIATE") >= times:
                return
            await asyncio.sleep(0)


async def _release_after_a_failed_begin(statements: list[str], other: sqlite3.Connection) -> None:
    """Wait until the loop's connection has tried to begin (and found the lock taken), then
    let the other connection's write end: before the loop's next try, a millisecond later."""
    await _begun_times(statements, 1)
    other.execute("ROLLBACK")


async def test_a_transaction_runs_on_the_loops_thread_unless_another_connection_writes(
    store: SqliteStore, db_path: Path
) -> None:
    assert store._loop_connection is not None
    statements: list[str] = []
    store._loop_connection.set_trace_callback(statements.append)
    async with store.transaction() as tx:
        await tx.save_cursor(Cursor(3, 1))
    assert statements[0] == "BEGIN IMMEDIATE"
    assert statements[-1] == "COMMIT"
    statements.clear()
    with raw(db_path) as other:
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock

        async def save() -> None:
            async with store.transaction() as tx:
                await tx.save_cursor(Cursor(4, 2))

        saving = asyncio.ensure_future(save())
        await _begun_times(statements, 1 + len(sqlite_module.LOOP_BUSY_DELAYS))  # the loop's tries
        await asyncio.sleep(0)  # the hand-over to the worker
        assert not saving.done()  # on the worker, which waits for the lock
        other.execute("ROLLBACK")
        await saving
    assert "COMMIT" not in statements  # the worker's connection committed it
    assert await store.get_cursor() == Cursor(4, 2)


async def test_a_transaction_waits_on_the_loop_for_a_short_write_of_another_process(
    store: SqliteStore, db_path: Path
) -> None:
    assert store._loop_connection is not None
    statements: list[str] = []
    store._loop_connection.set_trace_callback(statements.append)

    async def save() -> None:
        async with store.transaction() as tx:
            await tx.save_cursor(Cursor(4, 2))

    with raw(db_path) as other:
        other.execute("BEGIN IMMEDIATE")
        saving = asyncio.ensure_future(save())
        await _release_after_a_failed_begin(statements, other)
        await saving
    assert statements.count("BEGIN IMMEDIATE") == 2  # the first found the lock taken
    assert statements[-1] == "COMMIT"  # the loop's connection committed, not the worker's
    assert await store.get_cursor() == Cursor(4, 2)


async def test_a_group_waits_on_the_loop_for_a_short_write_of_another_process(
    store: SqliteStore, db_path: Path
) -> None:
    token_id = await _funded(store, 10_000)
    assert store._loop_connection is not None
    statements: list[str] = []
    store._loop_connection.set_trace_callback(statements.append)
    with raw(db_path) as other:
        other.execute("BEGIN IMMEDIATE")
        reserving = asyncio.ensure_future(store.reserve(token_id, Msat(1_000), 9e9))
        await _release_after_a_failed_begin(statements, other)
        reserved = await reserving
    assert statements.count("BEGIN IMMEDIATE") == 2
    assert statements[-1] == "COMMIT"
    assert reserved.balance_msat == 9_000


async def test_a_group_failing_for_another_reason_than_a_lock_is_not_tried_again(
    store: SqliteStore,
) -> None:
    assert store._loop_connection is not None
    statements: list[str] = []
    store._loop_connection.set_trace_callback(statements.append)

    def broken(connection: sqlite3.Connection) -> None:
        connection.execute("INSERT INTO no_such_table VALUES (1)")

    with pytest.raises(StoreError, match="no_such_table"):
        await store._run_grouped("broken", broken)
    assert statements.count("BEGIN IMMEDIATE") == 1  # then the worker, which reports it


async def test_a_group_goes_to_the_worker_while_another_connection_writes(
    store: SqliteStore, db_path: Path
) -> None:
    token_id = await _funded(store, 10_000)
    with raw(db_path) as other:
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        reserving = asyncio.ensure_future(store.reserve(token_id, Msat(1_000), 9e9))
        await asyncio.sleep(0.2)
        assert not reserving.done()  # waiting on the worker, which waits for the lock
        other.execute("ROLLBACK")
        reserved = await reserving
    assert reserved.reservation is not None
    assert reserved.balance_msat == 9_000


async def test_a_grouped_operation_inside_the_stores_own_transaction_raises(
    store: SqliteStore,
) -> None:
    token_id = await _funded(store, 10_000)
    async with store.transaction():
        with pytest.raises(RuntimeError, match="inside its own transaction"):
            await store.reserve(token_id, Msat(1_000), 9e9)


async def test_close_commits_the_grouped_operations_already_queued(db_path: Path) -> None:
    store = await SqliteStore.open(db_path)
    token_id = await _funded(store, 10_000)
    pending = [asyncio.ensure_future(store.reserve(token_id, Msat(1_000), 9e9)) for _ in range(5)]
    await asyncio.sleep(0)  # they are queued
    await store.close()
    assert all(task.result().reservation is not None for task in pending)
    reopened = await SqliteStore.open(db_path)
    try:
        account = await reopened.get_account(token_id)
        assert account is not None
        assert account.reserved_msat == 5_000
    finally:
        await reopened.close()


async def test_a_cancelled_reserve_leaves_no_hold_and_a_cancelled_settle_is_written(
    store: SqliteStore,
) -> None:
    token_id = await _funded(store, 10_000)
    held = await store.reserve(token_id, Msat(1_000), 9e9)
    assert held.reservation is not None
    reserving = asyncio.ensure_future(store.reserve(token_id, Msat(2_000), 9e9))
    settling = asyncio.ensure_future(
        store.settle_reservation(held.reservation.reservation_id, Msat(1_000), "GET", "/x")
    )
    await asyncio.sleep(0)  # both are queued
    reserving.cancel()
    settling.cancel()
    for cancelled in (reserving, settling):
        with pytest.raises(asyncio.CancelledError):
            await cancelled
    for _ in range(100):  # the release of the cancelled hold follows in a later group
        account = await store.get_account(token_id)
        if account is not None and account.reserved_msat == 0:
            break
        await asyncio.sleep(0.01)
    account = await store.get_account(token_id)
    assert account is not None
    assert (account.reserved_msat, account.spent_msat, account.balance_msat) == (0, 1_000, 9_000)
    assert [charge.path for charge in await store.list_charges(token_id, 10)] == ["/x"]


# --- pay-on-success requests (schema 4) ------------------------------------------------------


def make_v3_by_hand(path: Path) -> None:
    """A database as the third schema left it: an invoice that bought credit, its account."""
    with raw(path) as connection:
        connection.execute("BEGIN")
        for step in sqlite_file.MIGRATIONS[:3]:
            for statement in step:
                connection.execute(statement)
        connection.execute(
            "INSERT INTO invoices VALUES (?, 'lnbcrt1n1fake', 21000, ?, 'svc', 'GET', '/',"
            " 'SETTLED', 1001.5, 4601.5, 1, 1, 21000, 1003.0, 1)",
            (record(1).payment_hash, b"t" * 32),
        )
        connection.execute(
            "INSERT INTO accounts VALUES (?, 'svc', 21000, 1000, 0, 0, 1003.0, 1004.0)",
            (b"t" * 32,),
        )
        connection.execute("PRAGMA user_version = 3")
        connection.execute("COMMIT")


def held_request(n: int) -> HeldRequest:
    preimage = Preimage(hashlib.sha256(b"preimage %d" % n).digest())
    return HeldRequest(
        payment_hash=PaymentHash(hashlib.sha256(preimage).digest()),
        preimage=preimage,
        token_id=b"h" * 32,
        client="2001:db8::/64",
        grant="{}",
        request=StoredRequest("PUT", "/files/a?x=1", (("X-Odd", "\udcff"),), b"body"),
        state=HeldState.WAITING,
        created_at=2000.0 + n,
        expires_at=2120.0 + n,
        updated_at=2000.0 + n,
    )


async def test_a_version_3_database_migrates_to_the_latest_keeping_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    make_v3_by_hand(path)
    opened = await SqliteStore.open(path)
    try:
        invoice = await opened.get_invoice(record(1).payment_hash)
        assert invoice is not None
        assert (invoice.state, invoice.buys_credit) == (InvoiceState.SETTLED, True)
        account = await opened.get_account(b"t" * 32)
        assert account is not None
        assert account.balance_msat == 20_000
        assert await opened.count_held_requests(frozenset(HeldState)) == 0
        await opened.add_held_request(held_request(1))
        assert await opened.move_held_request(held_request(1).payment_hash, HeldState.RUNNING, 1)
    finally:
        await opened.close()
    assert user_version(path) == len(sqlite_file.MIGRATIONS)  # 4, and later steps
    reopened = await SqliteStore.open(path)
    try:
        assert await reopened.get_held_request(held_request(1).payment_hash) == dataclasses.replace(
            held_request(1), state=HeldState.RUNNING, updated_at=1.0
        )
    finally:
        await reopened.close()


async def test_read_only_reads_a_version_3_database_as_holding_no_held_requests(
    tmp_path: Path,
) -> None:
    path = tmp_path / "gateway.db"
    make_v3_by_hand(path)
    before = path.read_bytes()
    reader = await SqliteStore.open(path, read_only=True)
    try:
        assert await reader.count_held_requests(frozenset(HeldState)) == 0
        assert await reader.list_held_requests(frozenset(HeldState), 10) == []
        assert await reader.list_held_hashes(frozenset(HeldState), 10) == []
        assert await reader.get_held_request(held_request(1).payment_hash) is None
        account = await reader.get_account(b"t" * 32)
        assert account is not None
        assert account.balance_msat == 20_000
    finally:
        await reader.close()
    assert user_version(path) == 3
    assert path.read_bytes() == before


async def test_held_requests_are_found_by_index(store: SqliteStore, db_path: Path) -> None:
    await store.add_held_request(held_request(1))
    unfinished, values = sqlite_module._states(HELD_UNFINISHED)
    final, final_values = sqlite_module._states(frozenset(HeldState) - HELD_UNFINISHED)
    with raw(db_path) as connection:
        plans = {
            name: " ".join(
                str(row[-1]) for row in connection.execute(f"EXPLAIN QUERY PLAN {sql}", args)
            )
            for name, sql, args in (
                (
                    "list",
                    sqlite_module._LIST_HELD.format(states=unfinished),
                    (*values, 10),
                ),
                (
                    "list hashes",
                    sqlite_module._LIST_HELD_HASHES.format(states=unfinished),
                    (*values, 10),
                ),
                (
                    "count per client",
                    sqlite_module._COUNT_HELD_OF_CLIENT.format(states=unfinished),
                    ("c", *values),
                ),
                (
                    "prune",
                    sqlite_module._PRUNE_HELD.format(states=final),
                    (1.0, *final_values, 10),
                ),
                (
                    "move",
                    sqlite_module._MOVE_HELD.format(changes="", states="?"),
                    ("RUNNING", 1.0, "", None, None, b"h", "WAITING"),
                ),
            )
        }
    assert "held_requests_state_created_at" in plans["list"], plans
    assert "held_requests_state_created_at" in plans["list hashes"], plans
    assert "held_requests_client_state" in plans["count per client"], plans
    assert "held_requests_keep_until" in plans["prune"], plans
    assert "PRIMARY KEY" in plans["move"] or "(payment_hash=?)" in plans["move"], plans


async def test_headers_are_stored_as_ascii_json_pairs(store: SqliteStore, db_path: Path) -> None:
    await store.add_held_request(held_request(1))
    with raw(db_path) as connection:
        (text,) = connection.execute("SELECT request_headers FROM held_requests").fetchone()
    assert text == '[["X-Odd", "\\udcff"]]'
    got = await store.get_held_request(held_request(1).payment_hash)
    assert got is not None
    assert got.request == held_request(1).request


async def test_a_request_that_ran_leaves_no_headers_or_body_on_disk(
    store: SqliteStore, db_path: Path
) -> None:
    payment_hash = held_request(1).payment_hash
    await store.add_held_request(held_request(1))
    await store.move_held_request(payment_hash, HeldState.RUNNING, 1.0)
    await store.move_held_request(payment_hash, HeldState.FAILED, 2.0, failure="x")
    with raw(db_path) as connection:
        row = connection.execute(
            "SELECT method, target, request_headers, length(request_body), status,"
            " response_body FROM held_requests"
        ).fetchone()
    request = held_request(1).request
    assert request is not None
    assert row == (request.method, request.target, "[]", 0, None, None)


async def test_a_request_or_response_is_never_stored_in_part(
    store: SqliteStore, db_path: Path
) -> None:
    await store.add_held_request(held_request(1))
    with raw(db_path) as connection:
        for statement in (
            "UPDATE held_requests SET method = NULL",
            "UPDATE held_requests SET request_body = NULL",
            "UPDATE held_requests SET status = 200",
        ):
            with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
                connection.execute(statement)
