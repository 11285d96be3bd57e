"""What a mistyped or broken configuration gets at start-up instead of failing per request:
``[lnd] host``, price functions beside the config, ``[paths] unmatched``, the route table,
and ``l402-gateway check`` / ``serve`` against a node whose certificate is not the one given."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import itertools
import logging
import os
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway import errors, runtime
from gateway.cli import main
from gateway.config import Config, LndConfig, PathsConfig, RouteConfig, StoreConfig
from gateway.lnd.preflight import check_lnd
from gateway.ports import Msat
from gateway.pricing import BodyMethod, Pricing, Refused, Rule, Unmatched
from gateway.service import L402Service
from gateway.service.decisions import Allow, Deny, RequestInfo
from gateway.store.memory import MemoryStore
from tests.config_files import load_text, placeholder_lnd, write_config
from tests.fakes import FakeClock, FakeInvoiceBackend

_modules = itertools.count()


# --- [lnd] host --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host", ["https://127.0.0.1:10009", "127.0.0.1:10009/", "node/lnd:10009", "127.0.0.1"]
)
def test_lnd_host_must_be_host_and_port(tmp_path: Path, host: str) -> None:
    with pytest.raises(errors.ConfigError, match=r"\[lnd\].*host must be"):
        load_text(tmp_path, f'[lnd]\nhost = "{host}"')


@pytest.mark.parametrize("host", ["127.0.0.1:10009", "[::1]:10009", "lnd.example.com:443"])
def test_lnd_host_accepts_host_and_port(tmp_path: Path, host: str) -> None:
    assert load_text(tmp_path, f'[lnd]\nhost = "{host}"').lnd.host == host


# --- price functions beside the config ------------------------------------------------------


def _price_config(tmp_path: Path, source: str) -> Config:
    module = f"l402_test_prices_{next(_modules)}"  # fresh: imported modules are cached
    (tmp_path / f"{module}.py").write_text(source, encoding="utf-8")
    return load_text(tmp_path, f"[[routes]]\npattern = '/quote'\nprice_function = '{module}:quote'")


async def test_a_price_function_beside_the_config_is_imported_from_there(
    tmp_path: Path,
) -> None:
    config = _price_config(tmp_path, "async def quote(request):\n    return 7\n")
    (rule,) = runtime.build_pricing(config).rules
    assert rule.price_function is not None
    assert await rule.price_function(None) == 7  # type: ignore[arg-type]
    assert str(tmp_path) not in sys.path  # only while importing it


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("def quote(request):\n    return 7\n", "must be an 'async def' function"),
        ("async def quote():\n    return 7\n", "must take exactly one argument"),
        ("async def quote(request, other):\n    return 7\n", "must take exactly one argument"),
        ("quote = 5\n", "must be an 'async def' function"),
        ("raise RuntimeError('no prices today')\n", "raised RuntimeError: no prices today"),
        ("async def other(request):\n    return 7\n", "cannot load it"),
    ],
)
def test_an_unusable_price_function_is_refused_at_start(
    tmp_path: Path, source: str, message: str
) -> None:
    config = _price_config(tmp_path, source)
    with pytest.raises(errors.ConfigError, match=message) as refused:
        runtime.build_pricing(config)
    assert "\n" not in str(refused.value)


# --- [paths] unmatched and the route table ---------------------------------------------------


def test_unmatched_paths_are_refused_only_when_configured() -> None:
    rules = [Rule("/api/*", price_msat=Msat(5)), Rule("/free")]
    assert Pricing(rules).resolve("GET", "/apl/x") is None
    denying = Pricing(rules, unmatched=Unmatched.DENY)
    refused = denying.resolve("GET", "/apl/x")
    assert isinstance(refused, Refused)
    assert refused.status == 404
    assert denying.resolve("GET", "/free") is None  # a free route still matches
    assert denying.resolve("GET", "/FREE/") is None  # as does a reading of it
    assert denying.resolve("GET", "/api/x") == rules[0]


async def test_the_service_answers_an_unmatched_path_with_404_when_denying() -> None:
    clock = FakeClock()
    for unmatched, expected in ((Unmatched.FREE, Allow(None)), (Unmatched.DENY, None)):
        service = L402Service(
            pricing=Pricing([Rule("/api/*", price_msat=Msat(5))], unmatched=unmatched),
            backend=FakeInvoiceBackend(clock),
            store=MemoryStore(),
            clock=clock,
        )
        decision = await service.authorize(RequestInfo("GET", "/apl/typo", "10.0.0.1"))
        if expected is not None:
            assert decision == expected
        else:
            assert isinstance(decision, Deny)
            assert (decision.status, decision.reason) == (404, "no route matches this path")


def test_paths_unmatched_is_read_from_the_config(tmp_path: Path) -> None:
    config = load_text(tmp_path, '[paths]\nunmatched = "deny"')
    assert runtime.build_pricing(config).unmatched is Unmatched.DENY
    with pytest.raises(errors.ConfigError, match="unmatched must be free or deny"):
        load_text(tmp_path, '[paths]\nunmatched = "drop"')


@pytest.mark.parametrize(
    ("key", "reading"), [("extension", "/api/x.json"), ("script_prefix", "/index.php/api/x")]
)
def test_paths_readings_are_read_from_the_config(tmp_path: Path, key: str, reading: str) -> None:
    route = '[[routes]]\npattern = "/api/x"\nprice_msat = 1000\n'
    config = load_text(tmp_path, route)
    assert runtime.build_pricing(config).resolve("GET", reading) is not None
    config = load_text(tmp_path, f'[paths]\n{key} = "significant"\n' + route)
    assert runtime.build_pricing(config).resolve("GET", reading) is None
    with pytest.raises(errors.ConfigError, match=f"{key} must be any or significant"):
        load_text(tmp_path, f'[paths]\n{key} = "ignored"')


def test_paths_body_method_is_read_from_the_config(tmp_path: Path) -> None:
    assert runtime.build_pricing(load_text(tmp_path, "")).body_method is BodyMethod.ANY
    config = load_text(tmp_path, '[paths]\nbody_method = "ignored"')
    assert runtime.build_pricing(config).body_method is BodyMethod.IGNORED
    with pytest.raises(errors.ConfigError, match="body_method must be any or ignored"):
        load_text(tmp_path, '[paths]\nbody_method = "never"')


def test_route_table_says_what_each_path_costs() -> None:
    config = Config(
        paths=PathsConfig(unmatched="deny"),
        routes=(
            RouteConfig(pattern="/health", free=True),
            RouteConfig(pattern="/api/*", methods=("get",), price_msat=1000, service="premium"),
            RouteConfig(pattern="/quote", price_function="m:f", lifetime=90),
        ),
    )
    assert runtime.route_table(config) == [
        "/health (any method): free",
        "/api/* (GET): 1000 msat, service premium, token valid 1h",
        "/quote (any method): priced by m:f, service api, token valid 90s",
        "any other path: refused (404, [paths] unmatched = deny)",
    ]


# --- check and serve against a node --------------------------------------------------------


def _certificate(name: str, directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.cert", directory / f"{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest_asyncio.fixture
async def tls_node(tmp_path: Path) -> AsyncIterator[str]:
    """A TLS server (with a certificate of its own) where the node should be: host:port."""
    cert, key = _certificate("node", tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2"])

    async def hang_up(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0, ssl=context)
    yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    server.close()
    await server.wait_closed()


def _lnd_section(directory: Path, host: str) -> str:
    section = placeholder_lnd(directory)
    other, _ = _certificate("other", directory)
    (directory / "tls.cert").write_bytes(other.read_bytes())  # not the node's
    return f'{section}host = "{host}"\n'


async def test_check_lnd_names_a_certificate_that_is_not_the_nodes(
    tmp_path: Path, tls_node: str
) -> None:
    config = load_text(tmp_path, _lnd_section(tmp_path, tls_node))
    found = await check_lnd(runtime.lnd_settings(config), wait=5)
    assert found.unreachable is None
    (problem,) = found.problems
    assert problem.startswith(f"[lnd] TLS with {tls_node} failed: tls_cert is not")


async def test_check_lnd_says_a_node_that_is_down_is_unreachable(tmp_path: Path) -> None:
    reserved = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = reserved.sockets[0].getsockname()[1]
    reserved.close()
    await reserved.wait_closed()
    config = load_text(tmp_path, _lnd_section(tmp_path, f"127.0.0.1:{port}"))
    found = await check_lnd(runtime.lnd_settings(config), wait=5)
    assert found.problems == ()
    assert found.unreachable is not None
    assert "does not answer" in found.unreachable


def _run_in_thread(argv: list[str]) -> int:
    return main(argv)


async def test_check_command_reports_the_certificate_and_prints_the_routes(
    tmp_path: Path, tls_node: str, capsys: pytest.CaptureFixture[str]
) -> None:
    text = _lnd_section(tmp_path, tls_node) + "[[routes]]\npattern = '/api/*'\nprice_msat = 5"
    config = write_config(tmp_path, text)
    code = await asyncio.to_thread(_run_in_thread, ["--config", str(config), "check"])
    out = capsys.readouterr().out
    assert code == 2
    assert f"problem: [lnd] TLS with {tls_node} failed" in out
    assert "  /api/* (any method): 5 msat, service api, token valid 1h" in out
    assert "  any other path: free, passed on ([paths] unmatched = free)" in out


async def test_serve_refuses_to_start_with_the_wrong_certificate(
    tmp_path: Path,
    tls_node: str,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    text = '[server]\nupstream = "http://127.0.0.1:1"\nlisten = "127.0.0.1:0"\n'
    config = write_config(tmp_path, text + _lnd_section(tmp_path, tls_node), store="memory:")
    with caplog.at_level(logging.INFO):
        code = await asyncio.to_thread(_run_in_thread, ["--config", str(config), "serve"])
    assert code == 2
    assert "problem(s) with the LND node's settings" in capsys.readouterr().err
    assert f"[lnd] TLS with {tls_node} failed" in caplog.text


async def test_running_gateway_logs_the_route_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    backend = FakeInvoiceBackend(FakeClock())

    class FakeLnd:
        def __init__(self, _settings: object, **_options: object) -> None:
            pass

        async def __aenter__(self) -> FakeInvoiceBackend:
            return backend

        async def __aexit__(self, *_exc_info: object) -> None:
            return None

    monkeypatch.setattr(runtime, "LndClient", FakeLnd)
    cert, _ = _certificate("node", tmp_path)
    config = Config(
        lnd=LndConfig(tls_cert=cert, macaroon_hex="00"),
        store=StoreConfig(url="memory:"),
        routes=(RouteConfig(pattern="/api/*", price_msat=5),),
    )
    with caplog.at_level(logging.INFO, logger="gateway.runtime"):
        async with runtime.running_gateway(config):
            pass
    assert [r.getMessage() for r in caplog.records if r.name == "gateway.runtime"] == [
        "route /api/* (any method): 5 msat, service api, token valid 1h",
        "route any other path: free, passed on ([paths] unmatched = free)",
    ]


async def test_check_command_leaves_out_grpcs_raw_log_lines(tmp_path: Path, tls_node: str) -> None:
    config = write_config(tmp_path, _lnd_section(tmp_path, tls_node))
    environ = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "--config",
        str(config),
        "check",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environ,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2
    assert f"problem: [lnd] TLS with {tls_node} failed" in out.decode()
    assert err.decode() == ""  # gRPC's C core would log the failed handshake here
