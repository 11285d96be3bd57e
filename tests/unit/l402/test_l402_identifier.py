"""Identifier codec: layout, round trip, rejection of anything not a v0 identifier."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.l402 import IDENTIFIER_SIZE, Identifier, L402Error, MalformedToken

hashes = st.binary(min_size=32, max_size=32)


def test_layout_is_big_endian_version_then_hash_then_token_id() -> None:
    ident = Identifier(0, b"\x11" * 32, b"\x22" * 32)
    assert ident.encode() == b"\x00\x00" + b"\x11" * 32 + b"\x22" * 32
    assert IDENTIFIER_SIZE == 66


@given(hashes, hashes)
def test_round_trip(payment_hash: bytes, token_id: bytes) -> None:
    ident = Identifier(0, payment_hash, token_id)
    raw = ident.encode()
    assert len(raw) == 66
    assert Identifier.decode(raw) == ident
    assert ident.key_id == hashlib.sha256(raw).digest()


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "identifier is too short"),
        (b"\x00", "identifier is too short"),
        (b"\x00\x00" + b"\x01" * 63, "identifier has the wrong length"),
        (b"\x00\x00" + b"\x01" * 65, "identifier has the wrong length"),
        (b"\x00\x01" + b"\x01" * 64, "unknown identifier version"),
        (b"\x01\x00" + b"\x01" * 64, "unknown identifier version"),
    ],
)
def test_decode_rejects(raw: bytes, reason: str) -> None:
    with pytest.raises(MalformedToken) as info:
        Identifier.decode(raw)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("version", "payment_hash", "token_id"),
    [(1, b"\x00" * 32, b"\x00" * 32), (0, b"\x00" * 31, b"\x00" * 32), (0, b"", b"\x00" * 32)],
)
def test_constructor_rejects_bad_fields(version: int, payment_hash: bytes, token_id: bytes) -> None:
    with pytest.raises(ValueError, match=r"identifier version|must be 32 bytes"):
        Identifier(version, payment_hash, token_id)


@given(st.binary(max_size=200))
def test_decode_fuzz_raises_only_l402_errors(raw: bytes) -> None:
    try:
        ident = Identifier.decode(raw)
    except L402Error:
        return
    assert ident.encode() == raw
