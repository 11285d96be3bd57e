"""The paywall's fiat display: what a price is worth in the operator's currency, for people.

Never used for pricing (prices are in msat); a rate that is missing or stale shows nothing.
The rate is fixed, or fetched from a URL answering JSON (a dotted ``field`` names the number:
units of the currency per bitcoin) every ``refresh`` seconds by ``FiatRate.run``; a fetch
that fails keeps the last rate until it is ``STALE_AFTER`` refreshes old, and logs one line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import ssl
import urllib.parse
import urllib.request
from collections.abc import Callable

from gateway.ports import Clock

log = logging.getLogger(__name__)

STALE_AFTER = 3  # refresh intervals a fetched rate is shown for without a newer one
FETCH_TIMEOUT = 10.0
MAX_RATE_BODY = 64 * 1024
_MSAT_PER_BTC = 100_000_000_000

Fetch = Callable[[str], bytes]


def fetch_url(url: str) -> bytes:
    """GET ``url`` (blocking; run in a thread), at most ``MAX_RATE_BODY`` bytes."""
    # http(s) only: the config checks the scheme.
    request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310
    context = ssl.create_default_context()
    with urllib.request.urlopen(  # noqa: S310
        request, timeout=FETCH_TIMEOUT, context=context
    ) as response:
        return bytes(response.read(MAX_RATE_BODY + 1))


class FiatRate:
    """The rate the paywall page shows prices in (``display``), fixed or kept fresh by ``run``."""

    def __init__(
        self,
        currency: str,
        clock: Clock,
        *,
        per_btc: float | None = None,
        url: str | None = None,
        field: str = "",
        refresh: float = 300.0,
        fetch: Fetch = fetch_url,
    ) -> None:
        self.currency = currency
        self._clock = clock
        self._url = url
        self._field = [part for part in field.split(".") if part]
        self._refresh = refresh
        self._fetch = fetch
        self._rate = per_btc
        self._fetched_at: float | None = None
        self._failing = False

    def rate(self) -> float | None:
        """Units of the currency per bitcoin, if known and fresh."""
        if self._url is None or self._rate is None:
            return self._rate
        if self._fetched_at is None:
            return None
        if self._clock.now() - self._fetched_at > STALE_AFTER * self._refresh:
            return None
        return self._rate

    def display(self, amount_msat: int) -> str:
        """``"≈ 9.41 EUR"``, or ``""`` without a fresh rate."""
        rate = self.rate()
        if rate is None:
            return ""
        value = amount_msat * rate / _MSAT_PER_BTC
        digits = 2 if value >= 0.01 else 4
        return f"\u2248 {value:,.{digits}f} {self.currency}"

    async def refresh(self) -> None:
        """Fetch the rate once; a failure keeps the last one (until it is stale)."""
        if self._url is None:
            return
        try:
            body = await asyncio.to_thread(self._fetch, self._url)
            rate = self._parse(body)
        except Exception as error:  # any failure only hides the display
            if not self._failing:  # one line per outage, and no URL (it may hold a key)
                host = urllib.parse.urlsplit(self._url).hostname
                log.warning("fiat rate from %s unavailable: %s", host, type(error).__name__)
            self._failing = True
            return
        if self._failing:
            log.info("fiat rate available again")
        self._failing = False
        self._rate = rate
        self._fetched_at = self._clock.now()

    async def run(self) -> None:
        """Refresh for ever (a supervised task)."""
        while True:
            await self.refresh()
            await asyncio.sleep(self._refresh)

    def _parse(self, body: bytes) -> float:
        if len(body) > MAX_RATE_BODY:
            raise ValueError("answer too large")
        value: object = json.loads(body)
        for part in self._field:
            if not isinstance(value, dict) or part not in value:
                raise KeyError(part)
            value = value[part]
        if isinstance(value, str):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError("not a number")
        rate = float(value)
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError("not a positive number")
        return rate
