"""The gateway's one exception tree.

Adapters translate every foreign error (gRPC, database, HTTP) into one of these at their
boundary, so callers never see a vendor exception::

    GatewayError
    ├── ConfigError                   the configuration file or environment is invalid
    ├── StoreError                    the database failed (disk, lock, corruption)
    │   ├── StoreClosed               the store was used after close()
    │   └── SchemaVersionError        the database's schema is newer than this code
    └── BackendError                  the Lightning node failed a request
        ├── BackendUnavailable        not reachable, TLS failure, timed out: retry later
        ├── BackendPermissionDenied   macaroon missing, wrong or lacking a permission
        ├── BackendBadRequest         the node rejected the arguments
        │   └── InvoiceAlreadyExists  an invoice with this payment hash exists
        ├── InvoiceNotFound           no invoice with that payment hash
        └── PaymentFailed             the payment ended FAILED (``reason`` says why)

The paying client's errors (``offer`` is the checked offer when there is one, so a caller can
show the price). All but ``PaymentUnverified`` are raised before any money moves::

    GatewayError
    └── ClientError                   the client would not, or could not, complete a payment
        ├── ChallengeError            the 402's L402 challenge is unusable
        │   └── InvoiceRejected       the invoice failed a check: network, amount, expiry, hash
        ├── BudgetExceeded            price or total over the budget (``limit`` says which)
        ├── PaymentDeclined           the ``confirm`` hook said no
        ├── PaymentInFlight           an earlier payment for this scope is still in flight
        ├── PaymentUnverified         the payer's preimage does not hash to the payment hash
        └── TokenCacheError           the token cache file cannot be read or written
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.client.offer import Offer


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """The configuration is invalid; the message names the key and the problem."""


class StoreError(GatewayError):
    """The store's database failed a read or write."""


class StoreClosed(StoreError):
    """The store was used after ``close()``."""


class SchemaVersionError(StoreError):
    """The database was written by a newer version of the gateway than this one."""


class BackendError(GatewayError):
    """The Lightning node failed a request."""


class BackendUnavailable(BackendError):
    """The node cannot be reached or did not answer in time; the request may be retried."""


class BackendPermissionDenied(BackendError):
    """The node refused the credentials (macaroon) for this request."""


class BackendBadRequest(BackendError):
    """The node rejected the request's arguments."""


class InvoiceAlreadyExists(BackendBadRequest):
    """An invoice with this payment hash already exists on the node."""


class InvoiceNotFound(BackendError):
    """The node has no invoice with the given payment hash."""


class PaymentFailed(BackendError):
    """An outgoing payment ended in the FAILED state."""

    def __init__(self, reason: str, payment_hash: bytes) -> None:
        super().__init__(f"payment {payment_hash.hex()} failed: {reason}")
        self.reason = reason
        self.payment_hash = payment_hash


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
    """A payment begun earlier for this scope has not finished; paying again could pay twice."""


class PaymentUnverified(ClientError):
    """The payer reported success but its preimage does not match the invoice."""


class TokenCacheError(ClientError):
    """The token cache file is unreadable, corrupt or cannot be written."""
