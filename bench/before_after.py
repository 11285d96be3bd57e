"""Benchmark 7: no regression against an earlier revision, measured in the same run.

The paid-request path of this tree and of a baseline revision (``--baseline``, a git
revision checked out into a temporary worktree), side by side on one regtest network: the
aiohttp middleware (``bench.app gateway``) and the reverse proxy (``l402-gateway serve`` in
front of ``bench.app bare``), each loaded by wrk with a token it sold and bob paid; the
proxy also with a free GET and a paid POST. Rounds alternate baseline and current; the ratio
of median requests/s is current / baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    PATH,
    PRICE_MSAT,
    REPO,
    LoadResult,
    Verdict,
    record,
    run_wrk,
    start_app,
    stop,
)
from bench.verify_overhead import _paid_authorization
from regtest.demo import alice_lnd_and_store_toml
from regtest.network import Network, running_network
from regtest.processes import free_ports, wait_for_http

# Within the noise of alternating rounds on a shared two-core machine.
TOLERANCE = 0.95
_SERVE = "import sys; from gateway.cli import main; sys.exit(main(sys.argv[1:]))"


@contextlib.contextmanager
def worktree(revision: str, parent: Path) -> Iterator[Path]:
    """``revision`` checked out (detached) under ``parent``; removed afterwards."""
    tree = parent / "baseline"
    subprocess.run(  # noqa: S603 - git with our own arguments
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), revision],  # noqa: S607
        check=True,
        capture_output=True,
    )
    try:
        yield tree
    finally:
        subprocess.run(  # noqa: S603
            ["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],  # noqa: S607
            check=False,
            capture_output=True,
        )


def _config(network: Network, workdir: Path, server: str = "") -> Path:
    """A config both revisions read: alice, SQLite in ``workdir``, one priced route."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "gateway.toml"
    config.write_text(
        f"""{server}
{alice_lnd_and_store_toml(network, workdir)}
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


@dataclass
class Target:
    """One front end of one revision, started and paid for."""

    revision: str
    front: str  # "middleware" or "proxy"
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    authorization: str = ""


@dataclass(frozen=True)
class Load:
    """What wrk asks a front end for."""

    name: str
    path: str
    paid: bool
    post: str = ""


LOADS = {
    "middleware": (Load("paid GET", PATH, paid=True),),
    "proxy": (
        Load("paid GET", PATH, paid=True),
        Load("free GET", "/health", paid=False),
        Load("paid POST", PATH, paid=True, post='{"prompt": "hello"}'),
    ),
}


def _start(tree: Path, args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as output:
        return subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
            [sys.executable, *args], cwd=tree, stdout=output, stderr=subprocess.STDOUT
        )


def _targets(network: Network, workdir: Path, baseline: Path, upstream: str) -> list[Target]:
    targets = []
    for revision, tree in (("baseline", baseline), ("current", REPO)):
        middleware_port, proxy_port = free_ports(2)
        side = workdir / revision
        config = _config(network, side / "middleware")
        log = side / "middleware.log"
        args = ["-m", "bench.app", "--port", str(middleware_port), "gateway", str(config)]
        process = _start(tree, args, log)
        targets.append(
            Target(revision, "middleware", f"http://127.0.0.1:{middleware_port}", process, log)
        )
        # One wrk client: no cap on the unpaid requests it has under way (the free GETs).
        server = (
            f'[server]\nlisten = "127.0.0.1:{proxy_port}"\nupstream = "{upstream}"\n'
            "unpaid_requests_per_client = 0\n"
        )
        config = _config(network, side / "proxy", server)
        log = side / "proxy.log"
        process = _start(tree, ["-c", _SERVE, "--config", str(config), "serve"], log)
        targets.append(Target(revision, "proxy", f"http://127.0.0.1:{proxy_port}", process, log))
    return targets


async def measure(baseline_revision: str, seconds: int, rounds: int, connections: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="l402-bench-"))
    with worktree(baseline_revision, workdir) as baseline:
        async with running_network(workdir / "network") as network:
            (upstream_port,) = free_ports(1)
            upstream_url = f"http://127.0.0.1:{upstream_port}"
            upstream = start_app(upstream_port, "bare", None, workdir / "upstream.log")
            targets = _targets(network, workdir, baseline, upstream_url)
            try:
                await wait_for_http(upstream_url + PATH, upstream, workdir / "upstream.log")
                for target in targets:
                    await wait_for_http(target.url + "/health", target.process, target.log)
                    target.authorization = await _paid_authorization(target.url, network)
                results = await _load(targets, seconds, rounds, connections)
            finally:
                stop(upstream)
                for target in targets:
                    stop(target.process)
    _report(baseline_revision, results, seconds, rounds, connections)


async def _load(
    targets: list[Target], seconds: int, rounds: int, connections: int
) -> dict[tuple[str, str, str], list[LoadResult]]:
    """(revision, front, load name) -> each round's result."""
    results: dict[tuple[str, str, str], list[LoadResult]] = {}
    for repeat in range(rounds + 1):  # the first pass warms every server up
        for target in targets:
            for load in LOADS[target.front]:
                result = await asyncio.to_thread(
                    run_wrk,
                    target.url + load.path,
                    seconds=2 if repeat == 0 else seconds,
                    connections=connections,
                    headers={"Authorization": target.authorization} if load.paid else {},
                    post=load.post,
                )
                name = f"{target.revision} {target.front} {load.name}"
                if result.non_2xx:
                    raise RuntimeError(f"{name}: {result.non_2xx} non-2xx responses")
                if repeat:
                    results.setdefault((target.revision, target.front, load.name), []).append(
                        result
                    )
    return results


def _report(
    baseline: str,
    results: dict[tuple[str, str, str], list[LoadResult]],
    seconds: int,
    rounds: int,
    connections: int,
) -> None:
    def median(key: tuple[str, str, str], field: str) -> float:
        return float(statistics.median(getattr(r, field) for r in results[key]))

    loads = [(front, load.name) for front, loads in LOADS.items() for load in loads]
    ratios = {
        f"{front}, {name}": median(("current", front, name), "requests_per_second")
        / median(("baseline", front, name), "requests_per_second")
        for front, name in loads
    }
    worst = min(ratios.values())
    record(
        "Before and after",
        [
            f"Against revision `{baseline}`, same run: wrk -t1 -c{connections}, "
            f"{rounds} x {seconds}s rounds alternating over the servers, medians.",
            "",
            "| server | load | requests/s | p50 ms | p99 ms |",
            "| --- | --- | --- | --- | --- |",
            *(
                f"| {revision} {front} | {name} | "
                f"{median((revision, front, name), 'requests_per_second'):.0f} | "
                f"{median((revision, front, name), 'p50_ms'):.2f} | "
                f"{median((revision, front, name), 'p99_ms'):.2f} |"
                for front, name in loads
                for revision in ("baseline", "current")
            ),
            "",
            *(f"Current / baseline, {what}: **{ratio:.1%}**." for what, ratio in ratios.items()),
        ],
        Verdict(
            ", ".join(f"{what} {ratio:.1%}" for what, ratio in ratios.items())
            + f" of `{baseline}`'s requests/s",
            f">= {TOLERANCE:.0%}",
            worst >= TOLERANCE,
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.before_after")
    parser.add_argument("--baseline", default="HEAD~1", help="git revision to compare against")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    asyncio.run(measure(args.baseline, args.seconds, args.rounds, args.connections))


if __name__ == "__main__":
    main()
