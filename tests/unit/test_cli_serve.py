"""``l402-gateway serve`` refuses a configuration it cannot serve before binding the port."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cli import main


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
    for name in ("tls.cert", "gateway.macaroon"):
        (tmp_path / name).write_bytes(b"x")
        (tmp_path / name).chmod(0o600)
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[server]\n{server}\n[lnd]\ntls_cert = "{tmp_path / "tls.cert"}"\n'
        f'macaroon = "{tmp_path / "gateway.macaroon"}"\n[store]\nurl = "{store}"\n'
    )
    assert main(["--config", str(config), "serve"]) == 2
    assert message in capsys.readouterr().err
