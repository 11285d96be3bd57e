"""The facts the fast tests' fake LND follows (tests/lnd_facts.py), checked on a real node."""

from __future__ import annotations

import pytest

from gateway.lnd.client import LndClient
from gateway.ports import Msat, NewInvoice, PaymentHash, PaymentStatus
from regtest.network import Network
from tests.lnd_facts import check_invoice_stream

pytestmark = pytest.mark.regtest


async def test_alices_invoice_stream_shows_what_the_fake_shows(
    alice: LndClient, bob: LndClient, network: Network
) -> None:
    async def pay(invoice: NewInvoice) -> None:
        payment = await bob.send_payment(
            invoice.payment_request,
            max_fee_msat=Msat(10_000),
            payment_timeout=30,
            last_hop_pubkey=network.carol.pubkey,
        )
        assert payment.status is PaymentStatus.SUCCEEDED

    async def cancel(payment_hash: PaymentHash) -> None:
        await alice.cancel_invoice(payment_hash)

    await check_invoice_stream(alice, pay, cancel)
