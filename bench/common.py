"""Shared benchmark plumbing: server processes, wrk runs, and result rows."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from gateway.lnd.client import LndClient
from gateway.ports import Msat, Payment, PaymentHash
from regtest.demo import alice_lnd_and_store_toml
from regtest.network import Network, running_network
from regtest.processes import free_ports, wait_for_http

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results.md"
SUMMARY = "Summary"
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}
PATH = "/api/premium/hello"  # a priced route of gateway_config, served by bench.app
PRICE_MSAT = 1000  # its price
MAX_FEE = Msat(10_000)
PAYMENT_TIMEOUT = 30.0
# One client asks for every challenge: no limit in the way.
NO_RATE_LIMIT = """
[rate_limit]
challenges_per_second = 1000000.0
burst = 1000000
"""


@dataclass(frozen=True, slots=True)
class LoadResult:
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    non_2xx: int


def wrk_path() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise SystemExit("wrk is not installed: apt-get install wrk (make bench does this)")
    return path


def _latency(text: str, percentile: str) -> float:
    match = re.search(rf"^\s*{percentile}%\s+([\d.]+)(us|ms|s)\s*$", text, re.MULTILINE)
    if match is None:
        raise ValueError(f"no {percentile}% latency in wrk output:\n{text}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def run_wrk(
    url: str, *, seconds: int, connections: int, headers: dict[str, str], post: str = ""
) -> LoadResult:
    """One bounded wrk run on loopback (one thread: the server gets the other core); with
    ``post``, each request is a POST of that (ASCII) body."""
    args = [wrk_path(), "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    for name, value in headers.items():
        args += ["-H", f"{name}: {value}"]
    with contextlib.ExitStack() as scripts:
        if post:
            script = scripts.enter_context(tempfile.NamedTemporaryFile("w", suffix=".lua"))
            script.write(f'wrk.method = "POST"\nwrk.body = {json.dumps(post)}\n')
            script.flush()
            args += ["-s", script.name]
        output = subprocess.run(  # noqa: S603 - wrk with our own arguments
            [*args, url], capture_output=True, text=True, check=True, timeout=seconds + 30
        ).stdout
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.MULTILINE)
    if rate is None:
        raise ValueError(f"no Requests/sec in wrk output:\n{output}")
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    return LoadResult(
        requests_per_second=float(rate.group(1)),
        p50_ms=_latency(output, "50"),
        p99_ms=_latency(output, "99"),
        non_2xx=int(errors.group(1)) if errors else 0,
    )


def start_app(port: int, mode: str, config: Path | None, log: Path) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "bench.app", "--port", str(port), mode]
    if config is not None:
        args.append(str(config))
    with log.open("ab") as output:
        return subprocess.Popen(  # noqa: S603 - our own interpreter and module
            args, cwd=REPO, stdout=output, stderr=subprocess.STDOUT
        )


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(timeout=30)


def gateway_config(network: Network, workdir: Path, extra: str = "") -> Path:
    """A config for ``bench.app gateway``: alice's node, SQLite, one priced route."""
    config = workdir / "gateway.toml"
    config.write_text(
        f"""\
{alice_lnd_and_store_toml(network, workdir)}{extra}
[[routes]]
pattern = "/api/premium/*"
price_msat = {PRICE_MSAT}
service = "premium"
"""
    )
    return config


@dataclass(frozen=True, slots=True)
class RunningGateway:
    network: Network
    url: str
    process: subprocess.Popen[bytes]
    database: Path


@contextlib.asynccontextmanager
async def gateway_on_regtest(workdir: Path) -> AsyncIterator[RunningGateway]:
    """A regtest network and ``bench.app gateway`` on alice, in its own process."""
    async with running_network(workdir / "network") as network:
        (port,) = free_ports(1)
        url = f"http://127.0.0.1:{port}"
        config = gateway_config(network, workdir, NO_RATE_LIMIT)
        log = workdir / "gateway.log"
        process = start_app(port, "gateway", config, log)
        try:
            await wait_for_http(url + "/health", process, log)
            yield RunningGateway(network, url, process, workdir / "gateway.db")
        finally:
            stop(process)


class ViaCarol:
    """bob's node as a ``Payer`` that always routes bob -> carol -> alice."""

    def __init__(self, bob: LndClient, network: Network) -> None:
        self._bob = bob
        self._network = network

    async def send_payment(
        self, payment_request: str, *, max_fee_msat: Msat, payment_timeout: float
    ) -> Payment:
        payment = await self._bob.send_payment(
            payment_request,
            max_fee_msat=max_fee_msat,
            payment_timeout=payment_timeout,
            last_hop_pubkey=self._network.carol.pubkey,
        )
        if payment.route != (self._network.carol.pubkey, self._network.alice.pubkey):
            raise RuntimeError(f"payment took route {payment.route}, not bob -> carol -> alice")
        return payment

    async def lookup_payment(self, payment_hash: PaymentHash) -> Payment | None:
        return await self._bob.lookup_payment(payment_hash)


@dataclass(frozen=True, slots=True)
class Quote:
    """What a gateway's 402 body asks to be paid."""

    invoice: str
    macaroon: str
    payment_hash: bytes

    def authorization(self, preimage: bytes) -> str:
        return f"L402 {self.macaroon}:{preimage.hex()}"


async def fetch_quote(session: aiohttp.ClientSession, url: str) -> Quote:
    """GET a priced URL without a credential; what its 402 (problem+json) asks for."""
    async with session.get(url) as response:
        if response.status != 402:
            raise RuntimeError(f"{url}: expected 402, got {response.status}")
        body = await response.json(content_type=None)
    return Quote(body["invoice"], body["macaroon"], bytes.fromhex(body["payment_hash"]))


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (with 40 samples, p99 is the largest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


@dataclass(frozen=True, slots=True)
class Verdict:
    """A benchmark's row in the summary table at the top of bench/results.md."""

    result: str  # the figure that decides, e.g. "80.5% of bare aiohttp's requests/s"
    target: str  # e.g. ">= 85%"; "" when the issue sets none
    met: bool | None  # None: no target


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return (
        f"{cpu}, {os.cpu_count()} cores, {memory_kib / 2**20:.0f} GiB RAM, "
        f"{platform.system()} {platform.machine()}, "
        f"{platform.python_implementation()} {platform.python_version()}; "
        f"a 10-million-step Python loop took {_python_loop_seconds():.2f} s when recorded"
    )


def _python_loop_seconds() -> float:
    """How fast the host runs Python right now: hosts of one CPU model have differed by
    almost two times between days, and every figure moves with it."""
    started = time.perf_counter()
    total = 0
    for step in range(10_000_000):
        total += step
    return time.perf_counter() - started


def _summary_rows(text: str) -> dict[str, str]:
    rows: dict[str, str] = {}
    for line in text.splitlines():
        cells = line.split(" | ")
        if line.startswith("| ") and len(cells) == 3 and not set(cells[1]) <= {"-", " "}:
            rows[cells[0].removeprefix("| ")] = line
    rows.pop("benchmark", None)
    return rows


def record(section: str, lines: list[str], verdict: Verdict | None = None) -> None:
    """Print a result table and store it, with its verdict row, in bench/results.md."""
    print("\n".join(lines), flush=True)
    sections: dict[str, str] = {}
    rows: dict[str, str] = {}
    if RESULTS.exists():
        for chunk in RESULTS.read_text().split("\n## ")[1:]:
            title, _, body = chunk.partition("\n")
            if title == SUMMARY:
                rows = _summary_rows(body)
            else:
                sections[title] = body.strip()
    # Benchmarks run one at a time, maybe on different machines: each names its own.
    sections[section] = "\n".join([f"Measured on {machine()}.", "", *lines])
    if verdict is not None:
        met = {True: "met", False: "**not met**", None: "no target"}[verdict.met]
        rows[section] = f"| {section} | {verdict.result} | {f'{verdict.target} {met}'.strip()} |"
    summary = "\n".join(
        [
            "Each section names the machine it was measured on.",
            "",
            "| benchmark | result | target |",
            "| --- | --- | --- |",
            *(rows[title] for title in sections if title in rows),
        ]
    )
    text = "\n\n".join(f"## {title}\n\n{body}" for title, body in sections.items())
    RESULTS.write_text(f"# Benchmark results\n\n## {SUMMARY}\n\n{summary}\n\n{text}\n")
