"""Everything ``gateway.__all__`` names resolves, lazily."""

from __future__ import annotations

import subprocess
import sys

import pytest

import gateway


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
