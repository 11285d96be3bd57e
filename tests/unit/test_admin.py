"""The admin dashboard's pieces without a server: ``[admin]`` config, the password file, the
chart's buckets and bars, and ``serve`` refusing an admin listener it cannot run."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

from gateway import errors
from gateway.cli import main
from gateway.config import AdminConfig
from gateway.ports import Msat, RevenueBucket
from gateway.web.admin import RANGES, read_password_file, render_chart
from tests.config_files import load_text, placeholder_lnd, write_config

HOUR = 3600
NOW = 1_764_126_000.0 + 1234.5  # 2025-11-26T03:00Z and a bit


# --- [admin] -------------------------------------------------------------------------------


def test_admin_is_off_by_default(tmp_path: Path) -> None:
    assert load_text(tmp_path, "").admin == AdminConfig(listen="", password_file=None)


def test_admin_section_and_environment(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        '[admin]\nlisten = "127.0.0.1:8403"\npassword_file = "~/admin.password"',
        {"GATEWAY_ADMIN_LISTEN": "[::1]:9000"},
    )
    assert config.admin.listen == "[::1]:9000"
    assert config.admin.password_file == Path("~/admin.password").expanduser()


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ('listen = "127.0.0.1:8403"', "listen needs password_file"),
        ('listen = "8403"\npassword_file = "p"', "listen must be host:port"),
        ("colour = 1", "unknown key(s) colour"),
    ],
)
def test_admin_section_errors(tmp_path: Path, section: str, message: str) -> None:
    with pytest.raises(errors.ConfigError, match=re.escape(message)):
        load_text(tmp_path, f"[admin]\n{section}")


# --- the password file ---------------------------------------------------------------------


def _password_file(tmp_path: Path, content: bytes, mode: int = 0o600) -> Path:
    path = tmp_path / "admin.password"
    path.write_bytes(content)
    path.chmod(mode)
    return path


def test_the_password_is_the_first_line(tmp_path: Path) -> None:
    path = _password_file(tmp_path, b"  s3cret words \nsecond line\n")
    assert read_password_file(path) == "s3cret words"


@pytest.mark.parametrize(
    ("content", "mode", "message"),
    [
        (b"", 0o600, "is empty"),
        (b"\n\nlater", 0o600, "is empty"),
        (b"s3cret\n", 0o640, "readable by other users (mode 640): chmod 600 it"),
        (b"s3cret\n", 0o604, "readable by other users (mode 604)"),
        (b"\xff\xfe", 0o600, "not UTF-8"),
        (b"x" * 5000, 0o600, "over 4096 bytes"),
    ],
)
def test_a_bad_password_file_is_refused(
    tmp_path: Path, content: bytes, mode: int, message: str
) -> None:
    path = _password_file(tmp_path, content, mode)
    with pytest.raises(errors.ConfigError, match=re.escape(message)) as raised:
        read_password_file(path)
    assert "s3cret" not in str(raised.value)


def test_a_missing_password_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(errors.ConfigError, match="cannot read it: No such file"):
        read_password_file(tmp_path / "nowhere")


# --- the chart -----------------------------------------------------------------------------


def test_the_ranges_end_with_the_current_bucket() -> None:
    hours = RANGES["48h"].starts(NOW)
    assert len(hours) == 48
    assert hours[-1] == 1_764_126_000
    assert hours[-1] <= NOW < hours[-1] + HOUR
    assert hours[1] - hours[0] == HOUR
    days = RANGES["30d"].starts(NOW)
    assert len(days) == 30
    assert days[-1] % 86_400 == 0
    assert days[-1] <= NOW < days[-1] + 86_400


def _bars(svg: str) -> list[dict[str, str]]:
    return [
        dict(re.findall(r'([a-z-]+)="([^"]*)"', rect))
        for rect in re.findall(r'<rect class="bar"[^>]*>', svg)
    ]


def test_bars_stack_per_service_and_scale_to_the_largest() -> None:
    hours = RANGES["48h"].starts(NOW)
    svg = render_chart(
        [
            RevenueBucket(hours[-1], "maps", 1, Msat(25_000)),
            RevenueBucket(hours[-1], "weather", 3, Msat(75_000)),  # 100 sat in all: the top
            RevenueBucket(hours[0], "weather", 1, Msat(50_000)),
            RevenueBucket(hours[0] - HOUR, "weather", 1, Msat(999_000)),  # before the range
        ],
        RANGES["48h"],
        NOW,
    )
    bars = _bars(svg)
    assert [(bar["data-service"], int(bar["data-start"])) for bar in bars] == [
        ("weather", hours[0]),
        ("maps", hours[-1]),
        ("weather", hours[-1]),
    ]
    heights = [float(bar["height"]) for bar in bars]
    assert heights[1] + heights[2] == pytest.approx(220, abs=0.2)  # the plot's full height
    assert heights[0] == pytest.approx(110, abs=0.2)  # 50 sat: half of it
    assert heights[1] * 3 == pytest.approx(heights[2], abs=0.2)
    # Stacked: weather sits on maps.
    assert float(bars[2]["y"]) + heights[2] == pytest.approx(float(bars[1]["y"]), abs=0.1)
    assert ">100 sat</text>" in svg
    assert ">50 sat</text>" in svg
    assert "2025-11-26 03:00 UTC · weather: 3 paid, 75 sat" in svg
    assert "No settled invoices" not in svg


def test_the_scale_rounds_up_to_one_two_or_five() -> None:
    days = RANGES["30d"].starts(NOW)
    svg = render_chart([RevenueBucket(days[3], "a", 1, Msat(1_300_500))], RANGES["30d"], NOW)
    assert ">2,000 sat</text>" in svg
    assert ">1,000 sat</text>" in svg
    assert "a: 1 paid, 1,300.5 sat" in svg


def test_an_empty_chart_says_so() -> None:
    svg = render_chart([], RANGES["48h"], NOW)
    assert _bars(svg) == []
    assert "No settled invoices in this period" in svg
    assert ">1 sat</text>" in svg  # a scale all the same


def test_a_service_name_is_escaped_in_the_chart() -> None:
    hours = RANGES["48h"].starts(NOW)
    svg = render_chart([RevenueBucket(hours[-1], '<b>"x"', 1, Msat(1000))], RANGES["48h"], NOW)
    assert "<b>" not in svg
    assert 'data-service="&lt;b&gt;&quot;x&quot;"' in svg


# --- serve ---------------------------------------------------------------------------------


def _serve_config(tmp_path: Path, admin: str, listen: str = "127.0.0.1:0") -> Path:
    server = f'[server]\nupstream = "http://127.0.0.1:1"\nlisten = "{listen}"\n'
    return write_config(
        tmp_path,
        f"{server}{placeholder_lnd(tmp_path)}[admin]\n{admin}",
        store=f"sqlite://{tmp_path / 'gateway.db'}",
    )


def test_serve_refuses_a_readable_password_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    password = _password_file(tmp_path, b"s3cret\n", 0o644)
    admin = f'listen = "127.0.0.1:0"\npassword_file = "{password}"'
    assert main(["--config", str(_serve_config(tmp_path, admin)), "serve"]) == 2
    err = capsys.readouterr().err
    assert "readable by other users (mode 644): chmod 600 it" in err
    assert "s3cret" not in err


def test_serve_says_in_one_line_that_the_admin_port_is_taken(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    password = _password_file(tmp_path, b"s3cret\n")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        admin = f'listen = "127.0.0.1:{port}"\npassword_file = "{password}"'
        assert main(["--config", str(_serve_config(tmp_path, admin)), "serve"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        f"l402-gateway: configuration error: [admin] listen 127.0.0.1:{port}: "
        "Address already in use"
    )
