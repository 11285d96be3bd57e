"""Macaroons in the binary V2 format of libmacaroons, pymacaroons and gopkg.in/macaroon.v2.

Layout (every field is ``type, uvarint length, data``; EOS is the single byte 0)::

    0x02
    [location (1)] identifier (2) EOS          header
    ( identifier (2) EOS )*                    one section per first-party caveat
    EOS
    signature (6, 32 bytes)

Signature chain: ``sig0 = HMAC-SHA256(derive(root_key), identifier)`` with
``derive(k) = HMAC-SHA256(b"macaroons-key-generator", k)``, then
``sig_i = HMAC-SHA256(sig_{i-1}, caveat_i)``. Anyone holding a macaroon can append a caveat
(attenuate) without the root key; nobody can remove one.

Only first-party caveats exist here: a caveat section carrying a location (1) or verification
id (4) is a third-party caveat and is rejected, since L402 never needs discharges. The parser
is strict (canonical varints, fields in order, no trailing bytes, size limits) because it runs
on untrusted input on every paid request.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import MalformedToken

__all__ = [
    "MAX_CAVEATS",
    "MAX_MACAROON_BYTES",
    "Macaroon",
    "decode_b64",
    "encode_b64",
    "mint",
]

MAX_MACAROON_BYTES = 64 * 1024
MAX_CAVEATS = 64
_SIGNATURE_SIZE = 32
_VERSION_V2 = 2
_EOS = 0
_LOCATION = 1
_IDENTIFIER = 2
_VERIFICATION_ID = 4
_SIGNATURE = 6
_KNOWN_FIELDS = frozenset({_EOS, _LOCATION, _IDENTIFIER, _VERIFICATION_ID, _SIGNATURE})
# A length below MAX_MACAROON_BYTES needs at most 3 varint bytes (21 bits).
_MAX_VARINT_BYTES = 3
_KEY_GENERATOR = b"macaroons-key-generator"
# base64 of MAX_MACAROON_BYTES, padded.
_MAX_B64_CHARS = 4 * ((MAX_MACAROON_BYTES + 2) // 3)
_URLSAFE_TO_STD = bytes.maketrans(b"-_", b"+/")
_THIRD_PARTY = "third-party caveats are not supported"


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.digest(key, msg, "sha256")


def _as_bytes(caveat: str | bytes) -> bytes:
    return caveat.encode("utf-8") if isinstance(caveat, str) else bytes(caveat)


@dataclass(frozen=True, slots=True)
class Macaroon:
    """An immutable macaroon with first-party caveats only."""

    identifier: bytes
    caveats: tuple[bytes, ...]
    signature: bytes
    location: str = ""

    def __post_init__(self) -> None:
        if len(self.signature) != _SIGNATURE_SIZE:
            raise ValueError("signature must be 32 bytes")

    def add_caveat(self, caveat: str | bytes) -> Macaroon:
        """Attenuate: a new macaroon with one more caveat, signed from the current signature."""
        raw = _as_bytes(caveat)
        return Macaroon(
            self.identifier, (*self.caveats, raw), _hmac(self.signature, raw), self.location
        )

    def verify_signature(self, root_key: bytes) -> bool:
        """True if the HMAC chain from ``root_key`` ends in this macaroon's signature."""
        sig = _hmac(_hmac(_KEY_GENERATOR, root_key), self.identifier)
        for caveat in self.caveats:
            sig = _hmac(sig, caveat)
        return hmac.compare_digest(sig, self.signature)

    def serialize(self) -> bytes:
        """The binary V2 encoding (location omitted when empty, as Go does)."""
        out = bytearray((_VERSION_V2,))
        if self.location:
            _put_field(out, _LOCATION, self.location.encode("utf-8"))
        _put_field(out, _IDENTIFIER, self.identifier)
        out.append(_EOS)
        for caveat in self.caveats:
            _put_field(out, _IDENTIFIER, caveat)
            out.append(_EOS)
        out.append(_EOS)
        _put_field(out, _SIGNATURE, self.signature)
        return bytes(out)

    @classmethod
    def deserialize(cls, data: bytes | bytearray | memoryview) -> Macaroon:
        """Parse binary V2; MalformedToken on anything unexpected."""
        if type(data) is not bytes:
            data = bytes(data)  # payloads must be immutable bytes, not views
        end = len(data)
        if end == 0:
            raise MalformedToken("empty macaroon")
        if end > MAX_MACAROON_BYTES:
            raise MalformedToken("macaroon is too large")
        if data[0] != _VERSION_V2:
            raise MalformedToken("only binary V2 macaroons are supported")
        # Header section: optional location, then the identifier.
        ftype, payload, pos = _read_field(data, 1, end)
        location = ""
        if ftype == _LOCATION:
            try:
                location = payload.decode("utf-8")
            except UnicodeDecodeError:
                raise MalformedToken("macaroon location is not UTF-8") from None
            ftype, payload, pos = _read_field(data, pos, end)
        if ftype != _IDENTIFIER:
            raise MalformedToken("macaroon has no identifier")
        identifier = payload
        ftype, _, pos = _read_field(data, pos, end)
        if ftype != _EOS:
            raise MalformedToken("unexpected field in macaroon header")
        # Caveat sections until an empty one.
        caveats: list[bytes] = []
        while True:
            ftype, payload, pos = _read_field(data, pos, end)
            if ftype == _EOS:
                break
            if ftype == _LOCATION:
                raise MalformedToken(_THIRD_PARTY)
            if ftype != _IDENTIFIER:
                raise MalformedToken("unexpected field in caveat")
            if len(caveats) == MAX_CAVEATS:
                raise MalformedToken("too many caveats")
            caveats.append(payload)
            ftype, _, pos = _read_field(data, pos, end)
            if ftype == _VERIFICATION_ID:
                raise MalformedToken(_THIRD_PARTY)
            if ftype != _EOS:
                raise MalformedToken("unexpected field in caveat")
        ftype, payload, pos = _read_field(data, pos, end)
        if ftype != _SIGNATURE:
            raise MalformedToken("macaroon has no signature")
        if len(payload) != _SIGNATURE_SIZE:
            raise MalformedToken("macaroon signature has the wrong length")
        if pos != end:
            raise MalformedToken("trailing bytes after macaroon")
        return cls(identifier, tuple(caveats), payload, location)


def mint(
    root_key: bytes, identifier: bytes, caveats: Sequence[str | bytes], location: str = ""
) -> Macaroon:
    """A new macaroon signed with ``root_key``, carrying ``caveats`` in order."""
    raw = tuple(_as_bytes(c) for c in caveats)
    sig = _hmac(_hmac(_KEY_GENERATOR, root_key), identifier)
    for caveat in raw:
        sig = _hmac(sig, caveat)
    return Macaroon(bytes(identifier), raw, sig, location)


def encode_b64(macaroon: Macaroon) -> str:
    """Standard base64 with padding, as Aperture sends and expects."""
    return base64.b64encode(macaroon.serialize()).decode("ascii")


def decode_b64(text: str) -> Macaroon:
    """Decode standard or URL-safe base64, padded or not, then deserialize."""
    if not text:
        raise MalformedToken("empty macaroon")
    if len(text) > _MAX_B64_CHARS:
        raise MalformedToken("macaroon is too large")
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        raise MalformedToken("macaroon is not valid base64") from None
    if b"-" in raw or b"_" in raw:
        if b"+" in raw or b"/" in raw:
            raise MalformedToken("macaroon mixes base64 alphabets")
        raw = raw.translate(_URLSAFE_TO_STD)
    unpadded = raw.rstrip(b"=")
    padding = len(raw) - len(unpadded)
    if padding > 2 or (padding and len(raw) % 4):
        raise MalformedToken("macaroon has bad base64 padding")
    if len(unpadded) % 4 == 1:
        raise MalformedToken("macaroon has a bad base64 length")
    try:
        # validate=True rejects anything outside the alphabet, including stray '='.
        data = base64.b64decode(unpadded + b"=" * (-len(unpadded) % 4), validate=True)
    except binascii.Error:
        raise MalformedToken("macaroon is not valid base64") from None
    return Macaroon.deserialize(data)


def _put_field(out: bytearray, ftype: int, data: bytes) -> None:
    out.append(ftype)
    n = len(data)
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    out += data


def _read_field(data: bytes, pos: int, end: int) -> tuple[int, bytes, int]:
    """One field at ``pos``: (type, payload, next position). EOS has an empty payload."""
    if pos >= end:
        raise MalformedToken("macaroon is truncated")
    ftype = data[pos]
    if ftype not in _KNOWN_FIELDS:
        raise MalformedToken("unknown macaroon field type")
    pos += 1
    if ftype == _EOS:
        return ftype, b"", pos
    if pos >= end:
        raise MalformedToken("macaroon is truncated")
    length = data[pos]
    pos += 1
    if length >= 0x80:
        length, pos = _read_long_varint(data, pos - 1, end)
    stop = pos + length
    if stop > end:
        raise MalformedToken("macaroon field extends past the end")
    return ftype, data[pos:stop], stop


def _read_long_varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    value = 0
    shift = 0
    for i in range(_MAX_VARINT_BYTES):
        if pos >= end:
            raise MalformedToken("macaroon is truncated")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            # A final zero byte would be a redundant, non-canonical encoding.
            if byte == 0 and i > 0:
                raise MalformedToken("non-canonical varint in macaroon")
            return value, pos
        shift += 7
    raise MalformedToken("macaroon field length is too large")
