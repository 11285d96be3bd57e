"""``l402-gateway serve`` as a process (LND and the upstream down), and what it logs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from regtest.processes import free_ports
from tests.config_files import placeholder_lnd, write_config

_ROOT = Path(__file__).resolve().parents[1]


def serve_logs(
    tmp_path: Path,
    options: Sequence[str] = (),
    environ: dict[str, str] | None = None,
    *,
    workers: int = 2,
    server: str = "",
    paths: Sequence[str] = (),
) -> list[str]:
    """The lines ``serve`` (``workers``, ``server`` added to ``[server]``) writes to stderr
    until every worker accepts connections; then GET ``paths`` are requested (whatever
    their answer), and the lines until it stops on SIGTERM follow."""
    port, lnd_port, upstream_port = free_ports(3)
    lnd = placeholder_lnd(tmp_path).replace("[lnd]\n", f'[lnd]\nhost = "127.0.0.1:{lnd_port}"\n')
    listen = f'upstream = "http://127.0.0.1:{upstream_port}"\nlisten = "127.0.0.1:{port}"'
    config = write_config(
        tmp_path,
        f"[server]\n{listen}\nworkers = {workers}\n{server}\n{lnd}",
        store=f"sqlite://{tmp_path / 'gateway.db'}",
    )
    # The placeholder certificate is no certificate: gRPC's C core says so in raw lines.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRPC_", "GATEWAY_"))}
    env |= {"GRPC_VERBOSITY": "NONE", **(environ or {})}
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
        while sum("accepting up to" in line for line in lines) < workers:
            assert time.monotonic() < deadline, lines
            line = process.stderr.readline()
            assert line, f"serve stopped: {lines}"
            lines.append(line)
        for path in paths:
            _get(f"http://127.0.0.1:{port}{path}", deadline)
    finally:
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=60)
    return [line.rstrip("\n") for line in lines] + rest.splitlines()


def _get(url: str, deadline: float) -> None:
    """GET ``url`` once it is listening (it logs that it accepts a moment before)."""
    while True:
        try:
            with urllib.request.urlopen(url, timeout=30):  # noqa: S310 - http to loopback
                return
        except urllib.error.HTTPError:
            return  # answered: a 4xx or 5xx is an answer too
        except urllib.error.URLError as error:
            if not isinstance(error.reason, ConnectionRefusedError) or time.monotonic() > deadline:
                raise
            time.sleep(0.1)
