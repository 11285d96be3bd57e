"""A token bucket per client address: how the core bounds what unpaid traffic can ask for.

``RateLimiter`` keeps the buckets in the process; ``GlobalRateLimiter`` in the store, shared
by every gateway instance on it (``RateBuckets``: PostgreSQL), with a ``RateLimiter`` in front
that refuses a flooding client without asking the store. The service takes either as a
``ClientLimiter`` and asks it with ``rate_limited``.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from collections import OrderedDict
from typing import Protocol

from gateway import errors
from gateway.ports import Clock, RateBuckets
from gateway.service.decisions import Deny, Refusal

log = logging.getLogger(__name__)


def client_key(address: str, ipv6_prefix: int = 64) -> str:
    """One key per client: an IPv6 client commonly holds a whole /64, so its addresses share
    the key of their ``ipv6_prefix``; an IPv4-mapped address is its IPv4 address; a client
    that is not an IP address (say ``"unknown"``) is its own key."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv4Address):
        return str(parsed)
    if parsed.ipv4_mapped is not None:
        return str(parsed.ipv4_mapped)
    # The zone (fe80::1%eth0) names an interface of ours, not a different client.
    bits = int(parsed) >> (128 - ipv6_prefix) << (128 - ipv6_prefix)
    return f"{ipaddress.IPv6Address(bits)}/{ipv6_prefix}"


class RateLimiter:
    """A token bucket per client address, so unpaid traffic cannot flood the node.

    An IPv6 client commonly holds a whole /64 (or more), so IPv6 addresses share one bucket
    per ``ipv6_prefix``; an IPv4-mapped IPv6 address counts as its IPv4 address, and a
    client that is not an IP address (say ``"unknown"``) is its own key.
    """

    def __init__(
        self, rate: float, burst: int, max_clients: int, clock: Clock, ipv6_prefix: int = 64
    ) -> None:
        if not (math.isfinite(rate) and rate > 0) or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        if not 1 <= ipv6_prefix <= 128:
            raise ValueError("ipv6_prefix must be between 1 and 128")
        self._rate = rate
        self._burst = float(burst)
        self._max_clients = max_clients
        self._clock = clock
        self._ipv6_prefix = ipv6_prefix
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def bucket_of(self, client: str) -> str:
        """The key of ``client``'s bucket."""
        return client_key(client, self._ipv6_prefix)

    def acquire(self, client: str) -> float:
        """Take one token: 0.0 if granted, else the seconds until one is available."""
        client = self.bucket_of(client)
        now = self._clock.now()
        tokens, last = self._buckets.pop(client, (self._burst, now))
        # A wall clock stepping back (NTP) must not read as a wait of that many seconds.
        tokens = min(self._burst, tokens + max(0.0, now - last) * self._rate)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self._rate
        self._remember(client, tokens, now)
        return wait

    async def admit(self, client: str) -> float:
        """``acquire``, as a ``ClientLimiter``."""
        return self.acquire(client)

    def give_back(self, client: str) -> None:
        """Return the token ``acquire`` just granted ``client``."""
        bucket = self.bucket_of(client)
        held = self._buckets.get(bucket)
        if held is not None:  # else forgotten: a new bucket starts full anyway
            tokens, last = held
            self._buckets[bucket] = (min(self._burst, tokens + 1), last)

    def set_tokens(self, bucket: str, tokens: float, now: float) -> None:
        """Make ``bucket`` hold ``tokens`` as of ``now`` (what a shared bucket holds)."""
        self._buckets.pop(bucket, None)
        self._remember(bucket, tokens, now)

    def _remember(self, bucket: str, tokens: float, now: float) -> None:
        self._buckets[bucket] = (tokens, now)
        while len(self._buckets) > self._max_clients:
            self._buckets.popitem(last=False)


class ClientLimiter(Protocol):
    """A token bucket per client, as the service asks it (``rate_limited``)."""

    def bucket_of(self, client: str) -> str:
        """The key of ``client``'s bucket."""

    async def admit(self, client: str) -> float:
        """Take one token: 0.0 if granted, else the seconds until one is available."""


class GlobalRateLimiter:
    """A token bucket per client in the store's ``RateBuckets``, shared by every gateway
    instance on it; ``limit`` names the limit in the bucket's key (``challenge:10.0.0.1``).

    A local ``RateLimiter`` of the same rate and burst answers first: after every answer of
    the store it holds what the shared bucket held, and both refill alike while only other
    instances take from the shared one, so its tokens are never fewer and its refusal is
    exact, without a round trip to the store. What it grants, the store decides.
    """

    def __init__(
        self,
        limit: str,
        buckets: RateBuckets,
        rate: float,
        burst: int,
        max_clients: int,
        clock: Clock,
        ipv6_prefix: int = 64,
    ) -> None:
        self._local = RateLimiter(rate, burst, max_clients, clock, ipv6_prefix)
        self._limit = limit
        self._buckets = buckets
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock

    def bucket_of(self, client: str) -> str:
        """The key of ``client``'s bucket (without the limit's name)."""
        return self._local.bucket_of(client)

    async def admit(self, client: str) -> float:
        """Take one token from ``client``'s shared bucket: 0.0 if granted, else the seconds
        until one is available. A store failure raises ``StoreError``: no limit is skipped."""
        wait = self._local.acquire(client)
        if wait > 0:
            return wait
        bucket = self.bucket_of(client)
        now = self._clock.now()
        try:
            wait, tokens = await self._buckets.take_rate_token(
                f"{self._limit}:{bucket}", self._rate, self._burst, now
            )
        except BaseException:
            # The store took nothing, so nor may the local bucket: with fewer tokens than the
            # shared one it would refuse wrongly (more, if a cancelled call took one, only
            # costs a round trip).
            self._local.give_back(client)
            raise
        self._local.set_tokens(bucket, tokens, now)
        return wait


# During a store outage every request fails alike: one warning per this many seconds.
_FAILURE_LOG_INTERVAL = 10.0
_failure_logged_at = -math.inf


async def rate_limited(limiter: ClientLimiter, client: str, refused: Refusal) -> Deny | None:
    """None if ``limiter`` admits ``client``; else a 429 ``refused`` with the wait, or a 503
    when the store holding the buckets fails."""
    global _failure_logged_at
    try:
        wait = await limiter.admit(client)
    except errors.StoreError as error:
        now = time.monotonic()
        if now - _failure_logged_at >= _FAILURE_LOG_INTERVAL:
            _failure_logged_at = now
            log.warning(
                "store failed while rate limiting (answering 503; logged once per %gs): %r",
                _FAILURE_LOG_INTERVAL,
                error,
            )
        return Deny(503, Refusal.STORE_UNAVAILABLE, retry_after=5)
    return Deny(429, refused, retry_after=math.ceil(wait)) if wait > 0 else None
