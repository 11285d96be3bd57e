"""A throwaway PostgreSQL server for tests and benchmarks, from Debian's binaries.

``start_server(directory)`` runs ``initdb`` in ``directory`` and starts the server with settings
for tests: no fsync, trust authentication, 127.0.0.1 on a free port and a unix socket in
``directory``. PostgreSQL refuses to run as root, so under root the server runs as the
``postgres`` user (``nobody`` where there is none). ``running_server()`` does that in a scratch
directory (in memory when there is room) and removes it afterwards. No pytest here: the
regtest multi-instance test and the benchmark start servers too.
"""

from __future__ import annotations

import atexit
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from regtest.processes import free_ports, log_tail

DEBIAN_VERSIONS = Path("/usr/lib/postgresql")
BINARIES = ("initdb", "postgres", "psql")
SUPERUSER = "postgres"  # the role initdb creates; trust authentication, so no password
# Every test database is a copy of this one. Nothing ever connects to it (tools connect to
# template1 at times), so CREATE DATABASE never finds its template in use.
TEMPLATE = "l402_empty"
SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    # Several gateway instances with their pools, their leader connections and the tests'.
    "max_connections": "300",
    # In the data directory, removed with it, rather than in /dev/shm, where a killed server
    # would leave them.
    "dynamic_shared_memory_type": "mmap",
    # The cluster lives in memory (scratch_directory): keep its WAL small.
    "max_wal_size": "128MB",
    "min_wal_size": "32MB",
}
# On the test machines a cluster on tmpfs starts in 0.5 s instead of 1.3 s, and CREATE
# DATABASE takes 20 ms instead of 150 ms, fsync=off notwithstanding. A container's /dev/shm is
# 64 MB by default: too small, so disk it is there.
MEMORY_DIRECTORY = Path("/dev/shm")  # noqa: S108 - mkdtemp makes a private directory in it
MEMORY_NEEDED = 1 << 30
START_LIMIT = 30.0
STOP_LIMIT = 30.0
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class PostgresUnavailable(RuntimeError):
    """This machine cannot run a PostgreSQL server; the message says what is missing."""


class PostgresError(RuntimeError):
    """The server did not start, or a statement failed; the message holds its output."""


def server_binaries() -> Path:
    """The directory holding the newest installed server's binaries."""
    versions = [path for path in DEBIAN_VERSIONS.glob("*/bin") if path.parent.name.isdigit()]
    candidates = sorted(versions, key=lambda path: int(path.parent.name), reverse=True)
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        reported = subprocess.run(  # noqa: S603 - pg_config from PATH, no input
            [pg_config, "--bindir"], capture_output=True, text=True, check=False
        ).stdout.strip()
        if reported:
            candidates.append(Path(reported))
    for bindir in candidates:
        if all((bindir / name).is_file() for name in BINARIES):
            return bindir
    raise PostgresUnavailable(
        f"PostgreSQL server binaries ({', '.join(BINARIES)}) not found in "
        f"{DEBIAN_VERSIONS}/<version>/bin or pg_config --bindir; "
        "install them with: apt-get install postgresql (or run: make postgres)"
    )


def _server_user() -> pwd.struct_passwd | None:
    """The user to run the server as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PostgresUnavailable(
        "running as root, and no postgres or nobody user to run PostgreSQL as"
    )


def _as_user(user: pwd.struct_passwd | None, command: list[str]) -> list[str]:
    """``command`` run as ``user``, killed by the kernel if we die (no stray postmaster)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        if user is not None:
            raise PostgresUnavailable("running as root and setpriv (util-linux) is missing")
        return command
    switch = [] if user is None else [f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}"]
    clear = [] if user is None else ["--clear-groups"]
    return [setpriv, *switch, *clear, "--pdeathsig", "KILL", "--", *command]


def _check_reachable(directory: Path, user: pwd.struct_passwd) -> None:
    # initdb would only say "Permission denied"; name the parent that stops the user.
    for parent in directory.resolve().parents:
        if not parent.exists():  # mkdir makes it, with the usual umask
            continue
        status = parent.stat()
        if status.st_uid == user.pw_uid:
            search = 0o100
        elif status.st_gid == user.pw_gid:  # --clear-groups: the primary group only
            search = 0o010
        else:
            search = 0o001
        if not status.st_mode & search:
            raise PostgresError(
                f"{directory}: the server's user {user.pw_name} cannot get through {parent} "
                f"(mode {status.st_mode & 0o777:o}); use scratch_directory()"
            )


def _identifier(name: str) -> str:
    # Names of our own making; checked rather than quoted so that URLs need no escaping.
    if _IDENTIFIER.fullmatch(name) is None:
        raise ValueError(f"not a plain database name: {name!r}")
    return name


class PostgresServer:
    """A running server; ``stop`` it (it is also stopped when the interpreter exits)."""

    def __init__(
        self, bindir: Path, directory: Path, port: int, process: subprocess.Popen[bytes]
    ) -> None:
        self.bindir = bindir
        self.directory = directory
        self.port = port
        self.pid = process.pid  # the postmaster's: setpriv execs it
        self.startup_seconds = 0.0  # initdb, start and the template: what a test session waits
        self._process: subprocess.Popen[bytes] | None = process
        atexit.register(self.stop)

    def url(self, dbname: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{_identifier(dbname)}"

    def create_database(self, name: str) -> str:
        """A new empty database; returns its URL."""
        # FILE_COPY: quicker than the default WAL_LOG for a small template without fsync.
        self.execute(f"CREATE DATABASE {_identifier(name)} TEMPLATE {TEMPLATE} STRATEGY FILE_COPY")
        return self.url(name)

    def drop_database(self, name: str) -> None:
        # FORCE: a test that leaked a connection must not keep its database alive.
        self.execute(f"DROP DATABASE IF EXISTS {_identifier(name)} WITH (FORCE)")

    def execute(self, sql: str, dbname: str = "postgres") -> str:
        """Run ``sql`` with psql over the unix socket; returns its unaligned output."""
        command = [
            str(self.bindir / "psql"),
            "--no-psqlrc",
            "--quiet",
            "--no-align",
            "--tuples-only",
            "--set=ON_ERROR_STOP=1",
            f"--host={self.directory}",
            f"--port={self.port}",
            f"--username={SUPERUSER}",
            f"--dbname={_identifier(dbname)}",
            f"--command={sql}",
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603
        if result.returncode != 0:
            raise PostgresError(f"{sql}: {result.stderr.strip()}")
        return result.stdout.strip()

    def stop(self) -> None:
        """Fast shutdown (SIGINT: sessions are cut off); SIGKILL if it takes too long."""
        atexit.unregister(self.stop)
        process, self._process = self._process, None
        if process is None:
            return
        process.send_signal(signal.SIGINT)
        try:
            process.wait(STOP_LIMIT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_server(directory: Path) -> PostgresServer:
    """initdb a cluster in ``directory`` (created if missing) and start it.

    Under root, ``directory`` is given to the server's user, and its parents must let that
    user through (``/tmp`` and ``scratch_directory()`` do; pytest's tmp_path does not: its base
    directory is 0700). The kernel kills the server when the thread that started it ends (so
    that a killed test run leaves no postmaster): start it from the main thread, or one that
    outlives the server.
    """
    started = time.monotonic()
    user = _server_user()
    if user is not None:
        _check_reachable(directory, user)
    bindir = server_binaries()
    directory.mkdir(parents=True, exist_ok=True)
    if user is not None:
        os.chown(directory, user.pw_uid, user.pw_gid)
    data = directory / "data"
    log = directory / "server.log"
    initdb = [
        str(bindir / "initdb"),
        f"--pgdata={data}",
        f"--username={SUPERUSER}",
        "--auth=trust",
        "--encoding=UTF8",
        "--locale=C",
        "--no-sync",
    ]
    with log.open("ab") as output:
        initialized = subprocess.run(  # noqa: S603 - our own binaries and flags
            _as_user(user, initdb), stdin=subprocess.DEVNULL, stdout=output, stderr=output
        )
    if initialized.returncode != 0:
        raise PostgresError(f"initdb failed; last lines of {log}:\n{log_tail(log)}")
    port = free_ports(1)[0]
    server_command = [
        str(bindir / "postgres"),
        f"-D{data}",
        f"-p{port}",
        "-h127.0.0.1",
        f"-k{directory}",
        *(f"--{name}={value}" for name, value in SETTINGS.items()),
    ]
    with log.open("ab") as output:
        process = subprocess.Popen(  # noqa: S603 - our own binaries and flags
            _as_user(user, server_command),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    server = PostgresServer(bindir, directory, port, process)
    try:
        _wait_until_ready(process, data, log)
        server.execute(f"CREATE DATABASE {TEMPLATE} IS_TEMPLATE true")
    except BaseException:
        server.stop()
        raise
    server.startup_seconds = time.monotonic() - started
    return server


def _wait_until_ready(process: subprocess.Popen[bytes], data: Path, log: Path) -> None:
    # What pg_ctl -w waits for: the postmaster writes "ready" as postmaster.pid's 8th line.
    deadline = time.monotonic() + START_LIMIT
    while True:
        try:
            lines = (data / "postmaster.pid").read_text().splitlines()
        except FileNotFoundError:
            lines = []
        if len(lines) >= 8 and lines[7].strip() == "ready":
            return
        code = process.poll()
        if code is not None or time.monotonic() > deadline:
            state = (
                f"exited with code {code}"
                if code is not None
                else f"is not ready after {START_LIMIT:.0f}s"
            )
            raise PostgresError(f"PostgreSQL {state}; last lines of {log}:\n{log_tail(log)}")
        time.sleep(0.01)


def scratch_directory() -> Path:
    """A new empty directory for a cluster, in memory when there is room."""
    base = None
    if MEMORY_DIRECTORY.is_dir():
        usage = os.statvfs(MEMORY_DIRECTORY)
        if usage.f_bavail * usage.f_frsize >= MEMORY_NEEDED:
            base = MEMORY_DIRECTORY
    return Path(tempfile.mkdtemp(prefix="l402-postgres-", dir=base))


@contextmanager
def running_server() -> Iterator[PostgresServer]:
    """A server in a scratch directory, stopped and its directory removed afterwards."""
    directory = scratch_directory()
    try:
        server = start_server(directory)
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(directory)
