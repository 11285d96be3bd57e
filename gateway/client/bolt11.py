"""BOLT11 decoding: the fields a paying client checks, with the signature verified.

Our own reader, so that the client installs on every Python the package supports (the
``bolt11`` distribution declares ``Requires-Python <3.13``); the signature's public key is
recovered with ``coincurve`` (libsecp256k1). Pure: no I/O. Reads what BOLT #11 says a reader
must: the amount with its multiplier, the timestamp, the tagged fields ``p`` (payment hash),
``d``/``h`` (description or its hash), ``x`` (expiry, default 3600 s), ``s`` (payment secret,
which LND requires of an invoice it pays) and ``n`` (payee, which must then be the key that
signed); other fields are skipped, and ``p``/``h``/``s``/``n`` fields of the wrong length are
skipped as the spec says.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import coincurve

from gateway import bech32
from gateway.bech32 import to_bytes, to_int

__all__ = ["Bolt11Error", "Invoice", "decode"]

# hrp: "ln" + currency + optional amount (digits, optional multiplier)
# 21 million bitcoin in pico-bitcoin (the smallest unit) has 20 digits.
_MAX_AMOUNT_DIGITS = 20
_HRP_RE = re.compile(r"ln([a-z]+?)(?:(\d+)([munp]?))?")
_MULTIPLIER_PICO_BTC = {"m": 10**9, "u": 10**6, "n": 10**3, "p": 1}  # per unit, in pico-BTC
_SIGNATURE_WORDS = 104  # 65 bytes (r, s, recovery id) in 5-bit words
_TIMESTAMP_WORDS = 7  # 35 bits
DEFAULT_EXPIRY = 3600


class Bolt11Error(ValueError):
    """The text is no valid BOLT11 invoice; the message says why."""


@dataclass(frozen=True, slots=True)
class Invoice:
    currency: str  # the prefix after "ln": "bc", "tb", "tbs", "bcrt"
    amount_msat: int | None
    timestamp: int
    payment_hash: bytes
    payee: bytes  # 33-byte compressed public key of the node that signed
    description: str | None
    description_hash: bytes | None
    expiry: int
    payment_secret: bytes | None = None  # 32 bytes; None when the invoice has none

    @property
    def has_payment_secret(self) -> bool:
        return self.payment_secret is not None


def _bech32(text: str) -> tuple[str, list[int]]:
    """(hrp, data words without the checksum), as ``Bolt11Error``s."""
    try:
        return bech32.decode(text)
    except bech32.Bech32Error as error:
        raise Bolt11Error(str(error)) from None


def _amount_msat(digits: str | None, multiplier: str | None) -> int | None:
    if not digits:
        return None
    if digits.startswith("0"):
        raise Bolt11Error("amount with a leading zero")
    if len(digits) > _MAX_AMOUNT_DIGITS:  # int() refuses thousands of digits
        raise Bolt11Error("amount over all the bitcoin there is")
    if not multiplier:
        return int(digits) * 10**11  # whole bitcoin
    pico = int(digits) * _MULTIPLIER_PICO_BTC[multiplier]
    if pico % 10:
        raise Bolt11Error("amount is not a whole number of millisatoshi")
    return pico // 10


def decode(text: str) -> Invoice:
    """Decode ``text`` and verify its signature; Bolt11Error if it is no valid invoice."""
    text = text.strip()
    if text[:10].lower().startswith("lightning:"):
        text = text[10:]
    hrp, words = _bech32(text)
    match = _HRP_RE.fullmatch(hrp)
    if match is None:
        raise Bolt11Error(f"not a lightning invoice prefix: {hrp[:20]!r}")
    currency, digits, multiplier = match.groups()
    amount = _amount_msat(digits, multiplier)
    if len(words) < _TIMESTAMP_WORDS + _SIGNATURE_WORDS:
        raise Bolt11Error("too short")
    signed, signature = words[:-_SIGNATURE_WORDS], to_bytes(words[-_SIGNATURE_WORDS:])
    timestamp = to_int(signed[:_TIMESTAMP_WORDS])
    fields: dict[str, list[list[int]]] = {}
    at = _TIMESTAMP_WORDS
    while at < len(signed):
        if at + 3 > len(signed):
            raise Bolt11Error("truncated tagged field")
        tag, length = bech32.CHARSET[signed[at]], signed[at + 1] << 5 | signed[at + 2]
        value = signed[at + 3 : at + 3 + length]
        if len(value) != length:
            raise Bolt11Error("truncated tagged field")
        fields.setdefault(tag, []).append(value)
        at += 3 + length

    def first(tag: str, words_long: int | None = None) -> list[int] | None:
        # A p, h, s or n of the wrong length is skipped (BOLT #11), the first good one taken.
        for value in fields.get(tag, []):
            if words_long is None or len(value) == words_long:
                return value
        return None

    payment_hash = first("p", 52)
    if payment_hash is None:
        raise Bolt11Error("no payment hash")
    description = first("d")
    description_hash = first("h", 52)
    expiry = first("x")
    payment_secret = first("s", 52)
    payee = first("n", 53)
    message = hashlib.sha256(hrp.encode("ascii") + to_bytes(signed)).digest()
    if signature[64] > 3:
        raise Bolt11Error("bad signature recovery id")
    try:
        key = coincurve.PublicKey.from_signature_and_message(signature, message, hasher=None)
    except Exception:  # libsecp256k1 reports a bad signature as a plain Exception
        raise Bolt11Error("bad signature") from None
    recovered = key.format(compressed=True)
    if payee is not None and to_bytes(payee)[:33] != recovered:
        raise Bolt11Error("the signature is not the payee's")
    shown = None
    if description is not None:
        # whole bytes only: the padding bits of the last word are no character
        try:
            shown = bech32.to_text(description)
        except bech32.Bech32Error:
            raise Bolt11Error("description is not UTF-8") from None
    return Invoice(
        currency=currency,
        amount_msat=amount,
        timestamp=timestamp,
        payment_hash=to_bytes(payment_hash)[:32],
        payee=recovered,
        description=shown,
        description_hash=None if description_hash is None else to_bytes(description_hash)[:32],
        expiry=DEFAULT_EXPIRY if expiry is None else to_int(expiry),
        payment_secret=None if payment_secret is None else to_bytes(payment_secret)[:32],
    )
