"""First-party caveats (``key=value`` text) and the rules that check them against a request.

Keys understood, ``<svc>`` being a service name:

==========================  ==========================================  =====================
key                         value                                       from
==========================  ==========================================  =====================
``services``                ``name:tier[,name:tier...]``, tier an int   Aperture
``<svc>_capabilities``      ``cap[,cap...]`` (may be empty)             Aperture
``<svc>_valid_until``       unix seconds, decimal digits                Aperture
``<svc>_paths``             ``glob[,glob...]``, fnmatch-style           this gateway
``<svc>_methods``           ``METHOD[,METHOD...]``                      this gateway
``preimage``                64 hex chars, either case                   Aperture's client
==========================  ==========================================  =====================

Semantics of :func:`check_caveats` (a macaroon holder can append caveats but never remove
one, so every rule below only ever narrows what a token grants):

* Every caveat must hold. A later caveat therefore narrows and can never widen: a second
  ``services`` caveat must also list the service; the effective ``valid_until`` is the
  minimum; capabilities are the intersection of all ``<svc>_capabilities`` caveats; the path
  must match some glob of *every* ``<svc>_paths`` caveat, the method every ``<svc>_methods``.
* A ``services`` caveat is required and must list the request's service. Tiers are ordered
  privilege levels: the lowest tier any ``services`` caveat gives the service wins.
* Without a ``<svc>_capabilities`` caveat capabilities are unrestricted
  (``GrantedScope.capabilities is None``); otherwise every capability the request requires
  must be in the intersection.
* ``valid_until <= now`` rejects ("token expired").
* Caveats for *other* services (``othersvc_valid_until`` ...) are ignored, values unread.
* ``preimage``: Aperture's client library (lnget's too) appends the proof of payment to the
  macaroon it sends back. It holds when it is the credential's own preimage (compared in
  constant time); one that differs or is not 64 hex characters rejects the token, and so
  does any ``preimage`` caveat when the caller has no preimage to compare with.
* Fail closed: a key the verifier does not know, a malformed value of a known key, or a
  caveat that does not parse rejects the token. An unknown caveat never grants anything.
* Globs use :func:`fnmatch.fnmatchcase`: case-sensitive, and ``*`` also matches ``/``
  (``/api/*`` covers ``/api/a/b``). The caller must pass the decoded, normalized path it
  routes on; a path with ``.`` or ``..`` segments is refused when a paths caveat applies.
* Methods compare case-insensitively (both sides upper-cased); ``GET`` does not imply
  ``HEAD``.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from .errors import ChallengeReason, MalformedToken, TokenInsufficient, TokenRejected

__all__ = [
    "Caveat",
    "GrantedScope",
    "RequestScope",
    "capabilities_caveat",
    "check_caveats",
    "methods_caveat",
    "paths_caveat",
    "services_caveat",
    "valid_until_caveat",
]

SERVICES = "services"
PREIMAGE = "preimage"
_CAPABILITIES = "_capabilities"
_VALID_UNTIL = "_valid_until"
_PATHS = "_paths"
_METHODS = "_methods"
_SUFFIXES = (_CAPABILITIES, _VALID_UNTIL, _PATHS, _METHODS)
# Service names may not contain the separators of the services caveat value.
_SERVICE_RE = re.compile(r"[^\s,:=]+")
_ITEM_RE = re.compile(r"[^\s,]+")
_METHOD_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_ITEM_LIST_RE = re.compile(r"[^\s,]+(?:,[^\s,]+)*")
_METHOD_LIST_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+(?:,[!#$%&'*+\-.^_`|~0-9A-Za-z]+)*")
_MAX_INT_DIGITS = 18
_HEX64_RE = re.compile(r"[0-9A-Fa-f]{64}")


@dataclass(frozen=True, slots=True)
class Caveat:
    """One first-party caveat, ``key=value``."""

    key: str
    value: str

    def __post_init__(self) -> None:
        if not self.key:
            raise ValueError("caveat has an empty key")
        if "=" in self.key:
            raise ValueError("caveat key contains '='")
        if not (self.key.isprintable() and self.value.isprintable()):
            raise ValueError("caveat contains non-printable characters")

    @classmethod
    def parse(cls, text: str | bytes) -> Caveat:
        """Split at the first ``=``; MalformedToken if that is impossible or unsafe."""
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError:
                raise MalformedToken("caveat is not UTF-8") from None
        key, sep, value = text.partition("=")
        if not sep:
            raise MalformedToken("caveat has no '='")
        try:
            return cls(key, value)
        except ValueError as exc:  # __post_init__ holds the rules; its messages are fixed text
            raise MalformedToken(str(exc)) from None

    def format(self) -> str:
        """The ``key=value`` text that goes into the macaroon."""
        return f"{self.key}={self.value}"


@dataclass(frozen=True, slots=True)
class RequestScope:
    """What a request wants: checked against the token's caveats."""

    service: str
    method: str
    path: str
    required_capabilities: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class GrantedScope:
    """What the caveats grant for the request's service."""

    service: str
    tier: int
    capabilities: frozenset[str] | None
    valid_until: int | None


def check_caveats(
    caveats: Sequence[Caveat],
    request: RequestScope,
    now: float,
    *,
    preimage: bytes | None = None,
) -> GrantedScope:
    """Check every caveat against ``request``; TokenRejected with a reason if one fails.

    ``preimage`` is the credential's, for ``preimage`` caveats; without it they reject.
    """
    service = request.service
    tier: int | None = None
    capabilities: frozenset[str] | None = None
    valid_until: int | None = None
    method_ok = path_ok = True
    for caveat in caveats:
        key = caveat.key
        if key == SERVICES:
            listed = _tier_for(caveat.value, service)
            if listed is None:
                raise TokenInsufficient(ChallengeReason.OTHER_SERVICE)
            tier = listed if tier is None else min(tier, listed)
            continue
        if key == PREIMAGE:
            _check_preimage(caveat.value, preimage)
            continue
        target, suffix = _split_key(key)
        if target != service:
            continue  # another service's caveat (unknown keys were rejected by _split_key)
        value = caveat.value
        if suffix == _VALID_UNTIL:
            until = _parse_uint(value)
            valid_until = until if valid_until is None else min(valid_until, until)
        elif suffix == _CAPABILITIES:
            caps = frozenset(_parse_list(value, _ITEM_LIST_RE, allow_empty=True))
            capabilities = caps if capabilities is None else capabilities & caps
        elif suffix == _METHODS:
            methods = {m.upper() for m in _parse_list(value, _METHOD_LIST_RE)}
            method_ok = method_ok and request.method.upper() in methods
        else:
            globs = _parse_list(value, _ITEM_LIST_RE)
            path_ok = path_ok and _path_allowed(request.path, globs)
    if tier is None:
        raise TokenRejected("token has no services caveat")
    if valid_until is not None and valid_until <= now:
        raise TokenInsufficient(ChallengeReason.EXPIRED)
    if not method_ok:
        raise TokenInsufficient(ChallengeReason.METHOD_NOT_ALLOWED)
    if not path_ok:
        raise TokenInsufficient(ChallengeReason.PATH_NOT_ALLOWED)
    if capabilities is not None and not request.required_capabilities <= capabilities:
        raise TokenInsufficient(ChallengeReason.MISSING_CAPABILITY)
    return GrantedScope(service, tier, capabilities, valid_until)


def services_caveat(service: str, tier: int = 0) -> str:
    """``services=<service>:<tier>``."""
    _check_service(service)
    if tier < 0:
        raise ValueError("tier must not be negative")
    return f"{SERVICES}={service}:{tier}"


def capabilities_caveat(service: str, capabilities: Iterable[str]) -> str:
    """``<service>_capabilities=a,b``; an empty list grants no capability."""
    return _list_caveat(service, _CAPABILITIES, capabilities, _ITEM_RE)


def valid_until_caveat(service: str, unix_seconds: int) -> str:
    """``<service>_valid_until=<unix seconds>``."""
    _check_service(service)
    if unix_seconds < 0:
        raise ValueError("valid_until must not be negative")
    return f"{service}{_VALID_UNTIL}={int(unix_seconds)}"


def paths_caveat(service: str, globs: Iterable[str]) -> str:
    """``<service>_paths=<glob>[,<glob>...]`` (fnmatch-style, no commas or spaces)."""
    items = list(globs)
    if not items:
        raise ValueError("paths caveat needs at least one glob")
    return _list_caveat(service, _PATHS, items, _ITEM_RE)


def methods_caveat(service: str, methods: Iterable[str]) -> str:
    """``<service>_methods=GET,POST`` (upper-cased)."""
    items = [m.upper() for m in methods]
    if not items:
        raise ValueError("methods caveat needs at least one method")
    return _list_caveat(service, _METHODS, items, _METHOD_RE)


def _check_service(service: str) -> None:
    if not _SERVICE_RE.fullmatch(service) or not service.isprintable():
        raise ValueError("service name must be printable, without spaces, ',', ':' or '='")


def _list_caveat(service: str, suffix: str, items: Iterable[str], pattern: re.Pattern[str]) -> str:
    _check_service(service)
    values = list(items)
    for item in values:
        if not pattern.fullmatch(item) or not item.isprintable():
            raise ValueError(f"invalid item in {suffix[1:]} caveat")
    return f"{service}{suffix}={','.join(values)}"


def _split_key(key: str) -> tuple[str, str]:
    """``<svc><suffix>`` -> (svc, suffix); TokenRejected for any other key."""
    for suffix in _SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], suffix
    raise TokenRejected("unknown caveat")


def _check_preimage(value: str, preimage: bytes | None) -> None:
    if preimage is None:
        raise TokenRejected("unknown caveat")
    if not _HEX64_RE.fullmatch(value):
        raise TokenRejected("malformed preimage caveat")
    # compare_digest: timing must not tell how much of a guessed preimage matched.
    if not hmac.compare_digest(bytes.fromhex(value), preimage):
        raise TokenRejected("preimage caveat does not match")


def _tier_for(value: str, service: str) -> int | None:
    """The (lowest) tier ``value`` lists for ``service``, None if not listed."""
    found: int | None = None
    for entry in value.split(","):
        name, sep, tier_text = entry.partition(":")
        if not sep or not _SERVICE_RE.fullmatch(name):
            raise TokenRejected("malformed services caveat")
        tier = _parse_uint(tier_text)
        if name == service:
            found = tier if found is None else min(found, tier)
    return found


def _parse_uint(text: str) -> int:
    if not (0 < len(text) <= _MAX_INT_DIGITS and text.isascii() and text.isdigit()):
        raise TokenRejected("malformed caveat value")
    return int(text)


def _parse_list(value: str, pattern: re.Pattern[str], allow_empty: bool = False) -> list[str]:
    if not value and allow_empty:
        return []
    if not pattern.fullmatch(value):
        raise TokenRejected("malformed caveat value")
    return value.split(",")


def _path_allowed(path: str, globs: Sequence[str]) -> bool:
    # A dot segment could match a glob here yet resolve elsewhere in the backend.
    if "." in path and any(seg in (".", "..") for seg in path.split("/")):
        return False
    return any(fnmatchcase(path, glob) for glob in globs)
