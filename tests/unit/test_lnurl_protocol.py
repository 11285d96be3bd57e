"""The LNURL-pay server's protocol (``gateway.lnurl``) and bech32 writing: what a wallet is
sent, what it may send back, and that our LNURLs read back as the URL they encode."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import bech32, destinations, lnurl
from gateway.client import bolt11
from gateway.lnurl import Image, LnurlError, SuccessAction
from gateway.ports import LinkState, Msat
from tests.fakes import make_invoice

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 20
JPEG = b"\xff\xd8\xff\xe0" + b"\0" * 20
# LUD-01's own example.
LUD01_URL = (
    "https://service.com/api?q=3fc3645b439ce8e7f2553a69e5267081d96dcd340693afabe04be7b0ccd178df"
)
LUD01_LNURL = (
    "LNURL1DP68GURN8GHJ7UM9WFMXJCM99E3K7MF0V9CXJ0M385EKVCENXC6R2C35XVUKXEFCV5MKVV34X5EKZD3EV56NYD"
    "3HXQURZEPEXEJXXEPNXSCRVWFNV9NXZCN9XQ6XYEFHVGCXXCMYXYMNSERXFQ5FNS"
)


def _data(words: list[int]) -> bytes:
    return bech32.to_bytes(words)[: len(words) * 5 // 8]


# bech32 writing


def test_bech32_encode_writes_the_published_vectors() -> None:
    assert bech32.encode("a", b"") == "a12uel5l"  # BIP 173's valid strings
    assert lnurl.encode_lnurl(LUD01_URL) == LUD01_LNURL


@given(
    hrp=st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1).map(
        str.lower
    ),
    data=st.binary(max_size=600),
)
def test_bech32_encode_then_decode_gives_the_bytes_back(hrp: str, data: bytes) -> None:
    text = bech32.encode(hrp, data)
    assert bech32.decode(text) == (hrp, bech32.decode(text)[1])
    assert _data(bech32.decode(text)[1]) == data
    assert _data(bech32.decode(text.upper())[1]) == data  # upper case reads the same


@pytest.mark.parametrize("hrp", ["", "LNURL", "ln url", "é"])
def test_bech32_encode_refuses_a_bad_human_readable_part(hrp: str) -> None:
    with pytest.raises(bech32.Bech32Error, match="human-readable part"):
        bech32.encode(hrp, b"x")


_LABEL = st.from_regex(r"[a-z][a-z0-9]{0,10}", fullmatch=True)
_SEGMENT = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.~-]{0,11}", fullmatch=True)  # no . or ..


@st.composite
def _urls(draw: st.DrawFn) -> str:
    host = ".".join([*draw(st.lists(_LABEL, min_size=1, max_size=3)), draw(_LABEL)])
    port = draw(st.sampled_from(["", ":8443"]))
    # a path (our URLs have one: yarl writes "" as "/")
    path = "".join("/" + segment for segment in draw(st.lists(_SEGMENT, min_size=1, max_size=4)))
    query = draw(st.sampled_from(["", "?tag=pay", "?id=abc-123&x=1"]))
    return f"https://{host}{port}{path}{query}"


@given(url=_urls())
def test_our_lnurl_decodes_to_the_url_it_encodes(url: str) -> None:
    encoded = lnurl.encode_lnurl(url)
    assert encoded.startswith("LNURL1")
    assert encoded == encoded.upper()
    for form in (encoded, encoded.lower(), f"lightning:{encoded}"):
        assert str(destinations.pay_url(form)) == url


# metadata


def test_metadata_is_compact_json_and_its_hash_is_of_the_exact_text() -> None:
    text = lnurl.metadata("Buy me a coffee ☕", "coffee@pay.example.com", Image.of(PNG))
    entries = json.loads(text)
    assert entries == [
        ["text/plain", "Buy me a coffee ☕"],
        ["text/identifier", "coffee@pay.example.com"],
        ["image/png;base64", base64.b64encode(PNG).decode()],
    ]
    assert ", " not in text  # compact separators
    assert text.startswith('[["text/plain","Buy me')
    assert "☕" in text  # as is: the UTF-8 bytes are what is hashed
    assert lnurl.description_hash(text) == hashlib.sha256(text.encode("utf-8")).digest()
    assert lnurl.metadata("Buy me a coffee ☕", "coffee@pay.example.com", Image.of(PNG)) == text


def test_metadata_has_only_the_entries_given() -> None:
    assert lnurl.metadata("Pay") == '[["text/plain","Pay"]]'
    assert json.loads(lnurl.metadata("x", image=Image.of(JPEG)))[1][0] == "image/jpeg;base64"


def test_an_image_is_png_or_jpeg_within_lud06s_limit() -> None:
    assert Image.of(JPEG).mime == "image/jpeg"
    with pytest.raises(ValueError, match="neither PNG nor JPEG"):
        Image.of(b"GIF89a")
    with pytest.raises(ValueError, match="not image/png"):
        Image("image/png", JPEG)
    with pytest.raises(ValueError, match="image/png or image/jpeg"):
        Image("image/gif", b"GIF89a")
    Image.of(PNG.ljust(lnurl.MAX_IMAGE_BYTES, b"\0"))
    with pytest.raises(ValueError, match="LNURL-pay allows 102400"):
        Image.of(PNG.ljust(lnurl.MAX_IMAGE_BYTES + 1, b"\0"))


# payRequest and callback


def test_pay_request_names_comments_only_when_taken() -> None:
    body = lnurl.pay_request("https://x.test/cb", Msat(1000), Msat(5000), "[]", 0)
    assert body == {
        "tag": "payRequest",
        "callback": "https://x.test/cb",
        "minSendable": 1000,
        "maxSendable": 5000,
        "metadata": "[]",
    }
    assert (
        lnurl.pay_request("https://x.test/cb", Msat(1), Msat(1), "[]", 140)["commentAllowed"] == 140
    )


def test_a_callback_reads_amount_and_comment() -> None:
    read = lnurl.read_callback
    assert read({"amount": "21000"}, Msat(1000), Msat(50_000), 0) == (21000, "")
    assert read({"amount": "1000", "comment": "hi\nthere"}, Msat(1000), Msat(1000), 8) == (
        1000,
        "hi\nthere",
    )
    assert read({"amount": "50000", "comment": ""}, Msat(1000), Msat(50_000), 0) == (50000, "")
    assert read({"amount": "2000", "nonce": "x"}, Msat(1000), Msat(50_000), 0)[0] == 2000


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ({}, "no amount"),
        ({"amount": ""}, "no amount"),
        ({"amount": "-5"}, "whole number of millisatoshis"),
        ({"amount": "21.5"}, "whole number of millisatoshis"),
        ({"amount": "1e6"}, "whole number of millisatoshis"),
        ({"amount": "²"}, "whole number of millisatoshis"),
        ({"amount": " 2000"}, "whole number of millisatoshis"),
        ({"amount": "999"}, "999 msat is below the minimum, 1000 msat"),
        ({"amount": "50001"}, "50001 msat is above the maximum, 50000 msat"),
        ({"amount": "9" * 5000}, "above the maximum, 50000 msat"),
        ({"amount": "2000", "comment": "x" * 11}, "11 characters; at most 10 are allowed"),
        ({"amount": "2000", "comment": "a\0b"}, "control characters"),
    ],
)
def test_a_bad_callback_is_refused_with_a_clear_reason(query: dict[str, str], reason: str) -> None:
    with pytest.raises(LnurlError, match=reason) as refused:
        lnurl.read_callback(query, Msat(1000), Msat(50_000), 10)
    assert refused.value.status == 400
    assert refused.value.reason == str(refused.value)


@pytest.mark.parametrize(
    ("comment", "kept"),
    [
        ("\U0001f468\u200d\U0001f469\u200d\U0001f467", None),  # a family: ZWJs join it
        ("\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645", None),  # Persian, a ZWNJ
        ("caf\u00e9 \u2014 \u00bfs\u00ed?", None),
        ("two\r\nlines", "two\nlines"),
        ("a\tb", "a b"),
    ],
)
def test_a_comment_is_ordinary_text(comment: str, kept: str | None) -> None:
    query = {"amount": "2000", "comment": comment}
    assert lnurl.read_callback(query, Msat(1), Msat(5000), 50) == (2000, kept or comment)
    assert lnurl.clean_text(comment) == (kept or comment)


@pytest.mark.parametrize(
    "comment",
    [
        "\x1b[31mred",
        "a\rb",
        "bell\x07",
        "del\x7f",
        "nel\x85",
        "csi\x9b",
        "\u202egnp.exe",
        "\u202a",
        "\u202d",
        "\u2066x\u2069",
        "\u2068",
        "a\ud800",
    ],
)
def test_a_comment_with_controls_or_bidi_overrides_is_refused(comment: str) -> None:
    with pytest.raises(LnurlError, match="control characters") as refused:
        lnurl.read_callback({"amount": "2000", "comment": comment}, Msat(1), Msat(5000), 50)
    assert refused.value.status == 400
    with pytest.raises(ValueError, match="control characters"):
        lnurl.clean_text(comment)


def test_the_length_limit_counts_the_cleaned_comment() -> None:
    query = {"amount": "2000", "comment": "ab\r\ncd"}  # 6 characters sent, 5 kept
    assert lnurl.read_callback(query, Msat(1), Msat(5000), 5) == (2000, "ab\ncd")


def test_the_urls_names_and_ids_of_tip_jars_and_links() -> None:
    origin = "https://pay.example.com"
    assert lnurl.jar_url(origin, "coffee") == f"{origin}/.well-known/lnurlp/coffee"
    page = f"{origin}/.well-known/l402/links/abcdefghijklmnop"
    assert lnurl.link_page_url(origin, "abcdefghijklmnop") == page
    assert lnurl.link_lnurl(origin, "abcdefghijklmnop") == lnurl.encode_lnurl(f"{page}/lnurl")
    for name in ("coffee", "a", "x.y_z+tag-1", "9" * 64):
        assert lnurl.JAR_NAME.fullmatch(name)
    for name in ("", "Coffee", "caf\u00e9", "a/b", "a@b", "x" * 65):
        assert not lnurl.JAR_NAME.fullmatch(name)
    assert lnurl.LINK_ID.fullmatch("abcdefghijklmn27")
    for link_id in ("-abcdefghijklmno", "abcdefghijklmnoP", "abcdefghijklmn01", "abc", "a" * 17):
        assert not lnurl.LINK_ID.fullmatch(link_id)
    assert set(lnurl.LINK_GONE) == {LinkState.PAID, LinkState.EXPIRED, LinkState.CANCELED}
    assert lnurl.LINK_GONE[LinkState.CANCELED] == "this payment link was canceled"


def test_a_lightning_address_name_is_a_tip_jar_name() -> None:
    url = destinations.pay_url("Coffee+Tag@pay.example.com")
    assert str(url) == lnurl.jar_url("https://pay.example.com", "coffee+tag")
    with pytest.raises(destinations.DestinationError, match="name is 1 to 64"):
        destinations.pay_url("caf\u00e9@pay.example.com")


def test_a_comment_where_none_is_taken_is_dropped() -> None:
    # Alby's lightning-tools sends the payer's comment whatever commentAllowed says.
    read = lnurl.read_callback({"amount": "2000", "comment": "hi"}, Msat(1), Msat(5000), 0)
    assert read == (Msat(2000), "")


def test_leading_zeros_change_no_amount() -> None:
    zeros = "0" * 40 + "2000"
    assert lnurl.read_callback({"amount": zeros}, Msat(1), Msat(5000), 0) == (Msat(2000), "")
    with pytest.raises(LnurlError, match="the amount 5001 msat is above the maximum"):
        lnurl.read_callback({"amount": "0" * 40 + "5001"}, Msat(1), Msat(5000), 0)


def test_answers_and_errors() -> None:
    assert lnurl.error_body("nope") == {"status": "ERROR", "reason": "nope"}
    assert LnurlError("gone", 410).status == 410
    assert lnurl.callback_body("lnbcrt1...", None) == {"pr": "lnbcrt1...", "routes": []}
    thanks = SuccessAction(message="Thank you!")
    assert lnurl.callback_body("lnbcrt1...", thanks)["successAction"] == {
        "tag": "message",
        "message": "Thank you!",
    }
    link = SuccessAction(url="https://pay.example.com/thanks", description="Your receipt")
    assert lnurl.success_action_body(link) == {
        "tag": "url",
        "description": "Your receipt",
        "url": "https://pay.example.com/thanks",
    }
    assert link.host == "pay.example.com"
    assert lnurl.success_action_body(None) is None


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({}, "a message or a URL"),
        ({"message": "a", "url": "https://x.test/"}, "a message or a URL"),
        ({"message": "x" * 145}, "145 characters; at most 144"),
        ({"url": "https://x.test/", "description": "x" * 145}, "description is 145"),
        ({"message": "a", "description": "b"}, "goes with a URL"),
        ({"url": "ftp://x.test/"}, "not an http"),
        ({"url": "https:///nohost"}, "not an http"),
    ],
)
def test_a_bad_success_action_is_refused(fields: dict[str, str], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        SuccessAction(**fields)
    assert SuccessAction(message="x" * 144).message


# invoices


def test_the_description_hash_of_an_invoice_is_read_from_its_h_tag() -> None:
    hashed = lnurl.description_hash(lnurl.metadata("Tip"))
    with_hash = make_invoice(bytes(32), 21_000, description_hash=hashed)
    assert lnurl.invoice_description_hash(with_hash) == hashed
    assert bolt11.decode(with_hash).description_hash == hashed
    plain = make_invoice(bytes(32), 21_000, description="a memo")
    assert lnurl.invoice_description_hash(plain) == b""
    with pytest.raises(bech32.Bech32Error):
        lnurl.invoice_description_hash("lnbcrt1nope")
