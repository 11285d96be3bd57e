"""``l402-gateway``: the one place that reads configuration and wires the adapters together.

Commands::

    l402-gateway serve --config gateway.toml          reverse proxy in front of [server] upstream
    l402-gateway invoices --config gateway.toml       tracked invoices (table, or --json)
    l402-gateway token revoke TOKEN_ID --config ...   revoke one token

Exit codes: 0 success, 1 nothing matched (e.g. unknown token), 2 bad usage or configuration,
3 a backend (store, LND) failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from aiohttp import web

from gateway import errors
from gateway.config import Config, RouteConfig, load_config
from gateway.lnd.client import LndClient
from gateway.lnd.connection import LndSettings
from gateway.ports import Clock, InvoiceRecord, InvoiceState, Msat, Store
from gateway.pricing import PriceFunction, Pricing, Rule
from gateway.service import L402Service, RateLimiter, SystemClock
from gateway.store import open_store
from gateway.watcher import InvoiceWatcher
from gateway.web.proxy import build_proxy

log = logging.getLogger(__name__)


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
    return Pricing(rules)


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
    config: Config, *, clock: Clock | None = None
) -> AsyncIterator[L402Service]:
    """Open the store and the LND client, run the settlement watcher, yield the service."""
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
                    limits.challenges_per_second, limits.burst, limits.max_clients, clock
                ),
            )
            watcher = InvoiceWatcher(lnd, store)
            task = asyncio.create_task(watcher.run(), name="l402-invoice-watcher")
            try:
                yield service
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
    finally:
        await store.close()


def _serve(config: Config) -> int:
    if not config.server.upstream:
        raise errors.ConfigError("[server] upstream is required for serve (the backend URL)")
    build_pricing(config)
    lnd_settings(config)  # fail on a bad config before binding the port
    host, _, port = config.server.listen.rpartition(":")
    if not host or not port.isdigit():
        raise errors.ConfigError(f"[server] listen must be host:port, got {config.server.listen}")
    app = build_proxy(
        config.server.upstream,
        lambda: running_gateway(config),
        token_header=config.server.token_header,
        trust_forwarded_for=config.server.trust_forwarded_for,
        max_body_bytes=config.server.max_body_bytes,
    )
    log.info("l402-gateway proxying %s on %s", config.server.upstream, config.server.listen)
    web.run_app(app, host=host, port=int(port), print=None, handle_signals=True)
    return 0


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
            r.service,
            f"{r.method} {r.path}",
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


async def _with_store(config: Config) -> Store:
    return await open_store(config.store.url)


async def _invoices(config: Config, state: str | None, limit: int | None, as_json: bool) -> int:
    wanted = InvoiceState(state.upper()) if state else None
    store = await _with_store(config)
    try:
        records = await store.list_invoices(state=wanted, limit=limit)
    finally:
        await store.close()
    if as_json:
        print(json.dumps([_record_json(r) for r in records], indent=2))
    else:
        print(_table(records))
    return 0


async def _revoke(config: Config, token_id: str) -> int:
    try:
        raw = bytes.fromhex(token_id)
    except ValueError:
        raise errors.ConfigError(f"token id must be hex, got {token_id!r}") from None
    store = await _with_store(config)
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
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
