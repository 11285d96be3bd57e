"""``l402-gateway check`` and ``serve`` with payment macaroons: the payouts' macaroon is read
before anything is said to be ok and probed like the withdrawals' (once when it is the same
file), its problems named by the section it came from."""

from __future__ import annotations

from pathlib import Path

import pytest

import gateway.cli.check
import gateway.cli.serve
from gateway import errors, runtime
from gateway.cli import main
from gateway.liquidity import UNKNOWN
from gateway.lnd.connection import LndSettings
from gateway.lnd.preflight import PAYER_PERMISSIONS, LndCheck
from gateway.ports import Liquidity
from tests.config_files import load_text, placeholder_lnd, write_config

PUBKEY = "02" + "ab" * 32
PAYEE = f'[[payee]]\nname = "carol"\ndestination = "{PUBKEY}"\n'
LACKS_WRITE = (
    f"[credit] the payment macaroon lacks offchain:write (bake one with {PAYER_PERMISSIONS})"
)


def _macaroon(directory: Path, name: str) -> Path:
    path = directory / name
    path.write_bytes(name.encode())  # its bytes tell the probes which one they got
    path.chmod(0o600)
    return path


def _config(directory: Path, payouts: Path | str | None, credit: Path | None = None) -> str:
    text = placeholder_lnd(directory) + PAYEE
    if payouts is not None:
        text += f'[payouts]\npayment_macaroon = "{payouts}"\n'
    if credit is not None:
        text += f'[credit]\nwithdrawals = true\npayment_macaroon = "{credit}"\n'
    return text


class Probes:
    """``check_lnd`` and ``check_payer`` without a node: the node is fine; a payment
    macaroon whose bytes are in ``lacking`` lacks ``offchain:write``."""

    def __init__(self, lacking: set[bytes]) -> None:
        self.lacking = lacking
        self.payers: list[bytes] = []

    async def check_lnd(self, settings: LndSettings) -> LndCheck:
        return LndCheck()

    async def check_payer(self, settings: LndSettings) -> LndCheck:
        self.payers.append(settings.macaroon)
        return LndCheck((LACKS_WRITE,) if settings.macaroon in self.lacking else ())


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch) -> Probes:
    found = Probes(set())
    monkeypatch.setattr(gateway.cli.check, "check_lnd", found.check_lnd)
    monkeypatch.setattr(gateway.cli.check, "check_payer", found.check_payer)

    async def liquidity(config: object) -> Liquidity:
        return UNKNOWN

    monkeypatch.setattr(gateway.cli.check, "_liquidity", liquidity)
    return found


def test_check_refuses_a_payout_macaroon_it_cannot_read(
    tmp_path: Path, probes: Probes, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, _config(tmp_path, "/nonexistent"))
    assert main(["--config", str(path), "check"]) == 2
    captured = capsys.readouterr()
    assert "config: ok" not in captured.out
    assert "configuration error: [payouts] cannot read /nonexistent" in captured.err
    assert probes.payers == []


def test_check_probes_the_payout_macaroon_and_names_its_section(
    tmp_path: Path, probes: Probes, capsys: pytest.CaptureFixture[str]
) -> None:
    probes.lacking = {b"payout.macaroon"}
    withdrawals = _macaroon(tmp_path, "withdraw.macaroon")
    payouts = _macaroon(tmp_path, "payout.macaroon")
    path = write_config(tmp_path, _config(tmp_path, payouts, credit=withdrawals))
    assert main(["--config", str(path), "check"]) == 2
    out = capsys.readouterr().out
    assert probes.payers == [b"withdraw.macaroon", b"payout.macaroon"]
    (problem,) = [line for line in out.splitlines() if line.startswith("problem:")]
    assert problem == f"problem: {LACKS_WRITE.replace('[credit]', '[payouts]')}"


def test_check_probes_a_macaroon_shared_by_withdrawals_and_payouts_once(
    tmp_path: Path, probes: Probes, capsys: pytest.CaptureFixture[str]
) -> None:
    shared = _macaroon(tmp_path, "payment.macaroon")
    path = write_config(tmp_path, _config(tmp_path, None, credit=shared))
    assert main(["--config", str(path), "check"]) == 0
    out = capsys.readouterr().out
    assert probes.payers == [b"payment.macaroon"]
    assert f"payer: ok ([credit] payment_macaroon with {PAYER_PERMISSIONS})" in out


def test_check_says_the_payout_macaroon_is_ok(
    tmp_path: Path, probes: Probes, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, _config(tmp_path, _macaroon(tmp_path, "payout.macaroon")))
    assert main(["--config", str(path), "check"]) == 0
    assert probes.payers == [b"payout.macaroon"]
    assert "payer: ok ([payouts] payment_macaroon with" in capsys.readouterr().out


def test_serve_refuses_an_unreadable_payout_macaroon_before_it_probes(
    tmp_path: Path,
    probes: Probes,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def never(config: object) -> None:
        raise AssertionError("probed with a macaroon it cannot read")

    monkeypatch.setattr(gateway.cli.serve, "startup_checks", never)
    text = '[server]\nupstream = "http://127.0.0.1:1"\nlisten = "127.0.0.1:0"\n'
    path = write_config(tmp_path, text + _config(tmp_path, "/nonexistent"), store="memory:")
    assert main(["--config", str(path), "serve"]) == 2
    assert "configuration error: [payouts] cannot read /nonexistent" in capsys.readouterr().err


def test_the_payment_macaroons_messages_name_what_is_missing_and_where_it_came_from(
    tmp_path: Path,
) -> None:
    no_cert = load_text(tmp_path, f'[credit]\npayment_macaroon = "/nonexistent"\n{PAYEE}')
    with pytest.raises(errors.ConfigError) as caught:
        runtime.payout_settings(no_cert)
    assert str(caught.value) == "[[payee]] payouts need [lnd] tls_cert (the node's tls.cert)"
    # The macaroon came from [credit] (no [payouts] one): that is the section named.
    from_credit = placeholder_lnd(tmp_path) + '[credit]\npayment_macaroon = "/nonexistent"\n'
    with pytest.raises(errors.ConfigError, match=r"^\[credit\] cannot read /nonexistent: "):
        runtime.payout_settings(load_text(tmp_path, from_credit + PAYEE))
    withdrawals = '[credit]\nwithdrawals = true\npayment_macaroon = "/nonexistent"\n'
    with pytest.raises(errors.ConfigError) as caught:
        runtime.payer_settings(load_text(tmp_path, withdrawals))
    assert str(caught.value) == "withdrawals need [lnd] tls_cert (the node's tls.cert)"


# --- tip jars and payment links ([lnurl]) -------------------------------------------------

JARS = (
    '[[tip_jar]]\nname = "coffee"\ndescription = "Coffee"\nmin = "1sat"\nmax = "1234567sat"\n'
    'comment_max = 140\n[[tip_jar]]\nname = "tea"\ndescription = "Tea"\nmin = "5sat"\n'
    'max = "5sat"\n'
)


def test_check_reports_the_tip_jars_and_the_links(
    tmp_path: Path, probes: Probes, capsys: pytest.CaptureFixture[str]
) -> None:
    text = placeholder_lnd(tmp_path) + '[lnurl]\nbase_url = "https://Pay.example.com/"\n' + JARS
    assert main(["--config", str(write_config(tmp_path, text)), "check"]) == 0
    out = capsys.readouterr().out.splitlines()
    start = out.index("lnurl: https://pay.example.com (tip jars and payment links)")
    assert out[start + 1 : start + 4] == [
        "  tip jar coffee@pay.example.com: https://pay.example.com/.well-known/lnurlp/coffee, "
        "1 to 1234567 sat, comments up to 140 characters",
        "  tip jar tea@pay.example.com: https://pay.example.com/.well-known/lnurlp/tea, 5 sat, "
        "no comments",
        "  payment links: https://pay.example.com/.well-known/l402/links/<id>",
    ]
    assert not any(line.startswith("warning:") for line in out)


@pytest.mark.parametrize(
    ("base_url", "who"),
    [
        ("http://127.0.0.1:8402", "wallets on this machine"),
        ("http://localhost:8402", "wallets on this machine"),
        ("http://[::1]:8402", "wallets on this machine"),
        ("http://abcdefghijklmnop.onion", "wallets over Tor"),
    ],
)
def test_check_warns_when_few_wallets_can_reach_base_url(
    tmp_path: Path, probes: Probes, capsys: pytest.CaptureFixture[str], base_url: str, who: str
) -> None:
    text = placeholder_lnd(tmp_path) + f'[lnurl]\nbase_url = "{base_url}"\n'
    assert main(["--config", str(write_config(tmp_path, text)), "check"]) == 0
    out = capsys.readouterr().out
    assert f"warning: [lnurl] base_url {base_url}: only {who} can reach it\n" in out


def test_check_says_nothing_of_tips_without_lnurl(
    tmp_path: Path, probes: Probes, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--config", str(write_config(tmp_path, placeholder_lnd(tmp_path))), "check"]) == 0
    assert "lnurl" not in capsys.readouterr().out
