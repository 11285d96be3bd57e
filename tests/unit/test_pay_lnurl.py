"""``l402-gateway pay`` paying by LNURL-pay (``gateway.cli.pay.pay_lnurl``): a Lightning
Address served by a small LNURL-pay service in the test process, paid by a fake payer. Every
refusal before paying (budget, comment, amount, the service's invoice, the network) pays
nothing and exits with its code; a success action is shown (message, URL, aes decrypted with
the preimage). A call to the node that ends without the payment's outcome is settled by
asking the node: paid (exit 0), failed (3), or in flight / not known (7, never paid twice)."""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import json
import secrets
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from gateway import errors
from gateway.cli import formats, main, pay
from gateway.client import PaymentInFlight
from gateway.client.lnurl import LnurlPayClient
from gateway.ports import Msat, Payer, Payment, PaymentHash, PaymentStatus
from tests import bolt11_encode
from tests.unit.client.client_helpers import FakePayer

PAYEE_KEY = "44" * 32
METADATA = json.dumps([["text/plain", "Buy carol a coffee"], ["text/identifier", "carol@x"]])


@dataclass
class Service:
    """An LNURL-pay service whose invoices ``payer`` can pay (it learns their preimages);
    the test changes what it answers."""

    payer: FakePayer
    port: int = 0
    min_sendable: int = 1_000
    max_sendable: int = 1_000_000
    comment_allowed: int = 20
    currency: str = "bcrt"
    amount_skew: int = 0
    invoice_metadata: str = METADATA
    success: dict[str, Any] | None = None
    # an aes success action's text, encrypted with each invoice's preimage when set
    secret: str | None = None
    error: str | None = None
    callbacks: list[dict[str, str]] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"carol@127.0.0.1:{self.port}"

    async def pay_request(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "tag": "payRequest",
                "callback": f"http://127.0.0.1:{self.port}/cb",
                "minSendable": self.min_sendable,
                "maxSendable": self.max_sendable,
                "metadata": METADATA,
                "commentAllowed": self.comment_allowed,
            }
        )

    async def callback(self, request: web.Request) -> web.Response:
        self.callbacks.append(dict(request.query))
        if self.error is not None:
            return web.json_response({"status": "ERROR", "reason": self.error})
        preimage = secrets.token_bytes(32)
        payment_hash = hashlib.sha256(preimage).digest()
        self.payer.known[payment_hash] = preimage
        pr = bolt11_encode.encode(
            currency=self.currency,
            amount=bolt11_encode.amount_text(int(request.query["amount"]) + self.amount_skew),
            timestamp=int(time.time()),
            payment_hash=payment_hash,
            key=PAYEE_KEY,
            expiry=600,
            extra=bolt11_encode.field(
                "h", bolt11_encode.words_of(hashlib.sha256(self.invoice_metadata.encode()).digest())
            ),
        )
        answer: dict[str, Any] = {"pr": pr, "routes": []}
        if self.secret is not None:
            answer["successAction"] = aes_action(preimage, self.secret)
        elif self.success is not None:
            answer["successAction"] = self.success
        return web.json_response(answer)


def aes_action(key: bytes, plaintext: str) -> dict[str, str]:
    """LUD-10: ``plaintext`` encrypted by AES-256-CBC with ``key`` (the preimage)."""
    iv = secrets.token_bytes(16)
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plaintext.encode()) + padder.finalize()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return {
        "tag": "aes",
        "description": "Your voucher",
        "ciphertext": base64.b64encode(encryptor.update(padded) + encryptor.finalize()).decode(),
        "iv": base64.b64encode(iv).decode(),
    }


@pytest.fixture
async def service() -> AsyncIterator[Service]:
    service = Service(FakePayer(fee_msat=7))
    app = web.Application()
    app.router.add_get("/.well-known/lnurlp/carol", service.pay_request)
    app.router.add_get("/cb", service.callback)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    service.port = server.port or 0
    try:
        yield service
    finally:
        await server.close()


@pytest.fixture(autouse=True)
def quick_lookups(monkeypatch: pytest.MonkeyPatch) -> None:
    """The node is asked again at once (not after seconds) about an unknown outcome."""
    monkeypatch.setattr(pay, "_LOOKUP_DELAYS", (0.0, 0.0, 0.0))


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    pay.add_parser(parser.add_subparsers())
    return parser.parse_args(["pay", *argv])


async def run(
    service: Service, *argv: str, network: str | None = "regtest", payer: Payer | None = None
) -> int:
    async with LnurlPayClient(timeout=5) as lnurl:
        return await pay.pay_lnurl(parse(*argv), lnurl, payer or service.payer, network)


def paid(service: Service) -> int:
    return len(service.payer.calls)


async def test_pays_a_lightning_address_with_a_comment_and_shows_the_message(
    service: Service, capsys: pytest.CaptureFixture[str]
) -> None:
    service.success = {"tag": "message", "message": "Thank you!"}
    code = await run(service, "--amount", "21", "--comment", "great post ☕", service.address)
    out, err = capsys.readouterr()
    assert code == 0
    assert service.callbacks == [{"amount": "21000", "comment": "great post ☕"}]
    ((_, fee_limit, _),) = service.payer.calls
    assert fee_limit == 5_000  # 1% of 21 sat, at least 5 sat: within --max-cost 1000 sat
    (payment,) = service.payer.payments.values()
    assert out.splitlines() == [
        f"paid 21 sat + 0.007 sat fee to {service.address}",
        f"payment hash: {payment.payment_hash.hex()}",
        "Thank you!",
    ]
    assert err == f"payment hash: {payment.payment_hash.hex()}\n"  # before paying


async def test_json_summary(service: Service, capsys: pytest.CaptureFixture[str]) -> None:
    service.success = {"tag": "url", "description": "Receipt", "url": "http://127.0.0.1/r/1"}
    code = await run(service, "--json", "--amount", "1500msat", f"lightning:{service.address}")
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    (payment,) = service.payer.payments.values()
    assert summary == {
        "target": f"lightning:{service.address}",
        "description": "Buy carol a coffee",
        "amount_msat": 1_500,
        "fee_msat": 7,
        "payment_hash": payment.payment_hash.hex(),
        "comment": "",
        "success_action": {"tag": "url", "description": "Receipt", "url": "http://127.0.0.1/r/1"},
    }


async def test_an_aes_success_action_is_decrypted_with_the_preimage(
    service: Service, capsys: pytest.CaptureFixture[str]
) -> None:
    service.secret = "code 4242"
    assert await run(service, "--amount", "2", service.address) == 0
    assert capsys.readouterr().out.splitlines()[2:] == ["Your voucher", "code 4242"]
    assert await run(service, "--json", "--amount", "2", service.address) == 0
    assert json.loads(capsys.readouterr().out)["success_action"] == {
        "tag": "aes",
        "description": "Your voucher",
        "plaintext": "code 4242",
    }


async def test_an_aes_success_action_that_does_not_decrypt_is_said_after_paying(
    service: Service, capsys: pytest.CaptureFixture[str]
) -> None:
    service.success = aes_action(secrets.token_bytes(32), "not for this preimage")
    assert await run(service, "--json", "--amount", "2", service.address) == 0
    captured = capsys.readouterr()
    assert paid(service) == 1  # paid: the exit code says so, the warning why nothing shows
    assert "paid, but the aes success action does not decrypt" in captured.err
    action = json.loads(captured.out)["success_action"]
    assert action["tag"] == "aes"
    assert "does not decrypt with the preimage" in action["error"]


async def test_the_amount_is_needed_unless_the_service_fixes_it(
    service: Service, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await run(service, service.address) == pay.EXIT_USAGE
    assert "--amount is needed: the service takes 1 sat to 1000 sat" in capsys.readouterr().err
    service.max_sendable = service.min_sendable = 3_000
    assert await run(service, service.address) == 0
    assert service.callbacks[-1]["amount"] == "3000"


async def test_over_max_cost_pays_nothing(
    service: Service, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await run(service, "--amount", "21", "--max-cost", "20", service.address)
    assert code == pay.EXIT_OVER_BUDGET
    assert "21 sat is over --max-cost 20 sat" in capsys.readouterr().err
    assert (service.callbacks, paid(service)) == ([], 0)


async def test_the_routing_fee_is_bounded_by_what_max_cost_leaves(service: Service) -> None:
    assert await run(service, "--amount", "99", "--max-cost", "100", service.address) == 0
    assert await run(service, "--amount", "50", "--max-fee", "2", service.address) == 0
    assert [fee for _, fee, _ in service.payer.calls] == [1_000, 2_000]


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["--amount", "0.5"], "500 msat is outside the service's range 1000 to 1000000 msat"),
        (["--amount", "1001"], "1001000 msat is outside the service's range"),
        (["--amount", "1", "--comment", "x" * 21], "the comment is 21 characters"),
    ],
)
async def test_what_the_service_does_not_take_is_refused_before_paying(
    service: Service, capsys: pytest.CaptureFixture[str], argv: list[str], reason: str
) -> None:
    assert await run(service, *argv, service.address) == pay.EXIT_USAGE
    err = capsys.readouterr().err
    assert reason in err
    assert "nothing was paid" in err
    assert (service.callbacks, paid(service)) == ([], 0)


async def test_a_comment_where_none_is_taken_is_refused(
    service: Service, capsys: pytest.CaptureFixture[str]
) -> None:
    service.comment_allowed = 0
    assert await run(service, "--amount", "1", "--comment", "hi", service.address) == 2
    assert "the service takes no comment" in capsys.readouterr().err
    assert paid(service) == 0


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"amount_skew": 1_000}, "the invoice is for 22000 msat, not the 21000 msat asked"),
        ({"invoice_metadata": "[]"}, "description hash is not that of the metadata"),
        ({"currency": "bc"}, "the invoice is for mainnet, this client pays on regtest"),
        ({"error": "carol is away"}, "refused: carol is away"),
        ({"success": {"tag": "message", "message": 7}}, "success action's message"),
    ],
)
async def test_an_unusable_answer_exits_5_without_paying(
    service: Service, capsys: pytest.CaptureFixture[str], change: dict[str, Any], reason: str
) -> None:
    for name, value in change.items():
        setattr(service, name, value)
    assert await run(service, "--amount", "21", service.address) == pay.EXIT_BAD_CHALLENGE
    err = capsys.readouterr().err
    assert reason in err
    assert "nothing was paid" in err
    assert paid(service) == 0


async def test_an_unreachable_service_or_a_failed_payment_exits_3(
    service: Service, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await run(service, "--amount", "1", "carol@127.0.0.1:1") == pay.EXIT_BACKEND
    assert "cannot fetch" in capsys.readouterr().err
    service.payer.fail = True
    assert await run(service, "--amount", "1", service.address) == pay.EXIT_BACKEND
    assert "FAILURE_REASON_NO_ROUTE" in capsys.readouterr().err


async def test_a_payment_without_its_preimage_exits_3(
    service: Service, capsys: pytest.CaptureFixture[str]
) -> None:
    service.payer.preimage_for = lambda _hash: secrets.token_bytes(32)
    assert await run(service, "--amount", "1", service.address) == pay.EXIT_BACKEND
    assert "reported SUCCEEDED without its preimage" in capsys.readouterr().err


async def test_no_pay_shows_the_terms(service: Service, capsys: pytest.CaptureFixture[str]) -> None:
    code = await run(service, "--no-pay", service.address, network=None)
    assert code == pay.EXIT_PAYMENT_REQUIRED
    assert capsys.readouterr().out.splitlines() == [
        f"LNURL-pay: {service.address}",
        "  for:      Buy carol a coffee",
        "  amount:   1 sat to 1000 sat",
        "  comment:  up to 20 characters",
        f"  callback: http://127.0.0.1:{service.port}",
    ]
    assert await run(service, "--no-pay", "--json", service.address) == 6
    assert json.loads(capsys.readouterr().out) == {
        "target": service.address,
        "paid": False,
        "description": "Buy carol a coffee",
        "min_msat": 1_000,
        "max_msat": 1_000_000,
        "comment_allowed": 20,
    }
    assert (service.callbacks, paid(service)) == ([], 0)


@pytest.mark.parametrize(
    ("argv", "lnurl"),
    [
        (["https://example.com/p"], False),  # a URL is fetched (L402) as before
        (["http://127.0.0.1:8080/x"], False),
        (["https://example.com/p", "--amount", "21"], True),  # an LNURL-pay URL
        (["https://example.com/p", "--comment", "hi"], True),
        (["carol@example.com"], True),
        (["lightning:carol@example.com"], True),
        (["LNURL1DP68GURN8GHJ7"], True),
    ],
)
def test_which_targets_are_paid_by_lnurl(argv: list[str], lnurl: bool) -> None:
    assert pay.is_lnurl(parse(*argv)) is lnurl


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-X", "POST", "carol@example.com"], "-X: for fetching a URL"),
        (["-H", "A: b", "-d", "x", "carol@example.com"], "-H, -d: for fetching a URL"),
        (["-o", "f", "carol@example.com"], "-o: for fetching a URL"),
        (["carol!@example.com"], "not a URL, Lightning Address or LNURL"),
        (["ftp://example.com/"], "the scheme 'ftp' is not https://"),
    ],
)
def test_usage_errors_of_lnurl_pay(argv: list[str], message: str) -> None:
    with pytest.raises(errors.ConfigError, match=message):
        pay._check_lnurl_usage(parse(*argv))


@pytest.mark.parametrize(
    ("text", "msat"),
    [("21", 21_000), ("0.5", 500), ("21sat", 21_000), ("0.001sat", 1), ("1500msat", 1_500)],
)
def test_amounts_in_sat_or_msat(text: str, msat: int) -> None:
    assert formats.sat_to_msat(text) == msat


@pytest.mark.parametrize("text", ["1.5msat", "0.0001", "sat", "-1sat", "21 btc"])
def test_amounts_that_are_not_whole_msat_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        formats.sat_to_msat(text)


# ---- a call to the node that ends without the payment's outcome ---------------------------


def progress(service: Service) -> pay.ProgressPayer:
    return pay.ProgressPayer(service.payer, sys.stderr)


async def test_a_payment_made_while_the_call_broke_is_shown_paid(
    service: Service, capsys: pytest.CaptureFixture[str]
) -> None:
    """The node paid, the call broke (FakePayer.crash): the node says SUCCEEDED, so the
    receipt and the success action are shown, exit 0; nothing is paid twice."""
    service.success = {"tag": "message", "message": "Thank you!"}
    service.payer.crash = True
    assert await run(service, "--amount", "21", service.address, payer=progress(service)) == 0
    out, err = capsys.readouterr()
    (payment,) = service.payer.payments.values()
    hash_hex = payment.payment_hash.hex()
    assert out.splitlines() == [
        f"paid 21 sat + 0.007 sat fee to {service.address}",
        f"payment hash: {hash_hex}",
        "Thank you!",
    ]
    lines = err.splitlines()
    assert lines[:2] == [f"payment hash: {hash_hex}", "paying 21 sat (routing fee up to 5 sat)..."]
    assert lines[2].startswith("payment outcome unknown after ")
    assert "payment failed" not in err
    assert lines[3:] == [
        f"l402-gateway: connection to the node lost; the node reports payment {hash_hex} SUCCEEDED"
    ]
    assert (paid(service), service.payer.lookups) == (1, [payment.payment_hash])


async def test_a_payment_still_in_flight_exits_7_with_its_hash(
    service: Service, capsys: pytest.CaptureFixture[str]
) -> None:
    service.payer.in_flight = True
    code = await run(service, "--json", "--amount", "21", service.address, payer=progress(service))
    assert code == pay.EXIT_IN_FLIGHT
    out, err = capsys.readouterr()
    (payment,) = service.payer.payments.values()
    assert payment.status is PaymentStatus.IN_FLIGHT
    hash_hex = payment.payment_hash.hex()
    assert out == ""
    assert err.splitlines()[0] == f"payment hash: {hash_hex}"
    assert err.splitlines()[-1] == (
        f"l402-gateway: payment {hash_hex} is still in flight (connection to the node lost): "
        f"do not pay again; check it with `lncli trackpayment {hash_hex}`"
    )
    assert "payment failed" not in err
    assert paid(service) == 1


async def test_a_node_that_cannot_be_asked_exits_7_after_asking_again(
    service: Service, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    service.payer.crash = True
    asked: list[PaymentHash] = []

    async def down(payment_hash: PaymentHash) -> Payment | None:
        asked.append(payment_hash)
        raise errors.BackendUnavailable("LND at x:10009 is unreachable")

    monkeypatch.setattr(service.payer, "lookup_payment", down)
    assert await run(service, "-s", "--amount", "21", service.address) == pay.EXIT_IN_FLIGHT
    (payment,) = service.payer.payments.values()
    hash_hex = payment.payment_hash.hex()
    assert capsys.readouterr().err == (
        f"l402-gateway: payment {hash_hex} may be in flight or done (connection to the node "
        "lost), and the node cannot tell (LND at x:10009 is unreachable): do not pay again; "
        f"check it with `lncli trackpayment {hash_hex}`\n"
    )
    assert asked == [payment.payment_hash] * (len(pay._LOOKUP_DELAYS) + 1)


@pytest.mark.parametrize(
    ("error", "lookups"),
    [
        # refused before the node recorded anything: its "no such payment" is final
        (errors.BackendBadRequest("invoice expired"), 1),
        (errors.BackendPermissionDenied("verification failed"), 1),
        # a broken call: the node may record the payment a moment late, so it is asked again
        (errors.BackendUnavailable("stream removed"), len(pay._LOOKUP_DELAYS) + 1),
        (TimeoutError(), len(pay._LOOKUP_DELAYS) + 1),
    ],
)
async def test_a_payment_the_node_never_started_failed(
    service: Service,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    error: Exception,
    lookups: int,
) -> None:
    async def refuse(
        payment_request: str, *, max_fee_msat: Msat, payment_timeout: float
    ) -> Payment:
        raise error

    monkeypatch.setattr(service.payer, "send_payment", refuse)
    assert await run(service, "-s", "--amount", "21", service.address) == pay.EXIT_BACKEND
    err = capsys.readouterr().err
    assert err.startswith("l402-gateway: payment ")
    assert f"failed: the node did not start it: {str(error) or 'TimeoutError'}\n" in err
    assert len(service.payer.lookups) == lookups


async def test_a_payment_recorded_late_or_failed_on_the_node(
    service: Service, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a broken call the node first knows no payment, then records it SUCCEEDED:
    paid. One it reports FAILED is a failure (exit 3)."""
    service.payer.crash = True
    answers: list[Payment | None] = [None, None]
    lookup = service.payer.lookup_payment

    async def late(payment_hash: PaymentHash) -> Payment | None:
        return answers.pop() if answers else await lookup(payment_hash)

    monkeypatch.setattr(service.payer, "lookup_payment", late)
    assert await run(service, "-s", "--amount", "21", service.address) == 0
    assert capsys.readouterr().out.startswith("paid 21 sat")

    def failed(payment_hash: bytes) -> None:
        payment = service.payer.payments[payment_hash]
        service.payer.payments[payment_hash] = dataclasses.replace(
            payment, status=PaymentStatus.FAILED, preimage=None
        )

    async def failing(payment_hash: PaymentHash) -> Payment | None:
        failed(payment_hash)
        return await lookup(payment_hash)

    monkeypatch.setattr(service.payer, "lookup_payment", failing)
    assert await run(service, "-s", "--amount", "21", service.address) == pay.EXIT_BACKEND
    assert "failed: the node reports it FAILED (connection to the node lost)" in (
        capsys.readouterr().err
    )


def test_an_earlier_l402_payment_still_in_flight_exits_7_too(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fetching a URL whose earlier payment is still in flight (``PaymentInFlight`` of
    ``gateway.client.core``) exits as an LNURL payment in flight does."""

    async def in_flight(*_args: object) -> int:
        raise PaymentInFlight("payment ab12 for https://example.com/x is still in flight")

    monkeypatch.setattr(pay, "_pay", in_flight)
    assert main(["pay", "--no-pay", "https://example.com/x"]) == pay.EXIT_IN_FLIGHT
    assert capsys.readouterr().err == (
        "l402-gateway: payment ab12 for https://example.com/x is still in flight\n"
    )


def test_help_describes_both_kinds_of_target(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("--help")
    text = capsys.readouterr().out
    description = text.split("\n\n")[1]
    assert description.startswith("Fetch an http(s) URL, paying its L402 challenge")
    assert "or pay a Lightning\nAddress or an LNURL by LNURL-pay" in description
    assert "  7  a payment may still be in flight: do not pay again." in text
    assert max(len(line) for line in text.split("exit codes:")[0].splitlines()) <= 80
