"""``l402-gateway accounts``: credit accounts and the totals that reconcile, read-only, from a
SQLite store seeded through the store's API."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.ports import (
    CreditTotals,
    InvoiceRecord,
    InvoiceState,
    InvoiceUpdate,
    Msat,
    PaymentHash,
    Withdrawal,
    WithdrawalState,
)
from gateway.store import SqliteStore
from tests.config_files import write_config

ALICE = b"a" * 32
BOB = b"b" * 32
HOSTILE_SERVICE = "svc\x1b[31m\u202e"


async def _credit(store: SqliteStore, token_id: bytes, amount: int, n: int) -> None:
    """Settle an invoice that buys ``amount`` of credit for ``token_id``."""
    payment_hash = PaymentHash(hashlib.sha256(b"%d" % n).digest())
    await store.add_invoice(
        InvoiceRecord(
            payment_hash=payment_hash,
            payment_request=f"lnbcrt{n}n1fake",
            amount_msat=Msat(amount),
            token_id=token_id,
            service="svc",
            method="GET",
            path="/api/credit/x",
            state=InvoiceState.OPEN,
            created_at=1_800_000_000.0,
            expires_at=1_800_000_600.0,
            add_index=n,
            buys_credit=True,
        )
    )
    update = InvoiceUpdate(payment_hash, InvoiceState.SETTLED, n, Msat(amount), 1_800_000_100.0)
    await store.apply_update(update)


async def seeded(tmp_path: Path) -> tuple[Path, Path]:
    """Alice bought 100_000 and topped up 50_000, spent 3_000, holds 1_000 for a request
    under way, withdrew 20_000 (fee 200 of a 1_000 reserve) and has 5_000 pending a
    withdrawal (with its 1_000 reserve); bob bought 10_000 and spent nothing."""
    database = tmp_path / "gateway.db"
    store = await SqliteStore.open(database)
    try:
        await store.open_account(ALICE, "svc")
        await store.open_account(BOB, HOSTILE_SERVICE)
        await _credit(store, ALICE, 100_000, 1)
        await _credit(store, ALICE, 50_000, 2)
        await _credit(store, BOB, 10_000, 3)
        for _ in range(3):
            reserved = await store.reserve(ALICE, Msat(1_000), 1_800_000_500.0)
            assert reserved.reservation is not None
            await store.settle_reservation(
                reserved.reservation.reservation_id, Msat(1_000), "GET", "/api/credit/x"
            )
        assert (await store.reserve(ALICE, Msat(1_000), 1_800_000_500.0)).reservation
        for n, amount in ((10, 20_000), (11, 5_000)):
            withdrawal = Withdrawal(
                payment_hash=PaymentHash(hashlib.sha256(b"w%d" % n).digest()),
                token_id=ALICE,
                payment_request=f"lnbcrt{n}n1withdraw",
                amount_msat=Msat(amount),
                fee_reserve_msat=Msat(1_000),
                state=WithdrawalState.PENDING,
                created_at=1_800_000_200.0,
            )
            assert await store.begin_withdrawal(withdrawal) is not None
        first = PaymentHash(hashlib.sha256(b"w10").digest())
        await store.finish_withdrawal(first, WithdrawalState.SUCCEEDED, Msat(200), 1_800_000_300.0)
    finally:
        await store.close()
    return write_config(tmp_path, "", store=f"sqlite://{database}"), database


async def accounts(config: Path, *args: str) -> int:
    # main() runs its own event loop: off this test's loop, in a thread.
    return await asyncio.to_thread(main, ["--config", str(config), "accounts", *args])


ALICE_BALANCE = 150_000 - 3_000 - 1_000 - 20_200 - 6_000


async def test_the_table_and_the_reconciled_totals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, _ = await seeded(tmp_path)
    assert await accounts(config) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == [
        "TOKEN",
        "SERVICE",
        "CREDITED",
        "SPENT",
        "RESERVED",
        "WITHDRAWN",
        "BALANCE",
        "msat",
        "LAST",
        "USE",
        "(UTC)",
    ]
    alice = next(line for line in lines if line.startswith(ALICE.hex()[:16]))
    assert alice.split()[1:7] == ["svc", "150000", "3000", "1000", "26200", str(ALICE_BALANCE)]
    bob = next(line for line in lines if line.startswith(BOB.hex()[:16]))
    # The service escaped: it cannot drive the terminal.
    assert bob.split()[1:7] == ["svc\\x1b[31m\\u202e", "10000", "0", "0", "0", "10000"]
    assert "2 accounts; totals over all, in msat:" in out
    assert "received             160000" in out
    assert "outstanding (owed)   " + str(ALICE_BALANCE + 10_000) in out
    parts = f"3000 + 20200 + 6000 + 1000 + {ALICE_BALANCE + 10_000}"
    assert "reconciled: received 160000 = consumed + withdrawn + pending + reserved + " in out
    assert out.rstrip().endswith(parts)


async def test_totals_that_do_not_reconcile_are_shown_and_exit_4(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config, _ = await seeded(tmp_path)
    honest = SqliteStore.credit_totals

    async def one_msat_too_many(self: SqliteStore) -> CreditTotals:
        totals = await honest(self)
        return dataclasses.replace(totals, received_msat=Msat(totals.received_msat + 1))

    monkeypatch.setattr(SqliteStore, "credit_totals", one_msat_too_many)
    assert await accounts(config) == 4
    parts = f"3000 + 20200 + 6000 + 1000 + {ALICE_BALANCE + 10_000}"
    last = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert last == f"DOES NOT RECONCILE: received 160001 != {parts} (off by 1 msat)"
    assert await accounts(config, "--json") == 4
    totals = json.loads(capsys.readouterr().out)["totals"]
    assert (totals["reconciles"], totals["unaccounted_msat"]) == (False, 1)


async def test_json_and_limit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, database = await seeded(tmp_path)
    before = os.stat(database)
    assert await accounts(config, "--json", "--limit", "1") == 0
    document = json.loads(capsys.readouterr().out)
    (only,) = document["accounts"]
    assert set(only) == {
        "token_id",
        "service",
        "credited_msat",
        "spent_msat",
        "reserved_msat",
        "withdrawn_msat",
        "balance_msat",
        "created_at",
        "last_used_at",
    }
    assert only["token_id"] in (ALICE.hex(), BOB.hex())
    assert document["totals"] == {
        "accounts": 2,
        "received_msat": 160_000,
        "consumed_msat": 3_000,
        "withdrawn_msat": 20_200,
        "pending_withdrawals_msat": 6_000,
        "reserved_msat": 1_000,
        "outstanding_msat": ALICE_BALANCE + 10_000,
        "reconciles": True,
        "unaccounted_msat": 0,
    }
    assert await accounts(config, "--limit", "1") == 0
    assert "1 of 2 accounts shown" in capsys.readouterr().out
    # Read-only: the database is neither written nor chmodded.
    after = os.stat(database)
    assert (after.st_mtime_ns, stat.S_IMODE(after.st_mode)) == (
        before.st_mtime_ns,
        stat.S_IMODE(before.st_mode),
    )


async def test_an_empty_store_and_bad_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    database = tmp_path / "gateway.db"
    await (await SqliteStore.open(database)).close()
    config = write_config(tmp_path, "", store=f"sqlite://{database}")
    assert await accounts(config) == 0
    out = capsys.readouterr().out
    assert "0 accounts" in out
    assert "reconciled: received 0" in out
    assert await accounts(config, "--limit", "-1") == 2
    assert "--limit must be >= 0" in capsys.readouterr().err
    assert await accounts(config, "--limit", "9" * 20) == 2  # more than the store takes
    assert "--limit must be <= " in capsys.readouterr().err
    missing = write_config(tmp_path, "", store=f"sqlite://{tmp_path / 'none.db'}")
    assert await accounts(missing) == 2  # read-only: a missing database is not created
    assert "no database at" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()
