"""The token-bucket rate limiter on a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from common.ratelimit import RateLimiter, TokenBucket


class FakeClock:
    def __init__(self, now: float = 500.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def tokens(limiter: RateLimiter) -> list[float]:
    return [b.tokens for b in limiter.buckets]


async def take(limiter: RateLimiter, n: int) -> None:
    """``n`` acquires that must not wait (the clock is fake: a wait would never end)."""
    for i in range(n):
        assert limiter.delay() == 0.0, f"acquire {i + 1} of {n} would wait"
        await limiter.acquire()


def test_no_limits_never_wait() -> None:
    assert RateLimiter({}, FakeClock()).delay() == 0.0


async def test_the_per_second_window_wins_when_it_is_the_tightest() -> None:
    clock = FakeClock()
    limiter = RateLimiter({"requests_per_second": 2, "requests_per_minute": 30}, clock)
    await take(limiter, 2)
    # Per second: empty, refills 2/s -> 0.5 s; per minute: 28 left -> 0 s.
    assert limiter.delay() == 0.5
    clock.now += 0.5
    assert limiter.delay() == 0.0


async def test_the_per_minute_window_wins_when_it_is_the_tightest() -> None:
    clock = FakeClock()
    limiter = RateLimiter({"requests_per_second": 10, "requests_per_minute": 30}, clock)
    await take(limiter, 10)
    clock.now += 1.0  # the per-second bucket is full again
    await take(limiter, 10)
    clock.now += 1.0
    await take(limiter, 10)
    clock.now += 0.5
    # Per minute: 30 taken, 1.25 refilled over the 2.5 s (0.5/s).
    await take(limiter, 1)
    # Now per second: 4 left -> 0 s; per minute: 0.25 left -> 0.75 / 0.5 = 1.5 s.
    assert tokens(limiter) == [4.0, 0.25]
    assert limiter.delay() == 1.5
    clock.now += 1.0
    assert limiter.delay() == 0.5
    clock.now += 0.5
    assert limiter.delay() == 0.0


async def test_the_per_day_window_counts_too() -> None:
    clock = FakeClock()
    limiter = RateLimiter(
        {"requests_per_second": 5, "requests_per_minute": 100, "requests_per_day": 2}, clock
    )
    await take(limiter, 2)
    assert limiter.delay() == pytest.approx(86400.0 / 2)


async def test_delay_does_not_take_tokens() -> None:
    clock = FakeClock()
    limiter = RateLimiter({"requests_per_second": 2, "requests_per_minute": 30}, clock)
    for _ in range(5):
        assert limiter.delay() == 0.0
    assert tokens(limiter) == [2.0, 30.0]
    assert limiter.requests == 0
    await take(limiter, 2)  # the whole per-second capacity is still there
    for _ in range(5):
        assert limiter.delay() == 0.5
    assert tokens(limiter) == [0.0, 28.0]


async def test_acquire_takes_one_token_from_every_bucket() -> None:
    clock = FakeClock()
    limiter = RateLimiter(
        {"requests_per_second": 4, "requests_per_minute": 60, "requests_per_day": 1000}, clock
    )
    await limiter.acquire()
    assert tokens(limiter) == [3.0, 59.0, 999.0]
    await limiter.acquire()
    assert tokens(limiter) == [2.0, 58.0, 998.0]
    assert limiter.requests == 2


async def test_refill_rate_and_cap() -> None:
    clock = FakeClock()
    limiter = RateLimiter({"requests_per_second": 4}, clock)
    await take(limiter, 4)
    assert limiter.delay() == 0.25  # 4 per second: one token every 0.25 s
    clock.now += 0.125
    assert limiter.delay() == 0.125  # half a token there, half to come
    clock.now += 0.125
    await take(limiter, 1)
    assert tokens(limiter) == [0.0]
    # A long idle time fills the bucket to its capacity, never beyond.
    clock.now += 3600.0
    await take(limiter, 4)
    assert limiter.delay() == 0.25


async def test_acquire_waits_until_a_token_is_there() -> None:
    clock = FakeClock()
    # 64 per second: acquire sleeps (in real time) 1/64 s between checks.
    limiter = RateLimiter({"requests_per_second": 64}, clock)
    await take(limiter, 64)
    waiting = asyncio.create_task(limiter.acquire())
    try:
        done, _ = await asyncio.wait({waiting}, timeout=0.2)
        assert not done, "acquire went ahead with an empty bucket"
        assert limiter.requests == 64
        clock.now += 1 / 64
        await asyncio.wait_for(waiting, 10)
    finally:
        waiting.cancel()
    assert limiter.requests == 65
    assert tokens(limiter) == [0.0]


@pytest.mark.parametrize(
    ("limits", "key"),
    [
        ({"requests_per_second": 0}, "requests_per_second"),
        ({"requests_per_minute": -5}, "requests_per_minute"),
        ({"requests_per_second": 10, "requests_per_day": 0.0}, "requests_per_day"),
    ],
)
def test_a_limit_that_is_not_positive_is_refused_by_name(limits: dict, key: str) -> None:
    with pytest.raises(ValueError, match=rf"^rate_limits\.{key} must be positive"):
        RateLimiter(limits, FakeClock())


def test_a_limit_set_to_null_is_no_limit() -> None:
    limiter = RateLimiter({"requests_per_second": None, "requests_per_minute": 2}, FakeClock())
    assert [b.capacity for b in limiter.buckets] == [2.0]


def test_a_bucket_take_returns_zero_or_the_exact_wait() -> None:
    bucket = TokenBucket(capacity=4.0, refill_per_s=4.0, tokens=1.0, updated=10.0)
    assert bucket.take(10.0) == 0.0
    assert (bucket.tokens, bucket.updated) == (0.0, 10.0)
    # Half a token refilled: the other half takes 0.125 s, and nothing is taken meanwhile.
    assert bucket.take(10.125) == 0.125
    assert (bucket.tokens, bucket.updated) == (0.5, 10.125)
    assert bucket.take(10.25) == 0.0
    assert bucket.tokens == 0.0


async def test_one_and_a_half_tokens_mean_no_wait() -> None:
    clock = FakeClock()
    limiter = RateLimiter({"requests_per_second": 4}, clock)
    await take(limiter, 4)
    clock.now += 0.375  # 1.5 tokens back
    assert limiter.delay() == 0.0
    await limiter.acquire()
    assert tokens(limiter) == [0.5]
    assert limiter.delay() == 0.125


async def test_a_limit_of_one_is_allowed() -> None:
    # Free tiers allow one request per minute or second: the smallest positive whole limit.
    clock = FakeClock()
    limiter = RateLimiter({"requests_per_minute": 1}, clock)
    await take(limiter, 1)
    assert limiter.delay() == 60.0
