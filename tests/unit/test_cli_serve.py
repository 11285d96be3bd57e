"""``l402-gateway serve`` refuses a configuration it cannot serve before binding the port."""

from __future__ import annotations

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
