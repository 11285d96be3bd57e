"""What every outgoing payment of the gateway's node shares (withdrawals, payouts): sending
it exactly once, and resolving one whose outcome is unknown.

The caller records the payment PENDING, with its payment hash, before it is sent; then:

- ``Outgoing.send`` sends it, once, by the process that recorded it, and only within its send
  window (half of ``orphan_after``) after it was recorded: not started later, and cancelled
  (its gRPC call with it) when the window ends. LND's own deadline for the call,
  ``payment_timeout`` plus the ``[lnd] timeout``, 90 s by default, usually ends it sooner.
  So the node receives the payment within the window or never; the other half of
  ``orphan_after`` is the margin for clocks that differ between the processes sharing the
  store. ``orphan_after`` must stay longer than any time between the record and the node
  receiving the payment. The outcome is SUCCEEDED (with the fee paid), FAILED only when the
  node says the payment failed, or refused it and has no payment of its hash, and UNKNOWN
  for anything else (a timeout, a lost connection): the caller leaves it PENDING.
- ``Outgoing.node_outcome``, the resolver's question, asks the node about a PENDING payment
  (``Payer.lookup_payment``, TrackPaymentV2) and answers as the node reports; it never
  sends. One the node has never seen and older than ``orphan_after`` was never paid and
  never will be: FAILED, and its hash is never sent again (it stays recorded). It cannot be
  sent then instead: LND accepts a second payment of a hash whose first one FAILED, so two
  senders (two processes' resolvers, or a late original send and a resolver) could have it
  both refunded and paid.
- ``Outgoing.resolve_each`` runs the resolver over the PENDING ones, leaving alone those this
  process is sending (``Outgoing.start``) or resolving now.
- ``Outgoing.finish`` records a final verdict through the caller's store method.

Before any of it, ``invoice_problem`` checks an invoice offline (the node's network, not the
node's own, an amount, a payment secret, payable ``EXPIRY_MARGIN`` more seconds) and
``Outgoing.paid_before`` asks the node whether it has a payment of the hash already.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from gateway import errors
from gateway.ports import Clock, Msat, NodeInfo, Payer, Payment, PaymentHash, PaymentStatus

# An invoice must stay payable this many seconds more: a payment takes a while to route.
EXPIRY_MARGIN = 60
# Seconds the node spends looking for a route before it calls the payment failed.
PAYMENT_TIMEOUT = 60.0
# Seconds after which the resolver fails a payment the node has never seen: twice the send
# window (a send never reaches the node later), so longer than any send (LND's deadline
# for one is payment_timeout + [lnd] timeout, 90 s by default).
ORPHAN_AFTER = 300.0
_PPM = 1_000_000
# LND's network names -> the invoice prefix after "ln" (BOLT 11), and back for messages.
CURRENCY_OF_NETWORK = {
    "mainnet": "bc",
    "testnet": "tb",
    "testnet4": "tb",
    "signet": "tbs",
    "regtest": "bcrt",
    "simnet": "sb",
}
NETWORK_OF_CURRENCY = {"bc": "mainnet", "tb": "testnet", "tbs": "signet", "bcrt": "regtest"}

_T = TypeVar("_T")
_S = TypeVar("_S", bound=enum.Enum)


class _Recorded(Protocol):
    """A payment record as a store returns it (``Withdrawal``, ``Payout``)."""

    @property
    def state(self) -> enum.Enum: ...


_R = TypeVar("_R", bound=_Recorded)


class Bolt11(Protocol):
    """What an outgoing payment reads of a decoded invoice (``gateway.client.bolt11.Invoice``)."""

    @property
    def currency(self) -> str: ...

    @property
    def amount_msat(self) -> int | None: ...

    @property
    def timestamp(self) -> int: ...

    @property
    def expiry(self) -> int: ...

    @property
    def payment_hash(self) -> bytes: ...

    @property
    def payee(self) -> bytes: ...

    @property
    def payment_secret(self) -> bytes | None: ...


# Decodes an invoice and verifies its signature; ValueError when the text is no invoice.
Bolt11Decoder = Callable[[str], Bolt11]


class InvoiceProblem(enum.Enum):
    """Why an invoice is not one the gateway's node pays (``invoice_problem``)."""

    OTHER_NETWORK = "for another network than the node's"
    OWN_NODE = "the node's own"
    AMOUNTLESS = "without an amount"
    WRONG_AMOUNT = "for another amount"
    SECRETLESS = "without a payment secret"
    EXPIRED = "expired, or expiring within the margin"


def invoice_problem(
    invoice: Bolt11, node: NodeInfo, now: float, amount_msat: int | None = None
) -> InvoiceProblem | None:
    """What makes ``invoice`` unpayable by ``node``, in this order, or None: another network
    than the node's, the node's own, no amount (with ``amount_msat``: not exactly that
    amount), no payment secret (LND pays none without), expired or expiring within
    ``EXPIRY_MARGIN`` seconds of ``now``. Offline: whether the node paid it before is
    ``Outgoing.paid_before``."""
    if invoice.currency != CURRENCY_OF_NETWORK.get(node.network):
        return InvoiceProblem.OTHER_NETWORK
    if invoice.payee.hex() == node.pubkey.lower():
        return InvoiceProblem.OWN_NODE
    if not invoice.amount_msat:
        return InvoiceProblem.AMOUNTLESS
    if amount_msat is not None and invoice.amount_msat != amount_msat:
        return InvoiceProblem.WRONG_AMOUNT
    if invoice.payment_secret is None:
        return InvoiceProblem.SECRETLESS
    if invoice.timestamp + invoice.expiry < now + EXPIRY_MARGIN:
        return InvoiceProblem.EXPIRED
    return None


def fee_reserve(amount_msat: int, min_msat: int, ppm: int) -> Msat:
    """The routing fee a payment of ``amount_msat`` may cost: ``ppm`` of it, rounded up,
    and at least ``min_msat``."""
    return Msat(max(min_msat, -(-amount_msat * ppm // _PPM)))


class Verdict(enum.Enum):
    """How a payment ended, as far as the gateway can tell."""

    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"  # definitely not paid, and never will be
    UNKNOWN = "UNKNOWN"  # in flight, or not known: it stays PENDING for the resolver


@dataclass(frozen=True, slots=True)
class Outcome:
    verdict: Verdict
    fee_msat: Msat = Msat(0)  # noqa: RUF009 - a NewType: a plain int; the fee paid, once SUCCEEDED
    failure: str = ""  # why FAILED (fixed text from the node or from here)


UNKNOWN = Outcome(Verdict.UNKNOWN)


class Outgoing:
    """Sends and resolves one kind of outgoing payment (``kind`` names it in the logs, which
    go to ``log``, the owner's logger)."""

    def __init__(
        self,
        *,
        payer: Payer,
        clock: Clock,
        log: logging.Logger,
        kind: str,
        orphan_after: float = ORPHAN_AFTER,
    ) -> None:
        self._payer = payer
        self._clock = clock
        self._log = log
        self._kind = kind
        self.orphan_after = orphan_after
        # A send reaches the node within this many seconds of the record, or never.
        self.send_window = orphan_after / 2
        # Payments this process is sending or resolving now: the resolver leaves them be.
        self.paying: set[PaymentHash] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    def start(self, payment_hash: PaymentHash, work: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
        """Run ``work`` (the sending of ``payment_hash`` and the record of its outcome) as a
        task of its own, which ``close()`` cancels; the resolver leaves the hash alone until
        it ends."""
        self.paying.add(payment_hash)

        async def guarded() -> _T:
            try:
                return await work
            finally:
                self.paying.discard(payment_hash)

        task = asyncio.create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        """Stop waiting for the payments under way; the resolver finishes them later."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def send(
        self,
        payment_hash: PaymentHash,
        recorded_at: float,
        pay: Callable[[], Awaitable[Payment]],
    ) -> Outcome:
        """Send the payment (``pay()``), within the send window after ``recorded_at`` only,
        and tell how it ended. Raises nothing the node or the window causes."""
        hash_hex = payment_hash.hex()
        left = recorded_at + self.send_window - self._clock.now()
        if left <= 0:
            # The resolvers take it for unsent after orphan_after: it must stay so.
            self._log.warning("%s %s: too late to send it", self._kind, hash_hex)
            return Outcome(Verdict.FAILED, failure="not sent within its send window")
        try:
            async with asyncio.timeout(left):
                payment = await pay()
        except errors.PaymentFailed as error:
            self._log.info("%s %s failed: %s", self._kind, hash_hex, error.reason)
            return Outcome(Verdict.FAILED, failure=error.reason)
        except errors.BackendError as error:
            try:
                refused = await self._refused_to_start(payment_hash, error)
            except errors.BackendError as lookup_error:
                error = lookup_error
                refused = False
            if refused:
                self._log.info("%s %s refused by the node: %s", self._kind, hash_hex, error)
                return Outcome(Verdict.FAILED, failure=f"refused by the node: {error}")
            self._log.warning(
                "%s %s: outcome unknown (%s); the resolver will finish it",
                self._kind,
                hash_hex,
                error,
            )
            return UNKNOWN
        except TimeoutError:
            self._log.warning(
                "%s %s: no outcome within its send window; the resolver will finish it",
                self._kind,
                hash_hex,
            )
            return UNKNOWN
        return Outcome(Verdict.SUCCEEDED, fee_msat=payment.fee_msat)

    async def _refused_to_start(
        self, payment_hash: PaymentHash, error: errors.BackendError
    ) -> bool:
        """Whether the node refused the request (a bad request, or a macaroon that may not
        pay) and has no payment of the hash: then it is definitely not paid (and never will
        be: it is not sent again). LND checks the request (the invoice's payment secret,
        features, amount, not its own) before it records a payment. Any other error (a
        stream reset, an answer nobody classified) may have come after the node took the
        payment but before it recorded it, so a lookup at once proves nothing: the resolver
        finishes it (FAILED only once ``orphan_after`` shows it was never sent)."""
        definite = errors.BackendBadRequest | errors.BackendPermissionDenied
        if not isinstance(error, definite) or isinstance(error, errors.InvoiceAlreadyExists):
            # InvoiceAlreadyExists: the node has a payment of the hash already (LND's
            # answer to a second one).
            return False
        return await self._payer.lookup_payment(payment_hash) is None

    async def node_outcome(self, payment_hash: PaymentHash, recorded_at: float) -> Outcome:
        """The resolver's verdict on a PENDING payment, as the node reports it: FAILED if the
        node has never seen it and it was recorded more than ``orphan_after`` ago, UNKNOWN
        while it is in flight (or may still be sent). Never sends it; raises BackendError
        when the node cannot tell."""
        payment = await self._payer.lookup_payment(payment_hash)
        if payment is None:
            age = self._clock.now() - recorded_at
            if age < self.orphan_after:
                return UNKNOWN  # its process may still send it, within its send window
            self._log.warning(
                "%s %s was never sent (%.0f s old): finishing it FAILED",
                self._kind,
                payment_hash.hex(),
                age,
            )
            return Outcome(Verdict.FAILED, failure="never sent")
        if payment.status is PaymentStatus.SUCCEEDED:
            return Outcome(Verdict.SUCCEEDED, fee_msat=payment.fee_msat)
        if payment.status is PaymentStatus.FAILED:
            return Outcome(Verdict.FAILED, failure="the node reports the payment FAILED")
        return UNKNOWN

    async def resolve_each(
        self,
        pending: Sequence[_T],
        hash_of: Callable[[_T], PaymentHash],
        resolve: Callable[[_T], Awaitable[None]],
    ) -> None:
        """``resolve`` every one of ``pending`` (at once) that this process is not sending or
        resolving already. One that cannot be resolved now (the node or the store failing:
        a warning; anything else: an error, logged with its traceback) does not stop the
        others."""
        claimed = [item for item in pending if hash_of(item) not in self.paying]
        results = await asyncio.gather(
            *(self._resolve_claimed(item, hash_of(item), resolve) for item in claimed),
            return_exceptions=True,
        )
        for item, result in zip(claimed, results, strict=True):
            if isinstance(result, errors.BackendError | errors.StoreError):
                self._log.warning(
                    "%s %s not resolved yet: %s", self._kind, hash_of(item).hex(), result
                )
            elif isinstance(result, BaseException):
                self._log.error(
                    "%s %s: the resolver failed on it",
                    self._kind,
                    hash_of(item).hex(),
                    exc_info=result,
                )

    async def _resolve_claimed(
        self, item: _T, payment_hash: PaymentHash, resolve: Callable[[_T], Awaitable[None]]
    ) -> None:
        self.paying.add(payment_hash)
        try:
            await resolve(item)
        finally:
            self.paying.discard(payment_hash)

    async def paid_before(self, payment_hash: PaymentHash) -> bool:
        """Whether the node has a payment of ``payment_hash`` (paid, failed or in flight): an
        invoice paid or tried before would be "resolved" by that earlier payment.
        ``BackendError`` when the node cannot tell."""
        return await self._payer.lookup_payment(payment_hash) is not None

    async def finish(
        self,
        payment_hash: PaymentHash,
        outcome: Outcome,
        reserve_msat: Msat,
        states: dict[Verdict, _S],
        record: Callable[[_S, Msat, float], Awaitable[_R | None]],
    ) -> _R:
        """Record a final ``outcome`` with ``record(state, fee, now)`` (the store's finish
        method): its state from ``states``, the fee paid (SUCCEEDED only) at most
        ``reserve_msat``. The record as the store returns it, whose state is the one recorded
        first should another process have finished it already (logged as an error when that
        differs); ``StoreError`` when the payment is not recorded at all."""
        state = states[outcome.verdict]
        fee = Msat(0)
        if outcome.verdict is Verdict.SUCCEEDED:
            fee = self.capped_fee(payment_hash, outcome.fee_msat, reserve_msat)
        resolved = await record(state, fee, self._clock.now())
        if resolved is None:
            raise errors.StoreError(f"{self._kind} {payment_hash.hex()} is not recorded")
        if resolved.state is not state:
            self._log.error(
                "%s %s: the node says %s, the store had it %s already",
                self._kind,
                payment_hash.hex(),
                state.value,
                resolved.state.value,
            )
        return resolved

    def capped_fee(self, payment_hash: PaymentHash, fee_msat: Msat, reserve_msat: Msat) -> Msat:
        """The fee to record: at most the reserve, which was the payment's fee limit (the node
        broke it otherwise: logged, and the operator pays the rest)."""
        if fee_msat <= reserve_msat:
            return fee_msat
        self._log.error(
            "%s %s: fee %d msat above the reserve %d msat",
            self._kind,
            payment_hash.hex(),
            fee_msat,
            reserve_msat,
        )
        return reserve_msat
