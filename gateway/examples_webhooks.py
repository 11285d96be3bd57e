"""An example webhook receiver: an aiohttp application that checks each delivery with
``gateway.webhooks.verify_delivery``, ignores one it has already handled (a delivery may come
more than once: dedupe on ``webhook-id``), and hands the event to ``handle``::

    from aiohttp import web
    from gateway.examples_webhooks import webhook_receiver

    async def handle(event):
        if event["type"] == "token.bought":
            print("paid", event["data"]["amount_msat"], "msat for", event["data"]["service"])

    web.run_app(webhook_receiver(open("crm.whsec").read().strip(), handle), port=8080)

It answers 204 once handled (the gateway then stops sending it), 400 to a delivery that fails
verification (logged; the gateway retries, so a wrong secret shows as failed deliveries), and
500 when ``handle`` raised (the gateway retries later). Its memory of seen ids is bounded; a
real receiver keeps them where it records the effect, in the same transaction.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway import errors
from gateway.webhooks import verify_delivery

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[None]]
SEEN_IDS = 10_000  # webhook-ids remembered for deduplication
MAX_BODY = 64 * 1024


def webhook_receiver(secret: str, handle: Handler, *, path: str = "/webhooks") -> web.Application:
    """An application taking deliveries at ``path`` (POST)."""
    seen: collections.OrderedDict[str, None] = collections.OrderedDict()
    # A delivery whose handling outlasts the sender's timeout comes again while it runs:
    # the retry waits for the same run instead of starting another.
    running: dict[str, asyncio.Future[None]] = {}

    def finished(msg_id: str, task: asyncio.Future[None]) -> None:
        del running[msg_id]
        if not task.cancelled() and task.exception() is None:
            seen[msg_id] = None
            if len(seen) > SEEN_IDS:
                seen.popitem(last=False)

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()  # whole, however it arrives; over MAX_BODY: 413
        try:
            event = verify_delivery(secret, request.headers, body)
        except errors.WebhookRejected as rejected:
            log.warning("webhook refused: %s", rejected)
            return web.Response(status=400, text=str(rejected))
        msg_id = request.headers["webhook-id"]
        if msg_id in seen:
            return web.Response(status=204)  # handled before: the answer was lost
        task = running.get(msg_id)
        if task is None:
            task = running[msg_id] = asyncio.ensure_future(handle(event))
            task.add_done_callback(functools.partial(finished, msg_id))
        try:
            await asyncio.shield(task)  # the sender hanging up does not stop the handling
        except Exception:
            log.exception("webhook %s: the handler failed", msg_id)
            return web.Response(status=500, text="handler failed")
        return web.Response(status=204)

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post(path, receive)
    return app
