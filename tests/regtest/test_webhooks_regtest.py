"""Signed webhooks end to end: ``l402-gateway serve`` on real LND, bob paying through carol,
a real receiver that is down, then up; a gateway SIGKILLed with undelivered events; and
deliveries altered or replayed, refused by ``verify_delivery``.

Each paid challenge makes two events (``invoice.settled``, ``token.bought``) on the resource
``invoice:<hash>``; the receiver must get every event the store wrote, each signed, in order.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from gateway import errors, l402
from gateway.lnd.client import LndClient
from gateway.ports import DeliveryState, WebhookDelivery, WebhookEvent
from gateway.store import SqliteStore
from gateway.webhooks import verify_delivery
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

SECRET = "whsec_" + base64.b64encode(b"regtest webhook secret, 32 bytes").decode()
PRICE = 3_000
DOWN_FOR = 30.0  # seconds the receiver is down (the must-hold)


@dataclass
class Receiver:
    """A webhook receiver on a fixed port that can be stopped and started again; it records
    every delivery it gets and answers 204."""

    port: int
    got: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    async def receive(self, request: web.Request) -> web.Response:
        headers = {name.lower(): value for name, value in request.headers.items()}
        self.got.append((headers, await request.read()))
        return web.Response(status=204)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hooks", self.receive)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def ids(self) -> list[str]:
        return [headers["webhook-id"] for headers, _ in self.got]


@dataclass
class Served:
    url: str
    database: Path
    config_file: Path
    log: Path


async def _backend() -> web.Application:
    app = web.Application()

    async def answer(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_route("*", "/{tail:.*}", answer)
    return app


def _setup(network: Network, tmp_path: Path, upstream: str, receiver: Receiver) -> Served:
    (port,) = free_ports(1)
    database = tmp_path / "gateway.db"
    macaroon = bake_gateway_macaroon(network, tmp_path / "gateway.macaroon")
    secret_file = tmp_path / "crm.whsec"
    secret_file.write_text(SECRET + "\n")
    secret_file.chmod(0o600)
    config_file = tmp_path / "gateway.toml"
    config_file.write_text(
        f"""
[server]
listen = "127.0.0.1:{port}"
upstream = "{upstream}"
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
[webhooks]
max_attempts = 100
initial_backoff = 1.0
max_backoff = 4.0
timeout = 2.0
poll_interval = 0.2
[[webhook]]
name = "crm"
url = "{receiver.url}"
events = ["*"]
secret_file = "{secret_file}"
[[routes]]
pattern = "/health"
free = true
[[routes]]
pattern = "/api/paid/*"
service = "paid"
price_msat = {PRICE}
"""
    )
    return Served(f"http://127.0.0.1:{port}", database, config_file, tmp_path / "serve.log")


async def _started(served: Served) -> subprocess.Popen[bytes]:
    process = start_serve(served.config_file, served.log)
    await wait_for_http(f"{served.url}/health", process, served.log)
    return process


async def _stop(process: subprocess.Popen[bytes], served: Served) -> None:
    process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(process.wait, 30) == 0, served.log.read_text()


@contextlib.asynccontextmanager
async def _running(served: Served) -> AsyncIterator[subprocess.Popen[bytes]]:
    process = await _started(served)
    try:
        yield process
    finally:
        if process.poll() is None:
            await _stop(process, served)


async def _buy(http: aiohttp.ClientSession, bob: LndClient, network: Network, url: str) -> str:
    """A paid request; the payment hash (hex) it bought a token with."""
    async with http.get(url) as offer:
        assert offer.status == 402, await offer.text()
        challenge = l402_challenge(offer.headers)
    authorization = await pay(bob, network, challenge)
    async with http.get(url, headers={"Authorization": authorization}) as paid:
        assert paid.status == 200, await paid.text()
    identifier = l402.decode_b64(challenge.macaroon_b64).identifier
    return l402.Identifier.decode(identifier).payment_hash.hex()


async def _outbox(database: Path) -> tuple[list[WebhookEvent], list[WebhookDelivery]]:
    store = await SqliteStore.open(database, read_only=True)
    try:
        return await store.list_webhook_events(0, 10_000), await store.list_webhook_deliveries(
            limit=10_000
        )
    finally:
        await store.close()


async def _until_delivered(database: Path, events: int, limit: float) -> list[WebhookDelivery]:
    deadline = time.monotonic() + limit
    while True:
        _, deliveries = await _outbox(database)
        delivered = [d for d in deliveries if d.state is DeliveryState.DELIVERED]
        if len(delivered) >= events:
            return deliveries
        assert time.monotonic() < deadline, f"{len(delivered)} of {events} delivered"
        await asyncio.sleep(0.2)


def _check_received(receiver: Receiver, events: list[WebhookEvent]) -> None:
    """Every event of the store, each genuine, none lost, in event order (so in order per
    resource); a retry after a lost answer may repeat one, with the same id."""
    # The webhook-id is msg_ and the event's random id (not its number).
    event_of = {f"msg_{event.webhook_id}": event.event_id for event in events}
    verified = {}
    for headers, body in receiver.got:
        genuine = verify_delivery(SECRET, headers, body)
        verified[event_of[headers["webhook-id"]]] = genuine
    assert sorted(verified) == [event.event_id for event in events]  # none lost
    for event in events:
        assert verified[event.event_id] == json.loads(event.payload)
    first_seen = list(dict.fromkeys(event_of[msg_id] for msg_id in receiver.ids()))
    assert first_seen == sorted(first_seen)
    by_resource: dict[str, list[str]] = {}
    for event in events:
        by_resource.setdefault(event.resource, []).append(verified[event.event_id]["type"])
    for kinds in by_resource.values():
        assert kinds == ["invoice.settled", "token.bought"]


async def test_a_receiver_down_for_30s_gets_every_event_in_order_once_up(
    network: Network, bob: LndClient, tmp_path: Path
) -> None:
    receiver = Receiver(free_ports(1)[0])  # not started: connections are refused
    async with serving(await _backend()) as upstream:
        served = _setup(network, tmp_path, upstream, receiver)
        async with _running(served), aiohttp.ClientSession() as http:
            bought = [
                await _buy(http, bob, network, f"{served.url}/api/paid/{n}") for n in range(3)
            ]
            await asyncio.sleep(DOWN_FOR)
            events, deliveries = await _outbox(served.database)
            assert len(events) == 6
            assert all(d.state is DeliveryState.PENDING for d in deliveries)
            retried = max(d.attempts for d in deliveries)
            assert retried >= 5  # backoff 1, 2, 4, 4, ... over 30 s, to the oldest one
            assert deliveries[-1].last_error.startswith("cannot connect")
            await receiver.start()
            try:
                await _until_delivered(served.database, 6, limit=30)
            finally:
                await receiver.stop()
            async with http.get(f"{served.url}/.well-known/l402/ready") as ready:
                readiness = await ready.text()
    _check_received(receiver, events)
    paid = [
        verify_delivery(SECRET, headers, body)["data"]["payment_hash"]
        for headers, body in receiver.got
        if headers["webhook-id"]
        in {f"msg_{e.webhook_id}" for e in events if e.type == "token.bought"}
    ]
    assert list(dict.fromkeys(paid)) == bought
    assert "l402-webhook-sender: running" in readiness


async def test_events_undelivered_when_serve_is_killed_are_delivered_after_restart(
    network: Network, bob: LndClient, tmp_path: Path
) -> None:
    receiver = Receiver(free_ports(1)[0])
    async with serving(await _backend()) as upstream:
        served = _setup(network, tmp_path, upstream, receiver)
        process = await _started(served)
        try:
            async with aiohttp.ClientSession() as http:
                for n in range(2):
                    await _buy(http, bob, network, f"{served.url}/api/paid/{n}")
        finally:
            process.send_signal(signal.SIGKILL)
            await asyncio.to_thread(process.wait, 30)
        events, deliveries = await _outbox(served.database)
        assert len(events) == 4
        assert not any(d.state is DeliveryState.DELIVERED for d in deliveries)
        await receiver.start()
        try:
            async with _running(served):
                await _until_delivered(served.database, 4, limit=30)
        finally:
            await receiver.stop()
    _check_received(receiver, events)


async def test_an_altered_or_replayed_delivery_is_rejected(
    network: Network, bob: LndClient, tmp_path: Path
) -> None:
    receiver = Receiver(free_ports(1)[0])
    await receiver.start()
    try:
        async with serving(await _backend()) as upstream:
            served = _setup(network, tmp_path, upstream, receiver)
            async with _running(served), aiohttp.ClientSession() as http:
                await _buy(http, bob, network, f"{served.url}/api/paid/x")
                await _until_delivered(served.database, 2, limit=30)
    finally:
        await receiver.stop()
    headers, body = receiver.got[-1]
    event = verify_delivery(SECRET, headers, body)  # genuine, and fresh
    assert event["type"] == "token.bought"
    assert event["data"]["amount_msat"] == PRICE
    tampered = body.replace(b'"amount_msat":%d' % PRICE, b'"amount_msat":1')
    assert tampered != body
    with pytest.raises(errors.WebhookRejected, match="no matching signature"):
        verify_delivery(SECRET, headers, tampered)
    other_id = {**headers, "webhook-id": "msg_999"}
    with pytest.raises(errors.WebhookRejected, match="no matching signature"):
        verify_delivery(SECRET, other_id, body)
    sent = int(headers["webhook-timestamp"])
    # The same genuine delivery, captured and sent again ten minutes later.
    with pytest.raises(errors.WebhookRejected, match="outside the tolerance"):
        verify_delivery(SECRET, headers, body, now=sent + 600)
    # A replay with a fresh timestamp but the old signature does not match.
    with pytest.raises(errors.WebhookRejected, match="no matching signature"):
        verify_delivery(
            SECRET, {**headers, "webhook-timestamp": str(sent + 60)}, body, now=sent + 60
        )
