"""Pay on success, the paying side: the 402's ``L402-Settle`` header, the longer payment
timeout, asking the gateway why a held payment failed (``PaymentRefunded``), and what ``pay``
says, against a loopback server that plays the gateway."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import httpx
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from gateway.cli import main, pay
from gateway.client import (
    DEFAULT_MAX_SETTLE_SECONDS,
    Budget,
    BudgetExceeded,
    ClientError,
    L402Client,
    PaymentRefunded,
    TokenCache,
    body_digest,
    read_offer,
)
from gateway.client import on_success as on_success_module
from gateway.client.aiohttp import l402_session
from gateway.client.httpx import L402Auth
from gateway.client.offer import settle_terms
from gateway.errors import BackendUnavailable, PaymentFailed
from gateway.lnd.connection import LndSettings
from gateway.ports import Msat, Payment, PaymentHash
from tests.fakes import NOW
from tests.unit.client.client_helpers import Challenge, FakePayer, fake_clock, make_challenge

URL = "http://api.test/api/jobs"
SETTLE = "on-success; timeout=30"
REFUND = {"state": "refunded", "failure": "backend failed with 503", "expires_at": 0}


# -- the header ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "terms"),
    [
        ("on-success; timeout=30", (True, 30.0)),
        ("on-success;timeout=30", (True, 30.0)),
        ("  On-Success ;  TIMEOUT = 12.5 ", (True, 12.5)),
        ('on-success; timeout="45"', (True, 45.0)),
        ("on-success; retries=2; timeout=30; note=x", (True, 30.0)),
        ("on-success; timeout=30;", (True, 30.0)),
        ("on-success", (True, None)),
        ("on-success; note=x", (True, None)),
    ],
)
def test_settle_header_is_read(value: str, terms: tuple[bool, float | None]) -> None:
    assert settle_terms({"L402-Settle": value}) == terms


@pytest.mark.parametrize(
    "value",
    [
        "on-success; timeout=abc",
        "on-success; timeout=-1",
        "on-success; timeout=1e3",
        "on-success; timeout=",
        "on-success; timeout=30 s",
        "on-success; timeout=30; timeout=40",
        "on-success; timeout",
        "on-success; =30",
        "on-success; timeout=86401",
        "on-success; timeout=100000",
        "on-success timeout=30",
        "on-success; timeout=" + "9" * 300,
        "on-success; timeout=30; note=" + "x" * 300,  # over 256 characters
        "on-payment, on-success; timeout=30",  # two values, as httpx joins them
        "on-payment; note=on-success",
    ],
)
def test_on_success_without_a_usable_timeout_is_held_for_a_time_not_known(value: str) -> None:
    # Still pay on success (its token buys one request), and refused by the budget's cap.
    assert settle_terms({"L402-Settle": value}) == (True, None)


def test_two_settle_headers_are_read_together() -> None:
    # aiohttp's headers: the first is what get() finds; the second must not go unseen.
    headers = CIMultiDict([("L402-Settle", "on-payment"), ("L402-Settle", "on-success")])
    assert settle_terms(headers) == (True, None)
    twice = CIMultiDict([("L402-Settle", SETTLE), ("l402-settle", SETTLE)])
    assert settle_terms(twice) == (True, None)


@pytest.mark.parametrize(
    "value",
    [
        "on-payment; timeout=30",
        "",
        "on-payment; note=" + "x" * 300,
    ],
)
def test_another_or_unreadable_settle_header_is_ignored(value: str) -> None:
    assert settle_terms({"L402-Settle": value}) == (False, None)


def test_absent_settle_header_and_any_name_case() -> None:
    assert settle_terms({}) == (False, None)
    assert settle_terms({"l402-settle": SETTLE}) == (True, 30.0)  # a plain dict
    assert settle_terms(CIMultiDict({"L402-SETTLE": SETTLE})) == (True, 30.0)


def test_the_offer_carries_the_settlement() -> None:
    challenge = make_challenge()
    www, body = challenge.www_authenticate, challenge.body
    plain = read_offer(www, body, network="regtest", now=NOW)
    assert (plain.settles_on_success, plain.settle_timeout) == (False, None)
    headers = CIMultiDict({"l402-settle": "ON-SUCCESS ; timeout = 20"})
    offer = read_offer(www, body, network="regtest", now=NOW, headers=headers)
    assert (offer.settles_on_success, offer.settle_timeout) == (True, 20.0)
    malformed = {"L402-Settle": "on-success; timeout=soon"}
    offer = read_offer(www, body, network="regtest", now=NOW, headers=malformed)
    assert (offer.settles_on_success, offer.settle_timeout) == (True, None)


# -- the payment timeout ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "client_timeout", "expected"),
    [
        (None, 60.0, 60.0),
        ("on-success; timeout=30", 60.0, 60.0),  # 30 + 30: no more than the client's own
        ("on-success; timeout=45", 60.0, 75.0),
        ("on-success; timeout=600", 60.0, 630.0),
        ("on-success; timeout=45", 120.0, 120.0),
    ],
)
async def test_payment_timeout_covers_the_backends_time(
    header: str | None, client_timeout: float, expected: float
) -> None:
    payer = FakePayer()
    challenge = payer.learn(make_challenge())
    client = L402Client(
        payer,
        network="regtest",
        budget=Budget(max_price_msat=50_000),
        clock=fake_clock(),
        payment_timeout=client_timeout,
    )
    headers = {} if header is None else {"L402-Settle": header}
    _, payment = await client.authorize(
        URL, "POST", challenge.www_authenticate, challenge.body, headers=headers
    )
    assert payment is not None
    assert [timeout for _, _, timeout in payer.calls] == [expected]


async def test_an_offer_held_longer_than_the_budget_allows_is_not_paid() -> None:
    payer = FakePayer()
    client = L402Client(
        payer, network="regtest", budget=Budget(max_price_msat=50_000), clock=fake_clock()
    )
    challenge = payer.learn(make_challenge())
    www, body = challenge.www_authenticate, challenge.body
    headers = {"L402-Settle": f"on-success; timeout={DEFAULT_MAX_SETTLE_SECONDS + 1:g}"}
    with pytest.raises(BudgetExceeded, match="held up to 601 s") as caught:
        await client.authorize(URL, "POST", www, body, headers=headers)
    assert caught.value.limit == "max_settle"
    unknown = {"L402-Settle": "on-success"}
    with pytest.raises(BudgetExceeded, match="for a time the 402 does not say") as caught:
        await client.authorize(URL, "POST", www, body, headers=unknown)
    assert caught.value.limit == "max_settle"
    assert payer.calls == []
    assert await client.cache.pending() == []
    # At the cap it is paid; a payer that allows more pays more.
    at_cap = {"L402-Settle": f"on-success; timeout={DEFAULT_MAX_SETTLE_SECONDS:g}"}
    _, payment = await client.authorize(URL, "POST", www, body, headers=at_cap)
    assert payment is not None
    patient = L402Client(
        payer,
        network="regtest",
        budget=Budget(max_price_msat=50_000, max_settle_seconds=3600),
        clock=fake_clock(),
    )
    longer = payer.learn(make_challenge())
    _, payment = await patient.authorize(
        URL, "POST", longer.www_authenticate, longer.body, headers=headers
    )
    assert payment is not None
    # Without a cap, an offer that does not say how long is paid too (the client's timeout).
    uncapped = L402Client(
        payer,
        network="regtest",
        budget=Budget(max_price_msat=50_000, max_settle_seconds=None),
        clock=fake_clock(),
    )
    unsaid = payer.learn(make_challenge())
    _, payment = await uncapped.authorize(
        URL, "POST", unsaid.www_authenticate, unsaid.body, headers=unknown
    )
    assert payment is not None
    # Waited for as long as any time a 402 may say.
    assert [timeout for _, _, timeout in payer.calls] == [630.0, 631.0, 86_430.0]


@pytest.mark.parametrize("seconds", [0, -1, float("nan"), float("inf"), True])
def test_the_settle_cap_is_a_positive_number_of_seconds(seconds: float) -> None:
    with pytest.raises(ValueError, match="max_settle_seconds"):
        Budget(max_price_msat=1, max_settle_seconds=seconds)


# -- a loopback gateway -------------------------------------------------------------------


@dataclass
class Gateway:
    """Answers ``/api/jobs`` with a pay-on-success 402 (the token: 200) and the redeem
    endpoint with ``answer``; records what redeem was asked."""

    challenge: Challenge
    settle: str | None = SETTLE
    answer: web.StreamResponse | dict[str, object] = field(default_factory=lambda: REFUND)
    delay: float = 0.0
    redeemed: list[tuple[str, str | None, bytes]] = field(default_factory=list)
    url: str = ""

    async def job(self, request: web.Request) -> web.StreamResponse:
        paid = f"L402 {self.challenge.macaroon_b64}:{self.challenge.preimage.hex()}"
        if request.headers.get("Authorization") == paid:
            return web.json_response({"job": "done"}, status=201)
        headers = CIMultiDict[str]()
        for value in self.challenge.www_authenticate:
            headers.add("WWW-Authenticate", value)
        if self.settle is not None:
            headers["L402-Settle"] = self.settle
        return web.Response(
            status=402,
            body=self.challenge.body,
            headers=headers,
            content_type="application/problem+json",
        )

    async def redeem(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.redeemed.append((request.method, request.headers.get("Content-Type"), body))
        await asyncio.sleep(self.delay)
        if isinstance(self.answer, web.StreamResponse):
            return self.answer
        return web.json_response(self.answer)


def _challenge(created_at: float = NOW) -> Challenge:
    return make_challenge(21_000, created_at=created_at, valid_until=None)


@pytest_asyncio.fixture
async def gateway() -> AsyncIterator[Gateway]:
    served = Gateway(_challenge())
    app = web.Application()
    app.router.add_route("*", "/api/jobs", served.job)
    app.router.add_route("*", "/.well-known/l402/redeem", served.redeem)
    server = TestServer(app)
    await server.start_server()
    served.url = str(server.make_url("/api/jobs"))
    try:
        yield served
    finally:
        await server.close()


def failing_client(cache: TokenCache | None = None) -> tuple[L402Client, FakePayer]:
    payer = FakePayer()
    payer.fail = True  # as the payer's node reports a payment the gateway cancelled
    client = L402Client(
        payer,
        network="regtest",
        budget=Budget(max_price_msat=50_000),
        cache=cache or TokenCache(),
        clock=fake_clock(),
    )
    return client, payer


async def _post(client: L402Client, url: str) -> None:
    async with l402_session(client) as session, session.post(url, data=b"job") as response:
        await response.read()


def _original(challenge: Challenge) -> str:
    return f"payment {challenge.payment_hash.hex()} failed: FAILURE_REASON_NO_ROUTE"


# -- asking the gateway why ---------------------------------------------------------------


async def test_a_refund_raises_payment_refunded(gateway: Gateway) -> None:
    cache = TokenCache()
    client, payer = failing_client(cache)
    with pytest.raises(PaymentRefunded) as raised:
        await _post(client, gateway.url)
    error = raised.value
    assert str(error) == "refunded: backend failed with 503"
    assert error.failure == "backend failed with 503"
    assert isinstance(error, ClientError)
    assert isinstance(error, PaymentFailed)
    assert error.payment_hash == gateway.challenge.payment_hash
    assert error.offer is not None
    assert error.offer.settles_on_success
    assert isinstance(error.__cause__, PaymentFailed)  # the payer's own report
    assert len(payer.calls) == 1
    [(method, content_type, body)] = gateway.redeemed
    assert (method, content_type) == ("POST", "application/json")
    assert json.loads(body) == {"macaroon": gateway.challenge.macaroon_b64}
    assert await cache.pending() == []
    assert await cache.tokens() == []
    assert client.spending_log == ()
    assert client.spent_msat == 0


async def test_a_refund_through_httpx(gateway: Gateway) -> None:
    client, _ = failing_client()
    async with httpx.AsyncClient(auth=L402Auth(client)) as http:
        with pytest.raises(PaymentRefunded, match=r"^refunded: backend failed with 503$"):
            await http.post(gateway.url, content=b"job")
    assert len(gateway.redeemed) == 1


async def test_the_gateways_failure_text_is_escaped_and_cut(gateway: Gateway) -> None:
    gateway.answer = {"state": "refunded", "failure": "\x1b[2J\u202eforged\nline " * 100}
    client, _ = failing_client()
    with pytest.raises(PaymentRefunded) as raised:
        await _post(client, gateway.url)
    message = str(raised.value)
    assert message.startswith("refunded: \\x1b[2J\\u202eforged\\x0aline ")
    assert message.isprintable()
    assert len(message) <= len("refunded: ") + on_success_module.MAX_FAILURE_CHARS
    gateway.answer = {"state": "refunded"}
    with pytest.raises(PaymentRefunded, match=r"^refunded: the request failed$"):
        await _post(failing_client()[0], gateway.url)


@pytest.mark.parametrize("state", ["pending", "settled", "expired", "canceled"])
async def test_another_state_is_added_to_the_failure(gateway: Gateway, state: str) -> None:
    gateway.answer = {"state": state, "expires_at": 0}
    client, _ = failing_client()
    with pytest.raises(PaymentFailed) as raised:
        await _post(client, gateway.url)
    assert not isinstance(raised.value, PaymentRefunded)
    assert str(raised.value) == (
        f"{_original(gateway.challenge)} (the gateway reports the paid request as {state})"
    )


@pytest.mark.parametrize(
    "answer",
    [
        web.Response(status=503, text="busy"),
        web.Response(status=429, text="slow down"),
        web.Response(status=200, text="not json"),
        web.json_response(["a", "list"]),
        web.json_response({"state": 3}),
        web.json_response({"state": "\x1bweird"}),
        web.json_response({"nostate": True}),
        web.Response(status=200, body=b'{"state": "refunded", "x": "' + b"a" * 20_000 + b'"}'),
    ],
    ids=["503", "429", "not-json", "list", "state-number", "unknown-state", "no-state", "big"],
)
async def test_a_useless_answer_leaves_the_failure_as_it_came(
    gateway: Gateway, answer: web.StreamResponse
) -> None:
    gateway.answer = answer
    client, _ = failing_client()
    with pytest.raises(PaymentFailed) as raised:
        await _post(client, gateway.url)
    assert type(raised.value) is PaymentFailed
    assert str(raised.value) == _original(gateway.challenge)
    assert len(gateway.redeemed) == 1


async def test_an_unreachable_or_slow_gateway_leaves_the_failure_as_it_came(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(on_success_module, "ASK_TIMEOUT", 0.2)
    gateway.delay = 5.0
    client, _ = failing_client()
    started = time.monotonic()
    with pytest.raises(PaymentFailed) as raised:
        await _post(client, gateway.url)
    assert time.monotonic() - started < 3
    assert type(raised.value) is PaymentFailed
    assert str(raised.value) == _original(gateway.challenge)

    async def unreachable(url: str, body: bytes) -> tuple[int, bytes]:
        raise OSError("connection refused")

    challenge = gateway.challenge
    headers = {"L402-Settle": SETTLE}
    with pytest.raises(PaymentFailed) as raised:
        await client.authorize(
            URL,
            "POST",
            challenge.www_authenticate,
            challenge.body,
            headers=headers,
            ask_gateway=unreachable,
        )
    assert type(raised.value) is PaymentFailed
    assert str(raised.value) == _original(challenge)


async def test_an_ordinary_offer_is_not_asked_about(gateway: Gateway) -> None:
    gateway.settle = None
    client, _ = failing_client()
    with pytest.raises(PaymentFailed) as raised:
        await _post(client, gateway.url)
    assert type(raised.value) is PaymentFailed
    assert gateway.redeemed == []


async def test_a_paid_on_success_request_gets_its_response(gateway: Gateway) -> None:
    payer = FakePayer()
    payer.learn(gateway.challenge)
    client = L402Client(
        payer, network="regtest", budget=Budget(max_price_msat=50_000), clock=fake_clock()
    )
    async with l402_session(client) as session, session.post(gateway.url) as response:
        assert (response.status, await response.json()) == (201, {"job": "done"})
    assert gateway.redeemed == []
    assert [timeout for _, _, timeout in payer.calls] == [60.0]


# -- the token pays for one request ------------------------------------------------------


async def test_the_token_is_offered_only_to_the_request_it_paid_for(tmp_path: Path) -> None:
    payer = FakePayer()
    cache = TokenCache(tmp_path / "tokens.json")
    client = L402Client(
        payer,
        network="regtest",
        budget=Budget(max_price_msat=50_000),
        cache=cache,
        clock=fake_clock(),
    )
    held, plain = payer.learn(_challenge()), payer.learn(_challenge())
    url = "http://api.test/api/jobs?id=1"
    job = body_digest(b"job")
    token, _ = await client.authorize(
        url,
        "post",
        held.www_authenticate,
        held.body,
        headers={"L402-Settle": SETTLE},
        body_sha256=job,
    )
    assert (token.paid_request, token.paid_body_sha256) == ("POST /api/jobs?id=1", job)
    await client.authorize("http://api.test/api/x", "GET", plain.www_authenticate, plain.body)
    again = TokenCache(tmp_path / "tokens.json")  # the binding survives the file
    found = await again.find(url, "POST", NOW, job)
    assert found is not None
    assert found.payment_hash == held.payment_hash
    assert (found.paid_request, found.paid_body_sha256) == ("POST /api/jobs?id=1", job)
    for other_url, method, body in (
        (url, "GET", job),
        ("http://api.test/api/jobs?id=2", "POST", job),
        ("http://api.test/api/jobs", "POST", job),
        ("http://api.test/api/jobs/1?id=1", "POST", job),
        (url, "POST", body_digest(b"another job")),
        (url, "POST", body_digest(None)),
        (url, "POST", None),  # a body not known
    ):
        other = await again.find(other_url, method, NOW, body)
        assert other is None or other.payment_hash == plain.payment_hash, (other_url, method)
    elsewhere = await again.find("http://api.test/api/y", "GET", NOW)  # the ordinary token
    assert elsewhere is not None
    assert elsewhere.payment_hash == plain.payment_hash


async def test_a_payment_recovered_after_a_crash_keeps_its_request(tmp_path: Path) -> None:
    payer = FakePayer()
    held = payer.learn(_challenge())
    payer.crash = True  # paid, but the call broke: the payment stays pending
    cache = TokenCache(tmp_path / "tokens.json")
    client = L402Client(
        payer,
        network="regtest",
        budget=Budget(max_price_msat=50_000),
        cache=cache,
        clock=fake_clock(),
    )
    with pytest.raises(BackendUnavailable):
        await client.authorize(
            URL, "POST", held.www_authenticate, held.body, headers={"L402-Settle": SETTLE}
        )
    [pending] = await TokenCache(tmp_path / "tokens.json").pending()
    assert pending.paid_request == "POST /api/jobs"
    assert pending.paid_body_sha256 is None  # authorize was not told the body
    assert pending.covers(URL)
    assert not pending.covers("http://api.test/api/other")
    [recovered] = await client.recover()
    assert recovered.recovered
    [token] = await TokenCache(tmp_path / "tokens.json").tokens()
    assert token.paid_request == "POST /api/jobs"


@pytest.mark.parametrize("known", [True, False], ids=["body", "no-body"])
@pytest.mark.parametrize(
    ("status", "kept"), [(201, False), (410, False), (409, False), (500, True)]
)
async def test_the_token_leaves_the_cache_once_its_response_came(
    status: int, kept: bool, known: bool
) -> None:
    payer = FakePayer()
    held = payer.learn(_challenge())
    cache = TokenCache()
    client = L402Client(
        payer,
        network="regtest",
        budget=Budget(max_price_msat=50_000),
        cache=cache,
        clock=fake_clock(),
    )
    exchange = await client.exchange(
        URL, "POST", body_sha256=body_digest(b"job") if known else None
    )

    async def body() -> bytes:
        return held.body

    retry = await exchange.step(
        402, held.www_authenticate, body, CIMultiDict({"L402-Settle": SETTLE})
    )
    assert retry is not None
    assert len(await cache.tokens()) == 1  # a lost answer to the retry: the token stays
    assert await exchange.step(status, [], body, CIMultiDict()) is None
    # A token for a body not known: no later request could collect the answer with it.
    assert (len(await cache.tokens()) == 1) is (kept and known)


# -- l402-gateway pay ---------------------------------------------------------------------


class FakeNode:
    """Stands in for ``LndClient`` in ``gateway.cli.pay``: pays through ``PAYER``."""

    PAYER = FakePayer()

    def __init__(self, settings: LndSettings) -> None:
        self.settings = settings

    async def __aenter__(self) -> FakeNode:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        return None

    async def send_payment(
        self, payment_request: str, *, max_fee_msat: Msat, payment_timeout: float
    ) -> Payment:
        return await FakeNode.PAYER.send_payment(
            payment_request, max_fee_msat=max_fee_msat, payment_timeout=payment_timeout
        )

    async def lookup_payment(self, payment_hash: PaymentHash) -> Payment | None:
        return await FakeNode.PAYER.lookup_payment(payment_hash)


@dataclass
class PayCommand:
    gateway: Gateway
    tmp: Path

    async def run(self, *args: str) -> int:
        argv = ["pay", "--network", "regtest", "--token-cache", str(self.tmp / "tokens.json")]
        argv += ["--lnd-tls-cert", str(self.tmp / "tls.cert")]
        argv += ["--lnd-macaroon", str(self.tmp / "admin.macaroon"), "-X", "POST"]
        return await asyncio.to_thread(main, [*argv, *args, self.gateway.url])


@pytest_asyncio.fixture
async def command(gateway: Gateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> PayCommand:
    monkeypatch.setattr(pay, "LndClient", FakeNode)
    FakeNode.PAYER = FakePayer()
    for name in ("GATEWAY_PAYER_LND_HOST", "GATEWAY_PAYER_NETWORK"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "tls.cert").write_text("-----BEGIN CERTIFICATE-----\nx\n")
    (tmp_path / "admin.macaroon").write_bytes(b"\x02macaroon")
    gateway.challenge = _challenge(created_at=time.time())  # pay reads the real time
    return PayCommand(gateway, tmp_path)


ANNOUNCE = (
    "pay on success: the request runs while the payment is held (up to 30 s); "
    "you pay only if it succeeds"
)


async def test_pay_says_before_paying_that_the_request_runs_on_payment(
    command: PayCommand, capsys: pytest.CaptureFixture[str]
) -> None:
    FakeNode.PAYER.learn(command.gateway.challenge)
    assert await command.run() == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"job": "done"}
    lines = captured.err.splitlines()
    assert lines[0] == ANNOUNCE
    assert lines[1].startswith("paying 21 sat")
    assert lines[2].startswith("paid 21 sat")
    assert [timeout for _, _, timeout in FakeNode.PAYER.calls] == [60.0]
    # The token bought one run of the request, delivered: the next run pays again, quietly.
    assert await TokenCache(command.tmp / "tokens.json").tokens() == []
    assert await command.run("-s") == 0
    assert capsys.readouterr().err == ""
    assert len(FakeNode.PAYER.calls) == 2


async def test_pay_reports_a_refund_and_exits_3(
    command: PayCommand, capsys: pytest.CaptureFixture[str]
) -> None:
    FakeNode.PAYER.fail = True
    assert await command.run() == pay.EXIT_BACKEND
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert lines[0] == ANNOUNCE
    assert lines[2].startswith("payment failed after ")
    assert lines[-1] == "l402-gateway: refunded: backend failed with 503"
    assert captured.out == ""

    assert await command.run("--json", "-s") == pay.EXIT_BACKEND
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["error"] == "refunded: backend failed with 503"
    offer = summary["offer"]
    assert (offer["settles_on_success"], offer["settle_timeout"]) == (True, 30.0)
    assert captured.err == "l402-gateway: refunded: backend failed with 503\n"


async def test_pay_reports_a_failure_the_gateway_calls_pending(
    command: PayCommand, capsys: pytest.CaptureFixture[str]
) -> None:
    FakeNode.PAYER.fail = True
    command.gateway.answer = {"state": "pending", "expires_at": 0}
    assert await command.run("-s") == pay.EXIT_BACKEND
    assert capsys.readouterr().err == (
        f"l402-gateway: {_original(command.gateway.challenge)} "
        "(the gateway reports the paid request as pending)\n"
    )


async def test_pay_refuses_an_offer_held_longer_than_its_cap(
    command: PayCommand, capsys: pytest.CaptureFixture[str]
) -> None:
    FakeNode.PAYER.learn(command.gateway.challenge)
    command.gateway.settle = "on-success; timeout=900"
    assert await command.run() == pay.EXIT_OVER_BUDGET
    assert capsys.readouterr().err == (
        "l402-gateway: pay on success: the payment would be held up to 900 s while the "
        "backend runs, over the limit of 600 s; nothing was paid\n"
    )
    assert FakeNode.PAYER.calls == []
    assert await command.run("--no-pay") == pay.EXIT_PAYMENT_REQUIRED  # shown, not refused
    out = capsys.readouterr().out
    assert "up to 900 s" in out
    assert "  (held longer than --max-settle-time 600 s)" in out
    assert await command.run("--no-pay", "--json") == pay.EXIT_PAYMENT_REQUIRED
    assert json.loads(capsys.readouterr().out)["offer"]["over_max_settle_time"] is True
    assert await command.run("-s", "--max-settle-time", "900") == 0
    assert [timeout for _, _, timeout in FakeNode.PAYER.calls] == [930.0]
    command.gateway.settle = "on-success"  # no time said
    assert await command.run("--no-pay") == pay.EXIT_PAYMENT_REQUIRED
    assert "  (held for a time the 402 does not say: refused under --max-settle-time 600 s)" in (
        capsys.readouterr().out
    )
    assert await command.run("-s") == pay.EXIT_OVER_BUDGET
    assert "for a time the 402 does not say" in capsys.readouterr().err


async def test_pay_no_pay_shows_the_settlement(
    command: PayCommand, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await command.run("--no-pay") == pay.EXIT_PAYMENT_REQUIRED
    out = capsys.readouterr().out
    assert f"  settles:  on success: {ANNOUNCE.removeprefix('pay on success: ')}" in out
    assert FakeNode.PAYER.calls == []
    command.gateway.settle = None
    assert await command.run("--no-pay") == pay.EXIT_PAYMENT_REQUIRED
    assert "settles:" not in capsys.readouterr().out
    assert await command.run("--no-pay", "--json") == pay.EXIT_PAYMENT_REQUIRED
    offer = json.loads(capsys.readouterr().out)["offer"]
    assert (offer["settles_on_success"], offer["settle_timeout"]) == (False, None)
