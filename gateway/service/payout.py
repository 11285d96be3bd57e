"""The payout worker: pays each payee of the revenue splits what the ledger says it is owed.

A payee (``PayeeTerms``) is paid by keysend when its destination is a node's public key (66
hex digits), else through its LNURL-pay service (a Lightning Address, an LNURL, an https://
URL; ``PayRequests``, ``gateway.client.lnurl``). Each pass of ``run()`` first resolves the
PENDING payouts, then pays every payee that is due and has none PENDING, at once:

- due: its accrued is at least ``threshold_msat``; or, with ``every`` > 0, ``every`` seconds
  have passed since its last SUCCEEDED payout (or since the worker first saw it) and it has
  at least 1000 msat accrued. ``pay_now`` pays regardless of threshold and time.
- amount: the whole accrued when the merchant bears the routing fee (``payee_pays_fee``
  False), the fee limit then coming out of the merchant's part; else the accrued less the fee
  limit (the unused part of the limit is accrued again). The fee limit is
  ``max(fee_limit_min_msat, ceil(amount * fee_limit_ppm / 1e6))``. An LNURL amount is
  rounded down to whole satoshis and at most the service's ``maxSendable``; below its
  ``minSendable`` the payee is not paid yet.

Exactly once, as withdrawals (:mod:`gateway.service.outgoing`): the payout is recorded
PENDING with its payment hash (``Store.begin_payout``, which debits the payee's accrued)
before it is sent; keysend with a fresh random preimage (the hash is its sha256; the preimage
is never stored nor logged), LNURL with the fetched invoice's hash (checked unknown to the
node first). It is sent only within its send window; ``finish_payout`` records the outcome;
an unknown one stays PENDING for the resolver, which never sends. FAILED puts the amount back
into the payee's accrued (the store does), and the payee is tried again after a backoff
(``retry_initial`` doubling up to ``retry_max``, kept in memory: a restart tries at once),
as after a destination that gives no usable invoice (an invoice whose hash the store has
recorded already included) or an unexpected error; a SUCCEEDED payout resets it. A payee
whose destination is the gateway's own node is refused (logged as an error) and never paid.
At its first pass the worker warns of each payee in the ledger with something accrued that no
``[[payee]]`` configures: its money waits until one does again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway import errors
from gateway.destinations import is_pubkey
from gateway.ports import (
    Clock,
    Msat,
    NodeInfo,
    PayeeBalance,
    Payer,
    Payment,
    PaymentHash,
    Payout,
    PayoutState,
    Preimage,
    Store,
)
from gateway.service.outgoing import (
    ORPHAN_AFTER,
    PAYMENT_TIMEOUT,
    Bolt11Decoder,
    InvoiceProblem,
    Outcome,
    Outgoing,
    Verdict,
    fee_reserve,
    invoice_problem,
)

__all__ = [
    "EVERY_MIN_MSAT",
    "PayRequests",
    "PayeeTerms",
    "PayoutNode",
    "Payouts",
]

log = logging.getLogger(__name__)

# With ``every``, a payee is paid on schedule only with at least this much accrued.
EVERY_MIN_MSAT = 1000
_STATE_OF_VERDICT = {Verdict.SUCCEEDED: PayoutState.SUCCEEDED, Verdict.FAILED: PayoutState.FAILED}
# What an LNURL service's invoice is refused for (the worker's checks, knowing the node).
_INVOICE_REFUSAL = {
    InvoiceProblem.OWN_NODE: "the invoice is the gateway's own node's",
    InvoiceProblem.AMOUNTLESS: "the service's invoice has no amount",
    InvoiceProblem.SECRETLESS: "the service's invoice has no payment secret",
    InvoiceProblem.EXPIRED: "the service's invoice expires too soon",
}


@dataclass(frozen=True, slots=True)
class PayeeTerms:
    """One payee (a ``[[payee]]`` table): where it is paid, when, and who bears the fee."""

    name: str
    # a node's public key (keysend), or a Lightning Address / LNURL / URL
    # (``gateway.destinations``)
    destination: str
    threshold_msat: int = 100_000
    every: float = 0.0  # seconds; > 0: also pay what is accrued (>= 1000 msat) this often
    fee_limit_ppm: int = 10_000
    fee_limit_min_msat: int = 2_000
    payee_pays_fee: bool = False


class PayoutNode(Payer, Protocol):
    """The node that pays the payees: BOLT11 invoices (LNURL) and keysend."""

    async def get_info(self) -> NodeInfo: ...

    async def send_keysend(
        self,
        dest: bytes,
        amount_msat: Msat,
        preimage: Preimage,
        *,
        max_fee_msat: Msat,
        payment_timeout: float,
    ) -> Payment:
        """Pay ``amount_msat`` to the node ``dest`` (33-byte public key), the payment hash
        being sha256(``preimage``); the final state, or PaymentFailed."""


class PayRequests(Protocol):
    """LNURL-pay / Lightning Address services (``gateway.client.lnurl.LnurlPayClient``)."""

    async def bounds(self, destination: str) -> tuple[Msat, Msat]:
        """The smallest and largest amount the destination's service accepts;
        ``errors.PayoutDestinationError`` when it cannot tell."""

    async def invoice(self, destination: str, amount_msat: Msat) -> str:
        """A BOLT11 invoice for ``amount_msat`` from the destination's LNURL-pay service,
        checked: description hash == sha256(metadata) (the worker checks the rest). Raises
        ``errors.PayoutDestinationError`` (with a reason) when it cannot."""

    def forget(self, destination: str) -> None:
        """Drop what is kept of the destination's service (its ``payRequest``): the invoice
        it gave was unusable."""


@dataclass(slots=True)
class _Backoff:
    delay: float
    until: float


class Payouts:
    """Pays the payees their accrued shares, and resolves the payouts left unfinished."""

    def __init__(
        self,
        *,
        store: Store,
        node: PayoutNode,
        pay_requests: PayRequests,
        decode: Bolt11Decoder,
        payees: Sequence[PayeeTerms],
        clock: Clock,
        interval: float = 10.0,
        retry_initial: float = 10.0,
        retry_max: float = 600.0,
        payment_timeout: float = PAYMENT_TIMEOUT,
        orphan_after: float = ORPHAN_AFTER,
    ) -> None:
        self._terms = {terms.name: terms for terms in payees}
        if len(self._terms) != len(payees):
            raise ValueError("payee names must be unique")
        self._store = store
        self._node = node
        self._pay_requests = pay_requests
        self._decode = decode
        self._clock = clock
        self._interval = interval
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._payment_timeout = payment_timeout
        self._outgoing = Outgoing(
            payer=node, clock=clock, log=log, kind="payout", orphan_after=orphan_after
        )
        self._info: NodeInfo | None = None
        self._refused: set[str] = set()  # payees whose destination is the gateway's own node
        self._below_minimum: set[str] = set()  # payees told they are below their service's
        self._backoff: dict[str, _Backoff] = {}
        self._first_seen: dict[str, float] = {}  # when this worker first saw a payee's row
        self._ledger_checked = False  # warned of the ledger's payees no [[payee]] configures
        self._wake = asyncio.Event()
        # One pass (or pay_now) at a time in this process.
        self._lock = asyncio.Lock()

    async def run(self) -> None:
        """For ever: resolve the PENDING payouts and pay the due payees, then sleep
        ``interval`` seconds or until woken."""
        while True:
            await self.run_once()
            try:
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()

    async def run_once(self) -> None:
        """One pass of ``run()``: resolve the PENDING payouts, then pay the due payees (those
        not backing off, at once). What the node, the store or one payee fails is logged."""
        async with self._lock:
            await self._pass()

    def wake(self) -> None:
        """A share was credited (a settlement): check the payees soon."""
        self._wake.set()

    async def pay_now(self, payee: str | None = None) -> list[Payout]:
        """Pay every payee (or only ``payee``) its whole accrued now, regardless of threshold,
        schedule and backoff; the payouts made, each as recorded (final, or PENDING when its
        outcome is not known yet). A payee with a payout PENDING, or nothing to pay, gets
        none. ``ValueError`` for a payee not configured; ``BackendError`` when the paying node
        cannot be asked who it is. A payee that cannot be paid (its destination refused or
        unusable, the node or the store failing) raises its error once every payee had its
        turn: pay one payee per call to know which."""
        if payee is not None and payee not in self._terms:
            raise ValueError(f"no payee {payee!r} is configured")
        names = list(self._terms) if payee is None else [payee]
        async with self._lock:
            await self.resolve_pending()
            await self._node_info()
            results = await asyncio.gather(
                *(self._pay(self._terms[name], forced=True) for name in names),
                return_exceptions=True,
            )
        # Every payee had its turn; then why one was not paid is raised, not only logged.
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return [payout for payout in results if isinstance(payout, Payout)]

    async def resolve_pending(self) -> None:
        """Finish every PENDING payout the node has an answer for, and FAILED those the node
        has never seen once older than ``orphan_after``. Never sends."""
        pending = await self._store.list_payouts(state=PayoutState.PENDING)
        await self._outgoing.resolve_each(pending, _hash_of, self._resolve)

    async def close(self) -> None:
        """Stop waiting for the payouts under way; the resolver finishes them later."""
        await self._outgoing.close()

    async def _pass(self) -> None:
        try:
            await self.resolve_pending()
        except errors.StoreError as error:
            log.warning("payouts: cannot list the PENDING ones: %s", error)
        await self._warn_unconfigured()
        try:
            await self._node_info()
        except errors.BackendError as error:
            log.warning("payouts wait: cannot ask the paying node who it is: %s", error)
            return
        now = self._clock.now()
        ready = [terms for terms in self._terms.values() if self._may_try(terms.name, now)]
        results = await asyncio.gather(
            *(self._pay(terms, forced=False) for terms in ready), return_exceptions=True
        )
        for terms, result in zip(ready, results, strict=True):
            if isinstance(result, BaseException):
                log.error(
                    "payee %s: the payout failed unexpectedly; trying again after a backoff",
                    terms.name,
                    exc_info=result,
                )

    async def _warn_unconfigured(self) -> None:
        """Once: a WARNING for each payee in the ledger with something accrued that no
        ``[[payee]]`` configures (a name removed or renamed): nobody pays it meanwhile."""
        if self._ledger_checked:
            return
        try:
            balances = await self._store.list_payees()
        except errors.StoreError as error:
            log.warning("payouts: cannot list the ledger's payees: %s", error)
            return
        self._ledger_checked = True
        for balance in balances:
            if balance.payee not in self._terms and balance.accrued_msat > 0:
                log.warning(
                    "payee %s has %d msat accrued but no [[payee]] configures it: not paid "
                    "until one does again",
                    balance.payee,
                    balance.accrued_msat,
                )

    async def _node_info(self) -> NodeInfo:
        """The paying node's key and network, asked once; then the payees whose destination
        is that node are refused."""
        if self._info is None:
            self._info = await self._node.get_info()
            for terms in self._terms.values():
                if terms.destination.lower() == self._info.pubkey.lower():
                    log.error(
                        "payee %s: its destination is the gateway's own node: never paid",
                        terms.name,
                    )
                    self._refused.add(terms.name)
        return self._info

    def _may_try(self, payee: str, now: float) -> bool:
        if payee in self._refused:
            return False
        backoff = self._backoff.get(payee)
        return backoff is None or now >= backoff.until

    def _failed(self, payee: str) -> float:
        """Back off ``payee``; the seconds until its next try."""
        backoff = self._backoff.get(payee)
        delay = self._retry_initial if backoff is None else min(self._retry_max, backoff.delay * 2)
        self._backoff[payee] = _Backoff(delay, self._clock.now() + delay)
        return delay

    def _due(self, terms: PayeeTerms, balance: PayeeBalance, now: float) -> bool:
        accrued = balance.accrued_msat
        if accrued >= terms.threshold_msat:
            return True
        if terms.every <= 0 or accrued < EVERY_MIN_MSAT:
            return False
        since = balance.last_payout_at
        if since is None:
            since = self._first_seen[terms.name]
        return now - since >= terms.every

    async def _pay(self, terms: PayeeTerms, *, forced: bool) -> Payout | None:
        """Pay one payee if it is due (any accrued, when ``forced``); the payout as recorded,
        None when none was made."""
        name = terms.name
        if name in self._refused:
            if forced:
                raise errors.PayoutDestinationError("its destination is the gateway's own node")
            return None
        try:
            balance = await self._store.get_payee(name)
            if balance is None:
                return None  # never earned a share
            now = self._clock.now()
            self._first_seen.setdefault(name, now)
            if not forced and not self._due(terms, balance, now):
                return None
            if await self._store.list_payouts(payee=name, state=PayoutState.PENDING, limit=1):
                return None  # one at a time: the resolver finishes that one first
            if is_pubkey(terms.destination):
                return await self._keysend(terms, balance)
            return await self._lnurl(terms, balance)
        except errors.PayoutDestinationError as error:
            delay = self._failed(name)
            log.warning("payee %s not paid: %s; trying again in %.0f s", name, error.reason, delay)
            if forced:
                raise
        except (errors.BackendError, errors.StoreError) as error:
            log.warning("payee %s not paid now: %s", name, error)
            if forced:
                raise
        except Exception:
            self._failed(name)  # a bug, or an answer nobody foresaw: not again every pass
            raise
        return None

    def _plan(
        self, terms: PayeeTerms, accrued: int, bounds: tuple[int, int] | None
    ) -> tuple[Msat, Msat] | None:
        """The amount and fee reserve of a payout of ``accrued``; None if there is none to
        make. ``bounds``: an LNURL service's (minSendable, maxSendable)."""

        def reserve_of(amount: int) -> Msat:
            return fee_reserve(amount, terms.fee_limit_min_msat, terms.fee_limit_ppm)

        amount = accrued - reserve_of(accrued) if terms.payee_pays_fee else accrued
        planned = amount
        if bounds is not None:
            least, most = bounds
            amount = min(amount, most)
            amount -= amount % 1000  # LNURL-pay: whole satoshis
            if amount < max(least, 1000):
                return None
        if amount < 1:
            return None
        if terms.payee_pays_fee and amount == planned:
            return Msat(amount), reserve_of(accrued)  # together exactly the accrued
        # Made smaller by the service's bounds: the limit of the smaller amount (no more).
        return Msat(amount), reserve_of(amount)

    async def _keysend(self, terms: PayeeTerms, balance: PayeeBalance) -> Payout | None:
        plan = self._plan(terms, balance.accrued_msat, None)
        if plan is None:
            return None
        amount, reserve = plan
        preimage = Preimage(secrets.token_bytes(32))
        payout = Payout(
            payment_hash=PaymentHash(hashlib.sha256(preimage).digest()),
            payee=terms.name,
            destination=terms.destination,
            payment_request="",
            amount_msat=amount,
            fee_reserve_msat=reserve,
            payee_pays_fee=terms.payee_pays_fee,
            state=PayoutState.PENDING,
            created_at=self._clock.now(),
        )
        dest = bytes.fromhex(terms.destination)
        return await self._begin_and_send(
            payout,
            lambda: self._node.send_keysend(
                dest,
                amount,
                preimage,
                max_fee_msat=reserve,
                payment_timeout=self._payment_timeout,
            ),
        )

    async def _lnurl(self, terms: PayeeTerms, balance: PayeeBalance) -> Payout | None:
        destination = terms.destination
        bounds = await self._pay_requests.bounds(destination)
        plan = self._plan(terms, balance.accrued_msat, bounds)
        if plan is None:
            # Due, yet below what the service takes: said once, not on every pass.
            level = logging.DEBUG if terms.name in self._below_minimum else logging.WARNING
            self._below_minimum.add(terms.name)
            log.log(
                level,
                "payee %s: %d msat accrued is due but below what its service accepts "
                "(%d to %d msat, whole sat%s); it waits for more",
                terms.name,
                balance.accrued_msat,
                bounds[0],
                bounds[1],
                ", less the fee limit" if terms.payee_pays_fee else "",
            )
            return None
        self._below_minimum.discard(terms.name)
        amount, reserve = plan
        try:
            return await self._lnurl_pay(terms, destination, amount, reserve)
        except errors.PayoutDestinationError:
            self._pay_requests.forget(destination)  # its payRequest fetched afresh next time
            raise

    async def _lnurl_pay(
        self, terms: PayeeTerms, destination: str, amount: Msat, reserve: Msat
    ) -> Payout | None:
        payment_request = await self._pay_requests.invoice(destination, amount)
        payment_hash = await self._check_invoice(terms.name, payment_request, amount)
        payout = Payout(
            payment_hash=payment_hash,
            payee=terms.name,
            destination=destination,
            payment_request=payment_request,
            amount_msat=amount,
            fee_reserve_msat=reserve,
            payee_pays_fee=terms.payee_pays_fee,
            state=PayoutState.PENDING,
            created_at=self._clock.now(),
        )
        try:
            return await self._begin_and_send(
                payout,
                lambda: self._node.send_payment(
                    payment_request, max_fee_msat=reserve, payment_timeout=self._payment_timeout
                ),
            )
        except errors.DuplicatePayout:
            # The service repeated an invoice this gateway recorded (one never sent, say):
            # its hash is never sent again.
            raise errors.PayoutDestinationError(
                "the service's invoice was recorded for a payout before: refused"
            ) from None

    async def _check_invoice(self, payee: str, payment_request: str, amount: Msat) -> PaymentHash:
        """The payment hash of an LNURL service's invoice, once it is checked payable by this
        node, for ``amount``, and new to the node; ``PayoutDestinationError`` otherwise."""
        try:
            invoice = self._decode(payment_request)
        except ValueError:
            raise errors.PayoutDestinationError("the service's invoice does not decode") from None
        node = await self._node_info()
        problem = invoice_problem(invoice, node, self._clock.now(), amount)
        if problem is InvoiceProblem.OTHER_NETWORK:
            raise errors.PayoutDestinationError(
                f"the service's invoice is for another network than {node.network}"
            )
        if problem is InvoiceProblem.WRONG_AMOUNT:
            raise errors.PayoutDestinationError(
                f"the service's invoice is for {invoice.amount_msat} msat, not {amount} msat"
            )
        if problem is InvoiceProblem.OWN_NODE:
            log.error("payee %s: its service gave an invoice of the gateway's own node", payee)
        if problem is not None:
            raise errors.PayoutDestinationError(_INVOICE_REFUSAL[problem])
        payment_hash = PaymentHash(invoice.payment_hash)
        if await self._outgoing.paid_before(payment_hash):
            raise errors.PayoutDestinationError(
                "the service's invoice was paid, or tried, before: refused"
            )
        return payment_hash

    async def _begin_and_send(
        self, payout: Payout, pay: Callable[[], Awaitable[Payment]]
    ) -> Payout | None:
        """Record ``payout`` PENDING (debiting the payee), then send it and record how it
        ended; None when the accrued no longer covers it (nothing recorded)."""
        if not await self._store.begin_payout(payout):
            log.info("payee %s: accrued changed meanwhile; paid on a later pass", payout.payee)
            return None
        log.info(
            "payout %s to %s: paying %d msat (fee limit %d msat, borne by the %s)",
            payout.payment_hash.hex(),
            payout.payee,
            payout.amount_msat,
            payout.fee_reserve_msat,
            "payee" if payout.payee_pays_fee else "merchant",
        )
        task = self._outgoing.start(payout.payment_hash, self._send(payout, pay))
        return await task

    async def _send(self, payout: Payout, pay: Callable[[], Awaitable[Payment]]) -> Payout:
        """Send a PENDING payout and record its outcome; it stays PENDING when that is not
        known (or cannot be recorded): the resolver finishes it."""
        outcome = await self._outgoing.send(payout.payment_hash, payout.created_at, pay)
        if outcome.verdict is Verdict.UNKNOWN:
            return payout
        try:
            return await self._finish(payout, outcome)
        except (errors.BackendError, errors.StoreError) as error:
            log.warning(
                "payout %s: cannot record its outcome (%s); the resolver will",
                payout.payment_hash.hex(),
                error,
            )
            return payout

    async def _resolve(self, payout: Payout) -> None:
        """Finish one PENDING payout as the node reports it; never sends it."""
        outcome = await self._outgoing.node_outcome(payout.payment_hash, payout.created_at)
        if outcome.verdict is not Verdict.UNKNOWN:
            await self._finish(payout, outcome)

    async def _finish(self, payout: Payout, outcome: Outcome) -> Payout:
        """Record the node's final verdict (the payee's accrued back on FAILED); the payout as
        recorded, its state the one recorded first should another process have finished it.
        A FAILED payee is backed off, a SUCCEEDED one no longer."""
        payment_hash = payout.payment_hash
        resolved = await self._outgoing.finish(
            payment_hash,
            outcome,
            payout.fee_reserve_msat,
            _STATE_OF_VERDICT,
            lambda state, fee, now: self._store.finish_payout(
                payment_hash, state, fee, now, failure=outcome.failure
            ),
        )
        if resolved.state is PayoutState.SUCCEEDED:
            self._backoff.pop(resolved.payee, None)
            log.info(
                "payout %s to %s SUCCEEDED: %d msat, fee %d msat",
                payment_hash.hex(),
                resolved.payee,
                resolved.amount_msat,
                resolved.fee_msat,
            )
        elif resolved.state is PayoutState.FAILED:
            delay = self._failed(resolved.payee)
            log.warning(
                "payout %s to %s FAILED (%s): %d msat accrued again; trying again in %.0f s",
                payment_hash.hex(),
                resolved.payee,
                resolved.failure or outcome.failure,
                resolved.amount_msat,
                delay,
            )
        return resolved


def _hash_of(payout: Payout) -> PaymentHash:
    return payout.payment_hash
