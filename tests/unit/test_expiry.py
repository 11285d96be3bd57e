"""The invoice sweeper: overdue invoices recorded as the node reports them (or EXPIRED), unpaid
ones pruned with their root keys after the retention, its supervision, and its wiring into
``running_gateway``; over the fake node and both stores."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from gateway import errors, l402, runtime
from gateway.config import (
    Config,
    CreditConfig,
    LndConfig,
    RouteConfig,
    StoreConfig,
    WebhookEndpointConfig,
    WebhooksConfig,
)
from gateway.expiry import EXPIRY_GRACE, InvoiceSweeper, SweepResult
from gateway.ports import (
    Cursor,
    InvoiceRecord,
    InvoiceState,
    InvoiceUpdate,
    Msat,
    PaymentHash,
    Store,
)
from gateway.pricing import Pricing, Rule
from gateway.service import Allow, L402Service, PaymentChallenge, RequestInfo
from gateway.store import MemoryStore, SqliteStore
from gateway.supervisor import Supervisor, TaskState
from gateway.watcher import InvoiceWatcher
from tests.fakes import FakeClock, FakeInvoiceBackend, fake_lnd_client

EXPIRY = 600
RETENTION = 3600
PATH = "/api/premium/x"
# Tokens outlive the retention: a paid one must still work once unpaid ones are pruned.
RULES = (
    Rule("/api/premium/*", price_msat=Msat(10_000), service="premium", lifetime=RETENTION * 10),
)


@pytest_asyncio.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    opened: Store = (
        MemoryStore() if request.param == "memory" else await SqliteStore.open(tmp_path / "g.db")
    )
    try:
        yield opened
    finally:
        await opened.close()


class Env:
    def __init__(self, store: Store, clock: FakeClock | None = None, **options: Any) -> None:
        self.clock = clock or FakeClock()
        self.backend = FakeInvoiceBackend(self.clock)
        self.store = store
        self.service = L402Service(
            pricing=Pricing(RULES),
            backend=self.backend,
            store=store,
            clock=self.clock,
            invoice_expiry=EXPIRY,
        )
        options.setdefault("retention", RETENTION)
        self.sweeper = InvoiceSweeper(self.backend, store, self.clock, **options)

    async def challenge(self) -> PaymentChallenge:
        decision = await self.service.authorize(RequestInfo("GET", PATH, "10.0.0.1"))
        assert isinstance(decision, PaymentChallenge)
        return decision

    async def state(self, challenge: PaymentChallenge) -> InvoiceState | None:
        record = await self.store.get_invoice(hash_of(challenge))
        return None if record is None else record.state

    async def root_key(self, challenge: PaymentChallenge) -> bytes | None:
        macaroon = l402.decode_b64(challenge.macaroon)
        return await self.store.get_root_key(hashlib.sha256(macaroon.identifier).digest())

    def overdue(self) -> None:
        self.clock.advance(EXPIRY + EXPIRY_GRACE + 1)


def hash_of(challenge: PaymentChallenge) -> PaymentHash:
    return PaymentHash(bytes.fromhex(challenge.payment_hash))


async def test_an_invoice_the_node_canceled_is_recorded_canceled(store: Store) -> None:
    env = Env(store)
    challenge = await env.challenge()
    env.backend.cancel(hash_of(challenge))  # what LND does at the expiry
    env.overdue()

    assert await env.sweeper.sweep() == SweepResult(looked_up=1, updated=1)
    assert await env.state(challenge) is InvoiceState.CANCELED


async def test_still_open_at_the_node_past_the_expiry_is_recorded_expired(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    env = Env(store)
    challenge = await env.challenge()
    env.overdue()
    with caplog.at_level(logging.INFO, logger="gateway.expiry"):
        result = await env.sweeper.sweep()
    assert result == SweepResult(looked_up=1, expired=1)
    assert await env.state(challenge) is InvoiceState.EXPIRED
    assert "still reports invoice" in caplog.text
    # done: it is not asked about again
    assert await env.sweeper.sweep() == SweepResult()
    assert env.backend.lookups == 1


async def test_unknown_to_the_node_is_recorded_expired(store: Store) -> None:
    env = Env(store)
    challenge = await env.challenge()
    del env.backend.invoices[hash_of(challenge)]  # LND can delete canceled invoices
    env.overdue()
    assert (await env.sweeper.sweep()).expired == 1
    assert await env.state(challenge) is InvoiceState.EXPIRED


async def test_nothing_is_asked_before_the_expiry_and_grace(store: Store) -> None:
    env = Env(store)
    challenge = await env.challenge()
    env.clock.advance(EXPIRY + EXPIRY_GRACE - 1)
    assert await env.sweeper.sweep() == SweepResult()
    assert env.backend.lookups == 0
    assert await env.state(challenge) is InvoiceState.OPEN


async def test_a_settlement_the_store_missed_is_recorded_and_kept(store: Store) -> None:
    env = Env(store)
    challenge = await env.challenge()
    preimage = env.backend.pay(hash_of(challenge))  # no watcher: the store has not seen it
    env.overdue()
    assert (await env.sweeper.sweep()).updated == 1
    assert await env.state(challenge) is InvoiceState.SETTLED

    env.clock.advance(RETENTION + 1)
    assert (await env.sweeper.sweep()).pruned == 0
    assert await env.root_key(challenge) is not None
    authorization = f"L402 {challenge.macaroon}:{preimage.hex()}"
    decision = await env.service.authorize(RequestInfo("GET", PATH, "10.0.0.1", (authorization,)))
    assert isinstance(decision, Allow)


async def test_lookups_per_pass_are_bounded(store: Store) -> None:
    env = Env(store, max_lookups=3)
    challenges = [await env.challenge() for _ in range(5)]
    env.overdue()

    first = await env.sweeper.sweep()
    assert (first.looked_up, first.expired, first.busy) == (3, 3, True)
    assert env.backend.lookups == 3
    # the earliest expiries went first
    assert [await env.state(c) for c in challenges[:3]] == [InvoiceState.EXPIRED] * 3

    second = await env.sweeper.sweep()
    assert (second.looked_up, second.busy) == (2, False)
    assert [await env.state(c) for c in challenges] == [InvoiceState.EXPIRED] * 5


async def test_the_node_down_fails_the_pass_and_changes_nothing(store: Store) -> None:
    env = Env(store)
    challenge = await env.challenge()
    env.overdue()
    env.backend.unavailable = True
    with pytest.raises(errors.BackendUnavailable):
        await env.sweeper.sweep()
    assert await env.state(challenge) is InvoiceState.OPEN


async def test_unpaid_invoices_and_root_keys_are_pruned_after_the_retention(store: Store) -> None:
    env = Env(store)
    canceled, expired, paid = [await env.challenge() for _ in range(3)]
    env.backend.cancel(hash_of(canceled))
    preimage = env.backend.pay(hash_of(paid))
    env.overdue()
    await env.sweeper.sweep()
    assert [await env.state(c) for c in (canceled, expired, paid)] == [
        InvoiceState.CANCELED,
        InvoiceState.EXPIRED,
        InvoiceState.SETTLED,
    ]

    env.clock.advance(RETENTION - EXPIRY_GRACE - 2)  # not yet: retention counts from expiry
    assert (await env.sweeper.sweep()).pruned == 0
    assert await env.root_key(canceled) is not None

    env.clock.advance(2)
    assert (await env.sweeper.sweep()).pruned == 2
    for gone in (canceled, expired):
        assert await env.state(gone) is None
        assert await env.root_key(gone) is None
    assert await env.state(paid) is InvoiceState.SETTLED
    assert await env.root_key(paid) is not None
    authorization = f"L402 {paid.macaroon}:{preimage.hex()}"
    decision = await env.service.authorize(RequestInfo("GET", PATH, "10.0.0.1", (authorization,)))
    assert isinstance(decision, Allow)
    assert (await env.sweeper.sweep()).pruned == 0  # idempotent


async def test_zero_retention_keeps_them_forever(store: Store) -> None:
    env = Env(store, retention=0)
    challenge = await env.challenge()
    env.overdue()
    await env.sweeper.sweep()
    env.clock.advance(10 * 365 * 86400)
    assert (await env.sweeper.sweep()).pruned == 0
    assert await env.state(challenge) is InvoiceState.EXPIRED


async def test_pruning_per_pass_is_bounded(store: Store) -> None:
    env = Env(store, batch=2, max_batches=2)
    challenges = [await env.challenge() for _ in range(5)]
    env.overdue()
    await env.sweeper.sweep()
    env.clock.advance(RETENTION)

    first = await env.sweeper.sweep()
    assert (first.pruned, first.busy) == (4, True)
    second = await env.sweeper.sweep()
    assert (second.pruned, second.busy) == (1, False)
    assert [await env.state(c) for c in challenges] == [None] * 5


# --- credit charges (usage history) ----------------------------------------------------------

USAGE_RETENTION = 30 * 86400
TOKEN = hashlib.sha256(b"credit token").digest()


@pytest_asyncio.fixture(params=["memory", "sqlite"])
async def clocked(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[Store, FakeClock]]:
    """A store whose charges are timed by the clock the sweeper reads."""
    clock = FakeClock()
    opened: Store = (
        MemoryStore(clock)
        if request.param == "memory"
        else await SqliteStore.open(tmp_path / "g.db", clock=clock)
    )
    try:
        yield opened, clock
    finally:
        await opened.close()


async def fund_and_charge(store: Store, clock: FakeClock, charges: int) -> None:
    """An account bought for 10000 msat, then ``charges`` requests of 100 msat a second apart."""
    await store.open_account(TOKEN, "premium")
    bought = PaymentHash(hashlib.sha256(b"credit purchase").digest())
    await store.add_invoice(
        InvoiceRecord(
            payment_hash=bought,
            payment_request="lnbcrt1",
            amount_msat=Msat(10_000),
            token_id=TOKEN,
            service="premium",
            method="GET",
            path=PATH,
            state=InvoiceState.OPEN,
            created_at=clock.now(),
            expires_at=clock.now() + EXPIRY,
            add_index=1,
            buys_credit=True,
        )
    )
    await store.apply_update(InvoiceUpdate(bought, InvoiceState.SETTLED, 1, Msat(10_000), None))
    for _ in range(charges):
        reserved = await store.reserve(TOKEN, Msat(100), clock.now() + 3600)
        assert reserved.reservation is not None
        await store.settle_reservation(reserved.reservation.reservation_id, Msat(100), "GET", PATH)
        clock.advance(1)


async def test_credit_charges_are_pruned_after_the_usage_retention_in_batches(
    clocked: tuple[Store, FakeClock], caplog: pytest.LogCaptureFixture
) -> None:
    store, clock = clocked
    sweeper = InvoiceSweeper(
        FakeInvoiceBackend(clock),
        store,
        clock,
        retention=RETENTION,
        usage_retention=USAGE_RETENTION,
        batch=2,
        max_batches=2,
    )
    start = clock.now()
    await fund_and_charge(store, clock, 5)  # at start .. start + 4
    account = await store.get_account(TOKEN)
    assert account is not None
    assert account.balance_msat == 9_500

    clock.current = start + USAGE_RETENTION  # the first one is exactly that old: kept
    assert await sweeper.sweep() == SweepResult()

    clock.current = start + USAGE_RETENTION + 4  # the first four are older
    with caplog.at_level(logging.INFO, logger="gateway.expiry"):
        first = await sweeper.sweep()
    assert (first.charges_pruned, first.busy) == (4, True)  # two full batches: more may wait
    assert "4 credit charges pruned" in caplog.text
    assert await sweeper.sweep() == SweepResult()
    assert [charge.at for charge in await store.list_charges(TOKEN, 10)] == [start + 4]
    assert await store.get_account(TOKEN) == account  # history only: the balance stays


async def test_zero_usage_retention_keeps_charges_forever(
    clocked: tuple[Store, FakeClock],
) -> None:
    store, clock = clocked
    sweeper = InvoiceSweeper(
        FakeInvoiceBackend(clock), store, clock, retention=RETENTION, usage_retention=0
    )
    await fund_and_charge(store, clock, 2)
    clock.advance(10 * 365 * 86400)
    assert (await sweeper.sweep()).charges_pruned == 0
    assert len(await store.list_charges(TOKEN, 10)) == 2


@pytest.mark.parametrize(
    "options",
    [
        {"interval": 0},
        {"busy_pause": -1},
        {"retention": -1},
        {"usage_retention": -1},
        {"webhook_retention": -1},
        {"grace": -1},
        {"rate_bucket_idle": -1},
        {"max_lookups": 0},
        {"batch": 0},
        {"max_batches": 0},
    ],
)
def test_bad_settings_are_refused(options: dict[str, Any]) -> None:
    options.setdefault("retention", 1)
    with pytest.raises(ValueError, match="must be"):
        InvoiceSweeper(FakeInvoiceBackend(), MemoryStore(), FakeClock(), **options)


# --- shared rate buckets ---------------------------------------------------------------------


class IdleBuckets:
    """``RateBuckets`` holding ``idle`` buckets, each untouched since 0."""

    def __init__(self, idle: int) -> None:
        self.idle = idle
        self.asked: list[tuple[float, int]] = []

    async def take_rate_token(
        self, bucket: str, rate: float, burst: float, now: float
    ) -> tuple[float, float]:
        raise NotImplementedError

    async def prune_rate_buckets(self, idle_before: float, limit: int) -> int:
        self.asked.append((idle_before, limit))
        pruned = min(limit, self.idle) if idle_before > 0 else 0
        self.idle -= pruned
        return pruned


async def test_rate_buckets_idle_past_the_refill_are_pruned_in_batches() -> None:
    clock = FakeClock()
    buckets = IdleBuckets(5)
    env = Env(MemoryStore(), clock, rate_buckets=buckets, rate_bucket_idle=10.0, batch=2)
    result = await env.sweeper.sweep()
    assert (result.rate_buckets_pruned, result.busy) == (5, False)
    assert buckets.asked == [(clock.now() - 10.0, 2)] * 3


# --- webhook events --------------------------------------------------------------------------

WEBHOOK_RETENTION = 7200


async def test_webhook_events_are_pruned_in_batches_with_no_endpoint_configured(
    clocked: tuple[Store, FakeClock], caplog: pytest.LogCaptureFixture
) -> None:
    """Every expired invoice writes an event, webhooks configured or not: the sweeper
    deletes them after the retention, so they do not pile up for ever."""
    store, clock = clocked
    env = Env(store, clock, webhook_retention=WEBHOOK_RETENTION, batch=2, max_batches=2)
    for n in range(5):  # from five clients: five invoices
        await env.service.authorize(RequestInfo("GET", PATH, f"10.0.0.{n}"))
    env.overdue()
    assert (await env.sweeper.sweep()).expired == 5
    written = await store.list_webhook_events(0, 100)
    assert [event.type for event in written] == ["invoice.expired"] * 5
    env.clock.advance(WEBHOOK_RETENTION)  # exactly that old: kept
    assert (await env.sweeper.sweep()).events_pruned == 0
    env.clock.advance(1)
    with caplog.at_level(logging.INFO, logger="gateway.expiry"):
        first = await env.sweeper.sweep()
    assert (first.events_pruned, first.busy) == (4, True)  # two full batches: more may wait
    assert "4 webhook events pruned" in caplog.text
    assert (await env.sweeper.sweep()).events_pruned == 1
    assert await store.list_webhook_events(0, 100) == []


async def test_an_endpoint_no_longer_configured_holds_no_event_back(
    clocked: tuple[Store, FakeClock],
) -> None:
    """Its cursor, left in the store (no sender runs to forget it), stayed before the
    events; the sweeper knows the configured endpoints and prunes them all the same."""
    store, clock = clocked
    await store.fan_out_webhook_events({"gone": frozenset({"invoice.expired"})}, 0.0, 10)
    kept = Env(store, clock, webhook_retention=WEBHOOK_RETENTION, webhook_endpoints={"gone"})
    await kept.challenge()
    kept.overdue()
    await kept.sweeper.sweep()
    clock.advance(WEBHOOK_RETENTION + 1)
    assert (await kept.sweeper.sweep()).events_pruned == 0  # were it configured: it waits
    removed = Env(store, clock, webhook_retention=WEBHOOK_RETENTION, webhook_endpoints=())
    assert (await removed.sweeper.sweep()).events_pruned == 1
    assert await store.list_webhook_events(0, 100) == []


async def test_zero_webhook_retention_keeps_events(clocked: tuple[Store, FakeClock]) -> None:
    store, clock = clocked
    env = Env(store, clock, webhook_retention=0)
    await env.challenge()
    env.overdue()
    await env.sweeper.sweep()
    env.clock.advance(10 * 365 * 86400)
    assert (await env.sweeper.sweep()).events_pruned == 0
    assert len(await store.list_webhook_events(0, 100)) == 1


# --- supervision -----------------------------------------------------------------------------


class Flaky(InvoiceSweeper):
    """Fails its first passes with the given errors, then counts the good ones."""

    def __init__(self, failures: list[Exception], **options: Any) -> None:
        super().__init__(FakeInvoiceBackend(), MemoryStore(), FakeClock(), **options)
        self.failures = failures
        self.passes = 0
        self.done = asyncio.Event()

    async def sweep(self) -> SweepResult:
        self.passes += 1
        if self.failures:
            raise self.failures.pop(0)
        self.done.set()
        return SweepResult()


async def test_a_crashed_pass_is_logged_with_its_traceback_and_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sweeper = Flaky(
        [RuntimeError("bug"), errors.BackendUnavailable("node down")],
        retention=1,
        interval=60,
    )
    async with Supervisor(initial_backoff=0.01) as supervisor:
        supervisor.start("l402-invoice-sweeper", sweeper.run)
        await asyncio.wait_for(sweeper.done.wait(), 5)
    assert sweeper.passes == 3
    (health,) = supervisor.health()
    assert (health.state, health.restarts) == (TaskState.STOPPED, 2)
    crashed = [r for r in caplog.records if "crashed" in r.getMessage()]
    assert len(crashed) == 1
    assert crashed[0].levelno == logging.ERROR
    assert crashed[0].exc_info is not None
    failed = [r for r in caplog.records if "failed: node down" in r.getMessage()]
    assert len(failed) == 1
    assert failed[0].levelno == logging.WARNING
    assert failed[0].exc_info is None


async def test_a_busy_pass_is_followed_sooner(monkeypatch: pytest.MonkeyPatch) -> None:
    sweeper = Flaky([], retention=1, interval=3600, busy_pause=0.01)
    results = [SweepResult(busy=True), SweepResult(busy=True), SweepResult()]
    seen: list[SweepResult] = []

    async def sweep() -> SweepResult:
        seen.append(results[len(seen)])
        if len(seen) == len(results):
            sweeper.done.set()
        return seen[-1]

    monkeypatch.setattr(sweeper, "sweep", sweep)
    task = asyncio.create_task(sweeper.run())
    try:
        await asyncio.wait_for(sweeper.done.wait(), 5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert len(seen) == 3


# --- wiring ----------------------------------------------------------------------------------


@pytest.mark.parametrize("watch", [True, False])
async def test_running_runtime_supervises_the_sweeper_where_the_watcher_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, watch: bool
) -> None:
    (tmp_path / "tls.cert").write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    clock = FakeClock()
    backend = FakeInvoiceBackend(clock)
    monkeypatch.setattr(runtime, "LndClient", fake_lnd_client(backend))
    database = tmp_path / "g.db"
    config = Config(
        lnd=LndConfig(tls_cert=tmp_path / "tls.cert", macaroon_hex="00"),
        store=StoreConfig(url=f"sqlite:{database}", unpaid_retention=60, sweep_interval=0.01),
        routes=(RouteConfig(pattern="/api/premium/*", price_msat=10_000),),
    )
    async with runtime.running_runtime(config, clock=clock, watch=watch) as running:
        with running.events.subscribe("test") as events:
            challenge = await running.service.authorize(RequestInfo("GET", PATH, "10.0.0.1"))
            assert isinstance(challenge, PaymentChallenge)
            backend.cancel(hash_of(challenge))
            clock.advance(config.l402.invoice_expiry + 60 + EXPIRY_GRACE + 1)
            if watch:  # the sweeper publishes what it recorded
                recorded = await asyncio.wait_for(anext(events), 5)
                assert (recorded.payment_hash, recorded.state) == (
                    hash_of(challenge),
                    InvoiceState.CANCELED,
                )
            health = {task.name: task.state for task in running.health()}
        store = await SqliteStore.open(database)  # a second connection, as another process
        try:
            for _ in range(500 if watch else 10):  # passes are 10 ms apart
                pruned = await store.get_invoice(hash_of(challenge)) is None
                if pruned:
                    break
                await asyncio.sleep(0.01)
        finally:
            await store.close()
    assert pruned is watch
    assert health == (
        {
            "l402-leader": TaskState.RUNNING,
            "l402-invoice-watcher": TaskState.RUNNING,
            "l402-invoice-sweeper": TaskState.RUNNING,
            "l402-liquidity": TaskState.RUNNING,
        }
        if watch
        else {}
    )
    assert "l402-invoice-sweeper" not in {task.get_name() for task in asyncio.all_tasks()}


async def test_running_runtime_gives_the_sweeper_the_credit_usage_retention(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "tls.cert").write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    clock = FakeClock()
    monkeypatch.setattr(runtime, "LndClient", fake_lnd_client(FakeInvoiceBackend(clock)))
    built: list[dict[str, Any]] = []

    class Recorded(InvoiceSweeper):
        def __init__(self, *args: Any, **options: Any) -> None:
            built.append(options)
            super().__init__(*args, **options)

    monkeypatch.setattr(runtime, "InvoiceSweeper", Recorded)
    config = Config(
        lnd=LndConfig(tls_cert=tmp_path / "tls.cert", macaroon_hex="00"),
        store=StoreConfig(url=f"sqlite:{tmp_path / 'g.db'}", unpaid_retention=60),
        credit=CreditConfig(usage_retention=7 * 86400),
        routes=(RouteConfig(pattern="/api/premium/*", price_msat=10_000),),
    )
    async with runtime.running_runtime(config, clock=clock, watch=True):
        pass
    (options,) = built
    assert (options["retention"], options["usage_retention"]) == (60, 7 * 86400)
    # No [[webhook]]: the sweeper prunes the events all the same, by [webhooks] retention.
    assert options["webhook_retention"] == WebhooksConfig().retention > 0
    assert list(options["webhook_endpoints"]) == []
    # SQLite keeps no shared rate buckets: the limits are per process, nothing to prune.
    assert options["rate_buckets"] is None
    assert options["rate_bucket_idle"] == 10.0  # the challenge limit's 20 at 2 a second


async def test_new_webhook_endpoints_are_registered_before_the_watcher_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watcher reconciles settlements at start-up, writing events: a newly added
    endpoint's cursor must already be there, or it starts after them and misses them."""
    (tmp_path / "tls.cert").write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    clock = FakeClock()
    monkeypatch.setattr(runtime, "LndClient", fake_lnd_client(FakeInvoiceBackend(clock)))
    monkeypatch.setenv("CRM_SECRET", "whsec_" + base64.b64encode(b"k" * 32).decode())
    database = tmp_path / "g.db"
    seen: list[set[str]] = []
    built: list[dict[str, Any]] = []

    class Watcher(InvoiceWatcher):
        async def run(self) -> None:
            # What is committed by now (closing: a with-block alone only commits).
            with contextlib.closing(sqlite3.connect(database)) as connection:
                rows = connection.execute("SELECT name FROM webhook_endpoints").fetchall()
            seen.append({str(name) for (name,) in rows})
            await super().run()

    class Recorded(InvoiceSweeper):
        def __init__(self, *args: Any, **options: Any) -> None:
            built.append(options)
            super().__init__(*args, **options)

    monkeypatch.setattr(runtime, "InvoiceWatcher", Watcher)
    monkeypatch.setattr(runtime, "InvoiceSweeper", Recorded)
    crm = WebhookEndpointConfig(
        name="crm", url="http://127.0.0.1:9/hooks", events=("*",), secret_env="CRM_SECRET"
    )
    config = Config(
        lnd=LndConfig(tls_cert=tmp_path / "tls.cert", macaroon_hex="00"),
        store=StoreConfig(url=f"sqlite:{database}"),
        routes=(RouteConfig(pattern="/api/premium/*", price_msat=10_000),),
        webhooks=WebhooksConfig(retention=3600),
        webhook=(crm,),
    )
    async with runtime.running_runtime(config, clock=clock, watch=True):
        for _ in range(500):
            if seen:
                break
            await asyncio.sleep(0.01)
    assert seen == [{"crm"}]
    (options,) = built
    assert (options["webhook_retention"], list(options["webhook_endpoints"])) == (3600, ["crm"])


# --- a late settlement -----------------------------------------------------------------------


async def test_an_expired_invoice_settled_while_nobody_watched_is_replayed(store: Store) -> None:
    env = Env(store)
    await env.backend.add_invoice(Msat(1), "not the gateway's", 600)  # index 0 replays nothing
    challenge = await env.challenge()
    env.overdue()
    await env.sweeper.sweep()  # the node still said OPEN
    assert await env.state(challenge) is InvoiceState.EXPIRED
    record = await store.get_invoice(hash_of(challenge))
    assert record is not None
    # Its add event was seen, no settlement ever was (LND replays none after index 0), and
    # it is paid while no watcher runs.
    await store.save_cursor(Cursor(record.add_index, 0))
    env.backend.pay(hash_of(challenge))

    watcher = InvoiceWatcher(env.backend, store)
    task = asyncio.create_task(watcher.run())
    try:
        for _ in range(200):
            if await env.state(challenge) is InvoiceState.SETTLED:
                break
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert await env.state(challenge) is InvoiceState.SETTLED
