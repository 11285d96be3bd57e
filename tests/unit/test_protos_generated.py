"""The committed gateway/lnd/protos/ package must be exactly what protos/generate.py produces.

If this fails, the .proto files (or grpcio-tools / mypy-protobuf versions) changed without
regenerating: run ``python protos/generate.py`` and commit the result.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parents[2]
GENERATOR = REPO_ROOT / "protos" / "generate.py"
COMMITTED_DIR = REPO_ROOT / "gateway" / "lnd" / "protos"


def _load_generator() -> ModuleType:
    # Loaded by path: protos/ is a scripts dir, not a package.
    spec = importlib.util.spec_from_file_location("_protos_generate", GENERATOR)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_committed_bindings_match_fresh_generation(tmp_path: Path) -> None:
    generate: Callable[[Path], None] = _load_generator().generate
    fresh_dir = tmp_path / "protos"
    generate(fresh_dir)

    fresh = _files(fresh_dir)
    committed = _files(COMMITTED_DIR)

    assert fresh, "generator produced no files"
    assert sorted(committed) == sorted(fresh), "file sets differ; rerun protos/generate.py"
    stale = [name for name in sorted(fresh) if committed[name] != fresh[name]]
    assert not stale, f"stale generated files (rerun protos/generate.py): {stale}"
