"""Revenue splits in the configuration: the routes' ``split``, ``[[payee]]`` and ``[payouts]``
(defaults, the environment, every refusal naming its field), the warning about a payee no
route names, and what they become (``Rule.split``, ``PayeeTerms``, the route table)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.config import Config, PayeeConfig, PayoutsConfig, load_config
from gateway.config.payouts import destination_problem
from gateway.destinations import is_pubkey
from gateway.errors import ConfigError
from gateway.ports import Msat, Share
from gateway.runtime import build_pricing, payee_terms, payout_settings, route_table
from gateway.service.payout import PayeeTerms
from tests.config_files import load_text

PUBKEY = "02" + "ab" * 32
# LUD-01's example: https://service.com/api?q=3fc3645b439ce8e7f2553a69e5267081d96dcd340693afabe04be7b0ccd178df
LNURL = (
    "LNURL1DP68GURN8GHJ7UM9WFMXJCM99E3K7MF0V9CXJ0M385EKVCENXC6R2C35XVUKXEFCV5MKVV34X5EKZD3EV"
    "56NYD3HXQURZEPEXEJXXEPNXSCRVWFNV9NXZCN9XQ6XYEFHVGCXXCMYXYMNSERXFQ5FNS"
)


def payees_text(directory: Path, *, macaroon: bool = True) -> str:
    """A [payouts] with a macaroon (if asked), a route split 30% / 1000 msat, two payees."""
    path = directory / "payment.macaroon"
    path.write_bytes(b"x")
    path.chmod(0o600)
    section = f'[payouts]\npayment_macaroon = "{path}"\n' if macaroon else ""
    return (
        section
        + '[[routes]]\npattern = "/api/*"\nprice_msat = 10000\n'
        + 'split = ["carol:30%", "dave:1000msat"]\n'
        + f'[[payee]]\nname = "carol"\ndestination = "{PUBKEY}"\n'
        + '[[payee]]\nname = "dave"\ndestination = "dave@example.com"\nthreshold_msat = 5000\n'
        + 'every = 3600\nfee_limit_ppm = 5000\nfee_limit_min_msat = 1000\nfees_paid_by = "payee"\n'
    )


def test_no_payees_by_default() -> None:
    config = load_config(None, {})
    assert config.payee == ()
    assert config.payouts == PayoutsConfig()
    assert config.payout_macaroon is None
    assert payout_settings(config) is None


def test_splits_and_payees_load(tmp_path: Path) -> None:
    config = load_text(tmp_path, payees_text(tmp_path))
    (route,) = config.routes
    assert route.split == ("carol:30%", "dave:1000msat")
    assert route.shares == (Share("carol", ppm=300_000), Share("dave", fixed_msat=Msat(1000)))
    carol, dave = config.payee
    assert carol == PayeeConfig(name="carol", destination=PUBKEY)
    assert is_pubkey(carol.destination)
    assert not carol.payee_pays_fee
    assert dave.threshold_msat == 5000
    assert dave.every == 3600.0
    assert dave.payee_pays_fee
    assert not is_pubkey(dave.destination)
    assert config.payout_macaroon == tmp_path / "payment.macaroon"


def test_the_payee_config_has_the_payee_terms_fields_and_defaults(tmp_path: Path) -> None:
    terms = {f.name: f.default for f in dataclasses.fields(PayeeTerms)}
    configured = {f.name: f.default for f in dataclasses.fields(PayeeConfig)}
    del configured["fees_paid_by"], terms["payee_pays_fee"]
    assert configured == terms
    config = load_text(tmp_path, payees_text(tmp_path))
    assert payee_terms(config) == [
        PayeeTerms(name="carol", destination=PUBKEY),
        PayeeTerms(
            name="dave",
            destination="dave@example.com",
            threshold_msat=5000,
            every=3600.0,
            fee_limit_ppm=5000,
            fee_limit_min_msat=1000,
            payee_pays_fee=True,
        ),
    ]


def test_the_rule_gets_the_split_and_the_route_table_shows_it(tmp_path: Path) -> None:
    config = load_text(tmp_path, payees_text(tmp_path))
    (rule,) = build_pricing(config).rules
    assert rule.split == (Share("carol", ppm=300_000), Share("dave", fixed_msat=Msat(1000)))
    assert "split: carol:30%, dave:1000msat (the merchant keeps the rest)" in route_table(config)[0]


def test_the_credit_payment_macaroon_is_the_default(tmp_path: Path) -> None:
    text = payees_text(tmp_path, macaroon=False)
    with pytest.raises(ConfigError, match=r"\[payouts\] payment_macaroon"):
        load_text(tmp_path, text)
    credit = f'[credit]\npayment_macaroon = "{tmp_path / "payment.macaroon"}"\n'
    config = load_text(tmp_path, credit + text)
    assert config.payout_macaroon == tmp_path / "payment.macaroon"
    assert config.payouts.payment_macaroon is None


def test_payouts_is_read_and_overridden_from_the_environment(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        "[payouts]\ninterval = 2.5\nretry_initial = 1\nretry_max = 60\n",
        environ={"GATEWAY_PAYOUTS_RETRY_MAX": "120", "GATEWAY_PAYOUTS_PAYMENT_MACAROON": "/m"},
    )
    assert config.payouts == PayoutsConfig(
        payment_macaroon=Path("/m"), interval=2.5, retry_initial=1.0, retry_max=120.0
    )


def test_payee_tables_are_not_read_from_the_environment(tmp_path: Path) -> None:
    config = load_text(tmp_path, "", environ={"GATEWAY_PAYEE_NAME": "carol"})
    assert config.payee == ()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("carol:30%", "erin:30%"), "split names payee 'erin', which no [[payee]] defines"),
        (("dave:1000msat", "dave:80%"), r"percentages add up to 110%, more than 100%"),
        (('"dave:1000msat"', '"carol:1%", "dave:1000msat"'), "carol appears more than once"),
        (("carol:30%", "carol:130%"), r"split: share 'carol:130%': the percent must be above"),
        (("carol:30%", "carol:30"), "unknown unit"),
        (("dave:1000msat", "dave:11sat"), r"fixed shares add up to 11000 msat, more than price"),
        (("carol:30%", "carol:100%"), "shares add up to 11000 msat of a 10000 msat payment"),
        (("price_msat = 10000", "free = true"), "split applies only to a priced route"),
        (('name = "dave"', 'name = "carol"'), "[[payee]] name 'carol' is used twice"),
        (('name = "dave"', 'name = "Dave"'), "name must be 1 to 64 of a-z"),
        (("dave@example.com", "dave@"), "destination: 'dave@': a Lightning Address is name@"),
        (("dave@example.com", "nothing"), "destination: not a node public key, Lightning Add"),
        (("dave@example.com", PUBKEY.upper()), "66 lower-case hex digits"),
        (("dave@example.com", "04" + "ab" * 32), "starting 02 or 03"),
        (("dave@example.com", "http://example.com/lnurlp"), "plain http:// only for localhost"),
        (("dave@example.com", "ftp://example.com/lnurlp"), "the scheme 'ftp' is not https://"),
        (("dave@example.com", "lnurl1qqqqqqqq"), "not a valid LNURL"),
        (("dave@example.com", "dave@a..b"), "not a valid host name: 'a..b'"),
        (
            ("threshold_msat = 5000", "threshold_msat = 1000"),
            'threshold_msat (1000) must be above fee_limit_min_msat (1000) with fees_paid_by = "p',
        ),
        (("fee_limit_ppm = 5000", "fee_limit_ppm = 1000000"), "fee_limit_ppm must be below 1000"),
        (('fees_paid_by = "payee"', 'fees_paid_by = "nobody"'), "fees_paid_by must be"),
        (("threshold_msat = 5000", "threshold_msat = 0"), "threshold_msat must be"),
        (("every = 3600", "every = -1"), "every must be"),
        (("fee_limit_ppm = 5000", "fee_limit_ppm = 1000001"), "fee_limit_ppm must be"),
        (("fee_limit_min_msat = 1000", "fee_limit_min_msat = -1"), "fee_limit_min_msat must"),
        (("fee_limit_min_msat = 1000", "colour = 1"), "unknown key"),
        (('name = "dave"\n', ""), "must be a table ([[payee]]) with a name and a destination"),
    ],
)
def test_a_bad_split_or_payee_is_refused_naming_the_field(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    text = payees_text(tmp_path)
    assert change[0] in text
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, text.replace(change[0], change[1], 1))
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("payee = 3\n", "array of tables ([[payee]])"),
        ("[payouts]\ninterval = 0\n", "interval must be"),
        ("[payouts]\nretry_initial = 10\nretry_max = 5\n", "retry_initial / retry_max"),
        ("[payouts]\nretry_initial = 0\n", "retry_initial / retry_max"),
    ],
)
def test_a_bad_payouts_section_is_refused(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_text(tmp_path, text)


@pytest.mark.parametrize(
    "destination",
    [
        PUBKEY,
        "03" + "0f" * 32,
        "carol@example.com",
        "carol.x+tips@pay.example.co.uk",
        "carol@127.0.0.1:8123",
        "carol@localhost:8123",
        "https://example.com/.well-known/lnurlp/carol",
        "http://127.0.0.1:8123/lnurlp/carol",
        "http://localhost/lnurlp/carol",
        "http://[::1]:9000/lnurlp/carol",
        "http://abcdefghijklmnop.onion/lnurlp/carol",
        "lnurlp://example.com/lnurlp/carol",
        LNURL,
        LNURL.lower(),
        "lightning:" + LNURL,
        "Carol@Example.com",  # read lower-cased, as the payout worker reads it
        "carol@bücher.example",
        "lightning:carol@example.com",
    ],
)
def test_these_destinations_are_accepted(destination: str) -> None:
    assert destination_problem(destination) is None


@pytest.mark.parametrize(
    "destination",
    [
        "",
        " carol@example.com",
        "carol@example.com/x",
        "carol@exa mple.com",
        "carol@@example.com",
        "@example.com",
        "http://example.com/x",
        "http://user:pw@localhost/x",
        "https://",
        "lnurl1" + "q" * 40,
        LNURL[:-1] + "Q",  # a broken checksum
        "LnUrL1DP68GURN8GHJ7",  # mixed case
        "02" + "ab" * 31,
        "lightning:" + PUBKEY,
        "carol@a..b",
        "carol@ex%61mple.com",
        "https://ex%61mple.com/p",
        "https://example.com/p#x",
        "https://example.com:0/p",
        "carol@example.com:0",
        "https://127.1/p",
        "carol!@example.com",
    ],
)
def test_these_destinations_are_refused(destination: str) -> None:
    assert destination_problem(destination) is not None


@pytest.mark.parametrize(
    "destination",
    [
        "",
        "carol@example.com",
        "Carol@Example.com",
        "carol@bücher.example",
        "lightning:carol@example.com",
        " carol@example.com",
        "carol@a..b",
        "https://example.com/p#x",
        "http://10.0.0.1/p",
        LNURL,
        "lightning:" + LNURL,
        PUBKEY,
        PUBKEY.upper(),
        "lightning:" + PUBKEY,
    ],
)
def test_the_configuration_and_the_worker_read_a_destination_alike(destination: str) -> None:
    """One reader: what the configuration accepts, the worker pays (keysend or LNURL)."""
    from gateway.client.lnurl import pay_url
    from gateway.errors import PayoutDestinationError

    accepted = destination_problem(destination) is None
    try:
        pay_url(destination)
        fetched = True
    except PayoutDestinationError:
        fetched = False
    assert accepted == (is_pubkey(destination) or fetched)
    assert not (is_pubkey(destination) and fetched)


def test_a_long_destination_is_shown_cut_short(tmp_path: Path) -> None:
    problem = destination_problem("\x1b[2J" + "x" * 100_000)
    assert problem is not None
    assert len(problem) < 300
    assert "\\x1b" in problem  # escaped, not obeyed
    text = payees_text(tmp_path).replace("dave@example.com", "y" * 100_000)
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, text)
    assert len(str(caught.value)) < 400


def test_a_payee_no_route_names_is_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = payees_text(tmp_path).replace('"carol:30%", ', "")
    with caplog.at_level(logging.WARNING, logger="gateway.config"):
        config = load_text(tmp_path, text)
    assert len(config.payee) == 2
    messages = [r.getMessage() for r in caplog.records if r.name == "gateway.config"]
    assert messages == [
        "[[payee]] 'carol': no route's split names it (it is still paid what it has accrued)"
    ]


def test_payee_terms_that_cannot_be_kept_are_warnings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = payees_text(tmp_path).replace(
        f'destination = "{PUBKEY}"\n',
        f'destination = "{PUBKEY}"\nevery = 5\nthreshold_msat = 1500\n',
    )
    with caplog.at_level(logging.WARNING, logger="gateway.config"):
        load_text(tmp_path, text)
    messages = [r.getMessage() for r in caplog.records if r.name == "gateway.config"]
    assert messages == [
        "[[payee]] 'carol': every = 5 s is shorter than [payouts] interval = 10 s: it is paid "
        "at most once an interval",
        "[[payee]] 'carol': fee_limit_min_msat (2000) is above threshold_msat (1500): the "
        "merchant may pay a routing fee larger than the payout",
    ]


def test_the_payout_macaroon_readable_by_others_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = payees_text(tmp_path)
    (tmp_path / "payment.macaroon").chmod(0o644)
    path = tmp_path / "gateway.toml"
    path.write_text(text, encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="gateway.config"):
        load_config(path, {}, uses_lnd=False)
    assert not [r for r in caplog.records if "macaroon" in r.getMessage()]
    with caplog.at_level(logging.WARNING, logger="gateway.config"):
        load_config(path, {})
    assert [r for r in caplog.records if "payout payment macaroon" in r.getMessage()]


def test_payout_settings_read_the_macaroon(tmp_path: Path) -> None:
    config = load_text(tmp_path, payees_text(tmp_path))
    with pytest.raises(ConfigError, match="tls_cert"):
        payout_settings(config)
    cert = tmp_path / "tls.cert"
    cert.write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    with_cert = dataclasses.replace(config, lnd=dataclasses.replace(config.lnd, tls_cert=cert))
    settings = payout_settings(with_cert)
    assert settings is not None
    (tmp_path / "payment.macaroon").unlink()
    with pytest.raises(ConfigError, match=r"\[payouts\] cannot read"):
        payout_settings(with_cert)
    assert payout_settings(Config()) is None


def _uncommented(text: str, start: str) -> str:
    """The commented block of the sample from its line ``start`` to the blank line after."""
    block = text[text.index(start) :].split("\n\n", 1)[0]
    return "\n".join(line.removeprefix("# ") for line in block.splitlines()) + "\n"


def test_the_samples_payouts_section_and_commented_split_load(tmp_path: Path) -> None:
    sample = (Path(__file__).resolve().parents[2] / "gateway" / "gateway.sample.toml").read_text()
    payee = _uncommented(sample, "# [[payee]]")
    route = _uncommented(sample, '# [[routes]]\n# pattern = "/api/articles/*"')
    assert payee.startswith("[[payee]]")
    assert route.startswith("[[routes]]")
    dave = payee.replace('"carol"', '"dave"').replace("carol@", "dave@")
    macaroon = '[payouts]\npayment_macaroon = "/etc/l402-gateway/payment.macaroon"\n'
    config = load_text(tmp_path, macaroon + route + payee + dave)
    assert config.payee[0] == PayeeConfig(name="carol", destination="carol@example.com")
    assert config.routes[0].shares == (
        Share("carol", ppm=300_000),
        Share("dave", fixed_msat=Msat(1000)),
    )
    assert load_config(None, {}).payouts == PayoutsConfig()


# --- in running_runtime ----------------------------------------------------------------------


async def test_the_leader_runs_the_payout_worker_woken_by_settlements(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway import runtime
    from gateway.ports import InvoiceRecord, InvoiceState
    from tests.fakes import FakeInvoiceBackend, FakePayer

    backend, payer = FakeInvoiceBackend(), FakePayer()
    connections: list[object] = []

    @contextlib.asynccontextmanager
    async def connect(settings: object, **_options: object) -> AsyncIterator[object]:
        # The first connection is [lnd]'s, the next the payouts' (payment macaroon).
        connections.append(settings)
        yield backend if len(connections) == 1 else payer

    monkeypatch.setattr(runtime, "LndClient", connect)
    (tmp_path / "tls.cert").write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    macaroon = tmp_path / "payment.macaroon"
    macaroon.write_bytes(b"x")
    macaroon.chmod(0o600)
    config = load_text(
        tmp_path,
        f'[lnd]\ntls_cert = "{tmp_path / "tls.cert"}"\nmacaroon_hex = "00"\n'
        f'[store]\nurl = "sqlite:{tmp_path / "g.db"}"\n'
        f'[payouts]\npayment_macaroon = "{macaroon}"\ninterval = 3600\n'
        '[[routes]]\npattern = "/api/*"\nprice_msat = 10000\nsplit = ["carol:30%"]\n'
        f'[[payee]]\nname = "carol"\ndestination = "{PUBKEY}"\nthreshold_msat = 1000\n',
    )
    assert config.payee[0].threshold_msat == 1000
    async with runtime.running_runtime(config) as running:
        for _ in range(200):
            if "l402-payouts" in {task.name for task in running.health()}:
                break
            await asyncio.sleep(0.01)
        assert "l402-payouts" in {task.name for task in running.health()}
        assert len(connections) == 2
        # A settlement on the split route: carol is due at once (her threshold is 1000).
        invoice = await backend.add_invoice(Msat(10_000), "x", 600)
        await running.store.add_invoice(
            InvoiceRecord(
                payment_hash=invoice.payment_hash,
                payment_request=invoice.payment_request,
                amount_msat=Msat(10_000),
                token_id=b"t" * 32,
                service="api",
                method="GET",
                path="/api/x",
                state=InvoiceState.OPEN,
                created_at=time.time(),
                expires_at=time.time() + 600,
                add_index=invoice.add_index,
                split=config.routes[0].shares,
            )
        )
        backend.pay(invoice.payment_hash)
        for _ in range(300):
            if payer.keysends:
                break
            await asyncio.sleep(0.01)
        assert [(dest.hex(), amount) for dest, amount, _ in payer.keysends] == [(PUBKEY, 3_000)]
