"""Unpaid invoices on real LND: the sweeper records what LookupInvoice says about expired
challenges (CANCELED: LND cancels them itself), records EXPIRED when the node still says OPEN
(a gateway clock ahead of the node's), keeps a late settlement of such an invoice, and prunes
the unpaid invoices and their root keys after the retention, while paid tokens keep working
and ``l402-gateway invoices`` shows each state."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway import l402
from gateway.config import Config, L402Config, StoreConfig
from gateway.examples import demo_api
from gateway.expiry import EXPIRY_GRACE
from gateway.lnd.client import LndClient
from gateway.ports import PaymentHash
from gateway.runtime import running_gateway
from gateway.store import SqliteStore
from gateway.web.aiohttp import setup_l402
from regtest.network import Network
from tests.regtest.gateway_helpers import (
    MAX_FEE,
    OffsetClock,
    config_toml,
    gateway_command,
    gateway_config,
    serving,
    wait_for_invoice,
)

pytestmark = pytest.mark.regtest

PATH = "/api/premium/fortune"
SWEEP_INTERVAL = 0.5


def configured(base: Config, *, expiry: int, retention: int) -> Config:
    return dataclasses.replace(
        base,
        l402=L402Config(invoice_expiry=expiry, root_key_cache_seconds=0),
        store=StoreConfig(
            url=base.store.url, unpaid_retention=retention, sweep_interval=SWEEP_INTERVAL
        ),
    )


@asynccontextmanager
async def mounted(config: Config, clock: OffsetClock) -> AsyncIterator[str]:
    app = demo_api()
    setup_l402(app, lambda: running_gateway(config, clock=clock))
    async with serving(app) as url:
        yield url


async def challenge(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url + PATH) as response:
        assert response.status == 402
        problem: dict[str, Any] = await response.json()
    return problem


async def pay(bob: LndClient, problem: dict[str, Any]) -> str:
    payment = await bob.send_payment(problem["invoice"], max_fee_msat=MAX_FEE, payment_timeout=30)
    assert payment.preimage is not None
    return f"L402 {problem['macaroon']}:{payment.preimage.hex()}"


async def status_with(session: aiohttp.ClientSession, url: str, authorization: str) -> int:
    async with session.get(url + PATH, headers={"Authorization": authorization}) as response:
        return response.status


def hash_of(problem: dict[str, Any]) -> bytes:
    return bytes.fromhex(problem["payment_hash"])


def key_id_of(problem: dict[str, Any]) -> bytes:
    return hashlib.sha256(l402.decode_b64(problem["macaroon"]).identifier).digest()


def listing(config: Config, tmp_path: Path) -> dict[str, str]:
    """``l402-gateway invoices``: payment hash prefix -> state, and the summary line."""
    config_file = tmp_path / "gateway.toml"
    config_file.write_text(config_toml(config))
    result = gateway_command(config_file, "invoices")
    assert result.returncode == 0, result.stderr
    table, _, _per_day_and_service = result.stdout.strip().partition("\n\n")
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["CREATED", "(UTC)", "STATE"]
    states = {line.split()[-1]: line.split()[2] for line in lines[1:]}
    states["summary"] = next(line for line in result.stdout.splitlines() if " invoices: " in line)
    return states


async def test_expired_challenges_are_recorded_then_pruned_while_paid_tokens_work(
    network: Network, bob: LndClient, tmp_path: Path
) -> None:
    database = tmp_path / "gateway.db"
    # (the upstream only makes the TOML that `invoices` reads complete)
    base = gateway_config(network, database, upstream="http://127.0.0.1:9")
    clock = OffsetClock()

    # 1. Short-lived challenges, kept forever: LND cancels them; the sweeper records it.
    first = configured(base, expiry=3, retention=0)
    async with mounted(first, clock) as url, aiohttp.ClientSession() as session:
        paid = await challenge(session, url)
        paid_authorization = await pay(bob, paid)
        assert await status_with(session, url, paid_authorization) == 200
        unpaid = [await challenge(session, url) for _ in range(3)]
        await wait_for_invoice(database, hash_of(paid), "SETTLED")
        started = time.monotonic()
        for problem in unpaid:
            await wait_for_invoice(database, hash_of(problem), "CANCELED", limit=30)
        # expiry + grace + one interval, and LookupInvoice answered CANCELED by then
        assert time.monotonic() - started < 3 + EXPIRY_GRACE + 5
    states = listing(first, tmp_path)
    for problem in unpaid:
        assert states[problem["payment_hash"][:16]] == "CANCELED"
    assert states[paid["payment_hash"][:16]] == "SETTLED"

    # 2. The gateway's clock runs ahead of the node's: past its expiry by our clock, the
    # node still says OPEN, so the sweeper records EXPIRED; a payment that still lands (the
    # invoice was payable for the node) is recorded SETTLED and its token works.
    second = configured(base, expiry=60, retention=0)
    async with mounted(second, clock) as url, aiohttp.ClientSession() as session:
        late, abandoned = await challenge(session, url), await challenge(session, url)
        clock.offset = 120.0
        await wait_for_invoice(database, hash_of(late), "EXPIRED", limit=10)
        await wait_for_invoice(database, hash_of(abandoned), "EXPIRED", limit=10)
        late_authorization = await pay(bob, late)
        await wait_for_invoice(database, hash_of(late), "SETTLED", limit=10)
        assert await status_with(session, url, late_authorization) == 200
    states = listing(second, tmp_path)
    assert states[abandoned["payment_hash"][:16]] == "EXPIRED"
    assert states[late["payment_hash"][:16]] == "SETTLED"
    assert states["summary"].startswith("6 invoices:")
    assert "2 settled, 3 canceled, 1 expired" in states["summary"]

    # 3. A short retention: the unpaid invoices and their root keys go; paid tokens stay.
    third = configured(base, expiry=60, retention=1)
    async with mounted(third, clock) as url, aiohttp.ClientSession() as session:
        store = await SqliteStore.open(database)
        try:
            deadline = time.monotonic() + 10
            gone = [*unpaid, abandoned]
            while any([await store.get_invoice(PaymentHash(hash_of(p))) for p in gone]):
                assert time.monotonic() < deadline, "not pruned"
                await asyncio.sleep(0.1)
            for problem in gone:
                assert await store.get_root_key(key_id_of(problem)) is None
            for problem in (paid, late):
                record = await store.get_invoice(PaymentHash(hash_of(problem)))
                assert record is not None
                assert record.state.value == "SETTLED"
                assert await store.get_root_key(key_id_of(problem)) is not None
        finally:
            await store.close()
        assert await status_with(session, url, paid_authorization) == 200
        assert await status_with(session, url, late_authorization) == 200
        # a pruned challenge's macaroon is now unknown: its (never paid) token cannot verify
        async with session.post(
            url + "/.well-known/l402/redeem",
            json={"macaroon": abandoned["macaroon"]},
            headers={"Sec-Fetch-Site": "same-origin"},
        ) as response:
            assert response.status == 401
    states = listing(third, tmp_path)
    assert states["summary"].startswith("2 invoices:")
