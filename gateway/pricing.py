"""Route rules: which requests cost how much, for how long a token lasts, and what it grants.

Pure: no I/O. Rules are tried in order and the first whose pattern and method match decides.
A path no rule matches is not priced (add a catch-all ``/*`` rule to price everything).
Patterns are shell-style globs on the URL path (``fnmatch``; ``*`` also crosses ``/``).
Methods compare case-insensitively; a rule for ``GET`` also covers ``HEAD``, which web
frameworks answer with the GET handler.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from gateway.ports import Msat

# What the caveats can carry: an HTTP token for methods, no blank or comma in a capability.
_METHOD_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CAPABILITY_RE = re.compile(r"[^\s,]+")


@dataclass(frozen=True, slots=True)
class PriceRequest:
    """What a dynamic price function may look at."""

    method: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]


# A dynamic price: called once per challenge, returns the amount in millisatoshis.
PriceFunction = Callable[[PriceRequest], Awaitable[int]]


@dataclass(frozen=True, slots=True)
class Rule:
    """A priced (or explicitly free) set of routes.

    ``price_msat`` None with no ``price_function`` makes the route free.
    """

    pattern: str
    methods: frozenset[str] = frozenset()  # empty: every method
    price_msat: Msat | None = None
    price_function: PriceFunction | None = field(default=None, compare=False)
    lifetime: int = 3600  # seconds a token stays valid after it is minted
    service: str = "api"
    tier: int = 0
    capabilities: frozenset[str] = frozenset()
    _compiled: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.price_msat is not None and self.price_msat <= 0:
            raise ValueError(f"route {self.pattern!r}: price_msat must be positive")
        if self.price_msat is not None and self.price_function is not None:
            raise ValueError(f"route {self.pattern!r}: give a fixed price or a function, not both")
        if self.lifetime <= 0:
            raise ValueError(f"route {self.pattern!r}: lifetime must be positive")
        if not self.service or not re.fullmatch(r"[A-Za-z0-9_.-]+", self.service):
            raise ValueError(f"route {self.pattern!r}: service must be [A-Za-z0-9_.-]+")
        if not self.pattern.startswith("/"):
            raise ValueError(f"route {self.pattern!r}: pattern must start with '/'")
        if self.tier < 0:
            raise ValueError(f"route {self.pattern!r}: tier must not be negative")
        for capability in self.capabilities:
            if not _CAPABILITY_RE.fullmatch(capability) or not capability.isprintable():
                raise ValueError(
                    f"route {self.pattern!r}: capability {capability!r} must be printable, "
                    "without blanks or commas"
                )
        for method in self.methods:
            if not _METHOD_RE.fullmatch(method):
                raise ValueError(f"route {self.pattern!r}: invalid method {method!r}")
        object.__setattr__(self, "methods", frozenset(m.upper() for m in self.methods))
        object.__setattr__(self, "_compiled", re.compile(fnmatch.translate(self.pattern)))

    @property
    def free(self) -> bool:
        return self.price_msat is None and self.price_function is None

    def matches(self, method: str, path: str) -> bool:
        if self.methods:
            method = method.upper()
            if method not in self.methods and not (method == "HEAD" and "GET" in self.methods):
                return False
        return self._compiled.match(path) is not None


class Pricing:
    """An ordered list of rules."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = tuple(rules)

    def match(self, method: str, path: str) -> Rule | None:
        for rule in self.rules:
            if rule.matches(method, path):
                return rule
        return None
