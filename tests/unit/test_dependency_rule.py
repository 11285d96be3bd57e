"""Each module, imported alone in a fresh interpreter, pulls in only what its layer may use."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import gateway

# module -> imports it must never pull in (directly or through another module)
_NETWORK = ("grpc", "aiohttp", "sqlite3", "asyncpg")
_ADAPTERS = (
    "gateway.lnd",
    "gateway.store",
    "gateway.web",
    "gateway.cli",
    "regtest",
    # the core reports to a Meter (gateway.ports); only the adapter knows Prometheus
    "gateway.metrics",
    "prometheus_client",
)
# what the paying client must not need: the server side and its wiring
_WIRING = ("gateway.lnd", "gateway.store", "gateway.web", "gateway.service", "gateway.cli")

# module -> imports it must never pull in (directly or through another module)
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "gateway.errors": ("asyncio", *_NETWORK, *_ADAPTERS, "gateway.ports"),
    "gateway.ports": ("asyncio", *_NETWORK, *_ADAPTERS),
    "gateway.l402": ("asyncio", *_NETWORK, *_ADAPTERS, "gateway.ports", "gateway.service"),
    "gateway.pricing": ("asyncio", *_NETWORK, *_ADAPTERS, "gateway.service"),
    # split arithmetic: the ports' vocabulary and the standard library only
    "gateway.splits": ("asyncio", *_NETWORK, *_ADAPTERS, "gateway.service", "gateway.config"),
    # bech32 (invoices, LNURLs): the standard library only
    "gateway.bech32": (
        "asyncio",
        *_NETWORK,
        *_ADAPTERS,
        "gateway.ports",
        "gateway.service",
        "gateway.config",
        "gateway.client",
        "yarl",
    ),
    # the LNURL-pay server's protocol: the standard library, bech32 and the ports' vocabulary
    "gateway.lnurl": (
        "asyncio",
        *_NETWORK,
        *_ADAPTERS,
        "gateway.service",
        "gateway.config",
        "gateway.client",
        "yarl",
    ),
    # payee destinations, read by the configuration and the payout worker alike: no asyncio
    # (gateway.config imports it), nothing of the client (whose package loads asyncio)
    "gateway.destinations": (
        "asyncio",
        *_NETWORK,
        *_ADAPTERS,
        "gateway.service",
        "gateway.config",
        "gateway.client",
    ),
    "gateway.config": ("asyncio", *_NETWORK, *_ADAPTERS, "gateway.service", "gateway.client"),
    "gateway.service": (*_NETWORK, *_ADAPTERS),
    "gateway.watcher": (*_NETWORK, *_ADAPTERS),
    "gateway.expiry": (*_NETWORK, *_ADAPTERS),
    "gateway.events": (*_NETWORK, *_ADAPTERS),
    "gateway.supervisor": (*_NETWORK, *_ADAPTERS),
    "gateway.health": (*_NETWORK, *_ADAPTERS),
    # leadership holds a PostgreSQL session of its own, and knows no store but by protocol
    "gateway.leader": ("grpc", "aiohttp", "sqlite3", *_ADAPTERS),
    # the JSON of records, shared by the command line and the dashboard: ports only
    "gateway.reports": ("asyncio", *_NETWORK, *_ADAPTERS, "gateway.service"),
    "gateway.store": ("grpc", "aiohttp", "gateway.lnd", "gateway.web", "gateway.cli", "regtest"),
    "gateway.lnd.client": (
        "aiohttp",
        "sqlite3",
        "gateway.store",
        "gateway.web",
        "gateway.cli",
        "regtest",
    ),
    "gateway.lnd.connection": ("aiohttp", "sqlite3", "gateway.ports", "gateway.cli", "regtest"),
    "gateway.web.aiohttp": ("grpc", "sqlite3", "gateway.lnd", "gateway.store", "gateway.cli"),
    "gateway.web.proxy": ("grpc", "sqlite3", "gateway.lnd", "gateway.store", "gateway.cli"),
    "gateway.web.server": ("grpc", "sqlite3", "gateway.lnd", "gateway.store", "gateway.cli"),
    "gateway.web.admin": ("grpc", "sqlite3", "gateway.lnd", "gateway.store", "gateway.cli"),
    "gateway.client": ("grpc", "aiohttp", "httpx", "sqlite3", "regtest", *_WIRING),
    "gateway.client.aiohttp": ("grpc", "httpx", "sqlite3", "regtest", *_WIRING),
    "gateway.client.httpx": ("grpc", "aiohttp", "sqlite3", "regtest", *_WIRING),
    "gateway.web.asgi": (
        "grpc",
        "aiohttp",
        "sqlite3",
        "gateway.lnd",
        "gateway.store",
        "gateway.cli",
    ),
    # The composition root wires the adapters; an ASGI app gets it without aiohttp.
    "gateway.runtime": ("aiohttp", "gateway.cli", "regtest"),
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


def _modules_outside_the_command_line() -> list[str]:
    root = Path(gateway.__file__).parent
    names = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts[-1] != "__main__" and parts[:2] != ("gateway", "cli"):
            names.append(".".join(parts))
    return names


def test_no_module_imports_the_command_line() -> None:
    """Every gateway module but the command line's, all imported in one interpreter, leave
    ``gateway.cli`` unloaded: nothing imports the CLI."""
    modules = _modules_outside_the_command_line()
    assert {"gateway", "gateway.runtime", "gateway.web.server"} <= set(modules)
    probe = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules\n"
        "                        if m == 'gateway.cli' or m.startswith('gateway.cli.'))))"
    )
    result = subprocess.run(  # noqa: S603 - our own interpreter and module names
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert json.loads(result.stdout) == []
