"""``payees`` and ``payouts``: the revenue split ledger, from the store, and paying it now.

    l402-gateway payees [--json]                      each payee's earned, accrued, pending,
                                                      paid and fees; the totals, reconciled
    l402-gateway payouts [--payee N] [--state S] [--limit N] [--json]   payout history
    l402-gateway payouts pay [--payee N] [--json]    pay every (or one) payee's accrued now

``payees`` and ``payouts`` only read the store (opened read-only). ``payouts pay`` pays each
configured payee (or N) all it has accrued, whatever its threshold, over the payout
macaroon's LND connection, as the running gateway's worker would; a payout the running
gateway has under way for that payee is not paid twice (the ledger debits it once). Exit
codes: 0 every payout made SUCCEEDED (or there was nothing to pay), 1 no such payee, 2 bad
usage or configuration, 3 a payout FAILED or is still PENDING (the gateway's worker
resolves it), or a backend failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

from gateway import errors
from gateway.cli.formats import columns, utc_time
from gateway.config import Config
from gateway.ports import Msat, PayeeBalance, Payout, PayoutState, SplitTotals
from gateway.store import open_store
from gateway.text import printable

__all__ = ["add_parsers", "payees", "reconciled", "run"]

EXIT_NOT_PAID = 3  # a payout FAILED or is still PENDING
MAX_LIMIT = 2**63 - 1


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"--limit is 0 to {MAX_LIMIT}, got {text}")
    return value


def _state(text: str) -> PayoutState:
    try:
        return PayoutState(text.upper())
    except ValueError:
        names = ", ".join(state.value.lower() for state in PayoutState)
        raise argparse.ArgumentTypeError(f"--state {text!r}: use one of {names}") from None


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
        type=_state,
        metavar="STATE",
        help=f"only this state: {', '.join(s.value.lower() for s in PayoutState)}",
    )
    history.add_argument("--limit", type=_limit, default=100, help="at most N (default 100)")
    history.add_argument("--json", action="store_true", help="machine-readable output")
    actions = history.add_subparsers(dest="payouts_command")
    pay = actions.add_parser(
        "pay",
        help="pay every payee (or one) all it has accrued now",
        description="Pay each configured payee (or --payee NAME) all it has accrued, "
        "whatever its threshold, over [payouts] payment_macaroon. Exit 0 when every payout "
        "SUCCEEDED (or nothing was due), 3 when one FAILED (its amount is accrued again) or "
        "is still PENDING (the running gateway resolves it).",
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


def reconciled(totals: SplitTotals) -> tuple[int, int, int]:
    """(kept, fees, off): what the merchant kept after the routing fees it bore, every
    routing fee, and ``received - (kept + paid + accrued + pending + fees)`` (0: it adds up)."""
    kept = totals.kept_msat - totals.merchant_fees_msat
    fees = totals.payee_fees_msat + totals.merchant_fees_msat
    parts = kept + totals.paid_msat + totals.accrued_msat + totals.pending_msat + fees
    return kept, fees, totals.received_msat - parts


def _balance_json(balance: PayeeBalance, destination: str | None) -> dict[str, Any]:
    return {
        "payee": balance.payee,
        "destination": destination,  # None: no longer configured
        "earned_msat": balance.earned_msat,
        "accrued_msat": balance.accrued_msat,
        "pending_msat": balance.pending_msat,
        "paid_msat": balance.paid_msat,
        "fees_msat": balance.fees_msat,
        "merchant_fees_msat": balance.merchant_fees_msat,
        "last_payout_at": balance.last_payout_at,
    }


def _totals_json(totals: SplitTotals) -> dict[str, Any]:
    kept, fees, off = reconciled(totals)
    return {
        "received_msat": totals.received_msat,
        "kept_msat": totals.kept_msat,
        "earned_msat": totals.earned_msat,
        "paid_msat": totals.paid_msat,
        "pending_msat": totals.pending_msat,
        "accrued_msat": totals.accrued_msat,
        "payee_fees_msat": totals.payee_fees_msat,
        "merchant_fees_msat": totals.merchant_fees_msat,
        "kept_after_fees_msat": kept,
        "fees_msat": fees,
        "reconciled": off == 0,
    }


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
            "FEES msat",
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
            str(b.fees_msat + b.merchant_fees_msat),
            utc_time(b.last_payout_at),
        )
        for b in listed
    ]
    kept, fees, off = reconciled(totals)
    lines = [*columns(rows)] if listed else ["no payees"]
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
    verdict = "OK" if off == 0 else f"MISMATCH (off by {off} msat)"
    lines.append(
        f"received = kept + paid + accrued + pending + fees: {totals.received_msat} = "
        f"{parts}  {verdict}"
    )
    return "\n".join(lines)


async def payees(config: Config, as_json: bool) -> int:
    """``payees``: every payee's balance and the ledger's totals (a line says whether they
    reconcile)."""
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
            "payees": [_balance_json(b, destinations.get(b.payee)) for b in listed],
            "totals": _totals_json(totals),
        }
        print(json.dumps(document, indent=2, ensure_ascii=True))
    else:
        print(_payees_text(listed, destinations, totals))
    return 0


def payout_json(payout: Payout) -> dict[str, Any]:
    return {
        "payment_hash": payout.payment_hash.hex(),
        "payee": payout.payee,
        "destination": payout.destination,
        "payment_request": payout.payment_request,
        "amount_msat": payout.amount_msat,
        "fee_reserve_msat": payout.fee_reserve_msat,
        "payee_pays_fee": payout.payee_pays_fee,
        "state": payout.state.value,
        "created_at": payout.created_at,
        "fee_msat": payout.fee_msat,
        "resolved_at": payout.resolved_at,
        "failure": payout.failure,
    }


def _payouts_table(listed: Sequence[Payout]) -> str:
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
    return "\n".join(columns(rows))


async def history(
    config: Config, payee: str | None, state: PayoutState | None, limit: int, as_json: bool
) -> int:
    """``payouts``: the payouts, newest first."""
    store = await open_store(config.store.url, read_only=True)
    try:
        listed = await store.list_payouts(payee, state, limit)
    finally:
        await store.close()
    if as_json:
        print(json.dumps([payout_json(p) for p in listed], indent=2, ensure_ascii=True))
    elif listed:
        print(_payouts_table(listed))
    else:
        print("no payouts")
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
    from gateway.runtime import running_payouts

    if not config.payee:
        raise errors.ConfigError("no [[payee]] is configured: nobody to pay")
    if payee is not None and payee not in {p.name for p in config.payee}:
        print(f"l402-gateway: no [[payee]] named {payee!r}", file=sys.stderr)
        return 1
    store = await open_store(config.store.url, pool_size=config.store.pool_size)
    try:
        async with running_payouts(config, store) as payouts:
            assert payouts is not None  # payees are configured
            made = await payouts.pay_now(payee)
    finally:
        await store.close()
    if as_json:
        print(json.dumps([payout_json(p) for p in made], indent=2, ensure_ascii=True))
    elif not made:
        print("nothing to pay: no payee has anything accrued (or it is under way)")
    else:
        for payout in made:
            paid = payout.state is PayoutState.SUCCEEDED
            print(_outcome(payout), file=sys.stdout if paid else sys.stderr)
    settled = all(p.state is PayoutState.SUCCEEDED for p in made)
    return 0 if settled else EXIT_NOT_PAID
