"""What ``pip install l402-gateway`` brings: exactly the distributions the installed package
imports (the regtest harness's and the tests' own needs are in the ``dev`` extra), plus the
package data a user needs (``py.typed``, the sample configuration)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
# distribution -> the top-level module it installs
MODULES = {
    "grpcio": "grpc",
    "protobuf": "google",
    "aiohttp": "aiohttp",
    "multidict": "multidict",
    "yarl": "yarl",
    "coincurve": "coincurve",
    "cryptography": "cryptography",
    "segno": "segno",
    "httpx": "httpx",
    "standardwebhooks": "standardwebhooks",
    "prometheus-client": "prometheus_client",
    "asyncpg": "asyncpg",
    "httptools": "httptools",
    "uvloop": "uvloop",
}


def _distribution(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9_.-]+", requirement)
    assert match, requirement
    return match.group(0).lower()


def _imported_top_levels() -> set[str]:
    found: set[str] = set()
    for path in (ROOT / "gateway").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {alias.name.partition(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.partition(".")[0])
    return found - set(sys.stdlib_module_names) - {"gateway", "__future__"}


def test_runtime_dependencies_are_what_the_package_imports() -> None:
    runtime = {_distribution(r) for r in PROJECT["dependencies"]}
    extras = PROJECT["optional-dependencies"]
    optional = {_distribution(r) for name in ("httpx", "speed") for r in extras[name]}
    assert runtime.isdisjoint(optional)
    assert {MODULES[d] for d in runtime | optional} == _imported_top_levels()


def test_the_regtest_harness_needs_come_with_dev() -> None:
    dev = {_distribution(r) for r in PROJECT["optional-dependencies"]["dev"]}
    assert "python-bitcoinlib" in dev
    assert "python-bitcoinlib" not in {_distribution(r) for r in PROJECT["dependencies"]}


def test_every_supported_python_has_a_classifier() -> None:
    assert PROJECT["requires-python"] == ">=3.11"
    for minor in (11, 12, 13):
        assert f"Programming Language :: Python :: 3.{minor}" in PROJECT["classifiers"]


def test_package_data_ships_the_typing_marker_and_the_sample_config() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]
    shipped = setuptools["setuptools"]["package-data"]["gateway"]
    assert set(shipped) == {"py.typed", "gateway.sample.toml"}
    assert all((ROOT / "gateway" / name).is_file() for name in shipped)


def test_package_data_covers_every_file_the_package_reads() -> None:
    """Every non-Python file under gateway/ (page templates, scripts, styles) is matched by
    a ``package-data`` pattern of its own package, or a wheel install would lack it."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]
    patterns = setuptools["setuptools"]["package-data"]
    missing = []
    for path in sorted((ROOT / "gateway").rglob("*")):
        if not path.is_file() or path.suffix in {".py", ".pyi", ".pyc"}:
            continue
        if "__pycache__" in path.parts:
            continue
        package = ".".join(path.parent.relative_to(ROOT).parts)
        if not any(path.match(pattern) for pattern in patterns.get(package, ())):
            missing.append(str(path.relative_to(ROOT)))
    assert missing == []
