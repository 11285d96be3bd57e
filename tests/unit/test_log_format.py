"""``--log-format json``: one JSON object per log record, on one line, with what the text
line says (and the traceback), whatever the message holds."""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timedelta
from typing import Any

import pytest

from gateway.cli import _parser
from gateway.cli.formats import JsonLogFormatter


def _record(
    message: str, *args: object, exc_info: Any = None, extra: dict[str, Any] | None = None
) -> logging.LogRecord:
    logger = logging.getLogger("gateway.test")
    return logger.makeRecord(
        logger.name, logging.WARNING, __file__, 1, message, args, exc_info, extra=extra
    )


def _line(record: logging.LogRecord) -> dict[str, Any]:
    line = JsonLogFormatter().format(record)
    assert "\n" not in line
    assert "\r" not in line
    assert line.isascii()
    assert line.isprintable()  # nothing a line-based reader splits on
    assert len(line.splitlines()) == 1
    entry = json.loads(line)
    assert isinstance(entry, dict)
    return entry


def test_a_record_is_one_json_line_with_its_fields() -> None:
    entry = _line(_record("paid %d msat for %s", 5000, "/api/x"))
    assert entry["message"] == "paid 5000 msat for /api/x"
    assert entry["level"] == "WARNING"
    assert entry["logger"] == "gateway.test"
    assert entry["process"] == "MainProcess"
    assert "exception" not in entry
    assert entry["time"].endswith("Z")
    assert datetime.fromisoformat(entry["time"].replace("Z", "+00:00")).utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    "text",
    [
        "two\nlines",
        "carriage\rreturn",
        "a\x00nul\x1b[31m and escape",
        "line\u2028separator\x85next\u2029paragraph",
        "non-ASCII: Zürich ⚡ 日本",
        '{"level": "forged"}',
        "\udcff lone surrogate",
    ],
)
def test_no_message_breaks_the_line(text: str) -> None:
    entry = _line(_record("upstream said %s", text))
    assert entry["message"] == f"upstream said {text}"
    assert entry["level"] == "WARNING"


def test_an_exception_is_one_field_holding_its_traceback() -> None:
    try:
        raise ValueError("bad\nvalue ⚡")
    except ValueError:
        record = _record("watcher crashed, restarting in %.1f s", 2.0, exc_info=sys.exc_info())
    entry = _line(record)
    assert entry["message"] == "watcher crashed, restarting in 2.0 s"
    assert entry["exception"].startswith("Traceback (most recent call last):\n")
    assert entry["exception"].endswith("ValueError: bad\nvalue ⚡")


def test_a_typical_logged_exception_stays_one_line_without_secrets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """As the gateway logs a failure: the record names what failed; the formatter adds
    nothing the text format would not show."""
    log = logging.getLogger("gateway.watcher")
    with caplog.at_level(logging.ERROR, logger="gateway.watcher"):
        try:
            raise ConnectionError("LND at 127.0.0.1:10009 unreachable:\nconnection refused")
        except ConnectionError:
            log.exception("invoice stream from %s failed", "127.0.0.1:10009")
    (record,) = caplog.records
    line = JsonLogFormatter().format(record)
    entry = _line(record)
    assert entry["logger"] == "gateway.watcher"
    assert entry["level"] == "ERROR"
    assert "ConnectionError: LND at 127.0.0.1:10009 unreachable" in entry["exception"]
    for secret in ("macaroon", "preimage", "root_key"):
        assert secret not in line


def test_extra_fields_are_kept_and_made_json() -> None:
    entry = _line(
        _record("settled", extra={"service": "api", "amount_msat": 5000, "where": object()})
    )
    assert entry["service"] == "api"
    assert entry["amount_msat"] == 5000
    assert entry["where"].startswith("<object object at")
    assert entry["message"] == "settled"


def test_an_extra_field_does_not_replace_a_core_one() -> None:
    entry = _line(_record("settled", extra={"time": "forged", "level": "forged"}))
    assert entry["level"] == "WARNING"
    assert entry["time"] != "forged"


def test_a_stack_is_a_field() -> None:
    record = _record("here")
    record.stack_info = "Stack (most recent call last):\n  File x"
    assert _line(record)["stack"] == "Stack (most recent call last):\n  File x"


@pytest.mark.parametrize(
    ("argv", "environ", "expected"),
    [
        (["invoices"], None, "text"),
        (["--log-format", "json", "invoices"], None, "json"),
        (["invoices", "--log-format", "json"], None, "json"),
        (["--log-format", "json", "serve", "--log-format", "text"], None, "text"),
        (["pay", "http://x/", "--log-format", "json"], None, "json"),
        (["invoices"], "json", "json"),
        (["--log-format", "text", "invoices"], "json", "text"),
    ],
)
def test_the_log_format_is_an_option_and_an_environment_variable(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], environ: str | None, expected: str
) -> None:
    if environ is None:
        monkeypatch.delenv("GATEWAY_LOG_FORMAT", raising=False)
    else:
        monkeypatch.setenv("GATEWAY_LOG_FORMAT", environ)
    assert _parser().parse_args(argv).log_format == expected


@pytest.mark.parametrize("environ", [None, "yaml"])
def test_an_unknown_log_format_is_bad_usage(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], environ: str | None
) -> None:
    if environ is None:
        monkeypatch.delenv("GATEWAY_LOG_FORMAT", raising=False)
        argv = ["--log-format", "yaml", "invoices"]
    else:
        monkeypatch.setenv("GATEWAY_LOG_FORMAT", environ)
        argv = ["invoices"]
    with pytest.raises(SystemExit) as exited:
        _parser().parse_args(argv)
    assert exited.value.code == 2
    assert "invalid log format 'yaml'" in capsys.readouterr().err
