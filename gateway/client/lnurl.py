"""LNURL-pay (LUD-06) and Lightning Address (LUD-16): an invoice for an amount from a payee's
service, checked to commit to the service's metadata before anything is paid.

What a destination may be, and the URL it is fetched from, is ``gateway.destinations``'
(``pay_url``): a Lightning Address, a bech32 LNURL, an ``lnurlp://`` URL (LUD-17) or the
``https://`` URL of the service itself; plain ``http://`` only for a loopback or onion host.

``LnurlPayClient.request_invoice`` fetches the service's ``payRequest`` (``tag``,
``callback``, ``minSendable``/``maxSendable``, ``metadata``, ``commentAllowed`` of LUD-12),
checks the amount and the comment against it (``PayRequest.problem``), then calls the
callback with ``amount`` (and ``comment``) appended, its own query parameters kept as they
are. It returns the ``pr`` invoice only when it decodes (signature verified), is for exactly
the amount asked and commits to the metadata (its description hash is sha256 of the metadata
text, ``gateway.lnurl.description_hash``), with the service's success action (LUD-09
``message`` or ``url``, LUD-10 ``aes``, checked; ``ReceivedSuccessAction.text`` shows it once
paid, decrypting an ``aes`` one with the payment's preimage). ``invoice`` is the payout
worker's: the invoice alone, no comment; the worker checks the rest (network, expiry,
payment secret), knowing the node.

A callback on ``localhost``, a loopback, private or link-local address, or over plain HTTP,
is followed only from a service on that same host (never from a public one into the
merchant's network). Answers are bounded in size, nesting and time; a redirect is followed
only within the same scheme, host and port (never to another host, silently or not). Every
failure raises ``errors.PayoutDestinationError`` with a reason naming the host;
``LnurlUnreachable``, one of them, when the service gave no answer (unreachable, too slow,
an HTTP 5xx): worth trying again later.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import yarl
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from gateway import destinations, errors
from gateway.client import bolt11
from gateway.client.offer import read_at_most
from gateway.lnurl import MAX_SUCCESS_CHARS, description_hash
from gateway.ports import Msat
from gateway.text import printable

__all__ = [
    "MAX_BODY_BYTES",
    "TIMEOUT",
    "LnurlInvoice",
    "LnurlPayClient",
    "LnurlUnreachable",
    "PayRequest",
    "ReceivedSuccessAction",
    "pay_url",
]

# Seconds one HTTP request (connection, redirects followed and body included) may take.
TIMEOUT = 10.0
# A payRequest's metadata may carry a 100 KiB image (LUD-06: 136536 base64 characters); a
# callback's answer is an invoice, ~2 kB with route hints.
MAX_BODY_BYTES = 256 * 1024
# Seconds a payRequest (callback, bounds, metadata) is reused for the next invoice.
CACHE_SECONDS = 60.0
_MAX_REDIRECTS = 3
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_REASON_CHARS = 200  # of a reason a service gives, in ours
# LUD-10: the longest ciphertext (bytes); a message or description is MAX_SUCCESS_CHARS long
_CIPHERTEXT_BYTES = 4096
_SUCCESS_TAGS = frozenset({"message", "url", "aes"})


class LnurlUnreachable(errors.PayoutDestinationError):
    """The LNURL-pay service gave no answer: unreachable, too slow, or an HTTP 5xx."""


@dataclass(frozen=True, slots=True)
class PayRequest:
    """A service's LUD-06 ``payRequest``: what it accepts and the metadata its invoices must
    commit to."""

    callback: yarl.URL
    min_sendable_msat: Msat
    max_sendable_msat: Msat
    metadata: str  # the JSON text itself: its sha256 is the invoices' description hash
    comment_allowed: int = 0  # LUD-12: the longest comment (characters) it takes; 0: none

    @property
    def description(self) -> str:
        """The metadata's ``text/plain`` entry: what the payment is for ("" without one)."""
        for entry in json.loads(self.metadata):
            if len(entry) == 2 and entry[0] == "text/plain" and isinstance(entry[1], str):
                return entry[1]
        return ""

    def problem(self, amount_msat: int, comment: str = "") -> str | None:
        """Why the service does not take ``amount_msat`` with ``comment`` (its bounds, its
        ``commentAllowed``), or None when it does."""
        if not self.min_sendable_msat <= amount_msat <= self.max_sendable_msat:
            return (
                f"{amount_msat} msat is outside the service's range "
                f"{self.min_sendable_msat} to {self.max_sendable_msat} msat"
            )
        if comment and not self.comment_allowed:
            return "the service takes no comment"
        if len(comment) > self.comment_allowed:
            return (
                f"the comment is {len(comment)} characters, the service takes at most "
                f"{self.comment_allowed}"
            )
        return None


@dataclass(frozen=True, slots=True)
class ReceivedSuccessAction:
    """What a service asks the payer to show once paid: ``tag`` ``"message"`` (LUD-09, the
    ``message``), ``"url"`` (LUD-09, ``description`` and the ``url``, on the callback's host)
    or ``"aes"`` (LUD-10, ``description`` and a text encrypted with the preimage).

    Not ``gateway.lnurl.SuccessAction``, what our own service sends: that one is a message
    or a URL only, checked as configuration (a ValueError); a payer also receives LUD-10's
    ``aes`` (ciphertext, iv) and decrypts it, and refuses what it received with a
    ``PayoutDestinationError`` naming the service's host."""

    tag: str
    message: str = ""
    description: str = ""
    url: str = ""
    ciphertext: bytes = b""
    iv: bytes = b""

    def plaintext(self, preimage: bytes | None) -> str:
        """An ``aes`` action's text: its ciphertext decrypted by AES-256-CBC with the
        payment's preimage as the key (LUD-10); ``PayoutDestinationError`` without the
        preimage, or if it does not decrypt to text."""
        if preimage is None:
            raise _fail("the aes success action needs the payment's preimage")
        try:
            decryptor = Cipher(algorithms.AES(preimage), modes.CBC(self.iv)).decryptor()
            padded = decryptor.update(self.ciphertext) + decryptor.finalize()
            unpadder = padding.PKCS7(algorithms.AES.block_size).unpadder()
            text = (unpadder.update(padded) + unpadder.finalize()).decode()
        except ValueError:  # a bad key or padding; a UnicodeDecodeError is a ValueError
            raise _fail("the aes success action does not decrypt with the preimage") from None
        return text

    def text(self, preimage: bytes | None) -> str:
        """The action as one line or two to show, service text escaped (``printable``): the
        message; the description and the URL; the description and the decrypted text."""
        if self.tag == "message":
            return printable(self.message)
        if self.tag == "url":
            return f"{printable(self.description)}\n{printable(self.url)}"
        return f"{printable(self.description)}\n{printable(self.plaintext(preimage))}"

    def as_json(self, preimage: bytes | None) -> dict[str, str]:
        """The action as JSON: its tag and fields, an ``aes`` one decrypted (``plaintext``)."""
        if self.tag == "message":
            return {"tag": "message", "message": self.message}
        if self.tag == "url":
            return {"tag": "url", "description": self.description, "url": self.url}
        return {
            "tag": "aes",
            "description": self.description,
            "plaintext": self.plaintext(preimage),
        }


@dataclass(frozen=True, slots=True)
class LnurlInvoice:
    """A service's invoice, checked, and what to show once it is paid."""

    payment_request: str
    invoice: bolt11.Invoice
    success_action: ReceivedSuccessAction | None


def _fail(reason: str) -> errors.PayoutDestinationError:
    return errors.PayoutDestinationError(reason)


def pay_url(destination: str) -> yarl.URL:
    """The URL of a destination's LNURL-pay service (``gateway.destinations.pay_url``);
    ``PayoutDestinationError`` for a destination that names none allowed."""
    try:
        return destinations.pay_url(destination)
    except destinations.DestinationError as error:
        raise _fail(str(error)) from None


def _with_amount(callback: yarl.URL, amount_msat: int, comment: str = "") -> yarl.URL:
    """``callback`` with ``amount=`` (and a non-empty ``comment=``, percent-encoded)
    appended to its query, its other parameters kept as they are written (``?flag`` stays
    valueless); an ``amount`` or ``comment`` it had is replaced."""
    kept = [
        part
        for part in callback.raw_query_string.split("&")
        if part and part.split("=", 1)[0] not in ("amount", "comment")
    ]
    added = [f"amount={amount_msat:d}"]
    if comment:
        added.append(f"comment={urllib.parse.quote(comment, safe='')}")
    query = "&".join([*kept, *added])
    return yarl.URL(f"{callback.with_query(None)}?{query}", encoded=True)


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class LnurlPayClient:
    """Fetches invoices from LNURL-pay services (``gateway.service.payout.PayRequests``,
    ``l402-gateway pay``).

    ``session``: an aiohttp session to use (the caller closes it); by default one of its own,
    made on first use and closed by ``close()``. ``timeout``: seconds per HTTP request;
    ``max_body_bytes``: the largest answer read; ``cache_seconds``: how long a service's
    ``payRequest`` is reused (an invoice that fails its checks drops it, and so does
    ``forget``), timed by ``monotonic`` (seconds; ``time.monotonic`` by default: the cache
    is this process's, and must not jump with the wall clock)."""

    def __init__(
        self,
        *,
        session: aiohttp.ClientSession | None = None,
        timeout: float = TIMEOUT,
        max_body_bytes: int = MAX_BODY_BYTES,
        cache_seconds: float = CACHE_SECONDS,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._session = session
        self._owns_session = session is None
        self._timeout = timeout
        self._max_body_bytes = max_body_bytes
        self._cache_seconds = cache_seconds
        self._monotonic = monotonic
        self._cache: dict[str, tuple[float, PayRequest]] = {}

    async def __aenter__(self) -> LnurlPayClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None

    async def pay_request(self, destination: str) -> PayRequest:
        """The destination's ``payRequest``, checked (fetched again after ``cache_seconds``)."""
        cached = self._cache.get(destination)
        if cached is not None and self._monotonic() - cached[0] < self._cache_seconds:
            return cached[1]
        url = pay_url(destination)
        data = await self._get_json(url)
        host = url.host
        if data.get("tag") != "payRequest":
            tag = data.get("tag")
            shown = printable(tag, 40) if isinstance(tag, str) else repr(type(tag).__name__)
            raise _fail(f"{host}: not an LNURL-pay service (tag {shown})")
        callback = data.get("callback")
        if not isinstance(callback, str):
            raise _fail(f"{host}: the payRequest has no callback")
        try:
            callback_url = destinations.callback_url(url, callback)
        except destinations.DestinationError as error:
            raise _fail(f"{host}: {error}") from None
        least, most = _int(data.get("minSendable")), _int(data.get("maxSendable"))
        if least is None or most is None or not 1 <= least <= most:
            raise _fail(f"{host}: the payRequest's minSendable/maxSendable are not 1 <= min <= max")
        metadata = data.get("metadata")
        if not isinstance(metadata, str) or not _is_metadata(metadata):
            raise _fail(f"{host}: the payRequest's metadata is not a JSON array in a string")
        allowed = _int(data.get("commentAllowed"))
        request = PayRequest(callback_url, Msat(least), Msat(most), metadata, max(0, allowed or 0))
        self._cache[destination] = (self._monotonic(), request)
        return request

    async def bounds(self, destination: str) -> tuple[Msat, Msat]:
        """The smallest and largest amount (msat) the destination's service accepts."""
        request = await self.pay_request(destination)
        return request.min_sendable_msat, request.max_sendable_msat

    def forget(self, destination: str) -> None:
        """Drop the destination's ``payRequest``: the next invoice fetches it afresh."""
        self._cache.pop(destination, None)

    async def invoice(self, destination: str, amount_msat: Msat) -> str:
        """A BOLT11 invoice for ``amount_msat`` from the destination's service, checked
        (``request_invoice``); its network and expiry are the caller's to check."""
        return (await self.request_invoice(destination, amount_msat)).payment_request

    async def request_invoice(
        self, destination: str, amount_msat: Msat, comment: str = ""
    ) -> LnurlInvoice:
        """An invoice for ``amount_msat`` from the destination's service, ``comment`` sent
        with it (LUD-12), checked: the service takes the amount and the comment, the invoice
        decodes with a valid signature, is for exactly ``amount_msat`` and its description
        hash is sha256 of the service's metadata; a success action it names is well formed.
        Its network and expiry are the caller's to check."""
        try:
            return await self._invoice(destination, amount_msat, comment)
        except errors.PayoutDestinationError:
            self.forget(destination)
            raise

    async def _invoice(self, destination: str, amount_msat: Msat, comment: str) -> LnurlInvoice:
        request = await self.pay_request(destination)
        host = request.callback.host
        problem = request.problem(amount_msat, comment)
        if problem is not None:
            raise _fail(f"{host}: {problem}")
        data = await self._get_json(_with_amount(request.callback, amount_msat, comment))
        text = data.get("pr")
        if not isinstance(text, str) or not text:
            raise _fail(f"{host}: the callback's answer has no invoice (pr)")
        try:
            invoice = bolt11.decode(text)
        except ValueError as error:
            raise _fail(f"{host}: the invoice is not a valid BOLT11 invoice: {error}") from None
        if invoice.amount_msat != amount_msat:
            raise _fail(
                f"{host}: the invoice is for {invoice.amount_msat} msat, not the "
                f"{amount_msat} msat asked"
            )
        if invoice.description_hash != description_hash(request.metadata):
            raise _fail(f"{host}: the invoice's description hash is not that of the metadata")
        action = _success_action(request.callback, data.get("successAction"))
        return LnurlInvoice(text, invoice, action)

    def _session_now(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def _get_json(self, url: yarl.URL) -> dict[str, Any]:
        """The JSON object at ``url``; an LUD-06 error answer (``"status": "ERROR"``) raised
        with its reason. Redirects are followed only within the same scheme, host, port."""
        session = self._session_now()
        origin = (url.scheme, url.host, url.port)
        try:
            async with asyncio.timeout(self._timeout):
                for _ in range(_MAX_REDIRECTS + 1):
                    async with session.get(
                        url, allow_redirects=False, headers={"Accept": "application/json"}
                    ) as response:
                        if response.status in _REDIRECTS:
                            url = self._redirected(url, origin, response.headers.get("Location"))
                            continue
                        body = await self._body(response, url)
                        return self._json(url, response.status, body)
                raise _fail(f"{url.host}: more than {_MAX_REDIRECTS} redirects")
        except TimeoutError:
            raise LnurlUnreachable(f"{url.host}: no answer within {self._timeout:g} s") from None
        except aiohttp.ClientError as error:
            raise LnurlUnreachable(f"{url.host}: cannot fetch {url.path}: {error}") from None

    @staticmethod
    def _redirected(url: yarl.URL, origin: tuple[Any, ...], location: str | None) -> yarl.URL:
        if not location:
            raise _fail(f"{url.host}: a redirect without a Location")
        try:
            target = url.join(yarl.URL(location))
        except ValueError:
            raise _fail(f"{url.host}: a redirect to no valid URL") from None
        if (target.scheme, target.host, target.port) != origin:
            raise _fail(
                f"{url.host}: redirects to another host or scheme "
                f"({printable(str(target.origin()), 100)}): not followed"
            )
        return target

    async def _body(self, response: aiohttp.ClientResponse, url: yarl.URL) -> bytes:
        """The response body, refused beyond ``max_body_bytes``."""
        limit = self._max_body_bytes
        if response.content_length is not None and response.content_length > limit:
            raise _fail(f"{url.host}: an answer of more than {limit} bytes")
        body = await read_at_most(response.content.iter_any(), limit)
        if len(body) > limit:
            raise _fail(f"{url.host}: an answer of more than {limit} bytes")
        return body

    @staticmethod
    def _json(url: yarl.URL, status: int, body: bytes) -> dict[str, Any]:
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):  # a UnicodeDecodeError is a ValueError
            data = None
        if isinstance(data, dict) and str(data.get("status", "")).upper() == "ERROR":
            reason = data.get("reason")
            shown = printable(reason, _REASON_CHARS) if isinstance(reason, str) else "no reason"
            raise _fail(f"{url.host} refused: {shown}")
        if status != 200:
            failed = LnurlUnreachable if status >= 500 else errors.PayoutDestinationError
            raise failed(f"{url.host}: HTTP {status} for {printable(url.path, 100)}")
        if not isinstance(data, dict):
            raise _fail(f"{url.host}: the answer is not a JSON object")
        return data


def _is_metadata(text: str) -> bool:
    """Whether ``text`` is LUD-06 metadata: a JSON array of arrays."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # nested deeper than the interpreter's stack
        return False
    return isinstance(value, list) and all(isinstance(entry, list) for entry in value)


def _text(action: dict[str, Any], key: str, host: str | None) -> str:
    value = action.get(key)
    if not isinstance(value, str) or len(value) > MAX_SUCCESS_CHARS:
        raise _fail(
            f"{host}: the success action's {key} is not a text of at most {MAX_SUCCESS_CHARS} "
            "characters"
        )
    return value


def _base64(action: dict[str, Any], key: str, host: str | None) -> bytes:
    value = action.get(key)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):  # binascii.Error is a ValueError
            return base64.b64decode(value, validate=True)
    raise _fail(f"{host}: the aes success action's {key} is not base64")


def _success_action(callback: yarl.URL, value: object) -> ReceivedSuccessAction | None:
    """The callback answer's ``successAction``, checked (LUD-09, LUD-10); None without one,
    or with a tag this client does not know (a later LUD: nothing to show)."""
    host = callback.host
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _fail(f"{host}: the success action is not a JSON object")
    tag = value.get("tag")
    if tag not in _SUCCESS_TAGS:
        return None
    if tag == "message":
        return ReceivedSuccessAction("message", message=_text(value, "message", host))
    description = _text(value, "description", host)
    if tag == "url":
        url = value.get("url")
        try:
            target = destinations.url_allowed(yarl.URL(url if isinstance(url, str) else ""))
        except (ValueError, destinations.DestinationError):
            raise _fail(f"{host}: the success action's url is not an https:// URL") from None
        if (target.raw_host or "").lower() != (callback.raw_host or "").lower():
            raise _fail(f"{host}: the success action's url is not on the callback's host")
        return ReceivedSuccessAction("url", description=description, url=str(target))
    ciphertext, iv = _base64(value, "ciphertext", host), _base64(value, "iv", host)
    if (
        len(iv) != 16
        or not ciphertext
        or len(ciphertext) % 16
        or len(ciphertext) > _CIPHERTEXT_BYTES
    ):
        raise _fail(
            f"{host}: the aes success action's iv is not 16 bytes, or its ciphertext not "
            f"whole AES blocks of at most {_CIPHERTEXT_BYTES} bytes"
        )
    return ReceivedSuccessAction("aes", description=description, ciphertext=ciphertext, iv=iv)
