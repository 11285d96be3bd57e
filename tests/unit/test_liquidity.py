"""Inbound liquidity: the sum over active channels of the remote balance less the remote
reserve, "unknown" without the permission, route warnings and the readiness check."""

from __future__ import annotations

import logging

import pytest

from gateway import errors
from gateway.liquidity import NEEDS_PERMISSION, LiquidityMonitor, inbound_liquidity, route_warnings
from gateway.ports import ChannelBalance, Liquidity, Msat
from gateway.pricing import CreditTerms, Rule
from tests.fakes import FakeInvoiceBackend


def _channel(remote_sat: int, reserve_sat: int, *, active: bool = True) -> ChannelBalance:
    return ChannelBalance(active, Msat(remote_sat * 1000), Msat(reserve_sat * 1000))


async def test_inbound_is_remote_balance_less_the_remote_reserve_over_active_channels() -> None:
    backend = FakeInvoiceBackend()
    backend.channels = (
        _channel(100_000, 1_000),
        _channel(50_000, 500),
        _channel(900_000, 9_000, active=False),  # an inactive channel receives nothing
        _channel(300, 1_000),  # below its reserve: nothing to receive, never negative
    )
    liquidity = await inbound_liquidity(backend)
    assert liquidity == Liquidity(Msat(148_500_000), Msat(99_000_000), 3, known=True)


async def test_without_offchain_read_liquidity_is_unknown_not_an_error() -> None:
    backend = FakeInvoiceBackend()
    backend.channels = None  # the macaroon lacks offchain:read
    assert (await inbound_liquidity(backend)).known is False
    backend.channels, backend.unavailable = (), True
    assert (await inbound_liquidity(backend)).known is False


def test_routes_over_the_largest_channel_or_the_total_are_warned_about() -> None:
    liquidity = Liquidity(Msat(150_000_000), Msat(100_000_000), 2, known=True)
    rules = [
        Rule("/cheap/*", price_msat=Msat(1_000)),
        Rule("/mpp/*", price_msat=Msat(120_000_000), service="big"),
        Rule(
            "/credit/*",
            price_msat=Msat(1_000),
            credit=CreditTerms(Msat(200_000_000), Msat(1_000), Msat(200_000_000)),
        ),
        Rule("/free/*"),
    ]
    lines = route_warnings(rules, liquidity)
    assert len(lines) == 2
    assert "/mpp/* (big): price 120000 sat" in lines[0]
    assert "multi-path" in lines[0]
    assert "/credit/*" in lines[1]
    assert "credit amount 200000 sat" in lines[1]
    assert "cannot be paid" in lines[1]
    assert route_warnings(rules, Liquidity(Msat(0), Msat(0), 0, known=False)) == ()


async def test_the_monitor_warns_at_start_and_when_it_changes_and_never_fails_readiness(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = FakeInvoiceBackend()
    backend.channels = (_channel(10_000, 100),)
    monitor = LiquidityMonitor(backend, [Rule("/api/*", price_msat=Msat(20_000_000))])
    assert monitor.check().ok
    assert monitor.check().detail == "not measured yet"
    with caplog.at_level(logging.WARNING, logger="gateway.liquidity"):
        await monitor.refresh()
        await monitor.refresh()  # unchanged: not logged again
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "cannot be paid" in warnings[0].getMessage()
    check = monitor.check()
    assert check.ok
    assert check.name == "liquidity"
    assert "inbound 9900 sat over 1 active channel(s), largest 9900 sat" in check.detail
    assert "WARNING: 1 route(s)" in check.detail

    caplog.clear()
    backend.channels = (_channel(30_000, 300),)
    with caplog.at_level(logging.INFO, logger="gateway.liquidity"):
        await monitor.refresh()
    assert "fits the node's inbound liquidity again" in caplog.text
    assert "WARNING" not in monitor.check().detail

    backend.channels = None
    await monitor.refresh()
    assert monitor.check().ok
    assert "unknown" in monitor.check().detail


async def test_a_missing_permission_is_told_apart_from_a_node_that_is_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The permission is named only when the node refused the macaroon; a node that does not
    answer (or fails otherwise) is said as such, in the result, readiness and the log."""
    backend = FakeInvoiceBackend()
    backend.channels = None  # the macaroon lacks offchain:read
    denied = await inbound_liquidity(backend)
    assert denied.reason == NEEDS_PERMISSION
    backend.channels, backend.unavailable = (), True
    down = await inbound_liquidity(backend)
    assert not down.known
    assert down.reason.startswith("the node is unavailable: ")
    assert "offchain:read" not in down.reason

    monitor = LiquidityMonitor(backend, [])
    with caplog.at_level(logging.INFO, logger="gateway.liquidity"):
        await monitor.refresh()
        await monitor.refresh()  # the same cause: said once
    check = monitor.check()
    assert check.ok
    assert check.detail.startswith("unknown (the node is unavailable: ")
    assert "offchain:read" not in check.detail
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "the node is unavailable" in record.getMessage()

    caplog.clear()
    backend.unavailable, backend.channels = False, None
    with caplog.at_level(logging.INFO, logger="gateway.liquidity"):
        await monitor.refresh()
    assert monitor.check().detail == "unknown (ListChannels needs offchain:read)"
    (record,) = caplog.records
    assert record.levelno == logging.INFO
    assert "offchain:read" in record.getMessage()

    class Failing(FakeInvoiceBackend):
        async def list_channels(self) -> tuple[ChannelBalance, ...]:
            raise errors.BackendError("LND at fake: something else")

    other = await inbound_liquidity(Failing())
    assert other.reason == "ListChannels failed: BackendError: LND at fake: something else"
