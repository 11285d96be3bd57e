"""V2 macaroons: known answers, byte layout, interop with pymacaroons, strict parsing."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pymacaroons import MACAROON_V2, Verifier  # type: ignore[import-untyped]
from pymacaroons import Macaroon as PyMacaroon
from pymacaroons.serializers.binary_serializer import (  # type: ignore[import-untyped]
    BinarySerializer,
)

from gateway.l402 import (
    MAX_CAVEATS,
    MAX_MACAROON_BYTES,
    Macaroon,
    MalformedToken,
    decode_b64,
    encode_b64,
    mint,
)

# The worked example of the libmacaroons README, repeated in pymacaroons' tests/test_notes.md.
LIB_KEY = b"this is our super secret key; only we should know it"
LIB_ID = b"we used our secret key"
LIB_LOCATION = "http://mybank/"

THIRD_PARTY = "third-party caveats are not supported"
SIG = bytes(range(32))

caveat_bytes = st.binary(max_size=300)
utf8_caveats = st.text(max_size=200).map(lambda s: s.encode("utf-8"))
locations = st.text(max_size=40)


def macaroons() -> st.SearchStrategy[Macaroon]:
    return st.builds(
        Macaroon,
        identifier=st.binary(max_size=200),
        caveats=st.lists(caveat_bytes, max_size=8).map(tuple),
        signature=st.binary(min_size=32, max_size=32),
        location=locations,
    )


# --- known answers -------------------------------------------------------------------------


def test_libmacaroons_signature_without_caveats() -> None:
    m = mint(LIB_KEY, LIB_ID, [], LIB_LOCATION)
    assert m.signature.hex() == "e3d9e02908526c4c0039ae15114115d97fdd68bf2ba379b342aaf0f617d0552f"


@pytest.mark.parametrize(
    ("caveat", "signature"),
    [
        ("test = caveat", "197bac7a044af33332865b9266e26d493bdd668a660e44d88ce1a998c23dbd67"),
        (
            "account = 3735928559",
            "1efe4763f290dbce0c1d08477367e11f4eee456a64933cf662d79772dbb82128",
        ),
    ],
)
def test_libmacaroons_signature_with_one_caveat(caveat: str, signature: str) -> None:
    m = mint(LIB_KEY, LIB_ID, [caveat], LIB_LOCATION)
    assert m.signature.hex() == signature
    assert m.verify_signature(LIB_KEY)


def test_v2_byte_layout_by_hand() -> None:
    # Built field by field from the layout in go-macaroon's marshal-v2.go / libmacaroons
    # doc/format.txt: version, [location], identifier, EOS, (identifier, EOS)*, EOS, signature.
    m = mint(LIB_KEY, LIB_ID, ["test = caveat"], LIB_LOCATION)
    expected = (
        b"\x02"
        + b"\x01\x0e"
        + b"http://mybank/"
        + b"\x02\x16"
        + b"we used our secret key"
        + b"\x00"
        + b"\x02\x0d"
        + b"test = caveat"
        + b"\x00"
        + b"\x00"
        + b"\x06\x20"
        + bytes.fromhex("197bac7a044af33332865b9266e26d493bdd668a660e44d88ce1a998c23dbd67")
    )
    assert m.serialize() == expected
    assert Macaroon.deserialize(expected) == m


def test_empty_location_is_omitted_as_go_does() -> None:
    m = Macaroon(b"id", (), SIG)
    assert m.serialize() == b"\x02\x02\x02id\x00\x00\x06\x20" + SIG


def test_go_vector_with_a_third_party_caveat_is_rejected() -> None:
    # TestMarshalBinaryRoundTrip in go-macaroon's marshal_test.go.
    vid = bytes(24) + bytes.fromhex(
        "d36ec502e05886d1f0279f055fa52554d16d16c1b14074bbb83ff0fdd79dc2fe098f0ed4a2b091130e6b5db46a20a86b"
    )
    sig = bytes.fromhex("d27db2fd1f22760e4c3dae8137e2d8fc1df6c0741c18aed4b97256bf78d1f55c")
    first_party = (
        b"\x02\x01\x0ehttp://mybank/\x02\x1cwe used our other secret key\x00"
        b"\x02\x14account = 3735928559\x00"
    )
    third_party = b"\x01\x13http://auth.mybank/\x02'this was how we remind auth of key/pred"
    data = first_party + third_party + b"\x04\x48" + vid + b"\x00\x00\x06\x20" + sig
    with pytest.raises(MalformedToken) as info:
        Macaroon.deserialize(data)
    assert info.value.reason == THIRD_PARTY
    # Without the third-party caveat the same bytes parse, field for field.
    m = Macaroon.deserialize(first_party + b"\x00\x06\x20" + sig)
    assert m == Macaroon(
        b"we used our other secret key", (b"account = 3735928559",), sig, "http://mybank/"
    )


# --- interop with pymacaroons ----------------------------------------------------------------


def _pymacaroon(key: bytes, identifier: bytes, caveats: list[str], location: str) -> PyMacaroon:
    pm = PyMacaroon(location=location, identifier=identifier, key=key, version=MACAROON_V2)
    for caveat in caveats:
        pm.add_first_party_caveat(caveat)
    return pm


@settings(max_examples=60)
@given(
    key=st.binary(min_size=1, max_size=64),
    identifier=st.binary(min_size=1, max_size=100),
    caveats=st.lists(st.text(max_size=150), max_size=6),
    location=st.text(min_size=1, max_size=30),
)
def test_same_bytes_and_signature_as_pymacaroons(
    key: bytes, identifier: bytes, caveats: list[str], location: str
) -> None:
    ours = mint(key, identifier, caveats, location)
    theirs = _pymacaroon(key, identifier, caveats, location)
    assert ours.signature.hex() == theirs.signature
    assert ours.serialize() == BinarySerializer().serialize_raw(theirs)
    assert Macaroon.deserialize(BinarySerializer().serialize_raw(theirs)) == ours


@settings(max_examples=40)
@given(
    key=st.binary(min_size=1, max_size=64),
    identifier=st.binary(min_size=1, max_size=100),
    caveats=st.lists(st.text(max_size=150), max_size=6),
)
def test_pymacaroons_reads_and_verifies_ours(
    key: bytes, identifier: bytes, caveats: list[str]
) -> None:
    ours = mint(key, identifier, caveats)
    theirs = PyMacaroon.deserialize(encode_b64(ours))
    assert theirs.identifier_bytes == identifier
    assert [c.caveat_id_bytes for c in theirs.caveats] == [c.encode() for c in caveats]
    verifier = Verifier()
    verifier.satisfy_general(lambda _predicate: True)
    assert verifier.verify(theirs, key)


def test_we_read_pymacaroons_empty_location_field() -> None:
    # pymacaroons always writes a location field, empty or not; Go omits an empty one.
    theirs = _pymacaroon(b"k", b"id", ["a=b"], "")
    raw = BinarySerializer().serialize_raw(theirs)
    assert raw.startswith(b"\x02\x01\x00")
    ours = Macaroon.deserialize(raw)
    assert ours == mint(b"k", b"id", ["a=b"])
    assert ours.verify_signature(b"k")
    assert decode_b64(theirs.serialize()) == ours  # URL-safe, unpadded


@pytest.mark.parametrize("size", [127, 128, 16383, 16384, 40000])
def test_multi_byte_lengths_match_pymacaroons(size: int) -> None:
    caveat = "x" * size
    ours = mint(b"k", b"id", [caveat], "loc")
    assert ours.serialize() == BinarySerializer().serialize_raw(
        _pymacaroon(b"k", b"id", [caveat], "loc")
    )
    assert Macaroon.deserialize(ours.serialize()) == ours


# --- round trips and attenuation -----------------------------------------------------------


@given(macaroons())
def test_serialize_round_trip(m: Macaroon) -> None:
    assert Macaroon.deserialize(m.serialize()) == m


@given(macaroons())
def test_base64_round_trip_in_every_accepted_spelling(m: Macaroon) -> None:
    raw = m.serialize()
    std = encode_b64(m)
    assert std == base64.b64encode(raw).decode()
    url = base64.urlsafe_b64encode(raw).decode()
    for text in (std, std.rstrip("="), url, url.rstrip("=")):
        assert decode_b64(text) == m


@given(
    key=st.binary(min_size=1, max_size=64),
    identifier=st.binary(max_size=80),
    caveats=st.lists(caveat_bytes, max_size=5),
    extra=caveat_bytes,
)
def test_add_caveat_equals_minting_with_it(
    key: bytes, identifier: bytes, caveats: list[bytes], extra: bytes
) -> None:
    base = mint(key, identifier, caveats)
    attenuated = base.add_caveat(extra)
    assert attenuated == mint(key, identifier, [*caveats, extra])
    assert attenuated.verify_signature(key)
    assert base.caveats == tuple(caveats)  # the original is untouched


def test_str_caveats_are_utf8() -> None:
    assert mint(b"k", b"id", ["é=1"]).caveats == ("é=1".encode(),)
    assert mint(b"k", b"id", []).add_caveat("é=1") == mint(b"k", b"id", [b"\xc3\xa9=1"])


def test_signature_checks() -> None:
    m = mint(b"root", b"id", ["a=1", "b=2"])
    assert m.verify_signature(b"root")
    assert not m.verify_signature(b"other")
    tampered = Macaroon(m.identifier, (b"a=1", b"b=3"), m.signature)
    assert not tampered.verify_signature(b"root")
    dropped = Macaroon(m.identifier, (b"a=1",), m.signature)
    assert not dropped.verify_signature(b"root")
    unsigned = Macaroon(m.identifier, (*m.caveats, b"c=3"), m.signature)
    assert not unsigned.verify_signature(b"root")
    other_id = Macaroon(b"id2", m.caveats, m.signature)
    assert not other_id.verify_signature(b"root")


def test_signature_must_be_32_bytes() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        Macaroon(b"id", (), b"short")


# --- strict parsing ------------------------------------------------------------------------

GOOD = mint(b"k", b"id", ["a=1"], "loc").serialize()
HEADER = b"\x02\x02\x02id\x00"
TAIL = b"\x00\x06\x20" + SIG


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty macaroon"),
        (b"\x01" + GOOD[1:], "only binary V2 macaroons are supported"),
        (b"MDAxY2xvY2F0aW9u", "only binary V2 macaroons are supported"),
        (GOOD + b"\x00", "trailing bytes after macaroon"),
        (HEADER + b"\x03\x01x\x00" + TAIL, "unknown macaroon field type"),
        (HEADER + b"\x87\x01\x01x\x00" + TAIL, "unknown macaroon field type"),
        (HEADER + b"\x00\x06\x1f" + SIG[:31], "macaroon signature has the wrong length"),
        (HEADER + b"\x00\x06\x21" + SIG + b"x", "macaroon signature has the wrong length"),
        (HEADER + b"\x00\x02\x02id", "macaroon has no signature"),
        (b"\x02\x00" + TAIL, "macaroon has no identifier"),
        (b"\x02\x01\x01x\x00" + TAIL, "macaroon has no identifier"),
        (b"\x02\x02\x02id\x02\x02id\x00" + TAIL, "unexpected field in macaroon header"),
        (b"\x02\x01\x02\xff\xfe\x02\x02id\x00" + TAIL, "macaroon location is not UTF-8"),
        (HEADER + b"\x02\x80\x00\x00" + TAIL, "non-canonical varint in macaroon"),
        (HEADER + b"\x02\xff\xff\xff\x7f" + TAIL, "macaroon field length is too large"),
        (HEADER + b"\x02\x05ab", "macaroon field extends past the end"),
        (HEADER + b"\x02\x01x\x02\x01y\x00" + TAIL, "unexpected field in caveat"),
        (HEADER + b"\x06\x01x\x00" + TAIL, "unexpected field in caveat"),
        (HEADER + b"\x01\x03loc\x02\x01x\x00" + TAIL, THIRD_PARTY),
        (HEADER + b"\x02\x01x\x04\x03vid\x00" + TAIL, THIRD_PARTY),
        (HEADER + b"\x02\x01x\x06\x01y\x00" + TAIL, "unexpected field in caveat"),
        (HEADER + b"\x02\x01x\x00" * (MAX_CAVEATS + 1) + TAIL, "too many caveats"),
    ],
)
def test_deserialize_rejects(data: bytes, reason: str) -> None:
    with pytest.raises(MalformedToken) as info:
        Macaroon.deserialize(data)
    assert info.value.reason == reason


def test_limits_are_inclusive() -> None:
    at_limit = HEADER + b"\x02\x01x\x00" * MAX_CAVEATS + TAIL
    assert len(Macaroon.deserialize(at_limit).caveats) == MAX_CAVEATS
    big = mint(b"k", b"id", ["x" * (MAX_MACAROON_BYTES - 100)])
    assert len(big.serialize()) <= MAX_MACAROON_BYTES
    assert decode_b64(encode_b64(big)) == big
    too_big = mint(b"k", b"id", ["x" * MAX_MACAROON_BYTES])
    with pytest.raises(MalformedToken, match="macaroon is too large"):
        Macaroon.deserialize(too_big.serialize())
    with pytest.raises(MalformedToken, match="macaroon is too large"):
        decode_b64(encode_b64(too_big))


def test_every_truncation_is_rejected() -> None:
    for cut in range(len(GOOD)):
        with pytest.raises(MalformedToken):
            Macaroon.deserialize(GOOD[:cut])


def test_accepts_bytes_like_input() -> None:
    assert Macaroon.deserialize(bytearray(GOOD)) == Macaroon.deserialize(GOOD)
    parsed = Macaroon.deserialize(memoryview(GOOD))
    assert all(type(c) is bytes for c in parsed.caveats)
    assert type(parsed.signature) is bytes


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty macaroon"),
        ("AgJ+_w", "macaroon mixes base64 alphabets"),
        ("AgJ AgJ", "macaroon is not valid base64"),
        ("AgJ*", "macaroon is not valid base64"),
        ("AgJé", "macaroon is not valid base64"),
        ("AgI=A", "macaroon has a bad base64 length"),
        ("AgI=AA", "macaroon is not valid base64"),
        ("AgI==", "macaroon has bad base64 padding"),
        ("AA======", "macaroon has bad base64 padding"),
        ("AgI===", "macaroon has bad base64 padding"),
        ("AgIAA", "macaroon has a bad base64 length"),
        ("A=gI", "macaroon is not valid base64"),
        ("A" * (MAX_MACAROON_BYTES * 2), "macaroon is too large"),
    ],
)
def test_decode_b64_rejects(text: str, reason: str) -> None:
    with pytest.raises(MalformedToken) as info:
        decode_b64(text)
    assert info.value.reason == reason
