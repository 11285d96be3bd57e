"""A POST whose body may name another method, decided before its body is read
(``L402Service.allowed_whatever_body``): only with a valid token for the one priced rule
every method the body could name leaves."""

from __future__ import annotations

import dataclasses

import pytest

from gateway.ports import Msat
from gateway.pricing import CreditTerms, Pricing, Rule, Unmatched
from gateway.service import L402Service, PaymentChallenge, RequestInfo
from tests.fakes import FakeGateway

READ = Rule("/paid/*", methods=frozenset({"GET"}), price_msat=Msat(5_000), service="read")
RULES = (
    READ,
    Rule("/paid/*", methods=frozenset({"POST"}), price_msat=None, service="read"),
    Rule("/two/*", methods=frozenset({"GET"}), price_msat=Msat(5_000), service="read"),
    Rule("/two/*", methods=frozenset({"DELETE"}), price_msat=Msat(9_000), service="delete"),
    Rule(
        "/credit/*",
        methods=frozenset({"GET"}),
        price_msat=Msat(1_000),
        service="read",
        credit=CreditTerms(Msat(5_000), Msat(1_000), Msat(50_000)),
    ),
)


async def _token(gateway: FakeGateway, service: L402Service, path: str) -> str:
    challenge = await service.authorize(RequestInfo(method="GET", path=path, client="192.0.2.1"))
    assert isinstance(challenge, PaymentChallenge)
    return gateway.pay(dataclasses.asdict(challenge))


def _post(path: str, authorization: str = "", *, cookie: str = "") -> RequestInfo:
    return RequestInfo(
        method="POST",
        path=path,
        client="192.0.2.1",
        authorization=(authorization,) if authorization else (),
        cookies=(cookie,) if cookie else (),
    )


async def test_a_valid_token_for_the_one_priced_reading_answers_for_any_body() -> None:
    gateway = FakeGateway(RULES)
    async with gateway() as service:
        paid = await _token(gateway, service, "/paid/x")
        assert service.pricing.body_may_reprice("POST", "/paid/x")
        allowed = await service.allowed_whatever_body(_post("/paid/x", paid))
        assert allowed is not None
        assert allowed.token is not None
        assert allowed.token.service == "read"
        # As the paywall's cookie, too.
        cookie = paid.removeprefix("L402 ")
        assert await service.allowed_whatever_body(_post("/paid/x", cookie=cookie)) is not None


@pytest.mark.parametrize(
    "case", ["no credential", "wrong preimage", "malformed", "two priced rules", "credit"]
)
async def test_otherwise_the_body_is_to_be_read(case: str) -> None:
    gateway = FakeGateway(RULES)
    async with gateway() as service:
        paid = await _token(gateway, service, "/paid/x")
        request = {
            "no credential": _post("/paid/x"),
            "wrong preimage": _post("/paid/x", paid[:-2] + ("00" if paid[-2:] != "00" else "11")),
            "malformed": _post("/paid/x", "L402 not-a-macaroon"),
            # GET and DELETE priced apart: the body decides which, if any, applies.
            "two priced rules": _post("/two/x", await _token(gateway, service, "/two/x")),
            # Charged per reading: a free POST must not be charged.
            "credit": _post("/credit/x", paid),
        }[case]
        assert await service.allowed_whatever_body(request) is None


async def test_a_path_refused_without_the_body_is_not_opened_by_a_token() -> None:
    gateway = FakeGateway(RULES)
    gateway.pricing = Pricing((READ,), unmatched=Unmatched.DENY)  # no rule takes POST
    async with gateway() as service:
        paid = await _token(gateway, service, "/paid/x")
        assert service.pricing.body_may_reprice("POST", "/paid/x")
        assert await service.allowed_whatever_body(_post("/paid/x", paid)) is None
