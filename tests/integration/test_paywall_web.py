"""The browser paywall through the real adapters, over the fakes: the aiohttp middleware, the
ASGI middleware under a real uvicorn, and the reverse proxy. Who gets HTML, the redeem
endpoint end to end, the L402 cookie as a credential, and the proxy keeping it to itself."""

from __future__ import annotations

import html
import json
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from http.cookies import SimpleCookie
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import BaseTestServer, TestClient, TestServer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway import l402
from gateway.examples import demo_api
from gateway.ports import Msat
from gateway.pricing import Rule
from gateway.web.aiohttp import TOKEN, setup_l402
from gateway.web.asgi import SERVICE_STATE_KEY, STATE_KEY, L402Middleware, Message, Scope
from gateway.web.paywall import MAX_REDEEM_BODY, REDEEM_PATH
from gateway.web.proxy import build_proxy
from tests.demo_rules import ECHO, HEALTH
from tests.fakes import FakeGateway
from tests.integration.asgi_helpers import uvicorn_serving

CHROME = (
    "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,"
    "image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7"
)
BROWSER = {"Accept": CHROME}
PAGE = "/api/premium/page"
RULES = (
    HEALTH,
    # 10.5 sat: the page shows the fraction; the lifetime becomes the cookie's max-age
    Rule("/api/premium/*", price_msat=Msat(10_500), service="premium", lifetime=3600),
    ECHO,
    Rule("/api/other/*", price_msat=Msat(1_000), service="other"),
)
PROBLEM_JSON = "application/problem+json"
JSON = {"Content-Type": "application/json", "Sec-Fetch-Site": "same-origin"}


async def premium_page(request: web.Request) -> web.Response:
    token = request.get(TOKEN)
    return web.json_response({"content": "premium", "service": token.service if token else None})


def aiohttp_app(gateway: FakeGateway) -> web.Application:
    app = demo_api()
    app.router.add_get(PAGE, premium_page)
    app.router.add_get("/api/other/x", premium_page)  # another service's route
    setup_l402(app, gateway)
    return app


@dataclass
class Page:
    """What a browser learns from the paywall page."""

    macaroon: str
    invoice: str
    redeem: str
    payment_hash: str


def page_of(text: str) -> Page:
    def attribute(name: str) -> str:
        match = re.search(rf'data-{name}="([^"]*)"', text)
        assert match is not None, name
        return html.unescape(match.group(1))

    macaroon = attribute("macaroon")
    identifier = l402.Identifier.decode(l402.decode_b64(macaroon).identifier)
    return Page(macaroon, attribute("invoice"), attribute("redeem"), identifier.payment_hash.hex())


def cookie_of(set_cookie: str, name: str = "L402-premium") -> tuple[str, dict[str, Any]]:
    parsed = SimpleCookie()
    parsed.load(set_cookie)
    morsel = parsed[name]
    return morsel.value, {key: morsel[key] for key in ("path", "max-age", "secure", "httponly")} | {
        "samesite": morsel["samesite"]
    }


# --- aiohttp -----------------------------------------------------------------------------

Client = TestClient[web.Request, web.Application]


@pytest_asyncio.fixture
async def gateway() -> FakeGateway:
    return FakeGateway(RULES)


@pytest_asyncio.fixture
async def client(gateway: FakeGateway) -> AsyncIterator[Client]:
    # No cookie jar: every cookie a test sends, it sends by hand.
    async with TestClient(
        TestServer(aiohttp_app(gateway)), cookie_jar=aiohttp.DummyCookieJar()
    ) as client:
        yield client


async def test_browser_gets_the_html_page_with_both_challenges(client: Client) -> None:
    response = await client.get(PAGE, headers=BROWSER)
    assert response.status == 402
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert response.headers["Cache-Control"] == "no-store"
    policy = response.headers["Content-Security-Policy"]
    assert policy.startswith("default-src 'none'; style-src 'nonce-")
    schemes = [value.split(" ", 1)[0] for value in response.headers.getall("WWW-Authenticate")]
    assert schemes == ["L402", "LSAT"]
    text = await response.text()
    page = page_of(text)
    challenge = l402.parse_challenge(response.headers.getall("WWW-Authenticate")[0])
    assert (page.macaroon, page.invoice) == (challenge.macaroon_b64, challenge.invoice)
    assert page.redeem == REDEEM_PATH
    assert '<span class="amount">10.5</span>' in text
    assert "10,500 msat" in text
    assert "<svg" in text


@pytest.mark.parametrize(
    "headers",
    [{}, {"Accept": "*/*"}, {"Accept": "application/json"}, {"Accept": "text/html, */*"}],
)
async def test_other_clients_keep_problem_json(client: Client, headers: dict[str, str]) -> None:
    response = await client.get(PAGE, headers=headers)
    assert response.status == 402
    assert response.content_type == PROBLEM_JSON
    assert "Content-Security-Policy" not in response.headers
    assert (await response.json(content_type=PROBLEM_JSON))["amount_msat"] == 10_500


async def test_a_browser_post_gets_problem_json(client: Client) -> None:
    response = await client.post("/api/echo", headers=BROWSER, data=b"x")
    assert response.status == 402
    assert response.content_type == PROBLEM_JSON


async def test_head_gets_the_page_headers(client: Client) -> None:
    response = await client.head(PAGE, headers=BROWSER)
    assert response.status == 402
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert await response.read() == b""


async def redeem(client: Client, macaroon: str, **headers: str) -> aiohttp.ClientResponse:
    return await client.post(
        REDEEM_PATH, data=json.dumps({"macaroon": macaroon}), headers={**JSON, **headers}
    )


async def test_pay_redeem_cookie_then_the_resource(client: Client, gateway: FakeGateway) -> None:
    page = page_of(await (await client.get(PAGE, headers=BROWSER)).text())
    pending = await redeem(client, page.macaroon)
    assert pending.status == 200
    assert "Set-Cookie" not in pending.headers
    assert (await pending.json())["state"] == "pending"

    preimage = gateway.backend.pay(bytes.fromhex(page.payment_hash))
    settled = await redeem(client, page.macaroon)
    assert settled.status == 200
    assert (await settled.json())["state"] == "settled"
    value, attributes = cookie_of(settled.headers["Set-Cookie"])
    assert attributes == {
        "path": "/api/premium",  # what the token opens: every page of the service
        "max-age": "3600",
        "secure": True,
        "httponly": True,
        "samesite": "Strict",
    }
    assert value.endswith(f":{preimage.hex()}")

    # The browser sends it back (among its other cookies) and gets the resource.
    response = await client.get(PAGE, headers={**BROWSER, "Cookie": f"theme=dark; L402={value}"})
    assert response.status == 200
    assert await response.json() == {"content": "premium", "service": "premium"}
    # A second redemption is harmless and gives the same credential.
    again = await redeem(client, page.macaroon)
    assert cookie_of(again.headers["Set-Cookie"])[0] == value


async def test_authorization_header_wins_over_the_cookie(
    client: Client, gateway: FakeGateway
) -> None:
    page = page_of(await (await client.get(PAGE, headers=BROWSER)).text())
    preimage = gateway.backend.pay(bytes.fromhex(page.payment_hash))
    good = f"{page.macaroon}:{preimage.hex()}"
    wrong = f"L402 {page.macaroon}:{'00' * 32}"
    response = await client.get(PAGE, headers={"Authorization": wrong, "Cookie": f"L402={good}"})
    assert response.status == 401
    response = await client.get(
        PAGE, headers={"Authorization": f"L402 {good}", "Cookie": "L402=junk"}
    )
    assert response.status == 200


async def test_a_stale_cookie_gets_the_page_again_not_a_401(client: Client) -> None:
    response = await client.get(PAGE, headers={**BROWSER, "Cookie": "L402=stale:00"})
    assert response.status == 402
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"


async def test_cookie_of_another_service_gets_a_challenge(
    client: Client, gateway: FakeGateway
) -> None:
    page = page_of(await (await client.get("/api/other/x", headers=BROWSER)).text())
    preimage = gateway.backend.pay(bytes.fromhex(page.payment_hash))
    response = await client.get(PAGE, headers={"Cookie": f"L402={page.macaroon}:{preimage.hex()}"})
    assert response.status == 402
    assert (await response.json(content_type=PROBLEM_JSON))["detail"] == (
        "token is not valid for this service"
    )


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b"\xff",
        b"[]",
        b'{"macaroon": null}',
        b'{"macaroon": "!!"}',
        b'{"macaroon": "QUJD"}',
        b'{"macaroon": "' + b"A" * 5000 + b'"}',
        b"[" * 5000,
    ],
)
async def test_redeem_garbage_is_400(client: Client, body: bytes) -> None:
    response = await client.post(REDEEM_PATH, data=body, headers=JSON)
    assert response.status == 400, await response.text()
    assert response.content_type == PROBLEM_JSON
    assert (await response.json(content_type=PROBLEM_JSON))["detail"]


async def test_redeem_refusals(client: Client, gateway: FakeGateway) -> None:
    page = page_of(await (await client.get(PAGE, headers=BROWSER)).text())
    macaroon = l402.decode_b64(page.macaroon)
    identifier = l402.Identifier.decode(macaroon.identifier)
    forged = l402.mint_token(
        bytes(32), identifier.payment_hash, identifier.token_id, ["services=premium:0"]
    )
    response = await redeem(client, l402.encode_b64(forged))
    assert response.status == 401
    assert (await response.json(content_type=PROBLEM_JSON))["detail"] == (
        "invalid macaroon signature"
    )
    assert (await client.get(REDEEM_PATH)).status == 405
    assert (await client.get(REDEEM_PATH)).headers["Allow"] == "POST"
    body = json.dumps({"macaroon": page.macaroon})
    plain = await client.post(REDEEM_PATH, data=body, headers={"Content-Type": "text/plain"})
    assert plain.status == 415
    cross = await redeem(client, page.macaroon, **{"Sec-Fetch-Site": "cross-site"})
    assert cross.status == 403
    big = await client.post(REDEEM_PATH, data=b"x" * (MAX_REDEEM_BODY + 10), headers=JSON)
    assert big.status == 413

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"x" * 1024

    streamed = await client.post(REDEEM_PATH, data=chunks(), headers=JSON)
    assert streamed.status == 413
    # None of that issued an invoice.
    assert len(gateway.backend.invoices) == 1


async def test_redeem_path_is_never_priced() -> None:
    gateway = FakeGateway((Rule("/*", price_msat=Msat(1_000)),))
    async with TestClient(TestServer(aiohttp_app(gateway))) as client:
        response = await client.post(REDEEM_PATH, data=b"{}", headers=JSON)
        assert response.status == 400
    assert gateway.backend.invoices == {}


# --- ASGI under uvicorn ------------------------------------------------------------------


async def asgi_handler(request: Request) -> JSONResponse:
    token = request.state.l402_token
    return JSONResponse(
        {"content": "premium", "service": token.service if token else None},
    )


@dataclass
class Asgi:
    url: str
    gateway: FakeGateway
    http: aiohttp.ClientSession


@pytest_asyncio.fixture
async def asgi() -> AsyncIterator[Asgi]:
    gateway = FakeGateway(RULES)
    app = L402Middleware(Starlette(routes=[Route("/api/premium/{name}", asgi_handler)]), gateway)
    async with (
        uvicorn_serving(app) as url,
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http,
    ):
        yield Asgi(url, gateway, http)


async def asgi_get(asgi: Asgi, path: str, headers: Mapping[str, str]) -> tuple[int, Any, str]:
    async with asgi.http.get(asgi.url + path, headers=headers) as response:
        return response.status, response.headers, await response.text()


async def asgi_redeem(asgi: Asgi, body: bytes | str) -> tuple[int, Any, Any]:
    async with asgi.http.post(asgi.url + REDEEM_PATH, data=body, headers=JSON) as response:
        return response.status, response.headers, await response.json(content_type=None)


async def test_asgi_browser_page_then_redeem_then_cookie(asgi: Asgi) -> None:
    status, headers, text = await asgi_get(asgi, PAGE, BROWSER)
    assert status == 402
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["Cache-Control"] == "no-store"
    assert "script-src 'nonce-" in headers["Content-Security-Policy"]
    assert len(headers.getall("WWW-Authenticate")) == 2
    page = page_of(text)
    assert page.redeem == REDEEM_PATH

    status, _, problem = await asgi_get(asgi, PAGE, {"Accept": "application/json"})
    assert status == 402
    assert json.loads(problem)["status"] == 402

    body = json.dumps({"macaroon": page.macaroon})
    status, headers, document = await asgi_redeem(asgi, body)
    assert (status, document["state"]) == (200, "pending")
    assert "Set-Cookie" not in headers
    asgi.gateway.backend.pay(bytes.fromhex(page.payment_hash))
    status, headers, document = await asgi_redeem(asgi, body)
    assert (status, document["state"]) == (200, "settled")
    value, attributes = cookie_of(headers["Set-Cookie"])
    assert attributes["path"] == "/api/premium"
    assert attributes["secure"] is True
    assert attributes["httponly"] is True
    assert attributes["samesite"] == "Strict"

    status, _, text = await asgi_get(asgi, PAGE, {"Cookie": f"a=1; L402={value}"})
    assert status == 200
    assert json.loads(text) == {"content": "premium", "service": "premium"}
    # Authorization wins over the cookie.
    wrong = f"L402 {page.macaroon}:{'00' * 32}"
    status, _, _ = await asgi_get(asgi, PAGE, {"Cookie": f"L402={value}", "Authorization": wrong})
    assert status == 401


async def test_asgi_redeem_refusals(asgi: Asgi) -> None:
    for body in (b"", b"{", b'{"macaroon": 1}', b'{"macaroon": "QUJD"}'):
        status, headers, problem = await asgi_redeem(asgi, body)
        assert status == 400, body
        assert headers["Content-Type"] == PROBLEM_JSON
    forged = l402.mint_token(bytes(32), bytes(32), bytes(32), ["services=premium:0"])
    status, _, problem = await asgi_redeem(asgi, json.dumps({"macaroon": l402.encode_b64(forged)}))
    assert (status, problem["detail"]) == (401, "unknown or revoked token")

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"x" * 1024

    async with asgi.http.post(asgi.url + REDEEM_PATH, data=chunks(), headers=JSON) as response:
        assert response.status == 413
    async with asgi.http.get(asgi.url + REDEEM_PATH) as response:
        assert response.status == 405
    assert asgi.gateway.backend.invoices == {}


async def test_asgi_redeem_url_follows_root_path() -> None:
    # The rules see the whole path, root_path included.
    gateway = FakeGateway((Rule("/app/api/premium/*", price_msat=Msat(1_000)),))
    app = L402Middleware(Starlette(routes=[Route("/api/premium/{name}", asgi_handler)]))
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    async with gateway() as service:
        scope: Scope = {
            "type": "http",
            "method": "GET",
            "path": "/app/api/premium/page",
            "root_path": "/app",
            "query_string": b"",
            "headers": [(b"accept", CHROME.encode())],
            "client": ("127.0.0.1", 1),
            "state": {SERVICE_STATE_KEY: service},  # what l402_lifespan leaves for requests
        }
        await app(scope, receive, send)
        assert sent[0]["status"] == 402
        assert page_of(sent[1]["body"].decode()).redeem == "/app" + REDEEM_PATH
        sent.clear()
        await app({**scope, "method": "POST", "path": "/app" + REDEEM_PATH}, receive, send)
        assert sent[0]["status"] == 415  # reached the redeem handler
        assert STATE_KEY not in scope.get("state", {})


# --- the reverse proxy -------------------------------------------------------------------


@pytest_asyncio.fixture
async def proxied() -> AsyncIterator[tuple[Client, FakeGateway]]:
    gateway = FakeGateway(RULES)
    upstream: BaseTestServer = TestServer(demo_api())
    async with upstream:
        app = build_proxy(str(upstream.make_url("")), gateway)
        async with TestClient(TestServer(app), cookie_jar=aiohttp.DummyCookieJar()) as client:
            yield client, gateway


async def test_proxy_serves_the_page_and_redeem_and_keeps_the_cookie_to_itself(
    proxied: tuple[Client, FakeGateway],
) -> None:
    client, gateway = proxied
    response = await client.get("/api/echo", headers=BROWSER)
    assert response.status == 402
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    page = page_of(await response.text())
    gateway.backend.pay(bytes.fromhex(page.payment_hash))
    settled = await redeem(client, page.macaroon)  # answered by the proxy, never forwarded
    assert settled.status == 200
    value, attributes = cookie_of(settled.headers["Set-Cookie"], "L402-echo")
    assert attributes["path"] == "/api/echo"

    response = await client.get(
        "/api/echo", headers={"Cookie": f"session=abc; L402-echo={value}; theme=dark"}
    )
    assert response.status == 200
    echoed = {name.lower(): text for name, text in (await response.json())["headers"].items()}
    assert echoed["cookie"] == "session=abc; theme=dark"
    assert "L402" not in json.dumps(echoed)
    assert value.split(":")[1] not in json.dumps(echoed)
    assert json.loads(echoed["x-l402-token"])["service"] == "echo"


async def test_proxy_drops_a_cookie_header_that_held_only_the_l402_cookie(
    proxied: tuple[Client, FakeGateway],
) -> None:
    client, gateway = proxied
    page = page_of(await (await client.get("/api/echo", headers=BROWSER)).text())
    preimage = gateway.backend.pay(bytes.fromhex(page.payment_hash))
    response = await client.get(
        "/api/echo", headers={"Cookie": f"L402={page.macaroon}:{preimage.hex()}"}
    )
    assert response.status == 200
    echoed = {name.lower() for name in (await response.json())["headers"]}
    assert "cookie" not in echoed


async def test_proxy_redeem_garbage_is_400(proxied: tuple[Client, FakeGateway]) -> None:
    client, _ = proxied
    response = await client.post(REDEEM_PATH, data=b"nope", headers=JSON)
    assert response.status == 400
