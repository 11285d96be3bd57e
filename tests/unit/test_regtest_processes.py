"""The regtest harness reports a node that fails to start by name, with its last log lines."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from regtest.processes import ManagedProcess, NodeStartError, free_ports, until


def test_free_ports_are_distinct() -> None:
    ports = free_ports(20)
    assert len(set(ports)) == 20
    assert all(1024 < port < 65536 for port in ports)


async def test_dead_process_is_reported_with_its_log(tmp_path: Path) -> None:
    script = "import sys; print('loading config'); print('fatal: bad flag'); sys.exit(3)"
    process = ManagedProcess(
        "alice", [sys.executable, "-c", script], tmp_path / "alice.log", detached=False
    )

    async def never() -> bool | None:
        return None

    with pytest.raises(NodeStartError) as failure:
        await until("alice to become SERVER_ACTIVE", never, 30, [process])
    message = str(failure.value)
    assert "alice stopped while waiting for alice to become SERVER_ACTIVE" in message
    assert "exited with code 3" in message
    assert "fatal: bad flag" in message
    assert str(tmp_path / "alice.log") in message


async def test_stuck_process_times_out_and_is_stopped(tmp_path: Path) -> None:
    process = ManagedProcess(
        "carol",
        [sys.executable, "-c", "import time; print('waiting', flush=True); time.sleep(60)"],
        tmp_path / "carol.log",
        detached=False,
    )

    async def never() -> bool | None:
        return None

    with pytest.raises(NodeStartError, match=r"carol timed out after 1s .* still running"):
        await until("carol's RPC", never, 1, [process], interval=0.05)
    await process.stop(grace=5)
    assert process.exited() is not None


async def test_killed_process_respawns_with_the_same_arguments_and_log(tmp_path: Path) -> None:
    script = "import os, time; print('started', os.getpid(), flush=True); time.sleep(60)"
    log = tmp_path / "btcd.log"
    process = ManagedProcess("btcd", [sys.executable, "-c", script], log, detached=False)

    async def started(count: int) -> bool | None:
        return True if log.read_text().count("started") == count else None

    await until("the first start", lambda: started(1), 10, [process], interval=0.05)
    await process.kill()
    assert process.exited() == -signal.SIGKILL
    again = process.respawn()
    try:
        await until("the second start", lambda: started(2), 10, [again], interval=0.05)
        assert again.pid != process.pid
        assert f"started {again.pid}" in log.read_text()
    finally:
        await again.stop(grace=5)
