"""LNURL-pay as a service answers it: the protocol's texts and checks, no I/O.

- LUD-01: ``encode_lnurl`` writes a URL as a bech32 LNURL (upper case: a denser QR code);
- LUD-06: ``pay_request`` is the first answer (``tag``, ``callback``, ``minSendable``,
  ``maxSendable``, ``metadata``); ``read_callback`` checks the wallet's second request
  (``amount`` in millisatoshis); ``callback_body`` answers it with the invoice, whose
  description hash (``h``) is ``description_hash`` of the exact ``metadata`` text served;
- LUD-16: a Lightning Address's metadata names it (``text/identifier``);
- LUD-12: ``commentAllowed`` and the ``comment`` a wallet sends;
- LUD-09: ``SuccessAction``, a message or a URL the wallet shows once paid.

Where the gateway serves them: ``jar_url`` (a tip jar, the path LUD-16 fixes),
``link_page_url`` and ``link_lnurl`` (a payment link), under the public origin; ``JAR_NAME``
and ``LINK_ID`` are what a jar's name and a link's id may be, ``LINK_GONE`` says why a link
takes no payment.

Every refusal is an ``LnurlError``: the ``reason`` a wallet shows (``error_body``) and the
HTTP status to answer with. Pure: the standard library, ``gateway.bech32`` and the ports'
``Msat`` and ``LinkState`` (no asyncio, no HTTP, no database).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

from gateway import bech32
from gateway.ports import LinkState, Msat

__all__ = [
    "JAR_NAME",
    "LINK_GONE",
    "LINK_ID",
    "MAX_COMMENT_CHARS",
    "MAX_IMAGE_BYTES",
    "MAX_SUCCESS_CHARS",
    "Image",
    "LnurlError",
    "SuccessAction",
    "callback_body",
    "clean_text",
    "description_hash",
    "encode_lnurl",
    "error_body",
    "invoice_description_hash",
    "jar_url",
    "link_lnurl",
    "link_page_url",
    "metadata",
    "pay_request",
    "read_callback",
    "success_action_body",
]

# LUD-06: a thumbnail is up to 136536 base64 characters, 100 KiB of image data.
MAX_IMAGE_BYTES = 100 * 1024
# LUD-09: a success message, or a URL's description, is up to 144 characters.
MAX_SUCCESS_CHARS = 144
# LUD-12: the comment rides in the callback's request line, which aiohttp reads up to 8190
# bytes; a character may take 12 of them percent-encoded (4 UTF-8 bytes), so this is the most
# ``commentAllowed`` may say.
MAX_COMMENT_CHARS = 600
# A tip jar's name (the Lightning Address's local part): LUD-16's characters, and '+' (a
# "name+tag" address falls back on "name"). Lower case: an address is read lower-cased.
JAR_NAME = re.compile(r"[a-z0-9._+-]{1,64}")
# A payment link's id: 80 random bits as 16 lower-case base32 characters, the only form
# ``new_link`` makes (never a leading '-' an argument parser takes for an option).
LINK_ID = re.compile(r"[a-z2-7]{16}")
# Why a link takes no payment, by its state.
LINK_GONE: dict[LinkState, str] = {
    LinkState.PAID: "this payment link is paid already",
    LinkState.EXPIRED: "this payment link has expired",
    LinkState.CANCELED: "this payment link was canceled",
}
# What text from a payer or merchant may not hold: controls (C0, DEL, C1) but the newline,
# the bidi overrides and isolates (U+202A-202E, U+2066-2069) that reorder what a wallet or a
# terminal shows, and lone surrogates (no UTF-8 can carry them). Joiners (ZWJ, ZWNJ: emoji,
# Persian) and other text are fine.
_FORBIDDEN = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_AMOUNT = re.compile(r"[0-9]+")  # ASCII digits only (str.isdigit takes '²' too)
_AMOUNT_DIGITS = 30  # more is above any maximum (and int() of thousands of digits fails)
_IMAGE_MAGIC = {"image/png": b"\x89PNG\r\n\x1a\n", "image/jpeg": b"\xff\xd8\xff"}
_BOLT11_TIMESTAMP_WORDS = 7
_BOLT11_SIGNATURE_WORDS = 104
_BOLT11_H = bech32.CHARSET.index("h")
_HASH_WORDS = 52  # 256 bits in 5-bit words


class LnurlError(ValueError):
    """A request the service refuses: ``reason`` is the text for the wallet (safe to show:
    it names no secret), ``status`` the HTTP status of the answer (400 a bad amount or
    comment, 404 an unknown tip jar or link, 409 a single-use link held by another payer's
    open invoice (the reason says when it frees up), 410 a link expired (or expiring within
    a minute), paid or cancelled, 503 the node or the store failed)."""

    def __init__(self, reason: str, status: int = 400, retry_after: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        # Seconds after which asking again may succeed (a 409's wait), for Retry-After.
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class Image:
    """A tip jar's thumbnail in the metadata: PNG or JPEG, at most ``MAX_IMAGE_BYTES``.
    ``ValueError`` for another type, data that is not of its type, or too much of it."""

    mime: str  # "image/png" or "image/jpeg"
    data: bytes

    def __post_init__(self) -> None:
        magic = _IMAGE_MAGIC.get(self.mime)
        if magic is None:
            raise ValueError(f"an image is image/png or image/jpeg, not {self.mime!r}")
        if not self.data.startswith(magic):
            raise ValueError(f"the image data is not {self.mime}")
        if len(self.data) > MAX_IMAGE_BYTES:
            raise ValueError(
                f"the image is {len(self.data)} bytes; LNURL-pay allows {MAX_IMAGE_BYTES}"
            )

    @classmethod
    def of(cls, data: bytes) -> Image:
        """The image of a PNG or JPEG file's ``data``, its type read from its first bytes."""
        for mime, magic in _IMAGE_MAGIC.items():
            if data.startswith(magic):
                return cls(mime, data)
        raise ValueError("the image is neither PNG nor JPEG")


@dataclass(frozen=True, slots=True)
class SuccessAction:
    """What a wallet shows once it paid (LUD-09): a ``message``, or a ``url`` with its
    ``description``, each at most ``MAX_SUCCESS_CHARS`` characters. The URL must be on the
    callback's domain (the service checks that, knowing its domain). ``ValueError`` for
    neither or both, text too long, or a URL that is not http(s) with a host."""

    message: str = ""
    url: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        if bool(self.message) == bool(self.url):
            raise ValueError("a success action is a message or a URL, one of them")
        if self.description and not self.url:
            raise ValueError("a success action's description goes with a URL")
        for what, text in (("message", self.message), ("description", self.description)):
            if len(text) > MAX_SUCCESS_CHARS:
                raise ValueError(
                    f"the success {what} is {len(text)} characters; at most "
                    f"{MAX_SUCCESS_CHARS} (LUD-09)"
                )
        if self.url:
            parts = urllib.parse.urlsplit(self.url)
            if parts.scheme not in ("https", "http") or not parts.hostname:
                raise ValueError(f"the success URL is not an http(s) URL: {self.url!r}")

    @property
    def host(self) -> str:
        """The URL's host in lower case; "" for a message."""
        return (urllib.parse.urlsplit(self.url).hostname or "") if self.url else ""


def jar_url(origin: str, name: str) -> str:
    """A tip jar's LNURL-pay URL, where its Lightning Address leads (LUD-16); ``origin`` is
    the public origin without a trailing slash (``https://pay.example.com``)."""
    return f"{origin}/.well-known/lnurlp/{name}"


def link_page_url(origin: str, link_id: str) -> str:
    """A payment link's page under the public ``origin``."""
    return f"{origin}/.well-known/l402/links/{link_id}"


def link_lnurl(origin: str, link_id: str) -> str:
    """The LNURL of a payment link's LNURL-pay endpoint (what a wallet scans)."""
    return encode_lnurl(f"{link_page_url(origin, link_id)}/lnurl")


def encode_lnurl(url: str) -> str:
    """``url`` as an LNURL (LUD-01): bech32 of its UTF-8 bytes under ``lnurl``, upper case."""
    return bech32.encode("lnurl", url.encode()).upper()


def metadata(description: str, identifier: str = "", image: Image | None = None) -> str:
    """The metadata text (LUD-06): a JSON array of ``["text/plain", description]``, then
    ``["text/identifier", identifier]`` for a Lightning Address (LUD-16, ``name@domain``) and
    the image as base64. Compact and deterministic: the same arguments give the same text,
    so the same description hash."""
    entries: list[list[str]] = [["text/plain", description]]
    if identifier:
        entries.append(["text/identifier", identifier])
    if image is not None:
        entries.append([f"{image.mime};base64", base64.b64encode(image.data).decode()])
    return json.dumps(entries, separators=(",", ":"), ensure_ascii=False)


def description_hash(metadata_text: str) -> bytes:
    """What an invoice's ``h`` tag must be: sha256 of the metadata text's UTF-8 bytes."""
    return hashlib.sha256(metadata_text.encode()).digest()


def pay_request(
    callback: str, min_msat: Msat, max_msat: Msat, metadata_text: str, comment_allowed: int
) -> dict[str, object]:
    """The first answer (LUD-06), with ``commentAllowed`` (LUD-12) when comments are taken."""
    body: dict[str, object] = {
        "tag": "payRequest",
        "callback": callback,
        "minSendable": min_msat,
        "maxSendable": max_msat,
        "metadata": metadata_text,
    }
    if comment_allowed > 0:
        body["commentAllowed"] = comment_allowed
    return body


def read_callback(
    query: Mapping[str, str], min_msat: Msat, max_msat: Msat, comment_allowed: int
) -> tuple[Msat, str]:
    """The amount (msat) and comment of a wallet's callback request, checked; ``LnurlError``
    (400) for a missing amount or one that is no whole number of millisatoshis, outside
    ``min_msat``..``max_msat``, a comment longer than ``comment_allowed`` characters or with
    control characters (``clean_text``: a newline is fine, CR LF becomes one). A comment
    where none is taken is dropped: wallets send the payer's note whatever the service said,
    and refusing it would refuse the payment."""
    text = query.get("amount")
    if text is None or text == "":
        raise LnurlError("no amount: add amount=<millisatoshis> to the callback")
    if _AMOUNT.fullmatch(text) is None:
        raise LnurlError("the amount must be a whole number of millisatoshis (amount=21000)")
    digits = text.lstrip("0") or "0"
    amount = int(digits) if len(digits) <= _AMOUNT_DIGITS else max_msat + 1
    if amount < min_msat:
        raise LnurlError(f"the amount {amount} msat is below the minimum, {min_msat} msat")
    if amount > max_msat:
        raise LnurlError(f"the amount {digits:.40} msat is above the maximum, {max_msat} msat")
    comment = query.get("comment", "") if comment_allowed > 0 else ""
    try:
        comment = clean_text(comment)
    except ValueError:
        raise LnurlError("the comment has control characters") from None
    if len(comment) > comment_allowed:
        raise LnurlError(
            f"the comment is {len(comment)} characters; at most {comment_allowed} are allowed"
        )
    return Msat(amount), comment


def clean_text(text: str) -> str:
    """``text`` (a comment, a memo) as it is kept: CR LF as a newline, a tab as a space.
    ``ValueError`` for another control character (C0, DEL, C1; a newline is fine), a bidi
    override or isolate, or a lone surrogate."""
    text = text.replace("\r\n", "\n").replace("\t", " ")
    if _FORBIDDEN.search(text) is not None:
        raise ValueError("control characters")
    return text


def callback_body(payment_request: str, success: SuccessAction | None) -> dict[str, object]:
    """The answer to a callback (LUD-06): the invoice, no routes, the success action if any."""
    body: dict[str, object] = {"pr": payment_request, "routes": []}
    action = success_action_body(success)
    if action is not None:
        body["successAction"] = action
    return body


def success_action_body(action: SuccessAction | None) -> dict[str, str] | None:
    """The ``successAction`` object of a callback's answer (LUD-09); None for none."""
    if action is None:
        return None
    if action.url:
        return {"tag": "url", "description": action.description, "url": action.url}
    return {"tag": "message", "message": action.message}


def error_body(reason: str) -> dict[str, str]:
    """An LNURL error answer: ``{"status": "ERROR", "reason": reason}``."""
    return {"status": "ERROR", "reason": reason}


def invoice_description_hash(payment_request: str) -> bytes:
    """The description hash (``h`` tag) of a BOLT11 invoice, b"" when it has none (it has a
    description, ``d``). Reads the tagged fields only: the signature is not checked (the
    caller made the invoice). ``bech32.Bech32Error`` for a text that is no bech32."""
    _, words = bech32.decode(payment_request)
    fields = words[_BOLT11_TIMESTAMP_WORDS : len(words) - _BOLT11_SIGNATURE_WORDS]
    index = 0
    while index + 3 <= len(fields):
        tag, length = fields[index], fields[index + 1] * 32 + fields[index + 2]
        data = fields[index + 3 : index + 3 + length]
        if tag == _BOLT11_H and length == _HASH_WORDS:
            return bech32.to_bytes(data)[:32]
        index += 3 + length
    return b""
