"""The admin commands: ``invoices`` (a table, or ``--json``) and ``token revoke TOKEN_ID``."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from gateway import errors
from gateway.cli.formats import utc_time
from gateway.config import Config
from gateway.ports import InvoiceRecord, InvoiceState
from gateway.store import open_store
from gateway.text import printable


def add_parsers(commands: Any) -> None:
    """``invoices`` and ``token revoke`` on the ``commands`` subparsers."""
    listing = commands.add_parser("invoices", help="list tracked invoices")
    listing.add_argument("--state", choices=[s.value.lower() for s in InvoiceState])
    listing.add_argument("--limit", type=int)
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    token = commands.add_parser("token", help="manage tokens")
    token_commands = token.add_subparsers(dest="token_command", required=True)
    revoke_token = token_commands.add_parser("revoke", help="revoke a token by its id (hex)")
    revoke_token.add_argument("token_id")


def _record_json(record: InvoiceRecord) -> dict[str, Any]:
    return {
        "payment_hash": record.payment_hash.hex(),
        "token_id": record.token_id.hex(),
        "state": record.state.value,
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
    }


def _table(records: Sequence[InvoiceRecord]) -> str:
    rows = [("CREATED (UTC)", "STATE", "AMOUNT msat", "PAID msat", "SERVICE", "REQUEST", "HASH")]
    rows += [
        (
            utc_time(r.created_at),
            r.state.value,
            str(r.amount_msat),
            str(r.amount_paid_msat),
            # Clients chose these: escaped, so that they cannot drive the terminal.
            printable(r.service),
            printable(f"{r.method} {r.path}"),
            r.payment_hash.hex()[:16],
        )
        for r in records
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    counts = {state: sum(r.state is state for r in records) for state in InvoiceState}
    settled = sum(r.amount_paid_msat for r in records if r.state is InvoiceState.SETTLED)
    summary = ", ".join(f"{count} {state.value.lower()}" for state, count in counts.items())
    lines.append(f"\n{len(records)} invoices: {summary}; {settled} msat received")
    return "\n".join(line.rstrip() for line in lines)


async def invoices(config: Config, state: str | None, limit: int | None, as_json: bool) -> int:
    """``invoices``: the tracked invoices newest first, as a table or JSON."""
    wanted = InvoiceState(state.upper()) if state else None
    if limit is not None and limit < 0:
        raise errors.ConfigError(f"--limit must be >= 0, got {limit}")
    # Only looks: a missing database is an error, not created, and nothing is chmodded.
    store = await open_store(config.store.url, read_only=True)
    try:
        records = await store.list_invoices(state=wanted, limit=limit)
    finally:
        await store.close()
    if as_json:
        # ensure_ascii: control and bidi characters a client put in a path stay escaped.
        print(json.dumps([_record_json(r) for r in records], indent=2, ensure_ascii=True))
    else:
        print(_table(records))
    return 0


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
