"""The LND client against real nodes: invoices, two-hop payments, subscriptions, hold invoices."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
from collections.abc import AsyncGenerator

import pytest

from gateway import errors
from gateway.lnd.client import LndClient
from gateway.lnd.connection import LndConnection, LndSettings
from gateway.lnd.protos import lightning_pb2, lightning_pb2_grpc
from gateway.ports import Invoice, InvoiceState, Msat, PaymentHash, PaymentStatus, Preimage
from regtest.network import Network
from regtest.processes import free_ports

pytestmark = pytest.mark.regtest

MAX_FEE = Msat(10_000)


async def _next_matching(
    stream: AsyncGenerator[Invoice, None], payment_hash: bytes, state: InvoiceState
) -> Invoice:
    async with asyncio.timeout(30):
        async for invoice in stream:
            if invoice.payment_hash == payment_hash and invoice.state is state:
                return invoice
    raise AssertionError("stream ended")


async def _pay_via_carol(bob: LndClient, network: Network, payment_request: str) -> None:
    payment = await bob.send_payment(
        payment_request,
        max_fee_msat=MAX_FEE,
        payment_timeout=30,
        last_hop_pubkey=network.carol.pubkey,
    )
    assert payment.status is PaymentStatus.SUCCEEDED


async def test_two_hop_payment_settles_invoice(
    alice: LndClient, bob: LndClient, network: Network
) -> None:
    added = await alice.add_invoice(Msat(21_000), "two hops", expiry=600)
    payment = await bob.send_payment(
        added.payment_request,
        max_fee_msat=MAX_FEE,
        payment_timeout=30,
        last_hop_pubkey=network.carol.pubkey,
    )
    assert payment.status is PaymentStatus.SUCCEEDED
    assert payment.route == (network.carol.pubkey, network.alice.pubkey)
    assert 0 < payment.fee_msat <= MAX_FEE
    assert payment.preimage is not None
    assert hashlib.sha256(payment.preimage).digest() == added.payment_hash

    invoice = await alice.lookup_invoice(added.payment_hash)
    assert invoice.state is InvoiceState.SETTLED
    assert invoice.amount_paid_msat == 21_000
    assert invoice.memo == "two hops"
    assert invoice.settle_index > 0
    assert invoice.settled_at is not None


async def test_decode_payment_request(alice: LndClient, network: Network) -> None:
    added = await alice.add_invoice(Msat(5_000), "decode me", expiry=120)
    decoded = await alice.decode_payment_request(added.payment_request)
    assert decoded.destination == network.alice.pubkey
    assert decoded.payment_hash == added.payment_hash
    assert decoded.amount_msat == 5_000
    assert decoded.expiry == 120
    assert decoded.description == "decode me"


async def test_subscription_sees_settlement(
    alice: LndClient, bob: LndClient, network: Network
) -> None:
    # Replaying from a marker invoice (add_index 0 would mean "no replay") makes the watched
    # invoice's OPEN event certain, and proves the subscription is live before paying.
    marker = await alice.add_invoice(Msat(1_000), "marker", expiry=600)
    added = await alice.add_invoice(Msat(3_000), "watched", expiry=600)
    stream = alice.subscribe_invoices(add_index=marker.add_index)
    async with contextlib.aclosing(stream):
        await _next_matching(stream, added.payment_hash, InvoiceState.OPEN)
        await _pay_via_carol(bob, network, added.payment_request)
        settled = await _next_matching(stream, added.payment_hash, InvoiceState.SETTLED)
    assert settled.amount_paid_msat == 3_000
    assert settled.settle_index > 0


async def test_resume_replays_exactly_the_missed_settlements(
    alice: LndClient, bob: LndClient, network: Network
) -> None:
    # A settlement seen while connected gives the cursor a subscriber would store.
    marker = await alice.add_invoice(Msat(1_000), "marker", expiry=600)
    seen = await alice.add_invoice(Msat(1_000), "before disconnect", expiry=600)
    async with contextlib.aclosing(alice.subscribe_invoices(marker.add_index)) as stream:
        await _next_matching(stream, seen.payment_hash, InvoiceState.OPEN)
        await _pay_via_carol(bob, network, seen.payment_request)
        cursor = await _next_matching(stream, seen.payment_hash, InvoiceState.SETTLED)

    # While disconnected: three invoices, two of them paid.
    missed = [await alice.add_invoice(Msat(1_000 + i), f"missed {i}", 600) for i in range(3)]
    for invoice in missed[:2]:
        await _pay_via_carol(bob, network, invoice.payment_request)
    last_add_index = max(invoice.add_index for invoice in missed)

    async with contextlib.aclosing(
        alice.subscribe_invoices(add_index=last_add_index, settle_index=cursor.settle_index)
    ) as stream:
        replayed = [await anext(stream) for _ in range(2)]
        # The next event is live: an invoice added now, so nothing else was replayed.
        live = await alice.add_invoice(Msat(999), "live", expiry=600)
        async with asyncio.timeout(30):
            after_replay = await anext(stream)

    assert [(i.payment_hash, i.state) for i in replayed] == [
        (missed[0].payment_hash, InvoiceState.SETTLED),
        (missed[1].payment_hash, InvoiceState.SETTLED),
    ]
    assert [i.settle_index for i in replayed] == sorted(i.settle_index for i in replayed)
    assert all(i.settle_index > cursor.settle_index for i in replayed)
    assert (after_replay.payment_hash, after_replay.state) == (live.payment_hash, InvoiceState.OPEN)


async def _local_balance(settings: LndSettings) -> int:
    connection = LndConnection(settings)
    try:
        stub = lightning_pb2_grpc.LightningStub(connection.channel)
        reply = await stub.ListChannels(
            lightning_pb2.ListChannelsRequest(), metadata=connection.metadata, timeout=10
        )
        return sum(channel.local_balance for channel in reply.channels)
    finally:
        await connection.close()


async def test_hold_invoice_accepted_then_settled(
    alice: LndClient, bob: LndClient, network: Network
) -> None:
    preimage = Preimage(secrets.token_bytes(32))
    payment_hash = PaymentHash(hashlib.sha256(preimage).digest())
    async with contextlib.aclosing(alice.subscribe_single_invoice(payment_hash)) as stream:
        hold = await alice.add_hold_invoice(payment_hash, Msat(7_000), "hold", expiry=600)
        await _next_matching(stream, payment_hash, InvoiceState.OPEN)
        paying = asyncio.create_task(_pay_via_carol(bob, network, hold.payment_request))
        accepted = await _next_matching(stream, payment_hash, InvoiceState.ACCEPTED)
        assert not paying.done()
        await alice.settle_invoice(preimage)
        settled = await _next_matching(stream, payment_hash, InvoiceState.SETTLED)
    await asyncio.wait_for(paying, 30)
    assert accepted.amount_paid_msat == 7_000
    assert settled.preimage == preimage


async def test_hold_invoice_canceled_returns_payer_funds(
    alice: LndClient, bob: LndClient, network: Network
) -> None:
    before = await _local_balance(network.bob.settings())
    payment_hash = PaymentHash(secrets.token_bytes(32))
    async with contextlib.aclosing(alice.subscribe_single_invoice(payment_hash)) as stream:
        hold = await alice.add_hold_invoice(payment_hash, Msat(50_000_000), "cancel", 600)
        paying = asyncio.create_task(
            bob.send_payment(hold.payment_request, max_fee_msat=Msat(100_000), payment_timeout=30)
        )
        await _next_matching(stream, payment_hash, InvoiceState.ACCEPTED)
        # The HTLC is locked in: bob's spendable balance dropped by at least the amount.
        assert await _local_balance(network.bob.settings()) <= before - 50_000
        await alice.cancel_invoice(payment_hash)
        await _next_matching(stream, payment_hash, InvoiceState.CANCELED)
    with pytest.raises(errors.PaymentFailed) as failure:
        await asyncio.wait_for(paying, 30)
    assert failure.value.reason == "FAILURE_REASON_INCORRECT_PAYMENT_DETAILS"
    for _ in range(150):
        if await _local_balance(network.bob.settings()) == before:
            break
        await asyncio.sleep(0.2)
    assert await _local_balance(network.bob.settings()) == before


async def test_missing_invoice_and_duplicate_hold_invoice(alice: LndClient) -> None:
    with pytest.raises(errors.InvoiceNotFound):
        await alice.lookup_invoice(PaymentHash(secrets.token_bytes(32)))
    payment_hash = PaymentHash(secrets.token_bytes(32))
    await alice.add_hold_invoice(payment_hash, Msat(1_000), "dup", 600)
    with pytest.raises(errors.InvoiceAlreadyExists):
        await alice.add_hold_invoice(payment_hash, Msat(1_000), "dup", 600)
    await alice.cancel_invoice(payment_hash)


async def test_bad_payment_request_is_a_bad_request(alice: LndClient) -> None:
    with pytest.raises(errors.BackendBadRequest):
        await alice.decode_payment_request("lnbcrt1notaninvoice")


async def test_wrong_macaroon_is_permission_denied(network: Network) -> None:
    # bob's admin macaroon was not minted by alice's root key.
    foreign = LndSettings.from_files(
        network.alice.rpc_host, network.alice.tls_cert, macaroon_path=network.bob.macaroon()
    )
    async with LndClient(foreign) as client:
        with pytest.raises(errors.BackendPermissionDenied):
            await client.get_info()


async def test_invoice_macaroon_cannot_pay(network: Network, alice: LndClient) -> None:
    added = await alice.add_invoice(Msat(1_000), "not payable", expiry=600)
    async with LndClient(network.bob.settings(macaroon="invoice")) as client:
        with pytest.raises(errors.BackendPermissionDenied):
            await client.send_payment(
                added.payment_request, max_fee_msat=MAX_FEE, payment_timeout=10
            )


async def test_unreachable_node_is_unavailable(network: Network) -> None:
    (port,) = free_ports(1)
    settings = LndSettings.from_files(
        f"127.0.0.1:{port}",
        network.alice.tls_cert,
        macaroon_path=network.alice.macaroon(),
        timeout=5,
    )
    async with LndClient(settings) as client:
        with pytest.raises(errors.BackendUnavailable):
            await client.get_info()


async def test_get_info(alice: LndClient, network: Network) -> None:
    info = await alice.get_info()
    assert info.pubkey == network.alice.pubkey
    assert info.alias == "alice"
    assert info.network == "regtest"
    assert info.synced_to_chain
    assert info.num_active_channels == 2
    assert info.block_height == await network.block_height()
