"""``l402-gateway backup FILE``: a consistent 0600 copy of the live store, and its restore."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sqlite3
import stat
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.store import SqliteStore
from tests.config_files import write_config
from tests.unit.test_cli_invoices import record

KEY_ID, TOKEN_ID, ROOT_KEY = b"k" * 32, b"t" * 32, b"r" * 32


def backup(config: Path, target: Path) -> int:
    return main(["--config", str(config), "backup", str(target)])


async def test_a_backup_taken_while_serving_is_consistent_private_and_restores(
    tmp_path: Path,
) -> None:
    live = tmp_path / "gateway.db"
    config = write_config(tmp_path, "", store=f"sqlite://{live}")
    copy = tmp_path / "backups" / "gateway-backup.db"
    copy.parent.mkdir()
    store = await SqliteStore.open(live)
    await store.put_root_key(KEY_ID, TOKEN_ID, ROOT_KEY)
    stop = asyncio.Event()

    async def serve() -> int:
        # Invoices committed one after the other, as a serving gateway does.
        n = 0
        while not stop.is_set():
            n += 1
            await store.add_invoice(record(n))
        return n

    writer = asyncio.create_task(serve())
    await asyncio.sleep(0.05)
    old_umask = os.umask(0o022)
    try:
        assert await asyncio.to_thread(backup, config, copy) == 0
    finally:
        os.umask(old_umask)
    stop.set()
    written = await writer
    await store.close()

    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    assert [p.name for p in copy.parent.iterdir()] == [copy.name]  # no partial file left
    with contextlib.closing(sqlite3.connect(copy)) as check:
        assert check.execute("PRAGMA journal_mode").fetchone() == ("delete",)
        indices = sorted(i for (i,) in check.execute("SELECT add_index FROM invoices"))
    # One snapshot: the invoices committed before it, all of them, and none after.
    assert indices == list(range(1, len(indices) + 1))
    assert 0 < len(indices) <= written

    # Restore as the README says: gateway stopped, file copied over, its -wal/-shm removed.
    for suffix in ("", "-wal", "-shm"):
        Path(f"{live}{suffix}").unlink(missing_ok=True)
    shutil.copyfile(copy, live)
    live.chmod(0o600)
    restored = await SqliteStore.open(live)
    try:
        assert await restored.get_root_key(KEY_ID) == ROOT_KEY
        assert await restored.get_invoice(record(len(indices)).payment_hash) is not None
    finally:
        await restored.close()


async def test_a_new_backup_replaces_the_old_one(tmp_path: Path) -> None:
    live = tmp_path / "gateway.db"
    config = write_config(tmp_path, "", store=f"sqlite://{live}")
    store = await SqliteStore.open(live)
    await store.add_invoice(record(1))
    await store.close()
    copy = tmp_path / "copy.db"
    copy.write_bytes(b"an older backup")
    copy.chmod(0o644)
    assert await asyncio.to_thread(backup, config, copy) == 0
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    with contextlib.closing(sqlite3.connect(copy)) as check:
        assert check.execute("SELECT count(*) FROM invoices").fetchone() == (1,)


@pytest.mark.parametrize("case", ["memory", "missing", "itself"])
def test_refused_backups_exit_2_and_write_nothing(
    tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    live = tmp_path / "gateway.db"
    if case == "itself":
        sqlite3.connect(live).close()
    config = write_config(tmp_path, "", store="memory:" if case == "memory" else f"sqlite://{live}")
    target = live if case == "itself" else tmp_path / "copy.db"
    before = sorted(p.name for p in tmp_path.iterdir())
    assert backup(config, target) == 2
    assert "configuration error" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_postgresql_store_is_refused_with_pg_dump_named_and_no_password_shown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, "", store="postgresql://gateway:s3cret@db.example/l402")
    assert backup(config, tmp_path / "copy.db") == 2
    error = capsys.readouterr().err
    assert "pg_dump" in error
    assert "s3cret" not in error
    assert not (tmp_path / "copy.db").exists()
