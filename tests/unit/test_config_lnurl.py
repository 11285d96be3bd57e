"""Tips and payment links in the configuration: ``[lnurl]`` and ``[[tip_jar]]`` (defaults,
the environment, the sample, every refusal in one line naming the jar and the field), and
the route services that would clash with tip and link invoices."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import pytest

from gateway import runtime
from gateway.client import bolt11
from gateway.config import Config, LnurlConfig, TipJarConfig, load_config
from gateway.config.lnurl import MIN_LNURL_INVOICE_EXPIRY, parse_amount, read_image
from gateway.errors import ConfigError
from gateway.lnurl import MAX_IMAGE_BYTES, Image, SuccessAction
from gateway.ports import InvoiceState, Msat, PaymentHash
from gateway.pricing import MAX_PRICE_MSAT
from gateway.service.tips import REUSE_MIN_SECONDS, TipJar, Tips
from gateway.store import SqliteStore
from gateway.web.lnurl import TipsSlot
from tests.config_files import load_text, placeholder_lnd
from tests.fakes import FakeClock, FakeInvoiceBackend, fake_lnd_client

SAMPLE = Path(__file__).resolve().parents[2] / "gateway" / "gateway.sample.toml"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 32
BASE = '[lnurl]\nbase_url = "https://pay.example.com"\n'


def jar(**fields: object) -> str:
    """A ``[[tip_jar]]`` named coffee with ``fields`` (TOML values as Python repr)."""
    values: dict[str, object] = {"name": "coffee", "description": "Buy me a coffee", **fields}
    lines = [f"{key} = {_toml(value)}" for key, value in values.items() if value is not None]
    return "[[tip_jar]]\n" + "\n".join(lines) + "\n"


def _toml(value: object) -> str:
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    return str(value)


def refused(tmp_path: Path, text: str, *expected: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, text)
    message = str(caught.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, message
    return message


# --- defaults, the sample, the environment ------------------------------------------------


def test_off_by_default() -> None:
    config = load_config(None, {})
    assert config.lnurl == LnurlConfig()
    assert not config.lnurl.enabled
    assert config.lnurl.origin == ""
    assert config.tip_jar == ()


def test_the_sample_documents_every_key_and_loads_uncommented(tmp_path: Path) -> None:
    text = SAMPLE.read_text()
    assert "[lnurl]" in text
    assert "# [[tip_jar]]" in text
    section = text[text.index("[lnurl]") : text.index("# Routes:")]
    for cls in (LnurlConfig, TipJarConfig):
        for f in dataclasses.fields(cls):
            assert re.search(rf"^(# )*{f.name} +=", section, re.MULTILINE), f.name
    assert load_config(SAMPLE, {}).lnurl == LnurlConfig()
    example = re.search(r"^# \[\[tip_jar\]\]\n((?:# .*\n)+)", text, re.MULTILINE)
    assert example is not None
    lines = [line.removeprefix("# ") for line in example.group(1).splitlines()]
    # Uncommented as it is: no image to have, the success message.
    config = load_text(tmp_path, BASE + "[[tip_jar]]\n" + "".join(f"{x}\n" for x in lines))
    (coffee,) = config.tip_jar
    assert coffee.name == "coffee"
    assert (coffee.min_msat, coffee.max_msat) == (1000, 1_000_000_000)
    assert coffee.comment_max == 140
    assert coffee.image is None
    assert coffee.success == SuccessAction(message="Thank you!")
    # The options taken: the image beside the file, and the URL instead of the message.
    options = [line.removeprefix("# ") for line in lines if not line.startswith("success_message")]
    (tmp_path / "coffee.png").write_bytes(PNG)
    config = load_text(tmp_path, BASE + "[[tip_jar]]\n" + "".join(f"{x}\n" for x in options))
    (coffee,) = config.tip_jar
    assert coffee.image == tmp_path / "coffee.png"
    assert coffee.success == SuccessAction(
        url="https://pay.example.com/thanks", description="A thank-you note"
    )


def test_a_jar_loads_with_its_defaults(tmp_path: Path) -> None:
    config = load_text(tmp_path, BASE + "invoice_expiry = 300\n" + jar())
    assert config.lnurl == LnurlConfig(base_url="https://pay.example.com", invoice_expiry=300)
    assert config.lnurl.enabled
    (coffee,) = config.tip_jar
    assert coffee == TipJarConfig(name="coffee", description="Buy me a coffee")
    assert (coffee.min_msat, coffee.max_msat) == (1_000, 1_000_000_000)
    assert coffee.comment_max == 0
    assert coffee.image is None
    assert config == dataclasses.replace(config, tip_jar=(coffee,))


def test_the_environment_sets_lnurl(tmp_path: Path) -> None:
    environ = {
        "GATEWAY_LNURL_BASE_URL": "http://127.0.0.1:8402",
        "GATEWAY_LNURL_INVOICE_EXPIRY": "180",
    }
    config = load_config(None, environ)
    assert config.lnurl == LnurlConfig(base_url="http://127.0.0.1:8402", invoice_expiry=180)
    with pytest.raises(ConfigError, match=r"\[lnurl\].*invoice_expiry"):
        load_config(None, {"GATEWAY_LNURL_INVOICE_EXPIRY": "179"})


def test_several_jars_and_their_amounts(tmp_path: Path) -> None:
    text = (
        BASE
        + jar(name="a.b_c+d-1", min="21 sat", max="21000msat", comment_max=600)
        + jar(name="tea", description="Tea", min="5sat", max="5sat", success_message="Ta")
    )
    first, second = load_text(tmp_path, text).tip_jar
    assert (first.min_msat, first.max_msat, first.comment_max) == (21_000, 21_000, 600)
    assert (second.min_msat, second.max_msat) == (5_000, 5_000)
    assert second.success == SuccessAction(message="Ta")
    assert first.success is None


# --- base_url -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base_url", "origin"),
    [
        ("https://pay.example.com", "https://pay.example.com"),
        ("https://Pay.Example.com/", "https://pay.example.com"),
        ("https://pay.example.com:443", "https://pay.example.com"),
        ("https://pay.example.com:8443", "https://pay.example.com:8443"),
        ("https://bücher.de", "https://xn--bcher-kva.de"),
        ("http://localhost:8402", "http://localhost:8402"),
        ("http://127.0.0.1:8402", "http://127.0.0.1:8402"),
        ("http://[::1]:8402", "http://[::1]:8402"),
        ("http://abcdefghijklmnop.onion", "http://abcdefghijklmnop.onion"),
    ],
)
def test_base_url_origins(base_url: str, origin: str) -> None:
    assert LnurlConfig(base_url=base_url).origin == origin


@pytest.mark.parametrize(
    ("base_url", "reason"),
    [
        ("http://pay.example.com", "plain http:// only for localhost"),
        ("ftp://pay.example.com", "not an https:// URL"),
        ("pay.example.com", "not an absolute URL"),
        ("https://pay.example.com/tips", "origin only"),
        ("https://pay.example.com/?a=1", "origin only"),
        ("https://pay.example.com?", "origin only"),
        ("https://pay.example.com/#top", "fragment"),
        ("https://user:pw@pay.example.com", "user or password"),
        ("https://pay.example.com:0", "port 0"),
        ("https://exa mple.com", "base_url"),
    ],
)
def test_bad_base_urls_are_refused(tmp_path: Path, base_url: str, reason: str) -> None:
    refused(tmp_path, f'[lnurl]\nbase_url = "{base_url}"\n', "[lnurl]", reason)


def test_tip_jars_need_a_base_url(tmp_path: Path) -> None:
    refused(tmp_path, jar(), "[[tip_jar]] needs [lnurl] base_url")


@pytest.mark.parametrize("expiry", [0, 60, 179, 86_401])
def test_invoice_expiry_range(tmp_path: Path, expiry: int) -> None:
    refused(tmp_path, BASE + f"invoice_expiry = {expiry}\n", "invoice_expiry", "180 to 86400")


@pytest.mark.parametrize("expiry", [180, 86_400])
def test_invoice_expiry_bounds_are_taken(tmp_path: Path, expiry: int) -> None:
    config = load_text(tmp_path, BASE + f"invoice_expiry = {expiry}\n")
    assert config.lnurl.invoice_expiry == expiry


def test_the_shortest_invoice_expiry_leaves_time_to_hand_an_invoice_out() -> None:
    # A single-use link's invoice is handed out again only with REUSE_MIN_SECONDS left, and
    # holds the link (409) in its last REUSE_MIN_SECONDS: even the shortest one is handed out
    # for at least twice as long as it holds the link unused.
    assert MIN_LNURL_INVOICE_EXPIRY == 180
    assert MIN_LNURL_INVOICE_EXPIRY >= 3 * REUSE_MIN_SECONDS


# --- the jars' fields ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"name": "Coffee"}, "name must be 1 to 64 of a-z"),
        ({"name": "a" * 65}, "name must be"),
        ({"name": "tea@home"}, "name must be"),
        ({"name": "caf\u00e9"}, "name must be"),
        ({"description": ""}, "description must be printable, 1 to 640"),
        ({"description": "   "}, "description"),
        ({"description": "x" * 641}, "description is 641 characters; at most 640"),
        ({"description": "two\nlines"}, "description"),
        ({"min": "0sat"}, "min must be a whole number of sat from 1sat"),
        ({"min": "1500msat"}, "min must be a whole number of sat"),
        ({"max": "999msat"}, "max must be a whole number of sat"),
        ({"max": f"{MAX_PRICE_MSAT + 1000}msat"}, "max must be"),
        ({"min": "5sat", "max": "4sat"}, "min (5sat) must not be above max (4sat)"),
        ({"min": "1 BTC"}, "min: '1 BTC' is not an amount"),
        ({"min": "-1sat"}, "is not an amount"),
        ({"min": 1000}, 'write the amount with its unit: "1000sat" or "1000msat"'),
        ({"max": 2.5}, "max: write the amount with its unit"),
        ({"comment_max": -1}, "comment_max must be 0 to 600"),
        ({"comment_max": 601}, "comment_max must be 0 to 600"),
        ({"success_message": "x" * 145}, "success_message must be printable, at most 144"),
        ({"success_message": "a", "success_url": "https://pay.example.com/t"}, "not both"),
        ({"success_url": "https://pay.example.com/t"}, "needs success_url_description"),
        ({"success_url_description": "hi"}, "goes with a success_url"),
        (
            {"success_url": "http://pay.example.com/t", "success_url_description": "hi"},
            "success_url: plain http:// only",
        ),
        (
            {"success_url": "https://other.example.com/t", "success_url_description": "hi"},
            "success_url must be on [lnurl] base_url's host (pay.example.com)",
        ),
        ({"colour": "red"}, "unknown key(s) colour"),
    ],
)
def test_bad_jars_are_refused_naming_the_jar(
    tmp_path: Path, fields: dict[str, object], reason: str
) -> None:
    name = fields.get("name", "coffee")
    refused(tmp_path, BASE + jar(**fields), f"[[tip_jar]] {name!r}", reason)


def test_a_jar_needs_a_name_and_a_description(tmp_path: Path) -> None:
    refused(tmp_path, BASE + '[[tip_jar]]\nname = "coffee"\n', "[[tip_jar]] 'coffee': ", "a name")
    refused(tmp_path, BASE + '[[tip_jar]]\ndescription = "Tea"\n', "tip_jar[0]: ", "a name")
    refused(tmp_path, "tip_jar = [1]\n" + BASE, "tip_jar[0]: must be a table")
    refused(tmp_path, BASE + "tip_jar = 3\n", "[lnurl]")
    refused(tmp_path, 'tip_jar = "x"\n', "tip_jar must be an array of tables")


def test_a_long_description_is_said_by_its_length(tmp_path: Path) -> None:
    message = refused(tmp_path, BASE + jar(description="x" * 5000), "5000 characters")
    assert len(message) < 200


def test_jar_names_are_unique(tmp_path: Path) -> None:
    refused(tmp_path, BASE + jar() + jar(), "[[tip_jar]] name 'coffee' is used twice")


# --- images -------------------------------------------------------------------------------


def test_images_are_read_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "coffee.png").write_bytes(PNG)
    (tmp_path / "tea.jpg").write_bytes(JPEG)
    text = BASE + jar(image="art/coffee.png") + jar(name="tea", image=str(tmp_path / "tea.jpg"))
    coffee, tea = load_text(tmp_path, text).tip_jar
    assert coffee.image == tmp_path / "art" / "coffee.png"
    assert read_image(coffee.image) == Image("image/png", PNG)
    assert tea.image is not None
    assert read_image(tea.image) == Image("image/jpeg", JPEG)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "image: cannot read"),
        (b"GIF89a" + b"\x00" * 10, "is not a PNG or JPEG file"),
        (b"", "is not a PNG or JPEG file"),
        (PNG + b"\x00" * MAX_IMAGE_BYTES, "is over 100 KiB"),
    ],
)
def test_bad_images_are_refused(tmp_path: Path, content: bytes | None, reason: str) -> None:
    if content is not None:
        (tmp_path / "coffee.png").write_bytes(content)
    refused(tmp_path, BASE + jar(image="coffee.png"), "[[tip_jar]] 'coffee'", reason)


def test_an_image_of_exactly_the_limit_is_taken(tmp_path: Path) -> None:
    (tmp_path / "coffee.png").write_bytes(PNG.ljust(MAX_IMAGE_BYTES, b"\x00"))
    assert load_text(tmp_path, BASE + jar(image="coffee.png")).tip_jar[0].image is not None


# --- amounts and route services -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "msat"),
    [("1sat", 1000), ("1500msat", 1500), (" 21 sat ", 21_000), ("0msat", 0), ("7msat", 7)],
)
def test_parse_amount(text: str, msat: int) -> None:
    assert parse_amount(text) == msat


@pytest.mark.parametrize(
    "text", ["", "1", "sat", "1.5sat", "-1sat", "1 btc", "1SAT", "\u0661sat", "1" * 18 + "msat"]
)
def test_parse_amount_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="write a whole number of sat or msat"):
        parse_amount(text)


@pytest.mark.parametrize("service", ["tip:coffee", "link:abc", "a:b", ":"])
def test_route_services_cannot_hold_a_colon(tmp_path: Path, service: str) -> None:
    text = f'[[routes]]\npattern = "/api/*"\nprice_msat = 1000\nservice = "{service}"\n'
    refused(tmp_path, text, "routes[0]", "route '/api/*'", f"service {service!r}", "':'")


def test_config_defaults_compare_equal() -> None:
    assert Config().lnurl == LnurlConfig()
    assert Config().tip_jar == ()


# --- what the runtime makes of them -------------------------------------------------------


def test_tip_jars_become_what_tips_takes(tmp_path: Path) -> None:
    (tmp_path / "coffee.png").write_bytes(PNG)
    text = BASE + jar(
        min="10sat", max="20sat", comment_max=140, image="coffee.png", success_message="Ta"
    )
    config = load_text(tmp_path, text)
    assert runtime.tip_jars(config) == {
        "coffee": TipJar(
            name="coffee",
            description="Buy me a coffee",
            min_msat=Msat(10_000),
            max_msat=Msat(20_000),
            comment_allowed=140,
            image=Image("image/png", PNG),
            success=SuccessAction(message="Ta"),
        )
    }
    # An image replaced by a bad one after loading: named when the gateway starts.
    (tmp_path / "coffee.png").write_bytes(b"GIF89a")
    with pytest.raises(ConfigError, match=r"\[\[tip_jar\]\] 'coffee': image .* not a PNG or JPEG"):
        runtime.tip_jars(config)


async def test_running_gateway_fills_the_tips_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    backend = FakeInvoiceBackend(clock)
    monkeypatch.setattr(runtime, "LndClient", fake_lnd_client(backend))
    text = (
        placeholder_lnd(tmp_path)
        + f'[store]\nurl = "sqlite:{tmp_path / "g.db"}"\n'
        + BASE
        + "invoice_expiry = 300\n"
        + jar(min="1sat", max="100sat", comment_max=10)
    )
    config = load_text(tmp_path, text)
    slot = TipsSlot()
    async with runtime.running_gateway(config, clock=clock, watch=False, tips=slot):
        tips, limiter = slot.tips, slot.limiter
        assert isinstance(tips, Tips)
        assert limiter is not None
        assert tips.address("coffee") == "coffee@pay.example.com"
        request = await tips.jar_pay_request("coffee")
        assert request["callback"] == "https://pay.example.com/.well-known/lnurlp/coffee/callback"
        answer = await tips.jar_invoice("coffee", {"amount": "21000", "comment": "hi"})
        invoice = bolt11.decode(str(answer["pr"]))
        assert invoice.amount_msat == 21_000
        metadata = str(request["metadata"])
        assert invoice.description_hash == hashlib.sha256(metadata.encode()).digest()
    assert (slot.tips, slot.limiter) == (None, None)
    store = await SqliteStore.open(tmp_path / "g.db")
    try:
        record = await store.get_invoice(PaymentHash(invoice.payment_hash))
    finally:
        await store.close()
    assert record is not None
    assert (record.service, record.tip_jar, record.comment) == ("tip:coffee", "coffee", "hi")
    assert record.state is InvoiceState.OPEN
    assert record.expires_at - record.created_at == 300


async def test_without_lnurl_the_slot_stays_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    monkeypatch.setattr(runtime, "LndClient", fake_lnd_client(FakeInvoiceBackend(clock)))
    config = load_text(tmp_path, placeholder_lnd(tmp_path) + '[store]\nurl = "memory:"\n')
    slot = TipsSlot()
    async with runtime.running_runtime(config, clock=clock, watch=False) as running:
        assert running.tips is None
        assert running.invoice_limiter is None
    async with runtime.running_gateway(config, clock=clock, watch=False, tips=slot):
        assert slot.tips is None
