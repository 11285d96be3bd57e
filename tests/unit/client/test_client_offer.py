"""Reading a 402: challenge parsing, BOLT11 decoding and the checks made before paying."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import l402
from gateway.client import (
    ChallengeError,
    InvoiceRejected,
    decode_invoice,
    has_l402_challenge,
    read_offer,
)
from gateway.client.offer import amount_from_problem, normalize_network, token_valid_until
from gateway.errors import GatewayError
from tests.fakes import NODE_PUBKEY, NOW, make_invoice
from tests.unit.client.client_helpers import (
    LND_INVOICE,
    LND_INVOICE_HASH,
    LND_INVOICE_PAYEE,
    LND_INVOICE_TIMESTAMP,
    make_challenge,
    make_macaroon,
)


def test_decodes_a_real_lnd_regtest_invoice() -> None:
    invoice = decode_invoice(LND_INVOICE)
    assert invoice.network == "regtest"
    assert invoice.amount_msat == 10_000
    assert invoice.payment_hash.hex() == LND_INVOICE_HASH
    assert invoice.destination == LND_INVOICE_PAYEE
    assert invoice.description == "premium: GET /api/premium/fortune"
    assert (invoice.created_at, invoice.expires_at) == (
        LND_INVOICE_TIMESTAMP,
        LND_INVOICE_TIMESTAMP + 600,
    )
    assert decode_invoice(LND_INVOICE.upper()) == invoice


@pytest.mark.parametrize("network", ["mainnet", "testnet", "signet", "regtest"])
def test_network_from_the_invoice_prefix(network: str) -> None:
    invoice = make_invoice(b"\1" * 32, 21_000, network=network)
    prefix = {"mainnet": "lnbc2", "testnet": "lntb2", "signet": "lntbs2", "regtest": "lnbcrt2"}
    assert invoice.startswith(prefix[network])
    decoded = decode_invoice(invoice)
    assert (decoded.network, decoded.amount_msat, decoded.destination) == (
        network,
        21_000,
        NODE_PUBKEY,
    )


def test_a_checked_offer_has_the_facts() -> None:
    challenge = make_challenge(10_000)
    offer = read_offer(challenge.www_authenticate, challenge.body, network="regtest", now=NOW)
    assert offer.scheme == "L402"
    assert offer.macaroon_b64 == challenge.macaroon_b64
    assert offer.invoice == challenge.invoice
    assert offer.payment_hash == challenge.payment_hash
    assert offer.amount_msat == 10_000
    assert offer.destination == NODE_PUBKEY
    assert offer.expires_at == int(NOW) + 600
    assert offer.valid_until == int(NOW) + 3600
    assert offer.services == ("premium",)


@pytest.mark.parametrize("value", ["\u00b2", "9" * 5000, "-1", "soon"])
def test_a_valid_until_caveat_that_is_no_whole_number_is_ignored(value: str) -> None:
    # '²' passes isdigit() but not int(); int() refuses over 4300 digits.
    caveat = f"premium_valid_until={value}"
    macaroon = make_macaroon(bytes(32), valid_until=None, extra=(caveat,))
    assert token_valid_until(l402.decode_b64(macaroon)) is None


def test_a_token_that_expired_before_it_was_offered_is_refused() -> None:
    challenge = make_challenge(10_000, valid_until=int(NOW) - 1)
    with pytest.raises(InvoiceRejected, match="expired already"):
        read_offer(challenge.www_authenticate, challenge.body, network="regtest", now=NOW)


def test_lsat_only_challenge_is_answered_with_lsat() -> None:
    challenge = make_challenge()
    lsat = [challenge.www_authenticate[1], 'Bearer realm="x"']
    offer = read_offer(lsat, None, network="regtest", now=NOW)
    assert offer.scheme == "LSAT"


def test_l402_preferred_and_broken_other_values_skipped() -> None:
    challenge = make_challenge()
    values = ["Basic !!!", challenge.www_authenticate[1], challenge.www_authenticate[0]]
    assert read_offer(values, None, network="regtest", now=NOW).scheme == "L402"


@pytest.mark.parametrize("network", ["mainnet", "testnet", "signet"])
def test_invoice_for_another_network_is_refused(network: str) -> None:
    challenge = make_challenge(network=network)
    with pytest.raises(InvoiceRejected, match=f"invoice is for {network}"):
        read_offer(challenge.www_authenticate, challenge.body, network="regtest", now=NOW)
    # Inspection without a network check reads it.
    offer = read_offer(challenge.www_authenticate, challenge.body, network=None, now=NOW)
    assert offer.network == network


def test_network_names_lnd_uses_are_understood() -> None:
    assert normalize_network("bitcoin") == "mainnet"
    assert normalize_network("testnet4") == "testnet"
    assert normalize_network(" Regtest ") == "regtest"
    with pytest.raises(ValueError, match="unknown network"):
        normalize_network("simnet")


def test_amount_must_be_present() -> None:
    challenge = make_challenge(invoice_amount=None)
    with pytest.raises(InvoiceRejected, match="no amount"):
        read_offer(challenge.www_authenticate, None, network="regtest", now=NOW)


def test_amount_must_equal_the_bodys() -> None:
    challenge = make_challenge(10_000, invoice_amount=20_000)
    with pytest.raises(InvoiceRejected, match="asks 20000 msat but the response says 10000"):
        read_offer(challenge.www_authenticate, challenge.body, network="regtest", now=NOW)
    # Without a body (or a body that is not problem+json) the invoice amount stands alone.
    nested = b"[" * 5_000  # deeper than json's recursion: no problem body, as any other
    for body in (None, b"<html>pay</html>", b"[1]", b'{"amount_msat": true}', nested):
        offer = read_offer(challenge.www_authenticate, body, network="regtest", now=NOW)
        assert offer.amount_msat == 20_000


def test_amount_from_problem() -> None:
    assert amount_from_problem(json.dumps({"amount_msat": 5}).encode()) == 5
    assert amount_from_problem(b'{"amount_msat": "5"}') is None
    assert amount_from_problem(b"\xff\xfe") is None
    assert amount_from_problem(b" " * 70_000) is None
    assert amount_from_problem(b'{"amount_msat":' + b"[" * 5_000) is None


def test_expired_invoice_is_refused() -> None:
    challenge = make_challenge(created_at=NOW - 600, expiry=600)
    with pytest.raises(InvoiceRejected, match="expired"):
        read_offer(challenge.www_authenticate, challenge.body, network="regtest", now=NOW)
    offer = read_offer(challenge.www_authenticate, challenge.body, network="regtest", now=NOW - 1)
    assert offer.expires_at == NOW


def test_payment_hash_must_match_the_macaroon() -> None:
    challenge = make_challenge(invoice_hash=b"\7" * 32)
    with pytest.raises(InvoiceRejected, match="another payment hash"):
        read_offer(challenge.www_authenticate, challenge.body, network="regtest", now=NOW)


def test_tampered_invoice_does_not_decode() -> None:
    challenge = make_challenge()
    body = challenge.invoice
    flipped = body[:-10] + ("q" if body[-10] != "q" else "p") + body[-9:]
    values = [l402.format_challenge(challenge.macaroon_b64, flipped)]
    with pytest.raises(InvoiceRejected, match="does not decode"):
        read_offer(values, None, network="regtest", now=NOW)


def test_unusable_challenges() -> None:
    with pytest.raises(ChallengeError, match="no L402 challenge"):
        read_offer(['Bearer realm="api"'], None, network="regtest", now=NOW)
    with pytest.raises(ChallengeError):
        read_offer(['L402 invoice="lnbc1"'], None, network="regtest", now=NOW)
    not_l402 = l402.encode_b64(l402.mint(b"k" * 32, b"plain identifier", []))
    challenge = make_challenge()
    values = [l402.format_challenge(not_l402, challenge.invoice)]
    with pytest.raises(ChallengeError, match="unusable L402 macaroon"):
        read_offer(values, None, network="regtest", now=NOW)
    assert issubclass(InvoiceRejected, ChallengeError)
    assert issubclass(ChallengeError, GatewayError)


def test_has_l402_challenge() -> None:
    challenge = make_challenge()
    assert has_l402_challenge(challenge.www_authenticate)
    assert has_l402_challenge(['Bearer realm="a", LSAT macaroon="x", invoice="y"'])
    assert has_l402_challenge(["l402"])
    assert not has_l402_challenge([])
    assert not has_l402_challenge(['Basic realm="L402"', 'Bearer error="LSAT x"'])
    assert not has_l402_challenge(['Digest realm="a", l402 = "b"'])


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=400))
def test_decode_invoice_raises_only_invoice_rejected(text: str) -> None:
    with contextlib.suppress(InvoiceRejected):
        decode_invoice(text)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=len(LND_INVOICE) - 1), st.sampled_from("qpzry9x8"))
def test_mutated_real_invoice_is_refused_or_unchanged(position: int, char: str) -> None:
    mutated = LND_INVOICE[:position] + char + LND_INVOICE[position + 1 :]
    try:
        decoded = decode_invoice(mutated)
    except InvoiceRejected:
        return
    assert mutated == LND_INVOICE or decoded.payment_hash.hex() == LND_INVOICE_HASH
