"""A provider's request budget shared by its instances through Redis: two Alpha Vantage
adapters on one key stay within one budget together and both keep polling; a provider's
"slow down" reaches every instance; with Redis down each falls back to its share; and one
cancel stops a poller, whatever it was waiting on when it came."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection

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


def av_adapter(
    port: int, name: str, monkeypatch_env: dict[str, str], poll_interval_s: float = 0
) -> AlphaVantageAdapter:
    monkeypatch_env[KEY_ENV] = "test-key"
    row = ProviderConfig(
        id=name, name=name, provider_type="alphavantage",
        connection_config={"base_url": f"http://127.0.0.1:{port}", "api_key_env": KEY_ENV,
                           "functions": ["GLOBAL_QUOTE"], "poll_interval_s": poll_interval_s},
        rate_limits={"requests_per_second": 1000},
    )  # fmt: skip
    return AlphaVantageAdapter(row)


async def poll(adapter: AlphaVantageAdapter) -> None:
    async for _ in adapter.stream_batches():
        pass


async def cancel_until_done(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel again and again until the tasks end (at most 5 s): a cancel that was lost
    leaves a task running on, and the next may be lost the same way."""
    for _ in range(100):
        running = [t for t in tasks if not t.done()]
        if not running:
            return
        for task in running:
            task.cancel()
        await asyncio.wait(running, timeout=0.05)


@contextlib.asynccontextmanager
async def polling(adapters: list[AlphaVantageAdapter]) -> AsyncIterator[None]:
    """The adapters poll inside the block; one cancel each must stop them at its end."""
    tasks = [asyncio.create_task(poll(a)) for a in adapters]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        _, running = await asyncio.wait(tasks, timeout=10.0)
        await cancel_until_done(tasks)
        assert not running, f"{len(running)} poller(s) ran on after their cancel"
        for task in tasks:
            if not task.cancelled():
                task.result()  # a poller that failed fails the test


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
        # Likewise the first window may hold requests granted in the one before it, which
        # no request arrived in: one per instance at most.
        assert sum(per_window.values()) <= BUDGET * len(windows) + 2, per_window
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


def cancel_on_send(redis_url: str, victims: list[asyncio.Task[None]]) -> aioredis.Redis:
    """A client to the real Redis whose connections cancel the next of ``victims`` as soon
    as a command has been written, before redis-py's ``send_packed_command`` resumes.

    That is the moment Python 3.11's ``asyncio.wait_for``, which redis-py wraps around
    each write when the client has a socket timeout, drops a cancellation. It is hooked
    on redis-py's private ``_send_packed_command``: the test asserts the cancel was sent.
    """

    class CancellingConnection(Connection):
        async def _send_packed_command(self, command: Iterable[bytes]) -> None:
            await super()._send_packed_command(command)
            if victims:
                victims.pop().cancel()

    pool = aioredis.ConnectionPool.from_url(
        redis_url, connection_class=CancellingConnection, socket_timeout=5.0
    )
    return aioredis.Redis(connection_pool=pool)


async def keep_acquiring(budget: FleetBudget) -> None:
    """A poller's use of the budget: one token per request, for ever."""
    while True:
        await budget.acquire()


async def hold_for_a_minute(budget: FleetBudget) -> None:
    await budget.hold(60.0)


@pytest.mark.parametrize("use", [keep_acquiring, hold_for_a_minute],
                         ids=["acquire", "hold"])  # fmt: skip
async def test_a_cancel_that_arrives_as_the_redis_command_is_sent_is_not_lost(
    services: Services, use: Callable[[FleetBudget], Awaitable[None]]
) -> None:
    victims: list[asyncio.Task[None]] = []
    redis = cancel_on_send(services.redis_url, victims)
    # A chunk of one: every acquire goes to Redis.
    budget = FleetBudget(redis, f"budget-{uuid.uuid4().hex[:8]}", 600, window_s=600.0)
    task = asyncio.create_task(use(budget))
    victims.append(task)
    try:
        await asyncio.wait([task], timeout=5.0)
        assert not victims, "the cancel was never sent"
        # Lost, the cancel would leave a poller polling and its stop waiting for ever.
        assert task.cancelled(), "the cancel was lost" if not task.done() else task
    finally:
        await cancel_until_done([task])
        await redis.aclose()


async def test_a_poller_stopped_as_a_subscribe_wakes_it_stops(services: Services) -> None:
    sim = AlphaVantageSimulator(AlphaVantageSimConfig(symbols=["IBM", "MSFT"]))
    await sim.start("127.0.0.1", 0)
    adapter = av_adapter(sim.port, f"wake-{uuid.uuid4().hex[:8]}", os.environ, 600)
    await adapter.connect()
    await adapter.subscribe([Instrument("IBM", frozenset({DataType.TRADE}))])
    task = asyncio.create_task(poll(adapter))
    try:
        await until(lambda: sim.answered >= 1, 10, "the first poll")
        await asyncio.sleep(0.2)  # the cycle is done: it waits for the next, or a wake
        # The wake and the stop in one step: the waiting poller sees both at once.
        await adapter.subscribe([Instrument("MSFT", frozenset({DataType.TRADE}))])
        task.cancel()
        await asyncio.wait([task], timeout=5.0)
        assert task.cancelled(), "the cancel was lost" if not task.done() else task
    finally:
        await cancel_until_done([task])
        await adapter.disconnect()
        await sim.stop()


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
