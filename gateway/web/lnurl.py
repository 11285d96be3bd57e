"""Tip jars and payment links over HTTP (framework-neutral): LNURL-pay, Lightning Address,
the link page and QR images. The adapters answer these paths before any L402 pricing and
never forward them (``gateway.web.aiohttp.add_tip_routes``, ``build_proxy(..., tips=)``)::

    GET /.well-known/lnurlp/<name>                  the jar's payRequest (LUD-06, LUD-16)
    GET /.well-known/lnurlp/<name>/callback         ?amount=<msat>&comment=: {"pr", "routes"}
    GET /.well-known/lnurlp/<name>/qr.svg|qr.png    the jar's LNURL as a QR image
    GET /.well-known/l402/links/<id>                the link's page (HTML)
    GET /.well-known/l402/links/<id>/lnurl          the link's payRequest
    GET /.well-known/l402/links/<id>/callback       its LNURL callback
    GET /.well-known/l402/links/<id>/invoice        [?amount=<msat>] the page's invoice:
        {"invoice", "payment_hash", "amount_msat", "expires_at", "qr_svg"}
    GET /.well-known/l402/links/<id>/status         [?have=<payment hash>]
        {"state": "open"|"paid"|"expired"|"canceled", "paid_count", "paid_msat",
         "invoice": {...as /invoice, "qr_svg" only when its hash is not ``have``} | null}
    GET /.well-known/l402/links/<id>/qr.svg|qr.png  the link's LNURL as a QR image
        (``?size=<1..40>``: pixels per module)

JSON answers carry ``Cache-Control: no-store`` and ``Access-Control-Allow-Origin: *`` (web
wallets fetch them from their own origin); ``OPTIONS`` on any path but the page is a CORS
preflight's 204 (any origin, ``GET``, any header), ``HEAD`` is answered as ``GET`` (the
adapter sends no body). Every refusal is LUD-06's ``{"status": "ERROR", "reason": ...}``
with a 4xx status (``LnurlError``'s: 400 bad input, 404 unknown jar or link, 409 another
payer's invoice holds a single-use link, 410 a link that takes no more payments), 405 (with
``Allow``) for another method, 429 with ``Retry-After``
when a client asks for invoices faster than its rate limit lets it (the callbacks and
``/invoice`` make invoices: unpaid traffic, limited as challenges are), 503 with
``Retry-After`` when the node or the store fails.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from gateway import errors
from gateway.lnurl import JAR_NAME, LINK_ID, LnurlError, error_body
from gateway.ports import InvoiceRecord, InvoiceState, LinkState
from gateway.service.decisions import Refusal
from gateway.service.rate_limiter import ClientLimiter, rate_limited
from gateway.service.tips import LinkStatus
from gateway.text import whole_number
from gateway.web.links import (
    MAX_QR_SCALE,
    LinkPage,
    invoice_qr_svg,
    qr_image,
    render_link_page,
    render_missing_link,
)
from gateway.web.responses import HttpResponse

__all__ = [
    "JAR_PREFIX",
    "LINK_PREFIX",
    "TipService",
    "TipsSlot",
    "handle_tips",
    "is_tips_path",
]

log = logging.getLogger(__name__)

JAR_PREFIX = "/.well-known/lnurlp/"
LINK_PREFIX = "/.well-known/l402/links/"
_AMOUNT = re.compile(r"0*([0-9]{1,19})")  # leading zeros change no amount
_JSON = (
    ("Content-Type", "application/json"),
    ("Cache-Control", "no-store"),
    ("Access-Control-Allow-Origin", "*"),
)
# A CORS preflight's answer: a web wallet may GET these from any origin, with any header.
_PREFLIGHT = (
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Allow-Methods", "GET"),
    ("Access-Control-Allow-Headers", "*"),
    ("Access-Control-Max-Age", "86400"),
)
_QR_KINDS = {"qr.svg": "svg", "qr.png": "png"}
_MAKES_INVOICES = frozenset({"callback", "invoice"})  # the paths whose GET makes an invoice
_RETRY_AFTER = 5  # seconds, when the node or the store failed


class TipService(Protocol):
    """What the handlers ask of ``gateway.service.tips.Tips``."""

    def jar_lnurl(self, name: str) -> str: ...
    def link_lnurl(self, link_id: str) -> str: ...
    async def jar_pay_request(self, name: str) -> dict[str, object]: ...
    async def jar_invoice(self, name: str, query: Mapping[str, str]) -> dict[str, object]: ...
    async def link_pay_request(self, link_id: str) -> dict[str, object]: ...
    async def link_callback(self, link_id: str, query: Mapping[str, str]) -> dict[str, object]: ...
    async def link_invoice(self, link_id: str, amount_msat: int | None) -> InvoiceRecord: ...
    async def link_status(self, link_id: str) -> LinkStatus: ...


@dataclass(slots=True)
class TipsSlot:
    """Where the web adapters find the tip service and the per-client limit on the invoices
    it makes: filled in while the gateway runs, None before and after (answers are 503)."""

    tips: TipService | None = None
    limiter: ClientLimiter | None = None


def is_tips_path(raw_path: str) -> bool:
    """Whether ``raw_path`` (as sent, percent-encoded) is one of the tip and link paths."""
    return raw_path.startswith((JAR_PREFIX, LINK_PREFIX))


async def handle_tips(
    slot: TipsSlot, *, method: str, raw_path: str, query: Mapping[str, str], client: str
) -> HttpResponse:
    """Answer a request to a tip or link path (``is_tips_path``); ``query`` holds the first
    value of each parameter, ``client`` is the address rate limits apply to. ``HEAD`` is
    answered as ``GET`` (with the body: the adapter sends none), except where a ``GET``
    makes an invoice: the callbacks and ``/invoice`` refuse it (405) and the page is
    rendered with what it has (a link preview or a monitor must not make, let alone
    replace, an invoice). Never raises on client input; the node's or the store's failure
    is a 503."""
    jar = raw_path.startswith(JAR_PREFIX)
    key, sep, rest = raw_path.removeprefix(JAR_PREFIX if jar else LINK_PREFIX).partition("/")
    page = not jar and not sep
    method = method.upper()
    if method == "OPTIONS" and not page:
        return HttpResponse(204, _PREFLIGHT, b"")
    if method not in ("GET", "HEAD") or (method == "HEAD" and rest in _MAKES_INVOICES):
        response = _error(405, "use GET")
        allow = (
            "GET, OPTIONS"
            if rest in _MAKES_INVOICES
            else "GET, HEAD"
            if page
            else "GET, HEAD, OPTIONS"
        )
        return HttpResponse(405, (*response.headers, ("Allow", allow)), response.body)
    if not (JAR_NAME if jar else LINK_ID).fullmatch(key) or (sep and not rest):
        return _refused(404, "unknown tip jar" if jar else "unknown payment link", page)
    tips = slot.tips
    if tips is None:
        return _refused(503, "the gateway is not started", page, retry_after=1)
    try:
        if jar:
            return await _jar(tips, slot.limiter, key, rest, query, client)
        return await _link(tips, slot.limiter, key, rest, query, client, head=method == "HEAD")
    except LnurlError as error:
        retry_after = _RETRY_AFTER if error.status == 503 else error.retry_after
        return _refused(error.status, error.reason, page, retry_after=retry_after)
    except (errors.BackendError, errors.StoreError) as error:
        # The service answers its own failures as LnurlError 503s; this is the safety net.
        log.warning("tip or link request failed: %r", error)
        reason = (
            Refusal.STORE_UNAVAILABLE
            if isinstance(error, errors.StoreError)
            else Refusal.NODE_UNAVAILABLE
        )
        return _refused(503, reason, page, retry_after=_RETRY_AFTER)


async def _jar(
    tips: TipService,
    limiter: ClientLimiter | None,
    name: str,
    rest: str,
    query: Mapping[str, str],
    client: str,
) -> HttpResponse:
    if rest == "":
        return _json(await tips.jar_pay_request(name))
    if rest == "callback":
        return await _limited(limiter, client) or _json(await tips.jar_invoice(name, query))
    if rest in _QR_KINDS:
        scale = _scale(query)
        await tips.jar_pay_request(name)  # 404 for an unknown jar
        if "+" in name or scale is not None:
            # Not one of the few images kept drawn: a tag or a size makes another each.
            limited = await _limited(limiter, client, "too many QR images")
            if limited is not None:
                return limited
        return qr_image(tips.jar_lnurl(name), _QR_KINDS[rest], scale)
    return _error(404, "not found")


async def _link(
    tips: TipService,
    limiter: ClientLimiter | None,
    link_id: str,
    rest: str,
    query: Mapping[str, str],
    client: str,
    *,
    head: bool,
) -> HttpResponse:
    if rest == "":
        return await _page(tips, limiter, link_id, client, makes=not head)
    if rest == "lnurl":
        return _json(await tips.link_pay_request(link_id))
    if rest == "callback":
        return await _limited(limiter, client) or _json(await tips.link_callback(link_id, query))
    if rest == "invoice":
        amount = _amount(query)
        limited = await _limited(limiter, client)
        if limited is not None:
            return limited
        return _json(_invoice_json(await tips.link_invoice(link_id, amount), qr=True))
    if rest == "status":
        status = await tips.link_status(link_id)
        link, invoice = status.link, _open_invoice(status)
        have = query.get("have", "")
        return _json(
            {
                "state": status.state.value.lower(),
                "paid_count": link.paid_count,
                "paid_msat": link.paid_msat,
                "invoice": None
                if invoice is None
                else _invoice_json(invoice, qr=invoice.payment_hash.hex() != have),
            }
        )
    if rest in _QR_KINDS:
        scale = _scale(query)
        await tips.link_status(link_id)  # 404 for an unknown link
        if scale is not None:
            limited = await _limited(limiter, client, "too many QR images")
            if limited is not None:
                return limited
        return qr_image(tips.link_lnurl(link_id), _QR_KINDS[rest], scale)
    return _error(404, "not found")


async def _page(
    tips: TipService,
    limiter: ClientLimiter | None,
    link_id: str,
    client: str,
    *,
    makes: bool,
) -> HttpResponse:
    """The link page. A single-use link's shows the invoice open for it (the one its LNURL
    wallets get too); a fixed one's asks the service for it when ``makes`` (the open one
    while it has time left, else a new one), within the client's rate limit: refused, the
    page shows what it has, or the LNURL."""
    status = await tips.link_status(link_id)
    link, invoice = status.link, _open_invoice(status)
    if (
        makes
        and link.single_use
        and link.fixed
        and status.state is LinkState.OPEN
        and await _limited(limiter, client) is None
    ):
        try:
            invoice = await tips.link_invoice(link_id, None)
        except LnurlError as error:
            log.info("payment link %s: no invoice for its page: %s", link_id, error.reason)
    base = f"{LINK_PREFIX}{link_id}"
    return render_link_page(
        LinkPage(
            link=link,
            state=status.state,
            lnurl=tips.link_lnurl(link_id),
            invoice=invoice,
            status_url=f"{base}/status",
            invoice_url=f"{base}/invoice",
        )
    )


def _open_invoice(status: LinkStatus) -> InvoiceRecord | None:
    """The invoice that can pay an open single-use link now (as the store knows it)."""
    invoice = status.invoice
    if status.state is not LinkState.OPEN or invoice is None:
        return None
    return invoice if invoice.state is InvoiceState.OPEN else None


async def _limited(
    limiter: ClientLimiter | None, client: str, too_many: str = "too many invoice requests"
) -> HttpResponse | None:
    """None when ``client`` may have another invoice (or QR image) made; else the 429 (or
    503)."""
    if limiter is None:
        return None
    refusal = await rate_limited(limiter, client, Refusal.TOO_MANY_CHALLENGES)
    if refusal is None:
        return None
    reason = too_many if refusal.status == 429 else refusal.reason
    return _error(refusal.status, reason, retry_after=refusal.retry_after)


def _amount(query: Mapping[str, str]) -> int | None:
    """``/invoice``'s ``amount`` (msat): None when absent; the service checks the bounds."""
    text = query.get("amount")
    if text is None:
        return None
    match = _AMOUNT.fullmatch(text)
    if match is None:
        raise LnurlError("amount must be a whole number of millisatoshis", 400)
    return int(match[1])


def _scale(query: Mapping[str, str]) -> int | None:
    text = query.get("size")
    if text is None:
        return None
    size = whole_number(text, len(str(MAX_QR_SCALE)))
    if size is None or not 1 <= size <= MAX_QR_SCALE:
        raise LnurlError(f"size must be a whole number from 1 to {MAX_QR_SCALE}", 400)
    return size


def _invoice_json(invoice: InvoiceRecord, *, qr: bool) -> dict[str, object]:
    document: dict[str, object] = {
        "invoice": invoice.payment_request,
        "payment_hash": invoice.payment_hash.hex(),
        "amount_msat": invoice.amount_msat,
        "expires_at": int(invoice.expires_at),
    }
    if qr:
        document["qr_svg"] = invoice_qr_svg(invoice.payment_request)
    return document


def _json(document: Mapping[str, object], status: int = 200) -> HttpResponse:
    return HttpResponse(status, _JSON, json.dumps(document, separators=(",", ":")).encode())


def _error(status: int, reason: str, *, retry_after: int | None = None) -> HttpResponse:
    return _refused(status, reason, False, retry_after=retry_after)


def _refused(
    status: int, reason: str, page: bool, *, retry_after: int | None = None
) -> HttpResponse:
    """A refusal: the link page's as a page a person reads, any other as LNURL JSON."""
    response = render_missing_link(status, reason) if page else _json(error_body(reason), status)
    if retry_after is None:
        return response
    headers = (*response.headers, ("Retry-After", str(retry_after)))
    return HttpResponse(status, headers, response.body)
