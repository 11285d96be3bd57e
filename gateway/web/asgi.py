"""ASGI integration: a middleware that puts a Lightning price on any ASGI application
(FastAPI, Starlette, Litestar, a bare ASGI callable, ...).

Usage with FastAPI::

    from fastapi import FastAPI, Request

    from gateway.cli import running_gateway
    from gateway.config import load_config
    from gateway.web.asgi import L402Middleware

    config = load_config("gateway.toml")
    app = FastAPI()
    app.add_middleware(L402Middleware, gateway=lambda: running_gateway(config))

    @app.get("/weather")
    async def weather(request: Request) -> dict[str, object]:
        token = request.state.l402_token  # PaidToken on a priced route, None on a free one
        return {"paid_msat": token.amount_msat if token else 0}

Any other ASGI application is wrapped directly:
``app = L402Middleware(app, lambda: running_gateway(config))``. Plain ASGI, no framework is
imported here; the server must run on asyncio when the gateway does (LND's gRPC client).

**Requests.** Each HTTP request is described to ``L402Service.authorize`` by its method, its
``scope["path"]`` (percent-decoded, as the application sees it; it includes ``root_path``),
its raw query string, every ``Authorization`` value and its headers. The client address for
rate limiting is ``scope["client"]``, or the last ``X-Forwarded-For`` hop (the one the
trusted proxy added) when ``trust_forwarded_for`` is set. Allowed
requests reach the application with the verified token in ``scope["state"]["l402_token"]``
(``request.state.l402_token`` in Starlette/FastAPI; ``None`` on a free route). Anything else
is answered here with the rendered problem+json response: 402 with ``WWW-Authenticate``
challenges for ``L402`` and ``LSAT``, 401 for an invalid credential, 429 or 503 with
``Retry-After``.

**Browsers.** A browser's challenge (``Accept`` prefers HTML, GET or HEAD) is answered with
the paywall page (:mod:`gateway.web.paywall`); the middleware answers ``POST
<root_path>/.well-known/l402/redeem`` itself, and accepts the ``L402`` cookie it sets as the
credential when a request has no L402 ``Authorization``.

**Lifespan.** The gateway (LND channel, store, settlement watcher) is opened on
``lifespan.startup``, *before* the application's own startup runs, and closed on
``lifespan.shutdown``, *after* the application's own shutdown; lifespan events still reach
the application. If the gateway cannot be opened, the server gets ``lifespan.startup.failed``
with the reason (uvicorn logs it and exits) and the application's startup never runs; if the
application's startup fails, the gateway is closed again. An application that does not
handle lifespan at all (raises or returns on that scope without receiving) is fine: the
middleware then answers the lifespan protocol by itself. One lifespan at a time per
middleware instance.

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

import enum
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import AbstractAsyncContextManager
from http import HTTPStatus
from typing import Any, Final

from gateway.service import Allow, Challenge, Deny, L402Service, RequestInfo, l402_cookie_values
from gateway.web.method_override import OVERRIDE_HEADERS, method_overrides
from gateway.web.paywall import MAX_REDEEM_BODY, REDEEM_PATH, handle_redeem, render_challenge
from gateway.web.responses import HttpResponse, client_address, render

log = logging.getLogger(__name__)

# The ASGI 3 callable, typed as Starlette types it, so either side accepts the other.
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

GatewayFactory = Callable[[], AbstractAsyncContextManager[L402Service]]

STATE_KEY: Final = "l402_token"
DENIAL_RESPONSE_EXTENSION: Final = "websocket.http.response"
NOT_STARTED: Final = "gateway is not started"


def request_info(scope: Scope, trust_forwarded_for: bool = False) -> RequestInfo:
    """What the core needs from an ``http`` or ``websocket`` scope (a handshake is a GET)."""
    headers = tuple(
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in scope.get("headers", ())
    )
    authorization = tuple(value for name, value in headers if name.lower() == "authorization")
    return RequestInfo(
        method=scope.get("method", "GET"),
        path=scope["path"],
        client=_client(scope, trust_forwarded_for),
        authorization=authorization,
        query=scope.get("query_string", b"").decode("latin-1"),
        headers=headers,
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


def _header(scope: Scope, name: bytes) -> str | None:
    """All values of one request header, comma-joined; None if absent."""
    values = [
        value.decode("latin-1") for key, value in scope.get("headers", ()) if key.lower() == name
    ]
    return ",".join(values) if values else None


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


class _StartupFailed(Exception):
    """The gateway could not be opened; raised into the application's ``receive()``."""


class L402Middleware:
    """Price an ASGI application's routes; ``gateway`` opens the service for its lifespan."""

    def __init__(
        self, app: ASGIApp, gateway: GatewayFactory, *, trust_forwarded_for: bool = False
    ) -> None:
        self.app = app
        self._gateway = gateway
        self._trust_forwarded_for = trust_forwarded_for
        self._service: L402Service | None = None
        self._owner: _Lifespan | None = None  # the lifespan that opened (or opens) the gateway
        self._warned_not_started = False

    @property
    def service(self) -> L402Service | None:
        """The running service (e.g. to revoke a token), or None outside the lifespan."""
        return self._service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "lifespan":
            await _Lifespan(self, send).run(scope, receive)
        else:
            await self.app(scope, receive, send)

    async def _decide(self, scope: Scope) -> Allow | Challenge | Deny:
        service = self._service
        if service is None:
            if not self._warned_not_started:
                self._warned_not_started = True
                log.warning(
                    "L402 gateway is not started: answering 503 (has the ASGI server "
                    "lifespan turned off? the gateway opens on lifespan.startup)"
                )
            return Deny(503, NOT_STARTED)
        authorization = tuple(
            value.decode("latin-1")
            for name, value in scope.get("headers", ())
            if name.lower() == b"authorization"
        )
        if not _method_overrides(scope):  # authorize() keeps no decision for those
            cached = service.allowed_again(authorization, scope.get("method", "GET"), scope["path"])
            if cached is not None:
                return cached
        return await service.authorize(request_info(scope, self._trust_forwarded_for))

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        redeem_path = scope.get("root_path", "") + REDEEM_PATH  # as the browser sees it
        if scope["path"] in (redeem_path, REDEEM_PATH):
            await self._redeem(scope, receive, send)
            return
        decision = await self._decide(scope)
        if isinstance(decision, Allow):
            scope.setdefault("state", {})[STATE_KEY] = decision.token
            await self.app(scope, receive, send)
            return
        response = render_challenge(
            decision,
            method=scope.get("method", "GET"),
            accept=_header(scope, b"accept"),
            redeem_url=redeem_path,
        )
        await _send_response(send, response)

    async def _redeem(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope.get("method", "GET")
        body = b""
        if method == "POST":
            length = _header(scope, b"content-length")
            if length is not None and length.strip().isdigit() and int(length) > MAX_REDEEM_BODY:
                body = b"x" * (MAX_REDEEM_BODY + 1)  # too large: not worth reading
            else:
                read = await _read_limited(receive, MAX_REDEEM_BODY)
                if read is None:
                    return
                body = read
        response = await handle_redeem(
            self._service,
            method=method,
            content_type=_header(scope, b"content-type"),
            fetch_site=_header(scope, b"sec-fetch-site"),
            body=body,
            client=_client(scope, self._trust_forwarded_for),
        )
        await _send_response(send, response)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        decision = await self._decide(scope)
        if isinstance(decision, Allow):
            scope.setdefault("state", {})[STATE_KEY] = decision.token
            await self.app(scope, receive, send)
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


class _Phase(enum.Enum):
    IDLE = "waiting for lifespan.startup"
    STARTING = "startup received, not yet reported"
    STARTED = "startup reported complete"
    STOPPING = "shutdown received, not yet reported"
    DONE = "startup failure or shutdown reported"


class _Lifespan:
    """One ``lifespan`` scope: relays it to the application, opening and closing the gateway.

    The application sees the server's messages through ``app_receive``/``app_send``. When it
    stops taking part (returns early, or never handled lifespan), the rest of the protocol is
    answered here, so the gateway is always closed on shutdown.
    """

    def __init__(self, middleware: L402Middleware, send: Send) -> None:
        self._middleware = middleware
        self._send = send
        self._context: AbstractAsyncContextManager[L402Service] | None = None
        self.phase = _Phase.IDLE

    async def run(self, scope: Scope, receive: Receive) -> None:
        async def app_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.phase = _Phase.STARTING
                await self._start()  # raises _StartupFailed into the application
            elif message["type"] == "lifespan.shutdown":
                self.phase = _Phase.STOPPING
            return message

        try:
            await self._middleware.app(scope, app_receive, self._app_send)
        except _StartupFailed as error:
            if self.phase is _Phase.STARTING:  # the application did not report it
                self.phase = _Phase.DONE
                await self._send({"type": "lifespan.startup.failed", "message": str(error)})
            return
        except Exception as error:
            if self.phase is _Phase.IDLE:
                log.debug("the application does not handle lifespan (%r); answering it", error)
                await self._answer_alone(receive)
                return
            await self._abandon(error)
            raise
        if self.phase is not _Phase.DONE:
            await self._answer_alone(receive)

    async def _app_send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "lifespan.startup.complete":
            self.phase = _Phase.STARTED
        elif kind == "lifespan.startup.failed":
            self.phase = _Phase.DONE
            await self._stop()  # no shutdown follows a failed startup
        elif kind in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
            self.phase = _Phase.DONE
            problem = await self._stop()
            if problem is not None and kind == "lifespan.shutdown.complete":
                message = {"type": "lifespan.shutdown.failed", "message": problem}
        await self._send(message)

    async def _answer_alone(self, receive: Receive) -> None:
        """Finish the protocol without the application (it returned, or has no lifespan)."""
        if self.phase is _Phase.STARTING:
            self.phase = _Phase.STARTED
            await self._send({"type": "lifespan.startup.complete"})
        while self.phase is not _Phase.STOPPING:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self._start()
                except _StartupFailed as error:
                    await self._send({"type": "lifespan.startup.failed", "message": str(error)})
                    return
                self.phase = _Phase.STARTED
                await self._send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.phase = _Phase.STOPPING
        self.phase = _Phase.DONE
        problem = await self._stop()
        if problem is None:
            await self._send({"type": "lifespan.shutdown.complete"})
        else:
            await self._send({"type": "lifespan.shutdown.failed", "message": problem})

    async def _abandon(self, error: Exception) -> None:
        """The application raised mid-lifespan: close the gateway, report the open phase.

        After a completed startup there is nothing to report; the server learns of the
        error from the exception (uvicorn logs it) and requests get 503 from then on.
        """
        phase, self.phase = self.phase, _Phase.DONE
        await self._stop()
        if phase is _Phase.STARTING:
            message = f"application startup failed: {error!r}"
            await self._send({"type": "lifespan.startup.failed", "message": message})
        elif phase is _Phase.STOPPING:
            message = f"application shutdown failed: {error!r}"
            await self._send({"type": "lifespan.shutdown.failed", "message": message})

    async def _start(self) -> None:
        middleware = self._middleware
        if middleware._owner is not None:
            raise _StartupFailed("L402 gateway is already started by another lifespan")
        middleware._owner = self
        context = middleware._gateway()
        try:
            service = await context.__aenter__()
        except Exception as error:
            middleware._owner = None
            log.exception("L402 gateway failed to start")
            raise _StartupFailed(f"L402 gateway failed to start: {error!r}") from error
        except BaseException:
            middleware._owner = None
            raise
        self._context = context
        middleware._service = service
        log.info("L402 gateway started")

    async def _stop(self) -> str | None:
        """Close the gateway if this lifespan opened it; the reason if closing failed."""
        context, self._context = self._context, None
        if context is None:
            return None
        middleware = self._middleware
        middleware._service = None
        try:
            await context.__aexit__(None, None, None)
        except Exception as error:
            log.exception("L402 gateway failed to stop cleanly")
            return f"L402 gateway failed to stop: {error!r}"
        finally:
            middleware._owner = None
        log.info("L402 gateway stopped")
        return None
