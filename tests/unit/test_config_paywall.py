"""``[paywall]`` and the routes' page texts: loaded from the sample as documented, refused
when they could not be shown as text."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import PaywallConfig, load_config
from gateway.errors import ConfigError
from gateway.runtime import build_pricing
from tests.config_files import load_text, write_config

SAMPLE = Path(__file__).resolve().parents[2] / "gateway" / "gateway.sample.toml"


def test_the_samples_commented_paywall_keys_load(tmp_path: Path) -> None:
    text = SAMPLE.read_text()
    for key in ("fiat_rate_url", "fiat_rate_field", "fiat_refresh"):  # the other source
        assert f"# {key} = " in text, key
    for key in ("merchant", "title", "description", "fiat_currency", "fiat_per_btc"):
        assert text.count(f"# {key} = ") == 1, key
        text = text.replace(f"# {key} = ", f"{key} = ")
    config = load_config(write_config(tmp_path, text), environ={})
    assert config.paywall == PaywallConfig(
        merchant="Example Shop", fiat_currency="EUR", fiat_per_btc=90000.0
    )
    rule = build_pricing(config).match("GET", "/api/premium/x")
    assert rule is not None
    assert (rule.title, rule.description) == (
        "Premium articles",
        "Every premium article for an hour.",
    )
    # As shipped (commented out): no texts.
    plain = load_config(SAMPLE, environ={})
    assert plain.paywall == PaywallConfig()
    assert all(route.title == route.description == "" for route in plain.routes)


def test_a_fetched_fiat_rate(tmp_path: Path) -> None:
    toml = (
        '[paywall]\nfiat_currency = "EUR"\nfiat_rate_url = "https://r.example/p?key=K"\n'
        'fiat_rate_field = "bitcoin.eur"\nfiat_refresh = 60'
    )
    paywall = load_text(tmp_path, toml).paywall
    assert (paywall.fiat_rate_url, paywall.fiat_rate_field, paywall.fiat_refresh) == (
        "https://r.example/p?key=K",
        "bitcoin.eur",
        60.0,
    )


def test_the_merchant_from_the_environment() -> None:
    config = load_config(None, environ={"GATEWAY_PAYWALL_MERCHANT": "Shop"})
    assert config.paywall.merchant == "Shop"


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[paywall]\nmerchant = "a\\nb"', "merchant must be printable"),
        (f'[paywall]\nmerchant = "{"x" * 101}"', "merchant must be printable, at most 100"),
        ('[paywall]\nfiat_currency = "EUR"', "exactly one with fiat_currency"),
        ("[paywall]\nfiat_per_btc = 1.0", "none without"),
        (
            '[paywall]\nfiat_currency = "EUR"\nfiat_per_btc = 1.0\nfiat_rate_url = "https://x"',
            "exactly one",
        ),
        ('[paywall]\nfiat_currency = "EUR"\nfiat_per_btc = -1.0', "fiat_per_btc must be >= 0"),
        ('[paywall]\nfiat_currency = "E U"\nfiat_per_btc = 1.0', "fiat_currency must be"),
        (
            '[paywall]\nfiat_currency = "EUR"\nfiat_rate_url = "file:///etc/key?SECRET"',
            r"fiat_rate_url must be an http:// or https:// URL, got 'file://\.\.\.'",
        ),
        ('[paywall]\nfiat_currency = "EUR"\nfiat_per_btc = 1.0\nfiat_refresh = 1', "10 to 86400"),
        (
            '[[routes]]\npattern = "/a"\nprice_msat = 1\ntitle = "t\\u0007"',
            "title must be printable",
        ),
        (
            f'[[routes]]\npattern = "/a"\nprice_msat = 1\ndescription = "{"d" * 501}"',
            "description must be printable, at most 500",
        ),
    ],
)
def test_texts_that_cannot_be_shown_are_refused(tmp_path: Path, toml: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_text(tmp_path, toml)
