"""``TransactionGate``: one transaction at a time on a store, with the store's own calls kept
out of an open one. Shared by the stores whose transactions span several awaits.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any

# Entered by a store call when no transaction is open: it goes ahead without waiting.
_NO_WAIT: AbstractAsyncContextManager[object] = contextlib.nullcontext()


class TransactionGate:
    """Serialises a store's transactions; a store call made while one is open waits for it.

    A call made while none is open does not wait, so it is queued (on the store's worker or
    its loop) before any transaction that begins later: it can never land inside one.
    """

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._owner: asyncio.Task[Any] | None = None

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """Held for the whole of one transaction, from before it begins to after it ends."""
        self._refuse_reentry("store transactions do not nest")
        async with self._lock:
            self._owner = asyncio.current_task()
            try:
                yield
            finally:
                self._owner = None

    def turn(self) -> AbstractAsyncContextManager[object]:
        """What a store call enters before it runs: a wait only while a transaction is open."""
        if not self._lock.locked():
            return _NO_WAIT
        self._refuse_reentry(
            "the store was called inside its own transaction; call the transaction's methods"
        )
        return self._lock

    def refuse_reentry(self) -> None:
        """Raise ``RuntimeError`` when the running task holds the gate (a store call made
        inside its own transaction would wait for itself)."""
        self._refuse_reentry(
            "the store was called inside its own transaction; call the transaction's methods"
        )

    def _refuse_reentry(self, message: str) -> None:
        # The task holding the gate would wait for itself for ever.
        if self._owner is not None and self._owner is asyncio.current_task():
            raise RuntimeError(message)
