"""What the commands print alike: the log line formats (text, or JSON lines), UTC times,
amounts and tables; and what they take and answer alike: ``--limit N``, the exit code of a
ledger that does not reconcile."""

from __future__ import annotations

import argparse
import datetime
import decimal
import enum
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

# ``accounts`` and ``payees``: the totals do not add up (a bookkeeping error), printed anyway.
EXIT_DOES_NOT_RECONCILE = 4
MAX_LIMIT = 2**63 - 1  # SQLite's largest integer
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FORMATS = ("text", "json")
# What every LogRecord has (and what formatting adds): the rest are a call's ``extra``.
_RECORD_ATTRIBUTES = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)


class JsonLogFormatter(logging.Formatter):
    """One log record as one line of JSON: ``time`` (ISO 8601, UTC), ``level``, ``logger``,
    ``message`` (its arguments applied), ``process`` (the process name: workers differ),
    ``exception`` (the traceback, a string) and ``stack`` when the record has them, and the
    call's ``extra`` fields (a value JSON cannot hold as its ``str``).

    ASCII only: every control character, newline and non-ASCII character is escaped, so no
    message can end a line or look like one (U+2028 and the like) to a line-based reader.
    It logs what the text format logs, no more: the call sites keep secrets out.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            key: _json_value(value)
            for key, value in record.__dict__.items()
            if key not in _RECORD_ATTRIBUTES and not key.startswith("_")
        }
        entry.update(
            time=datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            level=record.levelname,
            logger=record.name,
            message=record.getMessage(),
            process=record.processName,
        )
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)  # as Formatter caches it
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=True, separators=(",", ":"))


def _json_value(value: object) -> object:
    """``value`` if JSON holds it as it is, else its ``str``."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return str(value)
    return value


def configure_logging(level: int, log_format: str, text_format: str = LOG_FORMAT) -> None:
    """Root logging to stderr at ``level``: lines of ``text_format``, or of JSON
    (``log_format`` ``"json"``). Like ``logging.basicConfig``, nothing if already set up."""
    if log_format == "json":
        handler = logging.StreamHandler()
        handler.setFormatter(JsonLogFormatter())
        logging.basicConfig(level=level, handlers=[handler])
    else:
        logging.basicConfig(level=level, format=text_format)


def current_log_format() -> str:
    """``"json"`` when the root logger writes JSON lines, else ``"text"``: what a spawned
    process is to use."""
    root = logging.getLogger().handlers
    return "json" if any(isinstance(h.formatter, JsonLogFormatter) for h in root) else "text"


# 9999-12-31 23:59:59 UTC: a time past it (a peer's invoice expiry, say) is shown as that.
_LAST_SHOWN = 253_402_300_799


def utc_time(timestamp: float | None) -> str:
    """``2024-05-01 12:00:00`` (UTC), or ``-`` for no time; ``after 9999-12-31 23:59:59``
    for one past the calendar (``gmtime`` refuses it)."""
    if timestamp is None:
        return "-"
    if timestamp > _LAST_SHOWN:
        return "after " + utc_time(_LAST_SHOWN)
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(timestamp))


def sat(msat: int) -> str:
    """``12.5 sat`` for 12500 msat, exactly: the whole sat, and the msat remainder as
    decimals only when there is one (``1234567 sat``, ``0.001 sat``)."""
    return f"{sat_number(msat)} sat"


def sat_number(msat: int) -> str:
    """``sat`` without the unit: ``12.5`` for 12500 msat."""
    whole, rest = divmod(abs(msat), 1000)
    sign = "-" if msat < 0 else ""
    return f"{sign}{whole}.{rest:03d}".rstrip("0") if rest else f"{sign}{whole}"


def columns(rows: Sequence[Sequence[str]]) -> list[str]:
    """The rows (the first is the header) as lines of left-aligned columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def parse_limit(text: str) -> int:
    """``--limit N`` for argparse: 0 to ``MAX_LIMIT``, else a usage error (exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"--limit is 0 to {MAX_LIMIT}, got {text}")
    return value


MAX_SECONDS = 86_400.0


def parse_seconds(text: str) -> float:
    """A timeout for argparse: more than 0 seconds, at most a day, else a usage error
    (exit 2): ``nan``, ``inf`` and negative ones fail later, or for ever."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= MAX_SECONDS:  # False for nan
        raise argparse.ArgumentTypeError(f"seconds are more than 0, at most {MAX_SECONDS:g}")
    return value


State = TypeVar("State", bound=enum.Enum)


def state_parser(states: type[State]) -> Callable[[str], State]:
    """``--state S`` for argparse: one of ``states`` by its value, in any case, else a usage
    error (exit 2) naming them."""

    def parse(text: str) -> State:
        for state in states:
            if state.value.lower() == text.lower():
                return state
        names = ", ".join(state_names(states))
        raise argparse.ArgumentTypeError(f"--state {text!r}: use one of {names}")

    return parse


def state_names(states: type[enum.Enum]) -> list[str]:
    """``states``' values in lower case, as ``--state`` takes and help lists them."""
    return [state.value.lower() for state in states]


Record = TypeVar("Record")


def print_records(
    records: Sequence[Record],
    as_json: bool,
    record_json: Callable[[Record], dict[str, Any]],
    table: Callable[[Sequence[Record]], Sequence[str]],
    none: str,
) -> None:
    """A listing on stdout: a JSON array of each record's ``record_json`` (ASCII), else the
    lines of their ``table``, or the line ``none`` when there are none."""
    if as_json:
        print(json.dumps([record_json(r) for r in records], indent=2, ensure_ascii=True))
    elif records:
        print("\n".join(table(records)))
    else:
        print(none)


def sat_to_msat(text: str) -> int:
    """``"21"``, ``"0.5"`` or ``"21sat"`` satoshis (at most three decimals), or
    ``"21000msat"`` -> millisatoshis."""
    number, scale = text, 1000
    for unit, unit_scale in (("msat", 1), ("sat", 1000)):  # msat first: it ends with "sat"
        if text.endswith(unit):
            number, scale = text[: -len(unit)], unit_scale
            break
    try:
        value = decimal.Decimal(number) * scale
    except decimal.InvalidOperation:
        raise argparse.ArgumentTypeError(f"not an amount in sat: {text!r}") from None
    if value.is_finite() and value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative: an amount is 0 or more")
    if not value.is_finite() or value != value.to_integral_value():
        raise argparse.ArgumentTypeError(f"not an amount in sat or msat (msat precision): {text!r}")
    return int(value)
