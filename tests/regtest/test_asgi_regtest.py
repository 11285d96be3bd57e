"""The ASGI middleware against the real LND nodes: a Starlette app behind ``L402Middleware``
over ``running_gateway`` (alice's invoice macaroon, a SQLite store), served by uvicorn; bob
pays the challenge through carol."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway import l402
from gateway.cli import running_gateway
from gateway.config import Config, LndConfig, RouteConfig, StoreConfig
from gateway.lnd.client import LndClient
from gateway.ports import InvoiceState, Msat, PaymentHash, PaymentStatus
from gateway.service import PaidToken
from gateway.store import SqliteStore
from gateway.web.asgi import ASGIApp, L402Middleware
from regtest.network import Network

pytestmark = pytest.mark.regtest

PRICE = 21_000
MAX_FEE = Msat(10_000)
PROBLEM_JSON = "application/problem+json"


@contextlib.asynccontextmanager
async def serving(app: ASGIApp) -> AsyncIterator[str]:
    """Run uvicorn (lifespan on) on a free loopback port; yields the base URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = uvicorn.Server(
            uvicorn.Config(
                app, lifespan="on", http="h11", log_config=None, timeout_graceful_shutdown=5
            )
        )
        task = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            async with asyncio.timeout(30):
                while not server.started:
                    if task.done():
                        task.result()
                        raise AssertionError("uvicorn stopped during startup")
                    await asyncio.sleep(0.02)
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            async with asyncio.timeout(30):
                await task


async def test_pay_402_over_two_hops_then_access_and_settlement_is_stored(
    network: Network, tmp_path: Path
) -> None:
    database = tmp_path / "gateway.db"
    config = Config(
        lnd=LndConfig(
            host=network.alice.rpc_host,
            tls_cert=network.alice.tls_cert,
            macaroon=network.alice.macaroon("invoice"),
        ),
        store=StoreConfig(url=f"sqlite://{database}"),  # absolute path: sqlite:///tmp/...
        routes=(RouteConfig(pattern="/weather/*", price_msat=PRICE, service="weather"),),
    )
    seen: list[PaidToken | None] = []

    async def weather(request: Request) -> JSONResponse:
        token: PaidToken | None = request.state.l402_token
        seen.append(token)
        return JSONResponse({"city": request.path_params["city"], "sunny": True})

    app = Starlette(routes=[Route("/weather/{city}", weather)])
    middleware = L402Middleware(app, lambda: running_gateway(config))

    async with serving(middleware) as base_url, aiohttp.ClientSession() as http:
        async with http.get(f"{base_url}/weather/lisbon") as response:
            assert response.status == 402
            challenges = response.headers.getall("WWW-Authenticate")
            problem = await response.json(content_type=PROBLEM_JSON)
        assert [value.split(" ", 1)[0] for value in challenges] == ["L402", "LSAT"]
        challenge = l402.parse_challenge(challenges[0])
        assert challenge.invoice == problem["invoice"]
        assert challenge.invoice.startswith("lnbcrt")
        assert problem["amount_msat"] == PRICE
        payment_hash = PaymentHash(bytes.fromhex(problem["payment_hash"]))
        assert seen == []

        async with LndClient(network.bob.settings()) as bob:
            decoded = await bob.decode_payment_request(challenge.invoice)
            assert decoded.destination == network.alice.pubkey
            assert decoded.amount_msat == PRICE
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
            f"{base_url}/weather/lisbon", headers={"Authorization": authorization}
        ) as response:
            assert response.status == 200
            assert await response.json() == {"city": "lisbon", "sunny": True}
        (token,) = seen
        assert token is not None
        assert token.payment_hash == payment_hash.hex()
        assert token.service == "weather"
        assert token.amount_msat == PRICE

        # The settlement watcher records the payment; read it through a second store.
        reader = await SqliteStore.open(database)
        try:
            async with asyncio.timeout(10):
                while True:
                    record = await reader.get_invoice(payment_hash)
                    assert record is not None
                    if record.state is InvoiceState.SETTLED:
                        break
                    await asyncio.sleep(0.1)
        finally:
            await reader.close()
        assert record.amount_paid_msat == PRICE
        assert record.settle_index > 0
        assert record.path == "/weather/lisbon"
        assert middleware.service is not None
    assert middleware.service is None  # closed with the server's lifespan
