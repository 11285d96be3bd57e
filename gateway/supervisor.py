"""``Supervisor``: owns the gateway's long-lived background tasks, restarts the ones that fail,
and reports on them for a health check.

Each task is a named coroutine function, called afresh for every (re)start. When it raises,
the supervisor logs the error, waits a jittered, capped exponential backoff, and starts it
again: a node or store failure (``BackendError``, ``StoreError``) as a warning, anything else
(a bug) as an error with its traceback. A task that returns is restarted the same way: a
long-lived task that ends is a bug too. A run that lasted ``max_backoff`` seconds or more
starts the backoff over.

Cancellation stops everything: ``stop()``, or leaving ``async with``, cancels every task,
whether it is running or backing off, and returns once all have ended. A ``CancelledError``
that is not a cancellation of the task (one leaking out of something it awaited) is a failure
like any other.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from types import TracebackType

from gateway import errors
from gateway.ports import Clock, SystemClock

log = logging.getLogger(__name__)

# Failures of the outside world, expected now and then: no traceback needed.
EXPECTED_ERRORS = (errors.BackendError, errors.StoreError)


class TaskState(enum.Enum):
    RUNNING = "running"
    BACKING_OFF = "backing off"  # failed; waiting to be restarted
    STOPPED = "stopped"  # cancelled: the supervisor is shutting down


@dataclass(frozen=True, slots=True)
class TaskHealth:
    """One supervised task, as a health check reports it."""

    name: str
    state: TaskState
    restarts: int
    last_error: str | None  # the latest failure, as "KeyError: 'FOO'"; None if none yet
    last_start: float  # unix seconds, by the supervisor's clock


def backoff_delay(failures: int, initial: float, cap: float) -> float:
    """The wait before restart number ``failures`` in a row: doubling from ``initial``, at
    most ``cap``, and jittered down by up to half so that tasks failing together spread out."""
    capped = min(cap, initial * 2.0 ** min(failures - 1, 60))
    # Jitter, not secrecy: S311 does not apply.
    return capped * random.uniform(0.5, 1.0)  # noqa: S311


@dataclass(slots=True)
class _Supervised:
    name: str
    task: asyncio.Task[None] | None = None
    state: TaskState = TaskState.RUNNING
    restarts: int = 0
    last_error: str | None = None
    last_start: float = 0.0

    def health(self) -> TaskHealth:
        return TaskHealth(self.name, self.state, self.restarts, self.last_error, self.last_start)


class Supervisor:
    """Runs named long-lived tasks until ``stop()``; use it as ``async with Supervisor():``."""

    def __init__(
        self,
        clock: Clock | None = None,
        *,
        initial_backoff: float = 1.0,
        max_backoff: float = 30.0,
    ) -> None:
        if not 0 < initial_backoff <= max_backoff:
            raise ValueError("backoffs must be positive, the initial one at most the maximum")
        self._clock = clock or SystemClock()
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._supervised: dict[str, _Supervised] = {}
        self._stopped = False

    def start(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        """Run ``run()`` as the task ``name`` (its asyncio task name too), for ever."""
        if self._stopped:
            raise RuntimeError("the supervisor has stopped")
        if name in self._supervised:
            raise ValueError(f"a task named {name!r} is already supervised")
        supervised = _Supervised(name)
        self._supervised[name] = supervised
        supervised.task = asyncio.create_task(self._supervise(supervised, run), name=name)

    def health(self) -> tuple[TaskHealth, ...]:
        """A snapshot of every task, in the order they were started."""
        return tuple(supervised.health() for supervised in self._supervised.values())

    async def stop(self) -> None:
        """Cancel every task and wait until all have ended. Stopping twice is harmless."""
        self._stopped = True
        tasks = [s.task for s in self._supervised.values() if s.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> Supervisor:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _supervise(self, supervised: _Supervised, run: Callable[[], Awaitable[None]]) -> None:
        this_task = asyncio.current_task()
        assert this_task is not None  # a task runs this
        loop = asyncio.get_running_loop()
        failures = 0
        try:
            while True:
                supervised.state = TaskState.RUNNING
                supervised.last_start = self._clock.now()
                started = loop.time()
                failure: BaseException | None = None
                try:
                    await run()
                except (Exception, asyncio.CancelledError) as error:
                    failure = error
                if this_task.cancelling():
                    # Being stopped: whatever run() did on its way out, the task ends here.
                    raise asyncio.CancelledError from failure
                failures = 1 if loop.time() - started >= self._max_backoff else failures + 1
                delay = backoff_delay(failures, self._initial_backoff, self._max_backoff)
                supervised.last_error = _describe(failure)
                supervised.state = TaskState.BACKING_OFF
                _report(supervised.name, failure, delay)
                await asyncio.sleep(delay)
                supervised.restarts += 1
        finally:
            supervised.state = TaskState.STOPPED


async def run_together(*runs: Coroutine[object, object, None]) -> None:
    """Run ``runs`` at once until one of them ends, then cancel the others and end as it did
    (raising its error): a supervised task made of several loops. Not a ``TaskGroup``: on
    Python 3.11 and early 3.12 one whose child fails leaves its own task ``cancelling()``,
    which the supervisor takes for being stopped, and never restarts it."""
    tasks = [asyncio.create_task(run) for run in runs]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    next(iter(done)).result()


def _describe(failure: BaseException | None) -> str:
    if failure is None:
        return "returned"
    return f"{type(failure).__name__}: {failure}" if str(failure) else type(failure).__name__


def _report(name: str, failure: BaseException | None, delay: float) -> None:
    if failure is None:
        log.error("task %s returned, which it never should; restarting it in %.1fs", name, delay)
    elif isinstance(failure, EXPECTED_ERRORS):
        log.warning("task %s failed: %s; restarting it in %.1fs", name, failure, delay)
    else:
        log.error("task %s crashed; restarting it in %.1fs", name, delay, exc_info=failure)
