"""The webhook part of the ``Store`` contract, run against every implementation (memory, and
SQLite in tmp_path): the outbox events written in the same write as the state change that
causes them (and rolled back with it), their fan-out to endpoints, deliveries, redelivery and
pruning."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from gateway.ports import (
    SETTLED_BY_NODE,
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
    WebhookDelivery,
    WebhookEvent,
    Withdrawal,
    WithdrawalState,
    webhook_retry_delay,
)
from gateway.store import MemoryStore, SqliteStore, sqlite_file
from gateway.store.outbox import ENDPOINT_REMOVED
from tests.fakes import NOW, FakeClock

START = NOW  # where the shared clock starts
TOKEN = hashlib.sha256(b"webhook token").digest()
PENDING, DELIVERED, DEAD = DeliveryState.PENDING, DeliveryState.DELIVERED, DeliveryState.DEAD
EVERYTHING = frozenset({"invoice.settled", "token.bought", "credit.deposited", "invoice.expired"})


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


async def attempt(
    store: Store,
    event_id: int,
    endpoint: str,
    *,
    now: float,
    status: int | None,
    error: str = "",
    max_attempts: int = 12,
) -> WebhookDelivery | None:
    """Record one attempt: a 2xx ``status`` delivers it; backoff 5 s doubling up to 60 s."""
    return await store.record_webhook_attempt(
        event_id,
        endpoint,
        delivered=status is not None and 200 <= status < 300,
        now=now,
        status=status,
        error=error,
        max_attempts=max_attempts,
        initial_backoff=5.0,
        max_backoff=60.0,
    )


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
    failed = await attempt(store, delivery.event_id, "crm", now=START + 2, status=503, error="x")
    again = await store.next_webhook_delivery("crm")
    assert again is not None
    assert (
        again[0]
        == failed
        == dataclasses.replace(
            delivery, attempts=1, next_attempt_at=START + 7, last_status=503, last_error="x"
        )
    )
    second = await attempt(store, delivery.event_id, "crm", now=START + 7, status=None, error="y")
    assert second is not None
    assert (second.state, second.attempts, second.next_attempt_at) == (PENDING, 2, START + 17)
    await attempt(store, delivery.event_id, "crm", now=START + 8, status=204)
    following = await store.next_webhook_delivery("crm")
    assert following is not None
    assert following[1].type == "token.bought"
    (done,) = await store.list_webhook_deliveries(DELIVERED, "crm")
    assert (done.attempts, done.last_status, done.delivered_at) == (3, 204, START + 8)
    assert await store.next_webhook_delivery("nobody") is None
    # No longer PENDING: left as it is.
    assert await attempt(store, delivery.event_id, "crm", now=START + 9, status=500) is None
    assert await store.list_webhook_deliveries(DELIVERED, "crm") == [done]


async def test_a_dead_delivery_is_revived_by_redeliver(store: Store) -> None:
    await store.fan_out_webhook_events({"a": EVERYTHING, "b": EVERYTHING}, START, 100)
    await settle(store, 1)
    await store.fan_out_webhook_events({"a": EVERYTHING, "b": EVERYTHING}, START, 100)
    for endpoint in ("a", "b"):
        for delivery in await store.list_webhook_deliveries(endpoint=endpoint):
            dead = await attempt(
                store, delivery.event_id, endpoint, now=START + 1, status=None, max_attempts=1
            )
            assert dead is not None
            assert (dead.state, dead.next_attempt_at) == (DEAD, START + 1)
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


async def test_pruning_keeps_what_someone_still_has_to_send(store: Store, clock: FakeClock) -> None:
    await store.fan_out_webhook_events({"crm": EVERYTHING}, START, 100)
    await settle(store, 1)
    clock.current = START + 100
    await settle(store, 2)
    await store.fan_out_webhook_events({"crm": EVERYTHING}, START, 100)
    # Every event is PENDING for crm: nothing goes.
    assert await store.prune_webhook_events(START + 1000, 100, {"crm"}) == 0
    for delivery in await store.list_webhook_deliveries(endpoint="crm"):
        await attempt(store, delivery.event_id, "crm", now=START, status=200)
    # Only those created before the cutoff, with their deliveries.
    assert await store.prune_webhook_events(START + 50, 100, {"crm"}) == 2
    assert kinds(await events(store)) == ["invoice.settled", "token.bought"]
    assert len(await store.list_webhook_deliveries()) == 2
    # An event the endpoint's cursor has not passed yet is kept too.
    await settle(store, 3)
    clock.current = START + 200
    assert await store.prune_webhook_events(START + 1000, 100, {"crm"}) == 2
    assert kinds(await events(store)) == ["invoice.settled", "token.bought"]


async def test_a_removed_endpoints_pending_deliveries_become_dead(store: Store) -> None:
    """Forgotten, it would never send them: they are DEAD with the reason, not PENDING for
    ever; what it delivered stays as it was."""
    both = {"crm": EVERYTHING, "old": EVERYTHING}
    await store.fan_out_webhook_events(both, START, 100)
    await settle(store, 1)
    await store.fan_out_webhook_events(both, START, 100)
    delivered, pending = sorted(d.event_id for d in await store.list_webhook_deliveries())[::2]
    await attempt(store, delivered, "old", now=START, status=204)
    await store.fan_out_webhook_events({"crm": EVERYTHING}, START + 9, 100)  # "old" removed
    old = {d.event_id: d for d in await store.list_webhook_deliveries(endpoint="old")}
    assert old[delivered].state is DELIVERED
    assert (old[pending].state, old[pending].attempts) == (DEAD, 0)
    assert (old[pending].next_attempt_at, old[pending].last_error) == (START + 9, ENDPOINT_REMOVED)
    assert {d.state for d in await store.list_webhook_deliveries(endpoint="crm")} == {PENDING}
    assert await store.next_webhook_delivery("old") is None


async def test_registering_with_limit_0_starts_new_endpoints_and_sends_nothing(
    store: Store,
) -> None:
    await store.fan_out_webhook_events({"crm": EVERYTHING}, START, 100)
    await settle(store, 1)
    assert await store.fan_out_webhook_events({"crm": EVERYTHING, "new": EVERYTHING}, START, 0) == 0
    await settle(store, 2)
    # crm's cursor stayed before event 1; "new" started after it.
    assert await store.fan_out_webhook_events({"crm": EVERYTHING, "new": EVERYTHING}, START, 9) == 6
    assert len(await store.list_webhook_deliveries(endpoint="new")) == 2


async def test_redelivery_can_be_limited_to_the_configured_endpoints(store: Store) -> None:
    both = {"crm": EVERYTHING, "old": EVERYTHING}
    await store.fan_out_webhook_events(both, START, 100)
    await settle(store, 1)
    await store.fan_out_webhook_events(both, START, 100)
    for delivery in await store.list_webhook_deliveries():
        await attempt(
            store, delivery.event_id, delivery.endpoint, now=START, status=500, max_attempts=1
        )
    configured = {"crm"}
    assert await store.redeliver_webhooks(START + 1, endpoints=configured) == 2
    assert {d.endpoint for d in await store.list_webhook_deliveries(PENDING)} == {"crm"}
    first = min(d.event_id for d in await store.list_webhook_deliveries())
    assert await store.redeliver_webhooks(START + 2, event_id=first, endpoints=configured) == 1
    assert await store.redeliver_webhooks(START + 2, endpoint="old", endpoints=configured) == 0
    assert {d.endpoint for d in await store.list_webhook_deliveries(DEAD)} == {"old"}


async def test_dead_or_not_is_decided_from_the_attempts_stored_at_the_write(store: Store) -> None:
    """A redelivery made while an attempt was under way restarts the count: that attempt's
    failure is the first of the new round, not the last of the old one."""
    await store.fan_out_webhook_events({"crm": EVERYTHING}, START, 100)
    await settle(store, 1)
    await store.fan_out_webhook_events({"crm": EVERYTHING}, START, 100)
    in_flight = await store.next_webhook_delivery("crm")
    assert in_flight is not None
    event_id = in_flight[0].event_id
    for n in range(2):
        await attempt(store, event_id, "crm", now=START + n, status=500, max_attempts=3)
    # The third (and last) attempt is sent; the operator redelivers meanwhile.
    assert await store.redeliver_webhooks(START + 10, event_id=event_id) == 1
    third = await attempt(store, event_id, "crm", now=START + 11, status=500, max_attempts=3)
    assert third is not None
    assert (third.state, third.attempts, third.next_attempt_at) == (PENDING, 1, START + 16)
    for n in range(2):
        last = await attempt(store, event_id, "crm", now=START + 20 + n, status=500, max_attempts=3)
    assert last is not None
    assert (last.state, last.attempts) == (DEAD, 3)


async def test_the_backoff_doubles_in_the_store_up_to_its_cap(store: Store) -> None:
    await store.fan_out_webhook_events({"crm": EVERYTHING}, START, 100)
    await settle(store, 1)
    await store.fan_out_webhook_events({"crm": EVERYTHING}, START, 100)
    first = await store.next_webhook_delivery("crm")
    assert first is not None
    delays = []
    for n in range(1, 71):  # past 2 ** 60
        recorded = await attempt(
            store, first[0].event_id, "crm", now=START, status=503, max_attempts=100
        )
        assert recorded is not None
        assert (recorded.state, recorded.attempts) == (PENDING, n)
        delays.append(recorded.next_attempt_at - START)
    assert delays == [webhook_retry_delay(n, 5.0, 60.0) for n in range(1, 71)]
    assert delays[:6] == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]


async def test_every_event_has_its_own_random_webhook_id(store: Store) -> None:
    await settle(store, 1)
    await settle(store, 2)
    written = await events(store)
    ids = [event.webhook_id for event in written]
    assert all(len(webhook_id) == 32 and int(webhook_id, 16) >= 0 for webhook_id in ids)
    assert ids == [webhook_id.lower() for webhook_id in ids]
    assert len(set(ids)) == 4
    for event in written:  # the same however often it is read (and so on every retry)
        assert await store.get_webhook_event(event.event_id) == event
    await store.fan_out_webhook_events({"crm": EVERYTHING}, START, 100)
    await settle(store, 3)
    await store.fan_out_webhook_events({"crm": EVERYTHING}, START, 100)
    pending = await store.next_webhook_delivery("crm")
    assert pending is not None
    assert pending[1] == await store.get_webhook_event(pending[0].event_id)


async def test_pruning_ignores_endpoints_no_longer_configured(
    store: Store, clock: FakeClock
) -> None:
    """An endpoint removed from the configuration (its cursor and a PENDING delivery left in
    the store, no sender running to forget it) holds no event back for ever."""
    await store.fan_out_webhook_events({"gone": EVERYTHING}, START, 100)
    await settle(store, 1)  # PENDING for "gone"
    await store.fan_out_webhook_events({"gone": EVERYTHING}, START, 100)
    await settle(store, 2)  # past gone's cursor
    clock.current = START + 100
    await settle(store, 3)  # too recent
    assert await store.prune_webhook_events(START + 50, 100, {"gone"}) == 0
    # Configured: none (no [[webhook]]); or another endpoint, new (no cursor yet).
    assert await store.prune_webhook_events(START + 50, 3, ()) == 3
    assert await store.prune_webhook_events(START + 50, 100, {"crm"}) == 1
    assert kinds(await events(store)) == ["invoice.settled", "token.bought"]
    assert await store.list_webhook_deliveries(endpoint="gone") == []


async def test_pruning_waits_for_a_configured_endpoints_cursor_and_pending(
    store: Store, clock: FakeClock
) -> None:
    both = {"crm": EVERYTHING, "books": frozenset({"token.bought"})}
    await store.fan_out_webhook_events(both, START, 100)
    await settle(store, 1)
    clock.current = START + 100
    # Not fanned out yet: the cursors hold both events back.
    assert await store.prune_webhook_events(START + 50, 100, set(both)) == 0
    await store.fan_out_webhook_events(both, START, 100)
    for delivery in await store.list_webhook_deliveries(endpoint="crm"):
        await attempt(store, delivery.event_id, "crm", now=START, status=200)
    # books still has token.bought to send; invoice.settled goes.
    assert await store.prune_webhook_events(START + 50, 100, set(both)) == 1
    assert kinds(await events(store)) == ["token.bought"]
    (bought,) = await store.list_webhook_deliveries(endpoint="books")
    await attempt(store, bought.event_id, "books", now=START, status=500, max_attempts=1)
    assert await store.prune_webhook_events(START + 50, 100, set(both)) == 1  # DEAD: done


async def test_a_held_request_the_node_settled_writes_settled_not_refunded(store: Store) -> None:
    """Recorded CANCELED (the gateway did not settle it, SETTLED_BY_NODE), but the payer paid:
    announcing a refund would be false."""
    request = held(1)
    await store.add_held_request(request)
    await store.move_held_request(
        request.payment_hash,
        HeldState.CANCELED,
        START + 3,
        failure=SETTLED_BY_NODE,
        keep_until=1e12,
    )
    (written,) = await events(store)
    assert written.type == "request.settled"
    assert body(written)["data"] == {
        "payment_hash": request.payment_hash.hex(),
        "token_id": TOKEN.hex(),
        "method": "POST",
        "path": "/jobs",
        "reason": SETTLED_BY_NODE,
    }


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


async def test_a_restored_backup_repeats_event_ids_but_never_webhook_ids(tmp_path: Path) -> None:
    """The event's id comes back after a restore (or in a fresh database): the webhook-id,
    on which receivers dedupe, must not, or they would drop real events as seen."""
    path, backup = tmp_path / "gateway.db", tmp_path / "backup.db"
    opened = await SqliteStore.open(path)
    try:
        await opened.add_invoice(invoice(1))
        await opened.add_invoice(invoice(2))
    finally:
        await opened.close()  # the WAL checkpointed into the file: a copy is a backup
    backup.write_bytes(path.read_bytes())
    opened = await SqliteStore.open(path)
    try:
        await opened.apply_update(update(1, InvoiceState.SETTLED))
        before = await events(opened)
    finally:
        await opened.close()
    path.unlink()
    backup.rename(path)  # restored: sqlite_sequence is as it was before those events
    restored = await SqliteStore.open(path)
    fresh = MemoryStore()
    try:
        await restored.apply_update(update(2, InvoiceState.SETTLED))
        after = await events(restored)
        await fresh.add_invoice(invoice(2))
        await fresh.apply_update(update(2, InvoiceState.SETTLED))
        elsewhere = await events(fresh)
    finally:
        await restored.close()
        await fresh.close()
    assert [e.event_id for e in after] == [e.event_id for e in before] == [1, 2]
    assert [e.event_id for e in elsewhere] == [1, 2]
    webhook_ids = [e.webhook_id for e in before + after + elsewhere]
    assert len(set(webhook_ids)) == 6


async def test_looking_for_the_next_delivery_takes_no_write_lock(tmp_path: Path) -> None:
    """The sender looks every poll_interval, per endpoint: while another process writes (a
    long transaction holding the write lock), a read goes on at once."""
    path = tmp_path / "gateway.db"
    opened = await SqliteStore.open(path)
    writer = sqlite3.connect(path, isolation_level=None)
    try:
        await opened.fan_out_webhook_events({"crm": EVERYTHING}, START, 100)
        await settle(opened, 1)
        await opened.fan_out_webhook_events({"crm": EVERYTHING}, START, 100)
        writer.execute("BEGIN IMMEDIATE")  # another process in its write transaction
        found = await asyncio.wait_for(opened.next_webhook_delivery("crm"), 2.0)
        assert found is not None
        assert found[1].type == "invoice.settled"
        assert await asyncio.wait_for(opened.next_webhook_delivery("nobody"), 2.0) is None
    finally:
        writer.execute("ROLLBACK")
        writer.close()
        await opened.close()
