"""Prepaid credit end to end: ``l402-gateway serve`` on real LND, paid from bob's node.

One payment buys a balance that each request draws down; the same token is topped up when it
runs out; a metered backend reports what each request cost; two workers and a SIGKILL never
make the balance wrong.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NamedTuple

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from gateway import l402
from gateway.lnd.client import LndClient
from gateway.ports import Account
from gateway.store import SqliteStore
from regtest.network import Network
from regtest.processes import free_ports, wait_for_http
from tests.regtest.gateway_helpers import (
    bake_gateway_macaroon,
    l402_challenge,
    pay,
    serving,
    start_serve,
)

pytestmark = pytest.mark.regtest

PRICE = 1_000  # msat per request on /api/credit/*
CREDIT = 100 * PRICE  # what the route's invoice buys unless the client asks otherwise
METERED_MAX = 1_000  # the most a metered request may cost


def _backend() -> web.Application:
    """Reports a metered request's cost (``?cost=``) and fails on ``/api/metered/fail``."""

    async def answer(request: web.Request) -> web.Response:
        if request.path.endswith("/fail"):
            return web.json_response({"error": "backend failed"}, status=500)
        headers = {"L402-Cost-Msat": request.query["cost"]} if "cost" in request.query else {}
        return web.json_response({"path": request.path}, headers=headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


class Served(NamedTuple):
    url: str
    database: Path
    config_file: Path
    log: Path


def _config(network: Network, tmp_path: Path, port: int, upstream: str, workers: int) -> Path:
    node = network.alice
    database = tmp_path / "gateway.db"
    macaroon = bake_gateway_macaroon(network, tmp_path / "gateway.macaroon")
    text = f"""
[server]
listen = "127.0.0.1:{port}"
upstream = "{upstream}"
workers = {workers}
[lnd]
host = "{node.rpc_host}"
tls_cert = "{node.tls_cert}"
macaroon = "{macaroon}"
[store]
url = "sqlite://{database}"
sweep_interval = 1
[l402]
root_key_cache_seconds = 0
[rate_limit]
challenges_per_second = 50
burst = 100
[credit]
reservation_seconds = 3
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
[[routes]]
pattern = "/api/metered/*"
service = "metered"
price_msat = {METERED_MAX}
billing = "credit"
metered = true
credit_msat = {CREDIT}
"""
    config_file = tmp_path / "gateway.toml"
    config_file.write_text(text)
    return config_file


@pytest_asyncio.fixture
async def upstream() -> AsyncIterator[str]:
    async with serving(_backend()) as url:
        yield url


def _setup(network: Network, tmp_path: Path, upstream: str, workers: int = 1) -> Served:
    (port,) = free_ports(1)
    config_file = _config(network, tmp_path, port, upstream, workers)
    return Served(
        f"http://127.0.0.1:{port}", tmp_path / "gateway.db", config_file, tmp_path / "serve.log"
    )


async def _started(served: Served) -> subprocess.Popen[bytes]:
    process = start_serve(served.config_file, served.log)
    await wait_for_http(f"{served.url}/health", process, served.log)
    return process


def _stop(process: subprocess.Popen[bytes], log: Path) -> None:
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0, log.read_text()


async def _buy(
    http: aiohttp.ClientSession,
    bob: LndClient,
    network: Network,
    url: str,
    headers: dict[str, str] | None = None,
) -> tuple[str, l402.Challenge, aiohttp.ClientResponse]:
    async with http.get(url, headers=headers or {}) as response:
        assert response.status == 402, await response.text()
        challenge = l402_challenge(response.headers)
    return await pay(bob, network, challenge), challenge, response


async def _account(database: Path, challenge: l402.Challenge) -> Account:
    token_id = l402.Identifier.decode(l402.decode_b64(challenge.macaroon_b64).identifier).token_id
    store = await SqliteStore.open(database)
    try:
        account = await store.get_account(token_id)
    finally:
        await store.close()
    assert account is not None
    return account


async def _credited(database: Path, challenge: l402.Challenge, amount: int) -> Account:
    """The account once the watcher has credited ``amount`` in all."""
    for _ in range(200):
        account = await _account(database, challenge)
        if account.credited_msat >= amount:
            assert account.credited_msat == amount
            return account
        await asyncio.sleep(0.05)
    raise AssertionError(f"not credited {amount}: {account}")


async def test_buy_spend_run_out_top_up_and_go_on_with_the_same_token(
    network: Network, bob: LndClient, tmp_path: Path, upstream: str
) -> None:
    served = _setup(network, tmp_path, upstream)
    process = await _started(served)
    url = served.url + "/api/credit/data"
    try:
        async with aiohttp.ClientSession() as http:
            authorization, challenge, offer = await _buy(http, bob, network, url)
            assert offer.headers["L402-Credit-Msat"] == str(CREDIT)
            assert offer.headers["L402-Price-Msat"] == str(PRICE)
            await _credited(served.database, challenge, CREDIT)
            headers = {"Authorization": authorization}
            for served_count in range(1, 101):
                async with http.get(url, headers=headers) as response:
                    assert response.status == 200, await response.text()
                    assert response.headers["L402-Balance-Msat"] == str(
                        CREDIT - served_count * PRICE
                    )
            async with http.get(url, headers=headers) as response:
                assert response.status == 402
                assert response.headers["L402-Balance-Msat"] == "0"
                assert (await response.json())[
                    "detail"
                ] == "credit balance too low for this request"
                top_up = l402_challenge(response.headers)
            account = await _account(served.database, challenge)
            assert (account.spent_msat, account.balance_msat) == (100 * PRICE, 0)
            # The top-up's token shares the account: its token id is the first one's.
            first_id = l402.Identifier.decode(l402.decode_b64(challenge.macaroon_b64).identifier)
            top_id = l402.Identifier.decode(l402.decode_b64(top_up.macaroon_b64).identifier)
            assert top_id.token_id == first_id.token_id
            assert top_id.payment_hash != first_id.payment_hash
            await pay(bob, network, top_up)
            await _credited(served.database, challenge, 2 * CREDIT)
            # The first macaroon and preimage go on working.
            async with http.get(url, headers=headers) as response:
                assert response.status == 200
                assert response.headers["L402-Balance-Msat"] == str(CREDIT - PRICE)
            async with http.get(served.url + "/.well-known/l402/token", headers=headers) as info:
                assert info.status == 200, await info.text()
                facts = await info.json()
            assert facts["balance_msat"] == CREDIT - PRICE
            assert facts["spent_msat"] == 101 * PRICE
            assert facts["recent"][0]["path"] == "/api/credit/data"
    finally:
        _stop(process, served.log)


async def test_forty_parallel_requests_on_two_workers_spend_a_balance_of_ten_exactly(
    network: Network, bob: LndClient, tmp_path: Path, upstream: str
) -> None:
    served = _setup(network, tmp_path, upstream, workers=2)
    process = await _started(served)
    url = served.url + "/api/credit/burst"
    try:
        async with aiohttp.ClientSession() as http:
            authorization, challenge, offer = await _buy(
                http, bob, network, url, {"L402-Credit-Msat": str(10 * PRICE)}
            )
            assert offer.headers["L402-Credit-Msat"] == str(10 * PRICE)
            await _credited(served.database, challenge, 10 * PRICE)

            async def one() -> int:
                # A connection each: the kernel spreads them over both workers.
                async with (
                    aiohttp.ClientSession() as own,
                    own.get(url, headers={"Authorization": authorization}) as response,
                ):
                    return response.status

            statuses = await asyncio.gather(*(one() for _ in range(40)))
        assert sorted(statuses) == [200] * 10 + [402] * 30
        account = await _account(served.database, challenge)
        assert (account.balance_msat, account.spent_msat, account.reserved_msat) == (
            0,
            10 * PRICE,
            0,
        )
    finally:
        _stop(process, served.log)


async def test_a_killed_gateway_loses_no_debit_and_takes_none_for_refused_requests(
    network: Network, bob: LndClient, tmp_path: Path, upstream: str
) -> None:
    served = _setup(network, tmp_path, upstream)
    process = await _started(served)
    url = served.url + "/api/credit/kill"
    bought = 50 * PRICE
    async with aiohttp.ClientSession() as http:
        authorization, challenge, _ = await _buy(
            http, bob, network, url, {"L402-Credit-Msat": str(bought)}
        )
        await _credited(served.database, challenge, bought)
        outcomes: list[int | None] = []
        some_served = asyncio.Event()
        # Fewer connections at once than serve admits from one address (64).
        slots = asyncio.Semaphore(20)

        async def one() -> None:
            try:
                async with (
                    slots,
                    aiohttp.ClientSession() as own,
                    own.get(url, headers={"Authorization": authorization}) as response,
                ):
                    await response.read()
                    outcomes.append(response.status)
            except aiohttp.ClientError:
                outcomes.append(None)  # under way when the gateway died
            if len(outcomes) >= 25:
                some_served.set()

        # More requests than the balance covers; the kill lands in the middle.
        burst = [asyncio.create_task(one()) for _ in range(80)]
        await some_served.wait()
        process.kill()
        process.wait(timeout=30)
        await asyncio.gather(*burst)
    served_count, lost = outcomes.count(200), outcomes.count(None)
    assert set(outcomes) <= {200, 402, None}
    assert served_count >= 25
    process = await _started(served)  # restart: the sweeper releases what was held
    try:
        for _ in range(200):
            account = await _account(served.database, challenge)
            if account.reserved_msat == 0:
                break
            await asyncio.sleep(0.05)
        assert account.reserved_msat == 0
        spent = account.spent_msat
        # Every served request is charged; a refused one never is; one cut off by the kill
        # may have been charged only if its charge was written before the process died.
        assert served_count * PRICE <= spent <= (served_count + lost) * PRICE
        assert account.balance_msat == bought - spent >= 0
        async with (
            aiohttp.ClientSession() as http,
            http.get(url, headers={"Authorization": authorization}) as response,
        ):
            expected = 200 if account.balance_msat >= PRICE else 402
            assert response.status == expected
    finally:
        _stop(process, served.log)


async def test_a_metered_backend_is_charged_what_it_reports_and_not_for_a_failure(
    network: Network, bob: LndClient, tmp_path: Path, upstream: str
) -> None:
    served = _setup(network, tmp_path, upstream)
    process = await _started(served)
    base = served.url + "/api/metered/"
    try:
        async with aiohttp.ClientSession() as http:
            authorization, challenge, offer = await _buy(http, bob, network, base + "x?cost=1")
            assert offer.headers["L402-Price-Msat"] == str(METERED_MAX)
            await _credited(served.database, challenge, CREDIT)
            headers = {"Authorization": authorization}
            balance = CREDIT
            for cost in (17, 250, 999):
                async with http.get(f"{base}x?cost={cost}", headers=headers) as response:
                    assert response.status == 200
                    assert "L402-Cost-Msat" not in response.headers  # the backend's, not shown
                    balance -= cost
                    assert response.headers["L402-Balance-Msat"] == str(balance)
            async with http.get(base + "fail", headers=headers) as response:
                assert response.status == 500
                assert response.headers["L402-Balance-Msat"] == str(balance)
            # A cost the backend got wrong is logged and charged the reservation, never a 500.
            for bad in ("-5", "lots", str(METERED_MAX + 1)):
                async with http.get(f"{base}x?cost={bad}", headers=headers) as response:
                    assert response.status == 200
                    balance -= METERED_MAX
                    assert response.headers["L402-Balance-Msat"] == str(balance)
        account = await _account(served.database, challenge)
        assert account.spent_msat == 17 + 250 + 999 + 3 * METERED_MAX
        assert served.log.read_text().count("the backend reported cost") == 3
    finally:
        _stop(process, served.log)


async def test_a_credit_amount_out_of_bounds_is_refused_with_the_reason(
    network: Network, tmp_path: Path, upstream: str
) -> None:
    served = _setup(network, tmp_path, upstream)
    process = await _started(served)
    try:
        async with aiohttp.ClientSession() as http:
            for asked in ("1", "ten", str(10**20)):
                async with http.get(
                    served.url + "/api/credit/x", headers={"L402-Credit-Msat": asked}
                ) as response:
                    assert response.status == 400, asked
                    assert "credit amount" in (await response.json())["detail"]
    finally:
        _stop(process, served.log)


async def test_a_third_party_l402_client_buys_spends_and_tops_up_credit(
    network: Network, tmp_path: Path, upstream: str
) -> None:
    # l402-requests (PyPI) knows nothing of credit: it pays a 402 and retries.
    from l402_requests import AsyncL402Client

    from tests.regtest.test_interop_clients import BobRest, BobWallet

    served = _setup(network, tmp_path, upstream)
    process = await _started(served)
    url = served.url + "/api/credit/third-party"
    try:
        wallet = BobWallet(BobRest(network.bob))
        asked = {"L402-Credit-Msat": str(3 * PRICE)}
        async with AsyncL402Client(wallet=wallet) as client:
            balances = []
            for _ in range(5):  # three on the first purchase, then a top-up it pays itself
                response = await client.get(url, headers=asked)
                assert response.status_code == 200, response.text
                balances.append(int(response.headers["L402-Balance-Msat"]))
        assert balances[:3] == [2 * PRICE, PRICE, 0]
        assert len(wallet.paid) == 2
        assert balances[3:] == [2 * PRICE, PRICE]
    finally:
        _stop(process, served.log)
