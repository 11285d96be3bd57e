"""Client-chosen text shown to people: the escaping helper, and the invoice memo built with it."""

from __future__ import annotations

import pytest

from gateway import l402
from gateway.cli.formats import utc_time
from gateway.cli.pay import offer_text
from gateway.client import Budget
from gateway.client.offer import Offer
from gateway.ports import Msat
from gateway.pricing import Pricing, Rule
from gateway.service import MEMO_LIMIT, L402Service, PaymentChallenge, RequestInfo
from gateway.store import MemoryStore
from gateway.text import printable, whole_number
from tests.fakes import FakeClock, FakeInvoiceBackend

# What a hostile client puts in a path: clear screen and cursor home, a window title (OSC),
# a bell, a forged line, backspaces, a C1 CSI, DEL, and a right-to-left override.
HOSTILE = "/a\x1b[2J\x1b[H\x1b]0;pwned\x07\r\nSETTLED 999\x08\x08\x9b31m\x7f\u202eevil\u2066"


RULE = Rule("/*", price_msat=Msat(1_000), service="api")


def is_safe(text: str) -> bool:
    return text.isprintable()


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("/plain/path-1.json", "/plain/path-1.json"),
        ("\x1b[2J", "\\x1b[2J"),
        ("\x07\x08\x7f", "\\x07\\x08\\x7f"),
        ("a\r\nb\tc", "a\\x0d\\x0ab\\x09c"),
        ("\x00", "\\x00"),
        ("\x9b\x85", "\\x9b\\x85"),
        ("\u202eevil\u202c", "\\u202eevil\\u202c"),
        ("\u2066\u2069\u200e\u200b\ufeff", "\\u2066\\u2069\\u200e\\u200b\\ufeff"),
        ("\u2028\u2029", "\\u2028\\u2029"),
        ("\U000e0001", "\\U000e0001"),  # a tag character (format, invisible)
        ("caf\u00e9 \u65e5\u672c", "caf\u00e9 \u65e5\u672c"),  # printable non-ASCII stays
        ("a\\x1b", "a\\\\x1b"),  # a literal backslash cannot pass for an escape
    ],
)
def test_printable_escapes_what_a_terminal_or_wallet_would_act_on(raw: str, shown: str) -> None:
    assert printable(raw) == shown
    assert is_safe(printable(raw))


def test_printable_cuts_at_the_limit_but_never_inside_an_escape() -> None:
    assert printable("ab\x1bcd", 3) == "ab"  # "\x1b" would need 4 more characters
    assert printable("ab\x1bcd", 6) == "ab\\x1b"
    assert printable("abc", 0) == ""
    assert printable("abc", 10) == "abc"
    assert printable("abcdef", 4) == "abcd"
    assert printable("caf\u00e9 \u65e5\u672c", 5) == "caf\u00e9 "
    cut = printable(HOSTILE * 10, MEMO_LIMIT)
    assert len(cut) <= MEMO_LIMIT
    assert is_safe(cut)
    with pytest.raises(ValueError, match="limit"):
        printable("abc", -1)


def service(backend: FakeInvoiceBackend, clock: FakeClock) -> L402Service:
    return L402Service(
        pricing=Pricing([RULE]),
        backend=backend,
        store=MemoryStore(),
        clock=clock,
    )


async def test_the_memo_escapes_a_hostile_path() -> None:
    clock = FakeClock()
    backend = FakeInvoiceBackend(clock)
    gateway = service(backend, clock)
    request = RequestInfo("GET", HOSTILE, "203.0.113.7")
    decision = await gateway.challenge(request, RULE, l402.ChallengeReason.PAYMENT_REQUIRED)
    assert isinstance(decision, PaymentChallenge)
    (invoice,) = backend.invoices.values()
    assert is_safe(invoice.memo)
    assert len(invoice.memo) <= MEMO_LIMIT
    assert invoice.memo.startswith("api: GET /a\\x1b[2J\\x1b[H\\x1b]0;pwned\\x07\\x0d\\x0aSETTLED")


async def test_a_bidi_override_reaching_the_memo_through_authorize_is_escaped() -> None:
    clock = FakeClock()
    backend = FakeInvoiceBackend(clock)
    decision = await service(backend, clock).authorize(
        RequestInfo("GET", "/files/\u202egpj.exe", "203.0.113.7")
    )
    assert isinstance(decision, PaymentChallenge)
    (invoice,) = backend.invoices.values()
    assert invoice.memo == "api: GET /files/\\u202egpj.exe"


async def test_a_long_escaped_memo_stays_within_the_limit_without_a_torn_escape() -> None:
    clock = FakeClock()
    backend = FakeInvoiceBackend(clock)
    gateway = service(backend, clock)
    path = "/" + "x" * 106 + "\u202e" * 10  # the first escape would end past character 120
    request = RequestInfo("GET", path, "203.0.113.7")
    await gateway.challenge(request, RULE, l402.ChallengeReason.PAYMENT_REQUIRED)
    (invoice,) = backend.invoices.values()
    assert invoice.memo == "api: GET /" + "x" * 106
    assert len(invoice.memo) <= MEMO_LIMIT


@pytest.mark.parametrize(
    ("text", "max_digits", "number"),
    [
        ("0", 19, 0),
        ("9" * 19, 19, 10**19 - 1),
        ("9" * 20, 19, None),
        ("9" * 5000, 19, None),  # int() refuses over 4300 digits
        ("\u00b2", 19, None),  # isdigit() takes it, int() does not
        ("\u0663", 19, None),  # an Arabic-Indic digit: int() takes it, HTTP does not
        ("", 19, None),
        ("-1", 19, None),
        (" 1", 19, None),
        ("12", 1, None),
    ],
)
def test_whole_number_is_ascii_digits_of_bounded_length(
    text: str, max_digits: int, number: int | None
) -> None:
    assert whole_number(text, max_digits) == number


def test_pay_shows_a_time_past_the_calendar_without_crashing() -> None:
    # A peer may set an invoice expiry of any size (BOLT 11's x field has no bound).
    assert utc_time(2**2000) == "after 9999-12-31 23:59:59"
    assert utc_time(2**60) == "after 9999-12-31 23:59:59"
    assert utc_time(0) == "1970-01-01 00:00:00"
    offer = shown_offer("fortune", expires_at=2**2000, valid_until=2**63 - 1)
    text = offer_text(offer, Budget(max_price_msat=1000))
    assert "expires:  after 9999-12-31 23:59:59 UTC" in text
    assert "token:    valid until after 9999-12-31 23:59:59 UTC" in text


def shown_offer(description: str, expires_at: int = 0, valid_until: int | None = None) -> Offer:
    """An offer as ``pay --no-pay`` shows it, with what a server chose."""
    return Offer(
        scheme="L402",
        macaroon_b64="AgEEbHNhdA",
        invoice="lnbcrt10n1example",
        payment_hash=b"\x00" * 32,
        amount_msat=1000,
        network="regtest",
        destination="02" + "ab" * 32,
        description=description,
        created_at=0,
        expires_at=expires_at,
        valid_until=valid_until,
        services=("api",),
    )


def test_pay_shows_the_server_chosen_description_escaped() -> None:
    text = offer_text(shown_offer("fortune\x1b[2J\x1b[Hpaid: 0 sat\u202e"), Budget(1000))
    assert "\x1b" not in text
    assert "\u202e" not in text
    assert "for:      fortune\\x1b[2J\\x1b[Hpaid: 0 sat\\u202e" in text
