"""Tips and payment links: ``[lnurl]`` (the public origin wallets reach) and the
``[[tip_jar]]`` tables (LNURL-pay endpoints with a Lightning Address each).

A tip jar::

    [[tip_jar]]
    name = "coffee"                   # coffee@<base_url's host>: a-z, 0-9, ".", "_", "+", "-"
    description = "Buy me a coffee"   # what the wallet shows (LUD-06 text/plain)
    min = "1sat"                      # amounts: "1000sat" or "1500msat", whole sat for a jar
    max = "1000000sat"
    comment_max = 140                 # LUD-12 commentAllowed; 0: no comments
    image = "coffee.png"              # PNG or JPEG, at most 100 KiB, relative to this file
    success_message = "Thank you!"    # LUD-09: a message, or
    success_url = "https://..."       # a URL on base_url's host with success_url_description

``[[tip_jar]]`` tables are read only from the file, like ``[[payee]]``; ``[lnurl]`` is a
section like the others (``GATEWAY_LNURL_BASE_URL``, ``GATEWAY_LNURL_INVOICE_EXPIRY``).
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yarl

from gateway import destinations
from gateway.config.checks import display_text, require
from gateway.errors import ConfigError
from gateway.lnurl import (
    JAR_NAME,
    MAX_COMMENT_CHARS,
    MAX_IMAGE_BYTES,
    MAX_SUCCESS_CHARS,
    Image,
    SuccessAction,
)
from gateway.pricing import MAX_PRICE_MSAT
from gateway.splits import MAX_DIGITS

__all__ = ["LnurlConfig", "TipJarConfig", "check_tip_jars", "parse_amount", "read_image"]

MAX_DESCRIPTION = 640  # a wallet shows it on one screen
# An LNURL invoice must outlive the wallet's fetch, check and payment; a day at most (not
# checks.MAX_INVOICE_EXPIRY, LND's year for an L402 challenge's).
# A single-use link's invoice is handed out again only with a minute left
# (gateway.service.tips.REUSE_MIN_SECONDS): shorter ones would be replaced at once.
MIN_LNURL_INVOICE_EXPIRY = 180
MAX_LNURL_INVOICE_EXPIRY = 86_400
_AMOUNT = re.compile(rf"([0-9]{{1,{MAX_DIGITS}}})\s*(msat|sat)")


def parse_amount(text: str) -> int:
    """``"1000sat"`` or ``"1500msat"`` (a blank before the unit allowed) in msat;
    ``ValueError`` saying how to write one. Stricter than the command line's
    ``formats.sat_to_msat`` on purpose: the unit is required (a bare number beside the
    ``*_msat`` keys of a file is ambiguous) and the number whole (no ``0.5``)."""
    match = _AMOUNT.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"{text!r} is not an amount: write a whole number of sat or msat, e.g. 1000sat "
            "or 1500msat"
        )
    number, unit = match.groups()
    return int(number) * (1000 if unit == "sat" else 1)


def _origin(base_url: str) -> yarl.URL:
    """``base_url`` checked: an http(s) origin wallets may fetch (``destinations.url_allowed``:
    https, plain http only for a loopback or onion host), no path, query or fragment."""
    try:
        url = destinations.url_allowed(yarl.URL(base_url))
    except (ValueError, destinations.DestinationError) as error:
        raise ValueError(f"base_url {base_url!r}: {error}") from None
    if url.raw_path not in ("", "/") or url.raw_query_string or base_url.endswith(("?", "#")):
        raise ValueError(
            "base_url must be an origin only (https://pay.example.com), without a path, query "
            "or fragment: wallets fetch https://<host>/.well-known/lnurlp/<name>, got "
            f"{base_url!r}"
        )
    return url.origin()


@dataclass(frozen=True, slots=True)
class LnurlConfig:
    """``[lnurl]``: tip jars (LNURL-pay, Lightning Addresses) and payment links; off while
    ``base_url`` is empty."""

    # The public origin wallets and browsers reach the gateway at; a Lightning Address is
    # name@<its host>. https (valid certificate at the domain root); http only for
    # localhost, a loopback address or .onion.
    base_url: str = ""
    invoice_expiry: int = 600  # seconds a tip's or a link's invoice can be paid

    def __post_init__(self) -> None:
        if self.base_url:
            _origin(self.base_url)
        expiry = self.invoice_expiry
        require(
            MIN_LNURL_INVOICE_EXPIRY <= expiry <= MAX_LNURL_INVOICE_EXPIRY,
            "invoice_expiry",
            f"{MIN_LNURL_INVOICE_EXPIRY} to {MAX_LNURL_INVOICE_EXPIRY} seconds",
            expiry,
        )

    @property
    def enabled(self) -> bool:
        return bool(self.base_url)

    @property
    def origin(self) -> str:
        """``base_url`` normalized: scheme and host in lower case, no default port, no
        trailing slash (``https://pay.example.com``); "" when off."""
        return str(_origin(self.base_url)) if self.base_url else ""

    @property
    def domain(self) -> str:
        """The origin's host[:port], what a Lightning Address ends with; "" when off."""
        return urllib.parse.urlsplit(self.origin).netloc

    @property
    def reached_by(self) -> str:
        """Who alone can reach ``base_url``: ``"wallets on this machine"`` (localhost, a
        loopback address), ``"wallets over Tor"`` (.onion); "" for any other host."""
        host = (yarl.URL(self.origin).raw_host or "") if self.base_url else ""
        if host.endswith(".onion"):
            return "wallets over Tor"
        try:
            loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
        except ValueError:
            loopback = host == "localhost" or host.endswith(".localhost")
        return "wallets on this machine" if loopback else ""


@dataclass(frozen=True, slots=True)
class TipJarConfig:
    """One ``[[tip_jar]]``: a Lightning Address ``name@host`` and its LNURL-pay terms (the
    fields of ``gateway.service.tips.TipJar``; the image read by ``read_image``)."""

    name: str
    description: str
    min: str = "1sat"
    max: str = "1000000sat"
    comment_max: int = 0
    image: Path | None = None  # relative: to the config file's directory (the loader)
    success_message: str = ""
    success_url: str = ""
    success_url_description: str = ""

    def __post_init__(self) -> None:
        require(
            JAR_NAME.fullmatch(self.name) is not None,
            "name",
            "1 to 64 of a-z, 0-9, '.', '_', '+' and '-' (the part before @)",
            self.name,
        )
        text = self.description
        if len(text) > MAX_DESCRIPTION:  # said by its length: the text would fill the screen
            raise ValueError(
                f"description is {len(text)} characters; at most {MAX_DESCRIPTION} (what a "
                "wallet shows on one screen)"
            )
        require(
            bool(text.strip()) and display_text(text, MAX_DESCRIPTION),
            "description",
            f"printable, 1 to {MAX_DESCRIPTION} characters",
            text,
        )
        least, most = self.min_msat, self.max_msat
        for key, amount in (("min", least), ("max", most)):
            # LUD-06 counts msat, but wallets send whole sat: a jar asks for them.
            require(
                amount % 1000 == 0 and 1000 <= amount <= MAX_PRICE_MSAT,
                key,
                f"a whole number of sat from 1sat to {MAX_PRICE_MSAT // 1000}sat",
                getattr(self, key),
            )
        if least > most:
            raise ValueError(f"min ({self.min}) must not be above max ({self.max})")
        comments = self.comment_max
        require(
            0 <= comments <= MAX_COMMENT_CHARS, "comment_max", f"0 to {MAX_COMMENT_CHARS}", comments
        )
        self._check_success()

    def _check_success(self) -> None:
        for key in ("success_message", "success_url_description"):
            text = getattr(self, key)
            require(
                display_text(text, MAX_SUCCESS_CHARS),
                key,
                f"printable, at most {MAX_SUCCESS_CHARS} characters (LUD-09)",
                text,
            )
        if self.success_message and self.success_url:
            raise ValueError("set success_message or success_url, not both (LUD-09: one action)")
        if self.success_url:
            if not self.success_url_description:
                raise ValueError(
                    "success_url needs success_url_description (what the wallet shows with it)"
                )
            try:
                destinations.url_allowed(yarl.URL(self.success_url))
            except (ValueError, destinations.DestinationError) as error:
                raise ValueError(f"success_url: {error}") from None
        elif self.success_url_description:
            raise ValueError("success_url_description goes with a success_url")

    @property
    def success(self) -> SuccessAction | None:
        """What the wallet shows once paid (LUD-09), if anything."""
        if self.success_url:
            return SuccessAction(url=self.success_url, description=self.success_url_description)
        return SuccessAction(message=self.success_message) if self.success_message else None

    @property
    def min_msat(self) -> int:
        return _amount("min", self.min)

    @property
    def max_msat(self) -> int:
        return _amount("max", self.max)


def _amount(key: str, text: str) -> int:
    try:
        return parse_amount(text)
    except ValueError as error:
        raise ValueError(f"{key}: {error}") from None


def read_image(path: Path) -> Image:
    """A tip jar's image (PNG or JPEG, by its first bytes); ``ValueError`` saying why it
    cannot be used."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_IMAGE_BYTES + 1)
    except OSError as error:
        raise ValueError(f"image: cannot read {path}: {error.strerror}") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(
            f"image {path} is over {MAX_IMAGE_BYTES // 1024} KiB (LUD-06: wallets get it "
            "with every payRequest): make it smaller"
        )
    try:
        return Image.of(data)
    except ValueError:
        raise ValueError(f"image {path} is not a PNG or JPEG file") from None


def check_tip_jars(jars: Sequence[TipJarConfig], lnurl: LnurlConfig) -> None:
    """What ties the jars together and to ``[lnurl]``: names unique, a base_url to serve
    them at, images usable, success URLs on base_url's host (LUD-09: wallets check it)."""
    if jars and not lnurl.enabled:
        raise ConfigError(
            "[[tip_jar]] needs [lnurl] base_url: the public https:// origin wallets reach the "
            "gateway at (the Lightning Address is name@<its host>)"
        )
    seen: set[str] = set()
    host = yarl.URL(lnurl.origin).raw_host if lnurl.enabled else None
    for jar in jars:
        where = f"[[tip_jar]] {jar.name!r}"
        if jar.name in seen:
            raise ConfigError(f"[[tip_jar]] name {jar.name!r} is used twice")
        seen.add(jar.name)
        if jar.image is not None:
            try:
                read_image(jar.image)
            except ValueError as error:
                raise ConfigError(f"{where}: {error}") from None
        if jar.success_url and yarl.URL(jar.success_url).raw_host != host:
            raise ConfigError(
                f"{where}: success_url must be on [lnurl] base_url's host ({host}): wallets "
                "refuse a success URL on another domain (LUD-09)"
            )
