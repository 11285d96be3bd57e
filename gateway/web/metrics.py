"""``/metrics`` over aiohttp: a path on the main listener, or a listener of its own.

Both answer with what a ``MetricsSlot`` holds (``gateway.metrics`` renders it); 503 while the
gateway is not running (the slot is empty). Neither imports prometheus_client.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import hdrs, web
from aiohttp.typedefs import Middleware

from gateway import errors
from gateway.ports import MetricsSlot

__all__ = ["metrics_app", "metrics_listener", "metrics_middleware"]

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _answer(request: web.Request, slot: MetricsSlot) -> web.Response:
    if request.method not in (hdrs.METH_GET, hdrs.METH_HEAD):
        return web.Response(status=405, text="GET only\n", headers={hdrs.ALLOW: "GET, HEAD"})
    if slot.exposition is None:
        return web.Response(status=503, text="metrics are not available yet\n")
    body, content_type = await slot.exposition()
    # aiohttp wants the charset apart from the content type.
    return web.Response(body=body, headers={hdrs.CONTENT_TYPE: content_type})


def metrics_middleware(path: str, slot: MetricsSlot) -> Middleware:
    """Answers ``path`` (if set) before anything else sees it (never priced, never
    forwarded), and reports every other response's status to the slot's meter: what the
    handlers answered, and what they raised (an ``HTTPException``'s status, 500 for anything
    else). One middleware for both: each one more costs every request."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if path and request.path == path:
            return await _answer(request, slot)
        try:
            response = await handler(request)
        except web.HTTPException as error:
            slot.meter.response(error.status)
            raise
        except Exception:
            slot.meter.response(500)
            raise
        slot.meter.response(response.status)
        return response

    return middleware


def metrics_app(slot: MetricsSlot, path: str = "/metrics") -> web.Application:
    """An application answering only ``path`` (anything else is 404)."""
    app = web.Application()

    async def metrics(request: web.Request) -> web.Response:
        return await _answer(request, slot)

    app.router.add_route("*", path, metrics)
    return app


def metrics_listener(
    host: str, port: int, slot: MetricsSlot
) -> Callable[[web.Application], contextlib.AbstractAsyncContextManager[None]]:
    """A ``cleanup_ctx`` for an aiohttp application (one using ``setup_l402``, say) that
    serves ``metrics_app`` on ``host:port`` while it runs. ``serve`` has a ``Listener`` of
    its own for ``[metrics] listen`` instead (``gateway.web.server``)."""

    @contextlib.asynccontextmanager
    async def listening(_app: web.Application) -> AsyncIterator[None]:
        runner = web.AppRunner(metrics_app(slot), access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host or None, port)
            try:
                await site.start()
            except OSError as error:
                # Said as the setting it is, not as a failure of [server] listen.
                raise errors.ConfigError(
                    f"[metrics] listen {host}:{port}: {error.strerror or error}"
                ) from None
            log.info("metrics on http://%s:%d/metrics", host or "0.0.0.0", port)  # noqa: S104
            yield
        finally:
            await runner.cleanup()

    return listening
