"""``l402-gateway webhooks list|show|redeliver|new-secret`` over a SQLite store seeded through
the store's API."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.ports import DeliveryState, InvoiceRecord, InvoiceState, InvoiceUpdate, Msat
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
        await store.record_webhook_attempt(
            1,
            "crm",
            state=DeliveryState.DEAD,
            now=1_800_000_003.0,
            next_attempt_at=1_800_000_003.0,
            status=500,
            error="answered 500",
        )
        for event_id in (2, 4):
            await store.record_webhook_attempt(
                event_id,
                "books",
                state=DeliveryState.DELIVERED,
                now=1_800_000_003.0,
                next_attempt_at=1_800_000_003.0,
                status=204,
                error="",
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
    assert main(["--config", str(config), "webhooks", "show", "2", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["webhook_id"], shown["type"]) == ("msg_2", "token.bought")
    assert shown["payload"]["data"]["amount_msat"] == 5_000
    assert [d["endpoint"] for d in shown["deliveries"]] == ["books", "crm"]
    assert main(["--config", str(config), "webhooks", "show", "2"]) == 0
    text = capsys.readouterr().out
    assert "event 2 (webhook-id msg_2): token.bought" in text
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


def test_new_secret_prints_a_usable_secret(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["webhooks", "new-secret"]) == 0
    secret = capsys.readouterr().out.strip()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 32
