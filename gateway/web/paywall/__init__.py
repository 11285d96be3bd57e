"""The browser paywall: a 402 that a person can pay, and the endpoint that unlocks it.

**Who gets it.** A ``GET`` or ``HEAD`` whose ``Accept`` header prefers ``text/html`` (or
``application/xhtml+xml``) over JSON, as a browser navigation does, gets the challenge as an
HTML page instead of problem+json: still status 402 with both ``WWW-Authenticate`` headers,
``Cache-Control: no-store`` and a strict Content-Security-Policy (nothing but the page's own
nonce'd inline style and script, and ``fetch`` to its own origin). Everyone else (``*/*``,
JSON, no ``Accept``) keeps getting problem+json.

**The page** shows the price, what it buys (service, method and path, token lifetime; on a
credit route the credit the payment buys, the most a request costs and, for a top-up, the
token's balance), the
invoice as a QR code of ``LIGHTNING:<BOLT11>`` (all upper case, so the QR code uses the
compact alphanumeric mode; URI schemes are case-insensitive), the invoice text with a copy
button, an "Open in wallet" ``lightning:`` link, a "Pay with WebLN" button when
``window.webln`` exists, and a live status line. Everything is inline (QR code as SVG from
segno): no external request, no CDN.

**Unlocking** (``REDEEM_PATH``, answered by the middleware itself, never priced)::

    POST /.well-known/l402/redeem
    Content-Type: application/json

    {"macaroon": "<the challenge's macaroon, base64>", "credential": true (optional)}

    200 {"state": "pending" | "expired" | "canceled", "expires_at": <unix>, "expires_in": <s>}
    200 {"state": "refunded", ..., "failure": "backend failed with 503"} (a pay-on-success
        route: the request failed, the held payment was cancelled and nothing is owed)
    200 {"state": "settled", ..., "credential": "<macaroon>:<hex preimage>" (if asked)}
        Set-Cookie: L402-<service>=<macaroon>:<hex preimage>; Path=<the path prefix of the
                    service's routes>; Max-Age=<token lifetime left>; Secure; HttpOnly;
                    SameSite=Strict
    400 not a macaroon / not JSON     401 not one of our macaroons (forged, unknown, revoked)
    403 cross-site request            405 not POST    413 body too large    415 not JSON
    429 too many redeem requests from the client's address (Retry-After)
    503 store or node unavailable (Retry-After)

The page polls it about once a second. Once the invoice is settled the middleware accepts
the cookie as the credential (an ``Authorization`` credential wins over it) and the page
navigates once, with ``location.replace``, to its own URL, which now shows the resource; the
cookie opens the service's other pages too (see ``gateway.web.cookies``). A page whose
invoice expired offers a fresh one (a plain reload gets a new challenge).

A page that is not a secure context (plain HTTP, not localhost) would lose the Secure cookie:
it shows no invoice until the user chooses to pay anyway, then asks redeem for the credential
and shows it to copy (as an ``Authorization`` header) instead of navigating.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from http import HTTPStatus

from gateway import l402
from gateway.service import Deny, L402Service, PaymentChallenge, RedeemResult, RedeemState
from gateway.web.cookies import cookie_name, cookie_path
from gateway.web.pages import (
    asset,
    escape,
    fill,
    page_headers,
    price,
    qr_svg,
    script,
    style,
)
from gateway.web.responses import HttpResponse, credit_headers, render, settle_headers

__all__ = [
    "MAX_REDEEM_BODY",
    "REDEEM_PATH",
    "handle_redeem",
    "prefers_html",
    "redeem_cookie",
    "render_busy",
    "render_challenge",
    "render_paywall",
]

REDEEM_PATH = "/.well-known/l402/redeem"
MAX_REDEEM_BODY = 8 * 1024
_HTML_TYPES = ("text/html", "application/xhtml+xml")
_JSON_TYPES = ("application/json", "application/problem+json")
_PAGE_METHODS = frozenset({"GET", "HEAD"})
_JSON_HEADERS = (("Content-Type", "application/json"), ("Cache-Control", "no-store"))
_REDEEM_SHAPE = 'body must be {"macaroon": "<base64>"}'


def prefers_html(method: str, accept: str | None) -> bool:
    """True for a GET/HEAD whose ``Accept`` ranks HTML strictly above JSON (a browser)."""
    if method.upper() not in _PAGE_METHODS or not accept:
        return False
    html_q = max(_quality(accept, media) for media in _HTML_TYPES)
    json_q = max(_quality(accept, media) for media in _JSON_TYPES)
    return html_q > json_q


def _quality(accept: str, media: str) -> float:
    """The q value ``accept`` gives ``media``: the most specific matching range decides."""
    kind = media.split("/", 1)[0]
    specificity, quality = -1, 0.0
    for item in accept.split(",")[:64]:
        media_range, *params = item.split(";")
        media_range = media_range.strip().lower()
        if media_range == media:
            rank = 2
        elif media_range == f"{kind}/*":
            rank = 1
        elif media_range == "*/*":
            rank = 0
        else:
            continue
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
                if not (math.isfinite(q) and 0.0 <= q <= 1.0):
                    q = 0.0
        if rank > specificity:
            specificity, quality = rank, q
    return quality


def render_challenge(
    decision: PaymentChallenge | Deny,
    *,
    method: str,
    accept: str | None,
    redeem_url: str = REDEEM_PATH,
) -> HttpResponse:
    """The paywall page for a browser's challenge, a page for a browser told to come back
    later (429, 5xx), problem+json for anything else."""
    if prefers_html(method, accept):
        if isinstance(decision, PaymentChallenge):
            return render_paywall(decision, redeem_url=redeem_url)
        if decision.status == 429 or decision.status >= 500:
            return render_busy(decision)
    return render(decision)


_BUSY = {
    429: (
        "Too many requests",
        "More requests came from you than this site answers. Wait a moment, then try again.",
    ),
    503: (
        "Temporarily unavailable",
        "Payments cannot be taken right now. Wait a moment, then try again.",
    ),
}


def render_busy(decision: Deny, *, nonce: str | None = None) -> HttpResponse:
    """A 429 or 5xx as a page a person can read (status, ``Retry-After`` and the
    problem+json's detail kept), with a "Try again" button that honours ``Retry-After``."""
    nonce = nonce or secrets.token_urlsafe(18)
    status = decision.status
    phrase = HTTPStatus(status).phrase
    title, text = _BUSY.get(status, (phrase, "Something went wrong here. Try again later."))
    values = {
        "nonce": nonce,
        "css": style(__name__),
        "js": asset(__name__, "busy.js"),  # no copy button: no copyText
        "title": escape(title),
        "status": escape(f"{status} {phrase}"),
        "text": escape(text),
        "detail": escape(decision.reason),
        "retry_after": str(decision.retry_after or 0),
        "merchant_line": "",
    }
    headers = [*page_headers(nonce)]
    if decision.retry_after is not None:
        headers.append(("Retry-After", str(decision.retry_after)))
    return HttpResponse(status, tuple(headers), fill(asset(__name__, "busy.html"), values).encode())


def render_paywall(
    challenge: PaymentChallenge,
    *,
    redeem_url: str = REDEEM_PATH,
    nonce: str | None = None,
    now: float | None = None,
) -> HttpResponse:
    """The 402 as an HTML page (see the module docstring)."""
    nonce = nonce or secrets.token_urlsafe(18)
    if now is None:
        now = challenge.issued_at if challenge.issued_at is not None else time.time()
    expires_in = max(0, int(challenge.expires_at - now))
    sats, msat_line = price(challenge.amount_msat)
    invoice = challenge.invoice
    what = f"{challenge.method} {challenge.path}".strip() or "this resource"
    credit, balance = _credit_facts(challenge)
    values = {
        "nonce": nonce,
        "css": style(__name__),
        "js": script(__name__),
        "price": escape(sats),
        "msat_line": (f'<p class="msat">{escape(msat_line)}</p>' if msat_line else ""),
        "what": escape(what),
        "lifetime": escape(_duration(challenge.lifetime)) if challenge.lifetime > 0 else "",
        "service": escape(challenge.service),
        "eyebrow": "Buy credit" if challenge.credit else "Payment required",
        "credit": escape(credit),
        "balance": escape(balance),
        "reason_line": _reason_line(challenge.reason),
        "invoice": escape(invoice),
        "uri": escape(f"lightning:{invoice}"),
        "qr_svg": qr_svg(invoice),
        "macaroon": escape(challenge.macaroon),
        "redeem_url": escape(redeem_url),
        "expires_in": str(expires_in),
        "page_title": escape(challenge.title or "Payment required"),
        "title_block": _title_block(challenge.title, challenge.description),
        "merchant_eyebrow": f" &middot; {escape(challenge.merchant)}" if challenge.merchant else "",
        "merchant_line": _merchant_line(challenge.merchant),
        "fiat_line": f'<p class="fiat" id="fiat">{escape(challenge.fiat)}</p>'
        if challenge.fiat
        else "",
    }
    page = fill(asset(__name__, "page.html"), values)
    headers = (
        *page_headers(nonce),
        *(("WWW-Authenticate", value) for value in challenge.www_authenticate()),
        *credit_headers(challenge),
        *settle_headers(challenge),
    )
    return HttpResponse(402, headers, page.encode("utf-8"))


def _credit_facts(challenge: PaymentChallenge) -> tuple[str, str]:
    """The page's "Buys credit" and "Your balance" lines ("" hides a line)."""
    if not challenge.credit:
        return "", ""
    credit = f"{_sats(challenge.amount_msat)}, at most {_sats(challenge.price_msat)} a request"
    balance = "" if challenge.balance_msat is None else _sats(challenge.balance_msat)
    return credit, balance


def _sats(amount_msat: int) -> str:
    return f"{price(amount_msat)[0]} sat"


async def handle_redeem(
    service: L402Service | None,
    *,
    method: str,
    content_type: str | None,
    fetch_site: str | None,
    body: bytes,
    client: str,
) -> HttpResponse:
    """Answer ``POST REDEEM_PATH`` (framework-neutral; the caller reads at most
    ``MAX_REDEEM_BODY + 1`` bytes of the body). ``client`` is the address rate limits
    apply to. Never raises on client input."""
    if method.upper() != "POST":
        response = render(Deny(405, "use POST"))
        return HttpResponse(405, (*response.headers, ("Allow", "POST")), response.body)
    # Browsers say where a request comes from; only the page itself may redeem.
    if fetch_site is not None and fetch_site.strip().lower() not in ("same-origin", "none"):
        return render(Deny(403, "cross-site redeem refused"))
    if (content_type or "").split(";", 1)[0].strip().lower() != "application/json":
        return render(Deny(415, "Content-Type must be application/json"))
    if len(body) > MAX_REDEEM_BODY:
        return render(Deny(413, f"body over {MAX_REDEEM_BODY} bytes"))
    try:
        payload = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return render(Deny(400, "body must be JSON"))
    macaroon = payload.get("macaroon") if isinstance(payload, dict) else None
    if not isinstance(macaroon, str):
        return render(Deny(400, _REDEEM_SHAPE))
    # A page off HTTPS asks for the credential itself: its browser drops the Secure cookie.
    reveal = isinstance(payload, dict) and payload.get("credential") is True
    if service is None:
        return render(Deny(503, "gateway is not started", retry_after=1))
    result = await service.redeem(macaroon, client=client)
    if isinstance(result, Deny):
        return render(result)
    headers = list(_JSON_HEADERS)
    if result.state is RedeemState.SETTLED:
        headers.append(("Set-Cookie", redeem_cookie(result)))
    now = time.time()
    document: dict[str, str | int] = {
        "state": result.state.value,
        "expires_at": int(result.expires_at),
        "expires_in": max(0, int(result.expires_at - now)),
    }
    if reveal and result.credential is not None:
        document["credential"] = result.credential
    if result.state is RedeemState.REFUNDED:
        document["failure"] = result.failure
    return HttpResponse(200, tuple(headers), json.dumps(document).encode())


def redeem_cookie(result: RedeemResult) -> str:
    """The ``Set-Cookie`` value carrying a settled challenge's credential."""
    if result.credential is None:
        raise ValueError("only a settled result carries a credential")
    # Scoped to what the token opens, not only the page it was bought on.
    name = cookie_name(result.service, result.tier, result.capabilities)
    parts = [f"{name}={result.credential}", f"Path={cookie_path(result.scope)}"]
    if result.max_age is not None:
        parts.append(f"Max-Age={result.max_age}")
    parts += ["Secure", "HttpOnly", "SameSite=Strict"]
    return "; ".join(parts)


def _title_block(title: str, description: str) -> str:
    block = f'<h1 class="title" id="title">{escape(title)}</h1>' if title else ""
    if description:
        block += f'<p class="description" id="description">{escape(description)}</p>'
    return block


def _merchant_line(merchant: str) -> str:
    return f'<span id="merchant">{escape(merchant)}</span> &middot; ' if merchant else ""


def _duration(seconds: int) -> str:
    parts = []
    for size, name in ((86400, "day"), (3600, "hour"), (60, "minute"), (1, "second")):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count} {name}{'' if count == 1 else 's'}")
    return " ".join(parts[:2])


_REASONS = {
    l402.ChallengeReason.EXPIRED: "Your access has expired. Pay again to continue.",
    l402.ChallengeReason.CREDIT_EXHAUSTED: "Your credit has run out. Top it up to continue.",
}


def _reason_line(reason: l402.ChallengeReason) -> str:
    if reason is l402.ChallengeReason.PAYMENT_REQUIRED:
        return ""
    text = _REASONS.get(reason, f"Your access does not cover this page ({reason}).")
    return f'<p class="reason">{escape(text)}</p>'
