"""Paid tokens kept for reuse, and payments begun but not yet turned into tokens.

Which later requests a token is sent with, and what a 401 or 402 for it changes, is told in
:mod:`gateway.client.tokens`.

**Pending payments.** Before a payment starts, an entry (URL, macaroon, invoice, payment
hash) is written durably; once the payer returns the preimage, the token replaces the entry in
one atomic write. An entry left by a crash is resolved by asking the payer about the payment
hash (see :meth:`gateway.client.L402Client.recover`).

**The file.** ``TokenCache(path)`` persists both as a private JSON file, written atomically
and locked against other processes (:mod:`gateway.client.cache_file`). The file holds
preimages (bearer secrets): keep it private. ``TokenCache()`` keeps everything in memory only.

Every method is a coroutine: file work (reading, the lock, ``fsync``) runs in a worker
thread, so a lock held by another process or a slow disk stalls only the caller, never the
event loop. Changes from one ``TokenCache`` wait for each other, so at most one of its threads
waits for the lock. A change whose caller is cancelled still completes.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from gateway.client.cache_file import CacheContents, CacheFile, Stamp
from gateway.client.tokens import MAX_PATHS, CachedToken, PendingPayment, request_of, split_url

__all__ = ["TokenCache"]


def _successor(new: CachedToken, old: CachedToken) -> CachedToken:
    """``new`` (a top-up of ``old``'s account) in ``old``'s place: offered wherever ``old``
    was (the top-up was bought at a path ``old`` was sent to) and where it worked."""
    scope = old.scope if new.scope.startswith(old.scope) else new.scope
    worked = tuple(dict.fromkeys((*old.worked, *new.worked)))[-MAX_PATHS:]
    refused = tuple(path for path in old.refused if path not in worked)
    return replace(new, scope=scope, worked=worked, refused=refused)


class TokenCache:
    """Tokens and pending payments, in memory or in a JSON file (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str] | None = None, *, max_tokens: int = 1000):
        self._file = CacheFile(Path(path).expanduser()) if path is not None else None
        self._max_tokens = max_tokens
        self._contents = CacheContents()
        self._stamp: Stamp | None = None
        self._changing = asyncio.Lock()

    @property
    def path(self) -> Path | None:
        return self._file.path if self._file is not None else None

    # -- reading ---------------------------------------------------------------------------

    async def _current(self) -> CacheContents:
        """The contents, re-read from the file when it changed since the last read."""
        if self._file is None:
            return self._contents
        fresh = await asyncio.to_thread(self._file.read_if_changed, self._stamp)
        if fresh is not None:
            self._contents, self._stamp = fresh
        return self._contents

    async def tokens(self) -> list[CachedToken]:
        return list((await self._current()).tokens.values())

    async def pending(self, origin: str | None = None) -> list[PendingPayment]:
        """Pending payments, oldest first, optionally only those of ``origin``."""
        entries = sorted((await self._current()).pending.values(), key=lambda p: p.created_at)
        return [p for p in entries if origin is None or p.origin == origin]

    async def find(
        self, url: str, method: str, now: float, body_sha256: str | None = None
    ) -> CachedToken | None:
        """The token to send with this request, if any (see :mod:`gateway.client.tokens`).
        ``body_sha256``: the request body's :func:`~gateway.client.tokens.body_digest`; None
        (not known) finds no pay-on-success token."""
        origin, path = split_url(url)
        request = request_of(method, url)
        best: tuple[tuple[int, int, float], CachedToken] | None = None
        for token in (await self._current()).tokens.values():
            if token.origin != origin or token.expired(now):
                continue
            fit = token.fit(path, method, request, body_sha256)
            if fit is None:
                continue
            rank = (*fit, token.created_at)
            if best is None or rank > best[0]:
                best = (rank, token)
        return best[1] if best else None

    # -- changing --------------------------------------------------------------------------

    async def _change(self, change: Callable[[CacheContents], bool]) -> None:
        """Apply ``change`` (True: something changed) to the current contents and persist
        them; ``change`` runs in a worker thread on the file's contents, read under the lock."""
        if self._file is None:
            change(self._contents)
            return
        async with self._changing:
            await asyncio.to_thread(self._file.update, change)
            self._stamp = None  # read our own write back, with its stamp

    async def add_pending(self, entry: PendingPayment) -> None:
        """Record a payment about to start; on return it is durable."""

        def change(contents: CacheContents) -> bool:
            contents.pending[entry.payment_hash] = entry
            return True

        await self._change(change)

    async def drop_pending(self, payment_hash: bytes) -> None:
        def change(contents: CacheContents) -> bool:
            return contents.pending.pop(payment_hash, None) is not None

        await self._change(change)

    async def store(self, token: CachedToken, now: float) -> None:
        """Keep a paid token and clear its pending entry, in one write.

        A token of the origin with the same token id is a credit account's earlier token (the
        new one is its top-up): the new token takes its place, with its scope if broader and
        the paths it worked for. Expired tokens are dropped, and the oldest ones beyond
        ``max_tokens``.
        """
        max_tokens = self._max_tokens

        def change(contents: CacheContents) -> bool:
            contents.pending.pop(token.payment_hash, None)
            kept = token
            for key, old in list(contents.tokens.items()):
                if old.expired(now):
                    del contents.tokens[key]
                elif (old.origin, old.token_id) == (token.origin, token.token_id):
                    del contents.tokens[key]
                    kept = _successor(kept, old)
            if not kept.expired(now):
                contents.tokens[token.payment_hash] = kept
            surplus = len(contents.tokens) - max_tokens
            if surplus > 0:
                for old in sorted(contents.tokens.values(), key=lambda t: t.created_at)[:surplus]:
                    del contents.tokens[old.payment_hash]
            return True

        await self._change(change)

    async def remove(self, payment_hash: bytes) -> None:
        def change(contents: CacheContents) -> bool:
            return contents.tokens.pop(payment_hash, None) is not None

        await self._change(change)

    async def refused(self, payment_hash: bytes, url: str, status: int) -> None:
        """The server answered ``status`` (401 or 402) to the token at ``url``."""
        _, path = split_url(url)

        def change(contents: CacheContents) -> bool:
            token = contents.tokens.get(payment_hash)
            if token is None:
                return False
            if status != 402 or path in token.worked:
                del contents.tokens[payment_hash]
            elif path not in token.refused:
                refused = (*token.refused, path)[-MAX_PATHS:]
                contents.tokens[payment_hash] = replace(token, refused=refused)
            else:
                return False
            return True

        await self._change(change)

    async def worked(self, payment_hash: bytes, url: str) -> None:
        """The token was accepted at ``url``."""
        _, path = split_url(url)
        token = (await self._current()).tokens.get(payment_hash)
        if token is None or path in token.worked:
            return  # nothing to record: no write

        def change(contents: CacheContents) -> bool:
            token = contents.tokens.get(payment_hash)
            if token is None or path in token.worked:
                return False
            worked = (*token.worked, path)[-MAX_PATHS:]
            refused = tuple(p for p in token.refused if p != path)
            contents.tokens[payment_hash] = replace(token, worked=worked, refused=refused)
            return True

        await self._change(change)
