"""The paying clients (aiohttp middleware, httpx auth) against servers that try to take more
than a request's price: redirects that ask again after each payment, a redirect to another
site's 402, endless 402 bodies, tokens that expired before they were offered."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from aiohttp import web
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


async def test_a_redirect_after_each_payment_is_not_paid_again() -> None:
    """aiohttp runs the middleware once per redirect hop: a server that answers every paid
    request with a redirect to a new 402 gets one payment, the caller its last 402."""
    payer = FakePayer(fee_msat=0)

    async def hop(request: web.Request) -> web.StreamResponse:
        if "Authorization" not in request.headers:
            return challenge(payer)
        raise web.HTTPFound(f"/hop{int(request.match_info['n']) + 1}/x")

    app = web.Application()
    app.router.add_get("/hop{n}/x", hop)
    client = client_of(payer)
    async with serving(app) as url, l402_session(client) as session:
        response = await session.get(url + "/hop0/x")
        response.release()
    assert response.status == 402
    assert [str(step.url) for step in response.history] == [url + "/hop0/x"]
    assert len(payer.calls) == 1
    assert client.spent_msat == PRICE


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
