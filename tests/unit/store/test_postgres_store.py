"""``PostgresStore`` beyond the shared contract: several stores (as several gateway instances)
on one database, migrations, errors without the password, read-only mode, cancellation, and
the shared rate limit buckets."""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import asyncpg
import pytest
import pytest_asyncio

from gateway.errors import ConfigError, SchemaVersionError, StoreError
from gateway.ports import (
    WEBHOOK_EVENT_TYPES,
    Cursor,
    HeldRequest,
    HeldState,
    InvoiceRecord,
    InvoiceState,
    InvoiceUpdate,
    Msat,
    PaymentHash,
    Preimage,
)
from gateway.store import PostgresStore, open_store
from gateway.store import postgres as postgres_store
from gateway.store.postgres_schema import LATEST, ROLE_GRANTS
from tests.postgres_server import PostgresServer

pytestmark = pytest.mark.postgres

START = 1_800_000_000.0
FAR_FUTURE = 1e12
TOKEN = hashlib.sha256(b"token").digest()


@pytest.fixture
def url(postgres_url: str) -> str:
    return postgres_url


@pytest_asyncio.fixture
async def stores(url: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    """Two stores with pools of their own: two gateway instances on one database."""
    first = await PostgresStore.open(url)
    second = await PostgresStore.open(url)
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


def payment_hash(n: int) -> PaymentHash:
    return PaymentHash(hashlib.sha256(b"pg invoice %d" % n).digest())


def invoice(n: int, *, buys_credit: bool = False) -> InvoiceRecord:
    return InvoiceRecord(
        payment_hash=payment_hash(n),
        payment_request=f"lnbcrt{n}n1fake",
        amount_msat=Msat(1000),
        token_id=TOKEN if buys_credit else hashlib.sha256(b"token %d" % n).digest(),
        service="weather",
        method="GET",
        path=f"/forecast/{n}",
        state=InvoiceState.OPEN,
        created_at=START + n,
        expires_at=START + 3600 + n,
        add_index=n + 1,
        buys_credit=buys_credit,
    )


def settled(n: int, paid: int = 1000) -> InvoiceUpdate:
    return InvoiceUpdate(payment_hash(n), InvoiceState.SETTLED, n + 1, Msat(paid), START + n)


async def fund(store: PostgresStore, msat: int) -> None:
    """Credit ``msat`` to TOKEN's account (a settled purchase)."""
    await store.add_invoice(invoice(0, buys_credit=True))
    await store.apply_update(settled(0, msat))


async def sql(url: str, statement: str, *arguments: object) -> object:
    connection = await asyncpg.connect(url)
    try:
        return await connection.fetchval(statement, *arguments)
    finally:
        await connection.close()


# --- several instances -----------------------------------------------------------------------


async def test_concurrent_debits_from_two_instances_never_overspend(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    first, second = stores
    await fund(first, 20 * 1000)
    results = await asyncio.gather(
        *(store.reserve(TOKEN, Msat(1000), FAR_FUTURE) for store in (first, second) * 25)
    )
    assert sum(result.reservation is not None for result in results) == 20
    assert min(result.balance_msat for result in results) == 0
    account = await second.get_account(TOKEN)
    assert account is not None
    assert (account.reserved_msat, account.balance_msat) == (20_000, 0)
    # Settled from both at once, each reservation once.
    reservations = [r.reservation for r in results if r.reservation is not None]
    settles = await asyncio.gather(
        *(
            store.settle_reservation(reservation.reservation_id, Msat(400), "GET", "/")
            for reservation in reservations
            for store in (first, second)
        )
    )
    assert sum(balance is not None for balance in settles) == 20
    account = await first.get_account(TOKEN)
    assert account is not None
    assert (account.spent_msat, account.reserved_msat, account.balance_msat) == (8000, 0, 12_000)
    # A purchase settled by both instances is credited once.
    await asyncio.gather(*(store.apply_update(settled(0)) for store in (first, second) * 5))
    assert (await first.credit_totals()).received_msat == 20_000


async def test_events_of_concurrent_writers_are_fanned_out_without_a_gap(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    """Event ids are drawn at insert and committed under ``EVENTS_LOCK``: a fan-out running
    meanwhile (on either instance) never moves its cursor past an event not yet committed."""
    first, second = stores
    everything = {"all": frozenset(WEBHOOK_EVENT_TYPES)}
    await first.fan_out_webhook_events(everything, START, 0)  # registers the endpoint
    count = 60
    for n in range(1, count + 1):
        await first.add_invoice(invoice(n))
    settling = asyncio.gather(
        *(store.apply_update(settled(n)) for n in range(1, count + 1) for store in stores)
    )
    while not settling.done():
        for store in stores:
            await store.fan_out_webhook_events(everything, START, 7)
    await settling
    while await first.fan_out_webhook_events(everything, START, 100):
        pass
    events = await first.list_webhook_events(limit=1000)
    assert len(events) == 2 * count  # invoice.settled and token.bought, once per invoice
    deliveries = await second.list_webhook_deliveries(endpoint="all", limit=1000)
    assert sorted(delivery.event_id for delivery in deliveries) == [e.event_id for e in events]


async def test_an_event_committed_late_is_not_skipped_by_the_fan_out(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    """The race ``EVENTS_LOCK`` closes, made to happen: events written (their ids drawn) in an
    open transaction, then another instance's write, then a fan-out."""
    first, second = stores
    everything = {"all": frozenset(WEBHOOK_EVENT_TYPES)}
    await first.fan_out_webhook_events(everything, START, 0)
    for n in (1, 2):
        await first.add_invoice(invoice(n))
    async with first.transaction() as tx:
        await tx.apply_update(settled(1))
        later = asyncio.ensure_future(second.apply_update(settled(2)))
        await asyncio.sleep(0.2)
        assert not later.done()  # its events wait for the open transaction's to commit
        assert await second.fan_out_webhook_events(everything, START, 100) == 0
    await later
    assert await second.fan_out_webhook_events(everything, START, 100) == 4
    deliveries = await first.list_webhook_deliveries(endpoint="all")
    assert sorted(d.event_id for d in deliveries) == [
        e.event_id for e in await first.list_webhook_events()
    ]


async def test_a_session_idle_in_a_transaction_loses_its_locks(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An instance that stops inside a transaction holding ``EVENTS_LOCK`` (vanished, or
    hung) holds up every instance's settlements only until the server ends its session."""
    monkeypatch.setattr(postgres_store, "IDLE_IN_TRANSACTION_TIMEOUT", 1.0)
    stuck = await PostgresStore.open(url)
    other = await PostgresStore.open(url)
    try:
        for n in (1, 2):
            await stuck.add_invoice(invoice(n))

        async def stop_in_a_transaction() -> None:
            async with stuck.transaction() as tx:
                await tx.apply_update(settled(1))  # its events: EVENTS_LOCK, to the commit
                started = time.monotonic()
                later = asyncio.ensure_future(other.apply_update(settled(2)))
                await asyncio.sleep(0.3)
                assert not later.done()
                await asyncio.wait_for(later, 10)  # the server ended the idle session
                assert time.monotonic() - started < 5

        with pytest.raises(StoreError, match="commit"):
            await stop_in_a_transaction()
        states = [await other.get_invoice(payment_hash(n)) for n in (1, 2)]
        assert [record and record.state for record in states] == [
            InvoiceState.OPEN,
            InvoiceState.SETTLED,
        ]
        assert await stuck.get_cursor() == Cursor()  # the pool replaced the ended connection
    finally:
        await stuck.close()
        await other.close()


async def test_the_sessions_give_up_on_a_vanished_peer(url: str) -> None:
    store = await PostgresStore.open(url)
    names = (*postgres_store.SESSION_SETTINGS, "idle_in_transaction_session_timeout")
    try:
        shown = {name: await store._pool.fetchval(f"SHOW {name}") for name in names}
    finally:
        await store.close()
    assert shown == {
        "tcp_keepalives_idle": "10",
        "tcp_keepalives_interval": "5",
        "tcp_keepalives_count": "3",
        "tcp_user_timeout": "30000",
        "idle_in_transaction_session_timeout": "15s",
    }


async def test_migrations_run_once_when_instances_start_together(url: str) -> None:
    opened = await asyncio.gather(*(PostgresStore.open(url) for _ in range(4)))
    try:
        assert await sql(url, "SELECT version FROM schema_version") == LATEST
        assert await sql(url, "SELECT count(*) FROM cursor") == 1
        await opened[0].save_cursor(Cursor(3, 2))
        assert await opened[3].get_cursor() == Cursor(3, 2)
    finally:
        for store in opened:
            await store.close()


async def test_a_newer_schema_is_refused(url: str) -> None:
    await (await PostgresStore.open(url)).close()
    await sql(url, "UPDATE schema_version SET version = $1", LATEST + 1)
    for read_only in (False, True):
        with pytest.raises(SchemaVersionError, match="newer gateway"):
            await PostgresStore.open(url, read_only=read_only)


async def test_the_pool_connections_are_shared_by_the_stores_calls(url: str) -> None:
    store = await PostgresStore.open(url, min_connections=0, max_connections=2)
    try:
        await asyncio.gather(*(store.add_invoice(invoice(n)) for n in range(30)))
        assert len(await store.list_invoices()) == 30
    finally:
        await store.close()
    with pytest.raises(ValueError, match="connections"):
        await PostgresStore.open(url, min_connections=3, max_connections=2)


async def test_expired_reservations_released_at_once_by_two_instances_never_deadlock(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    """Passes take reservations apart (SKIP LOCKED) but share accounts: they lock them in one
    order."""
    first, _ = stores
    tokens = [hashlib.sha256(b"account %d" % n).digest() for n in range(40)]
    expiries = random.Random(7).sample(range(1000), 1000)  # each pass: accounts in any order
    reservations = [(tokens[n % len(tokens)], 1000, START + e) for n, e in enumerate(expiries)]
    connection = await asyncpg.connect(first._url)
    try:
        await connection.executemany(
            "INSERT INTO accounts VALUES ($1, 'weather', 100000, 0, 25000, 0, $2, NULL)",
            [(token, START) for token in tokens],
        )
        await connection.executemany(
            "INSERT INTO reservations (token_id, amount_msat, expires_at) VALUES ($1, $2, $3)",
            reservations,
        )
    finally:
        await connection.close()

    async def release(store: PostgresStore, limit: int) -> int:
        released = 0
        while batch := await store.release_expired_reservations(START + 1000, limit):
            released += batch
        return released

    counts = await asyncio.gather(
        *(release(store, limit) for limit in (37, 50, 61, 80) for store in stores)
    )
    assert sum(counts) == len(reservations)
    assert await sql(first._url, "SELECT sum(reserved_msat) FROM accounts") == 0


async def test_text_is_listed_in_code_point_order_whatever_the_collation(
    postgres_server: PostgresServer,
) -> None:
    """As SQLite lists it: on a database whose collation puts "_" before "a" before "B"."""
    name = "test_collation_en_us"
    postgres_server.drop_database(name)
    postgres_server.execute(
        f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8' LOCALE 'C.UTF-8' "
        "LOCALE_PROVIDER icu ICU_LOCALE 'en-US'"
    )
    url = postgres_server.url(name)
    names = ["a", "B", "_"]
    ordered = sorted(names)  # by code point: B, _, a
    try:
        unsorted = "SELECT string_agg(x, '' ORDER BY x) FROM unnest($1::text[]) AS x"
        assert await sql(url, unsorted, names) == "_aB"  # the database's own order differs
        store = await PostgresStore.open(url)
        endpoints = dict.fromkeys(names, frozenset(WEBHOOK_EVENT_TYPES))
        try:
            await store.fan_out_webhook_events(endpoints, START, 0)  # registers the endpoints
            for n, service in enumerate(names, 1):
                await store.add_invoice(replace(invoice(n), service=service))
                await store.apply_update(settled(n))
            totals = await store.invoice_totals()
            assert [total.service for total in totals] == ordered
            buckets = await store.revenue(0.0, 3600)
            assert [bucket.service for bucket in buckets] == ordered
            await store.fan_out_webhook_events(endpoints, START, 100)
            newest = await store.list_webhook_deliveries(limit=3)
            assert [delivery.endpoint for delivery in newest] == ordered
        finally:
            await store.close()
    finally:
        postgres_server.drop_database(name)


# --- transactions ----------------------------------------------------------------------------


async def test_store_calls_run_beside_an_open_transaction(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    store, _ = stores
    release = asyncio.Event()
    written = asyncio.Event()

    async def work() -> None:
        async with store.transaction() as tx:
            await tx.add_invoice(invoice(1))
            written.set()
            await release.wait()

    task = asyncio.create_task(work())
    await written.wait()
    assert await store.get_invoice(payment_hash(1)) is None  # not committed yet, no wait
    release.set()
    await task
    assert await store.get_invoice(payment_hash(1)) == invoice(1)


async def test_close_lets_an_open_transaction_and_started_calls_finish(url: str) -> None:
    store = await PostgresStore.open(url)
    written = asyncio.Event()

    async def work() -> None:
        async with store.transaction() as tx:
            await tx.save_cursor(Cursor(3, 3))
            written.set()
            await asyncio.sleep(0.05)
            await tx.save_cursor(Cursor(4, 4))

    task = asyncio.create_task(work())
    await written.wait()
    started = [asyncio.ensure_future(store.add_invoice(invoice(n))) for n in range(5)]
    await asyncio.sleep(0)
    await store.close()
    await task
    await asyncio.gather(*started)
    reopened = await PostgresStore.open(url)
    try:
        assert await reopened.get_cursor() == Cursor(4, 4)
        assert len(await reopened.list_invoices()) == 5
    finally:
        await reopened.close()


async def test_a_cancelled_transaction_leaves_no_connection_inside_one(url: str) -> None:
    store = await PostgresStore.open(url, max_connections=1)  # the next call gets the same one
    inside = asyncio.Event()

    async def work() -> None:
        async with store.transaction() as tx:
            await tx.add_invoice(invoice(1))
            inside.set()
            await asyncio.sleep(3600)

    try:
        task = asyncio.create_task(work())
        await inside.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await store.get_invoice(payment_hash(1)) is None
        await store.add_invoice(invoice(2))  # autocommitted: no transaction left open
        assert await sql(url, "SELECT count(*) FROM invoices") == 1
    finally:
        await store.close()


async def test_a_caller_cancelled_while_reserving_leaves_no_hold(url: str) -> None:
    store = await PostgresStore.open(url)
    await fund(store, 10_000)
    reserving = [
        asyncio.ensure_future(store.reserve(TOKEN, Msat(1000), FAR_FUTURE)) for _ in range(5)
    ]
    await asyncio.sleep(0)
    for task in reserving:
        task.cancel()
    await asyncio.gather(*reserving, return_exceptions=True)
    await store.close()  # waits for the writes and their undoing
    reopened = await PostgresStore.open(url)
    try:
        account = await reopened.get_account(TOKEN)
        assert account is not None
        assert (account.reserved_msat, account.balance_msat) == (0, 10_000)
    finally:
        await reopened.close()


async def test_a_settle_is_written_though_its_caller_is_cancelled(url: str) -> None:
    store = await PostgresStore.open(url)
    await fund(store, 10_000)
    reserved = await store.reserve(TOKEN, Msat(1000), FAR_FUTURE)
    assert reserved.reservation is not None
    settling = asyncio.ensure_future(
        store.settle_reservation(reserved.reservation.reservation_id, Msat(600), "GET", "/")
    )
    await asyncio.sleep(0)
    settling.cancel()
    with pytest.raises(asyncio.CancelledError):
        await settling
    await store.close()
    reopened = await PostgresStore.open(url)
    try:
        account = await reopened.get_account(TOKEN)
        assert account is not None
        assert (account.spent_msat, account.reserved_msat) == (600, 0)
    finally:
        await reopened.close()


def held(n: int, client: str) -> HeldRequest:
    preimage = Preimage(hashlib.sha256(b"preimage %d" % n).digest())
    return HeldRequest(
        payment_hash=PaymentHash(hashlib.sha256(preimage).digest()),
        preimage=preimage,
        token_id=TOKEN,
        client=client,
        grant="{}",
        request=None,
        state=HeldState.WAITING,
        created_at=START,
        expires_at=START + 600,
        updated_at=START,
    )


@pytest.mark.parametrize("client", [None, "client"])
async def test_a_held_request_cap_holds_across_instances(
    stores: tuple[PostgresStore, PostgresStore], client: str | None
) -> None:
    """As a challenge does: count the held requests (all, or the client's) in a transaction,
    add one if under the cap. From both instances at once, the cap of 3 still holds."""
    unfinished = frozenset({HeldState.WAITING, HeldState.RUNNING})

    async def challenge(store: PostgresStore, n: int) -> bool:
        async with store.transaction() as tx:
            if await tx.count_held_requests(unfinished, client) >= 3:
                return False
            await asyncio.sleep(0.01)  # the node's invoice, as it were: others count now
            await tx.add_held_request(held(n, "client"))
            return True

    added = await asyncio.gather(*(challenge(stores[n % 2], n) for n in range(10)))
    assert sum(added) == 3
    assert await stores[0].count_held_requests(unfinished, client) == 3


# --- errors and read-only --------------------------------------------------------------------


def with_password(url: str, password: str) -> str:
    parts = urllib.parse.urlsplit(url)
    user, _, host = parts.netloc.rpartition("@")
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))


async def test_the_password_is_never_shown(url: str) -> None:
    secret = with_password(url, "hunter2")  # trust auth: the server ignores it
    store = await PostgresStore.open(secret)
    try:
        assert "hunter2" not in repr(store)
        assert "hunter2" not in store.url_for_display
        assert store.url_for_display.startswith("postgresql://")
    finally:
        await store.close()
    reader = await PostgresStore.open(f"{secret}?password=hunter2&sslmode=disable", read_only=True)
    try:
        assert reader.url_for_display == "postgresql://..."  # a password parameter
        with pytest.raises(StoreError) as refused:
            await reader.add_invoice(invoice(1))
        assert "add_invoice" in str(refused.value)
        assert "hunter2" not in str(refused.value)
    finally:
        await reader.close()
    missing = urllib.parse.urlsplit(secret)._replace(path="/no_such_database").geturl()
    with pytest.raises(StoreError) as failed:
        await PostgresStore.open(missing)
    assert "no_such_database" in str(failed.value)
    assert "hunter2" not in str(failed.value)
    assert failed.value.__suppress_context__  # nor in the asyncpg error behind it


@pytest.mark.parametrize(
    "spoiled",
    [
        lambda url: with_password(url, "hunter2/x"),  # misread: refused before the driver
        # The driver's message quotes the value ("expected to be one of ..., got ...").
        lambda url: with_password(url, "hunter2") + "?target_session_attrs=bogus",
    ],
)
async def test_a_url_the_driver_cannot_read_is_refused_without_its_secrets(
    url: str, spoiled: Callable[[str], str]
) -> None:
    """The driver's own message may quote the URL: neither it nor the error behind it is
    kept."""
    for min_connections in (1, 0):  # with none, the driver reads the URL at the first acquire
        with pytest.raises(StoreError, match="percent-encode") as refused:
            await PostgresStore.open(spoiled(url), min_connections=min_connections)
        assert "hunter2" not in str(refused.value)
        assert "expected" not in str(refused.value)
        assert refused.value.__cause__ is None
        assert refused.value.__context__ is None


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://gateway:pw@db:5432/l402", "postgresql://db:5432/l402"),
        ("postgres://gateway@db/l402?sslmode=require", "postgres://db/l402?sslmode=require"),
        ("postgresql:///l402?host=/run/postgresql", "postgresql:///l402?host=/run/postgresql"),
        ("postgres://gateway@db/l402?password=pw&sslmode=require", "postgresql://..."),
        ("postgres://gateway@db/l402?password=ab&cd", "postgresql://..."),
        ("postgresql://gateway:pw/x@db/l402", "postgresql://..."),
        ("postgresql://gateway:p@w@db/l402", "postgresql://..."),
        ("postgresql://gateway:p?w@db/l402", "postgresql://..."),
        ("postgresql://gateway:p#w@db/l402", "postgresql://..."),
        ("postgresql://gateway:p[w@db/l402", "postgresql://..."),
    ],
)
def test_a_displayed_url_has_no_user_part(url: str, shown: str) -> None:
    assert postgres_store.display_url(url) == shown


async def test_read_only_reads_and_refuses_writes(url: str) -> None:
    with pytest.raises(ConfigError, match="not a gateway database"):
        await PostgresStore.open(url, read_only=True)
    writer = await PostgresStore.open(url)
    await writer.add_invoice(invoice(1))
    await writer.close()
    reader = await PostgresStore.open(url, read_only=True)
    try:
        assert await reader.get_invoice(payment_hash(1)) == invoice(1)
        with pytest.raises(StoreError, match="read-only"):
            await reader.save_cursor(Cursor(1, 1))
        with pytest.raises(StoreError, match="read-only"):
            async with reader.transaction() as tx:
                await tx.add_invoice(invoice(2))
        with pytest.raises(StoreError, match="read-only"):
            await reader.take_rate_token("client", 1.0, 5.0, START)
    finally:
        await reader.close()
    await sql(url, "UPDATE schema_version SET version = 0")
    with pytest.raises(StoreError, match="older than this gateway"):
        await PostgresStore.open(url, read_only=True)


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
async def test_open_store_opens_postgres_urls(url: str, scheme: str) -> None:
    store = await open_store(scheme + url.removeprefix("postgresql"))
    try:
        assert isinstance(store, PostgresStore)
        assert await store.get_cursor() == Cursor()
    finally:
        await store.close()


# --- global rate limit buckets ---------------------------------------------------------------


async def test_a_rate_bucket_holds_one_budget_across_instances(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    first, second = stores
    rate, burst = 0.5, 5.0
    answers = await asyncio.gather(
        *(store.take_rate_token("client", rate, burst, START) for store in (first, second) * 10)
    )
    granted = [tokens for wait, tokens in answers if wait == 0.0]
    assert sorted(granted) == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert {(wait, tokens) for wait, tokens in answers if wait} == {(2.0, 0.0)}
    # Refilled at 0.5 a second: a token after 2 s, never more than the burst.
    assert await second.take_rate_token("client", rate, burst, START + 1) == (1.0, 0.5)
    assert await first.take_rate_token("client", rate, burst, START + 2) == (0.0, 0.0)
    assert await first.take_rate_token("client", rate, burst, START + 1000) == (0.0, 4.0)
    assert await first.take_rate_token("other", rate, burst, START) == (0.0, 4.0)  # its own
    # A clock behind the last writer's adds nothing and takes nothing back.
    assert await second.take_rate_token("client", rate, burst, START + 999) == (0.0, 3.0)
    with pytest.raises(ValueError, match="rate > 0"):
        await first.take_rate_token("client", 0.0, burst, START)

    assert await first.prune_rate_buckets(START + 500, 10) == 1  # "other" was idle
    assert await first.prune_rate_buckets(START + 2000, 10) == 1
    assert await first.take_rate_token("client", rate, burst, START + 2000) == (0.0, 4.0)


async def test_the_documented_least_privilege_role_migrates_and_runs_the_store(
    postgres_server: PostgresServer,
) -> None:
    """``ROLE_GRANTS`` (the README's role) as written: a role that is no superuser and owns
    one schema migrates it and uses the store; its tables land in that schema."""
    before, _, after = ROLE_GRANTS.partition("\\connect l402\n")
    # One statement per psql call: CREATE DATABASE refuses to run inside a transaction.
    for statement in filter(None, (part.strip() for part in before.split(";"))):
        postgres_server.execute(statement)
    try:
        for statement in filter(None, (part.strip() for part in after.split(";"))):
            postgres_server.execute(statement, "l402")
        role_url = f"postgresql://l402_gateway@127.0.0.1:{postgres_server.port}/l402"
        store = await PostgresStore.open(role_url)
        try:
            await store.add_invoice(invoice(1))
            assert (await store.get_invoice(payment_hash(1))) == invoice(1)
        finally:
            await store.close()
        assert (
            postgres_server.execute(
                "SELECT schemaname, tableowner FROM pg_tables WHERE tablename = 'invoices'", "l402"
            )
            == "l402|l402_gateway"
        )
        assert (
            postgres_server.execute(
                "SELECT rolsuper OR rolcreatedb OR rolcreaterole FROM pg_roles "
                "WHERE rolname = 'l402_gateway'"
            )
            == "f"
        )
    finally:
        postgres_server.drop_database("l402")
        postgres_server.execute("DROP ROLE IF EXISTS l402_gateway")
