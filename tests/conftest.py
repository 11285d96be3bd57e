"""Shared fixtures: the regtest network (one per test session) and LND clients on it, and a
PostgreSQL server (one per test session) with a fresh database per test."""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Generator, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import pytest_asyncio

from gateway.lnd.client import LndClient
from regtest.build import BuildError, lnd_module_dir
from regtest.network import Network, running_network
from tests.postgres_server import PostgresServer, PostgresUnavailable, running_server

IN_CI = bool(os.environ.get("CI"))
_network_dirs: list[Path] = []


# Tests with these markers fail in CI when they would skip: CI must run them.
REQUIRED_IN_CI = ("regtest", "postgres", "interop")


def _unavailable(reason: str, what: str = "regtest") -> None:
    """Skip locally; in CI a test that cannot run is a failure, never a skip."""
    if IN_CI:
        pytest.fail(f"{what} prerequisites missing in CI: {reason}")
    pytest.skip(reason)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--long", action="store_true", help="also run the tests marked long")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Deselected, not skipped: a skipped regtest test fails in CI.
    if config.getoption("--long"):
        return
    long = [item for item in items if item.get_closest_marker("long") is not None]
    if long:
        config.hook.pytest_deselected(items=long)
        items[:] = [item for item in items if item.get_closest_marker("long") is None]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    required = [name for name in REQUIRED_IN_CI if item.get_closest_marker(name) is not None]
    if IN_CI and report.skipped and required:
        report.outcome = "failed"
        report.longrepr = f"{required[0]} test skipped in CI: {report.longrepr}"
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for path in _network_dirs:
        terminalreporter.write_line(f"regtest network logs: {path}")


@pytest.fixture(scope="session")
def lnd_source_dir() -> Path:
    try:
        return lnd_module_dir()
    except BuildError as error:
        _unavailable(str(error))
        raise


@pytest_asyncio.fixture(scope="session")
async def network(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Network]:
    workdir = tmp_path_factory.mktemp("regtest")
    _network_dirs.append(workdir)
    try:
        context = running_network(workdir)
        net = await context.__aenter__()
    except BuildError as error:
        _unavailable(str(error))
        raise
    try:
        yield net
    finally:
        await context.__aexit__(None, None, None)


@pytest_asyncio.fixture
async def alice(network: Network) -> AsyncIterator[LndClient]:
    async with LndClient(network.alice.settings()) as client:
        yield client


@pytest_asyncio.fixture
async def bob(network: Network) -> AsyncIterator[LndClient]:
    async with LndClient(network.bob.settings()) as client:
        yield client


_postgres_databases = itertools.count()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """Started by the first test that needs it; Debian's binaries (``make postgres``)."""
    with ExitStack() as stack:
        try:
            server = stack.enter_context(running_server())
        except PostgresUnavailable as error:
            _unavailable(str(error), "postgres")
            raise
        yield server


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The URL of a fresh, empty database, dropped after the test."""
    name = f"test_{next(_postgres_databases)}"
    yield postgres_server.create_database(name)
    postgres_server.drop_database(name)
