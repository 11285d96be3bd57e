"""The gateway's one exception tree.

Adapters translate every foreign error (gRPC, database, HTTP) into one of these at their
boundary, so callers never see a vendor exception. Each layer defines its own branch: the
core ones here, the paying client's in :mod:`gateway.client.errors`::

    GatewayError
    ├── ConfigError                   the configuration file or environment is invalid
    ├── StoreError                    the database failed (disk, lock, corruption)
    │   ├── StoreClosed               the store was used after close()
    │   ├── SchemaVersionError        the database's schema is newer than this code
    │   └── DuplicatePayout           a payout of this payment hash is recorded already
    ├── BackendError                  the Lightning node failed a request
    │   ├── BackendUnavailable        not reachable, TLS failure, timed out: retry later
    │   ├── BackendPermissionDenied   macaroon missing, wrong or lacking a permission
    │   ├── BackendBadRequest         the node rejected the arguments
    │   │   ├── InvoiceAlreadyExists  an invoice with this payment hash exists
    │   │   ├── InvoiceAlreadySettled the invoice is settled: it can be neither settled
    │   │   │                         again nor cancelled
    │   │   └── InvoiceAlreadyCanceled the invoice is cancelled: it cannot be settled (a
    │   │                             cancel of it counts as done)
    │   ├── InvoiceNotFound           no invoice with that payment hash
    │   ├── PaymentFailed             the payment ended FAILED (``reason`` says why)
    │   └── PayoutDestinationError    a payee's LNURL-pay service gave no usable invoice
    │                                 (``reason`` says why)
    │       └── LnurlUnreachable      it did not answer: unreachable, timeout, HTTP 5xx
    │                                 (in :mod:`gateway.client.lnurl`)
    ├── EventsLost                    an event subscriber fell behind and was cut off
    │                                 (in :mod:`gateway.events`)
    ├── WebhookRejected               a webhook delivery failed verification: signature,
    │                                 body or timestamp (``gateway.webhooks.verify_delivery``)
    └── ClientError                   the paying client would not, or could not, pay
        ├── ChallengeError            the 402's L402 challenge is unusable
        │   └── InvoiceRejected       the invoice failed a check: network, amount, expiry, hash
        ├── BudgetExceeded            price or total over the budget (``limit`` says which)
        ├── PaymentDeclined           the ``confirm`` hook said no
        ├── PaymentInFlight           a payment still in flight (an earlier one, or LNURL-pay's)
        ├── PaymentRefunded           pay on success: the gateway cancelled the held payment,
        │                             its request failed (also a ``PaymentFailed``)
        ├── PaymentUnverified         the payer's preimage does not hash to the payment hash
        └── TokenCacheError           the token cache file cannot be read or written

A ``ClientError``'s ``offer`` is the checked offer when there is one, so a caller can show the
price; all but ``PaymentUnverified`` and ``PaymentRefunded`` are raised before any money
moves.

The pure protocol layer, :mod:`gateway.l402`, imports nothing of the gateway, so its errors
have a root of their own. The service turns one into a decision (401, or 402 with a fresh
challenge), the client into a ``ChallengeError``::

    L402Error                         ``reason``: short fixed text, safe for an HTTP body
    ├── MalformedToken                cannot be parsed: base64, macaroon, identifier, grammar
    └── TokenRejected                 parsed, but not acceptable: signature, preimage, caveat
        └── TokenInsufficient         genuine, but not enough: expired, another service, ...
                                      (``reason``: an ``l402.ChallengeReason``)

The LNURL-pay server's protocol, :mod:`gateway.lnurl`, is pure too; its one error says what
to answer a wallet (``{"status": "ERROR", "reason": ...}`` with an HTTP status)::

    LnurlError                        ``reason`` for the wallet, ``status``: 400, 404, 409,
                                      410, 503
"""

from __future__ import annotations


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


class DuplicatePayout(StoreError):
    """``begin_payout`` was given a payment hash the store has recorded a payout of already
    (whatever its state): nothing was written, and that hash is never paid again."""


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


class InvoiceAlreadySettled(BackendBadRequest):
    """The invoice is settled: the node refused to settle it again or to cancel it (LND's
    "invoice already settled"). Whoever asked learns it was paid."""


class InvoiceAlreadyCanceled(BackendBadRequest):
    """The invoice is cancelled: the node refused to settle it (LND's "invoice already
    canceled"). LND cancels one again without complaint; a node that refuses to counts as
    having cancelled it (``gateway.service.tips``)."""


class InvoiceNotFound(BackendError):
    """The node has no invoice with the given payment hash."""


class PaymentFailed(BackendError):
    """An outgoing payment ended in the FAILED state."""

    def __init__(self, reason: str, payment_hash: bytes) -> None:
        super().__init__(f"payment {payment_hash.hex()} failed: {reason}")
        self.reason = reason
        self.payment_hash = payment_hash


class PayoutDestinationError(BackendError):
    """A payee's destination cannot be paid now: its LNURL-pay service (or Lightning
    Address) did not answer, or answered with something unusable (a wrong amount, a
    description hash that is not the metadata's, a redirect to another host...). ``reason``
    is fixed text naming the problem, safe to log (it names no secret)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class WebhookRejected(GatewayError):
    """A webhook delivery that ``gateway.webhooks.verify_delivery`` refused: missing or
    malformed headers, no matching signature (a wrong secret or a tampered body), or a
    timestamp outside the tolerance (a replay). The message is fixed text, safe to log."""
