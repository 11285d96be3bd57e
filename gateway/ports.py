"""What the core needs from the outside world, as small Protocols and frozen values.

Amounts are integer millisatoshis everywhere. Optional abilities (hold invoices, paying)
are separate Protocols so a backend can lack them honestly.
"""

from __future__ import annotations

import enum
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Collection, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, replace
from typing import NewType, Protocol, runtime_checkable

PaymentHash = NewType("PaymentHash", bytes)
Preimage = NewType("Preimage", bytes)
Msat = NewType("Msat", int)


class InvoiceState(enum.Enum):
    OPEN = "OPEN"
    ACCEPTED = "ACCEPTED"  # hold invoice: HTLCs locked in, waiting for settle or cancel
    SETTLED = "SETTLED"
    CANCELED = "CANCELED"
    # Ours, not the node's: past its expiry the node still reported it OPEN, or no longer knew
    # it. Never goes back to OPEN; a SETTLED or CANCELED from the node still replaces it.
    EXPIRED = "EXPIRED"

    def may_become(self, new: InvoiceState) -> bool:
        """Whether a tracked invoice in this state takes an update to ``new``: the one place
        the state rules live (every store applies them through ``InvoiceRecord.updated``).

        SETTLED and CANCELED are final, so a replayed or stale report changes nothing.
        EXPIRED is entered only from OPEN (never over a held payment) and left only for the
        node's final word. ACCEPTED may go back to OPEN, as LND's hold invoices do.
        """
        if self in _FINAL_STATES:
            return False
        if self is InvoiceState.EXPIRED:
            return new in _FINAL_STATES
        if new is InvoiceState.EXPIRED:
            return self is InvoiceState.OPEN
        return True


_FINAL_STATES = frozenset({InvoiceState.SETTLED, InvoiceState.CANCELED})


class PaymentStatus(enum.Enum):
    INITIATED = "INITIATED"
    IN_FLIGHT = "IN_FLIGHT"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"


@dataclass(frozen=True, slots=True)
class NewInvoice:
    """An invoice the node has just created."""

    payment_hash: PaymentHash
    payment_request: str
    add_index: int


@dataclass(frozen=True, slots=True)
class Invoice:
    """An invoice as the node reports it, in any state."""

    payment_hash: PaymentHash
    payment_request: str
    memo: str
    amount_msat: Msat
    amount_paid_msat: Msat
    state: InvoiceState
    created_at: int
    settled_at: int | None
    expiry: int
    add_index: int
    settle_index: int
    # Secret once settled; kept out of repr so it never lands in a log line.
    preimage: Preimage | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class NodeInfo:
    pubkey: str
    alias: str
    network: str
    block_height: int
    synced_to_chain: bool
    num_active_channels: int
    version: str


@dataclass(frozen=True, slots=True)
class DecodedPaymentRequest:
    destination: str
    payment_hash: PaymentHash
    amount_msat: Msat
    timestamp: int
    expiry: int
    description: str
    cltv_expiry: int


@dataclass(frozen=True, slots=True)
class Payment:
    """The final state of an outgoing payment."""

    payment_hash: PaymentHash
    status: PaymentStatus
    amount_msat: Msat
    fee_msat: Msat
    # Pubkeys of the successful route, first hop to destination.
    route: tuple[str, ...]
    preimage: Preimage | None = field(default=None, repr=False)


class InvoiceBackend(Protocol):
    """Creates invoices and reports their state changes."""

    async def add_invoice(
        self, amount_msat: Msat, memo: str, expiry: int, description_hash: bytes = b""
    ) -> NewInvoice:
        """A new invoice described by ``memo``, or by ``description_hash`` (32 bytes: the
        SHA-256 of an LNURL-pay metadata; the memo is then "", BOLT11 allows one of them)."""

    async def lookup_invoice(self, payment_hash: PaymentHash) -> Invoice: ...

    def subscribe_invoices(
        self, add_index: int = 0, settle_index: int = 0
    ) -> AsyncGenerator[Invoice, None]: ...


class HoldInvoiceBackend(Protocol):
    """Invoices whose preimage the caller holds and reveals (or not) after payment."""

    async def add_hold_invoice(
        self,
        payment_hash: PaymentHash,
        amount_msat: Msat,
        memo: str,
        expiry: int,
        *,
        cltv_expiry: int = 0,
    ) -> NewInvoice:
        """``cltv_expiry``: the final hop's CLTV delta in blocks (0: the node's default)."""

    async def settle_invoice(self, preimage: Preimage) -> None: ...

    async def cancel_invoice(self, payment_hash: PaymentHash) -> None: ...

    def subscribe_single_invoice(
        self, payment_hash: PaymentHash
    ) -> AsyncGenerator[Invoice, None]: ...


class Payer(Protocol):
    """Pays BOLT11 payment requests."""

    async def send_payment(
        self, payment_request: str, *, max_fee_msat: Msat, payment_timeout: float
    ) -> Payment: ...

    async def lookup_payment(self, payment_hash: PaymentHash) -> Payment | None:
        """The current state of an outgoing payment (any status, IN_FLIGHT included).

        None when this payer never started a payment with that hash. A paying client uses it
        to learn, after a crash, whether a payment it had begun went through.
        """


class Clock(Protocol):
    """Wall-clock time in seconds since the epoch (injected so tests can move it)."""

    def now(self) -> float: ...


class SystemClock:
    """The real clock."""

    # The builtin itself, not a method around it: read on every paid request.
    now = staticmethod(time.time)


@dataclass(frozen=True, slots=True)
class Share:
    """One payee's part of every payment on a route: ``ppm`` parts per million of it, plus
    ``fixed_msat`` per payment (either may be 0, not both). ``gateway.splits`` allocates
    and checks them."""

    payee: str
    ppm: int = 0
    fixed_msat: Msat = Msat(0)


# A route's shares, in config order; () = no split: the merchant keeps everything.
Split = tuple[Share, ...]


# The service of an invoice issued for a tip jar (``tip:<jar name>``) or a payment link
# (``link:<link id>``) rather than a priced request: route services cannot hold a colon
# (it would break the ``services=name:tier`` caveat), so these never clash with a route's.
TIP_SERVICE = "tip:"
LINK_SERVICE = "link:"


@dataclass(frozen=True, slots=True)
class InvoiceRecord:
    """An invoice the gateway issued for a challenge, as the store tracks it."""

    payment_hash: PaymentHash
    payment_request: str
    amount_msat: Msat
    token_id: bytes
    service: str
    method: str
    path: str
    state: InvoiceState
    created_at: float
    expires_at: float
    add_index: int
    settle_index: int = 0
    amount_paid_msat: Msat = Msat(0)
    settled_at: float | None = None
    # Credit bought for the account of ``token_id``: settling it credits the account (in the
    # same write as the state, once per payment hash: SETTLED is final).
    buys_credit: bool = False
    # The route's split when the invoice was issued: settling an invoice that buys no credit
    # credits each payee's share to the ledger in the same write (``Store.apply_update``).
    split: Split = ()
    # The comment (LUD-12) a payer sent with a tip or a payment link's LNURL-pay request.
    comment: str = ""

    @property
    def tip_jar(self) -> str:
        """The tip jar this invoice fills (its service is ``tip:<name>``); "" for others."""
        return (
            self.service.removeprefix(TIP_SERVICE) if self.service.startswith(TIP_SERVICE) else ""
        )

    @property
    def link_id(self) -> str:
        """The payment link this invoice pays (its service is ``link:<id>``); "" for others."""
        return (
            self.service.removeprefix(LINK_SERVICE) if self.service.startswith(LINK_SERVICE) else ""
        )

    def updated(self, update: InvoiceUpdate) -> InvoiceRecord:
        """This record after ``update``; itself when its state may not become the update's.

        The update's fields replace the record's, except that ``settle_index`` only grows.
        """
        if not self.state.may_become(update.state):
            return self
        return replace(
            self,
            state=update.state,
            settle_index=max(self.settle_index, update.settle_index),
            amount_paid_msat=update.amount_paid_msat,
            settled_at=update.settled_at,
        )


@dataclass(frozen=True, slots=True)
class InvoiceUpdate:
    """A state change of a tracked invoice, as reported by the node."""

    payment_hash: PaymentHash
    state: InvoiceState
    settle_index: int
    amount_paid_msat: Msat
    settled_at: float | None

    @classmethod
    def of(cls, invoice: Invoice) -> InvoiceUpdate:
        """The update an invoice reported by the node makes to its tracked record."""
        return cls(
            payment_hash=invoice.payment_hash,
            state=invoice.state,
            settle_index=invoice.settle_index,
            amount_paid_msat=invoice.amount_paid_msat,
            settled_at=float(invoice.settled_at) if invoice.settled_at else None,
        )


@dataclass(frozen=True, slots=True)
class Cursor:
    """The highest add and settle indices the watcher has processed."""

    add_index: int = 0
    settle_index: int = 0


@dataclass(frozen=True, slots=True)
class RevenueBucket:
    """Settled invoices of one service in one time bucket (``Store.revenue``)."""

    start: int  # unix time the bucket begins: a multiple of its length
    service: str
    settled: int  # how many invoices settled in it
    amount_msat: Msat  # what they received


@dataclass(slots=True)
class AdminSlot:
    """Where the admin dashboard (``gateway.web.admin``) finds the gateway it shows: its
    store, and how to ask the node's inbound liquidity (None: not measured); filled in by
    ``running_gateway(..., admin=slot)`` while the gateway runs, None before and after."""

    store: Store | None = None
    liquidity: Callable[[], Awaitable[Liquidity]] | None = None


@dataclass(frozen=True, slots=True)
class Account:
    """A credit balance, keyed by the token id of the L402 tokens that draw on it (the first
    token and the top-ups minted for it share the id)."""

    token_id: bytes
    service: str
    credited_msat: Msat  # settled purchases and top-ups
    spent_msat: Msat  # charged for requests
    reserved_msat: Msat  # held by requests under way
    withdrawn_msat: Msat  # paid out (amount and fee), and held by withdrawals under way
    created_at: float
    last_used_at: float | None = None

    @property
    def balance_msat(self) -> Msat:
        """What the holder may still spend or withdraw."""
        return Msat(self.credited_msat - self.spent_msat - self.reserved_msat - self.withdrawn_msat)


@dataclass(frozen=True, slots=True)
class Reservation:
    """Credit held for one request under way; charged or released when it ends, or released
    by the sweeper once ``expires_at`` passes (the process serving it died)."""

    reservation_id: int
    token_id: bytes
    amount_msat: Msat
    expires_at: float


@dataclass(frozen=True, slots=True)
class Reserved:
    """What ``reserve`` did: ``reservation`` None when the balance did not cover the amount
    (or there is no account); ``balance_msat`` is the balance after it, in either case."""

    reservation: Reservation | None
    balance_msat: Msat


@dataclass(frozen=True, slots=True)
class Charge:
    """One request's charge to an account (its usage history)."""

    token_id: bytes
    at: float
    method: str
    path: str
    amount_msat: Msat


class WithdrawalState(enum.Enum):
    PENDING = "PENDING"  # the debit is committed; the payment may or may not be under way
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"  # definitely not paid: amount and fee reserve went back to the balance


@dataclass(frozen=True, slots=True)
class Withdrawal:
    """A balance paid out to an invoice of the holder's."""

    payment_hash: PaymentHash
    token_id: bytes
    payment_request: str
    amount_msat: Msat
    fee_reserve_msat: Msat  # debited with the amount; what the fee did not use goes back
    state: WithdrawalState
    created_at: float
    fee_msat: Msat = Msat(0)  # the routing fee paid, once SUCCEEDED
    resolved_at: float | None = None


@dataclass(frozen=True, slots=True)
class CreditTotals:
    """Every account together. They reconcile:
    ``received = consumed + withdrawn + pending_withdrawals + reserved + outstanding``."""

    accounts: int
    received_msat: Msat  # credited by settled purchases and top-ups
    consumed_msat: Msat  # charged for requests
    withdrawn_msat: Msat  # paid out, fees included
    pending_withdrawals_msat: Msat  # debited for withdrawals not yet resolved
    reserved_msat: Msat  # held by requests under way
    outstanding_msat: Msat  # the balances: what the operator owes the holders


class PayoutState(enum.Enum):
    PENDING = "PENDING"  # debited from the payee's accrued; the payment may be under way
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"  # definitely not paid: the debit went back to accrued


@dataclass(frozen=True, slots=True)
class Payout:
    """A payee's accrued shares paid out to them (``Store.begin_payout``)."""

    payment_hash: PaymentHash
    payee: str
    # The node pubkey (hex, keysend), or the Lightning Address / LNURL the invoice came from.
    destination: str
    payment_request: str  # the BOLT11 invoice fetched by LNURL-pay; "" for keysend
    amount_msat: Msat  # what the payee receives
    fee_reserve_msat: Msat  # the payment's routing fee limit
    # True: amount and fee reserve are debited from the payee's accrued (the reserve the fee
    # did not use goes back); False: only the amount (the merchant bears the fee).
    payee_pays_fee: bool
    state: PayoutState
    created_at: float
    fee_msat: Msat = Msat(0)  # the routing fee paid, once SUCCEEDED
    resolved_at: float | None = None
    failure: str = ""  # why it FAILED (fixed text from the node or the worker)

    @property
    def debit_msat(self) -> Msat:
        """What ``begin_payout`` moves from the payee's accrued to pending."""
        return Msat(self.amount_msat + (self.fee_reserve_msat if self.payee_pays_fee else 0))


@dataclass(frozen=True, slots=True)
class PayeeBalance:
    """One payee's running totals in the ledger (a row from its first share on)."""

    payee: str
    earned_msat: Msat  # every share credited to the payee
    paid_msat: Msat  # the amounts SUCCEEDED payouts delivered
    fees_msat: Msat  # the routing fees the payee bore (``payee_pays_fee``)
    pending_msat: Msat  # debited by PENDING payouts
    merchant_fees_msat: Msat  # the routing fees the merchant bore for this payee's payouts
    last_payout_at: float | None  # ``created_at`` of the latest SUCCEEDED payout

    @property
    def accrued_msat(self) -> Msat:
        """What the payee is owed and no payout is under way for."""
        return Msat(self.earned_msat - self.paid_msat - self.fees_msat - self.pending_msat)


@dataclass(frozen=True, slots=True)
class SplitTotals:
    """The whole split ledger. It reconciles: ``received = kept + earned`` and
    ``earned = paid + payee_fees + pending + accrued``, so ``received = (kept -
    merchant_fees) + paid + pending + accrued + payee_fees + merchant_fees``."""

    received_msat: Msat  # what payments on split routes brought in (settlements, charges)
    kept_msat: Msat  # the merchant's part of it (before the routing fees the merchant bore)
    earned_msat: Msat  # the payees' part of it
    paid_msat: Msat
    pending_msat: Msat
    accrued_msat: Msat
    payee_fees_msat: Msat
    merchant_fees_msat: Msat


class LinkState(enum.Enum):
    OPEN = "OPEN"  # payable
    PAID = "PAID"  # a single-use link, paid once: it takes no more payments
    EXPIRED = "EXPIRED"
    CANCELED = "CANCELED"  # by the merchant (``links cancel``)


@dataclass(frozen=True, slots=True)
class PaymentLink:
    """A payment link: a page (and an LNURL-pay endpoint) that takes payments of a fixed
    amount (``min_msat == max_msat``) or one the payer chooses within the bounds.

    A single-use link has at most one invoice that can pay it at any time, ``open_hash``: a
    new one replaces it only after the node cancelled it (``Store.add_link_invoice``), so
    it is never paid twice. A reusable link issues an invoice per payer."""

    link_id: str
    memo: str
    min_msat: Msat
    max_msat: Msat
    single_use: bool
    created_at: float
    expires_at: float | None  # None: never
    canceled_at: float | None = None
    paid_count: int = 0  # settled invoices, recorded with each settlement
    paid_msat: Msat = Msat(0)
    last_paid_at: float | None = None
    open_hash: PaymentHash | None = None  # single use: the invoice that may pay it now

    @property
    def fixed(self) -> bool:
        return self.min_msat == self.max_msat

    def state(self, now: float) -> LinkState:
        """PAID first: a single-use link paid before (or while) it was cancelled was paid."""
        if self.single_use and self.paid_count:
            return LinkState.PAID
        if self.canceled_at is not None:
            return LinkState.CANCELED
        if self.expires_at is not None and now >= self.expires_at:
            return LinkState.EXPIRED
        return LinkState.OPEN


class HeldState(enum.Enum):
    """Where a pay-on-success request (``settle = "on_success"``) stands. Its invoice is a
    hold invoice: the payer's HTLC is held while the stored request runs once, then the
    invoice is settled (the backend succeeded) or cancelled (the payer gets the money back).
    """

    WAITING = "WAITING"  # the hold invoice is issued and not (yet seen) paid
    RUNNING = "RUNNING"  # the payment is held and the request went to the backend: never again
    SUCCEEDED = "SUCCEEDED"  # the backend's answer settles it, stored: settle the invoice next
    FAILED = "FAILED"  # the backend failed, timed out or was interrupted: cancel next
    SETTLED = "SETTLED"  # the invoice is settled: the stored response is the payer's
    CANCELED = "CANCELED"  # the invoice is cancelled: the payer paid nothing
    EXPIRED = "EXPIRED"  # never paid; the stored request is gone

    def may_become(self, new: HeldState) -> bool:
        """Whether a held request in this state takes ``new``: the one place its rules live.

        WAITING -> RUNNING happens once (the request runs at most once). RUNNING ends as
        SUCCEEDED or FAILED; SUCCEEDED is settled (or cancelled by the node: an HTLC about to
        expire), FAILED cancelled; WAITING expires or is cancelled unpaid. SETTLED, CANCELED
        and EXPIRED are final.
        """
        return new in _HELD_NEXT[self]


_HELD_NEXT: dict[HeldState, frozenset[HeldState]] = {
    HeldState.WAITING: frozenset({HeldState.RUNNING, HeldState.EXPIRED, HeldState.CANCELED}),
    HeldState.RUNNING: frozenset({HeldState.SUCCEEDED, HeldState.FAILED}),
    HeldState.SUCCEEDED: frozenset({HeldState.SETTLED, HeldState.CANCELED}),
    HeldState.FAILED: frozenset({HeldState.CANCELED}),
    HeldState.SETTLED: frozenset(),
    HeldState.CANCELED: frozenset(),
    HeldState.EXPIRED: frozenset(),
}
# Not final: the executor still has something to do for them (run, settle, cancel, expire).
HELD_UNFINISHED = frozenset(
    {HeldState.WAITING, HeldState.RUNNING, HeldState.SUCCEEDED, HeldState.FAILED}
)
# The ``failure`` of a held request recorded CANCELED because the node settled its invoice,
# which the gateway did not (its request failed, or never ran): the payer paid all the same.
SETTLED_BY_NODE = "the node settled the invoice, not the gateway"


@dataclass(frozen=True, slots=True)
class StoredRequest:
    """A request as the backend is to get it: the method, the path and query as received
    (``target``), the headers the proxy forwards (its own X-Forwarded-* included) and the
    whole body."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    body: bytes = field(default=b"", repr=False)


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """The backend's answer to a held request, replayed to the payer."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes = field(default=b"", repr=False)


@dataclass(frozen=True, slots=True)
class HeldRequest:
    """A pay-on-success request and its hold invoice, as the store tracks it."""

    payment_hash: PaymentHash
    # Ours, made at the challenge: revealed to the node only to settle. Secret like a root key.
    preimage: Preimage = field(repr=False)
    token_id: bytes
    client: str  # the asking client's key (an IPv6 /64 counts as one): its cap applies
    # The paid token's grant as the backend is told it (``PaidToken``, serialised by the
    # service; the store keeps it as text).
    grant: str = field(repr=False)
    # Whole while WAITING or RUNNING; then only its method and target (no headers, empty
    # body): the body is not kept longer than needed, the target is what a replay must match.
    request: StoredRequest | None
    state: HeldState
    created_at: float
    expires_at: float  # the hold invoice's expiry: unpaid past it, it expires
    updated_at: float
    response: StoredResponse | None = None  # set with SUCCEEDED: the answer replayed
    failure: str = ""  # why it FAILED or was CANCELED, fixed text, e.g. "backend failed with 503"
    # When the row is deleted (set once it is final; a delivery shortens it).
    keep_until: float | None = None
    delivered_at: float | None = None  # first time the stored response was replayed


# Webhooks: the events the store writes in the same transaction as the change that causes
# them (its outbox), and their deliveries to the configured endpoints.
WEBHOOK_EVENT_TYPES = frozenset(
    {
        "invoice.settled",  # any tracked invoice settled
        "token.bought",  # a settled challenge invoice that does not buy credit
        "credit.deposited",  # a settled invoice that buys credit
        "invoice.expired",
        "invoice.canceled",
        "request.settled",  # a pay-on-success request's hold invoice settled
        "request.refunded",  # ... cancelled: the payer paid nothing
        "credit.withdrawn",  # a withdrawal succeeded
        "payout.succeeded",  # a payee's payout succeeded
        "payout.failed",  # ... failed: the amount is accrued again
        "tip.received",  # a tip jar's invoice settled
        "link.paid",  # a payment link's invoice settled
    }
)


class DeliveryState(enum.Enum):
    PENDING = "PENDING"  # to be sent (again) at ``next_attempt_at``
    DELIVERED = "DELIVERED"  # the endpoint answered 2xx
    DEAD = "DEAD"  # given up after ``max_attempts``; ``webhooks redeliver`` revives it


def webhook_retry_delay(attempts: int, initial: float, most: float) -> float:
    """Seconds before the next attempt after ``attempts`` failed ones: ``initial``, doubling
    with each, capped at ``most`` (the stores compute it in their write)."""
    return min(most, initial * 2.0 ** min(max(attempts - 1, 0), 60))


@dataclass(frozen=True, slots=True)
class WebhookEvent:
    """One event of the outbox. ``payload`` is the JSON text sent as the body, byte for byte
    on every retry (it holds no secret: no preimage, root key or macaroon)."""

    event_id: int
    type: str
    # What orders its events: "invoice:<hash hex>", "account:<token id hex>", "payee:<name>",
    # "tip:<jar name>", "link:<link id>".
    resource: str
    payload: str
    created_at: float
    # 32 random hex digits given at insert, never reused (unlike ``event_id``, which a
    # restored backup or a fresh database repeats): the ``webhook-id`` is "msg_" + it.
    webhook_id: str


@dataclass(frozen=True, slots=True)
class WebhookDelivery:
    """One event's delivery to one endpoint."""

    event_id: int
    endpoint: str
    event_type: str
    state: DeliveryState
    attempts: int
    next_attempt_at: float
    last_status: int | None = None  # the last HTTP status answered; None: none (or no answer)
    last_error: str = ""  # why the last attempt failed, fixed text
    delivered_at: float | None = None


@dataclass(frozen=True, slots=True)
class InvoiceTotal:
    """The tracked invoices of one service in one state (``StoreOperations.invoice_totals``).
    ``received_msat`` is what settled ones received (``amount_paid_msat``, or
    ``amount_msat`` where the node reported none paid); 0 in the other states."""

    service: str
    state: InvoiceState
    count: int
    amount_msat: Msat
    received_msat: Msat


@dataclass(frozen=True, slots=True)
class ChannelBalance:
    """One channel as the node lists it, in msat. ``remote_reserve_msat`` is the reserve
    the remote side must keep (LND's ``remote_constraints.chan_reserve_sat``): it cannot
    send that part, so it never reaches us."""

    active: bool
    remote_balance_msat: Msat
    remote_reserve_msat: Msat

    @property
    def inbound_msat(self) -> Msat:
        return Msat(max(0, self.remote_balance_msat - self.remote_reserve_msat))


class ChannelBackend(Protocol):
    """Lists the node's open channels (LND: ListChannels, macaroon ``offchain:read``)."""

    async def list_channels(self) -> tuple[ChannelBalance, ...]: ...


@dataclass(frozen=True, slots=True)
class Liquidity:
    """What the node can receive: the inbound of its active channels together
    (``total_msat``) and of the largest one (``largest_msat``: the most one single-path
    payment can bring). ``known`` False: the node would not say (the macaroon lacks
    ``offchain:read``, or the node is unavailable: ``reason`` says which), and the amounts
    are 0, not measured."""

    total_msat: Msat
    largest_msat: Msat
    channels: int
    known: bool
    reason: str = ""  # why not known (no secrets); empty when known


class Meter(Protocol):
    """What the core reports for metrics. Every hook is cheap and never raises; labels are
    bounded (service names, statuses, fixed reason words, RPC method names): never a token
    id, a payment hash or a path."""

    def challenge_issued(self, service: str) -> None: ...

    def paid_request(self, service: str) -> None: ...

    def refused(self, status: int, reason: str) -> None:
        """``reason``: a word from a fixed vocabulary (``gateway.service.refusal_label``)."""

    def rate_limited(self, limit: str) -> None:
        """``limit``: challenges, redeems or held."""

    def lnd_call(self, method: str, seconds: float, error: str | None) -> None:
        """One node RPC: its name, how long it took, the error class name if it failed."""

    def watcher_event(self) -> None:
        """The watcher heard from the node (a stream event or a finished reconciliation)."""

    def watcher_reconnect(self) -> None: ...

    def upstream_call(self, seconds: float, error: str | None) -> None:
        """One request forwarded upstream; ``error`` a fixed word if it got no answer."""

    def response(self, status: int) -> None:
        """One response of the web adapter, whoever made it (its own refusals included)."""

    def liquidity(self, liquidity: Liquidity) -> None: ...


class NoMeter:
    """The meter when metrics are off: does nothing."""

    def challenge_issued(self, service: str) -> None:
        pass

    def paid_request(self, service: str) -> None:
        pass

    def refused(self, status: int, reason: str) -> None:
        pass

    def rate_limited(self, limit: str) -> None:
        pass

    def lnd_call(self, method: str, seconds: float, error: str | None) -> None:
        pass

    def watcher_event(self) -> None:
        pass

    def watcher_reconnect(self) -> None:
        pass

    def upstream_call(self, seconds: float, error: str | None) -> None:
        pass

    def response(self, status: int) -> None:
        pass

    def liquidity(self, liquidity: Liquidity) -> None:
        pass


NO_METER: Meter = NoMeter()


@dataclass(slots=True)
class MetricsSlot:
    """Where a web adapter finds the metrics of the gateway it serves: the meter the
    upstream calls report to, and ``exposition`` (the Prometheus text and its content
    type); filled in by ``running_gateway(..., metrics=slot)`` while the gateway runs."""

    meter: Meter = field(default_factory=NoMeter)
    exposition: Callable[[], Awaitable[tuple[bytes, str]]] | None = None


class StoreOperations(Protocol):
    """The store's reads and writes. Called on the ``Store``, each is atomic on its own;
    called on a transaction (``Store.transaction()``), they commit or roll back together.

    Every write is idempotent, so a replayed event or a retried request is harmless.
    """

    async def put_root_key(self, key_id: bytes, token_id: bytes, root_key: bytes) -> None:
        """Store a token's root key under ``key_id`` = sha256(macaroon identifier).

        Storing the same key again is a no-op; a *different* root key under an existing
        ``key_id`` raises ``StoreError`` (the identifier embeds a random token id, so that is
        a bug, and keeping either key silently would leave a minted macaroon unverifiable).
        """

    async def get_root_key(self, key_id: bytes) -> bytes | None: ...

    async def revoke_token(self, token_id: bytes) -> bool:
        """Delete the token's root key; True if there was one."""

    async def add_invoice(self, record: InvoiceRecord) -> None:
        """Record a newly issued invoice; a second call for the same hash changes nothing."""

    async def apply_update(self, update: InvoiceUpdate) -> InvoiceRecord | None:
        """Move a tracked invoice to a new state by the rules of ``InvoiceState.may_become``:
        the one way an invoice's state is written.

        Returns the record as stored afterwards (unchanged when the rules refuse the update),
        or None if the hash is not tracked.
        """

    async def get_invoice(self, payment_hash: PaymentHash) -> InvoiceRecord | None: ...

    async def list_invoices(
        self,
        state: InvoiceState | None = None,
        limit: int | None = None,
        service: str | None = None,
    ) -> list[InvoiceRecord]:
        """Newest first, optionally only those in ``state`` and only those of ``service``
        (``link:<id>``: one payment link's)."""

    async def invoice_totals(self) -> list[InvoiceTotal]:
        """Every tracked invoice counted per service and state, in one aggregate query (for
        the metrics scrape): how many, their amounts, and what settled ones received."""

    async def list_overdue(self, expired_before: float, limit: int) -> list[InvoiceRecord]:
        """OPEN invoices whose ``expires_at`` is before ``expired_before``, the earliest
        expiry first, at most ``limit`` of them."""

    async def revenue(self, since: float, bucket_seconds: int) -> list[RevenueBucket]:
        """What settled invoices received, per service and per time bucket: every SETTLED
        invoice whose ``settled_at`` (its ``created_at`` when the node gave none) is at or
        after ``since``, in buckets ``bucket_seconds`` long counted from the epoch (so a
        bucket of 3600 is a UTC hour). Sums ``amount_paid_msat`` (``amount_msat`` where the
        node reported none paid, as a credit purchase counts it). Only buckets with a
        settlement, ordered by ``start`` then ``service``. ``ValueError`` for a bucket of
        less than one second.

        An invoice whose ``expires_at`` is more than 15 days before ``since`` is not read
        (``gateway.store.credit.SETTLED_AFTER_EXPIRY``): no node settles one that late, and
        so the query does not read the whole history."""

    async def list_open_credit_invoices(self, token_id: bytes, limit: int) -> list[InvoiceRecord]:
        """The OPEN invoices that buy credit for the account of ``token_id`` (its purchase
        and top-ups), newest first, at most ``limit`` of them: the payments a refused request
        may ask the node about. Found by token id, so it reads only that token's invoices."""

    async def prune_unpaid(self, expired_before: float, limit: int) -> int:
        """Delete at most ``limit`` CANCELED or EXPIRED invoices whose ``expires_at`` is before
        ``expired_before``, each with its own root key (the one under its identifier's key
        id), and a token's remaining root keys once its last invoice is gone; returns how many
        invoices went.

        A settled invoice and its root key are never deleted; running it again is harmless.
        """

    async def get_cursor(self) -> Cursor: ...

    async def save_cursor(self, cursor: Cursor) -> None:
        """Advance the cursor; each index only ever grows."""

    # Credit accounts (``billing = "credit"`` routes). Amounts never go negative: a debit
    # the balance does not cover is refused as a whole, atomically, across processes.

    async def open_account(self, token_id: bytes, service: str) -> None:
        """Create the account of ``token_id`` with nothing in it; an existing one is kept."""

    async def get_account(self, token_id: bytes) -> Account | None: ...

    async def reserve(self, token_id: bytes, amount_msat: Msat, expires_at: float) -> Reserved:
        """Hold ``amount_msat`` of the balance for one request, if the balance covers it.

        A caller cancelled while it waits leaves no hold behind (one already written is
        released)."""

    async def settle_reservation(
        self,
        reservation_id: int,
        charged_msat: Msat,
        method: str,
        path: str,
        *,
        split: Split = (),
    ) -> Msat | None:
        """End a reservation: charge ``charged_msat`` (at most the amount reserved; 0 releases
        it all) and record the charge, if not 0, in the account's usage; returns the balance
        after. None when the reservation is gone (released by the sweeper): nothing changes.
        Written even when the caller is cancelled while it waits (its client left after being
        served).

        A charge (not 0) on a route with a ``split`` credits each payee's share to the split
        ledger in the same write, once (source ``charge:<reservation id>``), as
        ``apply_update`` does for a settled invoice.
        """

    async def release_expired_reservations(self, now: float, limit: int) -> int:
        """Release at most ``limit`` reservations whose ``expires_at`` is before ``now``;
        returns how many."""

    async def list_charges(self, token_id: bytes, limit: int) -> list[Charge]:
        """The account's most recent charges, newest first."""

    async def prune_charges(self, charged_before: float, limit: int) -> int:
        """Delete at most ``limit`` charges older than ``charged_before`` (their ``at`` is
        before it), the oldest first; returns how many.

        Balances are not affected: a charge row is history, the account's totals hold the
        money. Running it again is harmless.
        """

    async def list_accounts(self, limit: int | None = None) -> list[Account]:
        """Most recently used (or created) first."""

    async def credit_totals(self) -> CreditTotals: ...

    async def begin_withdrawal(self, withdrawal: Withdrawal) -> Msat | None:
        """Debit the amount and fee reserve of a PENDING ``withdrawal`` and record it, in one
        write; returns the balance after. None when the balance does not cover both (or there
        is no account): nothing is written. A payment hash already recorded raises
        ``StoreError``."""

    async def finish_withdrawal(
        self, payment_hash: PaymentHash, state: WithdrawalState, fee_msat: Msat, now: float
    ) -> Withdrawal | None:
        """Resolve a PENDING withdrawal: SUCCEEDED keeps the amount and ``fee_msat`` debited
        and returns the rest of the fee reserve; FAILED returns amount and reserve. Once only:
        a resolved one is returned unchanged. None when the hash is unknown."""

    async def list_withdrawals(
        self,
        state: WithdrawalState | None = None,
        token_id: bytes | None = None,
        limit: int | None = None,
    ) -> list[Withdrawal]:
        """Newest first, optionally only those in ``state`` or of ``token_id``."""

    # Revenue splits. The ledger is written with what it records, in the same write:
    # ``apply_update`` settling an invoice with a ``split`` (one that buys no credit) and
    # ``settle_reservation`` charging with one credit the shares of ``gateway.splits.allocate``
    # (one entry per payee share above 0, one with the merchant's part, which gets every
    # rounding remainder) and add them to the payees' ``earned_msat``, once per payment. A
    # payee's accrued never goes negative: a debit it does not cover is refused as a whole,
    # atomically, across processes and instances.

    async def begin_payout(self, payout: Payout) -> bool:
        """Debit ``payout.debit_msat`` (the amount, plus the fee reserve when the payee pays
        the fee) from the payee's accrued into its pending and record the PENDING ``payout``,
        in one write; True when done. False when the accrued does not cover it (or the payee
        has no row, never having earned anything): nothing is written. A payment hash already
        recorded raises ``DuplicatePayout`` (a ``StoreError``); a payout not PENDING, without
        a payee, or with an amount below 1 or a negative fee reserve, ``ValueError``."""

    async def finish_payout(
        self,
        payment_hash: PaymentHash,
        state: PayoutState,
        fee_msat: Msat,
        now: float,
        failure: str = "",
    ) -> Payout | None:
        """Resolve a PENDING payout, with its webhook event (``payout.succeeded`` or
        ``payout.failed``) in the same write. SUCCEEDED: its debit leaves pending, the amount
        is paid, ``fee_msat`` (at most the fee reserve, else ``StoreError``) is the payee's
        fee when it pays the fee, the merchant's otherwise (the unused reserve is accrued
        again); ``last_payout_at`` becomes its ``created_at`` if later. FAILED: the debit is
        accrued again, ``failure`` kept, no fee. Once only: a payout no longer PENDING is
        returned unchanged. None when the hash is unknown; ``ValueError`` for PENDING."""

    async def get_payee(self, payee: str) -> PayeeBalance | None: ...

    async def list_payees(self) -> list[PayeeBalance]:
        """Every payee with a row (one that ever earned a share), by name."""

    async def list_payouts(
        self,
        payee: str | None = None,
        state: PayoutState | None = None,
        limit: int | None = None,
    ) -> list[Payout]:
        """Newest first, optionally only those of ``payee`` or in ``state``."""

    async def split_totals(self) -> SplitTotals:
        """The whole ledger, read in one snapshot: its identities hold even while others
        write (``SplitTotals``)."""

    # Payment links. Their invoices are ordinary tracked invoices (service ``link:<id>``):
    # ``apply_update`` settling one adds its amount to the link's ``paid_count`` and
    # ``paid_msat`` in the same write, with a ``link.paid`` event (a tip jar's: ``tip.received``).

    async def add_link(self, link: PaymentLink) -> None:
        """Record a new link; ``ValueError`` if its id exists."""

    async def get_link(self, link_id: str) -> PaymentLink | None: ...

    async def list_links(
        self, state: LinkState | None = None, now: float = 0.0, limit: int | None = None
    ) -> list[PaymentLink]:
        """Newest first; with ``state``, only the links in it at ``now``."""

    async def cancel_link(self, link_id: str, now: float) -> PaymentLink | None:
        """Set ``canceled_at`` (kept if already set); the link as stored after, None if
        unknown. Its open invoices are the caller's to cancel on the node (``list_invoices``
        with ``service="link:<id>"``)."""

    async def add_link_invoice(self, record: InvoiceRecord, replaces: PaymentHash | None) -> bool:
        """Record ``record`` (service ``link:<id>``), in one write, only while the link is
        neither cancelled nor expired at the record's ``created_at``; for a single-use link
        also only while its ``open_hash`` is still ``replaces`` and it is not paid, and then
        ``open_hash`` becomes the record's hash. False (nothing written) when the link is
        unknown or that condition failed. (A cancelled link's invoices are thus all recorded
        before ``cancel_link`` returns, so the caller finds each to cancel on the node.)"""

    # Pay-on-success requests (``settle = "on_success"`` routes): the state moves only by
    # ``HeldState.may_become``; each move is one atomic write, safe across processes.

    async def add_held_request(self, held: HeldRequest) -> None:
        """Record a new WAITING held request (in the challenge's transaction, with its
        invoice and root key); the same payment hash again changes nothing."""

    async def get_held_request(self, payment_hash: PaymentHash) -> HeldRequest | None: ...

    async def list_held_requests(
        self, states: frozenset[HeldState], limit: int
    ) -> list[HeldRequest]:
        """Those in one of ``states``, the oldest (``created_at``) first, at most ``limit``."""

    async def list_held_hashes(self, states: frozenset[HeldState], limit: int) -> list[PaymentHash]:
        """The payment hashes of ``list_held_requests``, in its order: a cheap look for
        polling (no request or response is read)."""

    async def count_held_requests(
        self, states: frozenset[HeldState], client: str | None = None
    ) -> int:
        """How many are in one of ``states`` (of ``client`` only, when given)."""

    async def move_held_request(
        self,
        payment_hash: PaymentHash,
        state: HeldState,
        now: float,
        *,
        response: StoredResponse | None = None,
        failure: str = "",
        keep_until: float | None = None,
    ) -> HeldRequest | None:
        """Move it to ``state`` if its current state may become that one; returns the row
        as stored afterwards, or None when the move was refused (another process made it, or
        the rules forbid it) or the hash is unknown: only the caller that got a row back may
        act on the move (run the request, settle, cancel).

        ``updated_at`` becomes ``now``. The stored request is kept whole while WAITING or
        RUNNING (the runner needs it); any other state drops its headers and body and keeps
        its method and target (``StoredRequest(method, target, (), b"")``; a replay is checked
        against them). ``response`` is written with SUCCEEDED only (a failed request's answer
        is never replayed: its failure names the status); a non-empty ``failure`` with any
        move (an empty one keeps the earlier reason, so "backend failed with 503" survives the
        cancel); ``keep_until`` with a final state (a row moved final without one is never
        pruned), never later than a delivery set it. ``ValueError`` for a ``response`` with
        another state or a ``keep_until`` with an unfinished one.
        """

    async def mark_held_delivered(
        self, payment_hash: PaymentHash, now: float, keep_until: float
    ) -> None:
        """The stored response was replayed: set ``delivered_at`` (the first time only) and
        lower ``keep_until`` to ``keep_until`` if that is sooner."""

    async def prune_held_requests(self, now: float, limit: int) -> int:
        """Delete at most ``limit`` final held requests whose ``keep_until`` is before
        ``now``; returns how many. Their invoices and root keys stay (``prune_unpaid``'s)."""

    # Webhooks (``gateway.webhooks``). ``apply_update``, ``move_held_request``,
    # ``finish_withdrawal`` and ``finish_payout`` write the events of their changes
    # (``WEBHOOK_EVENT_TYPES``) in the same write, whatever the configuration; these fan
    # them out to the endpoints and record each delivery.

    async def fan_out_webhook_events(
        self, subscriptions: Mapping[str, frozenset[str]], now: float, limit: int
    ) -> int:
        """For each endpoint of ``subscriptions`` (name -> the event types it wants), add a
        PENDING delivery due ``now`` for each event after its cursor of a type it wants, at
        most ``limit`` events per endpoint, and move its cursor past them, in one write. An
        endpoint seen for the first time starts after the newest event (``limit`` 0 only
        registers new endpoints so); one no longer in ``subscriptions`` is forgotten: its
        cursor goes and its PENDING deliveries become DEAD (its other deliveries stay).
        Returns how many were added."""

    async def next_webhook_delivery(
        self, endpoint: str
    ) -> tuple[WebhookDelivery, WebhookEvent] | None:
        """The endpoint's PENDING delivery of the oldest event, and the event: deliveries to
        one endpoint go out in event order, one at a time. A read: it takes no write lock."""

    async def record_webhook_attempt(
        self,
        event_id: int,
        endpoint: str,
        *,
        delivered: bool,
        now: float,
        status: int | None,
        error: str,
        max_attempts: int,
        initial_backoff: float,
        max_backoff: float,
    ) -> WebhookDelivery | None:
        """The outcome of one attempt at a PENDING delivery, decided in the write from the
        attempts stored then (a redelivery while the attempt was under way counts): one
        more attempt, its status and error; ``delivered``: DELIVERED, ``delivered_at`` =
        ``now``; else DEAD once the attempts reach ``max_attempts``, or PENDING again
        ``webhook_retry_delay(attempts, initial_backoff, max_backoff)`` after ``now``.
        Returns the delivery as written; None, leaving it as it is, when it is no longer
        PENDING (or gone)."""

    async def get_webhook_event(self, event_id: int) -> WebhookEvent | None: ...

    async def list_webhook_events(self, after: int = 0, limit: int = 100) -> list[WebhookEvent]:
        """Events with an id above ``after``, the oldest first, at most ``limit``."""

    async def list_webhook_deliveries(
        self,
        state: DeliveryState | None = None,
        endpoint: str | None = None,
        limit: int = 100,
        *,
        event_id: int | None = None,
    ) -> list[WebhookDelivery]:
        """Deliveries, the newest event first (by endpoint name within one event),
        optionally only in ``state``, to ``endpoint`` or of ``event_id``."""

    async def redeliver_webhooks(
        self,
        now: float,
        *,
        event_id: int | None = None,
        endpoint: str | None = None,
        endpoints: Collection[str] | None = None,
    ) -> int:
        """Make deliveries PENDING again, due ``now``, with no attempts: every delivery of
        ``event_id`` (only to ``endpoint`` when given, adding it if that endpoint never had
        it), or without ``event_id`` every DEAD one (of ``endpoint`` when given). With
        ``endpoints`` (the configured ones), only deliveries to those. Returns how many."""

    async def prune_webhook_events(
        self, before: float, limit: int, endpoints: Collection[str]
    ) -> int:
        """Delete at most ``limit`` events created before ``before`` that nobody still has
        to send: no PENDING delivery to one of ``endpoints`` (the configured ones), and
        each of their cursors at or past them (an endpoint not configured sends nothing: its
        cursor and PENDING deliveries hold nothing back). Their deliveries go with them.
        Returns how many events went."""


class Store(StoreOperations, Protocol):
    """Durable state: token root keys, issued invoices, the watcher's cursor, credit
    accounts with their reservations, charges and withdrawals, pay-on-success requests, the
    split ledger with its payouts, payment links, and the webhook outbox."""

    def transaction(self) -> AbstractAsyncContextManager[StoreOperations]:
        """A unit of work: ``async with store.transaction() as tx:``, then ``tx``'s reads and
        writes see each other and commit together when the block ends, or not at all if it
        raises (or is cancelled).

        SQLite and memory stores run one store's transactions one at a time, and its own calls
        wait while one is open. PostgreSQL runs them side by side (READ COMMITTED), so each
        operation guards its own read-check-write with row or advisory locks: callers rely on
        the operations' guarantees, never on that serialisation. Keep them short and never
        await the node or the network inside one. They do not nest, and the store itself must
        not be called from inside one (use ``tx``): both raise
        ``RuntimeError`` rather than deadlock. A cancellation that lands while the commit is
        under way may still leave it committed.
        """

    async def close(self) -> None: ...


@runtime_checkable
class RateBuckets(Protocol):
    """Token buckets every gateway instance sharing the store draws from (PostgreSQL), so a
    client's rate limit holds across instances. A store without them limits per process."""

    async def take_rate_token(
        self, bucket: str, rate: float, burst: float, now: float
    ) -> tuple[float, float]:
        """Take one token from ``bucket`` (refilled at ``rate`` a second up to ``burst``, full
        when new) as of ``now``: ``(wait, tokens)``, ``wait`` 0.0 if granted, else the seconds
        until a token is available; ``tokens`` what the bucket holds after this call."""

    async def prune_rate_buckets(self, idle_before: float, limit: int) -> int:
        """Delete at most ``limit`` buckets untouched since ``idle_before`` (full again:
        nothing to remember). Returns how many went."""
