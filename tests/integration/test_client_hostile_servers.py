"""The paying clients (aiohttp middleware, httpx auth) against servers that try to take more
than a request's price: redirects that ask again after each payment, a redirect to another
site's 402, endless 402 bodies, tokens that expired before they were offered."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestServer

from gateway.client import (
    Budget,
    BudgetExceeded,
    ChallengeError,
    InvoiceRejected,
    L402Client,
    TokenCache,
)
from gateway.client.aiohttp import l402_session
from gateway.client.httpx import L402Auth
from gateway.client.offer import MAX_PROBLEM_BYTES
from tests.unit.client.client_helpers import Challenge, FakePayer, make_challenge

PRICE = 10_000
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def challenge(payer: FakePayer, amount: int = PRICE, valid_for: int = 3600) -> web.Response:
    """A 402 with a fresh challenge the payer can pay."""
    now = time.time()
    offer: Challenge = payer.learn(
        make_challenge(amount, created_at=now, valid_until=int(now) + valid_for)
    )
    headers = [("WWW-Authenticate", value) for value in offer.www_authenticate]
    return web.Response(
        status=402, body=offer.body, content_type="application/json", headers=headers
    )


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    server = TestServer(app)
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


def client_of(payer: FakePayer) -> L402Client:
    return L402Client(
        payer, network="regtest", budget=Budget(max_price_msat=PRICE), cache=TokenCache()
    )


async def paying_get(
    client: L402Client, route: str, handler: Handler, path: str
) -> tuple[str, ClientResponse]:
    """The server's URL, and its released answer to a GET of ``path`` through the paying
    aiohttp session, the server having ``handler`` on ``route``."""
    app = web.Application()
    app.router.add_get(route, handler)
    async with serving(app) as url, l402_session(client) as session:
        response = await session.get(url + path)
        response.release()
    return url, response


@pytest.mark.parametrize("header", ["Location", "URI"])  # aiohttp follows URI without Location
async def test_a_redirect_after_each_payment_is_not_paid_again(header: str) -> None:
    """aiohttp runs the middleware once per redirect hop: a server that answers every paid
    request with a redirect to a new 402 gets one payment, the caller its last 402."""
    payer = FakePayer(fee_msat=0)

    async def hop(request: web.Request) -> web.StreamResponse:
        if "Authorization" not in request.headers:
            return challenge(payer)
        return web.Response(
            status=302, headers={header: f"/hop{int(request.match_info['n']) + 1}/x"}
        )

    client = client_of(payer)
    url, response = await paying_get(client, "/hop{n}/x", hop, "/hop0/x")
    assert response.status == 402
    assert [str(step.url) for step in response.history] == [url + "/hop0/x"]
    assert len(payer.calls) == 1
    assert client.spent_msat == PRICE


def drop(request: web.Request) -> web.StreamResponse:
    """Close the connection without an answer: aiohttp's client resends an idempotent
    request once, through the middlewares again."""
    assert request.transport is not None
    request.transport.close()
    return web.Response()


async def test_a_resend_after_a_dropped_connection_is_not_paid_again() -> None:
    """The paid retry's connection is closed; aiohttp resends it, and the server refuses
    the token with a new 402: one payment, the caller gets that 402."""
    payer = FakePayer(fee_msat=0)
    paid_requests = 0

    async def refuses(request: web.Request) -> web.StreamResponse:
        nonlocal paid_requests
        if "Authorization" not in request.headers:
            return challenge(payer)
        paid_requests += 1
        return drop(request) if paid_requests == 1 else challenge(payer)

    _, response = await paying_get(client_of(payer), "/x", refuses, "/x")
    assert (response.status, paid_requests) == (402, 2)
    assert len(payer.calls) == 1


async def test_a_dropped_connection_on_a_paid_redirect_is_not_paid_again() -> None:
    """Every paid request is redirected to a new 402, whose first request's connection is
    closed: the resend of the redirect pays no more than the redirect itself."""
    payer = FakePayer(fee_msat=0)
    dropped: set[str] = set()

    async def hop(request: web.Request) -> web.StreamResponse:
        n = request.match_info["n"]
        if n != "0" and n not in dropped:
            dropped.add(n)
            return drop(request)
        if "Authorization" not in request.headers:
            return challenge(payer)
        raise web.HTTPFound(f"/hop{int(n) + 1}/x")

    _, response = await paying_get(client_of(payer), "/hop{n}/x", hop, "/hop0/x")
    assert response.status == 402
    assert dropped == {"1"}
    assert len(payer.calls) == 1


async def test_a_task_pays_again_for_its_next_request() -> None:
    """A resend is told apart from the caller's next request: after a paid request's
    connection dropped and its resend was served, the same task's next request for a
    single-use token pays again."""
    payer = FakePayer(fee_msat=0)
    answered = 0

    async def single_use(request: web.Request) -> web.StreamResponse:
        nonlocal answered
        if "Authorization" not in request.headers or answered == 2:
            return challenge(payer)
        answered += 1
        return drop(request) if answered == 1 else web.Response(text="content")

    app = web.Application()
    app.router.add_get("/x", single_use)
    async with serving(app) as url, l402_session(client_of(payer)) as session:
        first = await session.get(url + "/x")
        assert (first.status, await first.text()) == (200, "content")
        assert len(payer.calls) == 1
        second = await session.get(url + "/x")
        second.release()
    assert len(payer.calls) == 2


async def test_httpx_never_pays_a_402_reached_through_a_redirect() -> None:
    """With follow_redirects the 402 is the last URL's: paying it would send that site's
    token to the first one."""
    payer = FakePayer(fee_msat=0)
    sent_to_first: list[str] = []

    async def paid(_request: web.Request) -> web.StreamResponse:
        return challenge(payer)

    other = web.Application()
    other.router.add_get("/paid", paid)
    async with serving(other) as other_url:

        async def link(request: web.Request) -> web.StreamResponse:
            sent_to_first.extend(request.headers.getall("Authorization", []))
            raise web.HTTPFound(other_url + "/paid")

        first = web.Application()
        first.router.add_get("/link", link)
        async with (
            serving(first) as url,
            httpx.AsyncClient(auth=L402Auth(client_of(payer)), follow_redirects=True) as http,
        ):
            response = await http.get(url + "/link")
    assert response.status_code == 402
    assert (payer.calls, sent_to_first) == ([], [])


async def test_an_endless_402_body_is_not_read_to_its_end() -> None:
    """The offer reads 64 KiB of a 402's body at most: an endless one is refused (here over
    budget) instead of filling memory."""
    payer = FakePayer(fee_msat=0)

    async def endless(request: web.Request) -> web.StreamResponse:
        offer = challenge(payer, amount=10 * PRICE)
        response = web.StreamResponse(status=402, headers=offer.headers)
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):
            while True:
                await response.write(b"x" * 65_536)
        return response

    app = web.Application()
    app.router.add_get("/x", endless)
    async with serving(app) as url, l402_session(client_of(payer)) as session:
        with pytest.raises(BudgetExceeded):
            await asyncio.wait_for(session.get(url + "/x"), 10)
    assert payer.calls == []


async def test_httpx_refuses_a_402_body_larger_than_an_offer_reads() -> None:
    """httpx reads a retried response's body whole itself: a large one is refused unread."""
    payer = FakePayer(fee_msat=0)

    async def large(_request: web.Request) -> web.StreamResponse:
        offer = challenge(payer)
        offer.body = b" " * (MAX_PROBLEM_BYTES + 1)
        return offer

    app = web.Application()
    app.router.add_get("/x", large)
    async with serving(app) as url, httpx.AsyncClient(auth=L402Auth(client_of(payer))) as http:
        with pytest.raises(ChallengeError, match="over 65536"):
            await http.get(url + "/x")
    assert payer.calls == []


async def test_httpx_stops_reading_a_chunked_402_body_at_what_an_offer_reads() -> None:
    """Without a Content-Length (chunked, or compressed: the length is not the body's) the
    body is read up to the limit and refused there, not read to its end."""
    payer = FakePayer(fee_msat=0)
    written = 0

    async def endless(request: web.Request) -> web.StreamResponse:
        nonlocal written
        offer = challenge(payer)
        response = web.StreamResponse(status=402, headers=offer.headers)
        response.enable_chunked_encoding()
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):
            while written < 100 * MAX_PROBLEM_BYTES:
                await response.write(b" " * 65_536)
                written += 65_536
        return response

    app = web.Application()
    app.router.add_get("/x", endless)
    async with serving(app) as url, httpx.AsyncClient(auth=L402Auth(client_of(payer))) as http:
        with pytest.raises(ChallengeError, match="over 65536 bytes; not read further"):
            await asyncio.wait_for(http.get(url + "/x"), 10)
    assert payer.calls == []
    assert written < 100 * MAX_PROBLEM_BYTES


async def test_httpx_pays_a_chunked_402() -> None:
    """A chunked 402 within the limit is read once, by the offer, and then by httpx from
    what the offer read."""
    payer = FakePayer(fee_msat=0)

    async def chunked(request: web.Request) -> web.StreamResponse:
        if "Authorization" in request.headers:
            return web.Response(text="content")
        offer = challenge(payer)
        response = web.StreamResponse(status=402, headers=offer.headers)
        response.enable_chunked_encoding()
        await response.prepare(request)
        assert isinstance(offer.body, bytes)
        await response.write(offer.body)
        return response

    app = web.Application()
    app.router.add_get("/x", chunked)
    async with serving(app) as url, httpx.AsyncClient(auth=L402Auth(client_of(payer))) as http:
        response = await http.get(url + "/x")
    assert (response.status_code, response.text) == (200, "content")
    assert response.history[0].status_code == 402
    assert b"amount_msat" in response.history[0].content
    assert len(payer.calls) == 1


async def test_a_token_that_expired_before_it_was_offered_is_not_paid_for() -> None:
    payer = FakePayer(fee_msat=0)

    async def expired(_request: web.Request) -> web.StreamResponse:
        return challenge(payer, valid_for=-60)

    app = web.Application()
    app.router.add_get("/x", expired)
    async with serving(app) as url, l402_session(client_of(payer)) as session:
        with pytest.raises(InvoiceRejected, match="expired already"):
            await session.get(url + "/x")
    assert payer.calls == []


async def test_the_aiohttp_session_still_follows_an_unpaid_redirect_to_a_402() -> None:
    """Only a redirect that answers a payment stops paying: a plain one leads to a 402 that
    is paid once, and the paid retry is served."""
    payer = FakePayer(fee_msat=0)

    async def moved(_request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/paid")

    async def paid(request: web.Request) -> web.StreamResponse:
        if "Authorization" in request.headers:
            return web.Response(text="content")
        return challenge(payer)

    app = web.Application()
    app.router.add_get("/moved", moved)
    app.router.add_get("/paid", paid)
    async with serving(app) as url, l402_session(client_of(payer)) as session:
        response = await session.get(url + "/moved")
        assert (response.status, await response.text()) == (200, "content")
    assert len(payer.calls) == 1
