"""Benchmark: what the operations features cost paid requests through ``l402-gateway serve``.

Two ``serve`` processes in front of the same bare upstream, each with its own store on the
regtest network's alice: one with the operations features off, one with them on
(``_sides``: ``[metrics]`` on a listener of its own and on a path, scraped once a second
during its rounds, as a Prometheus server would, but faster; and a ``[[webhook]]`` endpoint,
a receiver in this process that verifies every delivery). During every round, of both
sides, bob buys a token about twice a second, so both stores write settlement events and
the "on" side also signs and delivers them. wrk loads each with a valid paid token in
alternating rounds; the medians' ratio is the figure, the issue's target >= 0.95.

``python -m bench.ops_overhead [--workers N]`` (N > 1: the multiprocess mode of metrics).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web

from bench.common import REPO, LoadResult, Verdict, record, run_wrk, start_app, stop
from bench.verify_overhead import _paid_authorization
from gateway import l402
from gateway.lnd.client import LndClient
from gateway.ports import Msat
from gateway.webhooks import new_secret, verify_delivery
from regtest.demo import alice_lnd_and_store_toml
from regtest.network import Network, running_network
from regtest.processes import free_ports, wait_for_http

TARGET_RATIO = 0.95
PATH = "/api/premium/hello"
PRICE_MSAT = 1_000


def _sides(metrics_port: int, receiver: str, secret_file: Path) -> dict[str, str]:
    """Each side's extra configuration."""
    return {
        "off": "",
        "on": f'''[metrics]
listen = "127.0.0.1:{metrics_port}"
path = "/metrics"

[webhooks]
initial_backoff = 0.5

[[webhook]]
name = "bench"
url = "{receiver}"
events = ["*"]
secret_file = "{secret_file}"
''',
    }


@contextlib.asynccontextmanager
async def _receiving(secret: str) -> AsyncIterator[tuple[str, list[str]]]:
    """A webhook receiver that verifies each delivery; yields its URL and the event types."""
    received: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        event = verify_delivery(secret, dict(request.headers), await request.read())
        received.append(str(event["type"]))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    (port,) = free_ports(1)
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/hook", received
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def _buying(url: str, bob: LndClient) -> AsyncIterator[list[float]]:
    """Buy a token from ``url`` about twice a second while the block runs (a settlement,
    so its events); yields the seconds each purchase took."""
    took: list[float] = []

    async def buy() -> None:
        loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession() as session:
            while True:
                started = loop.time()
                async with session.get(url + PATH) as response:
                    assert response.status == 402, response.status
                    value = next(
                        v
                        for v in response.headers.getall("WWW-Authenticate")
                        if v.startswith("L402 ")
                    )
                invoice = l402.parse_challenge(value).invoice
                await bob.send_payment(invoice, max_fee_msat=Msat(10_000), payment_timeout=30)
                took.append(loop.time() - started)
                await asyncio.sleep(0.5)

    task = asyncio.create_task(buy())
    try:
        yield took
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _config(
    network: Network, workdir: Path, port: int, upstream: str, workers: int, extra: str
) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "gateway.toml"
    config.write_text(
        f"""\
[server]
listen = "127.0.0.1:{port}"
upstream = "{upstream}"
workers = {workers}

{alice_lnd_and_store_toml(network, workdir)}
{extra}
[[routes]]
pattern = "/health"
free = true

[[routes]]
pattern = "/api/premium/*"
price_msat = {PRICE_MSAT}
service = "premium"
"""
    )
    return config


def _serve(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as output:
        return subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "gateway.cli", "--config", str(config), "serve"],
            cwd=REPO,
            stdout=output,
            stderr=subprocess.STDOUT,
        )


@contextlib.asynccontextmanager
async def _scraping(url: str | None) -> AsyncIterator[list[int]]:
    """Scrape ``url`` once a second while the block runs; yields the scrapes' sizes."""
    sizes: list[int] = []
    if url is None:
        yield sizes
        return

    async def scrape() -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                async with session.get(url) as response:
                    assert response.status == 200, response.status
                    sizes.append(len(await response.read()))
                await asyncio.sleep(1.0)

    task = asyncio.create_task(scrape())
    try:
        yield sizes
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def measure(seconds: int, rounds: int, connections: int, workers: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="l402-bench-ops-"))
    secret = new_secret()
    secret_file = workdir / "bench.whsec"
    secret_file.write_text(secret)
    secret_file.chmod(0o600)
    async with (
        running_network(workdir / "network") as network,
        LndClient(network.bob.settings()) as bob,
        _receiving(secret) as (receiver, received),
    ):
        upstream_port, off_port, on_port, metrics_port = free_ports(4)
        upstream_url = f"http://127.0.0.1:{upstream_port}"
        upstream = start_app(upstream_port, "bare", None, workdir / "upstream.log")
        ports = {"off": off_port, "on": on_port}
        processes = {}
        try:
            await wait_for_http(upstream_url + PATH, upstream, workdir / "upstream.log")
            for name, extra in _sides(metrics_port, receiver, secret_file).items():
                config = _config(network, workdir / name, ports[name], upstream_url, workers, extra)
                log = workdir / name / "serve.log"
                processes[name] = _serve(config, log)
            urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
            for name, url in urls.items():
                await wait_for_http(url + "/health", processes[name], workdir / name / "serve.log")
            headers = {
                name: {"Authorization": await _paid_authorization(url, network)}
                for name, url in urls.items()
            }
            results: dict[str, list[LoadResult]] = {"off": [], "on": []}
            for name, url in urls.items():  # warm-up
                await asyncio.to_thread(
                    run_wrk, url + PATH, seconds=2, connections=connections, headers=headers[name]
                )
            scraped: list[int] = []
            bought = {"off": 0, "on": 0}
            for _ in range(rounds):
                for name, url in urls.items():
                    metrics_url = (
                        f"http://127.0.0.1:{metrics_port}/metrics" if name == "on" else None
                    )
                    async with _scraping(metrics_url) as sizes, _buying(url, bob) as took:
                        result = await asyncio.to_thread(
                            run_wrk,
                            url + PATH,
                            seconds=seconds,
                            connections=connections,
                            headers=headers[name],
                        )
                    scraped += sizes
                    bought[name] += len(took)
                    if result.non_2xx:
                        raise RuntimeError(f"{name}: {result.non_2xx} non-2xx responses")
                    results[name].append(result)
            # Every purchase on the "on" side was delivered: its invoice.settled, token.bought.
            expected = 2 * (bought["on"] + 1)  # + the warm-up token
            for _ in range(600):
                if len(received) >= expected:
                    break
                await asyncio.sleep(0.05)
        finally:
            for process in processes.values():
                stop(process)
            stop(upstream)

    def median(name: str, field: str) -> float:
        return float(statistics.median(getattr(r, field) for r in results[name]))

    ratio = median("on", "requests_per_second") / median("off", "requests_per_second")
    every = (
        [f"{r.requests_per_second:.0f}" for r in results["off"]],
        [f"{r.requests_per_second:.0f}" for r in results["on"]],
    )
    record(
        f"Operations overhead on paid requests (serve, {workers} worker{'s' * (workers > 1)})",
        [
            f"`l402-gateway serve` ({workers} worker(s)) in front of a bare aiohttp upstream; "
            f"wrk -t1 -c{connections} with a valid paid token, {rounds} x {seconds}s "
            "alternating rounds per side, medians. On: `[metrics]` listen and path, "
            f"/metrics scraped once a second during the rounds ({len(scraped)} scrapes, "
            f"{max(scraped, default=0)} bytes at most), and a webhook endpoint for every event. "
            f"Both sides sell a token about twice a second meanwhile ({bought['off']} and "
            f"{bought['on']} purchases); the receiver verified {len(received)} deliveries, "
            f"{expected} expected at least (a purchase cut off by the round's end may "
            "still settle).",
            "",
            "| side | requests/s | p50 ms | p99 ms |",
            "| --- | --- | --- | --- |",
            *(
                f"| {name} | {median(name, 'requests_per_second'):.0f} | "
                f"{median(name, 'p50_ms'):.2f} | {median(name, 'p99_ms'):.2f} |"
                for name in ("off", "on")
            ),
            "",
            f"Rounds, requests/s: off {', '.join(every[0])}; on {', '.join(every[1])}.",
            f"On / off throughput: **{ratio:.1%}** (target {TARGET_RATIO:.0%}).",
        ],
        Verdict(
            f"{ratio:.1%} of the requests/s without",
            f">= {TARGET_RATIO:.0%}",
            ratio >= TARGET_RATIO,
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ops_overhead")
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=9)  # the noise of a shared host
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    asyncio.run(measure(args.seconds, args.rounds, args.connections, args.workers))


if __name__ == "__main__":
    main()
