"""``backup FILE``: a consistent copy of the SQLite store, safe while gateways serve.

The store holds the root key of every token sold: losing it invalidates them all. SQLite's
online backup API copies the database as of one read transaction (WAL: writers go on), into
a new 0600 file that replaces ``FILE`` only once complete. Restore: stop the gateway, copy
the file to the ``store.url`` path (mode 0600), delete that path's ``-wal`` and ``-shm``
files, start the gateway.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import sys
from pathlib import Path
from typing import Any

from gateway import errors
from gateway.config import Config, store_location
from gateway.store.sqlite_file import connect, describe


def add_parser(commands: Any) -> None:
    """``backup FILE`` on the ``commands`` subparsers."""
    backup = commands.add_parser("backup", help="copy the SQLite store, consistently, to FILE")
    backup.add_argument("file", help="where to write the copy (replaced atomically, mode 0600)")


def run(config: Config, target: str) -> int:
    """Copy the store to ``target``; the exit code."""
    kind, location = store_location(config.store.url)
    if kind == "postgresql":
        # The URL is not shown: it may hold a password.
        raise errors.ConfigError(
            "backup: the store is PostgreSQL; back it up with pg_dump (see the README)"
        )
    if kind != "sqlite" or location is None:
        raise errors.ConfigError(f"store: {config.store.url} is not an SQLite file to back up")
    source, destination = Path(location), Path(target)
    if destination.exists() and source.exists() and destination.samefile(source):
        raise errors.ConfigError(f"backup: {target} is the store itself")
    invoices = _copy(source, destination)
    print(f"backed up {source} to {destination} ({invoices} invoices)", file=sys.stderr)
    return 0


def _copy(source: Path, destination: Path) -> int:
    # Read-only: a backup must neither create, migrate nor chmod the live database.
    reader = connect(source, "NORMAL", read_only=True)
    partial = destination.with_name(f".{destination.name}.{os.getpid()}.partial")
    try:
        # O_EXCL and 0600 before a byte is written: the copy holds every root key too.
        os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        os.chmod(partial, 0o600)  # whatever the umask
        writer = sqlite3.connect(partial, isolation_level=None)
        try:
            reader.backup(writer)  # all pages in one step: one snapshot
            (result,) = writer.execute("PRAGMA quick_check").fetchone()
            if result != "ok":
                raise errors.StoreError(f"backup: the copy fails its check: {result}")
            (invoices,) = writer.execute("SELECT count(*) FROM invoices").fetchone()
            # A single file to copy back: the copy gets no WAL of its own.
            writer.execute("PRAGMA journal_mode=DELETE")
        finally:
            writer.close()
        with open(partial, "rb") as copy:
            os.fsync(copy.fileno())
        os.replace(partial, destination)
    except sqlite3.Error as error:
        raise errors.StoreError(f"backup of {source} failed: {describe(error)}") from error
    except OSError as error:
        raise errors.StoreError(f"backup to {destination} failed: {error}") from error
    finally:
        reader.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
    return int(invoices)
