"""Fuzz pass over everything that parses untrusted text: the Authorization credential, the
WWW-Authenticate challenge (the gateway's parser and the paying client's), the V2 macaroon
decoder, the caveat checker and the configuration loader.

Property everywhere: only the documented errors escape (``gateway.l402.L402Error`` for the
protocol, ``gateway.client.ClientError`` for the client, ``ConfigError`` for the
configuration). The inputs are mutations of genuine values and grammar-shaped garbage, so
the fuzzer gets past the first check into the deeper ones; where a parse succeeds, a
stronger property is checked (a mutated credential never verifies unless it decodes to the
genuine one; a caveat appended to a token never widens what it grants).

The example counts keep ``make test`` fast; ``FUZZ_SCALE=20`` multiplies them for a
deeper run by hand.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import l402
from gateway.client.errors import ClientError
from gateway.client.offer import read_offer
from gateway.config import (
    L402Config,
    LndConfig,
    RateLimitConfig,
    RouteConfig,
    ServerConfig,
    StoreConfig,
    load_config,
)
from gateway.errors import ConfigError
from gateway.runtime import build_pricing
from tests.fakes import NOW, make_invoice

SCALE = float(os.environ.get("FUZZ_SCALE", "1"))


def examples(count: int) -> settings:
    return settings(
        max_examples=int(count * SCALE),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


# --- mutation of genuine text ---------------------------------------------------------------

# Separators of every grammar involved, quoting, escapes, controls and non-ASCII.
NASTY = ':,; \t="\\=+/-_%.~*[]{}#\x00\x01\x7f\x80\xa0\xffé\u2028\ufeff\U0001f600'
EDIT = st.tuples(
    st.sampled_from(("replace", "insert", "delete", "repeat", "swapcase")),
    st.integers(0, 1 << 16),
    st.integers(1, 64),
    st.text(NASTY + "AZaz09", min_size=1, max_size=4),
)


def _edit(text: str, edit: tuple[str, int, int, str]) -> str:
    kind, at, width, piece = edit
    at %= len(text) + 1
    stop = min(len(text), at + width)
    if kind == "replace":
        return text[:at] + piece + text[at + len(piece) :]
    if kind == "insert":
        return text[:at] + piece + text[at:]
    if kind == "delete":
        return text[:at] + text[stop:]
    if kind == "repeat":
        return text[:stop] + text[at:stop] + text[stop:]
    return text[:at] + text[at:stop].swapcase() + text[stop:]


# One to four edits; tests/integration/test_fuzz_http.py applies them to live credentials.
EDITS = st.lists(EDIT, min_size=1, max_size=4)


def mutations(genuine: str) -> st.SearchStrategy[str]:
    """``genuine`` with one to four random edits."""
    return EDITS.map(lambda chosen: apply_edits(genuine, chosen))


def apply_edits(text: str, edits: list[tuple[str, int, int, str]]) -> str:
    for edit in edits:
        text = _edit(text, edit)
    return text


# --- a genuine token ------------------------------------------------------------------------

ROOT_KEY = bytes(range(32))
PREIMAGE = hashlib.sha256(b"fuzz preimage").digest()
PAYMENT_HASH = hashlib.sha256(PREIMAGE).digest()
TOKEN_ID = bytes(32)
MACAROON = l402.mint_token(
    ROOT_KEY,
    PAYMENT_HASH,
    TOKEN_ID,
    ["services=svc:0", "svc_capabilities=read,write", f"svc_valid_until={int(NOW) + 60}"],
    "l402-gateway",
)
MACAROON_B64 = l402.encode_b64(MACAROON)
AUTHORIZATION = l402.format_authorization([MACAROON], PREIMAGE)
SCOPE = l402.RequestScope("svc", "GET", "/svc/a", frozenset({"read"}))


# --- Authorization --------------------------------------------------------------------------

AUTHORIZATION_VALUES = st.one_of(
    mutations(AUTHORIZATION),
    mutations(AUTHORIZATION.replace("L402", "LSAT", 1)),
    st.just(AUTHORIZATION),
    st.text(max_size=80),
)


@examples(400)
@given(values=st.lists(AUTHORIZATION_VALUES, min_size=1, max_size=3))
def test_authorization_parse_and_verify_raise_only_l402_errors(values: list[str]) -> None:
    try:
        credential = l402.parse_authorization(values)
        if credential is None:
            return
        l402.verify_token(credential, ROOT_KEY, SCOPE, NOW)
    except l402.L402Error:
        return
    # Verified: the edits decode to the genuine credential (the location is an unsigned hint).
    (macaroon,) = credential.macaroons
    assert dataclasses.replace(macaroon, location=MACAROON.location) == MACAROON
    assert credential.preimage == PREIMAGE


# --- WWW-Authenticate -----------------------------------------------------------------------

INVOICE = make_invoice(PAYMENT_HASH, 10_000)
CHALLENGES = [l402.format_challenge(MACAROON_B64, INVOICE, scheme) for scheme in ("L402", "LSAT")]
OTHER_SCHEMES = st.sampled_from(
    ['Basic realm="x"', "Bearer abc==", 'Digest realm="a", nonce="b\\"c"', "Negotiate", ""]
)
CHALLENGE_VALUES = st.one_of(
    mutations(CHALLENGES[0]),
    mutations(", ".join(CHALLENGES)),
    st.tuples(OTHER_SCHEMES, mutations(CHALLENGES[1])).map(", ".join),
    st.text(max_size=80),
)


@examples(300)
@given(value=CHALLENGE_VALUES)
def test_challenge_parse_raises_only_l402_errors_and_round_trips(value: str) -> None:
    try:
        challenge = l402.parse_challenge(value)
    except l402.L402Error:
        return
    # What parsed is clean enough to be sent again and read back the same.
    again = l402.parse_challenge(
        l402.format_challenge(challenge.macaroon_b64, challenge.invoice, challenge.scheme)
    )
    assert (again.macaroon_b64, again.invoice) == (challenge.macaroon_b64, challenge.invoice)


@examples(100)
@given(values=st.lists(CHALLENGE_VALUES, min_size=1, max_size=2), body=st.binary(max_size=40))
def test_client_offer_raises_only_client_errors(values: list[str], body: bytes) -> None:
    try:
        offer = read_offer(values, body, network="regtest", now=NOW)
    except ClientError:
        return
    assert offer.payment_hash == PAYMENT_HASH
    assert offer.amount_msat == 10_000


# --- binary V2 macaroons ----------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# A field's length: right, off by a little, padded to a non-canonical varint, or huge.
LENGTH_MODES = ("exact", "exact", "exact", "short", "long", "non-canonical", "huge")
FIELD = st.tuples(
    st.one_of(st.sampled_from((0, 1, 2, 2, 2, 4, 6)), st.integers(0, 255)),
    st.sampled_from(LENGTH_MODES),
    st.one_of(st.binary(max_size=70), st.just(bytes(32)), st.just(MACAROON.identifier)),
)


def _field(ftype: int, mode: str, payload: bytes) -> bytes:
    if ftype == 0:
        return b"\x00"
    length = {"short": max(len(payload) - 1, 0), "long": len(payload) + 1, "huge": 1 << 20}.get(
        mode, len(payload)
    )
    encoded = _varint(length)
    if mode == "non-canonical":
        encoded = bytes(b | 0x80 for b in encoded) + b"\x00"
    return bytes((ftype,)) + encoded + payload


MACAROON_BYTES = st.one_of(
    st.lists(FIELD, max_size=14).map(
        lambda fields: b"\x02" + b"".join(_field(*field) for field in fields)
    ),
    mutations(MACAROON.serialize().decode("latin-1")).map(
        lambda text: text.encode("latin-1", "replace")
    ),
)


def _spellings(data: bytes) -> list[str]:
    std = base64.b64encode(data).decode()
    url = base64.urlsafe_b64encode(data).decode()
    return [std, std.rstrip("="), url, url.rstrip("=")]


@examples(400)
@given(data=MACAROON_BYTES, spelling=st.integers(0, 3))
def test_macaroon_decoder_raises_only_l402_errors(data: bytes, spelling: int) -> None:
    try:
        macaroon = l402.Macaroon.deserialize(data)
    except l402.L402Error:
        with pytest.raises(l402.L402Error):
            l402.decode_b64(_spellings(data)[spelling])
        return
    assert l402.decode_b64(_spellings(data)[spelling]) == macaroon
    assert l402.Macaroon.deserialize(macaroon.serialize()) == macaroon
    with contextlib.suppress(l402.L402Error):
        l402.Identifier.decode(macaroon.identifier)


@examples(200)
@given(text=st.one_of(mutations(MACAROON_B64), st.text("AZaz09+/=-_ \n", max_size=120)))
def test_base64_decoder_raises_only_l402_errors(text: str) -> None:
    try:
        macaroon = l402.decode_b64(text)
    except l402.L402Error:
        return
    assert l402.decode_b64(l402.encode_b64(macaroon)) == macaroon


# --- caveats ----------------------------------------------------------------------------------

CAVEAT_KEYS = st.sampled_from(
    [
        "services",
        "svc_capabilities",
        "svc_valid_until",
        "svc_paths",
        "svc_methods",
        "other_valid_until",
        "_paths",
        "svc_unknown",
        "svc",
    ]
)
VALUE_PIECES = st.sampled_from(
    [
        *("svc:0", "svc:1", "svc:x", "other:0", "read", "write", "", "59", "61", "-1", "١٢"),
        *("9" * 30, "/svc/*", "/svc/a", "/*", "GET", "get", "HEAD", " ", ":", "=", "*"),
    ]
)
CAVEAT_VALUES = st.one_of(
    st.lists(VALUE_PIECES, max_size=3).map(",".join),
    st.text(max_size=16),
)
CAVEATS = st.one_of(
    st.builds(lambda key, value: f"{key}={value}".encode(), CAVEAT_KEYS, CAVEAT_VALUES),
    st.binary(max_size=20),
)
REQUESTS = st.builds(
    l402.RequestScope,
    service=st.sampled_from(["svc", "other"]),
    method=st.sampled_from(["GET", "get", "HEAD", "POST"]),
    path=st.sampled_from(["/svc/a", "/svc/a/b", "/svc/../x", "/", "/svc/."]),
    required_capabilities=st.frozensets(st.sampled_from(["read", "write", "admin"]), max_size=2),
)
BASE_CAVEATS = ["services=svc:0", "svc_capabilities=read,write", "svc_valid_until=1800000060"]


def _verify(macaroon: l402.Macaroon, request: l402.RequestScope) -> l402.VerifiedToken | None:
    credential = l402.Credential("L402", (macaroon,), PREIMAGE)
    try:
        return l402.verify_token(credential, ROOT_KEY, request, NOW)
    except l402.L402Error:
        return None


@examples(300)
@given(
    caveats=st.lists(CAVEATS, max_size=5).map(lambda extra: [*BASE_CAVEATS, *extra]),
    appended=CAVEATS,
    request=REQUESTS,
)
def test_caveats_raise_only_l402_errors_and_an_appended_caveat_never_widens(
    caveats: list[bytes], appended: bytes, request: l402.RequestScope
) -> None:
    macaroon = l402.mint(ROOT_KEY, MACAROON.identifier, caveats)
    narrowed = _verify(macaroon.add_caveat(appended), request)
    if narrowed is None:
        return
    granted = _verify(macaroon, request)
    assert granted is not None, "a caveat turned a refused token into an accepted one"
    assert narrowed.tier <= granted.tier
    if granted.capabilities is not None:
        assert narrowed.capabilities is not None
        assert narrowed.capabilities <= granted.capabilities
    if granted.valid_until is not None:
        assert narrowed.valid_until is not None
        assert narrowed.valid_until <= granted.valid_until


# --- configuration ----------------------------------------------------------------------------

SECTIONS = {
    "server": ServerConfig,
    "lnd": LndConfig,
    "store": StoreConfig,
    "l402": L402Config,
    "rate_limit": RateLimitConfig,
}
KEYS = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in SECTIONS.items()}
ROUTE_KEYS = [f.name for f in dataclasses.fields(RouteConfig)]
ENV_NAMES = [f"GATEWAY_{name.upper()}_{key.upper()}" for name in KEYS for key in KEYS[name]]


def _toml_string(text: str) -> str:
    """A TOML basic string holding any text, controls and NUL included."""
    escaped = "".join(
        f"\\u{ord(c):04x}" if c in '"\\' or not c.isprintable() else c
        for c in text
        if not 0xD800 <= ord(c) <= 0xDFFF
    )
    return f'"{escaped}"'


SCALARS = st.one_of(
    st.text(max_size=12).map(_toml_string),
    st.sampled_from(['"~\\u0000"', '"/\\u0000"', '"~root\\u0000/x"', '"gateway.examples:nope"']),
    st.sampled_from(['"gateway.examples:quote_price"', '"/api/*"', '"GET"', '"0"', '"1e3"']),
    st.integers(-(2**63), 2**63 - 1).map(str),
    st.sampled_from(["inf", "-inf", "nan", "0.5", "1e308", "true", "false", "1979-05-27"]),
)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3).map(lambda v: f"[{', '.join(v)}]"))


def _table(header: str, keys: list[str]) -> st.SearchStrategy[str]:
    body = st.dictionaries(st.sampled_from([*keys, "unknown"]), VALUES, max_size=5)
    return body.map(lambda items: "\n".join([header, *(f"{k} = {v}" for k, v in items.items())]))


DOCUMENT = st.tuples(
    *(_table(f"[{name}]", keys) for name, keys in KEYS.items()),
    st.lists(_table("[[routes]]", ROUTE_KEYS), max_size=3).map("\n".join),
).map("\n".join)
ENVIRON = st.dictionaries(
    st.sampled_from(ENV_NAMES),
    st.one_of(st.text(max_size=12), st.sampled_from(["~\x00", " 1 ", "1_0", "١٢", "0x10"])),
    max_size=4,
)


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as directory:
        yield Path(directory)


@examples(150)
@given(document=DOCUMENT, environ=ENVIRON)
def test_config_and_routes_raise_only_config_error(
    scratch: Path, document: str, environ: dict[str, str]
) -> None:
    path = scratch / "gateway.toml"
    path.write_text(document, encoding="utf-8")
    with contextlib.suppress(ConfigError):
        build_pricing(load_config(path, environ))


def test_nul_in_a_path_value_is_a_config_error(scratch: Path) -> None:
    path = scratch / "nul.toml"
    path.write_text('[lnd]\ntls_cert = "~\\u0000/tls.cert"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"\[lnd\]\.tls_cert"):
        load_config(path, {})
    with pytest.raises(ConfigError, match=r"\[lnd\]\.macaroon"):
        load_config(None, {"GATEWAY_LND_MACAROON": "~\x00"})
