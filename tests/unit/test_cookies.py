"""The L402 cookie (reading it, its Path, keeping it from price functions), and the request
headers the adapters hand the core: never a credential."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from gateway.web import aiohttp as aiohttp_adapter
from gateway.web import asgi
from gateway.web.cookies import (
    cookie_path,
    headers_for_pricing,
    l402_cookie_values,
    without_l402_cookie,
)

SECRET_HEADERS = [
    ("Accept", "application/json"),
    ("Authorization", "L402 mac:00"),
    ("proxy-authorization", "Basic c2VjcmV0"),
    ("Cookie", "a=1; L402=secret:00; b=2"),
    ("Cookie", "L402=x"),
]
# What a price function sees of them.
PRICING_HEADERS = (("Accept", "application/json"), ("Cookie", "a=1; b=2"), ("Cookie", ""))


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/api/premium/fortune", "/api/premium/fortune"),
        ("/", "/"),
        ("/a/b-c_d.e~f/@x:y!$&'()*+=", "/a/b-c_d.e~f/@x:y!$&'()*+="),
        ("/a/b;Domain=evil.example", "/a"),
        ("/a/b c", "/a"),
        ("/a/b,c/d", "/a"),
        ("/docs/caf\u00e9", "/docs"),
        ("/x%2Fy", "/"),
        ("/a\r\nSet-Cookie: x=1", "/"),
        ("relative", "/"),
        ("", "/"),
    ],
)
def test_cookie_path(path: str, expected: str) -> None:
    assert cookie_path(path) == expected


def test_l402_cookie_values() -> None:
    headers = ['a=1; L402=one:aa; b="2"', 'L402="two:bb"', "L402=; L402", "xL402=no; L4022=no"]
    assert l402_cookie_values(headers) == ("one:aa", "two:bb")
    assert l402_cookie_values([]) == ()


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("a=1; L402=mac:hex; b=2", "a=1; b=2"),
        ("L402=mac:hex", None),
        ("L402=x;L402=y", None),
        ("a=1", "a=1"),
        (" a=1 ;  ; L402=z", "a=1"),
        ("l402=lowercase-is-another-cookie", "l402=lowercase-is-another-cookie"),
    ],
)
def test_without_l402_cookie(header: str, expected: str | None) -> None:
    assert without_l402_cookie(header) == expected


def test_headers_for_pricing_leave_out_the_credentials() -> None:
    assert headers_for_pricing(SECRET_HEADERS) == PRICING_HEADERS
    assert headers_for_pricing([]) == ()


def test_the_aiohttp_adapter_hands_the_core_no_credential_in_the_headers() -> None:
    request = make_mocked_request("GET", "/dyn", headers=CIMultiDict(SECRET_HEADERS))
    info = aiohttp_adapter.request_info(request, trust_forwarded_for=False)
    assert info.headers == PRICING_HEADERS
    assert info.authorization == ("L402 mac:00",)
    assert info.cookies == ("secret:00", "x")


def test_the_asgi_adapter_hands_the_core_no_credential_in_the_headers() -> None:
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/dyn",
        "headers": [(name.lower().encode(), value.encode()) for name, value in SECRET_HEADERS],
    }
    info = asgi.request_info(scope)
    assert info.headers == tuple((name.lower(), value) for name, value in PRICING_HEADERS)
    assert info.authorization == ("L402 mac:00",)
    assert info.cookies == ("secret:00", "x")
