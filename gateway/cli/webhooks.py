"""``webhooks``: the outbox's deliveries, from the store.

    l402-gateway webhooks list [--state pending|delivered|dead] [--endpoint N] [--limit N] [--json]
    l402-gateway webhooks show EVENT_ID [--json]       the event (its JSON body) and deliveries
    l402-gateway webhooks redeliver EVENT_ID [--endpoint N]   send it again (to N only)
    l402-gateway webhooks redeliver --dead [--endpoint N]     every DEAD delivery again
    l402-gateway webhooks new-secret                   a fresh whsec_... secret for an endpoint

A redelivery is picked up by the running gateway's sender within its poll interval; the
receiver gets the same ``webhook-id`` again. Only deliveries to the configured endpoints are
redelivered (a removed endpoint's stay DEAD).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from gateway import errors
from gateway.cli.formats import columns, parse_limit, print_records, utc_time
from gateway.config import Config
from gateway.ports import DeliveryState, WebhookDelivery, WebhookEvent
from gateway.reports import delivery_json
from gateway.store import open_store
from gateway.text import printable

MAX_ID = 2**63 - 1  # SQLite's largest integer: a larger one cannot even be looked up


def _event_id(text: str) -> int:
    """An event id for argparse: a clear usage error (exit 2) for one out of range."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an event id: {text!r}") from None
    if not 1 <= value <= MAX_ID:
        raise argparse.ArgumentTypeError(f"an event id is 1 to {MAX_ID}, got {text}")
    return value


def message_id(event: WebhookEvent) -> str:
    """The ``webhook-id`` it is sent with (``gateway.webhooks.message_id``, which needs
    aiohttp)."""
    return f"msg_{event.webhook_id}"


def add_parser(commands: Any) -> None:
    webhooks = commands.add_parser(
        "webhooks",
        help="list, inspect and redeliver webhook deliveries",
        description="The signed webhooks the gateway sends from its outbox ([[webhook]]).",
    )
    actions = webhooks.add_subparsers(dest="webhooks_command", required=True)
    listing = actions.add_parser("list", help="deliveries, the newest event first")
    listing.add_argument(
        "--state", choices=[state.value.lower() for state in DeliveryState], help="only these"
    )
    listing.add_argument("--endpoint", metavar="NAME", help="only to this endpoint")
    listing.add_argument("--limit", type=parse_limit, default=100, help="at most N (default 100)")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    show = actions.add_parser("show", help="one event and its deliveries")
    show.add_argument("event_id", type=_event_id)
    show.add_argument("--json", action="store_true", help="machine-readable output")
    redeliver = actions.add_parser("redeliver", help="send an event (or every DEAD one) again")
    which = redeliver.add_mutually_exclusive_group(required=True)
    which.add_argument("event_id", type=_event_id, nargs="?", help="the event's id")
    which.add_argument("--dead", action="store_true", help="every DEAD delivery")
    redeliver.add_argument("--endpoint", metavar="NAME", help="to this endpoint only")
    actions.add_parser("new-secret", help="print a fresh whsec_ secret for an endpoint")


def run(config: Config, args: Any) -> int:
    command = args.webhooks_command
    if command == "new-secret":
        from gateway.webhooks import new_secret

        print(new_secret())
        return 0
    if command == "list":
        state = None if args.state is None else DeliveryState(args.state.upper())
        return asyncio.run(_list(config, state, args.endpoint, args.limit, args.json))
    if command == "show":
        return asyncio.run(_show(config, args.event_id, args.json))
    return asyncio.run(_redeliver(config, args.event_id, args.endpoint))


def _table(deliveries: Sequence[WebhookDelivery]) -> list[str]:
    rows = [["EVENT", "TYPE", "ENDPOINT", "STATE", "ATTEMPTS", "NEXT/DONE (UTC)", "LAST"]]
    for d in deliveries:
        when = d.delivered_at if d.state is DeliveryState.DELIVERED else d.next_attempt_at
        last = d.last_error or (str(d.last_status) if d.last_status is not None else "-")
        rows.append(
            [
                str(d.event_id),
                d.event_type,
                printable(d.endpoint),
                d.state.value,
                str(d.attempts),
                "-" if d.state is DeliveryState.DEAD else utc_time(when),
                printable(last),
            ]
        )
    return columns(rows)


async def _list(
    config: Config, state: DeliveryState | None, endpoint: str | None, limit: int, as_json: bool
) -> int:
    store = await open_store(config.store.url, read_only=True)
    try:
        deliveries = await store.list_webhook_deliveries(state, endpoint, limit)
    finally:
        await store.close()
    print_records(deliveries, as_json, delivery_json, _table, "no webhook deliveries")
    return 0


async def _show(config: Config, event_id: int, as_json: bool) -> int:
    store = await open_store(config.store.url, read_only=True)
    try:
        event = await store.get_webhook_event(event_id)
        deliveries = await store.list_webhook_deliveries(limit=1000, event_id=event_id)
    finally:
        await store.close()
    if event is None:
        print(f"l402-gateway: no webhook event {event_id}", file=sys.stderr)
        return 1
    body = json.loads(event.payload)
    if as_json:
        document = {
            "event_id": event.event_id,
            "webhook_id": message_id(event),
            "type": event.type,
            "resource": event.resource,
            "created_at": event.created_at,
            "payload": body,
            "deliveries": [delivery_json(d) for d in deliveries],
        }
        print(json.dumps(document, indent=2, ensure_ascii=True))
        return 0
    print(f"event {event.event_id} (webhook-id {message_id(event)}): {event.type}")
    print(f"resource {event.resource}, written {utc_time(event.created_at)} UTC")
    print(json.dumps(body, indent=2, ensure_ascii=True))
    print("\n".join(_table(deliveries)) if deliveries else "no deliveries (yet)")
    return 0


async def _redeliver(config: Config, event_id: int | None, endpoint: str | None) -> int:
    configured = {e.name for e in config.webhook}
    if endpoint is not None and endpoint not in configured:
        raise errors.ConfigError(f"no [[webhook]] endpoint named {endpoint!r}")
    store = await open_store(config.store.url)
    try:
        if event_id is not None and await store.get_webhook_event(event_id) is None:
            print(f"l402-gateway: no webhook event {event_id}", file=sys.stderr)
            return 1
        # Only to configured endpoints: a removed one's would stay PENDING for ever.
        count = await store.redeliver_webhooks(
            time.time(), event_id=event_id, endpoint=endpoint, endpoints=configured
        )
    finally:
        await store.close()
    what = f"event {event_id}" if event_id is not None else "dead deliveries"
    print(f"{count} deliveries of {what} queued again")
    return 0 if count or event_id is None else 1
