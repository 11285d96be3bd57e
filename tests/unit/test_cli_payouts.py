"""``l402-gateway payees`` and ``payouts`` (history, ``pay``): the split ledger from a SQLite
store seeded through the store's API, the totals that reconcile, the exit codes of paying."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import gateway.runtime
from gateway import errors
from gateway.cli import main
from gateway.config import Config
from gateway.ports import (
    InvoiceRecord,
    InvoiceState,
    InvoiceUpdate,
    Msat,
    PaymentHash,
    Payout,
    PayoutState,
    Share,
    SplitTotals,
    Store,
)
from gateway.store import SqliteStore
from tests.config_files import placeholder_lnd, write_config

PUBKEY = "02" + "ab" * 32
SPLIT = (Share("carol", ppm=300_000), Share("dave", fixed_msat=Msat(1_000)))
NOW = 1_800_000_000.0
PAYEES = ["carol", "dave", "erin"]  # as configured


def config_text(tmp_path: Path) -> str:
    macaroon = tmp_path / "payment.macaroon"
    macaroon.write_bytes(b"x")
    macaroon.chmod(0o600)
    return (
        f'[store]\nurl = "sqlite://{tmp_path / "gateway.db"}"\n'
        f"{placeholder_lnd(tmp_path)}"
        f'[payouts]\npayment_macaroon = "{macaroon}"\n'
        '[[routes]]\npattern = "/api/*"\nprice_msat = 10000\n'
        'split = ["carol:30%", "dave:1000msat"]\n'
        f'[[payee]]\nname = "carol"\ndestination = "{PUBKEY}"\n'
        '[[payee]]\nname = "dave"\ndestination = "dave@example.com"\n'
        '[[payee]]\nname = "erin"\ndestination = "erin@example.com"\n'
    )


def _hash(text: str) -> PaymentHash:
    return PaymentHash(hashlib.sha256(text.encode()).digest())


async def _settle(store: Store, n: int, amount: int) -> None:
    """A settled invoice of ``amount`` on the split route."""
    payment_hash = _hash(f"invoice {n}")
    await store.add_invoice(
        InvoiceRecord(
            payment_hash=payment_hash,
            payment_request=f"lnbcrt{n}n1fake",
            amount_msat=Msat(amount),
            token_id=bytes([n]) * 32,
            service="api",
            method="GET",
            path="/api/x",
            state=InvoiceState.OPEN,
            created_at=NOW,
            expires_at=NOW + 600,
            add_index=n,
            split=SPLIT,
        )
    )
    update = InvoiceUpdate(payment_hash, InvoiceState.SETTLED, n, Msat(amount), NOW + n)
    await store.apply_update(update)


def _payout(name: str, payee: str, amount: int, at: float) -> Payout:
    return Payout(
        payment_hash=_hash(name),
        payee=payee,
        destination=PUBKEY if payee == "carol" else f"{payee}@example.com",
        payment_request="",
        amount_msat=Msat(amount),
        fee_reserve_msat=Msat(2_000),
        payee_pays_fee=False,
        state=PayoutState.PENDING,
        created_at=at,
    )


async def seed(tmp_path: Path) -> None:
    """Ten settled payments of 10_001 msat: carol earns 3_000 each (30_000), dave 1_000
    (10_000), the merchant keeps 60_010. Carol was paid 12_000 (fee 10, the merchant's), a
    payout of 6_000 failed (back to accrued), one of 9_000 is pending; dave nothing yet."""
    store = await SqliteStore.open(tmp_path / "gateway.db")
    try:
        for n in range(1, 11):
            await _settle(store, n, 10_001)
        paid, failed, pending = (
            _payout("paid", "carol", 12_000, NOW + 100),
            _payout("failed", "carol", 6_000, NOW + 200),
            _payout("pending", "carol", 9_000, NOW + 300),
        )
        for payout in (paid, failed, pending):
            assert await store.begin_payout(payout)
        await store.finish_payout(paid.payment_hash, PayoutState.SUCCEEDED, Msat(10), NOW + 101)
        await store.finish_payout(
            failed.payment_hash, PayoutState.FAILED, Msat(0), NOW + 201, "NO_ROUTE"
        )
    finally:
        await store.close()


@pytest.fixture
def configured(tmp_path: Path) -> Path:
    asyncio.run(seed(tmp_path))
    return write_config(tmp_path, config_text(tmp_path))


def test_payees_lists_each_payee_and_the_reconciled_totals(
    configured: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--config", str(configured), "payees"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == [
        "PAYEE",
        "DESTINATION",
        "EARNED",
        "ACCRUED",
        "PENDING",
        "PAID",
        "FEES",
        "MERCHANT",
        "FEES",
        "LAST",
        "PAYOUT",
        "(UTC)",
    ]
    carol = lines[1].split()
    # FEES are the payee's own: earned = accrued + pending + paid + fees, row by row.
    assert carol[:8] == ["carol", PUBKEY, "30000", "9000", "9000", "12000", "0", "10"]
    assert lines[2].split()[:8] == [
        "dave",
        "dave@example.com",
        "10000",
        "10000",
        "0",
        "0",
        "0",
        "0",
    ]
    assert lines[3].split()[:8] == ["erin", "erin@example.com", "0", "0", "0", "0", "0", "0"]
    for line in lines[1:4]:
        earned, *parts = (int(cell) for cell in line.split()[2:7])
        assert earned == sum(parts)
    assert lines[4].startswith("amounts in msat; earned = accrued + pending + paid + fees")
    assert lines[-1] == (
        "reconciled: received 100010 = kept + paid + accrued + pending + fees = "
        "60000 + 12000 + 19000 + 9000 + 10"
    )


def test_payees_that_do_not_reconcile_exit_4(
    configured: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    honest = SqliteStore.split_totals

    async def two_msat_short(self: SqliteStore) -> SplitTotals:
        totals = await honest(self)
        return dataclasses.replace(totals, received_msat=Msat(totals.received_msat - 2))

    monkeypatch.setattr(SqliteStore, "split_totals", two_msat_short)
    assert main(["--config", str(configured), "payees"]) == 4
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == (
        "DOES NOT RECONCILE: received 100008 != 60000 + 12000 + 19000 + 9000 + 10 (off by -2 msat)"
    )
    assert main(["--config", str(configured), "payees", "--json"]) == 4
    totals = json.loads(capsys.readouterr().out)["totals"]
    assert (totals["reconciles"], totals["unaccounted_msat"]) == (False, -2)


def test_payees_json(configured: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(configured), "payees", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    carol, dave, erin = document["payees"]
    assert carol == {
        "payee": "carol",
        "destination": PUBKEY,
        "earned_msat": 30_000,
        "accrued_msat": 9_000,
        "pending_msat": 9_000,
        "paid_msat": 12_000,
        "fees_msat": 0,
        "merchant_fees_msat": 10,
        "last_payout_at": NOW + 100,
    }
    assert (dave["accrued_msat"], erin["earned_msat"]) == (10_000, 0)
    assert document["totals"] == {
        "received_msat": 100_010,
        "kept_msat": 60_010,
        "earned_msat": 40_000,
        "paid_msat": 12_000,
        "pending_msat": 9_000,
        "accrued_msat": 19_000,
        "payee_fees_msat": 0,
        "merchant_fees_msat": 10,
        "kept_after_fees_msat": 60_000,
        "fees_msat": 10,
        "reconciles": True,
        "unaccounted_msat": 0,
    }


def test_a_payee_no_longer_configured_is_still_listed(
    configured: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = config_text(tmp_path).replace('split = ["carol:30%", "dave:1000msat"]\n', "")
    text = text.split('[[payee]]\nname = "dave"')[0]
    path = write_config(tmp_path, text)
    assert main(["--config", str(path), "payees"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[0] == "carol"
    assert lines[2].split()[:3] == ["dave", "(not", "configured)"]


def test_payouts_lists_the_history_newest_first(
    configured: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--config", str(configured), "payouts"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[3] for line in lines[1:]] == ["PENDING", "FAILED", "SUCCEEDED"]
    assert lines[2].split()[-1] == "NO_ROUTE"
    assert main(["--config", str(configured), "payouts", "--state", "Succeeded", "--json"]) == 0
    (paid,) = json.loads(capsys.readouterr().out)
    assert paid["payment_hash"] == _hash("paid").hex()
    assert (paid["amount_msat"], paid["fee_msat"], paid["state"]) == (12_000, 10, "SUCCEEDED")
    assert main(["--config", str(configured), "payouts", "--limit", "1", "--json"]) == 0
    assert [p["state"] for p in json.loads(capsys.readouterr().out)] == ["PENDING"]
    assert main(["--config", str(configured), "payouts", "--payee", "dave"]) == 0
    assert capsys.readouterr().out == "no payouts\n"


def test_a_bad_state_or_limit_is_a_usage_error(
    configured: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for options in (["--state", "paid"], ["--limit", "-1"]):
        with pytest.raises(SystemExit) as caught:
            main(["--config", str(configured), "payouts", *options])
        assert caught.value.code == 2
    assert "use one of pending, succeeded, failed" in capsys.readouterr().err


class FakePayouts:
    """What ``payouts pay`` gets from ``running_payouts``: ``pay_now(payee)`` answers the
    payouts of ``made`` to that payee, or raises its error in ``unpayable``."""

    def __init__(self, made: list[Payout]) -> None:
        self.made = made
        self.unpayable: dict[str, errors.GatewayError] = {}
        self.asked: list[str | None] = []

    async def pay_now(self, payee: str | None = None) -> list[Payout]:
        self.asked.append(payee)
        if payee in self.unpayable:
            raise self.unpayable[payee]
        return [payout for payout in self.made if payee in (None, payout.payee)]


@pytest.fixture
def fake_payouts(monkeypatch: pytest.MonkeyPatch) -> FakePayouts:
    fake = FakePayouts([])

    @contextlib.asynccontextmanager
    async def running(config: Config, store: Store, **_: Any) -> AsyncIterator[FakePayouts]:
        assert config.payee
        yield fake

    monkeypatch.setattr(gateway.runtime, "running_payouts", running)
    return fake


def _resolved(payout: Payout, state: PayoutState, failure: str = "") -> Payout:
    from dataclasses import replace

    return replace(payout, state=state, fee_msat=Msat(5), resolved_at=NOW, failure=failure)


def test_payouts_pay_exits_0_when_every_payout_succeeded(
    configured: Path, fake_payouts: FakePayouts, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--config", str(configured), "payouts", "pay"]) == 0
    assert capsys.readouterr().out.startswith(
        "nothing paid: no payee had an amount to pay (nothing accrued, below the fee limit or "
        "the service's minimum, or a payout under way"
    )
    fake_payouts.made = [_resolved(_payout("a", "dave", 10_000, NOW), PayoutState.SUCCEEDED)]
    assert main(["--config", str(configured), "payouts", "pay", "--payee", "dave"]) == 0
    assert fake_payouts.asked == [*PAYEES, "dave"]  # one at a time
    out = capsys.readouterr().out
    assert "dave: SUCCEEDED, 10000 msat to dave@example.com, routing fee 5 msat" in out


def test_payouts_pay_exits_3_when_one_failed_or_is_pending(
    configured: Path, fake_payouts: FakePayouts, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_payouts.made = [
        _resolved(_payout("a", "dave", 10_000, NOW), PayoutState.SUCCEEDED),
        _resolved(_payout("b", "carol", 9_000, NOW), PayoutState.FAILED, "NO_ROUTE"),
    ]
    assert main(["--config", str(configured), "payouts", "pay"]) == 3
    captured = capsys.readouterr()
    assert "carol: FAILED, 9000 msat" in captured.err
    assert "NO_ROUTE" in captured.err
    fake_payouts.made = [_payout("c", "carol", 9_000, NOW)]
    assert main(["--config", str(configured), "payouts", "pay", "--json"]) == 3
    (pending,) = json.loads(capsys.readouterr().out)
    assert pending["state"] == "PENDING"


def test_payouts_pay_names_a_payee_it_could_not_pay_and_exits_3(
    configured: Path, fake_payouts: FakePayouts, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_payouts.made = [_resolved(_payout("a", "dave", 10_000, NOW), PayoutState.SUCCEEDED)]
    fake_payouts.unpayable["carol"] = errors.PayoutDestinationError("no answer within 10 s")
    assert main(["--config", str(configured), "payouts", "pay"]) == 3
    captured = capsys.readouterr()
    assert "dave: SUCCEEDED, 10000 msat" in captured.out  # the others are still paid
    assert "carol: not paid: no answer within 10 s" in captured.err
    assert "nothing paid" not in captured.out
    assert main(["--config", str(configured), "payouts", "pay", "--payee", "carol", "--json"]) == 3
    assert json.loads(capsys.readouterr().out) == []


def test_payouts_pay_refuses_an_unknown_payee_or_none_configured(
    configured: Path, tmp_path: Path, fake_payouts: FakePayouts, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--config", str(configured), "payouts", "pay", "--payee", "zed"]) == 1
    assert "no [[payee]] named 'zed'" in capsys.readouterr().err
    path = write_config(tmp_path, f'[store]\nurl = "sqlite://{tmp_path / "gateway.db"}"\n')
    assert main(["--config", str(path), "payouts", "pay"]) == 2
    assert "no [[payee]] is configured" in capsys.readouterr().err
    assert fake_payouts.asked == []


def test_payouts_pay_checks_its_settings_before_it_opens_the_store(
    tmp_path: Path, fake_payouts: FakePayouts, capsys: pytest.CaptureFixture[str]
) -> None:
    text = config_text(tmp_path).replace(str(tmp_path / "payment.macaroon"), "/nonexistent")
    path = write_config(tmp_path, text)
    assert main(["--config", str(path), "payouts", "pay"]) == 2
    err = capsys.readouterr().err
    assert "configuration error: [payouts] cannot read /nonexistent" in err
    assert not (tmp_path / "gateway.db").exists()  # no fresh database left behind
    assert fake_payouts.asked == []


def test_payouts_pay_needs_the_gateways_existing_database(
    tmp_path: Path, fake_payouts: FakePayouts, capsys: pytest.CaptureFixture[str]
) -> None:
    # A typo in store.url: refused as the listing commands refuse it, no new empty database.
    typo = tmp_path / "gateway-typo.db"
    text = config_text(tmp_path).replace(str(tmp_path / "gateway.db"), str(typo))
    path = write_config(tmp_path, text)
    for command in (["payees"], ["payouts"], ["payouts", "pay"]):
        assert main(["--config", str(path), *command]) == 2
        assert f"configuration error: store: no database at {typo}" in capsys.readouterr().err
    assert not typo.exists()
    assert fake_payouts.asked == []


def test_payouts_pay_refuses_a_memory_store(
    tmp_path: Path, fake_payouts: FakePayouts, capsys: pytest.CaptureFixture[str]
) -> None:
    text = config_text(tmp_path).replace(f"sqlite://{tmp_path / 'gateway.db'}", "memory:")
    path = write_config(tmp_path, text)
    assert main(["--config", str(path), "payouts", "pay"]) == 2
    err = capsys.readouterr().err
    assert "payouts pay needs the gateway's database, and store.url is memory:" in err
    assert fake_payouts.asked == []


def test_payouts_pay_names_lnd_for_a_bad_certificate_and_the_section_for_a_bad_macaroon(
    tmp_path: Path, fake_payouts: FakePayouts, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, config_text(tmp_path))
    (tmp_path / "tls.cert").write_bytes(b"not a certificate")
    assert main(["--config", str(path), "payouts", "pay"]) == 2
    err = capsys.readouterr().err
    assert f"configuration error: [lnd] tls_cert {tmp_path / 'tls.cert'} is not a PEM" in err
    assert "payment_macaroon" not in err
    (tmp_path / "tls.cert").write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    (tmp_path / "payment.macaroon").write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    assert main(["--config", str(path), "payouts", "pay"]) == 2
    err = capsys.readouterr().err
    assert "configuration error: [payouts] payment_macaroon: macaroon is a PEM file" in err
    assert not (tmp_path / "gateway.db").exists()
    assert fake_payouts.asked == []


def test_payout_settings_name_the_file_at_fault(tmp_path: Path) -> None:
    """Checked alone (as serve and check also call it after ``lnd_settings``): the
    certificate is ``[lnd]``'s, only the macaroon is the payout section's."""
    from gateway.config import load_config

    path = write_config(tmp_path, config_text(tmp_path))
    config = load_config(path)
    (tmp_path / "tls.cert").write_bytes(b"not a certificate")
    with pytest.raises(errors.ConfigError, match=r"^\[lnd\] tls_cert .* is not a PEM"):
        gateway.runtime.payout_settings(config)
    (tmp_path / "tls.cert").unlink()
    with pytest.raises(errors.ConfigError, match=r"^\[lnd\] cannot read .*tls\.cert: "):
        gateway.runtime.payout_settings(config)
    (tmp_path / "tls.cert").write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    (tmp_path / "payment.macaroon").write_bytes(b"")
    with pytest.raises(errors.ConfigError, match=r"^\[payouts\] payment_macaroon: .* empty"):
        gateway.runtime.payout_settings(config)
    (tmp_path / "payment.macaroon").unlink()
    with pytest.raises(errors.ConfigError, match=r"^\[payouts\] cannot read .*payment\.macaroon"):
        gateway.runtime.payout_settings(config)
