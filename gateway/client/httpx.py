"""The paying client as an ``httpx.Auth`` (needs the ``httpx`` extra)::

    from gateway.client import Budget, L402Client
    from gateway.client.httpx import L402Auth

    client = L402Client(lnd, network="regtest", budget=Budget(max_price_msat=50_000))
    async with httpx.AsyncClient(auth=L402Auth(client)) as http:
        response = await http.get("https://api.example/premium/fortune")

Only ``httpx.AsyncClient``: payers are asynchronous, so the synchronous flow raises
``TypeError``. A request that already carries an ``Authorization`` header is sent untouched.
With ``follow_redirects=True`` httpx follows redirects inside the auth flow, so the response
it gets is the last URL's: a response reached through a redirect is never paid (its 402 comes
back as it is: request the URL it names).
The request body is read into memory first so a retry can resend it; its digest binds a
pay-on-success token to it (the token is reused only for a re-send of the same request with
the same body). When the payment of a pay-on-success offer fails, the gateway is asked why
(a refund raises ``PaymentRefunded``) with a short-lived ``httpx.AsyncClient`` of default
settings: an auth flow cannot reach its own client while it pays. If that request fails (a
private CA, say), the payment's failure is raised as it came.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncGenerator, AsyncIterable, Generator

import httpx

from gateway.client.core import L402Client
from gateway.client.errors import ChallengeError
from gateway.client.offer import MAX_PROBLEM_BYTES, read_at_most
from gateway.client.on_success import MAX_ANSWER_BYTES
from gateway.client.tokens import body_digest
from gateway.text import whole_number

__all__ = ["L402Auth"]


class L402Auth(httpx.Auth):
    """Pays L402 challenges through ``client`` and retries once with the token."""

    requires_request_body = True

    def __init__(self, client: L402Client) -> None:
        self.client = client

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        raise TypeError(
            "L402Auth pays through an asynchronous payer: use it with httpx.AsyncClient"
        )

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        if "Authorization" in request.headers:
            yield request
            return
        # httpx reads the body for requires_request_body only in the async_auth_flow this
        # class replaces: read it here, so a streamed body can be resent (and is known). A
        # synchronous stream cannot be sent by an AsyncClient anyway: httpx says so.
        body_sha256 = None
        if isinstance(request.stream, AsyncIterable):
            body_sha256 = body_digest(await request.aread())
        exchange = await self.client.exchange(
            str(request.url), request.method, body_sha256=body_sha256
        )
        authorization = exchange.authorization
        while True:
            if authorization is None:
                request.headers.pop("Authorization", None)
            else:
                request.headers["Authorization"] = authorization
            response = yield request
            if response.request.url != request.url:
                # Followed redirects (follow_redirects=True): the answer is another URL's, whose
                # token this request's URL must never get. Handed over as it came.
                return
            retry = await exchange.step(
                response.status_code,
                response.headers.get_list("WWW-Authenticate"),
                functools.partial(_challenge_body, response),
                response.headers,
                _ask_gateway,
            )
            if retry is None:
                return
            authorization = retry.authorization


async def _challenge_body(response: httpx.Response) -> bytes:
    """The 402's body. httpx reads the body of each response an auth flow answers with a
    retry itself, whole: one that says it is larger than an offer reads is refused unread,
    one that turns out larger (chunked, or compressed) once that much is read."""
    length = whole_number(response.headers.get("Content-Length", "").strip())
    if length is not None and length > MAX_PROBLEM_BYTES:
        raise ChallengeError(f"a 402 body of {length} bytes, over {MAX_PROBLEM_BYTES}; not read")
    body = await read_at_most(response.aiter_bytes(), MAX_PROBLEM_BYTES)
    if len(body) > MAX_PROBLEM_BYTES:
        raise ChallengeError(f"a 402 body over {MAX_PROBLEM_BYTES} bytes; not read further")
    # Read whole: kept where httpx's own read of it (Response.aread) looks first.
    response._content = body
    return body


async def _ask_gateway(url: str, body: bytes) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"}
    async with (
        httpx.AsyncClient() as http,
        http.stream("POST", url, content=body, headers=headers) as answer,
    ):
        return answer.status_code, await read_at_most(answer.aiter_bytes(), MAX_ANSWER_BYTES)
