"""The gateway's one frozen configuration: a TOML file, overridden by GATEWAY_* variables.

Every scalar key ``[section] key`` can be set from the environment as
``GATEWAY_<SECTION>_<KEY>`` (upper case), e.g. ``GATEWAY_LND_HOST`` or
``GATEWAY_RATE_LIMIT_BURST``. Routes, ``[[webhook]]``, ``[[payee]]`` and ``[[tip_jar]]``
tables are only read from the file. ``gateway.sample.toml`` in the repository documents every
key; a test loads it.

Here: the sections and the loader. ``gateway.config.checks`` holds the value checks and
limits (and the listen and store URL parsers), ``gateway.config.routes`` the route rules and
the warnings about suspect ones, ``gateway.config.webhooks`` and ``gateway.config.payouts``
the webhook endpoints and the revenue split payees, ``gateway.config.lnurl`` the tip jars and
payment links; their public names are re-exported here.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import stat
import tomllib
import types
import typing
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.config.checks import (
    HOLD_CANCEL_MARGIN,
    MAX_BURST,
    MAX_CHALLENGES_PER_SECOND,
    MAX_CLTV_EXPIRY,
    MAX_HELD_REQUEST_BYTES,
    MAX_HELD_RESPONSE_BYTES,
    MAX_HOLD_INVOICE_EXPIRY,
    MAX_HOLD_OUTSTANDING,
    MAX_INVOICE_EXPIRY,
    MAX_LEADER_SECONDS,
    MAX_LIFETIME,
    MAX_POOL_SIZE,
    MAX_RESERVATION_SECONDS,
    MAX_RESPONSE_RETENTION,
    MAX_ROOT_KEY_CACHE_SECONDS,
    MAX_SWEEP_INTERVAL,
    MAX_WITHDRAWAL_WAIT_SECONDS,
    MIN_CHALLENGES_PER_SECOND,
    MIN_CLTV_EXPIRY,
    MIN_HOLD_INVOICE_EXPIRY,
    MIN_LEADER_SECONDS,
    MIN_RESPONSE_RETENTION,
    MIN_SWEEP_INTERVAL,
    SUPPORTED_STORE_URLS,
    check_lnd_host,
    check_token_header,
    check_upstream,
    display_text,
    listen_address,
    positive,
    require,
    store_location,
)
from gateway.config.lnurl import LnurlConfig, TipJarConfig, check_tip_jars
from gateway.config.payouts import PayeeConfig, PayoutsConfig, check_payees, check_splits
from gateway.config.routes import STANDARD_METHODS, RouteConfig, route_warnings
from gateway.config.webhooks import WebhookEndpointConfig, WebhooksConfig, check_endpoints
from gateway.errors import ConfigError
from gateway.l402 import MAX_SETTLE_TIMEOUT

__all__ = [
    "MAX_BURST",
    "MAX_CHALLENGES_PER_SECOND",
    "MAX_INVOICE_EXPIRY",
    "MAX_LIFETIME",
    "MAX_RESERVATION_SECONDS",
    "MAX_ROOT_KEY_CACHE_SECONDS",
    "MAX_SWEEP_INTERVAL",
    "MAX_WITHDRAWAL_WAIT_SECONDS",
    "MIN_CHALLENGES_PER_SECOND",
    "MIN_SWEEP_INTERVAL",
    "STANDARD_METHODS",
    "SUPPORTED_STORE_URLS",
    "AdminConfig",
    "Config",
    "CreditConfig",
    "HoldConfig",
    "L402Config",
    "LndConfig",
    "LnurlConfig",
    "MetricsConfig",
    "PathsConfig",
    "PayeeConfig",
    "PayoutsConfig",
    "PaywallConfig",
    "RateLimitConfig",
    "RouteConfig",
    "ServerConfig",
    "StoreConfig",
    "TipJarConfig",
    "WebhookEndpointConfig",
    "WebhooksConfig",
    "listen_address",
    "load_config",
    "route_warnings",
    "store_location",
    "warn_if_readable_by_others",
]

log = logging.getLogger(__name__)


EVENT_LOOPS = ("auto", "asyncio", "uvloop")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: str = "127.0.0.1:8402"  # host:port the reverse proxy listens on
    upstream: str | None = None  # the backend URL the reverse proxy forwards paid requests to
    # Header carrying the verified token's facts upstream.
    token_header: str = "X-L402-Token"  # noqa: S105 - a header name, not a secret
    trust_forwarded_for: bool = False  # take the client address from X-Forwarded-For
    max_body_bytes: int = 10 * 1024 * 1024  # larger request bodies get 413
    workers: int = 1  # processes sharing the listening port (and the store)
    # What one client can hold (gateway/web/server.py, gateway/web/proxy.py):
    header_timeout: float = 10.0  # seconds a request's headers may take from their first byte
    idle_timeout: float = 15.0  # seconds a connection may wait for its next request
    # Seconds a client may read less than min_send_rate bytes a second of a response under way.
    send_timeout: float = 30.0
    min_send_rate: int = 1024
    # A request body must arrive within body_timeout seconds plus one second per
    # min_body_rate bytes; a slower one gets 408.
    body_timeout: float = 30.0
    min_body_rate: int = 8192
    max_connections: int = 0  # open client connections per worker; 0: from the open file limit
    # Per peer address (0: no cap); not applied with trust_forwarded_for, where every
    # connection comes from the proxy in front.
    max_connections_per_client: int = 64
    unpaid_requests_per_client: int = 16  # forwarded at once without a paid token; then 429
    requests_per_token: int = 64  # forwarded at once with one paid token (0: no cap); then 429
    upstream_connections: int = 100  # upstream connections of requests without a paid token
    paid_upstream_connections: int = 100  # ones of their own for requests with one
    access_log: bool = False  # a line per request (gateway.web.access_log)
    # auto: uvloop when installed (the `speed` extra), else asyncio's own loop
    event_loop: str = "auto"

    def __post_init__(self) -> None:
        require(self.max_body_bytes >= 0, "max_body_bytes", ">= 0", self.max_body_bytes)
        require(self.workers >= 1, "workers", ">= 1", self.workers)
        for key in ("header_timeout", "idle_timeout", "send_timeout", "body_timeout"):
            seconds = getattr(self, key)
            require(positive(seconds), key, "a positive number of seconds", seconds)
        rate = self.min_body_rate
        require(rate >= 1, "min_body_rate", ">= 1 (bytes a second)", rate)
        rate = self.min_send_rate
        require(rate >= 1, "min_send_rate", ">= 1 (bytes a second)", rate)
        connections = self.max_connections
        require(connections >= 0, "max_connections", ">= 0 (0: from ulimit -n)", connections)
        for key in (
            "max_connections_per_client",
            "unpaid_requests_per_client",
            "requests_per_token",
        ):
            require(getattr(self, key) >= 0, key, ">= 0 (0: no cap)", getattr(self, key))
        for key in ("upstream_connections", "paid_upstream_connections"):
            require(getattr(self, key) >= 1, key, ">= 1", getattr(self, key))
        loops = EVENT_LOOPS
        require(self.event_loop in loops, "event_loop", " or ".join(loops), self.event_loop)
        listen_address(self.listen)
        if self.upstream is not None:
            check_upstream(self.upstream)
        check_token_header(self.token_header)


@dataclass(frozen=True, slots=True)
class LndConfig:
    host: str = "127.0.0.1:10009"
    tls_cert: Path | None = None
    macaroon: Path | None = None  # file; or macaroon_hex
    macaroon_hex: str | None = field(default=None, repr=False)
    timeout: float = 30.0  # seconds per unary call

    def __post_init__(self) -> None:
        require(positive(self.timeout), "timeout", "a positive number", self.timeout)
        check_lnd_host(self.host)


@dataclass(frozen=True, slots=True)
class StoreConfig:
    # sqlite:relative.db, sqlite:///abs.db, memory:, postgresql://...; out of the repr: a
    # PostgreSQL URL may hold a password.
    url: str = field(default="sqlite:gateway.db", repr=False)
    # Seconds past its expiry an invoice that ended unpaid (CANCELED, EXPIRED) is kept, with
    # its token's root key, before it is deleted; 0 keeps them forever.
    unpaid_retention: int = 86_400
    # Seconds between the passes that record expired invoices (asking the node) and prune.
    sweep_interval: float = 60.0
    # PostgreSQL, several instances: seconds between a follower's tries to become the leader
    # (the one running the watcher), and between the leader's checks of its connection.
    leader_poll: float = 1.0
    leader_check: float = 1.0
    # PostgreSQL: connections each gateway process keeps at most.
    pool_size: int = 10

    def __post_init__(self) -> None:
        store_location(self.url)
        require(
            1 <= self.pool_size <= MAX_POOL_SIZE,
            "pool_size",
            f"1 to {MAX_POOL_SIZE} connections",
            self.pool_size,
        )
        for key in ("leader_poll", "leader_check"):
            seconds = getattr(self, key)
            require(
                math.isfinite(seconds) and MIN_LEADER_SECONDS <= seconds <= MAX_LEADER_SECONDS,
                key,
                f"{MIN_LEADER_SECONDS:g} to {MAX_LEADER_SECONDS:g} seconds",
                seconds,
            )
        retention = self.unpaid_retention
        require(
            0 <= retention <= MAX_LIFETIME,
            "unpaid_retention",
            f"0 (keep forever) to {MAX_LIFETIME}",
            retention,
        )
        interval = self.sweep_interval
        require(
            math.isfinite(interval) and MIN_SWEEP_INTERVAL <= interval <= MAX_SWEEP_INTERVAL,
            "sweep_interval",
            f"{MIN_SWEEP_INTERVAL:g} to {MAX_SWEEP_INTERVAL:g}",
            interval,
        )


@dataclass(frozen=True, slots=True)
class L402Config:
    location: str = "l402-gateway"  # macaroon location field
    invoice_expiry: int = 600  # seconds a challenge's invoice can be paid
    strict_settlement: bool = False  # also require the invoice SETTLED (checked with LND)
    root_key_cache_seconds: float = 5.0  # how stale a revocation may be in other processes

    def __post_init__(self) -> None:
        expiry = self.invoice_expiry
        require(
            1 <= expiry <= MAX_INVOICE_EXPIRY,
            "invoice_expiry",
            f"1 to {MAX_INVOICE_EXPIRY} seconds (LND refuses more than a year)",
            expiry,
        )
        seconds = self.root_key_cache_seconds
        require(
            math.isfinite(seconds) and 0 <= seconds <= MAX_ROOT_KEY_CACHE_SECONDS,
            "root_key_cache_seconds",
            f"0 to {MAX_ROOT_KEY_CACHE_SECONDS:g} (it delays revocations)",
            seconds,
        )


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    challenges_per_second: float = 2.0  # refill rate of each client's bucket
    burst: int = 20  # bucket size: challenges a client may get at once
    max_clients: int = 100_000  # buckets kept; the least recently seen are dropped
    max_pending_invoices: int = 16  # invoices being created at once: challenges, tips, links
    ipv6_prefix: int = 64  # IPv6 clients share one bucket per prefix of this many bits
    redeems_per_second: float = 4.0  # paywall redeem requests: refill of each client's bucket
    redeem_burst: int = 20  # and its size
    redeem_lookups_per_second: float = 10.0  # node lookups by redeem, over all clients

    def __post_init__(self) -> None:
        rate = self.challenges_per_second
        require(
            math.isfinite(rate) and MIN_CHALLENGES_PER_SECOND <= rate <= MAX_CHALLENGES_PER_SECOND,
            "challenges_per_second",
            f"1/86400 (one a day) to {MAX_CHALLENGES_PER_SECOND:g}",
            rate,
        )
        require(1 <= self.burst <= MAX_BURST, "burst", f"1 to {MAX_BURST}", self.burst)
        require(self.max_clients >= 1, "max_clients", ">= 1", self.max_clients)
        pending = self.max_pending_invoices
        require(pending >= 1, "max_pending_invoices", ">= 1", pending)
        prefix = self.ipv6_prefix
        require(1 <= prefix <= 128, "ipv6_prefix", "between 1 and 128", prefix)
        for key in ("redeems_per_second", "redeem_lookups_per_second"):
            value = getattr(self, key)
            require(
                math.isfinite(value)
                and MIN_CHALLENGES_PER_SECOND <= value <= MAX_CHALLENGES_PER_SECOND,
                key,
                f"1/86400 (one a day) to {MAX_CHALLENGES_PER_SECOND:g}",
                value,
            )
        redeem_burst = self.redeem_burst
        require(1 <= redeem_burst <= MAX_BURST, "redeem_burst", f"1 to {MAX_BURST}", redeem_burst)


@dataclass(frozen=True, slots=True)
class PathsConfig:
    """What the backend is known to read alike, for pricing (``gateway.pricing.resolve``)."""

    case: str = "any"  # any (unknown: strictest reading), sensitive, insensitive
    trailing_slash: str = "any"  # any (unknown: strictest reading), significant
    extension: str = "any"  # any (unknown: /a.json also read as /a), significant
    script_prefix: str = "any"  # any (unknown: /index.php/a also read as /a), significant
    unmatched: str = "free"  # a path no route matches: free (passed on), deny (404)
    # any (unknown: a POST body's _method is read where it could change the price), ignored
    body_method: str = "any"

    def __post_init__(self) -> None:
        require(self.unmatched in ("free", "deny"), "unmatched", "free or deny", self.unmatched)
        bodies = ("any", "ignored")
        require(self.body_method in bodies, "body_method", "any or ignored", self.body_method)
        cases = ("any", "sensitive", "insensitive")
        require(self.case in cases, "case", " or ".join(cases), self.case)
        for key in ("trailing_slash", "extension", "script_prefix"):
            value = getattr(self, key)
            require(value in ("any", "significant"), key, "any or significant", value)


@dataclass(frozen=True, slots=True)
class PaywallConfig:
    """``[paywall]``: what the browser paywall page says besides the route's own facts."""

    merchant: str = ""  # who sells: shown on the page
    # Prices also shown in a currency (never used for pricing): a fixed rate or a JSON URL.
    fiat_currency: str = ""  # e.g. EUR; empty: no fiat display
    fiat_per_btc: float = 0.0  # a fixed rate: units of the currency per bitcoin
    fiat_rate_url: str = ""  # or fetched: an http(s) URL answering JSON
    fiat_rate_field: str = ""  # dotted path to the number in that JSON, e.g. bitcoin.eur
    fiat_refresh: float = 300.0  # seconds between fetches

    def __post_init__(self) -> None:
        text = self.merchant
        require(display_text(text, 100), "merchant", "printable, at most 100 characters", text)
        currency = self.fiat_currency
        require(
            display_text(currency, 10) and " " not in currency,
            "fiat_currency",
            "at most 10 printable characters without blanks",
            currency,
        )
        rate, url = self.fiat_per_btc, self.fiat_rate_url
        require(math.isfinite(rate) and rate >= 0, "fiat_per_btc", ">= 0", rate)
        if url:
            parts = urllib.parse.urlsplit(url)
            require(
                parts.scheme in ("http", "https") and bool(parts.hostname),
                "fiat_rate_url",
                "an http:// or https:// URL",
                f"{parts.scheme}://...",  # the URL may hold a key: not shown
            )
        sources = (rate > 0) + bool(url)
        require(
            sources == (1 if currency else 0),
            "fiat_per_btc / fiat_rate_url",
            "exactly one with fiat_currency, none without",
            f"fiat_per_btc = {rate:g}, fiat_rate_url {'set' if url else 'empty'}",
        )
        refresh = self.fiat_refresh
        ok = math.isfinite(refresh) and 10 <= refresh <= 86400
        require(ok, "fiat_refresh", "10 to 86400", refresh)


@dataclass(frozen=True, slots=True)
class CreditConfig:
    """``[credit]``: prepaid credit (routes with ``billing = "credit"``) and withdrawals."""

    # Seconds a request's price stays held from the balance: longer than any request may
    # take upstream. Past it the sweeper gives the hold back (its process died).
    reservation_seconds: float = 330.0
    withdrawals: bool = False  # holders may withdraw their balance to an invoice
    # A macaroon that may send payments (same node as [lnd]); read only with withdrawals.
    payment_macaroon: Path | None = None
    # A withdrawal holds max(withdrawal_fee_min_msat, amount * withdrawal_fee_ppm / 1e6)
    # for the routing fee, and pays with that as the fee limit.
    withdrawal_fee_min_msat: int = 1000
    withdrawal_fee_ppm: int = 5000
    withdrawal_wait_seconds: float = 30.0  # then the endpoint answers 202 PENDING
    # Seconds each request's charge (the accounts' usage history) is kept before the sweeper
    # deletes it; 0 keeps them forever. Balances are not affected.
    usage_retention: int = 2_592_000

    def __post_init__(self) -> None:
        seconds = self.reservation_seconds
        require(
            math.isfinite(seconds) and 1 <= seconds <= MAX_RESERVATION_SECONDS,
            "reservation_seconds",
            f"1 to {MAX_RESERVATION_SECONDS:g}",
            seconds,
        )
        if self.withdrawals and self.payment_macaroon is None:
            raise ValueError(
                "withdrawals = true needs payment_macaroon (a macaroon that may send payments)"
            )
        fee_min = self.withdrawal_fee_min_msat
        require(fee_min >= 0, "withdrawal_fee_min_msat", ">= 0", fee_min)
        ppm = self.withdrawal_fee_ppm
        require(0 <= ppm <= 1_000_000, "withdrawal_fee_ppm", "0 to 1000000", ppm)
        wait = self.withdrawal_wait_seconds
        require(
            math.isfinite(wait) and 0 < wait <= MAX_WITHDRAWAL_WAIT_SECONDS,
            "withdrawal_wait_seconds",
            f"more than 0, at most {MAX_WITHDRAWAL_WAIT_SECONDS:g}",
            wait,
        )
        usage = self.usage_retention
        require(
            0 <= usage <= MAX_LIFETIME,
            "usage_retention",
            f"0 (keep forever) to {MAX_LIFETIME}",
            usage,
        )


@dataclass(frozen=True, slots=True)
class HoldConfig:
    """``[hold]``: pay-on-success routes (``settle = "on_success"``). The payer's HTLC is held
    while the stored request runs once; the invoice is settled if the backend succeeded,
    cancelled (the payer refunded) otherwise. The same fields as
    ``gateway.service.on_success.HoldTerms``."""

    invoice_expiry: int = 120  # seconds an unpaid hold invoice stays payable
    backend_timeout: float = 30.0  # seconds the backend gets; then it failed (cancel)
    cltv_expiry: int = 80  # the hold invoices' final CLTV delta, in blocks
    max_outstanding: int = 32  # unfinished pay-on-success requests at once, all clients
    max_outstanding_per_client: int = 4
    max_request_bytes: int = 65_536  # a stored request's body; larger ones get 413
    max_response_bytes: int = 1_048_576  # a larger response is a failure (cancel)
    response_retention: int = 3600  # seconds a stored response is kept once final
    delivered_retention: int = 60  # and after its first replay, if that is sooner

    def __post_init__(self) -> None:
        expiry = self.invoice_expiry
        require(
            MIN_HOLD_INVOICE_EXPIRY <= expiry <= MAX_HOLD_INVOICE_EXPIRY,
            "invoice_expiry",
            f"{MIN_HOLD_INVOICE_EXPIRY} to {MAX_HOLD_INVOICE_EXPIRY} seconds",
            expiry,
        )
        cltv = self.cltv_expiry
        require(
            MIN_CLTV_EXPIRY <= cltv <= MAX_CLTV_EXPIRY,
            "cltv_expiry",
            f"{MIN_CLTV_EXPIRY} to {MAX_CLTV_EXPIRY} blocks",
            cltv,
        )
        timeout = self.backend_timeout
        # At most what paying clients believe of the 402's L402-Settle header.
        ok = math.isfinite(timeout) and 1 <= timeout <= MAX_SETTLE_TIMEOUT
        require(ok, "backend_timeout", f"1 to {MAX_SETTLE_TIMEOUT:g} seconds", timeout)
        # A block can come a minute after the last: LND cancels the held HTLC some blocks
        # before it expires, and the gateway must settle or cancel before that.
        window = (cltv - HOLD_CANCEL_MARGIN) * 60
        if timeout + 60 > window:
            raise ValueError(
                f"backend_timeout + 60 must be at most (cltv_expiry - {HOLD_CANCEL_MARGIN}) * 60 "
                f"= {window} seconds (the node cancels a held payment {HOLD_CANCEL_MARGIN} "
                f"blocks before it expires, and blocks can come a minute apart), got "
                f"backend_timeout = {timeout:g}, cltv_expiry = {cltv}"
            )
        most = self.max_outstanding
        require(
            1 <= most <= MAX_HOLD_OUTSTANDING,
            "max_outstanding",
            f"1 to {MAX_HOLD_OUTSTANDING}",
            most,
        )
        per_client = self.max_outstanding_per_client
        require(
            1 <= per_client <= most,
            "max_outstanding_per_client",
            f"1 to max_outstanding ({most})",
            per_client,
        )
        request = self.max_request_bytes
        require(
            0 <= request <= MAX_HELD_REQUEST_BYTES,
            "max_request_bytes",
            f"0 to {MAX_HELD_REQUEST_BYTES}",
            request,
        )
        response = self.max_response_bytes
        require(
            0 <= response <= MAX_HELD_RESPONSE_BYTES,
            "max_response_bytes",
            f"0 to {MAX_HELD_RESPONSE_BYTES}",
            response,
        )
        kept = self.response_retention
        require(
            MIN_RESPONSE_RETENTION <= kept <= MAX_RESPONSE_RETENTION,
            "response_retention",
            f"{MIN_RESPONSE_RETENTION} to {MAX_RESPONSE_RETENTION} seconds (the payer retries "
            "after paying)",
            kept,
        )
        delivered = self.delivered_retention
        require(
            0 <= delivered <= kept,
            "delivered_retention",
            f"0 to response_retention ({kept})",
            delivered,
        )


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """``[admin]``: the admin dashboard (``gateway.web.admin``) on an address of its own,
    served by the process that runs the watcher; off while ``listen`` is empty."""

    listen: str = ""  # host:port of the dashboard; keep it private (127.0.0.1, a VPN)
    # HTTP Basic auth as user "admin" with the password in this file (one line, mode 0600);
    # required with listen.
    password_file: Path | None = None

    def __post_init__(self) -> None:
        if not self.listen:
            return
        listen_address(self.listen)
        if self.password_file is None:
            raise ValueError("listen needs password_file (the admin password, mode 0600)")


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """``[metrics]``: Prometheus metrics (``gateway.metrics``); off unless one is set."""

    listen: str = ""  # host:port of a listener of its own (served by the watching worker)
    path: str = ""  # e.g. "/metrics": answered on the main listener by every worker
    liquidity_interval: float = 60.0  # seconds between inbound liquidity measurements

    def __post_init__(self) -> None:
        if self.listen:
            listen_address(self.listen)
        if self.path and not (self.path.startswith("/") and "?" not in self.path):
            raise ValueError(f"path must be an absolute path like /metrics, got {self.path!r}")
        interval = self.liquidity_interval
        require(5 <= interval <= 86400, "liquidity_interval", "5 to 86400 seconds", interval)

    @property
    def enabled(self) -> bool:
        return bool(self.listen or self.path)


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = ServerConfig()
    lnd: LndConfig = LndConfig()
    store: StoreConfig = StoreConfig()
    l402: L402Config = L402Config()
    rate_limit: RateLimitConfig = RateLimitConfig()
    paths: PathsConfig = PathsConfig()
    paywall: PaywallConfig = PaywallConfig()
    credit: CreditConfig = CreditConfig()
    hold: HoldConfig = HoldConfig()
    webhooks: WebhooksConfig = WebhooksConfig()  # noqa: RUF009 - frozen, immutable
    webhook: tuple[WebhookEndpointConfig, ...] = ()  # the [[webhook]] endpoints
    admin: AdminConfig = AdminConfig()
    metrics: MetricsConfig = MetricsConfig()
    payouts: PayoutsConfig = PayoutsConfig()  # noqa: RUF009 - frozen, immutable
    payee: tuple[PayeeConfig, ...] = ()  # the [[payee]] tables: who gets the routes' splits
    lnurl: LnurlConfig = LnurlConfig()  # noqa: RUF009 - frozen, immutable
    tip_jar: tuple[TipJarConfig, ...] = ()  # the [[tip_jar]] tables (LNURL-pay)
    routes: tuple[RouteConfig, ...] = ()
    # The config file's directory: price functions are imported from it first.
    directory: Path | None = None

    @property
    def payout_macaroon(self) -> Path | None:
        """The macaroon payouts are sent with: ``[payouts]``'s, else ``[credit]``'s."""
        return self.payouts.payment_macaroon or self.credit.payment_macaroon


_SECTIONS: dict[str, type[Any]] = {
    "server": ServerConfig,
    "lnd": LndConfig,
    "store": StoreConfig,
    "l402": L402Config,
    "rate_limit": RateLimitConfig,
    "paths": PathsConfig,
    "paywall": PaywallConfig,
    "credit": CreditConfig,
    "hold": HoldConfig,
    "webhooks": WebhooksConfig,
    "admin": AdminConfig,
    "metrics": MetricsConfig,
    "payouts": PayoutsConfig,
    "lnurl": LnurlConfig,
}


def _convert(where: str, hint: Any, value: Any) -> Any:
    """Coerce a TOML or environment value to the field's declared type."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType):
        if value is None or (isinstance(value, str) and value == ""):
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _convert(where, inner, value)
    origin = typing.get_origin(hint)
    if origin is tuple:
        if isinstance(value, str):  # from the environment: comma-separated
            value = [item.strip() for item in value.split(",") if item.strip()]
        items = value
        if not isinstance(items, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_convert(where, args[0], item) for item in items)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {
            "1",
            "true",
            "yes",
            "on",
            "0",
            "false",
            "no",
            "off",
        }:
            return value.lower() in {"1", "true", "yes", "on"}
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint is Path:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a path, got {value!r}")
        if "\x00" in value:  # no file system takes it; expanduser() would raise ValueError
            raise ConfigError(f"{where}: a path must not contain NUL")
        try:
            return Path(value).expanduser()
        except RuntimeError:  # ~user that does not exist, or no home directory
            raise ConfigError(f"{where}: cannot expand the home directory in {value!r}") from None
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            converted = hint(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{where}: expected a whole number, got {value!r}")
        return converted
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {hint!r}")


def _build(cls: type[Any], where: str, values: Mapping[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
    kwargs = {key: _convert(f"{where}.{key}", hints[key], value) for key, value in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: {error}") from None


def load_config(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    uses_lnd: bool = True,
) -> Config:
    """Read ``path`` (if given), apply GATEWAY_* overrides, validate, return the Config.

    ``uses_lnd`` False (a command that only reads the store): no warning about LND secrets.
    """
    environ = os.environ if environ is None else environ
    document: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as handle:
                document = tomllib.load(handle)
        except OSError as error:
            raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            # tomllib decodes the bytes itself: a file that is not UTF-8 is not TOML.
            raise ConfigError(f"{path}: invalid TOML: {error}") from None
    unknown = sorted(set(document) - set(_SECTIONS) - {"routes", "webhook", "payee", "tip_jar"})
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(unknown)}")

    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        values = document.get(name, {})
        if not isinstance(values, dict):
            raise ConfigError(f"[{name}] must be a table")
        values = dict(values)
        for f in dataclasses.fields(cls):
            variable = f"GATEWAY_{name.upper()}_{f.name.upper()}"
            if variable in environ:
                values[f.name] = environ[variable]
        sections[name] = _build(cls, f"[{name}]", values)

    raw_routes = document.get("routes", [])
    if not isinstance(raw_routes, list):
        raise ConfigError("routes must be an array of tables ([[routes]])")
    routes = []
    for index, raw in enumerate(raw_routes):
        where = f"routes[{index}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: must be a table ([[routes]])")
        if "pattern" not in raw:
            raise ConfigError(f"{where}: needs a pattern")
        route = _build(RouteConfig, where, raw)
        priced = (route.price_msat is not None) + (route.price_function is not None)
        if priced + route.free != 1:
            raise ConfigError(f"{where}: set exactly one of price_msat, price_function, free")
        routes.append(route)
    directory = Path(path).resolve().parent if path is not None else None
    webhook = _webhook_endpoints(document.get("webhook", []))
    payee = _payees(document.get("payee", []))
    tip_jar = _tip_jars(document.get("tip_jar", []), directory)
    check_tip_jars(tip_jar, sections["lnurl"])
    config = Config(
        **sections,
        routes=tuple(routes),
        webhook=webhook,
        payee=payee,
        tip_jar=tip_jar,
        directory=directory,
    )
    if config.server.upstream is None:
        for index, route in enumerate(config.routes):
            if route.settle == "on_success":
                raise ConfigError(
                    f'routes[{index}]: settle = "on_success" needs [server] upstream: the '
                    "reverse proxy (l402-gateway serve) runs the paid request"
                )
    for warning in route_warnings(config.routes):
        log.warning("%s", warning)
    for warning in check_splits(
        config.routes, config.payee, config.payouts, config.credit.payment_macaroon
    ):
        log.warning("%s", warning)
    if uses_lnd and path is not None and "macaroon_hex" in document.get("lnd", {}):
        warn_if_readable_by_others(Path(path), "config file holding lnd.macaroon_hex")
    if uses_lnd and config.lnd.macaroon is not None:
        warn_if_readable_by_others(config.lnd.macaroon, "LND macaroon")
    if uses_lnd and config.credit.withdrawals and config.credit.payment_macaroon is not None:
        warn_if_readable_by_others(config.credit.payment_macaroon, "payment macaroon")
    payout_macaroon = config.payout_macaroon  # not None with payees (check_splits)
    warned = config.credit.withdrawals and payout_macaroon == config.credit.payment_macaroon
    if uses_lnd and config.payee and payout_macaroon is not None and not warned:
        warn_if_readable_by_others(payout_macaroon, "payout payment macaroon")
    return config


def _webhook_endpoints(raw: object) -> tuple[WebhookEndpointConfig, ...]:
    """``[[webhook]]`` tables, read only from the file (their secrets are not in it)."""
    if not isinstance(raw, list):
        raise ConfigError("webhook must be an array of tables ([[webhook]])")
    endpoints = []
    for index, table in enumerate(raw):
        where = f"webhook[{index}]"
        if not isinstance(table, dict) or "name" not in table or "url" not in table:
            raise ConfigError(f"{where}: must be a table ([[webhook]]) with a name and a url")
        endpoints.append(_build(WebhookEndpointConfig, where, table))
    check_endpoints(tuple(endpoints))
    for endpoint in endpoints:
        if endpoint.secret_file is not None:
            warn_if_readable_by_others(endpoint.secret_file, "webhook secret file")
    return tuple(endpoints)


def _payees(raw: object) -> tuple[PayeeConfig, ...]:
    """``[[payee]]`` tables, read only from the file (as ``[[webhook]]``)."""
    if not isinstance(raw, list):
        raise ConfigError("payee must be an array of tables ([[payee]])")
    payees = []
    for index, table in enumerate(raw):
        where = f"payee[{index}]"
        if not isinstance(table, dict) or "name" not in table or "destination" not in table:
            raise ConfigError(f"{where}: must be a table ([[payee]]) with a name and a destination")
        name = table["name"]
        if isinstance(name, str) and name:
            where = f"[[payee]] {name!r}"
        payees.append(_build(PayeeConfig, where, table))
    check_payees(tuple(payees))
    return tuple(payees)


def _tip_jars(raw: object, directory: Path | None) -> tuple[TipJarConfig, ...]:
    """``[[tip_jar]]`` tables, read only from the file (as ``[[payee]]``); a relative
    ``image`` is taken from ``directory`` (the config file's)."""
    if not isinstance(raw, list):
        raise ConfigError("tip_jar must be an array of tables ([[tip_jar]])")
    jars = []
    for index, table in enumerate(raw):
        if not isinstance(table, dict):
            raise ConfigError(f"tip_jar[{index}]: must be a table ([[tip_jar]])")
        name = table.get("name")
        # A named jar's errors name it: the index is for one without a name.
        where = f"[[tip_jar]] {name!r}" if isinstance(name, str) and name else f"tip_jar[{index}]"
        if "name" not in table or "description" not in table:
            raise ConfigError(f"{where}: must have a name and a description")
        for key in ("min", "max"):
            value = table.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                raise ConfigError(
                    f'{where}.{key}: write the amount with its unit: "{value}sat" or "{value}msat"'
                )
        jar = _build(TipJarConfig, where, table)
        if jar.image is not None and directory is not None and not jar.image.is_absolute():
            jar = dataclasses.replace(jar, image=directory / jar.image)
        jars.append(jar)
    return tuple(jars)


def warn_if_readable_by_others(path: Path, what: str) -> None:
    """Log a warning when a file holding a secret is open to its group or everyone.

    A macaroon is a bearer credential for the node, so its file should be mode 0600 (LND
    itself writes most of its macaroons 0644). A file that cannot be read is left to the
    code that reads it to report.
    """
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return
    if mode & 0o077:
        log.warning("%s %s is readable by other users (mode %03o): chmod 600 it", what, path, mode)
