"""``l402-gateway``: the one place that reads configuration and wires the adapters together.

Commands::

    l402-gateway --config gateway.toml serve          reverse proxy in front of [server] upstream
    l402-gateway --config gateway.toml invoices       tracked invoices (table, or --json)
    l402-gateway --config ... token revoke TOKEN_ID   revoke one token
    l402-gateway pay URL [-X M] [-H 'N: v'] [-d D]   fetch URL, paying its L402 challenge

Exit codes: 0 success, 1 nothing matched (e.g. unknown token), 2 bad usage or configuration,
3 a backend (store, LND) failed.

``pay`` is curl-like (the body goes to stdout, or to ``-o FILE``) and pays through an LND node
given by ``--lnd-host/--lnd-tls-cert/--lnd-macaroon`` or ``GATEWAY_PAYER_LND_HOST``,
``GATEWAY_PAYER_LND_TLS_CERT``, ``GATEWAY_PAYER_LND_MACAROON`` (it reads no ``--config``).
The invoice must be for the node's network (``--network`` or ``GATEWAY_PAYER_NETWORK``, else
asked from the node). Tokens are cached in ``--token-cache`` (default
``~/.cache/l402-gateway/tokens.json``) and reused for later requests in their scope. Progress
goes to stderr: a start and an end line around the payment, and on a terminal an
elapsed-seconds counter while it is in flight (``-s``: none). Its exit codes are
``PAY_EXIT_CODES`` below (also printed by ``l402-gateway pay --help``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ctypes
import decimal
import importlib
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict

from gateway import errors
from gateway.client import (
    NETWORKS,
    Budget,
    BudgetExceeded,
    ChallengeError,
    ClientError,
    L402Client,
    Offer,
    PaymentDeclined,
    SpendEntry,
    TokenCache,
    TokenCacheError,
    decode_invoice,
)
from gateway.client.aiohttp import l402_session
from gateway.config import Config, RouteConfig, listen_address, load_config, store_location
from gateway.expiry import InvoiceSweeper
from gateway.lnd.client import LndClient
from gateway.lnd.connection import LndSettings
from gateway.ports import (
    Clock,
    InvoiceRecord,
    InvoiceState,
    Msat,
    Payer,
    Payment,
    PaymentHash,
    Store,
    SystemClock,
)
from gateway.pricing import PathCase, PriceFunction, Pricing, Rule, TrailingSlash
from gateway.service import L402Service, RateLimiter
from gateway.store import SqliteStore, open_store
from gateway.text import printable
from gateway.watcher import InvoiceWatcher
from gateway.web.proxy import build_proxy
from gateway.web.server import ServerLimits, connection_limit, serve

log = logging.getLogger(__name__)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
WORKER_LOG_FORMAT = "%(asctime)s %(processName)s %(levelname)s %(name)s: %(message)s"
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies


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


@contextlib.asynccontextmanager
async def running_gateway(
    config: Config, *, clock: Clock | None = None, watch: bool = True
) -> AsyncIterator[L402Service]:
    """Open the store and the LND client, run the settlement watcher and the invoice sweeper
    (unless another process sharing the store does: ``watch=False``), yield the service."""
    clock = clock or SystemClock()
    pricing = build_pricing(config)
    settings = lnd_settings(config)
    store = await open_store(config.store.url)
    try:
        async with LndClient(settings) as lnd:
            limits = config.rate_limit
            service = L402Service(
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
            tasks = []
            if watch:
                watcher = InvoiceWatcher(lnd, store)
                tasks.append(asyncio.create_task(watcher.run(), name="l402-invoice-watcher"))
                sweeper = InvoiceSweeper(
                    lnd,
                    store,
                    clock,
                    retention=config.store.unpaid_retention,
                    interval=config.store.sweep_interval,
                )
                tasks.append(asyncio.create_task(sweeper.run(), name="l402-invoice-sweeper"))
            try:
                yield service
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await store.close()


class MalformedRequestLog(logging.Filter):
    """aiohttp logs each request its parser rejects at ERROR, with a traceback quoting the
    offending bytes: anyone could fill the log that way, and the bytes may be part of a
    credential. Such a record becomes one INFO line naming only the client and the error."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError) and error.code == 400:
            record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
            record.msg = "rejected a malformed request from %s: %s"
            client = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.args = (client, type(error).__name__)
            record.exc_info, record.exc_text = None, None
        return True


def _serve(config: Config) -> int:
    if not config.server.upstream:
        raise errors.ConfigError("[server] upstream is required for serve (the backend URL)")
    build_pricing(config)
    lnd_settings(config)  # fail on a bad config before binding the port
    try:
        host, port = listen_address(config.server.listen)  # load_config checked it
    except ValueError as error:
        raise errors.ConfigError(f"[server] {error}") from None
    workers = config.server.workers
    if workers > 1 and store_location(config.store.url)[0] == "memory":
        raise errors.ConfigError("[server] workers > 1 needs a store they share, not memory:")
    log.info(
        "l402-gateway proxying %s on %s (%d worker%s)",
        config.server.upstream,
        config.server.listen,
        workers,
        "" if workers == 1 else "s",
    )
    if workers == 1:
        _serve_worker(config, host, port, watch=True, log_level=None)
        return 0
    return _serve_workers(config, host, port)


def _serve_worker(
    config: Config, host: str, port: int, *, watch: bool, log_level: int | None
) -> None:
    """One proxy process; ``log_level`` is set when it is a spawned worker."""
    if log_level is not None:
        _die_with_parent()
        logging.basicConfig(level=log_level, format=WORKER_LOG_FORMAT)
    logging.getLogger("aiohttp.server").addFilter(MalformedRequestLog())
    server = config.server
    ipv6_prefix = config.rate_limit.ipv6_prefix
    app = build_proxy(
        server.upstream or "",
        lambda: running_gateway(config, watch=watch),
        token_header=server.token_header,
        trust_forwarded_for=server.trust_forwarded_for,
        max_body_bytes=server.max_body_bytes,
        body_timeout=server.body_timeout,
        min_body_rate=server.min_body_rate,
        unpaid_requests_per_client=server.unpaid_requests_per_client,
        upstream_connections=server.upstream_connections,
        paid_upstream_connections=server.paid_upstream_connections,
        ipv6_prefix=ipv6_prefix,
    )
    upstream = server.upstream_connections + server.paid_upstream_connections
    try:
        max_connections = connection_limit(server.max_connections, upstream)
    except ValueError as error:
        raise errors.ConfigError(str(error)) from None
    # Behind a trusted proxy every connection comes from it: no per-address cap.
    per_client = 0 if server.trust_forwarded_for else server.max_connections_per_client
    log.info(
        "accepting up to %d connections, %s per client address",
        max_connections,
        per_client or "any number",
    )
    limits = ServerLimits(
        header_timeout=server.header_timeout,
        idle_timeout=server.idle_timeout,
        max_connections=max_connections,
        max_connections_per_client=per_client,
        ipv6_prefix=ipv6_prefix,
    )
    asyncio.run(serve(app, host, port, limits, reuse_port=log_level is not None))


def _die_with_parent() -> None:
    """A worker whose supervisor is killed must not go on holding the port."""
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the line above
        raise SystemExit(0)


def _serve_workers(config: Config, host: str, port: int) -> int:
    """Run ``workers`` proxy processes on one port (SO_REUSEPORT); the first one also runs
    the settlement watcher. Any worker's exit stops them all."""
    context = multiprocessing.get_context("spawn")  # no gRPC state crosses a fork
    level = logging.getLogger().getEffectiveLevel()
    workers = [
        context.Process(
            target=_serve_worker,
            args=(config, host, port),
            kwargs={"watch": index == 0, "log_level": level},
            name=f"l402-gateway-worker-{index}",
        )
        for index in range(config.server.workers)
    ]
    stopping = False

    def stop(_signal: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for worker in workers:
            if worker.is_alive():
                worker.terminate()  # SIGTERM: a graceful stop

    for worker in workers:
        worker.start()
    # Only now: a signal during the start-up above ends this process the default way, and
    # the workers started so far follow it (they die with their parent).
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    multiprocessing.connection.wait([worker.sentinel for worker in workers])
    failed = [] if stopping else [w for w in workers if w.exitcode not in (None, 0)]
    stop(signal.SIGTERM, None)
    for worker in workers:
        worker.join()
    for worker in failed:
        log.error("%s exited with %s; stopped the others", worker.name, worker.exitcode)
    return 1 if failed else 0


def _record_json(record: InvoiceRecord) -> dict[str, Any]:
    return {
        "payment_hash": record.payment_hash.hex(),
        "token_id": record.token_id.hex(),
        "state": record.state.value,
        "amount_msat": record.amount_msat,
        "amount_paid_msat": record.amount_paid_msat,
        "service": record.service,
        "method": record.method,
        "path": record.path,
        "created_at": record.created_at,
        "expires_at": record.expires_at,
        "settled_at": record.settled_at,
        "add_index": record.add_index,
        "settle_index": record.settle_index,
        "payment_request": record.payment_request,
    }


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(timestamp))


def _table(records: Sequence[InvoiceRecord]) -> str:
    rows = [("CREATED (UTC)", "STATE", "AMOUNT msat", "PAID msat", "SERVICE", "REQUEST", "HASH")]
    rows += [
        (
            _when(r.created_at),
            r.state.value,
            str(r.amount_msat),
            str(r.amount_paid_msat),
            # Clients chose these: escaped, so that they cannot drive the terminal.
            printable(r.service),
            printable(f"{r.method} {r.path}"),
            r.payment_hash.hex()[:16],
        )
        for r in records
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    counts = {state: sum(r.state is state for r in records) for state in InvoiceState}
    settled = sum(r.amount_paid_msat for r in records if r.state is InvoiceState.SETTLED)
    summary = ", ".join(f"{count} {state.value.lower()}" for state, count in counts.items())
    lines.append(f"\n{len(records)} invoices: {summary}; {settled} msat received")
    return "\n".join(line.rstrip() for line in lines)


async def _invoices(config: Config, state: str | None, limit: int | None, as_json: bool) -> int:
    wanted = InvoiceState(state.upper()) if state else None
    if limit is not None and limit < 0:
        raise errors.ConfigError(f"--limit must be >= 0, got {limit}")
    kind, path = store_location(config.store.url)
    # Only looks: a missing database is an error, not created, and nothing is chmodded.
    store: Store = (
        await SqliteStore.open(path, read_only=True)
        if kind == "sqlite" and path is not None
        else await open_store(config.store.url)
    )
    try:
        records = await store.list_invoices(state=wanted, limit=limit)
    finally:
        await store.close()
    if as_json:
        # ensure_ascii: control and bidi characters a client put in a path stay escaped.
        print(json.dumps([_record_json(r) for r in records], indent=2, ensure_ascii=True))
    else:
        print(_table(records))
    return 0


async def _revoke(config: Config, token_id: str) -> int:
    try:
        raw = bytes.fromhex(token_id)
    except ValueError:
        raise errors.ConfigError(f"token id must be hex, got {token_id!r}") from None
    store = await open_store(config.store.url)
    try:
        revoked = await store.revoke_token(raw)
    finally:
        await store.close()
    if not revoked:
        print(f"no token {token_id}", file=sys.stderr)
        return 1
    print(
        f"revoked {token_id} (running gateways stop accepting it within "
        f"{config.l402.root_key_cache_seconds:g}s)"
    )
    return 0


# -- l402-gateway pay ----------------------------------------------------------------------

PAY_EXIT_CODES = """exit codes:
  0  the response came, with a status below 400 (paid, reused a token, or free)
  1  the final response has an HTTP error status (>= 400), e.g. still 402 after paying
  2  bad usage or configuration (options, LND files, unreadable token cache, -o file)
  3  a backend failed: LND unreachable or the payment failed, the HTTP request failed,
     or an earlier payment for this URL is still in flight
  4  over budget: the price is over --max-cost; nothing was paid
  5  the challenge or its invoice is unusable: wrong network, expired, amount or payment
     hash mismatch, malformed; nothing was paid
  6  --no-pay and payment is required: the price was printed, nothing was paid"""
EXIT_HTTP_ERROR = 1
EXIT_USAGE = 2
EXIT_BACKEND = 3
EXIT_OVER_BUDGET = 4
EXIT_BAD_CHALLENGE = 5
EXIT_PAYMENT_REQUIRED = 6
DEFAULT_MAX_COST_SAT = 1000
_UNLIMITED_MSAT = 2**62
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _sat_to_msat(text: str) -> int:
    """``"21"`` or ``"0.5"`` satoshis -> millisatoshis (at most three decimals)."""
    try:
        value = decimal.Decimal(text) * 1000
    except decimal.InvalidOperation:
        raise argparse.ArgumentTypeError(f"not an amount in sat: {text!r}") from None
    if not value.is_finite() or value < 0 or value != value.to_integral_value():
        raise argparse.ArgumentTypeError(f"not an amount in sat (msat precision): {text!r}")
    return int(value)


def _sat(msat: int) -> str:
    return f"{msat / 1000:g} sat"


def default_token_cache() -> Path:
    """``$XDG_CACHE_HOME/l402-gateway/tokens.json``, else ``~/.cache/l402-gateway/...``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "l402-gateway" / "tokens.json"


def _add_pay_parser(commands: Any) -> None:
    pay = commands.add_parser(
        "pay",
        help="fetch a URL, paying its L402 challenge (curl-like)",
        description=(
            "Fetch URL; on 402 Payment Required with an L402 challenge, check the invoice and "
            "the price, pay it through LND, and retry with the token. The body goes to stdout "
            "(or -o FILE); progress to stderr. Tokens are cached and reused in their scope."
        ),
        epilog=PAY_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pay.add_argument("url", help="http(s) URL")
    pay.add_argument("-X", "--request", dest="method", metavar="METHOD", help="default GET")
    pay.add_argument(
        "-H",
        "--header",
        dest="headers",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="extra request header (repeatable)",
    )
    pay.add_argument(
        "-d", "--data", metavar="DATA", help="request body; @FILE reads a file, @- stdin (POST)"
    )
    pay.add_argument(
        "--max-cost",
        type=_sat_to_msat,
        default=DEFAULT_MAX_COST_SAT * 1000,
        metavar="SAT",
        help=f"the most to pay for the request, fee excluded (default {DEFAULT_MAX_COST_SAT})",
    )
    pay.add_argument(
        "--max-fee",
        type=_sat_to_msat,
        metavar="SAT",
        help="routing fee cap (default 1%% of the price, at least 5 sat)",
    )
    pay.add_argument(
        "--no-pay",
        action="store_true",
        help="never pay: if payment is required, print the price and exit 6 "
        "(a cached token is still used)",
    )
    pay.add_argument("-o", "--output", metavar="FILE", help="write the body to FILE")
    pay.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    pay.add_argument("-s", "--silent", action="store_true", help="no progress on stderr")
    pay.add_argument(
        "--network",
        choices=sorted(NETWORKS),
        help="the payer's network (default: GATEWAY_PAYER_NETWORK, else asked from LND)",
    )
    pay.add_argument("--lnd-host", help="LND gRPC host:port (GATEWAY_PAYER_LND_HOST)")
    pay.add_argument("--lnd-tls-cert", help="LND's tls.cert (GATEWAY_PAYER_LND_TLS_CERT)")
    pay.add_argument(
        "--lnd-macaroon", help="macaroon with offchain:write (GATEWAY_PAYER_LND_MACAROON)"
    )
    pay.add_argument(
        "--token-cache",
        metavar="FILE",
        help="token cache file (default ~/.cache/l402-gateway/tokens.json)",
    )
    pay.add_argument("--no-token-cache", action="store_true", help="keep tokens in memory only")
    pay.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to connect / between reads"
    )
    pay.add_argument(
        "--payment-timeout", type=float, default=60.0, help="seconds LND may try to pay"
    )


def _payer_settings(args: argparse.Namespace, required: bool) -> LndSettings | None:
    host = args.lnd_host or os.environ.get("GATEWAY_PAYER_LND_HOST") or "127.0.0.1:10009"
    tls_cert = args.lnd_tls_cert or os.environ.get("GATEWAY_PAYER_LND_TLS_CERT")
    macaroon = args.lnd_macaroon or os.environ.get("GATEWAY_PAYER_LND_MACAROON")
    if not tls_cert or not macaroon:
        if not required:
            return None
        raise errors.ConfigError(
            "pay needs the paying LND node: --lnd-tls-cert and --lnd-macaroon "
            "(or GATEWAY_PAYER_LND_TLS_CERT and GATEWAY_PAYER_LND_MACAROON)"
        )
    try:
        return LndSettings.from_files(host, tls_cert, macaroon_path=macaroon)
    except OSError as error:
        raise errors.ConfigError(f"payer: cannot read {error.filename}: {error.strerror}") from None
    except ValueError as error:
        raise errors.ConfigError(f"payer: {error}") from None


def _request_parts(args: argparse.Namespace) -> tuple[str, CIMultiDict[str], bytes | None]:
    headers: CIMultiDict[str] = CIMultiDict()
    for line in args.headers:
        name, colon, value = line.partition(":")
        name = name.strip()
        if not colon or not _HEADER_NAME_RE.fullmatch(name):
            raise errors.ConfigError(f"-H wants 'Name: value', got {line!r}")
        headers.add(name, value.strip())
    data: bytes | None = None
    if args.data is not None:
        if args.data == "@-":
            data = sys.stdin.buffer.read()
        elif args.data.startswith("@"):
            try:
                data = Path(args.data[1:]).read_bytes()
            except OSError as error:
                raise errors.ConfigError(
                    f"-d: cannot read {args.data[1:]}: {error.strerror}"
                ) from None
        else:
            data = args.data.encode()
    parts = urlsplit(args.url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise errors.ConfigError(f"not an http(s) URL: {args.url!r}")
    method = (args.method or ("POST" if data is not None else "GET")).upper()
    if not _HEADER_NAME_RE.fullmatch(method):
        raise errors.ConfigError(f"-X: not an HTTP method: {args.method!r}")
    return method, headers, data


class ProgressPayer:
    """A Payer that reports the payment on ``stream`` while it is in flight.

    A start and an end line; on a terminal, the start line ticks the elapsed seconds.
    """

    def __init__(self, payer: Payer, stream: TextIO, *, tick: float = 0.1) -> None:
        self._payer = payer
        self._stream = stream
        self._tick = tick

    def _write(self, text: str) -> None:
        self._stream.write(text)
        self._stream.flush()

    async def send_payment(
        self, payment_request: str, *, max_fee_msat: Msat, payment_timeout: float
    ) -> Payment:
        amount = decode_invoice(payment_request).amount_msat or 0
        label = f"paying {_sat(amount)} (routing fee up to {_sat(max_fee_msat)})"
        tty = self._stream.isatty()
        start = time.monotonic()

        async def ticker() -> None:
            while True:
                self._write(f"\r{label}... {time.monotonic() - start:.1f}s\x1b[K")
                await asyncio.sleep(self._tick)

        task = asyncio.create_task(ticker()) if tty else None
        if task is None:
            self._write(f"{label}...\n")
        prefix = "\r" if tty else ""
        suffix = "\x1b[K\n" if tty else "\n"
        try:
            payment = await self._payer.send_payment(
                payment_request, max_fee_msat=max_fee_msat, payment_timeout=payment_timeout
            )
        except BaseException:
            self._write(f"{prefix}payment failed after {time.monotonic() - start:.1f}s{suffix}")
            raise
        finally:
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._write(
            f"{prefix}paid {_sat(payment.amount_msat)} + {_sat(payment.fee_msat)} fee "
            f"in {time.monotonic() - start:.2f}s{suffix}"
        )
        return payment

    async def lookup_payment(self, payment_hash: PaymentHash) -> Payment | None:
        return await self._payer.lookup_payment(payment_hash)


class _NoPayer:
    """Stands in when no LND node is configured (``--no-pay``): it cannot pay or look up."""

    async def send_payment(
        self, payment_request: str, *, max_fee_msat: Msat, payment_timeout: float
    ) -> Payment:
        raise errors.ConfigError("no paying LND node configured")

    async def lookup_payment(self, payment_hash: PaymentHash) -> Payment | None:
        raise errors.ConfigError(
            "the token cache has a pending payment; resolving it needs the paying LND node "
            "(--lnd-tls-cert, --lnd-macaroon)"
        )


def _offer_json(offer: Offer, max_cost_msat: int | None = None) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "amount_msat": offer.amount_msat,
        "description": offer.description,
        "destination": offer.destination,
        "network": offer.network,
        "payment_hash": offer.payment_hash.hex(),
        "expires_at": offer.expires_at,
        "invoice": offer.invoice,
        "token_valid_until": offer.valid_until,
        "services": list(offer.services),
    }
    if max_cost_msat is not None:
        facts["over_max_cost"] = offer.amount_msat > max_cost_msat
    return facts


def _spend_json(entry: SpendEntry) -> dict[str, Any]:
    return {
        "time": entry.time,
        "url": entry.url,
        "method": entry.method,
        "payment_hash": entry.payment_hash,
        "amount_msat": entry.amount_msat,
        "fee_msat": entry.fee_msat,
        "destination": entry.destination,
        "description": entry.description,
        "recovered": entry.recovered,
    }


def _offer_text(offer: Offer, max_cost_msat: int) -> str:
    left = offer.expires_at - time.time()
    lines = [
        f"payment required: {_sat(offer.amount_msat)} ({offer.amount_msat} msat)",
        f"  for:      {printable(offer.description)}",
        f"  pay to:   {offer.destination}",
        f"  network:  {offer.network}",
        f"  expires:  {_when(offer.expires_at)} UTC (in {max(0, int(left))} s)",
        f"  invoice:  {offer.invoice}",
    ]
    if offer.valid_until is not None:
        lines.insert(5, f"  token:    valid until {_when(offer.valid_until)} UTC")
    if offer.amount_msat > max_cost_msat:
        lines.append(f"  (over --max-cost {_sat(max_cost_msat)})")
    return "\n".join(lines)


async def _payer_network(args: argparse.Namespace, lnd: LndClient | None) -> str | None:
    network: str | None = args.network or os.environ.get("GATEWAY_PAYER_NETWORK") or None
    if network is not None or lnd is None:
        return network
    try:
        return (await lnd.get_info()).network
    except errors.BackendPermissionDenied:
        raise errors.ConfigError(
            "cannot ask the paying node for its network (the macaroon lacks info:read): "
            "pass --network"
        ) from None


def _write_output(path: str, body: bytes) -> None:
    try:
        Path(path).write_bytes(body)
    except OSError as error:
        raise errors.ConfigError(f"-o: cannot write {path}: {error.strerror}") from None


async def _pay(
    args: argparse.Namespace, method: str, headers: CIMultiDict[str], data: bytes | None
) -> int:
    settings = _payer_settings(args, required=not args.no_pay)
    if args.no_token_cache:
        cache = TokenCache()
    else:
        cache = TokenCache(args.token_cache or default_token_cache())
    declined: list[Offer] = []

    async def decline(offer: Offer) -> bool:
        declined.append(offer)
        return False

    async with contextlib.AsyncExitStack() as stack:
        lnd = await stack.enter_async_context(LndClient(settings)) if settings else None
        payer: Payer = _NoPayer() if lnd is None else lnd
        if not args.silent:
            payer = ProgressPayer(payer, sys.stderr)
        client = L402Client(
            payer,
            network=await _payer_network(args, lnd),
            # --no-pay shows any price; the cap is applied when paying.
            budget=Budget(
                max_price_msat=_UNLIMITED_MSAT if args.no_pay else args.max_cost,
                max_fee_msat=args.max_fee,
            ),
            cache=cache,
            payment_timeout=args.payment_timeout,
            confirm=decline if args.no_pay else None,
        )
        timeout = aiohttp.ClientTimeout(total=None, connect=args.timeout, sock_read=args.timeout)
        summary: dict[str, Any] = {"url": args.url, "method": method}
        async with l402_session(client, timeout=timeout) as session:
            try:
                async with session.request(
                    method, args.url, headers=headers, data=data
                ) as response:
                    body = await response.read()
                    status = response.status
            except PaymentDeclined:
                (offer,) = declined
                if args.json:
                    summary.update(status=402, paid=False, offer=_offer_json(offer, args.max_cost))
                    print(json.dumps(summary, indent=2))
                else:
                    print(_offer_text(offer, args.max_cost))
                return EXIT_PAYMENT_REQUIRED
            except ClientError as error:
                if args.json and error.offer is not None:
                    summary.update(error=str(error), offer=_offer_json(error.offer, args.max_cost))
                    print(json.dumps(summary, indent=2))
                raise
    if args.output:
        _write_output(args.output, body)
    if args.json:
        summary.update(status=status, payments=[_spend_json(e) for e in client.spending_log])
        if args.output:
            summary["output"] = args.output
        else:
            try:
                summary["body"] = body.decode()
            except UnicodeDecodeError:
                summary["body_base64"] = base64.b64encode(body).decode()
        print(json.dumps(summary, indent=2))
    elif not args.output:
        sys.stdout.buffer.write(body)
        sys.stdout.buffer.flush()
    if status >= 400:
        if not args.silent:
            print(f"l402-gateway: HTTP {status}", file=sys.stderr)
        return EXIT_HTTP_ERROR
    return 0


def _pay_command(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format=LOG_FORMAT,
    )
    try:
        method, headers, data = _request_parts(args)
        return asyncio.run(_pay(args, method, headers, data))
    except BudgetExceeded as error:
        print(f"l402-gateway: {error}", file=sys.stderr)
        return EXIT_OVER_BUDGET
    except ChallengeError as error:
        print(f"l402-gateway: {error}; nothing was paid", file=sys.stderr)
        return EXIT_BAD_CHALLENGE
    except (errors.ConfigError, TokenCacheError) as error:
        print(f"l402-gateway: {error}", file=sys.stderr)
        return EXIT_USAGE
    except errors.GatewayError as error:
        print(f"l402-gateway: {error}", file=sys.stderr)
        return EXIT_BACKEND
    except (aiohttp.ClientError, TimeoutError) as error:
        print(f"l402-gateway: request failed: {error or type(error).__name__}", file=sys.stderr)
        return EXIT_BACKEND


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="l402-gateway", description="L402 Lightning gateway")
    parser.add_argument("--config", help="TOML config file (GATEWAY_* variables override it)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the reverse proxy in front of [server] upstream")
    invoices = commands.add_parser("invoices", help="list tracked invoices")
    invoices.add_argument("--state", choices=[s.value.lower() for s in InvoiceState])
    invoices.add_argument("--limit", type=int)
    invoices.add_argument("--json", action="store_true", help="machine-readable output")
    token = commands.add_parser("token", help="manage tokens")
    token_commands = token.add_subparsers(dest="token_command", required=True)
    revoke = token_commands.add_parser("revoke", help="revoke a token by its id (hex)")
    revoke.add_argument("token_id")
    _add_pay_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "pay":
        return _pay_command(args)  # a client: reads no gateway configuration
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=LOG_FORMAT,
    )
    try:
        config = load_config(args.config)
        if args.command == "serve":
            return _serve(config)
        if args.command == "invoices":
            return asyncio.run(_invoices(config, args.state, args.limit, args.json))
        return asyncio.run(_revoke(config, args.token_id))
    except errors.ConfigError as error:
        print(f"l402-gateway: configuration error: {error}", file=sys.stderr)
        return 2
    except errors.GatewayError as error:
        print(f"l402-gateway: {error}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
