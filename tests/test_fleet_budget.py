"""A provider's request budget shared by its instances through Redis: two Alpha Vantage
adapters on one key stay within one budget together and both keep polling; a provider's
"slow down" reaches every instance; with Redis down each falls back to its share."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import uuid
from collections.abc import AsyncIterator

import redis.asyncio as aioredis

from common.fleet_budget import FleetBudget
from common.model import DataType
from common.provider import Instrument, ProviderConfig
from simulators.alphavantage import AlphaVantageSimConfig, AlphaVantageSimulator
from tests.conftest import Services
from tests.running import until
from workers.alphavantage import AlphaVantageAdapter
from workers.worker import fleet_budget

KEY_ENV = "FEEDFLEET_TEST_BUDGET_AV_KEY"
WINDOW_S = 2.0  # the budget's window in these tests (a minute in the fleet)
BUDGET = 10


def av_adapter(port: int, name: str, monkeypatch_env: dict[str, str]) -> AlphaVantageAdapter:
    monkeypatch_env[KEY_ENV] = "test-key"
    row = ProviderConfig(
        id=name, name=name, provider_type="alphavantage",
        connection_config={"base_url": f"http://127.0.0.1:{port}", "api_key_env": KEY_ENV,
                           "functions": ["GLOBAL_QUOTE"], "poll_interval_s": 0},
        rate_limits={"requests_per_second": 1000},
    )  # fmt: skip
    return AlphaVantageAdapter(row)


async def poll(adapter: AlphaVantageAdapter) -> None:
    async for _ in adapter.stream_batches():
        pass


@contextlib.asynccontextmanager
async def polling(adapters: list[AlphaVantageAdapter]) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(poll(a)) for a in adapters]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_two_instances_share_one_budget_and_both_keep_polling(services: Services) -> None:
    sim = AlphaVantageSimulator(AlphaVantageSimConfig(symbols=["IBM", "MSFT"], bar_seconds=1.0))
    await sim.start("127.0.0.1", 0)
    redis = aioredis.from_url(services.redis_url)
    name = f"budget-{uuid.uuid4().hex[:8]}"
    adapters = [av_adapter(sim.port, name, os.environ) for _ in range(2)]
    for adapter in adapters:
        adapter.budget = FleetBudget(redis, name, BUDGET, lambda: 2, window_s=WINDOW_S)
        await adapter.connect()
        await adapter.subscribe([Instrument("IBM", frozenset({DataType.TRADE}))])
    try:
        async with polling(adapters):
            # Each would make a thousand requests a second on its own limiter.
            await until(lambda: len({int(t // WINDOW_S) for t in sim.request_times}) >= 4,
                        30, "requests in four windows")  # fmt: skip
        per_window = collections.Counter(int(t // WINDOW_S) for t in sim.request_times)
        windows = sorted(per_window)
        # A request granted just before a window ends may arrive just after: one per
        # instance at most, so a window's count may exceed the budget by two, never more.
        assert max(per_window.values()) <= BUDGET + 2, per_window
        assert sum(per_window.values()) <= BUDGET * len(windows), per_window
        # The whole windows in between were used to the full budget, not starved.
        assert all(per_window[w] >= BUDGET - 2 for w in windows[1:-1]), per_window
        assert all(a.requests_sent() > BUDGET // 4 for a in adapters)
        counted = await redis.get(f"ratelimit:{name}:{windows[-2]}")
        assert counted is not None and int(counted) == BUDGET
        assert 0 < await redis.ttl(f"ratelimit:{name}:{windows[-2]}") <= 60
    finally:
        for adapter in adapters:
            await adapter.disconnect()
        await sim.stop()
        await redis.aclose()


async def test_a_hold_stops_every_instance(services: Services) -> None:
    redis = aioredis.from_url(services.redis_url)
    name = f"budget-{uuid.uuid4().hex[:8]}"
    first = FleetBudget(redis, name, 100, window_s=600.0)
    second = FleetBudget(redis, name, 100, window_s=600.0)
    try:
        await asyncio.wait_for(second.acquire(), 5)  # takes a chunk of one
        await first.hold(30.0)
        assert 0 < await redis.pttl(f"ratelimit:{name}:hold") <= 30_000
        waiting = asyncio.create_task(second.acquire())
        # A generous look against a 30 s hold: still waiting means it honoured it.
        await asyncio.sleep(0.5)
        assert not waiting.done()
        waiting.cancel()
        await redis.delete(f"ratelimit:{name}:hold")
        await asyncio.wait_for(second.acquire(), 5)
    finally:
        await redis.aclose()


async def test_with_redis_down_each_instance_keeps_to_its_share() -> None:
    # Nothing listens on port 1: every call to Redis fails at once.
    redis = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    now = [1_000_000.0]
    budget = FleetBudget(redis, "down", 10, lambda: 3, window_s=60.0, clock=lambda: now[0])
    try:
        for _ in range(3):  # 10 // 3 instances
            await asyncio.wait_for(budget.acquire(), 5)
        assert budget.fallbacks == 1
        waiting = asyncio.create_task(budget.acquire())
        await asyncio.sleep(0.5)  # the share is spent: it waits for the next minute
        assert not waiting.done()
        waiting.cancel()
        now[0] += 60.0
        await asyncio.wait_for(budget.acquire(), 5)
        assert budget.fallbacks == 2
    finally:
        await redis.aclose()


def test_the_worker_shares_a_budget_only_where_the_row_sets_one() -> None:
    redis = aioredis.from_url("redis://127.0.0.1:1/0")

    def row(rate_limits: dict[str, object]) -> ProviderConfig:
        return ProviderConfig("id", "av-row", "alphavantage", rate_limits=rate_limits)

    budget = fleet_budget(row({"requests_per_minute": 75, "requests_per_second": 5}), redis,
                          lambda: 3)  # fmt: skip
    assert budget is not None
    assert (budget.provider, budget.per_window, budget.window_s, budget.chunk) == (
        "av-row", 75, 60.0, 1,
    )  # fmt: skip
    assert budget.instances() == 3
    assert fleet_budget(row({"requests_per_minute": "600"}), redis, lambda: 1) is not None
    for bad in ({}, {"requests_per_second": 5}, {"requests_per_minute": 0},
                {"requests_per_minute": "lots"}, {"requests_per_minute": None}):  # fmt: skip
        assert fleet_budget(row(bad), redis, lambda: 1) is None, bad
