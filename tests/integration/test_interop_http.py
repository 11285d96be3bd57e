"""Interop facts over HTTP, in-process over the fakes: what other clients send and read.

The same facts against real LND and the real third-party clients are in
tests/regtest/test_interop_clients.py.
"""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator

import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pymacaroons import MACAROON_V2  # type: ignore[import-untyped]
from pymacaroons import Macaroon as PyMacaroon

from gateway import l402
from gateway.examples import demo_api
from gateway.web.aiohttp import setup_l402
from tests.demo_rules import PREMIUM
from tests.fakes import FakeGateway

FORTUNE = "/api/premium/fortune"
PROBLEM_JSON = "application/problem+json"
LOCATION = "api.example"
RULES = (PREMIUM,)
Client = TestClient[web.Request, web.Application]
# Aperture v0.5's Go client (lnget's too) reads the first WWW-Authenticate value only and
# needs exactly this right after the scheme.
APERTURE_CHALLENGE = re.compile(r'(LSAT|L402) macaroon="(.*?)", invoice="(.*?)"')


@pytest_asyncio.fixture
async def gateway() -> FakeGateway:
    return FakeGateway(RULES, location=LOCATION)


@pytest_asyncio.fixture
async def client(gateway: FakeGateway) -> AsyncIterator[Client]:
    app = demo_api()
    setup_l402(app, gateway)
    async with TestClient(TestServer(app)) as client:
        yield client


async def _bought(client: Client, gateway: FakeGateway) -> tuple[str, bytes]:
    """Buy a token: (its base64 macaroon, the preimage)."""
    response = await client.get(FORTUNE)
    assert response.status == 402
    first = response.headers.getall("WWW-Authenticate")[0]
    match = APERTURE_CHALLENGE.match(first)
    assert match is not None, first
    assert match.group(1) == "L402"
    problem = await response.json(content_type=PROBLEM_JSON)
    assert (match.group(2), match.group(3)) == (problem["macaroon"], problem["invoice"])
    preimage = gateway.backend.pay(bytes.fromhex(problem["payment_hash"]))
    return problem["macaroon"], preimage


def _with_preimage_caveat(macaroon_b64: str, caveat: str) -> str:
    """What Aperture's client sends back: the caveat appended by another implementation,
    signed on along the HMAC chain (no root key needed)."""
    theirs = PyMacaroon.deserialize(macaroon_b64)
    theirs.add_first_party_caveat(caveat)
    text = theirs.serialize()  # URL-safe base64, unpadded
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    assert raw[0] == MACAROON_V2  # binary V2, as the gateway issued it
    return base64.b64encode(raw).decode()


async def test_a_macaroon_with_the_preimage_caveat_gets_200(
    client: Client, gateway: FakeGateway
) -> None:
    macaroon, preimage = await _bought(client, gateway)
    paid = _with_preimage_caveat(macaroon, f"preimage={preimage.hex()}")
    assert l402.decode_b64(paid).caveats[-1] == f"preimage={preimage.hex()}".encode()
    response = await client.get(FORTUNE, headers={"Authorization": f"L402 {paid}:{preimage.hex()}"})
    assert response.status == 200, await response.text()
    # Aperture's client sends the preimage in lower case; upper case is the same preimage.
    upper = _with_preimage_caveat(macaroon, f"preimage={preimage.hex().upper()}")
    response = await client.get(
        FORTUNE, headers={"Authorization": f"L402 {upper}:{preimage.hex()}"}
    )
    assert response.status == 200


async def test_a_preimage_caveat_that_differs_is_401_with_a_challenge(
    client: Client, gateway: FakeGateway
) -> None:
    macaroon, preimage = await _bought(client, gateway)
    invoices = len(gateway.backend.invoices)
    for caveat, reason in [
        (f"preimage={bytes(32).hex()}", "preimage caveat does not match"),
        (f"preimage={preimage.hex()[:40]}", "malformed preimage caveat"),
        ("ip_address=127.0.0.1", "unknown caveat"),
    ]:
        forged = _with_preimage_caveat(macaroon, caveat)
        response = await client.get(
            FORTUNE, headers={"Authorization": f"L402 {forged}:{preimage.hex()}"}
        )
        assert response.status == 401
        assert (await response.json(content_type=PROBLEM_JSON))["detail"] == reason
        # The realm is the configured location; nothing in it to pay.
        assert response.headers.getall("WWW-Authenticate") == [
            f'L402 realm="{LOCATION}", error="invalid_token", error_description="{reason}"'
        ]
    assert len(gateway.backend.invoices) == invoices  # no 401 minted an invoice
