"""Route rules for the demo API (``gateway.examples.demo_api``), one a name, so that a test
composes the set it puts in front of it and a rule that differs on purpose stands out.

The prices differ from each other, so an amount tells which rule charged it.
"""

from __future__ import annotations

from gateway.ports import Msat
from gateway.pricing import Rule

HEALTH = Rule("/health")
PREMIUM = Rule("/api/premium/*", price_msat=Msat(10_000), service="premium")
# As the sample config prices it: GET only, and the token grants the read capability.
PREMIUM_READ = Rule(
    "/api/premium/*",
    methods=frozenset({"GET"}),
    price_msat=Msat(10_000),
    service="premium",
    capabilities=frozenset({"read"}),
)
QUOTE = Rule("/api/quote", price_msat=Msat(2_000), service="quotes")
ECHO = Rule("/api/echo", price_msat=Msat(1_000), service="echo")
