"""The gateway end to end on real LND: aiohttp middleware, reverse proxy, restarts, floods."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from gateway import l402
from gateway.config import Config, RateLimitConfig
from gateway.examples import demo_api
from gateway.lnd.client import LndClient
from gateway.runtime import running_gateway
from gateway.web.aiohttp import setup_l402
from regtest.network import Network
from regtest.processes import free_ports, wait_for_http
from tests.regtest.gateway_helpers import (
    PREMIUM_PRICE,
    OffsetClock,
    config_toml,
    gateway_command,
    gateway_config,
    l402_challenge,
    pay,
    serving,
    start_serve,
    wait_for_invoice,
)

pytestmark = pytest.mark.regtest


@dataclass
class MountedGateway:
    url: str
    database: Path
    clock: OffsetClock
    session: aiohttp.ClientSession


@contextlib.asynccontextmanager
async def _mounted(
    config: Config, clock: OffsetClock, app: web.Application | None = None
) -> AsyncIterator[MountedGateway]:
    """``app`` (default: ``demo_api()``) behind ``setup_l402`` on a loopback port."""
    app = app or demo_api()
    setup_l402(app, lambda: running_gateway(config, clock=clock))
    database = Path(config.store.url.removeprefix("sqlite://"))
    async with serving(app) as url, aiohttp.ClientSession() as session:
        yield MountedGateway(url, database, clock, session)


@pytest_asyncio.fixture
async def mounted(network: Network, tmp_path: Path) -> AsyncIterator[MountedGateway]:
    config = gateway_config(network, tmp_path / "gateway.db")
    async with _mounted(config, OffsetClock()) as gateway:
        yield gateway


async def _paid_authorization(
    gateway: MountedGateway, bob: LndClient, network: Network, path: str
) -> tuple[str, l402.Challenge]:
    async with gateway.session.get(gateway.url + path) as response:
        assert response.status == 402
        problem = await response.json()
        challenge = l402_challenge(response.headers)
    assert problem["detail"] == "payment required"
    assert problem["invoice"] == challenge.invoice
    return await pay(bob, network, challenge), challenge


async def _get(
    gateway: MountedGateway, path: str, authorization: str
) -> tuple[int, dict[str, object]]:
    async with gateway.session.get(
        gateway.url + path, headers={"Authorization": authorization}
    ) as response:
        return response.status, await response.json()


async def test_middleware_402_pay_retry_200_and_settled_in_store(
    mounted: MountedGateway, bob: LndClient, network: Network
) -> None:
    authorization, challenge = await _paid_authorization(
        mounted, bob, network, "/api/premium/fortune"
    )
    status, body = await _get(mounted, "/api/premium/fortune", authorization)
    assert status == 200
    paid = body["paid"]
    assert isinstance(paid, dict)
    assert paid["service"] == "premium"
    assert paid["capabilities"] == ["read"]
    assert paid["amount_msat"] == PREMIUM_PRICE

    macaroon = l402.decode_b64(challenge.macaroon_b64)
    payment_hash = l402.Identifier.decode(macaroon.identifier).payment_hash
    record = await wait_for_invoice(mounted.database, payment_hash, "SETTLED")
    assert record.amount_paid_msat == PREMIUM_PRICE
    assert record.path == "/api/premium/fortune"
    assert record.token_id.hex() == paid["token_id"]

    # The token keeps working (now from the verified-decision cache, token facts included),
    # and the free route needs none.
    assert await _get(mounted, "/api/premium/fortune", authorization) == (200, body)
    async with mounted.session.get(mounted.url + "/health") as response:
        assert response.status == 200


async def test_dynamic_price_from_the_request(
    mounted: MountedGateway, bob: LndClient, network: Network
) -> None:
    async with mounted.session.get(mounted.url + "/api/quote?n=3") as response:
        assert response.status == 402
        assert (await response.json())["amount_msat"] == 6_000
        challenge = l402_challenge(response.headers)
    authorization = await pay(bob, network, challenge)
    status, body = await _get(mounted, "/api/quote?n=3", authorization)
    assert status == 200
    assert body["quotes"] == ["quote #1", "quote #2", "quote #3"]


async def test_flood_of_unpaid_requests_is_rate_limited_while_paid_ones_work(
    network: Network, bob: LndClient, tmp_path: Path
) -> None:
    limits = RateLimitConfig(challenges_per_second=0.5, burst=5)
    config = gateway_config(network, tmp_path / "gateway.db", rate_limit=limits)
    async with _mounted(config, OffsetClock()) as gateway:
        authorization, _ = await _paid_authorization(gateway, bob, network, "/api/premium/fortune")

        async def unpaid() -> tuple[int, str | None]:
            async with gateway.session.get(gateway.url + "/api/premium/fortune") as response:
                return response.status, response.headers.get("Retry-After")

        async def paid() -> int:
            return (await _get(gateway, "/api/premium/fortune", authorization))[0]

        flood = [asyncio.create_task(unpaid()) for _ in range(60)]
        paying = [asyncio.create_task(paid()) for _ in range(20)]
        unpaid_results = await asyncio.gather(*flood)
        paid_results = await asyncio.gather(*paying)

        assert paid_results == [200] * 20
        statuses = [status for status, _ in unpaid_results]
        assert set(statuses) <= {402, 429}
        # One challenge went to the paid token; the burst allows 4 more (plus slow refill).
        assert statuses.count(402) <= 6
        assert statuses.count(429) >= 54
        assert all(int(after) >= 1 for status, after in unpaid_results if status == 429 and after)
        assert all(after for status, after in unpaid_results if status == 429)


@pytest_asyncio.fixture
async def upstream() -> AsyncIterator[str]:
    async with serving(demo_api()) as url:
        yield url


class ProxySetup(NamedTuple):
    """A config file for ``l402-gateway serve`` in front of the upstream demo API."""

    url: str
    database: Path
    config_file: Path
    log: Path


@pytest.fixture
def proxy_setup(network: Network, tmp_path: Path, upstream: str) -> ProxySetup:
    (port,) = free_ports(1)
    database = tmp_path / "gateway.db"
    config = gateway_config(network, database, listen=f"127.0.0.1:{port}", upstream=upstream)
    config_file = tmp_path / "gateway.toml"
    config_file.write_text(config_toml(config))
    return ProxySetup(f"http://127.0.0.1:{port}", database, config_file, tmp_path / "serve.log")


async def test_reverse_proxy_cli_invoices_and_revoke(
    network: Network, bob: LndClient, proxy_setup: ProxySetup
) -> None:
    url, database, config_file, log = proxy_setup
    process = start_serve(config_file, log)
    try:
        await wait_for_http(f"{url}/health", process, log)
        async with aiohttp.ClientSession() as session:
            async with session.post(url + "/api/echo", data=b"x" * 1000) as response:
                assert response.status == 402
                challenge = l402_challenge(response.headers)
            authorization = await pay(bob, network, challenge)
            headers = {"Authorization": authorization, "X-L402-Token": "forged"}
            async with session.post(
                url + "/api/echo", data=b"x" * 1000, headers=headers
            ) as response:
                assert response.status == 200
                echoed = await response.json()
            assert echoed["bytes"] == 1000
            forwarded = {k.lower(): v for k, v in echoed["headers"].items()}
            assert "authorization" not in forwarded
            token = json.loads(forwarded["x-l402-token"])
            assert token["service"] == "echo"
            assert token["amount_msat"] == 5_000

            macaroon = l402.decode_b64(challenge.macaroon_b64)
            payment_hash = l402.Identifier.decode(macaroon.identifier).payment_hash
            await wait_for_invoice(database, payment_hash, "SETTLED")
            listing = gateway_command(config_file, "invoices", "--json")
            assert listing.returncode == 0, listing.stderr
            (record,) = json.loads(listing.stdout)
            assert (record["state"], record["payment_hash"]) == ("SETTLED", payment_hash.hex())
            table = gateway_command(config_file, "invoices")
            assert "SETTLED" in table.stdout
            assert "1 invoices" in table.stdout
            assert "5000 msat received" in table.stdout

            revoke = gateway_command(config_file, "token", "revoke", token["token_id"])
            assert revoke.returncode == 0, revoke.stderr
            async with session.post(url + "/api/echo", headers=headers) as response:
                assert response.status == 401
                assert (await response.json())["detail"] == "unknown or revoked token"
            again = gateway_command(config_file, "token", "revoke", token["token_id"])
            assert again.returncode == 1
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()


async def test_serve_with_two_workers_shares_one_port_and_one_store(
    network: Network, bob: LndClient, proxy_setup: ProxySetup
) -> None:
    url, database, config_file, log = proxy_setup
    fortune = url + "/api/premium/fortune"
    config_file.write_text(
        config_file.read_text().replace("[server]\n", "[server]\nworkers = 2\naccess_log = true\n")
    )
    process = start_serve(config_file, log)
    try:
        await wait_for_http(f"{url}/health", process, log)
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        # Besides the workers, multiprocessing's resource tracker is a child too.
        workers = [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
        assert len(workers) == 2, children
        hashes, authorizations = [], []
        for _ in range(3):
            async with aiohttp.ClientSession() as session, session.get(fortune) as response:
                assert response.status == 402
                challenge = l402_challenge(response.headers)
            authorizations.append(await pay(bob, network, challenge))
            macaroon = l402.decode_b64(challenge.macaroon_b64)
            hashes.append(l402.Identifier.decode(macaroon.identifier).payment_hash)
        # A new connection each time: the kernel spreads them over the workers, and each
        # worker accepts tokens any of them minted.
        for authorization in authorizations * 20:
            async with (
                aiohttp.ClientSession() as session,
                session.get(fortune, headers={"Authorization": authorization}) as response,
            ):
                assert response.status == 200
        for payment_hash in hashes:  # the first worker's watcher records every settlement
            await wait_for_invoice(database, payment_hash, "SETTLED")
        served = re.findall(
            r"(l402-gateway-worker-\d) INFO gateway.access: .* 200 ", log.read_text()
        )
        assert set(served) == {"l402-gateway-worker-0", "l402-gateway-worker-1"}, served
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    for worker in workers:  # stopped, and reaped, by their supervisor
        assert not Path(f"/proc/{worker}").exists()

    # A killed supervisor takes its workers with it: none goes on holding the port.
    process = start_serve(config_file, log)
    await wait_for_http(f"{url}/health", process, log)
    process.kill()
    process.wait(timeout=30)
    async with asyncio.timeout(30):
        while True:
            try:
                async with aiohttp.ClientSession() as session, session.get(f"{url}/health"):
                    await asyncio.sleep(0.1)
            except aiohttp.ClientConnectionError:
                break


async def test_sigkill_while_invoices_are_paid_loses_no_settlement(
    network: Network, bob: LndClient, proxy_setup: ProxySetup
) -> None:
    url, database, config_file, log = proxy_setup

    process = start_serve(config_file, log)
    challenges = []
    try:
        await wait_for_http(f"{url}/health", process, log)
        async with aiohttp.ClientSession() as session:
            for _ in range(3):
                async with session.get(url + "/api/premium/fortune") as response:
                    assert response.status == 402
                    challenges.append(l402_challenge(response.headers))
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    hashes = [
        l402.Identifier.decode(l402.decode_b64(c.macaroon_b64).identifier).payment_hash
        for c in challenges
    ]
    # Paid while the gateway is down.
    for challenge in challenges[:2]:
        await pay(bob, network, challenge)

    process = start_serve(config_file, log)
    try:
        await wait_for_http(f"{url}/health", process, log)
        for payment_hash in hashes[:2]:
            await wait_for_invoice(database, payment_hash, "SETTLED")
        assert (await wait_for_invoice(database, hashes[2], "OPEN")).settle_index == 0
        # And the restarted watcher still follows live settlements.
        await pay(bob, network, challenges[2])
        await wait_for_invoice(database, hashes[2], "SETTLED")
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()
