"""The circuit breaker on a fake clock, and its mirror ``circuit:{provider}`` in Redis."""

from __future__ import annotations

from pathlib import Path

import redis.asyncio as aioredis

from common.circuit import CircuitBreaker, CircuitState
from common.redis_keys import CIRCUIT_TTL_S
from tests.conftest import Services
from tests.test_status_reporter import build_reporter, text

CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def breaker(clock: FakeClock) -> CircuitBreaker:
    # Binary-exact times, so the boundaries below are compared exactly.
    return CircuitBreaker(failure_threshold=3, open_s=10.0, clock=clock)


def test_stays_closed_below_the_threshold_and_opens_exactly_at_it() -> None:
    clock = FakeClock()
    cb = breaker(clock)
    assert (cb.state, cb.wait_s()) == (CLOSED, 0.0)
    cb.record_failure()
    cb.record_failure()
    assert (cb.state, cb.wait_s(), cb.failures) == (CLOSED, 0.0, 2)
    cb.record_failure()
    assert (cb.state, cb.wait_s(), cb.failures) == (OPEN, 10.0, 3)


def test_wait_counts_down_and_half_open_comes_exactly_at_open_s() -> None:
    clock = FakeClock()
    cb = breaker(clock)
    for _ in range(3):
        cb.record_failure()
    clock.now += 4.0
    assert (cb.state, cb.wait_s()) == (OPEN, 6.0)
    clock.now += 5.5
    assert (cb.state, cb.wait_s()) == (OPEN, 0.5)  # just before open_s
    clock.now += 0.5
    assert (cb.state, cb.wait_s()) == (HALF_OPEN, 0.0)  # exactly open_s
    clock.now += 100.0
    assert (cb.state, cb.wait_s()) == (HALF_OPEN, 0.0)


def test_a_failure_when_half_open_reopens_for_a_fresh_open_s() -> None:
    clock = FakeClock()
    cb = breaker(clock)
    for _ in range(3):
        cb.record_failure()
    clock.now += 12.0
    assert cb.state is HALF_OPEN
    cb.record_failure()
    assert (cb.state, cb.wait_s()) == (OPEN, 10.0)
    clock.now += 9.5
    assert (cb.state, cb.wait_s()) == (OPEN, 0.5)
    clock.now += 0.5
    assert cb.state is HALF_OPEN


def test_a_success_closes_and_resets_the_count() -> None:
    clock = FakeClock()
    cb = breaker(clock)
    for _ in range(3):
        cb.record_failure()
    clock.now += 10.0
    cb.record_success()
    assert (cb.state, cb.wait_s(), cb.failures, cb.opened_at) == (CLOSED, 0.0, 0, None)
    # The count starts again: two failures are below the threshold once more.
    cb.record_failure()
    cb.record_failure()
    assert cb.state is CLOSED
    cb.record_failure()
    assert cb.state is OPEN


def test_a_success_between_failures_means_they_are_not_consecutive() -> None:
    cb = breaker(FakeClock())
    cb.record_failure()
    cb.record_failure()
    cb.record_success()
    cb.record_failure()
    cb.record_failure()
    assert (cb.state, cb.failures) == (CLOSED, 2)


async def test_the_redis_key_follows_the_breaker(
    services: Services, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    clock = FakeClock()
    cb = breaker(clock)
    built = build_reporter(services, redis_client, tmp_path, cb)
    key = f"circuit:{built.name}"

    async def published() -> str:
        await built.reporter.publish()
        value = await redis_client.get(key)
        ttl = await redis_client.ttl(key)
        assert 0 < ttl <= CIRCUIT_TTL_S, f"{key} TTL {ttl}"
        return text(value)

    try:
        assert await published() == "CLOSED"
        cb.record_failure()
        cb.record_failure()
        assert await published() == "CLOSED"
        cb.record_failure()
        assert await published() == "OPEN"
        clock.now += 9.5
        assert await published() == "OPEN"
        clock.now += 0.5
        assert await published() == "HALF_OPEN"
        cb.record_failure()
        assert await published() == "OPEN"
        clock.now += 10.0
        cb.record_success()
        assert await published() == "CLOSED"
    finally:
        built.journal.close()
