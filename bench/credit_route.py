"""Benchmark: a credit-billed route against a pay-per-token route, through ``serve``.

One ``l402-gateway serve`` (one worker, SQLite) in front of ``bench.app bare`` with two
routes: ``/api/premium/hello`` sells tokens (a paid request is verified from memory),
``/api/credit/hello`` draws each request's price from a prepaid balance (a reservation and
its charge: two store writes per request; its price is lower only so that one purchase
covers every request of the run, the amount costs nothing to process). Both are bought by bob, then
loaded by wrk in alternating rounds; the ratio of median requests/s is credit / token.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path

import aiohttp

from bench.before_after import _start
from bench.common import PATH, PRICE_MSAT, REPO, LoadResult, Verdict, record, run_wrk, start_app
from bench.common import stop as stop_process
from bench.verify_overhead import _paid_authorization
from gateway import l402
from gateway.lnd.client import LndClient
from gateway.ports import Msat
from regtest.demo import alice_lnd_and_store_toml
from regtest.network import Network, running_network
from regtest.processes import free_ports, wait_for_http

TARGET_RATIO = 0.8
CREDIT_PATH = "/api/credit/hello"
CREDIT_PRICE_MSAT = 10
CREDIT_MSAT = 20_000_000  # two million requests


def _config(network: Network, workdir: Path, port: int, upstream: str) -> Path:
    config = workdir / "gateway.toml"
    config.write_text(
        f"""[server]
listen = "127.0.0.1:{port}"
upstream = "{upstream}"
{alice_lnd_and_store_toml(network, workdir)}
[[routes]]
pattern = "/health"
free = true

[[routes]]
pattern = "/api/premium/*"
price_msat = {PRICE_MSAT}
service = "premium"

[[routes]]
pattern = "/api/credit/*"
price_msat = {CREDIT_PRICE_MSAT}
service = "credit"
billing = "credit"
credit_msat = {CREDIT_MSAT}
"""
    )
    return config


async def _credit_authorization(url: str, network: Network) -> str:
    async with aiohttp.ClientSession() as session, session.get(url + CREDIT_PATH) as response:
        assert response.status == 402, response.status
        value = next(
            v for v in response.headers.getall("WWW-Authenticate") if v.startswith("L402 ")
        )
    challenge = l402.parse_challenge(value)
    async with LndClient(network.bob.settings()) as bob:
        payment = await bob.send_payment(
            challenge.invoice, max_fee_msat=Msat(100_000), payment_timeout=30
        )
    assert payment.preimage is not None
    authorization = f"L402 {challenge.macaroon_b64}:{payment.preimage.hex()}"
    # Wait for the watcher to credit the account.
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            async with session.get(
                url + CREDIT_PATH, headers={"Authorization": authorization}
            ) as response:
                if response.status == 200:
                    return authorization
            await asyncio.sleep(0.05)
    raise RuntimeError("the credit was never available")


async def measure(seconds: int, rounds: int, connections: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="l402-bench-"))
    async with running_network(workdir / "network") as network:
        upstream_port, proxy_port = free_ports(2)
        upstream_url = f"http://127.0.0.1:{upstream_port}"
        proxy_url = f"http://127.0.0.1:{proxy_port}"
        upstream = start_app(upstream_port, "bare", None, workdir / "upstream.log")
        config = _config(network, workdir, proxy_port, upstream_url)
        log = workdir / "serve.log"
        proxy = _start(REPO, ["-m", "gateway.cli", "--config", str(config), "serve"], log)
        try:
            await wait_for_http(upstream_url + PATH, upstream, workdir / "upstream.log")
            await wait_for_http(proxy_url + "/health", proxy, log)
            headers = {
                "token": {"Authorization": await _paid_authorization(proxy_url, network)},
                "credit": {"Authorization": await _credit_authorization(proxy_url, network)},
            }
            paths = {"token": PATH, "credit": CREDIT_PATH}
            results: dict[str, list[LoadResult]] = {"token": [], "credit": []}
            for repeat in range(rounds + 1):  # the first pass warms up
                for name in ("token", "credit"):
                    result = await asyncio.to_thread(
                        run_wrk,
                        proxy_url + paths[name],
                        seconds=2 if repeat == 0 else seconds,
                        connections=connections,
                        headers=headers[name],
                    )
                    if result.non_2xx:
                        raise RuntimeError(f"{name}: {result.non_2xx} non-2xx responses")
                    if repeat:
                        results[name].append(result)
        finally:
            stop_process(upstream)
            stop_process(proxy)

    def median(name: str, field: str) -> float:
        return float(statistics.median(getattr(r, field) for r in results[name]))

    ratio = median("credit", "requests_per_second") / median("token", "requests_per_second")
    record(
        "Credit route",
        [
            f"`serve` (one worker, SQLite) in front of a bare aiohttp app: wrk -t1 "
            f"-c{connections}, {rounds} x {seconds}s alternating rounds per route, medians.",
            "",
            "| route | requests/s | p50 ms | p99 ms |",
            "| --- | --- | --- | --- |",
            *(
                f"| {name} | {median(name, 'requests_per_second'):.0f} | "
                f"{median(name, 'p50_ms'):.2f} | {median(name, 'p99_ms'):.2f} |"
                for name in ("token", "credit")
            ),
            "",
            f"Credit / token-paid throughput: **{ratio:.1%}** (target {TARGET_RATIO:.0%}).",
        ],
        Verdict(
            f"{ratio:.1%} of token-paid requests/s through serve",
            f">= {TARGET_RATIO:.0%}",
            ratio >= TARGET_RATIO,
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.credit_route")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    asyncio.run(measure(args.seconds, args.rounds, args.connections))


if __name__ == "__main__":
    main()
