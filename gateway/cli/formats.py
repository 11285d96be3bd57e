"""What the commands print alike: the log line format and UTC times."""

from __future__ import annotations

import time

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def utc_time(timestamp: float | None) -> str:
    """``2024-05-01 12:00:00`` (UTC), or ``-`` for no time."""
    if timestamp is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(timestamp))
