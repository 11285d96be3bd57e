"""The paying client as an aiohttp client middleware (aiohttp >= 3.12)::

    from gateway.client import Budget, L402Client, TokenCache
    from gateway.client.aiohttp import L402PayingMiddleware

    client = L402Client(lnd, network="regtest", budget=Budget(max_price_msat=50_000),
                        cache=TokenCache("~/.cache/l402-gateway/tokens.json"))
    async with aiohttp.ClientSession(middlewares=[L402PayingMiddleware(client)]) as session:
        async with session.get("https://api.example/premium/fortune") as response:
            ...  # 200 after paying once; later requests reuse the token

A request that already carries an ``Authorization`` header is passed through untouched.
aiohttp runs a client middleware once for each redirect it follows (``Location``, or ``URI``
without it) and again when it resends a request whose connection closed: a redirect that
answers a paid request, or a resend of one, goes on without paying again (its 402 comes back
as it is), so one request pays at most once however the server redirects or drops it. A
retried request is sent with the same body, so bodies must be replayable (bytes, str, form
data, JSON; not a one-shot stream). A pay-on-success token is bound to its request's body:
the middleware knows the body of an in-memory payload (bytes, str, JSON, url-encoded form
data) and reuses such a token only for a re-send of the same request with the same body; for
any other body (a stream, a file, multipart form data) it never reuses one: that request
pays anew. Errors of :mod:`gateway.client.errors` (and the payer's) propagate out of the
``session.get(...)`` call. When the payment of a pay-on-success offer fails, the gateway is
asked why through the same session (without the middlewares), so a refund raises
``PaymentRefunded``.
"""

from __future__ import annotations

import asyncio
import functools
import weakref
from typing import Any

import aiohttp
from aiohttp import ClientHandlerType, ClientRequest, ClientResponse, hdrs
from aiohttp.payload import BytesPayload
from yarl import URL

from gateway.client.core import L402Client
from gateway.client.offer import MAX_PROBLEM_BYTES, read_at_most
from gateway.client.on_success import MAX_ANSWER_BYTES
from gateway.client.tokens import body_digest

__all__ = ["L402PayingMiddleware", "l402_session"]


class L402PayingMiddleware:
    """An aiohttp client middleware that pays L402 challenges through ``client``."""

    def __init__(self, client: L402Client) -> None:
        self.client = client
        # Per task (one request's redirects and resends are made in its task), where the
        # request that paid goes on: its redirect's target, or itself when its connection
        # failed (aiohttp resends it once). That next call, if it goes there, pays no more.
        self._after_payment: weakref.WeakKeyDictionary[asyncio.Task[Any], URL] = (
            weakref.WeakKeyDictionary()
        )

    async def __call__(self, request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        if hdrs.AUTHORIZATION in request.headers:
            return await handler(request)
        task = asyncio.current_task()
        redirected_to = self._after_payment.pop(task, None) if task is not None else None
        follows_payment = redirected_to == request.url.with_fragment(None)
        exchange = await self.client.exchange(
            str(request.url),
            request.method,
            body_sha256=await _body_sha256(request),
            may_pay=not follows_payment,
        )
        authorization = exchange.authorization
        session = request.session

        async def ask_gateway(url: str, body: bytes) -> tuple[int, bytes]:
            async with session.post(
                url,
                data=body,
                headers={hdrs.CONTENT_TYPE: "application/json"},
                middlewares=(),
            ) as answer:
                body = await read_at_most(answer.content.iter_any(), MAX_ANSWER_BYTES)
                return answer.status, body

        while True:
            if authorization is None:
                request.headers.popall(hdrs.AUTHORIZATION, None)
            else:
                request.headers[hdrs.AUTHORIZATION] = authorization
            try:
                response = await handler(request)
            except BaseException:
                if task is not None and (follows_payment or exchange.paid is not None):
                    self._after_payment[task] = request.url.with_fragment(None)
                raise
            try:
                retry = await exchange.step(
                    response.status,
                    response.headers.getall(hdrs.WWW_AUTHENTICATE, []),
                    functools.partial(read_at_most, response.content.iter_any(), MAX_PROBLEM_BYTES),
                    response.headers,
                    ask_gateway,
                )
            except BaseException:
                response.release()
                raise
            if retry is None:
                if task is not None and (follows_payment or exchange.paid is not None):
                    target = _redirect_target(response)
                    if target is not None:
                        self._after_payment[task] = target
                return response
            response.release()
            authorization = retry.authorization


_REDIRECTS = frozenset({301, 302, 303, 307, 308})


def _redirect_target(response: ClientResponse) -> URL | None:
    """Where aiohttp follows ``response`` to, if it is a redirect."""
    location = response.headers.get(hdrs.LOCATION) or response.headers.get(hdrs.URI)
    if response.status not in _REDIRECTS or not location:
        return None
    try:
        return response.url.join(URL(location)).with_fragment(None)
    except ValueError:  # aiohttp refuses it too
        return None


async def _body_sha256(request: ClientRequest) -> str | None:
    """The digest of the request's body; None when it is not held in memory (a stream, a
    file, multipart form data, whose bytes cannot be read without consuming them)."""
    body = request.body
    if isinstance(body, bytes):  # no body
        return body_digest(body)
    if isinstance(body, BytesPayload):  # bytes, str, JSON, url-encoded form data
        return body_digest(await body.as_bytes())
    return None


def l402_session(client: L402Client, **kwargs: Any) -> aiohttp.ClientSession:
    """An ``aiohttp.ClientSession`` with :class:`L402PayingMiddleware` first among its
    middlewares."""
    middlewares = (L402PayingMiddleware(client), *kwargs.pop("middlewares", ()))
    return aiohttp.ClientSession(middlewares=middlewares, **kwargs)
