"""raw_market_data's retention against real PostgreSQL: exactly the partitions wholly older
than the configured age go (dropped or detached), never the current or future ones, and
the active coordinator keeps it. TimescaleDB is not installed here: its detection and the
policy statements chosen are tested, not their effect."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from common import db
from common.config import Settings
from common.retention import (
    DETACH,
    DROP,
    PARTITIONS,
    RetentionPolicy,
    keep_retention,
    storage_kind,
    timescale_policy_sql,
)
from tests.conftest import Services
from workers.coordinator import Coordinator

# Hours before the current one (its start is date_trunc('hour', now())) of the old
# partitions made for the test. With 1 day kept, a partition goes when its end is at or
# before now - 24 h: hour -25 ends at trunc - 24 h <= now - 24 h (goes), hour -24 ends at
# trunc - 23 h, after now - 24 h (stays: part of it is still within the day).
OLD_HOURS = (72, 30, 25, 24, 23)


@pytest.fixture
async def fresh(services: Services) -> AsyncIterator[str]:
    """A database of its own (the retention pass sees every partition), with the schema."""
    name = f"feedfleet_retention_{uuid.uuid4().hex[:8]}"
    async with await psycopg.AsyncConnection.connect(services.database_url, autocommit=True) as c:
        await c.execute(f'CREATE DATABASE "{name}"')
    params = conninfo_to_dict(services.database_url)
    params["dbname"] = name
    url = make_conninfo(**params)  # type: ignore[arg-type]
    conn = await db.connect(url)
    try:
        await db.apply_schema(conn)
    finally:
        await conn.close()
    yield url
    async with await psycopg.AsyncConnection.connect(services.database_url, autocommit=True) as c:
        await c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _partition_name(conn: db.Conn, hours_back: int) -> str:
    cur = await conn.execute(
        "SELECT 'raw_market_data_' || to_char((date_trunc('hour', now()) "
        "- make_interval(hours => %s)) AT TIME ZONE 'UTC', 'YYYYMMDD\"_\"HH24')",
        (hours_back,),
    )
    row = await cur.fetchone()
    assert row is not None
    return str(row[0])


async def _insert_row(conn: db.Conn, at_sql: str) -> None:
    await conn.execute(
        "INSERT INTO raw_market_data (event_id, symbol, provider, timestamp, data_type, "
        f"price, received_at) VALUES (gen_random_uuid(), 'RET', 'retention', {at_sql}, "
        "'TRADE', 1, now())"
    )


async def _setup(conn: db.Conn) -> dict[int, str]:
    """Old hourly partitions with a row each, beside the schema's current and future ones,
    and two rows in the default partition (an old one and a recent one)."""
    names = {}
    for hours in OLD_HOURS:
        name = await _partition_name(conn, hours)
        names[hours] = name
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF raw_market_data FOR VALUES "
            f"FROM (date_trunc('hour', now()) - interval '{hours} hours') "
            f"TO (date_trunc('hour', now()) - interval '{hours - 1} hours')"
        )
        await _insert_row(conn, f"date_trunc('hour', now()) - interval '{hours} hours'")
    await _insert_row(conn, "now()")  # the current hour's partition
    # Past the partitions made ahead (24 h): in the default partition.
    await _insert_row(conn, "now() + interval '30 hours'")
    await conn.execute(
        "INSERT INTO raw_market_data_default (event_id, symbol, provider, timestamp, "
        "data_type, received_at) VALUES (gen_random_uuid(), 'RET', 'retention', "
        "now() - interval '40 days', 'TRADE', now())"
    )
    return names


async def _partitions(conn: db.Conn) -> set[str]:
    cur = await conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'raw_market_data'::regclass"
    )
    return {r[0] for r in await cur.fetchall()}


async def _count(conn: db.Conn, table: str) -> int:
    cur = await conn.execute(f"SELECT count(*) FROM {table}")
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def test_drop_removes_exactly_the_partitions_wholly_past_the_age(fresh: str) -> None:
    conn = await db.connect(fresh)
    try:
        names = await _setup(conn)
        before = await _partitions(conn)
        current = await _partition_name(conn, 0)
        assert current in before and names[72] in before
        assert await storage_kind(conn) == PARTITIONS

        done = await keep_retention(conn, RetentionPolicy(days=1, mode=DROP))

        gone = {names[72], names[30], names[25]}
        assert sorted(done.removed) == sorted(gone)
        assert done.locked == []
        after = await _partitions(conn)
        assert after == before - gone
        # Kept: the hours still partly within the day, the current hour, the future ones
        # the schema made ahead, and the default partition.
        assert {names[24], names[23], current, "raw_market_data_default"} <= after
        for hours_ahead in range(1, 25):
            assert await _partition_name(conn, -hours_ahead) in after
        for name in gone:
            cur = await conn.execute("SELECT to_regclass(%s)", (name,))
            assert (await cur.fetchone()) == (None,)
        # The default partition lost its 40-day-old row, not the future one.
        assert done.default_rows_deleted == 1
        assert await _count(conn, "raw_market_data_default") == 1
        assert await _count(conn, "raw_market_data") == 4  # hours 24 and 23, now, +30 h

        again = await keep_retention(conn, RetentionPolicy(days=1, mode=DROP))
        assert again.removed == [] and again.default_rows_deleted == 0
    finally:
        await conn.close()


async def test_detach_keeps_the_old_partitions_as_tables_of_their_own(fresh: str) -> None:
    conn = await db.connect(fresh)
    try:
        names = await _setup(conn)
        done = await keep_retention(conn, RetentionPolicy(days=1, mode=DETACH))
        assert sorted(done.removed) == sorted([names[72], names[30], names[25]])
        after = await _partitions(conn)
        assert names[72] not in after and names[24] in after
        # Detached, the rows are still there to archive; nothing is deleted in this mode.
        assert await _count(conn, names[72]) == 1
        assert done.default_rows_deleted == 0
        assert await _count(conn, "raw_market_data_default") == 2
    finally:
        await conn.close()


async def test_keep_forever_and_a_long_age_remove_nothing(fresh: str) -> None:
    conn = await db.connect(fresh)
    try:
        await _setup(conn)
        before = await _partitions(conn)
        assert (await keep_retention(conn, RetentionPolicy(days=None))).removed == []
        assert (await keep_retention(conn, RetentionPolicy(days=45))).removed == []
        assert await _partitions(conn) == before
        assert await _count(conn, "raw_market_data_default") == 2
    finally:
        await conn.close()


async def test_a_partition_locked_by_a_long_reader_is_left_for_the_next_pass(
    fresh: str,
) -> None:
    conn = await db.connect(fresh)
    reader = await db.connect(fresh, autocommit=False)
    try:
        names = await _setup(conn)
        await reader.execute(f"SELECT count(*) FROM {names[30]}")  # holds its lock
        done = await keep_retention(conn, RetentionPolicy(days=1))
        assert done.locked == [names[30]]
        assert sorted(done.removed) == sorted([names[72], names[25]])
        await reader.rollback()
        assert (await keep_retention(conn, RetentionPolicy(days=1))).removed == [names[30]]
    finally:
        await reader.close()
        await conn.close()


async def test_the_active_coordinator_keeps_retention(fresh: str, services: Services) -> None:
    conn = await db.connect(fresh)
    coordinator = Coordinator(
        Settings(database_url=fresh, redis_url=services.redis_url,
                 pulsar_url=services.pulsar_url, retention_days=1),
    )  # fmt: skip
    names = await _setup(conn)
    task = asyncio.create_task(coordinator.run(handle_signals=False))
    try:
        for _ in range(600):
            after = await _partitions(conn)
            if names[25] not in after:
                break
            await asyncio.sleep(0.05)
        assert names[72] not in after and names[30] not in after and names[24] in after
    finally:
        coordinator.stop()
        await task
        await conn.close()


def test_retention_days_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FEEDFLEET_DATABASE_URL", "FEEDFLEET_REDIS_URL", "FEEDFLEET_PULSAR_URL"):
        monkeypatch.setenv(name, "x")
    monkeypatch.delenv("FEEDFLEET_RETENTION_DAYS", raising=False)
    assert Settings.from_env().retention_days == 7
    for value, days in (("3", 3), ("0", None), ("none", None), ("NONE", None)):
        monkeypatch.setenv("FEEDFLEET_RETENTION_DAYS", value)
        assert Settings.from_env().retention_days == days
    monkeypatch.setenv("FEEDFLEET_RETENTION_DAYS", "1.5")
    with pytest.raises(SystemExit, match="FEEDFLEET_RETENTION_DAYS must be a whole number"):
        Settings.from_env()
    monkeypatch.setenv("FEEDFLEET_RETENTION_DAYS", "2")
    monkeypatch.setenv("FEEDFLEET_RETENTION_MODE", "archive")
    with pytest.raises(SystemExit, match="FEEDFLEET_RETENTION_MODE must be one of drop, detach"):
        Settings.from_env()


def test_timescaledb_policies_are_set_once_and_replaced_only_on_change() -> None:
    week = RetentionPolicy(days=7)
    first = timescale_policy_sql(week, compression_enabled=False, drop_after=None)
    assert first == [
        "ALTER TABLE raw_market_data SET (timescaledb.compress, "
        "timescaledb.compress_segmentby = 'symbol', timescaledb.compress_orderby = "
        "'timestamp DESC')",
        "SELECT add_compression_policy('raw_market_data', compress_after => INTERVAL '1 day', "
        "if_not_exists => true)",
        "SELECT add_retention_policy('raw_market_data', drop_after => INTERVAL '7 days')",
    ]
    # In place already: nothing to run.
    assert timescale_policy_sql(week, compression_enabled=True, drop_after="7 days") == []
    assert timescale_policy_sql(
        RetentionPolicy(days=1), compression_enabled=True, drop_after="7 days"
    ) == [
        "SELECT remove_retention_policy('raw_market_data', if_exists => true)",
        "SELECT add_retention_policy('raw_market_data', drop_after => INTERVAL '1 days')",
    ]
    assert timescale_policy_sql(
        RetentionPolicy(days=None), compression_enabled=True, drop_after="7 days"
    ) == ["SELECT remove_retention_policy('raw_market_data', if_exists => true)"]


async def test_timescaledb_is_detected_only_where_the_extension_is(fresh: str) -> None:
    conn = await db.connect(fresh)
    try:
        cur = await conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'")
        assert await cur.fetchone() is None  # not installed here
        assert await storage_kind(conn) == PARTITIONS
        # A plain table (neither partitioned nor a hypertable) is left alone.
        await conn.execute("ALTER TABLE raw_market_data RENAME TO raw_market_data_native")
        await conn.execute("CREATE TABLE raw_market_data (timestamp timestamptz)")
        assert await storage_kind(conn) == "plain"
        assert (await keep_retention(conn, RetentionPolicy(days=1))).removed == []
    finally:
        await conn.close()
