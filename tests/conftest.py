"""Shared fixtures: the regtest network (one per test session) and LND clients on it."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Generator
from pathlib import Path

import pytest
import pytest_asyncio

from gateway.lnd.client import LndClient
from regtest.build import BuildError, lnd_module_dir
from regtest.network import Network, running_network

IN_CI = bool(os.environ.get("CI"))
_network_dirs: list[Path] = []


def _unavailable(reason: str) -> None:
    """Skip locally; in CI a regtest test that cannot run is a failure, never a skip."""
    if IN_CI:
        pytest.fail(f"regtest prerequisites missing in CI: {reason}")
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
    if IN_CI and report.skipped and item.get_closest_marker("regtest") is not None:
        report.outcome = "failed"
        report.longrepr = f"regtest test skipped in CI: {report.longrepr}"
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
