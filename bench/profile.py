"""Where a benchmark's server spends its time: py-spy samples of one process, summed into the
top functions by own time (samples where it was running) and by cumulative time (samples
where it was on the stack)."""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

RATE = 200  # samples per second
# Waits py-spy samples as running: the store's idle worker thread, and the event loop's
# poll for events.
_IDLE_LEAVES = frozenset({"_worker", "select", "poll"})
# Frames every sample of the process has under it (the command's entry points): left out of
# the cumulative list, which they would top at 100%.
_ENTRY = re.compile(
    r"^(<frozen runpy>|gateway/cli/(__main__|__init__)\.py"
    r"|gateway/cli/serve\.py:(run|_serve_worker)$|asyncio/runners\.py:Runner\.run$|threading\.py:Thread\._bootstrap)"
)
_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^():]*)(?::\d+)?\)$")


@dataclass(frozen=True, slots=True)
class Profile:
    samples: int
    own: list[tuple[float, str]]  # (share of the busy samples, function), largest first
    cumulative: list[tuple[float, str]]

    def lines(self, title: str, top: int) -> list[str]:
        """A markdown table of the ``top`` entries of each kind."""
        rows = [
            f"{title} ({self.samples} busy samples at {RATE} Hz):",
            "",
            "| own % | function | cumulative % | function |",
            "| --- | --- | --- | --- |",
        ]
        for (own, own_name), (cumulative, name) in zip(
            self.own[:top], self.cumulative[:top], strict=False
        ):
            rows.append(f"| {own:.1f} | `{own_name}` | {cumulative:.1f} | `{name}` |")
        return rows


def start(pid: int, seconds: int, output: Path) -> subprocess.Popen[bytes]:
    """py-spy recording ``pid`` for ``seconds`` into ``output`` (raw folded stacks)."""
    py_spy = shutil.which("py-spy") or str(Path(__file__).parents[1] / ".venv/bin/py-spy")
    args = [py_spy, "record", "--pid", str(pid), "--duration", str(seconds)]
    args += ["--rate", str(RATE), "--format", "raw", "--output", str(output), "--nonblocking"]
    return subprocess.Popen(  # noqa: S603 - py-spy with our own arguments
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def _name(frame: str) -> str:
    """``function (file:line)`` as ``file:function``, the file relative to its package."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    file = re.sub(r".*/site-packages/|.*/lib/python3\.\d+/", "", match["file"])
    file = re.sub(r".*?/(gateway|bench|regtest)/", r"\1/", file)
    return f"{file}:{match['function']}"


def summarize(raw: Path) -> Profile:
    own: collections.Counter[str] = collections.Counter()
    cumulative: collections.Counter[str] = collections.Counter()
    busy = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_name(frame) for frame in stack.split(";")]
        if frames[-1].rpartition(":")[2] in _IDLE_LEAVES:
            continue
        busy += int(count)
        own[frames[-1]] += int(count)
        for name in set(frames):
            if not _ENTRY.match(name):
                cumulative[name] += int(count)

    def shares(counter: collections.Counter[str]) -> list[tuple[float, str]]:
        return [(100 * n / max(busy, 1), name) for name, n in counter.most_common()]

    return Profile(busy, shares(own), shares(cumulative))
