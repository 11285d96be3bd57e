"""The aiohttp client middleware against the real gateway middleware on a loopback server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.client import Budget, BudgetExceeded, TokenCache
from gateway.client.aiohttp import L402PayingMiddleware, l402_session
from gateway.ports import InvoiceState, PaymentHash
from tests.demo_rules import ECHO, HEALTH, PREMIUM, QUOTE
from tests.unit.client.client_helpers import ServedGateway, served_gateway

RULES = (HEALTH, PREMIUM, QUOTE, ECHO)


@pytest_asyncio.fixture
async def setup() -> AsyncIterator[ServedGateway]:
    async with served_gateway(RULES) as served:
        yield served


async def test_pays_once_then_reuses_the_token(setup: ServedGateway) -> None:
    client = setup.client()
    async with l402_session(client) as session:
        async with session.get(setup.url + "/api/premium/fortune") as response:
            assert response.status == 200
            body = await response.json()
        assert body["paid"]["service"] == "premium"
        async with session.get(setup.url + "/api/premium/fortune") as response:
            assert response.status == 200
        async with session.get(setup.url + "/health") as response:
            assert response.status == 200
    assert len(setup.payer.calls) == 1
    (entry,) = client.spending_log
    assert entry.amount_msat == 10_000
    assert entry.url == setup.url + "/api/premium/fortune"
    record = await setup.gateway.store.get_invoice(PaymentHash(bytes.fromhex(entry.payment_hash)))
    assert record is not None
    assert record.state is InvoiceState.SETTLED


async def test_a_token_of_another_service_costs_a_round_trip_not_a_payment(
    setup: ServedGateway,
) -> None:
    client = setup.client()
    async with aiohttp.ClientSession(middlewares=[L402PayingMiddleware(client)]) as session:
        async with session.post(setup.url + "/api/echo", data=b"x" * 100) as response:
            assert response.status == 200
            assert (await response.json())["bytes"] == 100  # the body was sent again
        # The echo token's scope (/api/) covers /api/quote, whose service differs: refused,
        # then paid once for quotes; the echo token stays good for /api/echo.
        async with session.get(setup.url + "/api/quote") as response:
            assert response.status == 200
        async with session.get(setup.url + "/api/quote") as response:
            assert response.status == 200
        async with session.post(setup.url + "/api/echo", data=b"y") as response:
            assert response.status == 200
    assert [e.amount_msat for e in client.spending_log] == [1_000, 2_000]


async def test_over_budget_raises_and_leaves_the_invoice_open(setup: ServedGateway) -> None:
    client = setup.client(Budget(max_price_msat=9_000))
    async with l402_session(client) as session:
        with pytest.raises(BudgetExceeded) as caught:
            await session.get(setup.url + "/api/premium/fortune")
    assert setup.payer.calls == []
    assert client.spending_log == ()
    offer = caught.value.offer
    assert offer is not None
    record = await setup.gateway.store.get_invoice(PaymentHash(offer.payment_hash))
    assert record is not None
    assert record.state is InvoiceState.OPEN


async def test_persistent_cache_is_shared_by_a_new_client(
    setup: ServedGateway, tmp_path: Path
) -> None:
    path = tmp_path / "tokens.json"
    first = setup.client(cache=TokenCache(path))
    async with (
        l402_session(first) as session,
        session.get(setup.url + "/api/premium/fortune") as response,
    ):
        assert response.status == 200
    later = setup.client(cache=TokenCache(path))
    async with (
        l402_session(later) as session,
        session.get(setup.url + "/api/premium/other") as response,
    ):
        assert response.status == 404  # past the gateway with the cached token
    assert len(setup.payer.calls) == 1
    assert later.spending_log == ()


async def test_a_callers_own_authorization_is_left_alone(setup: ServedGateway) -> None:
    client = setup.client()
    async with (
        l402_session(client) as session,
        session.get(
            setup.url + "/api/premium/fortune", headers={"Authorization": "Bearer mine"}
        ) as response,
    ):
        assert response.status == 402
    assert setup.payer.calls == []


async def test_expired_token_is_paid_again(setup: ServedGateway) -> None:
    client = setup.client()
    async with l402_session(client) as session:
        async with session.get(setup.url + "/api/premium/fortune") as response:
            assert response.status == 200
        setup.gateway.clock.advance(3601)  # past the token's valid_until
        async with session.get(setup.url + "/api/premium/fortune") as response:
            assert response.status == 200
    assert len(setup.payer.calls) == 2


async def test_free_server_is_untouched(setup: ServedGateway) -> None:
    async with l402_session(setup.client()) as session:
        async with session.get(setup.url + "/health") as response:
            assert response.status == 200
        async with session.get(setup.url + "/nothing") as response:
            assert response.status == 404
    assert setup.payer.calls == []


def _app_with_plain_402() -> web.Application:
    async def handler(_request: web.Request) -> web.Response:
        return web.Response(status=402, headers={"WWW-Authenticate": 'Payment realm="x"'})

    app = web.Application()
    app.router.add_get("/", handler)
    return app


async def test_402_without_l402_is_returned_as_is(setup: ServedGateway) -> None:
    server = TestServer(_app_with_plain_402())
    await server.start_server()
    try:
        async with (
            l402_session(setup.client()) as session,
            session.get(server.make_url("/")) as response,
        ):
            assert response.status == 402
    finally:
        await server.close()
