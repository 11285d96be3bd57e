"""The PostgreSQL test harness: the server it starts, the databases it hands out, the CI rule."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import asyncpg
import pytest

from tests import conftest
from tests.postgres_server import (
    PostgresError,
    PostgresServer,
    PostgresUnavailable,
    running_server,
    server_binaries,
    start_server,
)

ROOT = Path(__file__).parents[2]


def _processes_in(directory: Path) -> list[int]:
    """Pids of the processes working in ``directory``: every PostgreSQL process of a cluster
    has its data directory as working directory."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cwd").resolve() == directory.resolve():
                pids.append(int(proc.name))
        except OSError:  # ended meanwhile, or not ours to look at
            continue
    return pids


def _wait_for_no_processes_in(directory: Path) -> list[int]:
    # Backends exit on their own once they notice the postmaster is gone: give them a moment.
    deadline = time.monotonic() + 10
    while (pids := _processes_in(directory)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pids


@pytest.mark.postgres
async def test_a_fresh_database_answers_on_its_url(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    assert postgres_url.startswith(f"postgresql://postgres@127.0.0.1:{postgres_server.port}/")
    connection = await asyncpg.connect(postgres_url)
    try:
        assert (
            await connection.fetchval("SELECT current_database()") == postgres_url.rsplit("/", 1)[1]
        )
        tables = "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        assert await connection.fetchval(tables) == 0
        assert await connection.fetchval("SHOW fsync") == "off"
        assert int(await connection.fetchval("SHOW max_connections")) >= 300
    finally:
        await connection.close()


@pytest.mark.postgres
async def test_two_databases_are_isolated(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    other_url = postgres_server.create_database("harness_other")
    try:
        first = await asyncpg.connect(postgres_url)
        other = await asyncpg.connect(other_url)
        try:
            await first.execute("CREATE TABLE secrets (value text)")
            await first.execute("INSERT INTO secrets VALUES ('first')")
            assert await other.fetchval("SELECT to_regclass('secrets')") is None
        finally:
            await first.close()
            await other.close()
    finally:
        postgres_server.drop_database("harness_other")
    assert (
        postgres_server.execute("SELECT count(*) FROM pg_database WHERE datname = 'harness_other'")
        == "0"
    )


@pytest.mark.postgres
async def test_a_database_left_connected_is_still_dropped(
    postgres_server: PostgresServer,
) -> None:
    forgotten = await asyncpg.connect(postgres_server.create_database("harness_busy"))
    postgres_server.drop_database("harness_busy")
    with pytest.raises(asyncpg.PostgresError, match="terminating connection"):
        await forgotten.fetchval("SELECT 1")
    await forgotten.close()


@pytest.mark.postgres
def test_the_server_never_runs_as_root(postgres_server: PostgresServer) -> None:
    status = Path(f"/proc/{postgres_server.pid}/status").read_text()
    uid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:")))
    assert uid != 0
    if os.geteuid() != 0:
        assert uid == os.geteuid()


@pytest.mark.postgres
def test_database_names_are_plain_identifiers(postgres_server: PostgresServer) -> None:
    with pytest.raises(ValueError, match="not a plain database name"):
        postgres_server.create_database('x"; DROP DATABASE postgres; --')


@pytest.mark.postgres
def test_stop_leaves_no_postgres_process_and_no_directory() -> None:
    with running_server() as server:
        data = server.directory / "data"
        assert server.pid in _processes_in(data)
        assert len(_processes_in(data)) > 1  # the postmaster and its helpers
    assert not server.directory.exists()
    assert _processes_in(data) == []


@pytest.mark.postgres
@pytest.mark.parametrize("ending", ["exit", "SIGKILL"])
def test_a_server_dies_with_the_process_that_started_it(ending: str) -> None:
    # Neither a forgotten stop() (atexit stops it) nor a killed test run leaves a postmaster.
    end = "os.kill(os.getpid(), signal.SIGKILL)" if ending == "SIGKILL" else "pass"
    program = (
        "import os, signal\n"
        "from tests.postgres_server import scratch_directory, start_server\n"
        "server = start_server(scratch_directory())\n"
        "print(server.directory, flush=True)\n"
        f"{end}\n"
    )
    started = subprocess.run(  # noqa: S603 - this interpreter, our own program
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, check=False
    )
    directory = Path(started.stdout.strip())
    assert directory.is_dir(), started.stderr
    try:
        assert _wait_for_no_processes_in(directory / "data") == []
    finally:
        _remove_shared_memory_left_by(directory / "data")
        shutil.rmtree(directory)


def _remove_shared_memory_left_by(data: Path) -> None:
    # A killed postmaster leaves its System V segment (postmaster.pid's 7th line: key and id).
    pid_file = data / "postmaster.pid"
    if pid_file.exists():
        segment = pid_file.read_text().splitlines()[6].split()[1]
        subprocess.run(["ipcrm", f"--shmem-id={segment}"], check=True)  # noqa: S603, S607


@pytest.mark.skipif(os.geteuid() != 0, reason="the server runs as ourselves: nothing to check")
def test_a_directory_the_server_user_cannot_reach_is_refused_up_front(tmp_path: Path) -> None:
    # pytest's base temp directory is 0700 root: the postgres user cannot get in.
    with pytest.raises(PostgresError, match=r"cannot get through .* \(mode 700\)"):
        start_server(tmp_path / "postgres")


def test_missing_binaries_say_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("tests.postgres_server.DEBIAN_VERSIONS", tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(PostgresUnavailable, match="apt-get install postgresql"):
        server_binaries()


def test_missing_prerequisites_skip_locally_and_fail_in_ci(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(conftest, "IN_CI", False)
    with pytest.raises(pytest.skip.Exception, match="no binaries"):
        conftest._unavailable("no binaries", "postgres")
    monkeypatch.setattr(conftest, "IN_CI", True)
    with pytest.raises(pytest.fail.Exception, match="postgres prerequisites missing in CI"):
        conftest._unavailable("no binaries", "postgres")


def _reported(
    item: pytest.Item, outcome: Literal["passed", "failed", "skipped"]
) -> pytest.TestReport:
    """The report of a test run of ``item`` with ``outcome``, after the conftest's hook."""
    report = pytest.TestReport(item.nodeid, item.location, {}, outcome, "the reason", "call")
    call = pytest.CallInfo.from_call(lambda: None, "call")
    hook = conftest.pytest_runtest_makereport(item, call)
    next(hook)
    with pytest.raises(StopIteration) as finished:
        hook.send(report)
    result: pytest.TestReport = finished.value.value
    return result


@pytest.mark.parametrize("marker", conftest.REQUIRED_IN_CI)
@pytest.mark.parametrize("in_ci", [False, True])
def test_a_skipped_test_that_ci_must_run_fails_in_ci(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, marker: str, in_ci: bool
) -> None:
    monkeypatch.setattr(conftest, "IN_CI", in_ci)
    assert _reported(request.node, "skipped").skipped
    request.node.add_marker(marker)  # this test's own item, as if it carried the marker
    report = _reported(request.node, "skipped")
    assert report.failed == in_ci
    if in_ci:
        assert str(report.longrepr) == f"{marker} test skipped in CI: the reason"
    assert _reported(request.node, "passed").passed
