"""The configuration keys of the invoice sweeper, leadership and the PostgreSQL pool ([store])
and of the redeem and IPv6 rate limits ([rate_limit]): defaults, the shipped sample,
environment overrides and ranges."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import RateLimitConfig, StoreConfig, load_config
from gateway.errors import ConfigError
from tests.config_files import load_text

SAMPLE = Path(__file__).resolve().parents[2] / "gateway" / "gateway.sample.toml"


def test_defaults() -> None:
    store, limits = StoreConfig(), RateLimitConfig()
    assert (store.unpaid_retention, store.sweep_interval) == (86_400, 60.0)
    assert (store.leader_poll, store.leader_check, store.pool_size) == (1.0, 1.0, 10)
    assert (
        limits.ipv6_prefix,
        limits.redeems_per_second,
        limits.redeem_burst,
        limits.redeem_lookups_per_second,
    ) == (64, 4.0, 20, 10.0)


def test_the_sample_sets_the_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    config = load_config(SAMPLE, {})
    assert config.store.unpaid_retention == StoreConfig().unpaid_retention
    for key in ("sweep_interval", "leader_poll", "leader_check", "pool_size"):
        assert getattr(config.store, key) == getattr(StoreConfig(), key), key
    for key in ("ipv6_prefix", "redeems_per_second", "redeem_burst", "redeem_lookups_per_second"):
        assert getattr(config.rate_limit, key) == getattr(RateLimitConfig(), key), key


def test_environment_overrides() -> None:
    config = load_config(
        None,
        {
            "GATEWAY_STORE_UNPAID_RETENTION": "0",
            "GATEWAY_STORE_SWEEP_INTERVAL": "5",
            "GATEWAY_STORE_LEADER_POLL": "0.25",
            "GATEWAY_STORE_LEADER_CHECK": "2",
            "GATEWAY_STORE_POOL_SIZE": "4",
            "GATEWAY_RATE_LIMIT_IPV6_PREFIX": "48",
            "GATEWAY_RATE_LIMIT_REDEEMS_PER_SECOND": "1.5",
            "GATEWAY_RATE_LIMIT_REDEEM_BURST": "3",
            "GATEWAY_RATE_LIMIT_REDEEM_LOOKUPS_PER_SECOND": "2",
        },
    )
    assert (config.store.unpaid_retention, config.store.sweep_interval) == (0, 5.0)
    store = config.store
    assert (store.leader_poll, store.leader_check, store.pool_size) == (0.25, 2.0, 4)
    limits = config.rate_limit
    assert (limits.ipv6_prefix, limits.redeems_per_second, limits.redeem_burst) == (48, 1.5, 3)
    assert limits.redeem_lookups_per_second == 2.0


@pytest.mark.parametrize(
    "text",
    [
        "[store]\nunpaid_retention = -1",
        "[store]\nunpaid_retention = 315360001",
        "[store]\nunpaid_retention = 1e400",
        "[store]\nsweep_interval = 0",
        "[store]\nsweep_interval = 0.001",
        "[store]\nsweep_interval = 86401",
        "[store]\nsweep_interval = nan",
        "[store]\nleader_poll = 0.01",
        "[store]\nleader_poll = 61",
        "[store]\nleader_check = 0",
        "[store]\nleader_check = nan",
        "[store]\npool_size = 0",
        "[store]\npool_size = 101",
        "[rate_limit]\nipv6_prefix = 0",
        "[rate_limit]\nipv6_prefix = 129",
        "[rate_limit]\nredeems_per_second = 0",
        "[rate_limit]\nredeems_per_second = 5e-324",
        "[rate_limit]\nredeems_per_second = inf",
        "[rate_limit]\nredeem_burst = 0",
        "[rate_limit]\nredeem_burst = 1000001",
        "[rate_limit]\nredeem_lookups_per_second = 0",
        "[rate_limit]\nredeem_lookups_per_second = 1e7",
        "[rate_limit]\nredeem_lookups_per_second = nan",
    ],
)
def test_out_of_range_values_name_the_key(tmp_path: Path, text: str) -> None:
    key = text.split("\n")[1].split(" =")[0]
    with pytest.raises(ConfigError, match=key):
        load_text(tmp_path, text)


def test_the_range_ends_load(tmp_path: Path) -> None:
    load_text(
        tmp_path,
        "[store]\nunpaid_retention = 315360000\nsweep_interval = 0.01\n"
        "leader_poll = 0.05\nleader_check = 60\npool_size = 100\n"
        "[rate_limit]\nipv6_prefix = 128\nredeem_burst = 1000000\n"
        "redeems_per_second = 1000000\nredeem_lookups_per_second = 1.1574074074074073e-05\n",
    )
