"""Caveat text, builders, and the rules of check_caveats (every caveat narrows, fail closed)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.l402 import (
    Caveat,
    GrantedScope,
    L402Error,
    MalformedToken,
    RequestScope,
    TokenRejected,
    capabilities_caveat,
    check_caveats,
    methods_caveat,
    paths_caveat,
    services_caveat,
    valid_until_caveat,
)

NOW = 1_700_000_000.0
REQ = RequestScope("api", "GET", "/v1/items", frozenset())

printable = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp", "Cf", "Co", "Cn")))
keys = printable.filter(lambda k: k != "" and "=" not in k and k.isprintable())
values = printable.filter(str.isprintable)


def check(*texts: str, request: RequestScope = REQ, now: float = NOW) -> GrantedScope:
    return check_caveats([Caveat.parse(t) for t in texts], request, now)


def rejected(*texts: str, request: RequestScope = REQ, now: float = NOW) -> str:
    with pytest.raises(TokenRejected) as info:
        check(*texts, request=request, now=now)
    return info.value.reason


# --- text form -----------------------------------------------------------------------------


@given(keys, values)
def test_format_parse_round_trip(key: str, value: str) -> None:
    caveat = Caveat(key, value)
    text = caveat.format()
    assert text == f"{key}={value}"
    assert Caveat.parse(text) == caveat
    assert Caveat.parse(text.encode("utf-8")) == caveat


def test_value_may_contain_equals() -> None:
    assert Caveat.parse("a=b=c") == Caveat("a", "b=c")
    assert Caveat.parse("a=") == Caveat("a", "")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("services", "caveat has no '='"),
        ("", "caveat has no '='"),
        ("=x", "caveat has an empty key"),
        ("a=b\nc=d", "caveat contains non-printable characters"),
        ("a\x00=b", "caveat contains non-printable characters"),
        (b"a=\xff", "caveat is not UTF-8"),
    ],
)
def test_parse_rejects(text: str | bytes, reason: str) -> None:
    with pytest.raises(MalformedToken) as info:
        Caveat.parse(text)
    assert info.value.reason == reason


@given(st.one_of(st.text(), st.binary()))
def test_parse_fuzz_raises_only_l402_errors(text: str | bytes) -> None:
    try:
        caveat = Caveat.parse(text)
    except L402Error:
        return
    raw = text.decode("utf-8") if isinstance(text, bytes) else text
    assert caveat.format() == raw


def test_constructor_validates() -> None:
    for key, value in [("", "v"), ("a=b", "v"), ("k", "\n")]:
        with pytest.raises(ValueError, match="caveat"):
            Caveat(key, value)


# --- builders ------------------------------------------------------------------------------


def test_builders_write_aperture_and_gateway_formats() -> None:
    assert services_caveat("api", 2) == "services=api:2"
    assert services_caveat("api") == "services=api:0"
    assert capabilities_caveat("api", ["read", "write"]) == "api_capabilities=read,write"
    assert capabilities_caveat("api", []) == "api_capabilities="
    assert valid_until_caveat("api", 1_700_000_123) == "api_valid_until=1700000123"
    assert paths_caveat("api", ["/v1/*", "/v2/x"]) == "api_paths=/v1/*,/v2/x"
    assert methods_caveat("api", ["get", "POST"]) == "api_methods=GET,POST"


@pytest.mark.parametrize(
    "build",
    [
        lambda: services_caveat("a,b", 0),
        lambda: services_caveat("a:b", 0),
        lambda: services_caveat("", 0),
        lambda: services_caveat("a b", 0),
        lambda: services_caveat("api", -1),
        lambda: capabilities_caveat("api", ["a,b"]),
        lambda: capabilities_caveat("api", [""]),
        lambda: valid_until_caveat("api", -1),
        lambda: paths_caveat("api", []),
        lambda: paths_caveat("api", ["/a b"]),
        lambda: methods_caveat("api", []),
        lambda: methods_caveat("api", ["GE T"]),
    ],
)
def test_builders_reject_what_would_not_parse_back(build: object) -> None:
    assert callable(build)
    with pytest.raises(ValueError, match=r"service|tier|item|negative|needs"):
        build()


# --- services ------------------------------------------------------------------------------


def test_services_caveat_grants_the_listed_service() -> None:
    assert check("services=api:0") == GrantedScope("api", 0, None, None)
    assert check("services=other:1,api:3").tier == 3


def test_services_caveat_is_required() -> None:
    assert rejected() == "token has no services caveat"
    assert rejected("api_valid_until=1800000000") == "token has no services caveat"


def test_service_not_listed() -> None:
    assert rejected("services=other:0") == "token is not valid for this service"


def test_second_services_caveat_cannot_widen() -> None:
    assert rejected("services=other:0", "services=other:0,api:0") == (
        "token is not valid for this service"
    )
    assert rejected("services=api:0,other:0", "services=other:0") == (
        "token is not valid for this service"
    )
    assert check("services=api:0,other:0", "services=api:0").service == "api"


def test_lowest_tier_wins() -> None:
    assert check("services=api:5", "services=api:2").tier == 2
    assert check("services=api:2", "services=api:5").tier == 2


@pytest.mark.parametrize(
    "value", ["", "api", "api:", "api:x", "api:-1", ":0", "api:0,", "api:1:2", "a pi:0"]
)
def test_malformed_services_caveat_rejects(value: str) -> None:
    assert rejected(f"services={value}") in ("malformed services caveat", "malformed caveat value")


# --- capabilities --------------------------------------------------------------------------


def test_no_capabilities_caveat_means_unrestricted() -> None:
    request = RequestScope("api", "GET", "/", frozenset({"anything"}))
    assert check("services=api:0", request=request).capabilities is None


def test_capabilities_intersect_and_must_cover_the_request() -> None:
    scope = check("services=api:0", "api_capabilities=a,b,c", "api_capabilities=b,c,d")
    assert scope.capabilities == frozenset({"b", "c"})
    request = RequestScope("api", "GET", "/", frozenset({"a"}))
    narrowed = ("services=api:0", "api_capabilities=a,b", "api_capabilities=b")
    assert rejected(*narrowed, request=request) == "token lacks a required capability"
    assert rejected("services=api:0", "api_capabilities=", request=request) == (
        "token lacks a required capability"
    )
    assert check("services=api:0", "api_capabilities=", request=REQ).capabilities == frozenset()


# --- expiry --------------------------------------------------------------------------------


def test_valid_until_is_the_minimum_and_exclusive() -> None:
    scope = check("services=api:0", "api_valid_until=1700000500", "api_valid_until=1700000100")
    assert scope.valid_until == 1_700_000_100
    assert rejected("services=api:0", "api_valid_until=1700000000") == "token expired"
    assert rejected("services=api:0", "api_valid_until=1800000000", "api_valid_until=1") == (
        "token expired"
    )
    assert check("services=api:0", "api_valid_until=1700000001").valid_until == 1_700_000_001


# --- methods and paths ---------------------------------------------------------------------


def test_methods() -> None:
    assert check("services=api:0", "api_methods=GET,POST").service == "api"
    assert check("services=api:0", "api_methods=get", request=REQ).service == "api"
    assert rejected("services=api:0", "api_methods=POST") == "method not allowed by token"
    assert rejected("services=api:0", "api_methods=GET,POST", "api_methods=POST") == (
        "method not allowed by token"
    )
    head = RequestScope("api", "HEAD", "/v1/items", frozenset())
    assert rejected("services=api:0", "api_methods=GET", request=head) == (
        "method not allowed by token"
    )


@pytest.mark.parametrize(
    ("globs", "path", "allowed"),
    [
        ("/v1/*", "/v1/items", True),
        ("/v1/*", "/v1/items/42/deep", True),  # fnmatch: '*' crosses '/'
        ("/v1/items", "/v1/items", True),
        ("/v1/items", "/v1/items/", False),
        ("/v2/*,/v1/?tems", "/v1/items", True),
        ("/V1/*", "/v1/items", False),  # case-sensitive
        ("/v1/*", "/v1/../admin", False),  # dot segments never match
        ("/v1/*", "/v1/./items", False),
        ("/v1/*", "/v2/items", False),
    ],
)
def test_paths(globs: str, path: str, allowed: bool) -> None:
    request = RequestScope("api", "GET", path, frozenset())
    caveats = ("services=api:0", f"api_paths={globs}")
    if allowed:
        assert check(*caveats, request=request).service == "api"
    else:
        assert rejected(*caveats, request=request) == "path not allowed by token"


def test_every_paths_caveat_must_match() -> None:
    assert rejected("services=api:0", "api_paths=/v1/*", "api_paths=/v1/other") == (
        "path not allowed by token"
    )


# --- other services, unknown caveats, malformed values ---------------------------------------


def test_other_services_caveats_are_ignored() -> None:
    scope = check(
        "services=api:0,other:0",
        "other_valid_until=1",
        "other_capabilities=x",
        "other_paths=/nothing",
        "other_methods=DELETE",
        "other_valid_until=not-a-number",
    )
    assert scope == GrantedScope("api", 0, None, None)


def test_service_names_with_underscores() -> None:
    request = RequestScope("my_api", "GET", "/", frozenset())
    assert rejected("services=my_api:0", "my_api_valid_until=5", request=request) == (
        "token expired"
    )
    # "api_valid_until" belongs to service "api", not to "my_api".
    assert check("services=my_api:0", "api_valid_until=5", request=request).valid_until is None


@pytest.mark.parametrize(
    "caveat",
    [
        "preimage=00",
        "api_admin=true",
        "api_valid_until_extra=1",
        "_valid_until=1",
        "Services=api:0",
        "services =api:0",
        "api_valid_until =1800000000",
    ],
)
def test_unknown_caveat_rejects(caveat: str) -> None:
    assert rejected("services=api:0", caveat) == "unknown caveat"


@pytest.mark.parametrize(
    "caveat",
    [
        "api_valid_until=soon",
        "api_valid_until=-5",
        "api_valid_until=+5",
        "api_valid_until=",
        "api_valid_until=1e9",
        "api_valid_until=١٢٣",
        "api_valid_until=" + "9" * 40,
        "api_capabilities=a,,b",
        "api_capabilities=a, b",
        "api_capabilities=,",
        "api_paths=",
        "api_paths=/a,",
        "api_methods=",
        "api_methods=GE T",
        "api_methods=GET;POST",
    ],
)
def test_malformed_value_of_known_key_rejects(caveat: str) -> None:
    assert rejected("services=api:0", caveat) == "malformed caveat value"


def test_unknown_caveat_rejects_even_after_a_valid_grant() -> None:
    assert rejected("services=api:0", "api_valid_until=1800000000", "x=y") == "unknown caveat"
