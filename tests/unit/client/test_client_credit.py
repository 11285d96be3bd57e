"""The paying client on credit routes: the balance each response reports, the budget bounding
the credit bought, the top-up paid automatically with its token replacing the old one."""

from __future__ import annotations

import hashlib
import json
import secrets
from pathlib import Path

import aiohttp
import httpx
import pytest

from gateway import l402
from gateway.client import (
    Budget,
    BudgetExceeded,
    CachedToken,
    InvoiceRejected,
    L402Client,
    TokenCache,
    balance_from_headers,
    read_offer,
)
from gateway.client.aiohttp import l402_session
from gateway.client.httpx import L402Auth
from gateway.client.tokens import new_token
from gateway.ports import Msat
from gateway.pricing import CreditTerms, Rule
from tests.fakes import NOW
from tests.unit.client.client_helpers import make_challenge, served_gateway
from tests.unit.client.credit_helpers import CREDIT, PRICE, Served, credit_gateway


async def _get(client: L402Client, url: str, **headers: str) -> tuple[int, str | None]:
    async with l402_session(client) as session, session.get(url, headers=headers) as response:
        await response.read()
        return response.status, response.headers.get("L402-Balance-Msat")


def _token_id(served: Served) -> bytes:
    (token_id,) = served.gateway.accounts
    return token_id


async def test_buys_credit_and_tracks_the_balance_each_response_reports() -> None:
    async with credit_gateway() as served:
        client = served.client()
        url = served.url + "/api/credit/data"
        assert client.last_balance is None
        for spent in range(1, 4):
            assert await _get(client, url) == (200, str(CREDIT - spent * PRICE))
        assert len(served.payer.calls) == 1
        (payment,) = client.spending_log
        assert payment.amount_msat == CREDIT  # the payment bought the credit
        balance = client.last_balance
        assert balance is not None
        assert (balance.balance_msat, balance.url) == (CREDIT - 3 * PRICE, url)
        assert balance.token_id == _token_id(served).hex()
        assert client.balances == {balance.token_id: balance}
        # A free route reports no balance: the last one stays.
        assert await _get(client, served.url + "/health") == (200, None)
        assert client.last_balance == balance


async def test_runs_out_tops_up_the_same_account_and_the_new_token_replaces_the_old(
    tmp_path: Path,
) -> None:
    async with credit_gateway() as served:
        cache = TokenCache(tmp_path / "tokens.json")
        client = served.client(cache=cache)
        url = served.url + "/api/credit/data"
        balances = [(await _get(client, url))[1] for _ in range(CREDIT // PRICE + 2)]
        expected = [str(CREDIT - n * PRICE) for n in range(1, CREDIT // PRICE + 1)]
        # The 11th request got the top-up 402, paid it and was served from the new credit.
        assert balances == [*expected, str(CREDIT - PRICE), str(CREDIT - 2 * PRICE)]
        assert len(served.payer.calls) == 2
        assert len(served.gateway.accounts) == 1  # the top-up went to the same account
        account = served.gateway.accounts[_token_id(served)]
        assert (account.credited, account.spent) == (2 * CREDIT, (CREDIT // PRICE + 2) * PRICE)
        (token,) = await TokenCache(tmp_path / "tokens.json").tokens()
        assert token.token_id == _token_id(served)
        assert token.payment_hash.hex() == client.spending_log[1].payment_hash
        assert token.worked == ("/api/credit/data",)
        assert client.last_balance is not None
        assert client.last_balance.balance_msat == CREDIT - 2 * PRICE


async def test_a_refused_top_up_keeps_the_token_for_later() -> None:
    async with credit_gateway() as served:
        cache = TokenCache()
        url = served.url + "/api/credit/data"
        # Buy a credit of one request, spend it, then meet a top-up over the budget.
        first = served.client(cache=cache)
        assert await _get(first, url, **{"L402-Credit-Msat": str(PRICE)}) == (200, "0")
        (token,) = await cache.tokens()
        small = served.client(budget=Budget(max_price_msat=CREDIT - 1), cache=cache)
        with pytest.raises(BudgetExceeded, match="credit of 10 sat"):
            await _get(small, url)
        assert small.last_balance is not None
        assert small.last_balance.balance_msat == 0  # the top-up 402 reported it
        assert await cache.tokens() == [token]  # good: only its balance ran out
        # Asking for less credit fits the budget: the same token's account is topped up.
        assert await _get(small, url, **{"L402-Credit-Msat": str(2 * PRICE)}) == (200, str(PRICE))
        (topped_up,) = await cache.tokens()
        assert topped_up.token_id == token.token_id
        assert topped_up.payment_hash != token.payment_hash


async def test_the_budget_message_says_credit_is_bought_and_how_much() -> None:
    async with credit_gateway() as served:
        client = served.client(budget=Budget(max_price_msat=9_999))
        with pytest.raises(BudgetExceeded) as caught:
            await _get(client, served.url + "/api/credit/data")
        assert str(caught.value) == (
            "credit of 10 sat (bought in one payment, 1 sat per request) is over the limit of "
            "9.999 sat per payment; ask for less credit with the request header "
            "L402-Credit-Msat; nothing was paid"
        )
        assert caught.value.limit == "max_price"
        assert caught.value.offer is not None
        assert caught.value.offer.credit_msat == CREDIT
        assert caught.value.offer.price_msat == PRICE
        assert caught.value.offer.balance_msat is None  # a first purchase, not a top-up

        total = served.client(budget=Budget(max_price_msat=CREDIT, max_total_msat=CREDIT))
        with pytest.raises(BudgetExceeded, match=r"^credit of 10 sat .* plus up to 5 sat routing"):
            await _get(total, served.url + "/api/credit/data")
        assert served.payer.calls == []


async def test_httpx_reports_the_balance_too() -> None:
    async with credit_gateway() as served:
        client = served.client()
        async with httpx.AsyncClient(auth=L402Auth(client)) as http:
            response = await http.get(served.url + "/api/credit/x")
        assert response.status_code == 200
        assert client.last_balance is not None
        assert client.last_balance.balance_msat == CREDIT - PRICE


def test_the_credit_facts_of_an_offer_from_headers_or_body() -> None:
    challenge = make_challenge(10_000)
    credit_body = json.loads(challenge.body) | {"credit_msat": 10_000, "price_msat": 100}
    from_body = read_offer(
        challenge.www_authenticate, json.dumps(credit_body).encode(), network="regtest", now=NOW
    )
    assert (from_body.credit_msat, from_body.price_msat, from_body.balance_msat) == (
        10_000,
        100,
        None,
    )
    headers = {"L402-Credit-Msat": "10000", "L402-Price-Msat": "100", "L402-Balance-Msat": "0"}
    from_headers = read_offer(
        challenge.www_authenticate, None, network="regtest", now=NOW, headers=headers
    )
    assert (from_headers.credit_msat, from_headers.price_msat, from_headers.balance_msat) == (
        10_000,
        100,
        0,
    )
    plain = read_offer(challenge.www_authenticate, challenge.body, network="regtest", now=NOW)
    assert (plain.credit_msat, plain.price_msat, plain.balance_msat) == (None, None, None)
    with pytest.raises(InvoiceRejected, match="says it buys 20000 msat of credit"):
        read_offer(
            challenge.www_authenticate,
            None,
            network="regtest",
            now=NOW,
            headers={"L402-Credit-Msat": "20000"},
        )


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0", 0), (" 42 ", 42), ("-1", None), ("1.5", None), ("x", None), ("", None), ("٣", None)],
)
def test_balance_header_values(value: str, expected: int | None) -> None:
    assert balance_from_headers({"L402-Balance-Msat": value}) == expected
    assert balance_from_headers({}) is None
    assert balance_from_headers({"L402-Balance-Msat": "9" * 20}) is None


def account_token(token_id: bytes, url: str, created_at: float = NOW) -> CachedToken:
    """A token bought at ``url`` for the credit account ``token_id``."""
    preimage = secrets.token_bytes(32)
    caveats = [
        l402.services_caveat("credit", 0),
        l402.valid_until_caveat("credit", int(NOW) + 3600),
    ]
    payment_hash = hashlib.sha256(preimage).digest()
    macaroon = l402.mint_token(secrets.token_bytes(32), payment_hash, token_id, caveats)
    return new_token(url, "L402", l402.encode_b64(macaroon), preimage, CREDIT, created_at)


async def test_storing_a_top_up_replaces_the_token_of_the_same_account_only() -> None:
    cache = TokenCache()
    account = b"\1" * 32
    old = account_token(account, "http://api.test/api/a/one")
    await cache.store(old, NOW)
    await cache.worked(old.payment_hash, "http://api.test/api/a/one")
    other_origin = account_token(account, "http://other.test/api/a/one")
    other_account = account_token(b"\2" * 32, "http://api.test/api/a/two")
    await cache.store(other_origin, NOW)
    await cache.store(other_account, NOW)
    top_up = account_token(account, "http://api.test/api/a/sub/three", NOW + 1)
    await cache.store(top_up, NOW + 1)
    tokens = {t.payment_hash: t for t in await cache.tokens()}
    assert set(tokens) == {
        top_up.payment_hash,
        other_origin.payment_hash,
        other_account.payment_hash,
    }
    kept = tokens[top_up.payment_hash]
    # Where the old one was offered (its broader scope, its worked path), the top-up is.
    assert (kept.scope, kept.worked) == ("/api/a/", ("/api/a/one",))
    assert await cache.find("http://api.test/api/a/one", "GET", NOW + 2) == kept
    assert await cache.find("http://api.test/api/a/else", "GET", NOW + 2) == kept


# -- against the gateway's own middleware (the real credit service, fake LND) --------------


async def test_against_the_gateway_buys_spends_tops_up_and_reads_token_info() -> None:
    price, credit = Msat(1_000), Msat(3_000)
    rule = Rule(
        "/api/premium/*",
        price_msat=price,
        service="premium",
        credit=CreditTerms(amount_msat=credit, min_msat=price, max_msat=Msat(100_000)),
    )
    async with served_gateway([rule]) as served:
        client = served.client()
        url = served.url + "/api/premium/fortune"
        balances = [(await _get(client, url))[1] for _ in range(5)]
        assert balances == ["2000", "1000", "0", "2000", "1000"]
        assert [entry.amount_msat for entry in client.spending_log] == [credit, credit]
        (token,) = await client.cache.tokens()
        assert client.last_balance is not None
        assert client.last_balance.token_id == token.token_id.hex()
        async with (
            aiohttp.ClientSession() as http,
            http.get(
                served.url + "/.well-known/l402/token",
                headers={"Authorization": token.authorization},
            ) as response,
        ):
            info = await response.json()
        assert (info["balance_msat"], info["credited_msat"], info["spent_msat"]) == (
            1_000,
            2 * credit,
            5 * price,
        )
        small = served.client(budget=Budget(max_price_msat=credit - 1))
        with pytest.raises(
            BudgetExceeded, match=r"^credit of 3 sat \(bought in one payment, 1 sat"
        ):
            await _get(small, url)
