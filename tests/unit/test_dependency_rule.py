"""Each module, imported alone in a fresh interpreter, pulls in only what its layer may use."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# module -> imports it must never pull in (directly or through another module)
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "gateway.errors": ("asyncio", "grpc", "aiohttp", "sqlite3", "gateway.lnd", "gateway.ports"),
    "gateway.ports": ("asyncio", "grpc", "aiohttp", "sqlite3", "gateway.lnd"),
    "gateway.lnd.client": ("aiohttp", "sqlite3", "regtest"),
    "gateway.lnd.connection": ("aiohttp", "sqlite3", "regtest", "gateway.ports"),
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
