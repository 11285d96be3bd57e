"""The L402 cookies: a browser's credentials, set by the paywall once its invoice is paid.

One cookie per grant a token carries (``L402-<service>``, with a digest of the tier and
capabilities when it has them), scoped to the path prefix of its service's routes: a token
bought on one page opens the service's other pages, buying another grant does not replace
it, and a browser holds at most one cookie per grant. Reading them from ``Cookie`` headers
(``L402`` too), the ``Path`` they are set for, and keeping them (bearer secrets, like
``Authorization``) out of what the core hands to a price function.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

COOKIE_NAME = "L402"
_SERVICE_NAME = re.compile(r"[A-Za-z0-9_.-]+")
# Request headers a price function (user code, which may log what it gets) never sees.
_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization"})
# A cookie Path must be ASCII without ';', ',', spaces, '%' (the path here is decoded; the
# browser matches the encoded one) or control characters; other paths are cut at the last
# '/' before such a character.
_COOKIE_PATH_CHARS = re.compile(r"[A-Za-z0-9\-._~/!$&'()*+=:@]*")


def cookie_path(path: str) -> str:
    """A ``Path`` cookie attribute for ``path``: itself when it is safe to put in a
    ``Set-Cookie`` header and matches the URL a browser sends, else its longest safe
    directory (a wider cookie scope is harmless: the token's caveats decide what it opens).
    """
    safe = _COOKIE_PATH_CHARS.match(path)
    end = safe.end() if safe is not None else 0
    if end == len(path) and path.startswith("/"):
        return path
    cut = path.rfind("/", 0, end)
    return path[:cut] if cut > 0 else "/"


def cookie_name(service: str, tier: int = 0, capabilities: frozenset[str] | None = None) -> str:
    """The name of the cookie for a grant (a new token of one grant replaces the old one)."""
    name = f"{COOKIE_NAME}-{service}" if _SERVICE_NAME.fullmatch(service) else COOKIE_NAME
    if tier == 0 and capabilities is None and (name != COOKIE_NAME or not service):
        return name
    caps = "*" if capabilities is None else ",".join(sorted(capabilities))
    digest = hashlib.sha256(f"{service}\n{tier}\n{caps}".encode()).hexdigest()[:8]
    return f"{name}~{digest}"  # '~' is in no service name


def is_l402_cookie(name: str) -> bool:
    return name == COOKIE_NAME or name.startswith((COOKIE_NAME + "-", COOKIE_NAME + "~"))


def l402_cookie_values(cookie_headers: Iterable[str]) -> tuple[str, ...]:
    """The values of every L402 cookie in a request's ``Cookie`` headers, in order."""
    values: list[str] = []
    for header in cookie_headers:
        for pair in header.split(";"):
            name, sep, value = pair.partition("=")
            if sep and is_l402_cookie(name.strip()):
                value = value.strip()
                if len(value) > 1 and value[0] == value[-1] == '"':
                    value = value[1:-1]
                if value:
                    values.append(value)
    return tuple(values)


def without_l402_cookie(cookie_header: str) -> str | None:
    """A ``Cookie`` header value without the L402 cookies (bearer secrets); None if empty."""
    kept = [
        pair.strip()
        for pair in cookie_header.split(";")
        if pair.strip() and not is_l402_cookie(pair.partition("=")[0].strip())
    ]
    return "; ".join(kept) or None


def headers_for_pricing(headers: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """``RequestInfo.headers``: the request's headers without its credentials
    (``Authorization``, ``Proxy-Authorization``, the L402 cookie)."""
    return tuple(
        (name, value if name.lower() != "cookie" else without_l402_cookie(value) or "")
        for name, value in headers
        if name.lower() not in _SECRET_HEADERS
    )
