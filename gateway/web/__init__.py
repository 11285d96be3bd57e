"""HTTP adapters: aiohttp middleware, ASGI middleware, reverse proxy."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from gateway.errors import ConfigError
from gateway.service import L402Service

# What every adapter is given: opens a running service (``gateway.runtime.running_gateway``
# bound to a config) when the application starts, and closes it when the application stops.
GatewayFactory = Callable[[], AbstractAsyncContextManager[L402Service]]

ON_SUCCESS_NEEDS_PROXY = "settle = on_success routes need l402-gateway serve (the reverse proxy)"

# Seconds the body of a request to the gateway's own endpoints (redeem, withdraw: a few KB at
# most) has to arrive in: a client trickling it gets 408 and the connection closes, so no one
# holds a connection for nothing, whatever the server's own body timeout.
OWN_BODY_TIMEOUT = 10.0
OWN_BODY_TOO_SLOW = f"the body did not arrive within {OWN_BODY_TIMEOUT:g}s"

__all__ = [
    "ON_SUCCESS_NEEDS_PROXY",
    "OWN_BODY_TIMEOUT",
    "OWN_BODY_TOO_SLOW",
    "GatewayFactory",
    "refuse_on_success",
]


def refuse_on_success(service: L402Service) -> None:
    """``ConfigError`` when ``service`` has pay-on-success routes: only the reverse proxy keeps
    the request to run it once paid (the middlewares serve it in the application itself)."""
    if service.pricing.settles_on_success:
        raise ConfigError(ON_SUCCESS_NEEDS_PROXY)
