"""``l402-gateway credit balance URL`` and ``credit withdraw URL``: a credit token's balance,
and paying the balance out to the payer's own node.

Both use the token ``l402-gateway pay`` cached for URL (``--token-cache``, as ``pay``) and
reach the gateway at URL's origin: ``balance`` asks ``GET /.well-known/l402/token``;
``withdraw`` reads the balance there, makes an invoice on the payer's LND node
(``--lnd-*`` or ``GATEWAY_PAYER_LND_*`` as ``pay``; the macaroon needs invoices:write) for
``--amount-msat`` or for all the balance the gateway's fee reserve leaves, and posts it to
``POST /.well-known/l402/withdraw``. Like ``pay``, it reads no gateway configuration. Exit
codes: ``CREDIT_EXIT_CODES`` below.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from gateway import errors
from gateway.cli.formats import columns, configure_logging, sat, utc_time
from gateway.cli.pay import (
    add_node_options,
    add_timeout_option,
    add_token_cache_option,
    default_token_cache,
    payer_settings,
    report_failure,
)
from gateway.client import CachedToken, TokenCache
from gateway.client.tokens import split_url
from gateway.lnd.client import LndClient
from gateway.ports import Msat
from gateway.service.withdraw import fee_reserve
from gateway.text import printable, whole_number
from gateway.web.credit import TOKEN_INFO_PATH, WITHDRAW_PATH

__all__ = ["CREDIT_EXIT_CODES", "add_parser", "run", "withdrawable"]

CREDIT_EXIT_CODES = """exit codes:
  0  the balance was shown, or the withdrawal SUCCEEDED
  1  the gateway refused (no credit account, withdrawals not enabled, an invoice it will not
     pay, an amount over the balance) or the withdrawal FAILED: the balance is back
  2  bad usage or configuration (options, LND files, token cache, no cached token for URL)
  3  a backend failed: the HTTP request, the gateway's answer, or LND
  4  the withdrawal is PENDING: the gateway finishes it on its own; check again later"""
EXIT_REFUSED = 1
EXIT_PENDING = 4  # 2 and 3 as pay's (report_failure)
# The gateway's defaults, for a token info that does not say (withdrawal_fee_*).
DEFAULT_FEE_MIN_MSAT = 1_000
DEFAULT_FEE_PPM = 5_000
# Long enough for the gateway's checks (it refuses one expiring within a minute) and its wait.
INVOICE_EXPIRY = 600
_MAX_ANSWER_BYTES = 64 * 1024  # a token info with its 20 charges is a few kilobytes


class Refused(errors.GatewayError):
    """The gateway said no (or would: an amount over the balance); exit 1."""


class BadAnswer(errors.GatewayError):
    """The gateway's answer is not what the endpoint promises; exit 3."""


def add_parser(commands: Any) -> None:
    credit = commands.add_parser(
        "credit",
        help="a credit token's balance, and withdrawing it",
        description="A prepaid credit token bought with 'l402-gateway pay': its balance and "
        "usage, and withdrawing the balance to your own LND node.",
    )
    actions = credit.add_subparsers(dest="credit_command", required=True)
    balance = actions.add_parser(
        "balance",
        help="balance, spending and recent usage of the token cached for URL",
        description="Ask the gateway at URL's origin about the token 'l402-gateway pay' "
        f"cached for URL ({TOKEN_INFO_PATH}).",
        epilog=CREDIT_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    withdraw = actions.add_parser(
        "withdraw",
        help="pay the balance of the token cached for URL to your own node",
        description="Make an invoice on your LND node for --amount-msat, or for the balance "
        "minus the gateway's fee reserve, and have the gateway pay it "
        f"({WITHDRAW_PATH}).",
        epilog=CREDIT_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    withdraw.add_argument(
        "--amount-msat",
        type=_positive,
        metavar="N",
        help="withdraw N msat (default: all the balance the fee reserve leaves)",
    )
    add_node_options(withdraw, "invoices:write")
    for command in (balance, withdraw):
        command.add_argument("url", help="a URL the token was bought for (as given to pay)")
        command.add_argument(
            "-X",
            "--request",
            dest="method",
            default="GET",
            metavar="METHOD",
            help="the token pay would send with METHOD URL (default GET)",
        )
        command.add_argument("--json", action="store_true", help="print JSON on stdout")
        add_token_cache_option(command)
        add_timeout_option(command)


def _positive(text: str) -> int:
    msat = whole_number(text)
    if msat is None or msat <= 0:
        raise argparse.ArgumentTypeError(f"not a positive number of msat: {printable(text, 40)!r}")
    return msat


def withdrawable(balance_msat: int, fee_min_msat: int, fee_ppm: int) -> int:
    """The largest amount whose fee reserve the balance also covers (0 if none)."""
    amount = min(balance_msat - fee_min_msat, balance_msat * 1_000_000 // (1_000_000 + fee_ppm))
    while amount > 0 and amount + fee_reserve(amount, fee_min_msat, fee_ppm) > balance_msat:
        amount -= 1  # the rounding up costs at most a msat or two
    return max(amount, 0)


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """The gateway's token info, checked; ``document`` is the JSON as it came."""

    document: dict[str, Any]
    balance_msat: int
    fee_min_msat: int
    fee_ppm: int


def _msat(document: dict[str, Any], key: str) -> int:
    value = document.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BadAnswer(f"the gateway's answer has no valid {key!r}")
    return value


def _optional_msat(document: dict[str, Any], key: str, default: int) -> int:
    return default if document.get(key) is None else _msat(document, key)


async def _cached_token(args: argparse.Namespace) -> tuple[str, CachedToken]:
    """(origin, the token pay would send with ``METHOD URL``)."""
    try:
        origin, _ = split_url(args.url)
    except ValueError as error:
        raise errors.ConfigError(str(error)) from None
    if not origin.startswith(("http://", "https://")):
        raise errors.ConfigError(f"not an http(s) URL: {args.url!r}")
    cache = TokenCache(args.token_cache or default_token_cache())
    method = args.method.upper()
    token = await cache.find(args.url, method, time.time())
    if token is None:
        raise errors.ConfigError(
            f"no cached token for {method} {args.url} in {cache.path}: buy credit first "
            "with 'l402-gateway pay URL'"
        )
    return origin, token


async def _call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    token: CachedToken,
    payload: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any] | None, str]:
    """(status, the JSON object answered or None, what to say about the status)."""
    headers = {"Authorization": token.authorization}
    async with http.request(method, url, headers=headers, json=payload) as response:
        body = bytearray()
        while len(body) <= _MAX_ANSWER_BYTES and (
            chunk := await response.content.read(_MAX_ANSWER_BYTES + 1 - len(body))
        ):
            body += chunk
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            document = None
        if not isinstance(document, dict):
            document = None
        detail = document.get("detail") if document is not None else None
        said = printable(f"HTTP {response.status} {response.reason or ''}".rstrip())
        if isinstance(detail, str) and detail:
            said = f"{printable(detail)} ({said})"
        return response.status, document, said


async def _token_info(http: aiohttp.ClientSession, origin: str, token: CachedToken) -> TokenInfo:
    status, document, said = await _call(http, "GET", origin + TOKEN_INFO_PATH, token)
    if status == 404 and document is None:
        raise Refused(f"the gateway at {origin} offers no token info ({said}): no credit there")
    if status != 200:
        raise Refused(f"the gateway refused the token info: {said}")
    if document is None:
        raise BadAnswer(f"the gateway's token info is not a JSON object ({said})")
    return TokenInfo(
        document,
        _msat(document, "balance_msat"),
        _optional_msat(document, "withdrawal_fee_min_msat", DEFAULT_FEE_MIN_MSAT),
        _optional_msat(document, "withdrawal_fee_ppm", DEFAULT_FEE_PPM),
    )


def _when(value: object) -> str:
    """A time the gateway sent, in UTC; ``-`` if it is not one."""
    if not isinstance(value, int | float):
        return "-"
    try:
        return f"{utc_time(value)} UTC"
    except (OverflowError, OSError, ValueError):
        return "-"


def _amount_text(value: object) -> str:
    return f"{sat(value)} ({value} msat)" if isinstance(value, int) else "-"


def _info_text(document: dict[str, Any], url: str) -> str:
    def amount(key: str) -> str:
        return _amount_text(document.get(key))

    lines = [
        f"credit of the token for {printable(url)}",
        f"  token:        {printable(str(document.get('token_id', '-')))}",
        f"  service:      {printable(str(document.get('service', '-')))}",
        f"  balance:      {amount('balance_msat')}",
        f"  credited:     {amount('credited_msat')}",
        f"  spent:        {amount('spent_msat')}",
        f"  reserved:     {amount('reserved_msat')}  (requests under way)",
        f"  withdrawn:    {amount('withdrawn_msat')}",
        f"  valid until:  {_when(document.get('valid_until'))}",
    ]
    listed = document.get("recent")
    recent = [r for r in listed if isinstance(r, dict)] if isinstance(listed, list) else []
    if not recent:
        return "\n".join([*lines, "  recent usage: none"])
    rows = [("    AT", "AMOUNT msat", "REQUEST")]
    for charge in recent:
        rows.append(
            (
                f"    {_when(charge.get('at'))}",
                printable(str(charge.get("amount_msat", "-"))),
                # The gateway's client chose these: escaped, they cannot drive the terminal.
                printable(f"{charge.get('method', '')} {charge.get('path', '')}"),
            )
        )
    return "\n".join([*lines, "  recent usage:", *columns(rows)])


async def _balance(args: argparse.Namespace) -> int:
    origin, token = await _cached_token(args)
    async with aiohttp.ClientSession(timeout=_timeout(args)) as http:
        info = await _token_info(http, origin, token)
    if args.json:
        print(json.dumps({"url": args.url, **info.document}, indent=2, ensure_ascii=True))
    else:
        print(_info_text(info.document, args.url))
    return 0


def _timeout(args: argparse.Namespace) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=None, connect=args.timeout, sock_read=args.timeout)


def _amount(args: argparse.Namespace, info: TokenInfo) -> int:
    """What to withdraw; Refused if the balance does not cover it with its fee reserve."""
    balance = info.balance_msat
    asked: int | None = args.amount_msat
    if asked is None:
        amount = withdrawable(balance, info.fee_min_msat, info.fee_ppm)
        if amount <= 0:
            raise Refused(
                f"nothing to withdraw: the balance ({balance} msat) does not cover the "
                f"gateway's fee reserve (at least {info.fee_min_msat} msat)"
            )
        return amount
    reserve = fee_reserve(asked, info.fee_min_msat, info.fee_ppm)
    if asked + reserve > balance:
        most = withdrawable(balance, info.fee_min_msat, info.fee_ppm)
        raise Refused(
            f"{asked} msat plus the fee reserve of {reserve} msat is more than the "
            f"balance of {balance} msat; at most {most} msat can be withdrawn"
        )
    return asked


async def _withdraw(args: argparse.Namespace) -> int:
    origin, token = await _cached_token(args)
    settings = payer_settings(args, required=True, needs="credit withdraw")
    assert settings is not None  # required
    async with aiohttp.ClientSession(timeout=_timeout(args)) as http:
        info = await _token_info(http, origin, token)
        amount = _amount(args, info)
        async with LndClient(settings) as lnd:
            invoice = await lnd.add_invoice(
                Msat(amount), f"withdrawal of L402 credit from {origin}", INVOICE_EXPIRY
            )
        payload = {"invoice": invoice.payment_request}
        status, outcome, said = await _call(http, "POST", origin + WITHDRAW_PATH, token, payload)
    state = outcome.get("state") if outcome is not None else None
    if status not in (200, 202, 502) or state not in ("SUCCEEDED", "PENDING", "FAILED"):
        if status < 400:
            raise BadAnswer(f"the gateway's answer to the withdrawal is not one: {said}")
        raise Refused(f"the gateway refused the withdrawal: {said}")
    assert outcome is not None
    return _report(args, state, outcome, invoice.payment_hash.hex())


def _report(
    args: argparse.Namespace, state: str, outcome: dict[str, Any], payment_hash: str
) -> int:
    """Print the withdrawal's outcome; the exit code for ``state``."""
    if args.json:
        print(json.dumps({"url": args.url, **outcome}, indent=2, ensure_ascii=True))
    amount, fee, balance = (
        _amount_text(outcome.get(key)) for key in ("amount_msat", "fee_msat", "balance_msat")
    )

    if state == "SUCCEEDED":
        if not args.json:
            print(
                f"withdrawal SUCCEEDED: {amount} paid to your node, routing fee "
                f"{fee}; balance left {balance}"
            )
        return 0
    if state == "FAILED":
        print(
            f"withdrawal FAILED: the gateway could not pay your invoice; the balance is back: "
            f"{balance}",
            file=sys.stderr,
        )
        return EXIT_REFUSED
    print(
        f"withdrawal PENDING: the gateway is still paying {amount} (payment hash "
        f"{payment_hash}) and finishes it on its own. Check later with "
        f"'l402-gateway credit balance {args.url}' (a failed withdrawal's amount comes back "
        f"to the balance) or on your node: 'lncli lookupinvoice {payment_hash}'",
        file=sys.stderr,
    )
    return EXIT_PENDING


def run(args: argparse.Namespace) -> int:
    """The ``credit`` commands; their exit code."""
    configure_logging(logging.DEBUG if args.verbose else logging.WARNING, args.log_format)
    command = _balance if args.credit_command == "balance" else _withdraw
    try:
        return asyncio.run(command(args))
    except Refused as error:
        print(f"l402-gateway: {error}", file=sys.stderr)
        return EXIT_REFUSED
    except (errors.GatewayError, aiohttp.ClientError, TimeoutError) as error:
        return report_failure(error)
