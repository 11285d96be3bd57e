"""``LndClient.add_invoice`` asks LND's AddInvoice for a memo or a description hash."""

from __future__ import annotations

import hashlib

from gateway.lnd.client import LndClient
from gateway.lnd.connection import LndSettings
from gateway.lnd.protos import lightning_pb2
from gateway.ports import Msat


class _Lightning:
    """Stands in for the Lightning stub: records AddInvoice requests."""

    def __init__(self) -> None:
        self.requests: list[lightning_pb2.Invoice] = []

    async def AddInvoice(
        self, request: lightning_pb2.Invoice, **_options: object
    ) -> lightning_pb2.AddInvoiceResponse:
        self.requests.append(request)
        return lightning_pb2.AddInvoiceResponse(
            r_hash=bytes(32), payment_request="lnbcrt1...", add_index=len(self.requests)
        )


async def test_add_invoice_sends_the_memo_or_the_description_hash() -> None:
    client = LndClient(LndSettings("127.0.0.1:1", b"", b"macaroon"))
    stub = _Lightning()
    client._lightning = stub  # type: ignore[assignment]
    try:
        hashed = hashlib.sha256(b'[["text/plain","Tip"]]').digest()
        plain = await client.add_invoice(Msat(21_000), "premium", 300)
        tip = await client.add_invoice(Msat(5_000), "", 600, description_hash=hashed)
    finally:
        await client.close()
    first, second = stub.requests
    assert (first.value_msat, first.memo, first.expiry, first.description_hash) == (
        21_000,
        "premium",
        300,
        b"",
    )
    assert (second.value_msat, second.memo, second.description_hash) == (5_000, "", hashed)
    assert (plain.add_index, tip.add_index) == (1, 2)
