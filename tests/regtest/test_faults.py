"""Fault injection against real LND and btcd: the gateway killed, its node and chain restarted.

After every fault, no settlement may be lost: every invoice the store tracks has the state,
amount paid and settle index alice reports, and every invoice bob paid is SETTLED in both.
These tests restart nodes, so they run on a network of their own, not the session's.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from gateway import l402
from gateway.config import RateLimitConfig
from gateway.examples import demo_api
from gateway.lnd.client import LndClient
from gateway.ports import InvoiceRecord, InvoiceState
from gateway.store import SqliteStore
from regtest.network import Network, running_network
from regtest.processes import free_ports, wait_for_http
from tests.regtest.gateway_helpers import (
    MAX_FEE,
    config_toml,
    gateway_config,
    l402_challenge,
    serving,
    start_serve,
)

pytestmark = pytest.mark.regtest

PRICED = "/api/premium/fortune"
# Every fault injected by this module, by kind: printed when the module ends (see with -s).
FAULTS: Counter[str] = Counter()


@pytest_asyncio.fixture(scope="module")
async def fault_network(
    lnd_source_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Network]:
    async with running_network(tmp_path_factory.mktemp("faults")) as network:
        yield network
    print(f"faults injected: {dict(FAULTS)}")


@pytest_asyncio.fixture
async def bob(fault_network: Network) -> AsyncIterator[LndClient]:
    async with LndClient(fault_network.bob.settings()) as client:
        yield client


@dataclass
class Gateway:
    """``l402-gateway serve`` in front of the demo API, started and killed by the test."""

    network: Network
    url: str
    database: Path
    config_file: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None
    session: aiohttp.ClientSession = field(default_factory=aiohttp.ClientSession)

    async def start(self) -> None:
        self.process = start_serve(self.config_file, self.log)
        await wait_for_http(f"{self.url}/health", self.process, self.log)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        self.process = None
        FAULTS["gateway SIGKILL"] += 1

    def stop(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=30) == 0, self.log.read_text()
        self.process = None

    async def get(
        self, path: str = PRICED, authorization: str | None = None, method: str = "GET"
    ) -> aiohttp.ClientResponse:
        headers = {"Authorization": authorization} if authorization else {}
        async with self.session.request(method, self.url + path, headers=headers) as response:
            await response.read()
            return response

    async def challenge(self, method: str = "GET") -> l402.Challenge:
        response = await self.get(method=method)
        assert response.status == 402, await response.text()
        return l402_challenge(response.headers)


@pytest_asyncio.fixture
async def gateway(fault_network: Network, tmp_path: Path) -> AsyncIterator[Gateway]:
    (port,) = free_ports(1)
    database = tmp_path / "gateway.db"
    config_file = tmp_path / "gateway.toml"
    async with serving(demo_api()) as upstream:
        # Floods of unpaid requests come from one address: no rate limit in the way.
        limits = RateLimitConfig(challenges_per_second=1000, burst=1000)
        config = gateway_config(
            fault_network,
            database,
            listen=f"127.0.0.1:{port}",
            upstream=upstream,
            rate_limit=limits,
        )
        config_file.write_text(config_toml(config))
        gateway = Gateway(
            fault_network, f"http://127.0.0.1:{port}", database, config_file, tmp_path / "serve.log"
        )
        try:
            yield gateway
        finally:
            if gateway.process is not None:
                gateway.stop()
            await gateway.session.close()


async def pay(bob: LndClient, challenge: l402.Challenge) -> str:
    """Pay from bob by any route (after a node restart, bob's mission control avoids the
    channel a payment failed on); return the Authorization value."""
    payment = await bob.send_payment(challenge.invoice, max_fee_msat=MAX_FEE, payment_timeout=30)
    assert payment.preimage is not None
    return f"L402 {challenge.macaroon_b64}:{payment.preimage.hex()}"


def payment_hash(challenge: l402.Challenge) -> bytes:
    return l402.Identifier.decode(l402.decode_b64(challenge.macaroon_b64).identifier).payment_hash


async def store_records(gateway: Gateway) -> list[InvoiceRecord]:
    store = await SqliteStore.open(gateway.database)
    try:
        return await store.list_invoices()
    finally:
        await store.close()


async def until(what: str, check: Callable[[], Awaitable[bool]], limit: float = 30.0) -> float:
    """Poll ``check`` until it holds; returns the seconds it took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not await check():
        if loop.time() - started > limit:
            raise AssertionError(f"not {what} after {limit:.0f}s")
        await asyncio.sleep(0.05)
    return loop.time() - started


async def assert_store_matches_alice(
    gateway: Gateway,
    issued: Iterable[l402.Challenge],
    paid: Iterable[l402.Challenge],
    limit: float = 30.0,
) -> Counter[str]:
    """Wait until the store agrees with alice on every tracked invoice (state, amount paid,
    settle index), every issued challenge is tracked and every paid one SETTLED; returns the
    store's invoices counted by state."""
    issued_hashes = {payment_hash(challenge) for challenge in issued}
    paid_hashes = {payment_hash(challenge) for challenge in paid}
    problems: list[str] = []
    async with LndClient(gateway.network.alice.settings()) as alice:

        async def consistent() -> bool:
            records = await store_records(gateway)
            tracked = {record.payment_hash for record in records}
            problems[:] = [f"issued, not tracked: {h.hex()}" for h in issued_hashes - tracked]
            for record in records:
                node = await alice.lookup_invoice(record.payment_hash)
                ours = (record.state, record.amount_paid_msat, record.settle_index)
                theirs = (node.state, node.amount_paid_msat, node.settle_index)
                settled = node.state is InvoiceState.SETTLED
                if ours != theirs or (record.payment_hash in paid_hashes and not settled):
                    problems.append(f"{record.payment_hash.hex()}: store {ours}, alice {theirs}")
            return not problems

        try:
            await until("consistent", consistent, limit)
        except AssertionError:
            raise AssertionError("store and alice disagree:\n" + "\n".join(problems)) from None
    return Counter(record.state.value for record in await store_records(gateway))


async def settled_count(gateway: Gateway) -> int:
    return sum(r.state is InvoiceState.SETTLED for r in await store_records(gateway))


async def test_sigkill_mid_challenge_then_mid_settlement(
    gateway: Gateway, bob: LndClient, fault_network: Network
) -> None:
    await gateway.start()
    # Mid-challenge: eight clients keep asking for challenges, each one creating an invoice.
    # POST: aiohttp retries an idempotent request once when its connection drops, which would
    # hide a request cut off by the kill.
    issued: list[l402.Challenge] = []
    cut_off: list[aiohttp.ClientError] = []

    async def unpaid_client() -> None:
        try:
            while True:
                issued.append(await gateway.challenge("POST"))
        except aiohttp.ClientError as error:
            cut_off.append(error)

    clients = [asyncio.create_task(unpaid_client()) for _ in range(8)]

    async def flooding() -> bool:
        return len(issued) >= 30

    await until("30 challenges issued", flooding)
    gateway.kill()
    await asyncio.gather(*clients)
    # Requests sent but never answered: the kill landed while challenges were being made.
    assert any(isinstance(error, aiohttp.ServerDisconnectedError) for error in cut_off), cut_off
    await gateway.start()
    # Every challenge a client got is tracked. Invoices whose challenge was cut off by the
    # kill may be tracked too, or only on alice: harmless, nobody can pay what they never saw.
    tracked = (await assert_store_matches_alice(gateway, issued, []))["OPEN"]
    assert tracked >= len(issued)
    print(f"{len(issued)} challenges answered, {tracked} invoices tracked")  # shown with -s

    # Mid-settlement: two payers pay the last challenges before the kill, one after the
    # other; the gateway dies once its watcher has recorded two settlements.
    to_pay = issued[-10:]

    async def payer(challenges: list[l402.Challenge]) -> list[str]:
        return [await pay(bob, challenge) for challenge in challenges]

    payers = [asyncio.create_task(payer(to_pay[i::2])) for i in range(2)]

    async def two_settled() -> bool:
        return await settled_count(gateway) >= 2

    await until("two settlements recorded", two_settled)
    gateway.kill()
    recorded = await settled_count(gateway)
    assert not all(task.done() for task in payers), "paid before the kill: not mid-settlement"
    authorizations = [a for paid in await asyncio.gather(*payers) for a in paid]
    print(f"{recorded} of {len(to_pay)} settlements recorded before the kill")  # shown with -s
    await gateway.start()
    counts = await assert_store_matches_alice(gateway, issued, to_pay)
    assert counts == {"OPEN": tracked - len(to_pay), "SETTLED": len(to_pay)}
    for authorization in authorizations:
        assert (await gateway.get(authorization=authorization)).status == 200


def assert_unavailable(response: aiohttp.ClientResponse, body: str) -> None:
    """A clear 503: the reason in the problem's detail, and when to come back."""
    assert response.status == 503, body
    assert "Lightning node unavailable" in body
    assert int(response.headers["Retry-After"]) >= 1


@pytest.mark.parametrize("crash", [False, True], ids=["SIGTERM", "SIGKILL"])
async def test_lnd_restart_while_the_watcher_is_subscribed(
    gateway: Gateway, bob: LndClient, fault_network: Network, crash: bool
) -> None:
    await gateway.start()
    issued = [await gateway.challenge() for _ in range(6)]
    await pay(bob, issued[0])

    async def subscribed() -> bool:
        return await settled_count(gateway) == 1

    await until("the first settlement recorded", subscribed)
    # Paid while alice goes down: each payment either settles or fails as a whole.
    around = [asyncio.create_task(pay(bob, c)) for c in issued[1:4]]
    await fault_network.stop_process("alice", crash=crash)
    FAULTS[f"LND {'SIGKILL' if crash else 'SIGTERM'} + restart"] += 1
    response = await gateway.get()
    assert_unavailable(response, await response.text())
    assert (await gateway.get("/health")).status == 200
    await fault_network.start_process("alice")
    outcomes = await asyncio.gather(*around, return_exceptions=True)
    failed = [c for c, o in zip(issued[1:4], outcomes, strict=True) if isinstance(o, Exception)]
    print(f"{len(failed)} of 3 payments around the restart failed and are paid again")
    for challenge in failed:
        await pay(bob, challenge)
    for challenge in issued[4:]:
        await pay(bob, challenge)
    assert await assert_store_matches_alice(gateway, issued, issued) == {"SETTLED": 6}
    # New challenges work again, and their settlements are followed live.
    challenge = await gateway.challenge()
    authorization = await pay(bob, challenge)
    assert (await gateway.get(authorization=authorization)).status == 200
    await assert_store_matches_alice(gateway, [challenge], [challenge])


async def test_btcd_restart(gateway: Gateway, bob: LndClient, fault_network: Network) -> None:
    await gateway.start()
    before = await gateway.challenge()
    authorization = await pay(bob, before)
    await fault_network.stop_process("btcd")
    FAULTS["btcd restart"] += 1
    # Invoices need no chain: without btcd the gateway keeps issuing challenges and
    # accepting paid tokens.
    during = await gateway.challenge()
    assert (await gateway.get(authorization=authorization)).status == 200
    # Returns once every node follows the restarted btcd (see start_process).
    await fault_network.start_process("btcd")
    # The invoice issued while btcd was down is paid, and its token accepted, once it is back.
    authorization = await pay(bob, during)
    assert (await gateway.get(authorization=authorization)).status == 200
    after = await gateway.challenge()
    await pay(bob, after)
    paid = [before, during, after]
    assert await assert_store_matches_alice(gateway, paid, paid) == {"SETTLED": 3}


async def test_lnd_unreachable_at_start_up(
    gateway: Gateway, bob: LndClient, fault_network: Network
) -> None:
    await fault_network.stop_process("alice")
    FAULTS["LND down at gateway start-up"] += 1
    await gateway.start()  # answers its free /health route
    response = await gateway.get()
    assert_unavailable(response, await response.text())
    await fault_network.start_process("alice")
    challenges: list[l402.Challenge] = []

    async def recovered() -> bool:
        response = await gateway.get()
        if response.status == 402:
            challenges.append(l402_challenge(response.headers))
        else:
            assert_unavailable(response, await response.text())
        return bool(challenges)

    print(f"challenges again {await until('recovered', recovered):.1f}s after LND")  # shown with -s
    authorization = await pay(bob, challenges[0])
    assert (await gateway.get(authorization=authorization)).status == 200
    assert await assert_store_matches_alice(gateway, challenges, challenges) == {"SETTLED": 1}
