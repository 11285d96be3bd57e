"""A token bucket per client address: how the core bounds what unpaid traffic can ask for."""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict

from gateway.ports import Clock


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
        self._buckets[client] = (tokens, now)
        while len(self._buckets) > self._max_clients:
            self._buckets.popitem(last=False)
        return wait
