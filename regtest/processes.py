"""Child processes with a log file each, waited for, stopped cleanly and never left orphaned."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import aiohttp

T = TypeVar("T")


class NodeStartError(RuntimeError):
    """A node of the regtest network did not come up; the message names it and its log."""


def free_ports(count: int) -> list[int]:
    """Ports the kernel reports free on loopback, all distinct (bound together, then released)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def log_tail(path: Path, lines: int = 25) -> str:
    if not path.exists():
        return "(no log written)"
    with path.open(errors="replace") as handle:
        return "".join(deque(handle, maxlen=lines)).rstrip()


class ManagedProcess:
    """A started program whose stdout and stderr go to ``log``.

    ``detached`` processes outlive this Python process (the ``up`` command); the others get
    SIGKILL from the kernel if their parent dies, so a crashed test run leaves no orphans.
    """

    def __init__(self, name: str, args: list[str], log: Path, *, detached: bool) -> None:
        self.name = name
        self.log = log
        self._args = list(args)
        self._detached = detached
        command = list(args)
        setpriv = shutil.which("setpriv")
        if not detached and setpriv is not None:
            command = [setpriv, "--pdeathsig", "KILL", "--", *command]
        with log.open("ab") as output:
            self._process = subprocess.Popen(  # noqa: S603 - our own binaries and flags
                command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=detached,
            )
        self.pid = self._process.pid

    def respawn(self) -> ManagedProcess:
        """The same program started again with the same arguments, appending to the same log."""
        return ManagedProcess(self.name, self._args, self.log, detached=self._detached)

    def exited(self) -> int | None:
        """The exit code, or None while it runs."""
        return self._process.poll()

    def failure(self, what: str) -> NodeStartError:
        code = self.exited()
        state = f"exited with code {code}" if code is not None else "is still running"
        return NodeStartError(
            f"{self.name} {what}; the process {state}. Last lines of {self.log}:\n"
            f"{log_tail(self.log)}"
        )

    async def kill(self) -> None:
        """SIGKILL, as a crash would (no clean shutdown), and reap the process."""
        self._process.kill()
        await asyncio.to_thread(self._process.wait)

    async def stop(self, grace: float = 20.0) -> None:
        await stop_pid(self.pid, grace, poll=self._process.poll)


async def until(
    what: str,
    check: Callable[[], Awaitable[T | None]],
    limit: float,
    watched: list[ManagedProcess],
    interval: float = 0.2,
) -> T:
    """Poll ``check`` until it returns a value; fail fast if a watched process died."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while True:
        for process in watched:
            if process.exited() is not None:
                raise process.failure(f"stopped while waiting for {what}")
        result = await check()
        if result is not None:
            return result
        if loop.time() > deadline:
            culprit = watched[0] if len(watched) == 1 else None
            if culprit is not None:
                raise culprit.failure(f"timed out after {limit:.0f}s waiting for {what}")
            raise NodeStartError(f"timed out after {limit:.0f}s waiting for {what}")
        await asyncio.sleep(interval)


async def stop_pid(pid: int, grace: float, poll: Callable[[], int | None] | None = None) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL.

    ``poll`` reaps our own children (a zombie still answers signals); without it the pid is
    taken to belong to another process tree, as after ``python -m regtest up``.
    """

    def alive() -> bool:
        if poll is not None:
            return poll() is None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    async def wait_exit(seconds: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while alive():
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.1)
        return True

    for sig, seconds in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if await wait_exit(seconds):
            return


class ServerStartError(RuntimeError):
    """An HTTP server process (the gateway, a benchmark server) did not come up."""


async def wait_for_http(
    url: str, process: subprocess.Popen[bytes], log: Path, limit: float = 30.0
) -> None:
    """Poll ``url`` until it answers 200; fail with the log's tail if the process exits first."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    async with aiohttp.ClientSession() as session:
        while loop.time() < deadline:
            if process.poll() is not None:
                raise ServerStartError(
                    f"{url}: the server exited with code {process.returncode}; last lines of "
                    f"{log}:\n{log_tail(log)}"
                )
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
    raise ServerStartError(f"{url} did not answer in {limit:.0f}s; see {log}:\n{log_tail(log)}")
