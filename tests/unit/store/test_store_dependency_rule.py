"""``gateway.store``, imported alone, pulls in no other adapter and no network library."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = ("grpc", "aiohttp", "gateway.lnd", "gateway.web", "gateway.client")


def test_store_imports_stay_in_their_layer() -> None:
    probe = "import json, sys, gateway.store; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(  # noqa: S603 - our own interpreter and module name
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    loaded = json.loads(result.stdout)
    leaked = [
        name
        for name in loaded
        for banned in FORBIDDEN
        if name == banned or name.startswith(banned + ".")
    ]
    assert leaked == []
    assert "gateway.store.sqlite" in loaded


def test_store_errors_are_the_gateway_tree() -> None:
    from gateway import errors
    from gateway.store import SchemaVersionError, StoreClosed, StoreError

    assert StoreError is errors.StoreError
    assert issubclass(StoreClosed, errors.StoreError)
    assert issubclass(SchemaVersionError, errors.GatewayError)
