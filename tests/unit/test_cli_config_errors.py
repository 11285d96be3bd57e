"""A configuration the gateway cannot use: one ``configuration error`` line, exit 2, no traceback.

Also for a store path that is not the gateway's database: refused before anything is created
or chmodded.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import main
from tests.config_files import write_config


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("l402-gateway: configuration error: "), err
    for fragment in fragments:
        assert fragment in lines[0], err


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("[[routes]]\npattern = '/a'\nprice_msat = 9223372036854775808", ("price_msat",)),
        ("[[routes]]\npattern = '/a'\nprice_msat = 10000000000000001", ("price_msat", "LND")),
        ("[l402]\ninvoice_expiry = 9223372036854775808", ("invoice_expiry",)),
        ("[l402]\ninvoice_expiry = 31536001", ("invoice_expiry", "LND")),
        ("[[routes]]\npattern = '/a'\nfree = true\nlifetime = 9223372036854775808", ("lifetime",)),
        ("[l402]\nroot_key_cache_seconds = 1e300", ("root_key_cache_seconds",)),
        ("[rate_limit]\nchallenges_per_second = 5e-324", ("challenges_per_second",)),
        ("[server]\ntoken_header = ''", ("token_header",)),
        ("[server]\ntoken_header = 'X_L402_Token'", ("token_header",)),
        ("[server]\ntoken_header = 'Content-Length'", ("token_header",)),
        ("[server]\ntoken_header = 'X-Forwarded-For'", ("token_header",)),
        ("[server]\nupstream = 'ftp://backend'", ("upstream",)),
        ("[server]\nupstream = 'http://user:pw@backend'", ("credentials",)),
        ("[server]\nlisten = '127.0.0.1:70000'", ("listen",)),
        ("[server]\nlisten = ':8402'", ("listen",)),
    ],
)
def test_bad_values_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, fragments: tuple[str, ...]
) -> None:
    config = write_config(tmp_path, text, store="memory:")
    code, err = run(["--config", str(config), "invoices"], capsys)
    assert_one_line_error(code, err, *fragments)


@pytest.mark.parametrize(
    ("store", "fragments"),
    [
        ("postgresql:gateway:hunter2@db/gateway", ("use postgresql://", "sqlite:///absolute")),
        ("", ("must name a store",)),
        ("mysql://db", ("'mysql' is not supported",)),
    ],
)
def test_unsupported_store_urls_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], store: str, fragments: tuple[str, ...]
) -> None:
    for command in (["invoices"], ["token", "revoke", "00"]):
        config = write_config(tmp_path, "", store=store)
        code, err = run(["--config", str(config), *command], capsys)
        assert_one_line_error(code, err, *fragments)
        assert "hunter2" not in err


def test_a_negative_limit_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, "", store="memory:")
    code, err = run(["--config", str(config), "invoices", "--limit", "-1"], capsys)
    assert_one_line_error(code, err, "--limit")


# --- the store's path --------------------------------------------------------------------------


def sqlite_url(path: Path) -> str:
    return f"sqlite://{path}"  # an absolute path: sqlite:///...


@pytest.mark.parametrize("command", [["invoices"], ["token", "revoke", "00"]])
def test_a_directory_as_the_store_is_refused_and_left_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    directory = tmp_path / "gateway.db"
    directory.mkdir()
    directory.chmod(0o755)
    config = write_config(tmp_path, "", store=sqlite_url(directory))
    code, err = run(["--config", str(config), *command], capsys)
    assert_one_line_error(code, err, "is a directory")
    assert stat.S_IMODE(directory.stat().st_mode) == 0o755


@pytest.mark.parametrize("command", [["invoices"], ["token", "revoke", "00"]])
def test_a_symlink_as_the_store_is_refused_and_its_target_left_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    target = tmp_path / "precious.txt"
    target.write_text("not yours")
    target.chmod(0o644)
    link = tmp_path / "gateway.db"
    link.symlink_to(target)
    config = write_config(tmp_path, "", store=sqlite_url(link))
    code, err = run(["--config", str(config), *command], capsys)
    assert_one_line_error(code, err, "symbolic link")
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert target.read_text() == "not yours"


@pytest.mark.parametrize("command", [["invoices"], ["token", "revoke", "00"]])
def test_a_file_that_is_not_a_database_is_refused_and_left_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    notes.chmod(0o644)
    config = write_config(tmp_path, "", store=sqlite_url(notes))
    code, err = run(["--config", str(config), *command], capsys)
    assert_one_line_error(code, err, "not an SQLite database")
    assert stat.S_IMODE(notes.stat().st_mode) == 0o644


@pytest.mark.parametrize("command", [["invoices"], ["token", "revoke", "00"]])
def test_a_missing_directory_is_named_and_not_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    database = tmp_path / "typo" / "gateway.db"
    config = write_config(tmp_path, "", store=sqlite_url(database))
    code, err = run(["--config", str(config), *command], capsys)
    assert code == 2, err
    assert_one_line_error(code, err, str(tmp_path / "typo"))
    assert not (tmp_path / "typo").exists()


def test_invoices_does_not_create_a_missing_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, "", store=sqlite_url(tmp_path / "gateway.db"))
    code, err = run(["--config", str(config), "invoices"], capsys)
    assert_one_line_error(code, err, "no database at")
    assert sorted(os.listdir(tmp_path)) == ["gateway.toml"]


# --- through the installed command, in its own process -----------------------------------------


def entry_point(*args: str) -> subprocess.CompletedProcess[str]:
    command = Path(sys.executable).with_name("l402-gateway")
    program = [str(command)] if command.exists() else [sys.executable, "-m", "gateway.cli"]
    return subprocess.run(  # noqa: S603 - our own command
        [*program, *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_the_command_refuses_a_malformed_postgres_url_without_a_traceback(tmp_path: Path) -> None:
    config = write_config(tmp_path, "", store="postgresql:gateway@db/gateway")
    result = entry_point("--config", str(config), "invoices")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "use postgresql://user@host" in result.stderr


def test_serve_shows_the_route_warnings_before_it_starts(tmp_path: Path) -> None:
    routes = """
        [[routes]]
        pattern = "/api/*"
        free = true
        [[routes]]
        pattern = "/api/premium"
        methods = ["GETT"]
        price_msat = 1000
    """
    # No upstream: serve stops after loading, before it would bind a port.
    config = write_config(tmp_path, routes, store="memory:")
    result = entry_point("--config", str(config), "serve")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert any(
        "WARNING" in line and "'GETT' is not a standard HTTP method" in line for line in lines
    )
    assert any("WARNING" in line and "can never match" in line for line in lines)
    assert "upstream is required" in lines[-1]
