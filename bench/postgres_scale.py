"""Benchmark: several ``l402-gateway serve`` instances on one PostgreSQL database.

One regtest network, one bare upstream, one PostgreSQL server started for the run
(``tests.postgres_server``: test settings, no fsync) and five ``serve`` processes in front of
the upstream, one worker each, all issuing invoices on alice: four on one PostgreSQL database,
one on SQLite. bob buys a token on the SQLite instance and one on the first PostgreSQL
instance, which all four must let in (they share root keys). Every round, in turn:

(a) paid requests on 1, 2 and 4 of the PostgreSQL instances at once, one wrk each (the
    connections split between them), their requests/s summed; CPU per request of the loaded
    ``serve`` processes and of the PostgreSQL server (postmaster and backends), apart;
(b) the same on the SQLite instance: with (a)'s one instance, SQLite vs PostgreSQL;
(c) challenges on the first PostgreSQL instance and on the SQLite one, counted as invoices in
    the store, with the challenge rate limit out of the way. Target: PostgreSQL >= 0.9x
    SQLite's challenges/s (LND should stay the limit).

Medians over the rounds. ``python -m bench.postgres_scale [--seconds S] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.common import NO_RATE_LIMIT, PATH, Verdict, record, run_wrk, start_app, stop
from bench.ops_overhead import _config, _serve
from bench.vs_aperture import _cpu_seconds, _paid_authorization
from gateway.store import open_store
from regtest.network import Network, running_network
from regtest.processes import free_ports, wait_for_http
from tests.postgres_server import SETTINGS, running_server

TARGET_RATIO = 0.90
INSTANCES = (1, 2, 4)  # PostgreSQL instances loaded at once


@dataclass(frozen=True, slots=True)
class Instance:
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    store_url: str


@dataclass(frozen=True, slots=True)
class Round:
    """One round's figures: answers per second over the loaded instances, CPU per answer."""

    per_second: float
    p99_ms: float  # the slowest instance's
    gateway_cpu_us: float  # the loaded serve processes'
    postgres_cpu_us: float  # the PostgreSQL server's; 0 on SQLite


@dataclass
class Fleet:
    """Instances loaded together in a round, with their store's token."""

    name: str
    instances: Sequence[Instance]
    postmaster: int | None  # the PostgreSQL server's pid; None on SQLite
    authorization: str
    paid: list[Round] = field(default_factory=list)
    challenges: list[Round] = field(default_factory=list)


def _start(network: Network, home: Path, port: int, upstream: str, store_url: str) -> Instance:
    """``serve`` with one worker and no challenge rate limit, on ``store_url``."""
    config = _config(network, home, port, upstream, 1, NO_RATE_LIMIT)
    log = home / "serve.log"
    # The environment overrides the config file's SQLite store; the child inherits it.
    os.environ["GATEWAY_STORE_URL"] = store_url
    try:
        process = _serve(config, log)
    finally:
        del os.environ["GATEWAY_STORE_URL"]
    return Instance(f"http://127.0.0.1:{port}", process, log, store_url)


def _postgres_cpu_seconds(postmaster: int | None) -> float:
    """User + system CPU time the PostgreSQL server has used so far: the postmaster and its
    live descendants, plus the children it has reaped (a backend ending mid-round counts)."""
    if postmaster is None:
        return 0.0
    fields = Path(f"/proc/{postmaster}/stat").read_text().rpartition(")")[2].split()
    reaped = (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")  # cutime, cstime
    return _cpu_seconds(postmaster) + reaped


async def _stored_invoices(store_url: str) -> int:
    store = await open_store(store_url, read_only=True)
    try:
        return sum(total.count for total in await store.invoice_totals())
    finally:
        await store.close()


async def _let_in(instances: Sequence[Instance], authorization: str) -> None:
    """Each instance serves the priced path for a token bought on another."""
    async with aiohttp.ClientSession() as session:
        for instance in instances:
            headers = {"Authorization": authorization}
            async with session.get(instance.url + PATH, headers=headers) as response:
                body = await response.text()
            if response.status != 200 or body != "ok":
                raise RuntimeError(f"{instance.url}{PATH}: {response.status} {body!r}")


async def _round(fleet: Fleet, *, seconds: int, connections: int, paid: bool) -> Round:
    """Load the fleet's instances at once, one wrk each with ``connections`` split between
    them: with its paid token, or without (challenges, counted as the invoices its store
    holds afterwards, not as responses: a 503 is not a challenge)."""
    instances = fleet.instances
    headers = {"Authorization": fleet.authorization} if paid else {}
    store_url = instances[0].store_url  # the same for all of them
    stored = 0 if paid else await _stored_invoices(store_url)
    gateway_cpu = sum(_cpu_seconds(instance.process.pid) for instance in instances)
    postgres_cpu = _postgres_cpu_seconds(fleet.postmaster)
    started = time.monotonic()
    results = await asyncio.gather(
        *(
            asyncio.to_thread(
                run_wrk,
                instance.url + PATH,
                seconds=seconds,
                connections=connections // len(instances),
                headers=headers,
            )
            for instance in instances
        )
    )
    elapsed = time.monotonic() - started
    gateway_cpu = sum(_cpu_seconds(instance.process.pid) for instance in instances) - gateway_cpu
    postgres_cpu = _postgres_cpu_seconds(fleet.postmaster) - postgres_cpu
    per_second = sum(result.requests_per_second for result in results)
    if paid:
        if errors := sum(result.non_2xx for result in results):
            raise RuntimeError(f"{fleet.name}: {errors} non-2xx responses with a paid token")
        answers = per_second * seconds
    else:
        answers = await _stored_invoices(store_url) - stored
        if not answers or abs(answers - per_second * seconds) > 0.05 * answers:
            raise RuntimeError(f"{fleet.name}: {answers} invoices stored for {results}")
        per_second = answers / elapsed
    return Round(
        per_second,
        max(result.p99_ms for result in results),
        gateway_cpu / answers * 1e6,
        postgres_cpu / answers * 1e6,
    )


async def measure(seconds: int, rounds: int, connections: int, challenge_connections: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="l402-bench-scale-"))
    # Started from this, the main thread: the kernel stops the server when that thread ends.
    with running_server() as postgres:
        settings = ", ".join(f"{name}={value}" for name, value in SETTINGS.items())
        server = (
            f"PostgreSQL {postgres.execute('SHOW server_version').split()[0]} "
            f"(a server started for the run in {postgres.directory.parent}, with {settings})"
        )
        async with running_network(workdir / "network") as network:
            database = postgres.create_database("gateway")
            upstream_port, sqlite_port, *postgres_ports = free_ports(2 + max(INSTANCES))
            upstream_url = f"http://127.0.0.1:{upstream_port}"
            upstream = start_app(upstream_port, "bare", None, workdir / "upstream.log")
            instances: list[Instance] = []
            try:
                await wait_for_http(upstream_url + PATH, upstream, workdir / "upstream.log")
                home = workdir / "sqlite"
                sqlite_url = f"sqlite://{home / 'gateway.db'}"
                sqlite = _start(network, home, sqlite_port, upstream_url, sqlite_url)
                instances.append(sqlite)
                for n, port in enumerate(postgres_ports, 1):
                    home = workdir / f"postgres-{n}"
                    instances.append(_start(network, home, port, upstream_url, database))
                for instance in instances:
                    await wait_for_http(instance.url + "/health", instance.process, instance.log)
                shared = instances[1:]  # on the one PostgreSQL database
                token = await _paid_authorization(shared[0].url, network)
                await _let_in(shared[1:], token)
                fleets = [
                    Fleet(
                        "SQLite, 1 instance",
                        [sqlite],
                        None,
                        await _paid_authorization(sqlite.url, network),
                    ),
                    *(
                        Fleet(
                            f"PostgreSQL, {count} instance{'s' * (count > 1)}",
                            shared[:count],
                            postgres.pid,
                            token,
                        )
                        for count in INSTANCES
                    ),
                ]
                for fleet in (fleets[0], fleets[-1]):  # warm-up: every instance
                    await _round(fleet, seconds=2, connections=connections, paid=True)
                # Alternate so drift hits every side alike.
                for _ in range(rounds):
                    for fleet in fleets:
                        fleet.paid.append(
                            await _round(fleet, seconds=seconds, connections=connections, paid=True)
                        )
                    for fleet in fleets[:2]:
                        fleet.challenges.append(
                            await _round(
                                fleet,
                                seconds=seconds,
                                connections=challenge_connections,
                                paid=False,
                            )
                        )
            finally:
                for instance in instances:
                    stop(instance.process)
                stop(upstream)
    _report(fleets, server, seconds, rounds, connections, challenge_connections)


def _median(rounds: list[Round], name: str) -> float:
    return float(statistics.median(getattr(one, name) for one in rounds))


def _report(
    fleets: list[Fleet],
    server: str,
    seconds: int,
    rounds: int,
    connections: int,
    challenge_connections: int,
) -> None:
    sqlite, one, *more = fleets

    def row(fleet: Fleet, results: list[Round]) -> str:
        postgres = (
            f"{_median(results, 'postgres_cpu_us'):.0f}" if fleet.postmaster is not None else "-"
        )
        return (
            f"| {fleet.name} | {_median(results, 'per_second'):.0f} | "
            f"{_median(results, 'p99_ms'):.2f} | {_median(results, 'gateway_cpu_us'):.0f} | "
            f"{postgres} |"
        )

    def paid_rate(fleet: Fleet) -> float:
        return _median(fleet.paid, "per_second")

    ratio = _median(one.challenges, "per_second") / _median(sqlite.challenges, "per_second")
    scaling = ", ".join(f"{paid_rate(fleet) / paid_rate(one):.2f}x" for fleet in more)
    cores = os.cpu_count()
    record(
        "Scale-out on PostgreSQL",
        [
            "`l402-gateway serve` instances (one worker each) in front of a bare aiohttp "
            f"upstream, on one database of {server} or on SQLite; wrk -t1 on loopback, one "
            f"per loaded instance at once, -c{connections} split between them with a paid token, "
            f"-c{challenge_connections} for challenges (each a new invoice on regtest alice, "
            f"counted in the store), no challenge rate limit; {rounds} x {seconds}s "
            "alternating rounds, medians. A token bought on the first PostgreSQL instance was "
            "let in by all of them. CPU per answer: the loaded `serve` processes' (gateway) and "
            "the PostgreSQL server's, postmaster and backends (PostgreSQL); the idle instances "
            f"keep running. This machine has {cores} cores, shared by the instances, the wrk "
            "processes, PostgreSQL and LND: requests/s cannot scale with instances beyond "
            "them, CPU per request shows what an instance costs.",
            "",
            "| paid requests | requests/s | p99 ms (slowest instance) | gateway us/request "
            "| PostgreSQL us/request |",
            "| --- | --- | --- | --- | --- |",
            *(row(fleet, fleet.paid) for fleet in fleets),
            "",
            "| challenges | challenges/s | p99 ms | gateway us/challenge "
            "| PostgreSQL us/challenge |",
            "| --- | --- | --- | --- | --- |",
            *(row(fleet, fleet.challenges) for fleet in (sqlite, one)),
            "",
            f"One instance, PostgreSQL / SQLite: paid requests/s "
            f"{paid_rate(one) / paid_rate(sqlite):.2f}x, challenges/s **{ratio:.2f}x** "
            f"(target >= {TARGET_RATIO}x). {' and '.join(str(count) for count in INSTANCES[1:])} "
            f"PostgreSQL instances: {scaling} one's paid requests/s.",
        ],
        Verdict(
            f"{ratio:.2f}x SQLite's challenges/s on PostgreSQL; paid requests/s with "
            f"{'/'.join(str(count) for count in INSTANCES)} instances: "
            f"{'/'.join(f'{paid_rate(fleet):.0f}' for fleet in (one, *more))}",
            f">= {TARGET_RATIO}x",
            ratio >= TARGET_RATIO,
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.postgres_scale")
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--challenge-connections", type=int, default=16)
    args = parser.parse_args()
    asyncio.run(measure(args.seconds, args.rounds, args.connections, args.challenge_connections))


if __name__ == "__main__":
    main()
