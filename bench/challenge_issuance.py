"""Benchmark 3: challenge issuance.

402 challenges per second from the gateway (each one a real invoice on the regtest network's
alice, plus a minted macaroon and two store writes), loaded by wrk, against a raw loop of
AddInvoice calls on the same node in the same run with the same concurrency. Target: the
gateway reaches at least 90% of the raw LND rate.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from bench.common import NO_RATE_LIMIT, Verdict, gateway_config, record, run_wrk, start_app, stop
from gateway.lnd.client import LndClient
from gateway.ports import Msat
from gateway.store import SqliteStore
from regtest.network import Network, running_network
from regtest.processes import free_ports, wait_for_http

TARGET_RATIO = 0.90
PATH = "/api/premium/hello"


async def _issued(workdir: Path) -> int:
    store = await SqliteStore.open(workdir / "gateway.db")
    try:
        return len(await store.list_invoices())
    finally:
        await store.close()


async def raw_add_invoice_rate(network: Network, seconds: float, concurrency: int) -> float:
    """AddInvoice calls per second from ``concurrency`` concurrent callers."""
    async with LndClient(network.alice.settings(macaroon="invoice")) as alice:
        deadline = time.monotonic() + seconds
        count = 0

        async def caller() -> None:
            nonlocal count
            while time.monotonic() < deadline:
                await alice.add_invoice(Msat(1000), "premium: GET /api/premium/hello", 600)
                count += 1

        started = time.monotonic()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        return count / (time.monotonic() - started)


async def measure(seconds: int, rounds: int, connections: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="l402-bench-"))
    raw: list[float] = []
    gateway_rates: list[float] = []
    p99s: list[float] = []
    async with running_network(workdir / "network") as network:
        (port,) = free_ports(1)
        url = f"http://127.0.0.1:{port}"
        config = gateway_config(network, workdir, NO_RATE_LIMIT)
        gateway = start_app(port, "gateway", config, workdir / "gateway.log")
        try:
            await wait_for_http(url + "/health", gateway, workdir / "gateway.log")
            for _ in range(rounds):
                raw.append(await raw_add_invoice_rate(network, seconds, connections))
                before = await _issued(workdir)
                started = time.monotonic()
                result = await asyncio.to_thread(
                    run_wrk, url + PATH, seconds=seconds, connections=connections, headers={}
                )
                elapsed = time.monotonic() - started
                issued = await _issued(workdir) - before
                # Count what the store holds, not responses: a 503 is not a challenge.
                if abs(issued - result.requests_per_second * seconds) > 0.05 * issued:
                    raise RuntimeError(f"{issued} invoices stored for {result} responses")
                gateway_rates.append(issued / elapsed)
                p99s.append(result.p99_ms)
        finally:
            stop(gateway)

    raw_rate = sorted(raw)[len(raw) // 2]
    gateway_rate = sorted(gateway_rates)[len(gateway_rates) // 2]
    ratio = gateway_rate / raw_rate
    record(
        "Challenge issuance",
        [
            f"{connections} concurrent callers on both sides, "
            f"{rounds} x {seconds}s alternating rounds, medians. Every response is a 402 with "
            "a new invoice on regtest LND.",
            "",
            "| side | per second |",
            "| --- | --- |",
            f"| raw AddInvoice loop (grpc.aio) | {raw_rate:.0f} invoices |",
            f"| gateway 402 challenges (wrk) | {gateway_rate:.0f} challenges "
            f"(p99 {sorted(p99s)[len(p99s) // 2]:.1f} ms) |",
            "",
            f"Gateway / raw LND rate: **{ratio:.1%}** (target {TARGET_RATIO:.0%}).",
        ],
        Verdict(
            f"{ratio:.1%} of a raw AddInvoice loop's rate",
            f">= {TARGET_RATIO:.0%}",
            ratio >= TARGET_RATIO,
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.challenge_issuance")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    asyncio.run(measure(args.seconds, args.rounds, args.connections))


if __name__ == "__main__":
    main()
