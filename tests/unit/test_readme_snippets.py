"""README code blocks: every Python block is a whole program that type-checks, every TOML
block is a configuration that loads. ``tests/regtest/test_readme_programs_regtest.py`` runs them.

A Python block that is deliberately not a program starts with the line ``# fragment``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from mypy import api as mypy_api

from gateway.config import load_config

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
FRAGMENT = "# fragment"
_FENCE = re.compile(r"^(?P<fence>`{3,}|~{3,})(?P<info>[^`\n]*)$")


@dataclass(frozen=True)
class Block:
    language: str
    line: int  # of the opening fence, 1-based
    text: str

    @property
    def name(self) -> str:
        return f"README.md:{self.line}"

    @property
    def is_fragment(self) -> bool:
        return self.text.startswith(FRAGMENT + "\n") or self.text.strip() == FRAGMENT


def readme_blocks(language: str) -> list[Block]:
    """The fenced blocks of README.md whose info string starts with ``language``."""
    blocks: list[Block] = []
    lines = README.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        fence, info = opening["fence"], opening["info"].strip()
        start = index
        index += 1
        body: list[str] = []
        # A closing fence: the same character, at least as long, nothing after it.
        while index < len(lines) and not (
            lines[index].startswith(fence[0] * len(fence)) and not lines[index].strip(fence[0])
        ):
            body.append(lines[index])
            index += 1
        index += 1
        words = info.split()
        if words and words[0].lower() == language:
            blocks.append(Block(language, start + 1, "\n".join(body) + "\n"))
    return blocks


def programs() -> list[Block]:
    return [block for block in readme_blocks("python") if not block.is_fragment]


def test_the_readme_has_python_programs_and_few_fragments() -> None:
    blocks = readme_blocks("python")
    assert len(programs()) >= 5
    assert len(blocks) - len(programs()) <= 2, "keep '# fragment' blocks few"


@pytest.mark.parametrize("block", programs(), ids=lambda block: block.name)
def test_each_python_block_is_a_program(block: Block) -> None:
    # A full compile (the parser alone accepts it): an `await` or `async with` outside an
    # async function is a SyntaxError here, as it is for `python file.py`.
    compile(block.text, block.name, "exec", dont_inherit=True)


def test_python_blocks_pass_mypy_strict(tmp_path: Path) -> None:
    files = []
    for number, block in enumerate(programs()):
        # A directory each: several blocks are an app.py.
        directory = tmp_path / f"block{number}"
        directory.mkdir()
        path = directory / f"readme_line_{block.line}.py"
        path.write_text(block.text, encoding="utf-8")
        files.append(str(path))
    out, err, status = mypy_api.run(
        [
            "--strict",
            "--no-incremental",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir=/dev/null",
            *files,
        ]
    )
    assert status == 0, out + err


def test_toml_blocks_are_configurations_that_load(tmp_path: Path) -> None:
    for block in readme_blocks("toml"):
        path = tmp_path / f"line{block.line}.toml"
        path.write_text(block.text, encoding="utf-8")
        load_config(path, {})  # raises ConfigError, naming the problem


def test_the_extraction_sees_fences_info_strings_and_fragments() -> None:
    blocks = readme_blocks("sh")
    assert blocks
    assert all(block.language == "sh" for block in blocks)
    assert Block("python", 1, "# fragment\nx\n").is_fragment
    assert not Block("python", 1, "# fragments are few\n").is_fragment


def test_lnd_client_and_settings_import_from_gateway_lnd() -> None:
    import gateway.lnd
    from gateway.lnd.client import LndClient
    from gateway.lnd.connection import LndSettings

    assert (gateway.lnd.LndClient, gateway.lnd.LndSettings) == (LndClient, LndSettings)
    with pytest.raises(AttributeError):
        _ = gateway.lnd.Nothing
