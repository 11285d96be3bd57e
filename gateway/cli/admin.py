"""The admin commands: ``invoices`` (a table with summaries, ``--json`` or ``--csv``; tips
and payment links among them, their service ``tip:<jar>`` or ``link:<id>``),
``accounts`` (credit accounts and their totals, ``--json``; exit 4 when the totals do not
reconcile), ``token revoke TOKEN_ID`` and ``sample-config``."""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

from gateway import errors
from gateway.cli.formats import EXIT_DOES_NOT_RECONCILE, MAX_LIMIT, columns, utc_time
from gateway.config import Config
from gateway.ports import Account, CreditTotals, InvoiceRecord, InvoiceState
from gateway.reports import account_json, credit_totals_json, unaccounted_msat
from gateway.store import open_store
from gateway.text import printable

SAMPLE_CONFIG = "gateway.sample.toml"  # package data beside gateway/__init__.py


def add_parsers(commands: Any) -> None:
    """``invoices``, ``accounts``, ``token revoke`` and ``sample-config`` on the ``commands``
    subparsers."""
    listing = commands.add_parser(
        "invoices",
        help="list tracked invoices",
        description="Tracked invoices, newest first. TIME is a UTC date (2026-11-25: the "
        "whole day), a UTC date and time (2026-11-25T13:00) or a unix time.",
    )
    listing.add_argument(
        "--state",
        metavar="STATE",
        help=f"only this state, in any case: {', '.join(s.value.lower() for s in InvoiceState)}",
    )
    listing.add_argument("--limit", type=int, help="at most N invoices (the newest)")
    listing.add_argument("--since", metavar="TIME", help="created at or after TIME")
    listing.add_argument("--until", metavar="TIME", help="created at or before TIME")
    output = listing.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="machine-readable output")
    output.add_argument("--csv", action="store_true", help="CSV with a header row")
    accounts_parser = commands.add_parser(
        "accounts",
        help="list credit accounts and what the operator owes",
        description="Credit accounts (prepaid balances of credit routes), most recently used "
        "first, and the totals over all of them: received = consumed + withdrawn + pending "
        "withdrawals + reserved + outstanding (what the operator owes the holders).",
    )
    accounts_parser.add_argument("--limit", type=int, help="at most N accounts (the latest)")
    accounts_parser.add_argument("--json", action="store_true", help="machine-readable output")
    token = commands.add_parser("token", help="manage tokens")
    token_commands = token.add_subparsers(dest="token_command", required=True)
    revoke_token = token_commands.add_parser("revoke", help="revoke a token by its id (hex)")
    revoke_token.add_argument("token_id")
    commands.add_parser(
        "sample-config", help="print the sample configuration (every setting, commented)"
    )


def sample_config() -> int:
    """``sample-config``: the sample configuration shipped in the package, on stdout."""
    sys.stdout.write(resources.files("gateway").joinpath(SAMPLE_CONFIG).read_text("utf-8"))
    return 0


@dataclass(frozen=True, slots=True)
class Query:
    """What ``invoices`` lists and how."""

    state: InvoiceState | None = None
    limit: int | None = None
    since: float | None = None
    until: float | None = None
    output: str = "table"  # "table", "json" or "csv"

    @classmethod
    def from_args(cls, args: Any) -> Query:
        """The query the options ask for; ConfigError (one line) for a value that is wrong."""
        _check_limit(args.limit)
        return cls(
            state=None if args.state is None else _state(args.state),
            limit=args.limit,
            since=None if args.since is None else _time("--since", args.since, end_of_day=False),
            until=None if args.until is None else _time("--until", args.until, end_of_day=True),
            output="json" if args.json else "csv" if args.csv else "table",
        )


def _state(text: str) -> InvoiceState:
    try:
        return InvoiceState(text.upper())
    except ValueError:
        names = ", ".join(s.value.lower() for s in InvoiceState)
        raise errors.ConfigError(f"--state {text!r}: use one of {names}") from None


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 0:
        raise errors.ConfigError(f"--limit must be >= 0, got {limit}")
    if limit is not None and limit > MAX_LIMIT:  # the store could not take it
        raise errors.ConfigError(f"--limit must be <= {MAX_LIMIT}, got {limit}")


def _time(option: str, text: str, *, end_of_day: bool) -> float:
    """A unix time, or a UTC date (its start, or its last second with ``end_of_day``) or
    date and time."""
    if text.isascii() and text.isdigit():  # isdigit() alone takes '²'
        return float(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise errors.ConfigError(
            f"{option} {text!r}: not a date (2026-11-25), a date and time "
            "(2026-11-25T13:00) or a unix time"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    if end_of_day and len(text) == len("2026-11-25"):
        moment += timedelta(days=1, microseconds=-1)
    return moment.timestamp()


def shown_state(record: InvoiceRecord, now: float) -> InvoiceState:
    """The stored state, except that an OPEN invoice past its expiry is EXPIRED: it can no
    longer be paid, though the sweeper may not have recorded that yet."""
    if record.state is InvoiceState.OPEN and record.expires_at <= now:
        return InvoiceState.EXPIRED
    return record.state


_JSON_FIELDS = (
    "payment_hash",
    "token_id",
    "state",
    "amount_msat",
    "amount_paid_msat",
    "service",
    "method",
    "path",
    "created_at",
    "expires_at",
    "settled_at",
    "add_index",
    "settle_index",
    "payment_request",
    "comment",
)


def _record_json(record: InvoiceRecord, now: float) -> dict[str, Any]:
    return {
        "payment_hash": record.payment_hash.hex(),
        "token_id": record.token_id.hex(),
        "state": shown_state(record, now).value,
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
        "comment": record.comment,  # a tip's or link payer's (LUD-12); "" for others
    }


def _table(records: Sequence[InvoiceRecord], now: float) -> str:
    rows = [("CREATED (UTC)", "STATE", "AMOUNT msat", "PAID msat", "SERVICE", "REQUEST", "HASH")]
    rows += [
        (
            utc_time(r.created_at),
            shown_state(r, now).value,
            str(r.amount_msat),
            str(r.amount_paid_msat),
            # Clients chose these: escaped, so that they cannot drive the terminal.
            printable(r.service),
            _request(r),
            r.payment_hash.hex()[:16],
        )
        for r in records
    ]
    lines = columns(rows)
    states = [shown_state(r, now) for r in records]
    counts = ", ".join(f"{states.count(s)} {s.value.lower()}" for s in InvoiceState)
    lines.append(f"\n{len(records)} invoices: {counts}; {_received(records)} msat received")
    if records:
        lines += ["", *_summary(records, "DAY (UTC)", lambda r: utc_time(r.created_at)[:10])]
        lines += ["", *_summary(records, "SERVICE", lambda r: printable(r.service))]
    return "\n".join(lines)


def _request(record: InvoiceRecord) -> str:
    """The priced request, escaped; a tip's or link's payer comment (cut short) instead."""
    if record.method or record.path:
        return printable(f"{record.method} {record.path}")
    return printable(f"comment: {record.comment}", 60) if record.comment else "-"


def _received(records: Sequence[InvoiceRecord]) -> int:
    return sum(r.amount_paid_msat for r in records if r.state is InvoiceState.SETTLED)


def _summary(
    records: Sequence[InvoiceRecord], title: str, key: Callable[[InvoiceRecord], str]
) -> list[str]:
    """One line per ``key`` (newest day first, services by name): invoices, settled, received."""
    groups: dict[str, list[InvoiceRecord]] = {}
    for record in records:
        groups.setdefault(key(record), []).append(record)
    order = sorted(groups, reverse=title.startswith("DAY"))
    rows = [(title, "INVOICES", "SETTLED", "RECEIVED msat")]
    rows += [
        (
            name,
            str(len(groups[name])),
            str(sum(r.state is InvoiceState.SETTLED for r in groups[name])),
            str(_received(groups[name])),
        )
        for name in order
    ]
    return columns(rows)


def _csv(records: Sequence[InvoiceRecord], now: float) -> str:
    out = io.StringIO()
    fields = ["created_at_utc", *_JSON_FIELDS]
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for record in records:
        row = {"created_at_utc": utc_time(record.created_at), **_record_json(record, now)}
        for name in ("service", "method", "path", "comment"):
            row[name] = _cell(row[name])
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return out.getvalue()


def _cell(text: str) -> str:
    """Client-chosen text for a spreadsheet: escaped like the table, and never a formula."""
    shown = printable(text)
    return f"'{shown}" if shown[:1] in ("=", "+", "-", "@") else shown


async def invoices(config: Config, query: Query) -> int:
    """``invoices``: the tracked invoices newest first, as a table (with the per-day and
    per-service summary), JSON or CSV."""
    # Only looks: a missing database is an error, not created, and nothing is chmodded.
    store = await open_store(config.store.url, read_only=True)
    try:
        # All of them: "expired" is decided here, and --since/--until filter before --limit.
        records = await store.list_invoices()
    finally:
        await store.close()
    now = time.time()
    chosen = [
        r
        for r in records
        if (query.state is None or shown_state(r, now) is query.state)
        and (query.since is None or r.created_at >= query.since)
        and (query.until is None or r.created_at <= query.until)
    ][: query.limit]
    if query.output == "json":
        # ensure_ascii: control and bidi characters a client put in a path stay escaped.
        print(json.dumps([_record_json(r, now) for r in chosen], indent=2, ensure_ascii=True))
    elif query.output == "csv":
        sys.stdout.write(_csv(chosen, now))
    else:
        print(_table(chosen, now))
    return 0


def _accounts_table(listed: Sequence[Account], totals: CreditTotals) -> str:
    rows = [
        (
            "TOKEN",
            "SERVICE",
            "CREDITED",
            "SPENT",
            "RESERVED",
            "WITHDRAWN",
            "BALANCE msat",
            "LAST USE (UTC)",
        )
    ]
    rows += [
        (
            a.token_id.hex()[:16],
            printable(a.service),
            str(a.credited_msat),
            str(a.spent_msat),
            str(a.reserved_msat),
            str(a.withdrawn_msat),
            str(a.balance_msat),
            utc_time(a.last_used_at),
        )
        for a in listed
    ]
    counted = f"{totals.accounts} accounts"
    if len(listed) < totals.accounts:
        counted = f"{len(listed)} of {counted} shown"
    lines = [*columns(rows), "", f"{counted}; totals over all, in msat:"]
    lines += columns(
        [
            ("  received", str(totals.received_msat)),
            ("  consumed", str(totals.consumed_msat)),
            ("  withdrawn", str(totals.withdrawn_msat)),
            ("  pending withdrawals", str(totals.pending_withdrawals_msat)),
            ("  reserved", str(totals.reserved_msat)),
            ("  outstanding (owed)", str(totals.outstanding_msat)),
        ]
    )
    parts = (
        f"{totals.consumed_msat} + {totals.withdrawn_msat} + "
        f"{totals.pending_withdrawals_msat} + {totals.reserved_msat} + {totals.outstanding_msat}"
    )
    unaccounted = unaccounted_msat(totals)
    if unaccounted == 0:
        lines.append(
            f"reconciled: received {totals.received_msat} = consumed + withdrawn + pending "
            f"+ reserved + outstanding = {parts}"
        )
    else:
        lines.append(
            f"DOES NOT RECONCILE: received {totals.received_msat} != {parts} "
            f"(off by {unaccounted} msat)"
        )
    return "\n".join(lines)


async def accounts(config: Config, limit: int | None, as_json: bool) -> int:
    """``accounts``: credit accounts, most recently used first, and their totals; exit 4
    when they do not reconcile."""
    _check_limit(limit)
    store = await open_store(config.store.url, read_only=True)
    try:
        listed = await store.list_accounts(limit)
        totals = await store.credit_totals()
    finally:
        await store.close()
    if as_json:
        document = {
            "accounts": [account_json(a) for a in listed],
            "totals": credit_totals_json(totals),
        }
        print(json.dumps(document, indent=2, ensure_ascii=True))
    else:
        print(_accounts_table(listed, totals))
    return 0 if unaccounted_msat(totals) == 0 else EXIT_DOES_NOT_RECONCILE


async def revoke(config: Config, token_id: str) -> int:
    """``token revoke``: delete the token's root key; 1 if there is no such token."""
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
