"""``l402-gateway --log-format json serve``: the supervisor and each worker process log JSON
lines, one object per record; without the option, the text lines of before."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.serve_logs import serve_logs

_WORKERS = ("l402-gateway-worker-0", "l402-gateway-worker-1")


@pytest.mark.parametrize(
    ("options", "environ"),
    [(["--log-format", "json"], {}), ([], {"GATEWAY_LOG_FORMAT": "json"})],
)
def test_serve_and_its_workers_log_json_lines(
    tmp_path: Path, options: list[str], environ: dict[str, str]
) -> None:
    lines = serve_logs(tmp_path, options, environ)
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(set(e) >= {"time", "level", "logger", "message", "process"} for e in entries)
    processes = {e["process"] for e in entries if e["message"].startswith("accepting up to")}
    assert processes == set(_WORKERS)
    (started,) = [e for e in entries if e["message"].startswith("l402-gateway proxying")]
    assert (started["process"], started["level"], started["logger"]) == (
        "MainProcess",
        "INFO",
        "gateway.cli.serve",
    )
    assert any("does not answer" in e["message"] and e["level"] == "WARNING" for e in entries)


def test_serve_logs_text_lines_without_the_option(tmp_path: Path) -> None:
    lines = serve_logs(tmp_path, [], {})
    assert not any(line.startswith("{") for line in lines)
    assert any(" INFO gateway.cli.serve: l402-gateway proxying " in line for line in lines)
    for worker in _WORKERS:
        assert any(f" {worker} INFO gateway.cli.serve: accepting up to " in ln for ln in lines)
