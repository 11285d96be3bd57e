"""``l402-gateway --log-format json serve``: the supervisor and each worker process log JSON
lines, one object per record; without the option, the text lines of before."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from regtest.processes import free_ports
from tests.config_files import placeholder_lnd, write_config

_ROOT = Path(__file__).resolve().parents[2]
_WORKERS = ("l402-gateway-worker-0", "l402-gateway-worker-1")


def _serve_logs(tmp_path: Path, options: list[str], environ: dict[str, str]) -> list[str]:
    """The lines ``serve`` (two workers; LND and the upstream down) writes to stderr until
    both workers accept connections, then until it stops on SIGTERM."""
    port, lnd_port, upstream_port = free_ports(3)
    lnd = placeholder_lnd(tmp_path).replace("[lnd]\n", f'[lnd]\nhost = "127.0.0.1:{lnd_port}"\n')
    server = f'upstream = "http://127.0.0.1:{upstream_port}"\nlisten = "127.0.0.1:{port}"'
    config = write_config(
        tmp_path,
        f"[server]\n{server}\nworkers = 2\n{lnd}",
        store=f"sqlite://{tmp_path / 'gateway.db'}",
    )
    # The placeholder certificate is no certificate: gRPC's C core says so in raw lines.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRPC_", "GATEWAY_"))}
    env |= {"GRPC_VERBOSITY": "NONE", **environ}
    process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "gateway.cli", *options, "--config", str(config), "serve"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=_ROOT,
    )
    assert process.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + 90
    try:
        while sum("accepting up to" in line for line in lines) < len(_WORKERS):
            assert time.monotonic() < deadline, lines
            line = process.stderr.readline()
            assert line, f"serve stopped: {lines}"
            lines.append(line)
    finally:
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=60)
    return [line.rstrip("\n") for line in lines] + rest.splitlines()


@pytest.mark.parametrize(
    ("options", "environ"),
    [(["--log-format", "json"], {}), ([], {"GATEWAY_LOG_FORMAT": "json"})],
)
def test_serve_and_its_workers_log_json_lines(
    tmp_path: Path, options: list[str], environ: dict[str, str]
) -> None:
    lines = _serve_logs(tmp_path, options, environ)
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(set(e) >= {"time", "level", "logger", "message", "process"} for e in entries)
    processes = {e["process"] for e in entries if e["message"].startswith("accepting up to")}
    assert processes == set(_WORKERS)
    (started,) = [e for e in entries if e["message"].startswith("l402-gateway proxying")]
    assert (started["process"], started["level"], started["logger"]) == (
        "MainProcess",
        "INFO",
        "gateway.cli.serve",
    )
    assert any("does not answer" in e["message"] and e["level"] == "WARNING" for e in entries)


def test_serve_logs_text_lines_without_the_option(tmp_path: Path) -> None:
    lines = _serve_logs(tmp_path, [], {})
    assert not any(line.startswith("{") for line in lines)
    assert any(" INFO gateway.cli.serve: l402-gateway proxying " in line for line in lines)
    for worker in _WORKERS:
        assert any(f" {worker} INFO gateway.cli.serve: accepting up to " in ln for ln in lines)
