"""The composition root: from a ``Config`` to a running gateway.

``running_gateway(config)`` is what an application mounts (``setup_l402``, the ASGI
middleware, ``build_proxy``) and what ``l402-gateway serve`` runs: it opens the store and the
LND connection, builds the ``L402Service`` and runs the settlement watcher and the invoice
sweeper beside it, each supervised (logged and restarted with backoff when it fails).
``running_runtime(config)`` yields the same with the invoice events and the tasks' health,
for features that react to settlements. ``build_pricing`` and ``lnd_settings`` turn their
config sections into the objects the service and the LND client take, raising
``ConfigError`` for what the config's own checks cannot see (an unloadable price function,
unreadable LND files).

It loads no HTTP framework: an ASGI application gets a running gateway without aiohttp (a
test keeps it so).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from gateway import errors
from gateway.config import Config, RouteConfig
from gateway.events import InvoiceEvents
from gateway.expiry import InvoiceSweeper
from gateway.lnd.client import LndClient
from gateway.lnd.connection import LndSettings
from gateway.ports import Clock, Msat, Store, SystemClock
from gateway.pricing import PathCase, PriceFunction, Pricing, Rule, TrailingSlash
from gateway.service import L402Service, RateLimiter
from gateway.store import open_store
from gateway.supervisor import Supervisor, TaskHealth
from gateway.watcher import InvoiceWatcher

__all__ = ["Runtime", "build_pricing", "lnd_settings", "running_gateway", "running_runtime"]


def _price_function(route: RouteConfig) -> PriceFunction:
    assert route.price_function is not None
    module_name, _, attribute = route.price_function.partition(":")
    if not module_name or not attribute:
        raise errors.ConfigError(
            f"route {route.pattern}: price_function must look like 'package.module:function'"
        )
    try:
        function: PriceFunction = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise errors.ConfigError(
            f"route {route.pattern}: cannot load price_function {route.price_function}: {error}"
        ) from None
    if not callable(function):
        raise errors.ConfigError(f"route {route.pattern}: {route.price_function} is not callable")
    return function


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
                    price_function=_price_function(route) if route.price_function else None,
                    lifetime=route.lifetime,
                    service=route.service,
                    tier=route.tier,
                    capabilities=frozenset(route.capabilities),
                )
            )
        except ValueError as error:
            raise errors.ConfigError(str(error)) from None
    return Pricing(
        rules,
        case=PathCase(config.paths.case),
        trailing_slash=TrailingSlash(config.paths.trailing_slash),
    )


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


@dataclass(frozen=True, slots=True)
class Runtime:
    """A running gateway: the service apps mount, the invoice events its watcher and sweeper
    publish (empty without ``watch``), and the health of its background tasks."""

    service: L402Service
    events: InvoiceEvents
    health: Callable[[], tuple[TaskHealth, ...]]


@contextlib.asynccontextmanager
async def running_runtime(
    config: Config, *, clock: Clock | None = None, watch: bool = True
) -> AsyncIterator[Runtime]:
    """Open the store and the LND client, run the settlement watcher and the invoice sweeper
    under one supervisor (unless another process sharing the store does: ``watch=False``),
    yield the ``Runtime``."""
    clock = clock or SystemClock()
    pricing = build_pricing(config)
    settings = lnd_settings(config)  # both fail on a bad config before the store is opened
    store = await open_store(config.store.url)
    try:
        async with LndClient(settings) as lnd, Supervisor(clock) as supervisor:
            events = InvoiceEvents()
            if watch:
                watcher = InvoiceWatcher(lnd, store, events=events)
                supervisor.start("l402-invoice-watcher", watcher.run)
                sweeper = InvoiceSweeper(
                    lnd,
                    store,
                    clock,
                    retention=config.store.unpaid_retention,
                    interval=config.store.sweep_interval,
                    events=events,
                )
                supervisor.start("l402-invoice-sweeper", sweeper.run)
            service = _service(config, pricing, lnd, store, clock)
            yield Runtime(service, events, supervisor.health)
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def running_gateway(
    config: Config, *, clock: Clock | None = None, watch: bool = True
) -> AsyncIterator[L402Service]:
    """``running_runtime``'s service: what ``setup_l402``, the ASGI middleware and
    ``build_proxy`` take."""
    async with running_runtime(config, clock=clock, watch=watch) as runtime:
        yield runtime.service


def _service(
    config: Config, pricing: Pricing, lnd: LndClient, store: Store, clock: Clock
) -> L402Service:
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
        rate_limiter=RateLimiter(
            limits.challenges_per_second,
            limits.burst,
            limits.max_clients,
            clock,
            limits.ipv6_prefix,
        ),
        max_pending_invoices=limits.max_pending_invoices,
        redeem_limiter=RateLimiter(
            limits.redeems_per_second,
            limits.redeem_burst,
            limits.max_clients,
            clock,
            limits.ipv6_prefix,
        ),
        redeem_lookups_per_second=limits.redeem_lookups_per_second,
    )
