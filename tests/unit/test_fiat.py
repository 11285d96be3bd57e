"""The paywall's fiat display: a fixed rate, or one fetched from a JSON URL (a real local
HTTP server here), kept while fetches fail until it is stale, never shown when unknown."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.fiat import STALE_AFTER, FiatRate
from tests.fakes import FakeClock

TEN_K_SAT = 10_000_000  # msat


def test_a_fixed_rate() -> None:
    rate = FiatRate("EUR", FakeClock(), per_btc=90_000.0)
    assert rate.display(TEN_K_SAT) == "\u2248 9.00 EUR"
    assert rate.display(1_000) == "\u2248 0.0009 EUR"
    assert FiatRate("USD", FakeClock(), per_btc=1e9).display(TEN_K_SAT) == "\u2248 100,000.00 USD"


class RateSource:
    def __init__(self) -> None:
        self.answer: web.StreamResponse = web.json_response({"bitcoin": {"eur": 90_000}})
        self.hits = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        return self.answer


@pytest_asyncio.fixture
async def source() -> AsyncIterator[tuple[RateSource, str]]:
    rates = RateSource()
    app = web.Application()
    app.router.add_get("/rate", rates.handle)
    async with TestServer(app) as server:
        yield rates, str(server.make_url("/rate?key=SECRET-KEY"))


async def test_a_fetched_rate_fails_soft_and_goes_stale(
    source: tuple[RateSource, str], caplog: pytest.LogCaptureFixture
) -> None:
    rates, url = source
    clock = FakeClock()
    fiat = FiatRate("EUR", clock, url=url, field="bitcoin.eur", refresh=60)
    assert fiat.display(TEN_K_SAT) == ""  # nothing fetched yet: nothing shown
    await fiat.refresh()
    fetched_at = clock.now()
    assert fiat.display(TEN_K_SAT) == "\u2248 9.00 EUR"

    caplog.set_level(logging.INFO, logger="gateway.fiat")
    for broken in (
        web.Response(status=500),
        web.Response(text="not json", content_type="application/json"),
        web.json_response({"bitcoin": {"eur": -1}}),
        web.json_response({"bitcoin": {"usd": 1}}),
        web.json_response({"bitcoin": {"eur": True}}),
        web.Response(body=b" " * 70_000, content_type="application/json"),
    ):
        rates.answer = broken
        clock.advance(60)
        await fiat.refresh()
        # The last good rate stays until it is stale.
        expected = "\u2248 9.00 EUR" if clock.now() - fetched_at <= STALE_AFTER * 60 else ""
        assert fiat.display(TEN_K_SAT) == expected
    assert fiat.display(TEN_K_SAT) == ""  # 6 minutes without a rate: stale, not shown
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # one line per outage
    assert "SECRET-KEY" not in caplog.text  # the URL may carry a key

    rates.answer = web.json_response({"bitcoin": {"eur": "95000.5"}})
    await fiat.refresh()
    assert fiat.display(TEN_K_SAT) == "\u2248 9.50 EUR"
    assert "available again" in caplog.text
    assert rates.hits == 8
