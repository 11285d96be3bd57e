"""A small LNURL-pay service (LUD-06, Lightning Address LUD-16) for the regtest tests: its
invoices are made on a real LND node (carol's), each with ``description_hash =
sha256(metadata)`` as LUD-06 requires.

``hold=True`` makes hold invoices instead: a payment to one stays in flight (the invoice
ACCEPTED on the node) until the test calls :meth:`LnurlPayServer.settle`, so a test can act
while a payout is under way for sure.

Served over plain HTTP on loopback: the address is ``<username>@127.0.0.1:<port>``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from aiohttp import web

from gateway.lnd.connection import LndConnection, LndSettings
from gateway.lnd.protos import (
    invoices_pb2,
    invoices_pb2_grpc,
    lightning_pb2,
    lightning_pb2_grpc,
)
from tests.regtest.gateway_helpers import serving

MIN_SENDABLE = 1_000
MAX_SENDABLE = 1_000_000_000
INVOICE_EXPIRY = 3600


@dataclass(frozen=True, slots=True)
class Issued:
    """One invoice the service handed out."""

    payment_hash: bytes
    amount_msat: int
    payment_request: str
    metadata: str
    preimage: bytes | None  # kept for hold invoices only: the test settles them


class LnurlPayServer:
    """LNURL-pay for ``username`` at ``/.well-known/lnurlp/<username>``, invoices on the node
    ``settings`` reaches (a macaroon that may create invoices; hold mode: settle them too)."""

    def __init__(
        self,
        settings: LndSettings,
        *,
        username: str = "carol",
        hold: bool = False,
        min_sendable: int = MIN_SENDABLE,
        max_sendable: int = MAX_SENDABLE,
    ) -> None:
        self.username = username
        self.hold = hold
        self.min_sendable = min_sendable
        self.max_sendable = max_sendable
        self.issued: list[Issued] = []
        self.address = ""  # "<username>@127.0.0.1:<port>" once serving
        self._connection = LndConnection(settings)
        self._lightning = lightning_pb2_grpc.LightningStub(self._connection.channel)
        self._invoices = invoices_pb2_grpc.InvoicesStub(self._connection.channel)

    def metadata(self, host: str) -> str:
        """LUD-06 metadata: the exact JSON text whose sha256 each invoice commits to."""
        text = ["text/plain", f"Revenue share for {self.username}"]
        return json.dumps([text, ["text/identifier", f"{self.username}@{host}"]])

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/.well-known/lnurlp/{username}", self._pay_request)
        app.router.add_get("/lnurlp/{username}/callback", self._callback)
        return app

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[LnurlPayServer]:
        """Serve on a free loopback port for the block (``address`` set), then cancel the
        hold invoices left unsettled (a failed test leaves no payment held on the node)."""
        try:
            async with serving(self.app()) as url:
                self.address = f"{self.username}@{url.removeprefix('http://')}"
                yield self
        finally:
            for issued in self.issued:
                if issued.preimage is not None:
                    # Settled ones refuse to be canceled: nothing to do for them.
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        await self._invoices.CancelInvoice(
                            invoices_pb2.CancelInvoiceMsg(payment_hash=issued.payment_hash),
                            metadata=self._connection.metadata,
                            timeout=30,
                        )
            await self._connection.close()

    async def settle(self, payment_hash: bytes) -> None:
        """Settle a held invoice (hold mode): the payment in flight to it completes."""
        (issued,) = [i for i in self.issued if i.payment_hash == payment_hash]
        assert issued.preimage is not None, "not a hold invoice"
        await self._invoices.SettleInvoice(
            invoices_pb2.SettleInvoiceMsg(preimage=issued.preimage),
            metadata=self._connection.metadata,
            timeout=30,
        )

    def _known(self, request: web.Request) -> None:
        if request.match_info["username"] != self.username:
            raise _error(404, "unknown user")

    async def _pay_request(self, request: web.Request) -> web.Response:
        self._known(request)
        return web.json_response(
            {
                "tag": "payRequest",
                "callback": f"http://{request.host}/lnurlp/{self.username}/callback",
                "minSendable": self.min_sendable,
                "maxSendable": self.max_sendable,
                "metadata": self.metadata(request.host),
            }
        )

    async def _callback(self, request: web.Request) -> web.Response:
        self._known(request)
        try:
            amount = int(request.query["amount"])
        except (KeyError, ValueError):
            raise _error(400, "amount missing or not a number") from None
        if not self.min_sendable <= amount <= self.max_sendable:
            raise _error(400, "amount out of bounds")
        metadata = self.metadata(request.host)
        description_hash = hashlib.sha256(metadata.encode()).digest()
        preimage: bytes | None = None
        if self.hold:
            preimage = secrets.token_bytes(32)
            payment_hash = hashlib.sha256(preimage).digest()
            held = await self._invoices.AddHoldInvoice(
                invoices_pb2.AddHoldInvoiceRequest(
                    hash=payment_hash,
                    value_msat=amount,
                    description_hash=description_hash,
                    expiry=INVOICE_EXPIRY,
                ),
                metadata=self._connection.metadata,
                timeout=30,
            )
            payment_request = held.payment_request
        else:
            reply = await self._lightning.AddInvoice(
                lightning_pb2.Invoice(
                    value_msat=amount, description_hash=description_hash, expiry=INVOICE_EXPIRY
                ),
                metadata=self._connection.metadata,
                timeout=30,
            )
            payment_hash, payment_request = reply.r_hash, reply.payment_request
        self.issued.append(Issued(payment_hash, amount, payment_request, metadata, preimage))
        return web.json_response({"pr": payment_request, "routes": []})


def _error(status: int, reason: str) -> web.HTTPException:
    """LUD-06's error answer, raised as the HTTP error ``status``."""
    error_class = {400: web.HTTPBadRequest, 404: web.HTTPNotFound}[status]
    body = json.dumps({"status": "ERROR", "reason": reason})
    return error_class(text=body, content_type="application/json")
