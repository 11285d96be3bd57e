"""The regtest harness reports a node that fails to start by name, with its last log lines."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from regtest.network import _until
from regtest.processes import ManagedProcess, NodeStartError, free_ports


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
        await _until("alice to become SERVER_ACTIVE", never, 30, [process])
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
        await _until("carol's RPC", never, 1, [process], interval=0.05)
    await process.stop(grace=5)
    assert process.exited() is not None
