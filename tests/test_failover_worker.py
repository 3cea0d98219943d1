"""The worker's side of failover, with the real worker, broker, PostgreSQL and Redis:
canonical symbols, the state it pushes to the coordinator, the failover flag and the
single source of latest:{symbol}. The coordinator's decisions are tested on their own."""

from __future__ import annotations

import asyncio
import os
import uuid

import orjson
import redis.asyncio as aioredis

from common import db
from common.model import DataType
from simulators.polygon import PolygonSimConfig, PolygonSimulator
from tests.conftest import Services
from tests.running import RunningWorker, until
from tests.test_pipeline_integration import KEY_ENV
from workers.worker import Worker


async def _instance_row(conn: db.Conn, instance_id: str) -> tuple[str, list[str], list[str]]:
    cur = await conn.execute(
        "SELECT status, unavailable_symbols, flowing_symbols FROM worker_instances "
        "WHERE instance_id = %s",
        (instance_id,),
    )
    row = await cur.fetchone()
    return (row[0], list(row[1]), list(row[2])) if row else ("", [], [])


async def test_canonical_symbols_and_the_state_pushed_to_the_coordinator(
    services: Services, conn: db.Conn
) -> None:
    """The provider names AAPL "AAPL.O": events say AAPL and keep AAPL.O; the instance
    row lists the flowing symbols and, past the silence threshold, the silent one."""
    os.environ[KEY_ENV] = "test-key"
    tag = uuid.uuid4().hex[:6].upper()
    canonical = [f"C{tag}{i}" for i in range(3)]
    silent = f"S{tag}"  # subscribed, but the simulator never sends it
    sim = PolygonSimulator(PolygonSimConfig(symbols=[f"{s}.O" for s in canonical], rate=600))
    port = await sim.start()
    name = f"canon-{tag.lower()}"
    provider_id = await db.upsert_provider(
        conn, name, "polygon",
        {"url": f"ws://127.0.0.1:{port}/stocks", "api_key_env": KEY_ENV, "stale_after_s": None,
         "symbol_format": "{symbol}.O", "silence_threshold_s": 1.0},
    )  # fmt: skip
    await db.subscribe(conn, provider_id, [*canonical, silent], [DataType.TRADE])
    running = RunningWorker.start(services.settings(), name)
    worker = running.worker
    try:
        await until(lambda: running.received > 300, 30, "data")
        await until(lambda: worker.adapter is not None and len(worker.adapter.subscribed) == 4,
                    20, "the subscriptions")  # fmt: skip
        assert sorted(worker.adapter.subscribed) == sorted([f"{s}.O" for s in [*canonical, silent]])

        async def state() -> tuple[str, list[str], list[str]]:
            return await _instance_row(conn, worker.instance_id)

        deadline = asyncio.get_running_loop().time() + 30
        while (got := await state()) != ("CONNECTED", [silent], sorted(canonical)):
            assert asyncio.get_running_loop().time() < deadline, f"instance row: {got}"
            await asyncio.sleep(0.1)
        await sim.stop()
        assert worker.pipeline is not None
        assert await worker.pipeline.drained(timeout=30)
        cur = await conn.execute(
            "SELECT DISTINCT symbol, provider_specific->>'provider_symbol' FROM raw_market_data "
            "WHERE provider = %s ORDER BY 1",
            (name,),
        )
        assert await cur.fetchall() == [(s, f"{s}.O") for s in sorted(canonical)]
    finally:
        await running.stop()
        await sim.stop()


async def test_a_symbol_held_as_a_backup_is_flagged_and_latest_has_one_writer(
    services: Services, conn: db.Conn, redis_client: aioredis.Redis
) -> None:
    """Assignment rows as the coordinator writes them during a failover: one symbol held
    for another provider (failover, latest), one held for another provider whose own
    server still writes latest (failover, not latest)."""
    os.environ[KEY_ENV] = "test-key"
    tag = uuid.uuid4().hex[:6].upper()
    backup_for, shadow = f"F{tag}", f"N{tag}"
    sim = PolygonSimulator(PolygonSimConfig(symbols=[backup_for, shadow], rate=400))
    port = await sim.start()
    name = f"backup-{tag.lower()}"
    provider_id = await db.upsert_provider(
        conn, name, "polygon",
        {"url": f"ws://127.0.0.1:{port}/stocks", "api_key_env": KEY_ENV, "stale_after_s": None},
    )  # fmt: skip
    primary_id = await db.upsert_provider(conn, f"primary-{tag.lower()}", "refinitiv", {})
    worker = Worker(services.settings(), name)
    task = asyncio.create_task(worker.run(handle_signals=False))
    try:
        await until(lambda: worker.parts is not None and worker.parts.status.registered,
                    30, "the worker to register")  # fmt: skip
        await conn.execute(
            "INSERT INTO assignments (provider_id, instrument_symbol, instance_id, data_types, "
            "reason, serving_provider_id, latest) VALUES "
            "(%s, %s, %s, '{TRADE}', 'failover', %s, true), "
            "(%s, %s, %s, '{TRADE}', 'failover', %s, false)",
            (primary_id, backup_for, worker.instance_id, provider_id,
             primary_id, shadow, worker.instance_id, provider_id),
        )  # fmt: skip
        await conn.execute("SELECT pg_notify('feedfleet_assignments', '')")
        await until(lambda: worker.pipeline is not None and worker.pipeline.received > 200,
                    30, "data for the backup symbols")  # fmt: skip
        await sim.stop()
        assert worker.pipeline is not None
        assert await worker.pipeline.drained(timeout=30)
        await worker.pipeline.cache.flush()  # type: ignore[union-attr]
        cur = await conn.execute(
            "SELECT symbol, bool_and('failover' = ANY (quality_flags)), count(*) "
            "FROM raw_market_data WHERE provider = %s GROUP BY symbol ORDER BY symbol",
            (name,),
        )
        rows = await cur.fetchall()
        assert [(r[0], r[1]) for r in rows] == [(backup_for, True), (shadow, True)]
        latest = await redis_client.get(f"latest:{backup_for}")
        assert latest is not None and orjson.loads(latest)["raw_data"]["symbol"] == backup_for
        assert await redis_client.get(f"latest:{shadow}") is None
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)
        await sim.stop()


async def test_the_assignment_digest_changes_with_anything_a_worker_applies(
    conn: db.Conn,
) -> None:
    """A worker skips applying a poll whose digest is unchanged: every field it reads must
    change the digest, and nothing else may."""
    tag = uuid.uuid4().hex[:6]
    provider_id = await db.upsert_provider(conn, f"digest-{tag}", "polygon", {})
    other_id = await db.upsert_provider(conn, f"digest-other-{tag}", "polygon", {})
    instance = f"digest-{tag}@host:1"
    seen = [await db.held_digest(conn, instance)]

    async def changed(sql: str, *params: object) -> None:
        await conn.execute(sql, params)
        digest = await db.held_digest(conn, instance)
        assert digest not in seen, sql
        seen.append(digest)

    await changed(
        "INSERT INTO assignments (provider_id, instrument_symbol, instance_id, data_types) "
        "VALUES (%s, 'AAA', %s, '{TRADE}')", provider_id, instance,
    )  # fmt: skip
    await changed(
        "INSERT INTO assignments (provider_id, instrument_symbol, instance_id, data_types, "
        "reason) VALUES (%s, 'AAA', %s, '{TRADE}', 'failover')", other_id, instance,
    )  # fmt: skip
    await changed("UPDATE assignments SET data_types = '{TRADE,QUOTE}' "
                  "WHERE provider_id = %s", provider_id)  # fmt: skip
    await changed("UPDATE assignments SET reason = 'primary' WHERE provider_id = %s", other_id)
    await changed("UPDATE assignments SET latest = false WHERE provider_id = %s", other_id)
    await changed("DELETE FROM assignments WHERE provider_id = %s", other_id)
    # What the worker does not read leaves it as it was.
    before = await db.held_digest(conn, instance)
    await conn.execute("UPDATE assignments SET assigned_at = now() - interval '1 hour'")
    await conn.execute(
        "INSERT INTO assignments (provider_id, instrument_symbol, instance_id, data_types) "
        "VALUES (%s, 'BBB', 'another@host:2', '{TRADE}')", (other_id,),
    )  # fmt: skip
    assert await db.held_digest(conn, instance) == before
    held = await db.held_symbols(conn, instance)
    assert {s: sorted(h.instrument.data_types) for s, h in held.items()} == {
        "AAA": [DataType.QUOTE, DataType.TRADE]
    }
