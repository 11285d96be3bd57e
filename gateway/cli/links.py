"""``links``: payment links (README "Tips, Lightning Address and payment links").

    l402-gateway links [--state S] [--limit N] [--json]    the links, newest first
    l402-gateway links create (--amount A | --min A --max B) [--memo T] [--expires 1h]
                              [--reusable] [--json]        a new link: its page, LNURL, QR
    l402-gateway links cancel ID [--json]                  it takes no more payments

Amounts as ``pay`` reads them (``1000sat``, ``1500msat``, ``5``: sat), whole sat (wallets
pay whole sat). A link is single-use unless ``--reusable``; ``--expires`` is seconds or a
number with s, min, h or d, at most ten years (none: it never expires). The page, the LNURL
and the QR images are under ``[lnurl] base_url``, which every ``links`` command needs. They
work on the gateway's existing database (a ``memory:`` store, or none at ``store.url``, is a
configuration error: start ``serve`` once first); only ``cancel`` reaches the node, and only
when the link has an open invoice to cancel there (then it needs ``[lnd]``). Exit codes: 0
done (``cancel``: also a link paid already, left paid), 1 no such link, 2 bad usage or
configuration, 3 a backend failed (``cancel``: the link is cancelled but the node could not
cancel its open invoice, which stays payable until it expires: run it again).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

from gateway import errors
from gateway.cli.formats import (
    columns,
    parse_limit,
    print_records,
    sat,
    sat_number,
    sat_to_msat,
    state_names,
    state_parser,
    utc_time,
)
from gateway.config import Config, store_location
from gateway.config.checks import MAX_LIFETIME
from gateway.lnd.client import LndClient
from gateway.lnurl import LINK_ID, LnurlError, link_lnurl, link_page_url
from gateway.ports import LINK_SERVICE, InvoiceState, LinkState, PaymentLink, Store, SystemClock
from gateway.pricing import MAX_PRICE_MSAT
from gateway.reports import link_json
from gateway.runtime import build_tips, lnd_settings
from gateway.service.tips import new_link
from gateway.store import open_store
from gateway.text import printable

__all__ = ["add_parsers", "parse_duration", "run", "uses_lnd"]

EXIT_NO_SUCH_LINK = 1
EXIT_BACKEND = 3
_DURATION = re.compile(r"([0-9]{1,9}(?:\.[0-9]{1,6})?)\s*(s|min|m|h|d)?")
_UNITS = {None: 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86_400}


def parse_duration(text: str) -> float:
    """``--expires``: ``90``, ``90s``, ``30min`` (or ``30m``), ``1h``, ``1.5h``, ``7d`` in
    seconds, more than 0 and at most ten years (``MAX_LIFETIME``)."""
    match = _DURATION.fullmatch(text.strip())
    if match is None or float(match[1]) == 0:
        raise argparse.ArgumentTypeError(
            f"--expires {text!r}: a duration like 5min, 1h or 7d (more than 0)"
        )
    seconds = float(match[1]) * _UNITS[match[2]]
    if seconds > MAX_LIFETIME:
        raise argparse.ArgumentTypeError(
            f"--expires {text!r}: at most ten years ({MAX_LIFETIME // 86_400}d); leave it out "
            "for a link that never expires"
        )
    return seconds


def _amount(text: str) -> int:
    amount = sat_to_msat(text)
    if not 1 <= amount <= MAX_PRICE_MSAT:
        raise argparse.ArgumentTypeError(
            f"{text!r}: an amount is 1sat to {MAX_PRICE_MSAT // 1000}sat"
        )
    return amount


def add_parsers(commands: Any) -> None:
    """``links`` (with ``links create`` and ``links cancel``) on the ``commands`` subparsers."""
    listing = commands.add_parser(
        "links",
        help="payment links; 'links create' makes one, 'links cancel' ends one",
        description="Payment links, newest first: state, amount, memo, payments, expiry, page.",
    )
    listing.add_argument(
        "--state",
        type=state_parser(LinkState),
        metavar="STATE",
        help=f"only this state: {', '.join(state_names(LinkState))}",
    )
    listing.add_argument("--limit", type=parse_limit, default=100, help="at most N (default 100)")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    actions = listing.add_subparsers(dest="links_command")
    create = actions.add_parser(
        "create",
        help="a new payment link: its page, LNURL and QR images",
        description="Make a payment link for a fixed amount (--amount) or one the payer "
        "chooses (--min and --max), single-use unless --reusable. Amounts in whole sat: "
        "1000sat, 21000msat (a number alone is sat).",
    )
    # Mistakes only seen together (--min without --max, the memo) are usage errors too.
    create.set_defaults(create_parser=create)
    amounts = create.add_mutually_exclusive_group(required=True)
    amounts.add_argument("--amount", type=_amount, metavar="A", help="a fixed amount")
    amounts.add_argument("--min", type=_amount, metavar="A", help="the least a payer may pay")
    create.add_argument("--max", type=_amount, metavar="B", help="the most (with --min)")
    create.add_argument("--memo", default="", metavar="TEXT", help="what the payment is for")
    create.add_argument(
        "--expires",
        type=parse_duration,
        metavar="DURATION",
        help="it expires after DURATION (5min, 1h, 7d; 2min to ten years); default never",
    )
    create.add_argument(
        "--reusable",
        action="store_true",
        help="takes any number of payments (default: paid once, then closed)",
    )
    create.add_argument("--json", dest="create_json", action="store_true", help="print JSON")
    cancel = actions.add_parser(
        "cancel",
        help="cancel a payment link (and its open invoices, on the node)",
        description="Cancel payment link ID: it takes no more payments, and its open "
        "invoices are cancelled on the node (which needs [lnd]). A link paid already is left "
        "paid. With --json, a JSON object in every outcome: the link (none if unknown) and "
        '"outcome": "canceled", "paid", "not_found" or "node_failed".',
    )
    cancel.add_argument("link_id", metavar="ID")
    cancel.add_argument("--json", dest="cancel_json", action="store_true", help="print JSON")


def uses_lnd(args: argparse.Namespace) -> bool:
    """Whether the command may talk to LND (``links cancel``, for a link's open invoices)."""
    return args.command == "links" and getattr(args, "links_command", None) == "cancel"


def run(config: Config, args: argparse.Namespace) -> int:
    """The ``links`` commands; their exit code."""
    if not config.lnurl.enabled:
        raise errors.ConfigError(
            "payment links need [lnurl] base_url: the public https:// origin their pages and "
            "LNURLs are under"
        )
    if store_location(config.store.url)[0] == "memory":
        raise errors.ConfigError(
            "payment links need the gateway's database, and store.url is memory: (a link kept "
            "only inside this command would be gone when it ends)"
        )
    if args.links_command == "create":
        link = _new_link(args)
        return asyncio.run(create(config, link, args.create_json or args.json))
    if args.links_command == "cancel":
        return asyncio.run(cancel(config, args.link_id, args.cancel_json or args.json))
    return asyncio.run(listing(config, args.state, args.limit, args.json))


def _new_link(args: argparse.Namespace) -> PaymentLink:
    """The link ``links create`` asks for; a usage error (exit 2) for options that do not go
    together or a link ``new_link`` refuses (its one-line reason)."""
    usage: argparse.ArgumentParser = args.create_parser
    if args.amount is not None and args.max is not None:
        usage.error("--max goes with --min, not with --amount")
    least = args.amount if args.amount is not None else args.min
    most = args.amount if args.amount is not None else args.max
    if most is None:
        usage.error("--min needs --max (the most a payer may pay)")
    if least > most:
        usage.error(f"--min ({sat(least)}) must not be above --max ({sat(most)})")
    try:
        return new_link(
            min_msat=least,
            max_msat=most,
            memo=args.memo,
            expires_in=args.expires,
            single_use=not args.reusable,
            now=time.time(),
        )
    except ValueError as error:
        usage.error(str(error))


async def _existing_store(config: Config) -> Store:
    """The gateway's existing database, opened for writing: a typo in store.url is "no
    database at ...", not a new empty database (as ``payouts pay`` opens it)."""
    await (await open_store(config.store.url, read_only=True)).close()
    return await open_store(config.store.url, pool_size=1)


def _link_document(origin: str, link: PaymentLink, now: float) -> dict[str, Any]:
    """``link_json`` and where the link is: its page, LNURL and QR images."""
    page = link_page_url(origin, link.link_id)
    return {
        **link_json(link, now),
        "url": page,
        "lnurl": link_lnurl(origin, link.link_id),
        "qr_svg": f"{page}/qr.svg",
        "qr_png": f"{page}/qr.png",
    }


def _amounts(link: PaymentLink) -> str:
    if link.fixed:
        return sat(link.min_msat)
    return f"{sat_number(link.min_msat)} to {sat(link.max_msat)}"


async def create(config: Config, link: PaymentLink, as_json: bool) -> int:
    """``links create``: record ``link`` (``new_link``'s), and say where it is."""
    store = await _existing_store(config)
    try:
        await store.add_link(link)
    finally:
        await store.close()
    document = _link_document(config.lnurl.origin, link, time.time())
    if as_json:
        print(json.dumps(document, indent=2, ensure_ascii=True))
        return 0
    use = "single use" if link.single_use else "reusable"
    when = link.expires_at
    expires = "never expires" if when is None else f"expires {utc_time(when)} UTC"
    lines = [
        f"payment link {link.link_id}: {_amounts(link)}, {use}, {expires}",
        *columns(
            [
                *([("  memo:", printable(link.memo))] if link.memo else []),
                ("  page:", document["url"]),
                ("  LNURL:", document["lnurl"]),
                ("  QR:", f"{document['qr_svg']}  {document['qr_png']}"),
            ]
        ),
    ]
    print("\n".join(lines))
    return 0


def _table(origin: str, links: Sequence[PaymentLink], now: float) -> list[str]:
    rows = [("ID", "STATE", "AMOUNT", "MEMO", "PAID", "EXPIRES (UTC)", "URL")]
    rows += [
        (
            link.link_id,
            link.state(now).value.lower(),
            _amounts(link),
            printable(link.memo, 40) or "-",
            f"{link.paid_count} / {sat(link.paid_msat)}",
            utc_time(link.expires_at),
            link_page_url(origin, link.link_id),
        )
        for link in links
    ]
    return columns(rows)


async def listing(config: Config, state: LinkState | None, limit: int, as_json: bool) -> int:
    """``links``: the links, newest first."""
    now = time.time()
    store = await open_store(config.store.url, read_only=True)
    try:
        links = await store.list_links(state, now, limit)
    finally:
        await store.close()
    origin = config.lnurl.origin
    print_records(
        links,
        as_json,
        lambda link: _link_document(origin, link, now),
        lambda listed: _table(origin, listed, now),
        "no payment links",
    )
    return 0


async def _payable(store: Store, link_id: str) -> bool:
    """Whether the link has an invoice the node might still take: any recorded OPEN (one
    just past its recorded expiry may still be open on the node, whose clock started later)."""
    open_ones = await store.list_invoices(InvoiceState.OPEN, None, f"{LINK_SERVICE}{link_id}")
    return bool(open_ones)


async def _cancel_on_node(config: Config, store: Store, link_id: str) -> tuple[PaymentLink, bool]:
    """``Tips.cancel_link``: the link and its open invoices, cancelled on the node (``[lnd]``
    read only now); the link, and whether it was paid first. ``LnurlError`` as it raises it."""
    settings = lnd_settings(config)
    async with LndClient(settings) as lnd:
        tips = build_tips(config, store, lnd, SystemClock(), jars={})
        assert tips is not None  # [lnurl] base_url is set (run)
        status = await tips.cancel_link(link_id)
    return status.link, status.state is LinkState.PAID


async def cancel(config: Config, link_id: str, as_json: bool) -> int:
    """``links cancel``: the link takes no more payments; 1 for an unknown link, 3 when the
    node could not cancel its open invoices (the link is cancelled all the same). A link
    paid already is left as it is; one paid while being cancelled is reported paid."""
    store = await _existing_store(config)
    try:
        found = await store.get_link(link_id) if LINK_ID.fullmatch(link_id) else None
        if found is None:
            message = "no such payment link"
            return _cancelled(config, link_id, None, "not_found", message, as_json)
        if found.state(time.time()) is LinkState.PAID:
            # Cancelled, it would no longer show as paid; it takes no payments anyway.
            message = f"payment link {link_id} is paid already: nothing to cancel"
            return _cancelled(config, link_id, found, "paid", message, as_json)
        link: PaymentLink | None = None
        paid = False
        payable = await _payable(store, link_id)
        if not payable:  # nothing to cancel on the node: the store alone
            link = await store.cancel_link(link_id, time.time())
            payable = await _payable(store, link_id)  # one issued meanwhile: cancel it too
        if payable:
            try:
                link, paid = await _cancel_on_node(config, store, link_id)
            except LnurlError as error:
                outcome = "not_found" if error.status == 404 else "node_failed"
                link = await store.get_link(link_id)
                return _cancelled(config, link_id, link, outcome, error.reason, as_json)
    finally:
        await store.close()
    assert link is not None  # links are never deleted
    if paid or link.state(time.time()) is LinkState.PAID:
        message = f"payment link {link_id} was paid before it could be canceled"
        return _cancelled(config, link_id, link, "paid", message, as_json)
    message = f"canceled payment link {link_id}: it takes no more payments"
    return _cancelled(config, link_id, link, "canceled", message, as_json)


_CANCEL_EXIT = {"canceled": 0, "paid": 0, "not_found": EXIT_NO_SUCH_LINK}


def _cancelled(
    config: Config,
    link_id: str,
    link: PaymentLink | None,
    outcome: str,
    message: str,
    as_json: bool,
) -> int:
    """Say how ``links cancel`` went (``--json``: the link's document, or only its id when
    unknown, with ``outcome`` and for a failure its ``error``); its exit code."""
    code = _CANCEL_EXIT.get(outcome, EXIT_BACKEND)
    if as_json:
        document = (
            {"link_id": link_id}
            if link is None
            else _link_document(config.lnurl.origin, link, time.time())
        )
        document["outcome"] = outcome
        if code != 0:
            document["error"] = message
        print(json.dumps(document, indent=2, ensure_ascii=True))
    elif code == 0:
        print(message)
    if code != 0:
        print(f"l402-gateway: links cancel {printable(link_id)}: {message}", file=sys.stderr)
    return code
