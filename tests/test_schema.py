"""schema.sql on a real PostgreSQL: every table and index, idempotent, partitions."""

from __future__ import annotations

from common import db

TABLES = {
    "providers", "subscriptions", "provider_connections", "ingestion_metrics",
    "worker_instances", "assignments", "raw_market_data",
}  # fmt: skip
INDEXES = {
    "idx_providers_enabled", "idx_subscriptions_provider", "idx_connections_provider_status",
    "idx_metrics_provider_timestamp", "idx_raw_data_symbol_time", "idx_raw_data_provider_time",
}  # fmt: skip


async def test_tables_and_indexes_exist(conn: db.Conn) -> None:
    cur = await conn.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
        "AND tablename NOT LIKE 'raw_market_data\\_%'"
    )
    assert {r[0] for r in await cur.fetchall()} >= TABLES
    cur = await conn.execute("SELECT indexname FROM pg_indexes WHERE schemaname = 'public'")
    assert {r[0] for r in await cur.fetchall()} >= INDEXES
    cur = await conn.execute(
        "SELECT conname FROM pg_constraint WHERE conname = 'subscriptions_provider_symbol_key'"
    )
    assert await cur.fetchone() is not None


async def test_applying_twice_is_harmless(conn: db.Conn) -> None:
    await db.apply_schema(conn)
    await db.apply_schema(conn)
    cur = await conn.execute("SELECT count(*) FROM pg_tables WHERE tablename = 'providers'")
    assert (await cur.fetchone()) == (1,)


async def test_hourly_partitions_and_default(conn: db.Conn) -> None:
    cur = await conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'raw_market_data'::regclass"
    )
    names = {r[0] for r in await cur.fetchall()}
    assert "raw_market_data_default" in names
    hourly = [n for n in names if n != "raw_market_data_default"]
    assert len(hourly) >= 26  # 2 h back, now, 24 h ahead
    cur = await conn.execute("SELECT feedfleet_ensure_partitions(2, 24)")
    assert (await cur.fetchone()) == (0,)  # all there already


async def test_rows_far_in_the_past_land_in_default(conn: db.Conn) -> None:
    await conn.execute(
        "INSERT INTO raw_market_data (event_id, symbol, provider, timestamp, data_type, "
        "received_at) VALUES (gen_random_uuid(), 'OLD', 'p', '2001-01-01', 'TRADE', now())"
    )
    cur = await conn.execute("SELECT count(*) FROM raw_market_data_default WHERE symbol = 'OLD'")
    assert (await cur.fetchone()) == (1,)


async def test_bad_config_rows_are_refused(conn: db.Conn) -> None:
    import psycopg
    import pytest

    with pytest.raises(psycopg.errors.CheckViolation):
        await conn.execute(
            "INSERT INTO providers (name, provider_type, connection_config) "
            "VALUES ('bad', 'polygon', '[1,2]')"
        )
