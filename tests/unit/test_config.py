"""Configuration: the shipped sample, GATEWAY_* overrides, and clear errors for bad input."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import json
import logging
from pathlib import Path

import pytest

from gateway.config import (
    MAX_INVOICE_EXPIRY,
    MIN_CHALLENGES_PER_SECOND,
    Config,
    L402Config,
    LndConfig,
    RateLimitConfig,
    RouteConfig,
    ServerConfig,
    StoreConfig,
    listen_address,
    load_config,
    route_warnings,
    store_location,
)
from gateway.errors import ConfigError
from gateway.pricing import MAX_PRICE_MSAT, PriceRequest
from gateway.runtime import build_pricing
from gateway.service import RateLimiter
from tests.config_files import load_text
from tests.fakes import FakeClock

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
    # Not a number (int() refuses '²' and 5000 digits): one item, as documented.
    for items in ("%C2%B2", "9" * 5000, "x"):
        assert await function(PriceRequest("GET", "/api/quote", f"n={items}", ())) == 2000
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


# --- limits: refused at load, not when a request or LND trips over them -----------------------


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        # LND's AddInvoice refuses more than 100,000 BTC and an expiry over a year.
        ("[[routes]]\npattern = '/a'\nprice_msat = 10000000000000001", ("price_msat", "LND")),
        ("[[routes]]\npattern = '/a'\nprice_msat = 9223372036854775808", ("price_msat",)),
        ("[l402]\ninvoice_expiry = 31536001", ("invoice_expiry", "LND")),
        ("[l402]\ninvoice_expiry = 9223372036854775808", ("invoice_expiry",)),
        ("[[routes]]\npattern = '/a'\nprice_msat = 1\nlifetime = 315360001", ("lifetime",)),
        ("[[routes]]\npattern = '/a'\nfree = true\nlifetime = 9223372036854775807", ("lifetime",)),
        ("[l402]\nroot_key_cache_seconds = 3601", ("root_key_cache_seconds",)),
        ("[l402]\nroot_key_cache_seconds = 1e308", ("root_key_cache_seconds",)),
        ("[l402]\nroot_key_cache_seconds = inf", ("root_key_cache_seconds",)),
        ("[rate_limit]\nchallenges_per_second = 5e-324", ("challenges_per_second", "one a day")),
        ("[rate_limit]\nchallenges_per_second = 1e-6", ("challenges_per_second",)),
        ("[rate_limit]\nchallenges_per_second = 1e7", ("challenges_per_second",)),
        ("[rate_limit]\nburst = 1000001", ("burst",)),
    ],
)
def test_values_past_the_limits_are_refused(
    tmp_path: Path, text: str, fragments: tuple[str, ...]
) -> None:
    expect_error(tmp_path, text, *fragments)


def test_values_at_the_limits_load(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        """
        [l402]
        invoice_expiry = 31536000
        root_key_cache_seconds = 3600
        [rate_limit]
        challenges_per_second = 1.1574074074074073e-05
        burst = 1000000
        [[routes]]
        pattern = "/a"
        price_msat = 10000000000000000
        lifetime = 315360000
        """,
    )
    assert config.routes[0].price_msat == MAX_PRICE_MSAT == 10**16
    assert config.l402.invoice_expiry == MAX_INVOICE_EXPIRY


def test_a_huge_number_from_the_environment_is_refused_not_overflowed() -> None:
    with pytest.raises(ConfigError, match="burst"):
        load_config(None, {"GATEWAY_RATE_LIMIT_BURST": "1" + "0" * 400})


def test_the_slowest_rate_allowed_gives_a_finite_wait() -> None:
    """5e-324 challenges a second made the 429's wait infinite, and math.ceil() raise."""
    clock = FakeClock()
    limiter = RateLimiter(MIN_CHALLENGES_PER_SECOND, 1, 10, clock)
    assert limiter.acquire("client") == 0
    assert limiter.acquire("client") == pytest.approx(86400)


# --- [server] ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "",
        "X L402",
        "X-L402-Token:",
        "X_L402_Token",  # CGI backends read it as X-L402-Token
        "X-L402-Token\r\nX-Admin: 1",
        "T\u00f8ken",
        "Content-Length",
        "content-type",
        "Transfer-Encoding",
        "Host",
        "Connection",
        "Keep-Alive",
        "Upgrade",
        "TE",
        "Authorization",
        "Proxy-Authorization",
        "Cookie",
        "X-Forwarded-For",
        "X-Forwarded-Host",
        "Forwarded",
        "X-Real-IP",
        "X-HTTP-Method-Override",
        "Sec-Fetch-Site",
        "Accept-Encoding",
    ],
)
def test_token_header_must_be_a_header_of_its_own(tmp_path: Path, name: str) -> None:
    expect_error(tmp_path, f"[server]\ntoken_header = {toml_string(name)}", "token_header")


@pytest.mark.parametrize("name", ["X-L402-Token", "X-Paid-Token", "L402-Facts"])
def test_ordinary_token_headers_load(tmp_path: Path, name: str) -> None:
    assert load_text(tmp_path, f"[server]\ntoken_header = '{name}'").server.token_header == name


@pytest.mark.parametrize(
    ("upstream", "fragment"),
    [
        ("ftp://backend/", "http:// or https://"),
        ("127.0.0.1:8080", "http:// or https://"),
        ("backend", "http:// or https://"),
        ("http://", "with a host"),
        ("http:///path", "with a host"),
        ("http://backend:99999", "invalid port"),
        ("http://backend:port", "invalid port"),
        ("http://backend/api?key=1", "query or fragment"),
        ("http://backend/api#top", "query or fragment"),
        ("http://back end/", "blanks"),
        ("http://backend/\n", "blanks"),
    ],
)
def test_upstream_must_be_an_http_url_with_a_host(
    tmp_path: Path, upstream: str, fragment: str
) -> None:
    expect_error(tmp_path, f"[server]\nupstream = {toml_string(upstream)}", "upstream", fragment)


def test_upstream_credentials_are_refused_without_repeating_them(tmp_path: Path) -> None:
    message = expect_error(
        tmp_path, "[server]\nupstream = 'https://admin:hunter2@backend/'", "credentials"
    )
    assert "hunter2" not in message


@pytest.mark.parametrize(
    "upstream", ["http://127.0.0.1:8080", "HTTPS://backend.internal/api/", "http://[::1]:8080"]
)
def test_good_upstreams_load(tmp_path: Path, upstream: str) -> None:
    assert load_text(tmp_path, f"[server]\nupstream = '{upstream}'").server.upstream == upstream


@pytest.mark.parametrize(
    ("listen", "fragment"),
    [
        ("8402", "host:port"),
        ("localhost", "host:port"),
        ("127.0.0.1:", "host:port"),
        ("127.0.0.1:http", "host:port"),
        ("127.0.0.1:\uff18\uff14\uff10\uff12", "host:port"),  # full-width digits
        ("127.0.0.1:-1", "host:port"),
        (":8402", "with a host"),
        ("127.0.0.1:65536", "0 to 65535"),
        ("127.0.0.1:99999999999999999999", "0 to 65535"),
        ("::1:8402", "brackets"),
        ("[]:8402", "brackets"),
        ("[nothost]:8402", "brackets"),
        ("local host:8402", "brackets"),
    ],
)
def test_listen_is_checked_at_load(tmp_path: Path, listen: str, fragment: str) -> None:
    expect_error(tmp_path, f"[server]\nlisten = '{listen}'", "[server]", "listen", fragment)


@pytest.mark.parametrize(
    ("listen", "address"),
    [
        ("127.0.0.1:8402", ("127.0.0.1", 8402)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),  # noqa: S104 - a test value
        ("localhost:0", ("localhost", 0)),
        ("[::1]:8402", ("::1", 8402)),
        ("[::]:65535", ("::", 65535)),
        ("[fe80::1%eth0]:8402", ("fe80::1%eth0", 8402)),
    ],
)
def test_listen_address(tmp_path: Path, listen: str, address: tuple[str, int]) -> None:
    assert load_text(tmp_path, f"[server]\nlisten = '{listen}'").server.listen == listen
    assert listen_address(listen) == address


# --- [store] -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("postgresql:gateway:hunter2@db/gateway", "use postgresql://user@host"),
        ("redis://:hunter2@localhost", "'redis' is not supported"),
        ("", "must name a store"),
        ("   ", "must name a store"),
        ("gateway.db", "no scheme"),
        ("sqlite:", "names no file"),
        ("sqlite:///", "use sqlite:///absolute"),
        ("sqlite://host/gateway.db", "use sqlite:///absolute"),
        ("memory:extra", "takes nothing"),
    ],
)
def test_unsupported_store_urls_are_refused_at_load(
    tmp_path: Path, url: str, fragment: str
) -> None:
    message = expect_error(tmp_path, f"[store]\nurl = '{url}'", "[store]", fragment)
    assert "sqlite:///absolute/path.db" in message or "memory:" in message
    assert "hunter2" not in message


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("postgresql://gateway:hunter2/x@db:5432/l402", "'@' that does not end"),
        ("postgresql://gateway:hunter2?x@db/l402", "'@' that does not end"),
        ("postgresql://gateway:hunter2@x@db/l402", "'@' that does not end"),
        ("postgresql://gateway:hunter2#x@db/l402", "'#'"),
        ("postgresql://gateway:hunter2[@db/l402", "not a valid URL"),
        ("postgresql://gateway@db:hunter2/l402", "port is not a number"),
        ("postgresql://gateway@db:5432,db2:hunter2/l402", "port is not a number"),
        ("postgresql://db/l402?user=gateway:hunter2@x", "'@' that does not end"),
    ],
)
def test_a_postgres_url_the_driver_would_misread_is_refused_without_its_secret(
    url: str, problem: str
) -> None:
    with pytest.raises(ValueError, match="percent-encode special characters") as refused:
        store_location(url)
    assert problem in str(refused.value)
    with pytest.raises(ConfigError) as failed:
        load_config(None, {"GATEWAY_STORE_URL": url})
    for message in (str(refused.value), str(failed.value)):
        assert "hunter2" not in message
        assert "gateway" not in message.replace("l402-gateway", "")  # nor the user
        assert "PGPASSWORD" in message


def test_a_store_url_stays_out_of_repr() -> None:
    config = load_config(None, {"GATEWAY_STORE_URL": "postgresql://gateway:hunter2@db/l402"})
    assert "hunter2" not in repr(config)


def test_an_empty_store_url_from_the_environment_is_refused() -> None:
    with pytest.raises(ConfigError, match="must name a store"):
        load_config(None, {"GATEWAY_STORE_URL": ""})


@pytest.mark.parametrize(
    ("url", "location"),
    [
        ("memory:", ("memory", None)),
        ("MEMORY:", ("memory", None)),
        ("sqlite:gateway.db", ("sqlite", "gateway.db")),
        ("sqlite:data/gateway.db", ("sqlite", "data/gateway.db")),
        ("sqlite:///var/lib/l402/gateway.db", ("sqlite", "/var/lib/l402/gateway.db")),
        ("postgresql://gateway@db/l402", ("postgresql", "postgresql://gateway@db/l402")),
        ("postgres://db:5433/l402", ("postgresql", "postgres://db:5433/l402")),
        *(
            (url, ("postgresql", url))
            for url in (
                "postgresql://gateway:p%2F%40ss@db/l402?sslmode=require",  # percent-encoded
                "postgresql:///l402?host=/run/postgresql",  # a unix socket
                "postgresql://gateway@db1:5432,db2:5433/l402",  # asyncpg's host list
                "postgresql://gateway@[::1]:5432/l402",
                "postgresql:///l402",  # the host from PGHOST, or the local socket
                # an "@" in a parameter, after the user part (a systemd template's credential)
                "postgresql://gateway@db/l402?sslrootcert=/run/credentials/gw@1.service/ca.pem",
            )
        ),
    ],
)
def test_store_location(url: str, location: tuple[str, str | None]) -> None:
    assert store_location(url) == location
    assert load_config(None, {"GATEWAY_STORE_URL": url}).store.url == url


# --- route warnings: legal, but not what the operator meant ---------------------------------


def priced(pattern: str, *methods: str) -> RouteConfig:
    return RouteConfig(pattern=pattern, methods=methods, price_msat=1_000)


def free(pattern: str, *methods: str) -> RouteConfig:
    return RouteConfig(pattern=pattern, methods=methods, free=True)


@pytest.mark.parametrize(
    ("routes", "fragments"),
    [
        ([priced("/a", "GETT")], ("routes[0] '/a'", "'GETT' is not a standard HTTP method")),
        ([priced("/a", "GET", "psot")], ("'PSOT' is not a standard",)),
        ([priced("/file[1].txt")], ("routes[0]", "character class")),
        ([priced("/a/ ")], ("blanks",)),
        ([priced(" /a")], ("blanks",)),
        ([free("/api/x"), priced("/api/x")], ("routes[1] '/api/x' can never match", "(free)")),
        ([free("/api/*"), priced("/api/premium")], ("routes[1]", "routes[0] '/api/*' (free)")),
        ([free("/api/*"), priced("/api/premium/*")], ("routes[1]", "never match")),
        ([free("/*"), priced("/a?c")], ("routes[1]", "never match")),
        ([free("/a/*.json"), priced("/a/b.json")], ("routes[1]", "never match")),
        ([priced("/*"), priced("/a")], ("routes[1]", "(priced)")),
        ([priced("/*"), free("/health")], ("routes[1]", "(priced)")),
        ([free("/a", "GET"), priced("/a", "HEAD")], ("routes[1]", "never match")),
        ([free("/a", "GET", "POST"), priced("/a", "post")], ("routes[1]", "never match")),
        ([free("/a"), free("/b"), priced("/a")], ("routes[2]", "routes[0]")),
    ],
)
def test_route_warnings(routes: list[RouteConfig], fragments: tuple[str, ...]) -> None:
    (warning,) = route_warnings(routes)
    for fragment in fragments:
        assert fragment in warning, warning


@pytest.mark.parametrize(
    "routes",
    [
        [priced("/a", "get", "PATCH", "PROPFIND")],
        [free("/health"), priced("/*")],  # the catch-all still prices everything else
        [free("/a", "GET"), priced("/a", "POST")],  # different methods
        [free("/a", "HEAD"), priced("/a", "GET")],  # HEAD does not cover GET
        [free("/a", "GET"), priced("/a")],  # the priced rule still takes POST
        [free("/api/*"), priced("/apix")],
        [free("/api/*/free"), priced("/api/x/*")],  # overlapping, not covering
        [free("/a?"), priced("/a*")],
    ],
)
def test_no_route_warnings_for_rules_that_can_match(routes: list[RouteConfig]) -> None:
    assert route_warnings(routes) == []


def test_load_config_logs_each_route_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = """
        [[routes]]
        pattern = "/api/*"
        free = true
        [[routes]]
        pattern = "/api/premium"
        methods = ["GETT"]
        price_msat = 1000
    """
    with caplog.at_level(logging.WARNING, logger="gateway.config"):
        load_text(tmp_path, text)
    messages = [r.getMessage() for r in caplog.records if r.name == "gateway.config"]
    assert len(messages) == 2
    assert "'GETT' is not a standard HTTP method" in messages[0]
    assert "routes[1] '/api/premium' can never match" in messages[1]
    assert all("\n" not in message for message in messages)


def test_the_sample_config_gives_no_warnings(home: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="gateway.config"):
        load_config(SAMPLE, environ={})
    assert [r for r in caplog.records if r.name == "gateway.config"] == []


def toml_string(value: str) -> str:
    """``value`` as a TOML basic string (JSON's escapes are TOML's)."""
    return json.dumps(value)
