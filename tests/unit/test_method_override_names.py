"""Which methods a request names for a backend to route it as (``method_overrides``), also in
a POST's body (``body_method_overrides``), and where a body is read for one."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from gateway.ports import Msat
from gateway.pricing import OVERRIDE_METHODS, BodyMethod, Pricing, Rule
from gateway.web.method_override import (
    body_may_name_method,
    body_method_overrides,
    method_overrides,
)


@pytest.mark.parametrize(
    "query",
    [
        "_method=GET",
        "a=1&_METHOD=get",
        "%5Fmethod=GET",
        "_m%65thod=GET",
        "_%6D%65thod=GET",
        # PHP's variable names (Laravel, Symfony): '.', ' ' and '[' become '_', leading
        # spaces go.
        ".method=GET",
        "%2Emethod=GET",
        "[method=GET",
        " _method=GET",
        "+_method=GET",
        # PHP cuts a name at a NUL.
        "_method%00=GET",
        "_method%00x=GET",
        # An array of it (qs, Express): method-override takes the first value.
        "_method[]=GET",
        "_method[0]=GET",
        # qs: an empty parent key takes its first bracket.
        "[_method]=GET",
        "%5B_method%5D=GET",
        "[_method][]=GET",
        # Parameters separated by ';' (Perl's URI, older Rack and Go).
        "a=1;_method=GET",
    ],
)
def test_a_query_parameter_any_backend_reads_as_method_names_one(query: str) -> None:
    assert method_overrides((), query) == ("GET",)


@pytest.mark.parametrize(
    "query", ["method=GET", "x_method=GET", "_methods=GET", "x[_method]=GET", "_method=", ""]
)
def test_other_parameters_name_none(query: str) -> None:
    assert method_overrides((), query) == ()


@pytest.mark.parametrize(
    ("spelled", "named"),
    [
        ("l\u0131nk", "LINK"),  # dotless i: Ruby's and JavaScript's upcase make it I
        ("LOC\u212a", "LOCK"),  # the Kelvin sign folds to K
        ("option\u017f", "OPTIONS"),  # long s
        ("\uff47\uff45\uff54", "GET"),  # fullwidth letters
    ],
)
def test_a_value_that_upper_cases_to_a_method_names_it(spelled: str, named: str) -> None:
    assert method_overrides((spelled,), "") == (named,)
    assert method_overrides((), "_method=" + quote(spelled)) == (named,)
    form = b"_method=" + spelled.encode()  # unescaped UTF-8, as Rack and Express read it
    assert body_method_overrides("", form) == (named,)


def test_headers_and_query_together_name_each_method_once() -> None:
    assert method_overrides(("delete, GET",), "_method=get&.method=PUT") == ("DELETE", "GET", "PUT")


@pytest.mark.parametrize(
    ("content_type", "body", "named"),
    [
        ("", b"_method=PUT", ("PUT",)),
        ("application/x-www-form-urlencoded; charset=utf-8", b"a=1&+.method=get", ("GET",)),
        ("application/x-www-form-urlencoded", b"a=1&b=2", ()),
        ("application/json", b'{"_method": "delete"}', ("DELETE",)),
        ("application/vnd.api+json", b'{"_method": ["GET", 1]}', ("GET",)),  # qs-like arrays
        ("application/json", b'{"_method": 7}', ()),
        ("application/json", b'[{"_method": "GET"}]', ()),
        ("application/json", b'{"note": "no override"}', ()),
        # JSON that does not parse here, or a multipart form, that mentions "method" at all
        # (also percent-encoded): any method.
        ("application/json", b'{"_method": "GET",}', OVERRIDE_METHODS),
        # too deep for the parser here (Node's parses it), invalid UTF-8 (Node replaces it),
        # each with the key spelled with an escape
        ("application/json", b'{"_m\\u0065thod": "GET", "x": ' + b"[" * 3000, OVERRIDE_METHODS),
        ("application/json", b'{"_m\\u0065thod": "GET", "x": "\xff"}', OVERRIDE_METHODS),
        ("application/json", b'{"_m\\u0065thod": "GET"}', ("GET",)),
        # a repeated key: parsers differ on which one they keep
        ("application/json", b'{"_method": "PUT", "_method": "GET"}', ("PUT", "GET")),
        # qs's empty parent key, and ';' separating parameters (Perl's URI, older Rack)
        ("application/x-www-form-urlencoded", b"[_method]=GET", ("GET",)),
        ("application/x-www-form-urlencoded", b"a=1&%5B_method%5Dx=GET", ("GET",)),
        ("application/x-www-form-urlencoded", b"a=1;_method=GET", ("GET",)),
        # a multipart field name split (RFC 2231), charset-encoded, in an encoded word, or
        # cut by a backslash escape
        (
            "multipart/form-data; boundary=b",
            b'--b\r\nContent-Disposition: form-data; name*0="_me"; name*1="thod"\r\n\r\nGET',
            OVERRIDE_METHODS,
        ),
        (
            "multipart/form-data; boundary=b",
            b"--b\r\nContent-Disposition: form-data;\r\n NAME*=utf-16''%00_%00m\r\n\r\nGET",
            OVERRIDE_METHODS,
        ),
        (
            "multipart/form-data; boundary=b",
            b'--b\r\ncontent-disposition: form-data; name="=?utf-8?b?X21ldGhvZA==?="\r\n\r\nGET',
            OVERRIDE_METHODS,
        ),
        (
            "multipart/form-data; boundary=b",
            b'--b\r\nContent-Disposition: form-data; name="_me\\thod"\r\n\r\nGET',
            OVERRIDE_METHODS,
        ),
        (
            "multipart/form-data; boundary=b",
            b'--b\r\nContent-Disposition: form-data; name="f"; filename="a.txt"\r\n\r\nx',
            (),
        ),
        ("multipart/form-data; boundary=b", b'name="_m%65thod"\r\n\r\nGET', OVERRIDE_METHODS),
        ("multipart/form-data; boundary=b", b'name="file"\r\n\r\ndata', ()),
        ("text/plain", b"_method=GET", ()),  # no framework reads parameters from it
        # Laravel reads any type holding "/json" as JSON; several values, all their readings.
        ("text/plain; x=/json", b'{"_method": "GET"}', ("GET",)),
        ("text/plain,application/x-www-form-urlencoded", b"_method=PUT", ("PUT",)),
        (";charset=utf-8", b"_method=GET", ("GET",)),  # no media type: Rack reads a form
    ],
)
def test_the_methods_a_post_body_names(
    content_type: str, body: bytes, named: tuple[str, ...]
) -> None:
    assert body_method_overrides(content_type, body) == named


@pytest.mark.parametrize(
    ("content_type", "read"),
    [
        ("", True),
        ("Application/X-WWW-Form-Urlencoded; charset=utf-8", True),
        ("application/json", True),
        ("application/problem+json", True),
        ("multipart/form-data; boundary=b", True),
        ("application/octet-stream", False),
        ("text/plain", False),
        ("text/plain; profile=a/json", True),
        ("mult\u0130part/form-data; boundary=b", True),
        ("text/pla\u0130n", True),
    ],
)
def test_which_bodies_may_name_a_method(content_type: str, read: bool) -> None:
    assert body_may_name_method(content_type) is read


def test_a_post_body_is_read_only_where_the_method_it_names_changes_the_price() -> None:
    priced_get = Rule("/paid/*", methods=frozenset({"GET"}), price_msat=Msat(1_000))
    priced_any = Rule("/all/*", price_msat=Msat(1_000))
    pricing = Pricing([priced_get, priced_any])
    assert pricing.body_may_reprice("POST", "/paid/x")
    assert pricing.body_may_reprice("post", "/paid/x")
    assert not pricing.body_may_reprice("PUT", "/paid/x")  # frameworks override POSTs only
    assert not pricing.body_may_reprice("POST", "/all/x")  # every method costs the same
    assert not pricing.body_may_reprice("POST", "/free/x")
    # A method only a rule names (WebDAV's): Symfony and Express take any name.
    dav = Pricing([Rule("/dav/*", methods=frozenset({"PROPFIND"}), price_msat=Msat(1))])
    assert dav.body_may_reprice("POST", "/dav/x")
    assert "PROPFIND" in dav.override_methods
    ignored = Pricing([priced_get], body_method=BodyMethod.IGNORED)
    assert not ignored.body_may_reprice("POST", "/paid/x")
