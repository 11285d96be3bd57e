"""The L402 macaroon identifier: ``uint16 version || payment_hash[32] || token_id[32]``.

Big-endian, 66 bytes for version 0 (the only version defined), as Aperture encodes it.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from .errors import MalformedToken

__all__ = ["IDENTIFIER_SIZE", "Identifier"]

_VERSION = struct.Struct(">H")
_HASH_SIZE = 32
_TOKEN_ID_SIZE = 32
IDENTIFIER_SIZE = _VERSION.size + _HASH_SIZE + _TOKEN_ID_SIZE
_KNOWN_VERSIONS = frozenset({0})


@dataclass(frozen=True, slots=True)
class Identifier:
    """Decoded identifier of an L402 macaroon."""

    version: int
    payment_hash: bytes
    token_id: bytes

    def __post_init__(self) -> None:
        if self.version not in _KNOWN_VERSIONS:
            raise ValueError(f"unknown identifier version {self.version}")
        if len(self.payment_hash) != _HASH_SIZE:
            raise ValueError("payment_hash must be 32 bytes")
        if len(self.token_id) != _TOKEN_ID_SIZE:
            raise ValueError("token_id must be 32 bytes")

    def encode(self) -> bytes:
        """The 66-byte wire form, used as the macaroon identifier."""
        return _VERSION.pack(self.version) + self.payment_hash + self.token_id

    @classmethod
    def decode(cls, raw: bytes) -> Identifier:
        """Parse a macaroon identifier; MalformedToken if it is not a known L402 identifier."""
        if len(raw) < _VERSION.size:
            raise MalformedToken("identifier is too short")
        (version,) = _VERSION.unpack_from(raw)
        if version not in _KNOWN_VERSIONS:
            raise MalformedToken("unknown identifier version")
        if len(raw) != IDENTIFIER_SIZE:
            raise MalformedToken("identifier has the wrong length")
        return cls(version, raw[2:34], raw[34:66])

    @property
    def key_id(self) -> bytes:
        """sha256 of the encoded identifier: the store key of this token's root key."""
        return hashlib.sha256(self.encode()).digest()
