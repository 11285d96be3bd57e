"""``open_store``: the store URL forms."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.errors import ConfigError
from gateway.store import MemoryStore, PostgresStore, SqliteStore, open_store


async def test_memory_url() -> None:
    store = await open_store("memory:")
    try:
        assert isinstance(store, MemoryStore)
    finally:
        await store.close()


async def test_absolute_sqlite_url(tmp_path: Path) -> None:
    path = tmp_path / "abs" / "gateway.db"
    path.parent.mkdir()  # the directory must exist: a typo is not created
    store = await open_store(f"sqlite://{path}")  # path starts with "/": three slashes
    try:
        assert isinstance(store, SqliteStore)
        assert store.path == path
    finally:
        await store.close()
    assert path.is_file()


async def test_relative_sqlite_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    store = await open_store("sqlite:data/gateway.db")
    try:
        assert isinstance(store, SqliteStore)
    finally:
        await store.close()
    assert (tmp_path / "data" / "gateway.db").is_file()


async def test_read_only_creates_no_database(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no database at"):
        await open_store(f"sqlite:{tmp_path / 'gateway.db'}", read_only=True)
    assert list(tmp_path.iterdir()) == []


async def test_the_scheme_is_case_insensitive() -> None:
    store = await open_store("MEMORY:")
    await store.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql:user:hunter2@host/db", "use postgresql://user@host"),
        ("postgresql://user:hunter2/x@host:5432/db", "percent-encode special characters"),
        ("postgresql://user:hunter2#x@host/db", "percent-encode special characters"),
        ("redis://localhost", "'redis' is not supported"),
        ("gateway.db", "no scheme"),
        ("sqlite:", "names no file"),
        ("sqlite:///", "use sqlite:///absolute"),
        ("sqlite://host/gateway.db", "use sqlite:///absolute"),
        ("memory:extra", "takes nothing"),
    ],
)
async def test_bad_urls_name_the_supported_forms(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as refused:
        await open_store(url)
    assert "hunter2" not in str(refused.value)


@pytest.mark.postgres
async def test_a_postgresql_pool_holds_pool_size_connections_at_most(postgres_url: str) -> None:
    store = await open_store(postgres_url, pool_size=3)
    try:
        assert isinstance(store, PostgresStore)
        assert store._pool.get_max_size() == 3
    finally:
        await store.close()
