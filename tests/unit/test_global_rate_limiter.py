"""``GlobalRateLimiter``: a client's budget shared by every instance through the store, with a
local bucket in front that refuses without asking it."""

from __future__ import annotations

import logging
import math
import time

import pytest

from gateway import errors
from gateway.service import Deny, Refusal, rate_limiter
from gateway.service.rate_limiter import GlobalRateLimiter, RateLimiter, rate_limited
from tests.fakes import FakeClock


class SharedBuckets:
    """The store's ``RateBuckets``, in memory: what ``take_rate_token`` must do."""

    def __init__(self) -> None:
        self.buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, as of)
        self.calls = 0

    async def take_rate_token(
        self, bucket: str, rate: float, burst: float, now: float
    ) -> tuple[float, float]:
        self.calls += 1
        tokens, last = self.buckets.get(bucket, (burst, now))
        tokens = min(burst, tokens + max(0.0, now - last) * rate)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / rate
        self.buckets[bucket] = (tokens, now)
        return wait, tokens

    async def prune_rate_buckets(self, idle_before: float, limit: int) -> int:
        raise NotImplementedError


def _limiter(
    buckets: SharedBuckets, clock: FakeClock, limit: str = "challenge"
) -> GlobalRateLimiter:
    return GlobalRateLimiter(limit, buckets, 1.0, 3, 100, clock)


async def test_a_client_gets_its_burst_then_waits_for_the_refill() -> None:
    clock = FakeClock()
    limiter = _limiter(SharedBuckets(), clock)
    assert [await limiter.admit("10.0.0.1") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert await limiter.admit("10.0.0.1") == pytest.approx(1.0)
    clock.advance(1.0)
    assert await limiter.admit("10.0.0.1") == 0.0


async def test_a_local_refusal_does_not_ask_the_store() -> None:
    buckets = SharedBuckets()
    limiter = _limiter(buckets, FakeClock())
    for _ in range(3):
        await limiter.admit("10.0.0.1")
    assert buckets.calls == 3
    for _ in range(10):
        assert await limiter.admit("10.0.0.1") > 0
    assert buckets.calls == 3


async def test_a_global_refusal_syncs_the_local_bucket() -> None:
    """Another instance spent the budget: the store refuses once, then the local bucket does
    until the wait has passed."""
    clock = FakeClock()
    buckets = SharedBuckets()
    buckets.buckets["challenge:10.0.0.1"] = (0.0, clock.now())  # spent elsewhere
    limiter = _limiter(buckets, clock)
    assert await limiter.admit("10.0.0.1") == pytest.approx(1.0)
    assert buckets.calls == 1
    clock.advance(0.5)
    assert await limiter.admit("10.0.0.1") == pytest.approx(0.5)
    assert buckets.calls == 1
    clock.advance(0.5)
    assert await limiter.admit("10.0.0.1") == 0.0
    assert buckets.calls == 2


async def test_instances_sharing_the_buckets_hold_one_budget() -> None:
    clock = FakeClock()
    buckets = SharedBuckets()
    instances = [_limiter(buckets, clock) for _ in range(3)]
    granted = 0
    for second in range(10):
        for _ in range(5):
            for instance in instances:
                granted += await instance.admit("10.0.0.1") == 0.0
        if second < 9:
            clock.advance(1.0)
    assert granted == 3 + 9  # the burst, then one a second, over all instances


async def test_the_limit_and_the_client_key_name_the_bucket() -> None:
    clock = FakeClock()
    buckets = SharedBuckets()
    challenges, redeems = _limiter(buckets, clock), _limiter(buckets, clock, "redeem")
    await challenges.admit("2001:db8::1")
    await redeems.admit("2001:db8::2")  # the same /64
    await challenges.admit("::ffff:10.0.0.1")
    assert sorted(buckets.buckets) == [
        "challenge:10.0.0.1",
        "challenge:2001:db8::/64",
        "redeem:2001:db8::/64",
    ]


async def test_a_failing_store_refuses_with_503_never_admits() -> None:
    class Failing(SharedBuckets):
        async def take_rate_token(
            self, bucket: str, rate: float, burst: float, now: float
        ) -> tuple[float, float]:
            raise errors.StoreError("connection refused")

    limiter = _limiter(Failing(), FakeClock())
    assert await rate_limited(limiter, "10.0.0.1", Refusal.TOO_MANY_CHALLENGES) == Deny(
        503, Refusal.STORE_UNAVAILABLE, retry_after=5
    )


async def test_rate_limited_answers_429_with_the_wait_for_either_limiter() -> None:
    clock = FakeClock()
    for limiter in (
        RateLimiter(0.5, 1, 100, clock),
        GlobalRateLimiter("redeem", SharedBuckets(), 0.5, 1, 100, clock),
    ):
        assert await rate_limited(limiter, "10.0.0.1", Refusal.TOO_MANY_REDEEMS) is None
        assert await rate_limited(limiter, "10.0.0.1", Refusal.TOO_MANY_REDEEMS) == Deny(
            429, Refusal.TOO_MANY_REDEEMS, retry_after=2
        )


class Blipping(SharedBuckets):
    """Fails the first ``failures`` calls, as a store does during a blip."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def take_rate_token(
        self, bucket: str, rate: float, burst: float, now: float
    ) -> tuple[float, float]:
        if self.failures:
            self.failures -= 1
            raise errors.StoreError("connection refused")
        return await super().take_rate_token(bucket, rate, burst, now)


async def test_a_store_failure_gives_the_local_token_back() -> None:
    """Nothing was taken from the shared bucket: the local one still refuses exactly."""
    limiter = _limiter(Blipping(2), FakeClock())
    for _ in range(2):
        with pytest.raises(errors.StoreError):
            await limiter.admit("10.0.0.1")
    assert [await limiter.admit("10.0.0.1") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert await limiter.admit("10.0.0.1") == pytest.approx(1.0)


async def test_a_store_outage_is_logged_once_in_a_while_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(rate_limiter, "_failure_logged_at", -math.inf)
    limiter = _limiter(Blipping(100), FakeClock())
    for _ in range(5):
        await rate_limited(limiter, "10.0.0.1", Refusal.TOO_MANY_CHALLENGES)
    records = [r for r in caplog.records if r.name == "gateway.service.rate_limiter"]
    assert [(r.levelno, r.exc_info) for r in records] == [(logging.WARNING, None)]
    assert "StoreError('connection refused')" in records[0].getMessage()

    # The interval later, once more.
    monkeypatch.setattr(
        rate_limiter, "_failure_logged_at", time.monotonic() - rate_limiter._FAILURE_LOG_INTERVAL
    )
    await rate_limited(limiter, "10.0.0.1", Refusal.TOO_MANY_CHALLENGES)
    await rate_limited(limiter, "10.0.0.1", Refusal.TOO_MANY_CHALLENGES)
    records = [r for r in caplog.records if r.name == "gateway.service.rate_limiter"]
    assert len(records) == 2
