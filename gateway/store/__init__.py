"""Durable state behind the ``Store`` port: token root keys, issued invoices, the cursor.

Implementations: ``SqliteStore`` (the embedded default) and ``MemoryStore`` (tests); a
PostgreSQL store for several gateway instances comes later. ``open_store`` picks one from a
URL:

``memory:``
    A ``MemoryStore``; nothing survives the process.
``sqlite:///abs/path.db``
    A ``SqliteStore`` at the absolute path ``/abs/path.db`` (three slashes, then the path).
``sqlite:relative.db``, ``sqlite:data/gateway.db``
    A ``SqliteStore`` at a path relative to the current directory.

The path is taken literally: no percent-decoding, no ``~`` expansion, no query string. Note
that SQLAlchemy reads ``sqlite:///x.db`` as relative; here it is absolute, as in a ``file:``
URL. ``sqlite://host/...`` forms are rejected rather than guessed at.
"""

from __future__ import annotations

from gateway.errors import SchemaVersionError, StoreClosed, StoreError
from gateway.ports import Store
from gateway.store.memory import MemoryStore
from gateway.store.sqlite import SqliteStore

__all__ = [
    "MemoryStore",
    "SchemaVersionError",
    "SqliteStore",
    "StoreClosed",
    "StoreError",
    "open_store",
]

SUPPORTED_URLS = "memory:, sqlite:///absolute/path.db or sqlite:relative/path.db"


async def open_store(url: str) -> Store:
    """Open the store ``url`` names (forms in the module docstring); ``ValueError`` if none."""
    scheme, colon, rest = url.partition(":")
    scheme = scheme.lower()
    if not colon:
        raise ValueError(f"store URL {url!r} has no scheme; supported: {SUPPORTED_URLS}")
    if scheme == "memory":
        if rest:
            raise ValueError(f"store URL {url!r}: 'memory:' takes nothing after the colon")
        return MemoryStore()
    if scheme == "sqlite":
        return await SqliteStore.open(_sqlite_path(url, rest))
    if scheme in ("postgres", "postgresql"):
        raise ValueError(
            f"store URL {url!r}: PostgreSQL is not supported yet; supported: {SUPPORTED_URLS}"
        )
    raise ValueError(f"store URL {url!r} has an unknown scheme; supported: {SUPPORTED_URLS}")


def _sqlite_path(url: str, rest: str) -> str:
    if rest.startswith("//"):
        if not rest.startswith("///") or rest == "///":
            raise ValueError(
                f"store URL {url!r}: use sqlite:///absolute/path.db or sqlite:relative/path.db"
            )
        return rest[2:]  # keep the third slash: it starts the absolute path
    if not rest:
        raise ValueError(f"store URL {url!r} names no file; supported: {SUPPORTED_URLS}")
    return rest
