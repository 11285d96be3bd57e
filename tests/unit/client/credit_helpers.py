"""A fake credit gateway on a loopback server: what the paying side of prepaid credit needs
from one (the 402 that buys credit, the balance header, the top-up 402 for the same token id,
token info and withdrawal), small enough to steer each answer from a test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import secrets
import time
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway import l402
from gateway.client import L402Client, TokenCache, decode_invoice
from gateway.client.budget import Budget
from tests.fakes import make_invoice
from tests.unit.client.client_helpers import FakePayer

PRICE = 1_000  # msat per request on /api/credit/*
CREDIT = 10 * PRICE  # what a credit 402 buys unless the request asks otherwise
SERVICE = "credit"


@dataclasses.dataclass
class Account:
    credited: int = 0
    spent: int = 0
    withdrawn: int = 0
    recent: list[dict[str, object]] = dataclasses.field(default_factory=list)

    @property
    def balance(self) -> int:
        return self.credited - self.spent - self.withdrawn


class CreditGateway:
    """Answers ``/api/credit/*`` from prepaid credit, ``/health`` free, and the two
    ``/.well-known/l402/`` endpoints. ``withdrawal`` is the state a withdrawal ends in (None:
    withdrawals not enabled)."""

    def __init__(self) -> None:
        self.accounts: dict[bytes, Account] = {}
        self.preimages: dict[bytes, bytes] = {}  # payment hash -> preimage, while unpaid
        self.invoices: dict[bytes, tuple[bytes, int]] = {}  # payment hash -> (token id, amount)
        self.settled: set[bytes] = set()
        self.withdrawal: str | None = "SUCCEEDED"
        self.withdrawals: list[str] = []  # the invoices it was asked to pay
        self.fee_min_msat = 1_000
        self.fee_ppm = 5_000
        self.token_info_fees = True  # whether the token info tells the fee terms

    # -- the payer's side: paying settles ---------------------------------------------------

    def pay(self, payment_hash: bytes) -> bytes | None:
        """Settle an invoice (crediting its account once); its preimage."""
        preimage = self.preimages.get(payment_hash)
        if preimage is not None and payment_hash not in self.settled:
            self.settled.add(payment_hash)
            token_id, amount = self.invoices[payment_hash]
            self.accounts[token_id].credited += amount
        return preimage

    # -- answers ----------------------------------------------------------------------------

    def _challenge(self, token_id: bytes, amount: int, balance: int | None) -> web.Response:
        preimage = secrets.token_bytes(32)
        payment_hash = hashlib.sha256(preimage).digest()
        self.preimages[payment_hash] = preimage
        self.invoices[payment_hash] = (token_id, amount)
        self.accounts.setdefault(token_id, Account())
        caveats = [
            l402.services_caveat(SERVICE, 0),
            l402.valid_until_caveat(SERVICE, int(time.time()) + 3600),
        ]
        macaroon = l402.encode_b64(
            l402.mint_token(secrets.token_bytes(32), payment_hash, token_id, caveats)
        )
        invoice = make_invoice(payment_hash, amount, created_at=time.time())
        headers = {
            "WWW-Authenticate": l402.format_challenge(macaroon, invoice, "L402"),
            "L402-Credit-Msat": str(amount),
            "L402-Price-Msat": str(PRICE),
        }
        body: dict[str, object] = {
            "status": 402,
            "detail": "payment required",
            "invoice": invoice,
            "macaroon": macaroon,
            "amount_msat": amount,
            "credit_msat": amount,
            "price_msat": PRICE,
            "balance_msat": balance,
        }
        if balance is not None:
            headers["L402-Balance-Msat"] = str(balance)
            body["detail"] = "credit balance too low for this request"
        return web.json_response(body, status=402, headers=headers)

    def _account(self, request: web.Request) -> tuple[bytes, Account] | None:
        """The account of the request's valid, paid token, if any."""
        scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
        if scheme != "L402":
            return None
        macaroon_b64, _, preimage_hex = credential.partition(":")
        try:
            macaroon = l402.decode_b64(macaroon_b64)
            identifier = l402.Identifier.decode(macaroon.identifier)
            preimage = bytes.fromhex(preimage_hex)
        except (l402.L402Error, ValueError):
            return None
        if hashlib.sha256(preimage).digest() != identifier.payment_hash:
            return None
        self.pay(identifier.payment_hash)  # strict verification: a paid invoice settles
        account = self.accounts.get(identifier.token_id)
        return None if account is None else (identifier.token_id, account)

    async def credit_route(self, request: web.Request) -> web.Response:
        asked = request.headers.get("L402-Credit-Msat")
        amount = int(asked) if asked else CREDIT
        found = self._account(request)
        if found is None:
            return self._challenge(secrets.token_bytes(32), amount, None)
        token_id, account = found
        if account.balance < PRICE:
            return self._challenge(token_id, amount, account.balance)
        account.spent += PRICE
        account.recent.insert(
            0,
            {
                "at": time.time(),
                "method": request.method,
                "path": request.path,
                "amount_msat": PRICE,
            },
        )
        return web.json_response(
            {"served": request.path}, headers={"L402-Balance-Msat": str(account.balance)}
        )

    async def token_info(self, request: web.Request) -> web.Response:
        found = self._account(request)
        if found is None:
            return web.json_response({"detail": "this token has no credit account"}, status=404)
        token_id, account = found
        info: dict[str, object] = {
            "token_id": token_id.hex(),
            "service": SERVICE,
            "balance_msat": account.balance,
            "credited_msat": account.credited,
            "spent_msat": account.spent,
            "reserved_msat": 0,
            "withdrawn_msat": account.withdrawn,
            "valid_until": int(time.time()) + 3600,
            "recent": account.recent[:20],
        }
        if self.token_info_fees:
            info["withdrawal_fee_min_msat"] = self.fee_min_msat
            info["withdrawal_fee_ppm"] = self.fee_ppm
        return web.json_response(info)

    async def withdraw(self, request: web.Request) -> web.Response:
        if self.withdrawal is None:
            return web.json_response({"detail": "withdrawals are not enabled"}, status=404)
        found = self._account(request)
        if found is None:
            return web.json_response({"detail": "this token has no credit account"}, status=404)
        _, account = found
        invoice = json.loads(await request.read())["invoice"]
        self.withdrawals.append(invoice)
        decoded = decode_invoice(invoice)
        amount = decoded.amount_msat or 0
        reserve = max(self.fee_min_msat, amount * self.fee_ppm // 1_000_000)
        if amount + reserve > account.balance:
            return web.json_response(
                {"detail": "invoice amount plus fee reserve is above the balance"}, status=400
            )
        fee = 0
        if self.withdrawal == "SUCCEEDED":
            fee = 100
            account.withdrawn += amount + fee
        elif self.withdrawal == "PENDING":
            account.withdrawn += amount + reserve
        status = {"SUCCEEDED": 200, "PENDING": 202, "FAILED": 502}[self.withdrawal]
        outcome = {
            "state": self.withdrawal,
            "payment_hash": decoded.payment_hash.hex(),
            "amount_msat": amount,
            "fee_msat": fee,
            "balance_msat": account.balance,
        }
        return web.json_response(outcome, status=status)

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_route("*", "/api/credit/{tail:.*}", self.credit_route)
        app.router.add_get("/.well-known/l402/token", self.token_info)
        app.router.add_post("/.well-known/l402/withdraw", self.withdraw)
        return app


@dataclasses.dataclass
class Served:
    url: str
    gateway: CreditGateway
    payer: FakePayer

    def client(self, budget: Budget | None = None, cache: TokenCache | None = None) -> L402Client:
        return L402Client(
            self.payer,
            network="regtest",
            budget=budget or Budget(max_price_msat=50_000),
            cache=cache,
        )


@contextlib.asynccontextmanager
async def credit_gateway() -> AsyncIterator[Served]:
    gateway = CreditGateway()
    payer = FakePayer(fee_msat=10)
    payer.preimage_for = gateway.pay
    server = TestServer(gateway.app())
    await server.start_server()
    try:
        yield Served(str(server.make_url("")).rstrip("/"), gateway, payer)
    finally:
        await server.close()
