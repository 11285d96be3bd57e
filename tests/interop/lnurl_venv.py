"""lnbits' LNURL library (``lnurl`` on PyPI) in a virtualenv of its own, and the wallet script
(``lnurl_wallet.py``) run with it.

Why apart from the dev environment: ``lnurl`` 2.0.2 needs bip32 5.0.0, which pins coincurve
below 21, and the gateway needs coincurve 21 or newer; ``lnurl`` also wants Python < 3.13.
The venv is built once with ``python -m venv`` + pip and cached under ``build/``, keyed by
the pinned requirements and the Python version. Every version is pinned: unpinned, today's
bitstring 5 breaks the bolt11 2.2.0 that ``lnurl`` imports.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
WALLET = Path(__file__).with_name("lnurl_wallet.py")
CACHE = REPO / "build"
LNURL_VERSION = "2.0.2"
# ``pip freeze`` of a working install of lnurl==2.0.2 (``pip check`` clean).
REQUIREMENTS = (
    f"lnurl=={LNURL_VERSION}",
    "annotated-types==0.8.0",
    "anyio==4.16.0",
    "asn1crypto==1.5.1",
    "base58==2.1.1",
    "bech32==1.2.0",
    "bip32==5.0.0",
    "bitarray==3.12.3",
    "bitstring==4.4.0",
    "bolt11==2.2.0",
    "certifi==2026.10.19.post1",
    "cffi==2.1.1",
    "click==8.5.1",
    "coincurve==20.0.0",
    "h11==0.16.0",
    "httpcore==1.0.9",
    "httpx==0.28.1",
    "idna==3.20",
    "pycparser==3.12",
    "pycryptodomex==3.24.2",
    "pydantic==2.14.4",
    "pydantic_core==2.50.5",
    "socksio==1.0.0",
    "tibs==0.5.7",
    "typing-inspection==0.4.5",
    "typing_extensions==4.16.0",
)
PYTHONS = ("python3.12", "python3.11", "python3.10")  # lnurl 2.0.2: >=3.10, <3.13
INSTALL_TIMEOUT = 600.0


class LnurlVenvError(Exception):
    """The venv could not be built (no suitable Python, pip failed)."""


def _base_python() -> str:
    """The running interpreter when lnurl supports it (CI: 3.11), else one from PATH."""
    if (3, 10) <= sys.version_info[:2] < (3, 13):
        return sys.executable
    for name in PYTHONS:
        found = shutil.which(name)
        if found:
            return found
    raise LnurlVenvError(f"lnurl {LNURL_VERSION} needs Python 3.10 to 3.12: none of {PYTHONS}")


def _version(python: str) -> str:
    result = subprocess.run(  # noqa: S603 - an interpreter and fixed arguments
        [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return result.stdout.strip()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock: two test runs do not build the same venv at once."""
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def lnurl_python() -> Path:
    """The venv's interpreter, building the venv first when the cache lacks it."""
    base = _base_python()
    key = hashlib.sha256("\n".join(REQUIREMENTS).encode()).hexdigest()[:12]
    venv = CACHE / f"lnurl-{LNURL_VERSION}-py{_version(base)}-{key}"
    python = venv / "bin" / "python"
    done = venv / ".installed"
    if done.exists():
        return python
    CACHE.mkdir(exist_ok=True)
    with _locked(CACHE / f"{venv.name}.lock"):
        if done.exists():  # another run built it while this one waited
            return python
        shutil.rmtree(venv, ignore_errors=True)  # a build that was interrupted
        pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
        steps = (
            [base, "-m", "venv", str(venv)],
            [*pip, "install", "--quiet", "--no-deps", *REQUIREMENTS],
            [*pip, "check"],
        )
        for step in steps:
            try:
                subprocess.run(  # noqa: S603 - an interpreter, pip and pinned names
                    step, capture_output=True, text=True, check=True, timeout=INSTALL_TIMEOUT
                )
            except subprocess.CalledProcessError as error:
                output = (error.stdout + error.stderr)[-2000:]
                raise LnurlVenvError(f"{' '.join(step[:5])} failed: {error}\n{output}") from None
            except subprocess.TimeoutExpired as error:
                raise LnurlVenvError(f"{' '.join(step[:5])}: {error}") from None
        done.write_text("\n".join(REQUIREMENTS) + "\n")
    return python


class WalletError(Exception):
    """The wallet script refused something (exit 1): its message, from the library."""


@dataclass(frozen=True)
class LnurlWallet:
    """Runs ``lnurl_wallet.py`` with the venv's interpreter."""

    python: Path

    async def run(self, *args: str) -> dict[str, Any]:
        """The script's JSON output; ``WalletError`` with its message when it refuses."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        process = await asyncio.create_subprocess_exec(
            str(self.python),
            str(WALLET),
            *args,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
        if process.returncode == 1:
            raise WalletError(stderr.decode().strip())
        assert process.returncode == 0, f"exit {process.returncode}: {stderr.decode()}"
        document: dict[str, Any] = json.loads(stdout)
        return document

    async def pay_request(self, target: str, amount_msat: int, comment: str = "") -> dict[str, Any]:
        """``pay``: resolve ``target``, fetch an invoice for the amount; nothing is paid."""
        return await self.run("pay", target, str(amount_msat), comment)

    async def error(self, url: str) -> dict[str, Any]:
        """``error``: GET ``url``, whose answer must be an LNURL error; its status, reason."""
        return await self.run("error", url)


def require_lnurl_wallet() -> LnurlWallet:
    """The wallet; a venv that cannot be built is a skip here and a failure in CI."""
    try:
        return LnurlWallet(lnurl_python())
    except LnurlVenvError as error:
        if os.environ.get("CI"):
            pytest.fail(f"the lnurl venv is missing in CI: {error}")
        pytest.skip(str(error))
