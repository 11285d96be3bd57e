"""When the ASGI middleware's gateway opens and closes: with the application's lifespan.

Two ways, both opening the gateway before the application's own startup and closing it after
the application's own shutdown:

- :func:`l402_lifespan`, for an application that takes a ``lifespan=`` function (FastAPI,
  Starlette): it opens the gateway and hands the service to the middleware
  through the ASGI lifespan state (``scope["state"]["l402_service"]``, which the server copies
  into every request's scope). The middleware is then added without a gateway factory.
- :class:`LifespanRelay`, when the middleware is given the factory itself: it relays the
  server's lifespan messages to the application, opening and closing the gateway on the way.
  This serves any ASGI application, one without lifespan support included, and servers that
  do not pass lifespan state.

**The relay, in detail.** The gateway is opened on ``lifespan.startup``, *before* the
application sees it, and closed on ``lifespan.shutdown``, *after* the application reported
its own shutdown. If the gateway cannot be opened, the server gets ``lifespan.startup.failed``
with the reason (uvicorn logs it and exits) and the application's startup never runs; if the
application's startup fails, the gateway is closed again. An application that does not handle
lifespan at all (raises or returns on that scope without receiving) is fine: the relay then
answers the lifespan protocol by itself. One lifespan at a time per relay.

Both refuse a gateway with pay-on-success routes (``settle = "on_success"``) at startup: only
the reverse proxy keeps a request to run it once paid.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Final, TypeVar

from gateway.errors import ConfigError
from gateway.web import refuse_on_success

if TYPE_CHECKING:  # the middleware imports this module; these are annotations only
    from gateway.service import L402Service
    from gateway.web import GatewayFactory
    from gateway.web.asgi import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

SERVICE_STATE_KEY: Final = "l402_service"

AppT = TypeVar("AppT")
# What ``lifespan=`` takes: the application in, an async context around its lifetime out,
# whose value (if a mapping) becomes the lifespan state.
AppLifespan = Callable[[AppT], AbstractAsyncContextManager[Mapping[str, Any] | None]]


def l402_lifespan(
    gateway: GatewayFactory, lifespan: AppLifespan[AppT] | None = None
) -> Callable[[AppT], AbstractAsyncContextManager[Mapping[str, Any]]]:
    """A ``lifespan=`` function that opens the gateway around the application's ``lifespan``.

    The lifespan state is the application's own (if its lifespan yields a mapping) plus the
    service under ``"l402_service"`` (``request.state.l402_service`` in a handler).
    A service with pay-on-success routes is refused (``ConfigError``): only the reverse
    proxy serves them.
    """

    @contextlib.asynccontextmanager
    async def gateway_and_app(app: AppT) -> AsyncIterator[Mapping[str, Any]]:
        async with gateway() as service:
            refuse_on_success(service)
            log.info("L402 gateway started")
            own = contextlib.nullcontext(None) if lifespan is None else lifespan(app)
            async with own as state:
                yield {**(state or {}), SERVICE_STATE_KEY: service}
        log.info("L402 gateway stopped")

    return gateway_and_app


class _StartupFailed(Exception):
    """The gateway could not be opened; raised into the application's ``receive()``."""


class _Phase(enum.Enum):
    IDLE = "waiting for lifespan.startup"
    STARTING = "startup received, not yet reported"
    STARTED = "startup reported complete"
    STOPPING = "shutdown received, not yet reported"
    DONE = "startup failure or shutdown reported"


class LifespanRelay:
    """Opens the gateway for the lifespan the application sees through the middleware."""

    def __init__(self, gateway: GatewayFactory) -> None:
        self._gateway = gateway
        self._owner: _Lifespan | None = None  # the lifespan that opened (or opens) the gateway
        self._context: AbstractAsyncContextManager[L402Service] | None = None
        self.service: L402Service | None = None

    async def __call__(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        """Run one ``lifespan`` scope of ``app``."""
        await _Lifespan(self, app, send).run(scope, receive)

    async def open(self, owner: _Lifespan) -> None:
        if self._owner is not None:
            raise _StartupFailed("L402 gateway is already started by another lifespan")
        self._owner = owner
        context = self._gateway()
        try:
            service = await context.__aenter__()
        except Exception as error:
            self._owner = None
            log.exception("L402 gateway failed to start")
            raise _StartupFailed(f"L402 gateway failed to start: {error!r}") from error
        except BaseException:
            self._owner = None
            raise
        try:
            refuse_on_success(service)
        except ConfigError as error:
            self._owner = None
            await context.__aexit__(None, None, None)
            log.error("L402 gateway refused to start: %s", error)
            raise _StartupFailed(f"L402 gateway failed to start: {error!r}") from error
        self._context = context
        self.service = service
        log.info("L402 gateway started")

    async def close(self, owner: _Lifespan) -> str | None:
        """Close the gateway if ``owner`` opened it; the reason if closing failed."""
        if self._owner is not owner or self._context is None:
            return None
        context, self._context = self._context, None
        self.service = None
        try:
            await context.__aexit__(None, None, None)
        except Exception as error:
            log.exception("L402 gateway failed to stop cleanly")
            return f"L402 gateway failed to stop: {error!r}"
        finally:
            self._owner = None
        log.info("L402 gateway stopped")
        return None


class _Lifespan:
    """One ``lifespan`` scope: relays it to the application, opening and closing the gateway.

    The application sees the server's messages through ``app_receive``/``app_send``. When it
    stops taking part (returns early, or never handled lifespan), the rest of the protocol is
    answered here, so the gateway is always closed on shutdown.
    """

    def __init__(self, relay: LifespanRelay, app: ASGIApp, send: Send) -> None:
        self._relay = relay
        self._app = app
        self._send = send
        self.phase = _Phase.IDLE

    async def run(self, scope: Scope, receive: Receive) -> None:
        async def app_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.phase = _Phase.STARTING
                await self._relay.open(self)  # raises _StartupFailed into the application
            elif message["type"] == "lifespan.shutdown":
                self.phase = _Phase.STOPPING
            return message

        try:
            await self._app(scope, app_receive, self._app_send)
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
            await self._relay.close(self)  # no shutdown follows a failed startup
        elif kind in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
            self.phase = _Phase.DONE
            problem = await self._relay.close(self)
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
                    await self._relay.open(self)
                except _StartupFailed as error:
                    await self._send({"type": "lifespan.startup.failed", "message": str(error)})
                    return
                self.phase = _Phase.STARTED
                await self._send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.phase = _Phase.STOPPING
        self.phase = _Phase.DONE
        problem = await self._relay.close(self)
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
        await self._relay.close(self)
        if phase is _Phase.STARTING:
            message = f"application startup failed: {error!r}"
            await self._send({"type": "lifespan.startup.failed", "message": message})
        elif phase is _Phase.STOPPING:
            message = f"application shutdown failed: {error!r}"
            await self._send({"type": "lifespan.shutdown.failed", "message": message})
