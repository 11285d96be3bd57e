"""The payment link page and the QR images, rendered without a server."""

from __future__ import annotations

import html
import json
import re

import pytest

from gateway.lnurl import LINK_GONE
from gateway.ports import InvoiceRecord, InvoiceState, LinkState, Msat, PaymentHash, PaymentLink
from gateway.web.links import (
    LinkPage,
    invoice_qr_svg,
    qr_image,
    render_link_page,
    render_missing_link,
)
from gateway.web.paywall import render_paywall
from tests.fakes import NOW, make_invoice
from tests.unit.test_paywall import CHALLENGE

LNURL = (
    "LNURL1DP68GURN8GHJ7MRWW4EXCTNXD9SHG6NPVCHXXMMD9AKXUATJDSKHQCTE8AEK2UMND9HKU0TZV4KXZCTNWSHKJMN9"
)
HASH = PaymentHash(bytes(range(32)))
BOLT11 = make_invoice(HASH, 21_000, description="Coffee")


def link(**changes: object) -> PaymentLink:
    values: dict[str, object] = {
        "link_id": "abcDEF123_-x",
        "memo": "Coffee <for two>",
        "min_msat": Msat(21_000),
        "max_msat": Msat(21_000),
        "single_use": True,
        "created_at": NOW,
        "expires_at": None,
    }
    values.update(changes)
    return PaymentLink(**values)  # type: ignore[arg-type]


def invoice() -> InvoiceRecord:
    return InvoiceRecord(
        payment_hash=HASH,
        payment_request=BOLT11,
        amount_msat=Msat(21_000),
        token_id=b"",
        service="link:abcDEF123_-x",
        method="",
        path="",
        state=InvoiceState.OPEN,
        created_at=NOW,
        expires_at=NOW + 600,
        add_index=1,
    )


def page(
    the_link: PaymentLink, state: LinkState = LinkState.OPEN, shown: InvoiceRecord | None = None
) -> str:
    response = render_link_page(
        LinkPage(
            link=the_link,
            state=state,
            lnurl=LNURL,
            invoice=shown,
            status_url="/.well-known/l402/links/abcDEF123_-x/status",
            invoice_url="/.well-known/l402/links/abcDEF123_-x/invoice",
        ),
        nonce="n0nce",
    )
    assert response.status == 200
    headers = dict(response.headers)
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["Cache-Control"] == "no-store"
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp
    assert "script-src 'nonce-n0nce'" in csp
    return response.body.decode()


def element(text: str, element_id: str) -> str:
    match = re.search(rf'<(\w+)[^>]*\bid="{element_id}"[^>]*>(.*?)</\1>', text, re.S)
    assert match is not None, element_id
    return html.unescape(match.group(2))


def attribute(text: str, name: str) -> str:
    match = re.search(rf'<main id="link"[^>]*\b{name}="([^"]*)"', text)
    assert match is not None, name
    return html.unescape(match.group(1))


def test_a_single_use_fixed_link_shows_its_invoice() -> None:
    text = page(link(), shown=invoice())
    assert attribute(text, "data-state") == "open"
    assert element(text, "memo") == "Coffee <for two>"  # escaped in the page
    assert "<for two>" not in text
    assert element(text, "amount") == "21 sat"
    assert element(text, "invoice") == BOLT11
    assert attribute(text, "data-hash") == HASH.hex()
    assert f'href="lightning:{BOLT11}"' in text
    assert "<svg" in element(text, "qr")
    assert element(text, "status") == "Waiting for payment"
    assert re.search(r'<form id="chooser"[^>]*\bhidden', text)  # no amount to choose
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")  # nothing external


def test_a_reusable_link_shows_its_lnurl_and_the_payments_received() -> None:
    text = page(link(single_use=False, paid_count=3, paid_msat=Msat(63_000)))
    assert element(text, "invoice") == LNURL
    assert attribute(text, "data-hash") == ""
    assert element(text, "status") == "Received 3 payments"
    assert attribute(text, "data-single-use") == "0"


def test_a_payer_chosen_link_offers_an_amount_field_within_its_bounds() -> None:
    text = page(link(min_msat=Msat(1_000), max_msat=Msat(1_000_500)))
    assert element(text, "amount") == "1 \u2013 1,000.5 sat"
    assert element(text, "invoice") == LNURL
    form = re.search(r'<form id="chooser"[^>]*>', text)
    assert form is not None
    assert "hidden" not in form.group(0)
    assert 'min="1"' in text
    assert 'max="1000.5"' in text


@pytest.mark.parametrize(
    ("state", "status"),
    [
        (LinkState.PAID, "Paid"),
        (LinkState.EXPIRED, "This payment link has expired."),
        (LinkState.CANCELED, "This payment link was canceled."),
    ],
)
def test_a_finished_link_says_so_without_a_qr_code(state: LinkState, status: str) -> None:
    text = page(link(paid_count=1), state)
    assert attribute(text, "data-state") == state.value.lower()
    assert element(text, "status") == status
    if state is not LinkState.PAID:
        assert status.lower() == f"{LINK_GONE[state]}."  # as the LNURL endpoints say it
    assert element(text, "qr") == ""
    assert re.search(r'<div id="pay"[^>]*\bhidden', text)


def test_a_missing_link_is_a_page_with_its_status() -> None:
    response = render_missing_link(404, "unknown payment link")
    assert response.status == 404
    assert "unknown payment link" in response.body.decode()


@pytest.mark.parametrize(("kind", "magic"), [("svg", b"<?xml"), ("png", b"\x89PNG")])
def test_qr_images_hold_the_upper_case_lightning_uri(kind: str, magic: bytes) -> None:
    small = qr_image(LNURL.lower(), kind, 1)
    large = qr_image(LNURL.lower(), kind, 20)
    assert small.body.startswith(magic)
    assert len(large.body) > len(small.body)
    assert dict(small.headers)["Content-Type"] == f"image/{'svg+xml' if kind == 'svg' else 'png'}"


def test_the_script_knows_what_each_finished_state_says() -> None:
    done = json.loads(attribute(page(link(), shown=invoice()), "data-done"))
    assert done == {
        "paid": "Paid",
        "expired": "This payment link has expired.",
        "canceled": "This payment link was canceled.",
    }


def test_the_link_page_shares_the_paywalls_look_and_copy_button() -> None:
    text = page(link(), shown=invoice())
    paywall = render_paywall(CHALLENGE, nonce="n").body.decode()
    for shared in ("--accent: #f7931a", "const copyText = async (button, text, element)"):
        assert text.count(shared) == paywall.count(shared) == 1
    assert "copyText(copyButton" in text
    assert ".facts" not in text  # the paywall's own rules stay on the paywall
    assert text.count("<script") == text.count("<style") == 1  # one nonce'd element each


def test_qr_codes_are_made_once() -> None:
    first = qr_image(LNURL, "png", 7)
    assert qr_image(LNURL.lower(), "png", 7).body is first.body  # the same LNURL
    assert qr_image(LNURL, "svg", 7).body is not first.body
    hits = invoice_qr_svg.cache_info().hits
    page(link(), shown=invoice())
    page(link(), shown=invoice())
    assert invoice_qr_svg.cache_info().hits > hits
