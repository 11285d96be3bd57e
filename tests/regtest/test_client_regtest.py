"""The paying client on real LND: bob's node pays a gateway (alice) in front of demo_api()."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx
import pytest
import pytest_asyncio

from gateway.client import Budget, BudgetExceeded, L402Client, TokenCache
from gateway.client.aiohttp import L402PayingMiddleware
from gateway.client.httpx import L402Auth
from gateway.errors import BackendUnavailable, PaymentFailed
from gateway.examples import demo_api
from gateway.lnd.client import LndClient
from gateway.ports import Msat, Payment, PaymentHash, PaymentStatus
from gateway.runtime import running_gateway
from gateway.store import SqliteStore
from gateway.web.aiohttp import setup_l402
from regtest.network import Network
from tests.regtest.gateway_helpers import (
    PREMIUM_PRICE,
    OffsetClock,
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


@pytest_asyncio.fixture
async def gateway(network: Network, tmp_path: Path) -> AsyncIterator[Gateway]:
    config = gateway_config(network, tmp_path / "gateway.db")
    app = demo_api()
    clock = OffsetClock()
    setup_l402(app, lambda: running_gateway(config, clock=clock))
    async with serving(app) as url:
        yield Gateway(url, tmp_path / "gateway.db")


class CountingPayer:
    """bob's LndClient, counting calls; ``crash_after_paying`` raises once bob has paid."""

    def __init__(self, lnd: LndClient) -> None:
        self.lnd = lnd
        self.sent: list[str] = []
        self.lookups: list[bytes] = []
        self.crash_after_paying = False

    async def send_payment(
        self, payment_request: str, *, max_fee_msat: Msat, payment_timeout: float
    ) -> Payment:
        self.sent.append(payment_request)
        payment = await self.lnd.send_payment(
            payment_request, max_fee_msat=max_fee_msat, payment_timeout=payment_timeout
        )
        if self.crash_after_paying:
            raise BackendUnavailable("simulated crash between paying and storing the token")
        return payment

    async def lookup_payment(self, payment_hash: PaymentHash) -> Payment | None:
        self.lookups.append(payment_hash)
        return await self.lnd.lookup_payment(payment_hash)


def client(
    payer: CountingPayer, cache: TokenCache | None = None, price: int = 50_000
) -> L402Client:
    return L402Client(
        payer,
        network="regtest",
        budget=Budget(max_price_msat=price, max_fee_msat=10_000),
        cache=cache or TokenCache(),
    )


async def _settled(gateway: Gateway, payment_hash: str) -> None:
    record = await wait_for_invoice(gateway.database, bytes.fromhex(payment_hash), "SETTLED")
    assert record.amount_paid_msat == PREMIUM_PRICE


async def _states(gateway: Gateway) -> list[str]:
    store = await SqliteStore.open(gateway.database)
    try:
        return sorted(record.state.value for record in await store.list_invoices())
    finally:
        await store.close()


async def test_aiohttp_client_pays_through_bob_and_reuses_the_token(
    gateway: Gateway, bob: LndClient, network: Network
) -> None:
    payer = CountingPayer(bob)
    paying = client(payer)
    async with aiohttp.ClientSession(middlewares=[L402PayingMiddleware(paying)]) as session:
        for _ in range(3):
            async with session.get(gateway.url + FORTUNE) as response:
                assert response.status == 200
                body = await response.json()
                assert body["paid"]["service"] == "premium"
    assert len(payer.sent) == 1
    (entry,) = paying.spending_log
    assert entry.amount_msat == PREMIUM_PRICE
    assert entry.destination == network.alice.pubkey
    assert entry.description == f"premium: GET {FORTUNE}"
    assert entry.url == gateway.url + FORTUNE
    assert paying.spent_msat == PREMIUM_PRICE + entry.fee_msat
    await _settled(gateway, entry.payment_hash)
    payment = await bob.lookup_payment(PaymentHash(bytes.fromhex(entry.payment_hash)))
    assert payment is not None
    assert payment.status is PaymentStatus.SUCCEEDED
    assert payment.preimage is not None


async def test_httpx_client_pays_through_bob_and_reuses_the_token(
    gateway: Gateway, bob: LndClient
) -> None:
    payer = CountingPayer(bob)
    paying = client(payer)
    async with httpx.AsyncClient(auth=L402Auth(paying), timeout=60) as http:
        first = await http.get(gateway.url + FORTUNE)
        assert first.status_code == 200
        assert [r.status_code for r in first.history] == [402]
        second = await http.get(gateway.url + FORTUNE)
        assert second.status_code == 200
        assert second.history == []
        assert second.json()["paid"]["amount_msat"] == PREMIUM_PRICE
    assert len(payer.sent) == 1
    (entry,) = paying.spending_log
    await _settled(gateway, entry.payment_hash)


async def test_over_budget_pays_nothing(gateway: Gateway, bob: LndClient) -> None:
    payer = CountingPayer(bob)
    cheap = client(payer, price=PREMIUM_PRICE - 1)
    async with aiohttp.ClientSession(middlewares=[L402PayingMiddleware(cheap)]) as session:
        with pytest.raises(BudgetExceeded, match="over the limit") as aio_caught:
            await session.get(gateway.url + FORTUNE)
    async with httpx.AsyncClient(auth=L402Auth(cheap), timeout=60) as http:
        with pytest.raises(BudgetExceeded) as httpx_caught:
            await http.get(gateway.url + FORTUNE)
    assert payer.sent == []
    assert cheap.spending_log == ()
    for caught in (aio_caught, httpx_caught):
        offer = caught.value.offer
        assert offer is not None
        await wait_for_invoice(gateway.database, offer.payment_hash, "OPEN")
        assert await bob.lookup_payment(PaymentHash(offer.payment_hash)) is None
    assert await _states(gateway) == ["OPEN", "OPEN"]


async def test_crash_between_payment_and_token_storage_does_not_pay_twice(
    gateway: Gateway, bob: LndClient, tmp_path: Path
) -> None:
    path = tmp_path / "tokens.json"
    payer = CountingPayer(bob)
    payer.crash_after_paying = True
    crashing = client(payer, TokenCache(path))
    async with aiohttp.ClientSession(middlewares=[L402PayingMiddleware(crashing)]) as session:
        with pytest.raises(BackendUnavailable, match="simulated crash"):
            await session.get(gateway.url + FORTUNE)
    assert len(payer.sent) == 1
    # What the crashed process left: a pending entry, no token.
    (pending,) = await TokenCache(path).pending()
    assert await TokenCache(path).tokens() == []
    paid = await bob.lookup_payment(PaymentHash(pending.payment_hash))
    assert paid is not None
    assert paid.status is PaymentStatus.SUCCEEDED

    # The next process opens the same file; the gateway answers with a fresh 402.
    after = CountingPayer(bob)
    restarted = client(after, TokenCache(path))
    async with httpx.AsyncClient(auth=L402Auth(restarted), timeout=60) as http:
        response = await http.get(gateway.url + FORTUNE)
        assert response.status_code == 200
    assert after.sent == []  # never paid again
    assert after.lookups == [pending.payment_hash]
    (entry,) = restarted.spending_log
    assert entry.recovered
    assert entry.payment_hash == pending.payment_hash.hex()
    assert await TokenCache(path).pending() == []
    # Two invoices were issued: the paid one, and the fresh one nobody paid.
    assert await _states(gateway) == ["OPEN", "SETTLED"]


async def test_lookup_payment_on_lnd(bob: LndClient, alice: LndClient) -> None:
    assert await bob.lookup_payment(PaymentHash(b"\x42" * 32)) is None
    invoice = await alice.add_invoice(Msat(1_000), "lookup", expiry=600)
    sent = await bob.send_payment(
        invoice.payment_request, max_fee_msat=Msat(10_000), payment_timeout=30
    )
    found = await bob.lookup_payment(invoice.payment_hash)
    assert found is not None
    assert found.status is PaymentStatus.SUCCEEDED
    assert found.preimage == sent.preimage
    assert (found.amount_msat, found.fee_msat) == (1_000, sent.fee_msat)
    # The payee's node never sent it.
    assert await alice.lookup_payment(invoice.payment_hash) is None


async def test_lookup_payment_reports_a_failed_payment(bob: LndClient, alice: LndClient) -> None:
    invoice = await alice.add_invoice(Msat(1_000), "to be canceled", expiry=600)
    await alice.cancel_invoice(invoice.payment_hash)
    with pytest.raises(PaymentFailed, match="INCORRECT_PAYMENT_DETAILS"):
        await bob.send_payment(
            invoice.payment_request, max_fee_msat=Msat(10_000), payment_timeout=30
        )
    found = await bob.lookup_payment(invoice.payment_hash)
    assert found is not None
    assert found.status is PaymentStatus.FAILED
    assert found.preimage is None
