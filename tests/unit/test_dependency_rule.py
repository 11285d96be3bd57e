"""Each module, imported alone in a fresh interpreter, pulls in only what its layer may use."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# module -> imports it must never pull in (directly or through another module)
_NETWORK = ("grpc", "aiohttp", "sqlite3")
_ADAPTERS = ("gateway.lnd", "gateway.store", "gateway.web", "gateway.cli", "regtest")
# what the paying client must not need: the server side and its wiring
_WIRING = ("gateway.lnd", "gateway.store", "gateway.web", "gateway.service", "gateway.cli")

# module -> imports it must never pull in (directly or through another module)
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "gateway.errors": ("asyncio", *_NETWORK, *_ADAPTERS, "gateway.ports"),
    "gateway.ports": ("asyncio", *_NETWORK, *_ADAPTERS),
    "gateway.l402": ("asyncio", *_NETWORK, *_ADAPTERS, "gateway.ports", "gateway.service"),
    "gateway.pricing": ("asyncio", *_NETWORK, *_ADAPTERS, "gateway.service"),
    "gateway.config": ("asyncio", *_NETWORK, *_ADAPTERS, "gateway.service"),
    "gateway.service": (*_NETWORK, *_ADAPTERS),
    "gateway.watcher": (*_NETWORK, *_ADAPTERS),
    "gateway.expiry": (*_NETWORK, *_ADAPTERS),
    "gateway.store": ("grpc", "aiohttp", "gateway.lnd", "gateway.web", "gateway.cli", "regtest"),
    "gateway.lnd.client": ("aiohttp", "sqlite3", "gateway.store", "gateway.web", "regtest"),
    "gateway.lnd.connection": ("aiohttp", "sqlite3", "gateway.ports", "regtest"),
    "gateway.web.aiohttp": ("grpc", "sqlite3", "gateway.lnd", "gateway.store", "gateway.cli"),
    "gateway.web.proxy": ("grpc", "sqlite3", "gateway.lnd", "gateway.store", "gateway.cli"),
    "gateway.client": ("grpc", "aiohttp", "httpx", "sqlite3", "regtest", *_WIRING),
    "gateway.client.aiohttp": ("grpc", "httpx", "sqlite3", "regtest", *_WIRING),
    "gateway.client.httpx": ("grpc", "aiohttp", "sqlite3", "regtest", *_WIRING),
    "gateway.web.asgi": ("grpc", "aiohttp", "sqlite3", "gateway.lnd", "gateway.store"),
}


@pytest.mark.parametrize(("module", "forbidden"), sorted(FORBIDDEN.items()))
def test_module_imports_stay_in_their_layer(module: str, forbidden: tuple[str, ...]) -> None:
    probe = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(  # noqa: S603 - our own interpreter and module names
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    loaded = json.loads(result.stdout)
    leaked = [
        name
        for name in loaded
        for banned in forbidden
        if name == banned or name.startswith(banned + ".")
    ]
    assert leaked == [], f"{module} imports {leaked}"
