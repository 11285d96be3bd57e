"""``l402-gateway pay`` paying a Lightning Address by LNURL-pay on real regtest LND: bob pays
carol's address (tests/regtest/lnurl_server.py on carol's node, here with comments and a
success action) as a subprocess, through his node.

- a comment reaches carol's service, the invoice bob paid is settled on carol's node for the
  amount asked and commits to the service's metadata (description hash), and the LUD-10 aes
  success action is decrypted with the preimage bob's node got;
- what the service does not take (a comment too long, an amount below its minimum) and an
  amount over ``--max-cost`` are refused before any invoice is asked for: nothing is paid;
- a payment still in flight when the call to bob's node runs out of time (carol holds the
  HTLC: a hold invoice) exits 7 with its payment hash, said before paying, and is not
  called failed; it completes once carol settles, paid once;
- bob pays the gateway's own tip jar (``l402-gateway serve`` with ``[lnurl]``,
  tests/regtest/tips_helpers.py) with a comment: its success message is printed, and the
  gateway records the tip settled with the comment.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp import web
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from gateway.client import bolt11
from gateway.lnd.client import LndClient
from gateway.lnd.protos import lightning_pb2
from gateway.ports import InvoiceState, PaymentHash, PaymentStatus
from regtest.network import Network
from tests.regtest.gateway_helpers import Ran, bob_runs
from tests.regtest.lnurl_server import LnurlPayServer
from tests.regtest.tips_helpers import JAR, THANKS, tips_gateway

pytestmark = pytest.mark.regtest
COMMENT_ALLOWED = 40


async def bob_pays(network: Network, *args: str) -> Ran:
    """``l402-gateway pay ARGS`` with bob's node (via the environment)."""
    return await bob_runs(network, "pay", *args)


class TipServer(LnurlPayServer):
    """carol's LNURL-pay service taking comments (LUD-12) of up to ``COMMENT_ALLOWED``
    characters and answering a success action: a LUD-10 aes one whose text, encrypted with
    the invoice's preimage (asked from carol's node), repeats the amount and the comment."""

    def __init__(self, network: Network) -> None:
        super().__init__(network.carol.settings(), username="carol", max_sendable=100_000)
        self.comments: list[str] = []

    async def _pay_request(self, request: web.Request) -> web.Response:
        answer = json.loads((await super()._pay_request(request)).text or "")
        return web.json_response({**answer, "commentAllowed": COMMENT_ALLOWED})

    async def _callback(self, request: web.Request) -> web.Response:
        comment = request.query.get("comment", "")
        if len(comment) > COMMENT_ALLOWED:
            return web.json_response({"status": "ERROR", "reason": "comment too long"}, status=400)
        answer = json.loads((await super()._callback(request)).text or "")
        self.comments.append(comment)
        issued = self.issued[-1]
        invoice = await self._lightning.LookupInvoice(
            lightning_pb2.PaymentHash(r_hash=issued.payment_hash),
            metadata=self._connection.metadata,
            timeout=30,
        )
        secret = f"{issued.amount_msat} msat: {comment}".encode()
        iv = secrets.token_bytes(16)
        padder = padding.PKCS7(128).padder()
        encryptor = Cipher(algorithms.AES(invoice.r_preimage), modes.CBC(iv)).encryptor()
        ciphertext = encryptor.update(padder.update(secret) + padder.finalize())
        answer["successAction"] = {
            "tag": "aes",
            "description": "Your receipt",
            "ciphertext": base64.b64encode(ciphertext + encryptor.finalize()).decode(),
            "iv": base64.b64encode(iv).decode(),
        }
        return web.json_response(answer)


@pytest_asyncio.fixture
async def tips(network: Network) -> AsyncIterator[TipServer]:
    server = TipServer(network)
    async with server.running():
        yield server


@pytest_asyncio.fixture
async def carol(network: Network) -> AsyncIterator[LndClient]:
    async with LndClient(network.carol.settings()) as client:
        yield client


async def test_bob_pays_carols_address_with_a_comment_and_reads_the_receipt(
    network: Network, tips: TipServer, carol: LndClient
) -> None:
    result = await bob_pays(
        network, "--amount", "21", "--comment", "thanks for the post", f"lightning:{tips.address}"
    )
    assert result.code == 0, result.stderr
    assert "paying 21 sat (routing fee up to 5 sat)..." in result.stderr
    assert tips.comments == ["thanks for the post"]
    (issued,) = tips.issued
    lines = result.stdout.splitlines()
    assert lines[0].startswith("paid 21 sat + ")
    assert lines[0].endswith(f" sat fee to lightning:{tips.address}")
    assert lines[1:] == [
        f"payment hash: {issued.payment_hash.hex()}",
        "Your receipt",
        "21000 msat: thanks for the post",  # decrypted with the preimage bob's node got
    ]
    invoice = await carol.lookup_invoice(PaymentHash(issued.payment_hash))
    assert (invoice.state, invoice.amount_paid_msat) == (InvoiceState.SETTLED, 21_000)
    decoded = bolt11.decode(issued.payment_request)
    assert decoded.description_hash == hashlib.sha256(issued.metadata.encode()).digest()


async def test_refusals_pay_nothing_and_json_summarizes_a_payment(
    network: Network, tips: TipServer, bob: LndClient
) -> None:
    too_long = await bob_pays(network, "--amount", "5", "--comment", "x" * 41, tips.address)
    assert too_long.code == 2, too_long.stderr
    assert "the comment is 41 characters, the service takes at most 40" in too_long.stderr
    below = await bob_pays(network, "--amount", "0.5", tips.address)
    assert below.code == 2
    assert "500 msat is outside the service's range 1000 to 100000 msat" in below.stderr
    over = await bob_pays(network, "--amount", "50", "--max-cost", "49", tips.address)
    assert over.code == 4
    assert "50 sat is over --max-cost 49 sat" in over.stderr
    assert tips.issued == []  # no invoice was even asked for

    result = await bob_pays(network, "--json", "-s", "--amount", "3000msat", tips.address)
    assert (result.code, result.stderr) == (0, "")
    summary = json.loads(result.stdout)
    (issued,) = tips.issued
    assert summary["payment_hash"] == issued.payment_hash.hex()
    assert (summary["amount_msat"], summary["comment"]) == (3_000, "")
    assert summary["fee_msat"] <= 5_000
    assert summary["success_action"] == {
        "tag": "aes",
        "description": "Your receipt",
        "plaintext": "3000 msat: ",
    }
    payment = await bob.lookup_payment(PaymentHash(issued.payment_hash))
    assert payment is not None
    assert payment.preimage is not None
    assert hashlib.sha256(payment.preimage).digest() == issued.payment_hash


async def test_bob_tips_the_gateways_jar_with_a_comment(network: Network, tmp_path: Path) -> None:
    async with tips_gateway(network, tmp_path / "gateway") as gateway:
        result = await bob_pays(
            network, "--json", "--amount", "2100msat", "--comment", "great API", gateway.address
        )
        assert result.code == 0, result.stderr
        summary = json.loads(result.stdout)
        assert summary["success_action"] == {"tag": "message", "message": THANKS}
        assert summary["amount_msat"] == 2_100
        record = await gateway.settled(bytes.fromhex(summary["payment_hash"]))
        assert (record.service, record.comment, record.amount_msat) == (
            f"tip:{JAR}",
            "great API",
            2_100,
        )
        text = await bob_pays(network, "--amount", "1", gateway.address)
        assert text.code == 0, text.stderr
        assert text.stdout.splitlines()[2:] == [THANKS]
        gateway.assert_log_clean()


async def test_a_payment_still_in_flight_exits_7_and_is_paid_once(
    network: Network, bob: LndClient
) -> None:
    held = LnurlPayServer(network.carol.settings(), username="carol", hold=True)
    async with held.running():
        # LND keeps a held HTLC's payment in flight past --payment-timeout; the call to the
        # node gives up at its deadline (that timeout + the client's 30 s).
        result = await bob_pays(network, "--amount", "21", "--payment-timeout", "1", held.address)
        assert result.code == 7, result.stderr
        (issued,) = held.issued
        hash_hex = issued.payment_hash.hex()
        lines = result.stderr.splitlines()
        assert lines[0] == f"payment hash: {hash_hex}"
        assert lines[-2].startswith("payment outcome unknown after ")
        assert lines[-1].startswith(f"l402-gateway: payment {hash_hex} is still in flight (")
        assert lines[-1].endswith(
            f"do not pay again; check it with `lncli trackpayment {hash_hex}`"
        )
        assert "payment failed" not in result.stderr
        assert result.stdout == ""
        payment = await bob.lookup_payment(PaymentHash(issued.payment_hash))
        assert payment is not None
        assert payment.status is PaymentStatus.IN_FLIGHT

        await held.settle(issued.payment_hash)  # the payment completes: paid once
        done = payment
        async with asyncio.timeout(30):
            while done.status is PaymentStatus.IN_FLIGHT:
                await asyncio.sleep(0.2)
                again = await bob.lookup_payment(PaymentHash(issued.payment_hash))
                assert again is not None
                done = again
        assert (done.status, done.amount_msat) == (PaymentStatus.SUCCEEDED, 21_000)
