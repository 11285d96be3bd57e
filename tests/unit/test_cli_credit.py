"""``l402-gateway credit balance|withdraw URL`` and ``pay``'s balance, against a fake credit
gateway on a loopback server, with the token ``pay`` would have cached and a fake LND node."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import ClassVar

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.cli import credit, main, pay
from gateway.client import TokenCache
from gateway.client.aiohttp import l402_session
from gateway.client.tokens import new_token
from gateway.lnd.connection import LndSettings
from gateway.ports import Msat, NewInvoice, PaymentHash
from gateway.service.withdraw import fee_reserve
from tests.fakes import make_invoice
from tests.unit.client.client_helpers import make_challenge
from tests.unit.client.credit_helpers import CREDIT, PRICE, Served, credit_gateway


class FakeNode:
    """Stands in for ``LndClient`` in ``gateway.cli.credit``: makes (real BOLT11) invoices."""

    made: ClassVar[list[tuple[int, str, int]]] = []

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

    async def add_invoice(
        self, amount_msat: Msat, memo: str, expiry: int, description_hash: bytes = b""
    ) -> NewInvoice:
        FakeNode.made.append((amount_msat, memo, expiry))
        payment_hash = hashlib.sha256(secrets.token_bytes(32)).digest()
        invoice = make_invoice(
            payment_hash,
            amount_msat,
            created_at=time.time(),
            expiry=expiry,
            description_hash=description_hash,
        )
        return NewInvoice(PaymentHash(payment_hash), invoice, len(FakeNode.made))


class Setup:
    def __init__(self, served: Served, tmp_path: Path) -> None:
        self.served = served
        self.tmp = tmp_path
        self.cache = tmp_path / "tokens.json"
        self.url = served.url + "/api/credit/data"
        (tmp_path / "tls.cert").write_text("-----BEGIN CERTIFICATE-----\nx\n")
        (tmp_path / "admin.macaroon").write_bytes(b"\x02macaroon")

    async def buy(self, requests: int = 1) -> None:
        """Buy credit (as ``pay`` would, into its cache) and spend ``requests`` of it."""
        client = self.served.client(cache=TokenCache(self.cache))
        async with l402_session(client) as session:
            for _ in range(requests):
                async with session.get(self.url) as response:
                    assert response.status == 200

    async def run(self, *args: str, node: bool = False) -> int:
        argv = ["credit", *args, "--token-cache", str(self.cache)]
        if node:
            argv += ["--lnd-tls-cert", str(self.tmp / "tls.cert")]
            argv += ["--lnd-macaroon", str(self.tmp / "admin.macaroon")]
        return await asyncio.to_thread(main, argv)


@pytest_asyncio.fixture
async def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Setup]:
    monkeypatch.setattr(credit, "LndClient", FakeNode)
    FakeNode.made = []
    for name in (
        "GATEWAY_PAYER_LND_HOST",
        "GATEWAY_PAYER_LND_TLS_CERT",
        "GATEWAY_PAYER_LND_MACAROON",
    ):
        monkeypatch.delenv(name, raising=False)
    async with credit_gateway() as served:
        yield Setup(served, tmp_path)


async def test_balance_shows_the_token_info(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    await setup.buy(requests=3)
    assert await setup.run("balance", setup.url) == 0
    out = capsys.readouterr().out
    assert f"balance:      7 sat ({CREDIT - 3 * PRICE} msat)" in out
    assert "credited:     10 sat (10000 msat)" in out
    assert "spent:        3 sat (3000 msat)" in out
    assert "service:      credit" in out
    assert "valid until:  20" in out
    assert out.count("GET /api/credit/data") == 3
    assert await setup.run("balance", "--json", setup.url) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["url"], info["balance_msat"], info["spent_msat"]) == (
        setup.url,
        CREDIT - 3 * PRICE,
        3 * PRICE,
    )
    assert len(info["recent"]) == 3


async def test_balance_without_a_cached_token_or_a_credit_account(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await setup.run("balance", setup.url) == 2
    assert "no cached token for GET " in capsys.readouterr().err
    assert await setup.run("balance", "ftp://x/") == 2
    assert "not an http(s) URL" in capsys.readouterr().err
    await setup.buy()
    setup.served.gateway.accounts.clear()
    assert await setup.run("balance", setup.url) == 1
    assert "this token has no credit account (HTTP 404 Not Found)" in capsys.readouterr().err
    # A gateway without the endpoint: a plain 404.
    async with TestServer(web.Application()) as server:
        bare = str(server.make_url("")).rstrip("/")
        (token,) = await TokenCache(setup.cache).tokens()
        moved = new_token(
            bare + "/api/credit/data", "L402", token.macaroon_b64, token.preimage, 1, time.time()
        )
        await TokenCache(setup.cache).store(moved, time.time())
        assert await setup.run("balance", bare + "/api/credit/data") == 1
    assert f"the gateway at {bare} offers no token info (HTTP 404 Not Found)" in (
        capsys.readouterr().err
    )


async def test_withdraws_the_balance_minus_the_fee_reserve(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    await setup.buy(requests=2)
    balance = CREDIT - 2 * PRICE
    assert await setup.run("withdraw", setup.url, node=True) == 0
    ((amount, memo, expiry),) = FakeNode.made
    # 8000 msat: a reserve of max(1000, 0.5%) leaves 7000.
    assert amount == balance - 1_000 == credit.withdrawable(balance, 1_000, 5_000)
    assert memo == f"withdrawal of L402 credit from {setup.served.url}"
    assert expiry == credit.INVOICE_EXPIRY
    assert len(setup.served.gateway.withdrawals) == 1
    out = capsys.readouterr().out
    assert "withdrawal SUCCEEDED: 7 sat (7000 msat) paid to your node" in out
    assert "balance left 0.9 sat (900 msat)" in out


async def test_withdraw_states_and_refusals(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    await setup.buy()
    gateway = setup.served.gateway
    gateway.withdrawal = "PENDING"
    assert await setup.run("withdraw", "--amount-msat", "1000", setup.url, node=True) == 4
    err = capsys.readouterr().err
    assert "withdrawal PENDING" in err
    assert f"l402-gateway credit balance {setup.url}" in err
    assert "lncli lookupinvoice " in err

    gateway.withdrawal = "FAILED"
    assert await setup.run("withdraw", "--json", "--amount-msat", "1000", setup.url, node=True) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["state"] == "FAILED"
    assert "withdrawal FAILED" in captured.err

    gateway.withdrawal = None
    assert await setup.run("withdraw", setup.url, node=True) == 1
    assert "withdrawals are not enabled (HTTP 404 Not Found)" in capsys.readouterr().err

    # Over the balance: refused before an invoice is made.
    made = len(FakeNode.made)
    assert await setup.run("withdraw", "--amount-msat", str(CREDIT), setup.url, node=True) == 1
    assert "is more than the balance" in capsys.readouterr().err
    assert len(FakeNode.made) == made

    # The gateway's own refusal, with its reason (its fee terms are not the defaults the
    # command assumes when the token info does not say).
    gateway.withdrawal = "SUCCEEDED"
    gateway.fee_min_msat = 5_000
    gateway.token_info_fees = False
    assert await setup.run("withdraw", "--amount-msat", "4000", setup.url, node=True) == 1
    assert "invoice amount plus fee reserve is above the balance (HTTP 400" in (
        capsys.readouterr().err
    )


async def test_withdraw_needs_the_node_and_a_valid_amount(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    await setup.buy()
    assert await setup.run("withdraw", setup.url) == 2
    assert "credit withdraw needs the paying LND node" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        await setup.run("withdraw", "--amount-msat", "-5", setup.url)
    assert "not a positive number of msat" in capsys.readouterr().err


async def test_without_fee_terms_the_gateway_defaults_are_used(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    await setup.buy()
    setup.served.gateway.token_info_fees = False
    assert await setup.run("withdraw", setup.url, node=True) == 0
    ((amount, _, _),) = FakeNode.made
    assert amount == credit.withdrawable(CREDIT - PRICE, 1_000, 5_000)


def test_fee_reserve_and_withdrawable() -> None:
    assert fee_reserve(100_000, 1_000, 5_000) == 1_000
    assert fee_reserve(1_000_000, 1_000, 5_000) == 5_000
    assert fee_reserve(1_000_001, 1_000, 5_000) == 5_001  # rounded up
    assert credit.withdrawable(999, 1_000, 5_000) == 0
    assert credit.withdrawable(1_000, 1_000, 5_000) == 0
    assert credit.withdrawable(1_001, 1_000, 5_000) == 1
    for balance in (201_000, 1_005_000, 10**12 + 7):
        amount = credit.withdrawable(balance, 1_000, 5_000)
        assert amount + fee_reserve(amount, 1_000, 5_000) <= balance
        assert amount + 1 + fee_reserve(amount + 1, 1_000, 5_000) > balance


# -- pay shows the balance -----------------------------------------------------------------


async def test_pay_prints_the_balance_and_its_json_has_it(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    await setup.buy()
    argv = ["pay", "--no-pay", "--token-cache", str(setup.cache)]
    assert await asyncio.to_thread(main, [*argv, "--json", setup.url]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["status"], summary["balance_msat"]) == (200, CREDIT - 2 * PRICE)
    assert await asyncio.to_thread(main, [*argv, "--json", setup.served.url + "/health"]) == 0
    assert json.loads(capsys.readouterr().out)["balance_msat"] is None
    assert await asyncio.to_thread(main, [*argv, "-o", str(setup.tmp / "b"), setup.url]) == 0
    assert "balance: 7 sat (7000 msat) of credit left" in capsys.readouterr().err


async def test_pay_no_pay_shows_a_top_up_offer(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    await setup.buy(requests=CREDIT // PRICE)  # all spent
    argv = ["pay", "--no-pay", "--token-cache", str(setup.cache), setup.url]
    assert await asyncio.to_thread(main, argv) == 6
    out = capsys.readouterr().out
    assert "payment required: 10 sat (10000 msat)" in out
    assert "credit:   buys 10 sat of credit, 1 sat per request" in out
    assert "balance:  0 sat left (a top-up)" in out
    assert await asyncio.to_thread(main, [*argv, "--json"]) == 6
    summary = json.loads(capsys.readouterr().out)
    assert summary["balance_msat"] == 0
    assert (summary["offer"]["credit_msat"], summary["offer"]["price_msat"]) == (CREDIT, PRICE)
    assert len(await TokenCache(setup.cache).tokens()) == 1  # the spent token is kept


async def test_pay_over_max_cost_says_it_is_credit(
    setup: Setup, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pay, "LndClient", FakeNode)  # never asked: nothing is paid
    await setup.buy(requests=CREDIT // PRICE)  # all spent: the next request gets a top-up
    argv = ["pay", "--json", "--max-cost", "9", "--network", "regtest", setup.url]
    argv += ["--token-cache", str(setup.cache), "--lnd-tls-cert", str(setup.tmp / "tls.cert")]
    argv += ["--lnd-macaroon", str(setup.tmp / "admin.macaroon")]
    assert await asyncio.to_thread(main, argv) == 4
    captured = capsys.readouterr()
    assert (
        "credit of 10 sat (bought in one payment, 1 sat per request) is over the limit of 9 sat "
        "per payment; ask for less credit with the request header L402-Credit-Msat"
    ) in captured.err
    summary = json.loads(captured.out)
    assert (summary["balance_msat"], summary["offer"]["credit_msat"]) == (0, CREDIT)


def test_offer_of_a_plain_route_has_no_credit_facts() -> None:
    from gateway.cli.pay import _offer_json
    from gateway.client import read_offer

    challenge = make_challenge()
    offer = read_offer(challenge.www_authenticate, challenge.body, network=None, now=time.time())
    facts = _offer_json(offer)
    assert (facts["credit_msat"], facts["price_msat"], facts["balance_msat"]) == (None,) * 3
