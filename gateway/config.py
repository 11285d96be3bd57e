"""The gateway's one frozen configuration: a TOML file, overridden by GATEWAY_* variables.

Every scalar key ``[section] key`` can be set from the environment as
``GATEWAY_<SECTION>_<KEY>`` (upper case), e.g. ``GATEWAY_LND_HOST`` or
``GATEWAY_RATE_LIMIT_BURST``. Routes are only read from the file. ``gateway.sample.toml`` in
the repository documents every key; a test loads it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import stat
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.errors import ConfigError

log = logging.getLogger(__name__)


def _require(ok: bool, key: str, requirement: str, value: object) -> None:
    """Range checks of the dataclasses below; ``_build`` turns the ValueError into ConfigError."""
    if not ok:
        raise ValueError(f"{key} must be {requirement}, got {value!r}")


def _positive(number: float) -> bool:
    return math.isfinite(number) and number > 0


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: str = "127.0.0.1:8402"  # host:port the reverse proxy listens on
    upstream: str | None = None  # the backend URL the reverse proxy forwards paid requests to
    # Header carrying the verified token's facts upstream.
    token_header: str = "X-L402-Token"  # noqa: S105 - a header name, not a secret
    trust_forwarded_for: bool = False  # take the client address from X-Forwarded-For
    max_body_bytes: int = 10 * 1024 * 1024  # larger request bodies get 413
    workers: int = 1  # processes sharing the listening port (and the store)

    def __post_init__(self) -> None:
        _require(self.max_body_bytes >= 0, "max_body_bytes", ">= 0", self.max_body_bytes)
        _require(self.workers >= 1, "workers", ">= 1", self.workers)


@dataclass(frozen=True, slots=True)
class LndConfig:
    host: str = "127.0.0.1:10009"
    tls_cert: Path | None = None
    macaroon: Path | None = None  # file; or macaroon_hex
    macaroon_hex: str | None = field(default=None, repr=False)
    timeout: float = 30.0  # seconds per unary call

    def __post_init__(self) -> None:
        _require(_positive(self.timeout), "timeout", "a positive number", self.timeout)


@dataclass(frozen=True, slots=True)
class StoreConfig:
    url: str = "sqlite:gateway.db"  # sqlite:relative.db, sqlite:///abs.db, memory:


@dataclass(frozen=True, slots=True)
class L402Config:
    location: str = "l402-gateway"  # macaroon location field
    invoice_expiry: int = 600  # seconds a challenge's invoice can be paid
    strict_settlement: bool = False  # also require the invoice SETTLED (checked with LND)
    root_key_cache_seconds: float = 5.0  # how stale a revocation may be in other processes

    def __post_init__(self) -> None:
        _require(self.invoice_expiry >= 1, "invoice_expiry", ">= 1", self.invoice_expiry)
        seconds = self.root_key_cache_seconds
        _require(math.isfinite(seconds) and seconds >= 0, "root_key_cache_seconds", ">= 0", seconds)


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    challenges_per_second: float = 2.0  # refill rate of each client's bucket
    burst: int = 20  # bucket size: challenges a client may get at once
    max_clients: int = 100_000  # buckets kept; the least recently seen are dropped
    max_pending_invoices: int = 16  # invoices being created at once, over all clients

    def __post_init__(self) -> None:
        rate = self.challenges_per_second
        _require(_positive(rate), "challenges_per_second", "a positive number", rate)
        _require(self.burst >= 1, "burst", ">= 1", self.burst)
        _require(self.max_clients >= 1, "max_clients", ">= 1", self.max_clients)
        pending = self.max_pending_invoices
        _require(pending >= 1, "max_pending_invoices", ">= 1", pending)


@dataclass(frozen=True, slots=True)
class RouteConfig:
    pattern: str
    methods: tuple[str, ...] = ()
    price_msat: int | None = None
    price_function: str | None = None  # "package.module:function"
    free: bool = False
    lifetime: int = 3600
    service: str = "api"
    tier: int = 0
    capabilities: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.price_msat is not None:
            _require(self.price_msat > 0, "price_msat", "positive", self.price_msat)
        _require(self.lifetime > 0, "lifetime", "positive", self.lifetime)
        _require(self.tier >= 0, "tier", ">= 0", self.tier)


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = ServerConfig()
    lnd: LndConfig = LndConfig()
    store: StoreConfig = StoreConfig()
    l402: L402Config = L402Config()
    rate_limit: RateLimitConfig = RateLimitConfig()
    routes: tuple[RouteConfig, ...] = ()


_SECTIONS: dict[str, type[Any]] = {
    "server": ServerConfig,
    "lnd": LndConfig,
    "store": StoreConfig,
    "l402": L402Config,
    "rate_limit": RateLimitConfig,
}


def _convert(where: str, hint: Any, value: Any) -> Any:
    """Coerce a TOML or environment value to the field's declared type."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType):
        if value is None or (isinstance(value, str) and value == ""):
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _convert(where, inner, value)
    origin = typing.get_origin(hint)
    if origin is tuple:
        if isinstance(value, str):  # from the environment: comma-separated
            value = [item.strip() for item in value.split(",") if item.strip()]
        items = value
        if not isinstance(items, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_convert(where, args[0], item) for item in items)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {
            "1",
            "true",
            "yes",
            "on",
            "0",
            "false",
            "no",
            "off",
        }:
            return value.lower() in {"1", "true", "yes", "on"}
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint is Path:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a path, got {value!r}")
        if "\x00" in value:  # no file system takes it; expanduser() would raise ValueError
            raise ConfigError(f"{where}: a path must not contain NUL")
        try:
            return Path(value).expanduser()
        except RuntimeError:  # ~user that does not exist, or no home directory
            raise ConfigError(f"{where}: cannot expand the home directory in {value!r}") from None
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            converted = hint(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{where}: expected a whole number, got {value!r}")
        return converted
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {hint!r}")


def _build(cls: type[Any], where: str, values: Mapping[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
    kwargs = {key: _convert(f"{where}.{key}", hints[key], value) for key, value in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: {error}") from None


def load_config(
    path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Read ``path`` (if given), apply GATEWAY_* overrides, validate, return the Config."""
    environ = os.environ if environ is None else environ
    document: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as handle:
                document = tomllib.load(handle)
        except OSError as error:
            raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            # tomllib decodes the bytes itself: a file that is not UTF-8 is not TOML.
            raise ConfigError(f"{path}: invalid TOML: {error}") from None
    unknown = sorted(set(document) - set(_SECTIONS) - {"routes"})
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(unknown)}")

    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        values = document.get(name, {})
        if not isinstance(values, dict):
            raise ConfigError(f"[{name}] must be a table")
        values = dict(values)
        for f in dataclasses.fields(cls):
            variable = f"GATEWAY_{name.upper()}_{f.name.upper()}"
            if variable in environ:
                values[f.name] = environ[variable]
        sections[name] = _build(cls, f"[{name}]", values)

    raw_routes = document.get("routes", [])
    if not isinstance(raw_routes, list):
        raise ConfigError("routes must be an array of tables ([[routes]])")
    routes = []
    for index, raw in enumerate(raw_routes):
        where = f"routes[{index}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: must be a table ([[routes]])")
        if "pattern" not in raw:
            raise ConfigError(f"{where}: needs a pattern")
        route = _build(RouteConfig, where, raw)
        priced = (route.price_msat is not None) + (route.price_function is not None)
        if priced + route.free != 1:
            raise ConfigError(f"{where}: set exactly one of price_msat, price_function, free")
        routes.append(route)
    config = Config(**sections, routes=tuple(routes))
    if path is not None and "macaroon_hex" in document.get("lnd", {}):
        warn_if_readable_by_others(Path(path), "config file holding lnd.macaroon_hex")
    if config.lnd.macaroon is not None:
        warn_if_readable_by_others(config.lnd.macaroon, "LND macaroon")
    return config


def warn_if_readable_by_others(path: Path, what: str) -> None:
    """Log a warning when a file holding a secret is open to its group or everyone.

    A macaroon is a bearer credential for the node, so its file should be mode 0600 (LND
    itself writes most of its macaroons 0644). A file that cannot be read is left to the
    code that reads it to report.
    """
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return
    if mode & 0o077:
        log.warning("%s %s is readable by other users (mode %03o): chmod 600 it", what, path, mode)
