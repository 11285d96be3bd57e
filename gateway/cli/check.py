"""``l402-gateway check``: what ``serve`` would run with, checked before it runs.

Loads the configuration and the price functions, probes the LND node (reachable, the TLS
certificate, the macaroon's permissions: ``gateway.lnd.preflight``), the payment macaroons
(``[credit]`` withdrawals', the ``[[payee]]`` payouts'; a file that cannot be read is a
configuration problem) and the upstream (a TCP connection), reports the node's inbound
liquidity and the routes it cannot receive (never a problem: ``gateway.liquidity``), reports
the tip jars and where payment links are (``[lnurl]``: a warning when only this machine or
Tor can reach ``base_url``), and prints what each path costs. ``serve`` runs the same checks
at start (``startup_checks``): a problem stops it, an unreachable node or upstream is only a
warning.

Exit codes: 0 all good, 2 a configuration problem (the node refuses the macaroon or the
certificate included), 3 the node or the upstream does not answer.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from typing import Any

from gateway import errors
from gateway.cli.formats import sat, sat_number
from gateway.config import Config
from gateway.liquidity import describe, inbound_liquidity, route_warnings
from gateway.lnd.client import LndClient
from gateway.lnd.connection import LndSettings
from gateway.lnd.preflight import PAYER_PERMISSIONS, LndCheck, check_lnd, check_payer
from gateway.lnurl import jar_url, link_page_url
from gateway.ports import Liquidity
from gateway.runtime import (
    build_pricing,
    lnd_settings,
    payer_settings,
    payout_section,
    payout_settings,
    route_table,
)

log = logging.getLogger(__name__)
UPSTREAM_TIMEOUT = 5.0


def add_parser(commands: Any) -> None:
    """``check`` on the ``commands`` subparsers."""
    commands.add_parser(
        "check",
        help="check the config, the LND node, the upstream; print what each path costs",
    )


async def _upstream_answers(url: str) -> str | None:
    """Why ``url``'s host does not take a TCP connection; None when it does."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    try:
        async with asyncio.timeout(UPSTREAM_TIMEOUT):
            _, writer = await asyncio.open_connection(parts.hostname, port)
    except (OSError, TimeoutError) as error:
        return f"upstream {url} does not answer ({error or type(error).__name__})"
    writer.close()
    return None


def _payers(config: Config) -> list[tuple[str, LndSettings]]:
    """The LND connections that send payments, each with the section of its payment
    macaroon: ``[credit]`` withdrawals', the ``[[payee]]`` payouts' (``[payouts]``, else
    ``[credit]``'s: then one connection). ``ConfigError`` if a file cannot be read."""
    payers = []
    withdrawals = payer_settings(config)
    if withdrawals is not None:
        payers.append(("[credit]", withdrawals))
    payouts = payout_settings(config)
    if payouts is not None and payouts != withdrawals:
        payers.append((payout_section(config), payouts))
    return payers


def _in_section(problem: str, section: str) -> str:
    """``check_payer``'s ``problem`` naming ``section``: it names ``[credit]``, the section
    of the withdrawals' macaroon."""
    credit = "[credit] "
    return f"{section} {problem.removeprefix(credit)}" if problem.startswith(credit) else problem


async def _probe(
    config: Config, payers: list[tuple[str, LndSettings]]
) -> tuple[LndCheck, str | None]:
    """What the probes of the node and of the ``payers`` found, and why the upstream does not
    answer (None: it does)."""
    lnd = await check_lnd(lnd_settings(config))
    for section, settings in payers:
        payer = await check_payer(settings)
        problems = tuple(_in_section(problem, section) for problem in payer.problems)
        lnd = LndCheck(lnd.problems + problems, lnd.unreachable or payer.unreachable)
    upstream = await _upstream_answers(config.server.upstream) if config.server.upstream else None
    return lnd, upstream


async def _liquidity(config: Config) -> Liquidity:
    """The node's inbound liquidity (unknown without ``offchain:read``: never a problem)."""
    async with LndClient(lnd_settings(config)) as lnd:
        return await inbound_liquidity(lnd)


def tips_lines(config: Config) -> list[str]:
    """What ``[lnurl]`` serves: each tip jar's Lightning Address, URL, amounts and comments,
    where the payment links' pages are, and a warning when few wallets can reach them; none
    without ``[lnurl] base_url``."""
    lnurl = config.lnurl
    if not lnurl.enabled:
        return []
    origin = lnurl.origin
    lines = [f"lnurl: {origin} (tip jars and payment links)"]
    for jar in config.tip_jar:
        least, most = jar.min_msat, jar.max_msat
        amounts = sat(least) if least == most else f"{sat_number(least)} to {sat(most)}"
        comments = (
            f"comments up to {jar.comment_max} characters" if jar.comment_max else "no comments"
        )
        lines.append(
            f"  tip jar {jar.name}@{lnurl.domain}: {jar_url(origin, jar.name)}, {amounts}, "
            f"{comments}"
        )
    lines.append(f"  payment links: {link_page_url(origin, '<id>')}")
    if lnurl.reached_by:
        lines.append(f"warning: [lnurl] base_url {origin}: only {lnurl.reached_by} can reach it")
    return lines


def startup_checks(config: Config) -> None:
    """``serve``'s checks: each problem and warning in one line; ``ConfigError`` if there is
    a problem. (The route table is logged by ``running_runtime``, in every front end.)"""
    build_pricing(config)
    lnd, upstream = asyncio.run(_probe(config, _payers(config)))
    for warning in (lnd.unreachable, upstream):
        if warning is not None:
            log.warning("%s; starting anyway (requests get 503 or 502 until it answers)", warning)
    for problem in lnd.problems:
        log.error("%s", problem)
    if lnd.problems:
        raise errors.ConfigError(
            f"{len(lnd.problems)} problem(s) with the LND node's settings, logged above"
        )


def run(config: Config, source: str | None) -> int:
    """The ``check`` command: findings and the route table on stdout; its exit code."""
    build_pricing(config)  # ConfigError: the caller says it in one line, exit 2
    lnd_settings(config)
    payers = _payers(config)  # the payment macaroons' files too
    print(f"config: ok ({source or 'defaults and GATEWAY_* variables'})")
    lnd, upstream = asyncio.run(_probe(config, payers))
    for problem in lnd.problems:
        print(f"problem: {problem}")
    if lnd.unreachable is not None:
        print(f"unreachable: {lnd.unreachable}")
    if lnd.ok:
        print(f"lnd: ok ({config.lnd.host}: TLS, macaroon with invoices:read and invoices:write)")
        for section, _ in payers:
            print(f"payer: ok ({section} payment_macaroon with {PAYER_PERMISSIONS})")
        rules = build_pricing(config).rules
        liquidity = asyncio.run(_liquidity(config))
        print(f"liquidity: {describe(liquidity, rules)}")
        for line in route_warnings(rules, liquidity):
            print(f"warning: {line}")
    if upstream is not None:
        print(f"unreachable: {upstream}")
    elif config.server.upstream:
        print(f"upstream: ok ({config.server.upstream} takes connections)")
    for line in tips_lines(config):
        print(line)
    print("routes, first match decides:")
    for line in route_table(config):
        print(f"  {line}")
    if lnd.problems:
        return 2
    return 3 if upstream is not None or lnd.unreachable is not None else 0
