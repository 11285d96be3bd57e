"""``payees`` and ``payouts``: the revenue split ledger, from the store, and paying it now.

    l402-gateway payees [--json]                      each payee's earned, accrued, pending,
                                                      paid and fees; the totals, reconciled
    l402-gateway payouts [--payee N] [--state S] [--limit N] [--json]   payout history
    l402-gateway payouts pay [--payee N] [--json]    pay every (or one) payee's accrued now

``payees`` and ``payouts`` only read the store (opened read-only); ``payees`` exits 4
(``EXIT_DOES_NOT_RECONCILE``) when the totals do not reconcile. ``payouts pay`` pays each
configured payee (or N) what it has accrued (as the worker would: less the fee limit when
the payee bears the fee, in whole sat up to ``maxSendable`` over LNURL-pay), whatever its
threshold, over the payout macaroon's LND connection; a payout the running
gateway has under way for that payee is not paid twice (the ledger debits it once). Exit
codes: 0 every payout made SUCCEEDED (or there was nothing to pay), 1 no such payee, 2 bad
usage or configuration (a ``memory:`` store or no database at ``store.url`` included: it pays
from the gateway's existing ledger, never a new one), 3 a payout FAILED or is still PENDING
(the gateway's worker resolves it), or a backend failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

from gateway import errors
from gateway.cli.formats import (
    EXIT_DOES_NOT_RECONCILE,
    columns,
    parse_limit,
    print_records,
    state_names,
    state_parser,
    utc_time,
)
from gateway.config import Config, store_location
from gateway.ports import Msat, PayeeBalance, Payout, PayoutState, SplitTotals
from gateway.reports import (
    payee_balance_json,
    payout_json,
    split_reconciliation,
    split_totals_json,
)
from gateway.store import open_store
from gateway.text import printable

__all__ = ["add_parsers", "payees", "run"]

EXIT_NOT_PAID = 3  # a payout FAILED or is still PENDING


def add_parsers(commands: Any) -> None:
    """``payees`` and ``payouts`` (with ``payouts pay``) on the ``commands`` subparsers."""
    listing = commands.add_parser(
        "payees",
        help="revenue split payees: earned, accrued, paid; the ledger's totals",
        description="Each [[payee]] (and any payee the ledger knows that is no longer "
        "configured): earned, accrued (owed, not under way), pending, paid and routing fees, "
        "then the totals over every split route, which reconcile: received = kept + paid + "
        "accrued + pending + fees.",
    )
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    history = commands.add_parser(
        "payouts",
        help="payout history; 'payouts pay' pays the payees now",
        description="Payouts to the revenue split payees, newest first.",
    )
    history.add_argument("--payee", metavar="NAME", help="only this payee's")
    history.add_argument(
        "--state",
        type=state_parser(PayoutState),
        metavar="STATE",
        help=f"only this state: {', '.join(state_names(PayoutState))}",
    )
    history.add_argument("--limit", type=parse_limit, default=100, help="at most N (default 100)")
    history.add_argument("--json", action="store_true", help="machine-readable output")
    actions = history.add_subparsers(dest="payouts_command")
    pay = actions.add_parser(
        "pay",
        help="pay every payee (or one) what it has accrued now",
        description="Pay each configured payee (or --payee NAME) what it has accrued, "
        "whatever its threshold, over [payouts] payment_macaroon (else [credit]'s): all of "
        "it, less the fee limit when the payee bears the fee; to an LNURL-pay service in "
        "whole sat, at most its maxSendable. Exit 0 when every payout "
        "SUCCEEDED (or nothing was due), 1 when there is no such payee, 2 on a configuration "
        "error (no database at store.url, or a memory: store), 3 when one FAILED (its "
        "amount is accrued again) or is still PENDING (the running gateway resolves it).",
    )
    pay.add_argument("--payee", dest="pay_payee", metavar="NAME", help="only this payee")
    pay.add_argument("--json", dest="pay_json", action="store_true", help="print JSON")


def uses_lnd(args: argparse.Namespace) -> bool:
    """Whether the command talks to LND (``payouts pay``)."""
    return args.command == "payouts" and getattr(args, "payouts_command", None) == "pay"


def run(config: Config, args: argparse.Namespace) -> int:
    """The ``payees`` and ``payouts`` commands; their exit code."""
    if args.command == "payees":
        return asyncio.run(payees(config, args.json))
    if args.payouts_command == "pay":
        payee = args.pay_payee or args.payee
        return asyncio.run(pay(config, payee, args.pay_json or args.json))
    return asyncio.run(history(config, args.payee, args.state, args.limit, args.json))


def _empty_balance(name: str) -> PayeeBalance:
    """A configured payee the ledger has not credited yet."""
    none = Msat(0)
    return PayeeBalance(name, none, none, none, none, none, None)


def _listed(config: Config, stored: Sequence[PayeeBalance]) -> list[PayeeBalance]:
    """The configured payees in config order (zeros where the ledger has none yet), then
    those only the ledger knows, by name."""
    by_name = {balance.payee: balance for balance in stored}
    configured = [by_name.pop(p.name, _empty_balance(p.name)) for p in config.payee]
    return configured + sorted(by_name.values(), key=lambda balance: balance.payee)


def _payees_text(
    listed: Sequence[PayeeBalance], destinations: dict[str, str], totals: SplitTotals
) -> str:
    rows = [
        (
            "PAYEE",
            "DESTINATION",
            "EARNED",
            "ACCRUED",
            "PENDING",
            "PAID",
            "FEES",
            "MERCHANT FEES",
            "LAST PAYOUT (UTC)",
        )
    ]
    rows += [
        (
            b.payee,
            printable(destinations.get(b.payee, "(not configured)")),
            str(b.earned_msat),
            str(b.accrued_msat),
            str(b.pending_msat),
            str(b.paid_msat),
            str(b.fees_msat),
            str(b.merchant_fees_msat),
            utc_time(b.last_payout_at),
        )
        for b in listed
    ]
    kept, fees, unaccounted = split_reconciliation(totals)
    if listed:
        lines = columns(rows)
        lines += [
            "amounts in msat; earned = accrued + pending + paid + fees (the routing fees the "
            "payee bore); merchant fees: those the merchant bore for its payouts"
        ]
    else:
        lines = ["no payees"]
    lines += ["", "totals over every split route, in msat:"]
    lines += columns(
        [
            ("  received", str(totals.received_msat)),
            (
                "  kept (merchant)",
                f"{kept}  ({totals.kept_msat} less {totals.merchant_fees_msat} of routing fees)",
            ),
            ("  earned (payees)", str(totals.earned_msat)),
            ("  paid", str(totals.paid_msat)),
            ("  accrued", str(totals.accrued_msat)),
            ("  pending", str(totals.pending_msat)),
            (
                "  fees",
                f"{fees}  (borne by payees {totals.payee_fees_msat}, by the merchant "
                f"{totals.merchant_fees_msat})",
            ),
        ]
    )
    parts = f"{kept} + {totals.paid_msat} + {totals.accrued_msat} + {totals.pending_msat} + {fees}"
    if unaccounted == 0:
        lines.append(
            f"reconciled: received {totals.received_msat} = kept + paid + accrued + pending "
            f"+ fees = {parts}"
        )
    else:
        lines.append(
            f"DOES NOT RECONCILE: received {totals.received_msat} != {parts} "
            f"(off by {unaccounted} msat)"
        )
    return "\n".join(lines)


async def payees(config: Config, as_json: bool) -> int:
    """``payees``: every payee's balance and the ledger's totals; exit 4 when they do not
    reconcile."""
    store = await open_store(config.store.url, read_only=True)
    try:
        stored = await store.list_payees()
        totals = await store.split_totals()
    finally:
        await store.close()
    listed = _listed(config, stored)
    destinations = {payee.name: payee.destination for payee in config.payee}
    if as_json:
        document = {
            "payees": [payee_balance_json(b, destinations.get(b.payee)) for b in listed],
            "totals": split_totals_json(totals),
        }
        print(json.dumps(document, indent=2, ensure_ascii=True))
    else:
        print(_payees_text(listed, destinations, totals))
    return 0 if split_reconciliation(totals)[2] == 0 else EXIT_DOES_NOT_RECONCILE


def _payouts_table(listed: Sequence[Payout]) -> list[str]:
    rows = [("CREATED (UTC)", "PAYEE", "STATE", "AMOUNT msat", "FEE msat", "HASH", "FAILURE")]
    rows += [
        (
            utc_time(p.created_at),
            p.payee,
            p.state.value,
            str(p.amount_msat),
            str(p.fee_msat),
            p.payment_hash.hex()[:16],
            printable(p.failure) or "-",
        )
        for p in listed
    ]
    return columns(rows)


async def history(
    config: Config, payee: str | None, state: PayoutState | None, limit: int, as_json: bool
) -> int:
    """``payouts``: the payouts, newest first."""
    store = await open_store(config.store.url, read_only=True)
    try:
        listed = await store.list_payouts(payee, state, limit)
    finally:
        await store.close()
    print_records(listed, as_json, payout_json, _payouts_table, "no payouts")
    return 0


def _outcome(payout: Payout) -> str:
    amount = f"{payout.amount_msat} msat to {printable(payout.destination)}"
    if payout.state is PayoutState.SUCCEEDED:
        return f"{payout.payee}: SUCCEEDED, {amount}, routing fee {payout.fee_msat} msat"
    if payout.state is PayoutState.FAILED:
        reason = printable(payout.failure) or "no reason given"
        return f"{payout.payee}: FAILED, {amount} ({reason}); the amount is accrued again"
    return (
        f"{payout.payee}: PENDING, {amount} (payment hash {payout.payment_hash.hex()}); "
        "the running gateway resolves it"
    )


async def pay(config: Config, payee: str | None, as_json: bool) -> int:
    """``payouts pay``: every (or one) payee's accrued now; 0 when all SUCCEEDED."""
    # Imported here: the listing commands need no LND or LNURL client.
    from gateway.runtime import lnd_settings, payout_settings, running_payouts

    if not config.payee:
        raise errors.ConfigError("no [[payee]] is configured: nobody to pay")
    if payee is not None and payee not in {p.name for p in config.payee}:
        print(f"l402-gateway: no [[payee]] named {payee!r}", file=sys.stderr)
        return 1
    if store_location(config.store.url)[0] == "memory":
        raise errors.ConfigError(
            "payouts pay needs the gateway's database, and store.url is memory: (a ledger "
            "that lives only inside one process has nothing to pay)"
        )
    # A bad [lnd] or payment macaroon fails before the store is opened, each named as its own.
    lnd_settings(config)
    payout_settings(config)
    # The gateway's existing database, as the listing commands open it: a typo in store.url
    # is "no database at ...", not a new empty database migrated and found owing nothing.
    await (await open_store(config.store.url, read_only=True)).close()
    store = await open_store(config.store.url, pool_size=config.store.pool_size)
    made: list[Payout] = []
    unpaid = False
    try:
        async with running_payouts(config, store) as payouts:
            assert payouts is not None  # payees are configured
            # One payee at a time: each one that cannot be paid is named with its reason.
            for name in [payee] if payee is not None else [p.name for p in config.payee]:
                try:
                    made += await payouts.pay_now(name)
                except errors.GatewayError as error:
                    print(f"{name}: not paid: {error}", file=sys.stderr)
                    unpaid = True
    finally:
        await store.close()
    if as_json:
        print(json.dumps([payout_json(p) for p in made], indent=2, ensure_ascii=True))
    elif not made and not unpaid:
        print(
            "nothing paid: no payee had an amount to pay (nothing accrued, below the fee "
            "limit or the service's minimum, or a payout under way; a payee that could not "
            "be paid is logged above)"
        )
    else:
        for payout in made:
            paid = payout.state is PayoutState.SUCCEEDED
            print(_outcome(payout), file=sys.stdout if paid else sys.stderr)
    settled = not unpaid and all(p.state is PayoutState.SUCCEEDED for p in made)
    return 0 if settled else EXIT_NOT_PAID
