"""Where a browser keeps a paid token: the cookie's Path covers every route of the token's
service (a token bought on one page opens the others), and its name is the grant's (buying
another grant does not replace it)."""

from __future__ import annotations

import pytest

from gateway.ports import Msat
from gateway.pricing import Pricing, Rule
from gateway.service.redeem import service_scope
from gateway.web.cookies import cookie_name, l402_cookie_values, without_l402_cookie

ONE = Msat(1_000)


def _pricing(*patterns: str, service: str = "s") -> Pricing:
    return Pricing(
        [
            Rule("/health"),  # free: opens nothing, widens nothing
            *(Rule(pattern, price_msat=ONE, service=service) for pattern in patterns),
            Rule("/other/*", price_msat=ONE, service="other"),
        ]
    )


@pytest.mark.parametrize(
    ("patterns", "bought", "scope"),
    [
        (("/api/premium/*",), "/api/premium/article", "/api/premium"),
        (("/api/premium/*", "/api/premium"), "/api/premium", "/api/premium"),
        (("/api/premium*",), "/api/premium-x", "/api"),  # the glob goes on within the segment
        (("/api/echo",), "/api/echo", "/api/echo"),
        (("/api/echo", "/api/echo2"), "/api/echo", "/api"),
        (("/docs/*.pdf", "/docs/a/*"), "/docs/x.pdf", "/docs"),
        (("/a/?/b",), "/a/1/b", "/a"),
        (("/a/[xy]/b",), "/a/x/b", "/a"),
        (("/*",), "/anything", "/"),
        (("/api/premium/*",), "/API/premium/article", "/"),  # a case-folded reading
        ((), "/not/priced/now", "/not/priced/now"),  # rules changed since: where it was bought
    ],
)
def test_service_scope(patterns: tuple[str, ...], bought: str, scope: str) -> None:
    assert service_scope(_pricing(*patterns), "s", bought) == scope


def test_cookie_name_is_the_grant() -> None:
    assert cookie_name("premium") == "L402-premium"
    assert cookie_name("a-b.c_d") == "L402-a-b.c_d"
    assert cookie_name("") == "L402"
    read = cookie_name("premium", 0, frozenset({"read"}))
    assert read.startswith("L402-premium~")
    assert read == cookie_name("premium", 0, frozenset({"read"}))  # replaced by the same grant
    names = {
        cookie_name("premium"),
        read,
        cookie_name("premium", 0, frozenset()),
        cookie_name("premium", 1),
        cookie_name("premium", 0, frozenset({"read", "write"})),
    }
    assert len(names) == 5
    # Never a character a cookie name cannot hold, whatever the service is called.
    assert cookie_name("bad name;x").startswith("L402~")


def test_every_l402_cookie_is_a_credential_and_kept_from_the_backend() -> None:
    header = "a=1; L402-premium=p:00; L402=old:00; L402-premium~0a1b2c3d=r:00; L4022=no"
    assert l402_cookie_values([header]) == ("p:00", "old:00", "r:00")
    assert without_l402_cookie(header) == "a=1; L4022=no"
