"""The credit commands end to end: ``l402-gateway serve`` on alice's node, the client
commands paying and withdrawing with bob's.

``pay`` buys credit on a credit route and shows the balance the gateway reports; ``credit
balance`` shows it (text and ``--json``); the operator's ``accounts`` lists the account with
totals that reconcile; ``credit withdraw`` pays the balance out to an invoice on bob's node
(an amount, then all that is left) and refuses with exit 1 when nothing is left; ``pay`` tops
up a run-out balance on the same token, so the token cache keeps one token.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web

from gateway.cli.credit import withdrawable
from gateway.lnd.client import LndClient
from gateway.ports import InvoiceState, PaymentHash
from regtest.network import Network
from regtest.processes import free_ports, wait_for_http
from tests.regtest.gateway_helpers import (
    Ran,
    bake_gateway_macaroon,
    bob_runs,
    give_alice_liquidity,
    serving,
    start_serve,
)

pytestmark = pytest.mark.regtest

PRICE = 1_000  # msat per request on /api/credit/*
CREDIT = 20_000  # msat the route's invoice buys unless the client asks otherwise
FEE_MIN = 1_000  # the gateway's default withdrawal fee reserve: at least this
FEE_PPM = 5_000  # ... and this much of the amount
TOP_UP = 3 * PRICE  # the credit asked for with L402-Credit-Msat


@dataclass(frozen=True)
class Gateway:
    """A running ``serve`` and the commands a payer (bob) and its operator run against it."""

    url: str  # a URL on the credit route
    config_file: Path
    network: Network
    tmp: Path

    async def run(self, *args: str) -> Ran:
        """``l402-gateway ARGS`` with bob's node as the payer and a token cache of the test's."""
        return await bob_runs(self.network, *args, cache=self.tmp / "cache")

    async def ok(self, *args: str) -> Ran:
        """``run``, which must exit 0."""
        result = await self.run(*args)
        assert result.code == 0, (args, result)
        return result

    async def totals(self) -> dict[str, Any]:
        """``accounts``' totals: the text's reconciled line checked, the JSON's returned."""
        text = await self.ok("--config", str(self.config_file), "accounts")
        listed = await self.ok("--config", str(self.config_file), "accounts", "--json")
        totals: dict[str, Any] = listed.json()["totals"]
        parts = " + ".join(
            str(totals[key])
            for key in (
                "consumed_msat",
                "withdrawn_msat",
                "pending_withdrawals_msat",
                "reserved_msat",
                "outstanding_msat",
            )
        )
        assert (
            f"reconciled: received {totals['received_msat']} = consumed + withdrawn + pending "
            f"+ reserved + outstanding = {parts}"
        ) in text.stdout, text.stdout
        assert totals["reconciles"] is True
        assert totals["accounts"] == len(listed.json()["accounts"]) == 1
        return totals

    def cached_tokens(self) -> list[Any]:
        cache = self.tmp / "cache" / "l402-gateway" / "tokens.json"
        tokens: list[Any] = json.loads(cache.read_text())["tokens"]
        return tokens


@pytest_asyncio.fixture(scope="module", autouse=True)
async def alice_can_pay(network: Network) -> None:
    """Withdrawals are paid from alice's node, which only ever receives otherwise."""
    await give_alice_liquidity(network)


def _upstream() -> web.Application:
    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"path": request.path})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


def _config(network: Network, tmp_path: Path, port: int, upstream: str) -> Path:
    node = network.alice
    text = f"""
[server]
listen = "127.0.0.1:{port}"
upstream = "{upstream}"
[lnd]
host = "{node.rpc_host}"
tls_cert = "{node.tls_cert}"
macaroon = "{bake_gateway_macaroon(network, tmp_path / "gateway.macaroon")}"
[store]
url = "sqlite://{tmp_path / "gateway.db"}"
[credit]
withdrawals = true
payment_macaroon = "{node.macaroon("admin")}"
withdrawal_fee_min_msat = {FEE_MIN}
withdrawal_fee_ppm = {FEE_PPM}
[[routes]]
pattern = "/health"
free = true
[[routes]]
pattern = "/api/credit/*"
service = "credit"
price_msat = {PRICE}
billing = "credit"
credit_msat = {CREDIT}
credit_min_msat = {PRICE}
lifetime = 86400
"""
    config_file = tmp_path / "gateway.toml"
    config_file.write_text(text)
    return config_file


def _stop(process: subprocess.Popen[bytes], log: Path) -> None:
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0, log.read_text()


@pytest_asyncio.fixture
async def gateway(network: Network, tmp_path: Path) -> AsyncIterator[Gateway]:
    (port,) = free_ports(1)
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    async with serving(_upstream()) as upstream:
        config_file = _config(network, tmp_path, port, upstream)
        process = start_serve(config_file, log)
        try:
            await wait_for_http(base + "/health", process, log)
            yield Gateway(base + "/api/credit/data", config_file, network, tmp_path)
        finally:
            _stop(process, log)


async def _balance(gateway: Gateway) -> dict[str, Any]:
    info: dict[str, Any] = (await gateway.ok("credit", "balance", "--json", gateway.url)).json()
    assert info["url"] == gateway.url
    return info


async def test_pay_buys_credit_and_balance_and_accounts_show_it(gateway: Gateway) -> None:
    bought = await gateway.ok("pay", "--json", gateway.url)
    summary = bought.json()
    assert (summary["status"], summary["balance_msat"]) == (200, CREDIT - PRICE)
    assert json.loads(summary["body"]) == {"path": "/api/credit/data"}
    (payment,) = summary["payments"]
    assert payment["amount_msat"] == CREDIT
    assert "balance: 19 sat (19000 msat) of credit left" in bought.stderr

    reused = await gateway.ok("pay", gateway.url)  # the cached token, no payment
    assert json.loads(reused.stdout) == {"path": "/api/credit/data"}
    assert "balance: 18 sat (18000 msat) of credit left" in reused.stderr
    assert "paying" not in reused.stderr

    text = (await gateway.ok("credit", "balance", gateway.url)).stdout
    assert text.startswith(f"credit of the token for {gateway.url}\n")
    for line in (
        "  service:      credit",
        "  balance:      18 sat (18000 msat)",
        "  credited:     20 sat (20000 msat)",
        "  spent:        2 sat (2000 msat)",
        "  reserved:     0 sat (0 msat)  (requests under way)",
        "  withdrawn:    0 sat (0 msat)",
        "  recent usage:",
    ):
        assert line in text.splitlines(), (line, text)
    assert text.count("GET /api/credit/data") == 2

    info = await _balance(gateway)
    assert (info["balance_msat"], info["credited_msat"], info["spent_msat"]) == (
        CREDIT - 2 * PRICE,
        CREDIT,
        2 * PRICE,
    )
    assert (info["reserved_msat"], info["withdrawn_msat"]) == (0, 0)
    assert [charge["path"] for charge in info["recent"]] == ["/api/credit/data"] * 2

    totals = await gateway.totals()
    assert (totals["received_msat"], totals["consumed_msat"], totals["outstanding_msat"]) == (
        CREDIT,
        2 * PRICE,
        CREDIT - 2 * PRICE,
    )
    assert (
        totals["withdrawn_msat"],
        totals["pending_withdrawals_msat"],
        totals["reserved_msat"],
    ) == (0, 0, 0)


_SUCCEEDED = re.compile(
    r"withdrawal SUCCEEDED: \S+ sat \((\d+) msat\) paid to your node, routing fee "
    r"\S+ sat \((\d+) msat\); balance left \S+ sat \((\d+) msat\)"
)


async def test_credit_withdraw_pays_bob_until_nothing_is_left(
    gateway: Gateway, bob: LndClient
) -> None:
    await gateway.ok("pay", gateway.url)
    balance = CREDIT - PRICE

    asked = 5 * PRICE
    first = await gateway.ok("credit", "withdraw", "--amount-msat", str(asked), gateway.url)
    matched = _SUCCEEDED.search(first.stdout)
    assert matched is not None, first
    amount, fee, left = map(int, matched.groups())
    # alice pays bob over their own channel: no routing fee.
    assert (amount, fee, left) == (asked, 0, balance - asked)
    balance = left

    second = await gateway.ok("credit", "withdraw", "--json", gateway.url)
    outcome = second.json()
    everything = withdrawable(balance, FEE_MIN, FEE_PPM)
    assert outcome == {
        "url": gateway.url,
        "state": "SUCCEEDED",
        "payment_hash": outcome["payment_hash"],
        "amount_msat": everything,
        "fee_msat": 0,
        "balance_msat": balance - everything,
    }
    invoice = await bob.lookup_invoice(PaymentHash(bytes.fromhex(outcome["payment_hash"])))
    assert (invoice.state, invoice.amount_paid_msat) == (InvoiceState.SETTLED, everything)
    balance -= everything
    assert balance == PRICE  # what the fee reserve kept back: one more request

    third = await gateway.run("credit", "withdraw", gateway.url)
    assert third.code == 1, third
    assert third.stdout == ""
    assert (
        f"nothing to withdraw: the balance ({balance} msat) does not cover the gateway's fee "
        f"reserve (at least {FEE_MIN} msat)"
    ) in third.stderr

    info = await _balance(gateway)
    withdrawn = asked + everything
    assert (info["balance_msat"], info["withdrawn_msat"], info["spent_msat"]) == (
        balance,
        withdrawn,
        PRICE,
    )
    totals = await gateway.totals()
    assert (totals["received_msat"], totals["consumed_msat"], totals["withdrawn_msat"]) == (
        CREDIT,
        PRICE,
        withdrawn,
    )
    assert (totals["pending_withdrawals_msat"], totals["outstanding_msat"]) == (0, balance)


async def test_pay_tops_up_a_run_out_balance_on_the_one_cached_token(gateway: Gateway) -> None:
    ask = ("-H", f"L402-Credit-Msat: {TOP_UP}")
    bought = (await gateway.ok("pay", "--json", *ask, gateway.url)).json()
    assert bought["balance_msat"] == TOP_UP - PRICE
    assert [payment["amount_msat"] for payment in bought["payments"]] == [TOP_UP]
    for left in (TOP_UP - 2 * PRICE, 0):  # spends the balance to the last request
        spent = (await gateway.ok("pay", "--json", *ask, gateway.url)).json()
        assert (spent["balance_msat"], spent["payments"]) == (left, [])

    topped = (await gateway.ok("pay", "--json", *ask, gateway.url)).json()
    assert (topped["status"], topped["balance_msat"]) == (200, TOP_UP - PRICE)
    assert [payment["amount_msat"] for payment in topped["payments"]] == [TOP_UP]
    assert topped["payments"][0]["payment_hash"] != bought["payments"][0]["payment_hash"]
    after = (await gateway.ok("pay", "--json", gateway.url)).json()
    assert (after["balance_msat"], after["payments"]) == (TOP_UP - 2 * PRICE, [])

    assert len(gateway.cached_tokens()) == 1
    info = await _balance(gateway)
    assert (info["credited_msat"], info["spent_msat"], info["balance_msat"]) == (
        2 * TOP_UP,
        5 * PRICE,
        TOP_UP - 2 * PRICE,
    )
    totals = await gateway.totals()
    assert (totals["received_msat"], totals["consumed_msat"], totals["outstanding_msat"]) == (
        2 * TOP_UP,
        5 * PRICE,
        TOP_UP - 2 * PRICE,
    )
