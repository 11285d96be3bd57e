"""Errors of the L402 protocol layer (drawn with the rest in :mod:`gateway.errors`).

::

    L402Error            base; ``reason`` is short, fixed text, safe for an HTTP body
    ├── MalformedToken   cannot be parsed: base64, macaroon bytes, identifier, header grammar
    └── TokenRejected    parsed, but not acceptable: signature, preimage, unknown caveats
        └── TokenInsufficient  genuine, but not enough for this request: expired, another
                               service, a missing capability, a path or method outside it;
                               its ``reason`` is a ``ChallengeReason``

Reasons never contain secrets (root keys, preimages, signatures) nor echo attacker-supplied
text, so callers may return them to the client verbatim.
"""

from __future__ import annotations

import enum

__all__ = ["ChallengeReason", "L402Error", "MalformedToken", "TokenInsufficient", "TokenRejected"]


class ChallengeReason(enum.StrEnum):
    """Why a request is answered with a payment challenge (402): it carries no credential,
    or a genuine token that does not cover it (the ``reason`` of ``TokenInsufficient``)."""

    PAYMENT_REQUIRED = "payment required"
    EXPIRED = "token expired"
    OTHER_SERVICE = "token is not valid for this service"
    METHOD_NOT_ALLOWED = "method not allowed by token"
    PATH_NOT_ALLOWED = "path not allowed by token"
    MISSING_CAPABILITY = "token lacks a required capability"
    TIER_TOO_LOW = "token tier is too low"
    CREDIT_EXHAUSTED = "credit balance too low for this request"
    REFUNDED = "payment refunded: the paid request failed"


class L402Error(Exception):
    """Base of every error this package raises on purpose."""

    reason: str

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class MalformedToken(L402Error):
    """The credential, challenge or token cannot be parsed."""


class TokenRejected(L402Error):
    """The token parsed but does not authorize this request."""


class TokenInsufficient(TokenRejected):
    """The token is valid but does not cover this request; a fresh payment would."""

    reason: ChallengeReason

    def __init__(self, reason: ChallengeReason) -> None:
        super().__init__(reason)
        self.reason = reason
