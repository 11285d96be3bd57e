"""The admin dashboard: one server-rendered page, and its data as JSON, for the operator.

It runs on an address of its own (``[admin] listen``), served by the process that runs the
watcher, behind HTTP Basic auth as user ``admin`` (the password from ``[admin]
password_file``; ``read_password_file`` refuses a missing, empty or group/world-readable
one). Every request without the credential gets 401 with ``WWW-Authenticate: Basic``, and a
wrong credential 429 once a client address has made ``GUESS_BURST`` guesses faster than one a
second (a request with no credential is never held back); the comparison takes the same time
whatever the guess.

**The page** (``GET /``) shows revenue over time as an inline SVG bar chart, stacked per
service (``?range=48h``: per hour for 48 hours, the default; ``?range=30d``: per day for 30
days; ``&service=NAME``: that service only), the tracked invoices per service and state
(tokens issued and paid), the inbound liquidity of the node, the most recent invoices, the
credit accounts with their totals, and the webhook deliveries given up on (DEAD). It needs
no JavaScript and loads nothing: the style is inline under a nonce, the chart is SVG in
the page, and the Content-Security-Policy forbids everything else (like the paywall's).

**JSON** (``GET /api/...``, the same data): ``revenue`` (same query parameters),
``invoices``, ``accounts``, ``liquidity``, ``webhooks``. Amounts are integer msat, times
unix seconds, ids hex.

Bad query parameters get 400 with the reason; a store that fails gets 503. Text a client
chose (a request path) is shown escaped and with its control characters made visible.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import html
import json
import logging
import math
import secrets
import stat
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from aiohttp import hdrs, web

from gateway import errors
from gateway.ports import (
    Account,
    AdminSlot,
    Clock,
    CreditTotals,
    DeliveryState,
    InvoiceRecord,
    InvoiceTotal,
    Liquidity,
    RevenueBucket,
    Store,
    SystemClock,
    WebhookDelivery,
)
from gateway.reports import account_json, credit_totals_json, delivery_json
from gateway.service import RateLimiter
from gateway.text import printable

__all__ = [
    "ADMIN_USER",
    "RANGES",
    "ChartRange",
    "build_admin",
    "content_security_policy",
    "read_password_file",
    "render_chart",
]

log = logging.getLogger(__name__)

ADMIN_USER = "admin"
REALM = "l402-gateway admin"
LIST_LIMIT = 50  # rows in each table of the page (and each JSON list)
GUESSES_PER_SECOND = 1.0  # requests without the credential, per client, once the burst is used
GUESS_BURST = 20
LIQUIDITY_TIMEOUT = 5.0  # seconds the node gets to list its channels for the page
_MAX_SERVICE = 100  # characters of a service name in ?service=
_MAX_PASSWORD_FILE = 4096


@dataclass(frozen=True, slots=True)
class ChartRange:
    """A span of the revenue chart: ``buckets`` buckets of ``bucket_seconds``, the last one
    the bucket now falls in."""

    name: str
    label: str
    bucket_seconds: int
    buckets: int

    def starts(self, now: float) -> list[int]:
        last = int(now // self.bucket_seconds) * self.bucket_seconds
        first = last - (self.buckets - 1) * self.bucket_seconds
        return [first + index * self.bucket_seconds for index in range(self.buckets)]


RANGES = {
    "48h": ChartRange("48h", "48 hours, per hour", 3600, 48),
    "30d": ChartRange("30d", "30 days, per day", 86_400, 30),
}
DEFAULT_RANGE = "48h"


def read_password_file(path: Path) -> str:
    """The admin password: the first line of ``path``. ``ConfigError`` when the file cannot
    be read, is empty, or is readable by its group or others (a password anyone on the host
    can read protects nothing: chmod 600 it)."""
    where = f"[admin] password_file {path}"
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        with path.open("rb") as handle:
            data = handle.read(_MAX_PASSWORD_FILE + 1)
    except OSError as error:
        raise errors.ConfigError(f"{where}: cannot read it: {error.strerror}") from None
    if mode & 0o077:
        raise errors.ConfigError(
            f"{where} is readable by other users (mode {mode:03o}): chmod 600 it"
        )
    if len(data) > _MAX_PASSWORD_FILE:
        raise errors.ConfigError(f"{where}: over {_MAX_PASSWORD_FILE} bytes, not a password")
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise errors.ConfigError(f"{where}: not UTF-8 text") from None
    password = lines[0].strip() if lines else ""
    if not password:
        raise errors.ConfigError(f"{where} is empty: put the admin password on its first line")
    return password


def content_security_policy(nonce: str) -> str:
    """Only the page's own nonce'd style and images in data: URIs; no script, no fetch."""
    return (
        "default-src 'none'; "
        f"style-src 'nonce-{nonce}'; "
        "img-src data:; "
        "base-uri 'none'; "
        "form-action 'none'; "
        "frame-ancestors 'none'"
    )


_COMMON_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def _authorized(header: str | None, expected: bytes) -> bool:
    """Whether an ``Authorization`` header carries ``admin:<password>`` (``expected``)."""
    if not header:
        return False
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        given = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    return hmac.compare_digest(given, expected)


def _refused() -> web.Response:
    return web.Response(
        status=401,
        text="401 Unauthorized: the admin credential is required\n",
        headers={
            **_COMMON_HEADERS,
            hdrs.WWW_AUTHENTICATE: f'Basic realm="{REALM}", charset="UTF-8"',
        },
    )


class _BadRequest(Exception):
    """A query parameter the dashboard does not take: 400 with this reason."""


@dataclass(frozen=True, slots=True)
class _Query:
    span: ChartRange
    service: str | None


def _query(request: web.Request) -> _Query:
    name = request.query.get("range", DEFAULT_RANGE)
    span = RANGES.get(name)
    if span is None:
        raise _BadRequest(f"range must be one of {', '.join(RANGES)}")
    service = request.query.get("service") or None
    if service is not None and (len(service) > _MAX_SERVICE or not service.isprintable()):
        raise _BadRequest(f"service must be printable, at most {_MAX_SERVICE} characters")
    return _Query(span, service)


def build_admin(
    slot: AdminSlot,
    password: str,
    *,
    clock: Clock | None = None,
) -> web.Application:
    """The dashboard over the gateway ``slot`` holds, for user ``admin`` with ``password``."""
    if not password:
        raise ValueError("the admin password must not be empty")
    clock = clock or SystemClock()
    expected = f"{ADMIN_USER}:{password}".encode()
    # Wrong credentials, per client address (IPv6 per /64): slows guessing to about one
    # password a second; the right credential is never held back. A request with none is
    # no guess: behind a TLS proxy every client shares its address, and a stream of bare
    # requests must not keep the operator's browser from its login prompt (a 401).
    guesses = RateLimiter(GUESSES_PER_SECOND, GUESS_BURST, 10_000, clock)

    @web.middleware
    async def guard(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        credential = request.headers.get(hdrs.AUTHORIZATION)
        if not _authorized(credential, expected):
            wait = 0.0 if credential is None else guesses.acquire(request.remote or "unknown")
            if wait > 0:
                return _plain(
                    429,
                    "too many attempts without the admin credential",
                    retry_after=math.ceil(wait),
                )
            return _refused()
        store = slot.store
        if store is None:
            return _plain(503, "the gateway is not running (yet)", retry_after=1)
        try:
            response = await handler(request)
        except web.HTTPException as error:
            # The router's own answers (405 for a method other than GET, 404) get the
            # headers every other answer has.
            error.headers.update(_COMMON_HEADERS)
            raise
        except _BadRequest as error:
            return _plain(400, str(error))
        except errors.StoreError as error:
            log.warning("admin dashboard: the store failed: %s", error)
            return _plain(503, "the store is unavailable", retry_after=5)
        response.headers.update(_COMMON_HEADERS)
        return response

    def store_of() -> Store:
        store = slot.store
        assert store is not None  # the guard answered 503 otherwise
        return store

    async def page(request: web.Request) -> web.Response:
        query = _query(request)
        now = clock.now()
        store = store_of()
        data = await _gather(store, slot, query, now)
        nonce = secrets.token_urlsafe(18)
        body = _render_page(data, query, now, nonce)
        return web.Response(
            body=body.encode("utf-8"),
            content_type="text/html",
            charset="utf-8",
            headers={"Content-Security-Policy": content_security_policy(nonce)},
        )

    async def api_revenue(request: web.Request) -> web.Response:
        query = _query(request)
        now = clock.now()
        buckets = await _revenue(store_of(), query, now)
        return _json(
            {
                "range": query.span.name,
                "bucket_seconds": query.span.bucket_seconds,
                "since": query.span.starts(now)[0],
                "service": query.service,
                "buckets": [
                    {
                        "start": bucket.start,
                        "service": bucket.service,
                        "settled": bucket.settled,
                        "amount_msat": bucket.amount_msat,
                    }
                    for bucket in buckets
                ],
            }
        )

    async def api_invoices(_request: web.Request) -> web.Response:
        store = store_of()
        records = await store.list_invoices(limit=LIST_LIMIT)
        totals = await store.invoice_totals()
        return _json(
            {
                "invoices": [_invoice_json(record) for record in records],
                "totals": [
                    {
                        "service": total.service,
                        "state": total.state.value,
                        "count": total.count,
                        "amount_msat": total.amount_msat,
                        "received_msat": total.received_msat,
                    }
                    for total in totals
                ],
            }
        )

    async def api_accounts(_request: web.Request) -> web.Response:
        store = store_of()
        accounts = await store.list_accounts(limit=LIST_LIMIT)
        totals = await store.credit_totals()
        return _json(
            {
                "totals": credit_totals_json(totals),
                "accounts": [account_json(account) for account in accounts],
            }
        )

    async def api_liquidity(_request: web.Request) -> web.Response:
        liquidity, problem = await _liquidity(slot)
        if liquidity is None:
            return _json({"known": False, "detail": problem})
        if not liquidity.known:
            return _json({"known": False, "detail": _unknown_liquidity(liquidity)})
        return _json(
            {
                "known": liquidity.known,
                "total_msat": liquidity.total_msat,
                "largest_msat": liquidity.largest_msat,
                "channels": liquidity.channels,
            }
        )

    async def api_webhooks(_request: web.Request) -> web.Response:
        deliveries = await store_of().list_webhook_deliveries(
            state=DeliveryState.DEAD, limit=LIST_LIMIT
        )
        return _json({"dead": [delivery_json(delivery) for delivery in deliveries]})

    app = web.Application(middlewares=[guard])
    app.router.add_get("/", page)
    app.router.add_get("/api/revenue", api_revenue)
    app.router.add_get("/api/invoices", api_invoices)
    app.router.add_get("/api/accounts", api_accounts)
    app.router.add_get("/api/liquidity", api_liquidity)
    app.router.add_get("/api/webhooks", api_webhooks)
    return app


def _plain(status: int, text: str, *, retry_after: int | None = None) -> web.Response:
    headers = dict(_COMMON_HEADERS)
    if retry_after is not None:
        headers[hdrs.RETRY_AFTER] = str(retry_after)
    return web.Response(status=status, text=f"{status} {text}\n", headers=headers)


def _json(document: dict[str, Any]) -> web.Response:
    return web.Response(
        text=json.dumps(document, separators=(",", ":")), content_type="application/json"
    )


def _invoice_json(record: InvoiceRecord) -> dict[str, Any]:
    return {
        "payment_hash": record.payment_hash.hex(),
        "service": record.service,
        "method": record.method,
        "path": record.path,
        "state": record.state.value,
        "amount_msat": record.amount_msat,
        "amount_paid_msat": record.amount_paid_msat,
        "buys_credit": record.buys_credit,
        "created_at": record.created_at,
        "expires_at": record.expires_at,
        "settled_at": record.settled_at,
        "token_id": record.token_id.hex(),
    }


async def _revenue(store: Store, query: _Query, now: float) -> list[RevenueBucket]:
    buckets = await store.revenue(query.span.starts(now)[0], query.span.bucket_seconds)
    if query.service is not None:
        buckets = [bucket for bucket in buckets if bucket.service == query.service]
    return buckets


async def _liquidity(slot: AdminSlot) -> tuple[Liquidity | None, str]:
    """The node's inbound liquidity, or None and why not."""
    if slot.liquidity is None:
        return None, "not measured by this gateway"
    try:
        async with asyncio.timeout(LIQUIDITY_TIMEOUT):
            return await slot.liquidity(), ""
    except TimeoutError:
        return None, f"the node did not answer within {LIQUIDITY_TIMEOUT:g}s"
    except errors.GatewayError as error:
        return None, f"the node could not say: {type(error).__name__}"


def _unknown_liquidity(liquidity: Liquidity) -> str:
    """Why the node did not say: a missing permission, or the node unavailable."""
    return liquidity.reason or "the node would not list its channels"


@dataclass(frozen=True, slots=True)
class _PageData:
    revenue: list[RevenueBucket]
    all_services: list[str]  # every service with revenue in the range, filter or not
    totals: list[InvoiceTotal]
    invoices: list[InvoiceRecord]
    accounts: list[Account]
    credit: CreditTotals
    liquidity: Liquidity | None
    liquidity_problem: str
    dead: list[WebhookDelivery]


async def _gather(store: Store, slot: AdminSlot, query: _Query, now: float) -> _PageData:
    everything = await _revenue(store, _Query(query.span, None), now)
    revenue = [b for b in everything if query.service is None or b.service == query.service]
    totals = await store.invoice_totals()
    invoices = await store.list_invoices(limit=LIST_LIMIT)
    accounts = await store.list_accounts(limit=LIST_LIMIT)
    credit = await store.credit_totals()
    dead = await store.list_webhook_deliveries(state=DeliveryState.DEAD, limit=LIST_LIMIT)
    liquidity, problem = await _liquidity(slot)
    return _PageData(
        revenue=revenue,
        all_services=sorted({bucket.service for bucket in everything}),
        totals=totals,
        invoices=invoices,
        accounts=accounts,
        credit=credit,
        liquidity=liquidity,
        liquidity_problem=problem,
        dead=dead,
    )


# --- rendering ------------------------------------------------------------------------------

# Bar colours per service (in name order); told apart by the legend and each bar's title.
PALETTE = ("#f7931a", "#3b82f6", "#10b981", "#a855f7", "#ef4444", "#eab308", "#14b8a6", "#64748b")
_CSS = """
:root{color-scheme:light dark;--fg:#1f2328;--muted:#59636e;--bg:#f6f8fa;--card:#fff;
--line:#d1d9e0;--accent:#f7931a}
@media (prefers-color-scheme:dark){:root{--fg:#e6edf3;--muted:#9198a1;--bg:#0d1117;
--card:#151b23;--line:#3d444d}}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
color:var(--fg);background:var(--bg)}
header.top{display:flex;justify-content:space-between;align-items:baseline;flex-wrap:wrap;
padding:16px 24px;border-bottom:1px solid var(--line);background:var(--card)}
header.top h1{margin:0;font-size:20px}
header.top h1 span{color:var(--accent)}
.muted{color:var(--muted)}
main{max-width:1200px;margin:0 auto;padding:16px 24px 48px;display:grid;gap:16px}
section{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:16px}
section h2{margin:0 0 12px;font-size:16px}
.grid{display:grid;gap:16px;grid-template-columns:repeat(auto-fit,minmax(320px,1fr))}
nav.pick{display:flex;gap:6px;flex-wrap:wrap;margin:0 0 12px}
nav.pick a{padding:3px 10px;border:1px solid var(--line);border-radius:999px;
color:inherit;text-decoration:none}
nav.pick a.on{background:var(--accent);border-color:var(--accent);color:#111}
svg.chart{width:100%;height:auto;display:block}
svg.chart text{fill:var(--muted);font-size:11px}
svg.chart line.grid{stroke:var(--line);stroke-width:1}
svg.chart text.empty{font-size:14px}
.legend{display:flex;gap:14px;flex-wrap:wrap;margin:8px 0 0;padding:0;list-style:none}
.legend svg{vertical-align:-2px;margin-right:4px}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid var(--line);
white-space:nowrap}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
td.path{white-space:normal;word-break:break-all}
code{font:12px ui-monospace,SFMono-Regular,Menlo,monospace}
.scroll{overflow-x:auto}
.state{display:inline-block;padding:0 6px;border-radius:4px;font-size:12px;
border:1px solid var(--line)}
.state-SETTLED{background:#10b98133;border-color:#10b981}
.state-OPEN{background:#3b82f633;border-color:#3b82f6}
.state-EXPIRED,.state-CANCELED{background:#64748b33}
.state-ACCEPTED{background:#eab30833;border-color:#eab308}
.state-DEAD{background:#ef444433;border-color:#ef4444}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:4px 16px;margin:0}
dl.facts dt{color:var(--muted)}
dl.facts dd{margin:0;font-variant-numeric:tabular-nums}
p.warn{color:#ef4444;margin:8px 0 0}
"""

_CHART_WIDTH = 960
_CHART_HEIGHT = 260
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 12, 12, 28


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _shown(text: str, limit: int = 200) -> str:
    """Client-chosen text, controls made visible, cut, escaped for HTML."""
    return _e(printable(text, limit))


def _sats(amount_msat: int) -> str:
    """``"1,234"`` for 1234000 msat, ``"0.5"`` for 500 msat."""
    sats, rest = divmod(amount_msat, 1000)
    if rest == 0:
        return f"{sats:,}"
    return f"{sats:,}.{rest:03d}".rstrip("0")


def _short_hex(value: bytes) -> str:
    full = value.hex()
    return f'<code title="{full}">{full[:16]}</code>'


def _when(at: float | None) -> str:
    if at is None:
        return ""
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _bucket_label(start: int, span: ChartRange) -> str:
    moment = datetime.fromtimestamp(start, UTC)
    return moment.strftime("%Y-%m-%d %H:00" if span.bucket_seconds < 86_400 else "%Y-%m-%d")


def _nice_ceiling(value: int) -> int:
    """The smallest 1, 2 or 5 times a power of ten that is at least ``value`` (>= 1)."""
    step = 1
    while True:
        for factor in (1, 2, 5):
            if step * factor >= value:
                return step * factor
        step *= 10


def _service_colours(services: Iterable[str]) -> dict[str, str]:
    return {name: PALETTE[index % len(PALETTE)] for index, name in enumerate(sorted(services))}


def render_chart(
    buckets: Sequence[RevenueBucket],
    span: ChartRange,
    now: float,
    colours: dict[str, str] | None = None,
) -> str:
    """The revenue of ``span`` as an inline SVG bar chart, one bar per bucket, stacked per
    service; each segment's ``<title>`` says its bucket, service, count and amount."""
    starts = span.starts(now)
    colours = colours or _service_colours({bucket.service for bucket in buckets})
    by_start: dict[int, list[RevenueBucket]] = {start: [] for start in starts}
    for bucket in buckets:
        if bucket.start in by_start:
            by_start[bucket.start].append(bucket)
    totals = [sum(b.amount_msat for b in by_start[start]) for start in starts]
    top_sats = _nice_ceiling(max(1, -(-max(totals, default=0) // 1000)))
    top = top_sats * 1000
    plot_w = _CHART_WIDTH - _LEFT - _RIGHT
    plot_h = _CHART_HEIGHT - _TOP - _BOTTOM
    slot_w = plot_w / len(starts)
    bar_w = max(1.0, slot_w * 0.8)
    parts = [
        f'<svg class="chart" id="revenue-chart" viewBox="0 0 {_CHART_WIDTH} {_CHART_HEIGHT}" '
        f'xmlns="http://www.w3.org/2000/svg" role="img" '
        f'aria-label="Revenue, {_e(span.label)}, in sat">'
    ]
    for fraction in (0.0, 0.5, 1.0):
        y = _TOP + plot_h * (1 - fraction)
        label = _sats(int(top * fraction))
        parts.append(
            f'<line class="grid" x1="{_LEFT}" x2="{_CHART_WIDTH - _RIGHT}" '
            f'y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{label} sat</text>'
        )
    every = 6 if span.bucket_seconds < 86_400 else 5
    for index, start in enumerate(starts):
        x = _LEFT + index * slot_w + (slot_w - bar_w) / 2
        y = _TOP + plot_h
        for bucket in sorted(by_start[start], key=lambda b: b.service):
            height = plot_h * bucket.amount_msat / top
            colour = colours.get(bucket.service, PALETTE[-1])
            y -= height
            title = (
                f"{_bucket_label(start, span)} UTC · {bucket.service}: {bucket.settled} paid, "
                f"{_sats(bucket.amount_msat)} sat"
            )
            parts.append(
                f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" '
                f'height="{max(height, 0.5):.1f}" fill="{colour}" '
                f'data-service="{_e(bucket.service)}" data-start="{start}">'
                f"<title>{_e(title)}</title></rect>"
            )
        if (len(starts) - 1 - index) % every == 0:
            moment = datetime.fromtimestamp(start, UTC)
            label = moment.strftime("%H:00" if span.bucket_seconds < 86_400 else "%m-%d")
            if span.bucket_seconds < 86_400 and moment.hour == 0:
                label = moment.strftime("%m-%d")
            parts.append(
                f'<text x="{x + bar_w / 2:.1f}" y="{_CHART_HEIGHT - 8}" '
                f'text-anchor="middle">{label}</text>'
            )
    if not any(totals):
        parts.append(
            f'<text class="empty" x="{_LEFT + plot_w / 2:.1f}" y="{_TOP + plot_h / 2:.1f}" '
            'text-anchor="middle">No settled invoices in this period</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _link(query: _Query, **changes: str | None) -> str:
    values: dict[str, str | None] = {"range": query.span.name, "service": query.service}
    values.update(changes)
    pairs = [(key, value) for key, value in values.items() if value]
    return "/?" + urlencode(pairs) if pairs else "/"


def _on(chosen: bool) -> str:
    return ' class="on" aria-current="page"' if chosen else ""


def _pick(query: _Query, services: list[str]) -> str:
    ranges = "".join(
        f'<a href="{_e(_link(query, range=name))}"{_on(name == query.span.name)}'
        f' id="range-{name}">{_e(span.label)}</a>'
        for name, span in RANGES.items()
    )
    choices = [("All services", None), *((name, name) for name in services)]
    if query.service is not None and query.service not in services:
        choices.append((query.service, query.service))
    service_links = "".join(
        f'<a href="{_e(_link(query, service=value))}"{_on(value == query.service)}>'
        f"{_shown(label, 60)}</a>"
        for label, value in choices
    )
    return (
        f'<nav class="pick" aria-label="Period">{ranges}</nav>'
        f'<nav class="pick" aria-label="Service">{service_links}</nav>'
    )


def _legend(colours: dict[str, str]) -> str:
    if not colours:
        return ""
    items = "".join(
        f'<li><svg width="12" height="12" aria-hidden="true"><rect width="12" height="12" '
        f'fill="{colour}"/></svg>{_shown(name, 60)}</li>'
        for name, colour in colours.items()
    )
    return f'<ul class="legend">{items}</ul>'


_NUM = ' class="num"'


def _table(head: Sequence[tuple[str, bool]], rows: Sequence[str], empty: str, ident: str) -> str:
    if not rows:
        return f'<p class="muted" id="{ident}-empty">{_e(empty)}</p>'
    header = "".join(f"<th{_NUM if num else ''}>{_e(title)}</th>" for title, num in head)
    return (
        f'<div class="scroll"><table id="{ident}"><thead><tr>{header}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def _revenue_section(data: _PageData, query: _Query, now: float) -> str:
    colours = _service_colours(data.all_services)
    chart = render_chart(data.revenue, query.span, now, colours)
    per_service: dict[str, tuple[int, int]] = {}
    for bucket in data.revenue:
        count, total = per_service.get(bucket.service, (0, 0))
        per_service[bucket.service] = (count + bucket.settled, total + bucket.amount_msat)
    rows = [
        f'<tr><td>{_shown(name, 60)}</td><td class="num">{count:,}</td>'
        f'<td class="num">{_sats(total)}</td></tr>'
        for name, (count, total) in sorted(per_service.items())
    ]
    count = sum(c for c, _ in per_service.values())
    total = sum(t for _, t in per_service.values())
    if rows:
        rows.append(
            f'<tr><th>Total</th><th class="num">{count:,}</th>'
            f'<th class="num" id="revenue-total">{_sats(total)}</th></tr>'
        )
    legend = _legend({name: colours[name] for name in colours if name in per_service})
    table = _table(
        [("Service", False), ("Paid invoices", True), ("Received (sat)", True)],
        rows,
        "Nothing received in this period.",
        "revenue-table",
    )
    return (
        f'<section id="revenue"><h2>Revenue, {_e(query.span.label)} (UTC)</h2>'
        f"{_pick(query, data.all_services)}{chart}{legend}{table}</section>"
    )


def _liquidity_section(data: _PageData) -> str:
    liquidity = data.liquidity
    if liquidity is None:
        body = f'<p class="muted" id="liquidity-unknown">Unknown: {_e(data.liquidity_problem)}</p>'
    elif not liquidity.known:
        body = (
            '<p class="muted" id="liquidity-unknown">Unknown: '
            f"{_shown(_unknown_liquidity(liquidity))}</p>"
        )
    else:
        body = (
            '<dl class="facts" id="liquidity-facts">'
            f'<dt>Inbound, all channels</dt><dd id="inbound-total">'
            f"{_sats(liquidity.total_msat)} sat</dd>"
            f'<dt>Largest channel</dt><dd id="inbound-largest">'
            f"{_sats(liquidity.largest_msat)} sat</dd>"
            f"<dt>Active channels</dt><dd>{liquidity.channels}</dd></dl>"
        )
        if liquidity.total_msat == 0:
            body += '<p class="warn">The node cannot receive any payment.</p>'
    return f'<section id="liquidity"><h2>Inbound liquidity</h2>{body}</section>'


def _tokens_section(data: _PageData) -> str:
    services = sorted({total.service for total in data.totals})
    states = sorted({total.state.value for total in data.totals})
    cells = {(t.service, t.state.value): t for t in data.totals}
    rows = []
    for service in services:
        counts = "".join(
            f'<td class="num">{cells[(service, state)].count:,}</td>'
            if (service, state) in cells
            else '<td class="num">0</td>'
            for state in states
        )
        received = sum(t.received_msat for t in data.totals if t.service == service)
        rows.append(
            f'<tr><td>{_shown(service, 60)}</td>{counts}<td class="num">{_sats(received)}</td></tr>'
        )
    head = [("Service", False), *((state.title(), True) for state in states)]
    head.append(("Received (sat)", True))
    table = _table(head, rows, "No invoices issued yet.", "tokens-table")
    return f'<section id="tokens"><h2>Tokens issued (invoices by state)</h2>{table}</section>'


def _invoices_section(data: _PageData) -> str:
    rows = [
        "<tr>"
        f"<td>{_when(record.created_at)}</td>"
        f"<td>{_shown(record.service, 60)}</td>"
        f'<td class="path"><code>{_shown(f"{record.method} {record.path}", 160)}</code></td>'
        f'<td class="num">{_sats(record.amount_msat)}</td>'
        f'<td><span class="state state-{record.state.value}">{record.state.value}</span>'
        f"{' (credit)' if record.buys_credit else ''}</td>"
        f"<td>{_when(record.settled_at)}</td>"
        f"<td>{_short_hex(record.payment_hash)}</td>"
        "</tr>"
        for record in data.invoices
    ]
    table = _table(
        [
            ("Created (UTC)", False),
            ("Service", False),
            ("Request", False),
            ("Amount (sat)", True),
            ("State", False),
            ("Settled (UTC)", False),
            ("Payment hash", False),
        ],
        rows,
        "No invoices yet.",
        "invoices-table",
    )
    return (
        f'<section id="invoices"><h2>Recent invoices (the latest {LIST_LIMIT})</h2>'
        f"{table}</section>"
    )


def _accounts_section(data: _PageData) -> str:
    credit = data.credit
    facts = (
        '<dl class="facts" id="credit-totals">'
        f"<dt>Accounts</dt><dd>{credit.accounts:,}</dd>"
        f"<dt>Credit bought</dt><dd>{_sats(credit.received_msat)} sat</dd>"
        f"<dt>Spent on requests</dt><dd>{_sats(credit.consumed_msat)} sat</dd>"
        f"<dt>Withdrawn</dt><dd>{_sats(credit.withdrawn_msat)} sat</dd>"
        f"<dt>Owed to holders</dt><dd>{_sats(credit.outstanding_msat)} sat</dd></dl>"
    )
    rows = [
        "<tr>"
        f"<td>{_short_hex(account.token_id)}</td>"
        f"<td>{_shown(account.service, 60)}</td>"
        f'<td class="num">{_sats(account.balance_msat)}</td>'
        f'<td class="num">{_sats(account.credited_msat)}</td>'
        f'<td class="num">{_sats(account.spent_msat)}</td>'
        f"<td>{_when(account.last_used_at or account.created_at)}</td>"
        "</tr>"
        for account in data.accounts
    ]
    table = _table(
        [
            ("Token", False),
            ("Service", False),
            ("Balance (sat)", True),
            ("Bought (sat)", True),
            ("Spent (sat)", True),
            ("Last used (UTC)", False),
        ],
        rows,
        "No credit accounts.",
        "accounts-table",
    )
    return f'<section id="accounts"><h2>Credit accounts</h2>{facts}{table}</section>'


def _webhooks_section(data: _PageData) -> str:
    rows = [
        "<tr>"
        f'<td class="num">{delivery.event_id}</td>'
        f"<td>{_shown(delivery.event_type, 60)}</td>"
        f"<td>{_shown(delivery.endpoint, 60)}</td>"
        f'<td class="num">{delivery.attempts}</td>'
        f"<td>{'' if delivery.last_status is None else delivery.last_status}</td>"
        f'<td class="path">{_shown(delivery.last_error, 160)}</td>'
        "</tr>"
        for delivery in data.dead
    ]
    table = _table(
        [
            ("Event", True),
            ("Type", False),
            ("Endpoint", False),
            ("Attempts", True),
            ("Last status", False),
            ("Last error", False),
        ],
        rows,
        "None: every webhook delivery went through or is still being tried.",
        "webhooks-table",
    )
    return (
        '<section id="webhooks"><h2>Failed webhook deliveries (dead)</h2>'
        f'{table}<p class="muted">Retry them with <code>l402-gateway webhooks redeliver '
        "--dead</code>.</p></section>"
    )


def _render_page(data: _PageData, query: _Query, now: float, nonce: str) -> str:
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="color-scheme" content="light dark">'
        '<meta name="referrer" content="no-referrer"><meta name="robots" content="noindex">'
        "<title>L402 gateway · admin</title>"
        f'<style nonce="{_e(nonce)}">{_CSS}</style></head><body>'
        '<header class="top"><h1><span aria-hidden="true">&#9889;</span> L402 gateway '
        "admin</h1>"
        f'<p class="muted" id="generated">As of {_when(now)} UTC</p></header><main>'
        f"{_revenue_section(data, query, now)}"
        f'<div class="grid">{_liquidity_section(data)}{_tokens_section(data)}</div>'
        f"{_invoices_section(data)}{_accounts_section(data)}{_webhooks_section(data)}"
        "</main></body></html>"
    )
