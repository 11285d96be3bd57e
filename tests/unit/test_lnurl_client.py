"""The LNURL-pay / Lightning Address client against a small LNURL-pay service served in the
test process: destinations, the checks of the payRequest and of the invoice, comments
(LUD-12) and success actions (LUD-09, LUD-10), bounds on what a service may make the gateway
read or follow. Each refusal is a PayoutDestinationError."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import yarl
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from gateway import destinations, errors
from gateway.client import bolt11
from gateway.client.lnurl import (
    LnurlPayClient,
    LnurlUnreachable,
    ReceivedSuccessAction,
    pay_url,
)
from gateway.lnurl import (
    MAX_IMAGE_BYTES,
    MAX_SUCCESS_CHARS,
    SuccessAction,
    description_hash,
    metadata,
    success_action_body,
)
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
    body: bytes | None = None  # the payRequest answers this instead
    delay: float = 0.0
    comment_allowed: Any = None  # commentAllowed, when not None
    success: Any = None  # the callback's successAction, when not None
    calls: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)  # each request's query, as sent

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"carol@127.0.0.1:{self.port}"

    async def pay_request(self, request: web.Request) -> web.StreamResponse:
        self.calls.append((request.path, dict(request.query)))
        self.queries.append(request.query_string)
        if self.body is not None:
            return web.Response(body=self.body, content_type="application/json")
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
        if self.comment_allowed is not None:
            answer["commentAllowed"] = self.comment_allowed
        if self.body_bytes:
            answer["padding"] = "x" * self.body_bytes
        return web.json_response(answer, status=self.status)

    async def moved(self, request: web.Request) -> web.StreamResponse:
        self.calls.append((request.path, dict(request.query)))
        raise web.HTTPFound("/.well-known/lnurlp/carol")

    async def invoice(self, request: web.Request) -> web.StreamResponse:
        self.calls.append((request.path, dict(request.query)))
        self.queries.append(request.query_string)
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
        answer: dict[str, Any] = {"pr": pr, "routes": []}
        if self.success is not None:
            answer["successAction"] = self.success
        return web.json_response(answer)


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


def aes_action(preimage: bytes, plaintext: str, description: str) -> dict[str, str]:
    """A LUD-10 ``aes`` success action: ``plaintext`` encrypted with ``preimage``."""
    iv = secrets.token_bytes(16)
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plaintext.encode()) + padder.finalize()
    encryptor = Cipher(algorithms.AES(preimage), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(padded) + encryptor.finalize()
    return {
        "tag": "aes",
        "description": description,
        "ciphertext": base64.b64encode(ciphertext).decode(),
        "iv": base64.b64encode(iv).decode(),
    }


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


async def test_a_pay_request_with_the_largest_image_lud06_allows_is_taken(
    service: Service, client: LnurlPayClient
) -> None:
    # 100 KiB of image (what a tip jar of ours may show) is 136536 base64 characters.
    image = base64.b64encode(secrets.token_bytes(MAX_IMAGE_BYTES)).decode()
    service.metadata = service.invoice_metadata = json.dumps(
        [["text/plain", "carol's tips"], ["image/png;base64", image]]
    )
    text = await client.invoice(service.address, Msat(21_000))
    assert bolt11.decode(text).description_hash == description_hash(service.metadata)


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
        # LUD-16 names are lower case: an upper-case address is read lower-cased
        ("Carol@Example.COM", "https://example.com/.well-known/lnurlp/carol"),
        # an international domain is fetched as punycode
        ("carol@bücher.example", "https://xn--bcher-kva.example/.well-known/lnurlp/carol"),
        ("https://bücher.example/p", "https://xn--bcher-kva.example/p"),
        ("lightning:carol@example.com", "https://example.com/.well-known/lnurlp/carol"),
        ("LIGHTNING:" + lnurl("https://example.com/p"), "https://example.com/p"),
        ("carol@127.0.0.2:8080", "http://127.0.0.2:8080/.well-known/lnurlp/carol"),
    ],
)
def test_a_destination_names_the_url_of_its_service(destination: str, url: str) -> None:
    assert str(pay_url(destination)) == url


@pytest.mark.parametrize(
    ("destination", "reason"),
    [
        ("http://example.com/lnurlp/carol", "plain http:// only for localhost"),
        (lnurl("http://example.com/lnurlp/carol"), "plain http:// only for localhost"),
        ("https://user:secret@example.com/p", "a user or password"),
        ("ftp://example.com/p", "the scheme 'ftp' is not https://"),
        ("02" + "ab" * 32, "keysend"),
        ("lightning:02" + "ab" * 32, "written alone"),
        ("lnurl1qqqqqqqq", "not a valid LNURL"),
        (bolt11_encode.bech32("lnbc", bolt11_encode.words_of(b"https://x.y/")), "not a node"),
        ("carol@", "a Lightning Address is name@domain"),
        ("carol@a..b", "not a valid host name: 'a..b'"),
        ("carol@example.com.", "not a valid host name"),
        ("carol@ex%61mple.com", "a Lightning Address is name@domain"),
        ("https://ex%61mple.com/p", "not a valid host name"),
        ("carol@example.com:0", "port 0"),
        ("https://example.com:0/p", "port 0"),
        ("https://example.com/p#x", "a fragment"),
        ("https://2130706433/p", "not a valid host name"),  # 127.0.0.1 to a resolver
        ("https://127.1/p", "not a valid host name"),
        (" carol@example.com", "blanks"),
        ("carol@example.com\n", "blanks"),
        ("ca rol@example.com", "blanks"),
        ("carol!@example.com", "a Lightning Address's name is 1 to 64 of a-z"),
        ("x" * 3000 + "@example.com", "more than 2048 characters"),
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
        ({"callback": "https://example.com/cb#x"}, "a fragment"),
        ({"callback": "https://10.0.0.1/cb"}, "callback is on a local or private address"),
        ({"callback": "http://localhost:1/cb"}, "callback is on a local or private address"),
        ({"invoice_metadata": "[]"}, "description hash is not that of the metadata"),
        ({"metadata": "[" * 30_000 + "]" * 30_000}, "metadata"),  # too deep for json
        ({"body": b"[" * 60_000}, "the answer is not a JSON object"),
        ({"body": b'{"tag": ' + b"[" * 60_000}, "the answer is not a JSON object"),
        ({"pr": "lnbcrt1garbage"}, "not a valid BOLT11 invoice"),
        ({"error": "carol is on holiday"}, "refused: carol is on holiday"),
        ({"error": "\x1b[2Jcleared"}, r"refused: \x1b[2Jcleared"),  # shown, not obeyed
        ({"status": 500}, "HTTP 500"),
        ({"body_bytes": 300_000}, "more than 262144 bytes"),
    ],
)
async def test_a_service_answer_that_does_not_check_out_is_refused(
    service: Service, client: LnurlPayClient, change: dict[str, Any], reason: str
) -> None:
    for name, value in change.items():
        setattr(service, name, value)
    got = await _refused(client, service)
    assert reason in got


async def test_an_invoice_for_another_amount_is_refused(
    service: Service, client: LnurlPayClient
) -> None:
    """LUD-06: the invoice is for the amount asked (the payout worker checks it too, with
    the network and expiry: test_payout)."""
    service.amount_skew = 1_000
    assert "the invoice is for 22000 msat, not the 21000 msat asked" in await _refused(
        client, service
    )


async def test_a_comment_goes_to_the_callback_encoded_within_comment_allowed(
    service: Service, client: LnurlPayClient
) -> None:
    service.comment_allowed = 20
    service.callback = f"{service.base}/cb?token=abc&comment=old"
    request = await client.pay_request(service.address)
    assert (request.comment_allowed, request.description) == (20, "carol's tips")
    got = await client.request_invoice(service.address, Msat(21_000), "thanks & ☕ 100%")
    assert got.invoice.amount_msat == 21_000
    assert got.success_action is None
    # the service's own comment= replaced, ours percent-encoded ("&" inside it kept)
    assert service.queries[-1].startswith("token=abc&amount=21000&comment=thanks ")
    assert service.calls[-1][1] == {
        "token": "abc",
        "amount": "21000",
        "comment": "thanks & ☕ 100%",
    }


@pytest.mark.parametrize(
    ("allowed", "comment", "reason"),
    [
        (0, "hi", "the service takes no comment"),
        (None, "hi", "the service takes no comment"),  # commentAllowed absent
        ("5", "hi", "the service takes no comment"),  # not a number: none
        (5, "hello!", "the comment is 6 characters, the service takes at most 5"),
    ],
)
async def test_a_comment_the_service_does_not_take_is_refused_before_the_callback(
    service: Service, client: LnurlPayClient, allowed: Any, comment: str, reason: str
) -> None:
    service.comment_allowed = allowed
    with pytest.raises(errors.PayoutDestinationError, match=reason):
        await client.request_invoice(service.address, Msat(21_000), comment)
    assert [path for path, _ in service.calls] == ["/.well-known/lnurlp/carol"]


async def test_success_actions_are_read(service: Service, client: LnurlPayClient) -> None:
    service.success = {"tag": "message", "message": "Thank you!"}
    got = await client.request_invoice(service.address, Msat(1_000))
    assert got.success_action == ReceivedSuccessAction("message", message="Thank you!")
    assert got.success_action.text(None) == "Thank you!"

    url = f"{service.base}/receipt?id=1"
    service.success = {"tag": "url", "description": "Your receipt", "url": url}
    action = (await client.request_invoice(service.address, Msat(1_000))).success_action
    assert action == ReceivedSuccessAction("url", description="Your receipt", url=url)
    assert action.as_json(None) == {"tag": "url", "description": "Your receipt", "url": url}

    service.success = {"tag": "someFutureTag", "x": 1}  # nothing this client can show
    assert (await client.request_invoice(service.address, Msat(1_000))).success_action is None


@pytest.mark.parametrize(
    "sent",
    [
        SuccessAction(message="m" * MAX_SUCCESS_CHARS),
        SuccessAction(url="http://127.0.0.1/thanks", description="d" * MAX_SUCCESS_CHARS),
    ],
)
async def test_what_our_own_service_answers_is_taken(
    service: Service, client: LnurlPayClient, sent: SuccessAction
) -> None:
    """The service side's texts (``gateway.lnurl``) pass this client's checks: the same
    description hash of the metadata, success texts as long as the service may make them."""
    service.metadata = service.invoice_metadata = metadata("carol's tips", "carol@127.0.0.1")
    service.success = success_action_body(sent)
    got = await client.request_invoice(service.address, Msat(1_000))
    assert got.invoice.description_hash == description_hash(service.metadata)
    assert got.success_action is not None
    assert got.success_action.as_json(None) == success_action_body(sent)


async def test_an_aes_success_action_decrypts_with_the_preimage(
    service: Service, client: LnurlPayClient
) -> None:
    preimage = secrets.token_bytes(32)
    service.success = aes_action(preimage, "the code is 4242", "Your voucher")
    action = (await client.request_invoice(service.address, Msat(1_000))).success_action
    assert action is not None
    assert action.text(preimage) == "Your voucher\nthe code is 4242"
    assert action.as_json(preimage)["plaintext"] == "the code is 4242"
    with pytest.raises(errors.PayoutDestinationError, match="does not decrypt"):
        action.plaintext(secrets.token_bytes(32))
    with pytest.raises(errors.PayoutDestinationError, match="needs the payment's preimage"):
        action.text(None)


@pytest.mark.parametrize(
    ("success", "reason"),
    [
        ("Thank you", "not a JSON object"),
        (
            {"tag": "message", "message": "x" * (MAX_SUCCESS_CHARS + 1)},
            f"message is not a text of at most {MAX_SUCCESS_CHARS}",
        ),
        ({"tag": "message"}, "message is not a text"),
        ({"tag": "url", "description": "d", "url": "https://evil.example/x"}, "callback's host"),
        ({"tag": "url", "description": "d", "url": "javascript:alert(1)"}, "not an https://"),
        ({"tag": "url", "url": "https://127.0.0.1/x"}, "description is not a text"),
        ({"tag": "aes", "description": "d", "ciphertext": "!!", "iv": "A" * 24}, "not base64"),
        (
            {"tag": "aes", "description": "d", "ciphertext": "AAAA", "iv": "A" * 24},
            "whole AES blocks",
        ),
        (
            {"tag": "aes", "description": "d", "ciphertext": "A" * 24, "iv": "AAAA"},
            "iv is not 16 bytes",
        ),
    ],
)
async def test_a_malformed_success_action_is_refused_before_paying(
    service: Service, client: LnurlPayClient, success: Any, reason: str
) -> None:
    service.success = success
    assert reason in await _refused(client, service)


async def test_no_answer_is_unreachable_and_a_bad_answer_is_not(
    service: Service, client: LnurlPayClient
) -> None:
    with pytest.raises(LnurlUnreachable, match="cannot fetch"):
        await client.invoice("carol@127.0.0.1:1", Msat(1_000))
    service.status = 503
    with pytest.raises(LnurlUnreachable, match="HTTP 503"):
        await client.invoice(service.address, Msat(1_000))
    service.status = 404
    with pytest.raises(errors.PayoutDestinationError) as raised:
        await client.invoice(service.address, Msat(1_000))
    assert not isinstance(raised.value, LnurlUnreachable)


async def test_the_callback_keeps_its_query_as_written_and_gets_the_amount(
    service: Service, client: LnurlPayClient
) -> None:
    service.callback = f"{service.base}/cb?token=abc&flag&x=a%2Bb&amount=7"
    await client.invoice(service.address, Msat(21_000))
    assert service.queries[-1] == "token=abc&flag&x=a%2Bb&amount=21000"


@pytest.mark.parametrize(
    ("service_url", "callback", "reason"),
    [
        # a public service never sends the gateway into the merchant's network
        ("https://pay.example/p", "http://127.0.0.1:8080/cb", "local or private"),
        ("https://pay.example/p", "https://127.0.0.1/cb", "local or private"),
        ("https://pay.example/p", "https://localhost/cb", "local or private"),
        ("https://pay.example/p", "https://10.1.2.3/cb", "local or private"),
        ("https://pay.example/p", "https://192.168.1.1/cb", "local or private"),
        ("https://pay.example/p", "https://169.254.169.254/latest", "local or private"),
        ("https://pay.example/p", "https://[::1]/cb", "local or private"),
        ("https://pay.example/p", "https://[fe80::1]/cb", "local or private"),
        ("https://pay.example/p", "https://[::ffff:127.0.0.1]/cb", "local or private"),
        # IPv6 addresses that carry an internal IPv4 one, which a translator or tunnel on
        # the way would deliver to
        ("https://pay.example/p", "https://[64:ff9b::7f00:1]/cb", "local or private"),
        ("https://pay.example/p", "https://[64:ff9b::a9fe:a9fe]/cb", "local or private"),
        ("https://pay.example/p", "https://[64:ff9b:1::808:808]/cb", "local or private"),
        ("https://pay.example/p", "https://[2002:7f00:1::]/cb", "local or private"),
        ("https://pay.example/p", "https://[2002:c0a8:101::1]/cb", "local or private"),
        ("https://pay.example/p", "https://[::7f00:1]/cb", "local or private"),
        ("https://pay.example/p", "https://[::a01:203]/cb", "local or private"),
        ("https://pay.example/p", "https://[::ffff:0:7f00:1]/cb", "local or private"),
        # Teredo: server 65.54.227.120, client 127.0.0.1 (stored inverted)
        (
            "https://pay.example/p",
            "https://[2001:0:4136:e378:8000:63bf:80ff:fffe]/cb",
            "local or private",
        ),
        ("https://pay.example/p", "https://0.0.0.0/cb", "local or private"),
        ("https://pay.example/p", "https://100.64.0.1/cb", "local or private"),  # CGNAT
        ("https://pay.example/p", "http://abcdef.onion/cb", "local or private"),
        ("https://pay.example/p", "http://pay.example/cb", "plain http:// only"),
        ("http://127.0.0.1:9/p", "http://localhost:9/cb", "local or private"),
        ("https://pay.example/p", "https://pay.example:0/cb", "port 0"),
        ("https://pay.example/p", "https://pay.example/cb#f", "a fragment"),
        ("https://pay.example/p", "/cb", "not an absolute URL"),
    ],
)
def test_a_callback_into_a_local_network_is_refused(
    service_url: str, callback: str, reason: str
) -> None:
    with pytest.raises(destinations.DestinationError, match=reason):
        destinations.callback_url(yarl.URL(service_url), callback)


@pytest.mark.parametrize(
    ("service_url", "callback"),
    [
        ("https://pay.example/p", "https://pay.example/cb?x=1"),
        ("https://pay.example/p", "https://other.example:8443/cb"),
        ("https://pay.example/p", "https://8.8.8.8/cb"),
        ("https://pay.example/p", "https://[2606:4700::1111]/cb"),
        # an IPv6 address carrying a public IPv4 one
        ("https://pay.example/p", "https://[64:ff9b::808:808]/cb"),
        ("https://pay.example/p", "https://[2002:808:808::1]/cb"),
        ("https://pay.example/p", "https://[::808:808]/cb"),
        ("https://[2002:7f00:1::]/p", "https://[2002:7f00:1::]/cb"),  # its own host
        ("http://127.0.0.1:9/p", "http://127.0.0.1:10/cb"),  # the same local host
        ("http://abcdef.onion/p", "http://abcdef.onion/cb"),
        ("https://10.0.0.5/p", "https://10.0.0.5/cb"),  # the merchant named that host
    ],
)
def test_a_callback_on_a_public_host_or_the_services_own_is_followed(
    service_url: str, callback: str
) -> None:
    assert str(destinations.callback_url(yarl.URL(service_url), callback)) == callback


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
    service.invoice_metadata = "[]"
    await _refused(client, service)
    service.invoice_metadata = METADATA
    await client.invoice(service.address, Msat(1_000))
    fetched = [path for path, _ in service.calls if path != "/cb"]
    assert len(fetched) == 2


async def test_an_expired_pay_request_is_fetched_again(service: Service) -> None:
    async with LnurlPayClient(cache_seconds=0) as client:
        await client.bounds(service.address)
        await client.bounds(service.address)
    assert len(service.calls) == 2


async def test_the_pay_request_is_kept_cache_seconds_on_the_monotonic_clock(
    service: Service,
) -> None:
    now = [100.0]
    async with LnurlPayClient(cache_seconds=60, monotonic=lambda: now[0]) as client:
        await client.bounds(service.address)
        now[0] += 59.9
        await client.bounds(service.address)
        assert len(service.calls) == 1
        now[0] += 0.1
        await client.bounds(service.address)
        assert len(service.calls) == 2
        client.forget(service.address)
        await client.bounds(service.address)
    assert len(service.calls) == 3
