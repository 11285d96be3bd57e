"""aiohttp integration: a middleware that puts a Lightning price on an application's routes.

Usage::

    from gateway import load_config, running_gateway
    from gateway.web.aiohttp import TOKEN, setup_l402

    app = web.Application()
    setup_l402(app, lambda: running_gateway(load_config("gateway.toml")))

    async def handler(request):
        token = request.get(TOKEN)  # PaidToken on a priced route, None on a free one

``setup_l402`` registers a ``cleanup_ctx`` entry, so the LND channel, the store and the
settlement watcher start with the application and stop with it.

Browsers get the paywall page (:mod:`gateway.web.paywall`): the middleware answers
``POST /.well-known/l402/redeem`` itself and accepts the ``L402`` cookie it sets as the
credential when the request has no L402 ``Authorization``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from aiohttp import hdrs, web
from aiohttp.typedefs import Middleware

from gateway.service import (
    Allow,
    Decision,
    Deny,
    L402Service,
    PaidToken,
    RequestInfo,
    l402_cookie_values,
)
from gateway.web.paywall import MAX_REDEEM_BODY, REDEEM_PATH, handle_redeem, render_challenge
from gateway.web.responses import HttpResponse, client_address

TOKEN = web.RequestKey("l402_token", PaidToken)
_AUTHORIZATION = hdrs.AUTHORIZATION

GatewayFactory = Callable[[], AbstractAsyncContextManager[L402Service]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(slots=True)
class _ServiceSlot:
    """Filled in when the application starts (the app itself is frozen by then)."""

    service: L402Service | None = None


_SLOT = web.AppKey("l402_service_slot", _ServiceSlot)


def request_info(request: web.BaseRequest, trust_forwarded_for: bool) -> RequestInfo:
    return RequestInfo(
        method=request.method,
        path=request.path,
        client=client_address(
            request.remote,
            ",".join(request.headers.getall(hdrs.X_FORWARDED_FOR, ())),
            trust_forwarded_for,
        ),
        authorization=tuple(request.headers.getall(hdrs.AUTHORIZATION, ())),
        query=request.query_string,
        headers=tuple(request.headers.items()),
        cookies=l402_cookie_values(request.headers.getall(hdrs.COOKIE, ())),
    )


def _response(response: HttpResponse) -> web.Response:
    return web.Response(status=response.status, headers=list(response.headers), body=response.body)


async def _read_limited(request: web.Request, limit: int) -> bytes:
    """The body, or its first ``limit + 1`` bytes when it is longer."""
    if request.content_length is not None and request.content_length > limit:
        return b"x" * (limit + 1)  # too large: not worth reading
    body = bytearray()
    while len(body) <= limit:
        chunk = await request.content.read(limit + 1 - len(body))
        if not chunk:
            break
        body += chunk
    return bytes(body)


async def _redeem(request: web.Request, service: L402Service | None) -> web.Response:
    body = await _read_limited(request, MAX_REDEEM_BODY) if request.method == "POST" else b""
    return _response(
        await handle_redeem(
            service,
            method=request.method,
            content_type=request.headers.get(hdrs.CONTENT_TYPE),
            fetch_site=request.headers.get("Sec-Fetch-Site"),
            body=body,
        )
    )


def l402_middleware(slot: _ServiceSlot, trust_forwarded_for: bool) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        service = slot.service
        path = request.path
        if path == REDEEM_PATH:
            return await _redeem(request, service)
        if service is None:
            decision: Decision = Deny(503, "gateway is starting", retry_after=1)
        else:
            authorization = tuple(request.headers.getall(_AUTHORIZATION, ()))
            decision = service.allowed_again(
                authorization, request.method, path
            ) or await service.authorize(request_info(request, trust_forwarded_for))
        if isinstance(decision, Allow):
            if decision.token is not None:
                request[TOKEN] = decision.token
            return await handler(request)
        accept = ",".join(request.headers.getall(hdrs.ACCEPT, ())) or None
        return _response(render_challenge(decision, method=request.method, accept=accept))

    return middleware


def setup_l402(
    app: web.Application, gateway: GatewayFactory, *, trust_forwarded_for: bool = False
) -> None:
    """Price ``app``'s routes; ``gateway`` opens the service for the app's lifetime."""
    slot = _ServiceSlot()
    app[_SLOT] = slot

    async def lifecycle(_app: web.Application) -> AsyncIterator[None]:
        async with gateway() as service:
            slot.service = service
            try:
                yield
            finally:
                slot.service = None

    app.cleanup_ctx.append(lifecycle)
    app.middlewares.append(l402_middleware(slot, trust_forwarded_for))
