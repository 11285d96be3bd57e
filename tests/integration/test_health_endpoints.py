"""Liveness and readiness of the reverse proxy, over the fakes: what each check reports, that
the paths are the gateway's own (never priced nor forwarded), and that probes are cached."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway import errors
from gateway.health import LIVE_PATH, READY_PATH, HealthSlot, Readiness
from gateway.ports import Invoice, Msat
from gateway.pricing import Pricing, Rule
from gateway.service import L402Service
from gateway.store.memory import MemoryStore
from gateway.supervisor import Supervisor
from gateway.watcher import InvoiceWatcher
from gateway.web.proxy import build_proxy
from tests.fakes import FakeClock, FakeInvoiceBackend

TIMEOUT = 5.0
# Every path is priced: a health path answered 200 was not.
EVERYTHING = Rule("/*", price_msat=Msat(1_000), service="all")


class FailingStore(MemoryStore):
    """A memory store whose writes can be made to fail, as a full disk or a lost database."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = False

    async def revoke_token(self, token_id: bytes) -> bool:
        if self.failing:
            raise errors.StoreError("database is locked")
        return await super().revoke_token(token_id)


@dataclass
class Gateway:
    """A ``GatewayFactory`` as ``running_gateway`` builds it, over the fakes, with readiness."""

    watch: bool = True
    cache_seconds: float = 0.0
    initial_backoff: float = 0.01
    clock: FakeClock = field(default_factory=FakeClock)
    store: FailingStore = field(default_factory=FailingStore)
    health: HealthSlot = field(default_factory=HealthSlot)
    backend: FakeInvoiceBackend = field(init=False)
    watcher: InvoiceWatcher = field(init=False)

    def __post_init__(self) -> None:
        self.backend = FakeInvoiceBackend(self.clock)
        self.watcher = InvoiceWatcher(self.backend, self.store, initial_backoff=0.01)

    @contextlib.asynccontextmanager
    async def __call__(self) -> AsyncIterator[L402Service]:
        service = L402Service(
            pricing=Pricing([EVERYTHING]),
            backend=self.backend,
            store=self.store,
            clock=self.clock,
        )
        backoff = self.initial_backoff
        async with Supervisor(initial_backoff=backoff, max_backoff=max(backoff, 1.0)) as tasks:
            caught_up = None
            if self.watch:
                tasks.start("l402-invoice-watcher", self.watcher.run)
                caught_up = self.watcher.connected.is_set
            self.health.readiness = Readiness(
                self.backend,
                self.store,
                tasks.health,
                watcher_caught_up=caught_up,
                cache_seconds=self.cache_seconds,
                timeout=1.0,
            )
            try:
                yield service
            finally:
                self.health.readiness = None


@dataclass
class Proxy:
    gateway: Gateway
    session: aiohttp.ClientSession
    base: str
    upstream_hits: list[str]

    async def get(self, path: str, method: str = "GET") -> tuple[int, Any]:
        async with self.session.request(method, self.base + path) as response:
            body = await response.json() if response.content_type == "application/json" else None
            return response.status, body

    async def wait_ready(self) -> None:
        async with asyncio.timeout(TIMEOUT):
            while (await self.get(READY_PATH))[0] != 200:  # noqa: ASYNC110 - polling HTTP
                await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running_proxy(gateway: Gateway) -> AsyncIterator[Proxy]:
    hits: list[str] = []

    async def anything(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(text="upstream")

    upstream = web.Application()
    upstream.router.add_route("*", "/{tail:.*}", anything)
    async with TestServer(upstream) as backend_server:
        app = build_proxy(str(backend_server.make_url("/")), gateway, health=gateway.health)
        async with TestServer(app) as proxy_server, aiohttp.ClientSession() as session:
            yield Proxy(gateway, session, str(proxy_server.make_url("")).rstrip("/"), hits)


@pytest_asyncio.fixture
async def proxy() -> AsyncGenerator[Proxy, None]:
    async with running_proxy(Gateway()) as running:
        yield running


async def test_ready_when_every_check_passes(proxy: Proxy) -> None:
    await proxy.wait_ready()
    status, body = await proxy.get(READY_PATH)
    assert status == 200
    assert body["status"] == "ready"
    assert set(body["checks"]) == {"lnd", "store", "watcher", "tasks"}
    assert all(check["ok"] for check in body["checks"].values())
    assert body["checks"]["watcher"]["detail"] == "running, caught up"
    assert (await proxy.get(LIVE_PATH)) == (200, {"status": "live"})
    assert proxy.upstream_hits == []  # never forwarded


async def test_lnd_down_is_not_ready_but_live(proxy: Proxy) -> None:
    await proxy.wait_ready()
    proxy.gateway.backend.unavailable = True
    status, body = await proxy.get(READY_PATH)
    assert status == 503
    assert body["status"] == "not ready"
    assert body["checks"]["lnd"] == {"ok": False, "detail": "BackendUnavailable: fake node is down"}
    assert body["checks"]["store"]["ok"]
    assert await proxy.get(LIVE_PATH) == (200, {"status": "live"})
    # Back up: ready again (the watcher reconnects too).
    proxy.gateway.backend.unavailable = False
    await proxy.wait_ready()
    assert proxy.upstream_hits == []


async def test_store_failing_is_not_ready(proxy: Proxy) -> None:
    await proxy.wait_ready()
    proxy.gateway.store.failing = True
    status, body = await proxy.get(READY_PATH)
    assert status == 503
    assert body["checks"]["store"] == {"ok": False, "detail": "StoreError: database is locked"}
    assert body["checks"]["lnd"]["ok"]
    proxy.gateway.store.failing = False
    assert (await proxy.get(READY_PATH))[0] == 200


async def test_crashed_watcher_is_not_ready() -> None:
    # Restarted only after a long backoff: the test sees it backing off.
    gateway = Gateway(initial_backoff=30.0)
    crashed = asyncio.Event()

    def subscribe(add_index: int, settle_index: int) -> AsyncIterator[Invoice]:
        crashed.set()
        raise KeyError("unexpected")

    async with running_proxy(gateway) as proxy:
        await proxy.wait_ready()
        gateway.backend.subscribe_invoices = subscribe  # type: ignore[method-assign,assignment]
        gateway.backend.disconnect()  # the live stream breaks; the resubscription crashes
        await asyncio.wait_for(crashed.wait(), TIMEOUT)
        async with asyncio.timeout(TIMEOUT):
            while True:
                status, body = await proxy.get(READY_PATH)
                if status == 503:
                    break
                await asyncio.sleep(0.01)
        watcher = body["checks"]["watcher"]
        assert watcher["ok"] is False
        assert watcher["detail"] == "backing off; last error KeyError: 'unexpected'"
        assert body["checks"]["lnd"]["ok"]
        assert body["checks"]["store"]["ok"]


async def test_watcher_not_caught_up_is_not_ready() -> None:
    gateway = Gateway()
    gateway.backend.fail_subscriptions = 1_000_000  # subscribing keeps failing
    async with running_proxy(gateway) as proxy:
        status, body = await proxy.get(READY_PATH)
        assert status == 503
        assert body["checks"]["watcher"]["ok"] is False
        assert body["checks"]["watcher"]["detail"].startswith("not caught up")
        gateway.backend.fail_subscriptions = 0
        await proxy.wait_ready()


async def test_a_worker_without_the_watcher_does_not_report_it_down() -> None:
    async with running_proxy(Gateway(watch=False)) as proxy:
        status, body = await proxy.get(READY_PATH)
        assert status == 200
        assert body["checks"]["watcher"] == {
            "ok": True,
            "detail": "not run in this process (another worker runs it)",
        }


async def test_probes_are_cached_and_shared() -> None:
    gateway = Gateway(cache_seconds=60.0)
    async with running_proxy(gateway) as proxy:
        await proxy.wait_ready()
        before = gateway.backend.lookups
        answers = await asyncio.gather(*(proxy.get(READY_PATH) for _ in range(50)))
        assert {status for status, _ in answers} == {200}
        assert gateway.backend.lookups == before  # all from the cache
        # A node that went down meanwhile shows only when the cache runs out.
        gateway.backend.unavailable = True
        assert (await proxy.get(READY_PATH))[0] == 200


async def test_concurrent_probes_share_one_lookup() -> None:
    gateway = Gateway(cache_seconds=60.0)
    async with running_proxy(gateway) as proxy:
        # The watcher's own lookup (proving the node answers) is done first.
        await asyncio.wait_for(gateway.watcher.connected.wait(), TIMEOUT)
        before = gateway.backend.lookups
        await asyncio.gather(*(proxy.get(READY_PATH) for _ in range(20)))
        assert gateway.backend.lookups - before == 1


@pytest.mark.parametrize("path", [LIVE_PATH, READY_PATH])
async def test_health_paths_refuse_other_methods(proxy: Proxy, path: str) -> None:
    status, body = await proxy.get(path, method="POST")
    assert status == 405
    assert body == {"error": "use GET or HEAD"}
    async with proxy.session.head(proxy.base + LIVE_PATH) as response:
        assert response.status == 200
    assert proxy.upstream_hits == []


async def test_other_paths_are_still_priced(proxy: Proxy) -> None:
    status, _ = await proxy.get("/.well-known/l402/other")
    assert status == 402
