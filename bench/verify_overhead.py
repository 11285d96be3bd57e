"""Benchmark 1: token verification overhead.

The same trivial aiohttp handler, bare and behind the gateway middleware, loaded by wrk with a
valid paid token (minted by the gateway on the regtest network's alice, paid by bob), on a
priced route and on a free one. Runs alternate bare/gateway rounds and reports the medians;
the target is that the gateway keeps at least 95% of the bare throughput on the priced route.

Requests/s on a shared 2-core host vary from round to round by more than the gap measured, so
when valgrind is installed the run also counts the instructions each request costs on the
priced route: both applications served by one process under callgrind, exact counts of the
same requests, which no other load on the host changes. The target is met when both ratios
reach it.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import hdrs

from bench.common import (
    REPO,
    LoadResult,
    Verdict,
    gateway_config,
    record,
    run_wrk,
    start_app,
    stop,
)
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


# Requests per counted round, sent over a few keep-alive connections as wrk's are.
COUNTED_REQUESTS = 2000
COUNTED_CONNECTIONS = 4
COUNTED_ROUNDS = 2
# Under valgrind the server runs many times slower: its startup included.
VALGRIND_START_SECONDS = 300.0
# The counted server keeps its root keys this long (the most the configuration allows). With
# the default 5 s, each read going stale sends the next requests through a full verification
# with a store read; under callgrind, some 50 times slower than real time, that happens 50
# times as often per request as in real time, and added 3,000 to 6,000 instructions to each
# counted request, varying with the round's length.
COUNTED_ROOT_KEY_CACHE = "\n[l402]\nroot_key_cache_seconds = 3600\n"


@dataclass(frozen=True, slots=True)
class Instructions:
    bare: float  # per request, the median of the rounds
    gateway: float


# The client's own headers left out: the requests are wrk's (Host and the token).
_AUTO_HEADERS = (hdrs.ACCEPT, hdrs.ACCEPT_ENCODING, hdrs.USER_AGENT)


async def _send_counted(url: str, headers: dict[str, str]) -> None:
    """Exactly COUNTED_REQUESTS requests, each answered 200."""

    async def one_connection(session: aiohttp.ClientSession, count: int) -> None:
        for _ in range(count):
            async with session.get(
                url, headers=headers, skip_auto_headers=_AUTO_HEADERS
            ) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"{url}: {response.status}")

    connector = aiohttp.TCPConnector(limit=COUNTED_CONNECTIONS)
    async with aiohttp.ClientSession(connector=connector) as session:
        share = COUNTED_REQUESTS // COUNTED_CONNECTIONS
        await asyncio.gather(*(one_connection(session, share) for _ in range(COUNTED_CONNECTIONS)))


@dataclass(frozen=True, slots=True)
class Callgrind:
    valgrind: str
    callgrind_control: str  # talks to a running callgrind

    @classmethod
    def installed(cls) -> Callgrind | None:
        valgrind, control = shutil.which("valgrind"), shutil.which("callgrind_control")
        return None if valgrind is None or control is None else cls(valgrind, control)

    def start(self, args: list[str], directory: Path, log: Path) -> subprocess.Popen[bytes]:
        """``args`` under callgrind, instrumentation off until ``control("--instr=on")``."""
        with log.open("ab") as output:
            return subprocess.Popen(  # noqa: S603 - valgrind running our own interpreter
                [
                    self.valgrind,
                    "--tool=callgrind",
                    "--instr-atstart=no",
                    f"--callgrind-out-file={directory / 'callgrind.out'}",
                    *args,
                ],
                cwd=REPO,
                stdout=output,
                stderr=subprocess.STDOUT,
            )

    def control(self, server: subprocess.Popen[bytes], *args: str) -> None:
        subprocess.run(  # noqa: S603 - valgrind's own tool, our arguments
            [self.callgrind_control, *args, str(server.pid)],
            check=True,
            capture_output=True,
            timeout=120,
        )


def _dumped_totals(directory: Path) -> dict[str, int]:
    """Each callgrind dump's instruction total, by the name it was dumped with."""
    totals: dict[str, int] = {}
    for dump in directory.glob("callgrind.out.*"):
        text = dump.read_text()
        trigger = re.search(r"^desc: Trigger: .*dump (\S+)$", text, re.MULTILINE)
        total = re.search(r"^totals: (\d+)", text, re.MULTILINE)
        if trigger and total:
            totals[trigger.group(1)] = int(total.group(1))
    return totals


async def count_instructions(
    config: Path, workdir: Path, headers: dict[str, str]
) -> Instructions | None:
    """Instructions per request on the priced route, bare and behind the gateway, counted
    by callgrind in one process serving both; None without valgrind."""
    callgrind = Callgrind.installed()
    if callgrind is None:
        return None
    directory = workdir / "callgrind"
    directory.mkdir()
    counted_config = directory / "gateway.toml"  # the same store: the token is known there
    counted_config.write_text(config.read_text() + COUNTED_ROOT_KEY_CACHE)
    gateway_port, bare_port = free_ports(2)
    log = workdir / "callgrind.log"
    server = callgrind.start(
        [
            sys.executable,
            "-m",
            "bench.app",
            "--port",
            str(gateway_port),
            "--bare-port",
            str(bare_port),
            "gateway",
            str(counted_config),
        ],
        directory,
        log,
    )
    urls = {
        "bare": f"http://127.0.0.1:{bare_port}{PATH}",
        "gateway": f"http://127.0.0.1:{gateway_port}{PATH}",
    }
    try:
        print("counting instructions under callgrind (a few minutes)", flush=True)
        await wait_for_http(
            f"http://127.0.0.1:{gateway_port}/health", server, log, VALGRIND_START_SECONDS
        )
        for url in urls.values():  # every cache warm before counting starts
            await _send_counted(url, headers)
        callgrind.control(server, "--instr=on")
        for round_number in range(COUNTED_ROUNDS):
            for name, url in urls.items():
                await _send_counted(url, headers)
                callgrind.control(server, f"--dump={name}{round_number}")
    finally:
        stop(server)
    totals = _dumped_totals(directory)

    def per_request(name: str) -> float:
        rounds = [totals[f"{name}{n}"] / COUNTED_REQUESTS for n in range(COUNTED_ROUNDS)]
        return float(statistics.median(rounds))

    return Instructions(bare=per_request("bare"), gateway=per_request("gateway"))


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
        instructions = await count_instructions(config, workdir, headers)

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
            "",
            _instructions_line(instructions),
        ],
        _verdict(ratio("priced"), instructions),
    )


def _verdict(throughput_ratio: float, instructions: Instructions | None) -> Verdict:
    """Met when the requests/s ratio reaches the target and, when counted, so does bare's
    instructions per request over the gateway's: a round the host happened to slow down on
    the bare side does not make it."""
    result = f"{throughput_ratio:.1%} of bare aiohttp's requests/s"
    met = throughput_ratio >= TARGET_RATIO
    if instructions is not None:
        instruction_ratio = instructions.bare / instructions.gateway
        result += f", {instruction_ratio:.2%} of its instructions per request"
        met = met and instruction_ratio >= TARGET_RATIO
    return Verdict(result, f">= {TARGET_RATIO:.0%}", met)


def _instructions_line(instructions: Instructions | None) -> str:
    if instructions is None:
        return "Instructions per request: not counted (valgrind is not installed)."
    return (
        f"Instructions per request on the priced route (callgrind, one process serving both, "
        f"{COUNTED_ROUNDS} x {COUNTED_REQUESTS} requests each, medians; root keys cached for "
        f"the whole count: in real time, a re-read every 5 s is spread over tens of thousands of "
        f"requests): bare "
        f"{instructions.bare:,.0f}, gateway {instructions.gateway:,.0f}: the gateway adds "
        f"{instructions.gateway / instructions.bare - 1:.1%} (bare / gateway "
        f"{instructions.bare / instructions.gateway:.2%})."
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
