"""The httpx.Auth integration against the real gateway middleware on a loopback server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio

from gateway.client import Budget, BudgetExceeded, L402Client
from gateway.client.httpx import L402Auth
from gateway.ports import InvoiceState, PaymentHash
from tests.demo_rules import ECHO, HEALTH, PREMIUM
from tests.unit.client.client_helpers import FakePayer, ServedGateway, served_gateway

RULES = (HEALTH, PREMIUM, ECHO)


@pytest_asyncio.fixture
async def setup() -> AsyncIterator[ServedGateway]:
    async with served_gateway(RULES) as served:
        yield served


async def test_pays_once_then_reuses_the_token(setup: ServedGateway) -> None:
    client = setup.client()
    async with httpx.AsyncClient(auth=L402Auth(client)) as http:
        response = await http.get(setup.url + "/api/premium/fortune")
        assert response.status_code == 200
        assert response.json()["paid"]["service"] == "premium"
        assert [r.status_code for r in response.history] == [402]
        again = await http.get(setup.url + "/api/premium/fortune")
        assert again.status_code == 200
        assert again.history == []
    assert len(setup.payer.calls) == 1
    assert len(client.spending_log) == 1


async def test_post_body_is_sent_again_after_paying(setup: ServedGateway) -> None:
    client = setup.client()
    async with httpx.AsyncClient(auth=L402Auth(client)) as http:
        response = await http.post(setup.url + "/api/echo", content=b"z" * 321)
        assert response.status_code == 200
        assert response.json()["bytes"] == 321


async def test_over_budget_raises_and_leaves_the_invoice_open(setup: ServedGateway) -> None:
    client = setup.client(Budget(max_price_msat=1_000))
    async with httpx.AsyncClient(auth=L402Auth(client)) as http:
        with pytest.raises(BudgetExceeded) as caught:
            await http.get(setup.url + "/api/premium/fortune")
    assert setup.payer.calls == []
    offer = caught.value.offer
    assert offer is not None
    record = await setup.gateway.store.get_invoice(PaymentHash(offer.payment_hash))
    assert record is not None
    assert record.state is InvoiceState.OPEN


async def test_a_callers_own_authorization_is_left_alone(setup: ServedGateway) -> None:
    async with httpx.AsyncClient(auth=L402Auth(setup.client())) as http:
        response = await http.get(
            setup.url + "/api/premium/fortune", headers={"Authorization": "Bearer mine"}
        )
    assert response.status_code == 402
    assert setup.payer.calls == []


def test_the_sync_client_is_refused_clearly() -> None:
    auth = L402Auth(L402Client(FakePayer(), network="regtest", budget=Budget(max_price_msat=1)))
    transport = httpx.MockTransport(lambda request: httpx.Response(200))
    with (
        httpx.Client(auth=auth, transport=transport) as http,
        pytest.raises(TypeError, match=r"use it with httpx\.AsyncClient"),
    ):
        http.get("http://api.test/")
