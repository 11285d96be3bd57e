"""HTTP adapters: aiohttp middleware, ASGI middleware, reverse proxy."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from gateway.service import L402Service

# What every adapter is given: opens a running service (``gateway.runtime.running_gateway``
# bound to a config) when the application starts, and closes it when the application stops.
GatewayFactory = Callable[[], AbstractAsyncContextManager[L402Service]]

__all__ = ["GatewayFactory"]
