"""``l402-gateway serve`` refuses a configuration it cannot serve before binding the port."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from gateway.cli import main
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
