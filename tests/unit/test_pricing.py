"""Route rules: order, methods, globs, free rules and validation."""

from __future__ import annotations

import pytest

from gateway.ports import Msat
from gateway.pricing import MAX_PRICE_MSAT, PriceRequest, Pricing, Rule


async def one_sat(_request: PriceRequest) -> int:
    return 1000


def test_first_matching_rule_wins() -> None:
    specific = Rule("/api/premium/*", price_msat=Msat(5000), service="premium")
    general = Rule("/api/*", price_msat=Msat(1000))
    pricing = Pricing([specific, general])
    assert pricing.match("GET", "/api/premium/fortune") is specific
    assert pricing.match("GET", "/api/other") is general
    # The same rules the other way round: the general one shadows the specific one.
    assert Pricing([general, specific]).match("GET", "/api/premium/fortune") is general


def test_unmatched_path_is_not_priced() -> None:
    pricing = Pricing([Rule("/api/*", price_msat=Msat(1000))])
    assert pricing.match("GET", "/health") is None
    assert pricing.match("GET", "/") is None
    assert Pricing([]).match("GET", "/anything") is None


def test_catch_all_prices_everything() -> None:
    rule = Rule("/*", price_msat=Msat(1))
    pricing = Pricing([rule])
    for path in ("/", "/a", "/a/b/c", "/a.b?c"):
        assert pricing.match("POST", path) is rule


def test_methods_restrict_a_rule_and_fall_through_to_the_next() -> None:
    reads = Rule("/api/*", methods=frozenset({"GET"}), price_msat=Msat(1000))
    writes = Rule("/api/*", methods=frozenset({"POST", "PUT"}), price_msat=Msat(9000))
    pricing = Pricing([reads, writes])
    assert pricing.match("GET", "/api/x") is reads
    assert pricing.match("POST", "/api/x") is writes
    assert pricing.match("PUT", "/api/x") is writes
    assert pricing.match("DELETE", "/api/x") is None


def test_methods_compare_case_insensitively() -> None:
    lower = Rule("/a", methods=frozenset({"get", "Post"}), price_msat=Msat(1))
    assert lower.methods == frozenset({"GET", "POST"})
    assert lower.matches("get", "/a")
    assert lower.matches("GET", "/a")
    assert lower.matches("post", "/a")
    assert not lower.matches("put", "/a")


def test_get_rule_also_covers_head() -> None:
    # aiohttp (and most frameworks) answer HEAD with the GET handler: a GET-only price
    # that let HEAD through would run the paid handler for free.
    rule = Rule("/a", methods=frozenset({"GET"}), price_msat=Msat(1))
    assert rule.matches("HEAD", "/a")
    assert not Rule("/a", methods=frozenset({"POST"}), price_msat=Msat(1)).matches("HEAD", "/a")


def test_empty_methods_match_every_method() -> None:
    rule = Rule("/a", price_msat=Msat(1))
    for method in ("GET", "HEAD", "POST", "DELETE", "OPTIONS", "PATCH", "BREW"):
        assert rule.matches(method, "/a")


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("/health", "/health", True),
        ("/health", "/health/", False),
        ("/health", "/healthz", False),
        ("/health", "/x/health", False),
        ("/api/*", "/api/", True),
        ("/api/*", "/api/a/b/c", True),  # * crosses /
        ("/api/*", "/api", False),
        ("/api/*", "/apix", False),
        ("/api/v?/items", "/api/v1/items", True),
        ("/api/v?/items", "/api/v10/items", False),
        ("/api/[ab]", "/api/a", True),
        ("/api/[ab]", "/api/c", False),
        ("/api/[!ab]", "/api/c", True),
        ("/API/*", "/api/x", False),  # case-sensitive, like URL paths
        ("/a.b", "/a.b", True),
        ("/a.b", "/axb", False),  # a dot is literal, not a regex wildcard
        ("/a+b", "/a+b", True),
        ("/a+b", "/aab", False),
        ("/a", "/a\n", False),  # anchored at the very end
    ],
)
def test_globs(pattern: str, path: str, expected: bool) -> None:
    assert Rule(pattern, price_msat=Msat(1)).matches("GET", path) is expected


def test_free_rules() -> None:
    free = Rule("/health")
    assert free.free
    assert free.price_msat is None
    assert not Rule("/a", price_msat=Msat(1)).free
    assert not Rule("/a", price_function=one_sat).free


def test_free_rule_shadows_a_later_priced_one() -> None:
    free = Rule("/api/public/*")
    pricing = Pricing([free, Rule("/api/*", price_msat=Msat(1000))])
    rule = pricing.match("GET", "/api/public/x")
    assert rule is free
    assert rule.free


def test_defaults() -> None:
    rule = Rule("/a", price_msat=Msat(1))
    assert rule.lifetime == 3600
    assert rule.service == "api"
    assert rule.tier == 0
    assert rule.capabilities == frozenset()
    assert rule.methods == frozenset()


def test_rules_compare_by_value_and_hash() -> None:
    assert Rule("/a", price_msat=Msat(1)) == Rule("/a", price_msat=Msat(1))
    assert hash(Rule("/a", price_msat=Msat(1))) == hash(Rule("/a", price_msat=Msat(1)))
    assert Rule("/a", price_msat=Msat(1)) != Rule("/a", price_msat=Msat(2))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pattern": "/a", "price_msat": Msat(0)}, "price_msat must be 1 to"),
        ({"pattern": "/a", "price_msat": Msat(-1)}, "price_msat must be 1 to"),
        ({"pattern": "/a", "price_msat": Msat(MAX_PRICE_MSAT + 1)}, "price_msat must be 1 to"),
        (
            {"pattern": "/a", "price_msat": Msat(1), "price_function": one_sat},
            "not both",
        ),
        ({"pattern": "/a", "price_msat": Msat(1), "lifetime": 0}, "lifetime must be positive"),
        ({"pattern": "/a", "price_msat": Msat(1), "lifetime": -5}, "lifetime must be positive"),
        ({"pattern": "/a", "price_msat": Msat(1), "service": ""}, "service must be"),
        ({"pattern": "/a", "price_msat": Msat(1), "service": "a b"}, "service must be"),
        ({"pattern": "/a", "price_msat": Msat(1), "service": "a:b"}, "service must be"),
        ({"pattern": "/a", "price_msat": Msat(1), "service": "a,b"}, "service must be"),
        ({"pattern": "/a", "price_msat": Msat(1), "service": "a\n"}, "service must be"),
        ({"pattern": "a", "price_msat": Msat(1)}, "must start with '/'"),
        ({"pattern": "", "price_msat": Msat(1)}, "must start with '/'"),
        ({"pattern": "*", "price_msat": Msat(1)}, "must start with '/'"),
        ({"pattern": "/a", "price_msat": Msat(1), "tier": -1}, "tier must not be negative"),
        (
            {"pattern": "/a", "price_msat": Msat(1), "capabilities": frozenset({"a,b"})},
            "capability",
        ),
        (
            {"pattern": "/a", "price_msat": Msat(1), "capabilities": frozenset({"a b"})},
            "capability",
        ),
        (
            {"pattern": "/a", "price_msat": Msat(1), "capabilities": frozenset({""})},
            "capability",
        ),
        ({"pattern": "/a", "price_msat": Msat(1), "methods": frozenset({"G T"})}, "method"),
        ({"pattern": "/a", "price_msat": Msat(1), "methods": frozenset({""})}, "method"),
    ],
)
def test_validation_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        Rule(**kwargs)  # type: ignore[arg-type]
    assert repr(kwargs["pattern"]) in str(info.value)


def test_valid_names_are_accepted() -> None:
    rule = Rule(
        "/a",
        price_msat=Msat(1),
        service="my-svc_1.v2",
        tier=3,
        capabilities=frozenset({"read", "write:all"}),
        methods=frozenset({"GET", "M-SEARCH"}),
    )
    assert rule.service == "my-svc_1.v2"


def test_pricing_keeps_an_immutable_copy_of_the_rules() -> None:
    rules = [Rule("/a", price_msat=Msat(1))]
    pricing = Pricing(rules)
    rules.append(Rule("/b", price_msat=Msat(1)))
    assert pricing.rules == (Rule("/a", price_msat=Msat(1)),)
    assert pricing.match("GET", "/b") is None
