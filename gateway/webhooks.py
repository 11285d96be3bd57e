"""Signed webhooks from the store's outbox, by the Standard Webhooks conventions.

The store writes an event (``gateway.ports.WEBHOOK_EVENT_TYPES``) in the same transaction as
the change that causes it: a settlement, an expiry, a refund, a withdrawal. The
``WebhookSender`` (one per store: the process that runs the watcher, supervised as
``l402-webhook-sender``) copies new events into a delivery per subscribed endpoint
(``Store.fan_out_webhook_events``), then sends each endpoint's deliveries in event order, one
at a time, as an HTTP POST of the event's JSON with the headers:

- ``webhook-id``: ``msg_`` and the event's random ``webhook_id`` (32 hex digits), the same
  on every retry and to every endpoint, never repeated (unlike the event's id, which a
  restored backup or a fresh database gives again): receivers dedupe on it;
- ``webhook-timestamp``: unix seconds of this attempt;
- ``webhook-signature``: ``v1,<base64 HMAC-SHA256 of "id.timestamp.body">`` under the
  endpoint's ``whsec_...`` secret.

A 2xx answer delivers it; anything else (a timeout, no connection, a 3xx: redirects are not
followed, 4xx, 5xx) is retried after a backoff doubling from ``initial_backoff`` up to
``max_backoff``, and after ``max_attempts`` the delivery is DEAD (``l402-gateway webhooks
redeliver`` revives it); the store decides which in the write that records the attempt, so
a redelivery made while it was under way counts. Delivery is at least once: a process killed
after the receiver answered but before the answer was recorded sends it again after the
restart, with the same ``webhook-id``.

The sender is woken by ``InvoiceEvents`` (this process's settlements) and otherwise looks
every ``poll_interval`` seconds (events written by other workers, a redelivery from the CLI).
``register()``, before anything else of the process writes events, starts new endpoints'
cursors (and forgets removed ones). Old events are pruned by the invoice sweeper
(``gateway.expiry``), whether or not any endpoint is configured.

``verify_delivery`` is the receiving side, for receivers written in Python;
``gateway.examples_webhooks`` is a receiver built on it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime
import hmac
import json
import logging
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from standardwebhooks import Webhook

from gateway import errors
from gateway.events import InvoiceEvents, wake_on
from gateway.ports import (
    Clock,
    DeliveryState,
    Store,
    SystemClock,
    WebhookEvent,
    webhook_retry_delay,
)
from gateway.supervisor import run_together

__all__ = [
    "DEFAULT_TOLERANCE",
    "RetryPolicy",
    "WebhookEndpoint",
    "WebhookSender",
    "message_id",
    "new_secret",
    "retry_delay",
    "signed_headers",
    "verify_delivery",
]

log = logging.getLogger(__name__)

# Seconds a delivery's timestamp may be off the receiver's clock (Standard Webhooks' 5 min).
DEFAULT_TOLERANCE = 300.0
FAN_OUT_LIMIT = 500  # events fanned out per endpoint in one write
USER_AGENT = "l402-gateway-webhooks"
# Seconds before the next attempt after n failed ones (the stores compute it in their write).
retry_delay = webhook_retry_delay


def message_id(event: WebhookEvent) -> str:
    """The ``webhook-id`` of an event: ``msg_`` and its random id, the same on every retry
    and every endpoint."""
    return f"msg_{event.webhook_id}"


def new_secret() -> str:
    """A fresh endpoint secret: 32 random bytes, ``whsec_`` + base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def _webhook(secret: str) -> Webhook:
    try:
        return Webhook(secret)
    # EmptyWebhookSecretError is a bare Exception subclass of the package's.
    except Exception as error:
        raise errors.ConfigError(f"not a webhook secret: {type(error).__name__}") from None


def signed_headers(secret: str, msg_id: str, timestamp: int, body: str) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt at sending ``body`` as ``msg_id``."""
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": _webhook(secret).sign(msg_id, moment, body),
        "content-type": "application/json",
    }


def _header(headers: Mapping[str, str], name: str) -> str:
    """A header by name, whatever its case; '' when absent."""
    value = headers.get(name)
    if value is None:
        for key, candidate in headers.items():
            if key.lower() == name:
                value = candidate
                break
    return value if isinstance(value, str) else ""


def verify_delivery(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> dict[str, Any]:
    """Check a webhook delivery (``headers`` as received, ``body`` the raw bytes) and return
    its event: ``{"type", "timestamp", "data"}``.

    Raises ``gateway.errors.WebhookRejected`` when a header is missing or malformed, no
    ``v1`` signature matches (a wrong secret, or a body or id changed on the way), or the
    timestamp is more than ``tolerance`` seconds from ``now`` (default: the clock), which
    refuses a delivery replayed later. Nothing else is raised for anything a sender can put
    in the headers or body; a ``secret`` that is not ``whsec_...`` base64 is a
    ``ConfigError``. Dedupe on ``webhook-id``: a delivery may come more than once.
    """
    webhook = _webhook(secret)
    msg_id = _header(headers, "webhook-id")
    stamp = _header(headers, "webhook-timestamp")
    signatures = _header(headers, "webhook-signature")
    if not (msg_id and stamp and signatures):
        raise errors.WebhookRejected("missing webhook-id, webhook-timestamp or webhook-signature")
    if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 12):
        raise errors.WebhookRejected("malformed webhook-timestamp")
    sent = int(stamp)
    current = time.time() if now is None else now
    if abs(current - sent) > tolerance:
        raise errors.WebhookRejected("webhook-timestamp outside the tolerance (a replay?)")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise errors.WebhookRejected("the body is not UTF-8") from None
    moment = datetime.datetime.fromtimestamp(sent, datetime.UTC)
    try:
        signed = webhook.sign(msg_id, moment, text)
    except UnicodeEncodeError:  # header bytes that are not UTF-8, as surrogate escapes
        raise errors.WebhookRejected("webhook-id is not UTF-8") from None
    expected = base64.b64decode(signed.split(",", 1)[1])
    if not any(_matches(candidate, expected) for candidate in signatures.split(" ")):
        raise errors.WebhookRejected("no matching signature (wrong secret or altered delivery)")
    try:
        event = json.loads(text)
    except ValueError:
        raise errors.WebhookRejected("the body is not JSON") from None
    if not isinstance(event, dict):
        raise errors.WebhookRejected("the body is not a JSON object")
    return event


def _matches(candidate: str, expected: bytes) -> bool:
    version, _, signature = candidate.partition(",")
    if version != "v1":
        return False
    try:
        given = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        return False
    return hmac.compare_digest(given, expected)


@dataclass(frozen=True, slots=True)
class WebhookEndpoint:
    """Where one endpoint's deliveries go, which event types it gets, and its secret."""

    name: str
    url: str
    events: frozenset[str]
    secret: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``[webhooks]`` as the sender takes it."""

    max_attempts: int = 12
    initial_backoff: float = 5.0
    max_backoff: float = 3600.0
    timeout: float = 10.0
    poll_interval: float = 1.0


async def _wait(event: asyncio.Event, seconds: float) -> None:
    """Until ``event`` is set or ``seconds`` have passed."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), max(0.0, seconds))


class WebhookSender:
    """Fans out the store's events and delivers them; run ``run()`` as one supervised task
    per store."""

    def __init__(
        self,
        store: Store,
        endpoints: Sequence[WebhookEndpoint],
        policy: RetryPolicy | None = None,
        clock: Clock | None = None,
        *,
        events: InvoiceEvents | None = None,
    ) -> None:
        self._store = store
        self._endpoints = tuple(endpoints)
        self._policy = policy or RetryPolicy()
        self._clock = clock or SystemClock()
        self._events = events
        self._fan_out = asyncio.Event()
        self._wakes = {endpoint.name: asyncio.Event() for endpoint in self._endpoints}

    @property
    def subscriptions(self) -> dict[str, frozenset[str]]:
        """Each endpoint's name and the event types it gets."""
        return {endpoint.name: endpoint.events for endpoint in self._endpoints}

    async def register(self) -> None:
        """Start each new endpoint's cursor after the newest event, and forget removed ones
        (their PENDING deliveries become DEAD), sending nothing yet. Call it before the
        process's watcher, sweeper or executor may write events: a new endpoint gets those
        (``run()`` does the same, later)."""
        await self._store.fan_out_webhook_events(self.subscriptions, self._clock.now(), 0)

    def wake(self) -> None:
        """Look for new events now (and retry what is due)."""
        self._fan_out.set()
        for wake in self._wakes.values():
            wake.set()

    async def run(self) -> None:
        """Fan out and deliver until cancelled; a store failure ends it (to be restarted)."""
        timeout = aiohttp.ClientTimeout(total=self._policy.timeout)
        async with aiohttp.ClientSession(
            timeout=timeout, headers={"User-Agent": USER_AGENT}
        ) as session:
            # The supervisor logs and restarts on the first failure, as for any task.
            loops = [self._fan_out_loop()]
            if self._events is not None:
                # Woken by every event: the store has what to fan out.
                loops.append(wake_on(self._events, "webhook sender", self._fan_out.set))
            loops += [self._deliver_loop(session, endpoint) for endpoint in self._endpoints]
            await run_together(*loops)

    async def _fan_out_loop(self) -> None:
        subscriptions = self.subscriptions
        while True:
            self._fan_out.clear()
            added = await self._store.fan_out_webhook_events(
                subscriptions, self._clock.now(), FAN_OUT_LIMIT
            )
            if added:
                for wake in self._wakes.values():
                    wake.set()
                continue  # there may be more
            await _wait(self._fan_out, self._policy.poll_interval)

    async def _deliver_loop(
        self, session: aiohttp.ClientSession, endpoint: WebhookEndpoint
    ) -> None:
        wake = self._wakes[endpoint.name]
        while True:
            wake.clear()
            next_one = await self._store.next_webhook_delivery(endpoint.name)
            if next_one is None:
                await _wait(wake, self._policy.poll_interval)
                continue
            delivery, event = next_one
            due_in = delivery.next_attempt_at - self._clock.now()
            if due_in > 0:
                # The oldest waits, and those after it with it: one endpoint's order holds.
                await _wait(wake, min(due_in, self._policy.poll_interval))
                continue
            await self._attempt(session, endpoint, event)

    async def _attempt(
        self,
        session: aiohttp.ClientSession,
        endpoint: WebhookEndpoint,
        event: WebhookEvent,
    ) -> None:
        msg_id = message_id(event)
        headers = signed_headers(endpoint.secret, msg_id, int(self._clock.now()), event.payload)
        status: int | None = None
        error = ""
        try:
            async with session.post(
                endpoint.url, data=event.payload.encode(), headers=headers, allow_redirects=False
            ) as response:
                status = response.status
                await response.content.read(65_536)  # an answer is not kept, only its status
        except TimeoutError:
            error = f"no answer within {self._policy.timeout:g}s"
        except aiohttp.ClientConnectionError as failure:
            error = f"cannot connect ({type(failure).__name__})"
        except (aiohttp.ClientError, ValueError) as failure:
            # ValueError: a host the resolver cannot encode (UnicodeError), a URL it refuses.
            error = f"failed ({type(failure).__name__})"
        delivered = status is not None and 200 <= status < 300
        if not delivered:
            error = error or f"answered {status}"
        now = self._clock.now()
        policy = self._policy
        # The store decides DEAD or the next attempt from the attempts it holds now: a
        # redelivery made while this one was under way restarted the count.
        recorded = await self._store.record_webhook_attempt(
            event.event_id,
            endpoint.name,
            delivered=delivered,
            now=now,
            status=status,
            error=error,
            max_attempts=policy.max_attempts,
            initial_backoff=policy.initial_backoff,
            max_backoff=policy.max_backoff,
        )
        if recorded is None:
            log.info(
                "webhook %s %s to %s: no longer pending, its attempt is not recorded",
                msg_id,
                event.type,
                endpoint.name,
            )
        elif recorded.state is DeliveryState.DELIVERED:
            log.debug("webhook %s %s delivered to %s", msg_id, event.type, endpoint.name)
        elif recorded.state is DeliveryState.DEAD:
            log.error(
                "webhook %s %s to %s is DEAD after %d attempts (last: %s); "
                "`l402-gateway webhooks redeliver %d` sends it again",
                msg_id,
                event.type,
                endpoint.name,
                recorded.attempts,
                error,
                event.event_id,
            )
        else:
            log.warning(
                "webhook %s %s to %s: attempt %d %s; retrying in %.0fs",
                msg_id,
                event.type,
                endpoint.name,
                recorded.attempts,
                error,
                recorded.next_attempt_at - now,
            )
