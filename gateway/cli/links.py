"""``links``: payment links (README "Tips, Lightning Address and payment links").

    l402-gateway links [--state S] [--limit N] [--json]    the links, newest first
    l402-gateway links create (--amount A | --min A --max B) [--memo T] [--expires 1h]
                              [--reusable] [--json]        a new link: its page, LNURL, QR
    l402-gateway links cancel ID [--json]                  it takes no more payments

Amounts as ``pay`` reads them (``1000sat``, ``1500msat``, ``0.5``: sat). A link is single-use
unless ``--reusable``; ``--expires`` is seconds or a number with s, min, h or d (none: it
never expires). The page, the LNURL and the QR images are under ``[lnurl] base_url``, which
every ``links`` command needs, as it needs ``[lnd]`` (``cancel`` asks the node to cancel a
single-use link's open invoice; the others never reach it). ``create`` writes to the
gateway's database (made if it does not exist yet), the listing only reads it, ``cancel``
needs it to exist; a ``memory:`` store is refused. Exit codes: 0 done, 1 no such link, 2 bad
usage or configuration, 3 a backend failed (``cancel``: the link is cancelled but the node
could not cancel its open invoice, which stays payable until it expires: run it again).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from gateway import errors
from gateway.cli.formats import columns, parse_limit, print_records, sat, sat_to_msat, utc_time
from gateway.config import Config, store_location
from gateway.lnd.client import LndClient
from gateway.lnurl import LnurlError
from gateway.ports import LinkState, PaymentLink, Store, SystemClock
from gateway.pricing import MAX_PRICE_MSAT
from gateway.reports import link_json
from gateway.runtime import build_tips, lnd_settings
from gateway.service.tips import Tips
from gateway.store import open_store
from gateway.text import printable

__all__ = ["add_parsers", "parse_duration", "run", "uses_lnd"]

EXIT_NO_SUCH_LINK = 1
EXIT_BACKEND = 3
_DURATION = re.compile(r"([0-9]{1,9}(?:\.[0-9]{1,6})?)\s*(s|min|m|h|d)?")
_UNITS = {None: 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86_400}


def parse_duration(text: str) -> float:
    """``--expires``: ``90``, ``90s``, ``30min`` (or ``30m``), ``1h``, ``1.5h``, ``7d`` in
    seconds, more than 0."""
    match = _DURATION.fullmatch(text.strip())
    if match is None or float(match[1]) == 0:
        raise argparse.ArgumentTypeError(
            f"--expires {text!r}: a duration like 90s, 30min, 1h or 7d (more than 0)"
        )
    return float(match[1]) * _UNITS[match[2]]


def _amount(text: str) -> int:
    amount = sat_to_msat(text)
    if not 1 <= amount <= MAX_PRICE_MSAT:
        raise argparse.ArgumentTypeError(f"{text!r}: an amount is 1msat to {MAX_PRICE_MSAT}msat")
    return amount


def _state(text: str) -> LinkState:
    try:
        return LinkState(text.upper())
    except ValueError:
        names = ", ".join(state.value.lower() for state in LinkState)
        raise argparse.ArgumentTypeError(f"--state {text!r}: use one of {names}") from None


def add_parsers(commands: Any) -> None:
    """``links`` (with ``links create`` and ``links cancel``) on the ``commands`` subparsers."""
    listing = commands.add_parser(
        "links",
        help="payment links; 'links create' makes one, 'links cancel' ends one",
        description="Payment links, newest first: state, amount, memo, payments, expiry, page.",
    )
    listing.add_argument(
        "--state",
        type=_state,
        metavar="STATE",
        help=f"only this state: {', '.join(s.value.lower() for s in LinkState)}",
    )
    listing.add_argument("--limit", type=parse_limit, default=100, help="at most N (default 100)")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    actions = listing.add_subparsers(dest="links_command")
    create = actions.add_parser(
        "create",
        help="a new payment link: its page, LNURL and QR images",
        description="Make a payment link for a fixed amount (--amount) or one the payer "
        "chooses (--min and --max), single-use unless --reusable. Amounts: 1000sat, 1500msat "
        "(a number alone is sat).",
    )
    amounts = create.add_mutually_exclusive_group(required=True)
    amounts.add_argument("--amount", type=_amount, metavar="A", help="a fixed amount")
    amounts.add_argument("--min", type=_amount, metavar="A", help="the least a payer may pay")
    create.add_argument("--max", type=_amount, metavar="B", help="the most (with --min)")
    create.add_argument("--memo", default="", metavar="TEXT", help="what the payment is for")
    create.add_argument(
        "--expires",
        type=parse_duration,
        metavar="DURATION",
        help="it expires after DURATION (90s, 30min, 1h, 7d); default never",
    )
    create.add_argument(
        "--reusable",
        action="store_true",
        help="takes any number of payments (default: paid once, then closed)",
    )
    create.add_argument("--json", dest="create_json", action="store_true", help="print JSON")
    cancel = actions.add_parser(
        "cancel",
        help="cancel a payment link (and its open invoice, on the node)",
        description="Cancel payment link ID: it takes no more payments, and a single-use "
        "link's open invoice is cancelled on the node.",
    )
    cancel.add_argument("link_id", metavar="ID")
    cancel.add_argument("--json", dest="cancel_json", action="store_true", help="print JSON")


def uses_lnd(args: argparse.Namespace) -> bool:
    """Whether the command talks to LND (``links cancel``)."""
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
        return asyncio.run(create(config, args))
    if args.links_command == "cancel":
        return asyncio.run(cancel(config, args.link_id, args.cancel_json or args.json))
    return asyncio.run(listing(config, args.state, args.limit, args.json))


@contextlib.asynccontextmanager
async def _tips(config: Config, *, read_only: bool = False) -> AsyncIterator[tuple[Tips, Store]]:
    """The gateway's ``Tips`` over its database and its node (not reached unless asked), and
    the database."""
    settings = lnd_settings(config)  # a bad [lnd] fails before the store is opened
    store = await open_store(config.store.url, read_only=read_only)
    try:
        async with LndClient(settings) as lnd:
            tips = build_tips(config, store, lnd, SystemClock())
            assert tips is not None  # [lnurl] base_url is set (run)
            yield tips, store
    finally:
        await store.close()


def _link_document(tips: Tips, link: PaymentLink, now: float) -> dict[str, Any]:
    """``link_json`` and where the link is: its page, LNURL and QR images."""
    page = tips.link_page_url(link.link_id)
    return {
        **link_json(link, now),
        "url": page,
        "lnurl": tips.link_lnurl(link.link_id),
        "qr_svg": f"{page}/qr.svg",
        "qr_png": f"{page}/qr.png",
    }


def _amounts(link: PaymentLink) -> str:
    if link.fixed:
        return sat(link.min_msat)
    return f"{link.min_msat / 1000:g} to {sat(link.max_msat)}"


async def create(config: Config, args: argparse.Namespace) -> int:
    """``links create``: a new link, and where it is."""
    least = args.amount if args.amount is not None else args.min
    most = args.amount if args.amount is not None else args.max
    if most is None:
        raise errors.ConfigError("--min needs --max (the most a payer may pay)")
    if args.amount is not None and args.max is not None:
        raise errors.ConfigError("--max goes with --min, not with --amount")
    if least > most:
        raise errors.ConfigError(f"--min ({sat(least)}) must not be above --max ({sat(most)})")
    async with _tips(config) as (tips, _store):
        try:
            link = await tips.create_link(
                min_msat=least,
                max_msat=most,
                memo=args.memo,
                expires_in=args.expires,
                single_use=not args.reusable,
            )
        except LnurlError as error:  # the memo (the amounts were checked above)
            raise errors.ConfigError(error.reason) from None
        document = _link_document(tips, link, time.time())
    if args.create_json or args.json:
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


def _table(tips: Tips, links: Sequence[PaymentLink], now: float) -> list[str]:
    rows = [("ID", "STATE", "AMOUNT", "MEMO", "PAID", "EXPIRES (UTC)", "URL")]
    rows += [
        (
            link.link_id,
            link.state(now).value.lower(),
            _amounts(link),
            printable(link.memo, 40) or "-",
            f"{link.paid_count} / {sat(link.paid_msat)}",
            utc_time(link.expires_at),
            tips.link_page_url(link.link_id),
        )
        for link in links
    ]
    return columns(rows)


async def listing(config: Config, state: LinkState | None, limit: int, as_json: bool) -> int:
    """``links``: the links, newest first."""
    now = time.time()
    async with _tips(config, read_only=True) as (tips, store):
        links = await store.list_links(state, now, limit)
    print_records(
        links,
        as_json,
        lambda link: _link_document(tips, link, now),
        lambda listed: _table(tips, listed, now),
        "no payment links",
    )
    return 0


async def cancel(config: Config, link_id: str, as_json: bool) -> int:
    """``links cancel``: the link takes no more payments; 1 for an unknown link, 3 when the
    node could not cancel its open invoice (the link is cancelled all the same)."""
    # The gateway's existing database: a typo in store.url is "no database at ...".
    await (await open_store(config.store.url, read_only=True)).close()
    async with _tips(config) as (tips, store):
        found = await store.get_link(link_id)
        if found is None:
            print(f"l402-gateway: no payment link {printable(link_id)}", file=sys.stderr)
            return EXIT_NO_SUCH_LINK
        if found.state(time.time()) is LinkState.PAID:
            # Cancelled, it would no longer show as paid; it takes no payments anyway.
            print(f"payment link {link_id} is paid already: nothing to cancel")
            return 0
        try:
            link = await tips.cancel_link(link_id)
        except LnurlError as error:
            print(f"l402-gateway: links cancel {link_id}: {error.reason}", file=sys.stderr)
            return EXIT_NO_SUCH_LINK if error.status == 404 else EXIT_BACKEND
        document = _link_document(tips, link, time.time())
    if as_json:
        print(json.dumps(document, indent=2, ensure_ascii=True))
    else:
        print(f"cancelled payment link {link.link_id}: it takes no more payments")
    return 0
