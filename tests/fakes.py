"""In-process stand-ins for fast tests. Never the only proof of a feature: the regtest
tests run the same paths against real LND nodes."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from gateway import errors
from gateway.client import bolt11
from gateway.ports import (
    ChannelBalance,
    Invoice,
    InvoiceState,
    Msat,
    NewInvoice,
    NodeInfo,
    Payment,
    PaymentHash,
    PaymentStatus,
    Preimage,
)
from gateway.pricing import Pricing, Rule
from gateway.service import L402Service
from gateway.store import MemoryStore
from gateway.supervisor import Supervisor
from gateway.watcher import InvoiceWatcher
from tests import bolt11_encode

NOW = 1_800_000_000.0  # where a FakeClock starts
# A fixed secp256k1 key for the fake node, and its public key.
NODE_KEY = "11" * 32
NODE_PUBKEY = "034f355bdcb7cc0af728ef3cceb9615d90684bb5b2ca5f859ab0f0b704075871aa"
CURRENCIES = {"mainnet": "bc", "testnet": "tb", "signet": "tbs", "regtest": "bcrt"}
MIN_FINAL_CLTV_EXPIRY = 80  # LND's default


def make_invoice(
    payment_hash: bytes,
    amount_msat: int | None,
    *,
    network: str = "regtest",
    created_at: float = NOW,
    expiry: int = 600,
    description: str = "premium: GET /api/premium/fortune",
    key: str = NODE_KEY,
    description_hash: bytes = b"",
) -> str:
    """A BOLT11 invoice signed with ``key``, with the fields LND's AddInvoice sets: the
    description (``d``), or with ``description_hash`` that hash (``h``) instead."""
    return bolt11_encode.encode(
        currency=CURRENCIES[network],
        amount=bolt11_encode.amount_text(amount_msat),
        timestamp=int(created_at),
        payment_hash=payment_hash,
        key=key,
        description=None if description_hash else description,
        expiry=expiry,
        min_final_cltv=MIN_FINAL_CLTV_EXPIRY,
        extra=bolt11_encode.field("h", bolt11_encode.words_of(description_hash))
        if description_hash
        else (),
    )


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, start: float = NOW) -> None:
        self.current = start

    def now(self) -> float:
        return self.current

    def advance(self, seconds: float) -> None:
        self.current += seconds


@dataclasses.dataclass(eq=False)
class _Subscriber:
    """One live ``subscribe_invoices`` stream and the highest indices LND has sent it."""

    add_index: int
    settle_index: int
    queue: asyncio.Queue[Invoice | None] = dataclasses.field(default_factory=asyncio.Queue)

    def offer(self, invoice: Invoice) -> None:
        """Send a live add or settlement unless this stream had its index already (LND checks)."""
        if invoice.state is InvoiceState.OPEN and invoice.add_index > self.add_index:
            self.add_index = invoice.add_index
        elif invoice.state is InvoiceState.SETTLED and invoice.settle_index > self.settle_index:
            self.settle_index = invoice.settle_index
        else:
            return
        self.queue.put_nowait(invoice)


class FakeInvoiceBackend:
    """An LND node's invoices, with known preimages, that a test pays or cancels by hand.

    Invoices are real BOLT11 payment requests (regtest, signed with ``NODE_KEY``).
    ``subscribe_invoices`` behaves like LND's SubscribeInvoices: it first replays the invoices
    added after ``add_index`` (in add order, each in its current state), then, separately,
    those settled after ``settle_index`` (in settle order), so a settled invoice can come
    twice; 0 replays nothing. Then it streams adds and settlements live. As in LND, that stream
    never carries a CANCELED or ACCEPTED invoice, replayed or live: ``cancel()`` shows only in
    ``lookup_invoice`` (and the single-invoice streams). Failures: ``unavailable`` makes every
    call fail; ``fail_subscriptions = n`` makes the next ``n`` subscriptions fail at once;
    ``disconnect()`` breaks the live streams (single-invoice ones too).

    Hold invoices as LND's invoicesrpc: ``add_hold_invoice`` (the caller's hash, no preimage
    known here), ``hold_payment()`` (a payer's HTLC arrives: OPEN -> ACCEPTED), then
    ``settle_invoice`` (ACCEPTED only: an OPEN one is refused with "invoice still open", a
    settled or cancelled one with "invoice already settled"/"already canceled") or
    ``cancel_invoice`` (any but a settled one, a plain invoice too; cancelling a cancelled
    one succeeds). The refusals are the classes the LND client maps LND's words to.
    ``add_invoice`` with a ``description_hash`` makes an invoice with an ``h`` tag instead of
    ``d``, as LND does; like LND it refuses a memo with it, or a hash that is not 32 bytes.
    ``subscribe_single_invoice`` sends the current state first (nothing for an unknown hash:
    LND waits for it to be created), then each change: ACCEPTED, SETTLED, CANCELED. The
    all-invoices stream reports the hold invoice's add and its settlement only.
    ``settled``/``cancelled`` count the calls that did it, ``single_subscriptions`` the
    single-invoice subscriptions asked for.
    """

    def __init__(self, clock: FakeClock | None = None) -> None:
        self.clock = clock or FakeClock()
        self.invoices: dict[bytes, Invoice] = {}
        self.preimages: dict[bytes, Preimage] = {}
        self.unavailable = False
        self.fail_subscriptions = 0
        self.subscriptions: list[tuple[int, int]] = []  # (add_index, settle_index) per call
        self.connections = 0  # subscriptions that went live
        self.lookups = 0  # lookup_invoice calls
        self._changed = asyncio.Condition()
        self._add_index = 0
        self._settle_index = 0
        self._subscribers: set[_Subscriber] = set()
        self.hold_invoices: dict[bytes, int] = {}  # payment hash -> its cltv_expiry
        self.settled: collections.Counter[bytes] = collections.Counter()
        self.cancelled: collections.Counter[bytes] = collections.Counter()
        self.single_subscriptions = 0
        self._single: dict[bytes, set[asyncio.Queue[Invoice | None]]] = {}
        # ListChannels' answer; None: refused, as a macaroon without offchain:read is.
        self.channels: tuple[ChannelBalance, ...] | None = ()

    @property
    def live_streams(self) -> int:
        """How many subscriptions are open now."""
        return len(self._subscribers)

    def _check(self) -> None:
        if self.unavailable:
            raise errors.BackendUnavailable("fake node is down")

    def _publish(self, invoice: Invoice) -> None:
        for subscriber in self._subscribers:
            subscriber.offer(invoice)
        for queue in self._single.get(invoice.payment_hash, ()):
            queue.put_nowait(invoice)

    def _change(self, invoice: Invoice) -> None:
        """A state only the single-invoice streams report (ACCEPTED, CANCELED)."""
        self.invoices[invoice.payment_hash] = invoice
        for queue in self._single.get(invoice.payment_hash, ()):
            queue.put_nowait(invoice)

    async def add_invoice(
        self, amount_msat: Msat, memo: str, expiry: int, description_hash: bytes = b""
    ) -> NewInvoice:
        self._check()
        if description_hash and (memo or len(description_hash) != 32):
            raise errors.BackendBadRequest("invalid description hash, or both it and a memo")
        preimage = Preimage(secrets.token_bytes(32))
        payment_hash = PaymentHash(hashlib.sha256(preimage).digest())
        invoice = self._new_invoice(payment_hash, amount_msat, memo, expiry, description_hash)
        self.invoices[payment_hash] = invoice
        self.preimages[payment_hash] = preimage
        self._publish(invoice)
        return NewInvoice(payment_hash, invoice.payment_request, self._add_index)

    def _new_invoice(
        self,
        payment_hash: PaymentHash,
        amount_msat: Msat,
        memo: str,
        expiry: int,
        description_hash: bytes = b"",
    ) -> Invoice:
        """An OPEN invoice with the next add index (the caller records and publishes it)."""
        self._add_index += 1
        created_at = int(self.clock.now())
        return Invoice(
            payment_hash=payment_hash,
            payment_request=make_invoice(
                payment_hash,
                amount_msat or None,  # LND: 0 makes an invoice without an amount
                created_at=created_at,
                expiry=expiry,
                description=memo,
                description_hash=description_hash,
            ),
            memo=memo,
            amount_msat=amount_msat,
            amount_paid_msat=Msat(0),
            state=InvoiceState.OPEN,
            created_at=created_at,
            settled_at=None,
            expiry=expiry,
            add_index=self._add_index,
            settle_index=0,
        )

    async def add_hold_invoice(
        self,
        payment_hash: PaymentHash,
        amount_msat: Msat,
        memo: str,
        expiry: int,
        *,
        cltv_expiry: int = 0,
    ) -> NewInvoice:
        self._check()
        if payment_hash in self.invoices:
            raise errors.InvoiceAlreadyExists("invoice with payment hash already exists")
        invoice = self._new_invoice(payment_hash, amount_msat, memo, expiry)
        self.invoices[payment_hash] = invoice
        self.hold_invoices[payment_hash] = cltv_expiry or MIN_FINAL_CLTV_EXPIRY
        self._publish(invoice)
        return NewInvoice(payment_hash, invoice.payment_request, self._add_index)

    def hold_payment(self, payment_hash: bytes) -> None:
        """A payer's HTLC reaches an open hold invoice: it is held, the invoice ACCEPTED."""
        invoice = self.invoices[payment_hash]
        if payment_hash not in self.hold_invoices or invoice.state is not InvoiceState.OPEN:
            raise ValueError(f"not an open hold invoice: {invoice.state.value}")
        self._change(
            dataclasses.replace(
                invoice, state=InvoiceState.ACCEPTED, amount_paid_msat=invoice.amount_msat
            )
        )

    async def settle_invoice(self, preimage: Preimage) -> None:
        self._check()
        payment_hash = hashlib.sha256(preimage).digest()
        invoice = self.invoices.get(payment_hash)
        if invoice is None:
            raise errors.InvoiceNotFound("unable to locate invoice")
        if invoice.state is not InvoiceState.ACCEPTED:
            # LND's words, mapped by the LND client as the real node's are.
            raise {
                InvoiceState.OPEN: errors.BackendBadRequest("invoice still open"),
                InvoiceState.SETTLED: errors.InvoiceAlreadySettled("invoice already settled"),
                InvoiceState.CANCELED: errors.InvoiceAlreadyCanceled("invoice already canceled"),
            }[invoice.state]
        self._settle_index += 1
        self.settled[payment_hash] += 1
        self.preimages[payment_hash] = preimage
        settled = dataclasses.replace(
            invoice,
            state=InvoiceState.SETTLED,
            settled_at=int(self.clock.now()),
            settle_index=self._settle_index,
            preimage=preimage,
        )
        self.invoices[payment_hash] = settled
        self._publish(settled)

    async def cancel_invoice(self, payment_hash: PaymentHash) -> None:
        self._check()
        invoice = self.invoices.get(payment_hash)
        if invoice is None:
            raise errors.InvoiceNotFound("unable to locate invoice")
        if invoice.state is InvoiceState.SETTLED:
            raise errors.InvoiceAlreadySettled("invoice already settled")
        if invoice.state is not InvoiceState.CANCELED:
            self.cancelled[payment_hash] += 1
            self._change(
                dataclasses.replace(invoice, state=InvoiceState.CANCELED, amount_paid_msat=Msat(0))
            )

    async def subscribe_single_invoice(
        self, payment_hash: PaymentHash
    ) -> AsyncGenerator[Invoice, None]:
        self.single_subscriptions += 1
        self._check()
        queue: asyncio.Queue[Invoice | None] = asyncio.Queue()
        current = self.invoices.get(payment_hash)
        if current is not None:
            queue.put_nowait(current)
        self._single.setdefault(payment_hash, set()).add(queue)
        try:
            while True:
                event = await queue.get()
                if event is None:
                    raise errors.BackendUnavailable("fake subscription broken")
                self._check()
                yield event
        finally:
            queues = self._single.get(payment_hash, set())
            queues.discard(queue)
            if not queues:
                self._single.pop(payment_hash, None)

    @property
    def live_single_streams(self) -> int:
        """How many single-invoice subscriptions are open now."""
        return sum(len(queues) for queues in self._single.values())

    def pay(self, payment_hash: bytes) -> Preimage:
        """Settle an open invoice as if a payer had paid it; returns the preimage it learns."""
        invoice = self.invoices[payment_hash]
        if payment_hash in self.hold_invoices:
            raise ValueError("a hold invoice: hold_payment() it, the gateway settles it")
        if invoice.state is not InvoiceState.OPEN:
            raise ValueError(f"invoice is {invoice.state.value}, not OPEN")
        self._settle_index += 1
        settled = dataclasses.replace(
            invoice,
            amount_paid_msat=invoice.amount_msat,
            state=InvoiceState.SETTLED,
            settled_at=int(self.clock.now()),
            settle_index=self._settle_index,
            preimage=self.preimages[payment_hash],
        )
        self.invoices[payment_hash] = settled
        self._publish(settled)
        return self.preimages[payment_hash]

    def cancel(self, payment_hash: bytes) -> None:
        """Cancel an invoice, as LND does when it expires (or a held HTLC nears its expiry);
        only the single-invoice streams report it.

        As with LND's CancelInvoice, a canceled one stays so and a settled one cannot be.
        """
        invoice = self.invoices[payment_hash]
        if invoice.state is InvoiceState.SETTLED:
            raise ValueError("invoice already settled")
        self._change(dataclasses.replace(invoice, state=InvoiceState.CANCELED))

    def disconnect(self) -> None:
        """Break every live subscription: each fails with BackendUnavailable."""
        for subscriber in self._subscribers:
            subscriber.queue.put_nowait(None)
        for queues in self._single.values():
            for queue in queues:
                queue.put_nowait(None)

    async def wait_connections(self, total: int) -> None:
        """Wait until ``total`` subscriptions have gone live since the fake was made."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.connections >= total)

    async def wait_subscriptions(self, total: int) -> None:
        """Wait until ``subscribe_invoices`` has been called ``total`` times, failed or not."""
        async with self._changed:
            await self._changed.wait_for(lambda: len(self.subscriptions) >= total)

    async def list_channels(self) -> tuple[ChannelBalance, ...]:
        self._check()
        if self.channels is None:
            raise errors.BackendPermissionDenied("LND at fake: permission denied")
        return self.channels

    async def lookup_invoice(self, payment_hash: PaymentHash) -> Invoice:
        self.lookups += 1
        self._check()
        try:
            return self.invoices[payment_hash]
        except KeyError:
            raise errors.InvoiceNotFound("no such invoice") from None

    def _backlog(self, add_index: int, settle_index: int) -> list[Invoice]:
        """What LND replays to a new subscription: adds, then settlements, OPEN or SETTLED."""
        invoices = self.invoices.values()
        added = sorted(
            (invoice for invoice in invoices if add_index and invoice.add_index > add_index),
            key=lambda invoice: invoice.add_index,
        )
        settled = sorted(
            (
                invoice
                for invoice in invoices
                if settle_index and invoice.settle_index > settle_index
            ),
            key=lambda invoice: invoice.settle_index,
        )
        streamed = (InvoiceState.OPEN, InvoiceState.SETTLED)
        return [invoice for invoice in (*added, *settled) if invoice.state in streamed]

    async def subscribe_invoices(
        self, add_index: int = 0, settle_index: int = 0
    ) -> AsyncGenerator[Invoice, None]:
        self.subscriptions.append((add_index, settle_index))
        async with self._changed:
            self._changed.notify_all()
        self._check()
        if self.fail_subscriptions > 0:
            self.fail_subscriptions -= 1
            raise errors.BackendUnavailable("fake subscription refused")
        # Backlog and registration happen without a pause, so no event falls between them.
        subscriber = _Subscriber(add_index, settle_index)
        for invoice in self._backlog(add_index, settle_index):
            subscriber.queue.put_nowait(invoice)
        self._subscribers.add(subscriber)
        self.connections += 1
        async with self._changed:
            self._changed.notify_all()
        try:
            while True:
                event = await subscriber.queue.get()
                if event is None:
                    raise errors.BackendUnavailable("fake subscription broken")
                self._check()
                yield event
        finally:
            self._subscribers.discard(subscriber)


class FakeGateway:
    """A ``GatewayFactory`` for the web adapters: an ``L402Service`` over the fakes.

    Each entry builds the service (and runs an ``InvoiceWatcher``, as ``running_gateway``
    does); ``entered`` and ``exited`` count the lifecycle.
    """

    def __init__(self, rules: Sequence[Rule], **options: Any) -> None:
        self.clock = FakeClock()
        self.backend = FakeInvoiceBackend(self.clock)
        self.store = MemoryStore()
        self.pricing = Pricing(rules)
        self.options = options
        self.entered = 0
        self.exited = 0
        self.service: L402Service | None = None

    @contextlib.asynccontextmanager
    async def __call__(self) -> AsyncIterator[L402Service]:
        self.entered += 1
        self.service = L402Service(
            pricing=self.pricing,
            backend=self.backend,
            store=self.store,
            clock=self.clock,
            **self.options,
        )
        watcher = InvoiceWatcher(self.backend, self.store, initial_backoff=0.01)
        try:
            async with Supervisor(initial_backoff=0.01) as supervisor:
                supervisor.start("l402-invoice-watcher", watcher.run)
                yield self.service
        finally:
            self.service = None
            self.exited += 1

    def pay(self, challenge: Mapping[str, Any]) -> str:
        """Pay a 402's problem+json body; the ``Authorization`` value for the retry."""
        preimage = self.backend.pay(bytes.fromhex(challenge["payment_hash"]))
        return f"L402 {challenge['macaroon']}:{preimage.hex()}"


class FakePayer:
    """The gateway's node paying invoices (withdrawals), as routerrpc does: ``send_payment``
    pays a BOLT11 invoice, ``send_keysend`` a node by keysend (payouts; each recorded in
    ``keysends`` as (dest, amount, preimage)), ``lookup_payment`` reports a payment as
    TrackPaymentV2 does.

    As LND, it refuses a second payment of a hash that is in flight or succeeded
    (``InvoiceAlreadyExists``) and lets a failed one be tried again. The test steers what
    comes next: ``fail_with`` (a failure reason: payments end FAILED), ``refuse`` (raised
    before a payment starts), ``hold`` (payments stay IN_FLIGHT until it is set),
    ``drop_connection`` (the call fails with ``BackendUnavailable`` after the payment went
    through, like a stream lost at the wrong moment), ``unavailable`` (every call fails).
    ``paid`` counts the successful payments of each hash.
    """

    def __init__(
        self, *, network: str = "regtest", pubkey: str = NODE_PUBKEY, fee_msat: int = 0
    ) -> None:
        self.network = network
        self.pubkey = pubkey
        self.fee_msat = Msat(fee_msat)
        self.payments: dict[bytes, Payment] = {}
        self.paid: collections.Counter[bytes] = collections.Counter()
        self.fee_limits: list[int] = []  # max_fee_msat of every send
        self.keysends: list[tuple[bytes, Msat, Preimage]] = []  # every keysend asked for
        self.fail_with: str | None = None
        self.refuse: errors.BackendError | None = None
        self.hold: asyncio.Event | None = None
        self.drop_connection = False
        self.unavailable = False

    def _check(self) -> None:
        if self.unavailable:
            raise errors.BackendUnavailable("fake payer is down")

    async def get_info(self) -> NodeInfo:
        self._check()
        return NodeInfo(
            pubkey=self.pubkey,
            alias="fake",
            network=self.network,
            block_height=1000,
            synced_to_chain=True,
            num_active_channels=1,
            version="fake",
        )

    async def send_payment(
        self, payment_request: str, *, max_fee_msat: Msat, payment_timeout: float
    ) -> Payment:
        self._check()
        if self.refuse is not None:
            raise self.refuse
        invoice = bolt11.decode(payment_request)
        return await self._pay(
            PaymentHash(invoice.payment_hash),
            Msat(invoice.amount_msat or 0),
            invoice.payee,
            max_fee_msat,
        )

    async def send_keysend(
        self,
        dest: bytes,
        amount_msat: Msat,
        preimage: Preimage,
        *,
        max_fee_msat: Msat,
        payment_timeout: float,
    ) -> Payment:
        self._check()
        if self.refuse is not None:
            raise self.refuse
        if dest.hex() == self.pubkey:
            raise errors.BackendBadRequest("no self-payments allowed")  # LND's refusal
        self.keysends.append((dest, amount_msat, preimage))
        payment_hash = PaymentHash(hashlib.sha256(preimage).digest())
        return await self._pay(payment_hash, amount_msat, dest, max_fee_msat)

    async def _pay(
        self, payment_hash: PaymentHash, amount_msat: Msat, payee: bytes, max_fee_msat: Msat
    ) -> Payment:
        """A payment of ``payment_hash`` as LND makes it: in flight, then as the test says."""
        earlier = self.payments.get(payment_hash)
        if earlier is not None and earlier.status is not PaymentStatus.FAILED:
            raise errors.InvoiceAlreadyExists("payment is in transition or already paid")
        self.fee_limits.append(max_fee_msat)
        in_flight = Payment(
            payment_hash=payment_hash,
            status=PaymentStatus.IN_FLIGHT,
            amount_msat=amount_msat,
            fee_msat=Msat(0),
            route=(),
        )
        self.payments[payment_hash] = in_flight
        if self.hold is not None:
            await self.hold.wait()
        if self.fail_with is not None:
            self.payments[payment_hash] = dataclasses.replace(
                in_flight, status=PaymentStatus.FAILED
            )
            raise errors.PaymentFailed(self.fail_with, payment_hash)
        self.paid[payment_hash] += 1
        payment = dataclasses.replace(
            in_flight,
            status=PaymentStatus.SUCCEEDED,
            fee_msat=self.fee_msat,
            route=(payee.hex(),),
        )
        self.payments[payment_hash] = payment
        if self.drop_connection:
            raise errors.BackendUnavailable("fake payment stream lost")
        return payment

    async def lookup_payment(self, payment_hash: PaymentHash) -> Payment | None:
        self._check()
        return self.payments.get(payment_hash)


def fake_lnd_client(
    backend: FakeInvoiceBackend,
) -> Callable[..., contextlib.AbstractAsyncContextManager[FakeInvoiceBackend]]:
    """Stands in for ``LndClient`` in ``gateway.runtime``: every connection is ``backend``."""

    @contextlib.asynccontextmanager
    async def connect(_settings: object, **_options: object) -> AsyncIterator[FakeInvoiceBackend]:
        yield backend

    return connect
