"""The README's first command: `make demo` (``python -m regtest.demo``) walks through a paid
request on its own regtest network, and with ``--stay`` keeps serving until stopped (what the
demo container runs)."""

from __future__ import annotations

import asyncio
import signal
import sys

import aiohttp
import pytest

from regtest.demo import PRICED_PATH
from regtest.processes import free_ports

pytestmark = pytest.mark.regtest


async def test_the_demo_pays_reuses_its_token_and_stays_serving() -> None:
    (port,) = free_ports(1)
    demo = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "regtest.demo",
        "--listen",
        f"127.0.0.1:{port}",
        "--stay",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert demo.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(240):
            while not lines or not lines[-1].startswith("still serving on"):
                line = await demo.stdout.readline()
                assert line, "\n".join(lines)
                lines.append(line.decode().rstrip())
        output = "\n".join(lines)
        assert "-> 402 Payment Required" in output
        assert "SETTLED" in output
        assert f"still serving on http://127.0.0.1:{port}" in output
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            async with http.get("/health") as response:
                assert response.status == 200
            async with http.get(PRICED_PATH) as response:
                assert response.status == 402
    finally:
        if demo.returncode is None:
            demo.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(demo.wait(), 60) == 0
