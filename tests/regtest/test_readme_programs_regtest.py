"""Every Python program in README.md, run as a user would run it, against the regtest network.

Each block is saved as ``app.py`` in a working directory holding a ``gateway.toml`` (alice,
a store, ``/api/premium/*`` priced) and run with ``python app.py``, in README order, with the
variables the README documents: ``PORT``, ``GATEWAY_LND_*`` (alice), ``GATEWAY_PAYER_*``
(bob), ``L402_URL`` (the server block that ran last) and ``L402_REGTEST_DIR``. A block must
exit 0, or listen on ``PORT`` and answer 402 on the priced route; a server block keeps
running, for the blocks after it to call, until the next one starts.
"""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import sys
from pathlib import Path

import aiohttp
import pytest

from regtest.build import cache_root
from regtest.network import Network
from regtest.processes import free_ports
from tests.regtest.gateway_helpers import REPO, bake_gateway_macaroon
from tests.unit.test_readme_snippets import programs

pytestmark = pytest.mark.regtest
PRICED = "/api/premium/fortune"
DEADLINE = 180.0  # the regtest block starts a network of its own
_IMPORTS_REGTEST = re.compile(r"^\s*(from|import) regtest\b", re.MULTILINE)


def gateway_toml(network: Network, tmp_path: Path, macaroon: Path) -> str:
    alice = network.alice
    return (
        f'[lnd]\nhost = "{alice.rpc_host}"\ntls_cert = "{alice.tls_cert}"\n'
        f'macaroon = "{macaroon}"\n'
        f'[store]\nurl = "sqlite://{tmp_path / "gateway.db"}"\n'
        '[[routes]]\npattern = "/api/premium/*"\nprice_msat = 21000\nservice = "premium"\n'
    )


async def answer(url: str) -> int | None:
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
            session.get(url) as response,
        ):
            return response.status
    except aiohttp.ClientConnectionError:
        return None


async def stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 15)
        except TimeoutError:
            process.kill()
            await process.wait()


async def test_every_readme_python_program_runs(network: Network, tmp_path: Path) -> None:
    macaroon = bake_gateway_macaroon(network, tmp_path / "gateway.macaroon")
    bob = network.bob
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "L402_"))}
    env |= {
        "HOME": str(tmp_path / "home"),  # the token cache under ~/.cache
        "GATEWAY_LND_HOST": network.alice.rpc_host,
        "GATEWAY_LND_TLS_CERT": str(network.alice.tls_cert),
        "GATEWAY_LND_MACAROON": str(macaroon),
        "GATEWAY_PAYER_LND_HOST": bob.rpc_host,
        "GATEWAY_PAYER_LND_TLS_CERT": str(bob.tls_cert),
        "GATEWAY_PAYER_LND_MACAROON": str(bob.macaroon("admin")),
        "GATEWAY_PAYER_NETWORK": "regtest",
        "L402_REGTEST_DIR": str(tmp_path / "net"),
        "L402_REGTEST_CACHE": str(cache_root()),  # the built LND, found without the real HOME
    }
    server: asyncio.subprocess.Process | None = None
    served: list[str] = []
    try:
        for number, block in enumerate(programs()):
            work = tmp_path / f"block{number}"
            work.mkdir()
            (work / "gateway.toml").write_text(gateway_toml(network, tmp_path, macaroon))
            (work / "app.py").write_text(block.text, encoding="utf-8")
            (port,) = free_ports(1)
            block_env = env | {"PORT": str(port)}
            if _IMPORTS_REGTEST.search(block.text):
                block_env["PYTHONPATH"] = str(REPO)  # the README says: in the checkout
            with (work / "output").open("wb") as output:
                process = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "app.py",
                    cwd=work,
                    env=block_env,
                    stdout=output,
                    stderr=output,
                )
            url = f"http://127.0.0.1:{port}{PRICED}"
            status = await run_or_serve(process, url)
            log = (work / "output").read_text(errors="replace")
            if status is None:
                assert process.returncode == 0, f"{block.name} exited {process.returncode}:\n{log}"
                continue
            assert status == 402, f"{block.name} answered {status} on {PRICED}:\n{log}"
            if server is not None:
                await stop(server)
            server, env["L402_URL"] = process, url
            served.append(block.name)
    finally:
        if server is not None:
            await stop(server)
    assert served, "no README block served the priced route"
    with sqlite3.connect(tmp_path / "gateway.db") as store:
        (settled,) = store.execute(
            "SELECT count(*) FROM invoices WHERE state = 'SETTLED'"
        ).fetchone()
    assert settled >= 1, "the README's paying program paid nothing"


async def run_or_serve(process: asyncio.subprocess.Process, url: str) -> int | None:
    """None once ``process`` has exited; the status it answers ``url`` with, if it serves."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while loop.time() < deadline:
        try:
            await asyncio.wait_for(process.wait(), 0.3)
            return None
        except TimeoutError:
            pass
        status = await answer(url)
        if status is not None:
            return status
    await stop(process)
    raise AssertionError(f"{url}: neither exited nor served within {DEADLINE} s")
