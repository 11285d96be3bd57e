"""The demo: a priced API behind the gateway, paid over a real regtest Lightning network.

Starts btcd and alice/bob/carol, a small demo API, and ``l402-gateway serve`` in front of it
(alice is the gateway's node). A client sees the 402; ``l402-gateway pay`` pays it from bob's
node and gets 200, then reuses the cached token; ``l402-gateway invoices`` shows the invoice
SETTLED. Run with ``make demo``; logs stay in the directory it prints. ``--stay`` keeps the
network and the gateway running afterwards (``--listen`` fixes its address), for a container.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from gateway import l402
from gateway.examples import demo_api
from regtest.network import Network, running_network
from regtest.processes import free_ports, wait_for_http

PRICED_PATH = "/api/premium/fortune"


def say(message: str = "") -> None:
    print(message, flush=True)


def alice_lnd_and_store_toml(network: Network, workdir: Path) -> str:
    """``[lnd]`` on alice with her invoice macaroon, and a SQLite ``[store]`` in ``workdir``."""
    return f"""\
[lnd]
host = "{network.alice.rpc_host}"
tls_cert = "{network.alice.tls_cert}"
macaroon = "{network.alice.macaroon("invoice")}"

[store]
url = "sqlite://{workdir / "gateway.db"}"
"""


def gateway_toml(network: Network, workdir: Path, listen: str, upstream: str) -> str:
    return f"""\
[server]
listen = "{listen}"
upstream = "{upstream}"

{alice_lnd_and_store_toml(network, workdir)}
[[routes]]
pattern = "/health"
free = true

[[routes]]
pattern = "/api/premium/*"
price_msat = 21000
service = "premium"
capabilities = ["read"]
lifetime = 3600
"""


def gateway_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "gateway.cli", *args]


def start_gateway(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as output:
        return subprocess.Popen(  # noqa: S603 - our own interpreter and module
            gateway_command("--config", str(config), "serve"),
            stdout=output,
            stderr=subprocess.STDOUT,
        )


def invoices(config: Path) -> str:
    listing = subprocess.run(  # noqa: S603 - our own interpreter and module
        gateway_command("--config", str(config), "invoices"),
        capture_output=True,
        text=True,
        check=True,
    )
    return listing.stdout.rstrip()


def pay_command(url: str, network: Network, workdir: Path) -> list[str]:
    bob = network.bob
    return gateway_command(
        "pay",
        url,
        f"--lnd-host={bob.rpc_host}",
        f"--lnd-tls-cert={bob.tls_cert}",
        f"--lnd-macaroon={bob.macaroon()}",
        "--max-cost=50",
        f"--token-cache={workdir / 'bob-tokens.json'}",
    )


def run_pay(command: list[str]) -> None:
    shown = [part for part in command if not part.startswith("--lnd-")]
    say("$ l402-gateway " + " ".join(shown[shown.index("pay") :]) + " --lnd-...")
    result = subprocess.run(command, capture_output=True, text=True, check=True)  # noqa: S603
    for line in result.stderr.splitlines():
        say(f"  {line}")
    say(f"  {result.stdout.strip()}")


async def client_pays(url: str, network: Network, workdir: Path) -> None:
    async with aiohttp.ClientSession() as session:
        say(f"client: GET {PRICED_PATH}")
        async with session.get(url + PRICED_PATH) as response:
            problem = await response.json()
            headers = response.headers.getall("WWW-Authenticate")
        say(f"  -> {response.status} {response.reason}: {problem['detail']}")
        challenge = l402.parse_challenge(next(h for h in headers if h.startswith("L402 ")))
        say(f"     price {problem['amount_msat']} msat, invoice {challenge.invoice[:40]}...")

    say("\nbob pays with the gateway's client, from his own LND node:")
    command = pay_command(url + PRICED_PATH, network, workdir)
    await asyncio.to_thread(run_pay, command)
    say("\nagain: the cached token is reused, nothing is paid:")
    await asyncio.to_thread(run_pay, command)


async def demo(workdir: Path, listen: str | None, stay: bool) -> None:
    started = time.monotonic()
    say(f"starting a regtest Lightning network in {workdir} (btcd + alice, bob, carol)")
    async with running_network(workdir) as network:
        say(f"network ready in {time.monotonic() - started:.1f}s")
        api = web.AppRunner(demo_api())
        await api.setup()
        api_port, gateway_port = free_ports(2)
        await web.TCPSite(api, "127.0.0.1", api_port).start()
        upstream = f"http://127.0.0.1:{api_port}"
        listen = listen or f"127.0.0.1:{gateway_port}"
        host, _, port = listen.rpartition(":")
        # A wildcard address is listened on, not connected to.
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"  # noqa: S104
        config = workdir / "gateway.toml"
        config.write_text(gateway_toml(network, workdir, listen, upstream))
        log = workdir / "gateway.log"
        say(f"demo API on {upstream} (it knows nothing about Lightning)")
        say(f"l402-gateway --config {config} serve  (log {log})")
        gateway = start_gateway(config, log)
        try:
            await wait_for_http(f"{url}/health", gateway, log)
            say(f"gateway on {url}, invoices from alice's node\n")
            await client_pays(url, network, workdir)
            say(f"\n$ l402-gateway --config {config} invoices")
            # The watcher records the settlement within milliseconds of the payment.
            for _ in range(100):
                listing = invoices(config)
                if "SETTLED" in listing:
                    break
                await asyncio.sleep(0.1)
            say(listing)
            say("(the OPEN one is the first, unpaid challenge: it expires unpaid)")
            if stay:
                say(f"\nstill serving on {url} (SIGINT or SIGTERM stops it); pay with:")
                say(" ".join(pay_command(url + PRICED_PATH, network, workdir)))
                await _until_stopped()
        finally:
            gateway.terminate()
            gateway.wait(timeout=30)
            await api.cleanup()
    say(f"\ndone in {time.monotonic() - started:.1f}s; logs are in {workdir}")


async def _until_stopped() -> None:
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopped.set)
    await stopped.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m regtest.demo", description=__doc__)
    parser.add_argument(
        "--listen", metavar="HOST:PORT", help="the gateway's address (default: a free port)"
    )
    parser.add_argument(
        "--stay", action="store_true", help="keep everything running after the walkthrough"
    )
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="l402-demo-"))
    asyncio.run(demo(workdir, args.listen, args.stay))
    return 0


if __name__ == "__main__":
    sys.exit(main())
