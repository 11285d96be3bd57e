"""Signed webhooks: the verification helper (against the standardwebhooks package too), the
retry schedule, the ``[webhooks]`` and ``[[webhook]]`` configuration and the secrets."""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from standardwebhooks import Webhook

from gateway import errors
from gateway.config import WebhookEndpointConfig, WebhooksConfig, load_config
from gateway.config.webhooks import read_secret
from gateway.ports import WEBHOOK_EVENT_TYPES
from gateway.runtime import running_runtime
from gateway.webhooks import (
    new_secret,
    retry_delay,
    signed_headers,
    verify_delivery,
)
from tests.config_files import load_text, placeholder_lnd

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"o" * 32).decode()
NOW = 1_800_000_000
BODY = '{"data":{"amount_msat":7000},"timestamp":"2027-01-15T08:00:00.000Z","type":"token.bought"}'


MSG_ID = "msg_0123456789abcdef0123456789abcdef"


def delivery(
    secret: str = SECRET, msg_id: str = MSG_ID, at: int = NOW, body: str = BODY
) -> tuple[dict[str, str], bytes]:
    return signed_headers(secret, msg_id, at, body), body.encode()


# --- verify_delivery ---------------------------------------------------------------------------


def test_a_signed_delivery_verifies_and_gives_its_event() -> None:
    headers, body = delivery()
    assert headers["webhook-id"] == MSG_ID
    assert headers["webhook-timestamp"] == str(NOW)
    assert headers["webhook-signature"].startswith("v1,")
    assert verify_delivery(SECRET, headers, body, now=NOW + 10) == json.loads(BODY)


def test_the_standardwebhooks_package_accepts_what_the_gateway_signs() -> None:
    """Any Standard Webhooks receiver, not only ours, verifies the gateway's deliveries."""
    headers, body = delivery(at=int(time.time()))
    assert Webhook(SECRET).verify(body, headers) == json.loads(BODY)


def test_header_names_are_matched_in_any_case() -> None:
    headers, body = delivery()
    shouting = {name.upper(): value for name, value in headers.items()}
    assert verify_delivery(SECRET, shouting, body, now=NOW)["type"] == "token.bought"


@pytest.mark.parametrize(
    "tampered",
    [
        BODY.replace("7000", "9000").encode(),  # the amount changed on the way
        BODY.encode() + b" ",
        b"",
    ],
)
def test_a_tampered_body_is_rejected(tampered: bytes) -> None:
    headers, _ = delivery()
    with pytest.raises(errors.WebhookRejected, match="no matching signature"):
        verify_delivery(SECRET, headers, tampered, now=NOW)


def test_a_changed_id_or_timestamp_or_a_wrong_secret_is_rejected() -> None:
    headers, body = delivery()
    for changed in (
        {**headers, "webhook-id": MSG_ID.replace("0", "1")},
        {**headers, "webhook-timestamp": str(NOW + 1)},
    ):
        with pytest.raises(errors.WebhookRejected, match="no matching signature"):
            verify_delivery(SECRET, changed, body, now=NOW)
    with pytest.raises(errors.WebhookRejected, match="no matching signature"):
        verify_delivery(OTHER_SECRET, headers, body, now=NOW)


@pytest.mark.parametrize("offset", [-301, 301, -86_400])
def test_a_replayed_or_future_delivery_is_rejected(offset: int) -> None:
    """A genuine delivery captured and sent again later is refused by its timestamp."""
    headers, body = delivery()
    with pytest.raises(errors.WebhookRejected, match="outside the tolerance"):
        verify_delivery(SECRET, headers, body, now=NOW - offset)
    assert verify_delivery(SECRET, headers, body, now=NOW - offset, tolerance=90_000)


def test_several_signatures_verify_if_one_matches() -> None:
    """Standard Webhooks rotates secrets by sending several space-separated signatures."""
    headers, body = delivery()
    other, _ = delivery(OTHER_SECRET)
    joined = f"v1a,xx {other['webhook-signature']} {headers['webhook-signature']}"
    assert verify_delivery(SECRET, {**headers, "webhook-signature": joined}, body, now=NOW)


@pytest.mark.parametrize(
    "changes",
    [
        {"webhook-id": ""},
        {"webhook-id": "msg_\udcff"},  # a byte that is not UTF-8, as aiohttp decodes it
        {"webhook-timestamp": "soon"},
        {"webhook-timestamp": "1e9"},
        {"webhook-timestamp": "٣٣"},  # digits, but not ASCII ones
        {"webhook-timestamp": "9" * 40},
        {"webhook-signature": "v1"},
        {"webhook-signature": "v1,@@@"},
        {"webhook-signature": "v2,AAAA"},
        {"webhook-signature": ","},
    ],
)
def test_malformed_headers_are_rejected_with_nothing_else(changes: dict[str, str]) -> None:
    headers, body = delivery()
    with pytest.raises(errors.WebhookRejected):
        verify_delivery(SECRET, {**headers, **changes}, body, now=NOW)


def test_a_body_that_is_not_utf8_or_not_a_json_object_is_rejected() -> None:
    headers, _ = delivery()
    with pytest.raises(errors.WebhookRejected, match="UTF-8"):
        verify_delivery(SECRET, headers, b"\xff\xfe", now=NOW)
    for text in ("[1, 2]", "not json"):
        signed, body = delivery(body=text)
        with pytest.raises(errors.WebhookRejected, match="JSON"):
            verify_delivery(SECRET, signed, body, now=NOW)


def test_a_malformed_secret_is_a_config_error() -> None:
    headers, body = delivery()
    with pytest.raises(errors.ConfigError):
        verify_delivery("whsec_", headers, body, now=NOW)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["webhook-id", "webhook-timestamp", "webhook-signature", "x"]),
        st.text(max_size=40),
    ),
    st.binary(max_size=64),
)
def test_anything_a_sender_sends_raises_nothing_but_rejected(
    headers: dict[str, str], body: bytes
) -> None:
    # Only WebhookRejected: without a signature made with the secret nothing verifies.
    with pytest.raises(errors.WebhookRejected):
        verify_delivery(SECRET, headers, body, now=NOW)


def test_a_new_secret_is_a_standard_webhooks_secret() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret[6:])) == 32
    assert new_secret() != secret
    headers, body = delivery(secret)
    assert verify_delivery(secret, headers, body, now=NOW)


# --- the retry schedule ------------------------------------------------------------------------


def test_the_backoff_doubles_up_to_its_cap() -> None:
    delays = [retry_delay(attempts, 5.0, 60.0) for attempts in range(1, 8)]
    assert delays == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0, 60.0]
    assert retry_delay(10_000, 1.0, 3600.0) == 3600.0


# --- configuration ------------------------------------------------------------------------------

ENDPOINT = """
[[webhook]]
name = "crm"
url = "https://crm.example.com/hooks?key=abc"
events = ["invoice.settled", "token.bought"]
secret_env = "CRM_SECRET"
"""


def test_endpoints_and_retry_settings_load(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        "[webhooks]\nmax_attempts = 3\ninitial_backoff = 0.5\n"
        + ENDPOINT
        + '[[webhook]]\nname = "all"\nurl = "http://127.0.0.1:9/x"\nevents = ["*"]\n'
        + 'secret_file = "/nonexistent/secret"\n',
        environ={"GATEWAY_WEBHOOKS_MAX_BACKOFF": "30"},
    )
    assert (config.webhooks.max_attempts, config.webhooks.initial_backoff) == (3, 0.5)
    assert config.webhooks.max_backoff == 30.0
    crm, every = config.webhook
    assert crm.subscribed == frozenset({"invoice.settled", "token.bought"})
    assert every.subscribed == WEBHOOK_EVENT_TYPES
    assert load_text(tmp_path, "").webhook == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (ENDPOINT.replace('"token.bought"', '"token.sold"'), "token.sold"),
        (ENDPOINT + ENDPOINT, "used twice"),
        (ENDPOINT.replace("https://crm", "ftp://crm"), "http:// or https://"),
        (ENDPOINT.replace("https://crm.example.com", "https://"), "with a host"),
        # Hosts the resolver cannot encode: an empty label, one NFKC folding empties, a long one.
        (ENDPOINT.replace("crm.example.com", "crm..example.com"), "labels of 1 to 63"),
        (ENDPOINT.replace("crm.example.com", "\u2488.example.com"), "labels of 1 to 63"),
        (ENDPOINT.replace("crm.example.com", "c" * 64 + ".example.com"), "labels of 1 to 63"),
        (ENDPOINT.replace("crm.example.com", "crm.example.com:99999"), "port from 1 to 65535"),
        (ENDPOINT.replace("crm.example.com", "crm.example.com:0"), "port from 1 to 65535"),
        (ENDPOINT.replace("crm.example.com", "crm.example.com:http"), "port from 1 to 65535"),
        (ENDPOINT.replace('secret_env = "CRM_SECRET"', ""), "exactly one"),
        (ENDPOINT + 'secret_file = "/x"\n', "exactly one"),
        (ENDPOINT.replace('["invoice.settled", "token.bought"]', "[]"), "non-empty"),
        (ENDPOINT.replace('"crm"', '"c r m"'), "name"),
        (ENDPOINT + "colour = 1\n", "unknown key"),
        ("[webhooks]\nmax_attempts = 0\n", "max_attempts"),
        ("[webhooks]\ninitial_backoff = 10\nmax_backoff = 5\n", "initial_backoff"),
        ("webhook = 3\n", "array of tables"),
    ],
)
def test_a_bad_webhook_configuration_is_refused_at_load(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(errors.ConfigError, match=message) as refused:
        load_text(tmp_path, text)
    assert "key=abc" not in str(refused.value)  # a URL's credential is never shown


def test_a_secret_is_read_from_its_file_or_variable(tmp_path: Path) -> None:
    secret_file = tmp_path / "crm.whsec"
    secret_file.write_text(SECRET + "\n")
    secret_file.chmod(0o600)
    config = load_text(
        tmp_path,
        ENDPOINT + f'[[webhook]]\nname = "b"\nurl = "http://h/"\nevents = ["*"]\n'
        f'secret_file = "{secret_file}"\n',
    )
    crm, other = config.webhook
    assert read_secret(crm, {"CRM_SECRET": SECRET}) == SECRET
    assert read_secret(other) == SECRET


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "not set"),
        ("abc", "must start with whsec_"),
        ("whsec_!!!", "not base64"),
        ("whsec_" + base64.b64encode(b"short").decode(), "24 to 64 bytes"),
    ],
)
def test_a_bad_secret_is_refused_without_showing_it(
    tmp_path: Path, value: str, message: str
) -> None:
    (crm,) = load_text(tmp_path, ENDPOINT).webhook
    with pytest.raises(errors.ConfigError, match=message) as refused:
        read_secret(crm, {"CRM_SECRET": value} if value else {})
    if value:
        assert value not in str(refused.value)


def test_a_missing_secret_file_is_a_config_error(tmp_path: Path) -> None:
    (endpoint,) = load_text(
        tmp_path,
        '[[webhook]]\nname = "a"\nurl = "http://h/"\nevents = ["*"]\n'
        f'secret_file = "{tmp_path / "missing"}"\n',
    ).webhook
    with pytest.raises(errors.ConfigError, match="cannot read secret_file"):
        read_secret(endpoint)


SAMPLE = Path(__file__).resolve().parents[2] / "gateway" / "gateway.sample.toml"


def test_the_sample_documents_every_webhook_key_and_its_example_loads(tmp_path: Path) -> None:
    text = SAMPLE.read_text()
    for cls in (WebhooksConfig, WebhookEndpointConfig):
        for f in dataclasses.fields(cls):
            assert f"{f.name} =" in text, f"{cls.__name__}.{f.name} is not in the sample"
    assert load_config(SAMPLE, environ={}).webhooks == WebhooksConfig()
    # The commented [[webhook]] example, uncommented, is a valid endpoint.
    example = text[text.index("# [[webhook]]") :].split("\n\n", 1)[0]
    uncommented = "\n".join(line.removeprefix("# ") for line in example.splitlines())
    (endpoint,) = load_text(tmp_path, uncommented).webhook
    assert endpoint.name == "crm"
    assert endpoint.subscribed == frozenset({"invoice.settled", "token.bought"})


async def test_serve_refuses_a_missing_secret_before_opening_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CRM_SECRET", raising=False)
    database = tmp_path / "gateway.db"
    config = load_text(
        tmp_path,
        f'[store]\nurl = "sqlite://{database}"\n' + placeholder_lnd(tmp_path) + ENDPOINT,
    )
    with pytest.raises(errors.ConfigError, match="CRM_SECRET is not set"):
        async with running_runtime(config):
            pytest.fail("started without the endpoint's secret")
    assert not database.exists()
