"""Benchmark 2: against Aperture, and this tree against an earlier revision.

``l402-gateway serve`` (the reverse proxy) and Lightning Labs' Aperture in the same run, in
front of the same trivial backend, issuing invoices on the same regtest LND node (alice):

(a) paid-token throughput and latency: wrk with a valid token, paid by bob, on each proxy;
(b) 402-challenge issuance: wrk without a token, every answer a new invoice on alice, counted
    on alice (the invoices LND replays between two marker invoices, attributed by memo)
    rather than trusted from HTTP status counts.

Ours runs in several variants: at its defaults with one worker per core (as Aperture uses
every core), with one worker, without uvloop, with the access log on, with gRPC's own
EventEngine client I/O (serve's default turns it off), and the ``--baseline``
revision (before the efficiency work) at its defaults. Neither proxy asks LND whether the
token's invoice settled, neither has a challenge rate limit. Rounds alternate between the
sides so drift hits all alike; medians are reported. Then py-spy profiles the one-worker
variant on each path (``bench.profile``).
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
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench import profile
from bench.aperture import APERTURE_VERSION, ensure_aperture, start_aperture, write_config
from bench.before_after import worktree
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
# The tree before the efficiency work: the "before" of before/after.
BASELINE = "0857cbd"
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
# Targets, as ratios to Aperture's figures in the same run.
PAID_CPU_TARGET = 0.5
PAID_RATE_TARGET = 1.5
ONE_WORKER_RATE_TARGET = 1.0
CHALLENGE_CPU_TARGET = 0.8
PROFILE_TOP = 15


@dataclass(frozen=True, slots=True)
class Variant:
    """How one of our sides runs: ``server`` is added to its ``[server]`` section, ``env`` to
    its environment, ``tree`` is another revision's checkout (None: this tree)."""

    name: str
    workers: int
    server: str = ""
    env: tuple[tuple[str, str], ...] = ()
    tree: Path | None = None


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

    def paid_rate(self) -> float:
        return _median([r.requests_per_second for r in self.paid])


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
    network: Network, workdir: Path, port: int, upstream: str, variant: Variant
) -> subprocess.Popen[bytes]:
    workdir.mkdir(parents=True)
    server = (
        f'\n[server]\nlisten = "127.0.0.1:{port}"\nupstream = "{upstream}"\n'
        f"workers = {variant.workers}\n{variant.server}"
    )
    config = gateway_config(network, workdir, server + OURS_EXTRA)
    with (workdir / "serve.log").open("ab") as output:
        return subprocess.Popen(  # noqa: S603 - our own interpreter and CLI
            [sys.executable, "-m", "gateway.cli", "--config", str(config), "serve"],
            cwd=variant.tree or REPO,  # the first entry of sys.path: that tree's gateway
            env={**os.environ, **dict(variant.env)},
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


def _variants(baseline: Path) -> list[Variant]:
    cores = os.cpu_count() or 1
    return [
        Variant("serve", cores),
        Variant("serve, 1 worker", 1),
        Variant("serve, asyncio loop (no uvloop)", cores, 'event_loop = "asyncio"\n'),
        Variant("serve, access log on", cores, "access_log = true\n"),
        # gRPC's default client I/O (its EventEngine threads), which serve turns off.
        Variant("serve, gRPC EventEngine client", cores, env=(("GRPC_EXPERIMENTS", ""),)),
        Variant(f"serve at {BASELINE} (before)", cores, tree=baseline),
    ]


async def measure(seconds: int, rounds: int) -> None:
    binary = ensure_aperture()
    workdir = Path(tempfile.mkdtemp(prefix="l402-bench-"))
    backend_results: list[LoadResult] = []
    with worktree(BASELINE, workdir) as baseline:
        variants = _variants(baseline)
        backend_port, aperture_port, *ports = free_ports(2 + len(variants))
        backend_url = f"http://127.0.0.1:{backend_port}"
        async with running_network(workdir / "network") as network:
            backend = start_app(backend_port, "bare", None, workdir / "backend.log")
            ours = [
                Side(
                    variant.name,
                    f"http://127.0.0.1:{port}",
                    OURS_MEMO,
                    _start_ours(network, workdir / f"ours-{index}", port, backend_url, variant),
                    workdir / f"ours-{index}" / "serve.log",
                )
                for index, (variant, port) in enumerate(zip(variants, ports, strict=True))
            ]
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
            sides = [*ours, aperture]
            alice = AliceInvoices(network)
            try:
                await wait_for_http(backend_url + "/health", backend, workdir / "backend.log")
                for side in sides:
                    await wait_for_http(side.url + "/health", side.process, side.log)
                    side.authorization = await _paid_authorization(side.url, network)
                # Warm every server up, then alternate so drift hits each side alike.
                await _load(backend_url, 2, "")
                for side in sides:
                    await _load(side.url, 2, side.authorization)
                for _ in range(rounds):
                    backend_results.append(await _load(backend_url, seconds, ""))
                    for side in sides:
                        await _paid_round(side, seconds)
                    for side in sides:
                        await _challenge_round(side, alice, seconds)
                profiles = await _profiles(ours[1], workdir, seconds)
            finally:
                await alice.close()
                for process in (*(side.process for side in sides), backend):
                    stop(process)
    _report(ours, aperture, backend_results, seconds, rounds)
    record(
        "Profile of serve",
        [
            "py-spy on `serve` with one worker (the single process that does all the work), "
            f"{seconds} s of each load as above, after the measured rounds; own: the function "
            "was running, cumulative: it was on the stack. Waits (the idle store thread, the "
            "event loop's poll) are left out.",
            "",
            *profiles[0].lines("Paid requests", PROFILE_TOP),
            "",
            *profiles[1].lines("402 challenges (each a new invoice on alice)", PROFILE_TOP),
        ],
    )


async def _load(url: str, seconds: int, authorization: str) -> LoadResult:
    headers = {"Authorization": authorization} if authorization else {}
    return await asyncio.to_thread(
        run_wrk, url + PATH, seconds=seconds, connections=PAID_CONNECTIONS, headers=headers
    )


async def _profiles(side: Side, workdir: Path, seconds: int) -> tuple[profile.Profile, ...]:
    """py-spy of ``side`` (one process) under paid load, then under challenge load."""
    outputs = (workdir / "paid.raw", workdir / "challenge.raw")
    for output, connections, headers in (
        (outputs[0], PAID_CONNECTIONS, {"Authorization": side.authorization}),
        (outputs[1], CHALLENGE_CONNECTIONS, {}),
    ):
        spy = profile.start(side.process.pid, seconds, output)
        await asyncio.to_thread(
            run_wrk, side.url + PATH, seconds=seconds, connections=connections, headers=headers
        )
        await asyncio.to_thread(spy.wait, seconds + 30)
        if spy.returncode:
            raise RuntimeError(f"py-spy failed ({spy.returncode}) on {side.name}")
    return tuple(profile.summarize(output) for output in outputs)


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def _report(
    ours: list[Side], aperture: Side, backend: list[LoadResult], seconds: int, rounds: int
) -> None:
    def paid_cpu(side: Side) -> float:
        return _median(side.paid_cpu_us)

    def challenge_cpu(side: Side) -> float:
        return _median(side.challenge_cpu_us)

    def issued(side: Side) -> float:
        return _median(side.issued_per_second)

    def p(side: Side, results: str, field_name: str) -> float:
        return _median([getattr(r, field_name) for r in getattr(side, results)])

    def row(side: Side) -> str:
        return (
            f"| {side.name} | {side.paid_rate():.0f}"
            f" | {side.paid_rate() / aperture.paid_rate():.2f}"
            f" | {paid_cpu(side):.0f} | {paid_cpu(side) / paid_cpu(aperture):.2f}"
            f" | {p(side, 'paid', 'p50_ms'):.2f} | {p(side, 'paid', 'p99_ms'):.2f}"
            f" | {issued(side):.0f} | {issued(side) / issued(aperture):.2f}"
            f" | {challenge_cpu(side):.0f} | {challenge_cpu(side) / challenge_cpu(aperture):.2f}"
            f" | {p(side, 'challenges', 'p50_ms'):.2f} | {p(side, 'challenges', 'p99_ms'):.2f} |"
        )

    default, one_worker, before = ours[0], ours[1], ours[-1]
    backend_rate = _median([r.requests_per_second for r in backend])
    paid_cpu_ratio = paid_cpu(default) / paid_cpu(aperture)
    paid_ratio = default.paid_rate() / aperture.paid_rate()
    one_worker_ratio = one_worker.paid_rate() / aperture.paid_rate()
    challenge_cpu_ratio = challenge_cpu(default) / challenge_cpu(aperture)
    met = (
        paid_cpu_ratio <= PAID_CPU_TARGET
        and paid_ratio >= PAID_RATE_TARGET
        and one_worker_ratio >= ONE_WORKER_RATE_TARGET
        and challenge_cpu_ratio <= CHALLENGE_CPU_TARGET
    )

    def change(after: float, before_value: float) -> str:
        return f"{before_value:.0f} -> {after:.0f} ({(after / before_value - 1) * 100:+.0f}%)"

    record(
        "Against Aperture",
        [
            f"{rounds} x {seconds}s alternating rounds per side, medians; wrk -t1 on loopback, "
            f"-c{PAID_CONNECTIONS} with a paid token, -c{CHALLENGE_CONNECTIONS} for challenges "
            "(each a new invoice on regtest alice, counted on alice). Same backend, same LND; "
            f"Aperture on all cores, ours with one worker per core ({os.cpu_count()}) unless "
            "said; each at its defaults otherwise (Aperture logs every request, ours does not "
            "unless its access log is on), no settlement lookup, no challenge rate limit, "
            "SQLite. CPU: the proxy's processes' user + system time per answer. x Ap.: ours / "
            "Aperture's (above 1 is better for rates, below 1 for CPU).",
            "",
            "| side | paid req/s | x Ap. | paid CPU us/req | x Ap. | paid p50 ms | paid p99 ms"
            " | challenges/s | x Ap. | CPU us/challenge | x Ap. | chall. p50 ms | chall. p99 ms |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            *(row(side) for side in (*ours, aperture)),
            "",
            f"The backend alone: {backend_rate:.0f} requests/s "
            f"(p50 {_median([r.p50_ms for r in backend]):.2f} ms, "
            f"p99 {_median([r.p99_ms for r in backend]):.2f} ms); paid requests through `serve` "
            f"are **{default.paid_rate() / backend_rate:.2f}** of it (Aperture: "
            f"{aperture.paid_rate() / backend_rate:.2f}).",
            "",
            f"Before -> after ({before.name} -> {default.name}): paid CPU us/request "
            f"{change(paid_cpu(default), paid_cpu(before))}, paid requests/s "
            f"{change(default.paid_rate(), before.paid_rate())}, CPU us/challenge "
            f"{change(challenge_cpu(default), challenge_cpu(before))}, challenges/s "
            f"{change(issued(default), issued(before))}.",
        ],
        Verdict(
            f"paid CPU {paid_cpu_ratio:.2f}x Aperture's, paid requests/s {paid_ratio:.2f}x "
            f"(1 worker: {one_worker_ratio:.2f}x), challenge CPU {challenge_cpu_ratio:.2f}x",
            f"CPU <= {PAID_CPU_TARGET}x, req/s >= {PAID_RATE_TARGET}x (1 worker >= "
            f"{ONE_WORKER_RATE_TARGET}x), challenge CPU <= {CHALLENGE_CPU_TARGET}x",
            met,
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
