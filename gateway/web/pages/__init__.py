"""What the gateway's HTML pages share: the paywall's (``gateway.web.paywall``) and a payment
link's (``gateway.web.links``). Framework-neutral, like them.

- ``page_headers``: ``text/html``, ``no-store`` and a strict Content-Security-Policy
  (``content_security_policy``: nothing but the page's own nonce'd inline style and script,
  ``fetch`` to its own origin), no framing, no referrer;
- ``fill`` puts escaped values (``escape``) into a template's ``{{name}}`` placeholders;
- ``style`` is the shared look (``page.css``) followed by a page's own rules, ``script`` the
  shared ``copyText`` (``copy.js``: the copy buttons) followed by a page's own script: one
  inline element each, so the CSP stays as strict;
- ``qr_svg``: a ``LIGHTNING:`` URI as an inline SVG QR code (segno, no external image);
- ``price``: an amount in sat as the pages show it.
"""

from __future__ import annotations

import html
import re
from functools import cache
from importlib import resources

import segno

__all__ = [
    "asset",
    "content_security_policy",
    "escape",
    "fill",
    "page_headers",
    "price",
    "qr_svg",
    "script",
    "style",
]

_PLACEHOLDER = re.compile(r"\{\{([a-z_]+)\}\}")


@cache
def asset(package: str, name: str) -> str:
    """The text of a page's file ``name`` shipped in ``package`` (read once)."""
    return resources.files(package).joinpath(name).read_text(encoding="utf-8")


def style(package: str, name: str = "page.css") -> str:
    """The shared look, then the page's own rules (``name`` in ``package``)."""
    return asset(__name__, "page.css") + asset(package, name)


def script(package: str, name: str = "page.js") -> str:
    """The shared ``copyText``, then the page's own script (``name`` in ``package``)."""
    return asset(__name__, "copy.js") + asset(package, name)


def fill(template: str, values: dict[str, str]) -> str:
    """One pass over ``{{name}}`` placeholders: inserted text is never rescanned."""
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


def escape(text: str) -> str:
    """``text`` safe in HTML content and in a quoted attribute."""
    return html.escape(text, quote=True)


def page_headers(nonce: str) -> tuple[tuple[str, str], ...]:
    """The headers of every page: HTML, never cached, the CSP of ``nonce``, no framing."""
    return (
        ("Content-Type", "text/html; charset=utf-8"),
        ("Cache-Control", "no-store"),
        ("Content-Security-Policy", content_security_policy(nonce)),
        ("X-Content-Type-Options", "nosniff"),
        ("X-Frame-Options", "DENY"),
        ("Referrer-Policy", "no-referrer"),
    )


def content_security_policy(nonce: str) -> str:
    """Nothing from anywhere but the page's own inline style and script; fetch to itself."""
    return (
        "default-src 'none'; "
        f"style-src 'nonce-{nonce}'; "
        f"script-src 'nonce-{nonce}'; "
        "connect-src 'self'; "
        "base-uri 'none'; "
        "form-action 'none'; "
        "frame-ancestors 'none'"
    )


def qr_svg(text: str) -> str:
    """``LIGHTNING:<text>`` (an invoice, an LNURL) as an inline SVG QR code (upper case:
    alphanumeric mode; error correction L, raised by segno when that costs no extra size: a
    screen is not torn)."""
    qr = segno.make(f"LIGHTNING:{text.upper()}", error="l", micro=False)
    return str(
        qr.svg_inline(
            scale=1,
            border=3,
            omitsize=True,
            dark="#000",
            light="#fff",
            title="Lightning invoice QR code",
        )
    )


def price(amount_msat: int) -> tuple[str, str | None]:
    """``("21", None)`` for 21000 msat; ``("0.5", "500 msat")`` for 500 msat."""
    sats, rest = divmod(amount_msat, 1000)
    if rest == 0:
        return f"{sats:,}", None
    return f"{sats:,}.{rest:03d}".rstrip("0"), f"{amount_msat:,} msat"
