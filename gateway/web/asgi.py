"""ASGI integration: a middleware that puts a Lightning price on any ASGI application
(FastAPI, Starlette, Litestar, a bare ASGI callable, ...).

Usage with FastAPI (or Starlette: ``Starlette(routes=..., lifespan=...)``)::

    from fastapi import FastAPI, Request

    from gateway.config import load_config
    from gateway.runtime import running_gateway
    from gateway.web.asgi import L402Middleware, l402_lifespan

    config = load_config("gateway.toml")
    app = FastAPI(lifespan=l402_lifespan(lambda: running_gateway(config)))
    app.add_middleware(L402Middleware)

    @app.get("/weather")
    async def weather(request: Request) -> dict[str, object]:
        token = request.state.l402_token  # PaidToken on a priced route, None on a free one
        return {"paid_msat": token.amount_msat if token else 0}

``l402_lifespan(factory, lifespan=own)`` wraps the application's own lifespan, if it has one.
Any other ASGI application is wrapped with the gateway factory, and the middleware then opens
the gateway on the server's lifespan events itself:
``app = L402Middleware(app, lambda: running_gateway(config))`` (see
:mod:`gateway.web.asgi_lifespan`). Plain ASGI, no framework is imported here; the server must
run on asyncio when the gateway does (LND's gRPC client).

**Requests.** Each HTTP request is described to ``L402Service.authorize`` by its method, its
``scope["path"]`` (percent-decoded, as the application sees it; it includes ``root_path``;
under a ``root_path`` the path without it and with it are priced as well, strictest wins:
``Pricing.mounted_path``), its raw query string, every ``Authorization`` value and its
headers. The client address for rate limiting is ``scope["client"]``, or the last
``X-Forwarded-For`` hop (the one the trusted proxy added) when ``trust_forwarded_for`` is
set. Allowed requests reach the application with the verified token in
``scope["state"]["l402_token"]`` (``request.state.l402_token`` in Starlette/FastAPI; ``None``
on a free route). Anything else is answered here with the rendered problem+json response:
402 with ``WWW-Authenticate`` challenges for ``L402`` and ``LSAT``, 401 for an invalid
credential, 429 or 503 with ``Retry-After``; 400 for a path its readings price apart.

**Browsers.** A browser's challenge (``Accept`` prefers HTML, GET or HEAD) is answered with
the paywall page (:mod:`gateway.web.paywall`); the middleware answers ``POST
<root_path>/.well-known/l402/redeem`` itself, and accepts the ``L402`` cookie it sets as the
credential when a request has no L402 ``Authorization``.

**Credit routes.** The request's price is held from the token's balance before the
application runs. When it sends ``http.response.start``, the charge is finished with that
status and the balance after it is added as ``l402-balance-msat``, then the message goes on
(an ``l402-balance-msat`` of the application's own is taken out, on every route);
an application that raises (or returns) before starting a response is not charged (unless
the route charges failures). A metered route charges what the application reported with
``report_cost(scope, msat)`` (``report_cost(request.scope, msat)`` in Starlette/FastAPI),
at most the price; report it before the response starts. A WebSocket on a credit route is
charged when the handshake is answered (accepted: 101, with the balance header; refused:
its status). The middleware also answers ``GET <root_path>/.well-known/l402/token`` and
``POST <root_path>/.well-known/l402/withdraw`` (:mod:`gateway.web.credit`).

**Pay-on-success routes** (``settle = "on_success"``) need the reverse proxy, which keeps
the request until it is paid: a gateway with such routes refuses to start here.

**Lifespan off.** Without lifespan events (``uvicorn --lifespan off``, or a server without
lifespan support) the gateway is never opened, so every HTTP request, on free routes too
(the route table lives in the gateway), gets ``503`` problem+json ``"gateway is not
started"`` without ``Retry-After`` (waiting does not help); a warning is logged once.

**WebSockets.** A handshake is authorized like a ``GET`` of its path, with the handshake's
``Authorization`` headers. On a free route, or with a valid token, the connection goes to the
application untouched except for ``scope["state"]["l402_token"]`` (``websocket.state``).
Otherwise it is refused *before* it is accepted: when the server supports the WebSocket
Denial Response extension (``websocket.http.response``; uvicorn does), the handshake gets
exactly the HTTP response a plain request would get (402 with the challenge, 401, 429, 503),
so a client can pay and reconnect with ``Authorization``; without the extension the
middleware sends ``websocket.close`` before accepting, which the server turns into a bare
``HTTP 403``. A socket is never accepted and then closed with a custom code: that would
look paid to the client, and a close frame cannot carry an invoice. Other scope types pass
through untouched.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import Any, Final

from gateway.pricing import Refused
from gateway.service import (
    Allow,
    CreditCharge,
    Deny,
    L402Service,
    PaymentChallenge,
    RequestInfo,
)
from gateway.web import OWN_BODY_TIMEOUT, OWN_BODY_TOO_SLOW, GatewayFactory
from gateway.web.asgi_lifespan import SERVICE_STATE_KEY, LifespanRelay, l402_lifespan
from gateway.web.cookies import headers_for_pricing, l402_cookie_values
from gateway.web.credit import (
    MAX_WITHDRAW_BODY,
    TOKEN_INFO_PATH,
    WITHDRAW_PATH,
    handle_token_info,
    handle_withdraw,
)
from gateway.web.method_override import OVERRIDE_HEADERS, method_overrides
from gateway.web.paywall import MAX_REDEEM_BODY, REDEEM_PATH, handle_redeem, render_challenge
from gateway.web.responses import (
    BALANCE_HEADER,
    HttpResponse,
    client_address,
    content_length,
    render,
)

__all__ = [
    "DENIAL_RESPONSE_EXTENSION",
    "NOT_STARTED",
    "SERVICE_STATE_KEY",
    "STATE_KEY",
    "ASGIApp",
    "GatewayFactory",
    "L402Middleware",
    "Message",
    "Receive",
    "Scope",
    "Send",
    "l402_lifespan",
    "report_cost",
    "request_info",
]

log = logging.getLogger(__name__)

# The ASGI 3 callable, typed as Starlette types it, so either side accepts the other.
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

STATE_KEY: Final = "l402_token"
_WELL_KNOWN: Final = "/.well-known/l402/"  # in the path of every endpoint answered here
_BILLING_KEY: Final = "l402_billing"  # in scope["state"], which copies of the scope share
_BALANCE_HEADER = BALANCE_HEADER.lower().encode("latin-1")
# The messages that answer a request or handshake, and the status each stands for.
_ANSWERS: Final = {
    "http.response.start": None,  # the message's own status
    "websocket.http.response.start": None,
    "websocket.accept": 101,
    "websocket.close": 403,  # before accepting: the server refuses the handshake
}
DENIAL_RESPONSE_EXTENSION: Final = "websocket.http.response"
NOT_STARTED: Final = "gateway is not started"


def request_info(
    scope: Scope, trust_forwarded_for: bool = False, path: str | None = None
) -> RequestInfo:
    """What the core needs from an ``http`` or ``websocket`` scope (a handshake is a GET);
    ``path``: the reading of ``scope["path"]`` to price (``Pricing.mounted_path``)."""
    headers = tuple(
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in scope.get("headers", ())
    )
    authorization = tuple(value for name, value in headers if name.lower() == "authorization")
    return RequestInfo(
        method=scope.get("method", "GET"),
        path=scope["path"] if path is None else path,
        client=_client(scope, trust_forwarded_for),
        authorization=authorization,
        query=scope.get("query_string", b"").decode("latin-1"),
        headers=headers_for_pricing(headers),
        cookies=l402_cookie_values(value for name, value in headers if name.lower() == "cookie"),
        method_overrides=_method_overrides(scope),
    )


_OVERRIDE_HEADERS = frozenset(name.lower().encode("latin-1") for name in OVERRIDE_HEADERS)


def _method_overrides(scope: Scope) -> tuple[str, ...]:
    return method_overrides(
        (
            value.decode("latin-1")
            for name, value in scope.get("headers", ())
            if name.lower() in _OVERRIDE_HEADERS
        ),
        scope.get("query_string", b"").decode("latin-1"),
    )


def _client(scope: Scope, trust_forwarded_for: bool) -> str:
    """The address rate limits apply to: the peer, or the trusted proxy's last hop."""
    peer = scope.get("client")
    forwarded_for = _header(scope, b"x-forwarded-for")
    return client_address(peer[0] if peer else None, forwarded_for, trust_forwarded_for)


def _authorization(scope: Scope) -> tuple[str, ...]:
    return tuple(
        value.decode("latin-1")
        for name, value in scope.get("headers", ())
        if name.lower() == b"authorization"
    )


def _header(scope: Scope, name: bytes) -> str | None:
    """All values of one request header, comma-joined; None if absent."""
    values = [
        value.decode("latin-1") for key, value in scope.get("headers", ()) if key.lower() == name
    ]
    return ",".join(values) if values else None


class _Billing:
    """The credit charge of one request under way, and the cost the application reported."""

    __slots__ = ("_charge", "_service", "cost", "finished")

    def __init__(self, service: L402Service, charge: CreditCharge) -> None:
        self._service = service
        self._charge = charge
        self.cost: int | None = None
        self.finished = False

    async def finish(self, status: int | None) -> int | None:
        """The balance after the charge (None if the sweeper released it first)."""
        self.finished = True
        return await self._service.finish_charge(self._charge, status=status, cost=self.cost)


def report_cost(scope: Scope, msat: int) -> None:
    """Report what the request of ``scope`` actually cost, on a metered credit route: the
    charge is that (at most the price held for it) instead of the price. Call it before the
    response starts. No effect on any other route."""
    billing = (scope.get("state") or {}).get(_BILLING_KEY)
    if isinstance(billing, _Billing):
        billing.cost = msat


async def _read_limited(receive: Receive, limit: int) -> bytes | None:
    """The request body, or its first ``limit + 1`` bytes; None if the client left."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        if message["type"] != "http.request":
            continue
        body += message.get("body", b"")
        if len(body) > limit:
            return bytes(body[: limit + 1])
        if not message.get("more_body", False):
            return bytes(body)


def _raw_headers(response: HttpResponse) -> list[tuple[bytes, bytes]]:
    headers = [
        (name.lower().encode("latin-1"), value.encode("latin-1"))
        for name, value in response.headers
    ]
    headers.append((b"content-length", str(len(response.body)).encode("ascii")))
    return headers


async def _send_response(send: Send, response: HttpResponse) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": response.status,
            "headers": _raw_headers(response),
        }
    )
    await send({"type": "http.response.body", "body": response.body, "more_body": False})


def _without_balance(message: Message) -> Message:
    """``message`` without the application's own balance header: only the gateway's may
    reach the client."""
    headers = message.get("headers")
    if not headers or all(name.lower() != _BALANCE_HEADER for name, _ in headers):
        return message
    kept = [(name, value) for name, value in headers if name.lower() != _BALANCE_HEADER]
    return {**message, "headers": kept}


class L402Middleware:
    """Price an ASGI application's routes.

    Without ``gateway``, the service comes from the lifespan state that :func:`l402_lifespan`
    fills in; with it, the middleware opens the gateway on the lifespan events itself.
    """

    def __init__(
        self,
        app: ASGIApp,
        gateway: GatewayFactory | None = None,
        *,
        trust_forwarded_for: bool = False,
    ) -> None:
        self.app = app
        # An application that sets its own root path (FastAPI(root_path=...)) sets it in the
        # scope inside itself: wrapped from outside, the middleware would not see it.
        own_root = getattr(app, "root_path", "")
        self._root_path = own_root if isinstance(own_root, str) else ""
        self._relay = None if gateway is None else LifespanRelay(gateway)
        self._trust_forwarded_for = trust_forwarded_for
        self._warned_not_started = False

    @property
    def service(self) -> L402Service | None:
        """The service the middleware opened itself (given ``gateway``), e.g. to revoke a
        token; None outside the lifespan. With ``l402_lifespan`` it is in the lifespan state:
        ``request.state.l402_service``."""
        return None if self._relay is None else self._relay.service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "lifespan" and self._relay is not None:
            await self._relay(self.app, scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def _service_for(self, scope: Scope) -> L402Service | None:
        if self._relay is not None:
            return self._relay.service
        service: L402Service | None = (scope.get("state") or {}).get(SERVICE_STATE_KEY)
        return service

    async def _decide(
        self, scope: Scope, service: L402Service | None
    ) -> Allow | PaymentChallenge | Deny:
        if service is None:
            if not self._warned_not_started:
                self._warned_not_started = True
                log.warning(
                    "L402 gateway is not started: answering 503 (has the ASGI server "
                    "lifespan turned off? the gateway opens on lifespan.startup)"
                )
            return Deny(503, NOT_STARTED)
        method, overrides = scope.get("method", "GET"), _method_overrides(scope)
        path = service.pricing.mounted_path(
            method, scope["path"], self._root_path or scope.get("root_path", ""), overrides
        )
        if isinstance(path, Refused):
            return Deny(path.status, path.reason)
        if not overrides:  # authorize() keeps no decision for those
            authorization = _authorization(scope)
            cached = service.allowed_again(authorization, method, path) or (
                await service.charge_again(authorization, method, path)
            )
            if cached is not None:
                return cached
        return await service.authorize(request_info(scope, self._trust_forwarded_for, path))

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        redeem_path = scope.get("root_path", "") + REDEEM_PATH  # as the browser sees it
        if _WELL_KNOWN in scope["path"] and await self._own_endpoint(scope, receive, send):
            return
        service = self._service_for(scope)
        decision = await self._decide(scope, service)
        if isinstance(decision, Allow):
            await self._admit(scope, receive, send, service, decision)
            return
        response = render_challenge(
            decision,
            method=scope.get("method", "GET"),
            accept=_header(scope, b"accept"),
            redeem_url=redeem_path,
        )
        await _send_response(send, response)

    async def _admit(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        service: L402Service | None,
        decision: Allow,
    ) -> None:
        """Run the application for an allowed request, finishing its credit charge (if any)
        when the application answers it, before the answer goes out."""
        state = scope.setdefault("state", {})
        state[STATE_KEY] = decision.token
        if decision.charge is None or service is None:  # no service decides only refusals

            async def send_uncharged(message: Message) -> None:
                if message["type"] in _ANSWERS:
                    message = _without_balance(message)
                await send(message)

            await self.app(scope, receive, send_uncharged)
            return
        billing = _Billing(service, decision.charge)
        state[_BILLING_KEY] = billing

        async def send_charged(message: Message) -> None:
            kind = message["type"]
            if kind in _ANSWERS:
                message = _without_balance(message)
                if not billing.finished:
                    balance = await billing.finish(_ANSWERS[kind] or message["status"])
                    if balance is not None and kind != "websocket.close":
                        balance_header = (_BALANCE_HEADER, str(balance).encode("ascii"))
                        headers = [*message.get("headers", ()), balance_header]
                        message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_charged)
        finally:
            if not billing.finished:  # raised, or returned without answering
                await billing.finish(None)

    async def _own_endpoint(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """Answer the gateway's own endpoints (at the root, or under ``root_path`` as the
        client sees them); False for any other path."""
        root_path, path = scope.get("root_path", ""), scope["path"]
        if path in (root_path + REDEEM_PATH, REDEEM_PATH):
            await self._redeem(scope, receive, send)
        elif path in (root_path + TOKEN_INFO_PATH, TOKEN_INFO_PATH):
            await self._token_info(scope, send)
        elif path in (root_path + WITHDRAW_PATH, WITHDRAW_PATH):
            await self._withdraw(scope, receive, send)
        else:
            return False
        return True

    async def _read_body(
        self, scope: Scope, receive: Receive, send: Send, limit: int
    ) -> bytes | None:
        """A POST's body, or ``limit + 1`` bytes of it (b"" for another method); None if the
        client left, or when it came too slowly (``OWN_BODY_TIMEOUT``: answered 408)."""
        if scope.get("method", "GET") != "POST":
            return b""
        length = _header(scope, b"content-length")
        stated = None if length is None else content_length(length.strip())
        if length is not None and (stated is None or stated > limit):
            # Too large (or more digits than any number we read: the server took it).
            return b"x" * (limit + 1)  # not worth reading
        try:
            async with asyncio.timeout(OWN_BODY_TIMEOUT):
                return await _read_limited(receive, limit)
        except TimeoutError:
            refusal = render(Deny(408, OWN_BODY_TOO_SLOW))
            # The rest of the body is unread: the server is to close the connection.
            closing = (*refusal.headers, ("Connection", "close"))
            await _send_response(send, HttpResponse(408, closing, refusal.body))
            return None

    async def _token_info(self, scope: Scope, send: Send) -> None:
        response = await handle_token_info(
            self._service_for(scope),
            method=scope.get("method", "GET"),
            authorization=_authorization(scope),
        )
        await _send_response(send, response)

    async def _withdraw(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await self._read_body(scope, receive, send, MAX_WITHDRAW_BODY)
        if body is None:
            return
        response = await handle_withdraw(
            self._service_for(scope),
            method=scope.get("method", "GET"),
            content_type=_header(scope, b"content-type"),
            authorization=_authorization(scope),
            body=body,
        )
        await _send_response(send, response)

    async def _redeem(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await self._read_body(scope, receive, send, MAX_REDEEM_BODY)
        if body is None:
            return
        response = await handle_redeem(
            self._service_for(scope),
            method=scope.get("method", "GET"),
            content_type=_header(scope, b"content-type"),
            fetch_site=_header(scope, b"sec-fetch-site"),
            body=body,
            client=_client(scope, self._trust_forwarded_for),
        )
        await _send_response(send, response)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        service = self._service_for(scope)
        decision = await self._decide(scope, service)
        if isinstance(decision, Allow):
            await self._admit(scope, receive, send, service, decision)
            return
        message = await receive()
        if message["type"] != "websocket.connect":
            return  # the client left before the handshake was answered
        response = render(decision)
        if DENIAL_RESPONSE_EXTENSION in (scope.get("extensions") or {}):
            await send(
                {
                    "type": "websocket.http.response.start",
                    "status": response.status,
                    "headers": _raw_headers(response),
                }
            )
            await send(
                {"type": "websocket.http.response.body", "body": response.body, "more_body": False}
            )
        else:
            # Before accept: the server answers the handshake with HTTP 403.
            reason = f"{response.status} {HTTPStatus(response.status).phrase}"
            await send({"type": "websocket.close", "code": 1008, "reason": reason})
