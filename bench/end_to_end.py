"""Benchmark: end-to-end latency of a paid request.

One paid request made with the gateway's client library (``gateway.client``): GET, 402 with a
real invoice on the regtest network's alice, bob pays over two hops (bob -> carol -> alice),
retry with the token, 200 from the gateway-fronted aiohttp app. Every request buys a fresh
token. The baseline is the payment alone: bob's SendPaymentV2 of a same-size invoice created
directly on alice with AddInvoice, over the same route. The two kinds alternate; the gateway
overhead is the difference of their p50s and p99s.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.common import (
    MAX_FEE,
    PATH,
    PAYMENT_TIMEOUT,
    PRICE_MSAT,
    Verdict,
    ViaCarol,
    gateway_on_regtest,
    percentile,
    record,
)
from gateway.client import Budget, L402Client, TokenCache
from gateway.client.aiohttp import l402_session
from gateway.lnd.client import LndClient
from gateway.ports import Msat

MEMO = "premium: GET /api/premium/hello"  # what the gateway writes for that route
EXPIRY = 600


async def _paid_request(session: aiohttp.ClientSession, client: L402Client, url: str) -> float:
    """Seconds for one GET that pays a fresh token; the token is dropped afterwards."""
    paid_before = len(client.spending_log)
    started = time.perf_counter()
    async with session.get(url) as response:
        await response.read()
    elapsed = time.perf_counter() - started
    if response.status != 200 or len(client.spending_log) != paid_before + 1:
        raise RuntimeError(f"expected one payment and a 200, got {response.status}")
    # The next request must pay again, not reuse this token.
    await client.cache.remove(bytes.fromhex(client.spending_log[-1].payment_hash))
    return elapsed


async def _bare_payment(alice: LndClient, payer: ViaCarol) -> float:
    """Seconds for bob's SendPaymentV2 alone, of an invoice made beforehand on alice."""
    invoice = await alice.add_invoice(Msat(PRICE_MSAT), MEMO, EXPIRY)
    started = time.perf_counter()
    await payer.send_payment(
        invoice.payment_request, max_fee_msat=MAX_FEE, payment_timeout=PAYMENT_TIMEOUT
    )
    return time.perf_counter() - started


async def measure(samples: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="l402-bench-"))
    times: dict[str, list[float]] = {"bare": [], "gateway": []}
    async with (
        gateway_on_regtest(workdir) as gateway,
        LndClient(gateway.network.alice.settings(macaroon="invoice")) as alice,
        LndClient(gateway.network.bob.settings()) as bob,
    ):
        payer = ViaCarol(bob, gateway.network)
        client = L402Client(
            payer,
            network="regtest",
            budget=Budget(max_price_msat=PRICE_MSAT, max_fee_msat=MAX_FEE),
            cache=TokenCache(),
            payment_timeout=PAYMENT_TIMEOUT,
        )
        url = gateway.url + PATH
        async with l402_session(client) as session:
            # One unrecorded round first: connections, route finding, first writes.
            await _paid_request(session, client, url)
            await _bare_payment(alice, payer)
            for _ in range(samples):
                times["gateway"].append(await _paid_request(session, client, url))
                times["bare"].append(await _bare_payment(alice, payer))

    def ms(name: str, fraction: float) -> float:
        return percentile(times[name], fraction) * 1000

    p50, p99 = (ms("gateway", fraction) - ms("bare", fraction) for fraction in (0.5, 0.99))
    record(
        "End to end",
        [
            f"{samples} samples per kind, alternating, after one unrecorded round; "
            f"{PRICE_MSAT} msat over two hops, bob -> carol -> alice, on regtest LND.",
            "",
            "| request | p50 ms | p99 ms |",
            "| --- | --- | --- |",
            f"| bare SendPaymentV2 of an AddInvoice invoice (payment only) | {ms('bare', 0.5):.1f} "
            f"| {ms('bare', 0.99):.1f} |",
            f"| paid GET with gateway.client (402, pay, retry, 200; fresh token) | "
            f"{ms('gateway', 0.5):.1f} | {ms('gateway', 0.99):.1f} |",
            "",
            f"Gateway overhead: **{p50:.1f} ms** at p50, **{p99:.1f} ms** at p99 (the 402 with "
            "its invoice and store writes, the client's checks and token cache, the retry and "
            "its verification). Percentiles are nearest-rank.",
        ],
        Verdict(
            f"paid request {p50:+.1f} ms at p50, {p99:+.1f} ms at p99 vs the bare payment",
            "",
            None,
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.end_to_end")
    parser.add_argument("--samples", type=int, default=40, help="samples per kind")
    args = parser.parse_args()
    asyncio.run(measure(args.samples))


if __name__ == "__main__":
    main()
