"""Coverage-guided fuzzing of the same parsers as ``test_fuzz.py``, with atheris (libFuzzer).

Optional: atheris is not a dependency. With it installed (``pip install atheris==3.0.0``, a
wheel for CPython 3.11 on x86-64 Linux)::

    .venv/bin/python -m tests.unit.fuzz_atheris authorization -runs=200000
    .venv/bin/python -m tests.unit.fuzz_atheris config -max_total_time=60 corpus/

Targets: authorization, challenge, macaroon, caveats, config. Any exception other than the
documented ones is a crash that libFuzzer reports with the input that caused it.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import atheris  # type: ignore[import-not-found,import-untyped,unused-ignore]

with atheris.instrument_imports():
    from gateway import l402
    from gateway.config import load_config
    from gateway.errors import ConfigError
    from gateway.runtime import build_pricing
    from tests.fakes import NOW
    from tests.unit.test_fuzz import MACAROON, PREIMAGE, ROOT_KEY, SCOPE

_CONFIG = Path(tempfile.mkdtemp()) / "gateway.toml"


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def authorization(data: bytes) -> None:
    try:
        # Up to three header values; the scheme is given, so the fuzzer starts at the grammar.
        values = ["L402 " + value for value in _text(data).split("\n", 2)]
        credential = l402.parse_authorization(values)
        if credential is not None:
            l402.verify_token(credential, ROOT_KEY, SCOPE, NOW)
    except l402.L402Error:
        return
    if credential is not None:  # verified: only the genuine token can get here
        assert credential.macaroons[0].signature == MACAROON.signature
        assert credential.preimage == PREIMAGE


def challenge(data: bytes) -> None:
    with contextlib.suppress(l402.L402Error):
        l402.parse_challenge(_text(data))


def macaroon(data: bytes) -> None:
    try:
        parsed = l402.Macaroon.deserialize(data)
    except l402.L402Error:
        return
    assert l402.Macaroon.deserialize(parsed.serialize()) == parsed


def caveats(data: bytes) -> None:
    minted = l402.mint(ROOT_KEY, MACAROON.identifier, data.split(b"\n"))
    with contextlib.suppress(l402.L402Error):
        l402.verify_token(l402.Credential("L402", (minted,), PREIMAGE), ROOT_KEY, SCOPE, NOW)


def config(data: bytes) -> None:
    _CONFIG.write_bytes(data)
    with contextlib.suppress(ConfigError):
        build_pricing(load_config(_CONFIG, {}))


TARGETS: dict[str, Callable[[bytes], None]] = {
    "authorization": authorization,
    "challenge": challenge,
    "macaroon": macaroon,
    "caveats": caveats,
    "config": config,
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(
            f"usage: python -m tests.unit.fuzz_atheris {{{','.join(TARGETS)}}} [libFuzzer args]"
        )
    target = TARGETS[sys.argv.pop(1)]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()
