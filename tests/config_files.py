"""Configuration files for the tests: ``gateway.toml`` written in a test's directory, loaded
as the command line loads it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from gateway.config import Config, load_config


def write_config(directory: Path, text: str, *, store: str | None = None) -> Path:
    """``directory/gateway.toml`` holding ``text``, after a ``[store]`` with ``store`` as its
    url if given; its path."""
    path = directory / "gateway.toml"
    section = "" if store is None else f"[store]\nurl = {json.dumps(store)}\n"
    path.write_text(f"{section}{text}\n", encoding="utf-8")
    return path


def load_text(directory: Path, text: str, environ: Mapping[str, str] | None = None) -> Config:
    """The configuration ``text`` (and ``environ``, none by default) make."""
    return load_config(write_config(directory, text), environ or {})


def placeholder_lnd(directory: Path) -> str:
    """An ``[lnd]`` section whose tls.cert and macaroon exist (private, their bytes no
    credential): enough for a command that checks the files before it would connect."""
    for name, content in (
        ("tls.cert", b"-----BEGIN CERTIFICATE-----\n"),
        ("gateway.macaroon", b"x"),
    ):
        (directory / name).write_bytes(content)
        (directory / name).chmod(0o600)
    tls_cert, macaroon = directory / "tls.cert", directory / "gateway.macaroon"
    return f'[lnd]\ntls_cert = "{tls_cert}"\nmacaroon = "{macaroon}"\n'
