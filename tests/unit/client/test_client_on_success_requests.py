"""Pay on success: a token pays for one whole request (method, target *and body*), through
both HTTP integrations, against a loopback server that plays the gateway: each 402 keeps the
request it answers, a paid token runs that request once and answers every later use of it
with the stored answer, whatever body comes with it (another method or target: 409).

Two jobs POSTed to one URL with different bodies must each pay and each get their own answer,
whether they run at once through one client or one after another with a lost answer between
(the lost one's token is kept, and collects its stored answer when the same job is re-sent).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Literal

import aiohttp
import httpx
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from gateway.client import Budget, L402Client, TokenCache, body_digest
from gateway.client.aiohttp import l402_session
from gateway.client.httpx import L402Auth
from tests.unit.client.client_helpers import FakePayer, fake_clock, make_challenge

SETTLE = "on-success; timeout=30"
Integration = Literal["aiohttp", "httpx"]
INTEGRATIONS: tuple[Integration, ...] = ("aiohttp", "httpx")
Lost = Literal["503", "disconnect"]


@dataclass
class Held:
    """What a 402 kept: the request it answers, the token's secret, and the stored answer."""

    method: str
    target: str
    body: bytes
    preimage: bytes
    answer: dict[str, str] | None = None


@dataclass
class JobsGateway:
    """``/api/jobs`` as a pay-on-success route: 402 (with a new challenge) without a token;
    with one, the held request is run once and its answer replayed."""

    payer: FakePayer
    held: dict[str, Held] = field(default_factory=dict)
    executions: list[bytes] = field(default_factory=list)
    replays: list[tuple[bytes, bytes]] = field(default_factory=list)  # (paid body, body sent)
    challenged: int = 0
    both_challenged: asyncio.Event = field(default_factory=asyncio.Event)
    # The answer to the first use of the token that paid for this body is lost, so.
    lose: dict[bytes, Lost] = field(default_factory=dict)
    url: str = ""

    async def jobs(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        authorization = request.headers.get("Authorization")
        if authorization is None:
            return self._challenge(request, body)
        _, _, credential = authorization.partition(" ")
        macaroon, _, preimage = credential.rpartition(":")
        held = self.held.get(macaroon)
        if held is None or preimage != held.preimage.hex():
            return web.Response(status=401)
        if (request.method, request.path_qs) != (held.method, held.target):
            return web.Response(status=409, text="this token paid for another request")
        if held.answer is None:  # the real gateway runs it while the payment is held
            self.executions.append(held.body)
            held.answer = {"job": held.body.decode()}
            lost = self.lose.pop(held.body, None)
            if lost == "503":
                return web.Response(status=503, text="upstream connection reset")
            if lost == "disconnect":
                assert request.transport is not None
                request.transport.close()
                return web.Response(status=201)
        else:
            self.replays.append((held.body, body))
        return web.json_response(held.answer, status=201)

    def _challenge(self, request: web.Request, body: bytes) -> web.StreamResponse:
        challenge = self.payer.learn(make_challenge(21_000, valid_until=None))
        self.held[challenge.macaroon_b64] = Held(
            request.method, request.path_qs, body, challenge.preimage
        )
        self.challenged += 1
        if self.challenged >= 2:
            self.both_challenged.set()
        headers = CIMultiDict[str]()
        for value in challenge.www_authenticate:
            headers.add("WWW-Authenticate", value)
        headers["L402-Settle"] = SETTLE
        return web.Response(
            status=402,
            body=challenge.body,
            headers=headers,
            content_type="application/problem+json",
        )


@pytest_asyncio.fixture
async def gateway() -> AsyncIterator[JobsGateway]:
    served = JobsGateway(FakePayer())
    app = web.Application()
    app.router.add_route("*", "/api/jobs", served.jobs)
    server = TestServer(app)
    await server.start_server()
    served.url = str(server.make_url("/api/jobs"))
    try:
        yield served
    finally:
        await server.close()


def _client(gateway: JobsGateway, cache: TokenCache | None = None) -> L402Client:
    return L402Client(
        gateway.payer,
        network="regtest",
        budget=Budget(max_price_msat=50_000),
        cache=cache or TokenCache(),
        clock=fake_clock(),
    )


async def _stream(body: bytes) -> AsyncIterator[bytes]:
    for chunk in (body[:3], body[3:]):
        yield chunk


# (status, JSON answer), or None when the connection was lost
Answer = tuple[int, object] | None


@contextlib.asynccontextmanager
async def _poster(
    integration: Integration, client: L402Client, url: str
) -> AsyncIterator[Callable[[bytes, bool], asyncio.Future[Answer]]]:
    """``post(body, stream)``: POST ``body`` (as a stream: an async iterator) to ``url``
    through one session of ``integration`` that pays through ``client``."""
    if integration == "aiohttp":
        async with l402_session(client) as session:

            async def post_aiohttp(body: bytes, stream: bool) -> Answer:
                data = _stream(body) if stream else body
                try:
                    async with session.post(url, data=data) as response:
                        if response.status >= 300:
                            return response.status, await response.text()
                        return response.status, await response.json()
                except aiohttp.ServerDisconnectedError:
                    return None

            yield lambda body, stream: asyncio.ensure_future(post_aiohttp(body, stream))
    else:
        async with httpx.AsyncClient(auth=L402Auth(client)) as http:

            async def post_httpx(body: bytes, stream: bool) -> Answer:
                content = _stream(body) if stream else body
                try:
                    response = await http.post(url, content=content)
                except httpx.RemoteProtocolError:
                    return None
                if response.status_code >= 300:
                    return response.status_code, response.text
                return response.status_code, response.json()

            yield lambda body, stream: asyncio.ensure_future(post_httpx(body, stream))


def _done(body: bytes) -> Answer:
    return 201, {"job": body.decode()}


# -- at once, through one client --------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["bytes", "stream"])
@pytest.mark.parametrize("integration", INTEGRATIONS)
async def test_two_jobs_at_once_each_pay_and_get_their_own_answer(
    gateway: JobsGateway, integration: Integration, stream: bool
) -> None:
    async def both_challenged() -> None:  # job 2's 402 comes before job 1's token exists
        await asyncio.wait_for(gateway.both_challenged.wait(), 5)

    gateway.payer.before_send = both_challenged
    cache = TokenCache()
    client = _client(gateway, cache)
    async with _poster(integration, client, gateway.url) as post:
        answers = await asyncio.gather(post(b"job 1", stream), post(b"job 2", stream))
    assert list(answers) == [_done(b"job 1"), _done(b"job 2")]
    assert len(gateway.payer.calls) == 2
    assert len(client.spending_log) == 2
    assert sorted(gateway.executions) == [b"job 1", b"job 2"]
    assert gateway.replays == []
    assert await cache.tokens() == []  # each token delivered its answer


# -- one after another, with a lost answer between -------------------------------------


@pytest.mark.parametrize("lost", ["503", "disconnect"])
@pytest.mark.parametrize("integration", INTEGRATIONS)
async def test_after_a_lost_answer_another_job_pays_and_the_same_job_collects(
    gateway: JobsGateway, integration: Integration, lost: Lost
) -> None:
    gateway.lose[b"job 1"] = lost
    cache = TokenCache()
    client = _client(gateway, cache)
    async with _poster(integration, client, gateway.url) as post:
        first = await post(b"job 1", False)
        assert first == ((503, "upstream connection reset") if lost == "503" else None)
        [kept] = await cache.tokens()  # kept on purpose: its answer is still owed
        assert kept.paid_body_sha256 == body_digest(b"job 1")

        assert await post(b"job 2", False) == _done(b"job 2")  # pays for itself
        assert len(gateway.payer.calls) == 2
        assert gateway.executions == [b"job 1", b"job 2"]
        assert gateway.replays == []

        assert await post(b"job 1", False) == _done(b"job 1")  # collects, without paying
    assert len(gateway.payer.calls) == 2
    assert gateway.executions == [b"job 1", b"job 2"]
    assert gateway.replays == [(b"job 1", b"job 1")]
    assert await cache.tokens() == []


async def test_an_httpx_stream_body_is_read_so_its_lost_answer_is_collected(
    gateway: JobsGateway,
) -> None:
    gateway.lose[b"job 1"] = "503"
    cache = TokenCache()
    client = _client(gateway, cache)
    async with _poster("httpx", client, gateway.url) as post:
        assert await post(b"job 1", True) == (503, "upstream connection reset")
        assert await post(b"job 2", True) == _done(b"job 2")
        assert len(gateway.payer.calls) == 2
        assert await post(b"job 1", True) == _done(b"job 1")
    assert len(gateway.payer.calls) == 2
    assert gateway.executions == [b"job 1", b"job 2"]
    assert gateway.replays == [(b"job 1", b"job 1")]


async def test_an_aiohttp_stream_body_never_reuses_a_token(gateway: JobsGateway) -> None:
    """The middleware cannot read a stream without consuming it: a token bought for one is
    good for its own retry only, and a stream never goes out with a kept token."""
    cache = TokenCache()
    client = _client(gateway, cache)
    gateway.lose[b"job 1"] = "503"
    async with _poster("aiohttp", client, gateway.url) as post:
        assert await post(b"job 1", False) == (503, "upstream connection reset")
        [kept] = await cache.tokens()
        assert await post(b"job 1", True) == _done(b"job 1")  # the same bytes, unknown: pays
        assert len(gateway.payer.calls) == 2
        assert [t.payment_hash for t in await cache.tokens()] == [kept.payment_hash]

        gateway.lose[b"job 3"] = "503"
        assert await post(b"job 3", True) == (503, "upstream connection reset")
        # No later request could collect that answer with the token: it is not kept.
        assert [t.payment_hash for t in await cache.tokens()] == [kept.payment_hash]
        assert await post(b"job 3", True) == _done(b"job 3")
    assert len(gateway.payer.calls) == 4
    assert gateway.executions == [b"job 1", b"job 1", b"job 3", b"job 3"]
    assert gateway.replays == []


# -- the core, without HTTP ---------------------------------------------------------------


async def test_exchange_and_authorize_pick_a_token_by_the_whole_request() -> None:
    payer = FakePayer()
    cache = TokenCache()
    client = L402Client(
        payer,
        network="regtest",
        budget=Budget(max_price_msat=50_000),
        cache=cache,
        clock=fake_clock(),
    )
    url = "http://api.test/api/jobs?id=1"
    one, two = payer.learn(make_challenge()), payer.learn(make_challenge())
    headers = {"L402-Settle": SETTLE}
    job_1 = body_digest(b"job 1")
    token, paid = await client.authorize(
        url, "POST", one.www_authenticate, one.body, headers=headers, body_sha256=job_1
    )
    assert paid is not None
    assert (token.paid_request, token.paid_body_sha256) == ("POST /api/jobs?id=1", job_1)

    # Another body, and a body not known, pay for their own.
    token_2, paid_2 = await client.authorize(
        url,
        "POST",
        two.www_authenticate,
        two.body,
        headers=headers,
        body_sha256=body_digest(b"job 2"),
    )
    assert paid_2 is not None
    assert token_2.payment_hash == two.payment_hash
    assert (await client.exchange(url, "POST")).authorization is None
    assert (await client.exchange(url, "POST", body_sha256=None)).authorization is None

    # The very same request (an absent body is an empty one) gets its token, unpaid.
    again = await client.exchange(url, "POST", body_sha256=body_digest(b"job 1"))
    assert again.authorization == token.authorization
    three = payer.learn(make_challenge())
    token_again, paid_again = await client.authorize(
        url, "POST", three.www_authenticate, three.body, headers=headers, body_sha256=job_1
    )
    assert (token_again.payment_hash, paid_again) == (one.payment_hash, None)
    assert len(payer.calls) == 2

    empty = payer.learn(make_challenge())
    nothing, _ = await client.authorize(
        url,
        "POST",
        empty.www_authenticate,
        empty.body,
        headers=headers,
        body_sha256=body_digest(None),
    )
    assert nothing.paid_body_sha256 == body_digest(b"")
    found = await cache.find(url, "POST", 0.0, body_digest(b""))
    assert found is not None
    assert found.payment_hash == empty.payment_hash


def test_body_digest() -> None:
    assert body_digest(None) == body_digest(b"")
    assert body_digest(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert body_digest(bytearray(b"job")) == body_digest(memoryview(b"job")) == body_digest(b"job")
    assert body_digest(b"job 1") != body_digest(b"job 2")


async def test_a_pending_payment_covers_only_its_own_request() -> None:
    """After a crash, a payment still in flight is waited for only by the request it pays
    for: a POST of another job neither waits for it nor could use its token."""
    payer = FakePayer()
    payer.in_flight = True  # the payer is still paying when the call breaks
    cache = TokenCache()
    client = L402Client(
        payer,
        network="regtest",
        budget=Budget(max_price_msat=50_000),
        cache=cache,
        clock=fake_clock(),
        in_flight_wait=0.0,
    )
    url = "http://api.test/api/jobs"
    held = payer.learn(make_challenge())
    headers = {"L402-Settle": SETTLE}
    job_1 = body_digest(b"job 1")
    with pytest.raises(Exception, match="connection to the node lost"):
        await client.authorize(
            url, "POST", held.www_authenticate, held.body, headers=headers, body_sha256=job_1
        )
    [pending] = await cache.pending()
    assert pending.paid_body_sha256 == job_1
    assert pending.covers(url, "POST", job_1)
    assert not pending.covers(url, "POST", body_digest(b"job 2"))
    assert not pending.covers(url, "POST", None)
    assert not pending.covers(url, "PUT", job_1)
    assert not pending.covers(url + "?id=2", "POST", job_1)
    assert pending.covers(url)  # the path alone, as before

    payer.in_flight = False
    other = payer.learn(make_challenge())
    token, paid = await client.authorize(
        url,
        "POST",
        other.www_authenticate,
        other.body,
        headers=headers,
        body_sha256=body_digest(b"job 2"),
    )
    assert paid is not None
    assert token.payment_hash == other.payment_hash
