"""Metrics: what the core reports to its meter, the Prometheus text, and multiprocess mode
(two real processes writing, one scrape seeing both)."""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import os
import re
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from gateway.config import Config, MetricsConfig, load_config
from gateway.errors import ConfigError, StoreError
from gateway.metrics import MULTIPROC_ENV, STORE_CACHE_SECONDS, PrometheusMeter
from gateway.ports import InvoiceState, InvoiceTotal, InvoiceUpdate, Liquidity, Msat, NoMeter
from gateway.pricing import Pricing, Rule
from gateway.service import L402Service, PaymentChallenge, RateLimiter, RequestInfo
from gateway.service.core import refusal_label
from gateway.store.memory import MemoryStore
from tests.fakes import FakeClock, FakeInvoiceBackend

PRICED = Rule("/api/*", price_msat=Msat(2_000), service="weather")


@dataclasses.dataclass
class RecordingMeter(NoMeter):
    calls: list[tuple[object, ...]] = dataclasses.field(default_factory=list)

    def challenge_issued(self, service: str) -> None:
        self.calls.append(("challenge", service))

    def paid_request(self, service: str) -> None:
        self.calls.append(("paid", service))

    def refused(self, status: int, reason: str) -> None:
        self.calls.append(("refused", status, reason))

    def rate_limited(self, limit: str) -> None:
        self.calls.append(("rate_limited", limit))


def _service(meter: object, **options: object) -> tuple[L402Service, FakeInvoiceBackend]:
    clock = FakeClock()
    backend = FakeInvoiceBackend(clock)
    service = L402Service(
        pricing=Pricing([PRICED]),
        backend=backend,
        store=MemoryStore(),
        clock=clock,
        meter=meter,  # type: ignore[arg-type]
        **options,  # type: ignore[arg-type]
    )
    return service, backend


async def _pay(service: L402Service, backend: FakeInvoiceBackend) -> tuple[str, ...]:
    challenge = await service.authorize(RequestInfo("GET", "/api/now", "10.0.0.1"))
    assert isinstance(challenge, PaymentChallenge)
    preimage = backend.pay(bytes.fromhex(challenge.payment_hash))
    return (f"L402 {challenge.macaroon}:{preimage.hex()}",)


async def test_the_service_reports_challenges_paid_requests_and_refusals() -> None:
    meter = RecordingMeter()
    service, backend = _service(meter)
    authorization = await _pay(service, backend)
    request = RequestInfo("GET", "/api/now", "10.0.0.1", authorization=authorization)
    assert not isinstance(await service.authorize(request), PaymentChallenge)
    # The adapters' hot path for the same credential and request line counts too.
    assert service.allowed_again(authorization, "GET", "/api/now") is not None
    forged = RequestInfo("GET", "/api/now", "10.0.0.1", authorization=("L402 bm9:00",))
    await service.authorize(forged)
    assert meter.calls[:3] == [
        ("challenge", "weather"),
        ("paid", "weather"),
        ("paid", "weather"),
    ]
    assert meter.calls[3][0] == "refused"
    assert meter.calls[3][1] in (400, 401)


async def test_a_rate_limited_challenge_is_a_refusal_and_a_rate_limit_hit() -> None:
    meter = RecordingMeter()
    limiter = RateLimiter(1.0, 1, 100, FakeClock())
    service, _backend = _service(meter, rate_limiter=limiter)
    for _ in range(2):
        await service.authorize(RequestInfo("GET", "/api/now", "10.0.0.1"))
    assert ("refused", 429, "too_many_challenges") in meter.calls
    assert ("rate_limited", "challenges") in meter.calls


def test_refusal_labels_are_a_fixed_vocabulary() -> None:
    assert refusal_label("token store unavailable") == "store_unavailable"
    # Any other text (a route's own, a token error's) is one label: never the text itself.
    assert refusal_label("/secret/path refused for abc123") == "other"


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of the sample ``name`` with exactly ``labels`` in Prometheus text."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        found_name, _, rest = head.partition("{")
        found = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        if found_name == name and found == labels:
            return float(value)
    raise AssertionError(f"no {name}{labels} in:\n{text}")


async def test_the_exposition_has_every_metric_and_the_stores_figures() -> None:
    clock = FakeClock()
    backend = FakeInvoiceBackend(clock)
    store = MemoryStore()
    meter = PrometheusMeter(store.invoice_totals)
    service = L402Service(
        pricing=Pricing([PRICED]), backend=backend, store=store, clock=clock, meter=meter
    )
    paid = await _pay(service, backend)
    settled = backend.invoices[next(iter(backend.invoices))]
    await store.apply_update(InvoiceUpdate.of(settled))  # as the watcher records it
    await service.authorize(RequestInfo("GET", "/api/now", "10.0.0.2"))  # a second, unpaid
    await service.authorize(RequestInfo("GET", "/api/now", "10.0.0.1", authorization=paid))
    # A repeat the adapters answer from the decision cache counts as a paid request too.
    assert service.allowed_again(paid, "GET", "/api/now") is not None
    meter.lnd_call("AddInvoice", 0.004, None)
    meter.lnd_call("LookupInvoice", 0.002, "InvoiceNotFound")
    meter.watcher_event()
    meter.watcher_reconnect()
    meter.upstream_call(0.02, None)
    meter.upstream_call(1.0, "timeout")
    meter.liquidity(Liquidity(Msat(5_000_000), Msat(3_000_000), 2, known=True))

    body, content_type = await meter.exposition()
    text = body.decode()
    assert content_type.startswith("text/plain")
    assert _sample(text, "l402_challenges_issued_total", service="weather") == 2
    assert _sample(text, "l402_paid_requests_total", service="weather") == 2
    assert _sample(text, "l402_invoices", service="weather", state="SETTLED") == 1
    assert _sample(text, "l402_invoices", service="weather", state="OPEN") == 1
    assert _sample(text, "l402_invoices_issued", service="weather") == 2
    assert _sample(text, "l402_invoices_settled", service="weather") == 1
    assert _sample(text, "l402_received_msat_total", service="weather") == 2_000
    assert _sample(text, "l402_lnd_request_duration_seconds_count", method="AddInvoice") == 1
    assert _sample(text, "l402_lnd_errors_total", method="LookupInvoice", error="InvoiceNotFound")
    assert _sample(text, "l402_watcher_reconnects_total") == 1
    assert 0 <= _sample(text, "l402_watcher_lag_seconds") < 60
    assert _sample(text, "l402_upstream_request_duration_seconds_count") == 1
    assert _sample(text, "l402_upstream_errors_total", error="timeout") == 1
    assert _sample(text, "l402_inbound_liquidity_msat", scope="total") == 5_000_000
    assert _sample(text, "l402_inbound_liquidity_msat", scope="largest_channel") == 3_000_000
    assert _sample(text, "l402_inbound_liquidity_known") == 1
    # Bounded labels: no payment hash, token id or path anywhere.
    invoice_hash = next(iter(backend.invoices)).hex()
    assert invoice_hash not in text
    assert "/api/now" not in text


async def test_every_payment_link_is_counted_under_one_label_and_each_tip_jar_apart() -> None:
    settled, open_ = InvoiceState.SETTLED, InvoiceState.OPEN
    totals = [
        InvoiceTotal("link:a1", open_, 2, Msat(2_000), Msat(0)),
        InvoiceTotal("link:a1", settled, 1, Msat(1_000), Msat(1_000)),
        InvoiceTotal("link:b2", settled, 3, Msat(6_000), Msat(7_000)),
        InvoiceTotal("tip:coffee", settled, 1, Msat(5_000), Msat(5_000)),
        InvoiceTotal("weather", settled, 1, Msat(2_000), Msat(2_000)),
    ]

    async def store_totals() -> list[InvoiceTotal]:
        return totals

    text = (await PrometheusMeter(store_totals).exposition())[0].decode()
    assert _sample(text, "l402_invoices", service="link:", state="OPEN") == 2
    assert _sample(text, "l402_invoices", service="link:", state="SETTLED") == 4
    assert _sample(text, "l402_invoices_issued", service="link:") == 6
    assert _sample(text, "l402_invoices_settled", service="link:") == 4
    assert _sample(text, "l402_received_msat_total", service="link:") == 8_000
    assert _sample(text, "l402_received_msat_total", service="tip:coffee") == 5_000
    assert _sample(text, "l402_received_msat_total", service="weather") == 2_000
    assert "a1" not in text
    assert "b2" not in text


async def test_an_unknown_liquidity_is_reported_as_unknown_not_as_zero_inbound() -> None:
    meter = PrometheusMeter(MemoryStore().invoice_totals)
    meter.liquidity(Liquidity(Msat(0), Msat(0), 0, known=False))
    text = (await meter.exposition())[0].decode()
    assert _sample(text, "l402_inbound_liquidity_known") == 0
    assert "l402_inbound_liquidity_msat{" not in text


def _worker(directory: str, challenges: int, service: str) -> None:
    """A worker process: its own prometheus_client, in multiprocess mode, counting."""
    assert os.environ[MULTIPROC_ENV] == directory

    async def no_totals() -> list[object]:
        return []

    meter = PrometheusMeter(no_totals)  # type: ignore[arg-type]
    for _ in range(challenges):
        meter.challenge_issued(service)
    meter.lnd_call("AddInvoice", 0.01, None)
    if service == "watching":
        meter.watcher_event()
        meter.liquidity(Liquidity(Msat(7_000), Msat(7_000), 1, known=True))


async def test_one_scrape_sees_every_worker_in_multiprocess_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = str(tmp_path)
    # Set before the workers start, as serve does: a spawned worker imports prometheus_client
    # (with the test module) before its target runs, and the mode is chosen at that import.
    monkeypatch.setenv(MULTIPROC_ENV, directory)
    context = multiprocessing.get_context("spawn")  # as serve starts its workers
    workers = [
        context.Process(target=_worker, args=(directory, 3, "watching")),
        context.Process(target=_worker, args=(directory, 4, "other")),
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
        assert worker.exitcode == 0
    assert len(list(tmp_path.glob("*.db"))) >= 2  # each process wrote files of its own

    # A third process scrapes (the values live in the files, not in any one process).
    store = MemoryStore()
    meter = PrometheusMeter(store.invoice_totals)
    text = (await meter.exposition())[0].decode()
    assert _sample(text, "l402_challenges_issued_total", service="watching") == 3
    assert _sample(text, "l402_challenges_issued_total", service="other") == 4
    assert _sample(text, "l402_lnd_request_duration_seconds_count", method="AddInvoice") == 2
    # "livemax" gauges: the workers are dead, so theirs are gone unless still alive; the
    # counters above stay summed. The store's figures come from the scraping process.
    assert "l402_invoices_issued{" not in text


def test_metrics_are_off_unless_a_listener_or_path_is_set(tmp_path: Path) -> None:
    assert not Config().metrics.enabled
    path = tmp_path / "g.toml"
    path.write_text('[metrics]\nlisten = "127.0.0.1:9402"\npath = "/metrics"\n')
    config = load_config(path, environ={})
    assert config.metrics.enabled
    assert (config.metrics.listen, config.metrics.path) == ("127.0.0.1:9402", "/metrics")
    assert load_config(None, environ={"GATEWAY_METRICS_PATH": "/m"}).metrics.path == "/m"


@pytest.mark.parametrize(
    ("key", "value"),
    [("path", "metrics"), ("path", "/m?x=1"), ("listen", "nohost"), ("liquidity_interval", 1)],
)
def test_bad_metrics_settings_are_refused(key: str, value: object) -> None:
    with pytest.raises((ValueError, ConfigError)):
        MetricsConfig(**{key: value})  # type: ignore[arg-type]


def test_state_values_are_the_stores() -> None:
    # The l402_invoices state label is InvoiceState's value: a fixed set.
    assert {state.value for state in InvoiceState} >= {"OPEN", "SETTLED"}
    assert sys.modules["gateway.metrics"] is not None


@dataclasses.dataclass
class WatcherMeter(NoMeter):
    events: int = 0
    reconnects: int = 0

    def watcher_event(self) -> None:
        self.events += 1

    def watcher_reconnect(self) -> None:
        self.reconnects += 1


async def test_the_watcher_reports_what_it_hears_and_its_reconnects() -> None:
    from gateway.watcher import InvoiceWatcher
    from tests.unit.test_watcher import track

    backend = FakeInvoiceBackend()
    store = MemoryStore()
    meter = WatcherMeter()
    backend.fail_subscriptions = 1  # the first subscription fails: one reconnect
    watcher = InvoiceWatcher(backend, store, initial_backoff=0.01, meter=meter)
    task = asyncio.create_task(watcher.run())
    try:
        async with asyncio.timeout(5):
            await watcher.connected.wait()  # reconciled: heard from the node
            assert meter.reconnects == 1
            heard = meter.events
            assert heard >= 1
            new = await track(backend, store)
            backend.pay(new.payment_hash)
            # The add and the settlement, streamed.
            while meter.events < heard + 2:  # noqa: ASYNC110 - polling a counter
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    record = await store.get_invoice(new.payment_hash)
    assert record is not None
    assert record.state is InvoiceState.SETTLED


# --- the cost of a scrape -----------------------------------------------------------------


def _totals(count: int) -> list[InvoiceTotal]:
    return [
        InvoiceTotal(
            "weather", InvoiceState.SETTLED, count, Msat(count * 2_000), Msat(count * 2_000)
        )
    ]


async def test_the_stores_figures_are_cached_and_concurrent_scrapes_share_one_query() -> None:
    """The aggregate query holds the store's one thread (0.39 s at 500,000 invoices): a
    loop of scrapes on the public path must not run it back to back."""
    now = [1_000.0]
    queries = 0
    answer = asyncio.Event()

    async def totals() -> list[InvoiceTotal]:
        nonlocal queries
        queries += 1
        await answer.wait()
        return _totals(queries)

    meter = PrometheusMeter(totals, clock=lambda: now[0])
    scrapes = [asyncio.create_task(meter.exposition()) for _ in range(5)]
    gone = asyncio.create_task(meter.exposition())
    await asyncio.sleep(0.01)
    assert queries == 1  # five scrapes, one query in flight
    gone.cancel()  # a scraper hanging up cancels nobody else's answer
    answer.set()
    for body, _ in await asyncio.gather(*scrapes):
        assert _sample(body.decode(), "l402_invoices_settled", service="weather") == 1
    now[0] += STORE_CACHE_SECONDS - 0.5
    text = (await meter.exposition())[0].decode()
    assert queries == 1  # still fresh: no query
    assert _sample(text, "l402_invoices_settled", service="weather") == 1
    now[0] += 0.5
    text = (await meter.exposition())[0].decode()
    assert queries == 2  # old: asked again
    assert _sample(text, "l402_invoices_settled", service="weather") == 2


async def test_a_failed_store_query_is_not_kept() -> None:
    failing = True

    async def totals() -> list[InvoiceTotal]:
        if failing:
            raise StoreError("database is locked")
        return _totals(3)

    meter = PrometheusMeter(totals)
    text = (await meter.exposition())[0].decode()
    assert "l402_invoices_settled{" not in text  # left out, the rest is there
    assert "l402_watcher_reconnects_total" in text
    failing = False
    text = (await meter.exposition())[0].decode()
    assert _sample(text, "l402_invoices_settled", service="weather") == 3


async def test_the_text_is_rendered_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading every worker's files and rendering them blocks: not on the event loop."""
    on_loop: dict[str, bool] = {}

    def _running_loop() -> bool:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True

    def render(registry: CollectorRegistry) -> bytes:
        on_loop["render"] = _running_loop()
        return generate_latest(registry)

    meter = PrometheusMeter(MemoryStore().invoice_totals)
    collect = meter._registry

    def registry() -> CollectorRegistry:
        on_loop["collect"] = _running_loop()
        return collect()

    monkeypatch.setattr("gateway.metrics.generate_latest", render)
    monkeypatch.setattr(meter, "_registry", registry)
    text = (await meter.exposition())[0].decode()
    assert "l402_watcher_reconnects_total" in text
    assert on_loop == {"render": False, "collect": False}


async def test_liquidity_that_becomes_unknown_leaves_no_stale_sample() -> None:
    meter = PrometheusMeter(MemoryStore().invoice_totals)
    meter.liquidity(Liquidity(Msat(5_000_000), Msat(3_000_000), 2, known=True))
    text = (await meter.exposition())[0].decode()
    assert _sample(text, "l402_inbound_liquidity_msat", scope="total") == 5_000_000
    meter.liquidity(Liquidity(Msat(0), Msat(0), 0, known=False, reason="node down"))
    text = (await meter.exposition())[0].decode()
    assert _sample(text, "l402_inbound_liquidity_known") == 0
    assert "l402_inbound_liquidity_msat{" not in text
    meter.liquidity(Liquidity(Msat(4_000_000), Msat(4_000_000), 1, known=True))
    text = (await meter.exposition())[0].decode()
    assert _sample(text, "l402_inbound_liquidity_msat", scope="total") == 4_000_000


def _liquidity_worker(directory: str) -> None:
    """The watching worker: liquidity measured, then unknown (LND went down)."""
    assert os.environ[MULTIPROC_ENV] == directory

    async def no_totals() -> list[InvoiceTotal]:
        return []

    meter = PrometheusMeter(no_totals)
    meter.liquidity(Liquidity(Msat(7_000), Msat(7_000), 1, known=True))
    meter.liquidity(Liquidity(Msat(0), Msat(0), 0, known=False, reason="node down"))


async def test_unknown_liquidity_shows_no_stale_sample_in_multiprocess_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """prometheus_client cannot remove a labelled sample from a worker's file: the
    exposition leaves them out while the watching worker says liquidity is unknown."""
    directory = str(tmp_path)
    monkeypatch.setenv(MULTIPROC_ENV, directory)
    worker = multiprocessing.get_context("spawn").Process(
        target=_liquidity_worker, args=(directory,)
    )
    worker.start()
    worker.join(30)
    assert worker.exitcode == 0
    meter = PrometheusMeter(MemoryStore().invoice_totals)
    text = (await meter.exposition())[0].decode()
    assert _sample(text, "l402_inbound_liquidity_known") == 0
    assert "l402_inbound_liquidity_msat{" not in text
