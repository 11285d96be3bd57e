"""Third-party L402 clients against ``l402-gateway serve`` on real LND, paying from bob.

Each client is used as published: its own challenge parsing, token handling and retry; only
the wallet is ours, the narrowest adapter it accepts, paying through bob's LND. Each must pay
once, get 200, and send the same URL again without paying: counted on bob's node (its
payments, over REST) and in the gateway's store (the invoices it issued), not only by status.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import pytest_asyncio
from l402_requests import AsyncL402Client
from l402_requests.challenge import parse_challenge as parse_l402_requests_challenge
from l402_requests.wallets import WalletBase
from pymacaroons import Macaroon as PyMacaroon  # type: ignore[import-untyped]

from gateway import l402
from gateway.examples import demo_api
from gateway.lnd.client import LndClient
from gateway.store import SqliteStore
from regtest.network import Network, Node
from regtest.processes import free_ports, wait_for_http
from tests.regtest.gateway_helpers import (
    PREMIUM_PRICE,
    REPO,
    config_toml,
    gateway_config,
    l402_challenge,
    pay,
    serving,
    start_serve,
)

pytestmark = pytest.mark.regtest
FORTUNE = "/api/premium/fortune"
INTEROP_DIR = REPO / "tests" / "interop"
JS_DIR = INTEROP_DIR / "js"


class BobRest:
    """Bob's LND over its REST API (what these clients speak), with his admin macaroon."""

    def __init__(self, node: Node) -> None:
        assert node.rest_host, "the regtest nodes serve REST"
        self.url = f"https://{node.rest_host}"
        self.macaroon_hex = node.macaroon("admin").read_bytes().hex()
        self.ssl = ssl.create_default_context(cafile=str(node.tls_cert))

    async def payment_count(self) -> int:
        """Every payment bob's node ever attempted, failed and in-flight ones included."""
        async with (
            aiohttp.ClientSession(headers={"Grpc-Metadata-macaroon": self.macaroon_hex}) as http,
            http.get(
                f"{self.url}/v1/payments", params={"include_incomplete": "true"}, ssl=self.ssl
            ) as response,
        ):
            assert response.status == 200, await response.text()
            return len((await response.json()).get("payments", []))

    async def pay(self, invoice: str) -> str:
        """Pay through routerrpc's REST stream; the preimage in hex."""
        async with httpx.AsyncClient(
            verify=self.ssl, headers={"Grpc-Metadata-macaroon": self.macaroon_hex}, timeout=60
        ) as http:
            response = await http.post(
                f"{self.url}/v2/router/send",
                json={"payment_request": invoice, "timeout_seconds": 30, "fee_limit_sat": 10},
            )
        assert response.status_code == 200, response.text
        last = json.loads(response.text.strip().splitlines()[-1])["result"]
        assert last["status"] == "SUCCEEDED", last
        preimage: str = last["payment_preimage"]  # a hex string in routerrpc's Payment
        return preimage


@dataclass
class Served:
    """``l402-gateway serve`` in front of demo_api(), with alice's node."""

    url: str
    database: Path
    network: Network
    bob: BobRest

    async def invoices(self) -> list[str]:
        """The states of every invoice the gateway issued."""
        store = await SqliteStore.open(self.database)
        try:
            return sorted(record.state.value for record in await store.list_invoices())
        finally:
            await store.close()


@pytest_asyncio.fixture
async def served(network: Network, tmp_path: Path) -> AsyncIterator[Served]:
    async with serving(demo_api()) as upstream:
        (port,) = free_ports(1)
        url = f"http://127.0.0.1:{port}"
        database = tmp_path / "gateway.db"
        config = gateway_config(network, database, listen=f"127.0.0.1:{port}", upstream=upstream)
        config_file = tmp_path / "gateway.toml"
        config_file.write_text(config_toml(config))
        log = tmp_path / "serve.log"
        process = start_serve(config_file, log)
        try:
            await wait_for_http(f"{url}/health", process, log)
            yield Served(url, database, network, BobRest(network.bob))
        finally:
            process.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(process.wait, 30) == 0, log.read_text()


async def _settled(served: Served, limit: float = 10.0) -> list[str]:
    """The store's invoice states once the watcher has seen the settlement."""
    deadline = asyncio.get_running_loop().time() + limit
    while True:
        states = await served.invoices()
        if "OPEN" not in states or asyncio.get_running_loop().time() > deadline:
            return states
        await asyncio.sleep(0.05)


async def test_every_node_serves_rest_with_its_tls_cert_and_macaroon(network: Network) -> None:
    for node in network.nodes.values():
        context = ssl.create_default_context(cafile=str(node.tls_cert))
        headers = {"Grpc-Metadata-macaroon": node.macaroon("readonly").read_bytes().hex()}
        async with (
            aiohttp.ClientSession(headers=headers) as http,
            http.get(f"https://{node.rest_host}/v1/getinfo", ssl=context) as response,
        ):
            assert response.status == 200, await response.text()
            assert (await response.json())["identity_pubkey"] == node.pubkey


# --- l402-requests (PyPI) -------------------------------------------------------------------


class BobWallet(WalletBase):  # type: ignore[misc]  # l402_requests ships no type hints
    """l402-requests' wallet interface, paying from bob's node."""

    def __init__(self, bob: BobRest) -> None:
        self.bob = bob
        self.paid: list[str] = []

    async def pay_invoice(self, bolt11: str) -> str:
        self.paid.append(bolt11)
        return await self.bob.pay(bolt11)


async def test_l402_requests_pays_once_and_reuses_the_token(served: Served) -> None:
    before = await served.bob.payment_count()
    wallet = BobWallet(served.bob)
    async with AsyncL402Client(wallet=wallet) as client:
        first = await client.get(served.url + FORTUNE)
        assert first.status_code == 200, first.text
        assert first.json()["paid"]["amount_msat"] == PREMIUM_PRICE
        again = await client.get(served.url + FORTUNE)
        assert again.status_code == 200, again.text
        assert again.json()["paid"]["token_id"] == first.json()["paid"]["token_id"]
        assert [entry.success for entry in client.spending_log.records] == [True]
    assert len(wallet.paid) == 1
    assert await served.bob.payment_count() == before + 1
    assert await _settled(served) == ["SETTLED"]


async def test_the_first_challenge_alone_is_enough_for_l402_requests_parser(
    served: Served,
) -> None:
    # lnget and Aperture's client read only the first WWW-Authenticate value and need
    # macaroon then invoice right after the scheme; l402-requests' parser has the same need.
    async with httpx.AsyncClient() as http:
        response = await http.get(served.url + FORTUNE)
    assert response.status_code == 402
    first = response.headers.get_list("WWW-Authenticate")[0]
    challenge = parse_l402_requests_challenge(first)
    problem = response.json()
    assert (challenge.macaroon, challenge.invoice) == (problem["macaroon"], problem["invoice"])
    assert first.startswith("L402 ")


async def test_l402_requests_hands_a_401_back_without_paying(served: Served) -> None:
    wallet = BobWallet(served.bob)
    async with AsyncL402Client(wallet=wallet) as client:
        garbage = {"Authorization": "L402 garbage"}
        response = await client.get(served.url + FORTUNE, headers=garbage)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith('L402 realm="l402-gateway", error=')
    assert wallet.paid == []
    assert await served.invoices() == []


# --- @getalby/lightning-tools fetchWithL402 (npm), run with node ----------------------------


async def test_alby_fetch_with_l402_pays_once_and_reuses_the_token(served: Served) -> None:
    node = shutil.which("node")
    if node is None or not (JS_DIR / "node_modules" / "@getalby" / "lightning-tools").is_dir():
        pytest.skip("node or tests/interop/js/node_modules missing: run `make interop`")
    bob = served.network.bob
    env = {
        **os.environ,
        "BOB_REST": bob.rest_host,
        "BOB_TLS_CERT": str(bob.tls_cert),
        "BOB_MACAROON": str(bob.macaroon("admin")),
    }
    before = await served.bob.payment_count()
    process = await asyncio.create_subprocess_exec(
        node,
        "alby_fetch.mjs",
        served.url + FORTUNE,
        cwd=JS_DIR,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, stderr.decode()
    steps: dict[str, dict[str, Any]] = {}
    for line in stdout.decode().splitlines():
        step = json.loads(line)
        steps[step["step"]] = step
    paid, reused, refused = steps["pay"], steps["reuse"], steps["refused"]
    assert (paid["status"], paid["paid"], paid["amountSat"]) == (200, True, PREMIUM_PRICE // 1000)
    assert paid["scheme"] == "L402"  # it read the L402 challenge, the first one
    assert (reused["status"], reused["paid"]) == (200, False)
    first, again = json.loads(paid["body"]), json.loads(reused["body"])
    assert again["paid"]["token_id"] == first["paid"]["token_id"]
    # A credential the gateway refuses: a 401 with a challenge that offers nothing to pay.
    assert (refused["status"], refused["paid"]) == (401, False)
    assert refused["wwwAuthenticate"].startswith('L402 realm="l402-gateway", error=')
    assert await served.bob.payment_count() == before + 1
    assert await _settled(served) == ["SETTLED"]


# --- bolt402 (PyPI, Rust), paying over bob's LND REST ----------------------------------------


async def test_bolt402_pays_once_and_reuses_the_token(served: Served) -> None:
    before = await served.bob.payment_count()
    env = {
        **os.environ,
        "LND_REST_URL": served.bob.url,
        "LND_MACAROON_HEX": served.bob.macaroon_hex,
    }
    # A process of its own: see tests/interop/bolt402_client.py.
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(INTEROP_DIR / "bolt402_client.py"),
        served.url + FORTUNE,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, stderr.decode()
    paid, reused = (json.loads(line) for line in stdout.decode().splitlines())
    price_sat = PREMIUM_PRICE // 1000
    assert (paid["status"], paid["paid"], paid["cached_token"]) == (200, True, False), paid
    assert paid["amount_sats"] == price_sat
    assert (reused["status"], reused["paid"], reused["cached_token"]) == (200, False, True), reused
    assert reused["total_spent"] == price_sat
    first, again = json.loads(paid["body"]), json.loads(reused["body"])
    assert again["paid"]["token_id"] == first["paid"]["token_id"]
    assert await served.bob.payment_count() == before + 1
    assert await _settled(served) == ["SETTLED"]


# --- what Aperture's Go client (and lnget) send back -----------------------------------------


async def test_macaroon_with_the_preimage_caveat_gets_200(
    served: Served, bob: LndClient, network: Network
) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(served.url + FORTUNE) as response:
            assert response.status == 402
            challenge = l402_challenge(response.headers)
        authorization = await pay(bob, network, challenge)
        preimage = authorization.rsplit(":", 1)[1]
        # Appended by another macaroon implementation, signed on along the HMAC chain.
        theirs = PyMacaroon.deserialize(challenge.macaroon_b64)
        theirs.add_first_party_caveat(f"preimage={preimage}")
        text = theirs.serialize()
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        paid = base64.b64encode(raw).decode()
        assert l402.decode_b64(paid).caveats[-1] == f"preimage={preimage}".encode()
        headers = {"Authorization": f"L402 {paid}:{preimage}"}
        async with session.get(served.url + FORTUNE, headers=headers) as response:
            assert response.status == 200, await response.text()
        wrong = theirs.copy()
        wrong.add_first_party_caveat(f"preimage={'00' * 32}")
        text = wrong.serialize()
        forged = base64.b64encode(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        headers = {"Authorization": f"L402 {forged.decode()}:{preimage}"}
        async with session.get(served.url + FORTUNE, headers=headers) as response:
            assert response.status == 401
            assert (await response.json())["detail"] == "preimage caveat does not match"
            assert response.headers.getall("WWW-Authenticate") == [
                'L402 realm="l402-gateway", error="invalid_token", '
                'error_description="preimage caveat does not match"'
            ]
