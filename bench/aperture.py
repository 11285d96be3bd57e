"""Lightning Labs' Aperture, the reference L402 reverse proxy, as a benchmark baseline.

Built from the Go module proxy with the machine's Go like LND (its go.mod carries a ``replace``
directive, so it is built as the main module), cached by version, and started as a plain-HTTP
proxy with a SQLite database in front of a backend, issuing invoices on a regtest LND node.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path

from regtest.build import cache_root, go_build, log, module_dir, writable_copy
from regtest.network import Node

# The Aperture release the benchmark is measured against (its go.mod asks for Go 1.26).
APERTURE_VERSION = "v0.5.0"
APERTURE_MODULE = "github.com/lightninglabs/aperture"


def ensure_aperture(version: str = APERTURE_VERSION) -> Path:
    """Return the ``aperture`` binary for ``version``, building it if the cache lacks it."""
    binary = cache_root().parent / "aperture" / version / "aperture"
    if binary.is_file():
        return binary
    log(f"building Aperture {version} (cold cache: a few minutes on 2 cores)")
    started = time.monotonic()
    source = module_dir(APERTURE_MODULE, version)
    binary.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="aperture-src-") as scratch:
        work = Path(scratch) / "aperture"
        writable_copy(source, work)
        # Built into a temporary name and renamed, so a failed build leaves no binary behind.
        partial = binary.with_suffix(".partial")
        go_build(["-o", str(partial), "./cmd/aperture"], work, "aperture")
        partial.rename(binary)
    log(f"Aperture {version} ready in {binary} ({time.monotonic() - started:.0f}s)")
    return binary


def write_config(workdir: Path, backend_port: int, price_sat: int) -> Path:
    """The services list, the one part of the config that has no command-line flags.

    Written as JSON, which is YAML. Everything under ``/`` is priced except ``/health``.
    """
    config = workdir / "aperture.yaml"
    service = {
        "name": "premium",
        "hostregexp": ".*",
        "pathregexp": "^/.*$",
        "address": f"127.0.0.1:{backend_port}",
        "protocol": "http",
        "price": price_sat,
        "authwhitelistpaths": ["^/health$"],
    }
    config.write_text(json.dumps({"services": [service]}, indent=2) + "\n")
    return config


def start_aperture(
    binary: Path, config: Path, port: int, node: Node, workdir: Path, log_file: Path
) -> subprocess.Popen[bytes]:
    """Plain HTTP on loopback, SQLite, invoices on ``node`` with its invoice macaroon.

    Scalars go on the command line: the YAML reader takes lower-cased field names, not the
    flag names the sample config shows (``sqlite.dbfile`` in YAML is silently ignored).
    """
    basedir = workdir / "aperture"
    basedir.mkdir(parents=True, exist_ok=True)
    args = [
        str(binary),
        f"--configfile={config}",
        f"--basedir={basedir}",
        f"--listenaddr=127.0.0.1:{port}",
        "--insecure",
        "--dbbackend=sqlite",
        f"--sqlite.dbfile={basedir / 'aperture.db'}",
        "--authenticator.network=regtest",
        f"--authenticator.lndhost={node.rpc_host}",
        f"--authenticator.tlspath={node.tls_cert}",
        f"--authenticator.macdir={node.macaroon('invoice').parent}",
        # It logs every request to the console and again to a file of its own: keep one
        # copy (the console, captured in ``log_file``), as ours keeps one.
        "--logging.file.disable",
    ]
    with log_file.open("ab") as output:
        return subprocess.Popen(  # noqa: S603 - our own build with our own arguments
            args, cwd=basedir, stdout=output, stderr=subprocess.STDOUT
        )
