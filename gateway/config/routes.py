"""``[[routes]]``: one route rule's config, and the warnings about rules that are likely
mistakes (``load_config`` logs them)."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.config.checks import MAX_LIFETIME, display_text, require
from gateway.pricing import MAX_PRICE_MSAT


@dataclass(frozen=True, slots=True)
class RouteConfig:
    pattern: str
    methods: tuple[str, ...] = ()
    price_msat: int | None = None
    price_function: str | None = None  # "package.module:function"
    free: bool = False
    lifetime: int = 3600
    service: str = "api"
    tier: int = 0
    capabilities: tuple[str, ...] = ()
    # Shown on the paywall page: what the payment buys, in words.
    title: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        for key, limit in (("title", 100), ("description", 500)):
            text = getattr(self, key)
            require(display_text(text, limit), key, f"printable, at most {limit} characters", text)
        if self.price_msat is not None:
            price = self.price_msat
            require(
                0 < price <= MAX_PRICE_MSAT,
                "price_msat",
                f"1 to {MAX_PRICE_MSAT} (100,000 BTC, the most LND puts in an invoice)",
                price,
            )
        lifetime = self.lifetime
        require(
            0 < lifetime <= MAX_LIFETIME, "lifetime", f"1 to {MAX_LIFETIME} (ten years)", lifetime
        )
        require(self.tier >= 0, "tier", ">= 0", self.tier)


# RFC 9110's methods, PATCH (RFC 5789) and WebDAV's (RFC 4918).
STANDARD_METHODS = frozenset(
    {
        "GET",
        "HEAD",
        "POST",
        "PUT",
        "DELETE",
        "CONNECT",
        "OPTIONS",
        "TRACE",
        "PATCH",
        "PROPFIND",
        "PROPPATCH",
        "MKCOL",
        "COPY",
        "MOVE",
        "LOCK",
        "UNLOCK",
    }
)
_GLOB = re.compile(r"[*?\[]")


def route_warnings(routes: Sequence[RouteConfig]) -> list[str]:
    """What in ``routes`` is likely a mistake: one line each (``load_config`` logs them).

    Legal but suspect: a method no client uses, a pattern with brackets (a character class)
    or blanks around it, and a rule that can never match because an earlier one matches
    every request it would (the first matching rule decides).
    """
    warnings = []
    for index, route in enumerate(routes):
        where = f"routes[{index}] {route.pattern!r}"
        for method in sorted({m.upper() for m in route.methods} - STANDARD_METHODS):
            warnings.append(
                f"{where}: {method!r} is not a standard HTTP method; no ordinary request "
                "matches it (a typo?)"
            )
        if route.pattern != route.pattern.strip():
            warnings.append(
                f"{where}: the pattern has blanks at its start or end; request paths do not"
            )
        if "[" in route.pattern or "]" in route.pattern:
            warnings.append(
                f"{where}: '[...]' in a pattern is a character class matching one character, "
                "not brackets in the path (write [[] for a literal '[')"
            )
        for earlier_index, earlier in enumerate(routes[:index]):
            if _covers(earlier, route):
                kind = "free" if earlier.free else "priced"
                warnings.append(
                    f"{where} can never match: routes[{earlier_index}] {earlier.pattern!r} "
                    f"({kind}) comes first and matches every request it would"
                )
                break
    return warnings


def _covers(earlier: RouteConfig, later: RouteConfig) -> bool:
    """True when every request ``later`` matches is matched by ``earlier`` too (as far as
    simple cases tell: the same pattern, a literal path the earlier glob matches, or an
    earlier ``prefix*`` that the later pattern's fixed start begins with)."""
    early_methods = {m.upper() for m in earlier.methods}
    late_methods = {m.upper() for m in later.methods}
    if early_methods:
        if not late_methods:
            return False
        # A GET rule also matches HEAD (gateway.pricing).
        if not all(
            m in early_methods or (m == "HEAD" and "GET" in early_methods) for m in late_methods
        ):
            return False
    if earlier.pattern == later.pattern:
        return True
    if not _GLOB.search(later.pattern):
        return fnmatch.fnmatchcase(later.pattern, earlier.pattern)
    prefix = earlier.pattern[:-1]
    if earlier.pattern.endswith("*") and not _GLOB.search(prefix):
        fixed_start = _GLOB.split(later.pattern, maxsplit=1)[0]
        return fixed_start.startswith(prefix)
    return False
