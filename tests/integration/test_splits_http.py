"""Revenue splits end to end in one process: routes from a configuration file (``split``,
``[[payee]]``) through ``build_pricing``, paid over HTTP (the aiohttp middleware and the
reverse proxy, over the fake node and the memory store), the payees' shares accrued in the
ledger once per payment, a credit route split per charge, and the ledger reconciled after
the payout worker paid a payee by keysend."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.client import bolt11
from gateway.config import Config
from gateway.destinations import is_pubkey
from gateway.ports import Msat, PayeeBalance, PayoutState, Store
from gateway.runtime import build_pricing, payee_terms
from gateway.service.payout import Payouts
from gateway.web import aiohttp as aiohttp_middleware
from gateway.web.proxy import build_proxy
from tests.config_files import load_text
from tests.fakes import FakeGateway, FakePayer

PUBKEY = "02" + "ab" * 32
PRICE = 10_001  # 30% of it is 3000.3: carol gets 3000, the merchant every remainder
CREDIT_PRICE = 2_000
CREDIT = 20_000
CONFIG = f"""
[payouts]
payment_macaroon = "/nonexistent/payment.macaroon"

[[routes]]
pattern = "/paid/*"
price_msat = {PRICE}
service = "paid"
split = ["carol:30%", "dave:1000msat"]

[[routes]]
pattern = "/credit/*"
price_msat = {CREDIT_PRICE}
billing = "credit"
credit_msat = {CREDIT}
service = "credit"
split = ["carol:50%"]

[[routes]]
pattern = "/plain/*"
price_msat = 5000
service = "plain"

[[payee]]
name = "carol"
destination = "{PUBKEY}"
threshold_msat = 1000000

[[payee]]
name = "dave"
destination = "dave@example.com"
"""


async def handler(request: web.Request) -> web.Response:
    if request.match_info["name"] == "fail":
        return web.json_response({}, status=503)
    return web.json_response({"ok": True})


def application() -> web.Application:
    app = web.Application()
    for prefix in ("/paid", "/credit", "/plain"):
        app.router.add_route("*", prefix + "/{name}", handler)
    return app


@contextlib.asynccontextmanager
async def serving(kind: str, gateway: FakeGateway) -> AsyncIterator[str]:
    """The application behind ``kind`` (the aiohttp middleware, or the reverse proxy in
    front of it) on a loopback port: its URL."""
    async with contextlib.AsyncExitStack() as stack:

        async def started(app: web.Application) -> str:
            server = TestServer(app)
            await server.start_server()
            stack.push_async_callback(server.close)
            return str(server.make_url("")).rstrip("/")

        if kind == "aiohttp":
            app = application()
            aiohttp_middleware.setup_l402(app, gateway)
            yield await started(app)
        else:
            upstream = await started(application())
            yield await started(build_proxy(upstream, gateway))


def configured(tmp_path: Path) -> tuple[Config, FakeGateway]:
    config = load_text(tmp_path, CONFIG)
    return config, FakeGateway(build_pricing(config).rules)


async def get(http: aiohttp.ClientSession, url: str, authorization: str = "") -> tuple[int, str]:
    headers = {"Authorization": authorization} if authorization else {}
    async with http.get(url, headers=headers) as response:
        return response.status, await response.text()


async def buy(http: aiohttp.ClientSession, gateway: FakeGateway, url: str) -> str:
    """Pay the 402 of ``url``: the ``Authorization`` value for the retry."""
    status, body = await get(http, url)
    assert status == 402, body
    return gateway.pay(json.loads(body))


async def earned(store: Store, payee: str, want: int) -> PayeeBalance:
    """The payee's balance once it earned ``want`` (the watcher records settlements)."""
    for _ in range(500):
        balance = await store.get_payee(payee)
        if balance is not None and balance.earned_msat >= want:
            return balance
        await asyncio.sleep(0.01)
    raise AssertionError(f"{payee} did not earn {want} msat: {balance}")


@pytest.mark.parametrize("kind", ["aiohttp", "proxy"])
async def test_paid_requests_accrue_each_payees_share_once(tmp_path: Path, kind: str) -> None:
    config, gateway = configured(tmp_path)
    async with serving(kind, gateway) as url, aiohttp.ClientSession() as http:
        for n in range(3):
            authorization = await buy(http, gateway, f"{url}/paid/{n}")
            for _ in range(2):  # the token serves again: no second share
                assert await get(http, f"{url}/paid/{n}", authorization) == (200, '{"ok": true}')
        # A route without a split credits nobody.
        plain = await buy(http, gateway, f"{url}/plain/x")
        assert (await get(http, f"{url}/plain/x", plain))[0] == 200
        store = gateway.store
        carol = await earned(store, "carol", 3 * 3_000)
        dave = await earned(store, "dave", 3 * 1_000)
        await asyncio.sleep(0.05)  # a late duplicate would show now
    assert (carol.earned_msat, carol.accrued_msat) == (9_000, 9_000)
    assert (dave.earned_msat, dave.accrued_msat) == (3_000, 3_000)
    totals = await store.split_totals()
    assert totals.received_msat == 3 * PRICE
    assert totals.earned_msat == 12_000
    assert totals.kept_msat == 3 * PRICE - 12_000  # every remainder: 3 x 6001
    assert totals.accrued_msat == 12_000
    assert [p.payee for p in await store.list_payees()] == ["carol", "dave"]
    assert is_pubkey(config.payee[0].destination)


async def test_a_credit_route_splits_each_charge_not_the_purchase(tmp_path: Path) -> None:
    _, gateway = configured(tmp_path)
    async with serving("aiohttp", gateway) as url, aiohttp.ClientSession() as http:
        authorization = await buy(http, gateway, f"{url}/credit/ok")
        for _ in range(3):
            assert (await get(http, f"{url}/credit/ok", authorization))[0] == 200
        # A backend failure is not charged: nothing to split.
        assert (await get(http, f"{url}/credit/fail", authorization))[0] == 503
        store = gateway.store
        carol = await earned(store, "carol", 3 * 1_000)
        # The purchase settled (the account was credited) without any share of it.
        for _ in range(500):
            if (await store.credit_totals()).received_msat == CREDIT:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
    assert carol.earned_msat == 3_000
    assert await store.get_payee("dave") is None
    totals = await store.split_totals()
    assert (totals.received_msat, totals.kept_msat, totals.earned_msat) == (6_000, 3_000, 3_000)


async def test_the_payout_worker_pays_the_accrued_share_and_the_ledger_reconciles(
    tmp_path: Path,
) -> None:
    config, gateway = configured(tmp_path)
    async with serving("aiohttp", gateway) as url, aiohttp.ClientSession() as http:
        for n in range(2):
            authorization = await buy(http, gateway, f"{url}/paid/{n}")
            assert (await get(http, f"{url}/paid/{n}", authorization))[0] == 200
        await earned(gateway.store, "carol", 6_000)
        await earned(gateway.store, "dave", 2_000)
    store = gateway.store
    node = FakePayer(fee_msat=7)

    class NoLnurl:
        async def bounds(self, destination: str) -> tuple[Msat, Msat]:
            raise AssertionError("carol is paid by keysend")

        async def invoice(self, destination: str, amount_msat: Msat) -> str:
            raise AssertionError("carol is paid by keysend")

        def forget(self, destination: str) -> None:
            raise AssertionError("carol is paid by keysend")

    payouts = Payouts(
        store=store,
        node=node,
        pay_requests=NoLnurl(),
        decode=bolt11.decode,
        payees=payee_terms(config),
        clock=gateway.clock,
    )
    try:
        (payout,) = await payouts.pay_now("carol")
    finally:
        await payouts.close()
    assert (payout.state, payout.amount_msat, payout.fee_msat) == (PayoutState.SUCCEEDED, 6_000, 7)
    assert [(dest.hex(), amount) for dest, amount, _ in node.keysends] == [(PUBKEY, 6_000)]
    carol = await store.get_payee("carol")
    assert carol is not None
    assert (carol.paid_msat, carol.accrued_msat, carol.merchant_fees_msat) == (6_000, 0, 7)
    totals = await store.split_totals()
    parts = (
        (totals.kept_msat - totals.merchant_fees_msat)
        + totals.paid_msat
        + totals.accrued_msat
        + totals.pending_msat
        + totals.payee_fees_msat
        + totals.merchant_fees_msat
    )
    assert totals.received_msat == parts == 2 * PRICE
