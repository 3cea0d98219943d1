"""A worker against the Polygon simulator, with the real coordinator, broker, PostgreSQL
and Redis: every received record is published, stored and cached, with the seed's shape."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from common import db
from common.config import Settings
from common.model import DataType
from common.redis_keys import LATEST_TTL_S, latest_key
from common.sinks.pulsar import PulsarSink
from simulators.market import Faults
from simulators.polygon import PolygonSimConfig, PolygonSimulator
from tests.conftest import Services
from tests.pulsar_collector import PulsarCollector
from tests.running import RunningWorker, until
from tests.test_coordinator import eventually
from workers.worker import Worker

KEY_ENV = "FEEDFLEET_TEST_POLYGON_KEY"


@dataclass
class Fleet:
    settings: Settings
    sim: PolygonSimulator
    provider_name: str
    provider_id: str
    running: RunningWorker
    collector: PulsarCollector
    symbols: list[str]

    @property
    def worker(self) -> Worker:
        return self.running.worker


@dataclass
class LatestWatch:
    """Reads ``latest:{symbol}`` for each symbol every 50 ms until stopped, keeping the
    newest value each key had and its time to live when that value was first read.

    The key lives 5 s after its last write, and knowing which event is the newest (the
    consumer has every event) may take longer: started before the source stops, the
    watch has the final value whenever the test gets to compare it.
    """

    redis: aioredis.Redis
    symbols: list[str]
    seen: dict[str, tuple[dict[str, Any], int]] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None
    _stopping: bool = False

    def start(self) -> LatestWatch:
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        while not self._stopping:
            async with self.redis.pipeline(transaction=True) as pipe:
                for symbol in self.symbols:
                    pipe.get(latest_key(symbol))
                    pipe.pttl(latest_key(symbol))
                replies = await pipe.execute()
            for symbol, raw, pttl in zip(self.symbols, replies[::2], replies[1::2], strict=True):
                if raw is None:
                    continue  # expired: the last value read stays
                doc = orjson.loads(raw)
                last = self.seen.get(symbol)
                if last is None or last[0] != doc:
                    self.seen[symbol] = (doc, pttl)
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        # Asked, not cancelled: on Python 3.11 a cancel inside redis-py can be lost (its
        # commands run in asyncio.wait_for, which drops a cancel that comes just as the
        # command is written, CPython gh-86296), and the watch would then read on forever.
        if self._task is not None:
            self._stopping = True
            await asyncio.wait_for(self._task, 10)


async def assert_latest_is_newest(
    watch: LatestWatch, collector: PulsarCollector, symbols: Iterable[str]
) -> None:
    """``latest:{symbol}`` held each symbol's newest event: the last one Pulsar delivered
    for it (one producer, so in the order the worker took them in), whole, with the TTL."""
    newest: dict[str, dict[str, Any]] = {}
    for event in list(collector.events.values()):  # in the order received
        newest[event.doc["raw_data"]["symbol"]] = event.doc
    wanted = {s: newest[s]["event_id"] for s in symbols}

    async def cached() -> dict[str, str | None]:
        return {s: watch.seen[s][0]["event_id"] if s in watch.seen else None for s in wanted}

    await eventually(cached, lambda c: c == wanted, f"latest:{{symbol}} to hold {wanted}")
    for symbol in wanted:
        doc, pttl = watch.seen[symbol]
        assert doc == newest[symbol], symbol
        assert 0 < pttl <= LATEST_TTL_S * 1000, (symbol, pttl)


@pytest.fixture
async def fleet(services: Services, conn: db.Conn) -> AsyncIterator[Fleet]:
    """Simulator + coordinator + worker for a fresh provider row and topic."""
    os.environ[KEY_ENV] = "test-key"
    tag = uuid.uuid4().hex[:6].upper()
    symbols = [f"{s}{tag}" for s in ("AA", "BB", "CC", "DD")]
    sim = PolygonSimulator(PolygonSimConfig(symbols=symbols, rate=3000, batch=25))
    port = await sim.start()
    settings = services.settings()
    name = f"polygon-{tag.lower()}"
    provider_id = await db.upsert_provider(
        conn, name, "polygon",
        {"url": f"ws://127.0.0.1:{port}/stocks", "api_key_env": KEY_ENV, "stale_after_s": None},
    )  # fmt: skip
    await db.subscribe(conn, provider_id, symbols, [DataType.TRADE, DataType.QUOTE])
    collector = PulsarCollector(settings.pulsar_url, settings.pulsar_topic)
    running = RunningWorker.start(settings, name)
    try:
        yield Fleet(settings, sim, name, provider_id, running, collector, symbols)
    finally:
        await running.stop()
        collector.close()
        await sim.stop()
        await db.set_provider_enabled(conn, provider_id, False)


@pytest.fixture
async def latest(fleet: Fleet, redis_client: aioredis.Redis) -> AsyncIterator[LatestWatch]:
    """``latest:{symbol}`` of the fleet's symbols, watched from before the source stops."""
    watch = LatestWatch(redis_client, fleet.symbols).start()
    yield watch
    await watch.stop()


async def test_received_equals_published_equals_stored(
    fleet: Fleet, conn: db.Conn, latest: LatestWatch
) -> None:
    await until(
        lambda: fleet.worker.pipeline is not None and fleet.worker.pipeline.received >= 3000,
        30, "3000 records",
    )  # fmt: skip
    await fleet.sim.stop()  # stop the source so the counts settle
    pipeline = fleet.worker.pipeline
    assert pipeline is not None
    assert await pipeline.drained(timeout=20)
    counts = pipeline.counts()
    assert counts.received >= 3000
    assert counts.received == counts.published == counts.stored
    assert counts.spooled == 0
    # Every published event's time to receipt was measured, and its Pulsar round trip
    # (from the hand-over to the client) is a part of it.
    publisher = pipeline.publisher
    assert isinstance(publisher, PulsarSink)
    to_receipt, round_trip = publisher.provider_latency, publisher.round_trip_latency
    assert to_receipt.histogram.get_total_count() == counts.published
    assert round_trip.histogram.get_total_count() == counts.published
    round_trip_p50 = round_trip.percentiles_ms()["p50"]
    to_receipt_p50 = to_receipt.percentiles_ms()["p50"]
    assert round_trip_p50 is not None and to_receipt_p50 is not None
    assert 0 < round_trip_p50 <= to_receipt_p50

    cur = await conn.execute(
        "SELECT count(*), count(DISTINCT event_id) FROM raw_market_data WHERE provider = %s",
        (fleet.provider_name,),
    )
    assert await cur.fetchone() == (counts.received, counts.received)

    got = await fleet.collector.wait_for(counts.received, timeout=30)
    assert got == counts.received

    # One event, three places, the same values.
    event = next(iter(fleet.collector.events.values()))
    doc = event.doc
    assert set(doc) == {"event_id", "timestamp", "provider", "raw_data", "metadata"}
    assert doc["provider"] == fleet.provider_name
    assert event.key == doc["raw_data"]["symbol"] in fleet.symbols
    assert event.properties == {"event_type": "raw_market_data_ingested"}
    assert doc["metadata"]["ingestion_latency_ms"] >= 0
    cur = await conn.execute(
        "SELECT symbol, data_type, price::float8, bid::float8, ask::float8, provider_sequence "
        "FROM raw_market_data WHERE event_id = %s",
        (doc["event_id"],),
    )
    raw = doc["raw_data"]
    assert await cur.fetchone() == (
        raw["symbol"], raw["data_type"], raw["price"], raw["bid"], raw["ask"],
        doc["metadata"]["provider_sequence"],
    )  # fmt: skip

    await assert_latest_is_newest(latest, fleet.collector, fleet.symbols)


async def test_status_and_connection_rows(
    fleet: Fleet, conn: db.Conn, redis_client: aioredis.Redis
) -> None:
    await until(lambda: fleet.worker.status.value == "CONNECTED", 20, "CONNECTED")
    await until(lambda: fleet.worker.throughput > 0, 20, "throughput")
    key = f"provider:{fleet.provider_id}:status"

    async def reported() -> dict[str, Any] | None:
        raw = await redis_client.get(key)
        return orjson.loads(raw) if raw else None

    # Written about once a second: wait for one written since every symbol streams.
    status = await eventually(
        reported,
        lambda d: d is not None and d["status"] == "CONNECTED" and d["throughput_per_sec"] > 0
        and d["subscribed_symbols"] == len(fleet.symbols),
        "a CONNECTED status document with every symbol subscribed and a throughput",
    )  # fmt: skip
    assert status["provider_id"] == fleet.provider_id
    assert status["provider_name"] == fleet.provider_name
    assert status["instance_id"] == fleet.worker.instance_id
    assert 0 < await redis_client.ttl(key) <= 30
    row = await eventually(lambda: db.latest_connection(conn, fleet.provider_id),
                           lambda r: r is not None and r[0] == "CONNECTED",
                           "a CONNECTED provider_connections row")  # fmt: skip
    assert row is not None and row[0] == "CONNECTED"


async def test_stopping_writes_metrics_and_a_disconnected_status(
    fleet: Fleet, conn: db.Conn, redis_client: aioredis.Redis
) -> None:
    await until(
        lambda: fleet.worker.pipeline is not None and fleet.worker.pipeline.received > 500,
        20, "data",
    )  # fmt: skip
    await until(lambda: fleet.worker.throughput > 0, 20, "a throughput measured")
    fleet.worker.stop()
    await asyncio.wait_for(fleet.running.worker_task, 30)
    received = fleet.running.received
    cur = await conn.execute(
        "SELECT messages_received, messages_published, messages_stored FROM ingestion_metrics "
        "WHERE provider_id = %s ORDER BY id DESC LIMIT 1",
        (fleet.provider_id,),
    )
    assert await cur.fetchone() == (received, received, received)
    # The seed's names for them: events and bytes off the wire, errors, mean latency.
    cur = await conn.execute(
        "SELECT messages_ingested, bytes_ingested, errors_count, avg_latency_ms, "
        "created_at <= now() FROM ingestion_metrics "
        "WHERE provider_id = %s ORDER BY id DESC LIMIT 1",
        (fleet.provider_id,),
    )
    ingested = await cur.fetchone()
    assert ingested is not None
    assert (ingested[0], ingested[2], ingested[4]) == (received, 0, True)
    assert ingested[1] > 40 * received  # every Polygon event is a JSON object of 40+ bytes
    assert ingested[3] is not None and ingested[3] > 0
    row = await db.latest_connection(conn, fleet.provider_id)
    assert row is not None and row[0] == "DISCONNECTED"
    cur = await conn.execute(
        "SELECT connection_metadata, last_heartbeat >= created_at FROM provider_connections "
        "WHERE provider_id = %s ORDER BY id DESC LIMIT 1",
        (fleet.provider_id,),
    )
    meta = await cur.fetchone()
    assert meta is not None and meta[1] is True
    assert meta[0]["instance"] == fleet.worker.instance_id
    assert meta[0]["pid"] == os.getpid() and meta[0]["provider_type"] == "polygon"
    assert str(meta[0]["endpoint"]).startswith("ws://127.0.0.1:")
    status = orjson.loads(await redis_client.get(f"provider:{fleet.provider_id}:status") or b"{}")
    assert status["status"] == "DISCONNECTED"
    # Stopped, it ingests nothing: not the rate of its last second.
    assert status["throughput_per_sec"] == 0.0
    cur = await conn.execute(
        "SELECT throughput_per_sec FROM ingestion_metrics WHERE provider_id = %s "
        "ORDER BY id DESC LIMIT 1",
        (fleet.provider_id,),
    )
    assert await cur.fetchone() == (0.0,)
    cur = await conn.execute(
        "SELECT count(*) FROM worker_instances WHERE instance_id = %s", (fleet.worker.instance_id,)
    )
    assert await cur.fetchone() == (0,)  # deregistered, so its symbols move at once


async def test_subscription_changes_reach_the_running_worker(fleet: Fleet, conn: db.Conn) -> None:
    await until(
        lambda: fleet.worker.adapter is not None
        and len(fleet.worker.adapter.subscribed) == len(fleet.symbols),
        20, "initial assignment",
    )  # fmt: skip
    gone = fleet.symbols[0]
    await db.unsubscribe(conn, fleet.provider_id, [gone])
    adapter = fleet.worker.adapter
    assert adapter is not None
    # Generous bounds: the notification path is what is tested, not the machine's speed.
    await until(lambda: gone not in adapter.subscribed, 15.0, "the unsubscribe")
    await db.subscribe(conn, fleet.provider_id, [gone], [DataType.TRADE])
    await until(lambda: gone in adapter.subscribed, 15.0, "the subscribe")
    assert adapter.subscribed[gone].data_types == frozenset({DataType.TRADE})


async def test_reconnects_after_the_provider_drops(fleet: Fleet) -> None:
    worker = fleet.worker
    await until(lambda: fleet.running.received > 200, 20, "data")
    assert worker.parts is not None
    session = worker.parts.session
    errors_before = session.error_count
    await fleet.sim.drop_all()
    await until(lambda: session.error_count > errors_before, 10, "the drop to be seen")
    mark = fleet.running.received
    await until(lambda: fleet.running.received > mark + 200, 20, "data after reconnect")
    assert worker.status.value == "CONNECTED"


async def test_refused_auth_shows_error(fleet: Fleet) -> None:
    fleet.sim.config.faults = Faults(refuse_auth=True)
    await fleet.sim.drop_all()
    await until(lambda: fleet.worker.status.value == "ERROR", 15, "ERROR status")
    assert "auth" in (fleet.worker.last_error or "").lower()


async def test_a_bad_number_in_the_provider_row_is_a_clear_error(
    fleet: Fleet, conn: db.Conn
) -> None:
    """An operator's typo in connection_config: ERROR naming the field, no crash, and the
    worker streams again once the row is put right."""
    await until(lambda: fleet.running.received > 100, 20, "data")
    row = await db.find_provider(conn, fleet.provider_name)
    assert row is not None
    good = row.connection_config
    await db.upsert_provider(conn, fleet.provider_name, "polygon", {**good, "heartbeat_s": "ten"})
    await until(lambda: fleet.worker.status.value == "ERROR", 10, "ERROR status")
    assert fleet.worker.last_error == (
        "ProviderConfigError: connection_config.heartbeat_s must be a number"
    )
    await db.upsert_provider(conn, fleet.provider_name, "polygon", good)
    await until(lambda: fleet.worker.status.value == "CONNECTED", 45, "CONNECTED again")
    mark = fleet.running.received
    await until(lambda: fleet.running.received > mark + 100, 20, "data after the fix")
