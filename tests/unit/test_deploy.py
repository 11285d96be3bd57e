"""The deployment kit in deploy/ and the compose files, checked without Docker or systemd
(neither runs here): what they reference exists, the image is the lean non-root one, the
unit is hardened, the configuration loads."""

from __future__ import annotations

import fnmatch
import re
import shlex
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import load_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text(encoding="utf-8"))
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def dockerignored(relative: str) -> bool:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    return any(
        fnmatch.fnmatch(relative, p.rstrip("/"))
        or fnmatch.fnmatch(relative, p.rstrip("/") + "/*")
        or (p.startswith("**/") and fnmatch.fnmatch(Path(relative).name, p[3:].rstrip("/")))
        for p in patterns
    )


@pytest.mark.parametrize("dockerfile", [DEPLOY / "Dockerfile", ROOT / "regtest" / "Dockerfile"])
def test_dockerfiles_copy_what_exists_and_is_not_ignored(dockerfile: Path) -> None:
    for keyword, arguments in instructions(dockerfile):
        if keyword != "COPY" or arguments.startswith("--from"):
            continue
        *sources, _destination = shlex.split(arguments)
        for source in sources:
            if source == ".":
                continue
            assert (ROOT / source).exists(), f"{dockerfile}: COPY {source}"
            assert not dockerignored(source), f"{dockerfile}: COPY {source} is dockerignored"


def test_the_production_image_is_slim_non_root_and_without_dev_tools() -> None:
    steps = instructions(DEPLOY / "Dockerfile")
    final = steps[max(i for i, (k, _) in enumerate(steps) if k == "FROM") :]
    assert final[0][1].startswith("python:3.11-slim")
    users = [arguments for keyword, arguments in final if keyword == "USER"]
    assert users
    assert users[-1].split(":")[0] not in ("root", "0")
    text = (DEPLOY / "Dockerfile").read_text()
    for unwanted in ("[dev]", "golang", "go build", "make ", "regtest"):
        assert unwanted not in text, unwanted
    assert any(keyword == "HEALTHCHECK" for keyword, _ in final)
    # What the package needs to build: pyproject's readme and the package itself.
    copied = " ".join(arguments for keyword, arguments in steps if keyword == "COPY")
    for needed in ("pyproject.toml", "README.md", "gateway"):
        assert needed in copied


def test_secrets_and_stores_never_enter_a_build_context() -> None:
    for path in ("deploy/secrets/gateway.macaroon", "x/admin.macaroon", "gateway.db", ".venv"):
        assert dockerignored(path), path
    assert not dockerignored("gateway/cli/backup.py")


def unit_file(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit: section -> key -> every value it is given (keys repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, equals, value = line.partition("=")
        assert equals, f"{path}: {line!r} is no key=value"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_the_systemd_unit_is_hardened_and_keeps_the_macaroon_private() -> None:
    service = unit_file(DEPLOY / "l402-gateway.service")["Service"]
    assert service["ProtectSystem"] == ["strict"]
    assert service["StateDirectory"] == ["l402-gateway"]
    assert service["User"] != ["root"]
    assert service["NoNewPrivileges"] == ["yes"]
    assert service["CapabilityBoundingSet"] == [""]
    ((credential, source),) = [value.split(":") for value in service["LoadCredential"]]
    assert source == "/etc/l402-gateway/gateway.macaroon"
    assert f"GATEWAY_LND_MACAROON=%d/{credential}" in service["Environment"]
    assert "serve" in service["ExecStart"][0].split()
    backup = unit_file(DEPLOY / "l402-gateway-backup.service")["Service"]
    assert backup["User"] == service["User"]  # so each can open the files the other made
    assert " backup " in backup["ExecStart"][0]
    timer = unit_file(DEPLOY / "l402-gateway-backup.timer")
    assert timer["Timer"]["OnCalendar"]
    assert timer["Install"]["WantedBy"] == ["timers.target"]


def test_the_deploy_configuration_loads_and_trusts_its_proxy(tmp_path: Path) -> None:
    config = load_config(DEPLOY / "gateway.toml", {})
    assert config.server.trust_forwarded_for
    caddy = (DEPLOY / "Caddyfile").read_text()
    assert f"reverse_proxy {config.server.listen}" in caddy


def test_the_backup_the_unit_runs_is_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(DEPLOY / "gateway.toml"), "backup", "--help"])
    assert exit_info.value.code == 0
    assert "mode 0600" in capsys.readouterr().out


@pytest.mark.parametrize("compose", [ROOT / "docker-compose.yml", DEPLOY / "docker-compose.yml"])
def test_compose_files_build_from_dockerfiles_that_exist(compose: Path) -> None:
    text = compose.read_text()
    contexts = re.findall(r"^\s+context: (\S+)$", text, re.MULTILINE)
    dockerfiles = re.findall(r"^\s+dockerfile: (\S+)$", text, re.MULTILINE)
    assert contexts
    assert len(contexts) == len(dockerfiles)
    for context, dockerfile in zip(contexts, dockerfiles, strict=True):
        assert (compose.parent / context / dockerfile).is_file()
    assert "\t" not in text  # YAML allows no tabs for indentation


def test_the_production_compose_publishes_its_port_with_a_healthcheck() -> None:
    text = (DEPLOY / "docker-compose.yml").read_text()
    assert '"127.0.0.1:8402:8402"' in text
    assert re.search(r"^    healthcheck:\n      test: \[", text, re.MULTILINE)
    assert "./secrets:/etc/l402-gateway:ro" in text


def test_the_demo_compose_keeps_serving_on_its_published_port() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    # The flags tests/regtest/test_demo.py runs the demo with.
    assert "DEMO_ARGS=--listen 0.0.0.0:8402 --stay" in text
    assert '"127.0.0.1:8402:8402"' in text
    assert "http://127.0.0.1:8402/health" in text
