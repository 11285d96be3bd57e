"""The webhook sender against real aiohttp receivers, over the memory store and a fake clock:
signed deliveries, per-endpoint order, backoff by the clock, dead letters and redelivery,
redirects and timeouts; and the example receiver (``gateway.examples_webhooks``)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from gateway.examples_webhooks import webhook_receiver
from gateway.ports import (
    WEBHOOK_EVENT_TYPES,
    DeliveryState,
    InvoiceRecord,
    InvoiceState,
    InvoiceUpdate,
    Msat,
    PaymentHash,
)
from gateway.store.memory import MemoryStore
from gateway.webhooks import (
    RetryPolicy,
    WebhookEndpoint,
    WebhookSender,
    message_id,
    signed_headers,
    verify_delivery,
)
from tests.fakes import NOW, FakeClock

SECRET = "whsec_" + "a2V5LWtleS1rZXkta2V5LWtleS1rZXkta2V5LWtleQ=="  # 32 bytes
TIMEOUT = 5.0
POLICY = RetryPolicy(max_attempts=3, initial_backoff=5.0, max_backoff=60.0, poll_interval=0.02)


@dataclass
class Receiver:
    """Answers each delivery with the next of ``statuses`` (then 204), recording it."""

    statuses: list[int] = field(default_factory=list)
    delay: float = 0.0
    got: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    async def receive(self, request: web.Request) -> web.Response:
        headers = {name.lower(): value for name, value in request.headers.items()}
        self.got.append((headers, await request.read()))
        await asyncio.sleep(self.delay)
        status = self.statuses.pop(0) if self.statuses else 204
        if status == 302:
            raise web.HTTPFound("/elsewhere")
        return web.Response(status=status)

    @property
    def ids(self) -> list[str]:
        return [headers["webhook-id"] for headers, _ in self.got]


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    server = TestServer(app)
    await server.start_server()
    try:
        yield str(server.make_url("/hooks"))
    finally:
        await server.close()


def receiver_app(receiver: Receiver) -> web.Application:
    app = web.Application()
    app.router.add_post("/hooks", receiver.receive)
    app.router.add_post("/elsewhere", receiver.receive)
    return app


def payment_hash(n: int) -> PaymentHash:
    return PaymentHash(hashlib.sha256(b"hook %d" % n).digest())


async def settle(store: MemoryStore, n: int) -> None:
    """A challenge invoice paid: invoice.settled and token.bought."""
    await store.add_invoice(
        InvoiceRecord(
            payment_hash=payment_hash(n),
            payment_request="lnbcrt1fake",
            amount_msat=Msat(1_000),
            token_id=b"t" * 32,
            service="svc",
            method="GET",
            path="/",
            state=InvoiceState.OPEN,
            created_at=NOW,
            expires_at=NOW + 600,
            add_index=n,
        )
    )
    await store.apply_update(
        InvoiceUpdate(payment_hash(n), InvoiceState.SETTLED, n, Msat(1_000), NOW)
    )


async def until(check: Callable[[], Awaitable[bool]], limit: float = TIMEOUT) -> None:
    deadline = asyncio.get_running_loop().time() + limit
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def sending(
    store: MemoryStore,
    endpoints: list[WebhookEndpoint],
    clock: FakeClock,
    policy: RetryPolicy = POLICY,
) -> AsyncIterator[WebhookSender]:
    # What the sender's first pass does: the endpoints start after the newest event, so the
    # test's events come after they exist.
    await store.fan_out_webhook_events({e.name: e.events for e in endpoints}, clock.now(), 10)
    sender = WebhookSender(store, endpoints, policy, clock)
    task = asyncio.create_task(sender.run())
    try:
        yield sender
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def endpoint(name: str, url: str, events: frozenset[str] = WEBHOOK_EVENT_TYPES) -> WebhookEndpoint:
    return WebhookEndpoint(name, url, events, SECRET)


async def sent(store: MemoryStore, receiver: Receiver) -> list[int]:
    """The ids of the events the receiver got, by their webhook-id, in the order it got them;
    each webhook-id is msg_ and the event's random id, never its number."""
    events = await store.list_webhook_events(0, 1000)
    ids = {message_id(event): event.event_id for event in events}
    assert all(len(msg_id) == len("msg_") + 32 for msg_id in ids)
    return [ids[msg_id] for msg_id in receiver.ids]


async def states(store: MemoryStore, name: str) -> list[tuple[str, DeliveryState]]:
    deliveries = await store.list_webhook_deliveries(endpoint=name)
    return [(d.event_type, d.state) for d in reversed(deliveries)]


async def test_each_endpoint_gets_its_events_signed_in_order() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    everything, bought = Receiver(), Receiver()
    async with (
        serving(receiver_app(everything)) as url_all,
        serving(receiver_app(bought)) as url_bought,
        sending(
            store,
            [endpoint("all", url_all), endpoint("bought", url_bought, frozenset({"token.bought"}))],
            clock,
        ),
    ):
        await settle(store, 1)
        await settle(store, 2)
        await until(lambda: _count(everything, 4))
        await until(lambda: _count(bought, 2))
        # The receiver has each request before the sender stores its outcome.
        await until(lambda: _delivered(store, "all", 4))
        await until(lambda: _delivered(store, "bought", 2))
    events = [verify_delivery(SECRET, h, body, now=clock.now()) for h, body in everything.got]
    assert [e["type"] for e in events] == [
        "invoice.settled",
        "token.bought",
        "invoice.settled",
        "token.bought",
    ]
    assert await sent(store, everything) == [1, 2, 3, 4]
    assert await sent(store, bought) == [2, 4]  # the same webhook-id as to the other endpoint
    headers, _ = bought.got[0]
    assert headers["webhook-timestamp"] == str(int(NOW))
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"] == "l402-gateway-webhooks"
    assert (
        await states(store, "all")
        == [
            ("invoice.settled", DeliveryState.DELIVERED),
            ("token.bought", DeliveryState.DELIVERED),
        ]
        * 2
    )


async def _count(receiver: Receiver, n: int) -> bool:
    return len(receiver.got) >= n


async def _recorded(store: MemoryStore, attempts: int) -> bool:
    """The sender has stored the outcome of ``attempts`` attempts (the receiver sees each
    request before the sender records its answer, so counting requests is not enough)."""
    deliveries = await store.list_webhook_deliveries(endpoint="crm")
    return any(delivery.attempts >= attempts for delivery in deliveries)


async def test_a_failure_is_retried_by_the_clock_with_the_same_id() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    receiver = Receiver(statuses=[503, 500])
    async with (
        serving(receiver_app(receiver)) as url,
        sending(store, [endpoint("crm", url, frozenset({"token.bought"}))], clock),
    ):
        await settle(store, 1)
        await until(lambda: _recorded(store, 1))
        await asyncio.sleep(0.2)  # ten polls: not due before the clock moves
        assert len(receiver.got) == 1
        (failed,) = await store.list_webhook_deliveries(endpoint="crm")
        assert (failed.attempts, failed.last_status, failed.next_attempt_at) == (1, 503, NOW + 5)
        assert failed.last_error == "answered 503"
        clock.advance(5)
        await until(lambda: _recorded(store, 2))
        (again,) = await store.list_webhook_deliveries(endpoint="crm")
        assert again.next_attempt_at == clock.now() + 10  # doubled
        clock.advance(10)
        await until(lambda: _delivered(store, "crm", 1))
    assert await sent(store, receiver) == [2] * 3
    (done,) = await store.list_webhook_deliveries(endpoint="crm")
    assert (done.attempts, done.last_status, done.state) == (3, 204, DeliveryState.DELIVERED)
    # Each attempt is signed afresh with its own timestamp.
    stamps = [headers["webhook-timestamp"] for headers, _ in receiver.got]
    assert stamps == [str(int(NOW)), str(int(NOW + 5)), str(int(NOW + 15))]


async def _delivered(store: MemoryStore, name: str, n: int) -> bool:
    return len(await store.list_webhook_deliveries(DeliveryState.DELIVERED, name)) >= n


async def test_a_failing_delivery_holds_back_the_later_ones_of_its_endpoint() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    receiver = Receiver(statuses=[503])
    async with (
        serving(receiver_app(receiver)) as url,
        sending(store, [endpoint("crm", url)], clock),
    ):
        await settle(store, 1)
        await settle(store, 2)
        await until(lambda: _count(receiver, 1))
        await asyncio.sleep(0.2)
        assert await sent(store, receiver) == [1]  # the rest wait behind it
        clock.advance(5)
        await until(lambda: _delivered(store, "crm", 4))
    assert await sent(store, receiver) == [1, 1, 2, 3, 4]


async def test_after_max_attempts_it_is_dead_until_redelivered() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    receiver = Receiver(statuses=[500, 500, 500])
    async with (
        serving(receiver_app(receiver)) as url,
        sending(store, [endpoint("crm", url, frozenset({"token.bought"}))], clock) as sender,
    ):
        await settle(store, 1)
        await until(lambda: _recorded(store, 1))
        clock.advance(5)
        await until(lambda: _recorded(store, 2))
        clock.advance(10)
        await until(lambda: _count(receiver, 3))
        await until(lambda: _dead(store))
        await settle(store, 2)  # the endpoint moves on past the dead one
        await until(lambda: _delivered(store, "crm", 1))
        assert await sent(store, receiver) == [2, 2, 2, 4]
        assert await store.redeliver_webhooks(clock.now()) == 1
        sender.wake()
        await until(lambda: _delivered(store, "crm", 2))
    assert (await sent(store, receiver))[-1] == 2


async def test_a_redelivery_during_the_last_attempt_starts_a_new_round() -> None:
    """The operator redelivers while the last allowed attempt is under way: its failure is
    the first of the new round (DEAD is decided from the attempts stored when it is
    recorded, not those read before it was sent)."""
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    receiver = Receiver(statuses=[500, 500])
    answered: list[int] = []

    async def last_attempt(request: web.Request) -> web.Response:
        if len(receiver.got) < 2:
            return await receiver.receive(request)
        receiver.got.append(({}, await request.read()))
        if len(answered) == 0:
            assert await store.redeliver_webhooks(clock.now(), event_id=2) == 1
            answered.append(500)
            return web.Response(status=500)
        answered.append(204)
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hooks", last_attempt)
    async with (
        serving(app) as url,
        sending(store, [endpoint("crm", url, frozenset({"token.bought"}))], clock),
    ):
        await settle(store, 1)
        await until(lambda: _recorded(store, 1))
        clock.advance(5)
        await until(lambda: _recorded(store, 2))
        clock.advance(10)
        await until(lambda: _count(receiver, 3))  # the third of max_attempts = 3
        await until(lambda: _attempted_once_more(store))
        (again,) = await store.list_webhook_deliveries(endpoint="crm")
        assert (again.state, again.attempts) == (DeliveryState.PENDING, 1)
        assert again.next_attempt_at == clock.now() + 5  # the first retry's backoff
        clock.advance(5)
        await until(lambda: _delivered(store, "crm", 1))
    assert answered == [500, 204]


async def _attempted_once_more(store: MemoryStore) -> bool:
    (delivery,) = await store.list_webhook_deliveries(endpoint="crm")
    # Seen after the third attempt: 2 (before the redelivery), 0 (after it), 1 (recorded).
    return delivery.attempts == 1 or delivery.state is not DeliveryState.PENDING


async def _dead(store: MemoryStore) -> bool:
    return bool(await store.list_webhook_deliveries(DeliveryState.DEAD))


async def test_a_redirect_is_not_followed_and_a_slow_receiver_times_out() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    receiver = Receiver(statuses=[302])
    slow = Receiver(delay=1.0)
    policy = RetryPolicy(max_attempts=1, timeout=0.2, poll_interval=0.02)
    async with (
        serving(receiver_app(receiver)) as url,
        serving(receiver_app(slow)) as slow_url,
        sending(
            store,
            [
                endpoint("moved", url, frozenset({"token.bought"})),
                endpoint("slow", slow_url, frozenset({"token.bought"})),
            ],
            clock,
            policy,
        ),
    ):
        await settle(store, 1)
        await until(lambda: _dead_count(store, 2))
    assert len(receiver.got) == 1  # /elsewhere was never asked
    moved = await store.list_webhook_deliveries(endpoint="moved")
    assert [(d.last_status, d.last_error) for d in moved] == [(302, "answered 302")]
    (timed_out,) = await store.list_webhook_deliveries(endpoint="slow")
    assert (timed_out.last_status, timed_out.last_error) == (None, "no answer within 0.2s")


async def _dead_count(store: MemoryStore, n: int) -> bool:
    return len(await store.list_webhook_deliveries(DeliveryState.DEAD)) >= n


async def test_a_receiver_that_is_down_gets_everything_once_it_is_up() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    receiver = Receiver()
    server = TestServer(receiver_app(receiver))
    await server.start_server()
    url = str(server.make_url("/hooks"))
    port = server.port
    await server.close()  # down: connections refused
    async with sending(store, [endpoint("crm", url)], clock):
        await settle(store, 1)
        await until(lambda: _attempted(store))
        (_, refused) = await store.list_webhook_deliveries(endpoint="crm")
        assert refused.last_status is None
        assert refused.last_error.startswith("cannot connect")
        again = TestServer(receiver_app(receiver), port=port)
        await again.start_server()
        try:
            clock.advance(60)
            await until(lambda: _delivered(store, "crm", 2))
        finally:
            await again.close()
    assert await sent(store, receiver) == [1, 2]


async def _attempted(store: MemoryStore, name: str | None = None) -> bool:
    return any(d.attempts for d in await store.list_webhook_deliveries(endpoint=name))


async def test_a_host_the_resolver_cannot_encode_is_a_failed_attempt_not_a_crash() -> None:
    """A URL made without the configuration's checks (an empty DNS label, which the resolver
    refuses with a UnicodeError): its attempts fail and count, the sender keeps running and
    the other endpoint gets its events."""
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    receiver = Receiver()
    async with serving(receiver_app(receiver)) as url:
        endpoints = [endpoint("bad", "http://hooks..example.com/l402"), endpoint("crm", url)]
        async with sending(store, endpoints, clock):
            await settle(store, 1)
            await until(lambda: _delivered(store, "crm", 2))
            await until(lambda: _attempted(store, "bad"))
    failed = [d for d in await store.list_webhook_deliveries(endpoint="bad") if d.attempts]
    # The idna codec's error: UnicodeError, a UnicodeEncodeError from Python 3.13.
    refusals = {"failed (UnicodeError)", "failed (UnicodeEncodeError)"}
    assert [(d.last_status, d.last_error in refusals) for d in failed] == [(None, True)]


async def test_the_example_receiver_handles_each_delivery_once_and_refuses_forgeries() -> None:
    clock = FakeClock(start=time.time())  # the receiver checks the real clock
    store = MemoryStore(clock=clock)
    handled: list[dict[str, Any]] = []

    async def handle(event: dict[str, Any]) -> None:
        handled.append(event)

    app = webhook_receiver(SECRET, handle, path="/hooks")
    async with (
        serving(app) as url,
        sending(store, [endpoint("crm", url, frozenset({"token.bought"}))], clock),
    ):
        await settle(store, 1)
        await until(lambda: _delivered(store, "crm", 1))
        assert [event["type"] for event in handled] == ["token.bought"]
        assert handled[0]["data"]["payment_hash"] == payment_hash(1).hex()
        # The same delivery again (its answer was lost): handled once, still 204.
        assert await store.redeliver_webhooks(clock.now(), event_id=2) == 1
        await until(lambda: _delivered(store, "crm", 1))
        await asyncio.sleep(0.1)
        (again,) = await store.list_webhook_deliveries(endpoint="crm")
        assert again.state is DeliveryState.DELIVERED
        assert len(handled) == 1
        event = await store.get_webhook_event(2)
        assert event is not None
        async with aiohttp.ClientSession() as http:
            forged = event.payload.replace('"amount_msat":1000', '"amount_msat":9000')
            async with http.post(url, data=forged, headers=_signed(message_id(event))) as answer:
                assert answer.status == 400
                assert "no matching signature" in await answer.text()
    assert len(handled) == 1


async def test_the_example_receiver_runs_a_slow_handler_once_for_its_retries() -> None:
    """The sender gives up on a slow answer and retries while the handler still runs; and a
    body arriving in pieces is read whole."""
    release = asyncio.Event()
    started: list[dict[str, Any]] = []
    handled: list[dict[str, Any]] = []

    async def handle(event: dict[str, Any]) -> None:
        started.append(event)
        await release.wait()
        handled.append(event)

    body = json.dumps({"type": "token.bought", "note": "x" * 6000})
    headers = signed_headers(SECRET, "msg_slow", int(time.time()), body)
    async with serving(webhook_receiver(SECRET, handle, path="/hooks")) as url:
        async with aiohttp.ClientSession() as http:
            timeout = aiohttp.ClientTimeout(total=0.3)
            with pytest.raises(TimeoutError):  # the first delivery's sender times out
                await http.post(url, data=body, headers=headers, timeout=timeout)
            retry = asyncio.ensure_future(http.post(url, data=body, headers=headers))
            await asyncio.sleep(0.2)
            assert not retry.done()  # it waits for the run under way
            release.set()
            async with await retry as answer:
                assert answer.status == 204
            async with http.post(url, data=body, headers=headers) as answer:
                assert answer.status == 204
        assert (len(started), len(handled)) == (1, 1)
        # The body in two writes, as two TCP segments: verified, and handled once.
        host, port = URL(url).host, URL(url).port
        reader, writer = await asyncio.open_connection(host, port)
        head = f"POST /hooks HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        writer.write(head.encode() + b"\r\n" + body[:1400].encode())
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(body[1400:].encode())
        async with asyncio.timeout(5):
            status_line = await reader.readline()
        writer.close()
        assert status_line.startswith(b"HTTP/1.1 204"), status_line
    assert len(handled) == 1


def _signed(msg_id: str) -> dict[str, str]:
    return signed_headers(SECRET, msg_id, int(time.time()), "{}")


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
async def test_any_2xx_delivers(status: int) -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    receiver = Receiver(statuses=[status])
    async with (
        serving(receiver_app(receiver)) as url,
        sending(store, [endpoint("crm", url, frozenset({"token.bought"}))], clock),
    ):
        await settle(store, 1)
        await until(lambda: _delivered(store, "crm", 1))
    (done,) = await store.list_webhook_deliveries(endpoint="crm")
    assert (done.attempts, done.last_status) == (1, status)
