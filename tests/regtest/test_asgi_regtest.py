"""The ASGI middleware against the real LND nodes: a Starlette app behind ``L402Middleware``
over ``running_gateway`` (alice, a SQLite store), opened by the app's ``l402_lifespan`` or by
the middleware itself, served by uvicorn; bob pays the challenge through carol."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway import l402
from gateway.lnd.client import LndClient
from gateway.ports import PaymentHash, PaymentStatus
from gateway.runtime import running_gateway
from gateway.service import L402Service, PaidToken
from gateway.web.asgi import L402Middleware, l402_lifespan
from regtest.network import Network
from tests.integration.asgi_helpers import PROBLEM_JSON, uvicorn_serving
from tests.regtest.gateway_helpers import (
    MAX_FEE,
    PREMIUM_PRICE,
    gateway_config,
    wait_for_invoice,
)

pytestmark = pytest.mark.regtest

PATH = "/api/premium/lisbon"


@pytest.mark.parametrize("opened_by", ["l402_lifespan", "middleware"])
async def test_pay_402_over_two_hops_then_access_and_settlement_is_stored(
    network: Network, tmp_path: Path, opened_by: str
) -> None:
    database = tmp_path / "gateway.db"
    config = gateway_config(network, database)
    events: list[str] = []

    @contextlib.asynccontextmanager
    async def gateway() -> AsyncIterator[L402Service]:
        async with running_gateway(config) as service:
            events.append("open")
            yield service
        events.append("closed")

    seen: list[PaidToken | None] = []

    async def premium(request: Request) -> JSONResponse:
        token: PaidToken | None = request.state.l402_token
        seen.append(token)
        return JSONResponse({"city": request.path_params["city"], "sunny": True})

    routes = [Route("/api/premium/{city}", premium)]
    if opened_by == "middleware":
        app = L402Middleware(Starlette(routes=routes), gateway)
    else:
        app = L402Middleware(Starlette(routes=routes, lifespan=l402_lifespan(gateway)))

    async with uvicorn_serving(app) as base_url, aiohttp.ClientSession() as http:
        async with http.get(f"{base_url}{PATH}") as response:
            assert response.status == 402
            challenges = response.headers.getall("WWW-Authenticate")
            problem = await response.json(content_type=PROBLEM_JSON)
        assert [value.split(" ", 1)[0] for value in challenges] == ["L402", "LSAT"]
        challenge = l402.parse_challenge(challenges[0])
        assert challenge.invoice == problem["invoice"]
        assert challenge.invoice.startswith("lnbcrt")
        assert problem["amount_msat"] == PREMIUM_PRICE
        payment_hash = PaymentHash(bytes.fromhex(problem["payment_hash"]))
        assert seen == []

        async with LndClient(network.bob.settings()) as bob:
            decoded = await bob.decode_payment_request(challenge.invoice)
            assert decoded.destination == network.alice.pubkey
            assert decoded.amount_msat == PREMIUM_PRICE
            assert decoded.payment_hash == payment_hash
            payment = await bob.send_payment(
                challenge.invoice,
                max_fee_msat=MAX_FEE,
                payment_timeout=30,
                last_hop_pubkey=network.carol.pubkey,
            )
        assert payment.status is PaymentStatus.SUCCEEDED
        assert payment.route == (network.carol.pubkey, network.alice.pubkey)
        assert payment.preimage is not None
        assert hashlib.sha256(payment.preimage).digest() == payment_hash

        authorization = f"L402 {challenge.macaroon_b64}:{payment.preimage.hex()}"
        async with http.get(
            f"{base_url}{PATH}", headers={"Authorization": authorization}
        ) as response:
            assert response.status == 200
            assert await response.json() == {"city": "lisbon", "sunny": True}
        (token,) = seen
        assert token is not None
        assert token.payment_hash == payment_hash.hex()
        assert token.service == "premium"
        assert token.amount_msat == PREMIUM_PRICE

        # The settlement watcher records the payment; read it through a second store.
        record = await wait_for_invoice(database, payment_hash, "SETTLED")
        assert record.amount_paid_msat == PREMIUM_PRICE
        assert record.settle_index > 0
        assert record.path == PATH
        assert events == ["open"]
    assert events == ["open", "closed"]  # closed with the server's lifespan
