"""Test doubles for the paying client: L402 challenges minted like the gateway's (with real
BOLT11 invoices signed by the fake node's key), a fake payer, and a fake gateway served with
a payer for its invoices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from aiohttp.test_utils import TestServer

from gateway import errors, l402
from gateway.client import Budget, L402Client, TokenCache, decode_invoice
from gateway.examples import demo_api
from gateway.ports import Msat, Payment, PaymentHash, PaymentStatus, Preimage
from gateway.pricing import Rule
from gateway.web.aiohttp import setup_l402
from tests.fakes import NODE_PUBKEY, NOW, FakeClock, FakeGateway, make_invoice

# A real invoice made by LND v0.21.0-beta on the regtest network (alice's node, 10 sat, expiry
# 600 s), captured once; its facts as LND's DecodePayReq reported them.
LND_INVOICE = (
    "lnbcrt100n1p4svwgqpp5g9dzjm2s0v4gw4j2dwktwffvxsj9cu835hnu9a7wxnuec9ypz05sdp4wpex2mtfw4kn5gz8"
    "g42zqtmpwp5j7urjv4kkjatd9anx7un5w4hx2cqzzsxqzjcsp58l98wzg7scfjw0pz2fqx0kr3ms80m04k2l7d8dqmm9"
    "gk5ljlpczs9qxpqysgq67gf9k57m7w8uygf0chjttgqny2364g940lt4n763tuge7felu6nmtagjx4a2mh06p2m8s9qn"
    "cm2rzaj9qhk9x0ldan0yr9c0qnu3fcpwch53x"
)
LND_INVOICE_HASH = "415a296d507b2a87564a6bacb7252c34245c70f1a5e7c2f7ce34f99c148113e9"
LND_INVOICE_PAYEE = "02d76ad22d2d8a472cb9a35eb0d4b9c7dcba8d7cb6ad38a6415b335f20ad919296"
LND_INVOICE_TIMESTAMP = 1795569920


def make_macaroon(
    payment_hash: bytes,
    *,
    service: str = "premium",
    valid_until: int | None = int(NOW) + 3600,
    extra: tuple[str, ...] = (),
) -> str:
    caveats = [l402.services_caveat(service, 0)]
    if valid_until is not None:
        caveats.append(l402.valid_until_caveat(service, valid_until))
    caveats += extra
    macaroon = l402.mint_token(
        secrets.token_bytes(32), payment_hash, secrets.token_bytes(32), caveats
    )
    return l402.encode_b64(macaroon)


@dataclasses.dataclass
class Challenge:
    """A 402 as the gateway sends it, with the secret the merchant keeps."""

    preimage: bytes
    payment_hash: bytes
    macaroon_b64: str
    invoice: str
    amount_msat: int

    @property
    def www_authenticate(self) -> list[str]:
        return [
            l402.format_challenge(self.macaroon_b64, self.invoice, "L402"),
            l402.format_challenge(self.macaroon_b64, self.invoice, "LSAT"),
        ]

    @property
    def body(self) -> bytes:
        return json.dumps(
            {
                "type": "about:blank",
                "status": 402,
                "detail": "payment required",
                "invoice": self.invoice,
                "macaroon": self.macaroon_b64,
                "payment_hash": self.payment_hash.hex(),
                "amount_msat": self.amount_msat,
            }
        ).encode()


def make_challenge(
    amount_msat: int = 10_000,
    *,
    invoice_amount: int | None = -1,
    network: str = "regtest",
    created_at: float = NOW,
    expiry: int = 600,
    service: str = "premium",
    valid_until: int | None = int(NOW) + 3600,
    extra_caveats: tuple[str, ...] = (),
    invoice_hash: bytes | None = None,
) -> Challenge:
    preimage = secrets.token_bytes(32)
    payment_hash = hashlib.sha256(preimage).digest()
    invoice = make_invoice(
        invoice_hash or payment_hash,
        amount_msat if invoice_amount == -1 else invoice_amount,
        network=network,
        created_at=created_at,
        expiry=expiry,
    )
    macaroon = make_macaroon(
        payment_hash, service=service, valid_until=valid_until, extra=extra_caveats
    )
    return Challenge(preimage, payment_hash, macaroon, invoice, amount_msat)


class FakePayer:
    """A Payer that knows the preimages of the invoices it may pay.

    ``preimage_for(hash)`` returns the preimage (by default from ``known``); ``fail`` makes
    payments end FAILED; ``crash`` makes the node pay but the call raise (as if the process
    died or the connection broke after the payment went out); ``in_flight`` keeps payments
    IN_FLIGHT as seen by ``lookup_payment``.
    """

    def __init__(self, fee_msat: int = 1_000) -> None:
        self.fee_msat = fee_msat
        self.known: dict[bytes, bytes] = {}
        self.preimage_for: Callable[[bytes], bytes | None] = self.known.get
        self.calls: list[tuple[str, int, float]] = []
        self.lookups: list[bytes] = []
        self.payments: dict[bytes, Payment] = {}
        self.fail = False
        self.crash = False
        self.in_flight = False
        self.before_send: Callable[[], Awaitable[object]] | None = None

    def learn(self, challenge: Challenge) -> Challenge:
        self.known[challenge.payment_hash] = challenge.preimage
        return challenge

    async def send_payment(
        self, payment_request: str, *, max_fee_msat: Msat, payment_timeout: float
    ) -> Payment:
        self.calls.append((payment_request, max_fee_msat, payment_timeout))
        if self.before_send is not None:
            await self.before_send()
        decoded = decode_invoice(payment_request)
        payment_hash = PaymentHash(decoded.payment_hash)
        amount = Msat(decoded.amount_msat or 0)
        if self.fail:
            self.payments[payment_hash] = Payment(
                payment_hash, PaymentStatus.FAILED, amount, Msat(0), ()
            )
            raise errors.PaymentFailed("FAILURE_REASON_NO_ROUTE", payment_hash)
        preimage = self.preimage_for(payment_hash)
        assert preimage is not None, "the fake payer does not know this invoice's preimage"
        status = PaymentStatus.IN_FLIGHT if self.in_flight else PaymentStatus.SUCCEEDED
        payment = Payment(
            payment_hash,
            status,
            amount,
            Msat(self.fee_msat),
            (NODE_PUBKEY,),
            preimage=Preimage(preimage) if status is PaymentStatus.SUCCEEDED else None,
        )
        self.payments[payment_hash] = payment
        if self.crash or self.in_flight:
            raise errors.BackendUnavailable("connection to the node lost")
        return payment

    async def lookup_payment(self, payment_hash: PaymentHash) -> Payment | None:
        self.lookups.append(payment_hash)
        return self.payments.get(payment_hash)

    def finish_in_flight(self) -> None:
        """Let every in-flight payment succeed."""
        for payment_hash, payment in list(self.payments.items()):
            if payment.status is PaymentStatus.IN_FLIGHT:
                preimage = self.preimage_for(payment_hash)
                assert preimage is not None
                self.payments[payment_hash] = dataclasses.replace(
                    payment, status=PaymentStatus.SUCCEEDED, preimage=Preimage(preimage)
                )


def payer_for(gateway: FakeGateway) -> FakePayer:
    """A payer that pays ``gateway``'s invoices: each payment settles one on its node."""
    payer = FakePayer()

    def settle(payment_hash: bytes) -> bytes | None:
        if payment_hash not in gateway.backend.preimages:
            return None
        return gateway.backend.pay(payment_hash)

    payer.preimage_for = settle
    return payer


def fake_clock() -> FakeClock:
    return FakeClock(NOW)


@dataclasses.dataclass
class ServedGateway:
    """The demo API behind the gateway middleware on a loopback server, and a payer for it."""

    url: str
    gateway: FakeGateway
    payer: FakePayer

    def client(self, budget: Budget | None = None, cache: TokenCache | None = None) -> L402Client:
        return L402Client(
            self.payer,
            network="regtest",
            budget=budget or Budget(max_price_msat=50_000),
            cache=cache,
            clock=self.gateway.clock,
        )


@contextlib.asynccontextmanager
async def served_gateway(rules: Sequence[Rule]) -> AsyncIterator[ServedGateway]:
    gateway = FakeGateway(rules)
    app = demo_api()
    setup_l402(app, gateway)
    server = TestServer(app)
    await server.start_server()
    try:
        yield ServedGateway(str(server.make_url("")).rstrip("/"), gateway, payer_for(gateway))
    finally:
        await server.close()
