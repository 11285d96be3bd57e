"""``l402-gateway invoices``: read-only, and client-chosen text cannot drive the terminal."""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import hashlib
import io
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
    # header, two invoices, blank, totals, blank, per-day (header, one day), blank,
    # per-service (header, two services): no forged line
    assert len(lines) == 12
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


def settled(n: int, service: str, created_at: float, paid: int) -> InvoiceRecord:
    return dataclasses.replace(
        record(n, service=service),
        state=InvoiceState.SETTLED,
        created_at=created_at,
        amount_paid_msat=Msat(paid),
        settle_index=n,
    )


DAY = 1_795_000_000.0  # 2026-11-18 11:06:40 UTC
NOVEMBER_18, NOVEMBER_19 = "2026-11-18", "2026-11-19"


async def test_states_are_read_in_any_case_and_an_open_invoice_past_expiry_is_expired(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lapsed = dataclasses.replace(record(1), created_at=DAY, expires_at=DAY + 600)
    config, _ = await seeded(tmp_path, lapsed, record(2), settled(3, "svc", DAY, 21_000))
    assert await run_invoices(config, "--state", "SETTLED", "--json") == 0
    assert [r["state"] for r in json.loads(capsys.readouterr().out)] == ["SETTLED"]
    assert await run_invoices(config, "--state", "Expired", "--json") == 0
    (shown,) = json.loads(capsys.readouterr().out)
    assert shown["payment_hash"] == lapsed.payment_hash.hex()
    assert shown["state"] == "EXPIRED"
    assert await run_invoices(config) == 0
    out = capsys.readouterr().out
    assert "3 invoices: 1 open, 0 accepted, 1 settled, 0 canceled, 1 expired" in out
    assert await run_invoices(config, "--state", "open", "--json") == 0
    assert [r["path"] for r in json.loads(capsys.readouterr().out)] == ["/fine"]


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--limit", "-1"], "configuration error: --limit must be >= 0, got -1"),
        (["--state", "paid"], "configuration error: --state 'paid': use one of open, accepted"),
        (["--since", "yesterday"], "configuration error: --since 'yesterday': not a date"),
        (["--until", "2026-13-01"], "configuration error: --until '2026-13-01': not a date"),
        (["--since", "\u00b2"], "configuration error: --since '\u00b2': not a date"),  # isdigit()
        (["--limit", "9" * 20], f"configuration error: --limit must be <= {2**63 - 1}"),
    ],
)
def test_bad_options_are_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], error: str
) -> None:
    config = write_config(tmp_path, "", store=f"sqlite://{tmp_path / 'gateway.db'}")
    assert invoices(config, *args) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"l402-gateway: {error}")


def test_json_and_csv_exclude_each_other(tmp_path: Path) -> None:
    config = write_config(tmp_path, "", store=f"sqlite://{tmp_path / 'gateway.db'}")
    with pytest.raises(SystemExit, match="2"):
        invoices(config, "--json", "--csv")


async def test_since_and_until_take_dates_times_and_unix_times(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    day2 = DAY + 86_400
    config, _ = await seeded(
        tmp_path, settled(1, "a", DAY, 1000), settled(2, "b", day2, 2000), record(3)
    )

    async def hashes(*args: str) -> list[int]:
        assert await run_invoices(config, "--json", *args) == 0
        return [r["settle_index"] for r in json.loads(capsys.readouterr().out)]

    # A date as --until takes in its whole day; a date as --since starts at its midnight.
    assert await hashes("--until", NOVEMBER_18) == [1]
    assert await hashes("--since", NOVEMBER_18, "--until", NOVEMBER_19) == [2, 1]
    assert await hashes("--since", NOVEMBER_19, "--until", NOVEMBER_19) == [2]
    assert await hashes("--since", f"{int(day2)}") == [0, 2]
    assert await hashes("--since", "2026-11-18T11:06:41", "--until", f"{int(day2)}") == [2]
    assert await hashes("--since", NOVEMBER_19, "--limit", "1") == [0]


async def test_the_table_sums_up_each_day_and_each_service(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, _ = await seeded(
        tmp_path,
        settled(1, "a", DAY, 1000),
        settled(2, "b", DAY + 60, 2000),
        settled(3, "a", DAY + 86_400, 4000),
        dataclasses.replace(record(4, service="a"), created_at=DAY + 86_400),
    )
    assert await run_invoices(config, "--until", NOVEMBER_19) == 0
    lines = capsys.readouterr().out.splitlines()
    summary = [" ".join(line.split()) for line in lines[lines.index("") + 3 :]]
    assert summary == [
        "DAY (UTC) INVOICES SETTLED RECEIVED msat",
        f"{NOVEMBER_19} 2 1 4000",
        f"{NOVEMBER_18} 2 2 3000",
        "",
        "SERVICE INVOICES SETTLED RECEIVED msat",
        "a 3 2 5000",
        "b 1 1 2000",
    ]


async def test_csv_has_a_header_and_no_formula_or_control_from_a_client(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, _ = await seeded(
        tmp_path, settled(1, "a", DAY, 1000), record(2, path="=HYPERLINK(1)\x1b[2J")
    )
    assert await run_invoices(config, "--csv") == 0
    out = capsys.readouterr().out
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["state"] for r in rows] == ["OPEN", "SETTLED"]
    assert rows[0]["path"] == "'=HYPERLINK(1)\\x1b[2J"
    assert rows[1]["created_at_utc"] == "2026-11-18 11:06:40"
    assert rows[1]["amount_paid_msat"] == "1000"
    assert rows[1]["settled_at"] == ""
    assert not CONTROLS & set(out) - {"\n"}


def test_without_config_a_missing_default_store_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["invoices"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "l402-gateway: configuration error: store: no database at gateway.db (check store.url)"
    ]
    assert os.listdir(tmp_path) == []


async def test_tips_and_links_show_their_service_and_comment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tip = dataclasses.replace(
        record(1, service="tip:coffee"),
        token_id=b"",
        method="",
        path="",
        comment="great work\x1b[2J",
    )
    link = dataclasses.replace(record(2, service="link:abc"), token_id=b"", method="", path="")
    config, _ = await seeded(tmp_path, tip, link)
    assert await run_invoices(config) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "link:abc" in lines[1]
    assert lines[1].split()[-2] == "-"  # no request, no comment
    assert "tip:coffee" in lines[2]
    assert "comment: great work\\x1b[2J" in lines[2]
    assert await run_invoices(config, "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert [(i["service"], i["comment"]) for i in shown] == [
        ("link:abc", ""),
        ("tip:coffee", "great work\x1b[2J"),
    ]
    assert await run_invoices(config, "--csv") == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert rows[1]["comment"] == "great work\\x1b[2J"
