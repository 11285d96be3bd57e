"""The pay-on-success part of the ``Store`` contract (held requests), run against every
implementation (memory, and SQLite in tmp_path); at the end, what only the SQLite store
promises: a move made by one of several stores or processes sharing the file."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from gateway.ports import (
    HELD_UNFINISHED,
    HeldRequest,
    HeldState,
    InvoiceRecord,
    InvoiceState,
    Msat,
    PaymentHash,
    Preimage,
    Store,
    StoredRequest,
    StoredResponse,
)
from gateway.store import MemoryStore, PostgresStore, SqliteStore, StoreClosed, StoreError

WAITING, RUNNING, SUCCEEDED, FAILED, SETTLED, CANCELED, EXPIRED = (
    HeldState.WAITING,
    HeldState.RUNNING,
    HeldState.SUCCEEDED,
    HeldState.FAILED,
    HeldState.SETTLED,
    HeldState.CANCELED,
    HeldState.EXPIRED,
)
FINAL = frozenset({SETTLED, CANCELED, EXPIRED})
EVERY = frozenset(HeldState)
START = 1_800_000_000.0

# The rules of ``HeldState.may_become``, written out: the stores are tested against these.
ALLOWED = frozenset(
    {
        (WAITING, RUNNING),
        (WAITING, EXPIRED),
        (WAITING, CANCELED),
        (RUNNING, SUCCEEDED),
        (RUNNING, FAILED),
        (SUCCEEDED, SETTLED),
        (SUCCEEDED, CANCELED),
        (FAILED, CANCELED),
    }
)
# How a held request gets to each state from WAITING.
PATHS: dict[HeldState, tuple[HeldState, ...]] = {
    WAITING: (),
    RUNNING: (RUNNING,),
    SUCCEEDED: (RUNNING, SUCCEEDED),
    FAILED: (RUNNING, FAILED),
    SETTLED: (RUNNING, SUCCEEDED, SETTLED),
    CANCELED: (RUNNING, FAILED, CANCELED),
    EXPIRED: (EXPIRED,),
}

REQUEST = StoredRequest(
    method="POST",
    target="/jobs/render?size=large&tag=%C3%A9",
    # Order and repeated names kept; a lone surrogate (a header byte aiohttp could not decode)
    # and text beyond ASCII survive.
    headers=(
        ("Content-Type", "application/json"),
        ("X-Forwarded-For", "203.0.113.9"),
        ("X-Tag", "a"),
        ("X-Tag", "b"),
        ("X-Odd", "caf\udce9 ünïcode"),
    ),
    body=b'{"frames": 240}\x00\xff',
)
# What a held request keeps of REQUEST once it ran or never will: what a replay must match.
KEPT = StoredRequest(REQUEST.method, REQUEST.target, (), b"")
RESPONSE = StoredResponse(
    status=201,
    headers=(("Content-Type", "text/plain"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")),
    body=b"rendered\x00\xfe",
)


def in_order(states: frozenset[HeldState]) -> list[HeldState]:
    return sorted(states, key=lambda state: state.value)


class Clock:
    def __init__(self) -> None:
        self.current = START

    def now(self) -> float:
        return self.current


@pytest_asyncio.fixture(
    params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    opened: Store
    if request.param == "memory":
        opened = MemoryStore(clock=Clock())
    elif request.param == "sqlite":
        opened = await SqliteStore.open(tmp_path / "gateway.db", clock=Clock())
    else:
        opened = await PostgresStore.open(request.getfixturevalue("postgres_url"), clock=Clock())
    try:
        yield opened
    finally:
        await opened.close()


def preimage(n: int) -> Preimage:
    return Preimage(hashlib.sha256(b"preimage %d" % n).digest())


def payment_hash(n: int) -> PaymentHash:
    return PaymentHash(hashlib.sha256(preimage(n)).digest())


def held(n: int, **changes: Any) -> HeldRequest:
    made = HeldRequest(
        payment_hash=payment_hash(n),
        preimage=preimage(n),
        token_id=hashlib.sha256(b"token %d" % n).digest(),
        client="198.51.100.7",
        grant='{"service": "render", "capabilities": []}',
        request=REQUEST,
        state=WAITING,
        created_at=START + n,
        expires_at=START + n + 120,
        updated_at=START + n,
    )
    return dataclasses.replace(made, **changes)


async def bring_to(store: Store, n: int, state: HeldState) -> HeldRequest:
    """Add held request ``n`` and move it to ``state`` by the rules; the row as stored."""
    await store.add_held_request(held(n))
    for step, next_state in enumerate(PATHS[state], start=1):
        moved = await store.move_held_request(
            payment_hash(n),
            next_state,
            START + 1000 * step,
            response=RESPONSE if next_state is SUCCEEDED else None,
            failure="backend failed with 503" if next_state is FAILED else "",
            keep_until=START + 10_000 if next_state in FINAL else None,
        )
        assert moved is not None
    got = await store.get_held_request(payment_hash(n))
    assert got is not None
    assert got.state is state
    return got


# --- adding and reading ----------------------------------------------------------------------


async def test_a_held_request_round_trips_with_every_field(store: Store) -> None:
    plain = held(1)
    # The fields a new row normally lacks, set, and a request without headers or body.
    odd = held(
        2,
        request=StoredRequest("GET", "/", ()),
        response=StoredResponse(204, ()),
        failure="text",
        keep_until=START + 7.25,
        delivered_at=START + 3.5,
    )
    without_request = held(3, request=None)
    for row in (plain, odd, without_request):
        await store.add_held_request(row)
    for row in (plain, odd, without_request):
        assert await store.get_held_request(row.payment_hash) == row
    assert await store.get_held_request(payment_hash(4)) is None


async def test_adding_the_same_payment_hash_again_changes_nothing(store: Store) -> None:
    original = held(1)
    await store.add_held_request(original)
    await store.add_held_request(original)
    await store.add_held_request(
        held(
            1,
            client="203.0.113.1",
            request=StoredRequest("DELETE", "/other", ()),
            created_at=START + 99,
            preimage=preimage(2),
        )
    )
    assert await store.get_held_request(payment_hash(1)) == original
    assert await store.count_held_requests(EVERY) == 1


async def test_adding_again_after_a_move_does_not_reset_it(store: Store) -> None:
    running = await bring_to(store, 1, RUNNING)
    await store.add_held_request(held(1))
    assert await store.get_held_request(payment_hash(1)) == running


@pytest.mark.parametrize("state", in_order(EVERY - {WAITING}))
async def test_a_held_request_is_added_waiting_only(store: Store, state: HeldState) -> None:
    with pytest.raises(ValueError, match="begins WAITING"):
        await store.add_held_request(held(1, state=state))
    assert await store.get_held_request(payment_hash(1)) is None


# --- the state rules -------------------------------------------------------------------------


def test_the_written_out_rules_are_those_of_may_become() -> None:
    assert {(old, new) for old in HeldState for new in HeldState if old.may_become(new)} == ALLOWED
    assert FINAL == EVERY - HELD_UNFINISHED


@pytest.mark.parametrize("old", in_order(EVERY))
@pytest.mark.parametrize("new", in_order(EVERY))
async def test_a_move_follows_the_rules(store: Store, old: HeldState, new: HeldState) -> None:
    before = await bring_to(store, 1, old)
    now = START + 50_000
    response = RESPONSE if new is SUCCEEDED else None
    keep_until = START + 90_000 if new in FINAL else None
    moved = await store.move_held_request(
        payment_hash(1), new, now, response=response, failure="why", keep_until=keep_until
    )
    after = await store.get_held_request(payment_hash(1))
    if (old, new) in ALLOWED:
        assert moved is not None
        assert moved == after
        assert (moved.state, moved.updated_at, moved.failure) == (new, now, "why")
        assert moved.keep_until == keep_until
        assert moved.request == (REQUEST if new in (WAITING, RUNNING) else KEPT)
    else:
        assert moved is None
        assert after == before  # a refused move writes nothing


async def test_moving_an_unknown_hash_is_none_and_creates_nothing(store: Store) -> None:
    assert await store.move_held_request(payment_hash(1), RUNNING, START) is None
    assert await store.get_held_request(payment_hash(1)) is None
    assert await store.count_held_requests(EVERY) == 0


async def test_running_keeps_the_request_for_the_runner(store: Store) -> None:
    await store.add_held_request(held(1))
    running = await store.move_held_request(payment_hash(1), RUNNING, START + 5)
    assert running == dataclasses.replace(held(1), state=RUNNING, updated_at=START + 5)
    assert running is not None
    assert running.request is not None
    assert running.request.body == REQUEST.body


async def test_success_stores_the_response_and_keeps_only_method_and_target(
    store: Store,
) -> None:
    await bring_to(store, 1, RUNNING)
    succeeded = await store.move_held_request(
        payment_hash(1), SUCCEEDED, START + 6, response=RESPONSE
    )
    assert succeeded == dataclasses.replace(
        held(1), state=SUCCEEDED, updated_at=START + 6, request=KEPT, response=RESPONSE
    )
    settled = await store.move_held_request(
        payment_hash(1), SETTLED, START + 7, keep_until=START + 3607
    )
    assert settled == dataclasses.replace(
        held(1),
        state=SETTLED,
        updated_at=START + 7,
        request=KEPT,
        response=RESPONSE,
        keep_until=START + 3607,
    )


async def test_a_failure_keeps_its_reason_through_the_cancel(store: Store) -> None:
    await bring_to(store, 1, RUNNING)
    failed = await store.move_held_request(
        payment_hash(1), FAILED, START + 6, failure="backend failed with 503"
    )
    assert failed is not None
    assert (failed.request, failed.failure) == (KEPT, "backend failed with 503")
    canceled = await store.move_held_request(
        payment_hash(1), CANCELED, START + 7, keep_until=START + 3607
    )
    assert canceled == dataclasses.replace(
        failed, state=CANCELED, updated_at=START + 7, keep_until=START + 3607
    )


async def test_a_failure_without_an_answer_stores_no_response(store: Store) -> None:
    await bring_to(store, 1, RUNNING)
    failed = await store.move_held_request(
        payment_hash(1), FAILED, START + 6, failure="backend timed out after 30 s"
    )
    assert failed is not None
    assert (failed.response, failed.request) == (None, KEPT)
    assert failed.failure == "backend timed out after 30 s"


async def test_a_later_reason_replaces_the_earlier_one(store: Store) -> None:
    await bring_to(store, 1, SUCCEEDED)
    canceled = await store.move_held_request(
        payment_hash(1), CANCELED, START + 7, failure="the node cancelled the held payment"
    )
    assert canceled is not None
    assert (canceled.failure, canceled.response) == (
        "the node cancelled the held payment",
        RESPONSE,
    )


@pytest.mark.parametrize("ending", [EXPIRED, CANCELED])
async def test_ending_unpaid_keeps_only_method_and_target(store: Store, ending: HeldState) -> None:
    await store.add_held_request(held(1))
    ended = await store.move_held_request(
        payment_hash(1), ending, START + 200, failure="invoice expired unpaid", keep_until=START
    )
    assert ended == dataclasses.replace(
        held(1),
        state=ending,
        updated_at=START + 200,
        request=KEPT,
        failure="invoice expired unpaid",
        keep_until=START,
    )


async def test_a_row_stored_without_a_request_stays_without_one(store: Store) -> None:
    await store.add_held_request(held(1, request=None))
    ended = await store.move_held_request(payment_hash(1), EXPIRED, START + 1, keep_until=START)
    assert ended is not None
    assert ended.request is None
    assert await store.get_held_request(payment_hash(1)) == ended


@pytest.mark.parametrize("state", [WAITING, RUNNING, FAILED, SETTLED, CANCELED, EXPIRED])
async def test_a_response_with_a_state_that_takes_none_is_refused(
    store: Store, state: HeldState
) -> None:
    # From a state that may become ``state``, if there is one. A failed request's answer is
    # never replayed (its failure names the status): not kept either.
    start = {SETTLED: SUCCEEDED, FAILED: RUNNING}.get(state, WAITING)
    before = await bring_to(store, 1, start)
    with pytest.raises(ValueError, match="response is stored with SUCCEEDED only"):
        await store.move_held_request(payment_hash(1), state, START + 9, response=RESPONSE)
    assert await store.get_held_request(payment_hash(1)) == before


@pytest.mark.parametrize("state", [RUNNING, SUCCEEDED, FAILED])
async def test_keep_until_with_an_unfinished_state_is_refused(
    store: Store, state: HeldState
) -> None:
    before = await bring_to(store, 1, WAITING if state is RUNNING else RUNNING)
    with pytest.raises(ValueError, match="keep_until is set with a final state"):
        await store.move_held_request(payment_hash(1), state, START + 9, keep_until=START + 99)
    assert await store.get_held_request(payment_hash(1)) == before


async def test_bad_move_arguments_are_refused_for_an_unknown_hash_too(store: Store) -> None:
    with pytest.raises(ValueError, match="response is stored"):
        await store.move_held_request(payment_hash(1), SETTLED, START, response=RESPONSE)
    with pytest.raises(ValueError, match="keep_until"):
        await store.move_held_request(payment_hash(1), RUNNING, START, keep_until=START)


async def test_concurrent_moves_to_running_let_exactly_one_win(store: Store) -> None:
    for n in range(10):
        await store.add_held_request(held(n))
    results = await asyncio.gather(
        *(store.move_held_request(payment_hash(n), RUNNING, START) for n in range(10) for _ in "ab")
    )
    winners = [result.payment_hash for result in results if result is not None]
    assert sorted(winners) == sorted(payment_hash(n) for n in range(10))


# --- listing and counting --------------------------------------------------------------------


async def test_list_is_oldest_first_filtered_and_limited(store: Store) -> None:
    # Added out of order; 3 and 4 created in the same instant: the earlier insert first.
    for n, created in ((2, 20.0), (1, 10.0), (4, 30.0), (3, 30.0), (5, 5.0)):
        await store.add_held_request(held(n, created_at=START + created))
    await store.move_held_request(payment_hash(4), RUNNING, START)
    await store.move_held_request(payment_hash(5), EXPIRED, START, keep_until=START)

    listed = await store.list_held_requests(HELD_UNFINISHED, 10)
    assert [row.payment_hash for row in listed] == [payment_hash(n) for n in (1, 2, 4, 3)]
    assert listed[2] == await store.get_held_request(payment_hash(4))
    assert [r.payment_hash for r in await store.list_held_requests(HELD_UNFINISHED, 2)] == [
        payment_hash(1),
        payment_hash(2),
    ]
    waiting = await store.list_held_requests(frozenset({WAITING}), 10)
    assert [row.payment_hash for row in waiting] == [payment_hash(n) for n in (1, 2, 3)]
    assert [r.state for r in await store.list_held_requests(frozenset({EXPIRED}), 10)] == [EXPIRED]
    assert await store.list_held_requests(frozenset(), 10) == []
    assert await store.list_held_requests(EVERY, 0) == []


async def test_list_hashes_is_the_list_without_the_rows(store: Store) -> None:
    for n, created in ((2, 20.0), (1, 10.0), (4, 30.0), (3, 30.0), (5, 5.0)):
        await store.add_held_request(held(n, created_at=START + created))
    await store.move_held_request(payment_hash(4), RUNNING, START)
    await store.move_held_request(payment_hash(5), EXPIRED, START, keep_until=START)
    for states in (HELD_UNFINISHED, frozenset({WAITING}), frozenset({EXPIRED}), frozenset()):
        for limit in (0, 2, 10):
            listed = await store.list_held_requests(states, limit)
            hashes = await store.list_held_hashes(states, limit)
            assert hashes == [row.payment_hash for row in listed]
    assert await store.list_held_hashes(HELD_UNFINISHED, 10) == [
        payment_hash(n) for n in (1, 2, 4, 3)
    ]


async def test_count_by_state_and_client(store: Store) -> None:
    for n, client in enumerate(["a", "a", "a", "b", "c"]):
        await store.add_held_request(held(n, client=client))
    await store.move_held_request(payment_hash(0), RUNNING, START)
    await store.move_held_request(payment_hash(1), EXPIRED, START)

    assert await store.count_held_requests(HELD_UNFINISHED) == 4
    assert await store.count_held_requests(HELD_UNFINISHED, "a") == 2
    assert await store.count_held_requests(frozenset({WAITING}), "a") == 1
    assert await store.count_held_requests(EVERY, "a") == 3
    assert await store.count_held_requests(HELD_UNFINISHED, "b") == 1
    assert await store.count_held_requests(HELD_UNFINISHED, "nobody") == 0
    assert await store.count_held_requests(frozenset(), "a") == 0
    assert await store.count_held_requests(FINAL) == 1


# --- delivery and pruning --------------------------------------------------------------------


async def test_a_delivery_is_recorded_once_and_only_shortens_keep_until(store: Store) -> None:
    await bring_to(store, 1, SETTLED)  # kept until START + 10_000
    await store.mark_held_delivered(payment_hash(1), START + 100, START + 160)
    first = await store.get_held_request(payment_hash(1))
    assert first is not None
    assert (first.delivered_at, first.keep_until) == (START + 100, START + 160)

    await store.mark_held_delivered(payment_hash(1), START + 200, START + 260)  # later: longer
    again = await store.get_held_request(payment_hash(1))
    assert again == first
    await store.mark_held_delivered(payment_hash(1), START + 120, START + 130)  # sooner
    shorter = await store.get_held_request(payment_hash(1))
    assert shorter == dataclasses.replace(first, keep_until=START + 130)


async def test_a_delivery_before_the_settle_is_not_lengthened_by_it(store: Store) -> None:
    await bring_to(store, 1, SUCCEEDED)
    await store.mark_held_delivered(payment_hash(1), START + 100, START + 160)
    delivered = await store.get_held_request(payment_hash(1))
    assert delivered is not None
    assert (delivered.delivered_at, delivered.keep_until) == (START + 100, START + 160)
    settled = await store.move_held_request(
        payment_hash(1), SETTLED, START + 101, keep_until=START + 3701
    )
    assert settled is not None
    assert (settled.delivered_at, settled.keep_until) == (START + 100, START + 160)


async def test_delivering_an_unknown_hash_does_nothing(store: Store) -> None:
    await store.mark_held_delivered(payment_hash(1), START, START + 60)
    assert await store.get_held_request(payment_hash(1)) is None


async def test_prune_deletes_final_rows_past_keep_until_soonest_first(store: Store) -> None:
    for n, state in enumerate([SETTLED, CANCELED, EXPIRED]):
        await bring_to(store, n, state)  # each kept until START + 10_000
    await bring_to(store, 3, SETTLED)
    await store.mark_held_delivered(payment_hash(3), START, START + 500)  # due sooner
    await bring_to(store, 4, SETTLED)
    await store.mark_held_delivered(payment_hash(4), START, START + 10_001)  # not shortened
    # Unfinished rows are never pruned, not even one a delivery gave a keep_until.
    for n, state in enumerate([WAITING, RUNNING, SUCCEEDED, FAILED], start=5):
        await bring_to(store, n, state)
    await store.mark_held_delivered(payment_hash(7), START, START + 1)
    # Nor a final one that was given no keep_until.
    await store.add_held_request(held(9))
    await store.move_held_request(payment_hash(9), EXPIRED, START)
    # The invoice and root key of a pruned request stay.
    invoice = InvoiceRecord(
        payment_hash=payment_hash(0),
        payment_request="lnbcrt1",
        amount_msat=Msat(1000),
        token_id=held(0).token_id,
        service="render",
        method="POST",
        path="/jobs",
        state=InvoiceState.SETTLED,
        created_at=START,
        expires_at=START + 120,
        add_index=1,
    )
    await store.add_invoice(invoice)
    await store.put_root_key(b"k" * 32, held(0).token_id, b"r" * 32)

    unlengthened = await store.get_held_request(payment_hash(4))
    assert unlengthened is not None
    assert unlengthened.keep_until == START + 10_000

    assert await store.prune_held_requests(START + 500, 100) == 0  # before now, not at it
    assert await store.prune_held_requests(START + 10_000.5, 1) == 1
    assert await store.get_held_request(payment_hash(3)) is None  # the soonest due, first
    assert await store.prune_held_requests(START + 10_000, 100) == 0
    assert await store.prune_held_requests(START + 10_000.5, 3) == 3
    assert await store.prune_held_requests(START + 10_000.5, 3) == 1
    assert await store.prune_held_requests(START + 1e12, 100) == 0
    left = await store.list_held_requests(EVERY, 100)
    assert sorted(row.payment_hash for row in left) == sorted(payment_hash(n) for n in range(5, 10))
    assert await store.get_invoice(payment_hash(0)) == invoice
    assert await store.get_root_key(b"k" * 32) == b"r" * 32


# --- transactions, close, secrets ------------------------------------------------------------


class Abort(Exception):
    pass


def invoice_of(n: int) -> InvoiceRecord:
    return InvoiceRecord(
        payment_hash=payment_hash(n),
        payment_request=f"lnbcrt{n}",
        amount_msat=Msat(1000),
        token_id=held(n).token_id,
        service="render",
        method="POST",
        path="/jobs",
        state=InvoiceState.OPEN,
        created_at=START,
        expires_at=START + 120,
        add_index=n,
    )


async def test_a_hold_challenge_is_stored_whole_or_not_at_all(store: Store) -> None:
    async def challenge(n: int, fail: bool) -> None:
        async with store.transaction() as tx:
            await tx.add_invoice(invoice_of(n))
            await tx.put_root_key(b"%d" % n * 32, held(n).token_id, b"r" * 32)
            await tx.add_held_request(held(n))
            assert await tx.get_held_request(payment_hash(n)) == held(n)  # sees its writes
            assert await tx.count_held_requests(HELD_UNFINISHED, held(n).client) == 1
            if fail:
                raise Abort

    with pytest.raises(Abort):
        await challenge(1, fail=True)
    assert await store.get_invoice(payment_hash(1)) is None
    assert await store.get_root_key(b"1" * 32) is None
    assert await store.get_held_request(payment_hash(1)) is None
    assert await store.count_held_requests(EVERY) == 0

    await challenge(2, fail=False)
    assert await store.get_invoice(payment_hash(2)) == invoice_of(2)
    assert await store.get_root_key(b"2" * 32) == b"r" * 32
    assert await store.get_held_request(payment_hash(2)) == held(2)


async def test_held_writes_in_a_failed_transaction_leave_nothing(store: Store) -> None:
    await bring_to(store, 1, WAITING)
    await bring_to(store, 2, SETTLED)
    await bring_to(store, 3, CANCELED)
    before = await store.list_held_requests(EVERY, 10)

    async def everything_then_abort() -> None:
        async with store.transaction() as tx:
            assert await tx.move_held_request(payment_hash(1), RUNNING, START + 1) is not None
            await tx.mark_held_delivered(payment_hash(2), START, START + 1)
            assert await tx.prune_held_requests(START + 1e9, 10) == 2
            raise Abort

    with pytest.raises(Abort):
        await everything_then_abort()
    assert await store.list_held_requests(EVERY, 10) == before


async def test_a_duplicate_root_key_rolls_the_held_request_back(store: Store) -> None:
    await store.put_root_key(b"k" * 32, b"t" * 32, b"r" * 32)

    async def challenge() -> None:
        async with store.transaction() as tx:
            await tx.add_held_request(held(1))
            await tx.add_invoice(invoice_of(1))
            await tx.put_root_key(b"k" * 32, b"t" * 32, b"X" * 32)

    with pytest.raises(StoreError, match="different root key"):
        await challenge()
    assert await store.get_held_request(payment_hash(1)) is None
    assert await store.get_invoice(payment_hash(1)) is None


CALLS: dict[str, Callable[[Store], Awaitable[object]]] = {
    "add_held_request": lambda s: s.add_held_request(held(1)),
    "get_held_request": lambda s: s.get_held_request(payment_hash(1)),
    "list_held_requests": lambda s: s.list_held_requests(EVERY, 1),
    "list_held_hashes": lambda s: s.list_held_hashes(EVERY, 1),
    "count_held_requests": lambda s: s.count_held_requests(EVERY),
    "move_held_request": lambda s: s.move_held_request(payment_hash(1), RUNNING, START),
    "mark_held_delivered": lambda s: s.mark_held_delivered(payment_hash(1), START, START),
    "prune_held_requests": lambda s: s.prune_held_requests(START, 1),
}


@pytest.mark.parametrize("call", sorted(CALLS))
async def test_held_calls_after_close_raise_store_closed(store: Store, call: str) -> None:
    await store.close()
    with pytest.raises(StoreClosed, match="closed"):
        await CALLS[call](store)


async def test_the_preimage_and_grant_stay_out_of_repr(store: Store) -> None:
    stored = await bring_to(store, 1, RUNNING)
    for text in (repr(stored), str(stored), repr(await store.list_held_requests(EVERY, 1))):
        assert preimage(1).hex() not in text
        assert repr(preimage(1)) not in text
        assert "capabilities" not in text  # the grant
        assert "frames" not in text  # the request body
    assert stored.preimage == preimage(1)


# --- SQLite only: one file shared by several stores and processes -----------------------------


async def test_two_stores_on_one_file_move_each_row_once(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    first, second = await SqliteStore.open(path), await SqliteStore.open(path)
    try:
        for n in range(20):
            await first.add_held_request(held(n))
        results = await asyncio.gather(
            *(
                store.move_held_request(payment_hash(n), RUNNING, START + n)
                for n in range(20)
                for store in (first, second, second, first)
            )
        )
        winners = [result.payment_hash for result in results if result is not None]
        assert sorted(winners) == sorted(payment_hash(n) for n in range(20))
        # The loser sees the winner's move; the next step is again taken once.
        assert await second.count_held_requests(frozenset({RUNNING})) == 20
        finals = await asyncio.gather(
            first.move_held_request(payment_hash(0), FAILED, START, failure="one"),
            second.move_held_request(payment_hash(0), SUCCEEDED, START, response=RESPONSE),
        )
        assert sum(result is not None for result in finals) == 1
    finally:
        await first.close()
        await second.close()


MOVER = """
import asyncio, sys
from gateway.ports import HeldState, PaymentHash
from gateway.store import SqliteStore

async def main() -> None:
    store = await SqliteStore.open(sys.argv[1])
    hashes = [PaymentHash(bytes.fromhex(h)) for h in sys.argv[2:]]
    print("ready", flush=True)
    sys.stdin.readline()  # start together
    results = await asyncio.gather(
        *(store.move_held_request(h, HeldState.RUNNING, 1.0) for h in hashes)
    )
    await store.close()
    print(" ".join(r.payment_hash.hex() for r in results if r is not None), flush=True)

asyncio.run(main())
"""


async def test_two_processes_moving_the_same_rows_run_each_once(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    store = await SqliteStore.open(path)
    try:
        for n in range(40):
            await store.add_held_request(held(n))
        hashes = [payment_hash(n).hex() for n in range(40)]
        children = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                MOVER,
                str(path),
                *(hashes if i == 0 else reversed(hashes)),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            for i in range(2)
        ]
        for child in children:
            assert child.stdout is not None
            assert await asyncio.wait_for(child.stdout.readline(), timeout=60) == b"ready\n"
        outputs = await asyncio.gather(*(child.communicate(b"go\n") for child in children))
        for child, (_, stderr) in zip(children, outputs, strict=True):
            assert child.returncode == 0, stderr.decode()
        won = [stdout.decode().split() for stdout, _ in outputs]
        assert sorted(won[0] + won[1]) == sorted(hashes)  # every row once, none twice
        assert await store.count_held_requests(frozenset({RUNNING})) == 40
    finally:
        await store.close()
