"""Metrics and inbound liquidity of ``l402-gateway serve`` on real LND.

With ``[server] workers = 2``: requests spread over both workers (a fresh connection each),
and every scrape, on the metrics listener (the watching worker) or on the main listener's
path (either worker), shows the totals of both, equal to the store's and the clients' counts.
The multiprocess directory is private and gone after exit. Inbound liquidity equals what
``lncli listchannels`` (LND's own JSON) says: per active channel the remote balance less the
remote reserve; a route priced above it is warned about; without ``offchain:read`` it is
"unknown" and nothing fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from pathlib import Path

import aiohttp
import pytest

from gateway.examples import demo_api
from gateway.lnd.client import LndClient
from gateway.store.sqlite import SqliteStore
from regtest.network import Network
from regtest.processes import free_ports, wait_for_http
from tests.regtest.gateway_helpers import (
    bake_gateway_macaroon,
    l402_challenge,
    pay,
    serving,
    start_serve,
)
from tests.unit.test_metrics import _sample as metric

pytestmark = pytest.mark.regtest

READY = "/.well-known/l402/ready"


def _lncli_inbound_sat(network: Network) -> tuple[int, int]:
    """alice's inbound (total, largest channel) as LND's own JSON reports it, in sat."""
    listed = subprocess.run(  # noqa: S603 - the cached lncli binary and fixed arguments
        [*network.alice.lncli().split(), "listchannels", "--active_only"],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    )
    inbound = [
        max(0, int(c["remote_balance"]) - int(c["remote_constraints"]["chan_reserve_sat"]))
        for c in json.loads(listed.stdout)["channels"]
    ]
    return sum(inbound), max(inbound, default=0)


def _bake_invoices_only(network: Network, path: Path) -> Path:
    """A macaroon as the README recommended before liquidity: no offchain:read."""
    subprocess.run(  # noqa: S603 - the cached lncli binary and fixed arguments
        [
            *network.alice.lncli().split(),
            "bakemacaroon",
            "invoices:read",
            "invoices:write",
            f"--save_to={path}",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    path.chmod(0o600)
    return path


def _config(
    network: Network, tmp_path: Path, port: int, metrics_port: int, upstream: str, **options: str
) -> Path:
    node = network.alice
    macaroon = options.get("macaroon") or bake_gateway_macaroon(
        network, tmp_path / "gateway.macaroon"
    )
    config_file = tmp_path / "gateway.toml"
    config_file.write_text(
        f"""
[server]
listen = "127.0.0.1:{port}"
upstream = "{upstream}"
workers = {options.get("workers", "2")}
[lnd]
host = "{node.rpc_host}"
tls_cert = "{node.tls_cert}"
macaroon = "{macaroon}"
[store]
url = "sqlite://{tmp_path / "gateway.db"}"
[metrics]
listen = "127.0.0.1:{metrics_port}"
path = "/metrics"
[[routes]]
pattern = "/api/premium/*"
price_msat = 2000
service = "premium"
[[routes]]
pattern = "/api/huge"
price_msat = {options.get("huge_msat", "1000")}
service = "huge"
"""
    )
    return config_file


async def _fresh_get(url: str, **headers: str) -> tuple[int, aiohttp.ClientResponse, str]:
    # A connection of its own each time: the kernel spreads them over the workers.
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        return response.status, response, await response.text()


async def test_two_workers_one_scrape_sees_both_and_liquidity_matches_lncli(
    network: Network, bob: LndClient, tmp_path: Path
) -> None:
    total_sat, largest_sat = _lncli_inbound_sat(network)
    assert total_sat > 0  # the harness opened channels towards alice
    port, metrics_port = free_ports(2)
    url = f"http://127.0.0.1:{port}"
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    log = tmp_path / "serve.log"
    async with serving(demo_api()) as upstream:
        # A route priced over the whole inbound: warned about at start.
        config = _config(
            network, tmp_path, port, metrics_port, upstream, huge_msat=str((total_sat + 1) * 1000)
        )
        os.environ["TMPDIR"] = str(temporary)  # where serve makes its multiprocess directory
        try:
            process = start_serve(config, log)
        finally:
            del os.environ["TMPDIR"]
        try:
            await wait_for_http(url + READY, process, log, limit=60)
            (directory,) = temporary.glob("l402-metrics-*")
            # The other worker may answer ready before the watching one first measured the
            # liquidity: measured after a payment below, it would not be lncli's figure.
            async with asyncio.timeout(20):
                while True:  # not the metrics: a scrape would cache the store's figures
                    checks = json.loads((await _fresh_get(url + READY))[2])["checks"]
                    if checks.get("liquidity", {}).get("detail", "").startswith("inbound"):
                        break
                    await asyncio.sleep(0.1)
            challenges, paid = 12, 3
            authorizations = []
            for index in range(challenges):
                status, response, _ = await _fresh_get(url + "/api/premium/fortune")
                assert status == 402
                if index < paid:
                    authorizations.append(await pay(bob, network, l402_challenge(response.headers)))
            for authorization in authorizations:
                status, _, _ = await _fresh_get(
                    url + "/api/premium/fortune", Authorization=authorization
                )
                assert status == 200
            # Both workers wrote metrics of their own (one file set per process id).
            pids = {path.stem.rsplit("_", 1)[-1] for path in directory.glob("counter_*.db")}
            assert len(pids) == 2, sorted(path.name for path in directory.iterdir())

            store = await SqliteStore.open(tmp_path / "gateway.db")
            try:
                async with asyncio.timeout(10):
                    while True:
                        invoices = await store.list_invoices()
                        settled = sum(record.state.value == "SETTLED" for record in invoices)
                        if settled == paid:
                            break
                        await asyncio.sleep(0.05)
            finally:
                await store.close()
            assert len(invoices) == challenges

            scrapes = [(await _fresh_get(metrics_url))[2]]
            scrapes += [(await _fresh_get(url + "/metrics"))[2] for _ in range(6)]
            for text in scrapes:
                assert metric(text, "l402_challenges_issued_total", service="premium") == 12
                assert metric(text, "l402_paid_requests_total", service="premium") == paid
                assert metric(text, "l402_invoices_issued", service="premium") == challenges
                assert metric(text, "l402_invoices_settled", service="premium") == paid
                assert metric(text, "l402_received_msat_total", service="premium") == paid * 2000
                assert metric(text, "l402_lnd_request_duration_seconds_count", method="AddInvoice")
                # Set by the watching worker only, seen through either.
                assert metric(text, "l402_inbound_liquidity_known") == 1
                assert metric(text, "l402_inbound_liquidity_msat", scope="total") == (
                    total_sat * 1000
                )
                assert metric(text, "l402_inbound_liquidity_msat", scope="largest_channel") == (
                    largest_sat * 1000
                )
                assert metric(text, "l402_watcher_lag_seconds") >= 0

            status, _, body = await _fresh_get(metrics_url.replace("/metrics", "/ready"))
            assert status == 404  # the metrics listener serves nothing else
            ready = None
            for _ in range(10):  # the watching worker's readiness has the liquidity check
                status, _, body = await _fresh_get(url + READY)
                checks = json.loads(body)["checks"]
                if "liquidity" in checks:
                    ready = checks["liquidity"]
                    break
            assert ready is not None
            assert ready["ok"] is True
            assert f"inbound {total_sat} sat" in ready["detail"]
            assert f"largest {largest_sat} sat" in ready["detail"]
            assert "WARNING: 1 route(s)" in ready["detail"]
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0, log.read_text()
    text = log.read_text()
    assert "route /api/huge (huge): price" in text
    assert "cannot be paid" in text
    assert list(temporary.iterdir()) == []  # the multiprocess directory is removed at exit


async def test_without_offchain_read_liquidity_is_unknown_and_nothing_fails(
    network: Network, tmp_path: Path
) -> None:
    macaroon = _bake_invoices_only(network, tmp_path / "invoices-only.macaroon")
    port, metrics_port = free_ports(2)
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    async with serving(demo_api()) as upstream:
        config = _config(
            network, tmp_path, port, metrics_port, upstream, workers="1", macaroon=str(macaroon)
        )
        process = start_serve(config, log)
        try:
            await wait_for_http(url + READY, process, log, limit=60)
            async with asyncio.timeout(10):
                while True:
                    status, _, body = await _fresh_get(url + READY)
                    liquidity = json.loads(body)["checks"]["liquidity"]
                    if liquidity["detail"] != "not measured yet":
                        break
                    await asyncio.sleep(0.1)
            assert status == 200
            assert liquidity == {
                "ok": True,
                "detail": "unknown (ListChannels needs offchain:read)",
            }
            text = (await _fresh_get(f"http://127.0.0.1:{metrics_port}/metrics"))[2]
            assert metric(text, "l402_inbound_liquidity_known") == 0
            assert metric(
                text,
                "l402_lnd_errors_total",
                method="ListChannels",
                error="BackendPermissionDenied",
            )
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0, log.read_text()
