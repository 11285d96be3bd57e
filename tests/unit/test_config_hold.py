"""Pay on success in the configuration: the ``[hold]`` section (defaults, the sample, the
environment, every bound and the CLTV budget), the route keys ``settle`` and
``settle_statuses``, and what they become (``HoldTerms``, ``Rule``, the route table)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import HoldConfig, RouteConfig, load_config
from gateway.errors import ConfigError
from gateway.runtime import build_pricing, hold_terms, route_table
from gateway.service.on_success import HoldTerms
from tests.config_files import load_text, write_config

SAMPLE = Path(__file__).resolve().parents[2] / "gateway" / "gateway.sample.toml"
UPSTREAM = '[server]\nupstream = "http://127.0.0.1:8080"\n'


def test_hold_config_has_the_hold_terms_fields_and_defaults() -> None:
    config_fields = [(f.name, f.default) for f in dataclasses.fields(HoldConfig)]
    terms_fields = [(f.name, f.default) for f in dataclasses.fields(HoldTerms)]
    assert config_fields == terms_fields
    assert hold_terms(load_config(None, {})) == HoldTerms()


def test_the_sample_documents_and_sets_the_hold_defaults(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    text = SAMPLE.read_text()
    section = text[text.index("[hold]") : text.index("[[routes]]")]
    for f in dataclasses.fields(HoldConfig):
        assert re.search(rf"^{f.name} = ", section, re.MULTILINE), f"[hold] {f.name} missing"
    assert load_config(SAMPLE, {}).hold == HoldConfig()


def test_the_samples_commented_on_success_route_loads(tmp_path: Path) -> None:
    text = SAMPLE.read_text()
    start = text.index("# A route paid only if the backend succeeds")
    block = text[start:].split("\n\n", 1)[0]
    route = block[block.index("# [[routes]]") :].replace("# ", "", 1).replace("\n# ", "\n")
    config = load_text(tmp_path, UPSTREAM + route)
    assert config.routes[0].settle == "on_success"
    assert config.routes[0].settle_statuses == (201,)
    (rule,) = build_pricing(config).rules
    assert rule.settle_on_success
    assert rule.settle_statuses == frozenset({201})


def test_the_hold_section_is_read_and_overridden(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        "[hold]\ninvoice_expiry = 60\nbackend_timeout = 5.5\ncltv_expiry = 40\n"
        "max_outstanding = 8\nmax_outstanding_per_client = 2\nmax_request_bytes = 0\n"
        "max_response_bytes = 10\nresponse_retention = 600\ndelivered_retention = 0\n",
        environ={"GATEWAY_HOLD_BACKEND_TIMEOUT": "7", "GATEWAY_HOLD_MAX_OUTSTANDING": "9"},
    )
    assert config.hold == HoldConfig(
        invoice_expiry=60,
        backend_timeout=7.0,
        cltv_expiry=40,
        max_outstanding=9,
        max_outstanding_per_client=2,
        max_request_bytes=0,
        max_response_bytes=10,
        response_retention=600,
        delivered_retention=0,
    )
    assert hold_terms(config) == HoldTerms(
        invoice_expiry=60,
        backend_timeout=7.0,
        cltv_expiry=40,
        max_outstanding=9,
        max_outstanding_per_client=2,
        max_request_bytes=0,
        max_response_bytes=10,
        response_retention=600,
        delivered_retention=0,
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("invoice_expiry = 9", "invoice_expiry must be 10 to 3600 seconds"),
        ("invoice_expiry = 3601", "invoice_expiry must be 10 to 3600 seconds"),
        ("backend_timeout = 0.5", "backend_timeout must be 1 to 86400 seconds"),
        ("backend_timeout = nan", "backend_timeout must be 1 to 86400 seconds"),
        ("backend_timeout = inf", "backend_timeout must be 1 to 86400 seconds"),
        # What paying clients believe of the 402's header, however large the CLTV budget.
        ("cltv_expiry = 2016\nbackend_timeout = 86401", "backend_timeout must be 1 to 86400"),
        ("cltv_expiry = 17", "cltv_expiry must be 18 to 2016 blocks"),
        ("cltv_expiry = 2017", "cltv_expiry must be 18 to 2016 blocks"),
        # (80 - 12) * 60 = 4080: 4021 + 60 is one second too many.
        ("backend_timeout = 4021", r"backend_timeout \+ 60 must be at most \(cltv_expiry - 12\)"),
        ("cltv_expiry = 18\nbackend_timeout = 301", r"= 360 seconds"),
        ("max_outstanding = 0", "max_outstanding must be 1 to 10000"),
        ("max_outstanding = 10001", "max_outstanding must be 1 to 10000"),
        ("max_outstanding_per_client = 0", r"max_outstanding_per_client must be 1 to"),
        ("max_outstanding_per_client = 33", r"must be 1 to max_outstanding \(32\)"),
        ("max_request_bytes = -1", "max_request_bytes must be 0 to 16777216"),
        ("max_request_bytes = 16777217", "max_request_bytes must be 0 to 16777216"),
        ("max_response_bytes = -1", "max_response_bytes must be 0 to 67108864"),
        ("max_response_bytes = 67108865", "max_response_bytes must be 0 to 67108864"),
        ("response_retention = 59", "response_retention must be 60 to 604800"),
        ("response_retention = 604801", "response_retention must be 60 to 604800"),
        ("delivered_retention = -1", r"delivered_retention must be 0 to response_retention"),
        ("delivered_retention = 3601", r"delivered_retention must be 0 to response_retention"),
        ("invoice_expiry = 1.5", r"invoice_expiry: expected a whole number"),
        ("hold_seconds = 1", r"\[hold\]: unknown key\(s\) hold_seconds"),
    ],
)
def test_bad_hold_values_are_config_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_text(tmp_path, f"[hold]\n{text}\n")


@pytest.mark.parametrize(
    ("cltv", "most"),
    [(18, 300.0), (80, 4020.0), (1453, 86400.0)],
)
def test_the_backend_timeout_may_fill_the_cltv_budget_exactly(cltv: int, most: float) -> None:
    assert HoldConfig(cltv_expiry=cltv, backend_timeout=most).backend_timeout == most
    with pytest.raises(ValueError, match="backend_timeout"):
        HoldConfig(cltv_expiry=cltv, backend_timeout=most + 0.5)


def test_a_bad_hold_value_from_the_environment_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[hold\]: cltv_expiry must be 18 to 2016"):
        load_text(tmp_path, "", environ={"GATEWAY_HOLD_CLTV_EXPIRY": "10"})


# --- the route keys -------------------------------------------------------------------------


def test_routes_settle_on_payment_by_default() -> None:
    route = RouteConfig("/a", price_msat=1)
    assert (route.settle, route.settle_statuses) == ("on_payment", ())


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ('settle = "on-success"', "settle must be on_payment or on_success"),
        ('settle = "later"', "settle must be on_payment or on_success"),
        ("settle_statuses = [201]", 'settle_statuses applies only to a route with settle = "on_'),
        ('settle = "on_success"\nsettle_statuses = [199]', "settle_statuses must be statuses 200"),
        ('settle = "on_success"\nsettle_statuses = [500]', "settle_statuses must be statuses 200"),
        ('settle = "on_success"\nsettle_statuses = [201.5]', "expected a whole number"),
        ('settle = "on_success"\nbilling = "credit"', 'does not go with billing = "credit"'),
    ],
)
def test_bad_settle_keys_are_config_errors(tmp_path: Path, keys: str, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"routes\[0\][.:].*{message}"):
        load_text(tmp_path, f'{UPSTREAM}[[routes]]\npattern = "/a"\nprice_msat = 5\n{keys}\n')


def test_a_free_route_cannot_settle_on_success(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="applies only to a priced route"):
        load_text(
            tmp_path, f'{UPSTREAM}[[routes]]\npattern = "/a"\nfree = true\nsettle = "on_success"\n'
        )


def test_on_success_routes_need_an_upstream(tmp_path: Path) -> None:
    route = '[[routes]]\npattern = "/free"\nfree = true\n'
    route += '[[routes]]\npattern = "/a"\nprice_msat = 5\nsettle = "on_success"\n'
    with pytest.raises(ConfigError, match=r"routes\[1\]: .*needs \[server\] upstream"):
        load_text(tmp_path, route)
    # The environment may give the upstream.
    config = load_text(tmp_path, route, environ={"GATEWAY_SERVER_UPSTREAM": "http://b:1"})
    assert config.routes[1].settle == "on_success"
    # An ordinary route needs none.
    assert load_text(tmp_path, '[[routes]]\npattern = "/a"\nprice_msat = 5\n').routes


def test_settle_keys_become_the_rule_and_the_route_table(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        f'{UPSTREAM}[[routes]]\npattern = "/orders"\nprice_msat = 5\nsettle = "on_success"\n'
        'settle_statuses = [202, 201, 202]\n[[routes]]\npattern = "/jobs"\nprice_msat = 5\n'
        'settle = "on_success"\n[[routes]]\npattern = "/read"\nprice_msat = 5\n'
        'settle = "on_payment"\n',
    )
    pricing = build_pricing(config)
    orders, jobs, read = pricing.rules
    assert (orders.settle_on_success, orders.settle_statuses) == (True, frozenset({201, 202}))
    assert (jobs.settle_on_success, jobs.settle_statuses) == (True, frozenset())
    assert (read.settle_on_success, read.settle_statuses) == (False, frozenset())
    assert pricing.settles_on_success
    lines = route_table(config)
    assert "paid only if the backend answers 201, 202" in lines[0]
    assert "paid only if the backend answers 2xx" in lines[1]
    assert "paid only if" not in lines[2]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[hold]\ncltv_expiry = 40\nbackend_timeout = 1700", "backend_timeout + 60"),
        ("[hold]\nmax_outstanding_per_client = 100", "max_outstanding_per_client"),
        ('[[routes]]\npattern = "/a"\nprice_msat = 5\nsettle = "on_success"', "upstream"),
    ],
)
def test_hold_errors_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, fragment: str
) -> None:
    config = write_config(tmp_path, text, store="memory:")
    code = main(["--config", str(config), "invoices"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith("l402-gateway: configuration error: "), err
    assert fragment in line
