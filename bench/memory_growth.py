"""Benchmark: memory and growth.

Two parts, because paying 100k real invoices is not possible here:

1. Real LND: the gateway in its own process (``bench.app gateway`` on the regtest network's
   alice, SQLite store, settlement watcher subscribed) issues 10k challenges over HTTP, each a
   real invoice on alice that the gateway tracks; bob pays some of them over two hops
   (bob -> carol -> alice) and their tokens are verified by the gateway over HTTP. Reported:
   the gateway process's RSS idle, after issuing and after the payments.
2. Fake node, real store: an ``L402Service`` in a child process of its own, with the SQLite
   store and the test suite's in-process ``FakeInvoiceBackend`` (it hands out preimages, so
   every token can be "paid"), mints 100k tokens and verifies each once. At 1k, 10k and
   100k stored tokens, ``authorize()`` is timed on a random sample of the tokens minted since
   the previous size, none verified before (distinct credentials: neither the
   verified-decision cache nor the root-key cache can answer, the store is read).
   Reported: median and p99 per size, and the child's RSS.

RSS is ``VmRSS`` from ``/proc/<pid>/status``.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import concurrent.futures
import multiprocessing
import os
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.common import (
    MAX_FEE,
    PATH,
    PAYMENT_TIMEOUT,
    PRICE_MSAT,
    Quote,
    Verdict,
    ViaCarol,
    fetch_quote,
    gateway_on_regtest,
    percentile,
    record,
)
from bench.settlement_visibility import read_only
from gateway.lnd.client import LndClient
from gateway.ports import Msat, SystemClock
from gateway.pricing import Pricing, Rule
from gateway.service import (
    ALLOWED_CACHE_SIZE,
    Allow,
    L402Service,
    PaymentChallenge,
    RequestInfo,
)
from gateway.store import SqliteStore
from tests.fakes import FakeInvoiceBackend

ISSUERS = 16  # concurrent challenge requests while issuing
SETTLE_LIMIT = 30.0  # seconds for the store to show the paid invoices SETTLED


def rss_mib(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


@dataclass(frozen=True, slots=True)
class Step:
    """The fake-node service at one number of stored tokens."""

    stored: int
    median_us: float
    p99_us: float
    rss_mib: float


@dataclass(frozen=True, slots=True)
class FakeNodeRun:
    start_rss_mib: float
    steps: tuple[Step, ...]
    end_rss_mib: float  # every token minted and verified
    seconds: float


def _sizes(tokens: int) -> list[int]:
    """1k, 10k, 100k... up to ``tokens``, and ``tokens`` itself."""
    sizes = [size for size in (1_000, 10_000, 100_000, 1_000_000) if size < tokens]
    return [*sizes, tokens]


async def _fake_node_run(database: Path, tokens: int, sample: int) -> FakeNodeRun:
    started = time.monotonic()
    start_rss = rss_mib()
    backend = FakeInvoiceBackend()
    store = await SqliteStore.open(database)
    service = L402Service(
        pricing=Pricing([Rule("/api/premium/*", price_msat=Msat(PRICE_MSAT), service="premium")]),
        backend=backend,
        store=store,
        clock=SystemClock(),
    )
    # Credentials go to a file, not to this process's memory, whose RSS is the measurement
    # (only their offsets stay: 800 kB for 100k).
    offsets = array.array("Q")
    sampled: set[int] = set()
    steps: list[Step] = []

    async def verify(credential: bytes) -> float:
        request = RequestInfo("GET", PATH, "127.0.0.1", authorization=(credential.decode(),))
        begun = time.perf_counter()
        decision = await service.authorize(request)
        elapsed = time.perf_counter() - begun
        if not isinstance(decision, Allow):
            raise RuntimeError(f"a paid token was not accepted: {decision}")
        return elapsed

    try:
        with (database.parent / "credentials.txt").open("w+b") as credentials:
            for size in _sizes(tokens):
                previous = len(offsets)
                credentials.seek(0, os.SEEK_END)
                while len(offsets) < size:
                    decision = await service.authorize(RequestInfo("GET", PATH, "127.0.0.1"))
                    if not isinstance(decision, PaymentChallenge):
                        raise RuntimeError(f"expected a challenge, got {decision}")
                    payment_hash = bytes.fromhex(decision.payment_hash)
                    preimage = backend.pay(payment_hash)
                    # The fake node forgets the invoice: its bookkeeping is not the gateway's.
                    del backend.invoices[payment_hash], backend.preimages[payment_hash]
                    offsets.append(credentials.tell())
                    credentials.write(f"L402 {decision.macaroon}:{preimage.hex()}\n".encode())
                credentials.flush()
                times = []
                for index in random.sample(range(previous, size), min(sample, size - previous)):
                    credentials.seek(offsets[index])
                    times.append(await verify(credentials.readline().rstrip()))
                    sampled.add(index)
                steps.append(
                    Step(
                        size,
                        statistics.median(times) * 1e6,
                        percentile(times, 0.99) * 1e6,
                        rss_mib(),
                    )
                )
            credentials.seek(0)
            for index, line in enumerate(credentials):
                if index not in sampled:
                    await verify(line.rstrip())
    finally:
        await store.close()
    return FakeNodeRun(start_rss, tuple(steps), rss_mib(), time.monotonic() - started)


def fake_node_run(database: Path, tokens: int, sample: int) -> FakeNodeRun:
    """Part 2, as the body of a fresh process (its RSS holds nothing of the bench's)."""
    return asyncio.run(_fake_node_run(database, tokens, sample))


@dataclass(frozen=True, slots=True)
class RealNodeRun:
    idle_rss_mib: float
    issued_rss_mib: float
    paid_rss_mib: float
    states: dict[str, int]
    root_keys: int
    issue_seconds: float


async def _issue(session: aiohttp.ClientSession, url: str, count: int) -> list[Quote]:
    """``count`` challenges from ``ISSUERS`` concurrent clients."""
    quotes: list[Quote] = []
    remaining = count

    async def issuer() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1  # taken before the request, so exactly ``count`` are issued
            quotes.append(await fetch_quote(session, url))

    await asyncio.gather(*(issuer() for _ in range(ISSUERS)))
    return quotes


async def _wait_settled(database: Path, count: int) -> None:
    connection = read_only(database)
    try:
        deadline = time.monotonic() + SETTLE_LIMIT
        query = "SELECT count(*) FROM invoices WHERE state = 'SETTLED'"
        while connection.execute(query).fetchone()[0] < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"fewer than {count} invoices SETTLED after {SETTLE_LIMIT}s")
            await asyncio.sleep(0.05)
    finally:
        connection.close()


def _store_counts(database: Path) -> tuple[dict[str, int], int]:
    connection = read_only(database)
    try:
        rows = connection.execute("SELECT state, count(*) FROM invoices GROUP BY state")
        states = {str(state): int(count) for state, count in rows}
        (root_keys,) = connection.execute("SELECT count(*) FROM root_keys").fetchone()
        return states, int(root_keys)
    finally:
        connection.close()


async def real_node_run(workdir: Path, invoices: int, paid: int) -> RealNodeRun:
    """Part 1: the gateway process on regtest tracks ``invoices`` real ones, ``paid`` paid."""
    async with (
        gateway_on_regtest(workdir) as gateway,
        LndClient(gateway.network.bob.settings()) as bob,
        aiohttp.ClientSession() as session,
    ):
        pid = gateway.process.pid
        url = gateway.url + PATH
        idle_rss = rss_mib(pid)
        started = time.monotonic()
        quotes = await _issue(session, url, invoices)
        issue_seconds = time.monotonic() - started
        issued_rss = rss_mib(pid)
        payer = ViaCarol(bob, gateway.network)
        for quote in quotes[:paid]:
            payment = await payer.send_payment(
                quote.invoice, max_fee_msat=MAX_FEE, payment_timeout=PAYMENT_TIMEOUT
            )
            assert payment.preimage is not None
            headers = {"Authorization": quote.authorization(payment.preimage)}
            async with session.get(url, headers=headers) as response:
                if response.status != 200:
                    raise RuntimeError(f"a paid token got {response.status}")
        await _wait_settled(gateway.database, paid)
        paid_rss = rss_mib(pid)
    states, root_keys = _store_counts(gateway.database)
    return RealNodeRun(idle_rss, issued_rss, paid_rss, states, root_keys, issue_seconds)


async def measure(invoices: int, paid: int, tokens: int, sample: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="l402-bench-"))
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
        fake = await asyncio.get_running_loop().run_in_executor(
            pool, fake_node_run, workdir / "fake-node.db", tokens, sample
        )
    real = await real_node_run(workdir, invoices, paid)

    flat = fake.steps[-1].median_us / fake.steps[0].median_us
    states = ", ".join(f"{count} {state}" for state, count in sorted(real.states.items()))
    record(
        "Memory and growth",
        [
            "RSS is VmRSS of the process.",
            "",
            f"**Real LND.** The gateway process (`bench.app gateway`, SQLite store, settlement "
            f"watcher subscribed to regtest alice) issued {invoices} challenges over HTTP "
            f"({ISSUERS} concurrent clients, {invoices / real.issue_seconds:.0f}/s), each a real "
            f"invoice on alice; bob paid {paid} of them over bob -> carol -> alice and each "
            "paid token was verified by the gateway (200). The store then held: "
            f"{states}; {real.root_keys} root keys.",
            "",
            "| gateway process | RSS MiB |",
            "| --- | --- |",
            f"| idle, after start-up | {real.idle_rss_mib:.1f} |",
            f"| after {invoices} challenges (invoices tracked) | {real.issued_rss_mib:.1f} |",
            f"| after {paid} payments and verifications | {real.paid_rss_mib:.1f} |",
            "",
            "**Fake node, real store.** Not LND: an `L402Service` with the SQLite store and the "
            "test suite's in-process `FakeInvoiceBackend` (it hands out each invoice's preimage, "
            "so every token can be used; it forgets each invoice once paid), in a process of "
            f"its own, minted {tokens} tokens and verified every one once "
            f"({fake.seconds:.0f} s in all). At each size, `authorize()` was timed on "
            f"{sample} random tokens minted since the previous size, never verified before "
            "(uncached: distinct credentials, root key read from the store).",
            "",
            "| stored tokens | uncached authorize() median µs | p99 µs | RSS MiB |",
            "| --- | --- | --- | --- |",
            f"| 0 (service not built yet) | | | {fake.start_rss_mib:.1f} |",
            *(
                f"| {step.stored} | {step.median_us:.0f} | {step.p99_us:.0f} | {step.rss_mib:.1f} |"
                for step in fake.steps
            ),
            f"| {tokens}, all verified | | | {fake.end_rss_mib:.1f} |",
            "",
            f"Verification time at {fake.steps[-1].stored} vs {fake.steps[0].stored} stored "
            f"tokens: **{flat:.2f}x** (flat is 1.0). Percentiles are nearest-rank. What grows "
            "with verified tokens is the service's in-memory caches of them (root keys, up to "
            f"100k entries; verified decisions, up to {ALLOWED_CACHE_SIZE}); the store is on "
            "disk.",
        ],
        Verdict(
            f"RSS {real.paid_rss_mib:.0f} MiB with {invoices} real invoices tracked, "
            f"{fake.end_rss_mib:.0f} MiB after {tokens} tokens (fake node); uncached "
            f"verification {flat:.2f}x from {fake.steps[0].stored} to {fake.steps[-1].stored} "
            "stored",
            "",
            None,
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.memory_growth")
    parser.add_argument("--invoices", type=int, default=10_000, help="real invoices issued")
    parser.add_argument("--paid", type=int, default=100, help="of which bob pays")
    parser.add_argument("--tokens", type=int, default=100_000, help="fake-node tokens")
    parser.add_argument("--sample", type=int, default=1000, help="verifications timed per size")
    args = parser.parse_args()
    if not 0 < args.paid <= args.invoices:
        parser.error("--paid must be between 1 and --invoices")
    asyncio.run(measure(args.invoices, args.paid, args.tokens, args.sample))


if __name__ == "__main__":
    main()
