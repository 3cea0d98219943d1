"""Backpressure: a sink far behind fills the journal to its cap, the session stops reading
from the provider and says so, and resumes once the sink drains, with nothing lost.

Real parts throughout: the Polygon simulator over a WebSocket, the session, the pipeline,
the journal, the Pulsar sink on the broker and the PostgreSQL sink, held back by a lock
on its table (a database that has stopped answering).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import psycopg

from common import db
from common.circuit import CircuitBreaker
from common.journal import Journal
from common.model import ConnectionStatus
from common.pipeline import Pipeline
from common.provider import Instrument, ProviderConfig
from common.quality import QualityChecker
from common.sinks.postgres import PostgresSink
from common.sinks.pulsar import PulsarSink
from simulators.polygon import PolygonSimConfig, PolygonSimulator
from tests.conftest import Services
from tests.running import until
from workers.adapters import adapter_class
from workers.session import ProviderSession

KEY_ENV = "FEEDFLEET_TEST_POLYGON_KEY"
BACKPRESSURE = "backpressure: journal near its size cap (a sink is far behind)"


async def test_a_sink_far_behind_stops_reading_until_it_drains(
    services: Services, conn: db.Conn, tmp_path: Path
) -> None:
    os.environ[KEY_ENV] = "test-key"
    tag = uuid.uuid4().hex[:6].upper()
    symbols = [f"BP{tag}{i}" for i in range(3)]
    sim = PolygonSimulator(PolygonSimConfig(symbols=symbols, rate=3000, batch=20))
    port = await sim.start()
    provider = ProviderConfig(
        id=str(uuid.uuid4()), name=f"backpressure-{tag.lower()}", provider_type="polygon",
        connection_config={"url": f"ws://127.0.0.1:{port}/stocks", "api_key_env": KEY_ENV},
    )  # fmt: skip
    # Small segments under a small cap: once the sinks have caught up, the passed segments
    # go and the journal is well below the cap again.
    journal = Journal(
        tmp_path / "journal", (PulsarSink.name, PostgresSink.name),
        segment_bytes=16 * 1024, max_bytes=128 * 1024,
    )  # fmt: skip
    journal.open()
    publisher = PulsarSink(
        services.pulsar_url, f"persistent://public/default/bp-{tag.lower()}", journal,
        producer_name=f"bp-{uuid.uuid4().hex}",
    )  # fmt: skip
    store = PostgresSink(services.database_url, journal, flush_interval_s=0.02)
    pipeline = Pipeline(QualityChecker(stale_after_s=None), journal, publisher, store, None)
    session = ProviderSession(
        provider, pipeline, CircuitBreaker(failure_threshold=5, open_s=30.0),
        lambda row: adapter_class(row.provider_type)(row),
    )  # fmt: skip
    session.wanted = {s: Instrument(s) for s in symbols}

    # Every COPY into the table waits behind this lock until it is released.
    blocker = await psycopg.AsyncConnection.connect(services.database_url)
    await blocker.execute("LOCK TABLE raw_market_data IN ACCESS EXCLUSIVE MODE")
    await publisher.start()
    sinks = [asyncio.create_task(s.run()) for s in (publisher, store)]
    reading = asyncio.create_task(session.run())
    try:
        await until(lambda: session.last_error == BACKPRESSURE, 30, "the session to report it")
        assert pipeline.backpressure and journal.size_bytes > journal.max_bytes * 0.9
        # Only reported: the provider connection itself is fine.
        assert session.status is ConnectionStatus.CONNECTED
        assert store.counters.acked == 0
        paused_at = pipeline.received
        # The provider goes on sending (the socket buffers hold it); none of it is read.
        await until(
            lambda: sim.events_sent > paused_at + 400, 30, "the provider to send past the pause"
        )
        assert pipeline.received == paused_at
        assert session.last_error == BACKPRESSURE

        await blocker.rollback()  # the database answers again
        await until(lambda: session.last_error is None, 30, "reading to resume")
        await until(lambda: pipeline.received > paused_at + 400, 30, "records after the pause")
        assert session.status is ConnectionStatus.CONNECTED
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
        assert await pipeline.drained(timeout=30), (store.counters, publisher.counters)
    finally:
        for task in (reading, *sinks):
            task.cancel()
        await asyncio.gather(reading, *sinks, return_exceptions=True)
        await blocker.close()
        await sim.stop()
        for sink in (publisher, store):
            await sink.close()
        await session.close()
        journal.close()
    c = pipeline.counts()
    assert c.received == c.journaled == c.published == c.stored > paused_at
    assert c.dropped == 0
    # Per symbol the provider numbers trades and quotes together 1, 2, 3...: what was
    # stored is the whole run of numbers up to the last received, each once.
    cur = await conn.execute(
        "SELECT symbol, array_agg(provider_sequence ORDER BY provider_sequence), count(*) "
        "FROM raw_market_data WHERE provider = %s AND provider_sequence IS NOT NULL "
        "GROUP BY symbol",
        (provider.name,),
    )
    stored = {symbol: (seqs, n) for symbol, seqs, n in await cur.fetchall()}
    assert sorted(stored) == sorted(symbols)
    for symbol, (seqs, _n) in stored.items():
        assert seqs == list(range(1, len(seqs) + 1)), f"{symbol}: a number missing or doubled"
    cur = await conn.execute(
        "SELECT count(*), count(DISTINCT event_id) FROM raw_market_data WHERE provider = %s",
        (provider.name,),
    )
    assert await cur.fetchone() == (c.received, c.received)
