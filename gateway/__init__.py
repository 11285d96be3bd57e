"""L402 micropayment gateway: Lightning-priced HTTP resources backed by LND.

The public API is re-exported here and loaded lazily, so importing a pure part (say
``gateway.l402``) does not pull in aiohttp, gRPC or a database driver.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.config import Config, load_config
    from gateway.errors import GatewayError
    from gateway.runtime import Runtime, running_gateway, running_runtime
    from gateway.service import Allow, Deny, L402Service, PaidToken, PaymentChallenge, RequestInfo
    from gateway.web.aiohttp import TOKEN, setup_l402
    from gateway.web.asgi import L402Middleware, l402_lifespan
    from gateway.web.proxy import build_proxy

_EXPORTS = {
    "Allow": "gateway.service",
    "Config": "gateway.config",
    "Deny": "gateway.service",
    "GatewayError": "gateway.errors",
    "L402Middleware": "gateway.web.asgi",
    "L402Service": "gateway.service",
    "PaidToken": "gateway.service",
    "PaymentChallenge": "gateway.service",
    "RequestInfo": "gateway.service",
    "TOKEN": "gateway.web.aiohttp",
    "build_proxy": "gateway.web.proxy",
    "l402_lifespan": "gateway.web.asgi",
    "load_config": "gateway.config",
    "running_gateway": "gateway.runtime",
    "running_runtime": "gateway.runtime",
    "Runtime": "gateway.runtime",
    "setup_l402": "gateway.web.aiohttp",
}
__all__ = [
    "TOKEN",
    "Allow",
    "Config",
    "Deny",
    "GatewayError",
    "L402Middleware",
    "L402Service",
    "PaidToken",
    "PaymentChallenge",
    "RequestInfo",
    "Runtime",
    "build_proxy",
    "l402_lifespan",
    "load_config",
    "running_gateway",
    "running_runtime",
    "setup_l402",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gateway' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
