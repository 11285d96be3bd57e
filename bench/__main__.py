"""``python -m bench``: every benchmark in turn, each in its own process with its own regtest
network; together they rewrite bench/results.md (its summary table first)."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from bench.common import REPO, RESULTS

BENCHMARKS = (
    "verify_overhead",
    "vs_aperture",
    "challenge_issuance",
    "end_to_end",
    "settlement_visibility",
    "memory_growth",
    "before_after",
    "credit_route",
    "credit_store",
    "on_success",
    "ops_overhead",
    "postgres_scale",
)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"some of: {' '.join(BENCHMARKS)}")
    names = parser.parse_args().names or BENCHMARKS
    if unknown := sorted(set(names) - set(BENCHMARKS)):
        parser.error(f"unknown benchmark: {', '.join(unknown)}")
    failed = []
    for index, name in enumerate(names, 1):
        print(f"\n=== [{index}/{len(names)}] bench.{name}", flush=True)
        started = time.monotonic()
        code = subprocess.call([sys.executable, "-m", f"bench.{name}"], cwd=REPO)  # noqa: S603
        print(f"=== bench.{name}: exit {code} after {time.monotonic() - started:.0f}s", flush=True)
        if code:
            failed.append(name)
    print(f"\nresults: {RESULTS}")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
