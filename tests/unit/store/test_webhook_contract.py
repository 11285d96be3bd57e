"""The webhook part of the ``Store`` contract, run against every implementation (memory, and
SQLite in tmp_path): the outbox events written in the same write as the state change that
causes them (and rolled back with it), their fan-out to endpoints, deliveries, redelivery and
pruning."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from gateway.ports import (
    DeliveryState,
    HeldRequest,
    HeldState,
    InvoiceRecord,
    InvoiceState,
    InvoiceUpdate,
    Msat,
    PaymentHash,
    Preimage,
    Store,
    StoredRequest,
    StoredResponse,
    WebhookEvent,
    Withdrawal,
    WithdrawalState,
)
from gateway.store import MemoryStore, SqliteStore, sqlite_file

START = 1_800_000_000.0
TOKEN = hashlib.sha256(b"webhook token").digest()
PENDING, DELIVERED, DEAD = DeliveryState.PENDING, DeliveryState.DELIVERED, DeliveryState.DEAD
EVERYTHING = frozenset({"invoice.settled", "token.bought", "credit.deposited", "invoice.expired"})


class Clock:
    def __init__(self) -> None:
        self.current = START

    def now(self) -> float:
        return self.current


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest_asyncio.fixture(params=["memory", "sqlite"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, clock: Clock
) -> AsyncIterator[Store]:
    opened: Store
    if request.param == "memory":
        opened = MemoryStore(clock=clock)
    else:
        opened = await SqliteStore.open(tmp_path / "gateway.db", clock=clock)
    try:
        yield opened
    finally:
        await opened.close()


def payment_hash(n: int) -> PaymentHash:
    return PaymentHash(hashlib.sha256(b"webhook invoice %d" % n).digest())


def invoice(n: int, **changes: Any) -> InvoiceRecord:
    record = InvoiceRecord(
        payment_hash=payment_hash(n),
        payment_request=f"lnbcrt{n}n1fake",
        amount_msat=Msat(7_000),
        token_id=TOKEN,
        service="weather",
        method="GET",
        path="/forecast",
        state=InvoiceState.OPEN,
        created_at=START + n,
        expires_at=START + 600 + n,
        add_index=n + 1,
    )
    return dataclasses.replace(record, **changes)


def update(n: int, state: InvoiceState, paid: int = 7_000) -> InvoiceUpdate:
    settled_at = START + 10 if state is InvoiceState.SETTLED else None
    return InvoiceUpdate(payment_hash(n), state, n + 1, Msat(paid), settled_at)


async def events(store: Store) -> list[WebhookEvent]:
    return await store.list_webhook_events(0, 1000)


def kinds(listed: list[WebhookEvent]) -> list[str]:
    return [event.type for event in listed]


def body(event: WebhookEvent) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(event.payload)
    return parsed


# --- events written with their state change ----------------------------------------------------


async def test_settling_a_token_invoice_writes_settled_and_bought_once(store: Store) -> None:
    await store.add_invoice(invoice(1))
    await store.apply_update(update(1, InvoiceState.ACCEPTED))  # no event for ACCEPTED
    await store.apply_update(update(1, InvoiceState.SETTLED))
    await store.apply_update(update(1, InvoiceState.SETTLED))  # replayed: nothing more
    written = await events(store)
    assert kinds(written) == ["invoice.settled", "token.bought"]
    settled = body(written[0])
    assert settled["type"] == "invoice.settled"
    assert settled["timestamp"] == "2027-01-15T08:00:00.000Z"
    assert settled["data"] == {
        "payment_hash": payment_hash(1).hex(),
        "token_id": TOKEN.hex(),
        "service": "weather",
        "amount_msat": 7_000,
        "amount_paid_msat": 7_000,
        "settled_at": START + 10,
    }
    assert {event.resource for event in written} == {f"invoice:{payment_hash(1).hex()}"}
    assert written[0].event_id < written[1].event_id
    assert written[0].created_at == START


async def test_settling_a_credit_invoice_writes_a_deposit_of_the_amount_paid(
    store: Store,
) -> None:
    await store.add_invoice(invoice(1, buys_credit=True))
    await store.apply_update(update(1, InvoiceState.SETTLED, paid=7_500))
    written = await events(store)
    assert kinds(written) == ["invoice.settled", "credit.deposited"]
    deposit = written[1]
    assert deposit.resource == f"account:{TOKEN.hex()}"
    assert body(deposit)["data"]["amount_msat"] == 7_500


@pytest.mark.parametrize(
    ("state", "kind"),
    [(InvoiceState.EXPIRED, "invoice.expired"), (InvoiceState.CANCELED, "invoice.canceled")],
)
async def test_an_unpaid_ending_writes_one_event(
    store: Store, state: InvoiceState, kind: str
) -> None:
    await store.add_invoice(invoice(1))
    await store.apply_update(update(1, state, paid=0))
    await store.apply_update(update(1, state, paid=0))
    assert kinds(await events(store)) == [kind]


async def test_an_untracked_or_refused_update_writes_nothing(store: Store) -> None:
    await store.apply_update(update(9, InvoiceState.SETTLED))  # untracked
    await store.add_invoice(invoice(1))
    await store.apply_update(update(1, InvoiceState.CANCELED, paid=0))
    await store.apply_update(update(1, InvoiceState.SETTLED))  # CANCELED is final
    assert kinds(await events(store)) == ["invoice.canceled"]


async def test_a_rolled_back_transaction_takes_its_events_along(store: Store) -> None:
    """The event and the settlement commit together or not at all: no event without its
    money, no money without its event."""
    await store.add_invoice(invoice(1, buys_credit=True))
    seen: list[str] = []

    async def settle_then_fail() -> None:
        async with store.transaction() as tx:
            await tx.apply_update(update(1, InvoiceState.SETTLED))
            seen.extend(kinds(await tx.list_webhook_events(0, 10)))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await settle_then_fail()
    assert seen == ["invoice.settled", "credit.deposited"]  # written inside it
    assert await events(store) == []
    assert await store.get_account(TOKEN) is None
    async with store.transaction() as tx:
        await tx.apply_update(update(1, InvoiceState.SETTLED))
    assert kinds(await events(store)) == ["invoice.settled", "credit.deposited"]


def held(n: int) -> HeldRequest:
    preimage = Preimage(hashlib.sha256(b"held preimage %d" % n).digest())
    return HeldRequest(
        payment_hash=PaymentHash(hashlib.sha256(preimage).digest()),
        preimage=preimage,
        token_id=TOKEN,
        client="198.51.100.7",
        grant='{"service": "render"}',
        request=StoredRequest("POST", "/jobs?secret=1", (("Authorization", "x"),), b"body"),
        state=HeldState.WAITING,
        created_at=START,
        expires_at=START + 120,
        updated_at=START,
    )


async def test_a_held_request_settled_or_refunded_writes_its_event(store: Store) -> None:
    paid, refunded = held(1), held(2)
    for request in (paid, refunded):
        await store.add_held_request(request)
        await store.move_held_request(request.payment_hash, HeldState.RUNNING, START + 1)
    await store.move_held_request(
        paid.payment_hash,
        HeldState.SUCCEEDED,
        START + 2,
        response=StoredResponse(201, (), b"done"),
    )
    await store.move_held_request(
        refunded.payment_hash, HeldState.FAILED, START + 2, failure="backend failed with 503"
    )
    assert await events(store) == []  # nothing final yet
    await store.move_held_request(paid.payment_hash, HeldState.SETTLED, START + 3, keep_until=1e12)
    await store.move_held_request(
        refunded.payment_hash, HeldState.CANCELED, START + 3, keep_until=1e12
    )
    # A refused move writes nothing.
    assert await store.move_held_request(paid.payment_hash, HeldState.CANCELED, START + 4) is None
    written = await events(store)
    assert kinds(written) == ["request.settled", "request.refunded"]
    assert body(written[0])["data"] == {
        "payment_hash": paid.payment_hash.hex(),
        "token_id": TOKEN.hex(),
        "method": "POST",
        "path": "/jobs",
        "status": 201,
    }
    assert body(written[1])["data"]["reason"] == "backend failed with 503"
    for event in written:  # no preimage, no query, no header or body of the request
        assert paid.preimage.hex() not in event.payload
        assert refunded.preimage.hex() not in event.payload
        assert "secret" not in event.payload
        assert "Authorization" not in event.payload


async def test_a_succeeded_withdrawal_writes_one_event(store: Store) -> None:
    await store.add_invoice(invoice(1, buys_credit=True, amount_msat=Msat(50_000)))
    await store.apply_update(update(1, InvoiceState.SETTLED, paid=50_000))
    before = len(await events(store))

    def withdrawal(n: int) -> Withdrawal:
        return Withdrawal(
            payment_hash=PaymentHash(hashlib.sha256(b"withdrawal %d" % n).digest()),
            token_id=TOKEN,
            payment_request=f"lnbcrt{n}w",
            amount_msat=Msat(10_000),
            fee_reserve_msat=Msat(1_000),
            state=WithdrawalState.PENDING,
            created_at=START,
        )

    for n in (1, 2):
        assert await store.begin_withdrawal(withdrawal(n)) is not None
    ok, failed = withdrawal(1).payment_hash, withdrawal(2).payment_hash
    await store.finish_withdrawal(ok, WithdrawalState.SUCCEEDED, Msat(300), START + 5)
    await store.finish_withdrawal(ok, WithdrawalState.SUCCEEDED, Msat(300), START + 6)  # again
    await store.finish_withdrawal(failed, WithdrawalState.FAILED, Msat(0), START + 5)
    written = (await events(store))[before:]
    assert kinds(written) == ["credit.withdrawn"]
    assert written[0].resource == f"account:{TOKEN.hex()}"
    assert body(written[0])["data"] == {
        "payment_hash": ok.hex(),
        "token_id": TOKEN.hex(),
        "amount_msat": 10_000,
        "fee_msat": 300,
    }


# --- fan-out and deliveries -------------------------------------------------------------------


async def settle(store: Store, n: int) -> None:
    await store.add_invoice(invoice(n))
    await store.apply_update(update(n, InvoiceState.SETTLED))


async def test_a_new_endpoint_starts_after_the_newest_event(store: Store) -> None:
    await settle(store, 1)  # before the endpoint existed: never sent to it
    assert await store.fan_out_webhook_events({"crm": EVERYTHING}, START, 100) == 0
    await settle(store, 2)
    assert await store.fan_out_webhook_events({"crm": EVERYTHING}, START, 100) == 2
    assert await store.fan_out_webhook_events({"crm": EVERYTHING}, START, 100) == 0  # cursor
    listed = await store.list_webhook_deliveries(endpoint="crm")
    assert [(d.event_type, d.state, d.attempts) for d in listed] == [
        ("token.bought", PENDING, 0),
        ("invoice.settled", PENDING, 0),
    ]


async def test_each_endpoint_gets_the_types_it_subscribed_to(store: Store) -> None:
    subscriptions = {"all": EVERYTHING, "bought": frozenset({"token.bought"})}
    await store.fan_out_webhook_events(subscriptions, START, 100)
    await settle(store, 1)
    await settle(store, 2)
    assert await store.fan_out_webhook_events(subscriptions, START, 100) == 6
    bought = await store.list_webhook_deliveries(endpoint="bought")
    assert [d.event_type for d in bought] == ["token.bought", "token.bought"]
    assert len(await store.list_webhook_deliveries(endpoint="all")) == 4


async def test_fan_out_takes_at_most_limit_events_a_call(store: Store) -> None:
    await store.fan_out_webhook_events({"crm": EVERYTHING}, START, 100)
    for n in range(3):
        await settle(store, n)
    assert await store.fan_out_webhook_events({"crm": EVERYTHING}, START, 4) == 4
    assert await store.fan_out_webhook_events({"crm": EVERYTHING}, START, 4) == 2


async def test_deliveries_go_out_in_event_order_and_record_each_attempt(store: Store) -> None:
    await store.fan_out_webhook_events({"crm": EVERYTHING}, START, 100)
    await settle(store, 1)
    await store.fan_out_webhook_events({"crm": EVERYTHING}, START + 1, 100)
    first = await store.next_webhook_delivery("crm")
    assert first is not None
    delivery, event = first
    assert (delivery.event_id, event.type, delivery.next_attempt_at) == (
        event.event_id,
        "invoice.settled",
        START + 1,
    )
    await store.record_webhook_attempt(
        delivery.event_id,
        "crm",
        state=PENDING,
        now=START + 2,
        next_attempt_at=START + 7,
        status=503,
        error="answered 503",
    )
    again = await store.next_webhook_delivery("crm")
    assert again is not None
    assert again[0] == dataclasses.replace(
        delivery, attempts=1, next_attempt_at=START + 7, last_status=503, last_error="answered 503"
    )
    await store.record_webhook_attempt(
        delivery.event_id,
        "crm",
        state=DELIVERED,
        now=START + 8,
        next_attempt_at=START + 8,
        status=204,
        error="",
    )
    following = await store.next_webhook_delivery("crm")
    assert following is not None
    assert following[1].type == "token.bought"
    (done,) = await store.list_webhook_deliveries(DELIVERED, "crm")
    assert (done.attempts, done.last_status, done.delivered_at) == (2, 204, START + 8)
    assert await store.next_webhook_delivery("nobody") is None


async def test_a_dead_delivery_is_revived_by_redeliver(store: Store) -> None:
    await store.fan_out_webhook_events({"a": EVERYTHING, "b": EVERYTHING}, START, 100)
    await settle(store, 1)
    await store.fan_out_webhook_events({"a": EVERYTHING, "b": EVERYTHING}, START, 100)
    for endpoint in ("a", "b"):
        for delivery in await store.list_webhook_deliveries(endpoint=endpoint):
            await store.record_webhook_attempt(
                delivery.event_id,
                endpoint,
                state=DEAD,
                now=START + 1,
                next_attempt_at=START + 1,
                status=None,
                error="connection refused",
            )
    assert await store.next_webhook_delivery("a") is None
    assert len(await store.list_webhook_deliveries(DEAD)) == 4
    assert await store.redeliver_webhooks(START + 5, endpoint="a") == 2
    revived = await store.list_webhook_deliveries(PENDING)
    assert {(d.endpoint, d.attempts, d.next_attempt_at) for d in revived} == {("a", 0, START + 5)}
    assert await store.redeliver_webhooks(START + 6) == 2  # every DEAD one: b's
    assert await store.list_webhook_deliveries(DEAD) == []


async def test_redeliver_one_event_even_to_an_endpoint_that_never_had_it(store: Store) -> None:
    await settle(store, 1)
    (settled, _) = await events(store)
    assert await store.redeliver_webhooks(START, event_id=settled.event_id) == 0  # no delivery
    assert await store.redeliver_webhooks(START, event_id=settled.event_id, endpoint="late") == 1
    (added,) = await store.list_webhook_deliveries(event_id=settled.event_id)
    assert (added.endpoint, added.event_type, added.state) == ("late", "invoice.settled", PENDING)
    assert await store.redeliver_webhooks(START, event_id=10_000) == 0  # unknown event
    assert await store.get_webhook_event(settled.event_id) == settled
    assert await store.get_webhook_event(10_000) is None


async def test_a_removed_endpoint_is_forgotten_and_starts_afresh(store: Store) -> None:
    await store.fan_out_webhook_events({"crm": EVERYTHING}, START, 100)
    await store.fan_out_webhook_events({}, START, 100)  # removed from the configuration
    await settle(store, 1)
    assert await store.fan_out_webhook_events({"crm": EVERYTHING}, START, 100) == 0


async def test_pruning_keeps_what_someone_still_has_to_send(store: Store, clock: Clock) -> None:
    await store.fan_out_webhook_events({"crm": EVERYTHING}, START, 100)
    await settle(store, 1)
    clock.current = START + 100
    await settle(store, 2)
    await store.fan_out_webhook_events({"crm": EVERYTHING}, START, 100)
    # Every event is PENDING for crm: nothing goes.
    assert await store.prune_webhook_events(START + 1000, 100) == 0
    for delivery in await store.list_webhook_deliveries(endpoint="crm"):
        await store.record_webhook_attempt(
            delivery.event_id,
            "crm",
            state=DELIVERED,
            now=START,
            next_attempt_at=START,
            status=200,
            error="",
        )
    # Only those created before the cutoff, with their deliveries.
    assert await store.prune_webhook_events(START + 50, 100) == 2
    assert kinds(await events(store)) == ["invoice.settled", "token.bought"]
    assert len(await store.list_webhook_deliveries()) == 2
    # An event the endpoint's cursor has not passed yet is kept too.
    await settle(store, 3)
    clock.current = START + 200
    assert await store.prune_webhook_events(START + 1000, 100) == 2
    assert kinds(await events(store)) == ["invoice.settled", "token.bought"]


# --- what only the SQLite store promises --------------------------------------------------------


def make_v4_by_hand(path: Path) -> None:
    """A database as the fourth schema left it, with one OPEN invoice."""
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("BEGIN")
        for step in sqlite_file.MIGRATIONS[:4]:
            for statement in step:
                connection.execute(statement)
        connection.execute(
            "INSERT INTO invoices VALUES (?, 'lnbcrt1n1fake', 7000, ?, 'weather', 'GET', '/',"
            " 'OPEN', 1001.5, 4601.5, 1, 0, 0, NULL, 0)",
            (payment_hash(1), TOKEN),
        )
        connection.execute("PRAGMA user_version = 4")
        connection.execute("COMMIT")
    finally:
        connection.close()


async def test_a_version_4_database_migrates_and_writes_events(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    make_v4_by_hand(path)
    reader = await SqliteStore.open(path, read_only=True)  # an old file reads as no events
    try:
        assert await events(reader) == []
        assert await reader.list_webhook_deliveries() == []
    finally:
        await reader.close()
    opened = await SqliteStore.open(path)
    try:
        await opened.apply_update(update(1, InvoiceState.SETTLED))
        assert kinds(await events(opened)) == ["invoice.settled", "token.bought"]
    finally:
        await opened.close()


async def test_events_written_by_one_store_are_fanned_out_by_another(tmp_path: Path) -> None:
    """Two stores on one file stand for two processes: a worker settles, the watching process
    sends; the cursor sees every committed event."""
    path = tmp_path / "gateway.db"
    writer = await SqliteStore.open(path)
    sender = await SqliteStore.open(path)
    try:
        await sender.fan_out_webhook_events({"crm": EVERYTHING}, START, 100)
        await settle(writer, 1)
        await settle(writer, 2)
        assert await sender.fan_out_webhook_events({"crm": EVERYTHING}, START, 100) == 4
        ids = [d.event_id for d in await sender.list_webhook_deliveries(endpoint="crm")]
        assert ids == sorted(ids, reverse=True)
        assert len(set(ids)) == 4
    finally:
        await writer.close()
        await sender.close()
