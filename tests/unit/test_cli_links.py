"""``l402-gateway links`` (list), ``links create`` and ``links cancel``: against a SQLite
store the gateway made, the node replaced by a fake that cancels invoices (or cannot be
reached); only ``cancel`` of a link with an open invoice needs ``[lnd]``."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path

import pytest

import gateway.cli.links
from gateway import errors
from gateway.bech32 import decode, to_text
from gateway.cli import main
from gateway.cli.links import parse_duration
from gateway.ports import (
    InvoiceRecord,
    InvoiceState,
    InvoiceUpdate,
    LinkState,
    Msat,
    PaymentHash,
    PaymentLink,
)
from gateway.store import SqliteStore
from tests.config_files import placeholder_lnd, write_config

BASE = "https://pay.example.com"
NOW = 1_800_000_000.0


class FakeNode:
    """What ``links`` uses of ``LndClient``: ``cancel_invoice``, and closing."""

    cancelled: list[bytes]
    failure: errors.BackendError | None = None

    def __init__(self, *_args: object, **_kwargs: object) -> None:
        pass

    async def __aenter__(self) -> FakeNode:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        pass

    async def cancel_invoice(self, payment_hash: bytes) -> None:
        if FakeNode.failure is not None:
            raise FakeNode.failure
        FakeNode.cancelled.append(payment_hash)


@pytest.fixture(autouse=True)
def node(monkeypatch: pytest.MonkeyPatch) -> type[FakeNode]:
    monkeypatch.setattr(gateway.cli.links, "LndClient", FakeNode)
    FakeNode.cancelled, FakeNode.failure = [], None
    return FakeNode


@pytest.fixture
def database(tmp_path: Path) -> Path:
    return tmp_path / "gateway.db"


@pytest.fixture
def config(tmp_path: Path, database: Path) -> Path:
    """A configuration with ``[lnd]`` and ``[lnurl]`` over the gateway's database, which
    ``serve`` would have made."""
    make_database(database)
    text = f'{placeholder_lnd(tmp_path)}[lnurl]\nbase_url = "{BASE}/"\n'
    return write_config(tmp_path, text, store=f"sqlite://{database}")


def make_database(database: Path) -> None:
    async def make() -> None:
        await (await SqliteStore.open(database)).close()

    asyncio.run(make())


def links(config: Path, *args: str) -> int:
    return main(["--config", str(config), "links", *args])


def created(config: Path, capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, object]:
    assert links(config, "create", *args, "--json") == 0
    document: dict[str, object] = json.loads(capsys.readouterr().out)
    return document


def stored(database: Path, link_id: str) -> PaymentLink:
    async def get() -> PaymentLink | None:
        store = await SqliteStore.open(database)
        try:
            return await store.get_link(link_id)
        finally:
            await store.close()

    link = asyncio.run(get())
    assert link is not None
    return link


def with_open_invoice(
    database: Path, link_id: str, *, settle: bool = False, created_at: float = NOW
) -> PaymentHash:
    """The link's invoice, as its page would have made it at ``created_at`` (settled if
    asked), payable for ten minutes."""
    payment_hash = PaymentHash(hashlib.sha256(link_id.encode()).digest())
    record = InvoiceRecord(
        payment_hash=payment_hash,
        payment_request="lnbcrt10u1fake",
        amount_msat=Msat(1_000_000),
        token_id=b"",
        service=f"link:{link_id}",
        method="",
        path="",
        state=InvoiceState.OPEN,
        created_at=created_at,
        expires_at=created_at + 600,
        add_index=1,
    )

    async def add() -> None:
        store = await SqliteStore.open(database)
        try:
            assert await store.add_link_invoice(record, None)
            if settle:
                update = InvoiceUpdate(
                    payment_hash, InvoiceState.SETTLED, 1, Msat(1_000_000), NOW + 1
                )
                await store.apply_update(update)
        finally:
            await store.close()

    asyncio.run(add())
    return payment_hash


# --- create -------------------------------------------------------------------------------


def test_create_a_fixed_single_use_link(
    config: Path, database: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert links(config, "create", "--amount", "1000sat", "--memo", "Table 4") == 0
    out = capsys.readouterr().out
    first, *rest = out.splitlines()
    assert first.startswith("payment link ")
    assert first.endswith(": 1000 sat, single use, never expires")
    link_id = first.split()[2].rstrip(":")
    page = f"{BASE}/.well-known/l402/links/{link_id}"
    assert rest[0].split() == ["memo:", "Table", "4"]
    assert rest[1].split() == ["page:", page]
    assert rest[2].split()[0] == "LNURL:"
    lnurl = rest[2].split()[1]
    hrp, words = decode(lnurl)
    assert (hrp, to_text(words)) == ("lnurl", f"{page}/lnurl")
    assert rest[3].split() == ["QR:", f"{page}/qr.svg", f"{page}/qr.png"]
    link = stored(database, link_id)
    assert (link.min_msat, link.max_msat, link.memo) == (1_000_000, 1_000_000, "Table 4")
    assert link.single_use
    assert link.expires_at is None


def test_create_a_reusable_range_link_as_json(
    config: Path, database: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    document = created(config, capsys, "--min", "2000msat", "--max", "3", "--reusable")
    assert links(config, "--json", "create", "--amount", "5sat", "--expires", "1h") == 0
    document2 = json.loads(capsys.readouterr().out)
    link_id = document["link_id"]
    assert isinstance(link_id, str)
    page = f"{BASE}/.well-known/l402/links/{link_id}"
    assert document["url"] == page
    assert document["qr_svg"] == f"{page}/qr.svg"
    assert document["qr_png"] == f"{page}/qr.png"
    assert str(document["lnurl"]).startswith("LNURL1")
    assert document["state"] == "OPEN"
    assert (document["min_msat"], document["max_msat"]) == (2000, 3000)
    assert (document["fixed"], document["single_use"]) == (False, False)
    assert document["open_payment_hash"] is None
    assert document["paid_count"] == document["paid_msat"] == 0
    expires_at, created_at = document2["expires_at"], document2["created_at"]
    assert isinstance(expires_at, float)
    assert isinstance(created_at, float)
    assert expires_at - created_at == pytest.approx(3600)
    assert not stored(database, link_id).single_use
    # The shortest life a link takes: two minutes.
    shortest = created(config, capsys, "--amount", "5sat", "--expires", "2min")
    assert isinstance(shortest["expires_at"], float)
    assert isinstance(shortest["created_at"], float)
    assert shortest["expires_at"] - shortest["created_at"] == pytest.approx(120)


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        ([], "one of the arguments --amount --min is required"),
        (["--min", "10sat"], "--min needs --max"),
        (["--amount", "10sat", "--max", "20sat"], "--max goes with --min"),
        (["--min", "20sat", "--max", "10sat"], "--min (20 sat) must not be above --max (10 sat)"),
        (["--amount", "1btc"], "not an amount in sat"),
        (["--amount", "0.0001"], "msat precision"),
        (["--amount", "-1"], "'-1' is negative"),
        (["--amount", "0sat"], "an amount is 1sat to"),
        (["--amount", "1500msat"], "whole satoshis"),
        (["--min", "1sat", "--max", "2.5"], "whole satoshis"),
        (["--amount", "1sat", "--min", "1sat"], "not allowed with argument"),
        (["--amount", "1sat", "--memo", "bell\x07"], "the memo has control characters"),
        (["--amount", "1sat", "--memo", "x" * 121], "the memo is 121 characters; at most 120"),
        (["--amount", "1sat", "--expires", "soon"], "a duration like 5min"),
        (["--amount", "1sat", "--expires", "0h"], "more than 0"),
        (["--amount", "1sat", "--expires", "30s"], "a link expires at least 120 s from now"),
        (["--amount", "1sat", "--expires", "119s"], "a link expires at least 120 s from now"),
        (["--amount", "1sat", "--expires", "3651d"], "at most ten years (3650d)"),
    ],
)
def test_create_usage_errors_exit_2(
    config: Path, database: Path, capsys: pytest.CaptureFixture[str], args: list[str], reason: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        links(config, "create", *args)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert reason in err
    assert "configuration error" not in err
    assert err.startswith("usage: l402-gateway links create")
    assert links(config, "--json") == 0
    assert json.loads(capsys.readouterr().out) == []  # nothing made


def test_links_need_lnurl_and_a_real_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = write_config(tmp_path, placeholder_lnd(tmp_path))
    assert links(plain, "create", "--amount", "1sat") == 2
    assert "payment links need [lnurl] base_url" in capsys.readouterr().err
    memory = write_config(
        tmp_path, f'{placeholder_lnd(tmp_path)}[lnurl]\nbase_url = "{BASE}"\n', store="memory:"
    )
    assert links(memory, "create", "--amount", "1sat") == 2
    assert "store.url is memory:" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["create", "--amount", "1sat"], [], ["cancel", "a" * 16]])
def test_a_typo_in_the_store_url_makes_no_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    database = tmp_path / "gatway.db"
    config = write_config(tmp_path, f'[lnurl]\nbase_url = "{BASE}"\n', store=f"sqlite:{database}")
    assert links(config, *command) == 2
    assert f"no database at {database}" in capsys.readouterr().err
    assert not database.exists()


def test_create_list_and_cancel_need_no_lnd(
    tmp_path: Path, database: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_database(database)
    config = write_config(tmp_path, f'[lnurl]\nbase_url = "{BASE}"\n', store=f"sqlite:{database}")
    link_id = str(created(config, capsys, "--amount", "1sat")["link_id"])
    assert links(config, "--json") == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["link_id"] == link_id
    # Nothing on the node to cancel: the store alone.
    assert links(config, "cancel", link_id) == 0
    assert "canceled payment link" in capsys.readouterr().out
    assert stored(database, link_id).canceled_at is not None


def test_cancel_needs_lnd_for_an_open_invoice(
    tmp_path: Path, database: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_database(database)
    config = write_config(tmp_path, f'[lnurl]\nbase_url = "{BASE}"\n', store=f"sqlite:{database}")
    link_id = str(created(config, capsys, "--amount", "1000sat")["link_id"])
    with_open_invoice(database, link_id)
    assert links(config, "cancel", link_id) == 2
    assert "[lnd] tls_cert is required" in capsys.readouterr().err
    assert FakeNode.cancelled == []


def test_big_amounts_are_printed_exactly(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert links(config, "create", "--min", "1sat", "--max", "1234567sat") == 0
    assert ": 1 to 1234567 sat, single use, never expires" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("30min", 1800), ("30m", 1800), ("1.5h", 5400), ("7d", 604_800)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


# --- list ---------------------------------------------------------------------------------


def test_list_shows_each_link_newest_first(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = created(config, capsys, "--amount", "21sat", "--memo", "coffee " + "x" * 60)
    second = created(config, capsys, "--min", "1sat", "--max", "100sat", "--reusable")
    assert links(config) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "STATE", "AMOUNT", "MEMO", "PAID", "EXPIRES", "(UTC)", "URL"]
    assert lines[1].split()[:2] == [second["link_id"], "open"]
    assert "1 to 100 sat" in lines[1]
    assert lines[1].endswith(str(second["url"]))
    assert lines[2].split()[:2] == [first["link_id"], "open"]
    assert "21 sat" in lines[2]
    assert f"coffee {'x' * 33}  " in lines[2]  # cut to 40 characters
    assert "0 / 0 sat" in lines[2]
    assert links(config, "--json", "--limit", "1") == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed == second
    assert links(config, "--state", "paid") == 0
    assert capsys.readouterr().out == "no payment links\n"


def test_list_refuses_an_unknown_state(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        links(config, "--state", "gone")
    assert "use one of open, paid, expired, canceled" in capsys.readouterr().err


# --- cancel -------------------------------------------------------------------------------


def test_cancel_a_link_and_its_open_invoice(
    config: Path, database: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    link_id = str(created(config, capsys, "--amount", "1000sat")["link_id"])
    payment_hash = with_open_invoice(database, link_id)
    assert links(config, "cancel", link_id) == 0
    assert capsys.readouterr().out == (
        f"canceled payment link {link_id}: it takes no more payments\n"
    )
    assert FakeNode.cancelled == [payment_hash]
    assert stored(database, link_id).state(NOW) is LinkState.CANCELED
    # Again: no error (nothing left on the node), and JSON on asking.
    assert links(config, "cancel", link_id, "--json") == 0
    document = json.loads(capsys.readouterr().out)
    assert (document["state"], document["outcome"]) == ("CANCELED", "canceled")
    assert "error" not in document
    assert FakeNode.cancelled == [payment_hash]


def test_cancel_cancels_an_open_invoice_past_its_recorded_expiry_on_the_node(
    config: Path, database: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The store still says OPEN (the sweeper has not looked): the node, whose clock started
    later than the record's, may still take it, so it is cancelled there too."""
    link_id = str(created(config, capsys, "--amount", "1000sat")["link_id"])
    payment_hash = with_open_invoice(database, link_id, created_at=time.time() - 601)
    assert links(config, "cancel", link_id) == 0
    assert "it takes no more payments" in capsys.readouterr().out
    assert FakeNode.cancelled == [payment_hash]
    assert stored(database, link_id).canceled_at is not None


def test_cancel_with_the_node_unreachable_cancels_the_link_and_says_so(
    config: Path, database: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    link_id = str(created(config, capsys, "--amount", "1000sat")["link_id"])
    with_open_invoice(database, link_id)
    FakeNode.failure = errors.BackendUnavailable("LND at 127.0.0.1:10009: connection refused")
    assert links(config, "cancel", link_id) == 3
    err = capsys.readouterr().err
    assert "the node could not cancel an open invoice" in err
    assert err.count("\n") == 1
    assert stored(database, link_id).canceled_at is not None
    assert links(config, "cancel", link_id, "--json") == 3
    captured = capsys.readouterr()
    document = json.loads(captured.out)
    assert (document["state"], document["outcome"]) == ("CANCELED", "node_failed")
    assert "the node could not cancel" in document["error"]
    assert captured.err.count("\n") == 1


def test_cancel_an_unknown_link(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    created(config, capsys, "--amount", "1sat")
    assert links(config, "cancel", "nope\x1b") == 1
    assert "links cancel nope\\x1b: no such payment link" in capsys.readouterr().err
    assert links(config, "cancel", "a" * 16, "--json") == 1
    document = json.loads(capsys.readouterr().out)
    assert document == {
        "link_id": "a" * 16,
        "outcome": "not_found",
        "error": "no such payment link",
    }


def test_a_paid_link_is_left_paid(
    config: Path, database: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    link_id = str(created(config, capsys, "--amount", "1000sat")["link_id"])
    with_open_invoice(database, link_id, settle=True)
    assert links(config, "cancel", link_id) == 0
    assert "is paid already: nothing to cancel" in capsys.readouterr().out
    assert links(config, "cancel", link_id, "--json") == 0
    document = json.loads(capsys.readouterr().out)
    assert (document["state"], document["outcome"], document["paid_count"]) == ("PAID", "paid", 1)
    assert FakeNode.cancelled == []
    assert stored(database, link_id).canceled_at is None


def test_a_link_paid_while_being_canceled_is_reported_paid(
    config: Path, database: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    link_id = str(created(config, capsys, "--amount", "1000sat")["link_id"])
    with_open_invoice(database, link_id)
    FakeNode.failure = errors.InvoiceAlreadySettled("invoice already settled")
    assert links(config, "cancel", link_id, "--json") == 0
    assert json.loads(capsys.readouterr().out)["outcome"] == "paid"
    assert links(config, "cancel", link_id) == 0
    assert "was paid before it could be canceled" in capsys.readouterr().out
