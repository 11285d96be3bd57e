"""Revenue splits: the payees (``[[payee]]``), how they are paid (``[payouts]``), and the
load-time checks that tie them to the routes' ``split`` lists.

A payee::

    [[payee]]
    name = "carol"                     # a-z, 0-9, '-', '_'; what routes' split names
    destination = "carol@example.com"  # pubkey (keysend), Lightning Address, lnurl1, https://
                                       # (gateway.destinations reads it)
    threshold_msat = 100000            # paid once this much is accrued
    every = 0                          # seconds; > 0: also paid what is accrued this often
    fee_limit_ppm = 10000              # fee limit: max(fee_limit_min_msat, amount * ppm / 1e6)
    fee_limit_min_msat = 2000
    fees_paid_by = "merchant"          # or "payee": the fee limit comes out of the payout

``[[payee]]`` tables are read only from the file, like ``[[webhook]]``; ``[payouts]`` is a
section like the others (``GATEWAY_PAYOUTS_INTERVAL``, ...).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway import destinations
from gateway.config.checks import MAX_LIFETIME, positive, require
from gateway.config.routes import RouteConfig
from gateway.errors import ConfigError
from gateway.pricing import MAX_PRICE_MSAT
from gateway.splits import PAYEE_NAME

FEES_PAID_BY = ("merchant", "payee")
MAX_RETRY_SECONDS = 86_400.0


@dataclass(frozen=True, slots=True)
class PayoutsConfig:
    """``[payouts]``: the worker that pays the payees their accrued shares."""

    # A macaroon of the [lnd] node that may send payments; default [credit] payment_macaroon.
    payment_macaroon: Path | None = None
    interval: float = 10.0  # seconds between the worker's passes (it also wakes on settlements)
    # A payee whose payout failed waits retry_initial seconds, doubling up to retry_max.
    retry_initial: float = 10.0
    retry_max: float = 600.0

    def __post_init__(self) -> None:
        interval = self.interval
        require(
            math.isfinite(interval) and 0.01 <= interval <= 3600,
            "interval",
            "0.01 to 3600 seconds",
            interval,
        )
        initial, most = self.retry_initial, self.retry_max
        require(
            positive(initial) and math.isfinite(most) and initial <= most <= MAX_RETRY_SECONDS,
            "retry_initial / retry_max",
            f"more than 0, retry_initial <= retry_max <= {MAX_RETRY_SECONDS:g}",
            f"{initial:g} / {most:g}",
        )


@dataclass(frozen=True, slots=True)
class PayeeConfig:
    """One ``[[payee]]``: who gets shares of the routes that name it, and when and how it is
    paid (the fields of ``gateway.service.payout.PayeeTerms``)."""

    name: str
    destination: str
    threshold_msat: int = 100_000
    every: float = 0.0
    fee_limit_ppm: int = 10_000
    fee_limit_min_msat: int = 2_000
    fees_paid_by: str = "merchant"

    def __post_init__(self) -> None:
        require(
            PAYEE_NAME.fullmatch(self.name) is not None,
            "name",
            "1 to 64 of a-z, 0-9, '-' and '_', starting with a letter or digit",
            self.name,
        )
        problem = destination_problem(self.destination)
        if problem is not None:
            raise ValueError(f"destination: {problem}")
        threshold = self.threshold_msat
        require(
            1 <= threshold <= MAX_PRICE_MSAT,
            "threshold_msat",
            f"1 to {MAX_PRICE_MSAT}",
            threshold,
        )
        every = self.every
        require(
            math.isfinite(every) and 0 <= every <= MAX_LIFETIME,
            "every",
            f"0 (only the threshold) to {MAX_LIFETIME} seconds",
            every,
        )
        ppm = self.fee_limit_ppm
        require(0 <= ppm <= 1_000_000, "fee_limit_ppm", "0 to 1000000", ppm)
        least = self.fee_limit_min_msat
        require(0 <= least <= MAX_PRICE_MSAT, "fee_limit_min_msat", f"0 to {MAX_PRICE_MSAT}", least)
        paid_by = self.fees_paid_by
        require(paid_by in FEES_PAID_BY, "fees_paid_by", " or ".join(FEES_PAID_BY), paid_by)
        if self.payee_pays_fee:
            # The payout is the accrued less its fee limit, which is at least
            # fee_limit_min_msat and, at 100%, all of it: at the threshold, nothing to pay.
            if least >= threshold:
                raise ValueError(
                    f"threshold_msat ({threshold}) must be above fee_limit_min_msat ({least}) "
                    'with fees_paid_by = "payee": a payout is the accrued less the fee limit'
                )
            if ppm >= 1_000_000:
                raise ValueError(
                    'fee_limit_ppm must be below 1000000 with fees_paid_by = "payee": a fee '
                    "limit of 100% leaves nothing to pay"
                )

    @property
    def payee_pays_fee(self) -> bool:
        return self.fees_paid_by == "payee"


def destination_problem(destination: str) -> str | None:
    """What is wrong with a payee's destination (the text after ``destination``), or None:
    as ``gateway.destinations`` reads it (a node public key, a Lightning Address, an LNURL,
    an ``lnurlp://`` or ``https://`` LNURL-pay URL), which the payout worker pays by."""
    try:
        destinations.check(destination)
    except destinations.DestinationError as error:
        return str(error)
    return None


def check_payees(payees: Sequence[PayeeConfig]) -> None:
    """Names are unique: they key the ledger."""
    seen: set[str] = set()
    for payee in payees:
        if payee.name in seen:
            raise ConfigError(f"[[payee]] name {payee.name!r} is used twice")
        seen.add(payee.name)


def check_splits(
    routes: Sequence[RouteConfig],
    payees: Sequence[PayeeConfig],
    payouts: PayoutsConfig,
    credit_macaroon: Path | None,
) -> list[str]:
    """``ConfigError`` for a route's split naming no ``[[payee]]``, or payees without a
    macaroon to pay them with; the warnings: a payee no route names, an ``every`` shorter than
    the worker's ``[payouts] interval`` (it cannot be kept), a merchant-paid fee limit above
    the threshold (a routing fee larger than the payout is allowed)."""
    names = {payee.name for payee in payees}
    named: set[str] = set()
    for index, route in enumerate(routes):
        for share in route.shares:
            if share.payee not in names:
                raise ConfigError(
                    f"routes[{index}]: split names payee {share.payee!r}, which no [[payee]] "
                    "defines"
                )
            named.add(share.payee)
    if payees and payouts.payment_macaroon is None and credit_macaroon is None:
        raise ConfigError(
            "[[payee]] needs [payouts] payment_macaroon (or [credit] payment_macaroon): a "
            "macaroon that may send payments, to pay the payees"
        )
    warnings = []
    for payee in payees:
        where = f"[[payee]] {payee.name!r}"
        if payee.name not in named:
            warnings.append(
                f"{where}: no route's split names it (it is still paid what it has accrued)"
            )
        if 0 < payee.every < payouts.interval:
            warnings.append(
                f"{where}: every = {payee.every:g} s is shorter than [payouts] interval = "
                f"{payouts.interval:g} s: it is paid at most once an interval"
            )
        if not payee.payee_pays_fee and payee.fee_limit_min_msat > payee.threshold_msat:
            warnings.append(
                f"{where}: fee_limit_min_msat ({payee.fee_limit_min_msat}) is above "
                f"threshold_msat ({payee.threshold_msat}): the merchant may pay a routing fee "
                "larger than the payout"
            )
    return warnings
