"""Build pinned LND and btcd binaries from the Go module proxy, cached by version.

LND's go.mod carries ``replace`` directives, so ``go install lnd@version`` refuses it: the module
is downloaded, copied to a writable directory and built there as the main module. btcd is built
from inside that same module so it is exactly the version LND's go.mod pins.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

# The one place that names the LND release the project is tested against.
LND_VERSION = "v0.21.0-beta"
LND_MODULE = "github.com/lightningnetwork/lnd"
LND_BUILD_TAGS = "signrpc walletrpc chainrpc invoicesrpc routerrpc peersrpc"
BINARIES = ("lnd", "lncli", "btcd", "btcctl")


class BuildError(RuntimeError):
    """Go is missing or a build step failed."""


@dataclass(frozen=True, slots=True)
class Binaries:
    lnd: Path
    lncli: Path
    btcd: Path
    btcctl: Path


def cache_root() -> Path:
    """Where built binaries live; survives fresh clones so warm starts skip the build."""
    configured = os.environ.get("L402_REGTEST_CACHE")
    if configured:
        return Path(configured)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "l402-gateway" / "regtest"


def bin_dir(version: str = LND_VERSION) -> Path:
    return cache_root() / version / "bin"


def _go() -> str:
    go = shutil.which("go")
    if go is None:
        raise BuildError(
            "Go is not installed or not on PATH: the regtest network builds LND and btcd "
            "from source with the machine's Go toolchain"
        )
    return go


def _run(args: list[str], cwd: Path | None = None) -> str:
    result = subprocess.run(  # noqa: S603 - arguments are built here, not from input
        args, cwd=cwd, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise BuildError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result.stdout


def module_dir(module: str, version: str) -> Path:
    """Download (or find in the module cache) a Go module's source and return its directory."""
    out = _run([_go(), "mod", "download", "-json", f"{module}@{version}"])
    info = json.loads(out)
    if "Error" in info:
        raise BuildError(f"cannot download {module}@{version}: {info['Error']}")
    return Path(info["Dir"])


def lnd_module_dir(version: str = LND_VERSION) -> Path:
    return module_dir(LND_MODULE, version)


def writable_copy(source: Path, work: Path) -> None:
    """Copy a module out of the read-only module cache so it can be built as the main module."""
    shutil.copytree(source, work)
    for path in work.rglob("*"):
        path.chmod(path.stat().st_mode | 0o200)
    work.chmod(work.stat().st_mode | 0o200)


def log(message: str) -> None:
    print(f"[regtest] {message}", file=sys.stderr, flush=True)


def go_build(args: list[str], cwd: Path, what: str) -> None:
    """Run ``go build -v`` showing a heartbeat with the count of packages compiled so far."""
    started = time.monotonic()
    proc = subprocess.Popen(  # noqa: S603 - fixed go invocation
        [_go(), "build", "-v", "-trimpath", *args],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    lines: list[str] = []
    done = threading.Event()

    def heartbeat() -> None:
        while not done.wait(15):
            log(f"  building {what}: {len(lines)} packages, {time.monotonic() - started:.0f}s")

    ticker = threading.Thread(target=heartbeat, daemon=True)
    ticker.start()
    try:
        for line in proc.stderr:
            lines.append(line.rstrip())
        code = proc.wait()
    finally:
        done.set()
        ticker.join()
    if code != 0:
        tail = "\n".join(lines[-40:])
        raise BuildError(f"building {what} failed (exit {code}):\n{tail}")
    log(f"  built {what} in {time.monotonic() - started:.0f}s")


def ensure_binaries(version: str = LND_VERSION) -> Binaries:
    """Return the binaries for ``version``, building them first if the cache lacks them."""
    target = bin_dir(version)
    binaries = Binaries(*(target / name for name in BINARIES))
    marker = target / ".complete"
    if marker.is_file() and all(path.is_file() for path in (binaries.lnd, binaries.btcd)):
        return binaries

    log(f"building LND {version} and its btcd (cold cache: several minutes on 2 cores)")
    started = time.monotonic()
    source = lnd_module_dir(version)
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lnd-src-") as scratch:
        work = Path(scratch) / "lnd"
        writable_copy(source, work)
        go_build(
            [f"-tags={LND_BUILD_TAGS}", "-o", f"{target}/", "./cmd/lnd", "./cmd/lncli"],
            work,
            "lnd + lncli",
        )
        go_build(
            [
                "-o",
                f"{target}/",
                "github.com/btcsuite/btcd",
                "github.com/btcsuite/btcd/cmd/btcctl",
            ],
            work,
            "btcd + btcctl",
        )
    marker.write_text(f"{version}\n")
    log(f"LND {version} and btcd ready in {target} ({time.monotonic() - started:.0f}s)")
    return binaries
