"""Liveness and readiness of ``l402-gateway serve`` on real LND, with the least-privilege
macaroon: ready on a running network (one worker and two), not ready when the node's address
is wrong (yet live), and the health paths never reach the upstream nor get priced."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from gateway.health import LIVE_PATH, READY_PATH
from regtest.network import Network
from regtest.processes import free_ports, wait_for_http
from tests.regtest.gateway_helpers import bake_gateway_macaroon, serving, start_serve

pytestmark = pytest.mark.regtest

TIMEOUT = 60.0


def _config(network: Network, tmp_path: Path, port: int, upstream: str, **options: Any) -> Path:
    node = network.alice
    lnd_host = options.get("lnd_host", node.rpc_host)
    macaroon = bake_gateway_macaroon(network, tmp_path / "gateway.macaroon")
    config_file = tmp_path / "gateway.toml"
    config_file.write_text(
        f"""
[server]
listen = "127.0.0.1:{port}"
upstream = "{upstream}"
workers = {options.get("workers", 1)}
[lnd]
host = "{lnd_host}"
tls_cert = "{node.tls_cert}"
macaroon = "{macaroon}"
timeout = 5
[store]
url = "sqlite://{tmp_path / "gateway.db"}"
[[routes]]
pattern = "/*"
price_msat = 1000
service = "everything"
"""
    )
    return config_file


class _Upstream:
    def __init__(self) -> None:
        self.hits: list[str] = []

    def app(self) -> web.Application:
        async def answer(request: web.Request) -> web.Response:
            self.hits.append(request.path)
            return web.Response(text="upstream")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", answer)
        return app


async def _served(
    network: Network, tmp_path: Path, upstream: str, **options: Any
) -> tuple[str, subprocess.Popen[bytes], Path]:
    (port,) = free_ports(1)
    config_file = _config(network, tmp_path, port, upstream, **options)
    log = tmp_path / "serve.log"
    process = start_serve(config_file, log)
    url = f"http://127.0.0.1:{port}"
    await wait_for_http(url + LIVE_PATH, process, log)
    return url, process, log


def _stop(process: subprocess.Popen[bytes], log: Path) -> None:
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0, log.read_text()


async def _ready(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url + READY_PATH) as response:
        return response.status, await response.json()


async def _until_ready(http: aiohttp.ClientSession, url: str, in_a_row: int = 1) -> Any:
    """The first ready report once ``in_a_row`` probes in a row said ready."""
    seen = 0
    async with asyncio.timeout(TIMEOUT):
        while seen < in_a_row:
            status, body = await _ready(http, url)
            seen = seen + 1 if status == 200 else 0
            if status != 200:
                await asyncio.sleep(0.1)
    return body


@pytest_asyncio.fixture
async def upstream() -> AsyncIterator[tuple[_Upstream, str]]:
    backend = _Upstream()
    async with serving(backend.app()) as url:
        yield backend, url


@pytest.mark.parametrize("workers", [1, 2])
async def test_ready_on_a_running_network(
    network: Network, tmp_path: Path, upstream: tuple[_Upstream, str], workers: int
) -> None:
    backend, upstream_url = upstream
    url, process, log = await _served(network, tmp_path, upstream_url, workers=workers)
    try:
        async with aiohttp.ClientSession() as http:
            # Two workers: enough probes in a row that both have answered ready (SO_REUSEPORT
            # spreads the connections; each probe is a connection of its own).
            body = await _until_ready(http, url, in_a_row=1 if workers == 1 else 20)
            assert body["status"] == "ready"
            checks = body["checks"]
            assert checks["lnd"] == {"ok": True, "detail": "reachable (LookupInvoice answered)"}
            assert checks["store"] == {"ok": True, "detail": "writable"}
            assert checks["watcher"]["ok"]
            assert checks["tasks"]["ok"]
            async with http.get(url + LIVE_PATH) as live:
                assert live.status == 200
                assert await live.json() == {"status": "live"}
            async with http.get(url + "/anything") as priced:
                assert priced.status == 402  # every other path is priced
        assert backend.hits == []  # the health paths never reached the upstream
    finally:
        _stop(process, log)


async def test_not_ready_when_the_node_cannot_be_reached(
    network: Network, tmp_path: Path, upstream: tuple[_Upstream, str]
) -> None:
    backend, upstream_url = upstream
    (nowhere,) = free_ports(1)  # nothing listens there
    url, process, log = await _served(
        network, tmp_path, upstream_url, lnd_host=f"127.0.0.1:{nowhere}"
    )
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(3):
                status, body = await _ready(http, url)
                assert status == 503
                assert body["status"] == "not ready"
                assert body["checks"]["lnd"]["ok"] is False
                # Nothing to reconcile, yet the watcher is caught up only once the node answered.
                assert body["checks"]["watcher"]["ok"] is False
                assert body["checks"]["store"]["ok"] is True
                # No secret in the report: the macaroon's bytes are nowhere in it.
                macaroon = (tmp_path / "gateway.macaroon").read_bytes().hex()
                assert macaroon not in str(body)
                async with http.get(url + LIVE_PATH) as live:
                    assert live.status == 200
                await asyncio.sleep(0.5)
        assert backend.hits == []
    finally:
        _stop(process, log)
