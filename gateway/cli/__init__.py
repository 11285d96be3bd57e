"""``l402-gateway``: the command line, one module per command; nothing imports it.

Commands::

    l402-gateway --config gateway.toml serve          reverse proxy in front of [server] upstream
    l402-gateway --config gateway.toml invoices       tracked invoices (table, or --json)
    l402-gateway --config ... token revoke TOKEN_ID   revoke one token
    l402-gateway pay URL [-X M] [-H 'N: v'] [-d D]   fetch URL, paying its L402 challenge

Exit codes: 0 success, 1 nothing matched (e.g. unknown token), 2 bad usage or configuration,
3 a backend (store, LND) failed; ``pay`` has its own (``gateway.cli.pay``). The commands get
their running objects from ``gateway.runtime``, which is what applications import.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from gateway import errors
from gateway.cli import admin, pay, serve
from gateway.cli.formats import LOG_FORMAT
from gateway.config import load_config

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="l402-gateway", description="L402 Lightning gateway")
    parser.add_argument("--config", help="TOML config file (GATEWAY_* variables override it)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)
    serve.add_parser(commands)
    admin.add_parsers(commands)
    pay.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command ``argv`` (default ``sys.argv[1:]``) names; its exit code."""
    args = _parser().parse_args(argv)
    if args.command == "pay":
        return pay.run(args)  # a client: reads no gateway configuration
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=LOG_FORMAT,
    )
    try:
        config = load_config(args.config)
        if args.command == "serve":
            return serve.run(config)
        if args.command == "invoices":
            return asyncio.run(admin.invoices(config, args.state, args.limit, args.json))
        return asyncio.run(admin.revoke(config, args.token_id))
    except errors.ConfigError as error:
        print(f"l402-gateway: configuration error: {error}", file=sys.stderr)
        return 2
    except errors.GatewayError as error:
        print(f"l402-gateway: {error}", file=sys.stderr)
        return 3
