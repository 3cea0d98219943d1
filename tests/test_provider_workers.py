"""Every non-Polygon provider's worker against its simulator, into all three sinks.

The same path as the Polygon integration test, once per provider: the coordinator assigns
the symbols, the worker streams from the simulator over real sockets, and what it received
is what Pulsar, PostgreSQL and Redis hold.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio as aioredis

from common import db
from common.embedded import free_port
from common.model import DataType
from simulators.alphavantage import AlphaVantageSimConfig, AlphaVantageSimulator
from simulators.bloomberg import BloombergSimConfig, BloombergSimulator
from simulators.fix import FixSimConfig, FixSimulator
from simulators.iex import IexSimConfig, IexSimulator
from simulators.refinitiv import RefinitivSimConfig, RefinitivSimulator
from tests.conftest import Services
from tests.pulsar_collector import PulsarCollector
from tests.running import RunningWorker, until
from tests.test_coordinator import eventually
from tests.test_pipeline_integration import KEY_ENV, LatestWatch, assert_latest_is_newest


@dataclass
class Case:
    """How to run one provider's simulator and point a provider row at it."""

    provider_type: str
    symbols: Callable[[str], list[str]]
    start: Callable[[list[str]], Any]  # -> (simulator, connection_config) coroutine
    min_records: int
    data_types: tuple[DataType, ...] = (DataType.TRADE, DataType.QUOTE)
    rate_limits: dict[str, Any] | None = None


async def _refinitiv(symbols: list[str]) -> tuple[Any, dict[str, Any]]:
    sim = RefinitivSimulator(RefinitivSimConfig(symbols=symbols, rate=1000))
    port = await sim.start("127.0.0.1", 0)
    return sim, {"url": f"ws://127.0.0.1:{port}/WebSocket", "user": "feedfleet"}


async def _alphavantage(symbols: list[str]) -> tuple[Any, dict[str, Any]]:
    sim = AlphaVantageSimulator(AlphaVantageSimConfig(symbols=symbols, bar_seconds=0.2))
    port = await sim.start("127.0.0.1", 0)
    return sim, {
        "base_url": f"http://127.0.0.1:{port}", "api_key_env": KEY_ENV,
        "functions": ["GLOBAL_QUOTE", "TIME_SERIES_INTRADAY"], "interval": "1min",
        "poll_interval_s": 0.5,
    }  # fmt: skip


async def _iex(symbols: list[str]) -> tuple[Any, dict[str, Any]]:
    udp = free_port()
    sim = IexSimulator(IexSimConfig(symbols=symbols, destination=("127.0.0.1", udp), rate=1000))
    await sim.start("127.0.0.1", 0)
    return sim, {"host": "127.0.0.1", "port": udp, "heartbeat_timeout_s": 5}


async def _fix(symbols: list[str]) -> tuple[Any, dict[str, Any]]:
    sim = FixSimulator(FixSimConfig(symbols=symbols, rate=500))
    port = await sim.start("127.0.0.1", 0)
    return sim, {
        "host": "127.0.0.1", "port": port, "sender_comp_id": "FEEDFLEET",
        "target_comp_id": "FIXSIM", "heartbeat_interval": 5,
    }  # fmt: skip


async def _bloomberg(symbols: list[str]) -> tuple[Any, dict[str, Any]]:
    sim = BloombergSimulator(BloombergSimConfig(symbols=symbols, rate=1000))
    port = await sim.start("127.0.0.1", 0)
    return sim, {"blpapi_module": "simulators.bloomberg", "host": "127.0.0.1", "port": port}


CASES = [
    Case("refinitiv", lambda t: [f"R{t}{i}.N" for i in range(3)], _refinitiv, 500),
    Case("alphavantage", lambda t: [f"A{t}{i}" for i in range(2)], _alphavantage, 5,
         (DataType.TRADE, DataType.AGGREGATE), {"requests_per_second": 50}),
    Case("iex", lambda t: [f"I{t}{i}" for i in range(3)], _iex, 500),
    Case("fix", lambda t: [f"F{t}{i}" for i in range(3)], _fix, 300),
    Case("bloomberg", lambda t: [f"B{t}{i}" for i in range(3)], _bloomberg, 500),
]  # fmt: skip


async def _requests_mirrored(redis_client: aioredis.Redis, provider_name: str) -> int:
    keys = await redis_client.keys(f"ratelimit:{provider_name}:*")
    return sum([int(await redis_client.get(k) or 0) for k in keys])


@pytest.mark.parametrize("case", CASES, ids=[c.provider_type for c in CASES])
async def test_provider_worker_reaches_every_sink(
    case: Case, services: Services, conn: db.Conn, redis_client: aioredis.Redis
) -> None:
    os.environ[KEY_ENV] = "test-key"
    tag = uuid.uuid4().hex[:5].upper()
    symbols = case.symbols(tag)
    sim, config = await case.start(symbols)
    config["stale_after_s"] = None
    name = f"{case.provider_type}-{tag.lower()}"
    provider_id = await db.upsert_provider(
        conn, name, case.provider_type, config, case.rate_limits or {}
    )
    await db.subscribe(conn, provider_id, symbols, list(case.data_types))
    settings = services.settings()
    collector = PulsarCollector(settings.pulsar_url, settings.pulsar_topic)
    running = RunningWorker.start(settings, name)
    worker = running.worker
    watch = LatestWatch(redis_client, symbols)
    try:
        await until(
            lambda: worker.pipeline is not None and worker.pipeline.received >= case.min_records,
            45, f"{case.min_records} records from {case.provider_type}",
        )  # fmt: skip
        assert worker.status.value in ("CONNECTED", "RATE_LIMITED")
        if case.provider_type == "alphavantage":
            # The worker mirrors its request count to ratelimit:{provider}:{minute}.
            await eventually(lambda: _requests_mirrored(redis_client, name), lambda n: n > 0,
                             "the request count in ratelimit:{provider}:{minute}")  # fmt: skip
            minute_keys = await redis_client.keys(f"ratelimit:{name}:*")
            assert 0 < await redis_client.ttl(minute_keys[0]) <= 60
        watch.start()
        await sim.stop()
        # Stopping the worker ends its intake at a known point (what it had read by then);
        # it then drains its sinks, flushes the cache and writes its last status.
        worker.stop()
        await asyncio.wait_for(running.worker_task, 60)
        pipeline = worker.pipeline
        assert pipeline is not None
        totals = pipeline.counts()
        assert totals.received >= case.min_records
        assert totals.received == totals.published == totals.stored
        assert totals.spooled == 0
        cur = await conn.execute(
            "SELECT count(DISTINCT event_id), count(*) FILTER (WHERE symbol <> ALL(%s)) "
            "FROM raw_market_data WHERE provider = %s",
            (symbols, name),
        )
        assert await cur.fetchone() == (totals.received, 0)
        assert await collector.wait_for(totals.received, timeout=30) == totals.received
        seen = {e.doc["raw_data"]["symbol"] for e in collector.events.values()}
        assert seen <= set(symbols) and seen
        await assert_latest_is_newest(watch, collector, seen)
        if case.provider_type == "alphavantage":
            # Its last status mirrored every request the adapter made.
            adapter = worker.adapter
            assert adapter is not None
            assert await _requests_mirrored(redis_client, name) == adapter.requests_sent()
    finally:
        await watch.stop()
        await running.stop()
        collector.close()
        await sim.stop()
        await db.set_provider_enabled(conn, provider_id, False)
