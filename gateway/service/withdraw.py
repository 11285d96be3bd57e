"""Withdrawals: a credit balance paid out, from the gateway's node, to a BOLT11 invoice of the
token holder's.

``Withdrawer.withdraw`` checks the invoice offline (decoded, its signature verified): the
node's network, not the node's own, payable for at least ``EXPIRY_MARGIN`` more seconds, an
amount, a payment secret (LND pays no invoice without one), and amount plus fee reserve
within the balance; each refusal a 400 with its reason.
Then, in this order: ``begin_withdrawal`` commits the debit (amount and fee reserve) with a
PENDING record; the payment is sent (``Payer.send_payment``, the fee limit being the reserve);
``finish_withdrawal`` records SUCCEEDED with the fee paid, or FAILED (everything back to the
balance) only when the node says the payment failed, or refused it and has no payment of its
hash. Anything else (a timeout, a lost connection, a crash) leaves it PENDING for the
resolver.

Sending and resolving follow :mod:`gateway.service.outgoing`: a withdrawal is sent once,
by the process that began it, within its send window (half of ``orphan_after``) after
``begin_withdrawal``, or never. The resolver (``run()``, one supervised task per store) asks
the node about every PENDING withdrawal and finishes it as the node reports; it never sends.
One the node has never seen and older than ``orphan_after`` is finished FAILED (all back to
the balance), and its invoice is refused from then on (its hash is recorded).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass
from typing import Protocol

from gateway import errors
from gateway.ports import (
    Clock,
    Msat,
    NodeInfo,
    Payer,
    PaymentHash,
    Store,
    Withdrawal,
    WithdrawalState,
)
from gateway.service.credit import WithdrawalTerms
from gateway.service.decisions import Deny, Refusal
from gateway.service.outgoing import (
    EXPIRY_MARGIN,
    NETWORK_OF_CURRENCY,
    ORPHAN_AFTER,
    PAYMENT_TIMEOUT,
    Bolt11,
    Bolt11Decoder,
    InvoiceProblem,
    Outcome,
    Outgoing,
    Verdict,
    fee_reserve,
    invoice_problem,
)

__all__ = [
    "EXPIRY_MARGIN",
    "MAX_INVOICE_CHARS",
    "ORPHAN_AFTER",
    "PAYMENT_TIMEOUT",
    "RESOLVE_INTERVAL",
    "Bolt11",
    "Bolt11Decoder",
    "PayingNode",
    "WithdrawalOutcome",
    "WithdrawalRefusal",
    "Withdrawer",
    "fee_reserve",
]

log = logging.getLogger(__name__)

# Seconds between the resolver's passes over PENDING withdrawals.
RESOLVE_INTERVAL = 5.0
# Longer than any BOLT11 invoice LND makes (route hints included).
MAX_INVOICE_CHARS = 8192
_STATE_OF_VERDICT = {
    Verdict.SUCCEEDED: WithdrawalState.SUCCEEDED,
    Verdict.FAILED: WithdrawalState.FAILED,
}


class WithdrawalRefusal(enum.StrEnum):
    """Why a withdrawal is refused (each fixed text, safe for an HTTP body)."""

    NOT_BOLT11 = "not a BOLT11 invoice"
    OTHER_NETWORK = "the invoice is for another network than the gateway's node"
    OWN_NODE = "the invoice is the gateway's own node's"
    EXPIRED = f"the invoice has expired or expires within {EXPIRY_MARGIN} s"
    AMOUNTLESS = "the invoice has no amount: make one for the amount to withdraw"
    SECRETLESS = "the invoice has no payment secret (LND will not pay it)"
    ABOVE_BALANCE = "the invoice's amount plus the fee reserve is more than the balance"
    ALREADY_PAID = "the gateway has paid, or tried to pay, this invoice before"
    NO_ACCOUNT = "this token has no credit account"


_REFUSAL_OF_PROBLEM = {
    InvoiceProblem.OWN_NODE: WithdrawalRefusal.OWN_NODE,
    InvoiceProblem.AMOUNTLESS: WithdrawalRefusal.AMOUNTLESS,
    InvoiceProblem.WRONG_AMOUNT: WithdrawalRefusal.AMOUNTLESS,  # not asked: any amount
    InvoiceProblem.SECRETLESS: WithdrawalRefusal.SECRETLESS,
    InvoiceProblem.EXPIRED: WithdrawalRefusal.EXPIRED,
    InvoiceProblem.OTHER_NETWORK: WithdrawalRefusal.OTHER_NETWORK,  # shown with the networks
}


class PayingNode(Payer, Protocol):
    """The node that pays withdrawals; its network and key say which invoices it may pay."""

    async def get_info(self) -> NodeInfo: ...


@dataclass(frozen=True, slots=True)
class WithdrawalOutcome:
    """Where a withdrawal stands: SUCCEEDED, FAILED (the balance has it all back), or PENDING
    (not finished in time; the resolver finishes it). ``balance_msat`` is read after the
    outcome is recorded; only if the store fails twice to tell it, it is the balance while
    PENDING plus what finishing gave back (other spending meanwhile not counted)."""

    state: WithdrawalState
    payment_hash: str  # hex
    amount_msat: int
    fee_msat: int  # the routing fee paid, once SUCCEEDED
    balance_msat: int  # the account's balance now


class Withdrawer:
    """Pays balances out to the holders' invoices and resolves the unfinished payments."""

    def __init__(
        self,
        *,
        store: Store,
        payer: PayingNode,
        decode: Bolt11Decoder,
        clock: Clock,
        fee_min_msat: int = 1000,
        fee_ppm: int = 5000,
        wait_seconds: float = 30.0,
        payment_timeout: float = PAYMENT_TIMEOUT,
        resolve_interval: float = RESOLVE_INTERVAL,
        orphan_after: float = ORPHAN_AFTER,
    ) -> None:
        self._store = store
        self._payer = payer
        self._decode = decode
        self._clock = clock
        self._fee_min_msat = fee_min_msat
        self._fee_ppm = fee_ppm
        self._wait_seconds = wait_seconds
        self._payment_timeout = payment_timeout
        self._resolve_interval = resolve_interval
        self._outgoing = Outgoing(
            payer=payer, clock=clock, log=log, kind="withdrawal", orphan_after=orphan_after
        )
        self._node: NodeInfo | None = None

    @property
    def terms(self) -> WithdrawalTerms:
        return WithdrawalTerms(self._fee_min_msat, self._fee_ppm)

    async def withdraw(self, token_id: bytes, payment_request: str) -> WithdrawalOutcome | Deny:
        """Pay ``payment_request`` from the balance of ``token_id``'s account, waiting at most
        ``wait_seconds`` for the outcome; ``Deny`` when it cannot be withdrawn."""
        checked = await self._check(token_id, payment_request)
        if isinstance(checked, Deny):
            return checked
        payment_hash = checked.payment_hash
        try:
            balance = await self._store.begin_withdrawal(checked)
        except errors.StoreError as error:
            return await self._begin_failed(checked, error)
        if balance is None:  # another request spent the balance since the check
            return Deny(400, WithdrawalRefusal.ABOVE_BALANCE)
        log.info(
            "withdrawal %s: paying %d msat (fee reserve %d msat)",
            payment_hash.hex(),
            checked.amount_msat,
            checked.fee_reserve_msat,
        )
        task = self._outgoing.start(payment_hash, self._pay(checked, balance))
        try:
            # Shielded: a slow payment, or a client that goes away, does not stop it.
            async with asyncio.timeout(self._wait_seconds):
                return await asyncio.shield(task)
        except TimeoutError:
            return self._pending(checked, balance)

    async def resolve_pending(self) -> None:
        """Finish every PENDING withdrawal the node has an answer for, and FAILED those the
        node has never seen once older than ``orphan_after``. One that cannot be resolved
        (an unexpected error included, logged) does not stop the others."""
        pending = await self._store.list_withdrawals(WithdrawalState.PENDING)
        await self._outgoing.resolve_each(pending, _hash_of, self._resolve)

    async def run(self) -> None:
        """The resolver: ``resolve_pending`` every ``resolve_interval`` seconds, for ever."""
        while True:
            await self.resolve_pending()
            await asyncio.sleep(self._resolve_interval)

    async def close(self) -> None:
        """Stop waiting for the payments under way; the resolver finishes them later."""
        await self._outgoing.close()

    async def _check(self, token_id: bytes, payment_request: str) -> Withdrawal | Deny:
        """The PENDING withdrawal ``payment_request`` makes, or why there is none."""
        text = payment_request.strip()
        if text[:10].lower() == "lightning:":
            text = text[10:]
        if not text or len(text) > MAX_INVOICE_CHARS:
            return Deny(400, WithdrawalRefusal.NOT_BOLT11)
        try:
            invoice = self._decode(text)
        except ValueError:
            return Deny(400, WithdrawalRefusal.NOT_BOLT11)
        try:
            node = await self._node_info()
        except errors.BackendError as error:
            log.warning("withdrawal refused: cannot ask the paying node who it is: %s", error)
            return Deny(503, Refusal.NODE_UNAVAILABLE, retry_after=5)
        now = self._clock.now()
        problem = invoice_problem(invoice, node, now)
        if problem is InvoiceProblem.OTHER_NETWORK:
            theirs = NETWORK_OF_CURRENCY.get(invoice.currency, "an unknown network")
            return Deny(
                400, f"{WithdrawalRefusal.OTHER_NETWORK} ({theirs}; the node is on {node.network})"
            )
        if problem is not None:
            return Deny(400, _REFUSAL_OF_PROBLEM[problem])
        amount = Msat(invoice.amount_msat or 0)
        reserve = fee_reserve(amount, self._fee_min_msat, self._fee_ppm)
        try:
            account = await self._store.get_account(token_id)
        except errors.StoreError:
            log.exception("store failed while checking a withdrawal")
            return Deny(503, Refusal.STORE_UNAVAILABLE, retry_after=5)
        if account is None:
            return Deny(404, WithdrawalRefusal.NO_ACCOUNT)
        if amount + reserve > account.balance_msat:
            return Deny(
                400,
                f"{WithdrawalRefusal.ABOVE_BALANCE} ({amount} + {reserve} msat > "
                f"{account.balance_msat} msat)",
            )
        payment_hash = PaymentHash(invoice.payment_hash)
        try:
            earlier = await self._outgoing.paid_before(payment_hash)
        except errors.BackendError as error:
            log.warning("withdrawal refused: cannot ask the paying node about it: %s", error)
            return Deny(503, Refusal.NODE_UNAVAILABLE, retry_after=5)
        if earlier:
            return Deny(400, WithdrawalRefusal.ALREADY_PAID)
        return Withdrawal(
            payment_hash=payment_hash,
            token_id=token_id,
            payment_request=text,
            amount_msat=amount,
            fee_reserve_msat=reserve,
            state=WithdrawalState.PENDING,
            created_at=now,
        )

    async def _node_info(self) -> NodeInfo:
        """The paying node's network and key, asked once."""
        if self._node is None:
            self._node = await self._payer.get_info()
        return self._node

    async def _begin_failed(self, withdrawal: Withdrawal, error: errors.StoreError) -> Deny:
        """The answer when ``begin_withdrawal`` raised: a hash recorded already (one the node
        has not seen: PENDING, or FAILED before it was sent) is the client's mistake,
        anything else ours."""
        try:
            known = await self._store.list_withdrawals(WithdrawalState.PENDING)
            known += await self._store.list_withdrawals(token_id=withdrawal.token_id)
        except errors.StoreError:
            known = []
        if any(w.payment_hash == withdrawal.payment_hash for w in known):
            return Deny(400, WithdrawalRefusal.ALREADY_PAID)
        log.error("store failed to begin a withdrawal: %s", error)
        return Deny(503, Refusal.STORE_UNAVAILABLE, retry_after=5)

    async def _pay(self, withdrawal: Withdrawal, balance: Msat) -> WithdrawalOutcome:
        """Send the payment, within the send window only, and record how it ended; PENDING
        when that is not known. ``balance`` is the balance while it is PENDING."""
        outcome = await self._outgoing.send(
            withdrawal.payment_hash,
            withdrawal.created_at,
            lambda: self._payer.send_payment(
                withdrawal.payment_request,
                max_fee_msat=withdrawal.fee_reserve_msat,
                payment_timeout=self._payment_timeout,
            ),
        )
        if outcome.verdict is Verdict.UNKNOWN:
            return self._pending(withdrawal, balance)
        try:
            return await self._finished(withdrawal, outcome, balance)
        except (errors.BackendError, errors.StoreError) as error:
            log.warning(
                "withdrawal %s: cannot record its outcome (%s); the resolver will",
                withdrawal.payment_hash.hex(),
                error,
            )
            return self._pending(withdrawal, balance)

    async def _finish(self, withdrawal: Withdrawal, outcome: Outcome) -> Withdrawal:
        """Record the node's final verdict; the withdrawal as recorded (its state the one
        recorded first, should another process have finished it already)."""
        payment_hash = withdrawal.payment_hash
        resolved = await self._outgoing.finish(
            payment_hash,
            outcome,
            withdrawal.fee_reserve_msat,
            _STATE_OF_VERDICT,
            lambda state, fee, now: self._store.finish_withdrawal(payment_hash, state, fee, now),
        )
        if resolved.state is _STATE_OF_VERDICT[outcome.verdict]:
            log.info(
                "withdrawal %s %s (fee %d msat)",
                payment_hash.hex(),
                resolved.state.value,
                resolved.fee_msat,
            )
        return resolved

    async def _finished(
        self, withdrawal: Withdrawal, outcome: Outcome, balance: Msat
    ) -> WithdrawalOutcome:
        """``_finish``, and the outcome with the balance after it (``balance``: the balance
        while PENDING)."""
        resolved = await self._finish(withdrawal, outcome)
        return WithdrawalOutcome(
            state=resolved.state,
            payment_hash=resolved.payment_hash.hex(),
            amount_msat=resolved.amount_msat,
            fee_msat=resolved.fee_msat,
            balance_msat=await self._balance_after(resolved, balance),
        )

    async def _balance_after(self, resolved: Withdrawal, balance: Msat) -> int:
        """The account's balance, read (twice, if the store fails once); if the store cannot
        tell, ``balance`` (while PENDING) plus what finishing ``resolved`` gave back. The
        outcome is final either way: never answered PENDING for want of a balance."""
        for _ in range(2):
            try:
                account = await self._store.get_account(resolved.token_id)
            except errors.StoreError as error:
                failure = error
                continue
            return account.balance_msat if account is not None else 0
        log.warning(
            "withdrawal %s %s: cannot read the balance (%s); answering an estimate",
            resolved.payment_hash.hex(),
            resolved.state.value,
            failure,
        )
        returned = resolved.fee_reserve_msat - resolved.fee_msat
        if resolved.state is WithdrawalState.FAILED:
            returned += resolved.amount_msat
        return balance + returned

    @staticmethod
    def _pending(withdrawal: Withdrawal, balance: Msat) -> WithdrawalOutcome:
        return WithdrawalOutcome(
            state=WithdrawalState.PENDING,
            payment_hash=withdrawal.payment_hash.hex(),
            amount_msat=withdrawal.amount_msat,
            fee_msat=0,
            balance_msat=balance,
        )

    async def _resolve(self, withdrawal: Withdrawal) -> None:
        """Finish one PENDING withdrawal as the node reports it, FAILED if the node has never
        seen it and it is older than ``orphan_after``; leave it PENDING while the payment is
        in flight. Never sends it."""
        outcome = await self._outgoing.node_outcome(withdrawal.payment_hash, withdrawal.created_at)
        if outcome.verdict is not Verdict.UNKNOWN:
            await self._finish(withdrawal, outcome)


def _hash_of(withdrawal: Withdrawal) -> PaymentHash:
    return withdrawal.payment_hash
