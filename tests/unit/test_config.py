"""Configuration: the shipped sample, GATEWAY_* overrides, and clear errors for bad input."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
from collections.abc import Mapping
from pathlib import Path

import pytest

from gateway.cli import build_pricing
from gateway.config import (
    Config,
    L402Config,
    LndConfig,
    RateLimitConfig,
    RouteConfig,
    ServerConfig,
    StoreConfig,
    load_config,
)
from gateway.errors import ConfigError
from gateway.pricing import PriceRequest

SAMPLE = Path(__file__).resolve().parents[2] / "gateway" / "gateway.sample.toml"
SECTIONS: dict[str, type[object]] = {
    "server": ServerConfig,
    "lnd": LndConfig,
    "store": StoreConfig,
    "l402": L402Config,
    "rate_limit": RateLimitConfig,
}


@pytest.fixture
def home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(text, encoding="utf-8")
    return path


def load_text(tmp_path: Path, text: str, environ: Mapping[str, str] | None = None) -> Config:
    return load_config(write(tmp_path, text), environ or {})


# --- the shipped sample ------------------------------------------------------------------


def test_sample_config_loads_every_section_and_key(home: Path) -> None:
    config = load_config(SAMPLE, environ={})
    assert config.server == ServerConfig(
        listen="127.0.0.1:8402",
        upstream="http://127.0.0.1:8080",
        token_header="X-L402-Token",
        trust_forwarded_for=False,
        max_body_bytes=10485760,
        workers=1,
    )
    assert config.lnd == LndConfig(
        host="127.0.0.1:10009",
        tls_cert=home / ".lnd" / "tls.cert",
        macaroon=home / ".lnd/data/chain/bitcoin/mainnet/gateway.macaroon",
        macaroon_hex=None,
        timeout=30.0,
    )
    assert config.store == StoreConfig(url="sqlite:gateway.db")
    assert config.l402 == L402Config(
        location="l402-gateway",
        invoice_expiry=600,
        strict_settlement=False,
        root_key_cache_seconds=5.0,
    )
    assert config.rate_limit == RateLimitConfig(
        challenges_per_second=2.0, burst=20, max_clients=100000
    )
    assert config.routes == (
        RouteConfig(pattern="/health", free=True),
        RouteConfig(
            pattern="/api/premium/*",
            methods=("GET",),
            price_msat=10000,
            lifetime=3600,
            service="premium",
            tier=0,
            capabilities=("read",),
        ),
        RouteConfig(
            pattern="/api/quote",
            price_function="gateway.examples:quote_price",
            service="quotes",
        ),
    )


def test_sample_config_documents_every_key() -> None:
    """Every field of every section appears in the sample (commented out or set)."""
    text = SAMPLE.read_text()
    for section, cls in SECTIONS.items():
        assert f"[{section}]" in text
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            assert f"{f.name} =" in text, f"[{section}] {f.name} is not in the sample"
    for f in dataclasses.fields(RouteConfig):
        assert f"{f.name} =" in text, f"routes {f.name} is not in the sample"


async def test_sample_price_function_exists_and_prices(home: Path) -> None:
    config = load_config(SAMPLE, environ={})
    spec = config.routes[2].price_function
    assert spec is not None
    module_name, _, attribute = spec.partition(":")
    function = getattr(importlib.import_module(module_name), attribute)
    assert asyncio.iscoroutinefunction(function)
    assert await function(PriceRequest("GET", "/api/quote", "n=3", ())) == 6000
    pricing = build_pricing(config)
    rule = pricing.match("GET", "/api/quote")
    assert rule is not None
    assert rule.price_function is function
    assert pricing.match("GET", "/health") is not None
    assert pricing.match("GET", "/nothing") is None


def test_no_file_gives_the_defaults() -> None:
    assert load_config(None, environ={}) == Config()
    assert Config().routes == ()


# --- GATEWAY_* overrides -----------------------------------------------------------------


def test_env_overrides_each_type(home: Path, tmp_path: Path) -> None:
    environ = {
        "GATEWAY_LND_HOST": "10.0.0.5:10009",  # str
        "GATEWAY_RATE_LIMIT_BURST": " 5 ",  # int
        "GATEWAY_LND_TIMEOUT": "2.5",  # float
        "GATEWAY_RATE_LIMIT_CHALLENGES_PER_SECOND": "3",  # float from an integer
        "GATEWAY_L402_STRICT_SETTLEMENT": "yes",  # bool
        "GATEWAY_SERVER_TRUST_FORWARDED_FOR": "On",
        "GATEWAY_LND_TLS_CERT": "~/certs/tls.cert",  # Path with ~
        "GATEWAY_SERVER_UPSTREAM": "",  # optional: empty means None
        "GATEWAY_LND_MACAROON": "",
        "GATEWAY_LND_MACAROON_HEX": "0201abcd",  # optional str
        "UNRELATED": "ignored",
    }
    config = load_config(SAMPLE, environ)
    assert config.lnd.host == "10.0.0.5:10009"
    assert config.rate_limit.burst == 5
    assert config.lnd.timeout == 2.5
    assert config.rate_limit.challenges_per_second == 3.0
    assert isinstance(config.rate_limit.challenges_per_second, float)
    assert config.l402.strict_settlement is True
    assert config.server.trust_forwarded_for is True
    assert config.lnd.tls_cert == home / "certs" / "tls.cert"
    assert config.server.upstream is None
    assert config.lnd.macaroon is None
    assert config.lnd.macaroon_hex == "0201abcd"
    # Everything not overridden still comes from the file.
    assert config.server.listen == "127.0.0.1:8402"
    assert len(config.routes) == 3


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1", True),
        ("true", True),
        ("TRUE", True),
        ("yes", True),
        ("on", True),
        ("0", False),
        ("false", False),
        ("No", False),
        ("off", False),
    ],
)
def test_env_bool_spellings(value: str, expected: bool) -> None:
    config = load_config(None, {"GATEWAY_L402_STRICT_SETTLEMENT": value})
    assert config.l402.strict_settlement is expected


def test_env_overrides_apply_without_a_file() -> None:
    config = load_config(
        None, {"GATEWAY_STORE_URL": "memory:", "GATEWAY_L402_INVOICE_EXPIRY": "60"}
    )
    assert config.store.url == "memory:"
    assert config.l402.invoice_expiry == 60


def test_env_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_STORE_URL", "memory:")
    assert load_config().store.url == "memory:"


def test_optional_paths_and_empty_strings_in_the_file(tmp_path: Path) -> None:
    config = load_text(tmp_path, '[lnd]\ntls_cert = ""\nmacaroon_hex = ""\n[server]\nupstream = ""')
    assert config.lnd.tls_cert is None
    assert config.lnd.macaroon_hex is None
    assert config.server.upstream is None


def test_tuples_from_lists_and_from_comma_separated_text(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        """
        [[routes]]
        pattern = "/a"
        price_msat = 1
        methods = ["GET", "POST"]
        capabilities = []

        [[routes]]
        pattern = "/b"
        free = true
        methods = "GET, POST,"
        capabilities = "read,write"
        """,
    )
    assert config.routes[0].methods == ("GET", "POST")
    assert config.routes[0].capabilities == ()
    assert config.routes[1].methods == ("GET", "POST")
    assert config.routes[1].capabilities == ("read", "write")


def test_tuple_from_empty_text_is_empty(tmp_path: Path) -> None:
    config = load_text(tmp_path, '[[routes]]\npattern = "/a"\nfree = true\nmethods = ""\n')
    assert config.routes[0].methods == ()


def test_integral_float_is_accepted_for_an_int(tmp_path: Path) -> None:
    assert load_text(tmp_path, "[l402]\ninvoice_expiry = 600.0").l402.invoice_expiry == 600


def test_secrets_stay_out_of_repr() -> None:
    config = load_config(None, {"GATEWAY_LND_MACAROON_HEX": "0201deadbeef"})
    assert "deadbeef" not in repr(config)


# --- errors ------------------------------------------------------------------------------


def expect_error(tmp_path: Path, text: str, *fragments: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_unknown_section(tmp_path: Path) -> None:
    expect_error(tmp_path, "[serverr]\nlisten = 'x'", "unknown section", "serverr")


def test_unknown_key(tmp_path: Path) -> None:
    expect_error(tmp_path, "[server]\nlissen = 'x'", "[server]", "unknown key", "lissen")
    expect_error(tmp_path, "[server.extra]\na = 1", "[server]", "unknown key", "extra")


def test_section_must_be_a_table(tmp_path: Path) -> None:
    expect_error(tmp_path, "server = 5", "[server] must be a table")
    expect_error(tmp_path, "[[server]]\nlisten = 'x'", "[server] must be a table")


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("[server]\nlisten = 5", ("[server].listen", "expected a string")),
        ("[server]\nmax_body_bytes = 'big'", ("[server].max_body_bytes", "expected a number")),
        ("[server]\nmax_body_bytes = true", ("[server].max_body_bytes", "expected a number")),
        ("[server]\nmax_body_bytes = 1.5", ("[server].max_body_bytes", "whole number")),
        ("[server]\nmax_body_bytes = inf", ("[server].max_body_bytes", "number")),
        ("[server]\nmax_body_bytes = nan", ("[server].max_body_bytes", "number")),
        ("[server]\ntrust_forwarded_for = 'maybe'", ("trust_forwarded_for", "true or false")),
        ("[server]\ntrust_forwarded_for = 1", ("trust_forwarded_for", "true or false")),
        ("[lnd]\ntls_cert = 5", ("[lnd].tls_cert", "expected a path")),
        ("[lnd]\ntls_cert = '~nosuchuser-l402/x'", ("[lnd].tls_cert", "home directory")),
        ("[lnd]\ntimeout = 'slow'", ("[lnd].timeout", "expected a number")),
        ("[lnd]\ntimeout = [1]", ("[lnd].timeout", "expected a number")),
        ("[store]\nurl = 1979-05-27", ("[store].url", "expected a string")),
        ("[[routes]]\npattern = '/a'\nfree = true\nmethods = 5", ("routes[0].methods", "list")),
        ("[[routes]]\npattern = '/a'\nfree = true\nmethods = [1]", ("routes[0].methods", "str")),
        ("[[routes]]\npattern = 5\nfree = true", ("routes[0].pattern", "expected a string")),
    ],
)
def test_wrong_types(tmp_path: Path, text: str, fragments: tuple[str, ...]) -> None:
    expect_error(tmp_path, text, *fragments)


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("[server]\nmax_body_bytes = -1", ("[server]", "max_body_bytes")),
        ("[server]\nworkers = 0", ("[server]", "workers")),
        ("[lnd]\ntimeout = 0", ("[lnd]", "timeout")),
        ("[lnd]\ntimeout = inf", ("[lnd]", "timeout")),
        ("[lnd]\ntimeout = nan", ("[lnd]", "timeout")),
        ("[l402]\ninvoice_expiry = 0", ("[l402]", "invoice_expiry")),
        ("[l402]\nroot_key_cache_seconds = -1", ("[l402]", "root_key_cache_seconds")),
        ("[rate_limit]\nchallenges_per_second = 0", ("[rate_limit]", "challenges_per_second")),
        ("[rate_limit]\nchallenges_per_second = nan", ("[rate_limit]", "challenges_per")),
        ("[rate_limit]\nburst = 0", ("[rate_limit]", "burst")),
        ("[rate_limit]\nmax_clients = 0", ("[rate_limit]", "max_clients")),
        ("[[routes]]\npattern = '/a'\nprice_msat = 0", ("routes[0]", "price_msat")),
        ("[[routes]]\npattern = '/a'\nprice_msat = 1\nlifetime = 0", ("routes[0]", "lifetime")),
        ("[[routes]]\npattern = '/a'\nprice_msat = 1\ntier = -1", ("routes[0]", "tier")),
    ],
)
def test_out_of_range_values(tmp_path: Path, text: str, fragments: tuple[str, ...]) -> None:
    expect_error(tmp_path, text, *fragments)


def test_env_errors_name_the_key() -> None:
    for variable, value, fragment in [
        ("GATEWAY_RATE_LIMIT_BURST", "five", "[rate_limit].burst"),
        ("GATEWAY_LND_TIMEOUT", "soon", "[lnd].timeout"),
        ("GATEWAY_L402_STRICT_SETTLEMENT", "maybe", "[l402].strict_settlement"),
        ("GATEWAY_RATE_LIMIT_BURST", "0", "burst"),
    ]:
        with pytest.raises(ConfigError) as info:
            load_config(None, {variable: value})
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    "route",
    [
        "pattern = '/a'",  # none
        "pattern = '/a'\nfree = false",  # none
        "pattern = '/a'\nprice_msat = 1\nfree = true",
        "pattern = '/a'\nprice_function = 'm:f'\nfree = true",
        "pattern = '/a'\nprice_msat = 1\nprice_function = 'm:f'",
        "pattern = '/a'\nprice_msat = 1\nprice_function = 'm:f'\nfree = true",
    ],
)
def test_route_needs_exactly_one_way_to_price(tmp_path: Path, route: str) -> None:
    expect_error(
        tmp_path,
        f"[[routes]]\npattern = '/ok'\nfree = true\n\n[[routes]]\n{route}",
        "routes[1]",
        "exactly one of price_msat, price_function, free",
    )


@pytest.mark.parametrize(
    "route",
    ["pattern = '/a'\nprice_msat = 1", "pattern = '/a'\nprice_function = 'm:f'", "free = true"],
)
def test_route_with_one_way_to_price_loads(tmp_path: Path, route: str) -> None:
    if "pattern" not in route:
        route = "pattern = '/a'\n" + route
    (loaded,) = load_text(tmp_path, f"[[routes]]\n{route}").routes
    assert loaded.pattern == "/a"


def test_route_missing_pattern(tmp_path: Path) -> None:
    expect_error(tmp_path, "[[routes]]\nprice_msat = 1", "routes[0]", "needs a pattern")


def test_routes_must_be_an_array_of_tables(tmp_path: Path) -> None:
    expect_error(tmp_path, "[routes]\npattern = '/a'", "routes must be an array of tables")
    expect_error(tmp_path, "routes = [1]", "routes[0]", "table")


def test_route_unknown_key(tmp_path: Path) -> None:
    expect_error(
        tmp_path, "[[routes]]\npattern = '/a'\nfree = true\nprice = 5", "routes[0]", "price"
    )


def test_bad_toml(tmp_path: Path) -> None:
    message = expect_error(tmp_path, "[server\nlisten = ", "invalid TOML")
    assert str(tmp_path) in message


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_bytes(b'[store]\nurl = "\xff\xfe"\n')
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(path, {})


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="cannot read config file") as info:
        load_config(missing, {})
    assert str(missing) in str(info.value)
    assert "No such file" in str(info.value)


def test_directory_instead_of_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path, {})


def test_config_is_frozen() -> None:
    config = load_config(None, {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server = ServerConfig()  # type: ignore[misc]
