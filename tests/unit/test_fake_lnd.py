"""The fast tests' fake LND behaves as LND does: its invoice stream (the scenario shared with
the regtest run) and its invoices (real BOLT11 that the paying client accepts)."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from gateway import errors, l402
from gateway.client import bolt11
from gateway.client.offer import read_offer
from gateway.ports import InvoiceState, Msat, NewInvoice, PaymentHash, Preimage
from tests.fakes import NODE_PUBKEY, FakeInvoiceBackend
from tests.lnd_facts import check_invoice_stream
from tests.unit.client.client_helpers import make_macaroon


async def test_the_invoice_stream_is_lnds() -> None:
    backend = FakeInvoiceBackend()

    async def pay(invoice: NewInvoice) -> None:
        backend.pay(invoice.payment_hash)

    async def cancel(payment_hash: PaymentHash) -> None:
        backend.cancel(payment_hash)

    await check_invoice_stream(backend, pay, cancel)


async def test_index_zero_replays_nothing_and_known_adds_are_not_streamed_again() -> None:
    backend = FakeInvoiceBackend()
    paid = await backend.add_invoice(Msat(1_000), "paid", 600)
    backend.pay(paid.payment_hash)
    stream = backend.subscribe_invoices(0, 0)
    next_event = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    assert not next_event.done()  # nothing replayed
    live = await backend.add_invoice(Msat(1_000), "live", 600)
    assert (await next_event).payment_hash == live.payment_hash
    await stream.aclose()

    # A subscriber that claims to know add index 5 is sent no add up to it (LND's check).
    ahead = backend.subscribe_invoices(5, 0)
    next_event = asyncio.ensure_future(anext(ahead))
    await asyncio.sleep(0)
    for _ in range(3):
        await backend.add_invoice(Msat(1_000), "known", 600)
    backend.pay(live.payment_hash)
    assert (await next_event).payment_hash == live.payment_hash  # settlements still come
    await ahead.aclose()


async def test_invoices_are_bolt11_that_the_paying_client_accepts() -> None:
    backend = FakeInvoiceBackend()
    new = await backend.add_invoice(Msat(21_000), "premium: GET /api/premium/fortune", 300)
    assert new.payment_request.startswith("lnbcrt210n1")
    decoded = bolt11.decode(new.payment_request)
    assert decoded.payee.hex() == NODE_PUBKEY  # the signature recovers the node's key
    assert decoded.payment_hash == new.payment_hash
    assert decoded.description == "premium: GET /api/premium/fortune"
    assert (decoded.timestamp, decoded.expiry) == (int(backend.clock.now()), 300)
    assert backend.invoices[new.payment_hash].payment_request == new.payment_request

    challenge = l402.format_challenge(make_macaroon(new.payment_hash), new.payment_request)
    offer = read_offer([challenge], None, network="regtest", now=backend.clock.now())
    assert (offer.payment_hash, offer.amount_msat) == (new.payment_hash, 21_000)
    assert offer.destination == NODE_PUBKEY


async def test_only_an_open_invoice_is_paid_and_a_settled_one_is_never_canceled() -> None:
    backend = FakeInvoiceBackend()
    paid, canceled = [await backend.add_invoice(Msat(1_000), "x", 600) for _ in range(2)]
    backend.pay(paid.payment_hash)
    backend.cancel(canceled.payment_hash)
    backend.cancel(canceled.payment_hash)  # again: no change, as in LND
    for payment_hash in (paid.payment_hash, canceled.payment_hash):
        with pytest.raises(ValueError, match="not OPEN"):
            backend.pay(payment_hash)
    with pytest.raises(ValueError, match="already settled"):
        backend.cancel(paid.payment_hash)


async def test_an_invoice_with_a_description_hash_has_an_h_tag_as_lnds() -> None:
    backend = FakeInvoiceBackend()
    hashed = hashlib.sha256(b'[["text/plain","Tip"]]').digest()
    new = await backend.add_invoice(Msat(5_000), "", 600, description_hash=hashed)
    decoded = bolt11.decode(new.payment_request)
    assert (decoded.description_hash, decoded.description) == (hashed, None)
    assert backend.invoices[new.payment_hash].memo == ""
    for memo, wrong in (("a memo", hashed), ("", hashed[:31])):  # LND refuses both
        with pytest.raises(errors.BackendBadRequest):
            await backend.add_invoice(Msat(5_000), memo, 600, description_hash=wrong)


async def test_a_plain_invoice_is_cancelled_but_a_settled_one_is_refused_as_lnd_does() -> None:
    backend = FakeInvoiceBackend()
    plain, paid = [await backend.add_invoice(Msat(1_000), "x", 600) for _ in range(2)]
    await backend.cancel_invoice(plain.payment_hash)
    await backend.cancel_invoice(plain.payment_hash)  # again: no error
    assert backend.invoices[plain.payment_hash].state is InvoiceState.CANCELED
    backend.pay(paid.payment_hash)
    with pytest.raises(errors.InvoiceAlreadySettled):
        await backend.cancel_invoice(paid.payment_hash)
    with pytest.raises(errors.InvoiceNotFound):
        await backend.cancel_invoice(PaymentHash(bytes(32)))

    preimage = Preimage(bytes([7]) * 32)
    held = PaymentHash(hashlib.sha256(preimage).digest())
    await backend.add_hold_invoice(held, Msat(1_000), "hold", 600)
    await backend.cancel_invoice(held)
    with pytest.raises(errors.InvoiceAlreadyCanceled):
        await backend.settle_invoice(preimage)
