"""Errors of the L402 protocol layer.

::

    L402Error            base; ``reason`` is short, fixed text, safe for an HTTP body
    ├── MalformedToken   cannot be parsed: base64, macaroon bytes, identifier, header grammar
    └── TokenRejected    parsed, but not acceptable: signature, preimage, unknown caveats
        └── TokenInsufficient  genuine, but not enough for this request: expired, another
                               service, a missing capability, a path or method outside it

Reasons never contain secrets (root keys, preimages, signatures) nor echo attacker-supplied
text, so callers may return them to the client verbatim.
"""

from __future__ import annotations

__all__ = ["L402Error", "MalformedToken", "TokenInsufficient", "TokenRejected"]


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
