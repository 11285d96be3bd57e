"""Tip jars and payment links over HTTP: the reverse proxy (every path priced) in front of a
tiny upstream, with the tip routes over the fakes. LNURL-pay and Lightning Address answers,
the invoices' description hashes, the link page and its status, QR images, and every bad
input answered as an LNURL error, never forwarded, never a 500."""

from __future__ import annotations

import asyncio
import hashlib
import html
import json
import re
import shutil
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.client import bolt11
from gateway.lnurl import MAX_COMMENT_CHARS, SuccessAction
from gateway.ports import Msat, PaymentHash
from gateway.pricing import Rule
from gateway.service import RateLimiter
from gateway.service.tips import TipJar, Tips
from gateway.web.aiohttp import add_tip_routes
from gateway.web.lnurl import TipsSlot
from gateway.web.proxy import build_proxy
from tests.fakes import FakeGateway
from tests.integration.test_aiohttp_middleware import raw_get

BASE = "https://pay.example.com"
JARS = "/.well-known/lnurlp"
LINKS = "/.well-known/l402/links"
COFFEE = TipJar(
    name="coffee",
    description="Buy me a coffee",
    min_msat=Msat(1_000),
    max_msat=Msat(1_000_000),
    comment_allowed=20,
    success=SuccessAction(message="Thank you!"),
)
SILENT = TipJar(
    name="silent", description="No comments here", min_msat=Msat(1_000), max_msat=Msat(5_000)
)
NOTES = TipJar(
    name="notes",
    description="Leave a note",
    min_msat=Msat(1_000),
    max_msat=Msat(5_000),
    comment_allowed=MAX_COMMENT_CHARS,
)
Client = TestClient[web.Request, web.Application]


@dataclass
class World:
    client: Client
    gateway: FakeGateway
    tips: Tips
    upstream_paths: list[str]
    slot: TipsSlot

    async def get(self, path: str, status: int = 200, /, **params: str) -> Any:
        response = await self.client.get(path, params=params)
        assert response.status == status, await response.text()
        assert response.headers["Cache-Control"] == "no-store"
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        body = await response.json()
        if status != 200:
            assert set(body) == {"status", "reason"}
            assert body["status"] == "ERROR"
            assert body["reason"]
        return body

    async def error(self, path: str, status: int, /, **params: str) -> str:
        body = await self.get(path, status, **params)
        return str(body["reason"])


@pytest_asyncio.fixture
async def world() -> AsyncIterator[World]:
    seen: list[str] = []

    async def anything(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.Response(text="upstream")

    upstream = web.Application()
    upstream.router.add_route("*", "/{tail:.*}", anything)
    # Every path is priced: a tip path that reached the L402 decision would get a 402.
    gateway = FakeGateway([Rule("/*", price_msat=Msat(5_000), service="all")])
    tips = Tips(
        backend=gateway.backend,
        canceler=gateway.backend,
        store=gateway.store,
        clock=gateway.clock,
        jars={jar.name: jar for jar in (COFFEE, SILENT, NOTES)},
        base_url=BASE,
        invoice_expiry=600,
    )
    limiter = RateLimiter(1000.0, 1000, 100, gateway.clock)
    slot = TipsSlot(tips, limiter)
    async with TestServer(upstream) as upstream_server:
        app = build_proxy(str(upstream_server.make_url("")), gateway, tips=slot)
        async with TestClient(TestServer(app)) as client:
            yield World(client, gateway, tips, seen, slot)
    assert not [path for path in seen if path.startswith("/.well-known/")]


def local(url: str) -> tuple[str, dict[str, str]]:
    """A URL under ``BASE`` as the path the test client fetches, and its query."""
    assert url.startswith(BASE + "/")
    parts = urllib.parse.urlsplit(url)
    return parts.path, dict(urllib.parse.parse_qsl(parts.query))


def check_invoice(pr: str, amount_msat: int, metadata: str) -> bolt11.Invoice:
    invoice = bolt11.decode(pr)
    assert invoice.amount_msat == amount_msat
    assert invoice.description_hash == hashlib.sha256(metadata.encode()).digest()
    return invoice


async def wait_for(predicate: Any) -> None:
    for _ in range(200):
        if await predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


# Tip jars: LUD-06 / LUD-16


async def test_a_tip_jar_answers_lnurl_pay_and_its_invoice_hashes_the_metadata(
    world: World,
) -> None:
    request = await world.get(f"{JARS}/coffee")
    assert request["tag"] == "payRequest"
    assert (request["minSendable"], request["maxSendable"]) == (1_000, 1_000_000)
    assert request["commentAllowed"] == 20
    metadata = json.loads(request["metadata"])
    assert ["text/plain", "Buy me a coffee"] in metadata
    assert ["text/identifier", "coffee@pay.example.com"] in metadata
    path, query = local(request["callback"])
    assert path == f"{JARS}/coffee/callback"
    answer = await world.get(path, amount="21000", comment="great post", **query)
    assert answer["routes"] == []
    assert answer["successAction"] == {"tag": "message", "message": "Thank you!"}
    invoice = check_invoice(answer["pr"], 21_000, request["metadata"])
    record = await world.gateway.store.get_invoice(PaymentHash(invoice.payment_hash))
    assert record is not None
    assert record.service == "tip:coffee"
    assert record.comment == "great post"
    assert world.upstream_paths == []


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({}, "amount"),
        ({"amount": ""}, "amount"),
        ({"amount": "abc"}, "whole number"),
        ({"amount": "-5"}, "whole number"),
        ({"amount": "1.5"}, "whole number"),
        ({"amount": "9" * 400}, "maximum"),
        ({"amount": "999"}, "minimum"),
        ({"amount": "1000001"}, "maximum"),
        ({"amount": "5000", "comment": "x" * 21}, "comment"),
    ],
)
async def test_a_bad_tip_callback_is_an_lnurl_error(
    world: World, params: dict[str, str], words: str
) -> None:
    reason = await world.error(f"{JARS}/coffee/callback", 400, **params)
    assert words in reason
    assert world.gateway.backend.invoices == {}


async def test_a_comment_where_none_is_taken_is_dropped(world: World) -> None:
    # Wallets (Alby's lightning-tools) send the payer's comment whatever the service said: a
    # refusal would refuse the payment.
    request = await world.get(f"{JARS}/silent")
    assert "commentAllowed" not in request
    answer = await world.get(f"{JARS}/silent/callback", amount="2000", comment="hi")
    assert "successAction" not in answer
    invoice = check_invoice(answer["pr"], 2_000, request["metadata"])
    record = await world.gateway.store.get_invoice(PaymentHash(invoice.payment_hash))
    assert record is not None
    assert record.comment == ""


# A wallet script of Alby's lightning-tools (the copy `make interop` installs): it reads the
# payRequest served at argv[2], with its callback moved to argv[3] (the test server is not the
# public base URL), and asks it for an invoice of 2 sat with a comment, as a wallet would.
ALBY_JAR_SCRIPT = """
const [index, served, local] = process.argv.slice(1);
const { LightningAddress } = await import(index);
const body = await (await fetch(served)).json();
body.callback = body.callback.replace("%s", local);
const address = new LightningAddress("silent@pay.example.com", { proxy: false });
await address.parseLnUrlPayResponse(body);
const invoice = await address.requestInvoice({ satoshi: 2, comment: "thanks!" });
console.log(invoice.paymentRequest);
"""
ALBY_INDEX = (
    Path(__file__).parents[1] / "interop/js/node_modules/@getalby/lightning-tools/dist/esm/index.js"
)


@pytest.mark.interop
async def test_albys_lightning_tools_get_an_invoice_from_a_jar_that_takes_no_comment(
    world: World,
) -> None:
    # lightning-tools sends the comment whatever commentAllowed says, and reads no reason
    # from a 4xx: a refused comment was a payment the wallet could not make.
    node = shutil.which("node")
    if node is None or not ALBY_INDEX.is_file():
        pytest.skip("node or Alby's lightning-tools missing: run `make interop`")
    local = str(world.client.make_url("")).rstrip("/")
    process = await asyncio.create_subprocess_exec(
        node,
        "--input-type=module",
        "-e",
        ALBY_JAR_SCRIPT % BASE,
        ALBY_INDEX.as_uri(),
        f"{local}{JARS}/silent",
        local,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    request = await world.get(f"{JARS}/silent")
    invoice = check_invoice(out.decode().strip(), 2_000, request["metadata"])
    record = await world.gateway.store.get_invoice(PaymentHash(invoice.payment_hash))
    assert record is not None
    assert record.service == "tip:silent"
    assert record.comment == ""


async def test_the_longest_comment_fits_the_request_line_in_any_script(world: World) -> None:
    # Each of these characters is 4 bytes of UTF-8, 12 percent-encoded.
    comment = "\U0001f600" * MAX_COMMENT_CHARS
    answer = await world.get(f"{JARS}/notes/callback", amount="2000", comment=comment)
    record = await world.gateway.store.get_invoice(
        PaymentHash(bolt11.decode(answer["pr"]).payment_hash)
    )
    assert record is not None
    assert record.comment == comment


@pytest.mark.parametrize(
    "path",
    [
        f"{JARS}/nobody",
        f"{JARS}/nobody/callback?amount=2000",
        f"{JARS}/nobody/qr.svg",
        f"{JARS}/COFFEE",
        f"{JARS}/Coffee/callback?amount=2000",
        f"{JARS}/cof%66ee",
        f"{JARS}/coffee%2Fcallback",
        f"{JARS}/..%2F..%2Fadmin",
        f"{JARS}/{'a' * 65}",
        f"{JARS}/{'a' * 5000}",
        f"{JARS}/",
        f"{JARS}/coffee/",
        f"{JARS}/coffee/other",
        f"{JARS}/coffee/callback/more",
        f"{LINKS}/nolink",
        f"{LINKS}/nolink/status",
        f"{LINKS}/nolink/lnurl",
        f"{LINKS}/nolink/invoice",
        f"{LINKS}/nolink/callback?amount=1000",
        f"{LINKS}/nolink/qr.png",
        f"{LINKS}/bad%2Fid/status",
        f"{LINKS}/{'b' * 65}/status",
    ],
)
async def test_unknown_names_and_paths_are_404_and_never_forwarded(world: World, path: str) -> None:
    response = await raw_get(world.client, path)  # as sent: a client would normalize it
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404 "), response
    if path.rstrip("/").count("/") == 4 and path.startswith(LINKS):
        assert b"Content-Type: text/html" in head  # the page
    else:
        assert b"Access-Control-Allow-Origin: *" in head
        assert json.loads(body)["status"] == "ERROR"
    assert world.upstream_paths == []


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
@pytest.mark.parametrize(
    ("path", "allow"),
    [
        (f"{JARS}/coffee", "GET, HEAD, OPTIONS"),
        (f"{JARS}/coffee/callback", "GET, OPTIONS"),
        (f"{LINKS}/x", "GET, HEAD"),
        (f"{LINKS}/x/lnurl", "GET, HEAD, OPTIONS"),
        (f"{LINKS}/x/callback", "GET, OPTIONS"),
        (f"{LINKS}/x/invoice", "GET, OPTIONS"),
    ],
)
async def test_other_methods_are_405(world: World, method: str, path: str, allow: str) -> None:
    response = await world.client.request(method, path, data=b"x")
    assert response.status == 405
    assert response.headers["Allow"] == allow  # the paths that make invoices take GET alone
    assert world.upstream_paths == []


async def test_head_never_makes_an_invoice(world: World) -> None:
    """A link preview or a monitor sends HEAD: the callbacks and ``/invoice`` refuse it, the
    link page is rendered without asking for an invoice."""
    link = await world.tips.create_link(
        min_msat=Msat(3_000), max_msat=Msat(3_000), memo="Fixed", expires_in=None, single_use=True
    )
    base = f"{LINKS}/{link.link_id}"
    for path in (
        f"{JARS}/coffee/callback?amount=2000",
        f"{base}/callback?amount=3000",
        f"{base}/invoice",
        f"{LINKS}/nolinknolinknoli/invoice",
    ):
        response = await world.client.head(path)
        assert response.status == 405, path
        assert response.headers["Allow"] == "GET, OPTIONS"
        assert await response.read() == b""
    page_head = await world.client.head(base)
    assert page_head.status == 200
    assert page_head.headers["Content-Type"] == "text/html; charset=utf-8"
    assert world.gateway.backend.invoices == {}
    stored = await world.gateway.store.get_link(link.link_id)
    assert stored is not None
    assert stored.open_hash is None
    # GET makes it; HEAD then renders the page with it, and makes no other.
    shown = (await page(world, link.link_id))["data-hash"]
    assert len(world.gateway.backend.invoices) == 1
    got = await world.client.get(base)
    page_head = await world.client.head(base)
    assert page_head.status == 200
    assert page_head.headers["Content-Length"] == str(len(await got.read()))
    assert [h.hex() for h in world.gateway.backend.invoices] == [shown]
    assert world.upstream_paths == []


@pytest.mark.parametrize(
    "path",
    [
        f"{JARS}/coffee",
        f"{JARS}/coffee/callback?amount=2000",
        f"{JARS}/coffee/qr.png",
        f"{LINKS}/nolinknolinknoli/lnurl",
        f"{LINKS}/nolinknolinknoli/callback",
    ],
)
async def test_a_cors_preflight_is_204_for_any_origin(world: World, path: str) -> None:
    response = await world.client.options(
        path,
        headers={
            "Origin": "https://wallet.example",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "x-wallet",
        },
    )
    assert response.status == 204, await response.text()
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert response.headers["Access-Control-Allow-Methods"] == "GET"
    assert response.headers["Access-Control-Allow-Headers"] == "*"
    assert int(response.headers["Access-Control-Max-Age"]) > 0
    assert await response.read() == b""
    assert world.gateway.backend.invoices == {}  # a preflight makes no invoice
    assert world.upstream_paths == []


async def test_a_link_page_is_no_preflight_target(world: World) -> None:
    response = await world.client.options(f"{LINKS}/nolinknolinknoli")
    assert response.status == 405
    assert response.headers["Allow"] == "GET, HEAD"


@pytest.mark.parametrize(
    ("path", "status"),
    [
        (f"{JARS}/coffee", 200),
        (f"{JARS}/coffee/qr.svg", 200),
        (f"{JARS}/nobody", 404),
        (f"{LINKS}/nolinknolinknoli", 404),
    ],
)
async def test_head_is_answered_as_get_without_a_body(world: World, path: str, status: int) -> None:
    got = await world.client.get(path)
    head = await world.client.head(path)
    assert (got.status, head.status) == (status, status)
    assert await head.read() == b""
    assert head.headers["Content-Type"] == got.headers["Content-Type"]
    assert head.headers["Content-Length"] == str(len(await got.read()))
    assert world.upstream_paths == []


async def test_a_jar_qr_code_is_an_svg_or_png_of_its_lnurl(world: World) -> None:
    svg = await world.client.get(f"{JARS}/coffee/qr.svg")
    assert svg.status == 200
    assert svg.headers["Content-Type"] == "image/svg+xml"
    assert b"<svg" in await svg.read()
    png = await world.client.get(f"{JARS}/coffee/qr.png", params={"size": "3"})
    assert png.status == 200
    assert png.headers["Content-Type"] == "image/png"
    small = await png.read()
    assert small.startswith(b"\x89PNG")
    big = await (await world.client.get(f"{JARS}/coffee/qr.png", params={"size": "30"})).read()
    assert len(big) > len(small)
    again = await world.client.get(f"{JARS}/coffee/qr.png", params={"size": "3"})
    assert await again.read() == small
    for size in ("0", "41", "-1", "x", "1e3", "\u0661"):
        await world.error(f"{JARS}/coffee/qr.png", 400, size=size)


async def test_invoice_requests_beyond_the_rate_limit_are_429(world: World) -> None:
    world.slot.limiter = RateLimiter(0.5, 2, 100, world.gateway.clock)
    for _ in range(2):
        await world.get(f"{JARS}/coffee/callback", amount="2000")
    response = await world.client.get(f"{JARS}/coffee/callback", params={"amount": "2000"})
    assert response.status == 429
    assert int(response.headers["Retry-After"]) >= 1
    assert (await response.json())["status"] == "ERROR"
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    # The payRequest makes no invoice: not limited.
    await world.get(f"{JARS}/coffee")


async def test_qr_images_made_for_a_tag_or_a_size_are_rate_limited(world: World) -> None:
    """Each tag or size draws another image: within the client's budget. The jar's own at
    its default size is drawn once, not limited."""
    world.slot.limiter = RateLimiter(0.5, 2, 100, world.gateway.clock)
    for target in (f"{JARS}/coffee+a/qr.svg", f"{JARS}/coffee/qr.png?size=9"):
        response = await world.client.get(target)
        assert response.status == 200
    for target in (f"{JARS}/coffee+b/qr.svg", f"{JARS}/coffee/qr.png?size=10"):
        response = await world.client.get(target)
        assert response.status == 429
        assert (await response.json())["reason"] == "too many QR images"
    for _ in range(5):
        assert (await world.client.get(f"{JARS}/coffee/qr.svg")).status == 200


async def test_a_node_failure_is_503_not_500(world: World) -> None:
    world.gateway.backend.unavailable = True
    response = await world.client.get(f"{JARS}/coffee/callback", params={"amount": "2000"})
    assert response.status == 503, await response.text()
    assert (await response.json())["status"] == "ERROR"
    assert "Retry-After" in response.headers


async def test_an_aiohttp_app_answers_the_tip_paths_before_its_priced_routes(
    world: World,
) -> None:
    from gateway.web.aiohttp import setup_l402

    async def elsewhere(_request: web.Request) -> web.Response:
        raise AssertionError("must not run")

    app = web.Application()
    app.router.add_get("/elsewhere", elsewhere)
    setup_l402(app, world.gateway)
    add_tip_routes(app, TipsSlot(world.tips))
    async with TestClient(TestServer(app)) as client:
        response = await client.get(f"{JARS}/coffee")
        assert response.status == 200
        assert (await response.json())["tag"] == "payRequest"
        assert (await client.get("/elsewhere")).status == 402
    async with TestClient(TestServer(_started_without_tips())) as client:
        response = await client.get(f"{JARS}/coffee")
        assert response.status == 503
        assert response.headers["Retry-After"] == "1"


def _started_without_tips() -> web.Application:
    app = web.Application()
    add_tip_routes(app, TipsSlot())
    return app


# Payment links


def page_facts(text: str) -> dict[str, str]:
    root = re.search(r'<main id="link"([^>]*)>', text)
    assert root is not None
    facts = {
        name: html.unescape(value) for name, value in re.findall(r'([\w-]+)="([^"]*)"', root[1])
    }
    for element_id in ("memo", "amount", "invoice", "status"):
        match = re.search(rf'<(\w+)[^>]*\bid="{element_id}"[^>]*>(.*?)</\1>', text, re.S)
        assert match is not None, element_id
        facts[element_id] = html.unescape(match[2])
    return facts


async def page(world: World, link_id: str) -> dict[str, str]:
    response = await world.client.get(f"{LINKS}/{link_id}")
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "script-src 'nonce-" in response.headers["Content-Security-Policy"]
    return page_facts(await response.text())


async def test_a_single_use_fixed_link_page_shows_its_invoice_and_turns_paid(
    world: World,
) -> None:
    link = await world.tips.create_link(
        min_msat=Msat(21_000),
        max_msat=Msat(21_000),
        memo="Lunch",
        expires_in=3600,
        single_use=True,
    )
    facts = await page(world, link.link_id)
    assert facts["data-state"] == "open"
    assert (facts["memo"], facts["amount"]) == ("Lunch", "21 sat")
    # The page's invoice commits to the link's metadata: an LNURL wallet gets it too.
    request = await world.get(f"{LINKS}/{link.link_id}/lnurl")
    assert ["text/plain", "Lunch"] in json.loads(request["metadata"])
    invoice = check_invoice(facts["invoice"], 21_000, request["metadata"])
    assert facts["data-hash"] == invoice.payment_hash.hex()
    assert (await page(world, link.link_id))["invoice"] == facts["invoice"]  # reused

    status = await world.get(f"{LINKS}/{link.link_id}/status", have=facts["data-hash"])
    assert status["state"] == "open"
    assert status["invoice"]["payment_hash"] == facts["data-hash"]
    assert "qr_svg" not in status["invoice"]  # the page has it already
    status = await world.get(f"{LINKS}/{link.link_id}/status")
    assert status["invoice"]["qr_svg"].startswith("<svg")

    world.gateway.backend.pay(invoice.payment_hash)

    async def paid() -> bool:
        status = await world.get(f"{LINKS}/{link.link_id}/status")
        return bool(status["state"] == "paid")

    await wait_for(paid)
    status = await world.get(f"{LINKS}/{link.link_id}/status")
    assert (status["paid_count"], status["paid_msat"]) == (1, 21_000)
    facts = await page(world, link.link_id)
    assert (facts["data-state"], facts["status"]) == ("paid", "Paid")
    # Paid: no more invoices, by any route.
    await world.error(f"{LINKS}/{link.link_id}/invoice", 410)
    await world.error(f"{LINKS}/{link.link_id}/lnurl", 410)
    await world.error(f"{LINKS}/{link.link_id}/callback", 410, amount="21000")


async def test_a_payer_chosen_link_takes_an_amount_and_its_lnurl(world: World) -> None:
    link = await world.tips.create_link(
        min_msat=Msat(1_000), max_msat=Msat(50_000), memo="", expires_in=None, single_use=True
    )
    facts = await page(world, link.link_id)
    assert facts["invoice"] == world.tips.link_lnurl(link.link_id)  # no amount yet
    assert facts["amount"] == "1 \u2013 50 sat"
    invoice_path = f"{LINKS}/{link.link_id}/invoice"
    for amount, status in (("999", 400), ("50001", 400), ("x", 400), ("-1", 400)):
        await world.error(invoice_path, status, amount=amount)
    await world.error(invoice_path, 400, amount="9" * 40)
    assert (await world.get(invoice_path, amount="0" * 30 + "7000"))["amount_msat"] == 7_000
    chosen = await world.get(invoice_path, amount="7000")
    assert chosen["amount_msat"] == 7_000
    assert chosen["qr_svg"].startswith("<svg")
    request = await world.get(f"{LINKS}/{link.link_id}/lnurl")
    assert request["tag"] == "payRequest"
    assert "commentAllowed" not in request  # a single-use link takes no comment
    check_invoice(chosen["invoice"], 7_000, request["metadata"])

    # An LNURL wallet gets the invoice the page shows for its amount, and no other until it
    # expires: another amount is refused, saying (and Retry-After) when to ask again.
    path, query = local(request["callback"])
    await world.error(path, 400, amount="500", **query)
    answer = await world.get(path, amount="7000", comment="dropped", **query)
    assert answer["pr"] == chosen["invoice"]
    answer = await world.get(path, amount="0007000", **query)  # leading zeros: 7000
    assert answer["pr"] == chosen["invoice"]
    await held(world, path, dict(query, amount="9000"), "7 sat; ask again in 600 s", 600)
    await held(world, invoice_path, {"amount": "9000"}, "7 sat; ask again in 600 s", 600)
    status = await world.get(f"{LINKS}/{link.link_id}/status", have=chosen["payment_hash"])
    assert status["invoice"]["payment_hash"] == chosen["payment_hash"]
    assert "qr_svg" not in status["invoice"]

    # In its last minute it is handed out to nobody and replaced for nobody: a payer may be
    # paying it now.
    world.gateway.clock.advance(600 - 59)
    for amount in ("7000", "9000"):
        await held(world, path, dict(query, amount=amount), "ask again in 59 s", 59)
    assert world.gateway.backend.cancelled == {}

    # Expired, it is cancelled and another amount gets its own; the page's status names the
    # new one (with its QR code).
    world.gateway.clock.advance(59)
    answer = await world.get(path, amount="9000", **query)
    wallet = check_invoice(answer["pr"], 9_000, request["metadata"])
    assert world.gateway.backend.cancelled[bytes.fromhex(chosen["payment_hash"])] == 1
    status = await world.get(f"{LINKS}/{link.link_id}/status", have=chosen["payment_hash"])
    assert status["invoice"]["payment_hash"] == wallet.payment_hash.hex()
    assert "qr_svg" in status["invoice"]


async def held(
    world: World, path: str, params: dict[str, str], says: str, retry_after: int
) -> None:
    """GET ``path``: the 409 of a single-use link held by its open invoice, with Retry-After."""
    response = await world.client.get(path, params=params)
    assert response.status == 409, await response.text()
    assert response.headers["Retry-After"] == str(retry_after)
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    body = await response.json()
    assert body["status"] == "ERROR"
    assert says in body["reason"], body


async def test_a_reusable_link_counts_its_payments(world: World) -> None:
    link = await world.tips.create_link(
        min_msat=Msat(2_000),
        max_msat=Msat(2_000),
        memo="Donate",
        expires_in=None,
        single_use=False,
    )
    facts = await page(world, link.link_id)
    lnurl = world.tips.link_lnurl(link.link_id)
    assert facts["invoice"] == lnurl
    assert facts["status"] == "Waiting for payment"
    request = await world.get(f"{LINKS}/{link.link_id}/lnurl")
    path, query = local(request["callback"])
    for _ in range(2):
        answer = await world.get(path, amount="2000", **query)
        invoice = check_invoice(answer["pr"], 2_000, request["metadata"])
        world.gateway.backend.pay(invoice.payment_hash)

    async def two() -> bool:
        status = await world.get(f"{LINKS}/{link.link_id}/status")
        return bool(status["paid_count"] == 2)

    await wait_for(two)
    status = await world.get(f"{LINKS}/{link.link_id}/status")
    assert (status["state"], status["paid_msat"], status["invoice"]) == ("open", 4_000, None)
    assert (await page(world, link.link_id))["status"] == "Received 2 payments"
    for kind in ("svg", "png"):
        response = await world.client.get(f"{LINKS}/{link.link_id}/qr.{kind}")
        assert response.status == 200
        assert response.headers["Content-Type"].startswith(f"image/{kind}")


async def test_expired_and_canceled_links_say_so(world: World) -> None:
    short = await world.tips.create_link(
        min_msat=Msat(1_000),
        max_msat=Msat(1_000),
        memo="Soon gone",
        expires_in=120,
        single_use=True,
    )
    canceled = await world.tips.create_link(
        min_msat=Msat(1_000),
        max_msat=Msat(1_000),
        memo="Oops",
        expires_in=None,
        single_use=False,
    )
    await world.tips.cancel_link(canceled.link_id)
    world.gateway.clock.advance(121)
    for link, state in ((short, "expired"), (canceled, "canceled")):
        facts = await page(world, link.link_id)
        assert facts["data-state"] == state
        assert state in facts["status"].lower()
        status = await world.get(f"{LINKS}/{link.link_id}/status")
        assert status["state"] == state
        await world.error(f"{LINKS}/{link.link_id}/lnurl", 410)
        await world.error(f"{LINKS}/{link.link_id}/invoice", 410)
        await world.error(f"{LINKS}/{link.link_id}/callback", 410, amount="1000")


async def fixed_link(world: World, single_use: bool = True) -> str:
    link = await world.tips.create_link(
        min_msat=Msat(3_000),
        max_msat=Msat(3_000),
        memo="Fixed",
        expires_in=None,
        single_use=single_use,
    )
    return link.link_id


async def test_a_fixed_link_page_replaces_its_expired_invoice(world: World) -> None:
    link_id = await fixed_link(world)
    first = (await page(world, link_id))["data-hash"]
    # Its last minute: the page still shows it (a payer may be paying it), replaced by no one.
    world.gateway.clock.advance(600 - 59)
    assert (await page(world, link_id))["data-hash"] == first
    await held(world, f"{LINKS}/{link_id}/invoice", {}, "3 sat; ask again in 59 s", 59)
    assert world.gateway.backend.cancelled == {}
    world.gateway.clock.advance(60)
    second = (await page(world, link_id))["data-hash"]
    assert second != first
    assert world.gateway.backend.cancelled[bytes.fromhex(first)] == 1  # never payable again
    fresh = await world.get(f"{LINKS}/{link_id}/invoice")
    assert fresh["payment_hash"] == second  # the page's /invoice gives the same one


@pytest.mark.parametrize("page_first", [True, False])
async def test_a_single_use_link_has_one_invoice_for_its_page_and_its_lnurl(
    world: World, page_first: bool
) -> None:
    link_id = await fixed_link(world)
    request = await world.get(f"{LINKS}/{link_id}/lnurl")
    path, query = local(request["callback"])
    shown = (await page(world, link_id))["invoice"] if page_first else ""
    answer = await world.get(path, amount="3000", **query)
    wallet = check_invoice(answer["pr"], 3_000, request["metadata"])
    facts = await page(world, link_id)
    assert facts["data-hash"] == wallet.payment_hash.hex()
    assert facts["invoice"] == answer["pr"]
    assert shown in ("", answer["pr"])
    assert len(world.gateway.backend.invoices) == 1
    assert world.gateway.backend.cancelled == {}


async def test_a_rate_limited_page_shows_the_lnurl_instead_of_making_an_invoice(
    world: World,
) -> None:
    link_id = await fixed_link(world)
    world.slot.limiter = RateLimiter(0.001, 1, 100, world.gateway.clock)
    await world.get(f"{JARS}/coffee/callback", amount="2000")  # the client's one token
    made = len(world.gateway.backend.invoices)
    facts = await page(world, link_id)
    assert facts["invoice"] == world.tips.link_lnurl(link_id)
    assert facts["data-hash"] == ""
    assert len(world.gateway.backend.invoices) == made
    await world.error(f"{LINKS}/{link_id}/invoice", 429)
    await world.error(f"{LINKS}/{link_id}/callback", 429, amount="3000")
    await world.get(f"{LINKS}/{link_id}/status")  # reads only: not limited


async def test_a_plus_tag_reaches_its_jar(world: World) -> None:
    request = await world.get(f"{JARS}/coffee+table4")
    assert ["text/identifier", "coffee+table4@pay.example.com"] in json.loads(request["metadata"])
    path, _ = local(request["callback"])
    answer = await world.get(path, amount="2000")
    check_invoice(answer["pr"], 2_000, request["metadata"])


async def test_expect_100_continue_does_not_price_a_tip_path(world: World) -> None:
    # The L402 decision that comes before 100 Continue leaves the tip paths alone too.
    reader, writer = await asyncio.open_connection(world.client.host, world.client.port)
    writer.write(
        f"GET {JARS}/coffee HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        "Content-Length: 0\r\nConnection: close\r\n\r\n".encode()
    )
    response = await reader.read()
    writer.close()
    await writer.wait_closed()
    response = response.removeprefix(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 200 "), response
    assert b'"tag":"payRequest"' in response


@pytest.mark.parametrize(
    "target",
    [
        f"{JARS}/coffee/callback?amount=%ff",
        f"{JARS}/coffee/callback?amount=2000&comment=%ff%fe%00",
        f"{JARS}/coffee/callback?amount=%00",
        f"{JARS}/coffee/callback?amount=2000&comment=a%0Db",
        f"{JARS}/coffee/callback?amount=%EF%BC%92000",  # a full-width digit
        f"{JARS}/coffee/callback?amount={'1' * 4000}",
        f"{LINKS}/x/invoice?amount=%ff",
        f"{JARS}/coffee/qr.svg?size=%ff",
        f"{JARS}/coffee/qr.svg?size={'9' * 4301}",  # int() refuses it: no 500
        f"{LINKS}/x/qr.png?size={'9' * 4301}",
    ],
)
async def test_garbled_queries_are_4xx(world: World, target: str) -> None:
    response = await raw_get(world.client, target)
    assert re.match(rb"HTTP/1.1 4\d\d ", response), response
    assert b'"status":"ERROR"' in response
