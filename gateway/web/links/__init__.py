"""A payment link's page and the QR images of tip jars and links (framework-neutral).

**The page** (``render_link_page``) shows the link's memo, its amount (or the bounds a payer
chooses within), a QR code with its text and a copy button, and a status line. The QR code
holds ``LIGHTNING:<BOLT11>`` when the page shows an invoice (a single-use link: the fixed
amount's invoice, or the one a payer asked for with the amount field), else
``LIGHTNING:<LNURL>`` (a reusable link, or a payer-chosen one before an amount is given):
any LNURL-pay wallet pays that. The status line polls the link's ``/status`` once a second
and says "Paid" (single use) or "Received N payments" (reusable) without a reload. A
single-use link has one invoice at a time, the same for its page and an LNURL wallet (it
commits to the link's metadata): when the open invoice is not the one shown (it expired and
was replaced, or another payer chose an amount), the page shows the new one. A payer whose
amount is refused because another payer's invoice holds the link (409) is told so and the
page asks again a little later. A link that is paid, expired or canceled says so plainly
(the texts of ``gateway.lnurl.LINK_GONE``), with no QR code.

**QR codes are cached** (bounded LRU caches): a link's or a jar's LNURL never changes, and
every view and status poll of a link shows its open invoice until it is paid, while those
endpoints are not rate limited.

As the paywall page, with which it shares its look, headers and copy button
(``gateway.web.pages``): everything inline (QR code as SVG from segno), a strict
Content-Security-Policy, no external request.

Element ids (a browser test reads them): ``#link`` (the root; ``data-state``: open, paid,
expired or canceled), ``#memo``, ``#amount`` (the amount shown), ``#amount-field`` (the
amount a payer chooses, in sat), ``#qr`` (the SVG's container and ``lightning:`` link),
``#invoice`` (the text the QR code holds), ``#status``.

**QR images** (``qr_image``): an LNURL as ``LIGHTNING:<LNURL>`` in SVG or PNG (segno writes
PNG itself, no Pillow), error correction M at least (paper gets scuffed), for printing.
"""

from __future__ import annotations

import io
import json
import secrets
from dataclasses import dataclass
from functools import lru_cache

import segno

from gateway.lnurl import LINK_GONE
from gateway.ports import InvoiceRecord, LinkState, PaymentLink
from gateway.web.pages import asset, escape, fill, page_headers, price, qr_svg, script, style
from gateway.web.responses import HttpResponse

__all__ = [
    "MAX_QR_SCALE",
    "LinkPage",
    "invoice_qr_svg",
    "qr_image",
    "render_link_page",
    "render_missing_link",
]

# ``?size=``: pixels per QR module (PNG) or SVG user units; a bound keeps images small.
MAX_QR_SCALE = 40
_DEFAULT_SCALE = {"svg": 8, "png": 10}
_CONTENT_TYPES = {"svg": "image/svg+xml", "png": "image/png"}
# What a finished link's page says: "Paid", or why it takes no payment (as the LNURL errors).
_DONE_TEXT = {
    state: "Paid" if state is LinkState.PAID else f"{reason[0].upper()}{reason[1:]}."
    for state, reason in LINK_GONE.items()
}
_DONE_JSON = json.dumps({state.value.lower(): text for state, text in _DONE_TEXT.items()})
# How many QR codes each cache keeps: of LNURLs (images) and of invoices and LNURLs (pages).
_QR_CACHE = 256


@dataclass(frozen=True, slots=True)
class LinkPage:
    """What the page shows: the link, its state now, its LNURL, the invoice the QR code holds
    (None: the LNURL), and the URLs its script fetches."""

    link: PaymentLink
    state: LinkState
    lnurl: str
    invoice: InvoiceRecord | None
    status_url: str
    invoice_url: str


@lru_cache(maxsize=_QR_CACHE)
def invoice_qr_svg(payment_request: str) -> str:
    """The inline SVG QR code of ``LIGHTNING:<payment_request>`` (or of an LNURL) the page
    shows; kept, as every page view and status poll of a link shows the same one."""
    return qr_svg(payment_request)


def render_link_page(page: LinkPage, *, nonce: str | None = None) -> HttpResponse:
    """The link's page (see the module docstring)."""
    nonce = nonce or secrets.token_urlsafe(18)
    link, invoice = page.link, page.invoice
    target = invoice.payment_request if invoice is not None else page.lnurl
    state = page.state
    open_ = state is LinkState.OPEN
    amount, msat_line = _amount(link)
    chooses = open_ and link.single_use and not link.fixed
    values = {
        "nonce": nonce,
        "css": style(__name__),
        "js": script(__name__),
        "page_title": escape(link.memo or "Payment link"),
        "memo": escape(link.memo),
        "amount": escape(amount),
        "msat_line": f'<p class="msat">{escape(msat_line)}</p>' if msat_line else "",
        "state": state.value.lower(),
        "done": escape(_DONE_JSON),
        "single_use": "1" if link.single_use else "0",
        "fixed": "1" if link.fixed else "0",
        "min_msat": str(link.min_msat),
        "max_msat": str(link.max_msat),
        "paid_count": str(link.paid_count),
        "hash": invoice.payment_hash.hex() if invoice is not None else "",
        "expires_at": str(int(invoice.expires_at)) if invoice is not None else "0",
        "status_url": escape(page.status_url),
        "invoice_url": escape(page.invoice_url),
        "lnurl": escape(page.lnurl),
        "uri": escape(f"lightning:{target}"),
        "qr_svg": invoice_qr_svg(target) if open_ else "",
        "target": escape(target),
        "target_label": "Lightning invoice" if invoice is not None else "LNURL",
        "min_sat": escape(_sat_text(link.min_msat)),
        "max_sat": escape(_sat_text(link.max_msat)),
        "chooser_hidden": "" if chooses else " hidden",
        "pay_hidden": "" if open_ else " hidden",
        "status": escape(_status_text(link, state)),
        "status_kind": "" if open_ else ("ok" if state is LinkState.PAID else "error"),
    }
    return HttpResponse(
        200, page_headers(nonce), fill(asset(__name__, "page.html"), values).encode("utf-8")
    )


def render_missing_link(status: int, reason: str, *, nonce: str | None = None) -> HttpResponse:
    """A page for a link that cannot be shown (unknown: 404; the service down: 503)."""
    nonce = nonce or secrets.token_urlsafe(18)
    body = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="robots" content="noindex"><title>Payment link</title>'
        f'<style nonce="{nonce}">{style(__name__)}</style></head><body>'
        '<main id="link" class="card" data-state="missing">'
        '<p class="eyebrow"><span class="bolt" aria-hidden="true">&#9889;</span> Payment link</p>'
        f'<p id="status" class="status" role="status" data-kind="error">{escape(reason)}</p>'
        "</main></body></html>"
    )
    return HttpResponse(status, page_headers(nonce), body.encode("utf-8"))


def qr_image(lnurl: str, kind: str, scale: int | None = None) -> HttpResponse:
    """``LIGHTNING:<lnurl>`` as a QR image, ``kind`` "svg" or "png", ``scale`` (at most
    ``MAX_QR_SCALE``) pixels per module; a blank border of 4 modules, as the standard asks."""
    body = _qr_image(lnurl.upper(), kind, scale or _DEFAULT_SCALE[kind])
    headers = (
        ("Content-Type", _CONTENT_TYPES[kind]),
        # The LNURL of a jar or link never changes: printable, cacheable.
        ("Cache-Control", "public, max-age=3600"),
        ("X-Content-Type-Options", "nosniff"),
        ("Access-Control-Allow-Origin", "*"),
    )
    return HttpResponse(200, headers, body)


@lru_cache(maxsize=_QR_CACHE)
def _qr_image(lnurl: str, kind: str, scale: int) -> bytes:
    """The image ``qr_image`` answers with, made once: an LNURL never changes."""
    qr = segno.make(f"LIGHTNING:{lnurl}", error="m", micro=False)
    buffer = io.BytesIO()
    qr.save(buffer, kind=kind, scale=scale, border=4)
    return buffer.getvalue()


def _amount(link: PaymentLink) -> tuple[str, str | None]:
    """The amount a link asks ("21 sat", or its bounds with an en dash between them) and,
    for a fixed amount with a fraction of a sat, its line in msat."""
    low, low_msat = price(link.min_msat)
    if link.fixed:
        return f"{low} sat", low_msat
    high, _ = price(link.max_msat)
    return f"{low} \u2013 {high} sat", None


def _sat_text(amount_msat: int) -> str:
    """The amount in sat for an input's bounds (no thousands separators)."""
    sats, rest = divmod(amount_msat, 1000)
    return f"{sats}.{rest:03d}".rstrip("0") if rest else str(sats)


def _status_text(link: PaymentLink, state: LinkState) -> str:
    if state is not LinkState.OPEN:
        return _DONE_TEXT[state]
    if not link.single_use and link.paid_count:
        return _received(link.paid_count)
    return "Waiting for payment"


def _received(count: int) -> str:
    """ "Received 1 payment", "Received 3 payments": the status of a paid reusable link."""
    return f"Received {count} payment{'' if count == 1 else 's'}"
