"""``MemoryStore``: the ``Store`` contract in dictionaries, for tests and throwaway runs.

Nothing survives the process. The semantics are exactly those of ``SqliteStore``; the shared
contract suite in ``tests/unit/store`` runs against both.
"""

from __future__ import annotations

import dataclasses
import itertools

from gateway.errors import StoreClosed, StoreError
from gateway.ports import Cursor, InvoiceRecord, InvoiceState, InvoiceUpdate, PaymentHash

TERMINAL_STATES = frozenset({InvoiceState.SETTLED, InvoiceState.CANCELED})
UNPAID_ENDINGS = frozenset({InvoiceState.CANCELED, InvoiceState.EXPIRED})


def _moves(current: InvoiceState, new: InvoiceState) -> bool:
    """Whether a tracked invoice in ``current`` takes an update to ``new``."""
    if current in TERMINAL_STATES:
        return False
    if current is InvoiceState.EXPIRED:
        return new in TERMINAL_STATES  # only the node's final word replaces ours
    if new is InvoiceState.EXPIRED:
        return current is InvoiceState.OPEN  # never over an ACCEPTED (held) payment
    return True


class MemoryStore:
    """A ``Store`` held in memory. No method awaits, so each one is atomic on its loop."""

    def __init__(self) -> None:
        # key_id -> (token_id, root_key)
        self._root_keys: dict[bytes, tuple[bytes, bytes]] = {}
        # payment_hash -> (insertion sequence, record); the sequence plays SQLite's rowid
        self._invoices: dict[bytes, tuple[int, InvoiceRecord]] = {}
        self._sequence = itertools.count()
        self._cursor = Cursor()
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed("the memory store is closed")

    async def put_root_key(self, key_id: bytes, token_id: bytes, root_key: bytes) -> None:
        self._check_open()
        existing = self._root_keys.get(key_id)
        if existing is None:
            self._root_keys[key_id] = (token_id, root_key)
        elif existing != (token_id, root_key):
            raise StoreError(f"a different root key is already stored under {key_id.hex()}")

    async def get_root_key(self, key_id: bytes) -> bytes | None:
        self._check_open()
        entry = self._root_keys.get(key_id)
        return None if entry is None else entry[1]

    async def revoke_token(self, token_id: bytes) -> bool:
        self._check_open()
        doomed = [key_id for key_id, (owner, _) in self._root_keys.items() if owner == token_id]
        for key_id in doomed:
            del self._root_keys[key_id]
        return bool(doomed)

    async def add_invoice(self, record: InvoiceRecord) -> None:
        self._check_open()
        if record.payment_hash not in self._invoices:
            self._invoices[record.payment_hash] = (next(self._sequence), record)

    async def apply_update(self, update: InvoiceUpdate) -> bool:
        self._check_open()
        entry = self._invoices.get(update.payment_hash)
        if entry is None:
            return False
        sequence, record = entry
        if _moves(record.state, update.state):
            self._invoices[update.payment_hash] = (
                sequence,
                dataclasses.replace(
                    record,
                    state=update.state,
                    settle_index=max(record.settle_index, update.settle_index),
                    amount_paid_msat=update.amount_paid_msat,
                    settled_at=update.settled_at,
                ),
            )
        return True

    async def get_invoice(self, payment_hash: PaymentHash) -> InvoiceRecord | None:
        self._check_open()
        entry = self._invoices.get(payment_hash)
        return None if entry is None else entry[1]

    async def list_invoices(
        self, state: InvoiceState | None = None, limit: int | None = None
    ) -> list[InvoiceRecord]:
        self._check_open()
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        entries = sorted(
            (
                (record.created_at, sequence, record)
                for sequence, record in self._invoices.values()
                if state is None or record.state is state
            ),
            key=lambda entry: (entry[0], entry[1]),
            reverse=True,
        )
        records = [record for _, _, record in entries]
        return records if limit is None else records[:limit]

    async def list_overdue(self, expired_before: float, limit: int) -> list[InvoiceRecord]:
        self._check_open()
        overdue = sorted(
            (
                (record.expires_at, sequence, record)
                for sequence, record in self._invoices.values()
                if record.state is InvoiceState.OPEN and record.expires_at < expired_before
            ),
            key=lambda entry: (entry[0], entry[1]),
        )
        return [record for _, _, record in overdue[: max(0, limit)]]

    async def prune_unpaid(self, expired_before: float, limit: int) -> int:
        self._check_open()
        doomed = [
            record
            for _, record in self._invoices.values()
            if record.state in UNPAID_ENDINGS and record.expires_at < expired_before
        ][: max(0, limit)]
        tokens = {record.token_id for record in doomed}
        for key_id in [k for k, (token_id, _) in self._root_keys.items() if token_id in tokens]:
            del self._root_keys[key_id]
        for record in doomed:
            del self._invoices[record.payment_hash]
        return len(doomed)

    async def get_cursor(self) -> Cursor:
        self._check_open()
        return self._cursor

    async def save_cursor(self, cursor: Cursor) -> None:
        self._check_open()
        self._cursor = Cursor(
            add_index=max(self._cursor.add_index, cursor.add_index),
            settle_index=max(self._cursor.settle_index, cursor.settle_index),
        )

    async def close(self) -> None:
        """Drop everything; later calls raise ``StoreClosed``. Closing twice is harmless."""
        self._closed = True
        self._root_keys.clear()
        self._invoices.clear()
