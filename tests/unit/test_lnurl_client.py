"""The LNURL-pay / Lightning Address client against a small LNURL-pay service served in the
test process: destinations, the checks of the payRequest and of the invoice, bounds on what
a service may make the gateway read or follow. Each refusal is a PayoutDestinationError."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway import errors
from gateway.client import bolt11
from gateway.client.lnurl import LnurlPayClient, pay_url
from gateway.ports import Msat
from tests import bolt11_encode

PAYEE_KEY = "33" * 32
METADATA = json.dumps([["text/plain", "carol's tips"], ["text/identifier", "carol@127.0.0.1"]])


@dataclass
class Service:
    """What the service answers; the test changes it. ``calls`` lists each request's path
    and query."""

    port: int = 0
    tag: str = "payRequest"
    min_sendable: Any = 1_000
    max_sendable: Any = 1_000_000
    metadata: Any = METADATA
    callback: str | None = None  # default: this server's /cb?token=abc
    invoice_metadata: str = METADATA  # what the invoice's description hash commits to
    amount_skew: int = 0
    pr: str | None = None  # answered instead of a made invoice
    error: str | None = None  # the callback answers {"status": "ERROR", "reason": error}
    status: int = 200
    redirect: str | None = None  # the payRequest answers a redirect there
    body_bytes: int = 0  # pad the payRequest to this size
    delay: float = 0.0
    calls: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"carol@127.0.0.1:{self.port}"

    async def pay_request(self, request: web.Request) -> web.StreamResponse:
        self.calls.append((request.path, dict(request.query)))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.redirect is not None:
            raise web.HTTPFound(self.redirect)
        answer = {
            "tag": self.tag,
            "callback": self.callback or f"{self.base}/cb?token=abc",
            "minSendable": self.min_sendable,
            "maxSendable": self.max_sendable,
            "metadata": self.metadata,
        }
        if self.body_bytes:
            answer["padding"] = "x" * self.body_bytes
        return web.json_response(answer, status=self.status)

    async def moved(self, request: web.Request) -> web.StreamResponse:
        self.calls.append((request.path, dict(request.query)))
        raise web.HTTPFound("/.well-known/lnurlp/carol")

    async def invoice(self, request: web.Request) -> web.StreamResponse:
        self.calls.append((request.path, dict(request.query)))
        if self.error is not None:
            return web.json_response({"status": "ERROR", "reason": self.error})
        amount = int(request.query["amount"]) + self.amount_skew
        pr = self.pr or bolt11_encode.encode(
            currency="bcrt",
            amount=bolt11_encode.amount_text(amount),
            timestamp=int(time.time()),
            payment_hash=hashlib.sha256(secrets.token_bytes(32)).digest(),
            key=PAYEE_KEY,
            expiry=600,
            extra=bolt11_encode.field(
                "h", bolt11_encode.words_of(hashlib.sha256(self.invoice_metadata.encode()).digest())
            ),
        )
        return web.json_response({"pr": pr, "routes": []})


@pytest.fixture
async def service() -> AsyncIterator[Service]:
    service = Service()
    app = web.Application()
    app.router.add_get("/.well-known/lnurlp/carol", service.pay_request)
    app.router.add_get("/moved", service.moved)
    app.router.add_get("/cb", service.invoice)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    service.port = server.port or 0
    try:
        yield service
    finally:
        await server.close()


@pytest.fixture
async def client() -> AsyncIterator[LnurlPayClient]:
    async with LnurlPayClient(timeout=2.0) as client:
        yield client


def lnurl(url: str) -> str:
    return bolt11_encode.bech32("lnurl", bolt11_encode.words_of(url.encode())).upper()


async def test_a_lightning_address_gives_a_checked_invoice_for_the_amount(
    service: Service, client: LnurlPayClient
) -> None:
    assert await client.bounds(service.address) == (1_000, 1_000_000)

    text = await client.invoice(service.address, Msat(21_000))

    invoice = bolt11.decode(text)
    assert invoice.amount_msat == 21_000
    assert invoice.description_hash == hashlib.sha256(METADATA.encode()).digest()
    # The payRequest was fetched once (kept), the callback with its own query kept.
    assert service.calls == [
        ("/.well-known/lnurlp/carol", {}),
        ("/cb", {"token": "abc", "amount": "21000"}),
    ]


async def test_an_lnurl_and_its_url_reach_the_same_service(
    service: Service, client: LnurlPayClient
) -> None:
    url = f"{service.base}/.well-known/lnurlp/carol"
    for destination in (lnurl(url), f"lightning:{lnurl(url)}", url):
        text = await client.invoice(destination, Msat(5_000))
        assert bolt11.decode(text).amount_msat == 5_000


@pytest.mark.parametrize(
    ("destination", "url"),
    [
        ("carol@example.com", "https://example.com/.well-known/lnurlp/carol"),
        ("carol@pay.example.com:8443", "https://pay.example.com:8443/.well-known/lnurlp/carol"),
        ("carol@localhost:8080", "http://localhost:8080/.well-known/lnurlp/carol"),
        ("carol@127.0.0.1:8080", "http://127.0.0.1:8080/.well-known/lnurlp/carol"),
        ("carol@[::1]:8080", "http://[::1]:8080/.well-known/lnurlp/carol"),
        ("carol@abcdef.onion", "http://abcdef.onion/.well-known/lnurlp/carol"),
        ("lnurlp://example.com/pay/carol?x=1", "https://example.com/pay/carol?x=1"),
        ("https://example.com/lnurlp/carol", "https://example.com/lnurlp/carol"),
        (lnurl("https://example.com/lnurlp/carol"), "https://example.com/lnurlp/carol"),
        ("http://abcdef.onion/pay", "http://abcdef.onion/pay"),
    ],
)
def test_a_destination_names_the_url_of_its_service(destination: str, url: str) -> None:
    assert str(pay_url(destination)) == url


@pytest.mark.parametrize(
    ("destination", "reason"),
    [
        ("http://example.com/lnurlp/carol", "plain http:// only for localhost"),
        (lnurl("http://example.com/lnurlp/carol"), "plain http:// only for localhost"),
        ("https://user:secret@example.com/p", "credentials"),
        ("ftp://example.com/p", "not a Lightning Address, LNURL or https:// URL"),
        ("02" + "ab" * 32, "keysend"),
        ("lnurl1qqqqqqqq", "not a valid LNURL"),
        (bolt11_encode.bech32("lnbc", bolt11_encode.words_of(b"https://x.y/")), "not a Light"),
        ("carol@", "not a Lightning Address"),
    ],
)
def test_a_destination_that_is_not_allowed_is_refused_with_its_reason(
    destination: str, reason: str
) -> None:
    with pytest.raises(errors.PayoutDestinationError, match=reason):
        pay_url(destination)


async def _refused(client: LnurlPayClient, service: Service, amount: int = 21_000) -> str:
    with pytest.raises(errors.PayoutDestinationError) as raised:
        await client.invoice(service.address, Msat(amount))
    assert isinstance(raised.value, errors.BackendError)
    assert raised.value.reason == str(raised.value)
    return raised.value.reason


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"tag": "withdrawRequest"}, "not an LNURL-pay service"),
        ({"min_sendable": 0}, "minSendable/maxSendable"),
        ({"min_sendable": 5_000, "max_sendable": 4_000}, "minSendable/maxSendable"),
        ({"max_sendable": "1000000"}, "minSendable/maxSendable"),
        ({"metadata": [["text/plain", "x"]]}, "metadata"),
        ({"metadata": "not json"}, "metadata"),
        ({"callback": "http://example.com/cb"}, "plain http:// only for localhost"),
        ({"invoice_metadata": "[]"}, "description hash is not that of the metadata"),
        ({"amount_skew": 1_000}, "the invoice is for 22000 msat, not 21000 msat"),
        ({"pr": "lnbcrt1garbage"}, "not a valid BOLT11 invoice"),
        ({"error": "carol is on holiday"}, "refused: carol is on holiday"),
        ({"error": "\x1b[2Jcleared"}, r"refused: \x1b[2Jcleared"),  # shown, not obeyed
        ({"status": 500}, "HTTP 500"),
        ({"body_bytes": 100_000}, "more than 65536 bytes"),
    ],
)
async def test_a_service_answer_that_does_not_check_out_is_refused(
    service: Service, client: LnurlPayClient, change: dict[str, Any], reason: str
) -> None:
    for name, value in change.items():
        setattr(service, name, value)
    got = await _refused(client, service)
    assert reason in got


async def test_an_amount_outside_the_bounds_is_refused_before_the_callback(
    service: Service, client: LnurlPayClient
) -> None:
    assert "outside the service's range 1000 to 1000000 msat" in await _refused(
        client, service, 2_000_000
    )
    assert [path for path, _ in service.calls] == ["/.well-known/lnurlp/carol"]


async def test_a_redirect_is_followed_only_on_the_same_host(
    service: Service, client: LnurlPayClient
) -> None:
    moved = f"{service.base}/moved"
    assert bolt11.decode(await client.invoice(moved, Msat(1_000))).amount_msat == 1_000
    assert [path for path, _ in service.calls][:2] == ["/moved", "/.well-known/lnurlp/carol"]

    service.redirect = f"http://localhost:{service.port}/.well-known/lnurlp/carol"
    reason = await _refused(client, service)
    assert "redirects to another host or scheme (http://localhost" in reason
    assert "not followed" in reason


async def test_a_slow_service_is_given_up_on(service: Service) -> None:
    service.delay = 1.0
    async with LnurlPayClient(timeout=0.1) as client:
        assert "no answer within 0.1 s" in await _refused(client, service)


async def test_an_unreachable_service_is_refused(service: Service) -> None:
    async with aiohttp.ClientSession() as session:
        client = LnurlPayClient(session=session)
        with pytest.raises(errors.PayoutDestinationError, match="cannot fetch"):
            await client.invoice("carol@127.0.0.1:1", Msat(1_000))
        await client.close()
        assert not session.closed  # the caller's session is the caller's to close


async def test_the_pay_request_is_fetched_again_after_a_failed_invoice(
    service: Service, client: LnurlPayClient
) -> None:
    await client.bounds(service.address)
    service.amount_skew = 1
    await _refused(client, service)
    service.amount_skew = 0
    await client.invoice(service.address, Msat(1_000))
    fetched = [path for path, _ in service.calls if path != "/cb"]
    assert len(fetched) == 2


async def test_an_expired_pay_request_is_fetched_again(service: Service) -> None:
    async with LnurlPayClient(cache_seconds=0) as client:
        await client.bounds(service.address)
        await client.bounds(service.address)
    assert len(service.calls) == 2
