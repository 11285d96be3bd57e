"""The regtest network's state file: what `make up` saves and `status`/`down` load again."""

from __future__ import annotations

import json
from pathlib import Path

from regtest.network import STATE_FILE, Network, Node


def _node(name: str, **extra: str) -> Node:
    return Node(
        name,
        "127.0.0.1:10009",
        "127.0.0.1:9735",
        Path("/tmp") / name,  # noqa: S108 - a path in a state file, never opened
        "02" + "ab" * 32,
        Path("/tmp") / f"{name}.log",  # noqa: S108
        4242,
        **extra,
    )


def test_rest_address_is_saved_and_loaded(tmp_path: Path) -> None:
    bob = _node("bob", rest_host="127.0.0.1:8080")
    Network(tmp_path, "127.0.0.1:18334", {"bob": bob}, 1).save()
    assert json.loads((tmp_path / STATE_FILE).read_text())["nodes"]["bob"]["rest_host"] == (
        "127.0.0.1:8080"
    )
    assert Network.load(tmp_path).bob == bob


def test_a_state_file_from_before_rest_still_loads(tmp_path: Path) -> None:
    Network(tmp_path, "127.0.0.1:18334", {"bob": _node("bob")}, 1).save()
    state = json.loads((tmp_path / STATE_FILE).read_text())
    del state["nodes"]["bob"]["rest_host"]
    (tmp_path / STATE_FILE).write_text(json.dumps(state))
    loaded = Network.load(tmp_path)
    assert loaded.bob.rest_host == ""
    assert "rest -" in loaded.describe()
