"""Signing BOLT11 invoices for the tests (LND makes the real ones): what the fake node hands
out, and the malformed ones the decoder must refuse. Independent of ``gateway.client.bolt11``
except for bech32's published constants."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import coincurve

CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_GENERATOR = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)


def _polymod(values: Sequence[int]) -> int:
    check = 1
    for value in values:
        top = check >> 25
        check = (check & 0x1FFFFFF) << 5 ^ value
        for i in range(5):
            if (top >> i) & 1:
                check ^= _GENERATOR[i]
    return check


def bech32(hrp: str, words: Sequence[int]) -> str:
    expanded = [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]
    polymod = _polymod([*expanded, *words, 0, 0, 0, 0, 0, 0]) ^ 1
    checksum = [(polymod >> 5 * (5 - i)) & 31 for i in range(6)]
    return hrp + "1" + "".join(CHARSET[w] for w in [*words, *checksum])


def words_of(data: bytes) -> list[int]:
    """Bytes as 5-bit words, the last one padded with zero bits."""
    bits = len(data) * 8
    number = int.from_bytes(data, "big") << (-bits % 5)
    count = (bits + 4) // 5
    return [(number >> 5 * (count - 1 - i)) & 31 for i in range(count)]


def int_words(value: int, count: int | None = None) -> list[int]:
    words: list[int] = []
    while value or not words:
        words.insert(0, value & 31)
        value >>= 5
    if count is not None:
        words = [0] * (count - len(words)) + words
    return words


def field(tag: str, words: Sequence[int]) -> list[int]:
    return [CHARSET.index(tag), len(words) >> 5, len(words) & 31, *words]


def bytes_of(words: Sequence[int]) -> bytes:
    number = 0
    for word in words:
        number = number << 5 | word
    bits = len(words) * 5
    return (number << (-bits % 8)).to_bytes((bits + 7) // 8, "big")


def sign(hrp: str, data: Sequence[int], key: str) -> str:
    """``hrp`` and ``data`` (timestamp and tagged fields) signed with the hex ``key``."""
    message = hashlib.sha256(hrp.encode() + bytes_of(data)).digest()
    signature = coincurve.PrivateKey(bytes.fromhex(key)).sign_recoverable(message, hasher=None)
    return bech32(hrp, [*data, *words_of(signature)])


def encode(
    *,
    currency: str,
    amount: str,
    timestamp: int,
    payment_hash: bytes,
    key: str,
    description: str | None = None,
    expiry: int | None = None,
    min_final_cltv: int = 80,
    extra: Sequence[int] = (),
) -> str:
    """An invoice as LND's AddInvoice makes one (``amount`` as in the prefix: ``210n``)."""
    data = int_words(timestamp, 7) + field("p", words_of(payment_hash))
    data += field("s", words_of(hashlib.sha256(payment_hash).digest()))
    if description is not None:
        data += field("d", words_of(description.encode()))
    if expiry is not None:
        data += field("x", int_words(expiry))
    data += field("c", int_words(min_final_cltv))
    return sign(f"ln{currency}{amount}", [*data, *extra], key)


def amount_text(amount_msat: int | None) -> str:
    """The prefix's amount, shortest form: 21000 msat is ``210n``; None is no amount."""
    if amount_msat is None:
        return ""
    pico = amount_msat * 10
    for multiplier, size in (("m", 10**9), ("u", 10**6), ("n", 10**3)):
        if pico % size == 0:
            return f"{pico // size}{multiplier}"
    return f"{pico}p"
