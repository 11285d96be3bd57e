"""WWW-Authenticate challenges and Authorization credentials."""

from __future__ import annotations

import base64
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.l402 import (
    MAX_AUTHORIZATION_CHARS,
    Challenge,
    Credential,
    MalformedToken,
    encode_b64,
    format_authorization,
    format_challenge,
    format_error_challenge,
    mint,
    parse_authorization,
    parse_challenge,
)

MAC = mint(b"root", b"\x00" * 66, ["services=api:0"])
MAC_B64 = encode_b64(MAC)
OTHER = mint(b"root", b"\x01" * 66, ["services=api:0"])
PRE = bytes(range(32))
INVOICE = "lnbcrt210n1p4sabc"

b64_text = st.binary(min_size=1, max_size=120).map(lambda b: base64.b64encode(b).decode())
invoices = st.from_regex(r"[a-z0-9]{1,80}", fullmatch=True)
schemes = st.sampled_from(["L402", "LSAT"])

# What clients in the wild match instead of parsing parameters, on the first
# WWW-Authenticate value only: Aperture v0.5's Go client (and lnget on top of it) wants
# <scheme>, one space, macaroon, comma, one space, invoice; l402-requests allows any blanks.
APERTURE_CLIENT = re.compile(r'(LSAT|L402) macaroon="(.*?)", invoice="(.*?)"')
L402_REQUESTS_CLIENT = re.compile(
    r'(L402|LSAT)\s+macaroon="([^"]+)"\s*,\s*invoice="([^"]+)"', re.IGNORECASE
)


# --- challenge -----------------------------------------------------------------------------


def test_format_challenge_exact_text() -> None:
    assert format_challenge("QUJD", INVOICE) == (
        f'L402 macaroon="QUJD", invoice="{INVOICE}", version="0", token="QUJD"'
    )
    assert format_challenge("QUJD", INVOICE, "LSAT") == (
        f'LSAT macaroon="QUJD", invoice="{INVOICE}", version="0", token="QUJD"'
    )


@pytest.mark.parametrize("scheme", ["L402", "LSAT"])
def test_challenge_satisfies_regex_based_clients(scheme: str) -> None:
    text = format_challenge(MAC_B64, INVOICE, scheme)
    for client in (APERTURE_CLIENT, L402_REQUESTS_CLIENT):
        match = client.match(text)  # anchored: the scheme and these two come first
        assert match is not None
        assert match.groups() == (scheme, MAC_B64, INVOICE)


def test_error_challenge_exact_text() -> None:
    assert format_error_challenge("my-gateway", "invalid_token", "token expired") == (
        'L402 realm="my-gateway", error="invalid_token", error_description="token expired"'
    )
    assert format_error_challenge("", "invalid_token") == (
        'L402 realm="l402-gateway", error="invalid_token"'
    )


@given(st.text(), st.text())
def test_error_challenge_is_one_safe_header_value(realm: str, description: str) -> None:
    text = format_error_challenge(realm, "invalid_token", description)
    # One header line, and every quoted value stays a quoted value: no quote, backslash,
    # CR, LF or other control character can come from the inputs.
    assert all(0x20 <= ord(ch) <= 0x7E for ch in text)
    scheme, _, rest = text.partition(" ")
    assert scheme == "L402"
    params = re.findall(r'([a-z_]+)="([^"\\]*)"(?:, |$)', rest)
    assert "".join(f'{k}="{v}", ' for k, v in params)[:-2] == rest
    assert [k for k, _ in params][:2] == ["realm", "error"]
    # Not a payment challenge: nothing for a client to pay, and our parser says so.
    with pytest.raises(MalformedToken, match="challenge has no invoice"):
        parse_challenge(text)


def test_error_challenge_refuses_a_bad_error_code() -> None:
    with pytest.raises(ValueError, match="error code"):
        format_error_challenge("x", 'bad"code')
    with pytest.raises(ValueError, match="error code"):
        format_error_challenge("x", "")


def test_parse_challenge_skips_an_error_challenge_before_a_payment_one() -> None:
    error = format_error_challenge("x", "invalid_token", "unknown or revoked token")
    payment = format_challenge(MAC_B64, INVOICE, "LSAT")
    assert parse_challenge(f"{error}, {payment}") == Challenge("LSAT", MAC_B64, INVOICE, "0")


@pytest.mark.parametrize(
    ("mac", "invoice", "scheme"),
    [
        ('QUJD", evil="1', INVOICE, "L402"),
        ("QUJD", 'lnbc1"\r\nX-Injected: 1', "L402"),
        ("", INVOICE, "L402"),
        ("QUJD", "", "L402"),
        ("QUJD", INVOICE, "Bearer"),
        ("QUJD", INVOICE, "l402"),
    ],
)
def test_format_challenge_refuses_unsafe_values(mac: str, invoice: str, scheme: str) -> None:
    with pytest.raises(ValueError, match=r"scheme|base64|bech32"):
        format_challenge(mac, invoice, scheme)


@given(b64_text, invoices, schemes)
def test_challenge_round_trip(mac: str, invoice: str, scheme: str) -> None:
    assert parse_challenge(format_challenge(mac, invoice, scheme)) == Challenge(
        scheme, mac, invoice, "0"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f'LSAT macaroon="{MAC_B64}", invoice="{INVOICE}"', ("LSAT", None)),
        (f'l402 invoice="{INVOICE}", token="{MAC_B64}"', ("L402", None)),
        (f'lsat  macaroon = "{MAC_B64}" ,invoice={INVOICE} , version=0', ("LSAT", "0")),
        (f"L402 token={MAC_B64.rstrip('=')}, invoice={INVOICE}", ("L402", None)),
        (f"L402 token={MAC_B64}, invoice={INVOICE}", ("L402", None)),
        (f'L402 Token="{MAC_B64}", INVOICE="{INVOICE}", Version="0"', ("L402", "0")),
        (f'L402 token="{MAC_B64}", invoice="{INVOICE}", future="x, y"', ("L402", None)),
        (f'L402 token="{MAC_B64}", invoice="{INVOICE}", esc="a\\"b"', ("L402", None)),
        (f'L402\ttoken="{MAC_B64}",\tinvoice="{INVOICE}"', ("L402", None)),
    ],
)
def test_parse_challenge_tolerates_spelling(text: str, expected: tuple[str, str | None]) -> None:
    challenge = parse_challenge(text)
    assert (challenge.scheme, challenge.version) == expected
    assert challenge.invoice == INVOICE
    assert challenge.macaroon_b64.rstrip("=") == MAC_B64.rstrip("=")


def test_unquoted_values_may_be_bare_base64() -> None:
    challenge = parse_challenge(f"L402 macaroon=ab/+c==, invoice={INVOICE}")
    assert challenge.macaroon_b64 == "ab/+c=="


def test_parse_challenge_picks_l402_from_a_joined_header() -> None:
    lsat = format_challenge(MAC_B64, "lnbcrt1lsat", "LSAT")
    l402 = format_challenge(MAC_B64, INVOICE, "L402")
    for text in (
        f"{lsat}, {l402}",
        f"{l402}, {lsat}",
        f'Basic realm="x", {lsat}, Negotiate abc==, {l402}',
        f'Bearer, Negotiate YWJj, {l402}, Basic realm="y"',
    ):
        assert parse_challenge(text).invoice == INVOICE
    assert parse_challenge(f'Basic realm="x", {lsat}').scheme == "LSAT"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "no L402 challenge"),
        ('Basic realm="x"', "no L402 challenge"),
        (f'Bearer token="{MAC_B64}"', "no L402 challenge"),
        (f'L402 token="{MAC_B64}"', "challenge has no valid invoice"),
        (f'L402 invoice="{INVOICE}"', "challenge has no valid macaroon"),
        (f'L402 token="", invoice="{INVOICE}"', "challenge has no valid macaroon"),
        (f'L402 token="a b", invoice="{INVOICE}"', "challenge has no valid macaroon"),
        ('L402 token="QUJD", invoice="lnbc 1"', "challenge has no valid invoice"),
        (
            f'L402 token="QUJD", macaroon="QUJE", invoice="{INVOICE}"',
            "challenge token and macaroon differ",
        ),
        (
            f'L402 token="QUJD", token="QUJD", invoice="{INVOICE}"',
            "challenge repeats a parameter",
        ),
        (
            f'L402 version="1", token="QUJD", invoice="{INVOICE}"',
            "unsupported L402 version",
        ),
        (f'L402 token="QUJD" invoice="{INVOICE}"', "challenge parameters are malformed"),
        (f'L402 token="QUJD, invoice="{INVOICE}"', "challenge parameters are malformed"),
        ('L402token="QUJD"', "challenge scheme must be followed by a space"),
        ('"L402" token="QUJD"', "challenge has no valid scheme"),
    ],
)
def test_parse_challenge_rejects(text: str, reason: str) -> None:
    with pytest.raises(MalformedToken) as info:
        parse_challenge(text)
    assert info.value.reason == reason


# --- authorization -------------------------------------------------------------------------


def test_format_authorization() -> None:
    assert format_authorization([MAC], PRE) == f"L402 {MAC_B64}:{PRE.hex()}"
    assert format_authorization([MAC, OTHER], PRE, "LSAT") == (
        f"LSAT {MAC_B64},{encode_b64(OTHER)}:{PRE.hex()}"
    )
    with pytest.raises(ValueError, match="scheme"):
        format_authorization([MAC], PRE, "Bearer")
    with pytest.raises(ValueError, match="macaroon"):
        format_authorization([], PRE)
    with pytest.raises(ValueError, match="32 bytes"):
        format_authorization([MAC], PRE[:31])


@given(
    st.lists(st.sampled_from([MAC, OTHER]), min_size=1, max_size=3),
    st.binary(min_size=32, max_size=32),
    schemes,
)
def test_authorization_round_trip(macs: list[object], preimage: bytes, scheme: str) -> None:
    macaroons = [MAC if m is MAC else OTHER for m in macs]
    value = format_authorization(macaroons, preimage, scheme)
    assert parse_authorization([value]) == Credential(scheme, tuple(macaroons), preimage)


@pytest.mark.parametrize(
    "values",
    [[], ["Bearer abc"], ["Basic dXNlcjpwYXNz"], [""], ["   "], ["L402x abc:00"], ["Macaroon x"]],
)
def test_parse_authorization_none_without_l402(values: list[str]) -> None:
    assert parse_authorization(values) is None


@pytest.mark.parametrize(
    "value",
    [
        f"L402 {MAC_B64}:{PRE.hex()}",
        f"l402 {MAC_B64}:{PRE.hex()}",
        f"LSAT {MAC_B64}:{PRE.hex()}",
        f"L402 {MAC_B64}:{PRE.hex().upper()}",
        f"  L402   {MAC_B64}:{PRE.hex()}  ",
        f"L402\t{MAC_B64}:{PRE.hex()}",
        f"L402 {MAC_B64.rstrip('=')}:{PRE.hex()}",
        f"L402 {base64.urlsafe_b64encode(MAC.serialize()).decode().rstrip('=')}:{PRE.hex()}",
    ],
)
def test_parse_authorization_accepts(value: str) -> None:
    credential = parse_authorization(["Bearer unrelated", value])
    assert credential is not None
    assert credential.macaroons == (MAC,)
    assert credential.preimage == PRE
    assert credential.scheme == value.split()[0].upper()


def test_several_macaroons_in_one_credential() -> None:
    value = f"L402 {MAC_B64} , {encode_b64(OTHER)}:{PRE.hex()}"
    credential = parse_authorization([value])
    assert credential is not None
    assert credential.macaroons == (MAC, OTHER)


def test_several_l402_values_are_rejected() -> None:
    one = f"L402 {MAC_B64}:{PRE.hex()}"
    for other in (
        f"L402 {encode_b64(OTHER)}:{PRE.hex()}",
        f"LSAT {MAC_B64}:{bytes(32).hex()}",
        "L402 garbage",
    ):
        with pytest.raises(MalformedToken) as info:
            parse_authorization([one, other])
        if "garbage" not in other:
            assert info.value.reason == "several L402 credentials in one request"


def test_the_same_credential_as_lsat_and_l402_is_one_credential() -> None:
    # Aperture's Go client (l402.SetHeader) sends exactly this pair.
    lsat = f"LSAT {MAC_B64}:{PRE.hex()}"
    l402 = f"L402 {MAC_B64}:{PRE.hex().upper()}"
    for values in ([lsat, l402], [l402, lsat]):
        credential = parse_authorization(values)
        assert credential == Credential("L402", (MAC,), PRE)
    assert parse_authorization([lsat, lsat]) == Credential("LSAT", (MAC,), PRE)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("L402", "missing L402 credentials"),
        ("LSAT   ", "missing L402 credentials"),
        (f"L402 {MAC_B64}", "credentials must be <macaroon>:<hex preimage>"),
        (f"L402 {MAC_B64}:{PRE.hex()[:-1]}", "credentials must be <macaroon>:<hex preimage>"),
        (f"L402 {MAC_B64}:{PRE.hex()}00", "credentials must be <macaroon>:<hex preimage>"),
        (f"L402 {MAC_B64}:{'g' * 64}", "credentials must be <macaroon>:<hex preimage>"),
        (f"L402 :{PRE.hex()}", "credentials must be <macaroon>:<hex preimage>"),
        (f"L402 {MAC_B64},:{PRE.hex()}", "credentials must be <macaroon>:<hex preimage>"),
        (f"L402 {MAC_B64} x:{PRE.hex()}", "credentials must be <macaroon>:<hex preimage>"),
        (f"L402 QUJD:{PRE.hex()}", "only binary V2 macaroons are supported"),
        (f"L402 {MAC_B64}*:{PRE.hex()}", "credentials must be <macaroon>:<hex preimage>"),
        (f"L402 {'A' * MAX_AUTHORIZATION_CHARS}:{PRE.hex()}", "authorization header is too large"),
        (f"L402 {'QUJD,' * 8}QUJD:{PRE.hex()}", "too many macaroons"),
    ],
)
def test_parse_authorization_rejects(value: str, reason: str) -> None:
    with pytest.raises(MalformedToken) as info:
        parse_authorization([value])
    assert info.value.reason == reason


def test_oversized_foreign_scheme_is_not_ours_to_judge() -> None:
    assert parse_authorization(["Bearer " + "x" * 100_000]) is None


def test_a_single_string_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        parse_authorization(f"L402 {MAC_B64}:{PRE.hex()}")
