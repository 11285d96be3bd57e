"""Shared pieces of the gateway's regtest tests: configs on the network, paying a 402."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import select
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from multidict import CIMultiDictProxy

from gateway import l402
from gateway.config import (
    Config,
    L402Config,
    LndConfig,
    RateLimitConfig,
    RouteConfig,
    ServerConfig,
    StoreConfig,
)
from gateway.lnd.client import LndClient
from gateway.ports import InvoiceRecord, Msat, PaymentHash
from gateway.store import SqliteStore
from regtest.network import CHANNEL_SAT, Network

REPO = Path(__file__).resolve().parents[2]
MAX_FEE = Msat(10_000)
# More than the channel reserve of one of alice's channels (1% of 10 M sat), plus a margin.
LIQUIDITY = Msat((CHANNEL_SAT // 100 + 100_000) * 1000)
PREMIUM_PRICE = 10_000
ROUTES = (
    RouteConfig(pattern="/health", free=True),
    RouteConfig(
        pattern="/api/premium/*",
        price_msat=PREMIUM_PRICE,
        service="premium",
        capabilities=("read",),
        lifetime=3600,
    ),
    RouteConfig(pattern="/api/quote", price_function="gateway.examples:quote_price"),
    RouteConfig(pattern="/api/echo", price_msat=5_000, service="echo"),
)


class OffsetClock:
    """Real time plus an offset the test can move forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> float:
        return time.time() + self.offset


def bake_gateway_macaroon(network: Network, path: Path) -> Path:
    """The least-privilege macaroon the README recommends, baked on alice with lncli."""
    if not path.exists():
        subprocess.run(  # noqa: S603 - the cached lncli binary and fixed arguments
            [
                *network.alice.lncli().split(),
                "bakemacaroon",
                "invoices:read",
                "invoices:write",
                "offchain:read",  # ListChannels: inbound liquidity
                f"--save_to={path}",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        path.chmod(0o600)  # lncli writes it 0644; the README says to make it private
    return path


def bake_payment_macaroon(network: Network, path: Path) -> Path:
    """A macaroon of alice's that may send payments (withdrawals, payouts) and read the node's
    info and payments, as the README tells operators to bake."""
    if not path.exists():
        subprocess.run(  # noqa: S603 - the cached lncli binary and fixed arguments
            [
                *network.alice.lncli().split(),
                "bakemacaroon",
                "offchain:read",
                "offchain:write",
                "info:read",
                f"--save_to={path}",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        path.chmod(0o600)
    return path


def gateway_config(
    network: Network,
    database: Path,
    *,
    listen: str = "127.0.0.1:0",
    upstream: str | None = None,
    rate_limit: RateLimitConfig | None = None,
) -> Config:
    return Config(
        server=ServerConfig(listen=listen, upstream=upstream),
        lnd=LndConfig(
            host=network.alice.rpc_host,
            tls_cert=network.alice.tls_cert,
            macaroon=bake_gateway_macaroon(network, database.parent / "gateway.macaroon"),
        ),
        store=StoreConfig(url=f"sqlite://{database}"),  # an absolute path: sqlite:///abs
        # No caching: a revocation is seen by the very next request.
        l402=L402Config(root_key_cache_seconds=0),
        rate_limit=rate_limit or RateLimitConfig(),
        routes=ROUTES,
    )


def config_toml(config: Config) -> str:
    """The same configuration as a TOML file, for the ``l402-gateway`` command."""
    rate = config.rate_limit
    lines = [
        "[server]",
        f'listen = "{config.server.listen}"',
        f'upstream = "{config.server.upstream}"',
        "[lnd]",
        f'host = "{config.lnd.host}"',
        f'tls_cert = "{config.lnd.tls_cert}"',
        f'macaroon = "{config.lnd.macaroon}"',
        "[store]",
        f'url = "{config.store.url}"',
        "[l402]",
        f"root_key_cache_seconds = {config.l402.root_key_cache_seconds}",
        "[rate_limit]",
        f"challenges_per_second = {rate.challenges_per_second}",
        f"burst = {rate.burst}",
    ]
    for route in config.routes:
        lines += ["[[routes]]", f'pattern = "{route.pattern}"', f'service = "{route.service}"']
        if route.free:
            lines.append("free = true")
        if route.price_msat is not None:
            lines.append(f"price_msat = {route.price_msat}")
        if route.price_function is not None:
            lines.append(f'price_function = "{route.price_function}"')
        if route.capabilities:
            caps = ", ".join(f'"{cap}"' for cap in route.capabilities)
            lines.append(f"capabilities = [{caps}]")
    return "\n".join(lines) + "\n"


def l402_challenge(headers: CIMultiDictProxy[str]) -> l402.Challenge:
    """The L402 one of a 402's WWW-Authenticate headers (the other is LSAT)."""
    values = headers.getall("WWW-Authenticate")
    assert sorted(value.split(" ", 1)[0] for value in values) == ["L402", "LSAT"]
    (value,) = [v for v in values if v.startswith("L402 ")]
    return l402.parse_challenge(value)


async def pay(bob: LndClient, network: Network, challenge: l402.Challenge) -> str:
    """Pay the challenge's invoice from bob via carol; return the Authorization value."""
    payment = await bob.send_payment(
        challenge.invoice,
        max_fee_msat=MAX_FEE,
        payment_timeout=30,
        last_hop_pubkey=network.carol.pubkey,
    )
    assert payment.route == (network.carol.pubkey, network.alice.pubkey)
    assert payment.preimage is not None
    return f"L402 {challenge.macaroon_b64}:{payment.preimage.hex()}"


async def wait_for_invoice(
    database: Path, payment_hash: bytes, state: str, limit: float = 10.0
) -> InvoiceRecord:
    """Poll the store until the invoice reaches ``state``."""
    store = await SqliteStore.open(database)
    try:
        deadline = time.monotonic() + limit
        while True:
            record = await store.get_invoice(PaymentHash(payment_hash))
            if record is not None and record.state.value == state:
                return record
            if time.monotonic() > deadline:
                raise AssertionError(f"invoice {payment_hash.hex()} not {state}: {record}")
            await asyncio.sleep(0.05)
    finally:
        await store.close()


async def give_alice_liquidity(network: Network) -> None:
    """alice, the gateway's node, only ever receives in this network: her channels start
    empty on her side, and she can send nothing until her balance on one exceeds its
    channel reserve (1% of the capacity). bob pays her ``LIQUIDITY`` past it."""
    async with (
        LndClient(network.alice.settings()) as alice,
        LndClient(network.bob.settings()) as bob,
    ):
        invoice = await alice.add_invoice(LIQUIDITY, "liquidity for withdrawals", 600)
        await bob.send_payment(invoice.payment_request, max_fee_msat=MAX_FEE, payment_timeout=30)


def allow_open_files(needed: int) -> None:
    """Raise this process's soft open-file limit to ``needed`` (within the hard one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        # Raised before the gateway starts, so it inherits the limit too.
        soft = min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert soft >= needed, f"RLIMIT_NOFILE {soft} < {needed}: raise the hard limit"


@dataclass(frozen=True)
class Ran:
    """A finished ``l402-gateway`` subprocess: its exit code and output."""

    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


async def bob_runs(
    network: Network, *args: str, cache: Path | None = None, node: bool = True
) -> Ran:
    """``l402-gateway ARGS`` (``pay ...``, ``credit ...``) as a subprocess paying with bob's
    node (given by the environment; ``node=False``: none), ``cache`` its XDG_CACHE_HOME
    (where the token cache goes) when given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    if cache is not None:
        env["XDG_CACHE_HOME"] = str(cache)
    if node:
        bob = network.bob
        env["GATEWAY_PAYER_LND_HOST"] = bob.rpc_host
        env["GATEWAY_PAYER_LND_TLS_CERT"] = str(bob.tls_cert)
        env["GATEWAY_PAYER_LND_MACAROON"] = str(bob.macaroon("admin"))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        *args,
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return Ran(process.returncode, stdout.decode(), stderr.decode())


def gateway_command(config_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "gateway.cli", "--config", str(config_file), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def start_serve(config_file: Path, log: Path, *options: str) -> subprocess.Popen[bytes]:
    """``l402-gateway [options] --config FILE serve``, its output appended to ``log``."""
    with log.open("ab") as output:
        return subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "gateway.cli", *options, "--config", str(config_file), "serve"],
            cwd=REPO,
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """Serve ``app`` on a free loopback port for the block; yields its base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    listener = socket.create_server(("127.0.0.1", 0))
    await web.SockSite(runner, listener).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        await _accept_queued(listener)
        await runner.cleanup()


async def _accept_queued(listener: socket.socket) -> None:
    """Let the loop take the connections still queued on ``listener``: asyncio leaves a
    connection it accepted in the tick its server closes without a transport, its socket
    never closed (a ResourceWarning, an error here, in whatever test runs when it is
    collected). A peer that went away before the server still leaves its connection queued."""
    for _ in range(1_000):  # bounded: a peer that goes on connecting must not hang the test
        if not select.select([listener], [], [], 0)[0]:
            break
        await asyncio.sleep(0)
    await asyncio.sleep(0)  # the accepted ones get their transports in the next tick
