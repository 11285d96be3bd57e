"""Pay on success end to end: ``l402-gateway serve`` with ``settle = "on_success"`` routes on
real LND, paid from bob's node.

The 402 stores the request and issues a hold invoice; once bob's HTLC is held the gateway runs
the request once, then settles (the backend succeeded) or cancels (bob pays nothing). bob's
retry with the ordinary credential gets the stored response, never a second run.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from l402_requests import AsyncL402Client

from gateway import errors, l402
from gateway.lnd.client import LndClient
from gateway.ports import HeldRequest, HeldState, InvoiceState, PaymentHash, StoredResponse
from gateway.store import SqliteStore
from regtest.network import Network, Node
from regtest.processes import free_ports, wait_for_http
from tests.regtest.gateway_helpers import (
    MAX_FEE,
    REPO,
    bake_gateway_macaroon,
    l402_challenge,
    serving,
    start_serve,
)
from tests.regtest.test_interop_clients import BobRest, BobWallet

pytestmark = pytest.mark.regtest

PRICE = 2_000  # msat per job
BACKEND_TIMEOUT = 2  # seconds: /api/jobs/slow sleeps longer
REQUEST_LIMIT = 1024  # bytes of a stored request body
JOBS = "/api/jobs"
T = TypeVar("T")


class Backend:
    """Counts each request it gets by path; /fail answers 503, /slow outlasts the gateway's
    backend timeout, /wait answers once ``release`` is set."""

    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()
        self.bodies: list[bytes] = []
        self.token_headers: list[str] = []
        self.release = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.answer)

    async def answer(self, request: web.Request) -> web.Response:
        if not request.path.startswith(JOBS):
            return web.Response(text="ok")  # /health
        self.seen[request.path] += 1
        self.bodies.append(await request.read())
        self.token_headers.append(request.headers.get("X-L402-Token", ""))
        if request.path.endswith("/fail"):
            return web.json_response({"error": "overloaded"}, status=503)
        if request.path.endswith("/slow"):
            await asyncio.sleep(BACKEND_TIMEOUT + 3)
        if request.path.endswith("/wait"):
            await self.release.wait()
        return web.json_response(
            {"job": self.seen[request.path], "got": (await request.read()).decode()}, status=201
        )


class Served(NamedTuple):
    url: str
    database: Path
    config_file: Path
    log: Path


def _config(network: Network, tmp_path: Path, port: int, upstream: str, workers: int) -> Path:
    database = tmp_path / "gateway.db"
    macaroon = bake_gateway_macaroon(network, tmp_path / "gateway.macaroon")
    text = f"""
[server]
listen = "127.0.0.1:{port}"
upstream = "{upstream}"
workers = {workers}
access_log = true
[lnd]
host = "{network.alice.rpc_host}"
tls_cert = "{network.alice.tls_cert}"
macaroon = "{macaroon}"
[store]
url = "sqlite://{database}"
[l402]
root_key_cache_seconds = 0
[rate_limit]
challenges_per_second = 50
burst = 100
[hold]
backend_timeout = {BACKEND_TIMEOUT}
max_request_bytes = {REQUEST_LIMIT}
[[routes]]
pattern = "/health"
free = true
[[routes]]
pattern = "{JOBS}*"
service = "jobs"
price_msat = {PRICE}
settle = "on_success"
"""
    config_file = tmp_path / "gateway.toml"
    config_file.write_text(text)
    return config_file


@pytest_asyncio.fixture
async def backend() -> AsyncIterator[tuple[Backend, str]]:
    jobs = Backend()
    async with serving(jobs.app) as url:
        yield jobs, url


def _setup(network: Network, tmp_path: Path, upstream: str, workers: int = 1) -> Served:
    (port,) = free_ports(1)
    return Served(
        f"http://127.0.0.1:{port}",
        tmp_path / "gateway.db",
        _config(network, tmp_path, port, upstream, workers),
        tmp_path / "serve.log",
    )


async def _started(served: Served) -> subprocess.Popen[bytes]:
    process = start_serve(served.config_file, served.log)
    await wait_for_http(f"{served.url}/health", process, served.log)
    return process


async def _stop(process: subprocess.Popen[bytes], log: Path) -> None:
    process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(process.wait, 30) == 0, log.read_text()


async def _challenge(
    http: aiohttp.ClientSession, url: str, body: bytes
) -> tuple[l402.Challenge, aiohttp.ClientResponse]:
    async with http.post(url, data=body) as response:
        assert response.status == 402, await response.text()
        return l402_challenge(response.headers), response


async def _pay(bob: LndClient, challenge: l402.Challenge) -> str:
    """bob pays the hold invoice; the payment completes only when the gateway settles."""
    payment = await bob.send_payment(
        challenge.invoice, max_fee_msat=MAX_FEE, payment_timeout=BACKEND_TIMEOUT + 30
    )
    assert payment.preimage is not None
    return f"L402 {challenge.macaroon_b64}:{payment.preimage.hex()}"


def _hash(challenge: l402.Challenge) -> PaymentHash:
    identifier = l402.decode_b64(challenge.macaroon_b64).identifier
    return PaymentHash(l402.Identifier.decode(identifier).payment_hash)


async def _held(database: Path, payment_hash: PaymentHash) -> HeldRequest:
    store = await SqliteStore.open(database)
    try:
        held = await store.get_held_request(payment_hash)
    finally:
        await store.close()
    assert held is not None
    return held


async def _until_held(
    database: Path, payment_hash: PaymentHash, state: HeldState, limit: float = 30.0
) -> HeldRequest:
    deadline = asyncio.get_running_loop().time() + limit
    while True:
        held = await _held(database, payment_hash)
        if held.state is state:
            return held
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"held request not {state}: {held.state}, {held.failure!r}")
        await asyncio.sleep(0.05)


async def _invoice_state(database: Path, payment_hash: PaymentHash) -> InvoiceState:
    store = await SqliteStore.open(database)
    try:
        record = await store.get_invoice(payment_hash)
    finally:
        await store.close()
    assert record is not None
    return record.state


def _local_balance_msat(node: Node) -> int:
    """The node's spendable channel balance, from lncli (what a failed payment must not move)."""
    output = subprocess.run(  # noqa: S603 - the cached lncli binary and fixed arguments
        [*node.lncli().split(), "channelbalance"],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    return int(json.loads(output)["local_balance"]["msat"])


async def _refused_payment(bob: LndClient, challenge: l402.Challenge) -> errors.PaymentFailed:
    with pytest.raises(errors.PaymentFailed) as failure:
        await _pay(bob, challenge)
    return failure.value


async def _killed_while_running(
    served: Served,
    http: aiohttp.ClientSession,
    url: str,
    body: bytes,
    payment: Callable[[l402.Challenge], Coroutine[Any, Any, T]],
) -> tuple[l402.Challenge, asyncio.Task[T]]:
    """Start ``serve``, challenge ``url``, start ``payment`` and SIGKILL the gateway once
    the request is RUNNING (the backend holds it); the payment goes on."""
    process = await _started(served)
    challenge, _ = await _challenge(http, url, body)
    paying = asyncio.create_task(payment(challenge))
    await _until_held(served.database, _hash(challenge), HeldState.RUNNING)
    process.send_signal(signal.SIGKILL)
    await asyncio.to_thread(process.wait, 30)
    return challenge, paying


async def test_a_paid_post_runs_once_and_its_201_is_replayed_to_every_retry(
    network: Network, bob: LndClient, tmp_path: Path, backend: tuple[Backend, str]
) -> None:
    jobs, upstream = backend
    served = _setup(network, tmp_path, upstream)
    process = await _started(served)
    try:
        async with aiohttp.ClientSession() as http:
            challenge, offer = await _challenge(http, served.url + JOBS, b"render me")
            assert offer.headers["L402-Settle"] == f"on-success; timeout={BACKEND_TIMEOUT}"
            assert jobs.seen[JOBS] == 0  # nothing runs before the payment is held
            authorization = await _pay(bob, challenge)
            assert jobs.seen[JOBS] == 1
            assert jobs.bodies == [b"render me"]
            # The backend was told the paid token, as on any paid request.
            token = json.loads(jobs.token_headers[0])
            assert token["payment_hash"] == _hash(challenge).hex()
            for body in (b"render me", b"a different body"):
                async with http.post(
                    served.url + JOBS, data=body, headers={"Authorization": authorization}
                ) as response:
                    assert response.status == 201, await response.text()
                    assert await response.json() == {"job": 1, "got": "render me"}
            assert jobs.seen[JOBS] == 1  # replayed, never run again
            # The token paid for that request only.
            async with http.post(
                served.url + JOBS + "/other", headers={"Authorization": authorization}
            ) as response:
                assert response.status == 409, await response.text()
        held = await _until_held(served.database, _hash(challenge), HeldState.SETTLED)
        assert held.response is not None
        assert held.response.status == 201
        assert held.request is not None
        assert held.request.body == b""  # the body went once it ran (method and target stay)
        assert held.delivered_at is not None
        assert await _invoice_state(served.database, _hash(challenge)) is InvoiceState.SETTLED
    finally:
        await _stop(process, served.log)


@pytest.mark.parametrize(
    ("path", "failure"),
    [
        ("/fail", "backend failed with 503"),
        ("/slow", f"backend timed out after {BACKEND_TIMEOUT} s"),
    ],
    ids=["503", "timeout"],
)
async def test_a_failed_request_is_refunded_and_costs_the_payer_nothing(
    network: Network,
    bob: LndClient,
    tmp_path: Path,
    backend: tuple[Backend, str],
    path: str,
    failure: str,
) -> None:
    jobs, upstream = backend
    served = _setup(network, tmp_path, upstream)
    process = await _started(served)
    url = served.url + JOBS + path
    try:
        async with (
            aiohttp.ClientSession() as http,
            LndClient(network.alice.settings()) as alice,
        ):
            challenge, _ = await _challenge(http, url, b"job")
            before = await asyncio.to_thread(_local_balance_msat, network.bob)
            await _refused_payment(bob, challenge)
            assert await asyncio.to_thread(_local_balance_msat, network.bob) == before
            assert jobs.seen[JOBS + path] == 1
            held = await _until_held(served.database, _hash(challenge), HeldState.CANCELED)
            assert held.failure == failure
            assert await _invoice_state(served.database, _hash(challenge)) is (
                InvoiceState.CANCELED
            )
            assert (await alice.lookup_invoice(_hash(challenge))).state is InvoiceState.CANCELED
            # The paywall's redeem endpoint tells the payer why.
            async with http.post(
                served.url + "/.well-known/l402/redeem",
                json={"macaroon": challenge.macaroon_b64},
            ) as response:
                assert response.status == 200, await response.text()
                assert await response.json() | {"expires_at": 0, "expires_in": 0} == {
                    "state": "refunded",
                    "failure": failure,
                    "expires_at": 0,
                    "expires_in": 0,
                }
            # A credential made up for the refunded invoice buys nothing: pay again.
            forged = {"Authorization": f"L402 {challenge.macaroon_b64}:{'00' * 32}"}
            async with http.post(url, data=b"job", headers=forged) as response:
                assert response.status == 402, await response.text()
                assert (await response.json())["detail"] == (
                    "payment refunded: the paid request failed"
                )
            assert jobs.seen[JOBS + path] == 1
    finally:
        await _stop(process, served.log)


async def test_a_body_over_the_limit_is_refused_with_the_limit_named(
    network: Network, tmp_path: Path, backend: tuple[Backend, str]
) -> None:
    jobs, upstream = backend
    served = _setup(network, tmp_path, upstream)
    process = await _started(served)
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.post(served.url + JOBS, data=b"x" * (REQUEST_LIMIT + 1)) as response,
        ):
            assert response.status == 413, await response.text()
            assert str(REQUEST_LIMIT) in (await response.json())["detail"]
        assert jobs.seen == Counter()
    finally:
        await _stop(process, served.log)


async def test_a_payment_held_while_the_gateway_is_down_runs_once_it_is_back(
    network: Network, bob: LndClient, tmp_path: Path, backend: tuple[Backend, str]
) -> None:
    jobs, upstream = backend
    served = _setup(network, tmp_path, upstream)
    process = await _started(served)
    async with aiohttp.ClientSession() as http:
        challenge, _ = await _challenge(http, served.url + JOBS, b"while down")
        process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(process.wait, 30)
        # LND holds bob's HTLC on its own: the invoice is a hold invoice.
        paying = asyncio.create_task(_pay(bob, challenge))
        async with LndClient(network.alice.settings()) as alice:
            for _ in range(300):
                if (await alice.lookup_invoice(_hash(challenge))).state is InvoiceState.ACCEPTED:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("bob's payment was never held")
        assert jobs.seen[JOBS] == 0
        process = await _started(served)
        try:
            authorization = await asyncio.wait_for(paying, 60)
            async with http.post(
                served.url + JOBS, headers={"Authorization": authorization}
            ) as response:
                assert response.status == 201, await response.text()
                assert await response.json() == {"job": 1, "got": "while down"}
            assert jobs.seen[JOBS] == 1
        finally:
            await _stop(process, served.log)


async def test_killed_while_the_backend_runs_the_restarted_gateway_cancels_and_never_reruns(
    network: Network, bob: LndClient, tmp_path: Path, backend: tuple[Backend, str]
) -> None:
    jobs, upstream = backend
    served = _setup(network, tmp_path, upstream)
    wait = served.url + JOBS + "/wait"
    async with aiohttp.ClientSession() as http:
        challenge, paying = await _killed_while_running(
            served, http, wait, b"interrupted", lambda c: _refused_payment(bob, c)
        )
        jobs.release.set()  # its answer has nobody to go to now
        process = await _started(served)
        try:
            await asyncio.wait_for(paying, 60)  # bob's payment fails: cancelled
            held = await _until_held(served.database, _hash(challenge), HeldState.CANCELED)
            assert held.failure == "interrupted: the gateway stopped while the backend ran"
            async with LndClient(network.alice.settings()) as alice:
                invoice = await alice.lookup_invoice(_hash(challenge))
            assert invoice.state is InvoiceState.CANCELED
            assert jobs.seen[JOBS + "/wait"] == 1
        finally:
            await _stop(process, served.log)


async def test_killed_after_the_response_was_stored_the_restarted_gateway_settles(
    network: Network, bob: LndClient, tmp_path: Path, backend: tuple[Backend, str]
) -> None:
    jobs, upstream = backend
    served = _setup(network, tmp_path, upstream)
    wait = served.url + JOBS + "/wait"
    async with aiohttp.ClientSession() as http:
        challenge, paying = await _killed_while_running(
            served, http, wait, b"stored", lambda c: _pay(bob, c)
        )
        # What the killed gateway would have written had it died right after storing the
        # backend's answer and before settling.
        store = await SqliteStore.open(served.database)
        try:
            moved = await store.move_held_request(
                _hash(challenge),
                HeldState.SUCCEEDED,
                0.0,
                response=StoredResponse(201, (("Content-Type", "text/plain"),), b"done once"),
            )
        finally:
            await store.close()
        assert moved is not None
        process = await _started(served)
        try:
            authorization = await asyncio.wait_for(paying, 60)  # settled on restart
            async with http.post(wait, headers={"Authorization": authorization}) as response:
                assert response.status == 201, await response.text()
                assert await response.read() == b"done once"
            await _until_held(served.database, _hash(challenge), HeldState.SETTLED)
            assert jobs.seen[JOBS + "/wait"] == 1
        finally:
            jobs.release.set()
            await _stop(process, served.log)


async def test_the_pay_command_reports_a_refund_with_the_backends_status(
    network: Network, tmp_path: Path, backend: tuple[Backend, str]
) -> None:
    _jobs, upstream = backend
    served = _setup(network, tmp_path, upstream)
    process = await _started(served)
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env |= {
            "XDG_CACHE_HOME": str(tmp_path / "cache"),
            "GATEWAY_PAYER_LND_HOST": network.bob.rpc_host,
            "GATEWAY_PAYER_LND_TLS_CERT": str(network.bob.tls_cert),
            "GATEWAY_PAYER_LND_MACAROON": str(network.bob.macaroon("admin")),
        }
        command = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.cli",
            "pay",
            "-d",
            "job",
            served.url + JOBS + "/fail",
            cwd=REPO,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(command.communicate(), 120)
        assert command.returncode != 0, stdout
        assert "you pay only if it succeeds" in stderr.decode()
        assert "refunded: backend failed with 503" in stderr.decode()
    finally:
        await _stop(process, served.log)


async def test_a_third_party_l402_client_gets_the_stored_response_after_paying(
    network: Network, tmp_path: Path, backend: tuple[Backend, str]
) -> None:
    jobs, upstream = backend
    served = _setup(network, tmp_path, upstream)
    process = await _started(served)
    try:
        wallet = BobWallet(BobRest(network.bob))
        async with AsyncL402Client(wallet=wallet) as client:
            response = await client.post(served.url + JOBS, content=b"from l402-requests")
        assert response.status_code == 201, response.text
        assert response.json() == {"job": 1, "got": "from l402-requests"}
        assert len(wallet.paid) == 1
        assert jobs.seen[JOBS] == 1  # run while held; the client's retry got the stored answer
    finally:
        await _stop(process, served.log)


async def test_with_two_workers_every_job_runs_once_whichever_worker_took_it(
    network: Network, bob: LndClient, tmp_path: Path, backend: tuple[Backend, str]
) -> None:
    # Only the first worker runs the executor: the jobs the other one stored are found in
    # the shared store.
    jobs, upstream = backend
    served = _setup(network, tmp_path, upstream, workers=2)
    process = await _started(served)
    try:
        done = 0
        while done < 4 or len(_challenging_workers(served.log)) < 2:
            assert done < 20, "every connection went to one worker"
            # A connection each, so that the kernel spreads them over both workers.
            async with aiohttp.ClientSession() as http:
                path = f"{JOBS}/{done}"
                challenge, _ = await _challenge(http, served.url + path, b"%d" % done)
                authorization = await _pay(bob, challenge)
                async with http.post(
                    served.url + path, headers={"Authorization": authorization}
                ) as response:
                    assert response.status == 201, await response.text()
                    assert await response.json() == {"job": 1, "got": str(done)}
            done += 1
        assert jobs.seen == Counter({f"{JOBS}/{number}": 1 for number in range(done)})
    finally:
        await _stop(process, served.log)


def _challenging_workers(log: Path) -> set[str]:
    """The worker processes that logged a 402 to a job's POST."""
    return {
        line.split()[2]
        for line in log.read_text().splitlines()
        if f"POST {JOBS}/" in line and '" 402 ' in line
    }
