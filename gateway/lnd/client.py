"""The asyncio LND client: the RPCs the gateway and the payer use, errors mapped to ours."""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from typing import Any, NoReturn

import grpc

from gateway import errors
from gateway.lnd.connection import LndConnection, LndSettings
from gateway.lnd.protos import (
    invoices_pb2,
    invoices_pb2_grpc,
    lightning_pb2,
    lightning_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)
from gateway.ports import (
    NO_METER,
    ChannelBalance,
    DecodedPaymentRequest,
    Invoice,
    InvoiceState,
    Meter,
    Msat,
    NewInvoice,
    NodeInfo,
    Payment,
    PaymentHash,
    PaymentStatus,
    Preimage,
)

# The keysend custom record (TLV type) that carries the preimage to the payee.
KEYSEND_RECORD = 5482373484
_INVOICE_STATES = {
    lightning_pb2.Invoice.OPEN: InvoiceState.OPEN,
    lightning_pb2.Invoice.SETTLED: InvoiceState.SETTLED,
    lightning_pb2.Invoice.CANCELED: InvoiceState.CANCELED,
    lightning_pb2.Invoice.ACCEPTED: InvoiceState.ACCEPTED,
}
_PAYMENT_STATUSES = {
    lightning_pb2.Payment.IN_FLIGHT: PaymentStatus.IN_FLIGHT,
    lightning_pb2.Payment.SUCCEEDED: PaymentStatus.SUCCEEDED,
    lightning_pb2.Payment.FAILED: PaymentStatus.FAILED,
    lightning_pb2.Payment.INITIATED: PaymentStatus.INITIATED,
}
# A call that may or may not have reached the node (INTERNAL and CANCELLED: a stream reset
# or a proxy in between), never taken for a refusal.
_UNAVAILABLE_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.CANCELLED,
}
_PERMISSION_CODES = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
_BAD_REQUEST_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
}
# LND reports most failures as UNKNOWN with a descriptive text; these fragments classify them.
_MESSAGE_CLASSES: tuple[tuple[str, type[errors.BackendError]], ...] = (
    ("macaroon", errors.BackendPermissionDenied),
    ("permission denied", errors.BackendPermissionDenied),
    ("verification failed", errors.BackendPermissionDenied),
    ("unable to locate invoice", errors.InvoiceNotFound),
    ("there are no existing invoices", errors.InvoiceNotFound),
    ("invoice with payment hash already exists", errors.InvoiceAlreadyExists),
    ("in the process of starting", errors.BackendUnavailable),
    ("wallet locked", errors.BackendUnavailable),
    ("stream removed", errors.BackendUnavailable),
    ("rst_stream", errors.BackendUnavailable),
    # SendPaymentV2 refusing a request before it records any payment of the hash.
    ("payment request must contain", errors.BackendBadRequest),
    ("invoice expired", errors.BackendBadRequest),
    ("amount must", errors.BackendBadRequest),
    ("self-payments not allowed", errors.BackendBadRequest),
    ("invalid", errors.BackendBadRequest),
    ("invoice still open", errors.BackendBadRequest),
    ("already settled", errors.InvoiceAlreadySettled),
    ("already canceled", errors.InvoiceAlreadyCanceled),
)


def map_rpc_error(error: grpc.aio.AioRpcError, host: str) -> errors.BackendError:
    """Translate a gRPC error from LND into the gateway's exception tree."""
    code = error.code()
    detail = error.details() or code.name
    message = f"LND at {host}: {detail}"
    if code in _UNAVAILABLE_CODES:
        return errors.BackendUnavailable(message)
    if code in _PERMISSION_CODES:
        return errors.BackendPermissionDenied(message)
    if code == grpc.StatusCode.NOT_FOUND:
        return errors.InvoiceNotFound(message)
    if code == grpc.StatusCode.ALREADY_EXISTS:
        return errors.InvoiceAlreadyExists(message)
    lowered = detail.lower()
    for fragment, error_class in _MESSAGE_CLASSES:
        if fragment in lowered:
            return error_class(message)
    if code in _BAD_REQUEST_CODES:
        return errors.BackendBadRequest(message)
    return errors.BackendError(message)


def _invoice(message: lightning_pb2.Invoice) -> Invoice:
    return Invoice(
        payment_hash=PaymentHash(message.r_hash),
        payment_request=message.payment_request,
        memo=message.memo,
        amount_msat=Msat(message.value_msat),
        amount_paid_msat=Msat(message.amt_paid_msat),
        state=_INVOICE_STATES[message.state],
        created_at=message.creation_date,
        settled_at=message.settle_date or None,
        expiry=message.expiry,
        add_index=message.add_index,
        settle_index=message.settle_index,
        preimage=Preimage(message.r_preimage) if message.r_preimage else None,
    )


def _payment(message: lightning_pb2.Payment) -> Payment:
    route: tuple[str, ...] = ()
    for attempt in message.htlcs:
        if attempt.status == lightning_pb2.HTLCAttempt.SUCCEEDED:
            route = tuple(hop.pub_key for hop in attempt.route.hops)
    preimage = bytes.fromhex(message.payment_preimage) if message.payment_preimage else b""
    return Payment(
        payment_hash=PaymentHash(bytes.fromhex(message.payment_hash)),
        status=_PAYMENT_STATUSES.get(message.status, PaymentStatus.IN_FLIGHT),
        amount_msat=Msat(message.value_msat),
        fee_msat=Msat(message.fee_msat),
        route=route,
        # LND reports an all-zero preimage until the payment succeeds.
        preimage=Preimage(preimage) if preimage.strip(b"\0") else None,
    )


class LndClient:
    """Talks to one LND node. Implements InvoiceBackend, HoldInvoiceBackend and Payer."""

    def __init__(self, settings: LndSettings, *, meter: Meter = NO_METER) -> None:
        self._connection = LndConnection(settings)
        channel = self._connection.channel
        self._lightning = lightning_pb2_grpc.LightningStub(channel)
        self._invoices = invoices_pb2_grpc.InvoicesStub(channel)
        self._router = router_pb2_grpc.RouterStub(channel)
        self._meter = meter
        # Each stub method's RPC name, for the metrics' method label (a fixed set).
        self._rpc_names = {
            id(method): name
            for stub in (self._lightning, self._invoices, self._router)
            for name, method in vars(stub).items()
        }
        self._metadata = self._connection.metadata
        self._timeout = self._connection.timeout
        self._host = self._connection.host

    async def close(self) -> None:
        await self._connection.close()

    async def __aenter__(self) -> LndClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @contextlib.contextmanager
    def _mapped_errors(self) -> Iterator[None]:
        try:
            yield
        except grpc.aio.AioRpcError as error:
            raise map_rpc_error(error, self._host) from error

    def _raise(self, error: grpc.aio.AioRpcError) -> NoReturn:
        raise map_rpc_error(error, self._host) from error

    async def _unary(self, method: Callable[..., Any], request: object) -> Any:
        started = time.perf_counter()
        error: str | None = None
        try:
            with self._mapped_errors():
                return await method(request, metadata=self._metadata, timeout=self._timeout)
        except errors.BackendError as failure:
            error = type(failure).__name__
            raise
        finally:
            name = self._rpc_names.get(id(method), "other")
            self._meter.lnd_call(name, time.perf_counter() - started, error)

    async def list_channels(self) -> tuple[ChannelBalance, ...]:
        """The node's channels with their inbound side (ListChannels; ``offchain:read``)."""
        reply = await self._unary(self._lightning.ListChannels, lightning_pb2.ListChannelsRequest())
        return tuple(
            ChannelBalance(
                active=channel.active,
                remote_balance_msat=Msat(channel.remote_balance * 1000),
                remote_reserve_msat=Msat(channel.remote_constraints.chan_reserve_sat * 1000),
            )
            for channel in reply.channels
        )

    async def get_info(self) -> NodeInfo:
        reply = await self._unary(self._lightning.GetInfo, lightning_pb2.GetInfoRequest())
        network = reply.chains[0].network if reply.chains else ""
        return NodeInfo(
            pubkey=reply.identity_pubkey,
            alias=reply.alias,
            network=network,
            block_height=reply.block_height,
            synced_to_chain=reply.synced_to_chain,
            num_active_channels=reply.num_active_channels,
            version=reply.version,
        )

    async def add_invoice(
        self, amount_msat: Msat, memo: str, expiry: int, description_hash: bytes = b""
    ) -> NewInvoice:
        """AddInvoice: described by ``memo``, or by ``description_hash`` (the memo then "",
        as LND refuses both; LNURL-pay's ``h`` tag)."""
        request = lightning_pb2.Invoice(
            value_msat=amount_msat, memo=memo, expiry=expiry, description_hash=description_hash
        )
        reply = await self._unary(self._lightning.AddInvoice, request)
        return NewInvoice(
            payment_hash=PaymentHash(reply.r_hash),
            payment_request=reply.payment_request,
            add_index=reply.add_index,
        )

    async def lookup_invoice(self, payment_hash: PaymentHash) -> Invoice:
        request = lightning_pb2.PaymentHash(r_hash=payment_hash)
        return _invoice(await self._unary(self._lightning.LookupInvoice, request))

    async def _stream(self, call: Any) -> AsyncGenerator[Any, None]:
        """Yield a server stream's messages with errors mapped; cancel the call on exit."""
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as error:
            self._raise(error)
        finally:
            call.cancel()

    async def subscribe_invoices(
        self, add_index: int = 0, settle_index: int = 0
    ) -> AsyncGenerator[Invoice, None]:
        """Invoices added after ``add_index`` and settled after ``settle_index``, then live."""
        request = lightning_pb2.InvoiceSubscription(add_index=add_index, settle_index=settle_index)
        call = self._lightning.SubscribeInvoices(request, metadata=self._metadata)
        async with contextlib.aclosing(self._stream(call)) as messages:
            async for message in messages:
                yield _invoice(message)

    async def add_hold_invoice(
        self,
        payment_hash: PaymentHash,
        amount_msat: Msat,
        memo: str,
        expiry: int,
        *,
        cltv_expiry: int = 0,
    ) -> NewInvoice:
        request = invoices_pb2.AddHoldInvoiceRequest(
            hash=payment_hash,
            value_msat=amount_msat,
            memo=memo,
            expiry=expiry,
            cltv_expiry=cltv_expiry,
        )
        reply = await self._unary(self._invoices.AddHoldInvoice, request)
        return NewInvoice(
            payment_hash=payment_hash,
            payment_request=reply.payment_request,
            add_index=reply.add_index,
        )

    async def settle_invoice(self, preimage: Preimage) -> None:
        request = invoices_pb2.SettleInvoiceMsg(preimage=preimage)
        await self._unary(self._invoices.SettleInvoice, request)

    async def cancel_invoice(self, payment_hash: PaymentHash) -> None:
        request = invoices_pb2.CancelInvoiceMsg(payment_hash=payment_hash)
        await self._unary(self._invoices.CancelInvoice, request)

    async def subscribe_single_invoice(
        self, payment_hash: PaymentHash
    ) -> AsyncGenerator[Invoice, None]:
        """Every state of one invoice (OPEN, ACCEPTED, SETTLED, CANCELED) as it happens."""
        request = invoices_pb2.SubscribeSingleInvoiceRequest(r_hash=payment_hash)
        call = self._invoices.SubscribeSingleInvoice(request, metadata=self._metadata)
        async with contextlib.aclosing(self._stream(call)) as messages:
            async for message in messages:
                yield _invoice(message)

    async def decode_payment_request(self, payment_request: str) -> DecodedPaymentRequest:
        request = lightning_pb2.PayReqString(pay_req=payment_request)
        reply = await self._unary(self._lightning.DecodePayReq, request)
        return DecodedPaymentRequest(
            destination=reply.destination,
            payment_hash=PaymentHash(bytes.fromhex(reply.payment_hash)),
            amount_msat=Msat(reply.num_msat),
            timestamp=reply.timestamp,
            expiry=reply.expiry,
            description=reply.description,
            cltv_expiry=reply.cltv_expiry,
        )

    async def send_payment(
        self,
        payment_request: str,
        *,
        max_fee_msat: Msat,
        payment_timeout: float,
        last_hop_pubkey: str | None = None,
    ) -> Payment:
        """Pay a BOLT11 request via routerrpc.SendPaymentV2 and wait for the final state.

        ``max_fee_msat`` 0 allows only fee-free routes. Raises PaymentFailed when LND gives up.
        """
        request = router_pb2.SendPaymentRequest(
            payment_request=payment_request,
            fee_limit_msat=max_fee_msat,
            timeout_seconds=max(1, round(payment_timeout)),
            no_inflight_updates=True,
            last_hop_pubkey=bytes.fromhex(last_hop_pubkey) if last_hop_pubkey else b"",
        )
        return await self._send(request, payment_timeout)

    async def send_keysend(
        self,
        dest: bytes,
        amount_msat: Msat,
        preimage: Preimage,
        *,
        max_fee_msat: Msat,
        payment_timeout: float,
    ) -> Payment:
        """Pay ``amount_msat`` to the node ``dest`` (33-byte public key) by keysend, via
        routerrpc.SendPaymentV2, and wait for the final state: the payment hash is
        sha256(``preimage``), the preimage travels to the payee in the keysend record (the
        payee's node must run with ``accept-keysend``). Raises PaymentFailed when LND gives up.
        """
        request = router_pb2.SendPaymentRequest(
            dest=dest,
            amt_msat=amount_msat,
            payment_hash=hashlib.sha256(preimage).digest(),
            dest_custom_records={KEYSEND_RECORD: preimage},
            fee_limit_msat=max_fee_msat,
            timeout_seconds=max(1, round(payment_timeout)),
            no_inflight_updates=True,
        )
        return await self._send(request, payment_timeout)

    async def _send(
        self, request: router_pb2.SendPaymentRequest, payment_timeout: float
    ) -> Payment:
        """Start a payment with SendPaymentV2 and wait for its final state."""
        call = self._router.SendPaymentV2(
            request, metadata=self._metadata, timeout=payment_timeout + self._timeout
        )
        async with contextlib.aclosing(self._stream(call)) as messages:
            async for message in messages:
                if message.status == lightning_pb2.Payment.SUCCEEDED:
                    return _payment(message)
                if message.status == lightning_pb2.Payment.FAILED:
                    reason = lightning_pb2.PaymentFailureReason.Name(message.failure_reason)
                    raise errors.PaymentFailed(reason, bytes.fromhex(message.payment_hash))
        raise errors.BackendUnavailable(f"LND at {self._host} ended the payment stream early")

    async def lookup_payment(self, payment_hash: PaymentHash) -> Payment | None:
        """The payment's current state via routerrpc.TrackPaymentV2; None if LND never saw it.

        The first message of the stream is the state right now (IN_FLIGHT included); the
        stream is cancelled after it, so this never waits for an in-flight payment to end.
        """
        request = router_pb2.TrackPaymentRequest(
            payment_hash=payment_hash, no_inflight_updates=False
        )
        call = self._router.TrackPaymentV2(request, metadata=self._metadata, timeout=self._timeout)
        try:
            async for message in call:
                return _payment(message)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return None  # "payment isn't initiated"
            self._raise(error)
        finally:
            call.cancel()
        raise errors.BackendUnavailable(f"LND at {self._host} ended the payment stream early")
