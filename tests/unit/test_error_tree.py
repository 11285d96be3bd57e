"""One exception tree: every error class is drawn in ``gateway.errors``' docstring, and the
root module imports nothing of the gateway (no layer below the others depends on one above)."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path
from types import ModuleType

import pytest

from gateway import errors, events
from gateway.client import errors as client_errors
from gateway.l402 import errors as l402_errors

BRANCHES = (errors, client_errors, l402_errors, events)


def _error_classes(module: ModuleType) -> list[type[BaseException]]:
    return [
        value
        for value in vars(module).values()
        if inspect.isclass(value)
        and issubclass(value, BaseException)
        and value.__module__ == module.__name__
    ]


@pytest.mark.parametrize("module", BRANCHES, ids=lambda module: module.__name__)
def test_every_error_is_drawn_in_the_tree(module: ModuleType) -> None:
    tree = errors.__doc__ or ""
    classes = _error_classes(module)
    assert classes
    for cls in classes:
        assert re.search(rf"^    (.*── )?{cls.__name__}\b", tree, re.M), cls


def test_the_client_branch_hangs_from_gateway_error() -> None:
    for cls in _error_classes(client_errors):
        assert issubclass(cls, errors.GatewayError), cls


def test_the_root_module_imports_nothing_of_the_gateway() -> None:
    source = Path(errors.__file__).read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            assert node.module is not None
            assert not node.module.startswith("gateway"), node.module
        elif isinstance(node, ast.Import):
            assert not any(alias.name.startswith("gateway") for alias in node.names)


def test_a_duplicate_payout_is_a_store_error() -> None:
    """The payout worker tells a repeated payment hash (``begin_payout``) from a failing
    store; callers that catch ``StoreError`` still catch it."""
    assert issubclass(errors.DuplicatePayout, errors.StoreError)
    assert not issubclass(errors.DuplicatePayout, errors.StoreClosed)
