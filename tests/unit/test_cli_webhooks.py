"""``l402-gateway webhooks list|show|redeliver|new-secret`` over a SQLite store seeded through
the store's API."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import sqlite3
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.ports import InvoiceRecord, InvoiceState, InvoiceUpdate, Msat
from gateway.ports import PaymentHash as Hash
from gateway.store import SqliteStore
from tests.config_files import write_config

ENDPOINTS = """
[[webhook]]
name = "crm"
url = "http://127.0.0.1:9/hooks"
events = ["*"]
secret_env = "CRM_SECRET"
[[webhook]]
name = "books"
url = "http://127.0.0.1:9/books"
events = ["token.bought"]
secret_env = "BOOKS_SECRET"
"""


async def _seed(database: Path) -> None:
    """Two paid challenges: events 1-4; crm got all four (the first DEAD), books 2 and 4
    (delivered)."""
    store = await SqliteStore.open(database)
    try:
        subscriptions = {"crm": frozenset({"invoice.settled", "token.bought"})}
        subscriptions["books"] = frozenset({"token.bought"})
        await store.fan_out_webhook_events(subscriptions, 1.0, 100)
        for n in (1, 2):
            payment_hash = Hash(hashlib.sha256(b"%d" % n).digest())
            await store.add_invoice(
                InvoiceRecord(
                    payment_hash=payment_hash,
                    payment_request="lnbcrt1fake",
                    amount_msat=Msat(5_000),
                    token_id=b"t" * 32,
                    service="svc\x1b[31m",
                    method="GET",
                    path="/",
                    state=InvoiceState.OPEN,
                    created_at=1_800_000_000.0,
                    expires_at=1_800_000_600.0,
                    add_index=n,
                )
            )
            await store.apply_update(
                InvoiceUpdate(payment_hash, InvoiceState.SETTLED, n, Msat(5_000), 1_800_000_001.0)
            )
        await store.fan_out_webhook_events(subscriptions, 1_800_000_002.0, 100)
        for event_id, endpoint, status in ((1, "crm", 500), (2, "books", 204), (4, "books", 204)):
            await store.record_webhook_attempt(
                event_id,
                endpoint,
                delivered=status == 204,
                now=1_800_000_003.0,
                status=status,
                error="" if status == 204 else f"answered {status}",
                max_attempts=1,
                initial_backoff=1.0,
                max_backoff=1.0,
            )
    finally:
        await store.close()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    database = tmp_path / "gateway.db"
    asyncio.run(_seed(database))
    return write_config(tmp_path, ENDPOINTS, store=f"sqlite://{database}")


def test_list_shows_deliveries_newest_first_filtered(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--config", str(config), "webhooks", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "EVENT",
        "TYPE",
        "ENDPOINT",
        "STATE",
        "ATTEMPTS",
        "NEXT/DONE",
        "(UTC)",
        "LAST",
    ]
    assert [line.split()[:4] for line in lines[1:3]] == [
        ["4", "token.bought", "books", "DELIVERED"],
        ["4", "token.bought", "crm", "PENDING"],
    ]
    assert len(lines) == 7
    assert main(["--config", str(config), "webhooks", "list", "--state", "dead", "--json"]) == 0
    (dead,) = json.loads(capsys.readouterr().out)
    assert dead == {
        "event_id": 1,
        "endpoint": "crm",
        "type": "invoice.settled",
        "state": "DEAD",
        "attempts": 1,
        "next_attempt_at": 1_800_000_003.0,
        "last_status": 500,
        "last_error": "answered 500",
        "delivered_at": None,
    }
    assert main(["--config", str(config), "webhooks", "list", "--endpoint", "books"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_show_prints_the_event_body_and_its_deliveries(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with contextlib.closing(sqlite3.connect(config.parent / "gateway.db")) as connection:
        (random_id,) = connection.execute("SELECT webhook_id FROM events WHERE id = 2").fetchone()
    assert main(["--config", str(config), "webhooks", "show", "2", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["webhook_id"], shown["type"]) == (f"msg_{random_id}", "token.bought")
    assert shown["payload"]["data"]["amount_msat"] == 5_000
    assert [d["endpoint"] for d in shown["deliveries"]] == ["books", "crm"]
    assert main(["--config", str(config), "webhooks", "show", "2"]) == 0
    text = capsys.readouterr().out
    assert f"event 2 (webhook-id msg_{random_id}): token.bought" in text
    assert "\x1b" not in text  # the service's escape is escaped, in JSON and the table
    assert main(["--config", str(config), "webhooks", "show", "99"]) == 1
    assert "no webhook event 99" in capsys.readouterr().err


def test_redeliver_one_event_or_every_dead_one(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--config", str(config), "webhooks", "redeliver", "2", "--endpoint", "books"]) == 0
    assert "1 deliveries of event 2 queued again" in capsys.readouterr().out
    assert main(["--config", str(config), "webhooks", "redeliver", "--dead"]) == 0
    assert "1 deliveries of dead deliveries" in capsys.readouterr().out
    assert main(["--config", str(config), "webhooks", "list", "--state", "dead"]) == 0
    assert capsys.readouterr().out.strip() == "no webhook deliveries"
    assert main(["--config", str(config), "webhooks", "list", "--json", "--endpoint", "books"]) == 0
    books = json.loads(capsys.readouterr().out)
    assert [(d["event_id"], d["state"], d["attempts"]) for d in books] == [
        (4, "DELIVERED", 1),
        (2, "PENDING", 0),
    ]


def test_redeliver_refuses_an_unknown_endpoint_or_event(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--config", str(config), "webhooks", "redeliver", "1", "--endpoint", "x"]) == 2
    assert "no [[webhook]] endpoint named 'x'" in capsys.readouterr().err
    assert main(["--config", str(config), "webhooks", "redeliver", "99"]) == 1
    with pytest.raises(SystemExit):  # neither an id nor --dead
        main(["--config", str(config), "webhooks", "redeliver"])


@pytest.mark.parametrize(
    "arguments",
    [
        ["show", "99999999999999999999"],
        ["show", "0"],
        ["redeliver", "99999999999999999999"],
        ["redeliver", "-1"],
        ["list", "--limit", "99999999999999999999"],
        ["list", "--limit", "-1"],
        ["show", "x"],
    ],
)
def test_an_id_or_limit_out_of_range_is_a_usage_error(
    config: Path, capsys: pytest.CaptureFixture[str], arguments: list[str]
) -> None:
    """Not an OverflowError traceback from SQLite: argparse's error, exit 2."""
    with pytest.raises(SystemExit) as exited:
        main(["--config", str(config), "webhooks", *arguments])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "error: argument" in err
    assert main(["--config", str(config), "webhooks", "show", str(2**63 - 1)]) == 1  # in range


def test_redeliver_dead_leaves_a_removed_endpoints_deliveries_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """crm's DEAD delivery stays DEAD once crm is no longer configured: revived, it would
    wait for ever, since no sender sends to crm."""
    database = tmp_path / "gateway.db"
    asyncio.run(_seed(database))
    books_only = ENDPOINTS.split("[[webhook]]")[2]
    config = write_config(tmp_path, "[[webhook]]" + books_only, store=f"sqlite://{database}")
    assert main(["--config", str(config), "webhooks", "redeliver", "--dead"]) == 0
    assert "0 deliveries of dead deliveries" in capsys.readouterr().out
    assert main(["--config", str(config), "webhooks", "redeliver", "1"]) == 1  # crm's only
    assert "0 deliveries of event 1" in capsys.readouterr().out
    assert main(["--config", str(config), "webhooks", "list", "--state", "dead", "--json"]) == 0
    (dead,) = json.loads(capsys.readouterr().out)
    assert (dead["endpoint"], dead["event_id"]) == ("crm", 1)


def test_new_secret_prints_a_usable_secret(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["webhooks", "new-secret"]) == 0
    secret = capsys.readouterr().out.strip()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 32
