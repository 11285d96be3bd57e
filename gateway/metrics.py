"""Prometheus metrics: the ``Meter`` the core reports to, and the ``/metrics`` exposition.

One process: each ``PrometheusMeter`` has a registry of its own, in memory. Several
(``[server] workers > 1``): ``serve`` sets ``PROMETHEUS_MULTIPROC_DIR`` to a private
directory before it starts the workers, prometheus_client then keeps every value in a file
per process there, and a scrape on any worker aggregates all of them
(``MultiProcessCollector``): counters and histograms are summed over the workers, the
gauges only the watching worker sets (watcher, liquidity) are taken from the live process
that has the largest value.

What the store knows (invoices per service and state, what settled ones received) comes
from one aggregate query over the invoices table (``GROUP BY service, state``), which holds the
store's single thread for a while on a large table (0.39 s at 500,000 invoices): its result
is kept ``STORE_CACHE_SECONDS`` per process, and concurrent scrapes share the one query in
flight, so scraping ``[metrics] path`` in a loop cannot keep the store from payment writes.
The rest (reading the multiprocess files, rendering the text) runs in a thread, off the
event loop. No label ever holds a token id, a payment hash or a path.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from gateway import errors
from gateway.ports import LINK_SERVICE, InvoiceState, InvoiceTotal, Liquidity

__all__ = [
    "MULTIPROC_ENV",
    "STORE_CACHE_SECONDS",
    "PrometheusMeter",
    "mark_process_dead",
    "multiprocess_dir",
]

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# How long the store's figures of a scrape are reused: below Prometheus's usual 15 s interval.
STORE_CACHE_SECONDS = 10.0
_INBOUND = "l402_inbound_liquidity_msat"
_INBOUND_KNOWN = "l402_inbound_liquidity_known"
# No *_created series: they double the text of every counter and nothing here needs them.
disable_created_metrics()  # type: ignore[no-untyped-call]
# Node RPCs are milliseconds on a LAN; a slow node shows in the upper buckets.
_LND_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def multiprocess_dir() -> str | None:
    """The multiprocess directory this process writes to, if any."""
    return os.environ.get(MULTIPROC_ENV) or None


def _service_label(service: str) -> str:
    """The ``service`` label of an invoice's service: every payment link's (``link:<id>``)
    is ``link:``, since links are made at will and each would be a series of its own; a tip
    jar's (``tip:<name>``) stays, as jars are few (the config's)."""
    return LINK_SERVICE if service.startswith(LINK_SERVICE) else service


def _store_metrics(totals: Iterable[InvoiceTotal]) -> list[Metric]:
    """The store's figures (``totals``) as they are, never summed over processes."""
    invoices = GaugeMetricFamily(
        "l402_invoices",
        "Tracked invoices (kept within the store's retention) by service and state",
        labels=("service", "state"),
    )
    received = CounterMetricFamily(
        "l402_received_msat",
        "Millisatoshis received by settled invoices, by service (from the store)",
        labels=("service",),
    )
    issued = GaugeMetricFamily(
        "l402_invoices_issued",
        "Invoices issued by service (any state; from the store)",
        labels=("service",),
    )
    settled = GaugeMetricFamily(
        "l402_invoices_settled",
        "Invoices settled by service (from the store): issued minus settled is what was "
        "never paid (say for want of inbound liquidity)",
        labels=("service",),
    )
    per_state: dict[tuple[str, str], int] = {}
    per_service: dict[str, list[int]] = {}
    for total in totals:
        service = _service_label(total.service)
        labels = (service, total.state.value)
        per_state[labels] = per_state.get(labels, 0) + total.count
        counts = per_service.setdefault(service, [0, 0, 0])
        counts[0] += total.count
        if total.state is InvoiceState.SETTLED:
            counts[1] += total.count
        counts[2] += total.received_msat
    for labels, count in sorted(per_state.items()):
        invoices.add_metric(labels, count)
    for service, (all_, settled_count, msat) in sorted(per_service.items()):
        issued.add_metric((service,), all_)
        settled.add_metric((service,), settled_count)
        received.add_metric((service,), msat)
    return [invoices, received, issued, settled]


def _without_stale_liquidity(gathered: list[Metric]) -> list[Metric]:
    """``gathered`` without the inbound liquidity samples while it is unknown: in
    multiprocess mode a value once written stays in the watching process's file
    (prometheus_client cannot remove a labelled sample there), and a scrape must not show
    it as today's liquidity."""
    known = [
        sample.value
        for metric in gathered
        if metric.name == _INBOUND_KNOWN
        for sample in metric.samples
    ]
    if max(known, default=0) >= 1:
        return gathered
    return [metric for metric in gathered if metric.name != _INBOUND]


def _watcher_lag(gathered: Iterable[Metric]) -> Iterator[Metric]:
    """``l402_watcher_lag_seconds``, from the last-event timestamp among ``gathered`` (the
    watching process's, in multiprocess mode); nothing before the watcher first heard."""
    latest = 0.0
    for metric in gathered:
        if metric.name == "l402_watcher_last_event_timestamp_seconds":
            latest = max([latest, *(sample.value for sample in metric.samples)])
    if latest:
        yield GaugeMetricFamily(
            "l402_watcher_lag_seconds",
            "Seconds since the settlement watcher last heard from the node (a stream event or "
            "a reconciliation); grows on an idle node too",
            value=max(0.0, time.time() - latest),
        )


class _Gathered(Collector):
    """Metrics collected once, rendered as they are."""

    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return iter(self._metrics)


class PrometheusMeter:
    """``gateway.ports.Meter`` over prometheus_client (see the module docstring).

    ``totals`` is the store's aggregate query, run by a scrape when the figures it got last
    are ``store_cache_seconds`` old (by ``clock``), one at a time.
    """

    def __init__(
        self,
        totals: Callable[[], Awaitable[list[InvoiceTotal]]],
        *,
        store_cache_seconds: float = STORE_CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._totals = totals
        self._cache_seconds = store_cache_seconds
        self._clock = clock
        self._cached: tuple[float, list[InvoiceTotal]] | None = None
        self._querying: asyncio.Future[list[InvoiceTotal] | None] | None = None
        self._directory = multiprocess_dir()
        # Multiprocess: the values live in files, the metrics need no registry of their own.
        own: CollectorRegistry | None = None if self._directory else CollectorRegistry()
        self._own = own
        self._challenges = Counter(
            "l402_challenges_issued",
            "Payment challenges (402 with a fresh invoice) by service",
            ("service",),
            registry=own,
        )
        self._paid = Counter(
            "l402_paid_requests",
            "Requests allowed with a paid token, by service",
            ("service",),
            registry=own,
        )
        self._refusals = Counter(
            "l402_refusals",
            "Requests refused, by status and reason (a fixed vocabulary; other: any other)",
            ("status", "reason"),
            registry=own,
        )
        self._rate_limited = Counter(
            "l402_rate_limit_hits",
            "Requests refused by a rate limit: challenges, redeems or held",
            ("limit",),
            registry=own,
        )
        self._lnd_seconds = Histogram(
            "l402_lnd_request_duration_seconds",
            "LND unary RPC latency by method",
            ("method",),
            buckets=_LND_BUCKETS,
            registry=own,
        )
        self._lnd_errors = Counter(
            "l402_lnd_errors",
            "LND RPCs that failed, by method and error class",
            ("method", "error"),
            registry=own,
        )
        self._watcher_last = Gauge(
            "l402_watcher_last_event_timestamp_seconds",
            "When the settlement watcher last heard from the node (Unix time)",
            registry=own,
            multiprocess_mode="livemax",
        )
        self._reconnects = Counter(
            "l402_watcher_reconnects",
            "Times the settlement watcher lost the invoice stream and reconnected",
            registry=own,
        )
        self._upstream_seconds = Histogram(
            "l402_upstream_request_duration_seconds",
            "Time to the upstream's response headers, of forwarded requests",
            buckets=_UPSTREAM_BUCKETS,
            registry=own,
        )
        self._upstream_errors = Counter(
            "l402_upstream_errors",
            "Forwarded requests that got no answer from the upstream, by error",
            ("error",),
            registry=own,
        )
        self._responses = Counter(
            "l402_responses",
            "Responses of the proxy by status, its own refusals (400, 408, 413, 429) included",
            ("status",),
            registry=own,
        )
        self._inbound = Gauge(
            _INBOUND,
            "Inbound liquidity of the node's active channels: total, and the largest channel's",
            ("scope",),
            registry=own,
            multiprocess_mode="livemax",
        )
        self._inbound_known = Gauge(
            _INBOUND_KNOWN,
            "1 when the node reported its channels (ListChannels needs offchain:read), else 0",
            registry=own,
            multiprocess_mode="livemax",
        )
        self._paid_children: dict[str, Counter] = {}
        self._response_children: dict[int, Counter] = {}

    # -- the Meter hooks --------------------------------------------------------------

    def challenge_issued(self, service: str) -> None:
        self._challenges.labels(service).inc()

    def paid_request(self, service: str) -> None:
        # The hot path of a paying client: the labelled child is looked up once per service.
        child = self._paid_children.get(service)
        if child is None:
            child = self._paid_children[service] = self._paid.labels(service)
        child.inc()

    def refused(self, status: int, reason: str) -> None:
        self._refusals.labels(str(status), reason).inc()

    def rate_limited(self, limit: str) -> None:
        self._rate_limited.labels(limit).inc()

    def lnd_call(self, method: str, seconds: float, error: str | None) -> None:
        self._lnd_seconds.labels(method).observe(seconds)
        if error is not None:
            self._lnd_errors.labels(method, error).inc()

    def watcher_event(self) -> None:
        self._watcher_last.set(time.time())

    def watcher_reconnect(self) -> None:
        self._reconnects.inc()

    def upstream_call(self, seconds: float, error: str | None) -> None:
        if error is None:
            self._upstream_seconds.observe(seconds)
        else:
            self._upstream_errors.labels(error).inc()

    def response(self, status: int) -> None:
        # Every request's: the labelled child is looked up once per status.
        child = self._response_children.get(status)
        if child is None:
            child = self._response_children[status] = self._responses.labels(str(status))
        child.inc()

    def liquidity(self, liquidity: Liquidity) -> None:
        self._inbound_known.set(1 if liquidity.known else 0)
        if liquidity.known:
            self._inbound.labels("total").set(liquidity.total_msat)
            self._inbound.labels("largest_channel").set(liquidity.largest_msat)
        elif self._own is not None:
            # Unknown now: no sample rather than the last one measured. (Multiprocess mode
            # cannot remove one: the exposition leaves them out while known is 0.)
            self._inbound.clear()

    # -- the exposition -----------------------------------------------------------------

    def _registry(self) -> CollectorRegistry:
        if self._own is not None:
            return self._own
        # Built per scrape, as prometheus_client's multiprocess documentation does: the
        # collector reads every process's files each time.
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self._directory)  # type: ignore[no-untyped-call]
        return registry

    async def _store_totals(self) -> list[InvoiceTotal]:
        """The store's figures, at most ``store_cache_seconds`` old; a scrape that finds
        them older runs the query, and the scrapes meanwhile wait for that same query."""
        cached = self._cached
        if cached is not None and self._clock() - cached[0] < self._cache_seconds:
            return cached[1]
        if self._querying is None:
            self._querying = asyncio.ensure_future(self._query_store())
        # Shielded: a scraper hanging up does not cancel the query the others wait for.
        totals = await asyncio.shield(self._querying)
        return [] if totals is None else totals

    async def _query_store(self) -> list[InvoiceTotal] | None:
        try:
            totals = await self._totals()
        except errors.StoreError as error:
            # The rest is still worth having: the store's figures are left out this time
            # (and asked again by the next scrape: a failure is not kept).
            log.warning("metrics: the store's figures are unavailable: %s", error)
            return None
        else:
            self._cached = (self._clock(), totals)
            return totals
        finally:
            self._querying = None

    def _render(self, totals: list[InvoiceTotal]) -> bytes:
        """Every metric's text: blocking (the multiprocess files are read), run in a thread."""
        gathered = list(self._registry().collect())
        gathered += [*_store_metrics(totals), *_watcher_lag(gathered)]
        return generate_latest(_Gathered(_without_stale_liquidity(gathered)))

    async def exposition(self) -> tuple[bytes, str]:
        """The Prometheus text of every metric (every worker's), and its content type."""
        totals = await self._store_totals()
        return await asyncio.to_thread(self._render, totals), CONTENT_TYPE_LATEST
