"""The client's BOLT11 reader: real LND invoices, every field it reads, and refusals of
invoices that are malformed, tampered with or signed by another key than they name."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.client import bolt11
from tests import bolt11_encode as enc
from tests.fakes import NODE_KEY, NODE_PUBKEY
from tests.unit.client.client_helpers import (
    LND_INVOICE,
    LND_INVOICE_HASH,
    LND_INVOICE_PAYEE,
    LND_INVOICE_TIMESTAMP,
)

HASH = hashlib.sha256(b"preimage").digest()
OTHER_KEY = "22" * 32


def invoice(amount: str = "210n", key: str = NODE_KEY, **fields: object) -> str:
    options: dict[str, object] = {"description": "premium: GET /x", "expiry": 600} | fields
    return enc.encode(
        currency="bcrt",
        amount=amount,
        timestamp=1_800_000_000,
        payment_hash=HASH,
        key=key,
        **options,  # type: ignore[arg-type]
    )


def test_a_real_lnd_invoice() -> None:
    decoded = bolt11.decode(LND_INVOICE)
    assert decoded.currency == "bcrt"
    assert decoded.amount_msat == 10_000
    assert decoded.payment_hash.hex() == LND_INVOICE_HASH
    assert decoded.payee.hex() == LND_INVOICE_PAYEE
    assert decoded.description == "premium: GET /api/premium/fortune"
    assert (decoded.timestamp, decoded.expiry) == (LND_INVOICE_TIMESTAMP, 600)
    assert bolt11.decode(f"lightning:{LND_INVOICE.upper()}") == decoded


@pytest.mark.parametrize(
    ("amount", "msat"),
    [
        ("", None),
        ("1", 100_000_000_000),
        ("25m", 2_500_000_000),
        ("3u", 300_000),
        ("210n", 21_000),
        ("10p", 1),
    ],
)
def test_amounts_with_every_multiplier(amount: str, msat: int | None) -> None:
    assert bolt11.decode(invoice(amount)).amount_msat == msat


def test_defaults_and_a_description_hash() -> None:
    digest = hashlib.sha256(b"long description").digest()
    decoded = bolt11.decode(
        invoice(description=None, expiry=None, extra=enc.field("h", enc.words_of(digest)))
    )
    assert (decoded.description, decoded.description_hash) == (None, digest)
    assert decoded.expiry == 3600


def test_the_payment_secret_is_read_and_its_absence_told() -> None:
    # LND's invoice has one (the value the bolt11 distribution's decoder reads), and so has
    # every invoice the test encoder makes (the sha256 of the payment hash).
    lnd = bolt11.decode(LND_INVOICE)
    assert lnd.payment_secret == bytes.fromhex(
        "3fca77091e8613273c22524067d871dc0efdbeb657fcd3b41bd9516a7e5f0e05"
    )
    assert lnd.has_payment_secret
    assert bolt11.decode(invoice()).payment_secret == hashlib.sha256(HASH).digest()
    # The same fields without ``s``: a valid invoice, with no payment secret.
    data = enc.int_words(1_800_000_000, 7) + enc.field("p", enc.words_of(HASH))
    data += enc.field("d", enc.words_of(b"premium: GET /x")) + enc.field("c", enc.int_words(80))
    without = bolt11.decode(enc.sign("lnbcrt210n", data, NODE_KEY))
    assert (without.payment_hash, without.amount_msat) == (HASH, 21_000)
    assert without.payment_secret is None
    assert not without.has_payment_secret
    # An ``s`` of the wrong length is skipped (BOLT #11), so it is none either.
    short = enc.field("s", enc.words_of(b"\x01" * 31))
    assert bolt11.decode(enc.sign("lnbcrt210n", data + short, NODE_KEY)).payment_secret is None


def test_a_payee_field_must_be_the_signing_key() -> None:
    named = enc.field("n", enc.words_of(bytes.fromhex(NODE_PUBKEY)))
    assert bolt11.decode(invoice(extra=named)).payee.hex() == NODE_PUBKEY
    with pytest.raises(bolt11.Bolt11Error, match="not the payee's"):
        bolt11.decode(invoice(key=OTHER_KEY, extra=named))


def test_tampered_data_recovers_another_key_or_fails_the_checksum() -> None:
    good = invoice()
    hrp, _, rest = good.rpartition("1")
    flipped = rest[:20] + ("q" if rest[20] != "q" else "p") + rest[21:]
    with pytest.raises(bolt11.Bolt11Error, match="checksum"):
        bolt11.decode(f"{hrp}1{flipped}")
    # same signature over other data, with a valid checksum: another key comes out
    words = [enc.CHARSET.index(c) for c in rest[:-6]]
    words[12] ^= 1  # a bit of the payment hash
    assert bolt11.decode(enc.bech32(hrp, words)).payee.hex() != NODE_PUBKEY
    with pytest.raises(bolt11.Bolt11Error, match="checksum"):
        bolt11.decode(good[:-1] + ("q" if good[-1] != "q" else "p"))


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("lnbcrt1qqqqqqqqq", "too short|checksum"),
        ("xx1" + "q" * 120, "checksum|not a lightning"),
        ("Lnbcrt1qqq", "mixed case"),
        ("lnbcrt1b", "separator"),
    ],
)
def test_garbage_is_refused(text: str, reason: str) -> None:
    with pytest.raises(bolt11.Bolt11Error, match=reason):
        bolt11.decode(text)


def test_refusals_of_well_signed_but_invalid_invoices() -> None:
    data = enc.int_words(1_800_000_000, 7)
    with pytest.raises(bolt11.Bolt11Error, match="no payment hash"):
        bolt11.decode(enc.sign("lnbcrt210n", data, NODE_KEY))
    short_hash = enc.field("p", enc.words_of(HASH[:31]))  # wrong length: skipped (BOLT #11)
    with pytest.raises(bolt11.Bolt11Error, match="no payment hash"):
        bolt11.decode(enc.sign("lnbcrt210n", data + short_hash, NODE_KEY))
    for amount, reason in (
        ("015n", "leading zero"),
        ("1p", "whole number of millisatoshi"),
        ("9" * 5000 + "p", "over all the bitcoin"),  # int() refuses over 4300 digits
    ):
        with pytest.raises(bolt11.Bolt11Error, match=reason):
            bolt11.decode(invoice(amount))
    with pytest.raises(bolt11.Bolt11Error, match="not UTF-8"):
        bolt11.decode(invoice(description=None, extra=enc.field("d", enc.words_of(b"\xff\xfe"))))
    with pytest.raises(bolt11.Bolt11Error, match="truncated"):
        bolt11.decode(enc.sign("lnbcrt210n", [*data, 1, 1, 0], NODE_KEY))


@given(
    amount_msat=st.integers(min_value=1, max_value=21 * 10**17) | st.none(),
    description=st.text(max_size=300),
    expiry=st.integers(min_value=0, max_value=2**32),
    timestamp=st.integers(min_value=0, max_value=2**35 - 1),
)
def test_round_trip(amount_msat: int | None, description: str, expiry: int, timestamp: int) -> None:
    text = enc.encode(
        currency="bc",
        amount=enc.amount_text(amount_msat),
        timestamp=timestamp,
        payment_hash=HASH,
        key=NODE_KEY,
        description=description,
        expiry=expiry,
    )
    decoded = bolt11.decode(text)
    assert (decoded.amount_msat, decoded.description) == (amount_msat, description)
    assert (decoded.expiry, decoded.timestamp) == (expiry, timestamp)
    assert (decoded.payment_hash, decoded.payee.hex()) == (HASH, NODE_PUBKEY)


@given(
    amount_msat=st.integers(min_value=1, max_value=21 * 10**17) | st.none(),
    description=st.text(max_size=300),
    timestamp=st.integers(min_value=0, max_value=2**35 - 1),
)
def test_an_independent_reader_agrees(
    amount_msat: int | None, description: str, timestamp: int
) -> None:
    # The bolt11 distribution (installed by the dev extra where it installs: Python < 3.13).
    reference = pytest.importorskip("bolt11")
    text = enc.encode(
        currency="bcrt",
        amount=enc.amount_text(amount_msat),
        timestamp=timestamp,
        payment_hash=HASH,
        key=NODE_KEY,
        description=description,
    )
    ours, other = bolt11.decode(text), reference.decode(text)
    assert (other.payee, other.payment_hash) == (ours.payee.hex(), ours.payment_hash.hex())
    assert (other.amount_msat, other.description) == (ours.amount_msat, ours.description)
    assert (other.date, other.expiry) == (ours.timestamp, ours.expiry)
