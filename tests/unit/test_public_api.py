"""Everything ``gateway.__all__`` names resolves, lazily, and so does every gateway name the
README's Python examples import."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import gateway
from gateway import runtime

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.parametrize("name", gateway.__all__)
def test_exported_name_resolves(name: str) -> None:
    assert getattr(gateway, name) is not None


def test_all_and_the_lazy_table_agree() -> None:
    assert sorted(gateway.__all__) == sorted(gateway._EXPORTS)


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = gateway.nope


def test_importing_the_package_loads_no_adapter() -> None:
    probe = (
        "import sys, gateway; "
        "print(sorted(m for m in sys.modules if m.startswith(('grpc', 'aiohttp'))))"
    )
    result = subprocess.run(  # noqa: S603 - our own interpreter
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_running_gateway_is_the_composition_roots() -> None:
    assert gateway.running_gateway is runtime.running_gateway


def _readme_imports() -> list[tuple[str, str]]:
    examples = "".join(re.findall(r"```python\n(.*?)```", README.read_text(), re.S))
    return [
        (module, name.strip())
        for module, names in re.findall(r"^from (gateway[\w.]*) import ([\w, ]+)", examples, re.M)
        for name in names.split(",")
    ]


def test_the_readme_imports_gateway_names() -> None:
    assert ("gateway.runtime", "running_gateway") in _readme_imports()


@pytest.mark.parametrize(("module", "name"), _readme_imports())
def test_readme_import_resolves(module: str, name: str) -> None:
    assert getattr(importlib.import_module(module), name) is not None
