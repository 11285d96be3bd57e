"""The L402 protocol, pure: identifier codec, V2 macaroons, caveats, header grammar, tokens.

Standard library only; no I/O, no clock (``now`` is passed in), no global state.
"""

from __future__ import annotations

from .caveats import (
    Caveat,
    GrantedScope,
    RequestScope,
    capabilities_caveat,
    check_caveats,
    methods_caveat,
    paths_caveat,
    services_caveat,
    valid_until_caveat,
)
from .errors import ChallengeReason, L402Error, MalformedToken, TokenInsufficient, TokenRejected
from .header import (
    MAX_AUTHORIZATION_CHARS,
    MAX_SETTLE_TIMEOUT,
    Challenge,
    Credential,
    format_authorization,
    format_challenge,
    format_error_challenge,
    parse_authorization,
    parse_challenge,
)
from .identifier import IDENTIFIER_SIZE, Identifier
from .macaroon import MAX_CAVEATS, MAX_MACAROON_BYTES, Macaroon, decode_b64, encode_b64, mint
from .token import VerifiedToken, identifier_of, mint_token, verify_token

__all__ = [
    "IDENTIFIER_SIZE",
    "MAX_AUTHORIZATION_CHARS",
    "MAX_CAVEATS",
    "MAX_MACAROON_BYTES",
    "MAX_SETTLE_TIMEOUT",
    "Caveat",
    "Challenge",
    "ChallengeReason",
    "Credential",
    "GrantedScope",
    "Identifier",
    "L402Error",
    "Macaroon",
    "MalformedToken",
    "RequestScope",
    "TokenInsufficient",
    "TokenRejected",
    "VerifiedToken",
    "capabilities_caveat",
    "check_caveats",
    "decode_b64",
    "encode_b64",
    "format_authorization",
    "format_challenge",
    "format_error_challenge",
    "identifier_of",
    "methods_caveat",
    "mint",
    "mint_token",
    "parse_authorization",
    "parse_challenge",
    "paths_caveat",
    "services_caveat",
    "valid_until_caveat",
    "verify_token",
]
