"""Reverse proxy mode: the gateway in front of any HTTP backend.

Paid (or free) requests are streamed to the upstream and its response streamed back.
Hop-by-hop headers are dropped both ways; the client's L402 credential is not forwarded
(the preimage is a bearer secret): neither its ``Authorization`` nor the paywall's ``L402``
cookie (other cookies are). The verified token's facts are, in ``token_header``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.service import without_l402_cookie
from gateway.web.aiohttp import TOKEN, GatewayFactory, setup_l402
from gateway.web.responses import token_header_value

log = logging.getLogger(__name__)

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
CHUNK = 64 * 1024
# Statuses whose responses never have a body, whatever their Content-Length says.
_NO_BODY = frozenset({204, 304})
_SESSION = web.AppKey("l402_proxy_session", aiohttp.ClientSession)


def _end_to_end(headers: CIMultiDictProxy[str], also_drop: frozenset[str]) -> CIMultiDict[str]:
    named = {
        name.strip().lower()
        for value in headers.getall(hdrs.CONNECTION, ())
        for name in value.split(",")
    }
    drop = HOP_BY_HOP | named | also_drop
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop)


def _problem(status: int, title: str, detail: str) -> web.Response:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    return web.Response(
        status=status, text=json.dumps(body), content_type="application/problem+json"
    )


class _BodyTooLarge(Exception):
    pass


class _LimitedBody:
    """The request body, streamed, failing past ``limit`` bytes.

    aiohttp's client reports an exception raised by the body it sends as a ClientError, so
    the overflow is also remembered in ``exceeded``.
    """

    def __init__(self, stream: aiohttp.StreamReader, limit: int) -> None:
        self._stream = stream
        self._limit = limit
        self.exceeded = False

    async def chunks(self) -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in self._stream.iter_chunked(CHUNK):
            seen += len(chunk)
            if seen > self._limit:
                self.exceeded = True
                raise _BodyTooLarge
            yield chunk


def build_proxy(
    upstream: str,
    gateway: GatewayFactory,
    *,
    token_header: str = "X-L402-Token",  # noqa: S107 - a header name
    trust_forwarded_for: bool = False,
    max_body_bytes: int = 10 * 1024 * 1024,
    upstream_timeout: float = 300.0,
) -> web.Application:
    """An aiohttp application that prices requests and forwards them to ``upstream``."""
    base = str(URL(upstream.rstrip("/")))
    app = web.Application(client_max_size=max_body_bytes)
    setup_l402(app, gateway, trust_forwarded_for=trust_forwarded_for)
    # Content-Length is kept: the body is forwarded with the length the client declared.
    request_drop = frozenset({"host", "authorization", token_header.lower()})

    async def client_session(app: web.Application) -> AsyncIterator[None]:
        timeout = aiohttp.ClientTimeout(total=upstream_timeout, sock_connect=10)
        async with aiohttp.ClientSession(
            timeout=timeout,
            auto_decompress=False,
            # One session serves every client: a cookie jar would hand one client's upstream
            # session cookie to all the others.
            cookie_jar=aiohttp.DummyCookieJar(),
            # Forward the client's headers, not aiohttp's defaults (an Accept-Encoding the
            # client never sent would get it a compressed body it cannot read).
            skip_auto_headers=(
                hdrs.ACCEPT,
                hdrs.ACCEPT_ENCODING,
                hdrs.USER_AGENT,
                hdrs.CONTENT_TYPE,
            ),
        ) as session:
            app[_SESSION] = session
            yield

    app.cleanup_ctx.append(client_session)

    async def forward(request: web.Request) -> web.StreamResponse:
        if request.content_length is not None and request.content_length > max_body_bytes:
            return _problem(413, "Content Too Large", f"body over {max_body_bytes} bytes")
        headers = _end_to_end(request.headers, request_drop)
        cookies = [without_l402_cookie(value) for value in headers.popall(hdrs.COOKIE, ())]
        for value in cookies:
            if value is not None:
                headers.add(hdrs.COOKIE, value)
        peer = request.remote or ""
        prior = ", ".join(request.headers.getall(hdrs.X_FORWARDED_FOR, ()))
        headers[hdrs.X_FORWARDED_FOR] = f"{prior}, {peer}" if prior else peer
        headers[hdrs.X_FORWARDED_PROTO] = request.scheme
        headers[hdrs.X_FORWARDED_HOST] = request.host
        token = request.get(TOKEN)
        if token is not None:
            headers[token_header] = token_header_value(token)
        body = _LimitedBody(request.content, max_body_bytes) if request.body_exists else None
        response: web.StreamResponse | None = None
        try:
            async with request.app[_SESSION].request(
                request.method,
                # Verbatim: the path the rules were matched on, not a re-normalized one.
                URL(base + request.rel_url.raw_path_qs, encoded=True),
                headers=headers,
                data=body.chunks() if body is not None else None,
                allow_redirects=False,
            ) as upstream_response:
                status, reason = upstream_response.status, upstream_response.reason
                response_headers = _end_to_end(upstream_response.headers, frozenset())
                length = upstream_response.content_length
                if (
                    length is not None
                    and length <= CHUNK
                    and request.method != hdrs.METH_HEAD
                    and status not in _NO_BODY
                ):
                    # Small and whole: headers and body leave in one write.
                    body_bytes = await upstream_response.read()
                    return web.Response(
                        status=status, reason=reason, headers=response_headers, body=body_bytes
                    )
                response = web.StreamResponse(
                    status=status, reason=reason, headers=response_headers
                )
                await response.prepare(request)
                async for chunk in upstream_response.content.iter_chunked(CHUNK):
                    await response.write(chunk)
                await response.write_eof()
                return response
        except _BodyTooLarge:
            return _problem(413, "Content Too Large", f"body over {max_body_bytes} bytes")
        except (aiohttp.ClientError, TimeoutError) as error:
            if response is not None and response.prepared:
                # Mid-body: abort the connection rather than end a truncated body cleanly.
                log.warning("upstream %s failed mid-response: %s", base, error)
                raise
            if body is not None and body.exceeded:
                return _problem(413, "Content Too Large", f"body over {max_body_bytes} bytes")
            log.warning("upstream %s failed: %s", base, error)
            return _problem(502, "Bad Gateway", "upstream unavailable")

    app.router.add_route("*", "/{tail:.*}", forward)
    return app
