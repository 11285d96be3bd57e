"""Benchmark: end-to-end latency of a pay-on-success request against an ordinary paid one.

One ``l402-gateway serve`` (one worker, SQLite) in front of a small aiohttp backend that
answers POSTs with 201. ``/api/paid/job`` sells a token per request (pay, then the retry is
forwarded); ``/api/held/job`` has ``settle = "on_success"`` (the 402 stores the request and
issues a hold invoice; the backend runs while bob's payment is held, then the gateway settles
and the retry gets the stored response). Each sample is the whole exchange: POST, 402, bob
pays over two hops (bob -> carol -> alice), POST with the credential, the backend's answer.
The two kinds alternate; the difference is what holding the payment around the backend call
costs.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from bench.before_after import _start
from bench.common import MAX_FEE, PAYMENT_TIMEOUT, REPO, Verdict, ViaCarol, percentile, record
from gateway import l402
from gateway.lnd.client import LndClient
from regtest.demo import alice_lnd_and_store_toml
from regtest.network import Network, running_network
from regtest.processes import free_ports, wait_for_http

PRICE_MSAT = 2_000
KINDS = {"paid": "/api/paid/job", "held": "/api/held/job"}


def _config(network: Network, workdir: Path, port: int, upstream: str) -> Path:
    config = workdir / "gateway.toml"
    config.write_text(
        f"""[server]
listen = "127.0.0.1:{port}"
upstream = "{upstream}"
{alice_lnd_and_store_toml(network, workdir)}
[rate_limit]
challenges_per_second = 1000
burst = 1000

[[routes]]
pattern = "/health"
free = true

[[routes]]
pattern = "/api/paid/*"
price_msat = {PRICE_MSAT}
service = "paid"

[[routes]]
pattern = "/api/held/*"
price_msat = {PRICE_MSAT}
service = "held"
settle = "on_success"
"""
    )
    return config


def _backend() -> web.Application:
    async def job(request: web.Request) -> web.Response:
        return web.json_response({"got": len(await request.read())}, status=201)

    async def health(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/api/{kind}/job", job)
    app.router.add_get("/health", health)
    return app


async def _exchange(http: aiohttp.ClientSession, payer: ViaCarol, url: str) -> float:
    """Seconds for POST, 402, payment, POST with the credential, the backend's answer."""
    started = time.perf_counter()
    async with http.post(url, data=b"job") as response:
        if response.status != 402:
            raise RuntimeError(f"{url}: expected 402, got {response.status}")
        value = next(v for v in response.headers.getall("WWW-Authenticate") if v[:5] == "L402 ")
    challenge = l402.parse_challenge(value)
    payment = await payer.send_payment(
        challenge.invoice, max_fee_msat=MAX_FEE, payment_timeout=PAYMENT_TIMEOUT
    )
    assert payment.preimage is not None
    authorization = f"L402 {challenge.macaroon_b64}:{payment.preimage.hex()}"
    async with http.post(url, data=b"job", headers={"Authorization": authorization}) as response:
        await response.read()
        if response.status not in (200, 201):
            raise RuntimeError(f"{url}: expected the backend's answer, got {response.status}")
    return time.perf_counter() - started


async def measure(samples: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="l402-bench-"))
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    async with running_network(workdir / "network") as network:
        backend = web.AppRunner(_backend())
        await backend.setup()
        upstream_port, proxy_port = free_ports(2)
        await web.TCPSite(backend, "127.0.0.1", upstream_port).start()
        proxy_url = f"http://127.0.0.1:{proxy_port}"
        config = _config(network, workdir, proxy_port, f"http://127.0.0.1:{upstream_port}")
        log = workdir / "serve.log"
        proxy = _start(REPO, ["-m", "gateway.cli", "--config", str(config), "serve"], log)
        try:
            await wait_for_http(proxy_url + "/health", proxy, log)
            async with (
                LndClient(network.bob.settings()) as bob,
                aiohttp.ClientSession() as http,
            ):
                payer = ViaCarol(bob, network)
                for path in KINDS.values():  # one unrecorded round each
                    await _exchange(http, payer, proxy_url + path)
                for _ in range(samples):
                    for kind, path in KINDS.items():
                        times[kind].append(await _exchange(http, payer, proxy_url + path))
        finally:
            proxy.terminate()
            await asyncio.to_thread(proxy.wait, 30)
            await backend.cleanup()

    def ms(kind: str, fraction: float) -> float:
        return percentile(times[kind], fraction) * 1000

    p50, p99 = (ms("held", fraction) - ms("paid", fraction) for fraction in (0.5, 0.99))
    record(
        "Pay on success",
        [
            f"{samples} samples per kind, alternating, after one unrecorded round each; "
            f"{PRICE_MSAT} msat over two hops, bob -> carol -> alice, on regtest LND; `serve` "
            "(one worker, SQLite) in front of an aiohttp backend answering 201.",
            "",
            "| POST, 402, pay, POST with the credential, answer | p50 ms | p99 ms |",
            "| --- | --- | --- |",
            f"| ordinary paid route (the retry is forwarded) | {ms('paid', 0.5):.1f} | "
            f"{ms('paid', 0.99):.1f} |",
            f'| `settle = "on_success"` (run while held, then settled; the retry gets the '
            f"stored answer) | {ms('held', 0.5):.1f} | {ms('held', 0.99):.1f} |",
            "",
            f"Holding the payment around the backend call costs **{p50:+.1f} ms** at p50 and "
            f"**{p99:+.1f} ms** at p99 (the executor's notice of the held HTLC, the backend call "
            "inside the payment, the settle). Percentiles are nearest-rank.",
        ],
        Verdict(f"pay on success {p50:+.1f} ms at p50, {p99:+.1f} ms at p99", "", None),
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.on_success")
    parser.add_argument("--samples", type=int, default=30, help="samples per kind")
    args = parser.parse_args()
    asyncio.run(measure(args.samples))


if __name__ == "__main__":
    main()
