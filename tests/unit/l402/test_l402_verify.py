"""Offline verification of L402 tokens: the whole path from Authorization values to a grant."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from gateway.l402 import (
    Caveat,
    Identifier,
    L402Error,
    Macaroon,
    MalformedToken,
    RequestScope,
    TokenRejected,
    VerifiedToken,
    capabilities_caveat,
    check_caveats,
    encode_b64,
    format_authorization,
    identifier_of,
    methods_caveat,
    mint,
    mint_token,
    parse_authorization,
    paths_caveat,
    services_caveat,
    valid_until_caveat,
    verify_token,
)

ROOT = bytes(range(32))
PREIMAGE = bytes([7]) * 32
PAYMENT_HASH = hashlib.sha256(PREIMAGE).digest()
TOKEN_ID = bytes([9]) * 32
NOW = 1_700_000_000.0
UNTIL = 1_700_003_600
REQUEST = RequestScope("api", "GET", "/v1/items", frozenset({"read"}))
CAVEATS = [
    services_caveat("api", 1),
    capabilities_caveat("api", ["read", "write"]),
    valid_until_caveat("api", UNTIL),
    paths_caveat("api", ["/v1/*"]),
    methods_caveat("api", ["GET", "POST"]),
]


def token(caveats: Sequence[str] = CAVEATS, root: bytes = ROOT) -> Macaroon:
    return mint_token(root, PAYMENT_HASH, TOKEN_ID, caveats)


def header(mac: Macaroon, preimage: bytes = PREIMAGE, scheme: str = "L402") -> str:
    return format_authorization([mac], preimage, scheme)


def verify(
    values: Sequence[str],
    root: bytes = ROOT,
    request: RequestScope = REQUEST,
    now: float = NOW,
) -> VerifiedToken:
    credential = parse_authorization(values)
    assert credential is not None
    assert identifier_of(credential).key_id == Identifier(0, PAYMENT_HASH, TOKEN_ID).key_id
    return verify_token(credential, root, request, now)


def reason(values: Sequence[str], **kwargs: object) -> str:
    with pytest.raises(L402Error) as info:
        verify(values, **kwargs)  # type: ignore[arg-type]
    return info.value.reason


def test_valid_token_passes() -> None:
    assert verify([header(token())]) == VerifiedToken(
        token_id=TOKEN_ID,
        payment_hash=PAYMENT_HASH,
        service="api",
        tier=1,
        capabilities=frozenset({"read", "write"}),
        valid_until=UNTIL,
    )


def test_minted_identifier_is_version_0() -> None:
    assert token().identifier == b"\x00\x00" + PAYMENT_HASH + TOKEN_ID


def test_wrong_preimage() -> None:
    with pytest.raises(TokenRejected) as info:
        verify([header(token(), preimage=bytes(32))])
    assert info.value.reason == "preimage does not match the payment hash"


def test_tampered_caveat() -> None:
    good = token()
    widened = tuple(c.replace(b"api_valid_until=", b"api_valid_until=9") for c in good.caveats)
    tampered = Macaroon(good.identifier, widened, good.signature)
    assert reason([header(tampered)]) == "invalid macaroon signature"


def test_caveat_appended_without_re_signing() -> None:
    good = token()
    forged = Macaroon(good.identifier, (*good.caveats, b"services=admin:9"), good.signature)
    assert reason([header(forged)]) == "invalid macaroon signature"


def test_caveat_removed() -> None:
    good = token()
    forged = Macaroon(good.identifier, good.caveats[:-1], good.signature)
    assert reason([header(forged)]) == "invalid macaroon signature"


def test_re_signed_with_another_root_key() -> None:
    assert reason([header(token(root=bytes(32)))]) == "invalid macaroon signature"


def test_identifier_swapped() -> None:
    good = token()
    for identifier, expected in [
        (Identifier(0, PAYMENT_HASH, bytes(32)), "invalid macaroon signature"),
        (Identifier(0, hashlib.sha256(b"x").digest(), TOKEN_ID), "preimage does not match"),
    ]:
        swapped = Macaroon(identifier.encode(), good.caveats, good.signature)
        credential = parse_authorization([header(swapped)])
        assert credential is not None
        assert identifier_of(credential) == identifier
        with pytest.raises(TokenRejected, match=expected):
            verify_token(credential, ROOT, REQUEST, NOW)


def test_expired() -> None:
    assert reason([header(token())], now=float(UNTIL)) == "token expired"
    assert reason([header(token())], now=UNTIL + 0.5) == "token expired"
    assert verify([header(token())], now=UNTIL - 0.5).valid_until == UNTIL


def test_attenuated_by_the_holder_still_verifies_and_narrows() -> None:
    narrowed = token().add_caveat(valid_until_caveat("api", UNTIL - 60))
    assert verify([header(narrowed)]).valid_until == UNTIL - 60
    assert reason([header(narrowed)], now=float(UNTIL - 60)) == "token expired"


def test_wrong_service() -> None:
    request = RequestScope("other", "GET", "/v1/items", frozenset())
    assert reason([header(token())], request=request) == "token is not valid for this service"


def test_missing_capability() -> None:
    request = RequestScope("api", "GET", "/v1/items", frozenset({"admin"}))
    assert reason([header(token())], request=request) == "token lacks a required capability"


def test_path_outside_the_caveat() -> None:
    request = RequestScope("api", "GET", "/v2/items", frozenset())
    assert reason([header(token())], request=request) == "path not allowed by token"


def test_method_outside_the_caveat() -> None:
    request = RequestScope("api", "DELETE", "/v1/items", frozenset())
    assert reason([header(token())], request=request) == "method not allowed by token"


def test_unknown_caveat() -> None:
    assert reason([header(token([*CAVEATS, "api_admin=true"]))]) == "unknown caveat"
    attenuated = token().add_caveat("ip_address=1.2.3.4")
    assert reason([header(attenuated)]) == "unknown caveat"


def test_unparseable_caveat_fails_closed() -> None:
    attenuated = token().add_caveat(b"no equals sign")
    with pytest.raises(TokenRejected) as info:
        verify([header(attenuated)])
    assert info.value.reason == "malformed caveat"
    binary = token().add_caveat(b"\xff=\xfe")
    assert reason([header(binary)]) == "malformed caveat"


def test_second_services_caveat_that_widens() -> None:
    widened = token([services_caveat("other", 0)]).add_caveat("services=other:0,api:0")
    assert reason([header(widened)]) == "token is not valid for this service"


def test_no_services_caveat() -> None:
    assert reason([header(token([valid_until_caveat("api", UNTIL)]))]) == (
        "token has no services caveat"
    )


def test_two_macaroons() -> None:
    discharge = mint(b"k", b"discharge", [])
    value = format_authorization([token(), discharge], PREIMAGE)
    credential = parse_authorization([value])
    assert credential is not None
    with pytest.raises(TokenRejected) as info:
        verify_token(credential, ROOT, REQUEST, NOW)
    assert info.value.reason == "discharge macaroons are not supported"
    with pytest.raises(TokenRejected, match="discharge macaroons are not supported"):
        identifier_of(credential)


def test_upper_case_hex_preimage_accepted() -> None:
    value = f"L402 {encode_b64(token())}:{PREIMAGE.hex().upper()}"
    assert verify([value]).token_id == TOKEN_ID


def test_lsat_scheme_accepted() -> None:
    assert verify([header(token(), scheme="LSAT")]).service == "api"
    assert verify([f"lsat {encode_b64(token())}:{PREIMAGE.hex()}"]).service == "api"


def test_several_authorization_values_rejected() -> None:
    other = mint_token(ROOT, PAYMENT_HASH, bytes(32), CAVEATS)
    with pytest.raises(MalformedToken) as info:
        parse_authorization([header(token()), header(other)])
    assert info.value.reason == "several L402 credentials in one request"


def test_bad_identifier_is_malformed() -> None:
    mac = mint(ROOT, b"\x00\x01" + bytes(64), CAVEATS)
    credential = parse_authorization([header(mac)])
    assert credential is not None
    with pytest.raises(MalformedToken, match="unknown identifier version"):
        verify_token(credential, ROOT, REQUEST, NOW)


def test_reasons_never_carry_secrets() -> None:
    attempts: list[tuple[Sequence[str], RequestScope, float]] = [
        ([header(token(), preimage=bytes(32))], REQUEST, NOW),
        ([header(token(root=bytes(32)))], REQUEST, NOW),
        ([header(token())], REQUEST, float(UNTIL)),
    ]
    for values, request, now in attempts:
        text = reason(values, request=request, now=now)
        for secret in (ROOT, PREIMAGE, token().signature):
            assert secret.hex() not in text.lower()


def test_mint_token_validates_its_inputs() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        mint_token(ROOT, PAYMENT_HASH[:31], TOKEN_ID, CAVEATS)
    with pytest.raises(ValueError, match="32 bytes"):
        mint_token(ROOT, PAYMENT_HASH, b"", CAVEATS)
    with pytest.raises(ValueError, match="root_key"):
        mint_token(b"", PAYMENT_HASH, TOKEN_ID, CAVEATS)
    with pytest.raises(ValueError, match="invalid caveat"):
        mint_token(ROOT, PAYMENT_HASH, TOKEN_ID, ["no-equals"])


def test_location_is_carried_but_not_signed() -> None:
    mac = mint_token(ROOT, PAYMENT_HASH, TOKEN_ID, CAVEATS, location="https://api.example")
    assert mac.location == "https://api.example"
    assert verify([header(mac)]).service == "api"


# --- the preimage caveat Aperture's client library appends ----------------------------------


def test_preimage_caveat_as_aperture_clients_append_it() -> None:
    # What Aperture's Go client (and lnget) send back: the macaroon with "preimage=<hex>"
    # appended and signed on along the HMAC chain, plus the preimage in the header.
    paid = token().add_caveat(f"preimage={PREIMAGE.hex()}")
    assert verify([header(paid)]) == verify([header(token())])


@pytest.mark.parametrize(
    ("caveat", "expected"),
    [
        (f"preimage={PREIMAGE.hex()}", None),
        (f"preimage={PREIMAGE.hex().upper()}", None),
        (f"preimage={PREIMAGE.hex()[:32]}{PREIMAGE.hex()[32:].upper()}", None),
        (f"preimage={bytes(32).hex()}", "preimage caveat does not match"),
        (f"preimage={PREIMAGE.hex()[:-1]}", "malformed preimage caveat"),
        (f"preimage={PREIMAGE.hex()}00", "malformed preimage caveat"),
        (f"preimage= {PREIMAGE.hex()}", "malformed preimage caveat"),
        (f"preimage={PREIMAGE.hex()[:-1]}g", "malformed preimage caveat"),
        ("preimage=", "malformed preimage caveat"),
        (f"Preimage={PREIMAGE.hex()}", "unknown caveat"),
        (f"api_preimage={PREIMAGE.hex()}", "unknown caveat"),
    ],
)
def test_preimage_caveat_table(caveat: str, expected: str | None) -> None:
    values = [header(token().add_caveat(caveat))]
    if expected is None:
        assert verify(values).token_id == TOKEN_ID
    else:
        assert reason(values) == expected


@given(st.binary(min_size=32, max_size=32))
@example(PREIMAGE)
def test_preimage_caveat_must_be_the_credentials_own(other: bytes) -> None:
    values = [header(token().add_caveat(f"preimage={other.hex()}"))]
    if other == PREIMAGE:
        assert verify(values).token_id == TOKEN_ID
    else:
        assert reason(values) == "preimage caveat does not match"


def test_preimage_caveat_still_needs_every_other_caveat() -> None:
    paid = token().add_caveat(f"preimage={PREIMAGE.hex()}")
    assert reason([header(paid)], now=float(UNTIL)) == "token expired"
    doubled = paid.add_caveat(f"preimage={bytes(32).hex()}")
    assert reason([header(doubled)]) == "preimage caveat does not match"
    # Appended without signing on: the HMAC chain catches it first.
    good = token()
    forged = Macaroon(
        good.identifier, (*good.caveats, b"preimage=" + PREIMAGE.hex().encode()), good.signature
    )
    assert reason([header(forged)]) == "invalid macaroon signature"


def test_preimage_caveat_without_a_preimage_to_compare_fails_closed() -> None:
    caveats = [Caveat.parse(c) for c in [*CAVEATS, f"preimage={PREIMAGE.hex()}"]]
    with pytest.raises(TokenRejected, match="unknown caveat"):
        check_caveats(caveats, REQUEST, NOW)
    assert check_caveats(caveats, REQUEST, NOW, preimage=PREIMAGE).service == "api"
