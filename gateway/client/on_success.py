"""Why the payment of a pay-on-success offer failed: the gateway's redeem endpoint says.

The payment of such an offer is held while the gateway runs the request; when the request
fails the gateway cancels it and the payer's node reports an ordinary failed payment. The
client then asks the gateway, as the browser paywall does::

    POST <origin>/.well-known/l402/redeem
    Content-Type: application/json

    {"macaroon": "<the challenge's macaroon>"}

    200 {"state": "pending" | "settled" | "expired" | "canceled" | "refunded", ...,
         "failure": "<why the request failed>" (refunded only)}

``refunded`` becomes :class:`~gateway.client.errors.PaymentRefunded` (``refunded: <failure>``);
another state is added to the payment's failure. The HTTP request itself is the caller's
(:data:`AskGateway`: each HTTP integration sends it through its own library); when it fails,
or the answer makes no sense, the payment's failure is raised as it came.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

from gateway.client.errors import PaymentRefunded
from gateway.client.offer import Offer
from gateway.client.tokens import split_url
from gateway.errors import PaymentFailed
from gateway.text import printable

__all__ = ["MAX_ANSWER_BYTES", "REDEEM_PATH", "AskGateway", "explain_failure"]

log = logging.getLogger(__name__)

REDEEM_PATH = "/.well-known/l402/redeem"
MAX_ANSWER_BYTES = 16 * 1024
ASK_TIMEOUT = 10.0  # s: the payment failure is reported once this has passed, at the latest
MAX_FAILURE_CHARS = 200
_STATES = frozenset({"pending", "settled", "expired", "canceled"})

# POST ``body`` (JSON) to the URL with ``Content-Type: application/json``; the answer's status
# and up to MAX_ANSWER_BYTES + 1 bytes of its body. Raises whatever its HTTP library raises.
AskGateway = Callable[[str, bytes], Awaitable[tuple[int, bytes]]]


async def explain_failure(
    ask: AskGateway, url: str, offer: Offer, error: PaymentFailed
) -> PaymentFailed:
    """The error to raise for ``error``, the failed payment of ``offer`` (a pay-on-success
    offer for ``url``): ``PaymentRefunded``, ``error`` with the gateway's state added to its
    reason, or ``error`` itself when the gateway cannot tell."""
    origin, _ = split_url(url)
    body = json.dumps({"macaroon": offer.macaroon_b64}).encode()
    try:
        async with asyncio.timeout(ASK_TIMEOUT):
            status, answer = await ask(origin + REDEEM_PATH, body)
    except Exception as ask_error:  # anything its HTTP library raises
        log.info("could not ask %s why the payment failed: %r", origin, ask_error)
        return error
    document = _document(answer) if status == 200 else None
    state = document.get("state") if document is not None else None
    if document is None or not isinstance(state, str):
        log.info("%s did not say why the payment failed (HTTP %d)", origin, status)
        return error
    if state == "refunded":
        failure = document.get("failure")
        text = failure if isinstance(failure, str) and failure.strip() else "the request failed"
        return PaymentRefunded(printable(text.strip(), MAX_FAILURE_CHARS), offer)
    if state not in _STATES:
        log.info("%s answered an unknown state: %s", origin, printable(state, 40))
        return error
    reason = f"{error.reason} (the gateway reports the paid request as {state})"
    return PaymentFailed(reason, error.payment_hash)


def _document(answer: bytes) -> dict[str, object] | None:
    if len(answer) > MAX_ANSWER_BYTES:
        return None
    try:
        document = json.loads(answer)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return document if isinstance(document, dict) else None
