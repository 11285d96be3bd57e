"""What the commands print alike: the log line format, UTC times, amounts and tables."""

from __future__ import annotations

import time
from collections.abc import Sequence

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def utc_time(timestamp: float | None) -> str:
    """``2024-05-01 12:00:00`` (UTC), or ``-`` for no time."""
    if timestamp is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(timestamp))


def sat(msat: int) -> str:
    """``12.5 sat`` for 12500 msat."""
    return f"{msat / 1000:g} sat"


def columns(rows: Sequence[Sequence[str]]) -> list[str]:
    """The rows (the first is the header) as lines of left-aligned columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
