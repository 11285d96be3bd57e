"""Attacks on the gateway in front of real LND: every forged, tampered, replayed, foreign,
expired, revoked or mismatched credential is refused with 401 or 402 and a reason; never 200,
never a 5xx. Each attack is tried on all three front ends of gateway A.

One arena per module: gateway A (the target: the aiohttp middleware, the ASGI middleware
under uvicorn and the reverse proxy, three services sharing one SQLite store) and gateway B
(another instance on the same node, with its own store), a few tokens really paid by bob,
and an amountless invoice an attacker made on alice and paid 1 sat, so its preimage is
genuine but bought nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
import pytest_asyncio
from aiohttp import web
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from yarl import URL

from gateway import l402
from gateway.client.offer import token_valid_until as offer_valid_until
from gateway.config import Config, RateLimitConfig, RouteConfig
from gateway.examples import demo_api
from gateway.lnd.client import LndClient
from gateway.ports import Msat
from gateway.runtime import running_gateway
from gateway.store import SqliteStore
from gateway.web.asgi import L402Middleware
from gateway.web.paywall import REDEEM_PATH
from gateway.web.proxy import build_proxy
from regtest.network import Network
from tests.integration.asgi_helpers import uvicorn_serving
from tests.regtest.gateway_helpers import ROUTES, OffsetClock, gateway_config, serving
from tests.regtest.test_gateway_regtest import (
    MountedGateway,
    _mounted,
    _paid_authorization,
)

pytestmark = pytest.mark.regtest

PREMIUM = "/api/premium/fortune"
ECHO = "/api/echo"
QUOTE = "/api/quote"
BRIEF = "/api/brief"
# Expiry comes in real time rather than by moving the clock forward and back: the rate
# limiter takes a clock that steps back as a client that must wait that long.
BRIEF_ROUTE = RouteConfig(pattern=BRIEF, price_msat=1_000, service="brief", lifetime=1)
# Priced for GET only: a POST there is free unless it asks to be read as a GET.
READS = "/api/reads/article"
READS_ROUTE = RouteConfig(
    pattern="/api/reads/*", methods=("GET",), price_msat=1_000, service="reads"
)
# Every attack gets the real reason, not the 429 that many challenges would earn.
UNLIMITED = RateLimitConfig(challenges_per_second=1000, burst=1000)


@dataclass(frozen=True)
class Paid:
    """A token bob paid for: its macaroon and the preimage he learned."""

    macaroon: l402.Macaroon
    preimage: str  # hex

    def authorization(self, macaroon: l402.Macaroon | None = None, preimage: str = "") -> str:
        return f"L402 {l402.encode_b64(macaroon or self.macaroon)}:{preimage or self.preimage}"


@dataclass
class Arena:
    gateway: MountedGateway  # A's aiohttp middleware, where the tokens are bought
    fronts: dict[str, str]  # A's front ends by name: their base URLs
    bob: LndClient
    network: Network
    premium: Paid  # for PREMIUM, on A
    echo: Paid  # for ECHO, on A
    unpaid: l402.Macaroon  # A's challenge for PREMIUM, never paid
    foreign: Paid  # for PREMIUM, on gateway B
    brief: Paid  # for BRIEF, on A: valid for one second
    attacker_hash: bytes  # the amountless invoice the attacker made on alice and paid
    attacker_preimage: str

    async def pay(self, path: str) -> Paid:
        return await _paid_on(self.gateway, self.bob, self.network, path)


async def _paid_on(gateway: MountedGateway, bob: LndClient, network: Network, path: str) -> Paid:
    authorization, challenge = await _paid_authorization(gateway, bob, network, path)
    return Paid(l402.decode_b64(challenge.macaroon_b64), authorization.rsplit(":", 1)[1])


async def _attacker_invoice(network: Network) -> tuple[bytes, str]:
    """An amountless invoice made on alice, paid 1 sat by bob: (payment hash, preimage hex)."""
    async with LndClient(network.alice.settings()) as alice:
        invoice = await alice.add_invoice(Msat(0), "anything", 600)
        payer = await asyncio.create_subprocess_exec(
            *network.bob.lncli().split(),
            "payinvoice",
            "--force",
            "--amt=1",
            invoice.payment_request,
            stdout=asyncio.subprocess.DEVNULL,
        )
        assert await asyncio.wait_for(payer.wait(), 60) == 0
        settled = await alice.lookup_invoice(invoice.payment_hash)
    assert settled.preimage is not None
    assert settled.amount_msat == 0
    assert settled.amount_paid_msat == 1000
    return invoice.payment_hash, settled.preimage.hex()


async def _any_path(request: Request) -> JSONResponse:
    return JSONResponse({"path": request.url.path})


async def _aiohttp_any_path(request: web.Request) -> web.Response:
    return web.json_response({"path": request.path})


def _aiohttp_app() -> web.Application:
    """demo_api() with a route for any other GET or POST path, as the other fronts have (the
    aiohttp middleware prices the application's routes only)."""
    app = demo_api()
    for method in ("GET", "POST"):
        app.router.add_route(method, "/{tail:.*}", _aiohttp_any_path)
    return app


@contextlib.asynccontextmanager
async def _other_fronts(config: Config) -> AsyncIterator[dict[str, str]]:
    """The ASGI middleware and the reverse proxy, each its own service on ``config``'s store."""
    asgi = L402Middleware(
        Starlette(routes=[Route("/{path:path}", _any_path, methods=["GET", "POST"])]),
        lambda: running_gateway(config),
    )
    async with contextlib.AsyncExitStack() as stack:
        asgi_url = await stack.enter_async_context(uvicorn_serving(asgi))
        upstream_url = await stack.enter_async_context(serving(demo_api()))
        proxy_url = await stack.enter_async_context(
            serving(build_proxy(upstream_url, lambda: running_gateway(config)))
        )
        yield {"ASGI middleware": asgi_url, "reverse proxy": proxy_url}


@pytest_asyncio.fixture(scope="module")
async def arena(network: Network, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Arena]:
    workdir = tmp_path_factory.mktemp("attacks")
    configs = [
        dataclasses.replace(
            gateway_config(network, workdir / f"{name}.db", rate_limit=UNLIMITED),
            routes=(*ROUTES, BRIEF_ROUTE, READS_ROUTE),
        )
        for name in ("a", "b")
    ]
    async with contextlib.AsyncExitStack() as stack:
        bob = await stack.enter_async_context(LndClient(network.bob.settings()))
        target, other = [
            await stack.enter_async_context(_mounted(config, OffsetClock(), _aiohttp_app()))
            for config in configs
        ]
        fronts = await stack.enter_async_context(_other_fronts(configs[0]))
        async with target.session.get(target.url + PREMIUM) as response:
            assert response.status == 402
            unpaid = l402.decode_b64((await response.json())["macaroon"])
        attacker_hash, attacker_preimage = await _attacker_invoice(network)
        yield Arena(
            gateway=target,
            fronts={"aiohttp middleware": target.url, **fronts},
            bob=bob,
            network=network,
            premium=await _paid_on(target, bob, network, PREMIUM),
            echo=await _paid_on(target, bob, network, ECHO),
            unpaid=unpaid,
            foreign=await _paid_on(other, bob, network, PREMIUM),
            brief=await _paid_on(target, bob, network, BRIEF),
            attacker_hash=attacker_hash,
            attacker_preimage=attacker_preimage,
        )


@dataclass(frozen=True)
class Probe:
    path: str
    authorization: tuple[str, ...] = ()
    cookie: str | None = None
    redeem: str | None = None  # a macaroon to POST to the redeem endpoint instead


Forge = Callable[[Arena], Awaitable[Probe]]


@dataclass(frozen=True)
class Attack:
    name: str
    forge: Forge
    status: int
    detail: str


def _resigned(macaroon: l402.Macaroon) -> l402.Macaroon:
    """Same identifier and caveats, signed with a key the attacker made up."""
    return l402.mint(secrets.token_bytes(32), macaroon.identifier, macaroon.caveats)


def _edit_caveats(macaroon: l402.Macaroon, edit: Callable[[bytes], bytes | None]) -> l402.Macaroon:
    """The caveats edited in place (None drops one); the signature is kept."""
    kept = (edit(caveat) for caveat in macaroon.caveats)
    return dataclasses.replace(macaroon, caveats=tuple(c for c in kept if c is not None))


def _edit_identifier(macaroon: l402.Macaroon, **changes: object) -> l402.Macaroon:
    identifier = l402.Identifier.decode(macaroon.identifier)
    edited = dataclasses.replace(identifier, **changes)  # type: ignore[arg-type]
    return dataclasses.replace(macaroon, identifier=edited.encode())


def _attacker_token(payment_hash: bytes) -> l402.Macaroon:
    """A token minted from scratch, as the gateway would, with the attacker's own root key."""
    caveats = ["services=premium:0", "premium_capabilities=read"]
    return l402.mint_token(secrets.token_bytes(32), payment_hash, secrets.token_bytes(32), caveats)


def _bump_version(macaroon: l402.Macaroon) -> l402.Macaroon:
    return dataclasses.replace(macaroon, identifier=b"\x00\x01" + macaroon.identifier[2:])


async def _revoked_after_use(arena: Arena) -> Probe:
    paid = await arena.pay(PREMIUM)
    authorization = paid.authorization()
    async with arena.gateway.session.get(
        arena.gateway.url + PREMIUM, headers={"Authorization": authorization}
    ) as response:
        assert response.status == 200  # it worked once, so the gateway has it cached
    store = await SqliteStore.open(arena.gateway.database)
    try:
        token_id = l402.Identifier.decode(paid.macaroon.identifier).token_id
        assert await store.revoke_token(token_id)
    finally:
        await store.close()
    return Probe(PREMIUM, (authorization,))


def _push_valid_until(macaroon: l402.Macaroon) -> l402.Macaroon:
    return _edit_caveats(
        macaroon,
        lambda c: b"brief_valid_until=99999999999" if c.startswith(b"brief_valid_until=") else c,
    )


def _drop_valid_until(macaroon: l402.Macaroon) -> l402.Macaroon:
    return _edit_caveats(macaroon, lambda c: None if c.startswith(b"brief_valid_until=") else c)


def _expired(edit: Callable[[l402.Macaroon], l402.Macaroon]) -> Forge:
    """The brief token, edited, once it has expired (real time: no clock is moved)."""

    async def forge(arena: Arena) -> Probe:
        valid_until = offer_valid_until(arena.brief.macaroon)
        assert valid_until is not None
        await asyncio.sleep(max(0.0, valid_until + 1 - time.time()))
        return Probe(BRIEF, (arena.brief.authorization(edit(arena.brief.macaroon)),))

    return forge


def probe(make: Callable[[Arena], Probe]) -> Forge:
    async def forge(arena: Arena) -> Probe:
        return make(arena)

    return forge


INVALID_SIGNATURE = "invalid macaroon signature"
WRONG_PREIMAGE = "preimage does not match the payment hash"
UNKNOWN = "unknown or revoked token"
OTHER_SERVICE = "token is not valid for this service"

ATTACKS = [
    # Forged: signed without the root key.
    Attack(
        "forged: re-signed with a wrong root key",
        probe(lambda a: Probe(PREMIUM, (a.premium.authorization(_resigned(a.premium.macaroon)),))),
        401,
        INVALID_SIGNATURE,
    ),
    Attack(
        "forged: minted from scratch for a paid invoice",
        probe(
            lambda a: Probe(
                PREMIUM,
                (
                    a.premium.authorization(
                        _attacker_token(
                            l402.Identifier.decode(a.premium.macaroon.identifier).payment_hash
                        )
                    ),
                ),
            )
        ),
        401,
        UNKNOWN,
    ),
    # Tampered: a caveat edited, dropped or the identifier changed, the signature kept.
    Attack(
        "tampered: service swapped",
        probe(
            lambda a: Probe(
                ECHO,
                (
                    a.premium.authorization(
                        _edit_caveats(
                            a.premium.macaroon,
                            lambda c: (
                                c.replace(b"premium", b"echo") if c.startswith(b"services=") else c
                            ),
                        )
                    ),
                ),
            )
        ),
        401,
        INVALID_SIGNATURE,
    ),
    Attack(
        "tampered: expired, valid_until pushed out",
        _expired(_push_valid_until),
        401,
        INVALID_SIGNATURE,
    ),
    Attack(
        "tampered: expired, expiry caveat dropped",
        _expired(_drop_valid_until),
        401,
        INVALID_SIGNATURE,
    ),
    Attack(
        "tampered: identifier version",
        probe(
            lambda a: Probe(PREMIUM, (a.premium.authorization(_bump_version(a.premium.macaroon)),))
        ),
        401,
        "unknown identifier version",
    ),
    Attack(
        "tampered: caveat appended that the gateway does not know",
        probe(
            lambda a: Probe(
                PREMIUM, (a.premium.authorization(a.premium.macaroon.add_caveat("admin=true")),)
            )
        ),
        401,
        "unknown caveat",
    ),
    Attack(
        "tampered: caveat appended to widen the services",
        probe(
            lambda a: Probe(
                ECHO,
                (a.premium.authorization(a.premium.macaroon.add_caveat("services=echo:0")),),
            )
        ),
        402,
        OTHER_SERVICE,
    ),
    # Replayed: a valid token in another request's context, or after its revocation.
    Attack(
        "replayed: premium token on the echo route",
        probe(lambda a: Probe(ECHO, (a.premium.authorization(),))),
        402,
        OTHER_SERVICE,
    ),
    Attack(
        "replayed: echo token on the premium route",
        probe(lambda a: Probe(PREMIUM, (a.echo.authorization(),))),
        402,
        OTHER_SERVICE,
    ),
    Attack(
        "replayed: premium token on the dynamically priced route",
        probe(lambda a: Probe(QUOTE, (a.premium.authorization(),))),
        402,
        OTHER_SERVICE,
    ),
    Attack("replayed: after revocation", _revoked_after_use, 401, UNKNOWN),
    Attack(
        "replayed: next to another valid credential",
        probe(lambda a: Probe(PREMIUM, (a.premium.authorization(), a.echo.authorization()))),
        401,
        "several L402 credentials in one request",
    ),
    Attack(
        "replayed: with a second macaroon as a discharge",
        probe(
            lambda a: Probe(
                PREMIUM,
                (
                    f"L402 {l402.encode_b64(a.premium.macaroon)},"
                    f"{l402.encode_b64(a.echo.macaroon)}:{a.premium.preimage}",
                ),
            )
        ),
        401,
        "discharge macaroons are not supported",
    ),
    # Cross-gateway: paid and valid, but on another gateway instance with its own store.
    Attack(
        "cross-gateway: token of gateway B",
        probe(lambda a: Probe(PREMIUM, (a.foreign.authorization(),))),
        401,
        UNKNOWN,
    ),
    Attack(
        "cross-gateway: redeeming gateway B's macaroon",
        probe(lambda a: Probe(PREMIUM, redeem=l402.encode_b64(a.foreign.macaroon))),
        401,
        UNKNOWN,
    ),
    Attack("expired", _expired(lambda macaroon: macaroon), 402, "token expired"),
    # A preimage that is genuine, but of another invoice.
    Attack(
        "preimage of another paid invoice on an unpaid challenge",
        probe(lambda a: Probe(PREMIUM, (a.premium.authorization(a.unpaid, a.echo.preimage),))),
        401,
        WRONG_PREIMAGE,
    ),
    Attack(
        "preimage of another paid invoice on a paid token",
        probe(lambda a: Probe(PREMIUM, (a.premium.authorization(preimage=a.echo.preimage),))),
        401,
        WRONG_PREIMAGE,
    ),
    # The attacker's own amountless invoice on alice: genuine preimage, nothing bought.
    Attack(
        "zero-amount invoice: its preimage on the gateway's unpaid challenge",
        probe(lambda a: Probe(PREMIUM, (a.premium.authorization(a.unpaid, a.attacker_preimage),))),
        401,
        WRONG_PREIMAGE,
    ),
    Attack(
        "zero-amount invoice: the gateway's macaroon rebound to its payment hash",
        probe(
            lambda a: Probe(
                PREMIUM,
                (
                    a.premium.authorization(
                        _edit_identifier(a.unpaid, payment_hash=a.attacker_hash),
                        a.attacker_preimage,
                    ),
                ),
            )
        ),
        401,
        UNKNOWN,
    ),
    Attack(
        "zero-amount invoice: a macaroon the attacker minted for it",
        probe(
            lambda a: Probe(
                PREMIUM,
                (a.premium.authorization(_attacker_token(a.attacker_hash), a.attacker_preimage),),
            )
        ),
        401,
        UNKNOWN,
    ),
    Attack(
        "zero-amount invoice: redeeming the attacker's macaroon for a cookie",
        probe(lambda a: Probe(PREMIUM, redeem=l402.encode_b64(_attacker_token(a.attacker_hash)))),
        401,
        UNKNOWN,
    ),
    # The paywall's cookie is a credential too; one that does not verify gets a challenge.
    Attack(
        "forged cookie",
        probe(
            lambda a: Probe(
                PREMIUM,
                cookie=f"{l402.encode_b64(_resigned(a.premium.macaroon))}:{a.premium.preimage}",
            )
        ),
        402,
        "payment required",
    ),
    Attack(
        "forged macaroon to redeem for a cookie",
        probe(lambda a: Probe(PREMIUM, redeem=l402.encode_b64(_resigned(a.premium.macaroon)))),
        401,
        INVALID_SIGNATURE,
    ),
]


FRONTS = ["aiohttp middleware", "ASGI middleware", "reverse proxy"]


@pytest.mark.parametrize("front", FRONTS)
@pytest.mark.parametrize("attack", ATTACKS, ids=[attack.name for attack in ATTACKS])
async def test_attack_is_refused(arena: Arena, attack: Attack, front: str) -> None:
    attempt = await attack.forge(arena)
    url = arena.fronts[front]
    session = arena.gateway.session
    headers = [("Authorization", value) for value in attempt.authorization]
    if attempt.cookie is not None:
        headers.append(("Cookie", f"L402={attempt.cookie}"))
    if attempt.redeem is None:
        request = session.get(url + attempt.path, headers=headers)
    else:
        request = session.post(url + REDEEM_PATH, json={"macaroon": attempt.redeem})
    async with request as response:
        body = json.loads(await response.read())
        assert (response.status, body["detail"]) == (attack.status, attack.detail)
        assert "set-cookie" not in response.headers
        if response.status == 402:  # a fresh challenge to pay instead
            assert response.headers.getall("WWW-Authenticate")
    # The genuine token still opens its route after the attempt, narrowed by a holder's
    # caveat too (attenuation narrows, it never breaks a token).
    narrowed = arena.premium.macaroon.add_caveat("premium_capabilities=read")
    for macaroon in (arena.premium.macaroon, narrowed):
        async with session.get(
            url + PREMIUM, headers={"Authorization": arena.premium.authorization(macaroon)}
        ) as response:
            assert response.status == 200


# Spellings of PREMIUM that some backend routes to it (see README "Path policy").
SPELLINGS = [
    "/API/premium/fortune",
    "/Api/Premium/fortune/",
    "/api/premium",
    "/api\\premium\\fortune",
    "/x/..\\api\\premium\\fortune",
    "/api%5Cpremium%5Cfortune",
    "/api;x=1/premium/fortune",
    "/api/premium;jsessionid=1/fortune",
    "/api%252fpremium/fortune",
    "/api%2Fpremium/fortune",
    "/api/premium./fortune",
    "/api/%EF%BD%90remium/fortune",
]


async def _raw_status(front_url: str, request: str) -> tuple[int, bytes]:
    """Send ``request`` exactly as written (an HTTP client would normalize it)."""
    url = URL(front_url)
    assert url.host is not None
    assert url.port is not None
    reader, writer = await asyncio.open_connection(url.host, url.port)
    writer.write(request.encode())
    response = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    await writer.wait_closed()
    return int(response.split(b" ", 2)[1]), response[:300]


@pytest.mark.parametrize("front", FRONTS)
@pytest.mark.parametrize("target", SPELLINGS)
async def test_no_spelling_of_a_priced_path_is_served_unpaid(
    arena: Arena, front: str, target: str
) -> None:
    request = f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    status, response = await _raw_status(arena.fronts[front], request)
    assert status in (400, 402), response


# Ways a free POST asks a backend (Rails, Laravel, Symfony, Express) to route it as a GET.
OVERRIDES = [
    (READS, "X-HTTP-Method-Override: GET\r\n"),
    (READS, "X-HTTP-Method: get\r\n"),
    (READS, "X-Method-Override: GET\r\n"),
    (READS + "?_method=GET", ""),
]


@pytest.mark.parametrize("front", FRONTS)
@pytest.mark.parametrize(("target", "header"), OVERRIDES)
async def test_a_method_override_is_priced_by_the_method_it_names(
    arena: Arena, front: str, target: str, header: str
) -> None:
    plain = f"POST {READS} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    status, response = await _raw_status(arena.fronts[front], plain)
    assert status != 402, response  # the POST alone is free
    overridden = (
        f"POST {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n"
        f"{header}\r\n"
    )
    status, response = await _raw_status(arena.fronts[front], overridden)
    assert status == 402, response
