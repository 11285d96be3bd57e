"""Pricing.resolve: paths a backend could read differently from the rules are refused, and
of the readings a backend may take, the strictest prices the request."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.ports import Msat
from gateway.pricing import (
    MAX_SCRIPT_SEGMENTS,
    Extension,
    PathCase,
    Pricing,
    Refused,
    Rule,
    ScriptPrefix,
    TrailingSlash,
    Unmatched,
    path_refusal,
)

PREMIUM = Rule("/api/premium/*", methods=frozenset({"GET"}), price_msat=Msat(10), service="p")
EXACT = Rule("/docs/index", price_msat=Msat(5), service="docs")
FREE = Rule("/api/free/*")
RULES = (FREE, PREMIUM, EXACT)


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/api\\premium\\x", "backslash"),
        ("/api%2fpremium", "'%'"),
        ("/api/premium?/x", "encoded '?' or '#'"),  # %3F decoded
        ("/api/premium#/x", "encoded '?' or '#'"),
        ("/api;x=1/premium/x", "';'"),
        ("/api/premium/\x1bx", "control"),
        ("/api/premium/x\x85", "control"),
        ("/api/\uff50remium/x", "NFKC"),
        ("/api/\u212aey", "NFKC"),  # the Kelvin sign folds to K
        ("/api/./premium/x", "'.', '..'"),
        ("/api/../premium/x", "'.', '..'"),
        ("//api/premium/x", "'.', '..'"),
        ("/api/premium./x", "end in '.'"),
        ("/api/premium /x", "end in '.' or a space"),
        ("api/premium/x", "start with '/'"),  # a target uvicorn (h11) and hypercorn pass on
        ("", "start with '/'"),
    ],
)
def test_paths_a_backend_could_resolve_elsewhere_are_refused(path: str, reason: str) -> None:
    refusal = path_refusal(path)
    assert refusal is not None
    assert reason in refusal
    assert Pricing(RULES).resolve("GET", path) == Refused(refusal)


@pytest.mark.parametrize(
    "path", ["/", "/api/premium/x", "/api/premium/x/", "/caf\u00e9", "/a-b_c~d/e.json", "/a:b@c"]
)
def test_ordinary_paths_pass(path: str) -> None:
    assert path_refusal(path) is None


def test_the_other_letter_case_prices_the_request_by_default() -> None:
    pricing = Pricing(RULES)
    assert pricing.resolve("GET", "/API/Premium/x") is PREMIUM
    assert pricing.resolve("GET", "/Docs/Index") is EXACT
    assert Pricing(RULES, case=PathCase.INSENSITIVE).resolve("GET", "/API/premium/x") is PREMIUM
    assert Pricing(RULES, case=PathCase.SENSITIVE).resolve("GET", "/API/premium/x") is None


def test_a_trailing_slash_either_way_prices_the_request_by_default() -> None:
    pricing = Pricing(RULES)
    assert pricing.resolve("GET", "/docs/index/") is EXACT
    assert pricing.resolve("GET", "/api/premium") is PREMIUM
    significant = Pricing(RULES, trailing_slash=TrailingSlash.SIGNIFICANT)
    assert significant.resolve("GET", "/docs/index/") is None
    assert significant.resolve("GET", "/docs/index") is EXACT


def test_a_path_with_an_extension_is_also_priced_without_it_by_default() -> None:
    pricing = Pricing(RULES)
    assert pricing.resolve("GET", "/docs/index.json") is EXACT  # Rails' (.:format)
    assert pricing.resolve("GET", "/docs/index.v1.json") is EXACT  # Spring's suffix
    assert pricing.resolve("GET", "/docs/index.json/") is EXACT
    assert pricing.resolve("GET", "/api/premium.json") is PREMIUM  # and /api/premium/
    assert pricing.resolve("GET", "/docs/other.json") is None
    significant = Pricing(RULES, extension=Extension.SIGNIFICANT)
    assert significant.resolve("GET", "/docs/index.json") is None
    assert significant.resolve("GET", "/docs/index") is EXACT


def test_what_follows_a_scripts_name_is_also_priced_by_default() -> None:
    pricing = Pricing(RULES)
    assert pricing.resolve("GET", "/index.php/docs/index") is EXACT  # a front controller
    assert pricing.resolve("GET", "/app/INDEX.PHP/api/premium/x") is PREMIUM
    assert pricing.resolve("GET", "/cgi-bin/run.cgi/api/premium/x") is PREMIUM
    assert pricing.resolve("GET", "/a.php/b.aspx/docs/index.json") is EXACT
    assert pricing.resolve("GET", "/index.php") is None  # no path follows it
    assert pricing.resolve("GET", "/files/v1.2/docs/index") is None  # not a script
    significant = Pricing(RULES, script_prefix=ScriptPrefix.SIGNIFICANT)
    assert significant.resolve("GET", "/index.php/docs/index") is None
    assert significant.resolve("GET", "/docs/index") is EXACT


def test_a_path_naming_many_scripts_is_refused_as_each_is_a_reading() -> None:
    pricing = Pricing(RULES)
    most = "/a.php" * MAX_SCRIPT_SEGMENTS
    assert pricing.resolve("GET", most + "/docs/index") is EXACT
    assert pricing.resolve("GET", most + "/b.cgi/docs/index") == Refused(
        f"path names more than {MAX_SCRIPT_SEGMENTS} scripts (.php, .cgi, ...)"
    )
    # A backend that routes the whole path reads no script names: no readings, no limit.
    significant = Pricing(RULES, script_prefix=ScriptPrefix.SIGNIFICANT)
    assert significant.resolve("GET", "/a.php" * 100 + "/docs/index") is None


def test_free_readings_stay_free() -> None:
    pricing = Pricing(RULES)
    assert pricing.resolve("GET", "/api/free/x") is None
    assert pricing.resolve("GET", "/elsewhere") is None
    assert pricing.resolve("POST", "/api/premium/x") is None  # a GET-only price


def test_a_method_override_prices_the_request_by_the_method_it_names() -> None:
    pricing = Pricing(RULES)
    assert pricing.resolve("POST", "/api/premium/x", ("GET",)) is PREMIUM
    assert pricing.resolve("POST", "/api/premium/x", ("get",)) is PREMIUM
    assert pricing.resolve("POST", "/api/free/x", ("GET",)) is None


def test_methods_no_rule_names_stand_for_each_other_however_many_a_client_sends() -> None:
    deletes = Rule("/api/items/*", methods=frozenset({"DELETE"}), price_msat=Msat(3), service="d")
    pricing = Pricing((*RULES, deletes))
    unnamed = [f"M{n}" for n in range(10_000)]
    # The named method after thousands of others still prices the request.
    assert pricing.resolve("POST", "/api/items/x", [*unnamed, "delete"]) is deletes
    assert pricing.resolve("POST", "/api/premium/x", [*unnamed, "GET"]) is PREMIUM
    assert pricing.resolve("POST", "/api/premium/x", unnamed) is None
    # Each named method once, and one method for all the others (POST, the request's own).
    assert pricing._reading_methods("POST", [*unnamed, "delete", "DELETE", "head"]) == [
        "POST",
        "delete",
        "head",
    ]


def test_two_different_priced_readings_are_refused() -> None:
    page = Rule("/a", price_msat=Msat(1), service="page")
    folder = Rule("/a/", price_msat=Msat(2), service="folder")
    assert isinstance(Pricing((page, folder)).resolve("GET", "/a"), Refused)
    writes = Rule("/doc", methods=frozenset({"POST"}), price_msat=Msat(1), service="w")
    reads = Rule("/doc", methods=frozenset({"GET"}), price_msat=Msat(9), service="r")
    assert Pricing((writes, reads)).resolve("POST", "/doc") is writes
    assert isinstance(Pricing((writes, reads)).resolve("POST", "/doc", ("GET",)), Refused)


# A model of lenient backends: the paths they may route a (decoded) request path to.
def lenient_readings(path: str) -> set[str]:
    readings = set()
    for candidate in (path, path.replace("\\", "/")):
        candidate = "/".join(segment.split(";")[0] for segment in candidate.split("/"))
        for variant in (candidate, candidate.lower()):
            readings |= {variant, variant.rstrip("/") or "/", variant.rstrip("/") + "/"}
    return readings


@given(
    st.lists(
        st.sampled_from(["api", "API", "premium", "Premium", "free", "docs", "index", "x", ";p=1"]),
        max_size=4,
    ),
    st.sampled_from(["/", "\\"]),
    st.booleans(),
)
def test_no_lenient_reading_of_an_unpriced_path_is_priced(
    words: list[str], separator: str, trailing: bool
) -> None:
    path = "/" + separator.join(words) + ("/" if trailing and words else "")
    resolved = Pricing(RULES).resolve("GET", path)
    if resolved is None:
        for reading in lenient_readings(path):
            rule = Pricing(RULES, case=PathCase.SENSITIVE).resolve("GET", reading)
            assert rule is None or isinstance(rule, Refused), (path, reading)


def test_under_a_root_path_the_route_and_the_mounted_path_are_priced_too() -> None:
    pricing = Pricing(RULES)
    # The rules name the application's routes; the server puts the root path in front.
    assert pricing.mounted_path("GET", "/v1/api/premium/x", "/v1") == "/api/premium/x"
    # The rules name the mounted paths; FastAPI(root_path=) serves the route alone as well.
    mounted = Pricing([Rule("/v1/api/*", price_msat=Msat(1))])
    assert mounted.mounted_path("GET", "/api/x", "/v1/") == "/v1/api/x"
    # Free readings leave the path as received; no root path, or the root itself, likewise.
    assert pricing.mounted_path("GET", "/v1/api/free/x", "/v1") == "/v1/api/free/x"
    assert pricing.mounted_path("GET", "/api/premium/x", "") == "/api/premium/x"
    assert pricing.mounted_path("GET", "/api", "/api") == "/api"
    # A matched free reading wins over an unmatched one when unmatched paths are denied.
    deny = Pricing(RULES, unmatched=Unmatched.DENY)
    assert deny.mounted_path("GET", "/v1/api/free/x", "/v1") == "/api/free/x"


def test_under_a_root_path_litestar_and_quarts_route_path_is_priced_too() -> None:
    """They cut the path after the root path's first occurrence anywhere (hypercorn passes
    the path as sent): ``/v1api/...`` and ``/x/v1/api/...`` route as ``/api/...``, and the
    root itself as ``/``."""
    pricing = Pricing(RULES)
    assert pricing.mounted_path("GET", "/v1api/premium/x", "/v1") == "/api/premium/x"
    assert pricing.mounted_path("GET", "/x/v1/api/premium/x", "/v1") == "/api/premium/x"
    root = Pricing([Rule("/", price_msat=Msat(1))])
    assert root.mounted_path("GET", "/v1", "/v1") == "/"


def test_under_a_root_path_readings_priced_apart_are_refused() -> None:
    pricing = Pricing([Rule("/v1/*", price_msat=Msat(1)), *RULES])
    refused = pricing.mounted_path("GET", "/v1/api/premium/x", "/v1")
    assert isinstance(refused, Refused)
    assert refused.status == 400
    assert "several priced routes" in refused.reason
    assert pricing.mounted_path("GET", "/v1/../x", "/v1") == Refused(
        "path must not contain '.', '..' or empty segments"
    )
