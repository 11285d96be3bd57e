"""Health checks: is the process alive, and is it ready to take traffic.

Liveness needs nothing but an event loop that answers: the web adapters answer
``LIVE_PATH`` themselves. Readiness (``Readiness.check``) is ready only when every check
passes:

- ``lnd``: the node answers. Probed with ``LookupInvoice`` of a random payment hash, which
  the gateway's least-privilege macaroon (``invoices:read invoices:write``) may call (it cannot
  call ``GetInfo``): "not found" means the node is reachable and answering.
- ``store``: the store takes a write: ``revoke_token`` of a random token id (a delete that
  matches nothing, run under the store's write lock).
- ``watcher``: the supervised settlement watcher is running and caught up: subscribed to the
  node's invoice stream since its last (re)connection and the store's open invoices
  reconciled with the node (``InvoiceWatcher.connected``). A process that does not run the
  watcher (``[server] workers > 1``: only the first worker does) reports it as "not run in
  this process" and does not fail on it: it cannot see another process's watcher, and the
  watching worker's own readiness reports it. Of several instances sharing a PostgreSQL
  store, only the leader runs it (``gateway.leader``): a watching process that does not
  lead reports it as run by the leader, and does not fail on it either (once it has asked
  for the lease: until then it fails, not knowing yet).
- ``tasks``: every other supervised background task (sweeper, hold executor, withdrawal
  resolver) is running, not backing off after a failure. The fiat rate fetcher is reported
  but never fails readiness: the paywall's fiat display is not worth taking a gateway out.
- ``liquidity`` (in the watching process): the node's inbound liquidity, total and largest
  channel, with a warning for routes it cannot receive (``gateway.liquidity``); never fails.

The node and store probes are cached for ``cache_seconds`` and concurrent checks share one
probe, so a storm of readiness probes costs one LookupInvoice and one store write every few
seconds. The report says why a check failed, without secrets (no macaroon, no key).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from gateway import errors
from gateway.ports import InvoiceBackend, PaymentHash, Store
from gateway.supervisor import TaskHealth, TaskState

__all__ = [
    "HEALTH_PATHS",
    "LIVE_PATH",
    "READY_PATH",
    "Check",
    "HealthReport",
    "HealthSlot",
    "Readiness",
]

LIVE_PATH = "/.well-known/l402/live"
READY_PATH = "/.well-known/l402/ready"
HEALTH_PATHS = frozenset({LIVE_PATH, READY_PATH})

WATCHER_TASK = "l402-invoice-watcher"
# Reported, never failing readiness.
OPTIONAL_TASKS = frozenset({"l402-fiat-rate", "l402-liquidity"})
_MAX_DETAIL = 200


@dataclass(frozen=True, slots=True)
class Check:
    """One readiness check: whether it passed, and what it found (or why it failed)."""

    name: str
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class HealthReport:
    checks: tuple[Check, ...]

    @property
    def ready(self) -> bool:
        return all(check.ok for check in self.checks)

    def as_json(self) -> dict[str, object]:
        return {
            "status": "ready" if self.ready else "not ready",
            "checks": {
                check.name: {"ok": check.ok, "detail": check.detail} for check in self.checks
            },
        }


def _describe(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return text[:_MAX_DETAIL]


class Readiness:
    """The readiness checks of one running gateway process (see the module docstring).

    ``watcher_caught_up`` is None in a process that does not run the watcher; ``leading``,
    when given, says whether this watching process leads (runs it now): None until it knows.
    """

    def __init__(
        self,
        backend: InvoiceBackend,
        store: Store,
        tasks: Callable[[], tuple[TaskHealth, ...]],
        *,
        watcher_caught_up: Callable[[], bool] | None,
        leading: Callable[[], bool | None] | None = None,
        cache_seconds: float = 2.0,
        timeout: float = 3.0,
        liquidity: Callable[[], Check] | None = None,
    ) -> None:
        # Reported, never failing (``gateway.liquidity``); None where it is not measured.
        self._liquidity = liquidity
        self._backend = backend
        self._store = store
        self._tasks = tasks
        self._watcher_caught_up = watcher_caught_up
        self._leading = leading
        self._cache_seconds = cache_seconds
        self._timeout = timeout
        self._probed: tuple[float, Check, Check] | None = None
        self._probing: asyncio.Future[tuple[Check, Check]] | None = None

    async def check(self) -> HealthReport:
        lnd, store = await self._probes()
        checks = [lnd, store, self._watcher(), self._other_tasks()]
        if self._liquidity is not None:
            checks.append(self._liquidity())
        return HealthReport(tuple(checks))

    async def _probes(self) -> tuple[Check, Check]:
        now = asyncio.get_running_loop().time()
        if self._probed is not None and now - self._probed[0] < self._cache_seconds:
            return self._probed[1], self._probed[2]
        if self._probing is None:
            self._probing = asyncio.ensure_future(self._probe())
            self._probing.add_done_callback(self._probe_done)
        # Shielded: one caller going away (a client hanging up) does not cancel the others'.
        return await asyncio.shield(self._probing)

    def _probe_done(self, future: asyncio.Future[tuple[Check, Check]]) -> None:
        self._probing = None
        if not future.cancelled() and future.exception() is None:
            lnd, store = future.result()
            self._probed = (asyncio.get_running_loop().time(), lnd, store)

    async def _probe(self) -> tuple[Check, Check]:
        lnd, store = await asyncio.gather(self._probe_lnd(), self._probe_store())
        return lnd, store

    async def _probe_lnd(self) -> Check:
        try:
            async with asyncio.timeout(self._timeout):
                await self._backend.lookup_invoice(PaymentHash(secrets.token_bytes(32)))
        except errors.InvoiceNotFound:
            return Check("lnd", True, "reachable (LookupInvoice answered)")
        except TimeoutError:
            return Check("lnd", False, f"no answer within {self._timeout:g}s")
        except errors.BackendError as error:
            return Check("lnd", False, _describe(error))
        # A random hash found: the node answered all the same.
        return Check("lnd", True, "reachable (LookupInvoice answered)")

    async def _probe_store(self) -> Check:
        try:
            async with asyncio.timeout(self._timeout):
                await self._store.revoke_token(secrets.token_bytes(32))
        except TimeoutError:
            return Check("store", False, f"no write within {self._timeout:g}s")
        except errors.StoreError as error:
            return Check("store", False, _describe(error))
        return Check("store", True, "writable")

    def _tasks_by_name(self) -> Mapping[str, TaskHealth]:
        return {task.name: task for task in self._tasks()}

    def _watcher(self) -> Check:
        if self._watcher_caught_up is None:
            return Check("watcher", True, "not run in this process (another worker runs it)")
        if self._leading is not None:
            leading = self._leading()
            if leading is None:
                return Check("watcher", False, "not started: asking for the leader lease")
            if not leading:
                return Check("watcher", True, "runs on the leader (another instance leads)")
        task = self._tasks_by_name().get(WATCHER_TASK)
        if task is None:
            return Check("watcher", False, "not started")
        if task.state is not TaskState.RUNNING:
            why = f"; last error {task.last_error}" if task.last_error else ""
            return Check("watcher", False, f"{task.state.value}{why}"[:_MAX_DETAIL])
        if not self._watcher_caught_up():
            return Check("watcher", False, "not caught up: (re)connecting to the invoice stream")
        return Check("watcher", True, "running, caught up")

    def _other_tasks(self) -> Check:
        ok = True
        states = []
        for task in self._tasks():
            if task.name == WATCHER_TASK:
                continue
            failing = task.state is not TaskState.RUNNING
            if failing and task.name not in OPTIONAL_TASKS:
                ok = False
            state = task.state.value
            if failing and task.last_error:
                state += f" ({task.last_error})"
            states.append(f"{task.name}: {state}")
        detail = "; ".join(states) if states else "none"
        return Check("tasks", ok, detail[: _MAX_DETAIL * 2])


@dataclass(slots=True)
class HealthSlot:
    """Where a web adapter finds the readiness of the gateway it serves: filled in by
    ``running_gateway(..., health=slot)`` while the gateway runs, None before and after."""

    readiness: Readiness | None = None
