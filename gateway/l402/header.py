"""HTTP header grammar of L402: the ``WWW-Authenticate`` challenge and the ``Authorization``
credential.

Challenge (server -> client), one header per scheme, in this order::

    L402 macaroon="<b64>", invoice="<bolt11>", version="0", token="<b64>"
    LSAT macaroon="<b64>", invoice="<bolt11>", version="0", token="<b64>"

The current spec names the macaroon ``token``; Aperture and most clients read ``macaroon``,
so both are sent. Many clients match a fixed pattern instead of parsing parameters, and only
on the first ``WWW-Authenticate`` value: Aperture's Go client and lnget want
``<scheme> macaroon="..", invoice=".."`` right after the scheme, and so does the
``l402-requests`` client. Both values above satisfy that and the spec.

A 401 (an invalid credential) carries a parameter-only challenge, RFC 6750 style, with no
invoice (a bad credential must not mint invoices)::

    L402 realm="<realm>", error="invalid_token", error_description="<reason>"

Credential (client -> server)::

    Authorization: L402 <b64 macaroon>[,<b64 macaroon>...]:<64 hex chars preimage>

The scheme (``L402`` or legacy ``LSAT``) is case-insensitive, the hex may be upper case, the
base64 standard or URL-safe, padded or not.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import MalformedToken
from .macaroon import Macaroon, decode_b64, encode_b64

__all__ = [
    "MAX_AUTHORIZATION_CHARS",
    "MAX_SETTLE_TIMEOUT",
    "Challenge",
    "Credential",
    "format_authorization",
    "format_challenge",
    "format_error_challenge",
    "parse_authorization",
    "parse_challenge",
]

MAX_AUTHORIZATION_CHARS = 8 * 1024
# The longest backend time a pay-on-success 402 may announce (``L402-Settle: on-success;
# timeout=<s>``): the gateway's ``hold.backend_timeout`` is at most this, and its clients
# believe no more (a held payment locks the payer's funds meanwhile).
MAX_SETTLE_TIMEOUT = 86_400.0
# A challenge carries a whole macaroon (up to 64 KiB, base64 twice) and an invoice.
_MAX_CHALLENGE_CHARS = 256 * 1024
_SCHEMES = {"l402": "L402", "lsat": "LSAT"}
_KNOWN_VERSIONS = frozenset({"0"})

_TCHARS = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = r'"(?:[\t !#-\[\]-~\x80-\U0010ffff]|\\[\t -~\x80-\U0010ffff])*"'
_SCHEME_RE = re.compile(_TCHARS)
# Unquoted values are read leniently (RFC 9110 wants a token): some servers send bare base64.
_PARAM_RE = re.compile(rf"({_TCHARS})[ \t]*=[ \t]*(?:([^\s,\"]+)|({_QUOTED}))")
_TOKEN68_RE = re.compile(r"[A-Za-z0-9\-._~+/]+=*(?=[ \t]*(?:,|$))")
_OWS_RE = re.compile(r"[ \t]*")
_LIST_SEP_RE = re.compile(r"[ \t,]*")
_UNESCAPE_RE = re.compile(r"\\(.)", re.DOTALL)
_B64_RE = re.compile(r"[A-Za-z0-9+/_\-]+=*")
_INVOICE_RE = re.compile(r"[A-Za-z0-9]+")
_HEX64_RE = re.compile(r"[0-9A-Fa-f]{64}")
# Only one macaroon is ever accepted; a few more still parse so the verifier can say why.
_MAX_MACAROONS = 8
# RFC 6750 section 3: error and error_description are %x20-21 / %x23-5B / %x5D-7E.
_UNSAFE_PARAM_RE = re.compile(r"[^\x20-\x21\x23-\x5b\x5d-\x7e]")
_ERROR_CODE_RE = re.compile(r"[\x20-\x21\x23-\x5b\x5d-\x7e]+")
_MAX_PARAM_CHARS = 200
_GRAMMAR = "credentials must be <macaroon>:<hex preimage>"


@dataclass(frozen=True, slots=True)
class Challenge:
    """A parsed L402/LSAT challenge (``version`` is None when the server sent none)."""

    scheme: str
    macaroon_b64: str
    invoice: str
    version: str | None


@dataclass(frozen=True, slots=True)
class Credential:
    """The macaroons and the 32-byte preimage from an ``Authorization`` header."""

    scheme: str
    macaroons: tuple[Macaroon, ...]
    preimage: bytes


def format_challenge(macaroon_b64: str, invoice: str, scheme: str = "L402") -> str:
    """A ``WWW-Authenticate`` value; send one for ``L402`` and one for ``LSAT``."""
    if scheme not in ("L402", "LSAT"):
        raise ValueError("scheme must be 'L402' or 'LSAT'")
    # Both values go inside quotes: refuse anything that could break out of them.
    if not _B64_RE.fullmatch(macaroon_b64):
        raise ValueError("macaroon_b64 is not base64 text")
    if not _INVOICE_RE.fullmatch(invoice):
        raise ValueError("invoice is not a bech32 string")
    # macaroon then invoice first: see the module docstring for the clients that need it.
    return (
        f'{scheme} macaroon="{macaroon_b64}", invoice="{invoice}", '
        f'version="0", token="{macaroon_b64}"'
    )


def format_error_challenge(realm: str, error: str, description: str = "") -> str:
    """A parameter-only ``WWW-Authenticate`` value for a 401: no macaroon, no invoice.

    Characters RFC 6750 does not allow in these values (quotes, backslashes, control
    characters such as CR and LF, non-ASCII) are dropped, so any text is safe to pass.
    """
    params = [f'realm="{_param_text(realm) or "l402-gateway"}"']
    if not _ERROR_CODE_RE.fullmatch(error):
        raise ValueError("error must be an RFC 6750 error code")
    params.append(f'error="{error}"')
    text = _param_text(description)
    if text:
        params.append(f'error_description="{text}"')
    return "L402 " + ", ".join(params)


def _param_text(text: str) -> str:
    return _UNSAFE_PARAM_RE.sub("", text)[:_MAX_PARAM_CHARS].strip(" ")


def parse_challenge(header_value: str) -> Challenge:
    """The first L402 (else LSAT) challenge in a ``WWW-Authenticate`` value.

    The value may hold several comma-separated challenges (HTTP clients often join repeated
    headers that way); other schemes are skipped, and so are parameter-only L402 challenges
    (a 401's ``realm``/``error``: nothing to pay). Parameters may come in any order, quoted
    or not; ``token`` and ``macaroon`` are synonyms and must agree when both are present.
    """
    if len(header_value) > _MAX_CHALLENGE_CHARS:
        raise MalformedToken("challenge is too large")
    chosen: tuple[str, dict[str, str]] | None = None
    error_only = False
    for scheme, params in _parse_challenges(header_value):
        canonical = _SCHEMES.get(scheme.lower())
        if canonical is None:
            continue
        if not params.keys() & {"token", "macaroon", "invoice"}:
            error_only = True
            continue
        if chosen is None or (canonical == "L402" and chosen[0] == "LSAT"):
            chosen = (canonical, params)
    if chosen is None:
        raise MalformedToken("challenge has no invoice" if error_only else "no L402 challenge")
    scheme, params = chosen
    token = params.get("token")
    macaroon = params.get("macaroon")
    if token is not None and macaroon is not None and token != macaroon:
        raise MalformedToken("challenge token and macaroon differ")
    mac_b64 = token if token is not None else macaroon
    invoice = params.get("invoice")
    if not mac_b64 or not _B64_RE.fullmatch(mac_b64):
        raise MalformedToken("challenge has no valid macaroon")
    if not invoice or not _INVOICE_RE.fullmatch(invoice):
        raise MalformedToken("challenge has no valid invoice")
    version = params.get("version")
    if version is not None and version not in _KNOWN_VERSIONS:
        raise MalformedToken("unsupported L402 version")
    return Challenge(scheme, mac_b64, invoice, version)


def format_authorization(
    macaroons: Sequence[Macaroon], preimage: bytes, scheme: str = "L402"
) -> str:
    """An ``Authorization`` value: ``L402 <b64>[,<b64>...]:<hex>``."""
    if scheme not in ("L402", "LSAT"):
        raise ValueError("scheme must be 'L402' or 'LSAT'")
    if not macaroons:
        raise ValueError("at least one macaroon is required")
    if len(preimage) != 32:
        raise ValueError("preimage must be 32 bytes")
    return f"{scheme} {','.join(encode_b64(m) for m in macaroons)}:{preimage.hex()}"


def parse_authorization(values: Sequence[str]) -> Credential | None:
    """The L402 credential among *all* ``Authorization`` values of a request.

    None if no value uses the L402 or LSAT scheme (the request may use another scheme).
    Several L402/LSAT values are an error (MalformedToken "several L402 credentials in one
    request"), never "last one wins": which token a request is judged by must not depend on
    header order that proxies may change. One exception: Aperture's own Go client sends the
    same credential twice, once as ``LSAT`` and once as ``L402``; values that carry exactly
    the same macaroons and preimage are one credential, reported under ``L402`` if any used it.
    """
    if isinstance(values, str):
        raise TypeError("pass the list of all Authorization values, not one string")
    found: list[Credential] = []
    for value in values:
        scheme, rest = _split_scheme(value)
        canonical = _SCHEMES.get(scheme.lower())
        if canonical is None:
            continue
        if len(value) > MAX_AUTHORIZATION_CHARS:
            raise MalformedToken("authorization header is too large")
        found.append(_parse_credential(canonical, rest))
    if not found:
        return None
    first = found[0]
    for other in found[1:]:
        if other.macaroons != first.macaroons or other.preimage != first.preimage:
            raise MalformedToken("several L402 credentials in one request")
    for credential in found:
        if credential.scheme == "L402":
            return credential
    return first


def _split_scheme(value: str) -> tuple[str, str]:
    """``"<scheme> <rest>"`` -> (scheme, rest), tolerating tabs and extra blanks."""
    value = value.strip(" \t")
    cut = value.find(" ")
    tab = value.find("\t")
    if tab != -1 and (cut == -1 or tab < cut):
        cut = tab
    if cut == -1:
        return value, ""
    return value[:cut], value[cut + 1 :].lstrip(" \t")


def _parse_credential(scheme: str, rest: str) -> Credential:
    if not rest:
        raise MalformedToken("missing L402 credentials")
    macaroons_text, colon, preimage_hex = rest.rpartition(":")
    if not colon or not _HEX64_RE.fullmatch(preimage_hex):
        raise MalformedToken(_GRAMMAR)
    if macaroons_text.count(",") >= _MAX_MACAROONS:
        raise MalformedToken("too many macaroons")
    texts = [part.strip(" \t") for part in macaroons_text.split(",")]
    if not all(_B64_RE.fullmatch(text) for text in texts):
        raise MalformedToken(_GRAMMAR)
    macaroons = tuple(decode_b64(text) for text in texts)
    return Credential(scheme, macaroons, bytes.fromhex(preimage_hex))


def _parse_challenges(text: str) -> list[tuple[str, dict[str, str]]]:
    """RFC 9110 challenge list: ``scheme [token68 | param *(, param)]`` separated by commas."""
    challenges: list[tuple[str, dict[str, str]]] = []
    pos = 0
    end = len(text)
    while True:
        pos = _end(_LIST_SEP_RE, text, pos)
        if pos >= end:
            return challenges
        scheme_match = _SCHEME_RE.match(text, pos)
        if scheme_match is None:
            raise MalformedToken("challenge has no valid scheme")
        scheme = scheme_match.group()
        params: dict[str, str] = {}
        challenges.append((scheme, params))
        pos = scheme_match.end()
        after_ws = _end(_OWS_RE, text, pos)
        if after_ws >= end or text[after_ws] == ",":
            pos = after_ws
            continue  # a scheme without parameters
        if after_ws == pos:
            raise MalformedToken("challenge scheme must be followed by a space")
        pos = after_ws
        param = _PARAM_RE.match(text, pos)
        if param is None:
            token68 = _TOKEN68_RE.match(text, pos)
            if token68 is None:
                raise MalformedToken("challenge parameters are malformed")
            pos = token68.end()
            continue
        while param is not None:
            name = param.group(1).lower()
            if name in params:
                raise MalformedToken("challenge repeats a parameter")
            quoted = param.group(3)
            params[name] = (
                param.group(2) if quoted is None else _UNESCAPE_RE.sub(r"\1", quoted[1:-1])
            )
            pos = _end(_OWS_RE, text, param.end())
            if pos >= end:
                return challenges
            if text[pos] != ",":
                raise MalformedToken("challenge parameters are malformed")
            pos = _end(_LIST_SEP_RE, text, pos)
            # Another parameter of this challenge, or the scheme of the next one.
            param = _PARAM_RE.match(text, pos)


def _end(pattern: re.Pattern[str], text: str, pos: int) -> int:
    match = pattern.match(text, pos)
    return pos if match is None else match.end()
