"""What the tips and payment-link regtest tests share: ``l402-gateway serve`` on alice with
``[lnurl]`` and the tip jar ``coffee``, its command line, its store, and bob paying."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from gateway.lnd.client import LndClient
from gateway.lnd.connection import LndConnection
from gateway.lnd.protos import lightning_pb2, lightning_pb2_grpc
from gateway.ports import InvoiceRecord, Msat, Payment, PaymentHash, PaymentLink
from gateway.store import SqliteStore
from regtest.network import Network, Node
from regtest.processes import free_ports, log_tail, wait_for_http
from tests.regtest.gateway_helpers import (
    MAX_FEE,
    bake_gateway_macaroon,
    gateway_command,
    serving,
    start_serve,
    wait_for_invoice,
)

JAR = "coffee"
JAR_DESCRIPTION = "Buy me a coffee"
JAR_MIN_MSAT = 1_000
JAR_MAX_MSAT = 50_000_000
COMMENT_MAX = 50
THANKS = "Thank you for the coffee!"


@dataclass
class TipsGateway:
    """``l402-gateway serve`` with ``[lnurl] base_url`` = its own loopback origin."""

    network: Network
    url: str  # the base_url: http://127.0.0.1:PORT
    database: Path
    config_file: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None
    session: aiohttp.ClientSession = field(default_factory=aiohttp.ClientSession)

    @property
    def address(self) -> str:
        """The tip jar's Lightning Address."""
        return f"{JAR}@{self.url.removeprefix('http://')}"

    async def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``l402-gateway --config F args``, in a thread (the test's loop keeps running)."""
        return await asyncio.to_thread(gateway_command, self.config_file, *args)

    async def cli_json(self, *args: str) -> Any:
        result = await self.cli(*args, "--json")
        assert result.returncode == 0, result.stderr + result.stdout
        return json.loads(result.stdout)

    async def get(self, path: str) -> tuple[int, Any, dict[str, str]]:
        """GET ``path`` (or a full URL): status, the body as JSON (text if it is not), headers."""
        url = path if path.startswith("http") else self.url + path
        async with self.session.get(url) as response:
            text = await response.text()
            try:
                body: Any = json.loads(text)
            except ValueError:
                body = text
            return response.status, body, dict(response.headers)

    async def invoice(self, payment_hash: bytes) -> InvoiceRecord | None:
        store = await SqliteStore.open(self.database)
        try:
            return await store.get_invoice(PaymentHash(payment_hash))
        finally:
            await store.close()

    async def settled(self, payment_hash: bytes) -> InvoiceRecord:
        """The invoice once the gateway has recorded it SETTLED."""
        return await wait_for_invoice(self.database, payment_hash, "SETTLED", limit=15)

    async def add_link(self, link: PaymentLink) -> None:
        """Record ``link`` in the gateway's store (as ``links create`` does)."""
        store = await SqliteStore.open(self.database)
        try:
            await store.add_link(link)
        finally:
            await store.close()

    async def link(self, link_id: str) -> PaymentLink:
        store = await SqliteStore.open(self.database)
        try:
            link = await store.get_link(link_id)
        finally:
            await store.close()
        assert link is not None, link_id
        return link

    async def wait_link(self, link_id: str, paid_count: int, limit: float = 15.0) -> PaymentLink:
        """The link once the store counts ``paid_count`` payments."""
        deadline = time.monotonic() + limit
        while (link := await self.link(link_id)).paid_count < paid_count:
            assert time.monotonic() < deadline, f"{link} not paid {paid_count} times"
            await asyncio.sleep(0.1)
        return link

    def assert_log_clean(self) -> None:
        text = self.log.read_text()
        assert "Traceback" not in text, log_tail(self.log, 80)


def _ok_backend() -> web.Application:
    app = web.Application()

    async def answer(request: web.Request) -> web.Response:
        return web.Response(text="upstream")

    app.router.add_route("*", "/{tail:.*}", answer)
    return app


@contextlib.asynccontextmanager
async def tips_gateway(
    network: Network, workdir: Path, extra: str = ""
) -> AsyncIterator[TipsGateway]:
    """The gateway, started; stopped with SIGTERM at the end (it must exit 0). ``extra`` is
    TOML appended to its config."""
    workdir.mkdir(parents=True, exist_ok=True)
    macaroon = bake_gateway_macaroon(network, workdir / "gateway.macaroon")
    database = workdir / "gateway.db"
    (port,) = free_ports(1)
    url = f"http://127.0.0.1:{port}"
    async with serving(_ok_backend()) as upstream:
        config_file = workdir / "gateway.toml"
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
challenges_per_second = 1000
burst = 1000
[lnurl]
base_url = "{url}"
[[tip_jar]]
name = "{JAR}"
description = "{JAR_DESCRIPTION}"
min = "{JAR_MIN_MSAT // 1000}sat"
max = "{JAR_MAX_MSAT // 1000}sat"
comment_max = {COMMENT_MAX}
success_message = "{THANKS}"
[[routes]]
pattern = "/health"
free = true
{extra}"""
        )
        gateway = TipsGateway(network, url, database, config_file, workdir / "serve.log")
        gateway.process = start_serve(config_file, gateway.log)
        try:
            await wait_for_http(f"{url}/health", gateway.process, gateway.log)
            yield gateway
        finally:
            await gateway.session.close()
            gateway.process.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(gateway.process.wait, 30)
            assert code == 0, log_tail(gateway.log, 60)


async def bob_pays(bob: LndClient, invoice: str) -> Payment:
    """bob pays ``invoice`` to alice, whatever the route; it must succeed."""
    payment = await bob.send_payment(invoice, max_fee_msat=Msat(MAX_FEE), payment_timeout=30)
    assert payment.preimage is not None, payment
    return payment


async def node_invoice(node: Node, payment_hash: bytes) -> lightning_pb2.Invoice:
    """LookupInvoice on ``node``, as LND has it (its description hash included)."""
    connection = LndConnection(node.settings())
    try:
        stub = lightning_pb2_grpc.LightningStub(connection.channel)
        request = lightning_pb2.PaymentHash(r_hash=payment_hash)
        invoice: lightning_pb2.Invoice = await stub.LookupInvoice(
            request, metadata=connection.metadata, timeout=30
        )
        return invoice
    finally:
        await connection.close()
