"""Inbound liquidity: how much the node can be paid, and whether each route's price fits.

A node is paid only up to what its channel peers hold on their side: per channel the
remote balance minus the reserve the remote side must keep (LND's
``remote_constraints.chan_reserve_sat``), over the active channels. A payment larger than
the largest channel's inbound needs a multi-path payment; one larger than the total cannot
arrive at all. ``ListChannels`` needs the macaroon permission ``offchain:read``: without
it, or with the node unavailable, liquidity is "unknown" (``Liquidity.reason`` says which of
the two, so an operator does not re-bake a macaroon for a node that is down), which never
fails anything.

``LiquidityMonitor`` runs in the watching process (under the supervisor): it measures every
``interval`` seconds, reports to the meter, logs a WARNING for each route whose price (or
credit amount) the node cannot receive, at start and whenever that changes, and gives
readiness a ``liquidity`` check that reports but never fails.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from gateway import errors
from gateway.health import Check
from gateway.ports import NO_METER, ChannelBackend, Liquidity, Meter, Msat
from gateway.pricing import Rule

__all__ = [
    "NEEDS_PERMISSION",
    "UNKNOWN",
    "LiquidityMonitor",
    "describe",
    "inbound_liquidity",
    "route_warnings",
]

log = logging.getLogger(__name__)

NEEDS_PERMISSION = "ListChannels needs offchain:read"
UNKNOWN = Liquidity(Msat(0), Msat(0), 0, known=False, reason=NEEDS_PERMISSION)
_MAX_REASON = 200


def _unknown(reason: str) -> Liquidity:
    return Liquidity(Msat(0), Msat(0), 0, known=False, reason=reason[:_MAX_REASON])


async def inbound_liquidity(backend: ChannelBackend) -> Liquidity:
    """The node's inbound liquidity now; ``known`` False when the node would not say, with
    ``reason``: the missing permission, or the node unavailable (or failing otherwise)."""
    try:
        channels = await backend.list_channels()
    except errors.BackendPermissionDenied as error:
        log.debug("inbound liquidity unknown: %s", error)
        return UNKNOWN
    except errors.BackendUnavailable as error:
        log.debug("inbound liquidity unknown: %s", error)
        return _unknown(f"the node is unavailable: {error}")
    except errors.BackendError as error:
        log.debug("inbound liquidity unknown: %s", error)
        return _unknown(f"ListChannels failed: {type(error).__name__}: {error}")
    inbound = [channel.inbound_msat for channel in channels if channel.active]
    return Liquidity(
        total_msat=Msat(sum(inbound)),
        largest_msat=Msat(max(inbound, default=0)),
        channels=len(inbound),
        known=True,
    )


def _sat(msat: int) -> str:
    return f"{msat // 1000} sat" if msat % 1000 == 0 else f"{msat} msat"


def route_warnings(rules: Sequence[Rule], liquidity: Liquidity) -> tuple[str, ...]:
    """One line per route whose fixed price (or credit amount) the node cannot receive
    (over the total inbound) or can only as a multi-path payment (over the largest
    channel's); none while liquidity is unknown. Price functions are not checked."""
    if not liquidity.known:
        return ()
    lines = []
    for rule in rules:
        amount = rule.credit.amount_msat if rule.credit is not None else rule.price_msat
        if amount is None:
            continue
        what = "credit amount" if rule.credit is not None else "price"
        if amount > liquidity.total_msat:
            lines.append(
                f"route {rule.pattern} ({rule.service}): {what} {_sat(amount)} exceeds the "
                f"node's inbound liquidity ({_sat(liquidity.total_msat)}): it cannot be paid"
            )
        elif amount > liquidity.largest_msat:
            lines.append(
                f"route {rule.pattern} ({rule.service}): {what} {_sat(amount)} exceeds the "
                f"largest channel's inbound ({_sat(liquidity.largest_msat)}): only a "
                "multi-path payment can pay it"
            )
    return tuple(lines)


class LiquidityMonitor:
    """Measures inbound liquidity every ``interval`` seconds (see the module docstring)."""

    def __init__(
        self,
        backend: ChannelBackend,
        rules: Sequence[Rule],
        *,
        interval: float = 60.0,
        meter: Meter = NO_METER,
    ) -> None:
        self._backend = backend
        self._rules = tuple(rules)
        self._interval = interval
        self._meter = meter
        self._warned: tuple[str, ...] | None = None
        self.latest: Liquidity | None = None  # None until first measured

    async def refresh(self) -> Liquidity:
        """Measure now, report it, and log the routes' warnings if they changed."""
        liquidity = await inbound_liquidity(self._backend)
        previous = self.latest
        if not liquidity.known and (previous is None or previous.reason != liquidity.reason):
            # Said once per cause: a missing permission is a setting (INFO), a node that does
            # not answer a problem (WARNING; readiness's lnd check fails on it too).
            level = logging.INFO if liquidity.reason == NEEDS_PERMISSION else logging.WARNING
            log.log(level, "inbound liquidity unknown: %s", liquidity.reason)
        elif liquidity.known and previous is not None and not previous.known:
            log.info("inbound liquidity known again")
        self.latest = liquidity
        self._meter.liquidity(liquidity)
        if liquidity.known:
            warnings = route_warnings(self._rules, liquidity)
            if warnings != self._warned:
                for line in warnings:
                    log.warning("%s", line)
                if self._warned and not warnings:
                    log.info("every route's price fits the node's inbound liquidity again")
                self._warned = warnings
        return liquidity

    async def run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self._interval)

    def check(self) -> Check:
        """Readiness's ``liquidity`` check: reported, never failing."""
        return Check("liquidity", True, describe(self.latest, self._rules))


def describe(liquidity: Liquidity | None, rules: Sequence[Rule]) -> str:
    """``liquidity`` in one line (None: not measured yet), with a count of the routes
    ``route_warnings`` names."""
    if liquidity is None:
        return "not measured yet"
    if not liquidity.known:
        return f"unknown ({liquidity.reason or 'not said'})"
    detail = (
        f"inbound {_sat(liquidity.total_msat)} over {liquidity.channels} active "
        f"channel(s), largest {_sat(liquidity.largest_msat)}"
    )
    warnings = route_warnings(rules, liquidity)
    if warnings:
        detail += f"; WARNING: {len(warnings)} route(s) cannot be paid in one part"
    return detail
