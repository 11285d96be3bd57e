"""``[[routes]]``: one route rule's config, and the warnings about rules that are likely
mistakes (``load_config`` logs them)."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.config.checks import MAX_LIFETIME, display_text, require
from gateway.ports import Split
from gateway.pricing import MAX_PRICE_MSAT
from gateway.splits import parse_share, split_problem

BILLINGS = ("token", "credit")
# When a route's invoice is settled: on_payment (an ordinary invoice, paid before the
# request runs) or on_success (a hold invoice, settled only if the backend succeeded).
SETTLES = ("on_payment", "on_success")
# A credit route's default credit_msat is this many requests' price, and its default
# credit_max_msat this many times credit_msat.
CREDIT_REQUESTS = 100
_CREDIT_KEYS = ("credit_msat", "credit_min_msat", "credit_max_msat", "metered", "charge_failures")


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
    # "token": a payment buys a token for the route's lifetime; "credit": it buys credit
    # that each request draws its price from (the keys below apply only to credit routes).
    billing: str = "token"
    credit_msat: int | None = None  # credit an invoice buys; default 100 x price_msat
    # What a client may ask for instead (header L402-Credit-Msat); default price_msat (or
    # credit_msat with a price function) to 100 x credit_msat.
    credit_min_msat: int | None = None
    credit_max_msat: int | None = None
    metered: bool = False  # charge the cost the backend reports, at most the price
    charge_failures: bool = False  # charge a 5xx or an unreachable backend too
    # "on_success": the request is kept until paid and run while the payment is held; the
    # payment completes only if the backend succeeded (any 2xx, or settle_statuses).
    settle: str = "on_payment"
    settle_statuses: tuple[int, ...] = ()  # instead of 2xx: the statuses that settle
    # Revenue split: each payment's shares for [[payee]] names, "carol:30%", "dave:1000msat"
    # or "dave:2sat" (gateway.splits.parse_share); the merchant keeps the rest.
    split: tuple[str, ...] = ()

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
        if ":" in self.service:
            # Tokens carry services=name:tier, and tip and link invoices are "tip:"/"link:".
            raise ValueError(
                f"route {self.pattern!r}: service {self.service!r} must not contain ':' (a "
                "token's caveat is services=name:tier)"
            )
        require(self.billing in BILLINGS, "billing", " or ".join(BILLINGS), self.billing)
        if self.billing == "credit":
            self.credit_amounts()  # raises for amounts that cannot work
        else:
            credit_keys = [key for key in _CREDIT_KEYS if getattr(self, key) not in (None, False)]
            if credit_keys:
                raise ValueError(
                    f'{", ".join(credit_keys)} apply only to a route with billing = "credit"'
                )
        self._check_settle()
        self._check_split()

    @property
    def shares(self) -> Split:
        """``split`` parsed (checked at load: it parses)."""
        return tuple(parse_share(text) for text in self.split)

    def _check_split(self) -> None:
        if not self.split:
            return
        if self.free:
            raise ValueError("split applies only to a priced route (a free one earns nothing)")
        for text in self.split:
            try:
                parse_share(text)
            except ValueError as error:
                raise ValueError(f"split: {error}") from None
        shares = self.shares
        problem = split_problem(shares)
        if problem is not None:
            raise ValueError(f"split {list(self.split)!r}: {problem}")
        if self.price_msat is not None:
            price = self.price_msat
            fixed = sum(share.fixed_msat for share in shares)
            if fixed > price:
                raise ValueError(
                    f"split: the fixed shares add up to {fixed} msat, more than price_msat "
                    f"({price})"
                )
            wanted = fixed + sum(price * share.ppm // 1_000_000 for share in shares)
            if wanted > price:
                raise ValueError(
                    f"split: the shares add up to {wanted} msat of a {price} msat payment, "
                    "more than all of it"
                )

    def _check_settle(self) -> None:
        require(self.settle in SETTLES, "settle", " or ".join(SETTLES), self.settle)
        if self.settle == "on_success":
            if self.free:
                raise ValueError('settle = "on_success" applies only to a priced route')
            if self.billing == "credit":
                raise ValueError(
                    'settle = "on_success" does not go with billing = "credit" (credit is '
                    "spent, not paid, per request)"
                )
        elif self.settle_statuses:
            raise ValueError('settle_statuses applies only to a route with settle = "on_success"')
        for status in self.settle_statuses:
            require(200 <= status <= 499, "settle_statuses", "statuses 200 to 499", status)

    def credit_amounts(self) -> tuple[int, int, int]:
        """A credit route's (credit bought, least, most a client may ask for), the defaults
        filled in; ValueError when they cannot work."""
        if self.free or (self.price_msat is None and self.price_function is None):
            raise ValueError('billing = "credit" needs a price (price_msat or price_function)')
        if self.price_msat is None and self.credit_msat is None:
            raise ValueError(
                "a credit route priced by a price_function needs credit_msat (the credit an "
                "invoice buys)"
            )
        amount = self.credit_msat
        if amount is None:
            assert self.price_msat is not None
            amount = min(CREDIT_REQUESTS * self.price_msat, MAX_PRICE_MSAT)
        require(0 < amount <= MAX_PRICE_MSAT, "credit_msat", f"1 to {MAX_PRICE_MSAT}", amount)
        if self.price_msat is not None:
            require(
                amount >= self.price_msat,
                "credit_msat",
                f"at least price_msat ({self.price_msat}): credit for one request at least",
                amount,
            )
        least = self.credit_min_msat
        if least is None:
            least = self.price_msat if self.price_msat is not None else amount
        most = self.credit_max_msat
        if most is None:
            most = min(CREDIT_REQUESTS * amount, MAX_PRICE_MSAT)
        if not 0 < least <= amount <= most <= MAX_PRICE_MSAT:
            raise ValueError(
                f"credit amounts must satisfy 0 < credit_min_msat ({least}) <= credit_msat "
                f"({amount}) <= credit_max_msat ({most}) <= {MAX_PRICE_MSAT}"
            )
        return amount, least, most


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
