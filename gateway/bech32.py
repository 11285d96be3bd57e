"""Bech32 (BIP 173), as BOLT11 invoices and LNURLs (LUD-01) use it: reading the
human-readable part and the 5-bit data words, the checksum verified, and writing bytes (an
LNURL's URL). No 90-character limit: invoices and LNURLs are longer. Pure: the standard
library only.
"""

from __future__ import annotations

__all__ = ["CHARSET", "Bech32Error", "decode", "encode", "to_bytes", "to_int", "to_text"]

CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_GENERATOR = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)
_CHECKSUM_WORDS = 6


class Bech32Error(ValueError):
    """The text is no valid bech32; the message says why."""


def _polymod(values: list[int]) -> int:
    check = 1
    for value in values:
        top = check >> 25
        check = (check & 0x1FFFFFF) << 5 ^ value
        for i in range(5):
            check ^= _GENERATOR[i] if (top >> i) & 1 else 0
    return check


def _hrp_expand(hrp: str) -> list[int]:
    return [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]


def decode(text: str) -> tuple[str, list[int]]:
    """(hrp in lower case, the data words without the checksum); ``Bech32Error`` for mixed
    case, no separator, a character outside the alphabet or a bad checksum."""
    if text.lower() != text and text.upper() != text:
        raise Bech32Error("mixed case")
    text = text.lower()
    separator = text.rfind("1")
    if separator < 1 or separator + 1 + _CHECKSUM_WORDS > len(text):
        raise Bech32Error("no bech32 separator and checksum")
    hrp, rest = text[:separator], text[separator + 1 :]
    if any(not 33 <= ord(c) <= 126 for c in hrp):
        raise Bech32Error("bad characters before the separator")
    try:
        words = [CHARSET.index(c) for c in rest]
    except ValueError:
        raise Bech32Error("a character outside bech32's alphabet") from None
    if _polymod(_hrp_expand(hrp) + words) != 1:
        raise Bech32Error("bad bech32 checksum")
    return hrp, words[:-_CHECKSUM_WORDS]


def encode(hrp: str, data: bytes) -> str:
    """``data`` as bech32 under ``hrp`` (lower case): its bits in 5-bit words, the last one
    padded with zero bits, then the checksum. ``Bech32Error`` for an empty ``hrp`` or one
    with a character outside ASCII 33-126 or in upper case (mixed case would not decode)."""
    if not hrp or any(not 33 <= ord(c) <= 126 for c in hrp) or hrp.lower() != hrp:
        raise Bech32Error("the human-readable part must be lower-case printable ASCII")
    bits = len(data) * 8
    count = -(-bits // 5)
    number = int.from_bytes(data, "big") << (count * 5 - bits)
    words = [(number >> 5 * (count - 1 - i)) & 31 for i in range(count)]
    check = _polymod([*_hrp_expand(hrp), *words, *[0] * _CHECKSUM_WORDS]) ^ 1
    checksum = [(check >> 5 * (_CHECKSUM_WORDS - 1 - i)) & 31 for i in range(_CHECKSUM_WORDS)]
    return hrp + "1" + "".join(CHARSET[word] for word in (*words, *checksum))


def to_bytes(words: list[int]) -> bytes:
    """5-bit words to bytes, the last partial byte padded with zero bits."""
    number = to_int(words)
    bits = len(words) * 5
    padding = -bits % 8
    return (number << padding).to_bytes((bits + padding) // 8, "big")


def to_int(words: list[int]) -> int:
    number = 0
    for word in words:
        number = number << 5 | word
    return number


def to_text(words: list[int]) -> str:
    """The UTF-8 text of ``words``, whole bytes only (the bits left over are padding);
    ``Bech32Error`` if they are not UTF-8."""
    raw = to_bytes(words)[: len(words) * 5 // 8]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Bech32Error("it encodes no UTF-8 text") from None
