"""LNURL-pay (LUD-06) and Lightning Address (LUD-16): an invoice for an exact amount from a
payee's service, checked before anything is paid.

A destination is a Lightning Address (``name@domain``, ``name@host:port``), a bech32 LNURL
(``lnurl1...``, optionally after ``lightning:``), an ``lnurlp://`` URL (LUD-17) or the
``https://`` URL of the service itself; ``pay_url`` turns each into the URL it is fetched
from. Only HTTPS, but for hosts that need no TLS to be private: ``localhost``,
``127.0.0.1``, ``::1`` and ``.onion`` hosts may be plain ``http://``.

``LnurlPayClient.invoice`` fetches the service's ``payRequest`` (``tag``, ``callback``,
``minSendable``/``maxSendable``, ``metadata``), then the callback with ``amount`` (its own
query parameters kept), and returns the ``pr`` invoice only when it decodes (signature
verified), is for exactly that amount and commits to the metadata (its description hash is
sha256 of the metadata text). Answers are bounded in size and time; a redirect is followed
only within the same scheme, host and port (never to another host, silently or not). Every
failure raises ``errors.PayoutDestinationError`` with a reason naming the host.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import yarl

from gateway import errors
from gateway.client import bolt11
from gateway.client.bolt11 import _bech32, _to_bytes  # the bech32 reader invoices use
from gateway.ports import Msat
from gateway.text import printable

__all__ = ["MAX_BODY_BYTES", "TIMEOUT", "LnurlPayClient", "PayRequest", "pay_url"]

# Seconds one HTTP request (connection, redirects followed and body included) may take.
TIMEOUT = 10.0
# A payRequest or callback answer is a few hundred bytes; an invoice with route hints ~2 kB.
MAX_BODY_BYTES = 64 * 1024
# Seconds a payRequest (callback, bounds, metadata) is reused for the next invoice.
CACHE_SECONDS = 60.0
_MAX_REDIRECTS = 3
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_PLAIN_HTTP_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
# LUD-16: the name part of a Lightning Address.
_ADDRESS = re.compile(r"(?P<name>[a-z0-9._+-]{1,64})@(?P<host>[^@/?#\s]+)", re.IGNORECASE)
_REASON_CHARS = 200  # of a reason a service gives, in ours


@dataclass(frozen=True, slots=True)
class PayRequest:
    """A service's LUD-06 ``payRequest``: what it accepts and the metadata its invoices must
    commit to."""

    callback: yarl.URL
    min_sendable_msat: Msat
    max_sendable_msat: Msat
    metadata: str  # the JSON text itself: its sha256 is the invoices' description hash


def _fail(reason: str) -> errors.PayoutDestinationError:
    return errors.PayoutDestinationError(reason)


def _plain_http(url: yarl.URL) -> bool:
    """Whether ``url``'s host may be fetched without TLS (local, or an onion service)."""
    host = (url.host or "").lower()
    return host in _PLAIN_HTTP_HOSTS or host.endswith(".onion")


def _allowed(url: yarl.URL) -> yarl.URL:
    """``url`` if it may be fetched: HTTPS (plain HTTP only for a local or onion host), a
    host, no credentials in it."""
    host = (url.host or "").lower()
    if not url.is_absolute() or not host:
        raise _fail(f"not an absolute URL: {printable(str(url), 100)}")
    if url.user is not None or url.password is not None:
        raise _fail(f"a URL with credentials is refused: {host}")
    if url.scheme == "https":
        return url
    if url.scheme == "http" and _plain_http(url):
        return url
    if url.scheme == "http":
        raise _fail(f"plain http:// only for localhost, 127.0.0.1, ::1 or .onion, not {host}")
    raise _fail(f"not an https:// URL: {printable(str(url), 100)}")


def _lnurl_text(text: str) -> str:
    """The URL a bech32 LNURL encodes."""
    try:
        hrp, words = _bech32(text)
    except ValueError as error:
        raise _fail(f"not a valid LNURL: {error}") from None
    if hrp != "lnurl":
        raise _fail(f"not an LNURL: its prefix is {printable(hrp, 20)!r}")
    raw = _to_bytes(words)[: len(words) * 5 // 8]  # whole bytes: the rest is padding
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _fail("not a valid LNURL: it encodes no UTF-8 text") from None


def pay_url(destination: str) -> yarl.URL:
    """The URL of a destination's LNURL-pay service: ``name@domain`` ->
    ``https://domain/.well-known/lnurlp/name`` (``http://`` for a local or onion host),
    ``lnurl1...`` -> the URL it encodes, ``lnurlp://`` -> ``https://``, an ``https://`` URL
    as is. ``PayoutDestinationError`` for anything else, or a URL not allowed."""
    text = destination.strip()
    if text[:10].lower() == "lightning:":
        text = text[10:]
    lowered = text.lower()
    if lowered.startswith("lnurl1"):
        text = _lnurl_text(text)
        lowered = text.lower()
    address = _ADDRESS.fullmatch(text)
    if address is not None and "://" not in text:
        try:
            authority = yarl.URL(f"//{address['host']}")
        except ValueError:
            raise _fail(f"not a Lightning Address: {printable(text, 100)}") from None
        url = yarl.URL.build(
            scheme="http" if _plain_http(authority) else "https",
            host=authority.host or "",
            port=authority.explicit_port,
            path=f"/.well-known/lnurlp/{address['name']}",
        )
        return _allowed(url)
    if lowered.startswith("lnurlp://"):
        try:
            url = yarl.URL("https://" + text[9:])
        except ValueError:
            raise _fail(f"not a valid URL: {printable(text, 100)}") from None
        if _plain_http(url):  # LUD-17: onion (and local) services are plain http
            url = url.with_scheme("http")
        return _allowed(url)
    if lowered.startswith(("https://", "http://")):
        try:
            return _allowed(yarl.URL(text))
        except ValueError:
            raise _fail(f"not a valid URL: {printable(text, 100)}") from None
    raise _fail(
        "not a Lightning Address, LNURL or https:// URL: "
        f"{printable(text, 100)!r} (a node's public key is paid by keysend)"
    )


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class LnurlPayClient:
    """Fetches invoices from LNURL-pay services (``gateway.service.payout.PayRequests``).

    ``session``: an aiohttp session to use (the caller closes it); by default one of its own,
    made on first use and closed by ``close()``. ``timeout``: seconds per HTTP request;
    ``max_body_bytes``: the largest answer read; ``cache_seconds``: how long a service's
    ``payRequest`` is reused (an invoice that fails its checks drops it)."""

    def __init__(
        self,
        *,
        session: aiohttp.ClientSession | None = None,
        timeout: float = TIMEOUT,
        max_body_bytes: int = MAX_BODY_BYTES,
        cache_seconds: float = CACHE_SECONDS,
    ) -> None:
        self._session = session
        self._owns_session = session is None
        self._timeout = timeout
        self._max_body_bytes = max_body_bytes
        self._cache_seconds = cache_seconds
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
        if cached is not None and time.monotonic() - cached[0] < self._cache_seconds:
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
            callback_url = _allowed(yarl.URL(callback))
        except ValueError:
            raise _fail(f"{host}: the payRequest's callback is no URL") from None
        least, most = _int(data.get("minSendable")), _int(data.get("maxSendable"))
        if least is None or most is None or not 1 <= least <= most:
            raise _fail(f"{host}: the payRequest's minSendable/maxSendable are not 1 <= min <= max")
        metadata = data.get("metadata")
        if not isinstance(metadata, str) or not _is_metadata(metadata):
            raise _fail(f"{host}: the payRequest's metadata is not a JSON array in a string")
        request = PayRequest(callback_url, Msat(least), Msat(most), metadata)
        self._cache[destination] = (time.monotonic(), request)
        return request

    async def bounds(self, destination: str) -> tuple[Msat, Msat]:
        """The smallest and largest amount (msat) the destination's service accepts."""
        request = await self.pay_request(destination)
        return request.min_sendable_msat, request.max_sendable_msat

    async def invoice(self, destination: str, amount_msat: Msat) -> str:
        """A BOLT11 invoice for exactly ``amount_msat`` from the destination's service,
        checked: it decodes with a valid signature, its amount is ``amount_msat`` and its
        description hash is sha256 of the service's metadata."""
        try:
            return await self._invoice(destination, amount_msat)
        except errors.PayoutDestinationError:
            self._cache.pop(destination, None)  # fetched afresh next time
            raise

    async def _invoice(self, destination: str, amount_msat: Msat) -> str:
        request = await self.pay_request(destination)
        host = request.callback.host
        if not request.min_sendable_msat <= amount_msat <= request.max_sendable_msat:
            raise _fail(
                f"{host}: {amount_msat} msat is outside the service's range "
                f"{request.min_sendable_msat} to {request.max_sendable_msat} msat"
            )
        data = await self._get_json(request.callback.update_query(amount=str(amount_msat)))
        text = data.get("pr")
        if not isinstance(text, str) or not text:
            raise _fail(f"{host}: the callback's answer has no invoice (pr)")
        try:
            invoice = bolt11.decode(text)
        except ValueError as error:
            raise _fail(f"{host}: the invoice is not a valid BOLT11 invoice: {error}") from None
        if invoice.amount_msat != amount_msat:
            raise _fail(
                f"{host}: the invoice is for {invoice.amount_msat} msat, not {amount_msat} msat"
            )
        if invoice.description_hash != hashlib.sha256(request.metadata.encode()).digest():
            raise _fail(f"{host}: the invoice's description hash is not that of the metadata")
        return text

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
            raise _fail(f"{url.host}: no answer within {self._timeout:g} s") from None
        except aiohttp.ClientError as error:
            raise _fail(f"{url.host}: cannot fetch {url.path}: {error}") from None

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
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(16 * 1024):
            size += len(chunk)
            if size > limit:
                raise _fail(f"{url.host}: an answer of more than {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    @staticmethod
    def _json(url: yarl.URL, status: int, body: bytes) -> dict[str, Any]:
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            data = None
        if isinstance(data, dict) and str(data.get("status", "")).upper() == "ERROR":
            reason = data.get("reason")
            shown = printable(reason, _REASON_CHARS) if isinstance(reason, str) else "no reason"
            raise _fail(f"{url.host} refused: {shown}")
        if status != 200:
            raise _fail(f"{url.host}: HTTP {status} for {printable(url.path, 100)}")
        if not isinstance(data, dict):
            raise _fail(f"{url.host}: the answer is not a JSON object")
        return data


def _is_metadata(text: str) -> bool:
    """Whether ``text`` is LUD-06 metadata: a JSON array of arrays."""
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, list) and all(isinstance(entry, list) for entry in value)
