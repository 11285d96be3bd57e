"""Generate the Python gRPC bindings for LND from the protos in this directory.

Usage: ``python protos/generate.py [--out DIR]`` (default: ``gateway/lnd/protos/``).

Runs grpc_tools' bundled protoc with the grpc and mypy-protobuf plugins, then rewrites
the generated cross-file imports (``import lightning_pb2 as ...``) into package-relative
ones so the output works as a regular package.
"""

from __future__ import annotations

import argparse
import importlib
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROTO_DIR.parent
DEFAULT_OUT_DIR = REPO_ROOT / "gateway" / "lnd" / "protos"

INIT_DOCSTRING = (
    '"""Generated from protos/ by protos/generate.py -- do not edit; rerun the generator."""\n'
)

# Files protoc/plugins emit for each proto: <stem>_pb2.py(i) and <stem>_pb2_grpc.py(i).
_GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def proto_files() -> list[str]:
    """The .proto files to compile, relative to PROTO_DIR (sorted, for stable output)."""
    return sorted(p.name for p in PROTO_DIR.glob("*.proto"))


def well_known_include_dir() -> Path:
    """Include dir of the well-known protos (google/protobuf/*.proto) bundled with grpc_tools."""
    return Path(str(resources.files("grpc_tools") / "_proto"))


def find_plugin(name: str) -> Path:
    """Locate a protoc plugin executable, preferring the running interpreter's bin dir."""
    bin_dir = Path(sys.executable).parent
    found = shutil.which(name, path=str(bin_dir)) or shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found in {bin_dir} or on PATH; install mypy-protobuf")
    return Path(found)


def run_protoc(args: Sequence[str]) -> None:
    """Run grpc_tools' in-process protoc; raise if it reports failure."""
    # Imported dynamically: grpc_tools ships no type information.
    protoc = importlib.import_module("grpc_tools.protoc")
    status: int = protoc.main(["grpc_tools.protoc", *args])
    if status != 0:
        raise RuntimeError(f"protoc failed with exit status {status}")


def relativize_imports(text: str, modules: set[str]) -> str:
    """Turn top-level imports of sibling generated modules into package-relative imports."""

    def repl(match: re.Match[str]) -> str:
        module, alias = match.group("module"), match.group("alias") or ""
        if module not in modules:
            return match.group(0)
        return f"{match.group('indent')}from . import {module}{alias}"

    pattern = re.compile(r"^(?P<indent>[ \t]*)import (?P<module>\w+)(?P<alias> as \w+)?$", re.M)
    return pattern.sub(repl, text)


def generate(out_dir: Path) -> None:
    """Compile all protos into ``out_dir`` as an importable Python package."""
    protos = proto_files()
    if not protos:
        raise FileNotFoundError(f"no .proto files in {PROTO_DIR}")
    stems = [Path(p).stem for p in protos]
    modules = {f"{s}_pb2" for s in stems} | {f"{s}_pb2_grpc" for s in stems}

    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        run_protoc(
            [
                f"--plugin=protoc-gen-mypy={find_plugin('protoc-gen-mypy')}",
                f"--plugin=protoc-gen-mypy_grpc={find_plugin('protoc-gen-mypy_grpc')}",
                f"-I{PROTO_DIR}",
                f"-I{well_known_include_dir()}",
                f"--python_out={tmp_dir}",
                f"--grpc_python_out={tmp_dir}",
                f"--mypy_out=quiet:{tmp_dir}",
                f"--mypy_grpc_out=quiet:{tmp_dir}",
                *protos,
            ]
        )

        out_dir.mkdir(parents=True, exist_ok=True)
        # Drop stale outputs (e.g. of a removed .proto) before writing the new set.
        for old in out_dir.iterdir():
            if old.is_file() and old.name.endswith(_GENERATED_SUFFIXES):
                old.unlink()

        for src in sorted(tmp_dir.iterdir()):
            if not src.name.endswith(_GENERATED_SUFFIXES):
                raise RuntimeError(f"unexpected protoc output: {src.name}")
            text = relativize_imports(src.read_text(encoding="utf-8"), modules)
            (out_dir / src.name).write_text(text, encoding="utf-8")

    (out_dir / "__init__.py").write_text(INIT_DOCSTRING, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT_DIR,
        help=f"output package directory (default: {DEFAULT_OUT_DIR})",
    )
    args = parser.parse_args(argv)
    out_dir: Path = args.out
    generate(out_dir)
    print(f"generated {out_dir}")


if __name__ == "__main__":
    main()
