"""Never lose a message: the broker or the database goes away mid-stream and comes back.

Each test runs its own services where it must stop one, so the shared ones stay up.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

from common import db
from common.embedded import EmbeddedPostgres, EmbeddedProcess, free_port, pulsar_command
from common.model import DataType
from common.sinks.base import DurableSink
from common.sinks.postgres import PostgresSink
from simulators.polygon import PolygonSimConfig, PolygonSimulator
from tests.conftest import Services
from tests.pulsar_collector import PulsarCollector
from tests.running import RunningWorker, until
from tests.test_pipeline_integration import KEY_ENV
from workers.worker import Worker


def _sink_state(sink: DurableSink) -> str:
    journal = sink.journal
    return (
        f"{sink.name}: live={sink.live} healthy={sink.healthy} pending={sink.pending} "
        f"generation={sink.generation} backlog={sink.backlog} acked_at={journal.acked(sink.name)} "
        f"head={journal.head} counters={sink.counters} "
        f"outstanding={len(getattr(sink, '_outstanding', {}))}"
    )


async def _rows_and_ids(conn: db.Conn, worker: Worker) -> tuple[int, int]:
    """Rows the worker's provider has in raw_market_data, and distinct event ids among them."""
    assert worker.provider is not None
    cur = await conn.execute(
        "SELECT count(*), count(DISTINCT event_id) FROM raw_market_data WHERE provider = %s",
        (worker.provider.name,),
    )
    row = await cur.fetchone()
    assert row is not None
    return row[0], row[1]


async def _start_fleet(
    services: Services, conn: db.Conn, **settings: object
) -> tuple[PolygonSimulator, RunningWorker]:
    os.environ[KEY_ENV] = "test-key"
    tag = uuid.uuid4().hex[:6].upper()
    symbols = [f"O{tag}{i}" for i in range(5)]
    sim = PolygonSimulator(PolygonSimConfig(symbols=symbols, rate=2000, batch=20))
    port = await sim.start()
    name = f"outage-{tag.lower()}"
    provider_id = await db.upsert_provider(
        conn, name, "polygon",
        {"url": f"ws://127.0.0.1:{port}/stocks", "api_key_env": KEY_ENV, "stale_after_s": None},
    )  # fmt: skip
    await db.subscribe(conn, provider_id, symbols, [DataType.TRADE, DataType.QUOTE])
    return sim, RunningWorker.start(services.settings(**settings), name)


async def test_broker_outage_spools_then_replays_everything(
    services: Services, conn: db.Conn, tmp_path: Path
) -> None:
    port = free_port()
    broker = EmbeddedProcess(pulsar_command(port, tmp_path / "broker"), port, tmp_path / "b.log")
    broker.start()
    url = f"pulsar://127.0.0.1:{port}"
    topic = f"persistent://public/default/outage-{uuid.uuid4().hex[:8]}"
    collector = PulsarCollector(url, topic)
    sim, running = await _start_fleet(
        services, conn, pulsar_url=url, pulsar_topic=topic, pulsar_send_timeout_ms=2000
    )
    worker = running.worker
    try:
        await until(lambda: running.received > 1000, 30, "data before the outage")
        collector.close()
        broker.stop()
        pipeline = worker.pipeline
        assert pipeline is not None
        publisher = pipeline.publisher
        await until(
            lambda: not publisher.healthy and publisher.backlog > 500,
            30,
            "the sink to fail and events to wait in the journal",
        )
        # While the broker is down nothing is lost: all is journaled and stored.
        c = pipeline.counts()
        assert c.received == c.journaled
        assert pipeline.store.healthy  # PostgreSQL is unaffected
        broker.start()
        await until(lambda: publisher.healthy and publisher.live, 60, "the catch-up")
        await sim.stop()
        assert await pipeline.drained(timeout=30), _sink_state(publisher)
        c = pipeline.counts()
        assert c.received == c.published == c.stored
        assert publisher.counters.replayed > 500
        collector = PulsarCollector(url, topic)
        assert await collector.wait_for(c.received, timeout=60) == c.received
    finally:
        await running.stop()
        await sim.stop()
        collector.close()
        broker.stop()


async def test_database_outage_spools_rows_then_stores_them(
    services: Services, conn: db.Conn
) -> None:
    """The COPY connection is killed; the batch is read back and stored once, not twice."""
    sim, running = await _start_fleet(services, conn)
    worker = running.worker
    try:
        await until(lambda: running.received > 1000, 30, "data")
        pipeline = worker.pipeline
        assert pipeline is not None
        store = pipeline.store
        assert isinstance(store, PostgresSink)
        await until(lambda: store._conn is not None, 10, "the COPY connection")
        backend = store._conn.info.backend_pid  # type: ignore[union-attr]
        await conn.execute("SELECT pg_terminate_backend(%s)", (backend,))
        await until(lambda: store.counters.failures >= 1, 10, "the failed COPY")
        await until(lambda: store.counters.replayed > 0, 20, "the rows read back and stored")
        await sim.stop()
        assert await pipeline.drained(timeout=30)
        c = pipeline.counts()
        assert c.received == c.published == c.stored
        assert await _rows_and_ids(conn, worker) == (c.received, c.received)
    finally:
        await running.stop()
        await sim.stop()


async def test_redis_down_degrades_but_never_blocks(services: Services, conn: db.Conn) -> None:
    """Redis is a cache: with none reachable, events still reach Pulsar and PostgreSQL."""
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    sim, running = await _start_fleet(services, conn, redis_url=dead_redis)
    worker = running.worker
    try:
        await until(lambda: running.received > 1000, 30, "data without Redis")
        await sim.stop()
        pipeline = worker.pipeline
        assert pipeline is not None
        assert await pipeline.drained(timeout=30)
        c = pipeline.counts()
        assert c.received == c.published == c.stored
        assert c.cached == 0
        assert pipeline.cache is not None and not pipeline.cache.healthy
        await running.stop()
        # Stopping without Redis still deregisters, so the symbols move at once.
        cur = await conn.execute(
            "SELECT count(*) FROM worker_instances WHERE instance_id = %s", (worker.instance_id,)
        )
        assert await cur.fetchone() == (0,)
    finally:
        await running.stop()
        await sim.stop()


async def test_the_worker_outlives_its_database(services: Services, tmp_path: Path) -> None:
    """PostgreSQL stops mid-stream and the worker is restarted while it is down: it keeps
    ingesting (into the journal and Pulsar) from the assignment it saved, and once the
    database is back every event is stored exactly once."""
    pg = EmbeddedPostgres(tmp_path / "pg")
    pg.start()
    try:
        database_url = pg.create_database("outlives")
        setup = await db.connect(database_url)
        await db.apply_schema(setup)
        sim, running = await _start_fleet(services, setup, **{"database_url": database_url})
        await setup.close()
        try:
            await until(lambda: running.received > 1000, 30, "data before the outage")
            pg.stop()
            mark = running.received
            await until(lambda: running.received > mark + 1000, 30, "ingesting without PostgreSQL")
            # A restart during the outage (as supervisord would after a crash).
            first = running.worker
            await running.stop()
            assert first.pipeline is not None
            received_first = first.pipeline.received
            second = Worker(first.settings, first.provider_name)  # the same journal
            task = asyncio.create_task(second.run(handle_signals=False))
            try:
                await until(
                    lambda: second.pipeline is not None and second.pipeline.received > 500,
                    60,
                    "the restarted worker ingesting from its saved assignment",
                )
                assert second.pipeline is not None
                assert second.pipeline.store.backlog > 0  # waiting for the database
                pg.start()
                await sim.stop()
                assert await second.pipeline.drained(timeout=60)
                published = second.pipeline.publisher.counters.acked
                assert published >= second.pipeline.received
            finally:
                second.stop()
                await asyncio.wait_for(task, 60)
            total = received_first + second.pipeline.received
            check = await db.connect(database_url)
            cur = await check.execute(
                "SELECT count(*), count(DISTINCT event_id) FROM raw_market_data"
            )
            assert await cur.fetchone() == (total, total)
            await check.close()
        finally:
            await running.stop()
            await sim.stop()
    finally:
        pg.stop()


async def test_a_full_disk_is_an_error_status_and_loses_nothing(
    services: Services, conn: db.Conn, tiny_disk: Path
) -> None:
    """The journal's disk fills up: ERROR with the reason, reading stops (TCP holds the
    rest), the sinks keep working, and once they have everything the full segment is let
    go and ingestion resumes by itself. Nothing received is lost or torn."""
    (tiny_disk / "filler").write_bytes(b"x" * 3_300_000)
    sim, running = await _start_fleet(services, conn, journal_dir=tiny_disk / "journal")
    worker = running.worker
    try:
        await until(lambda: running.received > 200, 30, "data")
        pipeline = worker.pipeline
        assert pipeline is not None
        await until(lambda: pipeline.journal_error is not None, 60, "the disk to fill")
        assert worker.status.value == "ERROR"
        assert "journal not writable" in (worker.last_error or "")
        assert "[Errno 28]" in (worker.last_error or "")
        await until(lambda: pipeline.journal_error is None, 60, "ingestion to resume")
        mark = running.received
        await until(lambda: running.received > mark + 500, 30, "data after the disk freed up")
        await sim.stop()
        assert await pipeline.drained(timeout=30)
        c = pipeline.counts()
        assert c.received == c.journaled == c.published == c.stored
        assert pipeline.journal.skipped_bytes == 0
        assert await _rows_and_ids(conn, worker) == (c.received, c.received)
    finally:
        await running.stop()
        await sim.stop()
