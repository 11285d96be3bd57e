"""Secrets stay secret: the files holding them are private, and no log or output shows them.

The flow test runs the real thing on regtest (``l402-gateway -v serve`` with DEBUG logging,
``l402-gateway -v pay`` paying from bob's node, the browser paywall's redeem and cookie, ``-v
token revoke``), then searches everything those processes wrote for every secret it can
collect, in every spelling: root keys, preimages, LND macaroons, L402 macaroons and their
signatures, the paywall cookie.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import signal
import sqlite3
import stat
import sys
from pathlib import Path

import aiohttp
import pytest

from gateway import l402
from gateway.config import load_config
from gateway.web.paywall import REDEEM_PATH
from regtest.network import Network
from regtest.processes import wait_for_http
from tests.regtest import test_gateway_regtest
from tests.regtest.gateway_helpers import REPO, gateway_command, start_serve
from tests.regtest.test_gateway_regtest import ProxySetup

# The proxy in front of the demo API, as the reverse-proxy tests set it up.
upstream = test_gateway_regtest.upstream
proxy_setup = test_gateway_regtest.proxy_setup

PREMIUM = "/api/premium/fortune"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- the gateway warns about secret files others can read ----------------------------------


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o644, 0o604])
@pytest.mark.parametrize("holder", ["macaroon file", "config file with macaroon_hex"])
def test_warns_when_others_can_read_a_secret_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: int, holder: str
) -> None:
    config = tmp_path / "gateway.toml"
    if holder == "macaroon file":
        secret = tmp_path / "gateway.macaroon"
        secret.write_bytes(b"\x02macaroon")
        config.write_text(f'[lnd]\nmacaroon = "{secret}"\n')
    else:
        secret = config
        config.write_text('[lnd]\nmacaroon_hex = "0201"\n')
    secret.chmod(mode)
    with caplog.at_level(logging.WARNING, logger="gateway.config"):
        load_config(config, {})
    warnings = [r.getMessage() for r in caplog.records if r.name == "gateway.config"]
    if mode == 0o600:
        assert warnings == []
    else:
        what = (
            "LND macaroon" if holder == "macaroon file" else "config file holding lnd.macaroon_hex"
        )
        assert warnings == [
            f"{what} {secret} is readable by other users (mode {mode:03o}): chmod 600 it"
        ]


def test_no_warning_for_a_config_file_without_secrets(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[lnd]\nhost = "127.0.0.1:10009"\n')
    config.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="gateway.config"):
        load_config(config, {"GATEWAY_LND_MACAROON_HEX": "0201"})
    assert caplog.records == []


# --- the flow on regtest ----------------------------------------------------------------------


def _spellings(raw: bytes) -> set[str]:
    std = base64.b64encode(raw).decode()
    url = base64.urlsafe_b64encode(raw).decode()
    return {raw.hex(), raw.hex().upper(), std, std.rstrip("="), url, url.rstrip("=")}


def _macaroon_spellings(macaroon: bytes) -> set[str]:
    """The macaroon, and on its own its signature (the part that makes it a credential)."""
    return _spellings(macaroon) | _spellings(macaroon[-32:])


async def _pay(network: Network, url: str, cache: Path) -> tuple[str, str]:
    bob = network.bob
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env |= {
        "GATEWAY_PAYER_LND_HOST": bob.rpc_host,
        "GATEWAY_PAYER_LND_TLS_CERT": str(bob.tls_cert),
        "GATEWAY_PAYER_LND_MACAROON": str(bob.macaroon("admin")),
    }
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "gateway.cli", "-v", "pay", url),
        *("--max-cost=50", f"--token-cache={cache}", "--json"),
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    return stdout.decode(), stderr.decode()


@pytest.mark.regtest
async def test_no_secret_in_any_log_and_secret_files_are_private(
    network: Network, proxy_setup: ProxySetup, tmp_path: Path
) -> None:
    url, database, config_file, log = proxy_setup
    config = load_config(config_file, {})
    assert config.lnd.macaroon is not None
    cache = tmp_path / "cache" / "tokens.json"
    outputs: dict[str, str] = {}
    secrets: dict[str, set[str]] = {
        "LND macaroon": _macaroon_spellings(config.lnd.macaroon.read_bytes())
        | _macaroon_spellings(network.bob.macaroon("admin").read_bytes()),
    }
    process = start_serve(config_file, log, "-v")
    try:
        await wait_for_http(f"{url}/health", process, log)
        for run in ("pay", "pay again from the cache"):
            outputs[f"{run}: stdout"], outputs[f"{run}: stderr"] = await _pay(
                network, url + PREMIUM, cache
            )
        (token,) = json.loads(cache.read_text())["tokens"]
        macaroon = l402.decode_b64(token["macaroon"])
        secrets["L402 macaroon"] = _macaroon_spellings(macaroon.serialize())
        secrets["preimage"] = _spellings(bytes.fromhex(token["preimage"]))
        async with aiohttp.ClientSession() as session:
            # The browser's way: redeem the paid macaroon for the cookie, then use it.
            async with session.post(
                url + REDEEM_PATH, json={"macaroon": token["macaroon"]}
            ) as response:
                assert response.status == 200
                name, _, cookie = response.headers["Set-Cookie"].split(";", 1)[0].partition("=")
            secrets["paywall cookie"] = {cookie}
            sent = {"Cookie": f"{name}={cookie}"}  # its name is the grant's (L402-<service>)
            async with session.get(url + PREMIUM, headers=sent) as response:
                assert response.status == 200
            # A challenge nobody paid: its macaroon is still its requester's secret.
            async with session.get(url + PREMIUM) as response:
                assert response.status == 402
                unpaid = l402.decode_b64((await response.json())["macaroon"])
            secrets["L402 macaroon"] |= _macaroon_spellings(unpaid.serialize())
            with sqlite3.connect(database) as db:  # before the revocation deletes one
                keys = [row[0] for row in db.execute("SELECT root_key FROM root_keys")]
            assert len(keys) == 2
            secrets["root key"] = set().union(*(_spellings(key) for key in keys))

            token_id = l402.Identifier.decode(macaroon.identifier).token_id.hex()
            revoke = gateway_command(config_file, "-v", "token", "revoke", token_id)
            assert revoke.returncode == 0, revoke.stderr
            outputs["revoke: stdout"], outputs["revoke: stderr"] = revoke.stdout, revoke.stderr
            authorization = f"L402 {token['macaroon']}:{token['preimage']}"
            async with session.get(
                url + PREMIUM, headers={"Authorization": authorization}
            ) as response:
                assert response.status == 401
            async with session.get(url + PREMIUM, headers=sent) as response:
                assert response.status == 402
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()
    outputs["serve"] = log.read_text()

    # DEBUG logging was on everywhere, so there was plenty to search.
    for name in ("serve", "pay: stderr", "revoke: stderr"):
        assert " DEBUG " in outputs[name], name
    leaks = sorted(
        (kind, where)
        for kind, spellings in secrets.items()
        for where, text in outputs.items()
        if any(spelling in text for spelling in spellings)
    )
    assert leaks == []

    # Files holding secrets: the store (root keys) and the token cache (preimages).
    for path in [cache, *database.parent.glob(database.name + "*")]:
        assert _mode(path) == 0o600, path
    # The gateway's macaroon (baked by lncli, which writes 0644) is warned about unless private.
    warned = f"LND macaroon {config.lnd.macaroon} is readable by other users" in outputs["serve"]
    assert warned == bool(_mode(config.lnd.macaroon) & 0o077)
