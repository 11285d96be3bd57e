"""Benchmark 1: token verification overhead.

The same trivial aiohttp handler, bare and behind the gateway middleware, loaded by wrk with a
valid paid token (minted by the gateway on the regtest network's alice, paid by bob), on a
priced route and on a free one. Runs alternate bare/gateway rounds and reports the medians;
the target is that the gateway keeps at least 95% of the bare throughput on the priced route.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path

import aiohttp

from bench.common import LoadResult, Verdict, gateway_config, record, run_wrk, start_app, stop
from gateway import l402
from gateway.lnd.client import LndClient
from gateway.ports import Msat
from regtest.network import Network, running_network
from regtest.processes import free_ports, wait_for_http

TARGET_RATIO = 0.95
PATH = "/api/premium/hello"
FREE_PATH = "/health"  # no rule prices it
ROUTES = {"priced": PATH, "free": FREE_PATH}


async def _paid_authorization(url: str, network: Network) -> str:
    async with aiohttp.ClientSession() as session, session.get(url + PATH) as response:
        assert response.status == 402, response.status
        value = next(
            v for v in response.headers.getall("WWW-Authenticate") if v.startswith("L402 ")
        )
    challenge = l402.parse_challenge(value)
    async with LndClient(network.bob.settings()) as bob:
        payment = await bob.send_payment(
            challenge.invoice, max_fee_msat=Msat(10_000), payment_timeout=30
        )
    assert payment.preimage is not None
    return f"L402 {challenge.macaroon_b64}:{payment.preimage.hex()}"


async def measure(seconds: int, rounds: int, connections: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="l402-bench-"))
    async with running_network(workdir / "network") as network:
        bare_port, gateway_port = free_ports(2)
        bare_url = f"http://127.0.0.1:{bare_port}"
        gateway_url = f"http://127.0.0.1:{gateway_port}"
        config = gateway_config(network, workdir)
        bare = start_app(bare_port, "bare", None, workdir / "bare.log")
        gateway = start_app(gateway_port, "gateway", config, workdir / "gateway.log")
        try:
            await wait_for_http(bare_url + PATH, bare, workdir / "bare.log")
            await wait_for_http(gateway_url + "/health", gateway, workdir / "gateway.log")
            authorization = await _paid_authorization(gateway_url, network)
            headers = {"Authorization": authorization}
            results: dict[tuple[str, str], list[LoadResult]] = {}
            # Warm both servers up, then alternate so drift hits both sides alike.
            for url in (bare_url, gateway_url):
                await asyncio.to_thread(
                    run_wrk, url + PATH, seconds=2, connections=connections, headers=headers
                )
            for _ in range(rounds):
                for route, path in ROUTES.items():
                    for name, url in (("bare", bare_url), ("gateway", gateway_url)):
                        result = await asyncio.to_thread(
                            run_wrk,
                            url + path,
                            seconds=seconds,
                            connections=connections,
                            headers=headers,
                        )
                        if result.non_2xx:
                            raise RuntimeError(f"{name} {path}: {result.non_2xx} non-2xx responses")
                        results.setdefault((name, route), []).append(result)
        finally:
            stop(bare)
            stop(gateway)

    def median(name: str, route: str, field: str) -> float:
        return float(statistics.median(getattr(r, field) for r in results[name, route]))

    def ratio(route: str) -> float:
        rate = "requests_per_second"
        return median("gateway", route, rate) / median("bare", route, rate)

    record(
        "Token verification overhead",
        [
            f"wrk -t1 -c{connections}, {rounds} x {seconds}s alternating rounds per side and "
            f"route, medians; every request presents a valid paid token. Priced route "
            f"`{PATH}`, free route `{FREE_PATH}` (no rule prices it).",
            "",
            "| route | server | requests/s | p50 ms | p99 ms |",
            "| --- | --- | --- | --- | --- |",
            *(
                f"| {route} | {name} | {median(name, route, 'requests_per_second'):.0f} | "
                f"{median(name, route, 'p50_ms'):.2f} | {median(name, route, 'p99_ms'):.2f} |"
                for route in ROUTES
                for name in ("bare", "gateway")
            ),
            "",
            f"Gateway / bare throughput: **{ratio('priced'):.1%}** on the priced route (target "
            f"{TARGET_RATIO:.0%}), {ratio('free'):.1%} on the free route.",
        ],
        Verdict(
            f"{ratio('priced'):.1%} of bare aiohttp's requests/s",
            f">= {TARGET_RATIO:.0%}",
            ratio("priced") >= TARGET_RATIO,
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.verify_overhead")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    asyncio.run(measure(args.seconds, args.rounds, args.connections))


if __name__ == "__main__":
    main()
