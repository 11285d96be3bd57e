"""``l402-gateway pay URL``: fetch a URL, paying its L402 challenge (curl-like); or
``l402-gateway pay TARGET --amount A``: pay a Lightning Address or an LNURL (LNURL-pay).

The body goes to stdout, or to ``-o FILE``. It pays through an LND node given by
``--lnd-host/--lnd-tls-cert/--lnd-macaroon`` or ``GATEWAY_PAYER_LND_HOST``,
``GATEWAY_PAYER_LND_TLS_CERT``, ``GATEWAY_PAYER_LND_MACAROON`` (it reads no ``--config``).
The invoice must be for the node's network (``--network`` or ``GATEWAY_PAYER_NETWORK``, else
asked from the node). Tokens are cached in ``--token-cache`` (default
``~/.cache/l402-gateway/tokens.json``) and reused for later requests in their scope. Progress
goes to stderr: a start and an end line around the payment, and on a terminal an
elapsed-seconds counter while it is in flight (``-s``: none). Its exit codes are
``PAY_EXIT_CODES`` below (also printed by ``l402-gateway pay --help``). On a credit route
(a prepaid balance) the payment buys credit, ``--max-cost`` bounds the credit bought, and the
balance the response reports goes to stderr (``--json``: ``balance_msat``). On a
pay-on-success route it says before paying that the request runs while the payment is held
and is paid for only if it succeeds; a payment the gateway cancelled because the request
failed ends with ``refunded: <why>`` (exit 3).

A TARGET that is no http(s) URL (a Lightning Address ``name@domain``, an LNURL
``lnurl1...``, either after ``lightning:``), or any TARGET given ``--amount`` or ``--comment``
(then an https URL is the LNURL-pay service's own), is paid by LNURL-pay
(``gateway.client.lnurl``): the service's terms are fetched, the amount (``--amount``, needed
unless the service fixes it) and the comment (LUD-12) checked against them, the amount
against ``--max-cost``, which bounds it with the routing fee, then the service's invoice is
checked (the amount asked, the description hash of the service's metadata, the node's
network) and paid through the same node, with the same progress, its payment hash on stderr
first. stdout gets the receipt and the service's success action (a message; a URL; an
encrypted text decrypted with the payment's preimage); ``--json`` a summary; ``--no-pay``
shows the service's terms (exit 6). A call to the node that ends without the payment's
outcome (broken, out of time) is no failure: the node is asked how the payment stands, and
one that succeeded is shown as paid, one still in flight (or that the node cannot tell)
exits 7 with its hash, so that nobody pays a second invoice for it unawares.

One module for the one command, a little over the usual size: its options, its payer, its
output and its exit codes are read together.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import aiohttp
from multidict import CIMultiDict

from gateway import destinations, errors
from gateway.cli.formats import configure_logging, parse_seconds, sat, sat_to_msat, utc_time
from gateway.client import (
    DEFAULT_MAX_SETTLE_SECONDS,
    NETWORKS,
    Budget,
    BudgetExceeded,
    ChallengeError,
    ClientError,
    L402Client,
    Offer,
    PaymentDeclined,
    PaymentInFlight,
    SpendEntry,
    TokenCache,
    TokenCacheError,
    balance_from_headers,
    decode_invoice,
)
from gateway.client.aiohttp import l402_session
from gateway.client.lnurl import (
    MAX_BODY_BYTES,
    LnurlPayClient,
    LnurlUnreachable,
    PayRequest,
    ReceivedSuccessAction,
)
from gateway.lnd.client import LndClient
from gateway.lnd.connection import LndSettings
from gateway.ports import Msat, Payer, Payment, PaymentHash, PaymentStatus
from gateway.text import printable

# pay --help: its paragraphs (the exit codes below are laid out by hand: raw text).
_DESCRIPTION = (
    "Fetch an http(s) URL, paying its L402 challenge (curl-like); or pay a Lightning "
    "Address or an LNURL by LNURL-pay. Either way through LND.",
    "URL: on 402 Payment Required with an L402 challenge, check the invoice and the price, "
    "pay it, and retry with the token. The body goes to stdout (or -o FILE); progress to "
    "stderr. Tokens are cached and reused in their scope.",
    "Lightning Address (name@domain), LNURL (lnurl1...), either after lightning:, or an "
    "LNURL-pay https:// URL given --amount or --comment: pay by LNURL-pay, --amount "
    "(unless the service fixes it), --comment, --max-cost as the budget of amount and "
    "routing fee. The payment hash goes to stderr before paying; stdout gets the receipt "
    "and the service's success action.",
)
PAY_EXIT_CODES = """exit codes:
  0  the response came, with a status below 400 (paid, reused a token, or free);
     LNURL-pay: paid
  1  the final response has an HTTP error status (>= 400), e.g. still 402 after paying
  2  bad usage or configuration (options, LND files, unreadable token cache, -o file);
     LNURL-pay: no --amount where the service takes a range, an amount or a comment the
     service does not take; nothing was paid
  3  a backend failed: LND unreachable or the payment failed (or was refunded: the
     request failed on a pay-on-success route), the HTTP request failed (LNURL-pay: the
     service did not answer)
  4  over budget: the price (LNURL-pay: the amount) is over --max-cost, or a pay-on-success
     offer would hold the payment longer than --max-settle-time, or does not say how long;
     nothing was paid
  5  the challenge or its invoice is unusable: wrong network, expired, amount or payment
     hash mismatch, malformed (LNURL-pay: the service's answer, e.g. a refusal, a wrong
     description hash); nothing was paid
  6  --no-pay and payment is required: the price (LNURL-pay: the service's terms) was
     printed, nothing was paid
  7  a payment may still be in flight: do not pay again. An earlier one for this URL
     (L402), or this one (LNURL-pay: the call to the node broke or ran out of time,
     and the node reports the payment in flight, or cannot be asked); check it with
     `lncli trackpayment <payment hash>` (the hash is on stderr)"""
EXIT_HTTP_ERROR = 1
EXIT_USAGE = 2
EXIT_BACKEND = 3
EXIT_OVER_BUDGET = 4
EXIT_BAD_CHALLENGE = 5
EXIT_PAYMENT_REQUIRED = 6
EXIT_IN_FLIGHT = 7
DEFAULT_MAX_COST_SAT = 1000
_UNLIMITED_MSAT = 2**62
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Seconds between the node's answers on a payment whose sending ended without an outcome:
# the node may be back a moment later, or record a payment a moment after a broken call.
_LOOKUP_DELAYS = (0.5, 1.0, 2.0)
_LOOKUP_SECONDS = 30.0  # all of them, each lookup's own deadline included


def default_token_cache() -> Path:
    """``$XDG_CACHE_HOME/l402-gateway/tokens.json``, else ``~/.cache/l402-gateway/...``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "l402-gateway" / "tokens.json"


def add_parser(commands: Any) -> None:
    pay = commands.add_parser(
        "pay",
        help="fetch a URL, paying its L402 challenge (curl-like); or pay a Lightning Address",
        description="\n\n".join(textwrap.fill(part, 79) for part in _DESCRIPTION),
        epilog=PAY_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pay.add_argument(
        "url",
        metavar="TARGET",
        help="http(s) URL; or a Lightning Address, LNURL, lightning:... to pay by LNURL-pay",
    )
    pay.add_argument(
        "--amount",
        type=sat_to_msat,
        metavar="AMOUNT",
        help="LNURL-pay: what to send, in sat (21, 0.5sat) or msat (21000msat); "
        "needed unless the service takes one amount only",
    )
    pay.add_argument(
        "--comment",
        metavar="TEXT",
        help="LNURL-pay: a comment for the payee (LUD-12); refused before paying if the "
        "service takes none, or none this long",
    )
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
        type=sat_to_msat,
        default=DEFAULT_MAX_COST_SAT * 1000,
        metavar="SAT",
        help="the most to pay, fee excluded: the request's price, or on a credit route the "
        "credit bought; LNURL-pay: the amount and the routing fee together "
        f"(default {DEFAULT_MAX_COST_SAT})",
    )
    pay.add_argument(
        "--max-fee",
        type=sat_to_msat,
        metavar="SAT",
        help="routing fee cap (default 1%% of the price, at least 5 sat; LNURL-pay: at most "
        "what --max-cost leaves)",
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
    add_node_options(pay, "offchain:write")
    add_token_cache_option(pay)
    pay.add_argument("--no-token-cache", action="store_true", help="keep tokens in memory only")
    add_timeout_option(pay)
    pay.add_argument(
        "--payment-timeout",
        type=parse_seconds,
        default=60.0,
        help="seconds LND may try to pay (pay on success: at least the backend's time + 30)",
    )
    pay.add_argument(
        "--max-settle-time",
        type=parse_seconds,
        default=DEFAULT_MAX_SETTLE_SECONDS,
        metavar="SECONDS",
        help=f"pay on success: refuse (exit {EXIT_OVER_BUDGET}) an offer that would hold the "
        "payment longer while the backend runs, or does not say how long (default "
        f"{DEFAULT_MAX_SETTLE_SECONDS:g}; at most 86400)",
    )


def add_node_options(parser: argparse.ArgumentParser, permission: str) -> None:
    """The payer's LND node: ``--lnd-host``, ``--lnd-tls-cert``, ``--lnd-macaroon``."""
    parser.add_argument("--lnd-host", help="LND gRPC host:port (GATEWAY_PAYER_LND_HOST)")
    parser.add_argument("--lnd-tls-cert", help="LND's tls.cert (GATEWAY_PAYER_LND_TLS_CERT)")
    parser.add_argument(
        "--lnd-macaroon", help=f"macaroon with {permission} (GATEWAY_PAYER_LND_MACAROON)"
    )


def add_token_cache_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--token-cache",
        metavar="FILE",
        help="token cache file (default ~/.cache/l402-gateway/tokens.json)",
    )


def add_timeout_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--timeout", type=parse_seconds, default=60.0, help="seconds to connect / between reads"
    )


def payer_settings(args: argparse.Namespace, *, required: bool, needs: str) -> LndSettings | None:
    """The payer's node from the options or the environment; None if not given and not
    ``required`` (``needs`` says what for: "pay", "credit withdraw")."""
    host = args.lnd_host or os.environ.get("GATEWAY_PAYER_LND_HOST") or "127.0.0.1:10009"
    tls_cert = args.lnd_tls_cert or os.environ.get("GATEWAY_PAYER_LND_TLS_CERT")
    macaroon = args.lnd_macaroon or os.environ.get("GATEWAY_PAYER_LND_MACAROON")
    if not tls_cert or not macaroon:
        if not required:
            return None
        raise errors.ConfigError(
            f"{needs} needs the paying LND node: --lnd-tls-cert and --lnd-macaroon "
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

    A start and an end line (paid, failed, or outcome unknown when the call ended without
    the node's verdict); on a terminal, the start line ticks the elapsed seconds.
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
        label = f"paying {sat(amount)} (routing fee up to {sat(max_fee_msat)})"
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
        except errors.PaymentFailed:
            self._write(f"{prefix}payment failed after {time.monotonic() - start:.1f}s{suffix}")
            raise
        except BaseException:
            # A broken call, a deadline, ^C: the payment may be under way or done.
            self._write(
                f"{prefix}payment outcome unknown after {time.monotonic() - start:.1f}s{suffix}"
            )
            raise
        finally:
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._write(
            f"{prefix}paid {sat(payment.amount_msat)} + {sat(payment.fee_msat)} fee "
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


def _offer_json(offer: Offer, limits: Budget | None = None) -> dict[str, Any]:
    """The offer's facts; with ``limits`` (the options' budget), whether it is over them."""
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
        "credit_msat": offer.credit_msat,
        "price_msat": offer.price_msat,
        "balance_msat": offer.balance_msat,
        "settles_on_success": offer.settles_on_success,
        "settle_timeout": offer.settle_timeout,
    }
    if limits is not None:
        facts["over_max_cost"] = offer.amount_msat > limits.max_price_msat
        facts["over_max_settle_time"] = limits.holds_too_long(offer)
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


def settle_text(offer: Offer) -> str:
    """What paying a pay-on-success offer means, in one line."""
    limit = "" if offer.settle_timeout is None else f" (up to {offer.settle_timeout:g} s)"
    return f"the request runs while the payment is held{limit}; you pay only if it succeeds"


def offer_text(offer: Offer, limits: Budget) -> str:
    """The offer, for ``--no-pay``; ``limits``: the options' budget."""
    left = offer.expires_at - int(time.time())  # int: a peer may set an expiry of any size
    lines = [
        f"payment required: {sat(offer.amount_msat)} ({offer.amount_msat} msat)",
        f"  for:      {printable(offer.description)}",
        f"  pay to:   {offer.destination}",
        f"  network:  {offer.network}",
        f"  expires:  {utc_time(offer.expires_at)} UTC (in {max(0, int(left))} s)",
        f"  invoice:  {offer.invoice}",
    ]
    if offer.valid_until is not None:
        lines.insert(5, f"  token:    valid until {utc_time(offer.valid_until)} UTC")
    if offer.credit_msat is not None:
        each = "" if offer.price_msat is None else f", {sat(offer.price_msat)} per request"
        credit = [f"  credit:   buys {sat(offer.credit_msat)} of credit{each}"]
        if offer.balance_msat is not None:
            credit.append(f"  balance:  {sat(offer.balance_msat)} left (a top-up)")
        lines[2:2] = credit
    if offer.settles_on_success:
        lines.insert(2, f"  settles:  on success: {settle_text(offer)}")
    if offer.amount_msat > limits.max_price_msat:
        lines.append(f"  (over --max-cost {sat(limits.max_price_msat)})")
    if limits.holds_too_long(offer):
        cap = f"--max-settle-time {limits.max_settle_seconds:g} s"
        if offer.settle_timeout is None:
            lines.append(f"  (held for a time the 402 does not say: refused under {cap})")
        else:
            lines.append(f"  (held longer than {cap})")
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
    settings = payer_settings(args, required=not args.no_pay, needs="pay")
    if args.no_token_cache:
        cache = TokenCache()
    else:
        cache = TokenCache(args.token_cache or default_token_cache())
    declined: list[Offer] = []

    async def decline(offer: Offer) -> bool:
        declined.append(offer)
        return False

    async def announce(offer: Offer) -> bool:
        if offer.settles_on_success and not args.silent:
            print(f"pay on success: {settle_text(offer)}", file=sys.stderr, flush=True)
        return True

    async with contextlib.AsyncExitStack() as stack:
        lnd = await stack.enter_async_context(LndClient(settings)) if settings else None
        payer: Payer = _NoPayer() if lnd is None else lnd
        if not args.silent:
            payer = ProgressPayer(payer, sys.stderr)
        limits = Budget(
            max_price_msat=args.max_cost,
            max_fee_msat=args.max_fee,
            max_settle_seconds=args.max_settle_time,
        )
        client = L402Client(
            payer,
            network=await _payer_network(args, lnd),
            # --no-pay shows any offer, with what is over the limits.
            budget=(
                dataclasses.replace(limits, max_price_msat=_UNLIMITED_MSAT, max_settle_seconds=None)
                if args.no_pay
                else limits
            ),
            cache=cache,
            payment_timeout=args.payment_timeout,
            confirm=decline if args.no_pay else announce,
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
                    balance = balance_from_headers(response.headers)
            except PaymentDeclined:
                (offer,) = declined
                if args.json:
                    summary.update(
                        status=402,
                        paid=False,
                        balance_msat=offer.balance_msat,
                        offer=_offer_json(offer, limits),
                    )
                    print(json.dumps(summary, indent=2))
                else:
                    print(offer_text(offer, limits))
                return EXIT_PAYMENT_REQUIRED
            except ClientError as error:
                if args.json and error.offer is not None:
                    summary.update(
                        error=str(error),
                        balance_msat=error.offer.balance_msat,
                        offer=_offer_json(error.offer, limits),
                    )
                    print(json.dumps(summary, indent=2))
                raise
    if args.output:
        _write_output(args.output, body)
    if args.json:
        summary.update(
            status=status,
            balance_msat=balance,
            payments=[_spend_json(e) for e in client.spending_log],
        )
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
    if balance is not None and not args.silent:
        print(f"balance: {sat(balance)} ({balance} msat) of credit left", file=sys.stderr)
    if status == 200 and not args.silent and _is_pay_request(body):
        print(
            "l402-gateway: this URL is an LNURL-pay service: pay it with --amount",
            file=sys.stderr,
        )
    if status >= 400:
        if not args.silent:
            print(f"l402-gateway: HTTP {status}", file=sys.stderr)
        return EXIT_HTTP_ERROR
    return 0


def report_failure(error: errors.GatewayError | aiohttp.ClientError | TimeoutError) -> int:
    """Say on stderr why a client command failed (pay's and credit's shared cases); its exit
    code: a bad configuration or token cache is a usage error, the rest a backend's."""
    if isinstance(error, aiohttp.TooManyRedirects):  # its text is a bare "0, message=''"
        print(f"l402-gateway: too many redirects ({len(error.history)})", file=sys.stderr)
        return EXIT_BACKEND
    if isinstance(error, aiohttp.ClientError | TimeoutError):
        print(f"l402-gateway: request failed: {error or type(error).__name__}", file=sys.stderr)
        return EXIT_BACKEND
    print(f"l402-gateway: {error}", file=sys.stderr)
    return EXIT_USAGE if isinstance(error, errors.ConfigError | TokenCacheError) else EXIT_BACKEND


def _is_pay_request(body: bytes) -> bool:
    """Whether a fetched body is an LNURL-pay ``payRequest`` (a hint to pay it instead)."""
    if not body.startswith(b"{") or len(body) > MAX_BODY_BYTES:
        return False
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return False
    return isinstance(document, dict) and document.get("tag") == "payRequest"


def is_lnurl(args: argparse.Namespace) -> bool:
    """Whether ``pay`` pays its TARGET by LNURL-pay: one that is no http(s) URL, or any with
    ``--amount`` or ``--comment``."""
    fetched = args.url.lower().startswith(("http://", "https://"))
    return not fetched or args.amount is not None or args.comment is not None


def _check_lnurl_usage(args: argparse.Namespace) -> None:
    """``ConfigError`` for options that only fetching a URL takes, or a TARGET that is no
    Lightning Address, LNURL or URL (``gateway.destinations``)."""
    fetching = [
        option
        for option, given in (
            ("-X", args.method),
            ("-H", args.headers),
            ("-d", args.data is not None),
            ("-o", args.output),
        )
        if given
    ]
    if fetching:
        raise errors.ConfigError(
            f"{', '.join(fetching)}: for fetching a URL, not for paying by LNURL-pay"
        )
    try:
        destinations.pay_url(args.url)
    except destinations.DestinationError as error:
        raise errors.ConfigError(f"not a URL, Lightning Address or LNURL: {error}") from None


def _terms_text(target: str, request: PayRequest) -> str:
    least, most = request.min_sendable_msat, request.max_sendable_msat
    amount = f"{sat(least)} (fixed)" if least == most else f"{sat(least)} to {sat(most)}"
    allowed = request.comment_allowed
    return "\n".join(
        [
            f"LNURL-pay: {printable(target)}",
            f"  for:      {printable(request.description)}",
            f"  amount:   {amount}",
            f"  comment:  {f'up to {allowed} characters' if allowed else 'not taken'}",
            f"  callback: {printable(str(request.callback.origin()))}",
        ]
    )


def _lnurl_amount(args: argparse.Namespace, request: PayRequest) -> Msat:
    """``--amount``, or the one amount the service takes; ``ConfigError`` without either."""
    if args.amount is not None:
        return Msat(args.amount)
    if request.min_sendable_msat == request.max_sendable_msat:
        return request.min_sendable_msat
    raise errors.ConfigError(
        f"--amount is needed: the service takes {sat(request.min_sendable_msat)} to "
        f"{sat(request.max_sendable_msat)}; nothing was paid"
    )


def _show_success(
    action: ReceivedSuccessAction | None, preimage: bytes | None
) -> tuple[str, dict[str, str] | None]:
    """The success action as text and as JSON; one that does not decrypt is said so on
    stderr (the payment went through all the same)."""
    if action is None:
        return "", None
    try:
        return action.text(preimage), action.as_json(preimage)
    except errors.PayoutDestinationError as error:
        print(f"l402-gateway: paid, but {error}", file=sys.stderr)
        return "", {"tag": action.tag, "description": action.description, "error": str(error)}


async def pay_lnurl(
    args: argparse.Namespace, lnurl: LnurlPayClient, payer: Payer, network: str | None
) -> int:
    """Pay ``args.url`` by LNURL-pay through ``payer`` (invoices must be for ``network``
    when it is known); prints the outcome, returns the exit code."""
    try:
        return await _pay_lnurl(args, lnurl, payer, network)
    except LnurlUnreachable as error:
        print(f"l402-gateway: {error}; nothing was paid", file=sys.stderr)
        return EXIT_BACKEND
    except PaymentInFlight as error:
        print(f"l402-gateway: {error}", file=sys.stderr)
        return EXIT_IN_FLIGHT
    except errors.PayoutDestinationError as error:
        print(f"l402-gateway: {error}; nothing was paid", file=sys.stderr)
        return EXIT_BAD_CHALLENGE
    except errors.ConfigError as error:
        print(f"l402-gateway: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (errors.GatewayError, aiohttp.ClientError, TimeoutError) as error:
        return report_failure(error)


async def _pay_lnurl(
    args: argparse.Namespace, lnurl: LnurlPayClient, payer: Payer, network: str | None
) -> int:
    target: str = args.url
    request = await lnurl.pay_request(target)
    host = request.callback.host
    if args.no_pay:
        if args.json:
            terms = {
                "target": target,
                "paid": False,
                "description": request.description,
                "min_msat": request.min_sendable_msat,
                "max_msat": request.max_sendable_msat,
                "comment_allowed": request.comment_allowed,
            }
            print(json.dumps(terms, indent=2))
        else:
            print(_terms_text(target, request))
        return EXIT_PAYMENT_REQUIRED
    amount = _lnurl_amount(args, request)
    comment: str = args.comment or ""
    problem = request.problem(amount, comment)
    if problem is not None:
        raise errors.ConfigError(f"{host}: {problem}; nothing was paid")
    if amount > args.max_cost:
        print(
            f"l402-gateway: {sat(amount)} is over --max-cost {sat(args.max_cost)} (the amount "
            "and the routing fee); nothing was paid",
            file=sys.stderr,
        )
        return EXIT_OVER_BUDGET
    got = await lnurl.request_invoice(target, amount, comment)
    invoice_network = decode_invoice(got.payment_request).network
    if network is not None and invoice_network != network:
        raise errors.PayoutDestinationError(
            f"{host}: the invoice is for {invoice_network}, this client pays on {network}"
        )
    # --max-cost bounds amount and fee together: the fee cap is what it leaves, at most.
    fee_limit = min(Budget(args.max_cost, args.max_fee).fee_limit(amount), args.max_cost - amount)
    payment_hash = PaymentHash(got.invoice.payment_hash)
    if not args.silent:  # before paying: what to look for should the call never end
        print(f"payment hash: {payment_hash.hex()}", file=sys.stderr, flush=True)
    try:
        payment = await payer.send_payment(
            got.payment_request, max_fee_msat=Msat(fee_limit), payment_timeout=args.payment_timeout
        )
    except errors.PaymentFailed:
        raise
    except (errors.BackendError, TimeoutError) as error:
        payment = await _outcome_on_node(payer, payment_hash, error)
    preimage = payment.preimage
    if (
        payment.status is not PaymentStatus.SUCCEEDED
        or preimage is None
        or hashlib.sha256(preimage).digest() != payment_hash
    ):
        print(
            f"l402-gateway: payment {payment_hash.hex()} reported {payment.status.value} "
            "without its preimage: see the node (lncli trackpayment)",
            file=sys.stderr,
        )
        return EXIT_BACKEND
    text, action = _show_success(got.success_action, preimage)
    if args.json:
        summary = {
            "target": target,
            "description": request.description,
            "amount_msat": amount,
            "fee_msat": payment.fee_msat,
            "payment_hash": payment_hash.hex(),
            "comment": comment,
            "success_action": action,
        }
        print(json.dumps(summary, indent=2))
        return 0
    print(f"paid {sat(amount)} + {sat(payment.fee_msat)} fee to {printable(target)}")
    print(f"payment hash: {payment_hash.hex()}")
    if text:
        print(text)
    return 0


async def _outcome_on_node(
    payer: Payer, payment_hash: PaymentHash, error: errors.BackendError | TimeoutError
) -> Payment:
    """The payment whose ``send_payment`` ended in ``error`` without an outcome (the call
    broke, its deadline passed...), as the node reports it: SUCCEEDED is returned (said on
    stderr); FAILED, or never started, raises ``PaymentFailed``; in flight, or the node
    cannot say, raises ``PaymentInFlight``: paying again could pay twice."""
    # A refusal of the request itself (bad request, permission) came before the node
    # recorded anything; after a broken call it may record the payment a moment late
    # (gateway.service.outgoing judges its payouts so too).
    refused = isinstance(
        error, errors.BackendBadRequest | errors.BackendPermissionDenied
    ) and not isinstance(error, errors.InvoiceAlreadyExists)
    hash_hex = payment_hash.hex()
    check = f"do not pay again; check it with `lncli trackpayment {hash_hex}`"
    try:
        async with asyncio.timeout(_LOOKUP_SECONDS):
            payment = await _lookup(payer, payment_hash, patient=not refused)
    except (errors.BackendError, TimeoutError) as lookup_error:
        raise PaymentInFlight(
            f"payment {hash_hex} may be in flight or done ({_reason(error)}), and the node "
            f"cannot tell ({_reason(lookup_error)}): {check}"
        ) from error
    if payment is None:
        raise errors.PaymentFailed(f"the node did not start it: {_reason(error)}", payment_hash)
    if payment.status is PaymentStatus.FAILED:
        raise errors.PaymentFailed(f"the node reports it FAILED ({_reason(error)})", payment_hash)
    if payment.status is not PaymentStatus.SUCCEEDED:
        raise PaymentInFlight(
            f"payment {hash_hex} is still in flight ({_reason(error)}): {check}"
        ) from error
    print(
        f"l402-gateway: {_reason(error)}; the node reports payment {hash_hex} SUCCEEDED",
        file=sys.stderr,
    )
    return payment


def _reason(error: BaseException) -> str:
    return str(error) or type(error).__name__  # TimeoutError() says nothing


async def _lookup(payer: Payer, payment_hash: PaymentHash, *, patient: bool) -> Payment | None:
    """The node's record of the payment, asked again after each of ``_LOOKUP_DELAYS`` while
    the node cannot answer (the last error is raised) or, ``patient``, has none (None)."""
    for delay in _LOOKUP_DELAYS:
        try:
            payment = await payer.lookup_payment(payment_hash)
        except (errors.BackendError, TimeoutError):
            pass  # asked again below; the last time's error is raised
        else:
            if payment is not None or not patient:
                return payment
        await asyncio.sleep(delay)
    return await payer.lookup_payment(payment_hash)


async def _pay_lnurl_with_node(args: argparse.Namespace) -> int:
    _check_lnurl_usage(args)
    settings = payer_settings(args, required=not args.no_pay, needs="pay")
    async with contextlib.AsyncExitStack() as stack:
        lnd = await stack.enter_async_context(LndClient(settings)) if settings else None
        payer: Payer = _NoPayer() if lnd is None else lnd
        if not args.silent:
            payer = ProgressPayer(payer, sys.stderr)
        network = await _payer_network(args, lnd)
        lnurl = await stack.enter_async_context(LnurlPayClient())
        return await pay_lnurl(args, lnurl, payer, network)


def run(args: argparse.Namespace) -> int:
    """The ``pay`` command; its exit code."""
    configure_logging(logging.DEBUG if args.verbose else logging.WARNING, args.log_format)
    try:
        if is_lnurl(args):
            return asyncio.run(_pay_lnurl_with_node(args))
        method, headers, data = _request_parts(args)
        return asyncio.run(_pay(args, method, headers, data))
    except BudgetExceeded as error:
        print(f"l402-gateway: {error}", file=sys.stderr)
        return EXIT_OVER_BUDGET
    except PaymentInFlight as error:
        print(f"l402-gateway: {error}", file=sys.stderr)
        return EXIT_IN_FLIGHT
    except ChallengeError as error:
        print(f"l402-gateway: {error}; nothing was paid", file=sys.stderr)
        return EXIT_BAD_CHALLENGE
    except (errors.GatewayError, aiohttp.ClientError, TimeoutError) as error:
        return report_failure(error)
