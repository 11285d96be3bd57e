"""Minting and offline verification of L402 tokens.

A token is one macaroon whose identifier is an :class:`Identifier` (version 0) and whose
root key is random per token, stored under ``Identifier.key_id``. Verification needs no
network: the preimage must hash to the identifier's payment hash, the HMAC chain must end
in the signature, and every caveat must hold (see :mod:`gateway.l402.caveats`). Whether the
invoice was really settled, and whether the token was revoked, is the caller's business.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass

from .caveats import Caveat, RequestScope, check_caveats
from .errors import MalformedToken, TokenRejected
from .header import Credential
from .identifier import Identifier
from .macaroon import Macaroon, mint

__all__ = ["VerifiedToken", "identifier_of", "mint_token", "verify_token"]


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """A token that passed :func:`verify_token`, with what it grants."""

    token_id: bytes
    payment_hash: bytes
    service: str
    tier: int
    capabilities: frozenset[str] | None
    valid_until: int | None


def mint_token(
    root_key: bytes,
    payment_hash: bytes,
    token_id: bytes,
    caveats: Sequence[str],
    location: str = "",
) -> Macaroon:
    """A version-0 L402 macaroon; ValueError on bad sizes or a caveat that would not parse."""
    if not root_key:
        raise ValueError("root_key must not be empty")
    identifier = Identifier(0, payment_hash, token_id)
    for text in caveats:
        try:
            Caveat.parse(text)
        except MalformedToken as exc:
            raise ValueError(f"invalid caveat: {exc.reason}") from None
    return mint(root_key, identifier.encode(), caveats, location)


def identifier_of(credential: Credential) -> Identifier:
    """The identifier of the credential's single macaroon, to look its root key up."""
    if len(credential.macaroons) != 1:
        raise TokenRejected("discharge macaroons are not supported")
    return Identifier.decode(credential.macaroons[0].identifier)


def verify_token(
    credential: Credential, root_key: bytes, request: RequestScope, now: float
) -> VerifiedToken:
    """Verify offline; TokenRejected (or MalformedToken for a bad identifier) on failure."""
    identifier = identifier_of(credential)
    macaroon = credential.macaroons[0]
    digest = hashlib.sha256(credential.preimage).digest()
    if not hmac.compare_digest(digest, identifier.payment_hash):
        raise TokenRejected("preimage does not match the payment hash")
    if not macaroon.verify_signature(root_key):
        raise TokenRejected("invalid macaroon signature")
    try:
        caveats = [Caveat.parse(raw) for raw in macaroon.caveats]
    except MalformedToken:
        # Signed or not, a caveat we cannot read must not be skipped: fail closed.
        raise TokenRejected("malformed caveat") from None
    scope = check_caveats(caveats, request, now, preimage=credential.preimage)
    return VerifiedToken(
        token_id=identifier.token_id,
        payment_hash=identifier.payment_hash,
        service=scope.service,
        tier=scope.tier,
        capabilities=scope.capabilities,
        valid_until=scope.valid_until,
    )
