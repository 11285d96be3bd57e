"""The composition root: from a ``Config`` to a running gateway.

``running_gateway(config)`` is what an application mounts (``setup_l402``, the ASGI
middleware, ``build_proxy``) and what ``l402-gateway serve`` runs: it opens the store and the
LND connection, builds the ``L402Service`` and runs the settlement watcher and the invoice
sweeper beside it, each supervised (logged and restarted with backoff when it fails), in the
one process that leads the store (``gateway.leader``). On a store with shared rate buckets
(PostgreSQL) the per-client limits are global (``GlobalRateLimiter``). With
``[credit] withdrawals`` it also opens a second LND connection with the payment macaroon
(``payer_settings``) for the ``Withdrawer``, whose resolver runs beside the watcher. With
pay-on-success routes (``settle = "on_success"``) the watching process also runs the
``HoldExecutor``, which sends paid requests to ``[server] upstream`` with an
``UpstreamRunner`` (``gateway.web.held``; ``hold_terms`` is ``[hold]`` as the service takes it).
With ``[[payee]]`` tables (revenue splits) the watching process also runs the payout worker
(``Payouts``, the task ``l402-payouts``) over an LND connection with the payout macaroon
(``payout_settings``), woken by every settlement; ``running_payouts(config, store)`` gives
the same worker to ``l402-gateway payouts pay``.
With ``[lnurl] base_url`` it builds one ``Tips`` (``build_tips``: the ``[[tip_jar]]`` tables
and the payment links), whose invoices are ordinary tracked invoices; ``running_gateway(...,
tips=slot)`` hands it to the web adapters with the per-client limit on unpaid invoices (the
challenges' own: a client gets no more invoices by asking for tips).
``running_runtime(config)`` yields the same with the invoice events and the tasks' health,
for features that react to settlements. ``build_pricing`` and ``lnd_settings`` turn their
config sections into the objects the service and the LND client take, raising
``ConfigError`` for what the config's own checks cannot see (an unloadable price function or
one that is not ``async def f(request)``, unreadable LND files). Price functions are imported
with the config file's directory first on the import path. ``route_table`` is what each path
costs, one line per route; the gateway logs it when it starts.

It loads no HTTP framework: an ASGI application gets a running gateway without aiohttp (a
test keeps it so).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import logging
import sys
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gateway import errors
from gateway.client import bolt11
from gateway.config import Config, RateLimitConfig, RouteConfig
from gateway.config.lnurl import read_image
from gateway.events import InvoiceEvents, wake_on
from gateway.expiry import InvoiceSweeper
from gateway.fiat import FiatRate
from gateway.health import HealthSlot, Readiness
from gateway.leader import Leadership, SoleLease, lease_for
from gateway.liquidity import LiquidityMonitor, inbound_liquidity
from gateway.lnd.client import LndClient
from gateway.lnd.connection import LndSettings
from gateway.ports import (
    NO_METER,
    AdminSlot,
    Clock,
    InvoiceRecord,
    InvoiceState,
    Liquidity,
    Meter,
    MetricsSlot,
    Msat,
    RateBuckets,
    Store,
    SystemClock,
)
from gateway.pricing import (
    BodyMethod,
    CreditTerms,
    Extension,
    PathCase,
    PriceFunction,
    Pricing,
    Rule,
    ScriptPrefix,
    TrailingSlash,
    Unmatched,
)
from gateway.service import L402Service, RateLimiter
from gateway.service.on_success import BackendRunner, HoldExecutor, HoldTerms
from gateway.service.payout import PayeeTerms, Payouts
from gateway.service.rate_limiter import ClientLimiter, GlobalRateLimiter
from gateway.service.tips import TipJar, Tips
from gateway.service.withdraw import Withdrawer
from gateway.splits import format_share
from gateway.store import open_store
from gateway.supervisor import Supervisor, TaskHealth, run_together
from gateway.watcher import InvoiceWatcher

if TYPE_CHECKING:
    from gateway.web.lnurl import TipsSlot
    from gateway.webhooks import WebhookSender

__all__ = [
    "Runtime",
    "build_pricing",
    "build_tips",
    "hold_terms",
    "lnd_settings",
    "payee_terms",
    "payer_settings",
    "payout_section",
    "payout_settings",
    "route_table",
    "running_gateway",
    "running_payouts",
    "running_runtime",
    "tip_jars",
]

log = logging.getLogger(__name__)


def _import(module_name: str, directory: Path | None) -> object:
    """``module_name``, found first in ``directory`` (the config file's) when given."""
    if directory is None:
        return importlib.import_module(module_name)
    entry = str(directory)
    sys.path.insert(0, entry)
    try:
        return importlib.import_module(module_name)
    finally:
        sys.path.remove(entry)  # the first occurrence: the one inserted above


def _price_function(route: RouteConfig, directory: Path | None) -> PriceFunction:
    assert route.price_function is not None
    where = f"route {route.pattern}: price_function {route.price_function}"
    module_name, _, attribute = route.price_function.partition(":")
    if not module_name or not attribute:
        raise errors.ConfigError(f"{where} must look like 'package.module:function'")
    try:
        function = getattr(_import(module_name, directory), attribute)
    except (ImportError, AttributeError) as error:
        raise errors.ConfigError(f"{where}: cannot load it: {error}") from None
    except Exception as error:  # the module's own code failed on import
        raise errors.ConfigError(
            f"{where}: importing it raised {type(error).__name__}: {error}"
        ) from None
    # Checked here, once: a sync function or a wrong signature would fail every request.
    if not inspect.iscoroutinefunction(function):
        raise errors.ConfigError(f"{where} must be an 'async def' function")
    try:
        inspect.signature(function).bind(None)
    except TypeError:
        raise errors.ConfigError(f"{where} must take exactly one argument (the request)") from None
    except ValueError:
        pass  # no signature to inspect (a builtin): let it be tried
    result: PriceFunction = function
    return result


def build_pricing(config: Config) -> Pricing:
    """The ``Pricing`` of ``[[routes]]`` and ``[paths]``; ``ConfigError`` if a rule is unusable."""
    rules = []
    for route in config.routes:
        try:
            rules.append(
                Rule(
                    pattern=route.pattern,
                    methods=frozenset(method.upper() for method in route.methods),
                    price_msat=Msat(route.price_msat) if route.price_msat is not None else None,
                    price_function=(
                        _price_function(route, config.directory) if route.price_function else None
                    ),
                    lifetime=route.lifetime,
                    service=route.service,
                    tier=route.tier,
                    capabilities=frozenset(route.capabilities),
                    title=route.title,
                    description=route.description,
                    credit=_credit_terms(route),
                    settle_on_success=route.settle == "on_success",
                    settle_statuses=frozenset(route.settle_statuses),
                    split=route.shares,
                )
            )
        except ValueError as error:
            raise errors.ConfigError(str(error)) from None
    return Pricing(
        rules,
        case=PathCase(config.paths.case),
        trailing_slash=TrailingSlash(config.paths.trailing_slash),
        unmatched=Unmatched(config.paths.unmatched),
        body_method=BodyMethod(config.paths.body_method),
        extension=Extension(config.paths.extension),
        script_prefix=ScriptPrefix(config.paths.script_prefix),
    )


def _credit_terms(route: RouteConfig) -> CreditTerms | None:
    if route.billing != "credit":
        return None
    amount, least, most = route.credit_amounts()
    return CreditTerms(
        amount_msat=Msat(amount),
        min_msat=Msat(least),
        max_msat=Msat(most),
        metered=route.metered,
        charge_failures=route.charge_failures,
    )


def _lifetime(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def route_table(config: Config) -> list[str]:
    """What each path costs, in the order the routes are tried, and what any other path gets."""
    lines = []
    for route in config.routes:
        methods = ",".join(sorted(m.upper() for m in route.methods)) or "any method"
        if route.free:
            cost = "free"
        elif route.price_msat is not None:
            cost = f"{route.price_msat} msat"
        else:
            cost = f"priced by {route.price_function}"
        if route.billing == "credit":
            amount, least, most = route.credit_amounts()
            cost += (
                f" a request{' at most (metered)' if route.metered else ''}, from prepaid "
                f"credit ({amount} msat a purchase, {least} to {most} on request"
                f"{', failures charged' if route.charge_failures else ''})"
            )
        if route.settle == "on_success":
            statuses = ", ".join(map(str, sorted(set(route.settle_statuses)))) or "2xx"
            cost += f", paid only if the backend answers {statuses}"
        if not route.free:
            cost += f", service {route.service}, token valid {_lifetime(route.lifetime)}"
        if route.split:
            shares = ", ".join(format_share(share) for share in route.shares)
            cost += f", split: {shares} (the merchant keeps the rest)"
        lines.append(f"{route.pattern} ({methods}): {cost}")
    if config.paths.unmatched == "deny":
        lines.append("any other path: refused (404, [paths] unmatched = deny)")
    else:
        lines.append("any other path: free, passed on ([paths] unmatched = free)")
    return lines


def lnd_settings(config: Config) -> LndSettings:
    """The LND connection of ``[lnd]``, its files read; ``ConfigError`` if they cannot be."""
    lnd = config.lnd
    if lnd.tls_cert is None:
        raise errors.ConfigError("[lnd] tls_cert is required (the node's tls.cert)")
    if (lnd.macaroon is None) == (lnd.macaroon_hex is None):
        raise errors.ConfigError("[lnd] set exactly one of macaroon and macaroon_hex")
    try:
        return LndSettings.from_files(
            lnd.host,
            lnd.tls_cert,
            macaroon_path=lnd.macaroon,
            macaroon_hex=lnd.macaroon_hex,
            timeout=lnd.timeout,
        )
    except OSError as error:
        raise errors.ConfigError(f"[lnd] cannot read {error.filename}: {error.strerror}") from None
    except ValueError as error:
        raise errors.ConfigError(f"[lnd] {error}") from None


def payer_settings(config: Config) -> LndSettings | None:
    """The paying LND connection when ``[credit] withdrawals`` is on: ``[lnd]``'s node and
    certificate, ``[credit] payment_macaroon``; ``ConfigError`` if its files cannot be read."""
    if not config.credit.withdrawals:
        return None
    return _paying_settings(config, config.credit.payment_macaroon, "[credit]", "withdrawals")


def payout_section(config: Config) -> str:
    """The section whose ``payment_macaroon`` payouts are sent with: ``[payouts]``, else
    ``[credit]`` (``Config.payout_macaroon``)."""
    return "[payouts]" if config.payouts.payment_macaroon is not None else "[credit]"


def _paying_settings(
    config: Config, macaroon: Path | None, section: str, needs: str
) -> LndSettings:
    """An LND connection that sends payments: ``[lnd]``'s node and certificate and
    ``macaroon``, ``section``'s ``payment_macaroon``; ``ConfigError`` naming what ``needs``
    it (``[lnd] tls_cert``), or the file that cannot be read or is wrong: ``[lnd]``'s
    certificate, or ``section``'s macaroon."""
    lnd = config.lnd
    if lnd.tls_cert is None:
        raise errors.ConfigError(f"{needs} need [lnd] tls_cert (the node's tls.cert)")
    if macaroon is None:  # load_config already requires it
        raise errors.ConfigError(f"{needs} need {section} payment_macaroon")
    try:
        return LndSettings.from_files(
            lnd.host, lnd.tls_cert, macaroon_path=macaroon, timeout=lnd.timeout
        )
    except OSError as error:
        unread = error.filename is not None and Path(error.filename) == Path(lnd.tls_cert)
        owner = "[lnd]" if unread else section
        problem = f"{owner} cannot read {error.filename}: {error.strerror}"
        raise errors.ConfigError(problem) from None
    except ValueError as error:
        # LndSettings.from_files names the certificate ("tls_cert ...") when it is at fault.
        owner = "[lnd]" if str(error).startswith("tls_cert") else f"{section} payment_macaroon:"
        raise errors.ConfigError(f"{owner} {error}") from None


@contextlib.asynccontextmanager
async def _running_withdrawer(
    config: Config, settings: LndSettings | None, store: Store, clock: Clock
) -> AsyncIterator[Withdrawer | None]:
    """The ``Withdrawer`` over its own LND connection (None without withdrawals); on exit
    it stops waiting for payments under way (the resolver finishes them)."""
    if settings is None:
        yield None
        return
    credit = config.credit
    async with LndClient(settings) as payer:
        withdrawer = Withdrawer(
            store=store,
            payer=payer,
            decode=bolt11.decode,
            clock=clock,
            fee_min_msat=credit.withdrawal_fee_min_msat,
            fee_ppm=credit.withdrawal_fee_ppm,
            wait_seconds=credit.withdrawal_wait_seconds,
        )
        try:
            yield withdrawer
        finally:
            await withdrawer.close()


def payout_settings(config: Config) -> LndSettings | None:
    """The LND connection payouts are sent over when ``[[payee]]`` tables are configured:
    ``[lnd]``'s node and certificate, ``[payouts] payment_macaroon`` (else ``[credit]``'s:
    ``payout_section``); ``ConfigError`` if its files cannot be read. None without payees."""
    if not config.payee:
        return None
    section = payout_section(config)
    return _paying_settings(config, config.payout_macaroon, section, "[[payee]] payouts")


def payee_terms(config: Config) -> list[PayeeTerms]:
    """The ``[[payee]]`` tables as the payout worker takes them."""
    return [
        PayeeTerms(
            name=payee.name,
            destination=payee.destination,
            threshold_msat=payee.threshold_msat,
            every=payee.every,
            fee_limit_ppm=payee.fee_limit_ppm,
            fee_limit_min_msat=payee.fee_limit_min_msat,
            payee_pays_fee=payee.payee_pays_fee,
        )
        for payee in config.payee
    ]


def tip_jars(config: Config) -> dict[str, TipJar]:
    """The ``[[tip_jar]]`` tables as ``Tips`` takes them, their images read; ``ConfigError``
    naming the jar if one cannot be."""
    jars = {}
    for jar in config.tip_jar:
        try:
            image = None if jar.image is None else read_image(jar.image)
            jars[jar.name] = TipJar(
                name=jar.name,
                description=jar.description,
                min_msat=Msat(jar.min_msat),
                max_msat=Msat(jar.max_msat),
                comment_allowed=jar.comment_max,
                image=image,
                success=jar.success,
            )
        except ValueError as error:
            raise errors.ConfigError(f"[[tip_jar]] {jar.name!r}: {error}") from None
    return jars


def build_tips(
    config: Config,
    store: Store,
    lnd: LndClient,
    clock: Clock,
    jars: Mapping[str, TipJar] | None = None,
    invoice_slots: asyncio.Semaphore | None = None,
) -> Tips | None:
    """The gateway's tip jars and payment links over ``lnd`` (which makes and cancels their
    invoices) and ``store``; None without ``[lnurl] base_url``. ``jars``: ``tip_jars(config)``
    if already read; ``invoice_slots``: the service's (``L402Service.invoice_slots``)."""
    if not config.lnurl.enabled:
        return None
    try:
        return Tips(
            backend=lnd,
            canceler=lnd,
            store=store,
            clock=clock,
            jars=tip_jars(config) if jars is None else jars,
            base_url=config.lnurl.origin,
            invoice_expiry=config.lnurl.invoice_expiry,
            invoice_slots=invoice_slots,
        )
    except ValueError as error:
        raise errors.ConfigError(f"[lnurl] {error}") from None


def running_payouts(
    config: Config, store: Store, *, clock: Clock | None = None
) -> contextlib.AbstractAsyncContextManager[Payouts | None]:
    """The payout worker of ``[[payee]]`` and ``[payouts]`` over its own LND connection
    (``payout_settings``) and an LNURL-pay client; None without payees. Run its ``run()``
    (the gateway does, as ``l402-payouts``) or call ``pay_now()`` (``l402-gateway payouts
    pay``); closed on exit. ``ConfigError`` if the macaroon cannot be read."""
    return _running_payouts(config, payout_settings(config), store, clock or SystemClock())


@contextlib.asynccontextmanager
async def _running_payouts(
    config: Config, settings: LndSettings | None, store: Store, clock: Clock
) -> AsyncIterator[Payouts | None]:
    if settings is None:
        yield None
        return
    # Imported only with payees: the LNURL-pay client needs aiohttp, which an ASGI app may lack.
    from gateway.client.lnurl import LnurlPayClient

    payouts_config = config.payouts
    async with LndClient(settings) as node, LnurlPayClient() as pay_requests:
        payouts = Payouts(
            store=store,
            node=node,
            pay_requests=pay_requests,
            decode=bolt11.decode,
            payees=payee_terms(config),
            clock=clock,
            interval=payouts_config.interval,
            retry_initial=payouts_config.retry_initial,
            retry_max=payouts_config.retry_max,
        )
        try:
            yield payouts
        finally:
            await payouts.close()


async def _run_payouts(payouts: Payouts, events: InvoiceEvents) -> None:
    """The payout worker, woken by every settlement this process records (a share may have
    made a payee due); settlements elsewhere and credit charges wait for its next pass."""

    def settled_split(record: InvoiceRecord) -> bool:
        return record.state is InvoiceState.SETTLED and bool(record.split)

    # The supervisor logs and restarts on the first failure, as for any task.
    await run_together(payouts.run(), wake_on(events, "payouts", payouts.wake, settled_split))


def hold_terms(config: Config) -> HoldTerms:
    """The pay-on-success limits and times of ``[hold]``."""
    hold = config.hold
    return HoldTerms(
        invoice_expiry=hold.invoice_expiry,
        backend_timeout=hold.backend_timeout,
        cltv_expiry=hold.cltv_expiry,
        max_outstanding=hold.max_outstanding,
        max_outstanding_per_client=hold.max_outstanding_per_client,
        max_request_bytes=hold.max_request_bytes,
        max_response_bytes=hold.max_response_bytes,
        response_retention=hold.response_retention,
        delivered_retention=hold.delivered_retention,
    )


def _hold_upstream(config: Config, pricing: Pricing) -> str | None:
    """Where paid pay-on-success requests run: ``[server] upstream`` when some route settles
    on success (``ConfigError`` if there is none), else None."""
    if not pricing.settles_on_success:
        return None
    if config.server.upstream is None:
        raise errors.ConfigError(
            'settle = "on_success" routes need [server] upstream: the reverse proxy runs the '
            "paid request"
        )
    return config.server.upstream


@contextlib.asynccontextmanager
async def _running_runner(
    config: Config, upstream: str | None
) -> AsyncIterator[BackendRunner | None]:
    """What runs paid pay-on-success requests against ``upstream`` (None: nothing to run)."""
    if upstream is None:
        yield None
        return
    # Imported here: only these routes need an HTTP client (an ASGI application gets a
    # running gateway without aiohttp, and is refused such routes anyway).
    from gateway.web.held import UpstreamRunner

    async with UpstreamRunner(
        upstream,
        token_header=config.server.token_header,
        connections=config.hold.max_outstanding,
    ) as runner:
        yield runner


@dataclass(frozen=True, slots=True)
class Runtime:
    """A running gateway: the service apps mount, the invoice events its watcher and sweeper
    publish (empty without ``watch``), the health of its background tasks, and its readiness
    checks (``gateway.health``)."""

    service: L402Service
    events: InvoiceEvents
    health: Callable[[], tuple[TaskHealth, ...]]
    readiness: Readiness
    store: Store  # the store it opened (the admin dashboard reads it)
    # The node's inbound liquidity now (``gateway.liquidity``; for the admin dashboard).
    liquidity: Callable[[], Awaitable[Liquidity]]
    # With [metrics] on: the meter, and the Prometheus text with its content type.
    meter: Meter = NO_METER
    metrics: Callable[[], Awaitable[tuple[bytes, str]]] | None = None
    # With [lnurl] base_url: the tip jars and payment links, and the per-client limit on
    # the invoices they make (the challenges' limiter: one budget of unpaid invoices).
    tips: Tips | None = None
    invoice_limiter: ClientLimiter | None = None


@contextlib.asynccontextmanager
async def running_runtime(
    config: Config, *, clock: Clock | None = None, watch: bool = True
) -> AsyncIterator[Runtime]:
    """Open the store and the LND client, run the settlement watcher and the invoice sweeper
    (and with pay-on-success routes the hold executor) under one supervisor (unless another
    process sharing the store does: ``watch=False``), yield the ``Runtime``.

    The watching process runs the tasks only one process per store may run (watcher, sweeper,
    hold executor, withdrawal resolver, webhook sender, payout worker) while it holds the
    store's lease (``gateway.leader``, the task ``l402-leader``): at once and for ever on
    SQLite, while it leads the instances sharing a PostgreSQL store. The liquidity monitor is
    its own."""
    clock = clock or SystemClock()
    pricing = build_pricing(config)
    terms = hold_terms(config)
    upstream = _hold_upstream(config, pricing)
    # Every process logs it; where several share the store, only the watching one at INFO.
    for line in route_table(config):
        log.log(logging.INFO if watch else logging.DEBUG, "route %s", line)
    settings = lnd_settings(config)  # these fail on a bad config before the store is opened
    paying = payer_settings(config)
    # Only the watching process pays the payees (one worker per store).
    paying_out = payout_settings(config) if watch else None
    # The endpoints' secrets are read now: a missing one fails before anything is opened.
    webhooks = _webhook_sender(config, clock) if watch and config.webhook else None
    jars = tip_jars(config)  # and the tip jars' images
    store = await open_store(config.store.url, pool_size=config.store.pool_size)
    meter: Meter = NO_METER
    metrics: Callable[[], Awaitable[tuple[bytes, str]]] | None = None
    if config.metrics.enabled:
        # Imported only then: prometheus_client reads PROMETHEUS_MULTIPROC_DIR at import.
        from gateway.metrics import PrometheusMeter

        prometheus = PrometheusMeter(store.invoice_totals)
        meter, metrics = prometheus, prometheus.exposition
    events = InvoiceEvents()
    try:
        sender = None if webhooks is None else webhooks(store, events)
        async with (
            LndClient(settings, meter=meter) as lnd,
            _running_withdrawer(config, paying, store, clock) as withdrawer,
            _running_payouts(config, paying_out, store, clock) as payouts,
            # Only the watching process runs the hold executor (one per store).
            _running_runner(config, upstream if watch else None) as runner,
            Supervisor(clock) as supervisor,
        ):
            executor = (
                None
                if runner is None
                else HoldExecutor(
                    backend=lnd,
                    store=store,
                    clock=clock,
                    runner=runner,
                    pricing=pricing,
                    terms=terms,
                )
            )
            leadership: Leadership | None = None
            # Whether this watching process leads, where another instance may.
            leading: Callable[[], bool | None] | None = None
            caught_up: Callable[[], bool] | None = None
            liquidity_check = None
            if watch:
                watcher = InvoiceWatcher(lnd, store, events=events, meter=meter)
                sweeper = _sweeper(config, lnd, store, clock, events)

                lease = lease_for(
                    store, poll=config.store.leader_poll, check=config.store.leader_check
                )
                # A sole process always leads: it registers new webhook endpoints before
                # any request can write an event (a failure fails start-up), as the leader
                # of a shared store does before its tasks write any (the watcher's
                # reconciliation, the executor's or resolver's recovery).
                sole = isinstance(lease, SoleLease)
                if sender is not None and sole:
                    await sender.register()

                async def begin(term: Supervisor) -> None:
                    """Start the tasks only one process per store runs (this one leads)."""
                    if sender is not None and not sole:
                        await sender.register()
                    if executor is not None:
                        term.start("l402-hold-executor", executor.run)
                    term.start("l402-invoice-watcher", watcher.run)
                    term.start("l402-invoice-sweeper", sweeper.run)
                    if withdrawer is not None:
                        term.start("l402-withdrawal-resolver", withdrawer.run)
                    if sender is not None:
                        term.start("l402-webhook-sender", sender.run)
                    if payouts is not None:
                        worker = payouts
                        term.start("l402-payouts", lambda: _run_payouts(worker, events))

                leadership = Leadership(lease, begin, clock)
                supervisor.start("l402-leader", leadership.run)
                if not sole:
                    leading = leadership.leading
                caught_up = watcher.connected.is_set
                monitor = LiquidityMonitor(
                    lnd,
                    pricing.rules,
                    interval=config.metrics.liquidity_interval,
                    meter=meter,
                )
                supervisor.start("l402-liquidity", monitor.run)
                liquidity_check = monitor.check
            fiat = _fiat_rate(config, clock)
            if fiat is not None and config.paywall.fiat_rate_url:
                supervisor.start("l402-fiat-rate", fiat.run)

            def health() -> tuple[TaskHealth, ...]:
                """This process's tasks, and the singletons while it leads."""
                singletons = () if leadership is None else leadership.health()
                return supervisor.health() + singletons

            limits = config.rate_limit
            invoice_limiter = _limiter(
                "challenge", limits.challenges_per_second, limits.burst, limits, store, clock
            )
            service = _service(
                config,
                pricing,
                lnd,
                store,
                clock,
                fiat,
                withdrawer,
                hold=terms,
                on_held=None if executor is None else executor.wake,
                meter=meter,
                rate_limiter=invoice_limiter,
            )
            tips = build_tips(config, store, lnd, clock, jars, service.invoice_slots)
            if tips is not None:
                for name in tips.jars:
                    level = logging.INFO if watch else logging.DEBUG
                    log.log(level, "tip jar %s at %s", tips.address(name), tips.jar_url(name))
            readiness = Readiness(
                lnd,
                store,
                health,
                watcher_caught_up=caught_up,
                leading=leading,
                liquidity=liquidity_check,
            )

            async def liquidity() -> Liquidity:
                return await inbound_liquidity(lnd)

            yield Runtime(
                service,
                events,
                health,
                readiness,
                store,
                liquidity,
                meter=meter,
                metrics=metrics,
                tips=tips,
                invoice_limiter=None if tips is None else invoice_limiter,
            )
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def running_gateway(
    config: Config,
    *,
    clock: Clock | None = None,
    watch: bool = True,
    health: HealthSlot | None = None,
    metrics: MetricsSlot | None = None,
    admin: AdminSlot | None = None,
    tips: TipsSlot | None = None,
) -> AsyncIterator[L402Service]:
    """``running_runtime``'s service: what ``setup_l402``, the ASGI middleware and
    ``build_proxy`` take; its readiness goes in ``health`` (for ``build_proxy``'s) while it
    runs, its meter and exposition in ``metrics``, its store and liquidity in ``admin`` (for
    the admin dashboard, ``gateway.web.admin``), its tip jars and payment links with their
    invoice limiter in ``tips`` (``gateway.web.lnurl``; stays empty without ``[lnurl]``)."""
    async with running_runtime(config, clock=clock, watch=watch) as runtime:
        if health is not None:
            health.readiness = runtime.readiness
        if metrics is not None:
            metrics.meter, metrics.exposition = runtime.meter, runtime.metrics
        if admin is not None:
            admin.store, admin.liquidity = runtime.store, runtime.liquidity
        if tips is not None:
            tips.tips, tips.limiter = runtime.tips, runtime.invoice_limiter
        try:
            yield runtime.service
        finally:
            if health is not None:
                health.readiness = None
            if metrics is not None:
                metrics.meter, metrics.exposition = NO_METER, None
            if admin is not None:
                admin.store, admin.liquidity = None, None
            if tips is not None:
                tips.tips, tips.limiter = None, None


def _webhook_sender(
    config: Config, clock: Clock
) -> Callable[[Store, InvoiceEvents], WebhookSender]:
    """What makes the ``WebhookSender`` of ``[[webhook]]`` once the store is open; the
    secrets are read here (``ConfigError`` for a missing or malformed one)."""
    # Imported only with endpoints: the sender needs aiohttp, which an ASGI app may lack.
    from gateway.config.webhooks import read_secret
    from gateway.webhooks import RetryPolicy, WebhookEndpoint, WebhookSender

    endpoints = [
        WebhookEndpoint(endpoint.name, endpoint.url, endpoint.subscribed, read_secret(endpoint))
        for endpoint in config.webhook
    ]
    settings = config.webhooks
    policy = RetryPolicy(
        max_attempts=settings.max_attempts,
        initial_backoff=settings.initial_backoff,
        max_backoff=settings.max_backoff,
        timeout=settings.timeout,
        poll_interval=settings.poll_interval,
    )
    for endpoint in endpoints:
        # The host only: the URL's user info or query may hold a credential.
        host = urllib.parse.urlsplit(endpoint.url).hostname
        log.info("webhook %s to %s: %s", endpoint.name, host, ", ".join(sorted(endpoint.events)))

    def make(store: Store, events: InvoiceEvents) -> WebhookSender:
        return WebhookSender(store, endpoints, policy, clock, events=events)

    return make


def _sweeper(
    config: Config, lnd: LndClient, store: Store, clock: Clock, events: InvoiceEvents
) -> InvoiceSweeper:
    """The invoice sweeper; on a store with shared rate buckets it prunes those idle longer
    than any limit takes to refill one."""
    limits = config.rate_limit
    return InvoiceSweeper(
        lnd,
        store,
        clock,
        retention=config.store.unpaid_retention,
        usage_retention=config.credit.usage_retention,
        # Events are written whatever the configuration: pruned here, not by the sender,
        # which runs only with endpoints.
        webhook_retention=config.webhooks.retention,
        webhook_endpoints=[endpoint.name for endpoint in config.webhook],
        interval=config.store.sweep_interval,
        events=events,
        rate_buckets=store if isinstance(store, RateBuckets) else None,
        rate_bucket_idle=max(
            limits.burst / limits.challenges_per_second,
            limits.redeem_burst / limits.redeems_per_second,
        ),
    )


def _fiat_rate(config: Config, clock: Clock) -> FiatRate | None:
    paywall = config.paywall
    if not paywall.fiat_currency:
        return None
    return FiatRate(
        paywall.fiat_currency,
        clock,
        per_btc=paywall.fiat_per_btc or None,
        url=paywall.fiat_rate_url or None,
        field=paywall.fiat_rate_field,
        refresh=paywall.fiat_refresh,
    )


def _service(
    config: Config,
    pricing: Pricing,
    lnd: LndClient,
    store: Store,
    clock: Clock,
    fiat: FiatRate | None = None,
    withdrawer: Withdrawer | None = None,
    *,
    hold: HoldTerms | None = None,
    on_held: Callable[[], None] | None = None,
    meter: Meter = NO_METER,
    rate_limiter: ClientLimiter,
) -> L402Service:
    """The service; ``rate_limiter``: the per-client limit on challenges (shared with the
    tip jars and payment links: one budget of unpaid invoices)."""
    limits = config.rate_limit
    return L402Service(
        pricing=pricing,
        backend=lnd,
        store=store,
        clock=clock,
        location=config.l402.location,
        invoice_expiry=config.l402.invoice_expiry,
        strict_settlement=config.l402.strict_settlement,
        root_key_cache_seconds=config.l402.root_key_cache_seconds,
        rate_limiter=rate_limiter,
        max_pending_invoices=limits.max_pending_invoices,
        merchant=config.paywall.merchant,
        fiat=fiat.display if fiat is not None else None,
        redeem_limiter=_limiter(
            "redeem", limits.redeems_per_second, limits.redeem_burst, limits, store, clock
        ),
        redeem_lookups_per_second=limits.redeem_lookups_per_second,
        reservation_seconds=config.credit.reservation_seconds,
        withdrawer=withdrawer,
        hold_backend=lnd,
        hold=hold,
        on_held=on_held,
        meter=meter,
    )


def _limiter(
    limit: str, rate: float, burst: int, limits: RateLimitConfig, store: Store, clock: Clock
) -> ClientLimiter:
    """The per-client limit ``limit`` of ``rate`` and ``burst``: shared by every instance
    when the store keeps rate buckets (PostgreSQL), else this process's."""
    if isinstance(store, RateBuckets):
        return GlobalRateLimiter(
            limit, store, rate, burst, limits.max_clients, clock, limits.ipv6_prefix
        )
    return RateLimiter(rate, burst, limits.max_clients, clock, limits.ipv6_prefix)
