"""The payment link part of the ``Store`` contract (links, their single-use compare-and-set,
settlements counted on the link, the tip and link webhook events, the payer's comment), run
against every implementation (memory, SQLite in tmp_path, PostgreSQL); at the end, what only
the SQL stores promise: the compare-and-set across processes and instances, and migrations
that keep the data of the schema before."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.ports import (
    InvoiceRecord,
    InvoiceState,
    InvoiceUpdate,
    LinkState,
    Msat,
    PaymentHash,
    PaymentLink,
    Share,
    Store,
    WebhookEvent,
)
from gateway.store import PostgresStore, SqliteStore, postgres_schema, sqlite_file
from tests.fakes import NOW, FakeClock
from tests.unit.store.test_sqlite_store import user_version

START = NOW  # where the shared clock starts
SETTLED, OPEN = InvoiceState.SETTLED, InvoiceState.OPEN


def payment_hash(n: int) -> PaymentHash:
    return PaymentHash(hashlib.sha256(b"link invoice %d" % n).digest())


def link(link_id: str = "L1", **changes: Any) -> PaymentLink:
    made = PaymentLink(
        link_id=link_id,
        memo="Dinner, table 4",
        min_msat=Msat(21_000),
        max_msat=Msat(21_000),
        single_use=True,
        created_at=START,
        expires_at=START + 3600,
    )
    return dataclasses.replace(made, **changes)


def invoice(n: int, service: str = "link:L1", **changes: Any) -> InvoiceRecord:
    record = InvoiceRecord(
        payment_hash=payment_hash(n),
        payment_request=f"lnbcrt{n}n1link",
        amount_msat=Msat(21_000),
        token_id=b"",
        service=service,
        method="",
        path="",
        state=OPEN,
        created_at=START + n,
        expires_at=START + 600 + n,
        add_index=n + 1,
    )
    return dataclasses.replace(record, **changes)


def settled(n: int, paid: int = 21_000, at: float | None = START + 100) -> InvoiceUpdate:
    return InvoiceUpdate(payment_hash(n), SETTLED, n + 1, Msat(paid), at)


async def stored_link(store: Store, link_id: str = "L1") -> PaymentLink:
    got = await store.get_link(link_id)
    assert got is not None
    return got


async def events(store: Store) -> list[WebhookEvent]:
    return await store.list_webhook_events(0, 1000)


def data(event: WebhookEvent) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(event.payload)
    assert body["type"] == event.type
    return dict(body["data"])


# --- links ---------------------------------------------------------------------------------


async def test_a_link_round_trips(store: Store) -> None:
    made = link(
        memo="Ünïcode ☕",
        min_msat=Msat(1_000),
        max_msat=Msat(5_000_000),
        single_use=False,
        expires_at=None,
    )
    await store.add_link(made)
    assert await store.get_link("L1") == made
    assert await store.get_link("nope") is None


async def test_a_duplicate_id_is_refused_and_leaves_the_first(store: Store) -> None:
    await store.add_link(link())
    with pytest.raises(ValueError, match="exists"):
        await store.add_link(link(memo="another"))
    assert (await stored_link(store)).memo == "Dinner, table 4"


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"min_msat": Msat(0)}, "min_msat"),
        ({"min_msat": Msat(2_000), "max_msat": Msat(1_000)}, "min_msat <= max_msat"),
        ({"link_id": ""}, "needs an id"),
        ({"paid_count": 1}, "no payment yet"),
    ],
)
async def test_a_link_that_cannot_be_new_is_refused(
    store: Store, changes: dict[str, Any], reason: str
) -> None:
    with pytest.raises(ValueError, match=reason):
        await store.add_link(link(**changes))
    assert await store.list_links() == []


async def test_links_are_listed_newest_first_and_by_state_at_a_time(store: Store) -> None:
    await store.add_link(link("open", created_at=START + 1))
    await store.add_link(link("forever", created_at=START + 2, expires_at=None))
    await store.add_link(link("expiring", created_at=START + 3, expires_at=START + 50))
    await store.add_link(link("canceled", created_at=START + 4))
    await store.add_link(link("paid", created_at=START + 5))
    await store.add_link(link("reused", created_at=START + 6, single_use=False))
    await store.add_link(link("same-instant", created_at=START + 6))  # after: listed first
    await store.cancel_link("canceled", START + 10)
    assert await store.add_link_invoice(invoice(1, "link:paid"), None)
    assert await store.add_link_invoice(invoice(2, "link:reused"), None)
    await store.apply_update(settled(1))
    await store.apply_update(settled(2))

    def ids(links: list[PaymentLink]) -> list[str]:
        return [made.link_id for made in links]

    everything = ["same-instant", "reused", "paid", "canceled", "expiring", "forever", "open"]
    assert ids(await store.list_links()) == everything
    assert ids(await store.list_links(limit=2)) == everything[:2]
    assert ids(await store.list_links(limit=0)) == []
    open_now = ["same-instant", "reused", "expiring", "forever", "open"]
    assert ids(await store.list_links(LinkState.OPEN, START + 49)) == open_now
    open_later = ["same-instant", "reused", "forever", "open"]
    assert ids(await store.list_links(LinkState.OPEN, START + 50)) == open_later
    assert ids(await store.list_links(LinkState.OPEN, START + 50, limit=1)) == ["same-instant"]
    assert ids(await store.list_links(LinkState.EXPIRED, START + 50)) == ["expiring"]
    # past every expiry, the paid and the cancelled keep their states
    assert ids(await store.list_links(LinkState.EXPIRED, START + 4000)) == [
        "same-instant",
        "reused",
        "expiring",
        "open",
    ]
    assert ids(await store.list_links(LinkState.PAID, START + 4000)) == ["paid"]
    assert ids(await store.list_links(LinkState.CANCELED, START)) == ["canceled"]
    # the query agrees with ``PaymentLink.state``
    for at in (START, START + 50, START + 4000):
        for state in LinkState:
            expected = [made for made in await store.list_links() if made.state(at) is state]
            assert await store.list_links(state, at) == expected
    with pytest.raises(ValueError, match="limit"):
        await store.list_links(limit=-1)


async def test_cancel_keeps_the_first_time_and_an_unknown_link_is_none(store: Store) -> None:
    await store.add_link(link())
    canceled = await store.cancel_link("L1", START + 10)
    assert canceled == dataclasses.replace(link(), canceled_at=START + 10)
    again = await store.cancel_link("L1", START + 20)
    assert again is not None
    assert again.canceled_at == START + 10
    assert (await stored_link(store)).state(START) is LinkState.CANCELED
    assert await store.cancel_link("nope", START) is None


# --- the single-use compare-and-set --------------------------------------------------------


async def test_a_single_use_links_invoice_is_replaced_only_by_who_names_it(store: Store) -> None:
    await store.add_link(link())
    assert await store.add_link_invoice(invoice(1), None)
    assert (await stored_link(store)).open_hash == payment_hash(1)
    # a second first invoice, or one replacing another hash, loses: nothing written
    assert not await store.add_link_invoice(invoice(2), None)
    assert not await store.add_link_invoice(invoice(2), payment_hash(9))
    assert await store.get_invoice(payment_hash(2)) is None
    # naming the open one replaces it
    assert await store.add_link_invoice(invoice(3), payment_hash(1))
    assert (await stored_link(store)).open_hash == payment_hash(3)
    assert await store.get_invoice(payment_hash(3)) == invoice(3)
    # the replaced one is stale now
    assert not await store.add_link_invoice(invoice(4), payment_hash(1))
    assert await store.get_invoice(payment_hash(4)) is None
    assert [record.payment_hash for record in await store.list_invoices()] == [
        payment_hash(3),
        payment_hash(1),  # the caller cancels it on the node; the watcher records it
    ]


async def test_a_paid_single_use_link_takes_no_other_invoice(store: Store) -> None:
    await store.add_link(link())
    assert await store.add_link_invoice(invoice(1), None)
    await store.apply_update(settled(1))
    assert not await store.add_link_invoice(invoice(2), payment_hash(1))
    assert not await store.add_link_invoice(invoice(2), None)
    assert await store.get_invoice(payment_hash(2)) is None
    paid = await stored_link(store)
    assert paid.open_hash == payment_hash(1)
    assert paid.state(START) is LinkState.PAID


async def test_a_cancelled_single_use_link_takes_no_invoice(store: Store) -> None:
    await store.add_link(link())
    assert await store.add_link_invoice(invoice(1), None)
    await store.cancel_link("L1", START + 5)
    assert not await store.add_link_invoice(invoice(2), payment_hash(1))
    assert await store.get_invoice(payment_hash(2)) is None
    assert (await stored_link(store)).open_hash == payment_hash(1)


async def test_a_paid_single_use_link_stays_paid_when_cancelled(store: Store) -> None:
    await store.add_link(link())
    await store.add_link(link("L2", single_use=False))
    assert await store.add_link_invoice(invoice(1), None)
    assert await store.add_link_invoice(invoice(2, "link:L2"), None)
    await store.apply_update(settled(1))
    await store.apply_update(settled(2))
    paid = await store.cancel_link("L1", START + 200)
    reusable = await store.cancel_link("L2", START + 200)
    assert paid is not None
    assert reusable is not None
    # paid first: a single-use link's payment is what it shows; a reusable one is cancelled
    assert paid.state(START + 200) is LinkState.PAID
    assert reusable.state(START + 200) is LinkState.CANCELED
    for at in (START + 200, START + 5000):
        assert [made.link_id for made in await store.list_links(LinkState.PAID, at)] == ["L1"]
        assert [made.link_id for made in await store.list_links(LinkState.CANCELED, at)] == ["L2"]


@pytest.mark.parametrize("single_use", [True, False], ids=["single use", "reusable"])
async def test_a_cancelled_or_expired_link_takes_no_invoice(store: Store, single_use: bool) -> None:
    await store.add_link(link(single_use=single_use, expires_at=START + 100))
    await store.add_link(link("L2", single_use=single_use, expires_at=None))
    # expired at the invoice's creation: refused, not written
    assert not await store.add_link_invoice(invoice(100), None)
    assert not await store.add_link_invoice(invoice(101), None)
    assert await store.add_link_invoice(invoice(99), None)  # one second before
    await store.cancel_link("L2", START + 5)
    assert not await store.add_link_invoice(invoice(3, "link:L2"), None)
    assert [record.payment_hash for record in await store.list_invoices()] == [payment_hash(99)]
    assert (await stored_link(store, "L2")).open_hash is None


async def test_invoices_are_listed_by_service_and_state(store: Store) -> None:
    await store.add_link(link(single_use=False))
    await store.add_link(link("L2", single_use=False))
    for n, service in enumerate(["link:L1", "link:L2", "link:L1", "link:L1"], start=1):
        assert await store.add_link_invoice(invoice(n, service), None)
    await store.add_invoice(invoice(5, "weather", token_id=b"\x01" * 32))
    await store.apply_update(settled(3))

    def hashes(records: list[InvoiceRecord]) -> list[PaymentHash]:
        return [record.payment_hash for record in records]

    assert hashes(await store.list_invoices(service="link:L1")) == [
        payment_hash(4),
        payment_hash(3),
        payment_hash(1),
    ]
    assert hashes(await store.list_invoices(OPEN, service="link:L1")) == [
        payment_hash(4),
        payment_hash(1),
    ]
    assert hashes(await store.list_invoices(OPEN, 1, "link:L1")) == [payment_hash(4)]
    assert hashes(await store.list_invoices(SETTLED, service="link:L2")) == []
    assert hashes(await store.list_invoices(service="link:L")) == []  # the whole name
    assert len(await store.list_invoices(OPEN)) == 4


async def test_an_unknown_link_takes_no_invoice(store: Store) -> None:
    assert not await store.add_link_invoice(invoice(1, "link:nope"), None)
    assert await store.get_invoice(payment_hash(1)) is None


async def test_a_reusable_link_takes_every_invoice(store: Store) -> None:
    await store.add_link(link(single_use=False, min_msat=Msat(1_000)))
    for n in range(1, 4):
        assert await store.add_link_invoice(invoice(n), None)
    assert await store.add_link_invoice(invoice(4), payment_hash(1))
    assert len(await store.list_invoices()) == 4
    assert (await stored_link(store)).open_hash is None
    # several payments, each counted once
    for n in range(1, 4):
        await store.apply_update(settled(n, paid=1_000 * n))
        await store.apply_update(settled(n, paid=1_000 * n))
    paid = await stored_link(store)
    assert (paid.paid_count, paid.paid_msat) == (3, 6_000)
    assert paid.state(START) is LinkState.OPEN


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (invoice(1, "weather"), "not a payment link's"),
        (invoice(1, "tip:coffee"), "not a payment link's"),
        (invoice(1, buys_credit=True), "never split and buys no credit"),
        (invoice(1, split=(Share("carol", 300_000),)), "never split and buys no credit"),
    ],
    ids=["a route's", "a tip's", "buying credit", "split"],
)
async def test_only_a_links_plain_invoice_is_a_link_invoice(
    store: Store, record: InvoiceRecord, reason: str
) -> None:
    await store.add_link(link())
    with pytest.raises(ValueError, match=reason):
        await store.add_link_invoice(record, None)
    assert await store.list_invoices() == []


# --- settlements and their events ----------------------------------------------------------


async def test_a_settlement_counts_on_its_link_once_whatever_the_replays(store: Store) -> None:
    await store.add_link(link())
    assert await store.add_link_invoice(invoice(1, comment="for the wine"), None)
    await store.apply_update(settled(1, paid=0))  # the node reported none: the amount counts
    for _ in range(3):
        await store.apply_update(settled(1))
    paid = await stored_link(store)
    assert (paid.paid_count, paid.paid_msat, paid.last_paid_at) == (1, 21_000, START + 100)
    listed = await events(store)
    assert [event.type for event in listed] == ["invoice.settled", "link.paid"]
    settlement, payment = listed
    assert data(settlement)["comment"] == "for the wine"
    assert settlement.resource == f"invoice:{payment_hash(1).hex()}"
    assert payment.resource == "link:L1"
    assert data(payment) == {
        "link_id": "L1",
        "payment_hash": payment_hash(1).hex(),
        "amount_paid_msat": 21_000,
        "comment": "for the wine",
        "paid_count": 1,
    }


async def test_a_settlement_without_a_time_counts_at_the_stores_now(
    store: Store, clock: FakeClock
) -> None:
    await store.add_link(link(single_use=False))
    assert await store.add_link_invoice(invoice(1), None)
    assert await store.add_link_invoice(invoice(2), None)
    clock.advance(500)
    await store.apply_update(settled(1, paid=30_000, at=None))
    # a later settlement reported with an earlier time leaves the latest
    await store.apply_update(settled(2, at=START + 100))
    paid = await stored_link(store)
    assert (paid.paid_count, paid.paid_msat, paid.last_paid_at) == (2, 51_000, START + 500)
    payments = [data(event) for event in await events(store) if event.type == "link.paid"]
    assert [payment["paid_count"] for payment in payments] == [1, 2]
    assert [payment["amount_paid_msat"] for payment in payments] == [30_000, 21_000]


async def test_an_invoice_that_ends_unpaid_counts_nothing(store: Store) -> None:
    await store.add_link(link())
    assert await store.add_link_invoice(invoice(1), None)
    await store.apply_update(
        InvoiceUpdate(payment_hash(1), InvoiceState.CANCELED, 0, Msat(0), None)
    )
    unpaid = await stored_link(store)
    assert (unpaid.paid_count, unpaid.paid_msat, unpaid.last_paid_at) == (0, 0, None)
    assert [event.type for event in await events(store)] == ["invoice.canceled"]


async def test_a_tip_emits_tip_received_and_never_token_bought(store: Store) -> None:
    await store.add_invoice(invoice(1, "tip:coffee", comment="great post!"))
    await store.apply_update(settled(1, paid=0))
    await store.apply_update(settled(1))
    listed = await events(store)
    assert [event.type for event in listed] == ["invoice.settled", "tip.received"]
    settlement, tip = listed
    assert data(settlement)["comment"] == "great post!"
    assert data(settlement)["service"] == "tip:coffee"
    assert tip.resource == "tip:coffee"
    assert data(tip) == {
        "jar": "coffee",
        "payment_hash": payment_hash(1).hex(),
        "amount_paid_msat": 21_000,
        "comment": "great post!",
        "settled_at": START + 100,
    }
    # never credit, never split
    assert (await store.credit_totals()).accounts == 0
    assert (await store.split_totals()).received_msat == 0


async def test_an_invoice_without_a_comment_says_none(store: Store) -> None:
    await store.add_invoice(invoice(1, "weather", token_id=b"\x01" * 32))
    await store.apply_update(settled(1))
    listed = await events(store)
    assert [event.type for event in listed] == ["invoice.settled", "token.bought"]
    assert "comment" not in data(listed[0])


async def test_a_link_invoice_of_an_unknown_link_settles_without_link_paid(store: Store) -> None:
    # Added as a plain invoice (not through ``add_link_invoice``): nothing to count it on.
    await store.add_invoice(invoice(1, "link:gone"))
    after = await store.apply_update(settled(1))
    assert after is not None
    assert after.state is SETTLED
    assert [event.type for event in await events(store)] == ["invoice.settled"]


async def test_the_comment_round_trips(store: Store) -> None:
    comment = "Merci ☕ — 'quotes' \"and\" \\ back\nslash"
    await store.add_invoice(invoice(1, "tip:coffee", comment=comment))
    got = await store.get_invoice(payment_hash(1))
    assert got is not None
    assert got.comment == comment
    assert (await store.list_invoices())[0].comment == comment
    after = await store.apply_update(settled(1))
    assert after is not None
    assert after.comment == comment
    assert (await store.list_invoices(SETTLED))[0].comment == comment


async def test_link_operations_in_a_transaction_commit_or_roll_back_together(
    store: Store,
) -> None:
    class Abort(Exception):
        pass

    async def everything_then_abort() -> None:
        async with store.transaction() as tx:
            assert await tx.add_link_invoice(invoice(1), None)
            await tx.add_link(link("L2"))
            await tx.cancel_link("L1", START)
            raise Abort

    await store.add_link(link())
    with pytest.raises(Abort):
        await everything_then_abort()
    assert await stored_link(store) == link()
    assert await store.get_link("L2") is None
    assert await store.get_invoice(payment_hash(1)) is None
    async with store.transaction() as tx:
        assert await tx.add_link_invoice(invoice(1), None)
        assert not await tx.add_link_invoice(invoice(2), None)
        assert (await tx.get_link("L1")) == dataclasses.replace(link(), open_hash=payment_hash(1))
        assert [made.link_id for made in await tx.list_links()] == ["L1"]
        assert await tx.apply_update(settled(1)) is not None
    paid = await stored_link(store)
    assert (paid.paid_count, paid.open_hash) == (1, payment_hash(1))
    assert [event.type for event in await events(store)] == ["invoice.settled", "link.paid"]


async def test_concurrent_replacements_on_one_store_let_exactly_one_win(store: Store) -> None:
    await store.add_link(link())
    results = await asyncio.gather(
        *(store.add_link_invoice(invoice(n), None) for n in range(1, 11))
    )
    assert sum(results) == 1
    winner = payment_hash(results.index(True) + 1)
    assert (await stored_link(store)).open_hash == winner
    assert [record.payment_hash for record in await store.list_invoices()] == [winner]


# --- SQL only: several stores on one database ----------------------------------------------


async def test_two_stores_replacing_one_invoice_at_once_let_exactly_one_win(
    two_stores: tuple[Store, Store],
) -> None:
    first, second = two_stores
    await first.add_link(link())
    assert await first.add_link_invoice(invoice(1), None)
    for round_ in range(5):
        stale = (await stored_link(second)).open_hash
        numbers = [10 * (round_ + 1) + i for i in range(6)]
        results = await asyncio.gather(
            *(
                store.add_link_invoice(invoice(n), stale)
                for n, store in zip(numbers, (first, second) * 3, strict=True)
            )
        )
        assert sum(results) == 1
        winner = numbers[results.index(True)]
        assert (await stored_link(first)).open_hash == payment_hash(winner)
        losers = [n for n, won in zip(numbers, results, strict=True) if not won]
        for n in losers:
            assert await second.get_invoice(payment_hash(n)) is None
    # settled through both at once: counted once
    await asyncio.gather(*(store.apply_update(settled(winner)) for store in (first, second) * 3))
    paid = await stored_link(second)
    assert (paid.paid_count, paid.paid_msat) == (1, 21_000)
    assert [event.type for event in await events(first)] == ["invoice.settled", "link.paid"]


async def test_a_cancel_on_another_instance_sees_every_invoice_it_did_not_stop(
    two_stores: tuple[Store, Store],
) -> None:
    first, second = two_stores
    await first.add_link(link(single_use=False))

    listed: list[InvoiceRecord] = []

    async def cancel_then_list() -> bool:
        await asyncio.sleep(0.005)
        await second.cancel_link("L1", START)
        listed.extend(await second.list_invoices(OPEN, service="link:L1"))
        return False

    added = await asyncio.gather(
        *(first.add_link_invoice(invoice(n), None) for n in range(1, 41)), cancel_then_list()
    )
    recorded = {payment_hash(n) for n, won in enumerate(added, start=1) if won}
    assert {record.payment_hash for record in listed} == recorded  # none escapes the cancel
    assert not await first.add_link_invoice(invoice(50), None)


# --- migrations keep the data of the schema before -----------------------------------------

PREVIOUS_SQLITE = 6  # the last schema without links and comments
PREVIOUS_POSTGRES = 2


def make_v6_by_hand(path: Path) -> None:
    """A database as the sixth schema left it: a settled invoice with a split."""
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("BEGIN")
        for step in sqlite_file.MIGRATIONS[:PREVIOUS_SQLITE]:
            for statement in step:
                connection.execute(statement)
        connection.execute(
            "INSERT INTO invoices VALUES (?, 'lnbcrt1n1link', 21000, ?, 'weather', 'GET',"
            " '/forecast', 'SETTLED', ?, ?, 2, 2, 21000, ?, 0, '')",
            (payment_hash(1), b"\x01" * 32, START + 1, START + 601, START + 100),
        )
        connection.execute(f"PRAGMA user_version = {PREVIOUS_SQLITE}")
        connection.execute("COMMIT")
    finally:
        connection.close()


OLD_INVOICE = invoice(
    1,
    "weather",
    token_id=b"\x01" * 32,
    method="GET",
    path="/forecast",
    state=SETTLED,
    settle_index=2,
    amount_paid_msat=Msat(21_000),
    settled_at=START + 100,
)


async def test_a_version_6_sqlite_database_is_read_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    make_v6_by_hand(path)
    reader = await SqliteStore.open(path, read_only=True)
    try:
        assert await reader.list_invoices() == [OLD_INVOICE]  # no comment
        assert await reader.get_invoice(payment_hash(1)) == OLD_INVOICE
        assert await reader.list_links() == []
        assert await reader.get_link("L1") is None
    finally:
        await reader.close()
    assert user_version(path) == PREVIOUS_SQLITE


async def test_a_version_6_sqlite_database_migrates_keeping_its_data(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    make_v6_by_hand(path)
    opened = await SqliteStore.open(path)
    try:
        assert await opened.list_invoices() == [OLD_INVOICE]
        await opened.add_link(link())
        assert await opened.add_link_invoice(invoice(2, comment="hi"), None)
        await opened.apply_update(settled(2))
        assert (await stored_link(opened)).paid_count == 1
        got = await opened.get_invoice(payment_hash(2))
        assert got is not None
        assert got.comment == "hi"
    finally:
        await opened.close()
    assert user_version(path) == len(sqlite_file.MIGRATIONS)
    connection = sqlite3.connect(path)
    try:
        indexes = {name for (name,) in connection.execute("SELECT name FROM sqlite_master")}
    finally:
        connection.close()
    assert {"payment_links", "payment_links_created_at"} <= indexes


@pytest.mark.postgres
async def test_a_version_2_postgres_database_migrates_keeping_its_data(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as patched:  # a gateway that knows only the schemas before
        patched.setattr(postgres_schema, "LATEST", PREVIOUS_POSTGRES)
        old = await PostgresStore.open(postgres_url)
        await old.close()
    connection = await asyncpg.connect(postgres_url)
    try:
        assert await connection.fetchval("SELECT version FROM schema_version") == 2
        await connection.execute(
            "INSERT INTO invoices (payment_hash, payment_request, amount_msat, token_id, service,"
            " method, path, state, created_at, expires_at, add_index, settle_index,"
            " amount_paid_msat, settled_at, buys_credit, split)"
            " VALUES ($1, 'lnbcrt1n1link', 21000, $2, 'weather', 'GET', '/forecast', 'SETTLED',"
            " $3, $4, 2, 2, 21000, $5, false, '')",
            payment_hash(1),
            b"\x01" * 32,
            START + 1,
            START + 601,
            START + 100,
        )
    finally:
        await connection.close()

    opened = await PostgresStore.open(postgres_url)
    try:
        assert await opened.list_invoices() == [OLD_INVOICE]
        await opened.add_link(link())
        assert await opened.add_link_invoice(invoice(2, comment="hi"), None)
        await opened.apply_update(settled(2))
        assert (await stored_link(opened)).paid_count == 1
    finally:
        await opened.close()
    connection = await asyncpg.connect(postgres_url)
    try:
        version = await connection.fetchval("SELECT version FROM schema_version")
    finally:
        await connection.close()
    assert version == postgres_schema.LATEST == len(postgres_schema.MIGRATIONS)
