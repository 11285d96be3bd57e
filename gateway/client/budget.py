"""What a client may spend: a cap per payment, a routing fee cap, a total.

Pure. The total counts price plus routing fee of every payment the client made (or
recovered), and a payment must fit with its *worst-case* fee (the fee cap) before it starts,
so the total can never be overshot, also not by payments running at the same time. On a
credit route a payment buys credit for many requests: the caps bound the credit bought (the
invoice amount), not the price of one request. A pay-on-success payment is held while the
backend runs (the payer's funds locked meanwhile): a cap bounds the time its 402 announces.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.client.errors import BudgetExceeded
from gateway.client.offer import CREDIT_HEADER, Offer

__all__ = ["DEFAULT_MAX_SETTLE_SECONDS", "DEFAULT_MIN_FEE_MSAT", "Budget"]

# Without an explicit fee cap: 1% of the price, but at least this (a few hops' base fees).
DEFAULT_MIN_FEE_MSAT = 5_000
# The longest a pay-on-success payment may be held by default (the gateway's default backend
# time is 30 s): ten minutes.
DEFAULT_MAX_SETTLE_SECONDS = 600.0


def _sat(msat: int) -> str:
    return f"{msat / 1000:g} sat"


@dataclass(frozen=True, slots=True)
class Budget:
    """Spending limits of one client, in millisatoshis.

    ``max_price_msat``: the most one payment may be (the invoice amount, fee excluded): the
    price of a request, or on a credit route the credit bought.
    ``max_fee_msat``: the routing fee cap per payment; None means 1% of the price but at
    least ``DEFAULT_MIN_FEE_MSAT``. ``max_total_msat``: the most the client spends in all
    (prices plus fees); None means no total limit. ``max_settle_seconds``: the longest a
    pay-on-success offer may hold the payment, in seconds (the backend's time its
    ``L402-Settle`` header announces); None means no limit, also for an offer that does not
    say.
    """

    max_price_msat: int
    max_fee_msat: int | None = None
    max_total_msat: int | None = None
    max_settle_seconds: float | None = DEFAULT_MAX_SETTLE_SECONDS

    def __post_init__(self) -> None:
        for name in ("max_price_msat", "max_fee_msat", "max_total_msat"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or value < 0):
                raise ValueError(f"{name} must be a non-negative number of millisatoshis")
        seconds = self.max_settle_seconds
        if seconds is not None and (isinstance(seconds, bool) or not 0 < seconds < float("inf")):
            raise ValueError("max_settle_seconds must be a positive number of seconds, or None")

    def fee_limit(self, price_msat: int) -> int:
        """The routing fee cap for a payment of ``price_msat``."""
        if self.max_fee_msat is not None:
            return self.max_fee_msat
        return max(DEFAULT_MIN_FEE_MSAT, price_msat // 100)

    def holds_too_long(self, offer: Offer) -> bool:
        """Whether ``offer`` settles on success and would hold the payment longer than
        ``max_settle_seconds``, or for a time it does not say."""
        most, held = self.max_settle_seconds, offer.settle_timeout
        return offer.settles_on_success and most is not None and (held is None or held > most)

    def check(self, offer: Offer, committed_msat: int) -> int:
        """The fee cap to pay ``offer`` with, or BudgetExceeded.

        ``committed_msat``: spent so far plus the worst case of payments still running.
        """
        price = offer.amount_msat
        if offer.credit_msat is None:
            bought = f"price {_sat(price)}"
        else:
            each = "" if offer.price_msat is None else f", {_sat(offer.price_msat)} per request"
            bought = f"credit of {_sat(price)} (bought in one payment{each})"
        if price > self.max_price_msat:
            if offer.credit_msat is None:
                limit = f"{_sat(self.max_price_msat)} per request"
            else:
                limit = (
                    f"{_sat(self.max_price_msat)} per payment; ask for less credit with the "
                    f"request header {CREDIT_HEADER}"
                )
            raise BudgetExceeded(
                f"{bought} is over the limit of {limit}; nothing was paid", offer, "max_price"
            )
        if self.holds_too_long(offer):
            held = offer.settle_timeout
            how_long = (
                "for a time the 402 does not say (L402-Settle without a usable timeout)"
                if held is None
                else f"up to {held:g} s"
            )
            raise BudgetExceeded(
                f"pay on success: the payment would be held {how_long} while the backend "
                f"runs, over the limit of {self.max_settle_seconds:g} s; nothing was paid",
                offer,
                "max_settle",
            )
        fee = self.fee_limit(price)
        if self.max_total_msat is not None and committed_msat + price + fee > self.max_total_msat:
            left = max(0, self.max_total_msat - committed_msat)
            raise BudgetExceeded(
                f"{bought} plus up to {_sat(fee)} routing fee is over what is left "
                f"of the total budget ({_sat(left)} of {_sat(self.max_total_msat)}); "
                "nothing was paid",
                offer,
                "max_total",
            )
        return fee
