"""``l402-gateway``: the command line, one module per command; nothing imports it.

Commands::

    l402-gateway --config gateway.toml serve          reverse proxy in front of [server] upstream
    l402-gateway --config gateway.toml check          config, LND, upstream; what paths cost
    l402-gateway --config gateway.toml invoices       tracked invoices (table, --json, --csv)
    l402-gateway --config gateway.toml accounts       credit accounts and totals (--json)
    l402-gateway --config ... token revoke TOKEN_ID   revoke one token
    l402-gateway --config ... backup FILE             consistent copy of the SQLite store
    l402-gateway pay URL [-X M] [-H 'N: v'] [-d D]   fetch URL, paying its L402 challenge
    l402-gateway pay ADDRESS|LNURL [--amount A] [--comment T]   pay by LNURL-pay (tips)
    l402-gateway credit balance URL                  the credit of the token cached for URL
    l402-gateway credit withdraw URL [--amount-msat N]   ... paid out to the payer's node
    l402-gateway --config ... webhooks list|show|redeliver|new-secret   the signed webhooks
    l402-gateway --config ... payees [--json]        revenue split payees and the ledger's totals
    l402-gateway --config ... payouts [--payee N] [--state S] [--limit N] [--json]   history
    l402-gateway --config ... payouts pay [--payee N] [--json]   pay their accrued shares now
    l402-gateway --config ... links [--state S] [--limit N] [--json]   payment links
    l402-gateway --config ... links create (--amount A | --min A --max B) [--memo T]
                              [--expires 1h] [--reusable] [--json]   a new payment link
    l402-gateway --config ... links cancel ID [--json]   it takes no more payments
    l402-gateway sample-config                       the commented sample configuration
    l402-gateway --version

``--config``, ``-v`` and ``--log-format text|json`` (JSON lines; default
``$GATEWAY_LOG_FORMAT``, else text) may also follow the command; given in both places, the
later wins.

Exit codes: 0 success, 1 nothing matched (e.g. unknown token), 2 bad usage or configuration,
3 a backend (store, LND) failed (``payouts pay``: or a payout FAILED or is still PENDING;
``links cancel``: the node could not cancel the link's open invoice),
4 the books do not reconcile (``accounts``, ``payees``: the totals are printed all the same;
``EXIT_DOES_NOT_RECONCILE``); ``pay`` and ``credit`` have their own. The commands get their
running objects from ``gateway.runtime``, which is what applications import.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from importlib import metadata
from typing import Any

# Unset, gRPC's C core logs a failed TLS handshake in raw lines of its own, which the
# commands report translated, in one line; ERROR keeps its errors. Read when grpc is imported.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
# The client calls on the C core's own poller instead of the EventEngine's threads: fewer
# hand-overs between threads per call, 22-26% less CPU per AddInvoice measured (bench/).
# Read when grpc is imported; the workers of serve inherit it.
os.environ.setdefault("GRPC_EXPERIMENTS", "-event_engine_client")

from gateway import errors
from gateway.cli import admin, backup, check, credit, links, pay, payouts, serve, webhooks
from gateway.cli.formats import LOG_FORMATS, configure_logging
from gateway.config import load_config

__all__ = ["main"]
_LND_COMMANDS = frozenset({"serve", "check"})
_CLIENT_COMMANDS = frozenset({"pay", "credit"})  # they read no gateway configuration


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="l402-gateway", description="L402 Lightning gateway")
    parser.add_argument("--config", help="TOML config file (GATEWAY_* variables override it)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--log-format",
        type=_log_format,
        default=os.environ.get("GATEWAY_LOG_FORMAT", "text"),
        metavar="FMT",
        help="text or json (JSON lines: one object per log record); "
        "default $GATEWAY_LOG_FORMAT, else text",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve.add_parser(commands)
    check.add_parser(commands)
    admin.add_parsers(commands)
    backup.add_parser(commands)
    pay.add_parser(commands)
    credit.add_parser(commands)
    webhooks.add_parser(commands)
    payouts.add_parsers(commands)
    links.add_parsers(commands)
    _options_after_the_command(commands)
    return parser


def _log_format(value: str) -> str:
    """``--log-format``'s value (also ``GATEWAY_LOG_FORMAT``'s): one of ``LOG_FORMATS``."""
    if value not in LOG_FORMATS:
        raise argparse.ArgumentTypeError(
            f"invalid log format {value!r} (choose from {', '.join(LOG_FORMATS)})"
        )
    return value


def _version() -> str:
    try:
        return metadata.version("l402-gateway")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def _options_after_the_command(
    commands: argparse._SubParsersAction[Any],
    clients: frozenset[str] = _CLIENT_COMMANDS,
    client: bool = False,
) -> None:
    """``--config``, ``-v`` and ``--log-format`` are also accepted after the command
    (``invoices --config c``), at every level; given in both places, the one after the
    command wins. ``clients``: the commands of this level that read no configuration (the
    top level's; ``payouts pay`` reads one)."""
    for name, command in commands.choices.items():
        known = command._option_string_actions
        # SUPPRESS: given only before the command, the value from there is kept.
        reads_config = not client and name not in clients
        if reads_config and "--config" not in known:
            command.add_argument(
                "--config",
                default=argparse.SUPPRESS,
                help="TOML config file (as before the command)",
            )
        if "-v" not in known and "--verbose" not in known:
            command.add_argument(
                "-v",
                "--verbose",
                action="store_true",
                default=argparse.SUPPRESS,
                help="debug logging",
            )
        if "--log-format" not in known:
            command.add_argument(
                "--log-format",
                type=_log_format,
                default=argparse.SUPPRESS,
                metavar="FMT",
                help="text (default) or json: JSON lines (as before the command)",
            )
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                _options_after_the_command(action, frozenset(), client=not reads_config)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command ``argv`` (default ``sys.argv[1:]``) names; its exit code."""
    args = _parser().parse_args(argv)
    if args.command == "pay":
        return pay.run(args)  # a client: reads no gateway configuration
    if args.command == "credit":
        return credit.run(args)
    if args.command == "sample-config":
        return admin.sample_config()
    configure_logging(logging.DEBUG if args.verbose else logging.INFO, args.log_format)
    try:
        # Only serve, check, payouts pay and links cancel talk to LND: no warning about its
        # macaroons for the others.
        uses_lnd = args.command in _LND_COMMANDS or payouts.uses_lnd(args) or links.uses_lnd(args)
        config = load_config(args.config, uses_lnd=uses_lnd)
        if args.command == "serve":
            return serve.run(config)
        if args.command == "check":
            return check.run(config, args.config)
        if args.command == "invoices":
            return asyncio.run(admin.invoices(config, admin.Query.from_args(args)))
        if args.command == "accounts":
            return asyncio.run(admin.accounts(config, args.limit, args.json))
        if args.command == "backup":
            return backup.run(config, args.file)
        if args.command == "webhooks":
            return webhooks.run(config, args)
        if args.command in ("payees", "payouts"):
            return payouts.run(config, args)
        if args.command == "links":
            return links.run(config, args)
        return asyncio.run(admin.revoke(config, args.token_id))
    except errors.ConfigError as error:
        print(f"l402-gateway: configuration error: {error}", file=sys.stderr)
        return 2
    except errors.GatewayError as error:
        print(f"l402-gateway: {error}", file=sys.stderr)
        return 3
