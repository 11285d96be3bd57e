"""Benchmark 2: against Aperture.

``l402-gateway serve`` (the reverse proxy) and Lightning Labs' Aperture in the same run, in
front of the same trivial backend, issuing invoices on the same regtest LND node (alice):

(a) paid-token throughput and latency: wrk with a valid token, paid by bob, on each proxy;
(b) 402-challenge issuance: wrk without a token, every answer a new invoice on alice, counted
    on alice (the invoices LND replays between two marker invoices, attributed by memo)
    rather than trusted from HTTP status counts.

Both proxies run with their defaults for settlement checks (neither asks LND whether the
token's invoice settled) and without a rate limit on challenges. Rounds alternate between the
two so drift hits both alike; medians are reported. Target: ours ahead on both.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.aperture import APERTURE_VERSION, ensure_aperture, start_aperture, write_config
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

PATH = "/api/premium/hello"
PRICE_SAT = 1
PAID_CONNECTIONS = 32
CHALLENGE_CONNECTIONS = 16
# One client (wrk) asks for every challenge: no limit in the way, as Aperture has none.
OURS_EXTRA = """
[rate_limit]
challenges_per_second = 1000000.0
burst = 1000000
"""
# The memo each proxy gives its invoices: how invoices on alice are attributed to a side.
OURS_MEMO = f"premium: GET {PATH}"
APERTURE_MEMO = "L402"
MARKER_MEMO = "bench: round marker"


@dataclass
class Side:
    name: str
    url: str
    memo: str
    process: subprocess.Popen[bytes]
    log: Path
    authorization: str = ""
    paid: list[LoadResult] = field(default_factory=list)
    challenges: list[LoadResult] = field(default_factory=list)
    issued_per_second: list[float] = field(default_factory=list)
    # The proxy process's own CPU time per answer: what a shared, noisy machine disturbs least.
    paid_cpu_us: list[float] = field(default_factory=list)
    challenge_cpu_us: list[float] = field(default_factory=list)

    def cpu_seconds(self) -> float:
        """User + system CPU time the proxy (all its threads, and its worker processes) has
        used so far."""
        return _cpu_seconds(self.process.pid)


def _cpu_seconds(pid: int) -> float:
    # Fields after the command name start at field 3 (state); utime, stime are 14, 15.
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for child in children:
        # One that exits meanwhile (a database backend) is counted by its parent's reaped time.
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            own += _cpu_seconds(int(child))
    return own


class AliceInvoices:
    """Counts the invoices each proxy really created on alice, by their memos."""

    def __init__(self, network: Network) -> None:
        self._client = LndClient(network.alice.settings(macaroon="invoice"))

    async def close(self) -> None:
        await self._client.close()

    async def mark(self) -> int:
        """A marker invoice: its add index bounds a round's invoices."""
        return (await self._client.add_invoice(Msat(1000), MARKER_MEMO, 600)).add_index

    async def memos_between(self, first: int, last: int) -> list[str]:
        """Memos of the invoices added after marker ``first`` and before marker ``last``."""
        memos: list[str] = []
        async with asyncio.timeout(120):
            # LND replays the invoices added after ``first`` in add-index order.
            async for invoice in self._client.subscribe_invoices(add_index=first):
                if invoice.add_index >= last:
                    break
                memos.append(invoice.memo)
        return memos


async def _paid_authorization(url: str, network: Network) -> str:
    """Get a challenge from the proxy at ``url``, pay it from bob, check the token is let in."""
    async with aiohttp.ClientSession() as session:
        async with session.get(url + PATH) as response:
            if response.status != 402:
                raise RuntimeError(f"{url}{PATH}: expected 402, got {response.status}")
            # Both proxies send an LSAT and an L402 challenge; the parser prefers L402.
            challenge = l402.parse_challenge(", ".join(response.headers.getall("WWW-Authenticate")))
        async with LndClient(network.bob.settings()) as bob:
            payment = await bob.send_payment(
                challenge.invoice, max_fee_msat=Msat(10_000), payment_timeout=30
            )
        if payment.preimage is None:
            raise RuntimeError(f"bob's payment for {url} did not succeed: {payment.status}")
        authorization = f"L402 {challenge.macaroon_b64}:{payment.preimage.hex()}"
        async with session.get(url + PATH, headers={"Authorization": authorization}) as response:
            body = await response.text()
            if response.status != 200 or body != "ok":
                raise RuntimeError(f"{url}{PATH} with a paid token: {response.status} {body!r}")
    return authorization


def _start_ours(
    network: Network, workdir: Path, port: int, upstream: str
) -> subprocess.Popen[bytes]:
    # One worker per core: Aperture, a Go program, uses every core too.
    server = (
        f'\n[server]\nlisten = "127.0.0.1:{port}"\nupstream = "{upstream}"\n'
        f"workers = {os.cpu_count()}\n"
    )
    config = gateway_config(network, workdir, server + OURS_EXTRA)
    with (workdir / "ours.log").open("ab") as output:
        return subprocess.Popen(  # noqa: S603 - our own interpreter and CLI
            [sys.executable, "-m", "gateway.cli", "--config", str(config), "serve"],
            cwd=REPO,
            stdout=output,
            stderr=subprocess.STDOUT,
        )


async def _challenge_round(side: Side, alice: AliceInvoices, seconds: int) -> None:
    first = await alice.mark()
    cpu = side.cpu_seconds()
    started = time.monotonic()
    result = await asyncio.to_thread(
        run_wrk, side.url + PATH, seconds=seconds, connections=CHALLENGE_CONNECTIONS, headers={}
    )
    elapsed = time.monotonic() - started
    cpu = side.cpu_seconds() - cpu
    memos = await alice.memos_between(first, await alice.mark())
    strangers = {memo for memo in memos if memo != side.memo}
    if strangers:
        raise RuntimeError(f"{side.name}: invoices on alice not made by it: {strangers}")
    # Every response must be a 402 backed by an invoice on alice (a 5xx creates none).
    answered = result.non_2xx
    if not memos or abs(len(memos) - answered) > 0.05 * len(memos):
        raise RuntimeError(f"{side.name}: {len(memos)} invoices on alice for {answered} 402s")
    side.challenges.append(result)
    side.issued_per_second.append(len(memos) / elapsed)
    side.challenge_cpu_us.append(cpu / len(memos) * 1e6)


async def _paid_round(side: Side, seconds: int) -> None:
    cpu = side.cpu_seconds()
    result = await asyncio.to_thread(
        run_wrk,
        side.url + PATH,
        seconds=seconds,
        connections=PAID_CONNECTIONS,
        headers={"Authorization": side.authorization},
    )
    cpu = side.cpu_seconds() - cpu
    if result.non_2xx:
        raise RuntimeError(f"{side.name}: {result.non_2xx} non-2xx responses with a paid token")
    side.paid.append(result)
    side.paid_cpu_us.append(cpu / (result.requests_per_second * seconds) * 1e6)


async def measure(seconds: int, rounds: int) -> None:
    binary = ensure_aperture()
    workdir = Path(tempfile.mkdtemp(prefix="l402-bench-"))
    backend_port, ours_port, aperture_port = free_ports(3)
    backend_url = f"http://127.0.0.1:{backend_port}"
    backend_results: list[LoadResult] = []
    async with running_network(workdir / "network") as network:
        backend = start_app(backend_port, "bare", None, workdir / "backend.log")
        ours = Side(
            "l402-gateway serve",
            f"http://127.0.0.1:{ours_port}",
            OURS_MEMO,
            _start_ours(network, workdir, ours_port, backend_url),
            workdir / "ours.log",
        )
        aperture = Side(
            f"Aperture {APERTURE_VERSION}",
            f"http://127.0.0.1:{aperture_port}",
            APERTURE_MEMO,
            start_aperture(
                binary,
                write_config(workdir, backend_port, PRICE_SAT),
                aperture_port,
                network.alice,
                workdir,
                workdir / "aperture.log",
            ),
            workdir / "aperture.log",
        )
        alice = AliceInvoices(network)
        try:
            await wait_for_http(backend_url + "/health", backend, workdir / "backend.log")
            for side in (ours, aperture):
                await wait_for_http(side.url + "/health", side.process, side.log)
                side.authorization = await _paid_authorization(side.url, network)
            # Warm every server up, then alternate so drift hits each side alike.
            for url, authorization in (
                (backend_url, ""),
                (ours.url, ours.authorization),
                (aperture.url, aperture.authorization),
            ):
                await asyncio.to_thread(
                    run_wrk,
                    url + PATH,
                    seconds=2,
                    connections=PAID_CONNECTIONS,
                    headers={"Authorization": authorization} if authorization else {},
                )
            for _ in range(rounds):
                backend_results.append(
                    await asyncio.to_thread(
                        run_wrk,
                        backend_url + PATH,
                        seconds=seconds,
                        connections=PAID_CONNECTIONS,
                        headers={},
                    )
                )
                for side in (ours, aperture):
                    await _paid_round(side, seconds)
                for side in (ours, aperture):
                    await _challenge_round(side, alice, seconds)
        finally:
            await alice.close()
            for process in (ours.process, aperture.process, backend):
                stop(process)
    _report(ours, aperture, backend_results, seconds, rounds)


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def _report(
    ours: Side, aperture: Side, backend: list[LoadResult], seconds: int, rounds: int
) -> None:
    def row(label: str, pick: Callable[[Side], float], digits: int) -> str:
        mine, theirs = pick(ours), pick(aperture)
        return f"| {label} | {mine:.{digits}f} | {theirs:.{digits}f} | {mine / theirs:.2f} |"

    def paid(field_name: str) -> Callable[[Side], float]:
        return lambda side: _median([getattr(r, field_name) for r in side.paid])

    def challenge(field_name: str) -> Callable[[Side], float]:
        return lambda side: _median([getattr(r, field_name) for r in side.challenges])

    def issued(side: Side) -> float:
        return _median(side.issued_per_second)

    paid_ratio = paid("requests_per_second")(ours) / paid("requests_per_second")(aperture)
    issue_ratio = issued(ours) / issued(aperture)
    record(
        "Against Aperture",
        [
            f"{rounds} x {seconds}s alternating rounds per side, medians; wrk -t1 on loopback, "
            f"-c{PAID_CONNECTIONS} with a paid token, -c{CHALLENGE_CONNECTIONS} for challenges "
            "(each a new invoice on regtest alice, counted on alice). Same backend, same LND; "
            "both proxies on all cores (ours with one worker per core), otherwise at their "
            "defaults (each logs every request, no settlement lookup), no challenge rate limit, "
            "Aperture's SQLite backend.",
            "",
            f"| | {ours.name} | {aperture.name} | ours / Aperture |",
            "| --- | --- | --- | --- |",
            row("paid requests/s", paid("requests_per_second"), 0),
            row("paid p50 ms", paid("p50_ms"), 2),
            row("paid p99 ms", paid("p99_ms"), 2),
            row("paid: proxy CPU us per request", lambda side: _median(side.paid_cpu_us), 0),
            row("402 challenges/s (invoices on alice)", issued, 0),
            row("challenge p50 ms", challenge("p50_ms"), 2),
            row("challenge p99 ms", challenge("p99_ms"), 2),
            row(
                "challenge: proxy CPU us per invoice",
                lambda side: _median(side.challenge_cpu_us),
                0,
            ),
            "",
            "The backend alone, the ceiling for both: "
            f"{_median([r.requests_per_second for r in backend]):.0f} requests/s "
            f"(p50 {_median([r.p50_ms for r in backend]):.2f} ms, "
            f"p99 {_median([r.p99_ms for r in backend]):.2f} ms).",
            "",
            f"Ours / Aperture: paid throughput **{paid_ratio:.2f}x**, challenge issuance "
            f"**{issue_ratio:.2f}x** (target: ahead on both). In the table a ratio above 1 is "
            "better for rates, below 1 for latencies and CPU time.",
        ],
        Verdict(
            f"{paid_ratio:.2f}x Aperture's paid requests/s, {issue_ratio:.2f}x its challenges/s",
            "> 1x on both",
            paid_ratio > 1 and issue_ratio > 1,
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.vs_aperture")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(measure(args.seconds, args.rounds))


if __name__ == "__main__":
    main()
