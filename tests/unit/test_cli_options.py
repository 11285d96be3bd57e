"""Options anywhere on the command line, ``--version``, ``sample-config``, and the stop hint
of ``python -m regtest up`` being a command that parses."""

from __future__ import annotations

import logging
import shlex
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

from gateway.cli import _parser, main
from regtest.__main__ import parser as regtest_parser
from regtest.__main__ import stop_hint
from tests.config_files import write_config


@pytest.mark.parametrize(
    ("argv", "config", "verbose"),
    [
        (["--config", "a.toml", "invoices"], "a.toml", False),
        (["invoices", "--config", "b.toml", "-v"], "b.toml", True),
        (["-v", "--config", "a.toml", "invoices", "--config", "b.toml"], "b.toml", True),
        (["--config", "a.toml", "token", "revoke", "ab", "--config", "b.toml"], "b.toml", False),
        (["token", "--config", "b.toml", "revoke", "ab"], "b.toml", False),
        (["payouts", "pay", "--config", "b.toml"], "b.toml", False),  # not the client's pay
        (["serve", "--verbose"], None, True),
        (["pay", "http://x/", "-v"], None, True),
    ],
)
def test_config_and_verbose_are_read_before_or_after_the_command(
    argv: list[str], config: str | None, verbose: bool
) -> None:
    args = _parser().parse_args(argv)
    assert args.config == config
    assert args.verbose is verbose


def test_a_config_after_the_command_is_the_one_used(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, "", store=f"sqlite://{tmp_path / 'none.db'}")
    assert main(["--config", "/nonexistent.toml", "invoices", "--config", str(config)]) == 2
    assert "no database at" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"l402-gateway {metadata.version('l402-gateway')}\n"


def test_sample_config_prints_the_shipped_sample(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sample-config"]) == 0
    out = capsys.readouterr().out
    sample = Path(__file__).resolve().parents[2] / "gateway" / "gateway.sample.toml"
    assert out == sample.read_text(encoding="utf-8")
    assert "server" in tomllib.loads(out)


def test_store_commands_say_nothing_about_the_lnd_macaroon(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    macaroon = tmp_path / "gateway.macaroon"
    macaroon.write_bytes(b"x")
    macaroon.chmod(0o644)  # LND's own mode for most macaroons: serve warns about it
    lnd = f'[lnd]\ntls_cert = "{macaroon}"\nmacaroon = "{macaroon}"\n'
    config = write_config(tmp_path, lnd, store=f"sqlite://{tmp_path / 'none.db'}")
    with caplog.at_level(logging.WARNING):
        assert main(["invoices", "--config", str(config)]) == 2
        assert main(["token", "revoke", "ab", "--config", str(config)]) == 1
    assert "macaroon" not in caplog.text
    with caplog.at_level(logging.WARNING):
        main(["serve", "--config", str(config)])  # refused: no upstream; warned first
    assert "LND macaroon" in caplog.text


def test_the_stop_hint_of_regtest_up_parses(tmp_path: Path) -> None:
    workdir = tmp_path / "a dir"
    hint = shlex.split(stop_hint(workdir))
    assert hint[:3] == ["python", "-m", "regtest"]
    args = regtest_parser().parse_args(hint[3:])
    assert (args.command, args.dir) == ("down", workdir)
    # before the command as well, and after it wins
    args = regtest_parser().parse_args(["--dir", "x", "status", "--dir", str(workdir)])
    assert (args.command, args.dir) == ("status", workdir)
    assert regtest_parser().parse_args(["--dir", "x", "mine", "3"]).dir == Path("x")
