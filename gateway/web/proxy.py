"""Reverse proxy mode: the gateway in front of any HTTP backend.

Paid (or free) requests are streamed to the upstream and its response streamed back.
Hop-by-hop headers are dropped both ways; the client's L402 credential is not forwarded
(the preimage is a bearer secret): neither its ``Authorization`` nor the paywall's ``L402``
cookie (other cookies are). The verified token's facts are, in ``token_header``.

On a credit route the charge is finished as soon as the upstream's status and headers are
in, before the client's response starts: a metered route charges the cost the upstream
reports in ``L402-Cost-Msat`` (taken out of every response; a value that is not a whole
number within the price is logged and the price charged), and the balance after it goes to
the client in ``L402-Balance-Msat`` (the upstream's own is taken out of every response: only
the gateway's reaches the client). A request the upstream never answered (unreachable,
timed out, or refused here: body too large or too slow) is finished with no status, so it is
not charged unless the route charges failures.

On a pay-on-success route (``settle = "on_success"``) nothing is forwarded before payment:
the challenge keeps the request as ``send`` would forward it (the same headers, the body up to
``max_held_body_bytes``, read by the L402 decision, which sends 100 Continue itself when the
client waits for it; the read counts as one of the client's unpaid requests under way), the
hold executor runs it once the payment is held (``gateway.web.held``), and the payer's retry
with the credential gets the stored answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from http import HTTPStatus

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDictProxy
from yarl import URL

from gateway.health import HealthSlot
from gateway.ports import MetricsSlot, StoredRequest
from gateway.service import Deny, client_key
from gateway.service.on_success import HoldTerms
from gateway.web import GatewayFactory
from gateway.web.aiohttp import (
    BODY,
    CLIENT_LEFT,
    CLOSE,
    ENCODED_SEPARATOR_REFUSAL,
    TOKEN,
    add_tip_routes,
    charge_open,
    encoded_separator,
    settle_charge,
    setup_l402,
)
from gateway.web.cookies import without_l402_cookie
from gateway.web.lnurl import TipsSlot
from gateway.web.metrics import metrics_middleware
from gateway.web.responses import BALANCE_HEADER, COST_HEADER, client_address, token_header_value
from gateway.web.upstream import LeanPool, LeanResponse, request_bytes

log = logging.getLogger(__name__)

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "http2-settings",  # of an h2c upgrade, which the upstream does not get
    }
)
CHUNK = 64 * 1024
_HELD_BODY_BYTES = HoldTerms().max_request_bytes
# Statuses whose responses never have a body, whatever their Content-Length says.
NO_BODY = frozenset({204, 304})
# Taken out of every upstream response: the hop-by-hop ones, and the gateway's own (only the
# gateway's reach the client).
RESPONSE_DROP = HOP_BY_HOP | {COST_HEADER.lower(), BALANCE_HEADER.lower()}
# How proxies tell a backend who the client is and how it connected. A backend may trust any
# of them (Rack reads Forwarded first, chi True-Client-IP, nginx's realip X-Real-IP): a
# client's own never reach it. The gateway sets X-Forwarded-For, -Proto and -Host afresh.
CLIENT_ORIGIN = frozenset(
    {
        "forwarded",
        "x-real-ip",
        "true-client-ip",
        "x-client-ip",
        "client-ip",
        "x-cluster-client-ip",
        "cf-connecting-ip",
        "fastly-client-ip",
        "x-forwarded",
        "forwarded-for",
        "front-end-https",
        "x-url-scheme",
    }
)
_FORWARDED = "x-forwarded-"


class _Pools:
    """The upstream connections of one kind of request: kept-alive ones for GETs without a
    body (most requests), and as many again of one request each for any other request
    (``gateway.web.upstream`` says why)."""

    def __init__(self, base: str, limit: int) -> None:
        self.kept_alive = LeanPool(base, limit, CHUNK)
        self.one_shot = LeanPool(base, limit, CHUNK, keep_alive=False)


# Requests with a verified paid token get upstream connections of their own: unpaid ones
# (say, slow uploads to a free route) cannot take every upstream connection.
_POOLS = web.AppKey("l402_proxy_pools", _Pools)
_PAID_POOLS = web.AppKey("l402_proxy_paid_pools", _Pools)


def end_to_end_headers(
    headers: CIMultiDictProxy[str], drop: frozenset[str], *, from_client: bool
) -> list[tuple[str, str]]:
    """``headers`` without those named (lower case) in ``drop``, which holds ``HOP_BY_HOP``,
    and those ``Connection`` names (but ``Content-Length``); ``from_client`` (a request's),
    also without names holding ``_`` and those starting ``X-Forwarded-``. (Every request and
    response passes here: ``drop`` is built once by the caller.)"""
    if hdrs.CONNECTION in headers:
        named = _connection_names(headers)
        # The body's framing is read from it: taken out, the body would follow the head
        # unframed, where the upstream reads it as the next request.
        named.discard("content-length")
        drop = drop.union(named)
    if not from_client:
        return [(k, v) for k, v in headers.items() if k.lower() not in drop]
    return [
        (k, v)
        for k, v in headers.items()
        if "_" not in k and (name := k.lower()) not in drop and not name.startswith(_FORWARDED)
    ]


def _connection_names(headers: CIMultiDictProxy[str]) -> set[str]:
    """The header names (lower case) the ``Connection`` header names."""
    return {
        name.strip().lower()
        for value in headers.getall(hdrs.CONNECTION)
        for name in value.split(",")
    }


def _without_l402_cookies(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``headers`` with the L402 cookies taken out of each ``Cookie`` (bearer secrets), and
    a ``Cookie`` left empty by that dropped."""
    kept = []
    for name, value in headers:
        if name.lower() != "cookie":
            kept.append((name, value))
        elif (cookie := without_l402_cookie(value)) is not None:
            kept.append((name, cookie))
    return kept


# How the body is read for a method override (gateway.web.method_override).
_BODY_READING = frozenset({"content-type", "content-encoding"})


def _problem(status: int, title: str, detail: str) -> web.Response:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    return web.Response(
        status=status, text=json.dumps(body), content_type="application/problem+json"
    )


def _closing(response: web.Response) -> web.Response:
    """``response``, then the connection closes: the rest of the request body (unread, or
    held back after ``Expect: 100-continue``) must not be read as the next request."""
    response.force_close()
    return response


class _BodyTooLarge(Exception):
    pass


class _BodyTooSlow(Exception):
    pass


class _ClientLeft(Exception):
    pass


class _LimitedBody:
    """The request body, streamed, failing past ``limit`` bytes, when it arrives slower
    than ``timeout`` seconds plus one second per ``min_rate`` bytes (from the first read),
    or when the client leaves before it is whole.

    The upstream client reports an exception raised by the body it sends as a
    ``ClientError``, so the failure is also remembered in ``exceeded``, ``too_slow`` or
    ``client_left``.
    """

    def __init__(
        self, stream: aiohttp.StreamReader, limit: int, timeout: float, min_rate: int
    ) -> None:
        self._stream = stream
        self._limit = limit
        self._timeout = timeout
        self._min_rate = min_rate
        self.exceeded = False
        self.too_slow = False
        self.client_left = False

    async def chunks(self) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        seen = 0
        while True:
            try:
                async with asyncio.timeout_at(started + self._timeout + seen / self._min_rate):
                    chunk = await self._stream.read(CHUNK)
            except TimeoutError:
                self.too_slow = True
                raise _BodyTooSlow from None
            except ConnectionResetError:
                self.client_left = True
                raise _ClientLeft from None
            if not chunk:
                return
            seen += len(chunk)
            if seen > self._limit:
                self.exceeded = True
                raise _BodyTooLarge
            yield chunk


async def _given(body: bytes) -> AsyncIterator[bytes]:
    if body:  # no empty chunk: in chunked framing it would end the body
        yield body


class _Progress:
    """How far a forwarded request got: the upstream answered, the client's response
    started."""

    __slots__ = ("answered", "response", "started")

    def __init__(self, started: float) -> None:
        self.started = started  # perf_counter
        self.answered = False
        self.response: web.StreamResponse | None = None


class _PerClient:
    """Requests under way per client (or token), at most ``cap`` each (0: no cap)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._counts: dict[str, int] = {}

    def full(self, client: str) -> bool:
        return bool(self.cap) and self._counts.get(client, 0) >= self.cap

    def hold(self, client: str) -> _Held:
        """One request of ``client`` under way while the returned context is entered."""
        return _Held(self._counts, client)


class _Held:
    """A class rather than a generator context manager: entered on every paid request."""

    __slots__ = ("_client", "_counts")

    def __init__(self, counts: dict[str, int], client: str) -> None:
        self._counts = counts
        self._client = client

    def __enter__(self) -> None:
        self._counts[self._client] = self._counts.get(self._client, 0) + 1

    def __exit__(self, *_exc: object) -> None:
        left = self._counts[self._client] - 1
        if left:
            self._counts[self._client] = left
        else:
            del self._counts[self._client]


# Set once 100 Continue went out: the stored-request loader sends it before the route's
# expect handler would.
_CONTINUED = web.RequestKey("l402_continued", bool)


def _ambiguous_request(request: web.Request) -> web.Response | None:
    """400, before any pricing, for an encoded separator in the path (a backend may read it
    as one), or a ``Connection`` naming the ``Content-Type`` or ``Content-Encoding`` the
    request carries: the body's method override is read by them here, and the upstream,
    not getting them, would read the body otherwise (a POST without a ``Content-Type`` is a
    form to Rack, its ``_method`` routes it)."""
    if encoded_separator(request.rel_url):
        return _problem(400, "Bad Request", ENCODED_SEPARATOR_REFUSAL)
    headers = request.headers
    if hdrs.CONNECTION in headers:
        named = _connection_names(headers) & _BODY_READING
        carried = sorted(name for name in named if name in headers)
        if carried:
            detail = f"Connection names {', '.join(carried)}: the upstream must get it"
            return _problem(400, "Bad Request", detail)
    return None


def _expectation(request: web.Request) -> str | None:
    """The request's ``Expect`` (lower case) when aiohttp answers it (HTTP/1.1), else None."""
    if request.version != aiohttp.HttpVersion11 or hdrs.EXPECT not in request.headers:
        return None
    return request.headers[hdrs.EXPECT].lower()


async def _send_continue(request: web.Request) -> None:
    if not request.get(_CONTINUED, False):
        request[_CONTINUED] = True
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the response proper has not started


async def _continue(request: web.Request) -> web.Response | None:
    """What aiohttp answers ``Expect`` with: 100 Continue (HTTP/1.1), or 417 for another
    expectation."""
    expectation = _expectation(request)
    if expectation is None:
        return None
    if expectation != "100-continue":
        return _closing(_problem(417, "Expectation Failed", "only 100-continue is known"))
    await _send_continue(request)
    return None


def _last_forwarded(request: web.Request, name: str, default: str) -> str:
    """The last comma-separated value of header ``name``, or ``default`` when it is empty."""
    values = ",".join(request.headers.getall(name, ())).split(",")
    last = values[-1].strip()
    return last if last else default


def build_proxy(
    upstream: str,
    gateway: GatewayFactory,
    *,
    token_header: str = "X-L402-Token",  # noqa: S107 - a header name
    trust_forwarded_for: bool = False,
    max_body_bytes: int = 10 * 1024 * 1024,
    upstream_timeout: float = 300.0,
    body_timeout: float = 30.0,
    min_body_rate: int = 8192,
    unpaid_requests_per_client: int = 16,
    requests_per_token: int = 64,
    upstream_connections: int = 100,
    paid_upstream_connections: int = 100,
    ipv6_prefix: int = 64,
    max_held_body_bytes: int = _HELD_BODY_BYTES,
    health: HealthSlot | None = None,
    metrics: MetricsSlot | None = None,
    metrics_path: str = "",
    tips: TipsSlot | None = None,
) -> web.Application:
    """An aiohttp application that prices requests and forwards them to ``upstream``.

    Requests with a verified paid token use ``paid_upstream_connections`` of their own, at
    most ``requests_per_token`` with one token at once (0: no cap), more get 429; the rest
    share ``upstream_connections`` (each that many kept-alive connections for GETs
    without a body, that many again for other requests, one each), at most
    ``unpaid_requests_per_client`` per client (an IPv6 client per ``ipv6_prefix``) at once
    (a pay-on-success challenge reading the body is one), more get 429. A body slower than
    ``body_timeout`` seconds plus one second per ``min_body_rate`` bytes gets 408.

    A pay-on-success route's challenge keeps the request as the upstream is to get it (the
    headers ``send`` forwards, the body up to ``max_held_body_bytes``; a larger one gets
    413): the gateway runs it once the payment is held (``gateway.web.held``).

    ``/.well-known/l402/live`` and ``/.well-known/l402/ready`` are answered by the gateway
    (never priced nor forwarded); readiness runs the checks ``health`` holds (``gateway.health``).
    With ``metrics``: ``metrics_path`` (if set) answers GET with its Prometheus text, before
    any pricing, and every response's status, forwarded requests' upstream latency and errors
    are reported to its meter.

    With ``tips`` (filled in while the gateway runs) the tip jar and payment link paths
    (``/.well-known/lnurlp/...``, ``/.well-known/l402/links/...``: ``gateway.web.lnurl``) are
    answered by the gateway, before any pricing, and never forwarded.
    """
    base = str(URL(upstream.rstrip("/")))
    app = web.Application(client_max_size=max_body_bytes)
    metrics_slot = metrics or MetricsSlot()
    if tips is not None:
        # Before the refusal of encoded separators: a wallet gets its LNURL error JSON.
        add_tip_routes(app, tips, trust_forwarded_for=trust_forwarded_for)
    if metrics is not None:
        app.middlewares.insert(0, metrics_middleware(metrics_path, metrics_slot))
    # Content-Length is kept: the body is forwarded with the length the client declared.
    # The X-Forwarded ones are set afresh.
    request_drop = (
        HOP_BY_HOP
        | CLIENT_ORIGIN
        | {
            "host",
            # Met by the gateway itself (its 100 Continue, or 417) before the body is forwarded,
            # whole and at once: an upstream waiting to answer it first could wait forever.
            "expect",
            "authorization",
            token_header.lower(),
            # Zend Framework 1, Magento 1 and older Symfony route by these instead of the
            # request line: a free path could carry a priced one.
            "x-original-url",
            "x-rewrite-url",
        }
    )
    held_limit = min(max_held_body_bytes, max_body_bytes)
    too_slow_detail = f"the body took over {body_timeout:g}s plus 1s per {min_body_rate} bytes"

    unpaid = _PerClient(unpaid_requests_per_client)
    too_many_detail = f"{unpaid.cap} requests without a paid token are under way"
    # One token cannot hold every upstream connection of the paying clients (slow uploads).
    per_token = _PerClient(requests_per_token)
    too_many_per_token_detail = f"{per_token.cap} requests with this token are under way"

    def unpaid_client(request: web.Request) -> str:
        forwarded_for = ",".join(request.headers.getall(hdrs.X_FORWARDED_FOR, ()))
        address = client_address(request.remote, forwarded_for, trust_forwarded_for)
        return client_key(address, ipv6_prefix)

    async def upstream_pools(app: web.Application) -> AsyncIterator[None]:
        app[_POOLS] = unpaid_pools = _Pools(base, upstream_connections)
        app[_PAID_POOLS] = paid_pools = _Pools(base, paid_upstream_connections)
        try:
            yield
        finally:
            unpaid_pools.kept_alive.close()
            paid_pools.kept_alive.close()

    def forwarded_headers(request: web.Request) -> list[tuple[str, str]]:
        """The headers the upstream gets with ``request``, but the token header."""
        # Names with "_" are dropped like nginx does: WSGI and CGI servers read X_L402_Token
        # (or X_Forwarded_For) as the header the gateway sets.
        client_headers = request.headers
        headers = end_to_end_headers(client_headers, request_drop, from_client=True)
        if hdrs.COOKIE in client_headers:
            headers = _without_l402_cookies(headers)
        peer = request.remote or ""
        # An untrusted client's own claims are no one's to read: the gateway's hop alone.
        prior = (
            ", ".join(client_headers.getall(hdrs.X_FORWARDED_FOR, ()))
            if trust_forwarded_for
            else ""
        )
        headers.append((hdrs.X_FORWARDED_FOR, f"{prior}, {peer}" if prior else peer))
        proto, host = request.scheme, request.host
        if trust_forwarded_for:
            # The trusted proxy in front terminated TLS and saw the client's Host: keep its
            # view (the last value, the one it added), so the backend builds correct URLs.
            proto = _last_forwarded(request, hdrs.X_FORWARDED_PROTO, proto)
            host = _last_forwarded(request, hdrs.X_FORWARDED_HOST, host)
            proto = proto.lower() if proto.lower() in ("http", "https") else request.scheme
        headers.append((hdrs.X_FORWARDED_PROTO, proto))
        headers.append((hdrs.X_FORWARDED_HOST, host))
        return headers

    async def stored_request(request: web.Request) -> StoredRequest | Deny:
        """``request`` as the upstream is to get it once paid, its body read; or a refusal.

        Called by the L402 decision, which for a request with ``Expect: 100-continue`` runs
        before aiohttp would send 100 Continue: it is sent here, only when the body is
        wanted and may fit. The body is read within the client's cap of unpaid requests under
        way, as ``forward`` does: the decision comes before ``forward`` and, for a 402, the
        route's expect handler never runs.
        """
        too_large = Deny(
            413,
            f"body over {held_limit} bytes: this request's body is read before it is priced "
            "(a pay-on-success route keeps it until paid; a POST's may name another method)",
        )
        if request.content_length is not None and request.content_length > held_limit:
            return too_large
        expectation = _expectation(request)
        if expectation is not None and expectation != "100-continue":
            return Deny(417, "only 100-continue is known")
        body = b""
        if request.body_exists:
            client = unpaid_client(request)
            if unpaid.full(client):
                # The body is left unread: the connection closes after the answer.
                request[CLOSE] = True
                return Deny(429, too_many_detail, retry_after=1)
            with unpaid.hold(client):
                if expectation is not None:
                    await _send_continue(request)
                reader = _LimitedBody(request.content, held_limit, body_timeout, min_body_rate)
                try:
                    body = b"".join([chunk async for chunk in reader.chunks()])
                except _BodyTooLarge:
                    return too_large
                except _BodyTooSlow:
                    return Deny(408, too_slow_detail)
                except _ClientLeft:
                    return Deny(400, CLIENT_LEFT)
        headers = forwarded_headers(request)
        return StoredRequest(request.method, request.rel_url.raw_path_qs, tuple(headers), body)

    setup_l402(
        app,
        gateway,
        trust_forwarded_for=trust_forwarded_for,
        stored_request=stored_request,
        health=health,
        refuse=_ambiguous_request,
    )
    app.cleanup_ctx.append(upstream_pools)

    async def relay(
        request: web.Request, answer: LeanResponse, progress: _Progress
    ) -> web.StreamResponse:
        """The upstream's ``answer`` (its head in) to ``request``, as the client's response;
        ``progress`` records how far it got for ``send``'s handling of a failure."""
        progress.answered = True
        metrics_slot.meter.upstream_call(time.perf_counter() - progress.started, None)
        status, reason = answer.status, answer.reason
        response_headers = end_to_end_headers(answer.headers, RESPONSE_DROP, from_client=False)
        costs = answer.headers.getall(COST_HEADER, ())
        cost = ",".join(costs) if costs else None
        length = answer.content_length
        if (
            length is not None
            and length <= CHUNK
            and request.method != hdrs.METH_HEAD
            and status not in NO_BODY
        ):
            # Small and whole: headers and body leave in one write.
            whole = web.Response(
                status=status, reason=reason, headers=response_headers, body=await answer.read()
            )
            if charge_open(request):
                await settle_charge(request, status, whole.headers, cost=cost)
            return whole
        response = progress.response = web.StreamResponse(
            status=status, reason=reason, headers=response_headers
        )
        if charge_open(request):  # before the status goes out
            await settle_charge(request, status, response.headers, cost=cost)
        await response.prepare(request)
        async for chunk in answer.iter_chunks():
            await response.write(chunk)
        await response.write_eof()
        return response

    async def send(request: web.Request, pools: _Pools) -> web.StreamResponse:
        if request.content_length is not None and request.content_length > max_body_bytes:
            return _problem(413, "Content Too Large", f"body over {max_body_bytes} bytes")
        headers = forwarded_headers(request)
        token = request.get(TOKEN)
        if token is not None:
            headers.append((token_header, token_header_value(token)))
        read = request.get(BODY)  # the decision read it
        body = (
            _LimitedBody(request.content, max_body_bytes, body_timeout, min_body_rate)
            if request.body_exists and read is None
            else None
        )
        chunks = body.chunks() if body is not None else _given(read) if read is not None else None
        progress = _Progress(time.perf_counter())
        # Verbatim: the path the rules were matched on, not a re-normalized one.
        target = request.rel_url.raw_path_qs
        method = request.method
        pool = pools.kept_alive
        chunked = False
        if chunks is not None or method != hdrs.METH_GET:
            pool = pools.one_shot
            # The body is sent with the length the client declared, else as chunks.
            chunked = chunks is not None and request.content_length is None
            if chunked:
                headers.append((hdrs.TRANSFER_ENCODING, "chunked"))
            headers.append((hdrs.CONNECTION, "close"))
        try:
            connection = await pool.send(
                request_bytes(method, target, pool.host_header, headers),
                upstream_timeout,
                chunks,
                chunked=chunked,
                bodiless=method == hdrs.METH_HEAD,
            )
            try:
                return await relay(request, connection, progress)
            finally:
                pool.release(connection)
        except (aiohttp.ClientError, TimeoutError) as error:
            seconds = time.perf_counter() - progress.started
            if progress.response is not None and progress.response.prepared:
                transport = request.transport
                if transport is None or transport.is_closing():
                    # The client left, or was cut for reading nothing: no upstream failure.
                    return progress.response
                # Mid-body: abort the connection rather than end a truncated body cleanly.
                metrics_slot.meter.upstream_call(seconds, "mid_response")
                log.warning("upstream %s failed mid-response: %s", base, error)
                raise
            if body is not None and body.exceeded:
                return _problem(413, "Content Too Large", f"body over {max_body_bytes} bytes")
            if body is not None and body.too_slow:
                return too_slow()
            if body is not None and body.client_left:
                # No one reads this answer (the access log does): no upstream failure.
                return _problem(400, "Bad Request", CLIENT_LEFT)
            kind = "timeout" if isinstance(error, TimeoutError) else "connection"
            metrics_slot.meter.upstream_call(seconds, "mid_response" if progress.answered else kind)
            log.warning("upstream %s failed: %s", base, error)
            return _problem(502, "Bad Gateway", "upstream unavailable")

    def too_slow() -> web.Response:
        return _closing(_problem(408, "Request Timeout", too_slow_detail))

    def too_many(detail: str = too_many_detail) -> web.Response:
        response = _problem(429, "Too Many Requests", detail)
        response.headers[hdrs.RETRY_AFTER] = "1"
        return response

    async def forward(request: web.Request) -> web.StreamResponse:
        token = request.get(TOKEN)
        if token is not None:
            response: web.StreamResponse
            if per_token.full(token.token_id):
                response = too_many(too_many_per_token_detail)
                await settle_charge(request, None, response.headers, served=False)
                return response
            with per_token.hold(token.token_id):
                response = await send(request, request.app[_PAID_POOLS])
            if charge_open(request):
                # The gateway's own answer: the upstream failed (a failure a route may
                # charge), or it never had the request whole (a body too large or slow).
                failed = response.status == HTTPStatus.BAD_GATEWAY
                await settle_charge(request, None, response.headers, served=failed)
            return response
        client = unpaid_client(request)
        if unpaid.full(client):
            return too_many()
        with unpaid.hold(client):
            return await send(request, request.app[_POOLS])

    async def expect(request: web.Request) -> web.StreamResponse | None:
        # Runs after the L402 decision (setup_l402 wraps it): an answer the body cannot
        # change comes before 100 Continue, or the client uploads the body for nothing.
        if request.content_length is not None and request.content_length > max_body_bytes:
            return _closing(_problem(413, "Content Too Large", f"body over {max_body_bytes} bytes"))
        token = request.get(TOKEN)
        if token is None:
            if unpaid.full(unpaid_client(request)):
                return _closing(too_many())
        elif per_token.full(token.token_id):
            return _closing(too_many(too_many_per_token_detail))
        return await _continue(request)

    app.router.add_route("*", "/{tail:.*}", forward, expect_handler=expect)
    return app
