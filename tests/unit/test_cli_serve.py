"""``l402-gateway serve`` refuses a configuration it cannot serve before binding the port."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.cli.serve import _memory_directory, die_with_parent, event_loop_factory
from gateway.errors import ConfigError
from tests.config_files import placeholder_lnd, write_config


@pytest.mark.parametrize(
    ("server", "store", "message"),
    [
        ("", "sqlite:gateway.db", "[server] upstream is required"),
        ('upstream = "http://127.0.0.1:1"\nlisten = "8402"', "memory:", "listen must be host:port"),
        (
            'upstream = "http://127.0.0.1:1"\nworkers = 2',
            "memory:",
            "workers > 1 needs a store they share",
        ),
    ],
)
def test_serve_refuses_a_config_it_cannot_serve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], server: str, store: str, message: str
) -> None:
    config = write_config(tmp_path, f"[server]\n{server}\n{placeholder_lnd(tmp_path)}", store=store)
    assert main(["--config", str(config), "serve"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_says_in_one_line_that_the_port_is_taken(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], workers: int
) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        server = f'upstream = "http://127.0.0.1:1"\nlisten = "127.0.0.1:{port}"'
        server += f"\nworkers = {workers}"
        config = write_config(
            tmp_path,
            f"[server]\n{server}\n{placeholder_lnd(tmp_path)}",
            store=f"sqlite://{tmp_path / 'gateway.db'}",
        )
        assert main(["--config", str(config), "serve"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"l402-gateway: configuration error: [server] listen 127.0.0.1:{port}: "
        "Address already in use"
    ]
    # Its filter of aiohttp's malformed-request lines went with it: one left on the logger
    # would throttle and rewrite the lines of whatever serves in this process next.
    assert logging.getLogger("aiohttp.server").filters == []


# A supervisor that starts a worker and exits before the worker reaches die_with_parent
# (it was still importing): the orphan must stop, not serve on.
_ORPHANED_WORKER = """
import os, subprocess, sys
subprocess.Popen([sys.executable, "-c", '''
import sys, time
from gateway.cli.serve import die_with_parent
time.sleep(0.5)  # the supervisor exits meanwhile
die_with_parent(int(sys.argv[1]))
print("serving", flush=True)
''', str(os.getpid())], stdout=sys.stdout)
print("supervisor gone", flush=True)
"""


def test_a_worker_whose_supervisor_died_before_it_started_stops() -> None:
    # The worker shares the pipe: run() returns once the worker has exited too.
    output = subprocess.run(  # noqa: S603 - our own interpreter and script
        [sys.executable, "-c", _ORPHANED_WORKER],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert output == "supervisor gone\n"


def test_a_worker_under_its_supervisor_goes_on() -> None:
    die_with_parent(os.getppid())  # returns: the parent is alive and is the supervisor


def test_the_metrics_files_go_to_tmpdir_if_set_else_to_ram(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert _memory_directory() is None  # mkdtemp then honours $TMPDIR
    monkeypatch.delenv("TMPDIR")
    expected = "/dev/shm" if os.access("/dev/shm", os.W_OK | os.X_OK) else None  # noqa: S108
    assert _memory_directory() == expected


def test_the_event_loop_is_uvloop_when_installed_unless_asyncio_is_asked_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import uvloop  # a dev dependency

    assert event_loop_factory("auto") is uvloop.new_event_loop
    assert event_loop_factory("uvloop") is uvloop.new_event_loop
    assert event_loop_factory("asyncio") is None
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if not installed: import fails
    assert event_loop_factory("auto") is None
    with pytest.raises(ConfigError, match=r"needs uvloop: pip install 'l402-gateway\[speed\]'"):
        event_loop_factory("uvloop")
