"""Benchmark: the credit store's hot path.

Every request on a credit route makes two SQLite writes: ``reserve`` (a conditional debit
plus a reservation row) before the backend is called, ``settle_reservation`` (the charge)
after; on a route with a revenue split the charge also writes the ledger (an entry per
payee and the merchant's, the payee's running total): ``reserve+settle split``. This measures
them against the store's existing operations on the same file in the same run:
``get_root_key`` (the read every uncached token verification makes) and ``add_invoice`` (the
write every challenge makes). Each operation runs in fresh worker
processes, one and then two of them on one database file (two gateway processes sharing it),
each with ``--callers`` concurrent callers, in alternating rounds; medians. No target: the
figures say what a debit costs next to the writes the gateway already makes.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from multiprocessing.synchronize import Event
from pathlib import Path

from bench.common import Verdict, percentile, record
from gateway.ports import (
    InvoiceRecord,
    InvoiceState,
    InvoiceUpdate,
    Msat,
    PaymentHash,
    Share,
    Split,
)
from gateway.store import SqliteStore

OPERATIONS = ("get_root_key", "add_invoice", "reserve", "reserve+settle", "reserve+settle split")
SPLIT = (Share("carol", ppm=300_000),)  # 30% to one payee: 2 ledger entries, 1 payee row
TOKEN_ID = hashlib.sha256(b"bench credit token").digest()
KEY_ID = hashlib.sha256(b"bench key").digest()
PRICE = Msat(1000)
FAR_FUTURE = 1e12


def _invoice(n: bytes, amount_msat: int, *, buys_credit: bool = False) -> InvoiceRecord:
    now = time.time()
    return InvoiceRecord(
        payment_hash=PaymentHash(hashlib.sha256(n).digest()),
        payment_request="lnbcrt1n1bench",
        amount_msat=Msat(amount_msat),
        token_id=TOKEN_ID,
        service="premium",
        method="GET",
        path="/api/premium/hello",
        state=InvoiceState.OPEN,
        created_at=now,
        expires_at=now + 3600,
        add_index=1,
        buys_credit=buys_credit,
    )


async def _prepare(path: Path) -> None:
    """A root key to read and an account funded, as a settled purchase funds it, for far
    more debits than any run makes."""
    store = await SqliteStore.open(path)
    try:
        await store.put_root_key(KEY_ID, TOKEN_ID, b"r" * 32)
        await store.open_account(TOKEN_ID, "premium")
        purchase = _invoice(b"purchase", 10**15, buys_credit=True)
        await store.add_invoice(purchase)
        await store.apply_update(
            InvoiceUpdate(purchase.payment_hash, InvoiceState.SETTLED, 1, Msat(0), time.time())
        )
    finally:
        await store.close()


def _operation(store: SqliteStore, name: str, worker: int) -> Callable[[], Awaitable[None]]:
    """One call of operation ``name`` (each a fresh invoice for ``add_invoice``)."""
    counter = iter(range(10**12))

    async def get_root_key() -> None:
        if await store.get_root_key(KEY_ID) is None:
            raise RuntimeError("the root key is missing")

    async def add_invoice() -> None:
        await store.add_invoice(_invoice(b"%d %d %d" % (os.getpid(), worker, next(counter)), 1))

    async def reserve() -> None:
        if (await store.reserve(TOKEN_ID, PRICE, FAR_FUTURE)).reservation is None:
            raise RuntimeError("the account ran dry")

    async def reserve_and_settle(split: Split = ()) -> None:
        reservation = (await store.reserve(TOKEN_ID, PRICE, FAR_FUTURE)).reservation
        if reservation is None:
            raise RuntimeError("the account ran dry")
        await store.settle_reservation(
            reservation.reservation_id, PRICE, "GET", "/hello", split=split
        )

    async def reserve_and_settle_split() -> None:
        await reserve_and_settle(SPLIT)

    return {
        "get_root_key": get_root_key,
        "add_invoice": add_invoice,
        "reserve": reserve,
        "reserve+settle": reserve_and_settle,
        "reserve+settle split": reserve_and_settle_split,
    }[name]


async def _load(
    path: Path, name: str, seconds: float, callers: int, start: Event
) -> tuple[int, list[float]]:
    """Calls of ``name`` made in ``seconds`` by ``callers`` concurrent callers, and the
    latency of each in ms."""
    store = await SqliteStore.open(path)
    try:
        calls = [_operation(store, name, caller) for caller in range(callers)]
        await asyncio.to_thread(start.wait)
        deadline = time.monotonic() + seconds
        latencies: list[float] = []

        async def caller(call: Callable[[], Awaitable[None]]) -> None:
            while time.monotonic() < deadline:
                began = time.perf_counter()
                await call()
                latencies.append((time.perf_counter() - began) * 1000)

        await asyncio.gather(*(caller(call) for call in calls))
        return len(latencies), latencies
    finally:
        await store.close()


def _worker(
    path: Path,
    name: str,
    seconds: float,
    callers: int,
    start: Event,
    results: multiprocessing.Queue[tuple[int, list[float]]],
) -> None:
    results.put(asyncio.run(_load(path, name, seconds, callers, start)))


def _run(
    path: Path, name: str, processes: int, seconds: float, callers: int
) -> tuple[float, list[float]]:
    """Calls per second of ``name`` summed over ``processes`` worker processes started
    together on one file, and every call's latency in ms."""
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    results: multiprocessing.Queue[tuple[int, list[float]]] = context.Queue()
    workers = [
        context.Process(target=_worker, args=(path, name, seconds, callers, start, results))
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    time.sleep(1.0)  # let every worker import and open the store before the start
    start.set()
    outcomes = [results.get(timeout=seconds + 120) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
        if worker.exitcode != 0:
            raise RuntimeError(f"a {name} worker exited with {worker.exitcode}")
    latencies = [latency for _, process_latencies in outcomes for latency in process_latencies]
    return sum(count for count, _ in outcomes) / seconds, latencies


def measure(seconds: float, rounds: int, callers: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="l402-bench-"))
    path = workdir / "gateway.db"
    asyncio.run(_prepare(path))
    rates: dict[tuple[int, str], list[float]] = {}
    latencies: dict[tuple[int, str], list[float]] = {}
    for _ in range(rounds):
        for processes in (1, 2):
            for name in OPERATIONS:
                calls_per_second, times = _run(path, name, processes, seconds, callers)
                rates.setdefault((processes, name), []).append(calls_per_second)
                latencies.setdefault((processes, name), []).extend(times)
    # a pair alone: one process, one caller, nothing else queued on the store
    alone = _run(path, "reserve+settle", 1, seconds, 1)[1]

    def rate(processes: int, name: str) -> float:
        return statistics.median(rates[processes, name])

    def ratio(processes: int, name: str, baseline: str) -> str:
        return f"{rate(processes, name) / rate(processes, baseline):.2f}"

    lines = [
        "One SQLite file (WAL, synchronous NORMAL); each operation "
        f"in fresh worker processes with {callers} concurrent callers each, {rounds} x "
        f"{seconds:g}s rounds alternating over the operations, medians. Latencies over every "
        "call of every round, nearest-rank.",
        "",
        "| operation | 1 process /s | p50 ms | p99 ms | 2 processes /s (sum) | p50 ms | p99 ms |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in OPERATIONS:
        cells = []
        for processes in (1, 2):
            times = latencies[processes, name]
            cells += [
                f"{rate(processes, name):.0f}",
                f"{percentile(times, 0.5):.2f}",
                f"{percentile(times, 0.99):.2f}",
            ]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    lines += [
        "",
        "| ratio, same run | 1 process | 2 processes |",
        "| --- | --- | --- |",
        *(
            f"| {name} / {baseline} | {ratio(1, name, baseline)} | {ratio(2, name, baseline)} |"
            for name in ("reserve", "reserve+settle")
            for baseline in ("add_invoice", "get_root_key")
        ),
        f"| reserve+settle split / reserve+settle | "
        f"{ratio(1, 'reserve+settle split', 'reserve+settle')} | "
        f"{ratio(2, 'reserve+settle split', 'reserve+settle')} |",
        "",
        f"A reserve+settle pair alone (one process, one caller): p50 "
        f"**{percentile(alone, 0.5):.2f} ms**, p99 **{percentile(alone, 0.99):.2f} ms**.",
        f"Debits (reserve+settle pairs) per second: **{rate(1, 'reserve+settle'):.0f}** in one "
        f"process, **{rate(2, 'reserve+settle'):.0f}** in two sharing the file "
        f"({ratio(1, 'reserve+settle', 'add_invoice')}x and "
        f"{ratio(2, 'reserve+settle', 'add_invoice')}x add_invoice's writes/s).",
    ]
    record(
        "Credit store",
        lines,
        Verdict(
            f"{rate(1, 'reserve+settle'):.0f} debits/s (reserve+settle) = "
            f"{ratio(1, 'reserve+settle', 'add_invoice')}x add_invoice writes/s; pair alone "
            f"p99 {percentile(alone, 0.99):.2f} ms; with a revenue split "
            f"{ratio(1, 'reserve+settle split', 'reserve+settle')}x",
            "",
            None,
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.credit_store")
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--callers", type=int, default=8)
    args = parser.parse_args()
    measure(args.seconds, args.rounds, args.callers)


if __name__ == "__main__":
    main()
