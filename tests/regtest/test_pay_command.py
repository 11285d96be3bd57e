"""``l402-gateway pay`` as a subprocess, paying with bob's node a gateway in front of demo_api()."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from gateway.examples import demo_api
from gateway.lnd.client import LndClient
from gateway.ports import PaymentHash
from gateway.runtime import running_gateway
from gateway.store import SqliteStore
from gateway.web.aiohttp import setup_l402
from regtest.network import Network
from regtest.processes import free_ports
from tests.regtest.gateway_helpers import (
    PREMIUM_PRICE,
    Ran,
    bob_runs,
    gateway_config,
    serving,
    wait_for_invoice,
)

pytestmark = pytest.mark.regtest
FORTUNE = "/api/premium/fortune"


@dataclass
class Gateway:
    url: str
    database: Path
    network: Network
    tmp: Path

    async def pay(self, *args: str, node: bool = True) -> Ran:
        """Run ``l402-gateway pay`` with bob's node (via the environment) and a temp cache."""
        return await bob_runs(self.network, "pay", *args, cache=self.tmp / "cache", node=node)

    async def states(self) -> list[str]:
        store = await SqliteStore.open(self.database)
        try:
            return sorted(record.state.value for record in await store.list_invoices())
        finally:
            await store.close()


@pytest_asyncio.fixture
async def gateway(network: Network, tmp_path: Path) -> AsyncIterator[Gateway]:
    database = tmp_path / "gateway.db"
    config = gateway_config(network, database)
    app = demo_api()
    setup_l402(app, lambda: running_gateway(config))
    async with serving(app) as url:
        yield Gateway(url, database, network, tmp_path)


async def test_pays_prints_the_body_and_then_reuses_the_token(gateway: Gateway) -> None:
    first = await gateway.pay(gateway.url + FORTUNE)
    assert first.code == 0, first.stderr
    body = json.loads(first.stdout)
    assert body["paid"]["service"] == "premium"
    assert body["paid"]["amount_msat"] == PREMIUM_PRICE
    assert "paying 10 sat (routing fee up to 5 sat)..." in first.stderr
    assert "paid 10 sat + " in first.stderr
    await wait_for_invoice(gateway.database, bytes.fromhex(body["paid"]["payment_hash"]), "SETTLED")
    cache = gateway.tmp / "cache" / "l402-gateway" / "tokens.json"
    assert oct(cache.stat().st_mode & 0o777) == "0o600"

    # The cached token: no payment, no progress, same token.
    again = await gateway.pay(
        "--json", "--lnd-host", gateway.network.bob.rpc_host, gateway.url + FORTUNE
    )
    assert again.code == 0, again.stderr
    summary = json.loads(again.stdout)
    assert (summary["status"], summary["payments"]) == (200, [])
    assert json.loads(summary["body"])["paid"]["token_id"] == body["paid"]["token_id"]
    assert "paying" not in again.stderr
    assert await gateway.states() == ["SETTLED"]


async def test_json_summary_of_a_payment_and_output_file(gateway: Gateway) -> None:
    out = gateway.tmp / "fortune.json"
    result = await gateway.pay(
        "--json",
        "-s",
        "--max-cost",
        "10",
        "--max-fee",
        "2",
        "-o",
        str(out),
        gateway.url + FORTUNE,
    )
    assert result.code == 0, result.stderr
    assert result.stderr == ""
    summary = json.loads(result.stdout)
    assert summary["status"] == 200
    assert summary["output"] == str(out)
    (payment,) = summary["payments"]
    assert payment["amount_msat"] == PREMIUM_PRICE
    assert payment["fee_msat"] <= 2_000
    assert payment["destination"] == gateway.network.alice.pubkey
    assert payment["description"] == f"premium: GET {FORTUNE}"
    assert payment["url"] == gateway.url + FORTUNE
    assert payment["recovered"] is False
    assert json.loads(out.read_text())["paid"]["payment_hash"] == payment["payment_hash"]


async def test_no_pay_prints_the_price_and_pays_nothing(gateway: Gateway, bob: LndClient) -> None:
    text = await gateway.pay("--no-pay", gateway.url + FORTUNE)
    assert text.code == 6, text.stderr
    assert "payment required: 10 sat (10000 msat)" in text.stdout
    assert f"pay to:   {gateway.network.alice.pubkey}" in text.stdout
    assert "network:  regtest" in text.stdout
    result = await gateway.pay("--no-pay", "--json", gateway.url + FORTUNE)
    assert result.code == 6
    offer = json.loads(result.stdout)["offer"]
    assert offer["amount_msat"] == PREMIUM_PRICE
    payment_hash = bytes.fromhex(offer["payment_hash"])
    await wait_for_invoice(gateway.database, payment_hash, "OPEN")
    assert await bob.lookup_payment(PaymentHash(payment_hash)) is None
    # Without a node, --no-pay still shows the price (no network check then).
    offline = await gateway.pay("--no-pay", gateway.url + FORTUNE, node=False)
    assert offline.code == 6
    assert await gateway.states() == ["OPEN", "OPEN", "OPEN"]


async def test_over_max_cost_exits_4_without_paying(gateway: Gateway, bob: LndClient) -> None:
    result = await gateway.pay("--max-cost", "9.999", "--json", gateway.url + FORTUNE)
    assert result.code == 4, result.stderr
    assert "price 10 sat is over the limit of 9.999 sat per request" in result.stderr
    assert "nothing was paid" in result.stderr
    assert "paying" not in result.stderr
    summary = json.loads(result.stdout)
    payment_hash = bytes.fromhex(summary["offer"]["payment_hash"])
    await wait_for_invoice(gateway.database, payment_hash, "OPEN")
    assert await bob.lookup_payment(PaymentHash(payment_hash)) is None
    assert await gateway.states() == ["OPEN"]


async def test_wrong_network_and_unreachable_node(gateway: Gateway) -> None:
    wrong = await gateway.pay("--network", "mainnet", gateway.url + FORTUNE)
    assert wrong.code == 5
    assert "invoice is for regtest, this client pays on mainnet" in wrong.stderr
    (port,) = free_ports(1)
    down = await gateway.pay("--lnd-host", f"127.0.0.1:{port}", gateway.url + FORTUNE)
    assert down.code == 3, down.stderr
    assert await gateway.states() == ["OPEN"]
