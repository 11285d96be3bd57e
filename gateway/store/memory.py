"""``MemoryStore``: the ``Store`` contract in dictionaries, for tests and throwaway runs.

Nothing survives the process. The semantics are exactly those of ``SqliteStore``; the shared
contract suite in ``tests/unit/store`` runs against both.

No operation awaits, so each is atomic on its loop. A transaction spans awaits: while it is
open the tables keep an undo journal, replayed backwards if it fails, and the store's own
calls wait for it to end (``TransactionGate``).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from gateway.errors import StoreClosed, StoreError
from gateway.ports import (
    Cursor,
    InvoiceRecord,
    InvoiceState,
    InvoiceUpdate,
    PaymentHash,
    StoreOperations,
)
from gateway.store.gate import TransactionGate

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")

UNPAID_ENDINGS = frozenset({InvoiceState.CANCELED, InvoiceState.EXPIRED})


class _Tables:
    """The data and the operations on it, synchronous; every change goes through ``_set``,
    ``_delete`` or ``_set_cursor`` so that an open transaction can undo it."""

    def __init__(self) -> None:
        # key_id -> (token_id, root_key)
        self.root_keys: dict[bytes, tuple[bytes, bytes]] = {}
        # payment_hash -> (insertion sequence, record); the sequence plays SQLite's rowid
        self.invoices: dict[bytes, tuple[int, InvoiceRecord]] = {}
        self.cursor = Cursor()
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
        return updated

    def get_invoice(self, payment_hash: PaymentHash) -> InvoiceRecord | None:
        entry = self.invoices.get(payment_hash)
        return None if entry is None else entry[1]

    def list_invoices(self, state: InvoiceState | None, limit: int | None) -> list[InvoiceRecord]:
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        entries = sorted(
            (
                (record.created_at, sequence, record)
                for sequence, record in self.invoices.values()
                if state is None or record.state is state
            ),
            key=lambda entry: (entry[0], entry[1]),
            reverse=True,
        )
        records = [record for _, _, record in entries]
        return records if limit is None else records[:limit]

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

    def prune_unpaid(self, expired_before: float, limit: int) -> int:
        doomed = [
            record
            for _, record in self.invoices.values()
            if record.state in UNPAID_ENDINGS and record.expires_at < expired_before
        ][: max(0, limit)]
        tokens = {record.token_id for record in doomed}
        for key_id in [k for k, (token_id, _) in self.root_keys.items() if token_id in tokens]:
            self._delete(self.root_keys, key_id)
        for record in doomed:
            self._delete(self.invoices, record.payment_hash)
        return len(doomed)

    def save_cursor(self, cursor: Cursor) -> None:
        self._set_cursor(
            Cursor(
                add_index=max(self.cursor.add_index, cursor.add_index),
                settle_index=max(self.cursor.settle_index, cursor.settle_index),
            )
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
        self, state: InvoiceState | None = None, limit: int | None = None
    ) -> list[InvoiceRecord]:
        return await self._run(lambda tables: tables.list_invoices(state, limit))

    async def list_overdue(self, expired_before: float, limit: int) -> list[InvoiceRecord]:
        return await self._run(lambda tables: tables.list_overdue(expired_before, limit))

    async def prune_unpaid(self, expired_before: float, limit: int) -> int:
        return await self._run(lambda tables: tables.prune_unpaid(expired_before, limit))

    async def get_cursor(self) -> Cursor:
        return await self._run(lambda tables: tables.cursor)

    async def save_cursor(self, cursor: Cursor) -> None:
        await self._run(lambda tables: tables.save_cursor(cursor))


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

    def __init__(self) -> None:
        self._tables = _Tables()
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
            self._tables = _Tables()
