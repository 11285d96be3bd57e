"""The supervisor: failures logged and restarted with jittered, capped backoff, a clean stop,
and the health snapshot."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest

from gateway import errors
from gateway.supervisor import Supervisor, TaskHealth, TaskState, backoff_delay, run_together
from tests.fakes import FakeClock

TIMEOUT = 5.0


class Script:
    """A task that fails its first runs as listed (an exception, or None: it returns), then
    runs until cancelled."""

    def __init__(self, *endings: BaseException | None) -> None:
        self.endings = list(endings)
        self.runs = 0
        self.called = asyncio.Event()
        self.running = asyncio.Event()

    async def __call__(self) -> None:
        self.runs += 1
        self.called.set()
        if self.endings:
            ending = self.endings.pop(0)
            if ending is not None:
                raise ending
            return
        self.running.set()
        await asyncio.Event().wait()


async def health_of(supervisor: Supervisor, name: str) -> TaskHealth:
    (health,) = [task for task in supervisor.health() if task.name == name]
    return health


def restarts_logged(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "gateway.supervisor"]


async def test_a_crash_is_logged_with_its_traceback_and_the_task_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    script = Script(KeyError("UNKNOWN_STATE"))
    async with Supervisor(clock, initial_backoff=0.001) as supervisor:
        supervisor.start("watcher", script)
        await asyncio.wait_for(script.running.wait(), TIMEOUT)
        health = await health_of(supervisor, "watcher")
    assert script.runs == 2
    assert health == TaskHealth(
        name="watcher",
        state=TaskState.RUNNING,
        restarts=1,
        last_error="KeyError: 'UNKNOWN_STATE'",
        last_start=clock.now(),
    )
    (crash,) = restarts_logged(caplog)
    assert crash.levelno == logging.ERROR
    assert "task watcher crashed; restarting it in" in crash.getMessage()
    assert crash.exc_info is not None
    assert isinstance(crash.exc_info[1], KeyError)
    assert "Traceback" in caplog.text


async def test_a_node_or_store_failure_is_a_warning_without_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    script = Script(errors.BackendUnavailable("node down"), errors.StoreError("locked"))
    async with Supervisor(initial_backoff=0.001) as supervisor:
        supervisor.start("sweeper", script)
        await asyncio.wait_for(script.running.wait(), TIMEOUT)
        health = await health_of(supervisor, "sweeper")
    assert (health.restarts, health.last_error) == (2, "StoreError: locked")
    records = restarts_logged(caplog)
    assert [r.levelno for r in records] == [logging.WARNING, logging.WARNING]
    assert "task sweeper failed: node down; restarting it in" in records[0].getMessage()
    assert all(r.exc_info is None for r in records)


async def test_a_task_that_returns_is_restarted_as_a_bug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    script = Script(None)
    async with Supervisor(initial_backoff=0.001) as supervisor:
        supervisor.start("sweeper", script)
        await asyncio.wait_for(script.running.wait(), TIMEOUT)
        assert (await health_of(supervisor, "sweeper")).last_error == "returned"
    (record,) = restarts_logged(caplog)
    assert record.levelno == logging.ERROR
    assert "returned, which it never should" in record.getMessage()


async def test_a_stray_cancelled_error_is_a_failure_not_a_stop() -> None:
    # Raised by something the task awaited, not by cancelling the task.
    script = Script(asyncio.CancelledError())
    async with Supervisor(initial_backoff=0.001) as supervisor:
        supervisor.start("watcher", script)
        await asyncio.wait_for(script.running.wait(), TIMEOUT)
        assert (await health_of(supervisor, "watcher")).restarts == 1


async def test_loops_run_together_end_with_the_first_failure_and_are_restarted() -> None:
    """A task of several loops (the webhook sender, the payouts worker): the first failure
    ends the others and the task, which is restarted, on every Python (a TaskGroup there
    left the task looking stopped on 3.11)."""
    script = Script(errors.StoreError("connection reset"))
    ended: list[str] = []

    async def other_loop() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            ended.append("other loop")

    async def loops() -> None:
        await run_together(script(), other_loop())

    async with Supervisor(initial_backoff=0.001) as supervisor:
        supervisor.start("webhook sender", loops)
        await asyncio.wait_for(script.running.wait(), TIMEOUT)
        health = await health_of(supervisor, "webhook sender")
        assert ended == ["other loop"]  # by the failure, before the restart
    assert (health.state, health.restarts) == (TaskState.RUNNING, 1)
    assert health.last_error == "StoreError: connection reset"


def delays(caplog: pytest.LogCaptureFixture) -> list[float]:
    """The backoffs the supervisor announced (the exact float is a log argument)."""
    announced = []
    for record in restarts_logged(caplog):
        assert isinstance(record.args, tuple)
        delay = record.args[-1]
        assert isinstance(delay, float)
        announced.append(delay)
    return announced


async def test_quick_failures_back_off_doubling_to_the_cap(
    caplog: pytest.LogCaptureFixture,
) -> None:
    script = Script(*(RuntimeError(f"bug {n}") for n in range(5)))
    async with Supervisor(initial_backoff=0.001, max_backoff=0.004) as supervisor:
        supervisor.start("task", script)
        await asyncio.wait_for(script.running.wait(), TIMEOUT)
    ceilings = [0.001, 0.002, 0.004, 0.004, 0.004]
    announced = delays(caplog)
    assert len(announced) == len(ceilings)
    for delay, ceiling in zip(announced, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling


async def test_a_run_as_long_as_the_cap_starts_the_backoff_over(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cap = 0.05
    runs = 0
    running = asyncio.Event()

    async def fails_twice_fast_then_after_a_while() -> None:
        nonlocal runs
        runs += 1
        if runs == 3:
            await asyncio.sleep(cap * 1.1)  # a healthy run
        if runs <= 3:
            raise RuntimeError("bug")
        running.set()
        await asyncio.Event().wait()

    async with Supervisor(initial_backoff=cap / 8, max_backoff=cap) as supervisor:
        supervisor.start("task", fails_twice_fast_then_after_a_while)
        await asyncio.wait_for(running.wait(), TIMEOUT)
    _, second, after_the_long_run = delays(caplog)
    assert second >= cap / 8  # doubled: from [cap / 16, cap / 8] to [cap / 8, cap / 4]
    assert after_the_long_run <= cap / 8  # the initial backoff again


def test_backoff_delay_doubles_is_capped_and_jittered() -> None:
    for failures, ceiling in ((1, 1.0), (2, 2.0), (4, 8.0), (5, 10.0), (10_000, 10.0)):
        drawn = {backoff_delay(failures, 1.0, 10.0) for _ in range(50)}
        assert all(ceiling / 2 <= delay <= ceiling for delay in drawn), (failures, drawn)
        assert len(drawn) > 1  # jittered


@pytest.mark.parametrize("when", ["running", "backing off"])
async def test_stop_cancels_every_task_and_leaves_none_behind(when: str) -> None:
    script = Script()
    crashing = Script(*(RuntimeError("bug") for _ in range(3)))
    backoff = 3600 if when == "backing off" else 0.001
    supervisor = Supervisor(initial_backoff=backoff, max_backoff=max(backoff, 30))
    supervisor.start("steady", script)
    supervisor.start("crashing", crashing)
    await asyncio.wait_for(script.running.wait(), TIMEOUT)
    if when == "backing off":
        await asyncio.wait_for(crashing.called.wait(), TIMEOUT)  # crashed at once
        expected = TaskState.BACKING_OFF
    else:
        await asyncio.wait_for(crashing.running.wait(), TIMEOUT)
        expected = TaskState.RUNNING
    assert (await health_of(supervisor, "crashing")).state is expected
    await supervisor.stop()
    names = {task.get_name() for task in asyncio.all_tasks()}
    assert not names & {"steady", "crashing"}
    assert [h.state for h in supervisor.health()] == [TaskState.STOPPED, TaskState.STOPPED]
    await supervisor.stop()  # harmless
    with pytest.raises(RuntimeError, match="stopped"):
        supervisor.start("late", script)


async def test_a_task_that_swallows_its_cancellation_is_not_restarted() -> None:
    runs = 0
    started = asyncio.Event()

    async def stubborn() -> None:
        nonlocal runs
        runs += 1
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            return  # a bug, but the stop must still stop it

    supervisor = Supervisor(initial_backoff=0.001)
    supervisor.start("stubborn", stubborn)
    await started.wait()
    await asyncio.wait_for(supervisor.stop(), TIMEOUT)
    assert runs == 1


async def test_cancelling_the_owner_stops_the_tasks() -> None:
    script = Script()

    async def owner() -> None:
        async with Supervisor() as supervisor:
            supervisor.start("child", script)
            await asyncio.Event().wait()

    task = asyncio.create_task(owner())
    await asyncio.wait_for(script.running.wait(), TIMEOUT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert "child" not in {t.get_name() for t in asyncio.all_tasks()}


async def test_names_are_unique_and_settings_checked() -> None:
    run: Callable[[], Awaitable[None]] = Script()
    async with Supervisor() as supervisor:
        supervisor.start("task", run)
        with pytest.raises(ValueError, match="already supervised"):
            supervisor.start("task", run)
    with pytest.raises(ValueError, match="backoffs"):
        Supervisor(initial_backoff=0)
    with pytest.raises(ValueError, match="backoffs"):
        Supervisor(initial_backoff=2, max_backoff=1)
