"""aiohttp integration: a Lightning price on an application's routes.

Usage::

    from gateway import load_config, running_gateway
    from gateway.web.aiohttp import TOKEN, setup_l402

    app = web.Application()
    setup_l402(app, lambda: running_gateway(load_config("gateway.toml")))

    async def handler(request):
        token = request.get(TOKEN)  # PaidToken on a priced route, None on a free one

``setup_l402`` registers a ``cleanup_ctx`` entry, so the LND channel, the store and the
settlement watcher start with the application and stop with it. At startup it puts the L402
decision in front of each route's handler (not a middleware: aiohttp runs every middleware
through a chain of its own on each request): a request no route takes gets aiohttp's 404 or
405 unpriced, and every middleware runs before the decision.

Browsers get the paywall page (:mod:`gateway.web.paywall`): the gateway answers
``POST /.well-known/l402/redeem`` itself and accepts the ``L402`` cookie it sets as the
credential when the request has no L402 ``Authorization``. It also answers the credit
endpoints, ``GET /.well-known/l402/token`` and ``POST /.well-known/l402/withdraw``
(:mod:`gateway.web.credit`).

**Tip jars and payment links** (LNURL-pay, Lightning Address, link pages:
:mod:`gateway.web.lnurl`): ``add_tip_routes(app, slot)`` answers their paths in a middleware,
before any route (never priced); the ``TipsSlot`` is filled in while the gateway runs.

**Credit routes.** The request's price is held from the token's balance before the handler
runs. When the handler returns its response (or raises: an ``HTTPException`` by its status),
the charge is finished with that status before the response goes out, and the balance after
it is set in ``L402-Balance-Msat``. A metered route charges what the handler reported with
``report_cost(request, msat)`` (at most the price). A handler that sends its response itself
(``StreamResponse.prepare``: streaming, WebSockets) has its charge finished when it prepares
the response (a WebSocket: the 101), with the balance header: report the cost before that.
Whatever the handler does after (it raises, the client leaves), the charge stands.
A request answered by an ``Expect`` handler (417, or the proxy's 413) is not served: its
charge is finished with no status, so it is released like a failure.

**Pay-on-success routes** (``settle = "on_success"``) need the request kept until it is paid:
``setup_l402(..., stored_request=loader)``, which only the reverse proxy gives
(:func:`gateway.web.proxy.build_proxy`). Without a loader an application whose service has
such routes refuses to start (``ConfigError``). A retry with the paid credential is answered
with the stored response (``Allow.replay``); the handler is not called.
"""

from __future__ import annotations

import asyncio
import functools
import re
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import hdrs, web
from aiohttp.typedefs import Middleware
from multidict import istr
from yarl import URL

from gateway.errors import ConfigError
from gateway.health import HEALTH_PATHS, LIVE_PATH, Check, HealthReport, HealthSlot
from gateway.ports import StoredRequest, StoredResponse
from gateway.service import (
    Allow,
    CreditCharge,
    Decision,
    Deny,
    L402Service,
    PaidToken,
    PaymentChallenge,
    RequestInfo,
)
from gateway.web import OWN_BODY_TIMEOUT, OWN_BODY_TOO_SLOW, GatewayFactory, refuse_on_success
from gateway.web.cookies import headers_for_pricing, l402_cookie_values
from gateway.web.credit import (
    MAX_WITHDRAW_BODY,
    TOKEN_INFO_PATH,
    WITHDRAW_PATH,
    handle_token_info,
    handle_withdraw,
)
from gateway.web.lnurl import TipsSlot, handle_tips, is_tips_path
from gateway.web.method_override import (
    OVERRIDE_HEADERS,
    body_may_name_method,
    body_method_overrides,
    method_overrides,
)
from gateway.web.paywall import MAX_REDEEM_BODY, REDEEM_PATH, handle_redeem, render_challenge
from gateway.web.responses import BALANCE_HEADER, HttpResponse, client_address, render

TOKEN = web.RequestKey("l402_token", PaidToken)
_AUTHORIZATION = hdrs.AUTHORIZATION
_EXPECT = hdrs.EXPECT  # a module constant: one attribute read fewer on every request
# Answered by the gateway itself (routes setup_l402 adds), never priced.
_OWN_PATHS = frozenset({REDEEM_PATH, TOKEN_INFO_PATH, WITHDRAW_PATH, *HEALTH_PATHS})
# Refusals of a request for its body (too large, too slow, an unknown Expect): the
# connection closes after them.
_BODY_REFUSALS = frozenset({408, 413, 417})
# aiohttp's router matches a path with %2F kept (one segment: ``/api/{id}`` takes
# ``/api/7%2Fpreview``), the rules its decoded path (two); a backend may decode either.
_ENCODED_SEPARATOR = re.compile("%(?:2f|5c)", re.IGNORECASE)
ENCODED_SEPARATOR_REFUSAL = "path must not contain an encoded '/' or '\\'"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Expect = Callable[[web.Request], Awaitable[web.StreamResponse | None]]
# The request as the backend is to get it once paid (it reads the body), or a refusal:
# what a pay-on-success route's challenge keeps, and what a POST whose body may name another
# method is priced by (``build_proxy`` gives one). A loader that refuses without reading the
# body sets ``CLOSE``.
StoredRequestLoader = Callable[[web.Request], Awaitable[StoredRequest | Deny]]
# An answer to a request before any L402 decision, or None (``setup_l402``'s ``refuse``).
Refuse = Callable[[web.Request], web.Response | None]
# Set on a request whose body is left unread with its refusal: the connection then closes,
# so the rest is not read as the next request.
CLOSE = web.RequestKey("l402_close", bool)
# The body, when the decision read it (a POST whose body may name another method, with a
# ``StoredRequestLoader``): the request's stream is spent, the handler forwards this.
BODY = web.RequestKey("l402_body", bytes)
CLIENT_LEFT = "the client left before its body arrived"


@dataclass(slots=True)
class _ServiceSlot:
    """What every decision needs besides the request; the service is filled in when the
    application starts (the app itself is frozen by then)."""

    trust_forwarded_for: bool = False
    stored_request: StoredRequestLoader | None = None
    service: L402Service | None = None
    health: HealthSlot | None = None
    refuse: Refuse | None = None


_SLOT = web.AppKey("l402_service_slot", _ServiceSlot)
_SETUP_TWICE = (
    "setup_l402 is called on both an application and one of its sub-applications: the main "
    "application's prices every route, the sub-application's would go unused. Call it once, "
    "on the main application, with rules for the sub-applications' paths"
)
_CREDIT_NEEDS_MAIN_APP = (
    "credit routes need setup_l402 on the main application (it prices the routes of its "
    "sub-applications too): aiohttp freezes a sub-application's response signal, which "
    "charges credit, when it is added"
)


def request_info(
    request: web.BaseRequest,
    trust_forwarded_for: bool,
    stored_request: Callable[[], Awaitable[StoredRequest | Deny]] | None = None,
    body_overrides: tuple[str, ...] = (),
) -> RequestInfo:
    return RequestInfo(
        method=request.method,
        path=request.path,
        client=client_address(
            request.remote,
            ",".join(request.headers.getall(hdrs.X_FORWARDED_FOR, ())),
            trust_forwarded_for,
        ),
        authorization=tuple(request.headers.getall(hdrs.AUTHORIZATION, ())),
        query=request.query_string,
        target=request.rel_url.raw_path_qs,
        headers=headers_for_pricing(request.headers.items()),
        cookies=l402_cookie_values(request.headers.getall(hdrs.COOKIE, ())),
        method_overrides=_method_overrides(request) + body_overrides,
        stored_request=stored_request,
    )


# As istr: looked up on every request, without folding their case each time.
_OVERRIDE, _HTTP_METHOD, _METHOD_OVERRIDE = (istr(name) for name in OVERRIDE_HEADERS)


def _method_overrides(request: web.BaseRequest) -> tuple[str, ...]:
    headers = request.headers
    return method_overrides(
        (value for name in OVERRIDE_HEADERS for value in headers.getall(name, ())),
        request.query_string,
    )


def _response(response: HttpResponse) -> web.Response:
    return web.Response(status=response.status, headers=list(response.headers), body=response.body)


# Set on an application that answers the tip and link paths itself (``add_tip_routes``).
_ANSWERS_TIPS = web.AppKey("l402_answers_tips", bool)


def tips_middleware(slot: TipsSlot, *, trust_forwarded_for: bool = False) -> Middleware:
    """A middleware that answers the tip jar and payment link paths (``gateway.web.lnurl``)
    itself, before any other middleware it is put in front of; other requests pass on."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        raw_path = request.rel_url.raw_path
        if not is_tips_path(raw_path):
            return await handler(request)
        query: dict[str, str] = {}
        for name, value in request.query.items():
            query.setdefault(name, value)  # the first of repeated parameters
        forwarded_for = ",".join(request.headers.getall(hdrs.X_FORWARDED_FOR, ()))
        client = client_address(request.remote, forwarded_for, trust_forwarded_for)
        return _response(
            await handle_tips(
                slot, method=request.method, raw_path=raw_path, query=query, client=client
            )
        )

    return middleware


def add_tip_routes(
    app: web.Application, tips: TipsSlot, *, trust_forwarded_for: bool = False
) -> None:
    """Answer the tip jar and payment link paths on ``app`` (LNURL-pay, Lightning Address,
    link pages: ``gateway.web.lnurl``), before any route: never priced. ``tips``
    is filled in while the gateway runs (``running_gateway(..., tips=slot)``)."""
    app[_ANSWERS_TIPS] = True  # the L402 decision before 100 Continue leaves them alone
    app.middlewares.insert(0, tips_middleware(tips, trust_forwarded_for=trust_forwarded_for))


async def _read_limited(request: web.Request, limit: int) -> bytes | web.Response:
    """A POST's body, or its first ``limit + 1`` bytes when it is longer (b"" for another
    method); or the answer when it comes too slowly (``OWN_BODY_TIMEOUT``) or not at all."""
    if request.method != "POST":
        return b""
    if request.content_length is not None and request.content_length > limit:
        return b"x" * (limit + 1)  # too large: not worth reading
    body = bytearray()
    try:
        async with asyncio.timeout(OWN_BODY_TIMEOUT):
            while len(body) <= limit:
                chunk = await request.content.read(limit + 1 - len(body))
                if not chunk:
                    break
                body += chunk
    except TimeoutError:
        # The rest of the body is unread: it must not be read as the next request.
        refusal = _response(render(Deny(408, OWN_BODY_TOO_SLOW)))
        refusal.force_close()
        return refusal
    except ConnectionResetError:
        # The client left mid-body: no one reads this answer (the access log does), and
        # it is no server error.
        return _response(render(Deny(400, CLIENT_LEFT)))
    return bytes(body)


async def _redeem(
    request: web.Request, service: L402Service | None, trust_forwarded_for: bool
) -> web.Response:
    body = await _read_limited(request, MAX_REDEEM_BODY)
    if isinstance(body, web.Response):
        return body
    return _response(
        await handle_redeem(
            service,
            method=request.method,
            content_type=request.headers.get(hdrs.CONTENT_TYPE),
            fetch_site=request.headers.get("Sec-Fetch-Site"),
            body=body,
            client=client_address(
                request.remote,
                ",".join(request.headers.getall(hdrs.X_FORWARDED_FOR, ())),
                trust_forwarded_for,
            ),
        )
    )


async def _credit_endpoint(
    request: web.Request, service: L402Service | None, path: str
) -> web.Response:
    authorization = tuple(request.headers.getall(_AUTHORIZATION, ()))
    if path == TOKEN_INFO_PATH:
        return _response(
            await handle_token_info(service, method=request.method, authorization=authorization)
        )
    body = await _read_limited(request, MAX_WITHDRAW_BODY)
    if isinstance(body, web.Response):
        return body
    return _response(
        await handle_withdraw(
            service,
            method=request.method,
            content_type=request.headers.get(hdrs.CONTENT_TYPE),
            authorization=authorization,
            body=body,
        )
    )


@dataclass(slots=True)
class _Billing:
    """The credit charge of one request under way, and the cost its handler reported."""

    service: L402Service
    charge: CreditCharge
    cost: int | None = None
    finished: bool = False
    # The handler has the request: an answer before it (an application's middleware, after
    # an Expect decision) serves nothing.
    served: bool = False


# Set on every request decided in full (None without a charge); not on one the decision cache
# answered, which never has a charge (the later lookups then miss).
_BILLING = web.RequestKey[_Billing | None]("l402_billing")


def report_cost(request: web.Request, msat: int) -> None:
    """Report what ``request`` actually cost, on a metered credit route: the charge is that
    (at most the price held for it) instead of the price. Call it before returning (or
    preparing) the response. No effect on any other route."""
    billing = request.get(_BILLING)
    if billing is not None:
        billing.cost = msat


def charge_open(request: web.Request) -> bool:
    """Whether ``request`` holds a credit charge ``settle_charge`` has not finished: tested
    first where most requests have none (the proxy, on every response), as it costs no
    coroutine."""
    billing = request.get(_BILLING)
    return billing is not None and not billing.finished


async def settle_charge(
    request: web.Request,
    status: int | None,
    headers: MutableMapping[str, str] | None,
    *,
    cost: str | None = None,
    served: bool = True,
) -> None:
    """Finish the credit charge of ``request``, once (later calls do nothing), and set the
    balance after it in ``headers`` (None: the response has started). ``status`` is the
    response's; None when the request got no answer from its handler or backend. ``cost``
    is a backend's report (the proxy's ``L402-Cost-Msat``), instead of ``report_cost``'s.
    ``served`` False: neither handler nor backend had the request, it is not charged. No
    effect on a request without a charge."""
    billing = request.get(_BILLING)
    if billing is None or billing.finished:
        return
    billing.finished = True
    balance = await billing.service.finish_charge(
        billing.charge,
        status=status,
        cost=billing.cost if cost is None else cost,
        served=served,
    )
    if balance is not None and headers is not None:
        headers[BALANCE_HEADER] = str(balance)


async def _charge_on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: a response goes out now, its headers not yet sent. Charges
    what a handler sends itself (streamed, a WebSocket's 101) before its status and body go
    out; any other response was charged already, but one an application's middleware sent
    before the handler had the request, which is released."""
    billing = request.get(_BILLING)
    served = billing is not None and billing.served
    await settle_charge(request, response.status, response.headers, served=served)


async def _serve_charged(request: web.Request, handler: Handler) -> web.StreamResponse:
    billing = request.get(_BILLING)
    if billing is not None:
        billing.served = True
    try:
        response = await handler(request)
    except web.HTTPException as error:
        await settle_charge(request, error.status, error.headers)
        raise
    except BaseException:
        # A response the handler prepared before it raised was charged then (and stands).
        await settle_charge(request, None, None)
        raise
    await settle_charge(request, response.status, None if response.prepared else response.headers)
    return response


async def _decide(slot: _ServiceSlot, request: web.Request) -> Decision:
    """The decision on a request, in full (the decision cache is consulted again)."""
    service = slot.service
    if service is None:
        return Deny(503, "gateway is starting", retry_after=1)
    if encoded_separator(request.rel_url):
        return Deny(400, ENCODED_SEPARATOR_REFUSAL)
    authorization = tuple(request.headers.getall(_AUTHORIZATION, ()))
    decision: Decision | None = None
    if not _method_overrides(request):
        decision = await service.charge_again(authorization, request.method, request.path)
    if decision is None:
        decision = await _authorize(slot, service, request)
    charge = decision.charge if isinstance(decision, Allow) else None
    request[_BILLING] = None if charge is None else _Billing(service, charge)
    return decision


async def _authorize(slot: _ServiceSlot, service: L402Service, request: web.Request) -> Decision:
    loader = slot.stored_request
    if loader is None:
        return await service.authorize(request_info(request, slot.trust_forwarded_for))
    # Every value: backends differ on which of several they take.
    content_type = ",".join(request.headers.getall(hdrs.CONTENT_TYPE, ()))
    if not (
        request.body_exists
        and body_may_name_method(content_type)
        and service.pricing.body_may_reprice(request.method, request.path)
    ):
        keep = functools.partial(loader, request)
        return await service.authorize(request_info(request, slot.trust_forwarded_for, keep))
    # A paid token good for whatever method the body names: the body is not read here (nor
    # held to the read's bound, nor counted as an unpaid client's); it streams to the handler.
    allowed = await service.allowed_whatever_body(request_info(request, slot.trust_forwarded_for))
    if allowed is not None:
        return allowed
    # The body may name another method the backend routes by: read it first (the loader's
    # bounds apply), then forward what was read (``BODY``).
    stored = await loader(request)
    if isinstance(stored, Deny):
        return stored
    request[BODY] = stored.body
    every = service.pricing.override_methods
    encodings = ",".join(request.headers.getall(hdrs.CONTENT_ENCODING, ())).lower().split(",")
    overrides = (
        every  # compressed: what the backend inflates is not read here
        if any(encoding.strip() not in ("", "identity") for encoding in encodings)
        else body_method_overrides(content_type, stored.body, every)
    )
    loaded = functools.partial(_loaded, stored)
    return await service.authorize(
        request_info(request, slot.trust_forwarded_for, loaded, body_overrides=overrides)
    )


async def _loaded(stored: StoredRequest) -> StoredRequest | Deny:
    return stored


def _refusal(request: web.Request, decision: PaymentChallenge | Deny) -> web.Response:
    accept = ",".join(request.headers.getall(hdrs.ACCEPT, ())) or None
    response = _response(render_challenge(decision, method=request.method, accept=accept))
    if isinstance(decision, Deny) and (
        decision.status in _BODY_REFUSALS or request.get(CLOSE, False)
    ):
        # Refused for its body, maybe before all of it was read: the rest must not be read
        # as the next request.
        response.force_close()
    return response


async def _health(request: web.Request, slot: _ServiceSlot) -> web.Response:
    """Liveness (200 while the loop answers) or readiness (200 when every check passes, 503
    otherwise), JSON naming each check. Without a ``HealthSlot`` readiness is only "the
    gateway has started"."""
    headers = {hdrs.CACHE_CONTROL: "no-store"}
    if request.method not in (hdrs.METH_GET, hdrs.METH_HEAD):
        headers[hdrs.ALLOW] = "GET, HEAD"
        return web.json_response({"error": "use GET or HEAD"}, status=405, headers=headers)
    if request.path == LIVE_PATH:
        return web.json_response({"status": "live"}, headers=headers)
    readiness = slot.health.readiness if slot.health is not None else None
    if readiness is not None and slot.service is not None:
        report = await readiness.check()
    elif slot.service is None:
        report = HealthReport((Check("gateway", False, "starting or stopping"),))
    else:
        report = HealthReport((Check("gateway", True, "started"),))
    status = 200 if report.ready else 503
    return web.json_response(report.as_json(), status=status, headers=headers)


def _replayed(stored: StoredResponse) -> web.Response:
    """A pay-on-success request's answer, as the backend gave it when it ran."""
    return web.Response(status=stored.status, headers=list(stored.headers), body=stored.body)


@dataclass(frozen=True, slots=True)
class _Decided:
    decision: Decision
    # The request line it was made for: an application's middleware may hand the handler a
    # clone of the request for another path (which the clone's state still carries this to).
    method: str
    path: str


# Made by the route's Expect handler, which aiohttp runs before the middlewares.
_DECIDED = web.RequestKey("l402_decided", _Decided)


def _own_path(slot: _ServiceSlot) -> Handler:
    """The handler of the paths the gateway answers itself, never priced: health, redeem,
    credit."""

    async def answer(request: web.Request) -> web.StreamResponse:
        path = request.path
        if path in HEALTH_PATHS:
            return await _health(request, slot)
        if path == REDEEM_PATH:
            return await _redeem(request, slot.service, slot.trust_forwarded_for)
        return await _credit_endpoint(request, slot.service, path)

    return answer


def _priced(slot: _ServiceSlot, handler: Handler) -> Handler:
    """A route's handler behind the L402 decision.

    A wrapper of each route's handler rather than a middleware: aiohttp runs every
    middleware through a chain of its own on each request, which costs a paying client's
    request more than the decision itself. For the same reason it is a plain function (a
    callable object costs a call more) and no coroutine: a request let in again by the
    decision cache goes straight to the handler's.
    """

    async def serve(request: web.Request, decision: Decision) -> web.StreamResponse:
        if isinstance(decision, Allow):
            if decision.replay is not None:
                return _replayed(decision.replay)
            if decision.token is not None:
                request[TOKEN] = decision.token
            if decision.charge is not None:
                return await _serve_charged(request, handler)
            return await handler(request)
        return _refusal(request, decision)

    async def decide_and_serve(request: web.Request) -> web.StreamResponse:
        return await serve(request, await _decide(slot, request))

    def priced(request: web.Request) -> Awaitable[web.StreamResponse]:
        headers = request.headers
        # Only an Expect handler decides first (looked up only then: a miss costs a KeyError).
        if (
            _EXPECT in headers
            and (decided := request.get(_DECIDED)) is not None
            and decided.path == request.path
            and decided.method == request.method
        ):
            return serve(request, decided.decision)
        if slot.refuse is not None and (refusal := slot.refuse(request)) is not None:
            return _answered(refusal)
        # The decision already made for this credential and request line (a paying
        # client's repeat, any client's on a free route), if any: the whole decision on the
        # hot path, inlined, as each call there shows.
        service = slot.service
        if service is None:
            return decide_and_serve(request)
        # The path as aiohttp's router read it (cached there): '/' and '%' stay encoded in
        # it, so without a '%' it is the decoded path, and without a '\\' nothing in it
        # was an encoded separator (those are decided, and refused, in full).
        url = request.rel_url
        path = url.path_safe
        if "%" in path or "\\" in path:
            return decide_and_serve(request)
        # A method override is looked for only when the request could carry one
        # (authorize() keeps no decision for those). The query as sent, read from yarl's
        # field: its public readings are each computed on first use, a Python call on every
        # request (measured: 250 instructions of the ~10,000 the gateway adds).
        if (
            url._query
            or _OVERRIDE in headers
            or _HTTP_METHOD in headers
            or _METHOD_OVERRIDE in headers
        ) and _method_overrides(request):
            return decide_and_serve(request)
        allowed = service.allowed_again(
            tuple(headers.getall(_AUTHORIZATION, ())), request.method, path
        )
        if allowed is None:
            return decide_and_serve(request)
        if allowed.charge is not None or allowed.replay is not None:
            return serve(request, allowed)  # not cached today; never skip billing
        if (token := allowed.token) is not None:
            # aiohttp's request storage itself: its public setter checks the key's type in
            # Python first (measured: 1,100 instructions a request, a tenth of what the
            # gateway adds).
            request._state[TOKEN] = token
        return handler(request)

    _PRICED.add(priced)
    return priced


# The handlers ``_priced`` made: a route's is wrapped once, however often the app starts.
_PRICED: weakref.WeakSet[Handler] = weakref.WeakSet()


def encoded_separator(url: URL) -> bool:
    """Whether ``url``'s path encodes a '/' or '\\' (read apart by router and rules)."""
    raw = url.raw_path
    return "%" in raw and _ENCODED_SEPARATOR.search(raw) is not None


async def _answered(response: web.StreamResponse) -> web.StreamResponse:
    return response


class _DecideFirst:
    """A route's Expect handler behind the L402 decision.

    aiohttp answers ``Expect: 100-continue`` from the route's expect handler before any
    middleware runs, so a client would upload its body, then get the 402. Here the decision
    comes first: a refusal is the final answer (the connection then closes, as the client
    holds its body back), an allowed request gets the route's own handling (100 Continue).
    A final answer from the route's handling means the request is not served: a credit
    charge made for it is released here, as is one an application's middleware answers
    before the handler has the request (``_charge_on_prepare``). A
    pay-on-success request that already ran gets its stored answer as the final one (its
    body is not needed).
    """

    def __init__(self, slot: _ServiceSlot, route_handler: Expect):
        self._slot = slot
        self._route_handler = route_handler

    async def __call__(self, request: web.Request) -> web.StreamResponse | None:
        if not (request.app.get(_ANSWERS_TIPS, False) and is_tips_path(request.rel_url.raw_path)):
            slot = self._slot
            if slot.refuse is not None and (refusal := slot.refuse(request)) is not None:
                refusal.force_close()
                return refusal
            decision = await _decide(slot, request)
            request[_DECIDED] = _Decided(decision, request.method, request.path)
            if not isinstance(decision, Allow):
                response = _refusal(request, decision)
                response.force_close()
                return response
            if decision.replay is not None:
                response = _replayed(decision.replay)
                response.force_close()
                return response
            if decision.token is not None:
                request[TOKEN] = decision.token
        try:
            answer = await self._route_handler(request)
        except BaseException:
            await settle_charge(request, None, None, served=False)
            raise
        if answer is not None:
            await settle_charge(request, None, answer.headers, served=False)
        return answer


def _price_routes(router: web.UrlDispatcher, slot: _ServiceSlot, own_path: Handler) -> None:
    """Put every route's handler and Expect handler behind the L402 decision, those of
    sub-applications included, but the gateway's own paths (``own_path``).

    aiohttp has no public setter for a route's handlers, only the arguments when the route
    is added (by the application, before this runs).
    """
    for route in router.routes():
        if route.handler is own_path:
            continue
        if route.handler not in _PRICED:
            # aiohttp awaits what a handler returns, though its type asks for a coroutine.
            route._handler = cast(Any, _priced(slot, route.handler))
        if not isinstance(route._expect_handler, _DecideFirst):
            route._expect_handler = _DecideFirst(slot, route._expect_handler)


def _price_at_freeze(router: web.UrlDispatcher, slot: _ServiceSlot, own_path: Handler) -> None:
    """Price the routes added after ``_price_routes`` ran, when ``router`` is frozen: aiohttp
    freezes it once every startup handler has run, before the application serves anything."""
    freeze = router.freeze

    def priced_freeze() -> None:
        _price_routes(router, slot, own_path)
        freeze()

    router.freeze = priced_freeze  # type: ignore[method-assign]


def _subapplications(app: web.Application) -> list[web.Application]:
    """Every sub-application of ``app``, nested ones included."""
    return [each for sub in app._subapps for each in (sub, *_subapplications(sub))]


def setup_l402(
    app: web.Application,
    gateway: GatewayFactory,
    *,
    trust_forwarded_for: bool = False,
    stored_request: StoredRequestLoader | None = None,
    health: HealthSlot | None = None,
    refuse: Refuse | None = None,
) -> None:
    """Price ``app``'s routes; ``gateway`` opens the service for the app's lifetime.

    The gateway answers ``/.well-known/l402/live`` and ``/.well-known/l402/ready`` itself
    (``gateway.health``); readiness runs the checks of ``health`` (filled in by
    ``running_gateway(..., health=slot)``), or without it says whether the gateway started.

    ``stored_request`` keeps a request for pay-on-success routes (``settle = "on_success"``):
    the reverse proxy gives it; without it the application refuses to start when the
    service has such routes (``ConfigError``). With it, a POST whose body (a form, JSON or
    a multipart form) could name another method that is priced otherwise
    (``Pricing.body_may_reprice``) is read first and priced by that method as well; the
    handler then finds the body under ``BODY``. Without it the body is not read: the
    application routes by the request's own method.

    ``refuse`` answers a request before its L402 decision when it returns a response (the
    reverse proxy refuses ambiguous paths with it): without a middleware, which would cost
    every request aiohttp's middleware chain.
    """
    slot = _ServiceSlot(trust_forwarded_for, stored_request, health=health, refuse=refuse)
    app[_SLOT] = slot
    own_path = _own_path(slot)
    for path in _OWN_PATHS:
        app.router.add_route("*", path, own_path)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        if any(_SLOT in sub for sub in _subapplications(app)):
            raise ConfigError(_SETUP_TWICE)
        # At startup: the application has added its routes by then, but for those its own
        # startup handlers add (aiohttp runs them after this): priced as the router freezes.
        _price_routes(app.router, slot, own_path)
        _price_at_freeze(app.router, slot, own_path)
        async with gateway() as service:
            if stored_request is None:
                refuse_on_success(service)
            if service.pricing.bills_credit and _charge_on_prepare not in app.on_response_prepare:
                # Only a charge needs it; without receivers the signal costs no response
                # anything. (aiohttp freezes the signal after the startup; a sub-application's
                # when it is added.)
                if app.on_response_prepare.frozen:
                    raise ConfigError(_CREDIT_NEEDS_MAIN_APP)
                app.on_response_prepare.append(_charge_on_prepare)
            slot.service = service
            try:
                yield
            finally:
                slot.service = None

    app.cleanup_ctx.append(lifecycle)
