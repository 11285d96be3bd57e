"""The paying client's errors, a branch of the tree drawn in :mod:`gateway.errors`.

``offer`` is the checked offer when there is one, so a caller can show the price. All but
``PaymentUnverified`` and ``PaymentRefunded`` are raised before any money moves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.errors import GatewayError, PaymentFailed

if TYPE_CHECKING:  # offer.py raises these errors; the errors only name its type
    from gateway.client.offer import Offer

__all__ = [
    "BudgetExceeded",
    "ChallengeError",
    "ClientError",
    "InvoiceRejected",
    "PaymentDeclined",
    "PaymentInFlight",
    "PaymentRefunded",
    "PaymentUnverified",
    "TokenCacheError",
]


class ClientError(GatewayError):
    """Base of the paying client's errors."""

    def __init__(self, message: str, offer: Offer | None = None) -> None:
        super().__init__(message)
        self.offer = offer


class ChallengeError(ClientError):
    """The 402 carries an L402/LSAT challenge that cannot be used; nothing was paid."""


class InvoiceRejected(ChallengeError):
    """The challenge's invoice failed a check (network, amount, expiry, payment hash)."""


class BudgetExceeded(ClientError):
    """Paying would go over the budget; nothing was paid. ``limit`` names the limit."""

    def __init__(self, message: str, offer: Offer | None, limit: str) -> None:
        super().__init__(message, offer)
        self.limit = limit


class PaymentDeclined(ClientError):
    """The ``confirm`` hook declined the offer; nothing was paid."""


class PaymentInFlight(ClientError):
    """A payment (one begun earlier for this scope, or one the node reports still in flight
    after the call to it broke) has not finished; paying again could pay twice."""


class PaymentUnverified(ClientError):
    """The payer reported success but its preimage does not match the invoice."""


class PaymentRefunded(ClientError, PaymentFailed):
    """The payment of a pay-on-success offer failed because the gateway cancelled it: the paid
    request failed, and the held payment went back to the payer.

    Also a ``PaymentFailed`` (``payment_hash``, ``reason``), so code that handles failed
    payments handles this one. The message is ``refunded: <failure>``; ``failure`` is the
    gateway's reason (e.g. ``backend failed with 503``), escaped and cut short.
    """

    def __init__(self, failure: str, offer: Offer) -> None:
        message = f"refunded: {failure}"
        PaymentFailed.__init__(self, message, offer.payment_hash)
        self.args = (message,)  # str(error): the message alone, not PaymentFailed's
        self.offer = offer
        self.failure = failure


class TokenCacheError(ClientError):
    """The token cache file is unreadable, corrupt or cannot be written."""
