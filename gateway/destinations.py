"""Where a payee is paid: the one reader of a ``[[payee]]`` destination, used by the
configuration (to refuse a bad one at load) and by the payout worker (to pay it).

A destination is one of:

- a node's public key, 66 lower-case hex digits starting ``02`` or ``03``: paid by keysend;
- a Lightning Address (LUD-16), ``name@domain`` or ``name@host:port``: fetched from
  ``https://domain/.well-known/lnurlp/name``. The name is ``a-z``, ``0-9``, ``.``, ``_``,
  ``-`` (LUD-16) and ``+`` (the tags some services take); upper case is read as lower case,
  as the domain is;
- a bech32 LNURL (LUD-01, ``lnurl1...``): the URL it encodes;
- an ``lnurlp://`` URL (LUD-17): the same URL over ``https://``;
- the ``https://`` URL of the LNURL-pay service itself.

Each but a public key may follow ``lightning:``. No blanks anywhere, at most
``MAX_CHARS`` characters. A URL must be HTTPS, with a host (a name of letters, digits and
hyphens, an international one as punycode, its last label not a number; or an IP address),
no user or password, no fragment, no port 0. Plain ``http://`` is only for hosts that need no
TLS to be private: ``localhost``, a loopback address (``127.0.0.1``, ``::1``) and ``.onion``
hosts (LUD-17: onion services are plain HTTP).

``callback_url`` checks what a service's ``payRequest`` names as its callback: a public
service may not send the gateway to ``localhost``, a loopback, private or link-local address
(also one carried in an IPv6 address: NAT64, IPv4-compatible, 6to4, Teredo), or over plain
HTTP (a request into the merchant's own network); only a service on that same local host
may. A public host name that resolves to such an address is not caught here (no DNS lookup
is made).

Pure: ``yarl`` and the standard library (``gateway.config`` imports it; no asyncio).
"""

from __future__ import annotations

import ipaddress
import re

import yarl

from gateway import bech32
from gateway.lnurl import JAR_NAME
from gateway.text import printable

__all__ = [
    "MAX_CHARS",
    "DestinationError",
    "callback_url",
    "check",
    "is_pubkey",
    "pay_url",
    "url_allowed",
]

# Longer than any LNURL a service hands out (LUD-01 sets none; a QR code holds ~4000).
MAX_CHARS = 2048
_SHOWN = 100  # characters of a destination shown in a reason
_PUBKEY = re.compile(r"0[23][0-9a-f]{64}")
_HEX_KEY = re.compile(r"[0-9a-fA-F]{66}")
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_TOP_LABEL = re.compile(r"[a-z]")  # a last label of digits (127.1, 2130706433) is an address
_PLAIN_HTTP_NAMES = frozenset({"localhost"})
_PREFIX = "lightning:"


class DestinationError(ValueError):
    """The destination cannot be paid, whatever any service answers; the message says why
    (the destination shown escaped and cut short)."""


def is_pubkey(destination: str) -> bool:
    """Whether ``destination`` is a node's public key (66 lower-case hex digits, compressed):
    paid by keysend."""
    return _PUBKEY.fullmatch(destination) is not None


def check(destination: str) -> None:
    """``DestinationError`` unless ``destination`` is a public key or names an allowed
    LNURL-pay URL (``pay_url``)."""
    if not is_pubkey(destination):
        pay_url(destination)


def _shown(text: str) -> str:
    return repr(printable(text, _SHOWN))


def pay_url(destination: str) -> yarl.URL:
    """The URL of a destination's LNURL-pay service: ``name@domain`` ->
    ``https://domain/.well-known/lnurlp/name`` (``http://`` for a loopback or onion host),
    ``lnurl1...`` -> the URL it encodes, ``lnurlp://`` -> ``https://``, an ``https://`` URL
    as is. ``DestinationError`` for anything else (a public key included), or a URL not
    allowed (``url_allowed``)."""
    text = destination
    if len(text) > MAX_CHARS:
        raise DestinationError(f"more than {MAX_CHARS} characters: {_shown(text)}...")
    if not text or any(char.isspace() or not char.isprintable() for char in text):
        raise DestinationError(f"empty, or with blanks or control characters: {_shown(text)}")
    if text[: len(_PREFIX)].lower() == _PREFIX:
        text = text[len(_PREFIX) :]
    if _HEX_KEY.fullmatch(text):
        raise DestinationError(
            f"{_shown(destination)}: a node public key is 66 lower-case hex digits starting 02 "
            "or 03, written alone (it is paid by keysend)"
        )
    lowered = text.lower()
    if lowered.startswith("lnurl1"):
        encoded = _lnurl_url(text)
        return _parsed(encoded, f"the URL an LNURL encodes ({_shown(encoded)})")
    if lowered.startswith("lnurlp://"):  # LUD-17: https://, http:// for an onion service
        url = _parsed("https://" + text[len("lnurlp://") :], _shown(text))
        return url_allowed(url.with_scheme("http") if _plain_http_host(url) else url)
    if "://" in text:
        return _parsed(text, _shown(text))
    if "@" in text:
        return _address_url(text)
    raise DestinationError(
        f"not a node public key, Lightning Address, LNURL or https:// URL: {_shown(destination)}"
    )


def _parsed(text: str, what: str) -> yarl.URL:
    if not text.lower().startswith(("https://", "http://")):
        scheme = text.partition(":")[0]
        raise DestinationError(f"{what}: the scheme {_shown(scheme)} is not https://")
    try:
        url = yarl.URL(text)
    except ValueError:
        raise DestinationError(f"{what} is not a valid URL") from None
    return url_allowed(url)


def _lnurl_url(text: str) -> str:
    """The URL a bech32 LNURL encodes."""
    try:
        hrp, words = bech32.decode(text)
        if hrp != "lnurl":
            raise DestinationError(f"not an LNURL: its prefix is {_shown(hrp)}")
        return bech32.to_text(words)
    except bech32.Bech32Error as error:
        raise DestinationError(f"not a valid LNURL: {error}") from None


def _address_url(text: str) -> yarl.URL:
    """``https://domain/.well-known/lnurlp/name`` of a Lightning Address."""
    name, _, authority = text.lower().partition("@")
    if JAR_NAME.fullmatch(name) is None:
        raise DestinationError(
            f"{_shown(text)}: a Lightning Address's name is 1 to 64 of a-z, 0-9, '.', '_', "
            "'+' and '-'"
        )
    if not authority or any(char in authority for char in "@/?#\\%"):
        raise DestinationError(
            f"{_shown(text)}: a Lightning Address is name@domain (or name@host:port)"
        )
    try:
        url = yarl.URL(f"https://{authority}").with_path(f"/.well-known/lnurlp/{name}")
        url.explicit_port  # noqa: B018 - reading the port is the check
    except ValueError:
        raise DestinationError(f"{_shown(text)}: not a valid Lightning Address domain") from None
    return url_allowed(url.with_scheme("http") if _plain_http_host(url) else url)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _host(url: yarl.URL) -> str:
    """The URL's host as sent (lower case, punycode), checked: an IP address, or a name of
    labels of letters, digits and hyphens whose last one starts with a letter."""
    host = url.raw_host or ""
    if not host:
        raise DestinationError(f"no host in the URL {_shown(str(url))}")
    if _ip(host) is not None:
        return host
    labels = host.split(".")
    if (
        len(host) > 253
        or not all(_LABEL.fullmatch(label) for label in labels)
        or not _TOP_LABEL.match(labels[-1])
    ):
        raise DestinationError(f"not a valid host name: {_shown(host)}")
    return host


def _plain_http_host(url: yarl.URL) -> bool:
    """Whether ``url``'s host may be fetched without TLS: local (loopback) or onion."""
    host = (url.raw_host or "").lower()
    if host in _PLAIN_HTTP_NAMES or host.endswith(".onion"):
        return True
    address = _ip(host)
    return address is not None and address.is_loopback


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052, the well-known prefix
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215, local use
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # RFC 4291, deprecated
_IPV4_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")  # RFC 2765


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 one carries, which a gateway or tunnel on the way may
    deliver to: NAT64 (``64:ff9b::a.b.c.d``), IPv4-compatible (``::a.b.c.d``),
    IPv4-translated (``::ffff:0:a.b.c.d``), 6to4 (``2002:AABB:CCDD::``) and Teredo (its
    server and client). IPv4-mapped is read by ``_ip`` already."""
    low32 = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    found = []
    if address in _NAT64 or address in _IPV4_TRANSLATED:
        found.append(low32)
    if address in _IPV4_COMPATIBLE and int(address) > 1:  # not :: nor ::1 (IPv6's own)
        found.append(low32)
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address.teredo is not None:
        found.extend(address.teredo)
    return found


def _internal_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether ``address`` is not a public unicast one, or (IPv6) carries an IPv4 address
    that is not, or is in the NAT64 local-use prefix (a translator of the merchant's own)."""
    if isinstance(address, ipaddress.IPv6Address):
        if address in _NAT64_LOCAL:
            return True
        embedded = _embedded_ipv4(address)
        if any(_internal_address(ipv4) for ipv4 in embedded):
            return True
        if embedded and address.teredo is None:
            # NAT64, IPv4-compatible, -translated, 6to4: the IPv4 inside decides (Python
            # versions disagree on whether these prefixes are global: 3.13 says 6to4 is not).
            return False
    return not address.is_global or address.is_multicast


def _internal(url: yarl.URL) -> bool:
    """Whether ``url``'s host is this machine or a local network: ``localhost``, or an
    address that is not a public unicast one (loopback, private, link-local, shared,
    unspecified, reserved, multicast), including an IPv6 one that carries such an IPv4
    address (NAT64, IPv4-compatible, IPv4-translated, 6to4, Teredo)."""
    host = (url.raw_host or "").lower()
    if host in _PLAIN_HTTP_NAMES or host.endswith(".localhost"):
        return True
    address = _ip(host)
    return address is not None and _internal_address(address)


def url_allowed(url: yarl.URL) -> yarl.URL:
    """``url`` if it may be fetched: absolute, HTTPS (plain HTTP only for a loopback or onion
    host), a valid host, no credentials, no fragment, no port 0; else ``DestinationError``."""
    if not url.is_absolute():
        raise DestinationError(f"not an absolute URL: {_shown(str(url))}")
    host = _host(url)
    if url.user is not None or url.password is not None:
        raise DestinationError(f"a URL with a user or password is refused: {host}")
    if url.raw_fragment:
        raise DestinationError(f"a URL with a fragment (#) is refused: {_shown(str(url))}")
    if url.explicit_port == 0:
        raise DestinationError(f"a URL with port 0 is refused: {host}")
    if url.scheme == "https":
        return url
    if url.scheme == "http":
        if _plain_http_host(url):
            return url
        raise DestinationError(
            f"plain http:// only for localhost, a loopback address or .onion, not {host}"
        )
    raise DestinationError(f"not an https:// URL: {_shown(str(url))}")


def callback_url(service: yarl.URL, callback: str) -> yarl.URL:
    """The callback a service at ``service`` names, if it may be fetched: allowed as any URL
    (``url_allowed``), and plain HTTP, ``localhost`` or a loopback, private or link-local
    address only when the service itself is on that same host."""
    try:
        url = yarl.URL(callback)
    except ValueError:
        raise DestinationError("the payRequest's callback is no URL") from None
    url = url_allowed(url)
    if url.scheme == "http" or _internal(url):
        host = (url.raw_host or "").lower()
        if host != (service.raw_host or "").lower():
            raise DestinationError(
                f"the payRequest's callback is on a local or private address or plain "
                f"http:// ({host}), and the service is not on that host: refused"
            )
    return url
