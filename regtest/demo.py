"""The demo: a priced API behind the gateway, paid over a real regtest Lightning network.

Starts btcd and alice/bob/carol, a small demo API, and ``l402-gateway serve`` in front of it
(alice is the gateway's node). A client gets 402, pays the invoice from bob's node through
carol, retries with the L402 credential and gets 200; ``l402-gateway invoices`` then shows the
invoice SETTLED. Run with ``make demo``; logs stay in the directory it prints.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from gateway import l402
from gateway.examples import demo_api
from gateway.lnd.client import LndClient
from gateway.ports import Msat
from regtest.network import Network, running_network
from regtest.processes import free_ports

MAX_FEE = Msat(5_000)
PRICED_PATH = "/api/premium/fortune"


def say(message: str = "") -> None:
    print(message, flush=True)


def gateway_toml(network: Network, workdir: Path, listen: str, upstream: str) -> str:
    return f"""\
[server]
listen = "{listen}"
upstream = "{upstream}"

[lnd]
host = "{network.alice.rpc_host}"
tls_cert = "{network.alice.tls_cert}"
macaroon = "{network.alice.macaroon("invoice")}"

[store]
url = "sqlite:///{workdir / "gateway.db"}"

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


async def wait_for_gateway(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            if process.poll() is not None:
                raise RuntimeError(f"the gateway exited; see {log}")
            try:
                async with session.get(f"{url}/health") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"the gateway did not start in 30 s; see {log}")


async def client_pays(url: str, network: Network) -> None:
    async with aiohttp.ClientSession() as session, LndClient(network.bob.settings()) as bob:
        say(f"client: GET {PRICED_PATH}")
        async with session.get(url + PRICED_PATH) as response:
            problem = await response.json()
            headers = response.headers.getall("WWW-Authenticate")
        say(f"  -> {response.status} {response.reason}: {problem['detail']}")
        challenge = l402.parse_challenge(next(h for h in headers if h.startswith("L402 ")))
        say(f"     price {problem['amount_msat']} msat, invoice {challenge.invoice[:40]}...")

        say("client: bob's node pays the invoice, routed through carol ...")
        started = time.monotonic()
        payment = await bob.send_payment(
            challenge.invoice,
            max_fee_msat=MAX_FEE,
            payment_timeout=30,
            last_hop_pubkey=network.carol.pubkey,
        )
        assert payment.preimage is not None
        names = {node.pubkey: name for name, node in network.nodes.items()}
        hops = " -> ".join(names.get(pubkey, pubkey[:12]) for pubkey in payment.route)
        say(
            f"  -> {payment.status.value} in {time.monotonic() - started:.2f}s: bob -> {hops}, "
            f"fee {payment.fee_msat} msat"
        )

        authorization = f"L402 {challenge.macaroon_b64}:{payment.preimage.hex()}"
        say(f"client: GET {PRICED_PATH} with Authorization: L402 <macaroon>:<preimage>")
        async with session.get(url + PRICED_PATH, headers={"Authorization": authorization}) as r:
            body = await r.json()
        say(f"  -> {r.status} {r.reason}: {body['fortune']!r}")
        say(f"     the API saw the paid token: {body['paid']}")


async def demo(workdir: Path) -> None:
    started = time.monotonic()
    say(f"starting a regtest Lightning network in {workdir} (btcd + alice, bob, carol)")
    async with running_network(workdir) as network:
        say(f"network ready in {time.monotonic() - started:.1f}s")
        api = web.AppRunner(demo_api())
        await api.setup()
        api_port, gateway_port = free_ports(2)
        await web.TCPSite(api, "127.0.0.1", api_port).start()
        upstream = f"http://127.0.0.1:{api_port}"
        url = f"http://127.0.0.1:{gateway_port}"
        config = workdir / "gateway.toml"
        config.write_text(gateway_toml(network, workdir, f"127.0.0.1:{gateway_port}", upstream))
        log = workdir / "gateway.log"
        say(f"demo API on {upstream} (it knows nothing about Lightning)")
        say(f"l402-gateway serve --config {config}  (log {log})")
        gateway = start_gateway(config, log)
        try:
            await wait_for_gateway(url, gateway, log)
            say(f"gateway on {url}, invoices from alice's node\n")
            await client_pays(url, network)
            say(f"\n$ l402-gateway --config {config} invoices")
            # The watcher records the settlement within milliseconds of the payment.
            for _ in range(100):
                listing = invoices(config)
                if "SETTLED" in listing:
                    break
                await asyncio.sleep(0.1)
            say(listing)
        finally:
            gateway.terminate()
            gateway.wait(timeout=30)
            await api.cleanup()
    say(f"\ndone in {time.monotonic() - started:.1f}s; logs are in {workdir}")


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="l402-demo-"))
    asyncio.run(demo(workdir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
