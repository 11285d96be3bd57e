"""Reverse proxy mode: the gateway in front of any HTTP backend.

Paid (or free) requests are streamed to the upstream and its response streamed back.
Hop-by-hop headers are dropped both ways; the client's L402 credential is not forwarded
(the preimage is a bearer secret), the verified token's facts are, in ``token_header``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy

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


async def _limited(stream: aiohttp.StreamReader, limit: int) -> AsyncIterator[bytes]:
    seen = 0
    async for chunk in stream.iter_chunked(CHUNK):
        seen += len(chunk)
        if seen > limit:
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
    base = upstream.rstrip("/")
    app = web.Application(client_max_size=max_body_bytes)
    setup_l402(app, gateway, trust_forwarded_for=trust_forwarded_for)
    request_drop = frozenset({"host", "authorization", token_header.lower(), "content-length"})

    async def client_session(app: web.Application) -> AsyncIterator[None]:
        timeout = aiohttp.ClientTimeout(total=upstream_timeout, sock_connect=10)
        async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
            app[_SESSION] = session
            yield

    app.cleanup_ctx.append(client_session)

    async def forward(request: web.Request) -> web.StreamResponse:
        if request.content_length is not None and request.content_length > max_body_bytes:
            return _problem(413, "Content Too Large", f"body over {max_body_bytes} bytes")
        headers = _end_to_end(request.headers, request_drop)
        peer = request.remote or ""
        prior = request.headers.get(hdrs.X_FORWARDED_FOR)
        headers[hdrs.X_FORWARDED_FOR] = f"{prior}, {peer}" if prior else peer
        headers[hdrs.X_FORWARDED_PROTO] = request.scheme
        headers[hdrs.X_FORWARDED_HOST] = request.host
        token = request.get(TOKEN)
        if token is not None:
            headers[token_header] = token_header_value(token)
        body = _limited(request.content, max_body_bytes) if request.body_exists else None
        response: web.StreamResponse | None = None
        try:
            async with request.app[_SESSION].request(
                request.method,
                base + request.rel_url.raw_path_qs,
                headers=headers,
                data=body,
                allow_redirects=False,
            ) as upstream_response:
                response = web.StreamResponse(
                    status=upstream_response.status,
                    reason=upstream_response.reason,
                    headers=_end_to_end(upstream_response.headers, frozenset()),
                )
                await response.prepare(request)
                async for chunk in upstream_response.content.iter_chunked(CHUNK):
                    await response.write(chunk)
                await response.write_eof()
                return response
        except _BodyTooLarge:
            return _problem(413, "Content Too Large", f"body over {max_body_bytes} bytes")
        except (aiohttp.ClientError, TimeoutError) as error:
            log.warning("upstream %s failed: %s", base, error)
            if response is not None and response.prepared:
                # Mid-body: abort the connection rather than end a truncated body cleanly.
                raise
            return _problem(502, "Bad Gateway", "upstream unavailable")

    app.router.add_route("*", "/{tail:.*}", forward)
    return app
