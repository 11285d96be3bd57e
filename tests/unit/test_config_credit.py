"""The configuration of prepaid credit: the route keys (``billing = "credit"`` and its
amounts), the ``[credit]`` section, what ``build_pricing`` makes of them and what the route
table says."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import runtime
from gateway.config import Config, CreditConfig, RouteConfig, load_config
from gateway.errors import ConfigError
from gateway.ports import Msat
from gateway.pricing import MAX_PRICE_MSAT, CreditTerms
from tests.config_files import load_text

SAMPLE = Path(__file__).resolve().parents[2] / "gateway" / "gateway.sample.toml"
CREDIT_ROUTE = '[[routes]]\npattern = "/gen"\nprice_msat = 1000\nbilling = "credit"\n'


def test_a_credit_route_has_defaults_from_its_price(tmp_path: Path) -> None:
    config = load_text(tmp_path, CREDIT_ROUTE)
    (route,) = config.routes
    assert (route.billing, route.metered, route.charge_failures) == ("credit", False, False)
    assert route.credit_amounts() == (100_000, 1_000, 10_000_000)
    (rule,) = runtime.build_pricing(config).rules
    assert rule.credit == CreditTerms(Msat(100_000), Msat(1_000), Msat(10_000_000))
    assert rule.price_msat == 1_000


def test_the_credit_keys_are_read(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        CREDIT_ROUTE + "credit_msat = 20000\ncredit_min_msat = 5000\ncredit_max_msat = 90000\n"
        "metered = true\ncharge_failures = true\n",
    )
    (rule,) = runtime.build_pricing(config).rules
    assert rule.credit == CreditTerms(
        Msat(20_000), Msat(5_000), Msat(90_000), metered=True, charge_failures=True
    )


def test_a_price_function_route_buys_credit_msat(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        '[[routes]]\npattern = "/q"\nprice_function = "gateway.examples:quote_price"\n'
        'billing = "credit"\ncredit_msat = 30000\n',
    )
    (route,) = config.routes
    assert route.credit_amounts() == (30_000, 30_000, 3_000_000)


def test_a_token_route_has_no_credit(tmp_path: Path) -> None:
    config = load_text(tmp_path, '[[routes]]\npattern = "/t"\nprice_msat = 1000\n')
    (rule,) = runtime.build_pricing(config).rules
    assert config.routes[0].billing == "token"
    assert rule.credit is None


def test_defaults_are_capped_at_the_largest_invoice() -> None:
    route = RouteConfig(pattern="/big", price_msat=MAX_PRICE_MSAT // 10, billing="credit")
    assert route.credit_amounts() == (MAX_PRICE_MSAT, MAX_PRICE_MSAT // 10, MAX_PRICE_MSAT)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ('billing = "prepaid"', "billing must be token or credit, got 'prepaid'"),
        ("credit_msat = 5000", 'credit_msat apply only to a route with billing = "credit"'),
        (
            "credit_min_msat = 1\nmetered = true",
            'credit_min_msat, metered apply only to a route with billing = "credit"',
        ),
        ("credit_max_msat = 9", "credit_max_msat apply only"),
        ("charge_failures = true", "charge_failures apply only"),
        ('billing = "credit"\ncredit_msat = 500', "credit_msat must be at least price_msat"),
        (
            'billing = "credit"\ncredit_min_msat = 200000',
            r"0 < credit_min_msat \(200000\) <= credit_msat \(100000\)",
        ),
        (
            'billing = "credit"\ncredit_msat = 5000\ncredit_max_msat = 4000',
            r"credit_msat \(5000\) <= credit_max_msat \(4000\)",
        ),
        ('billing = "credit"\ncredit_min_msat = 0', r"0 < credit_min_msat \(0\)"),
        ('billing = "credit"\ncredit_msat = 100000000000000000', "credit_msat must be 1 to"),
        ('billing = "credit"\nmetered = "yes please"', "expected true or false"),
    ],
)
def test_bad_credit_keys_are_config_errors(tmp_path: Path, keys: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_text(tmp_path, f'[[routes]]\npattern = "/gen"\nprice_msat = 1000\n{keys}\n')


def test_a_free_route_cannot_bill_credit(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"routes\[0\]: billing = \"credit\" needs a price"):
        load_text(tmp_path, '[[routes]]\npattern = "/f"\nfree = true\nbilling = "credit"\n')


def test_a_price_function_credit_route_needs_credit_msat(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="price_function needs credit_msat"):
        load_text(
            tmp_path,
            '[[routes]]\npattern = "/q"\nprice_function = "gateway.examples:quote_price"\n'
            'billing = "credit"\n',
        )


def test_the_route_table_says_a_route_is_billed_from_credit() -> None:
    config = Config(
        routes=(
            RouteConfig(pattern="/gen", price_msat=1000, billing="credit", lifetime=86400),
            RouteConfig(
                pattern="/m",
                methods=("post",),
                price_msat=500,
                billing="credit",
                credit_msat=5000,
                metered=True,
                charge_failures=True,
            ),
            RouteConfig(pattern="/t", price_msat=1000),
        ),
    )
    assert runtime.route_table(config)[:3] == [
        "/gen (any method): 1000 msat a request, from prepaid credit (100000 msat a purchase, "
        "1000 to 10000000 on request), service api, token valid 1d",
        "/m (POST): 500 msat a request at most (metered), from prepaid credit (5000 msat a "
        "purchase, 500 to 500000 on request, failures charged), service api, token valid 1h",
        "/t (any method): 1000 msat, service api, token valid 1h",
    ]


# --- [credit] ------------------------------------------------------------------------------


def test_credit_section_defaults() -> None:
    credit = CreditConfig()
    assert credit.reservation_seconds == 330.0
    assert (credit.withdrawals, credit.payment_macaroon) == (False, None)
    assert (credit.withdrawal_fee_min_msat, credit.withdrawal_fee_ppm) == (1000, 5000)
    assert credit.withdrawal_wait_seconds == 30.0


def test_usage_retention_defaults_to_30_days_and_is_read_and_overridden(tmp_path: Path) -> None:
    assert CreditConfig().usage_retention == 30 * 86400
    assert load_text(tmp_path, "[credit]\nusage_retention = 0\n").credit.usage_retention == 0
    config = load_text(
        tmp_path,
        "[credit]\nusage_retention = 60\n",
        environ={"GATEWAY_CREDIT_USAGE_RETENTION": "86400"},
    )
    assert config.credit.usage_retention == 86400
    assert load_config(None, {}).credit.usage_retention == 2_592_000


def test_the_sample_sets_the_credit_defaults(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_config(SAMPLE, {}).credit == CreditConfig()


def test_the_credit_section_is_read_and_overridden(tmp_path: Path) -> None:
    macaroon = tmp_path / "pay.macaroon"
    config = load_text(
        tmp_path,
        f'[credit]\nreservation_seconds = 60\nwithdrawals = true\npayment_macaroon = "{macaroon}"\n'
        "withdrawal_fee_min_msat = 0\nwithdrawal_fee_ppm = 1000000\n",
        environ={"GATEWAY_CREDIT_WITHDRAWAL_WAIT_SECONDS": "2.5"},
    )
    credit = config.credit
    assert (credit.reservation_seconds, credit.withdrawals) == (60.0, True)
    assert credit.payment_macaroon == macaroon
    assert (credit.withdrawal_fee_min_msat, credit.withdrawal_fee_ppm) == (0, 1_000_000)
    assert credit.withdrawal_wait_seconds == 2.5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("reservation_seconds = 0", "reservation_seconds must be 1 to 86400"),
        ("reservation_seconds = nan", "reservation_seconds must be 1 to 86400"),
        ("reservation_seconds = 86401", "reservation_seconds must be 1 to 86400"),
        ("withdrawals = true", "withdrawals = true needs payment_macaroon"),
        ('withdrawals = true\npayment_macaroon = ""', "withdrawals = true needs payment_macaroon"),
        ("withdrawal_fee_min_msat = -1", "withdrawal_fee_min_msat must be >= 0"),
        ("withdrawal_fee_ppm = 1000001", "withdrawal_fee_ppm must be 0 to 1000000"),
        ("withdrawal_fee_ppm = -1", "withdrawal_fee_ppm must be 0 to 1000000"),
        ("withdrawal_wait_seconds = 0", "withdrawal_wait_seconds must be more than 0"),
        ("withdrawal_wait_seconds = 301", "withdrawal_wait_seconds must be more than 0"),
        ("usage_retention = -1", r"usage_retention must be 0 \(keep forever\) to 315360000"),
        ("usage_retention = 315360001", r"usage_retention must be 0 \(keep forever\) to"),
        ("usage_retention = 1.5", "usage_retention: expected a whole number"),
        ("reserve = 1", r"\[credit\]: unknown key\(s\) reserve"),
    ],
)
def test_bad_credit_section_values_are_config_errors(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_text(tmp_path, f"[credit]\n{text}\n")


def test_a_bad_credit_environment_value_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"\[credit\].reservation_seconds: expected a number"):
        load_config(None, {"GATEWAY_CREDIT_RESERVATION_SECONDS": "soon"})
