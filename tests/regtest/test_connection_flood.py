"""``l402-gateway serve`` under a low open file limit and a flood of slowloris connections
from several addresses: a paying client (from an address of its own) still gets its 402s and
200s, the gateway never runs out of descriptors, and its log holds no traceback per failed
``accept()``."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import aiohttp
import pytest

from gateway.examples import demo_api
from gateway.lnd.client import LndClient
from gateway.web.server import RESERVED_FILES
from regtest.network import Network
from regtest.processes import free_ports, wait_for_http
from tests.regtest.gateway_helpers import (
    REPO,
    allow_open_files,
    config_toml,
    gateway_config,
    l402_challenge,
    pay,
    serving,
)
from tests.regtest.test_load import PRICED

pytestmark = pytest.mark.regtest

OPEN_FILES = 512  # the gateway's RLIMIT_NOFILE
# Connections in each upstream pool: max_connections is then 512 - 128 reserved - 32 = 352.
UPSTREAM_POOLS = 16
# Each source opens more than max_connections_per_client (64), all of them more than the
# gateway may hold (352) and than it has descriptors for.
SOURCES = [f"127.0.1.{n}" for n in range(1, 9)]
PER_SOURCE = 80
PAYING_SOURCE = "127.0.0.2"
SECONDS = 8.0
RECONNECT = 0.5  # a flood connection closed by the gateway comes back after this
ROUND = 0.6  # seconds between the paying client's purchases


# The limit is set by the child itself: a preexec_fn would fork this threaded process.
LIMITED_SERVE = (
    "import resource, runpy, sys; "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[1]))); "
    "sys.argv = ['l402-gateway', *sys.argv[2:]]; "
    "runpy.run_module('gateway.cli', run_name='__main__')"
)


def start_serve_with_open_files(config_file: Path, log: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-c", LIMITED_SERVE, str(OPEN_FILES)]
    with log.open("ab") as output:
        return subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [*command, "--config", str(config_file), "serve"],
            cwd=REPO,
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_a_connection_flood_under_a_low_open_file_limit(
    network: Network, bob: LndClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    allow_open_files(len(SOURCES) * PER_SOURCE + 256)  # the flood's own sockets
    monkeypatch.setenv("GATEWAY_SERVER_UPSTREAM_CONNECTIONS", str(UPSTREAM_POOLS))
    monkeypatch.setenv("GATEWAY_SERVER_PAID_UPSTREAM_CONNECTIONS", str(UPSTREAM_POOLS))
    (port,) = free_ports(1)
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    config_file = tmp_path / "gateway.toml"
    flood: Counter[str] = Counter()
    paid: Counter[str] = Counter()
    seconds: list[float] = []
    files: list[int] = []

    async with serving(demo_api()) as upstream:
        config = gateway_config(
            network, tmp_path / "gateway.db", listen=f"127.0.0.1:{port}", upstream=upstream
        )
        config_file.write_text(config_toml(config))
        process = start_serve_with_open_files(config_file, log)
        try:
            await wait_for_http(f"{url}/health", process, log)
            files_at_start = open_files(process.pid)
            loop = asyncio.get_running_loop()
            end = loop.time() + SECONDS

            async def slowloris(source: str) -> None:
                while loop.time() < end:
                    try:
                        reader, writer = await asyncio.open_connection(
                            "127.0.0.1", port, local_addr=(source, 0)
                        )
                    except OSError:
                        flood["connect failed"] += 1
                        await asyncio.sleep(RECONNECT)
                        continue
                    flood["connections"] += 1
                    try:
                        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")
                        while loop.time() < end:
                            try:
                                async with asyncio.timeout(1):
                                    answer = await reader.read(100)
                            except TimeoutError:
                                writer.write(b"X-Slow: 1\r\n")
                                continue
                            flood["503" if answer.startswith(b"HTTP/1.1 503 ") else "closed"] += 1
                            break
                    except OSError:
                        flood["reset"] += 1
                    finally:
                        writer.close()
                    await asyncio.sleep(RECONNECT)

            async def paying() -> None:
                connector = aiohttp.TCPConnector(local_addr=(PAYING_SOURCE, 0))
                timeout = aiohttp.ClientTimeout(total=30)
                async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
                    await asyncio.sleep(2)  # the flood is on by then
                    while loop.time() < end:
                        sent = loop.time()
                        async with http.get(f"{url}/health") as response:
                            paid[f"free {response.status}"] += 1
                        async with http.get(url + PRICED) as response:
                            paid[f"priced {response.status}"] += 1
                            assert response.status == 402, await response.text()
                            challenge = l402_challenge(response.headers)
                        authorization = await pay(bob, network, challenge)
                        headers = {"Authorization": authorization}
                        async with http.get(url + PRICED, headers=headers) as response:
                            paid[f"paid {response.status}"] += 1
                        seconds.append(loop.time() - sent)
                        # Within the challenge rate limit (2 a second).
                        await asyncio.sleep(sent + ROUND - loop.time())

            async def count_files() -> None:
                while loop.time() < end:
                    files.append(open_files(process.pid))
                    await asyncio.sleep(0.2)

            async with asyncio.TaskGroup() as group:
                for source in SOURCES:
                    for _ in range(PER_SOURCE):
                        group.create_task(slowloris(source))
                group.create_task(paying())
                group.create_task(count_files())
            assert process.poll() is None, log.read_text()
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0, log.read_text()

    text = log.read_text()
    exhausted = [line for line in text.splitlines() if "out of system resource" in line]
    print(  # the figures, shown with -s
        f"\nflood {dict(flood)}; paying client {dict(paid)}, a round (free GET, 402, payment, "
        f"paid GET) {min(seconds):.2f}-{max(seconds):.2f} s; gateway open files at start "
        f"{files_at_start}, peak {max(files)} (limit {OPEN_FILES}); log lines about "
        f"exhaustion {len(exhausted)}, refusals {text.count('refusing connections')}"
    )
    purchases = paid["paid 200"]
    assert purchases >= 3, paid
    assert paid == {"free 200": purchases, "priced 402": purchases, "paid 200": purchases}, paid
    assert flood["connections"] > len(SOURCES) * PER_SOURCE, flood  # closed ones came back
    assert files_at_start < RESERVED_FILES
    assert max(files) < OPEN_FILES, files
    assert len(exhausted) <= 2, exhausted
    assert "Traceback" not in text, text[-5000:]
