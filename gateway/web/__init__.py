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

__all__ = ["ON_SUCCESS_NEEDS_PROXY", "GatewayFactory", "refuse_on_success"]


def refuse_on_success(service: L402Service) -> None:
    """``ConfigError`` when ``service`` has pay-on-success routes: only the reverse proxy keeps
    the request to run it once paid (the middlewares serve it in the application itself)."""
    if service.pricing.settles_on_success:
        raise ConfigError(ON_SUCCESS_NEEDS_PROXY)
