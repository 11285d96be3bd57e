"""Durable state behind the ``Store`` port: token root keys, issued invoices, the cursor,
credit accounts (reservations, charges, withdrawals), pay-on-success requests, the split
ledger (payees' shares and payouts), payment links, the webhook outbox.

Implementations: ``SqliteStore`` (the embedded default), ``PostgresStore`` (several gateway
instances sharing one database) and ``MemoryStore`` (tests). ``open_store`` picks one from a
URL:

``memory:``
    A ``MemoryStore``; nothing survives the process.
``sqlite:///abs/path.db``
    A ``SqliteStore`` at the absolute path ``/abs/path.db`` (three slashes, then the path).
``sqlite:relative.db``, ``sqlite:data/gateway.db``
    A ``SqliteStore`` at a path relative to the current directory.
``postgresql://user:password@host:port/database`` (or ``postgres://...``)
    A ``PostgresStore``; the URL is libpq's (query parameters such as ``sslmode`` included).

The path is taken literally: no percent-decoding, no ``~`` expansion, no query string. Note
that SQLAlchemy reads ``sqlite:///x.db`` as relative; here it is absolute, as in a ``file:``
URL. ``sqlite://host/...`` forms are rejected rather than guessed at.
"""

from __future__ import annotations

from gateway.config import store_location
from gateway.errors import SchemaVersionError, StoreClosed, StoreError
from gateway.ports import Store
from gateway.store.memory import MemoryStore
from gateway.store.postgres import PostgresStore
from gateway.store.sqlite import SqliteStore

__all__ = [
    "MemoryStore",
    "PostgresStore",
    "SchemaVersionError",
    "SqliteStore",
    "StoreClosed",
    "StoreError",
    "open_store",
]


async def open_store(url: str, *, read_only: bool = False, pool_size: int = 10) -> Store:
    """Open the store ``url`` names (forms in the module docstring, parsed by
    ``gateway.config.store_location``); ``ValueError`` if none. ``read_only`` opens an
    existing database for reading only (``SqliteStore.open``, ``PostgresStore.open``);
    ``pool_size``: PostgreSQL connections at most."""
    kind, location = store_location(url)
    if kind == "sqlite" and location is not None:
        return await SqliteStore.open(location, read_only=read_only)
    if kind == "postgresql" and location is not None:
        return await PostgresStore.open(location, read_only=read_only, max_connections=pool_size)
    return MemoryStore()
