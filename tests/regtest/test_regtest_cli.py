"""`python -m regtest up|status|mine|down` runs a second network beside the session's one."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from regtest.network import Network

pytestmark = pytest.mark.regtest
REPO = Path(__file__).resolve().parents[2]


def _regtest(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "regtest", "--dir", str(workdir), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_cli_up_status_mine_down_beside_another_network(network: Network, tmp_path: Path) -> None:
    workdir = tmp_path / "second"
    up = _regtest(workdir, "up")
    try:
        assert up.returncode == 0, up.stderr
        state = json.loads((workdir / "network.json").read_text())
        session_ports = {node.rpc_host for node in network.nodes.values()}
        assert not session_ports & {node["rpc_host"] for node in state["nodes"].values()}
        for name in ("alice", "bob", "carol"):
            assert f"--lnddir={workdir / name}" in up.stdout

        status = _regtest(workdir, "status")
        assert status.returncode == 0, status.stderr
        assert status.stdout.count("active channels 2") == 3

        mined = _regtest(workdir, "mine", "2")
        assert mined.returncode == 0, mined.stderr
        assert "height 541" in mined.stdout
    finally:
        # Stopped with the very command `up` printed (python -m regtest down --dir ...).
        hint = shlex.split(up.stdout.rpartition("stop it with: ")[2])
        if hint[:4] == ["python", "-m", "regtest", "down"]:
            down = subprocess.run(  # noqa: S603 - our own interpreter and module
                [sys.executable, *hint[1:]],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=180,
                check=False,
            )
        else:
            down = _regtest(workdir, "down")
    assert hint[:4] == ["python", "-m", "regtest", "down"], up.stdout
    assert down.returncode == 0, down.stderr
    pids = [state["btcd_pid"], *(node["pid"] for node in state["nodes"].values())]
    assert not any(_alive(pid) for pid in pids)
    assert (workdir / "alice.log").stat().st_size > 0
    assert _regtest(workdir, "status").returncode == 1
