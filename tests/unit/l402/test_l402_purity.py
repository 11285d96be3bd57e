"""gateway.l402 stays pure: standard library only, nothing from the rest of the gateway."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import gateway.l402

PACKAGE = Path(gateway.l402.__file__).parent
ALLOWED = {
    "__future__",
    "base64",
    "binascii",
    "collections.abc",
    "dataclasses",
    "enum",
    "fnmatch",
    "hashlib",
    "hmac",
    "re",
    "secrets",
    "struct",
}
FORBIDDEN = ("asyncio", "grpc", "aiohttp", "sqlite3", "socket", "threading")


def test_only_stdlib_and_relative_imports() -> None:
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level > 0:
                    assert node.level == 1, f"{path.name} imports outside gateway.l402"
                    continue
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name in ALLOWED, f"{path.name} imports {name}"


def test_importing_adds_no_forbidden_module() -> None:
    # Measured against `import gateway`, whose own imports are not this package's concern.
    probe = (
        "import json, sys; import gateway; before = set(sys.modules); "
        "import gateway.l402; print(json.dumps(sorted(set(sys.modules) - before)))"
    )
    result = subprocess.run(  # noqa: S603 - our own interpreter and module names
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    added = json.loads(result.stdout)
    leaked = [m for m in added for bad in FORBIDDEN if m == bad or m.startswith(bad + ".")]
    assert leaked == []
    assert [m for m in added if m.startswith("gateway.") and not m.startswith("gateway.l402")] == []


def test_public_api_is_exported() -> None:
    exported = set(gateway.l402.__all__)
    public = {name for name in dir(gateway.l402) if not name.startswith("_")}
    modules = {"caveats", "errors", "header", "identifier", "macaroon", "token", "annotations"}
    assert public - modules == exported
