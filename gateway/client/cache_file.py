"""The token cache's file: its JSON format and its locked, atomic, private writes.

``version`` 1: ``{"version": 1, "tokens": [...], "pending": [...]}``. Fields added later
(a pay-on-success token's ``paid_request`` and ``paid_body_sha256``) are written only when
set, and read as unset when absent, so older files load and older readers see nothing new. A
write goes to a temporary file in the same directory (mode 0600), is fsynced and renamed over
the old file, then the directory is fsynced; the directory is created with mode 0700. A
change re-reads the file under an exclusive ``flock`` on ``<file>.lock``, so processes
sharing the file do not lose each other's entries; reading takes no lock (a rename is
atomic). A file that does not parse is an error, never a fresh start: it may hold a payment
that is not yet a token.

Everything here blocks (``flock`` waits for other processes, ``fsync`` for the disk):
:class:`~gateway.client.cache.TokenCache` calls it from worker threads.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway import l402
from gateway.client.errors import TokenCacheError
from gateway.client.tokens import MAX_PATHS, CachedToken, PendingPayment

__all__ = ["CacheContents", "CacheFile", "Stamp"]

_VERSION = 1
_HEX64 = frozenset("0123456789abcdef")
# (inode, mtime in ns, size): a rename or a rewrite changes it.
Stamp = tuple[int, int, int]


@dataclass
class CacheContents:
    """Tokens and pending payments, by payment hash."""

    tokens: dict[bytes, CachedToken] = field(default_factory=dict)
    pending: dict[bytes, PendingPayment] = field(default_factory=dict)


def _hex(value: object, size: int = 32) -> bytes:
    if not isinstance(value, str) or len(value) != 2 * size or not set(value) <= _HEX64:
        raise ValueError("expected lower-case hex")
    return bytes.fromhex(value)


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError("expected an integer")
    return value


def _float(value: object) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ValueError("expected a number")
    return float(value)


def _paths(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("expected a list of strings")
    return tuple(value[-MAX_PATHS:])


def _optional_str(value: object) -> str | None:
    return None if value is None else _str(value)


def _optional_digest(value: object) -> str | None:
    return None if value is None else _hex(value).hex()


def _token_json(token: CachedToken) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "origin": token.origin,
        "scope": token.scope,
        "url": token.url,
        "scheme": token.scheme,
        "macaroon": token.macaroon_b64,
        "preimage": token.preimage.hex(),
        "payment_hash": token.payment_hash.hex(),
        "amount_msat": token.amount_msat,
        "created_at": token.created_at,
        "worked": list(token.worked),
        "refused": list(token.refused),
    }
    if token.paid_request is not None:  # absent: readers of older files see nothing new
        facts["paid_request"] = token.paid_request
    if token.paid_body_sha256 is not None:
        facts["paid_body_sha256"] = token.paid_body_sha256
    return facts


def _token_from(raw: Any) -> CachedToken:
    return CachedToken(
        origin=_str(raw["origin"]),
        scope=_str(raw["scope"]),
        url=_str(raw["url"]),
        scheme=_str(raw["scheme"]),
        macaroon_b64=_str(raw["macaroon"]),
        preimage=_hex(raw["preimage"]),
        payment_hash=_hex(raw["payment_hash"]),
        amount_msat=_int(raw["amount_msat"]),
        created_at=_float(raw["created_at"]),
        worked=_paths(raw["worked"]),
        refused=_paths(raw["refused"]),
        paid_request=_optional_str(raw.get("paid_request")),
        paid_body_sha256=_optional_digest(raw.get("paid_body_sha256")),
    )


def _pending_json(entry: PendingPayment) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "origin": entry.origin,
        "scope": entry.scope,
        "url": entry.url,
        "method": entry.method,
        "scheme": entry.scheme,
        "macaroon": entry.macaroon_b64,
        "invoice": entry.invoice,
        "payment_hash": entry.payment_hash.hex(),
        "amount_msat": entry.amount_msat,
        "destination": entry.destination,
        "description": entry.description,
        "created_at": entry.created_at,
    }
    if entry.paid_request is not None:
        facts["paid_request"] = entry.paid_request
    if entry.paid_body_sha256 is not None:
        facts["paid_body_sha256"] = entry.paid_body_sha256
    return facts


def _pending_from(raw: Any) -> PendingPayment:
    return PendingPayment(
        origin=_str(raw["origin"]),
        scope=_str(raw["scope"]),
        url=_str(raw["url"]),
        method=_str(raw["method"]),
        scheme=_str(raw["scheme"]),
        macaroon_b64=_str(raw["macaroon"]),
        invoice=_str(raw["invoice"]),
        payment_hash=_hex(raw["payment_hash"]),
        amount_msat=_int(raw["amount_msat"]),
        destination=_str(raw["destination"]),
        description=_str(raw["description"]),
        created_at=_float(raw["created_at"]),
        paid_request=_optional_str(raw.get("paid_request")),
        paid_body_sha256=_optional_digest(raw.get("paid_body_sha256")),
    )


def _serialize(contents: CacheContents) -> bytes:
    document = {
        "version": _VERSION,
        "tokens": [_token_json(t) for t in contents.tokens.values()],
        "pending": [_pending_json(p) for p in contents.pending.values()],
    }
    return json.dumps(document, indent=1).encode() + b"\n"


def _parse(data: bytes, path: Path) -> CacheContents:
    try:
        document = json.loads(data)
        if not isinstance(document, dict) or document.get("version") != _VERSION:
            raise ValueError(f"not a version {_VERSION} token cache")
        tokens = [_token_from(raw) for raw in document["tokens"]]
        pending = [_pending_from(raw) for raw in document["pending"]]
    except (ValueError, KeyError, TypeError, l402.L402Error) as error:
        # Never start over silently: the file may hold a payment that is not yet a token.
        raise TokenCacheError(f"token cache {path} is corrupt: {error}") from None
    return CacheContents(
        tokens={t.payment_hash: t for t in tokens},
        pending={p.payment_hash: p for p in pending},
    )


class CacheFile:
    """The JSON file at ``path``. Every method blocks: call them from a worker thread."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _error(self, error: OSError) -> TokenCacheError:
        return TokenCacheError(f"token cache {self.path}: {error.strerror}")

    def read_if_changed(self, known: Stamp | None) -> tuple[CacheContents, Stamp | None] | None:
        """The contents and their stamp (None: no file); None if the stamp is still ``known``."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return CacheContents(), None
        except OSError as error:
            raise self._error(error) from None
        stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        return None if stamp == known else (self._read(), stamp)

    def update(self, change: Callable[[CacheContents], bool]) -> None:
        """Under the lock, apply ``change`` to the file's contents and write them if it
        returns True. On return the change is durable."""
        with self._locked():
            contents = self._read()
            if change(contents):
                self._write(_serialize(contents))

    def _read(self) -> CacheContents:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return CacheContents()
        except OSError as error:
            raise self._error(error) from None
        return _parse(data, self.path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(
                self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600
            )
        except OSError as error:
            raise self._error(error) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _write(self, data: bytes) -> None:
        directory = self.path.parent
        try:
            fd, temporary = tempfile.mkstemp(
                prefix=f".{self.path.name}.", suffix=".tmp", dir=directory
            )
        except OSError as error:
            raise self._error(error) from None
        try:
            with os.fdopen(fd, "wb") as file:
                os.fchmod(file.fileno(), 0o600)
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path)
            directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(directory_fd)
            finally:
                os.close(directory_fd)
        except OSError as error:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise self._error(error) from None
