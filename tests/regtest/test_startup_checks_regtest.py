"""The start-up probes of ``gateway.lnd.preflight`` against a real LND: the least-privilege
macaroon passes, a read-only, a write-only or another node's macaroon and another node's
certificate are each named in one line, the probes create no invoice, and ``l402-gateway
check`` says all of it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from gateway.lnd.client import LndClient
from gateway.lnd.connection import LndConnection, LndSettings
from gateway.lnd.preflight import check_lnd
from gateway.ports import Msat
from regtest.network import Network
from tests.regtest.gateway_helpers import bake_gateway_macaroon, config_toml, gateway_config

pytestmark = pytest.mark.regtest


def _settings(network: Network, macaroon: Path, tls_cert: Path | None = None) -> LndSettings:
    return LndSettings.from_files(
        network.alice.rpc_host,
        tls_cert or network.alice.tls_cert,
        macaroon_path=macaroon,
        timeout=10,
    )


def _bake(network: Network, path: Path, *permissions: str) -> Path:
    subprocess.run(  # noqa: S603 - the cached lncli binary and fixed arguments
        [*network.alice.lncli().split(), "bakemacaroon", *permissions, f"--save_to={path}"],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return path


async def test_the_gateway_macaroon_passes_and_the_probes_add_no_invoice(
    network: Network, alice: LndClient, tmp_path: Path
) -> None:
    before = await alice.add_invoice(Msat(1000), "before the check", expiry=600)
    found = await check_lnd(_settings(network, bake_gateway_macaroon(network, tmp_path / "g")))
    after = await alice.add_invoice(Msat(1000), "after the check", expiry=600)
    assert found.ok, found
    assert after.add_index == before.add_index + 1


async def test_a_missing_permission_is_named(network: Network, tmp_path: Path) -> None:
    readonly = await check_lnd(_settings(network, network.alice.macaroon("readonly")))
    assert readonly.problems == (
        "[lnd] the macaroon lacks invoices:write (bake one with invoices:read invoices:write)",
    )
    write_only = _bake(network, tmp_path / "w.macaroon", "invoices:write")
    found = await check_lnd(_settings(network, write_only))
    assert found.problems == (
        "[lnd] the macaroon lacks invoices:read (bake one with invoices:read invoices:write)",
    )


async def test_another_nodes_macaroon_or_certificate_is_named(network: Network) -> None:
    foreign = await check_lnd(_settings(network, network.bob.macaroon()))
    (problem,) = foreign.problems
    assert problem.startswith(f"[lnd] LND at {network.alice.rpc_host} does not accept the macaroon")
    wrong_cert = await check_lnd(
        _settings(network, network.alice.macaroon("invoice"), network.bob.tls_cert)
    )
    (problem,) = wrong_cert.problems
    assert problem.startswith(f"[lnd] TLS with {network.alice.rpc_host} failed")


async def test_check_macaroon_permissions_is_no_probe_for_the_gateway_macaroon(
    network: Network, tmp_path: Path
) -> None:
    # Why preflight probes invoices:read and invoices:write with calls of their own: LND's
    # CheckMacaroonPermissions needs macaroon:read, which the gateway's macaroon lacks.
    macaroon = bake_gateway_macaroon(network, tmp_path / "g")
    connection = LndConnection(_settings(network, macaroon))
    check = connection.channel.unary_unary(
        "/lnrpc.Lightning/CheckMacaroonPermissions",
        request_serializer=None,  # the request below is already encoded
        response_deserializer=None,
    )
    request = b"\x0a" + bytes([len(macaroon.read_bytes())]) + macaroon.read_bytes()
    try:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await check(request, metadata=connection.metadata, timeout=10)
    finally:
        await connection.close()
    assert "permission denied" in (refused.value.details() or "")


async def _check_command(path: Path) -> tuple[int | None, str, bytes]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "--config",
        str(path),
        "check",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode, out.decode(), err


async def test_check_command_on_a_working_node(network: Network, tmp_path: Path) -> None:
    config = gateway_config(network, tmp_path / "g.db", upstream="http://127.0.0.1:1")
    path = tmp_path / "gateway.toml"
    path.write_text(config_toml(config), encoding="utf-8")
    returncode, text, err = await _check_command(path)
    assert returncode == 3, (text, err)  # the upstream does not answer
    assert f"lnd: ok ({network.alice.rpc_host}: TLS, macaroon with invoices:read" in text
    assert "problem:" not in text
    assert "unreachable: upstream http://127.0.0.1:1 does not answer" in text
    assert "  /api/quote (any method): priced by gateway.examples:quote_price" in text
    assert b"ssl_transport_security" not in err
    # The gateway's macaroon has offchain:read: the channels towards alice are counted.
    (line,) = [ln for ln in text.splitlines() if ln.startswith("liquidity: ")]
    assert line.startswith("liquidity: inbound ")
    assert " active channel(s), largest " in line
    assert "warning:" not in text  # every route's price fits


async def test_check_command_without_offchain_read_says_liquidity_is_unknown(
    network: Network, tmp_path: Path
) -> None:
    macaroon = _bake(network, tmp_path / "m.macaroon", "invoices:read", "invoices:write")
    macaroon.chmod(0o600)
    config = gateway_config(network, tmp_path / "g.db", upstream="http://127.0.0.1:1")
    path = tmp_path / "gateway.toml"
    path.write_text(
        config_toml(config).replace(str(config.lnd.macaroon), str(macaroon)), encoding="utf-8"
    )
    returncode, text, err = await _check_command(path)
    assert returncode == 3, (text, err)  # only the upstream: liquidity is never a problem
    assert "problem:" not in text
    assert "liquidity: unknown (ListChannels needs offchain:read)" in text
