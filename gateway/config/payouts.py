"""Revenue splits: the payees (``[[payee]]``), how they are paid (``[payouts]``), and the
load-time checks that tie them to the routes' ``split`` lists.

A payee::

    [[payee]]
    name = "carol"                     # a-z, 0-9, '-', '_'; what routes' split names
    destination = "carol@example.com"  # pubkey (keysend), Lightning Address, lnurl1, https://
    threshold_msat = 100000            # paid once this much is accrued
    every = 0                          # seconds; > 0: also paid what is accrued this often
    fee_limit_ppm = 10000              # fee limit: max(fee_limit_min_msat, amount * ppm / 1e6)
    fee_limit_min_msat = 2000
    fees_paid_by = "merchant"          # or "payee": the fee limit comes out of the payout

``[[payee]]`` tables are read only from the file, like ``[[webhook]]``; ``[payouts]`` is a
section like the others (``GATEWAY_PAYOUTS_INTERVAL``, ...).
"""

from __future__ import annotations

import ipaddress
import math
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.config.checks import MAX_LIFETIME, positive, require
from gateway.config.routes import RouteConfig
from gateway.errors import ConfigError
from gateway.pricing import MAX_PRICE_MSAT
from gateway.splits import PAYEE_NAME

FEES_PAID_BY = ("merchant", "payee")
MAX_RETRY_SECONDS = 86_400.0
# Where a plain http:// LNURL service is acceptable: this host, or Tor (encrypted already).
_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
_PUBKEY = re.compile(r"0[23][0-9a-f]{64}")
# LUD-16: the user part of a Lightning Address.
_ADDRESS_USER = re.compile(r"[a-z0-9._+-]{1,64}")
_HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,62}\.)*[A-Za-z0-9-]{1,63}")
_BECH32 = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_BECH32_GENERATOR = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)


@dataclass(frozen=True, slots=True)
class PayoutsConfig:
    """``[payouts]``: the worker that pays the payees their accrued shares."""

    # A macaroon of the [lnd] node that may send payments; default [credit] payment_macaroon.
    payment_macaroon: Path | None = None
    interval: float = 10.0  # seconds between the worker's passes (it also wakes on settlements)
    # A payee whose payout failed waits retry_initial seconds, doubling up to retry_max.
    retry_initial: float = 10.0
    retry_max: float = 600.0

    def __post_init__(self) -> None:
        interval = self.interval
        require(
            math.isfinite(interval) and 0.01 <= interval <= 3600,
            "interval",
            "0.01 to 3600 seconds",
            interval,
        )
        initial, most = self.retry_initial, self.retry_max
        require(
            positive(initial) and math.isfinite(most) and initial <= most <= MAX_RETRY_SECONDS,
            "retry_initial / retry_max",
            f"more than 0, retry_initial <= retry_max <= {MAX_RETRY_SECONDS:g}",
            f"{initial:g} / {most:g}",
        )


@dataclass(frozen=True, slots=True)
class PayeeConfig:
    """One ``[[payee]]``: who gets shares of the routes that name it, and when and how it is
    paid (the fields of ``gateway.service.payout.PayeeTerms``)."""

    name: str
    destination: str
    threshold_msat: int = 100_000
    every: float = 0.0
    fee_limit_ppm: int = 10_000
    fee_limit_min_msat: int = 2_000
    fees_paid_by: str = "merchant"

    def __post_init__(self) -> None:
        require(
            PAYEE_NAME.fullmatch(self.name) is not None,
            "name",
            "1 to 64 of a-z, 0-9, '-' and '_', starting with a letter or digit",
            self.name,
        )
        problem = destination_problem(self.destination)
        if problem is not None:
            raise ValueError(f"destination {problem}")
        threshold = self.threshold_msat
        require(
            1 <= threshold <= MAX_PRICE_MSAT,
            "threshold_msat",
            f"1 to {MAX_PRICE_MSAT}",
            threshold,
        )
        every = self.every
        require(
            math.isfinite(every) and 0 <= every <= MAX_LIFETIME,
            "every",
            f"0 (only the threshold) to {MAX_LIFETIME} seconds",
            every,
        )
        ppm = self.fee_limit_ppm
        require(0 <= ppm <= 1_000_000, "fee_limit_ppm", "0 to 1000000", ppm)
        least = self.fee_limit_min_msat
        require(0 <= least <= MAX_PRICE_MSAT, "fee_limit_min_msat", f"0 to {MAX_PRICE_MSAT}", least)
        paid_by = self.fees_paid_by
        require(paid_by in FEES_PAID_BY, "fees_paid_by", " or ".join(FEES_PAID_BY), paid_by)

    @property
    def payee_pays_fee(self) -> bool:
        return self.fees_paid_by == "payee"

    @property
    def keysend(self) -> bool:
        """Paid by keysend to a node (else an invoice is fetched over LNURL-pay)."""
        return _PUBKEY.fullmatch(self.destination) is not None


def destination_problem(destination: str) -> str | None:
    """What is wrong with a payee's destination (the text after ``destination``), or None:
    a node public key (66 hex digits, lower case), a Lightning Address (``name@domain``),
    a bech32 ``lnurl1...``, an ``lnurlp://`` (LUD-17) or an ``https://`` LNURL-pay URL
    (``http://`` only for localhost, 127.0.0.1, ::1 and .onion hosts), as
    ``gateway.client.lnurl.pay_url`` reads them."""
    forms = (
        "must be a node public key (66 hex digits), a Lightning Address (name@domain), "
        "an lnurl1... or an https:// LNURL-pay URL"
    )
    text = destination
    if not text or any(char.isspace() or not char.isprintable() for char in text):
        return f"{forms}, got {text!r}"
    if re.fullmatch(r"[0-9a-fA-F]{66}", text):
        if _PUBKEY.fullmatch(text) is None:
            return f"{text!r}: a node public key is 66 lower-case hex digits starting 02 or 03"
        return None
    if text.lower().startswith("lnurl1"):
        url = _lnurl_url(text)
        if url is None:
            return f"{text[:12]!r}...: not a valid bech32 lnurl"
        problem = _url_problem(url)
        return None if problem is None else f"lnurl1...: it encodes a URL that {problem}"
    if text.lower().startswith("lnurlp://"):  # LUD-17: https://, or http:// for onion
        problem = _url_problem("https://" + text[len("lnurlp://") :])
        return None if problem is None else f"{forms}; the URL {problem}"
    if "://" in text:
        problem = _url_problem(text)
        return None if problem is None else f"{forms}; the URL {problem}"
    if "@" in text:
        user, _, host = text.partition("@")
        if _ADDRESS_USER.fullmatch(user) is None:
            return (
                f"{text!r}: a Lightning Address's name is 1 to 64 of a-z, 0-9, '.', '_', "
                "'+' and '-'"
            )
        if not _address_host(host):
            return f"{text!r}: a Lightning Address needs a domain after the '@'"
        return None
    return f"{forms}, got {text!r}"


def _address_host(host: str) -> bool:
    """``domain`` or ``domain:port`` (a test's LNURL server listens on a port of its own)."""
    try:
        parts = urllib.parse.urlsplit(f"//{host}")
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError:
        return False
    name = parts.hostname or ""
    if parts.netloc != host or not name or parts.username is not None or parts.path:
        return False
    return _HOST_NAME.fullmatch(name) is not None or _is_ip(name)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _url_problem(url: str) -> str | None:
    """Why an LNURL-pay URL is unusable, or None."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError:
        return "is not a valid URL"
    host = (parts.hostname or "").lower()
    if not host or any(char.isspace() for char in url):
        return "has no host"
    if parts.username is not None:
        return "must not hold a user or password"
    if parts.scheme == "https":
        return None
    if parts.scheme == "http":
        if host in _LOCAL_HOSTS or host.endswith(".onion"):
            return None
        return "is http://: only https:// (http:// only for localhost and .onion hosts)"
    return f"has scheme {parts.scheme!r}: use https://"


def _lnurl_url(text: str) -> str | None:
    """The URL a bech32 ``lnurl1...`` encodes (LUD-01), or None if it is not one."""
    if text.lower() != text and text.upper() != text:
        return None
    text = text.lower()
    separator = text.rfind("1")
    hrp, data = text[:separator], text[separator + 1 :]
    if hrp != "lnurl" or len(data) < 7 or any(char not in _BECH32 for char in data):
        return None
    words = [_BECH32.index(char) for char in data]
    check = 1
    for value in [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp] + words:
        top = check >> 25
        check = (check & 0x1FFFFFF) << 5 ^ value
        for bit in range(5):
            check ^= _BECH32_GENERATOR[bit] if (top >> bit) & 1 else 0
    if check != 1:
        return None
    number, bits = 0, 0
    decoded = bytearray()
    for word in words[:-6]:
        number, bits = number << 5 | word, bits + 5
        if bits >= 8:
            bits -= 8
            decoded.append(number >> bits & 0xFF)
    try:
        return decoded.decode("utf-8")
    except UnicodeDecodeError:
        return None


def check_payees(payees: Sequence[PayeeConfig]) -> None:
    """Names are unique: they key the ledger."""
    seen: set[str] = set()
    for payee in payees:
        if payee.name in seen:
            raise ConfigError(f"[[payee]] name {payee.name!r} is used twice")
        seen.add(payee.name)


def check_splits(
    routes: Sequence[RouteConfig],
    payees: Sequence[PayeeConfig],
    payouts: PayoutsConfig,
    credit_macaroon: Path | None,
) -> list[str]:
    """``ConfigError`` for a route's split naming no ``[[payee]]``, or payees without a
    macaroon to pay them with; the warnings (a payee no route names)."""
    names = {payee.name for payee in payees}
    named: set[str] = set()
    for index, route in enumerate(routes):
        for share in route.shares:
            if share.payee not in names:
                raise ConfigError(
                    f"routes[{index}]: split names payee {share.payee!r}, which no [[payee]] "
                    "defines"
                )
            named.add(share.payee)
    if payees and payouts.payment_macaroon is None and credit_macaroon is None:
        raise ConfigError(
            "[[payee]] needs [payouts] payment_macaroon (or [credit] payment_macaroon): a "
            "macaroon that may send payments, to pay the payees"
        )
    return [
        f"[[payee]] {payee.name!r}: no route's split names it (it is still paid what it "
        "has accrued)"
        for payee in payees
        if payee.name not in named
    ]
