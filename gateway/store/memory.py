"""``MemoryStore``: the ``Store`` contract in dictionaries, for tests and throwaway runs.

Nothing survives the process. The semantics are exactly those of ``SqliteStore``; the shared
contract suite in ``tests/unit/store`` runs against both.

No operation awaits, so each is atomic on its loop. A transaction spans awaits: while it is
open the tables keep an undo journal, replayed backwards if it fails, and the store's own
calls wait for it to end (``TransactionGate``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import secrets
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from typing import TypeVar

from gateway.errors import StoreClosed, StoreError
from gateway.ports import (
    Account,
    Charge,
    Clock,
    CreditTotals,
    Cursor,
    DeliveryState,
    HeldRequest,
    HeldState,
    InvoiceRecord,
    InvoiceState,
    InvoiceTotal,
    InvoiceUpdate,
    LinkState,
    Msat,
    PayeeBalance,
    PaymentHash,
    PaymentLink,
    Payout,
    PayoutState,
    Reservation,
    Reserved,
    RevenueBucket,
    Split,
    SplitTotals,
    StoredResponse,
    StoreOperations,
    SystemClock,
    WebhookDelivery,
    WebhookEvent,
    Withdrawal,
    WithdrawalState,
    webhook_retry_delay,
)
from gateway.store.credit import (
    SETTLED_AFTER_EXPIRY,
    check_amount,
    check_bucket,
    check_pending,
    credit_bought,
    duplicate_withdrawal,
    invoice_key_id,
    refund,
    resolution_fee,
)
from gateway.store.gate import TransactionGate
from gateway.store.held import HELD_FINAL, check_move, check_new, delivered, moved
from gateway.store.ledger import (
    Entries,
    LinkPayment,
    PayeeChange,
    charge_entries,
    charge_source,
    check_link_invoice,
    check_new_link,
    check_new_payout,
    check_resolution,
    duplicate_payout,
    invoice_source,
    link_payment,
    payee_change,
    resolved,
    settlement_entries,
)
from gateway.store.outbox import (
    ENDPOINT_REMOVED,
    NewEvent,
    held_events,
    invoice_events,
    payout_events,
    withdrawal_events,
)

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")

UNPAID_ENDINGS = frozenset({InvoiceState.CANCELED, InvoiceState.EXPIRED})


class _Tables:
    """The data and the operations on it, synchronous; every change goes through ``_set``,
    ``_delete`` or ``_set_cursor`` so that an open transaction can undo it."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        # key_id -> (token_id, root_key)
        self.root_keys: dict[bytes, tuple[bytes, bytes]] = {}
        # payment_hash -> (insertion sequence, record); the sequence plays SQLite's rowid
        self.invoices: dict[bytes, tuple[int, InvoiceRecord]] = {}
        self.cursor = Cursor()
        self.accounts: dict[bytes, Account] = {}
        # reservation_id -> reservation; ids are never reused, as with AUTOINCREMENT
        self.reservations: dict[int, Reservation] = {}
        self.reservation_ids = itertools.count(1)
        self.charges: dict[int, Charge] = {}  # keyed by insertion sequence
        self.withdrawals: dict[bytes, tuple[int, Withdrawal]] = {}
        self.held: dict[bytes, tuple[int, HeldRequest]] = {}
        # The split ledger: (source, payee) -> (share, at), "" the merchant's part; the
        # payees' running totals; payouts by payment hash.
        self.split_entries: dict[tuple[str, str], tuple[Msat, float]] = {}
        self.payees: dict[str, PayeeBalance] = {}
        self.payouts: dict[bytes, tuple[int, Payout]] = {}
        self.links: dict[str, tuple[int, PaymentLink]] = {}
        # Webhooks: the outbox (event ids never reused, as with AUTOINCREMENT), deliveries by
        # (endpoint, event id), and each endpoint's fan-out cursor.
        self.events: dict[int, WebhookEvent] = {}
        self.event_ids = itertools.count(1)
        self.deliveries: dict[tuple[str, int], WebhookDelivery] = {}
        self.webhook_cursors: dict[str, int] = {}
        self.sequence = itertools.count()
        self.undo: list[Callable[[], None]] | None = None  # a journal while a transaction is open

    def _set(self, table: dict[K, V], key: K, value: V) -> None:
        if self.undo is not None:
            if key in table:
                self.undo.append(functools.partial(table.__setitem__, key, table[key]))
            else:
                self.undo.append(functools.partial(table.__delitem__, key))
        table[key] = value

    def _delete(self, table: dict[K, V], key: K) -> None:
        old = table.pop(key)
        if self.undo is not None:
            self.undo.append(functools.partial(table.__setitem__, key, old))

    def _set_cursor(self, cursor: Cursor) -> None:
        if self.undo is not None:
            self.undo.append(functools.partial(self._set_cursor, self.cursor))
        self.cursor = cursor

    def put_root_key(self, key_id: bytes, token_id: bytes, root_key: bytes) -> None:
        existing = self.root_keys.get(key_id)
        if existing is None:
            self._set(self.root_keys, key_id, (token_id, root_key))
        elif existing != (token_id, root_key):
            raise StoreError(f"a different root key is already stored under {key_id.hex()}")

    def get_root_key(self, key_id: bytes) -> bytes | None:
        entry = self.root_keys.get(key_id)
        return None if entry is None else entry[1]

    def revoke_token(self, token_id: bytes) -> bool:
        doomed = [key_id for key_id, (owner, _) in self.root_keys.items() if owner == token_id]
        for key_id in doomed:
            self._delete(self.root_keys, key_id)
        return bool(doomed)

    def add_invoice(self, record: InvoiceRecord) -> None:
        if record.payment_hash not in self.invoices:
            self._set(self.invoices, record.payment_hash, (next(self.sequence), record))

    def apply_update(self, update: InvoiceUpdate) -> InvoiceRecord | None:
        entry = self.invoices.get(update.payment_hash)
        if entry is None:
            return None
        sequence, record = entry
        updated = record.updated(update)
        if updated != record:
            self._set(self.invoices, update.payment_hash, (sequence, updated))
        if credit := credit_bought(record, updated):
            account = self.accounts.get(record.token_id) or self._new_account(
                record.token_id, record.service
            )
            self._put_account(
                dataclasses.replace(account, credited_msat=Msat(account.credited_msat + credit))
            )
        self._credit_split(invoice_source(record.payment_hash), settlement_entries(record, updated))
        now = self.clock.now()
        payment = link_payment(record, updated, now)
        link = None if payment is None else self._pay_link(payment)
        self._add_events(invoice_events(record, updated, now, link))
        return updated

    def get_invoice(self, payment_hash: PaymentHash) -> InvoiceRecord | None:
        entry = self.invoices.get(payment_hash)
        return None if entry is None else entry[1]

    def list_invoices(
        self, state: InvoiceState | None, limit: int | None, service: str | None
    ) -> list[InvoiceRecord]:
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        entries = sorted(
            (
                (record.created_at, sequence, record)
                for sequence, record in self.invoices.values()
                if (state is None or record.state is state)
                and (service is None or record.service == service)
            ),
            key=lambda entry: (entry[0], entry[1]),
            reverse=True,
        )
        records = [record for _, _, record in entries]
        return records if limit is None else records[:limit]

    def invoice_totals(self) -> list[InvoiceTotal]:
        totals: dict[tuple[str, InvoiceState], tuple[int, int, int]] = {}
        for _, record in self.invoices.values():
            key = (record.service, record.state)
            count, amount, received = totals.get(key, (0, 0, 0))
            if record.state is InvoiceState.SETTLED:
                received += record.amount_paid_msat or record.amount_msat
            totals[key] = (count + 1, amount + record.amount_msat, received)
        return [
            InvoiceTotal(service, state, count, Msat(amount), Msat(received))
            for (service, state), (count, amount, received) in sorted(
                totals.items(), key=lambda item: (item[0][0], item[0][1].value)
            )
        ]

    def list_overdue(self, expired_before: float, limit: int) -> list[InvoiceRecord]:
        overdue = sorted(
            (
                (record.expires_at, sequence, record)
                for sequence, record in self.invoices.values()
                if record.state is InvoiceState.OPEN and record.expires_at < expired_before
            ),
            key=lambda entry: (entry[0], entry[1]),
        )
        return [record for _, _, record in overdue[: max(0, limit)]]

    def revenue(self, since: float, bucket_seconds: int) -> list[RevenueBucket]:
        check_bucket(bucket_seconds)
        sums: dict[tuple[int, str], tuple[int, int]] = {}
        for _, record in self.invoices.values():
            at = record.settled_at if record.settled_at is not None else record.created_at
            if record.state is not InvoiceState.SETTLED or at < since:
                continue
            if record.expires_at < since - SETTLED_AFTER_EXPIRY:
                continue  # as SqliteStore: settled long past its expiry, which no node does
            key = (int(at // bucket_seconds) * bucket_seconds, record.service)
            count, total = sums.get(key, (0, 0))
            # As a credit purchase counts it: the amount when the node reported none paid.
            sums[key] = (count + 1, total + (record.amount_paid_msat or record.amount_msat))
        return [
            RevenueBucket(start, service, count, Msat(total))
            for (start, service), (count, total) in sorted(sums.items())
        ]

    def list_open_credit_invoices(self, token_id: bytes, limit: int) -> list[InvoiceRecord]:
        entries = sorted(
            (
                (record.created_at, sequence, record)
                for sequence, record in self.invoices.values()
                if record.token_id == token_id
                and record.buys_credit
                and record.state is InvoiceState.OPEN
            ),
            key=lambda entry: (entry[0], entry[1]),
            reverse=True,
        )
        return [record for _, _, record in entries[: max(0, limit)]]

    def prune_unpaid(self, expired_before: float, limit: int) -> int:
        doomed = [
            record
            for _, record in self.invoices.values()
            if record.state in UNPAID_ENDINGS and record.expires_at < expired_before
        ][: max(0, limit)]
        for record in doomed:
            self._delete(self.invoices, record.payment_hash)
            key_id = invoice_key_id(record.payment_hash, record.token_id)
            if key_id is not None and key_id in self.root_keys:
                self._delete(self.root_keys, key_id)
        # Each invoice took its own root key. A token's remaining root keys (and its account,
        # if it never received anything) go with its last invoice: top-ups share the token id.
        remaining = {record.token_id for _, record in self.invoices.values()}
        tokens = {record.token_id for record in doomed} - remaining
        for key_id in [k for k, (token_id, _) in self.root_keys.items() if token_id in tokens]:
            self._delete(self.root_keys, key_id)
        for token_id in tokens:
            account = self.accounts.get(token_id)
            if account is not None and account.credited_msat == 0:
                self._delete(self.accounts, token_id)
        return len(doomed)

    def save_cursor(self, cursor: Cursor) -> None:
        self._set_cursor(
            Cursor(
                add_index=max(self.cursor.add_index, cursor.add_index),
                settle_index=max(self.cursor.settle_index, cursor.settle_index),
            )
        )

    def _new_account(self, token_id: bytes, service: str) -> Account:
        zero = Msat(0)
        return Account(token_id, service, zero, zero, zero, zero, self.clock.now())

    def _put_account(self, account: Account) -> Account:
        """Store ``account``, refusing a negative amount or balance (as the SQLite schema's
        CHECK constraints do)."""
        amounts = (
            account.credited_msat,
            account.spent_msat,
            account.reserved_msat,
            account.withdrawn_msat,
            account.balance_msat,
        )
        if min(amounts) < 0:
            raise StoreError(f"the account of {account.token_id.hex()} would go negative")
        self._set(self.accounts, account.token_id, account)
        return account

    def open_account(self, token_id: bytes, service: str) -> None:
        if token_id not in self.accounts:
            self._set(self.accounts, token_id, self._new_account(token_id, service))

    def balance(self, token_id: bytes) -> Msat:
        account = self.accounts.get(token_id)
        return Msat(0) if account is None else account.balance_msat

    def reserve(self, token_id: bytes, amount_msat: Msat, expires_at: float) -> Reserved:
        check_amount("amount_msat", amount_msat)
        account = self.accounts.get(token_id)
        if account is None or account.balance_msat < amount_msat:
            return Reserved(None, self.balance(token_id))
        reserved = self._put_account(
            dataclasses.replace(
                account,
                reserved_msat=Msat(account.reserved_msat + amount_msat),
                last_used_at=self.clock.now(),
            )
        )
        reservation = Reservation(next(self.reservation_ids), token_id, amount_msat, expires_at)
        self._set(self.reservations, reservation.reservation_id, reservation)
        return Reserved(reservation, reserved.balance_msat)

    def settle_reservation(
        self, reservation_id: int, charged_msat: Msat, method: str, path: str, split: Split
    ) -> Msat | None:
        check_amount("charged_msat", charged_msat)
        reservation = self.reservations.get(reservation_id)
        if reservation is None:
            return None
        if charged_msat > reservation.amount_msat:
            raise ValueError(
                f"charged_msat {charged_msat} is above the {reservation.amount_msat} reserved"
            )
        self._credit_split(charge_source(reservation_id), charge_entries(split, charged_msat))
        self._delete(self.reservations, reservation_id)
        token_id = reservation.token_id
        account = self.accounts.get(token_id)
        if account is None:
            return Msat(0)
        account = self._put_account(
            dataclasses.replace(
                account,
                reserved_msat=Msat(account.reserved_msat - reservation.amount_msat),
                spent_msat=Msat(account.spent_msat + charged_msat),
            )
        )
        if charged_msat:
            charge = Charge(token_id, self.clock.now(), method, path, charged_msat)
            self._set(self.charges, next(self.sequence), charge)
        return account.balance_msat

    def release_expired_reservations(self, now: float, limit: int) -> int:
        expired = sorted(
            (r for r in self.reservations.values() if r.expires_at < now),
            key=lambda reservation: (reservation.expires_at, reservation.reservation_id),
        )[: max(0, limit)]
        for reservation in expired:
            self._delete(self.reservations, reservation.reservation_id)
            account = self.accounts.get(reservation.token_id)
            if account is not None:
                reserved = Msat(account.reserved_msat - reservation.amount_msat)
                self._put_account(dataclasses.replace(account, reserved_msat=reserved))
        return len(expired)

    def list_charges(self, token_id: bytes, limit: int) -> list[Charge]:
        charges = sorted(
            ((charge.at, sequence, charge) for sequence, charge in self.charges.items()),
            key=lambda entry: (entry[0], entry[1]),
            reverse=True,
        )
        return [charge for _, _, charge in charges if charge.token_id == token_id][: max(0, limit)]

    def prune_charges(self, charged_before: float, limit: int) -> int:
        doomed = sorted(
            (charge.at, sequence)
            for sequence, charge in self.charges.items()
            if charge.at < charged_before
        )[: max(0, limit)]
        for _, sequence in doomed:
            self._delete(self.charges, sequence)
        return len(doomed)

    def list_accounts(self, limit: int | None) -> list[Account]:
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        accounts = sorted(
            self.accounts.values(),
            key=lambda account: (
                account.created_at if account.last_used_at is None else account.last_used_at,
                account.token_id,
            ),
            reverse=True,
        )
        return accounts if limit is None else accounts[:limit]

    def credit_totals(self) -> CreditTotals:
        withdrawals = [withdrawal for _, withdrawal in self.withdrawals.values()]
        accounts = self.accounts.values()
        return CreditTotals(
            accounts=len(accounts),
            received_msat=Msat(sum(account.credited_msat for account in accounts)),
            consumed_msat=Msat(sum(account.spent_msat for account in accounts)),
            withdrawn_msat=Msat(
                sum(
                    w.amount_msat + w.fee_msat
                    for w in withdrawals
                    if w.state is WithdrawalState.SUCCEEDED
                )
            ),
            pending_withdrawals_msat=Msat(
                sum(
                    w.amount_msat + w.fee_reserve_msat
                    for w in withdrawals
                    if w.state is WithdrawalState.PENDING
                )
            ),
            reserved_msat=Msat(sum(account.reserved_msat for account in accounts)),
            outstanding_msat=Msat(sum(account.balance_msat for account in accounts)),
        )

    def begin_withdrawal(self, withdrawal: Withdrawal) -> Msat | None:
        check_pending(withdrawal)
        if withdrawal.payment_hash in self.withdrawals:
            raise duplicate_withdrawal(withdrawal.payment_hash)
        debit = withdrawal.amount_msat + withdrawal.fee_reserve_msat
        account = self.accounts.get(withdrawal.token_id)
        if account is None or account.balance_msat < debit:
            return None
        account = self._put_account(
            dataclasses.replace(account, withdrawn_msat=Msat(account.withdrawn_msat + debit))
        )
        self._set(self.withdrawals, withdrawal.payment_hash, (next(self.sequence), withdrawal))
        return account.balance_msat

    def finish_withdrawal(
        self, payment_hash: PaymentHash, state: WithdrawalState, fee_msat: Msat, now: float
    ) -> Withdrawal | None:
        fee = resolution_fee(state, fee_msat)
        entry = self.withdrawals.get(payment_hash)
        if entry is None:
            return None
        sequence, pending = entry
        if pending.state is not WithdrawalState.PENDING:
            return pending
        if fee > pending.fee_reserve_msat:
            raise StoreError(f"fee_msat {fee} is above the fee reserve {pending.fee_reserve_msat}")
        resolved = dataclasses.replace(pending, state=state, fee_msat=fee, resolved_at=now)
        self._set(self.withdrawals, payment_hash, (sequence, resolved))
        account = self.accounts.get(resolved.token_id)
        if account is not None:
            withdrawn = Msat(account.withdrawn_msat - refund(resolved))
            self._put_account(dataclasses.replace(account, withdrawn_msat=withdrawn))
        self._add_events(withdrawal_events(resolved, now))
        return resolved

    def list_withdrawals(
        self, state: WithdrawalState | None, token_id: bytes | None, limit: int | None
    ) -> list[Withdrawal]:
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        entries = sorted(
            (
                (withdrawal.created_at, sequence, withdrawal)
                for sequence, withdrawal in self.withdrawals.values()
                if (state is None or withdrawal.state is state)
                and (token_id is None or withdrawal.token_id == token_id)
            ),
            key=lambda entry: (entry[0], entry[1]),
            reverse=True,
        )
        withdrawals = [withdrawal for _, _, withdrawal in entries]
        return withdrawals if limit is None else withdrawals[:limit]

    # The split ledger
    def _credit_split(self, source: str, entries: Entries) -> None:
        """Write the ledger entries of one payment and add the payees' shares to what they
        earned; all checked first (as the SQL stores' primary key would refuse them)."""
        if any((source, payee) in self.split_entries for payee, _ in entries):
            raise StoreError(f"the split of {source} is already in the ledger")
        now = self.clock.now()
        for payee, share in entries:
            self._set(self.split_entries, (source, payee), (share, now))
            if payee:
                zero = Msat(0)
                balance = self.payees.get(payee) or PayeeBalance(
                    payee, zero, zero, zero, zero, zero, None
                )
                earned = Msat(balance.earned_msat + share)
                self._put_payee(dataclasses.replace(balance, earned_msat=earned))

    def _put_payee(self, balance: PayeeBalance) -> None:
        """Store ``balance``, refusing a negative amount or accrued (as the SQL schemas'
        CHECK constraints do)."""
        amounts = (
            balance.earned_msat,
            balance.paid_msat,
            balance.fees_msat,
            balance.pending_msat,
            balance.merchant_fees_msat,
            balance.accrued_msat,
        )
        if min(amounts) < 0:
            raise StoreError(f"the ledger of payee {balance.payee} would go negative")
        self._set(self.payees, balance.payee, balance)

    def begin_payout(self, payout: Payout) -> bool:
        check_new_payout(payout)
        if payout.payment_hash in self.payouts:
            raise duplicate_payout(payout.payment_hash)
        balance = self.payees.get(payout.payee)
        if balance is None or balance.accrued_msat < payout.debit_msat:
            return False
        pending = Msat(balance.pending_msat + payout.debit_msat)
        self._put_payee(dataclasses.replace(balance, pending_msat=pending))
        self._set(self.payouts, payout.payment_hash, (next(self.sequence), payout))
        return True

    def finish_payout(
        self,
        payment_hash: PaymentHash,
        state: PayoutState,
        fee_msat: Msat,
        now: float,
        failure: str,
    ) -> Payout | None:
        check_resolution(state, fee_msat)
        entry = self.payouts.get(payment_hash)
        if entry is None:
            return None
        sequence, pending = entry
        if pending.state is not PayoutState.PENDING:
            return pending
        done = resolved(pending, state, fee_msat, now, failure)
        self._set(self.payouts, payment_hash, (sequence, done))
        balance = self.payees.get(done.payee)
        if balance is not None:
            self._put_payee(_changed(balance, payee_change(done)))
        self._add_events(payout_events(done, now))
        return done

    def list_payees(self) -> list[PayeeBalance]:
        return [self.payees[payee] for payee in sorted(self.payees)]

    def list_payouts(
        self, payee: str | None, state: PayoutState | None, limit: int | None
    ) -> list[Payout]:
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        entries = sorted(
            (
                (payout.created_at, sequence, payout)
                for sequence, payout in self.payouts.values()
                if (payee is None or payout.payee == payee)
                and (state is None or payout.state is state)
            ),
            key=lambda entry: (entry[0], entry[1]),
            reverse=True,
        )
        payouts = [payout for _, _, payout in entries]
        return payouts if limit is None else payouts[:limit]

    def split_totals(self) -> SplitTotals:
        payees = self.payees.values()
        return SplitTotals(
            received_msat=Msat(sum(share for share, _ in self.split_entries.values())),
            kept_msat=Msat(
                sum(share for (_, payee), (share, _) in self.split_entries.items() if not payee)
            ),
            earned_msat=Msat(sum(balance.earned_msat for balance in payees)),
            paid_msat=Msat(sum(balance.paid_msat for balance in payees)),
            pending_msat=Msat(sum(balance.pending_msat for balance in payees)),
            accrued_msat=Msat(sum(balance.accrued_msat for balance in payees)),
            payee_fees_msat=Msat(sum(balance.fees_msat for balance in payees)),
            merchant_fees_msat=Msat(sum(balance.merchant_fees_msat for balance in payees)),
        )

    def add_held_request(self, held: HeldRequest) -> None:
        check_new(held)
        if held.payment_hash not in self.held:
            self._set(self.held, held.payment_hash, (next(self.sequence), held))

    def get_held_request(self, payment_hash: PaymentHash) -> HeldRequest | None:
        entry = self.held.get(payment_hash)
        return None if entry is None else entry[1]

    def list_held_requests(self, states: frozenset[HeldState], limit: int) -> list[HeldRequest]:
        entries = sorted(
            ((held.created_at, sequence, held) for sequence, held in self.held.values()),
            key=lambda entry: (entry[0], entry[1]),
        )
        return [held for _, _, held in entries if held.state in states][: max(0, limit)]

    def list_held_hashes(self, states: frozenset[HeldState], limit: int) -> list[PaymentHash]:
        return [held.payment_hash for held in self.list_held_requests(states, limit)]

    def count_held_requests(self, states: frozenset[HeldState], client: str | None) -> int:
        return sum(
            1
            for _, held in self.held.values()
            if held.state in states and (client is None or held.client == client)
        )

    def move_held_request(
        self,
        payment_hash: PaymentHash,
        state: HeldState,
        now: float,
        response: StoredResponse | None,
        failure: str,
        keep_until: float | None,
    ) -> HeldRequest | None:
        check_move(state, response, keep_until)
        entry = self.held.get(payment_hash)
        if entry is None:
            return None
        sequence, held = entry
        after = moved(held, state, now, response, failure, keep_until)
        if after is not None:
            self._set(self.held, payment_hash, (sequence, after))
            self._add_events(held_events(after))
        return after

    def mark_held_delivered(self, payment_hash: PaymentHash, now: float, keep_until: float) -> None:
        entry = self.held.get(payment_hash)
        if entry is not None:
            sequence, held = entry
            self._set(self.held, payment_hash, (sequence, delivered(held, now, keep_until)))

    def prune_held_requests(self, now: float, limit: int) -> int:
        doomed = sorted(
            (held.keep_until, sequence, held.payment_hash)
            for sequence, held in self.held.values()
            if held.state in HELD_FINAL and held.keep_until is not None and held.keep_until < now
        )[: max(0, limit)]
        for _, _, payment_hash in doomed:
            self._delete(self.held, payment_hash)
        return len(doomed)

    # Payment links
    def add_link(self, link: PaymentLink) -> None:
        check_new_link(link)
        if link.link_id in self.links:
            raise ValueError(f"a payment link {link.link_id!r} exists already")
        self._set(self.links, link.link_id, (next(self.sequence), link))

    def get_link(self, link_id: str) -> PaymentLink | None:
        entry = self.links.get(link_id)
        return None if entry is None else entry[1]

    def list_links(
        self, state: LinkState | None, now: float, limit: int | None
    ) -> list[PaymentLink]:
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        entries = sorted(
            (
                (link.created_at, sequence, link)
                for sequence, link in self.links.values()
                if state is None or link.state(now) is state
            ),
            key=lambda entry: (entry[0], entry[1]),
            reverse=True,
        )
        links = [link for _, _, link in entries]
        return links if limit is None else links[:limit]

    def cancel_link(self, link_id: str, now: float) -> PaymentLink | None:
        entry = self.links.get(link_id)
        if entry is None:
            return None
        sequence, link = entry
        if link.canceled_at is None:
            link = dataclasses.replace(link, canceled_at=now)
            self._set(self.links, link_id, (sequence, link))
        return link

    def add_link_invoice(self, record: InvoiceRecord, replaces: PaymentHash | None) -> bool:
        check_link_invoice(record)
        entry = self.links.get(record.link_id)
        if entry is None:
            return False
        sequence, link = entry
        if link.state(record.created_at) is not LinkState.OPEN:
            return False
        if link.single_use:
            if link.open_hash != replaces:
                return False
            opened = dataclasses.replace(link, open_hash=record.payment_hash)
            self._set(self.links, link.link_id, (sequence, opened))
        self.add_invoice(record)
        return True

    def _pay_link(self, payment: LinkPayment) -> PaymentLink | None:
        """Add ``payment`` to its link; the link after, None when it is unknown."""
        entry = self.links.get(payment.link_id)
        if entry is None:
            return None
        sequence, link = entry
        last = payment.at if link.last_paid_at is None else max(link.last_paid_at, payment.at)
        paid = dataclasses.replace(
            link,
            paid_count=link.paid_count + 1,
            paid_msat=Msat(link.paid_msat + payment.amount_msat),
            last_paid_at=last,
        )
        self._set(self.links, payment.link_id, (sequence, paid))
        return paid

    # Webhooks
    def _add_events(self, events: list[NewEvent]) -> None:
        for event in events:
            event_id = next(self.event_ids)
            stored = WebhookEvent(
                event_id,
                event.type,
                event.resource,
                event.payload,
                self.clock.now(),
                secrets.token_hex(16),
            )
            self._set(self.events, event_id, stored)

    def fan_out_webhook_events(
        self, subscriptions: Mapping[str, frozenset[str]], now: float, limit: int
    ) -> int:
        for name in [name for name in self.webhook_cursors if name not in subscriptions]:
            self._delete(self.webhook_cursors, name)
            for key, delivery in list(self.deliveries.items()):
                if key[0] == name and delivery.state is DeliveryState.PENDING:
                    dead = dataclasses.replace(
                        delivery,
                        state=DeliveryState.DEAD,
                        next_attempt_at=now,
                        last_error=ENDPOINT_REMOVED,
                    )
                    self._set(self.deliveries, key, dead)
        newest = max(self.events, default=0)
        added = 0
        for name, types in subscriptions.items():
            cursor = self.webhook_cursors.get(name)
            if cursor is None:
                self._set(self.webhook_cursors, name, newest)
                continue
            batch = sorted(event_id for event_id in self.events if event_id > cursor)
            batch = batch[: max(0, limit)]
            for event_id in batch:
                event = self.events[event_id]
                if event.type in types and (name, event_id) not in self.deliveries:
                    delivery = WebhookDelivery(
                        event_id, name, event.type, DeliveryState.PENDING, 0, now
                    )
                    self._set(self.deliveries, (name, event_id), delivery)
                    added += 1
            if batch:
                self._set(self.webhook_cursors, name, batch[-1])
        return added

    def next_webhook_delivery(self, endpoint: str) -> tuple[WebhookDelivery, WebhookEvent] | None:
        pending = [
            delivery
            for (name, _), delivery in self.deliveries.items()
            if name == endpoint and delivery.state is DeliveryState.PENDING
        ]
        if not pending:
            return None
        first = min(pending, key=lambda delivery: delivery.event_id)
        return first, self.events[first.event_id]

    def record_webhook_attempt(
        self,
        event_id: int,
        endpoint: str,
        delivered: bool,
        now: float,
        status: int | None,
        error: str,
        retry: tuple[int, float, float],
    ) -> WebhookDelivery | None:
        delivery = self.deliveries.get((endpoint, event_id))
        if delivery is None or delivery.state is not DeliveryState.PENDING:
            return None
        max_attempts, initial, most = retry
        attempts = delivery.attempts + 1  # decided from the attempts stored now
        state, next_attempt_at = DeliveryState.PENDING, now
        if delivered:
            state = DeliveryState.DELIVERED
        elif attempts >= max_attempts:
            state = DeliveryState.DEAD
        else:
            next_attempt_at = now + webhook_retry_delay(attempts, initial, most)
        after = dataclasses.replace(
            delivery,
            state=state,
            attempts=attempts,
            next_attempt_at=next_attempt_at,
            last_status=status,
            last_error=error,
            delivered_at=now if delivered else None,
        )
        self._set(self.deliveries, (endpoint, event_id), after)
        return after

    def list_webhook_events(self, after: int, limit: int) -> list[WebhookEvent]:
        ids = sorted(event_id for event_id in self.events if event_id > after)
        return [self.events[event_id] for event_id in ids[: max(0, limit)]]

    def list_webhook_deliveries(
        self,
        state: DeliveryState | None,
        endpoint: str | None,
        limit: int,
        event_id: int | None,
    ) -> list[WebhookDelivery]:
        chosen = sorted(
            (
                delivery
                for delivery in self.deliveries.values()
                if (state is None or delivery.state is state)
                and (endpoint is None or delivery.endpoint == endpoint)
                and (event_id is None or delivery.event_id == event_id)
            ),
            key=lambda delivery: (-delivery.event_id, delivery.endpoint),
        )
        return chosen[: max(0, limit)]

    def redeliver_webhooks(
        self,
        now: float,
        event_id: int | None,
        endpoint: str | None,
        endpoints: Collection[str] | None,
    ) -> int:
        def wanted(name: str) -> bool:
            return endpoint in (None, name) and (endpoints is None or name in endpoints)

        if event_id is None:
            chosen = [
                key
                for key, delivery in self.deliveries.items()
                if delivery.state is DeliveryState.DEAD and wanted(key[0])
            ]
        else:
            event = self.events.get(event_id)
            if event is None:
                return 0
            chosen = [key for key in self.deliveries if key[1] == event_id and wanted(key[0])]
            if endpoint is not None and not chosen and wanted(endpoint):
                fresh = WebhookDelivery(
                    event_id, endpoint, event.type, DeliveryState.PENDING, 0, now
                )
                self._set(self.deliveries, (endpoint, event_id), fresh)
                return 1
        for key in chosen:
            again = dataclasses.replace(
                self.deliveries[key],
                state=DeliveryState.PENDING,
                attempts=0,
                next_attempt_at=now,
                delivered_at=None,
            )
            self._set(self.deliveries, key, again)
        return len(chosen)

    def prune_webhook_events(self, before: float, limit: int, endpoints: Collection[str]) -> int:
        # Only the configured endpoints still send anything.
        behind = min(
            (cursor for name, cursor in self.webhook_cursors.items() if name in endpoints),
            default=None,
        )
        busy = {
            event_id
            for (name, event_id), delivery in self.deliveries.items()
            if delivery.state is DeliveryState.PENDING and name in endpoints
        }
        doomed = sorted(
            event_id
            for event_id, event in self.events.items()
            if event.created_at < before
            and event_id not in busy
            and (behind is None or event_id <= behind)
        )[: max(0, limit)]
        gone = set(doomed)
        for key in [key for key in self.deliveries if key[1] in gone]:
            self._delete(self.deliveries, key)
        for event_id in doomed:
            self._delete(self.events, event_id)
        return len(doomed)


def _changed(balance: PayeeBalance, change: PayeeChange) -> PayeeBalance:
    last = balance.last_payout_at
    if change.last_payout_at is not None:
        last = max(change.last_payout_at, last or change.last_payout_at)
    return dataclasses.replace(
        balance,
        pending_msat=Msat(balance.pending_msat - change.pending),
        paid_msat=Msat(balance.paid_msat + change.paid),
        fees_msat=Msat(balance.fees_msat + change.fees),
        merchant_fees_msat=Msat(balance.merchant_fees_msat + change.merchant_fees),
        last_payout_at=last,
    )


class _MemoryOperations:
    """The ``StoreOperations`` over ``_Tables``; ``_run`` says when each may run."""

    async def _run(self, operation: Callable[[_Tables], T]) -> T:
        raise NotImplementedError

    async def put_root_key(self, key_id: bytes, token_id: bytes, root_key: bytes) -> None:
        await self._run(lambda tables: tables.put_root_key(key_id, token_id, root_key))

    async def get_root_key(self, key_id: bytes) -> bytes | None:
        return await self._run(lambda tables: tables.get_root_key(key_id))

    async def revoke_token(self, token_id: bytes) -> bool:
        return await self._run(lambda tables: tables.revoke_token(token_id))

    async def add_invoice(self, record: InvoiceRecord) -> None:
        await self._run(lambda tables: tables.add_invoice(record))

    async def apply_update(self, update: InvoiceUpdate) -> InvoiceRecord | None:
        return await self._run(lambda tables: tables.apply_update(update))

    async def get_invoice(self, payment_hash: PaymentHash) -> InvoiceRecord | None:
        return await self._run(lambda tables: tables.get_invoice(payment_hash))

    async def list_invoices(
        self,
        state: InvoiceState | None = None,
        limit: int | None = None,
        service: str | None = None,
    ) -> list[InvoiceRecord]:
        return await self._run(lambda tables: tables.list_invoices(state, limit, service))

    async def invoice_totals(self) -> list[InvoiceTotal]:
        return await self._run(lambda tables: tables.invoice_totals())

    async def list_overdue(self, expired_before: float, limit: int) -> list[InvoiceRecord]:
        return await self._run(lambda tables: tables.list_overdue(expired_before, limit))

    async def revenue(self, since: float, bucket_seconds: int) -> list[RevenueBucket]:
        return await self._run(lambda tables: tables.revenue(since, bucket_seconds))

    async def list_open_credit_invoices(self, token_id: bytes, limit: int) -> list[InvoiceRecord]:
        return await self._run(lambda tables: tables.list_open_credit_invoices(token_id, limit))

    async def prune_unpaid(self, expired_before: float, limit: int) -> int:
        return await self._run(lambda tables: tables.prune_unpaid(expired_before, limit))

    async def get_cursor(self) -> Cursor:
        return await self._run(lambda tables: tables.cursor)

    async def save_cursor(self, cursor: Cursor) -> None:
        await self._run(lambda tables: tables.save_cursor(cursor))

    async def open_account(self, token_id: bytes, service: str) -> None:
        await self._run(lambda tables: tables.open_account(token_id, service))

    async def get_account(self, token_id: bytes) -> Account | None:
        return await self._run(lambda tables: tables.accounts.get(token_id))

    async def reserve(self, token_id: bytes, amount_msat: Msat, expires_at: float) -> Reserved:
        return await self._run(lambda tables: tables.reserve(token_id, amount_msat, expires_at))

    async def settle_reservation(
        self,
        reservation_id: int,
        charged_msat: Msat,
        method: str,
        path: str,
        *,
        split: Split = (),
    ) -> Msat | None:
        return await self._run(
            lambda tables: tables.settle_reservation(
                reservation_id, charged_msat, method, path, split
            )
        )

    async def release_expired_reservations(self, now: float, limit: int) -> int:
        return await self._run(lambda tables: tables.release_expired_reservations(now, limit))

    async def list_charges(self, token_id: bytes, limit: int) -> list[Charge]:
        return await self._run(lambda tables: tables.list_charges(token_id, limit))

    async def prune_charges(self, charged_before: float, limit: int) -> int:
        return await self._run(lambda tables: tables.prune_charges(charged_before, limit))

    async def list_accounts(self, limit: int | None = None) -> list[Account]:
        return await self._run(lambda tables: tables.list_accounts(limit))

    async def credit_totals(self) -> CreditTotals:
        return await self._run(lambda tables: tables.credit_totals())

    async def begin_withdrawal(self, withdrawal: Withdrawal) -> Msat | None:
        return await self._run(lambda tables: tables.begin_withdrawal(withdrawal))

    async def finish_withdrawal(
        self, payment_hash: PaymentHash, state: WithdrawalState, fee_msat: Msat, now: float
    ) -> Withdrawal | None:
        return await self._run(
            lambda tables: tables.finish_withdrawal(payment_hash, state, fee_msat, now)
        )

    async def list_withdrawals(
        self,
        state: WithdrawalState | None = None,
        token_id: bytes | None = None,
        limit: int | None = None,
    ) -> list[Withdrawal]:
        return await self._run(lambda tables: tables.list_withdrawals(state, token_id, limit))

    async def begin_payout(self, payout: Payout) -> bool:
        return await self._run(lambda tables: tables.begin_payout(payout))

    async def finish_payout(
        self,
        payment_hash: PaymentHash,
        state: PayoutState,
        fee_msat: Msat,
        now: float,
        failure: str = "",
    ) -> Payout | None:
        return await self._run(
            lambda tables: tables.finish_payout(payment_hash, state, fee_msat, now, failure)
        )

    async def get_payee(self, payee: str) -> PayeeBalance | None:
        return await self._run(lambda tables: tables.payees.get(payee))

    async def list_payees(self) -> list[PayeeBalance]:
        return await self._run(lambda tables: tables.list_payees())

    async def list_payouts(
        self,
        payee: str | None = None,
        state: PayoutState | None = None,
        limit: int | None = None,
    ) -> list[Payout]:
        return await self._run(lambda tables: tables.list_payouts(payee, state, limit))

    async def split_totals(self) -> SplitTotals:
        return await self._run(lambda tables: tables.split_totals())

    async def add_link(self, link: PaymentLink) -> None:
        await self._run(lambda tables: tables.add_link(link))

    async def get_link(self, link_id: str) -> PaymentLink | None:
        return await self._run(lambda tables: tables.get_link(link_id))

    async def list_links(
        self, state: LinkState | None = None, now: float = 0.0, limit: int | None = None
    ) -> list[PaymentLink]:
        return await self._run(lambda tables: tables.list_links(state, now, limit))

    async def cancel_link(self, link_id: str, now: float) -> PaymentLink | None:
        return await self._run(lambda tables: tables.cancel_link(link_id, now))

    async def add_link_invoice(self, record: InvoiceRecord, replaces: PaymentHash | None) -> bool:
        return await self._run(lambda tables: tables.add_link_invoice(record, replaces))

    async def add_held_request(self, held: HeldRequest) -> None:
        await self._run(lambda tables: tables.add_held_request(held))

    async def get_held_request(self, payment_hash: PaymentHash) -> HeldRequest | None:
        return await self._run(lambda tables: tables.get_held_request(payment_hash))

    async def list_held_requests(
        self, states: frozenset[HeldState], limit: int
    ) -> list[HeldRequest]:
        return await self._run(lambda tables: tables.list_held_requests(states, limit))

    async def list_held_hashes(self, states: frozenset[HeldState], limit: int) -> list[PaymentHash]:
        return await self._run(lambda tables: tables.list_held_hashes(states, limit))

    async def count_held_requests(
        self, states: frozenset[HeldState], client: str | None = None
    ) -> int:
        return await self._run(lambda tables: tables.count_held_requests(states, client))

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
        return await self._run(
            lambda tables: tables.move_held_request(
                payment_hash, state, now, response, failure, keep_until
            )
        )

    async def mark_held_delivered(
        self, payment_hash: PaymentHash, now: float, keep_until: float
    ) -> None:
        await self._run(lambda tables: tables.mark_held_delivered(payment_hash, now, keep_until))

    async def prune_held_requests(self, now: float, limit: int) -> int:
        return await self._run(lambda tables: tables.prune_held_requests(now, limit))

    async def fan_out_webhook_events(
        self, subscriptions: Mapping[str, frozenset[str]], now: float, limit: int
    ) -> int:
        return await self._run(
            lambda tables: tables.fan_out_webhook_events(subscriptions, now, limit)
        )

    async def next_webhook_delivery(
        self, endpoint: str
    ) -> tuple[WebhookDelivery, WebhookEvent] | None:
        return await self._run(lambda tables: tables.next_webhook_delivery(endpoint))

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
        retry = (max_attempts, initial_backoff, max_backoff)
        return await self._run(
            lambda tables: tables.record_webhook_attempt(
                event_id, endpoint, delivered, now, status, error, retry
            )
        )

    async def get_webhook_event(self, event_id: int) -> WebhookEvent | None:
        return await self._run(lambda tables: tables.events.get(event_id))

    async def list_webhook_events(self, after: int = 0, limit: int = 100) -> list[WebhookEvent]:
        return await self._run(lambda tables: tables.list_webhook_events(after, limit))

    async def list_webhook_deliveries(
        self,
        state: DeliveryState | None = None,
        endpoint: str | None = None,
        limit: int = 100,
        *,
        event_id: int | None = None,
    ) -> list[WebhookDelivery]:
        return await self._run(
            lambda tables: tables.list_webhook_deliveries(state, endpoint, limit, event_id)
        )

    async def redeliver_webhooks(
        self,
        now: float,
        *,
        event_id: int | None = None,
        endpoint: str | None = None,
        endpoints: Collection[str] | None = None,
    ) -> int:
        return await self._run(
            lambda tables: tables.redeliver_webhooks(now, event_id, endpoint, endpoints)
        )

    async def prune_webhook_events(
        self, before: float, limit: int, endpoints: Collection[str]
    ) -> int:
        return await self._run(lambda tables: tables.prune_webhook_events(before, limit, endpoints))


class _MemoryTransaction(_MemoryOperations):
    """The operations of one open transaction: they run at once, journalled."""

    def __init__(self, tables: _Tables) -> None:
        self._tables: _Tables | None = tables

    async def _run(self, operation: Callable[[_Tables], T]) -> T:
        if self._tables is None:
            raise RuntimeError("the transaction has ended; start another one")
        return operation(self._tables)

    def end(self) -> None:
        self._tables = None


class MemoryStore(_MemoryOperations):
    """A ``Store`` held in memory."""

    def __init__(self, clock: Clock | None = None) -> None:
        self._clock = clock or SystemClock()
        self._tables = _Tables(self._clock)
        self._gate = TransactionGate()
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed("the memory store is closed")

    async def _run(self, operation: Callable[[_Tables], T]) -> T:
        self._check_open()
        async with self._gate.turn():  # one made before close() still runs, before it
            return operation(self._tables)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[StoreOperations]:
        self._check_open()
        async with self._gate.transaction():
            tables = self._tables
            journal: list[Callable[[], None]] = []
            tables.undo = journal
            transaction = _MemoryTransaction(tables)
            try:
                yield transaction
            except BaseException:
                tables.undo = None  # the undoing itself is not journalled
                for undo in reversed(journal):
                    undo()
                raise
            finally:
                transaction.end()
                tables.undo = None

    async def close(self) -> None:
        """Drop everything; later calls raise ``StoreClosed``. Closing twice is harmless.

        An open transaction is first let finish.
        """
        if self._closed:
            return
        self._closed = True
        async with self._gate.turn():
            self._tables = _Tables(self._clock)
