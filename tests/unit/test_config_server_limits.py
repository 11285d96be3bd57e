"""The ``[server]`` keys that bound what one client can hold: loaded, overridden, checked."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import ServerConfig, load_config
from gateway.errors import ConfigError
from tests.config_files import placeholder_lnd, write_config


def test_defaults() -> None:
    server = ServerConfig()
    assert (server.header_timeout, server.idle_timeout, server.body_timeout) == (10, 15, 30)
    assert server.min_body_rate == 8192
    assert (server.send_timeout, server.min_send_rate) == (30, 1024)
    assert (server.max_connections, server.max_connections_per_client) == (0, 64)
    assert (server.unpaid_requests_per_client, server.requests_per_token) == (16, 64)
    assert (server.upstream_connections, server.paid_upstream_connections) == (100, 100)
    assert (server.access_log, server.event_loop) == (False, "auto")


def test_from_the_file_and_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(
        "[server]\nheader_timeout = 2.5\nmax_connections = 500\npaid_upstream_connections = 7\n"
        'access_log = true\nevent_loop = "asyncio"\n'
    )
    environ = {"GATEWAY_SERVER_UNPAID_REQUESTS_PER_CLIENT": "0", "GATEWAY_SERVER_IDLE_TIMEOUT": "4"}
    server = load_config(path, environ).server
    assert (server.header_timeout, server.idle_timeout) == (2.5, 4.0)
    assert (server.max_connections, server.paid_upstream_connections) == (500, 7)
    assert server.unpaid_requests_per_client == 0
    assert (server.access_log, server.event_loop) == (True, "asyncio")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("header_timeout", "0", "header_timeout must be a positive number of seconds"),
        ("idle_timeout", "-1", "idle_timeout must be a positive number of seconds"),
        ("body_timeout", "nan", "body_timeout must be a positive number of seconds"),
        ("min_body_rate", "0", "min_body_rate must be >= 1"),
        ("send_timeout", "0", "send_timeout must be a positive number of seconds"),
        ("min_send_rate", "0", "min_send_rate must be >= 1"),
        ("max_connections", "-1", "max_connections must be >= 0 (0: from ulimit -n)"),
        ("max_connections_per_client", "-1", "max_connections_per_client must be >= 0"),
        ("unpaid_requests_per_client", "-2", "unpaid_requests_per_client must be >= 0"),
        ("requests_per_token", "-1", "requests_per_token must be >= 0"),
        ("upstream_connections", "0", "upstream_connections must be >= 1"),
        ("paid_upstream_connections", "0", "paid_upstream_connections must be >= 1"),
        ("event_loop", "trio", "event_loop must be auto or asyncio or uvloop, got 'trio'"),
    ],
)
def test_out_of_range_is_refused(key: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, {f"GATEWAY_SERVER_{key.upper()}": value})


def test_serve_refuses_pools_the_open_file_limit_cannot_hold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:  # should serve start after all, it fails at once
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = write_config(
            tmp_path,
            f'[server]\nupstream = "http://127.0.0.1:1"\nlisten = "127.0.0.1:'
            f'{taken.getsockname()[1]}"\nupstream_connections = 600000\n'
            f"paid_upstream_connections = 600000\n{placeholder_lnd(tmp_path)}",
            store="memory:",
        )
        assert main(["--config", str(config), "serve"]) == 2
    assert "leaves no descriptor for client connections" in capsys.readouterr().err
