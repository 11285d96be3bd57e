"""``l402-gateway invoices``: read-only, and client-chosen text cannot drive the terminal."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.ports import InvoiceRecord, InvoiceState, Msat, PaymentHash
from gateway.store import SqliteStore
from tests.config_files import write_config

# Clear screen, cursor home, a window title, a bell, a forged table line, backspaces, a C1
# CSI, DEL, a right-to-left override and a bidi isolate: what a client can put in a path.
HOSTILE_PATH = (
    "/a\x1b[2J\x1b[H\x1b]0;pwned\x07\r\n2026-01-01 SETTLED 999\x08\x08\x9b31m\x7f\u202eevil"
)
HOSTILE_SERVICE = "svc\x1b[31m\u2066"
CONTROLS = {chr(c) for c in (*range(0x20), *range(0x7F, 0xA0))} | {"\u202e", "\u2066"}


def record(n: int, path: str = "/fine", service: str = "svc") -> InvoiceRecord:
    return InvoiceRecord(
        payment_hash=PaymentHash(hashlib.sha256(b"%d" % n).digest()),
        payment_request=f"lnbcrt{n}n1fake",
        amount_msat=Msat(21_000),
        token_id=b"t" * 32,
        service=service,
        method="GET",
        path=path,
        state=InvoiceState.OPEN,
        created_at=1_800_000_000.0 + n,
        expires_at=1_800_000_600.0 + n,
        add_index=n,
    )


async def seeded(tmp_path: Path, *records: InvoiceRecord) -> tuple[Path, Path]:
    """A database holding ``records`` and a config naming it: (config, database)."""
    database = tmp_path / "gateway.db"
    store = await SqliteStore.open(database)
    try:
        for item in records:
            await store.add_invoice(item)
    finally:
        await store.close()
    return write_config(tmp_path, "", store=f"sqlite://{database}"), database


def invoices(config: Path, *args: str) -> int:
    # main() runs its own event loop: off this test's loop, in a thread.
    return main(["--config", str(config), "invoices", *args])


async def run_invoices(config: Path, *args: str) -> int:
    return await asyncio.to_thread(invoices, config, *args)


async def test_the_table_escapes_hostile_paths_and_services(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, _ = await seeded(tmp_path, record(1, HOSTILE_PATH, HOSTILE_SERVICE), record(2))
    assert await run_invoices(config) == 0
    out = capsys.readouterr().out
    assert not CONTROLS & set(out) - {"\n"}
    lines = out.splitlines()
    assert len(lines) == 5  # header, two invoices, blank, summary: no forged line
    assert "GET /a\\x1b[2J\\x1b[H\\x1b]0;pwned\\x07\\x0d\\x0a2026-01-01 SETTLED 999" in lines[2]
    assert "\\x08\\x08\\x9b31m\\x7f\\u202eevil" in lines[2]
    assert "svc\\x1b[31m\\u2066" in lines[2]


async def test_json_keeps_hostile_text_escaped_and_exact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, _ = await seeded(tmp_path, record(1, HOSTILE_PATH, HOSTILE_SERVICE))
    assert await run_invoices(config, "--json") == 0
    out = capsys.readouterr().out
    assert out.isascii()
    assert not CONTROLS & set(out) - {"\n"}
    (shown,) = json.loads(out)
    assert shown["path"] == HOSTILE_PATH
    assert shown["service"] == HOSTILE_SERVICE


async def test_invoices_changes_nothing_on_disk(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, database = await seeded(tmp_path, record(1))
    database.chmod(0o640)  # an operator's choice (a group that may read it): left as it is
    before = database.read_bytes()
    assert await run_invoices(config, "--state", "open") == 0
    assert stat.S_IMODE(database.stat().st_mode) == 0o640
    assert database.read_bytes() == before
    assert "1 invoices: 1 open" in capsys.readouterr().out
    # Only SQLite's own WAL and shared-memory files may appear, with the database's mode.
    companions = set(os.listdir(tmp_path)) - {"gateway.db", "gateway.toml"}
    assert companions <= {"gateway.db-wal", "gateway.db-shm"}
    for name in companions:
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) & ~0o640 == 0
