"""schema.sql on a real PostgreSQL: every table and index, idempotent, partitions."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from common import db
from common.model import DataType
from tests.conftest import Services

TABLES = {
    "providers", "subscriptions", "provider_connections", "ingestion_metrics",
    "worker_instances", "assignments", "raw_market_data",
}  # fmt: skip
INDEXES = {
    "idx_providers_enabled", "idx_subscriptions_provider", "idx_connections_provider_status",
    "idx_metrics_provider_timestamp", "idx_raw_data_symbol_time",
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
    with pytest.raises(psycopg.errors.CheckViolation):
        await conn.execute(
            "INSERT INTO providers (name, provider_type, connection_config) "
            "VALUES ('bad', 'polygon', '[1,2]')"
        )


# Columns named by the seed, beside those feedfleet added.
SEED_COLUMNS = {
    "providers": {"id", "name", "provider_type", "enabled", "priority", "connection_config",
                  "rate_limits", "created_at", "updated_at"},
    "subscriptions": {"id", "provider_id", "instrument_symbol", "data_types", "status",
                      "created_at", "updated_at"},
    "provider_connections": {"id", "provider_id", "status", "connected_at", "disconnected_at",
                             "last_heartbeat", "error_message", "connection_metadata"},
    "ingestion_metrics": {"id", "provider_id", "timestamp", "messages_ingested",
                          "bytes_ingested", "errors_count", "avg_latency_ms", "created_at"},
    "raw_market_data": {"event_id", "symbol", "provider", "timestamp", "data_type", "price",
                        "volume", "bid", "ask", "provider_specific", "ingestion_timestamp",
                        "quality_score"},
}  # fmt: skip


async def test_the_seeds_columns_are_there_by_its_names(conn: db.Conn) -> None:
    cur = await conn.execute(
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = ANY(%s)",
        (list(SEED_COLUMNS),),
    )
    have: dict[str, set[str]] = {}
    for table, column in await cur.fetchall():
        have.setdefault(table, set()).add(column)
    assert {t: cols - have.get(t, set()) for t, cols in SEED_COLUMNS.items()} == {
        t: set() for t in SEED_COLUMNS
    }


async def test_quality_score_follows_the_flags(conn: db.Conn) -> None:
    """1 without flags, 0.25 less per flag (failover aside), never below 0; and the row
    gets its ingestion_timestamp by itself."""
    cases = {
        "QS0": [], "QS1": ["stale"], "QS2": ["gap", "duplicate"], "QSF": ["failover"],
        "QSFG": ["failover", "gap", "backfill"],
        "QS5": ["stale", "gap", "crossed", "duplicate", "missing_fields"],
    }  # fmt: skip
    for symbol, flags in cases.items():
        await conn.execute(
            "INSERT INTO raw_market_data (event_id, symbol, provider, timestamp, data_type, "
            "quality_flags, received_at) "
            "VALUES (gen_random_uuid(), %s, 'p', now(), 'TRADE', %s, now())",
            (symbol, flags),
        )
    cur = await conn.execute(
        "SELECT symbol, quality_score, ingestion_timestamp <= now() FROM raw_market_data "
        "WHERE symbol = ANY(%s)",
        (list(cases),),
    )
    got = {r[0]: (r[1], r[2]) for r in await cur.fetchall()}
    assert got == {
        "QS0": (1.0, True), "QS1": (0.75, True), "QS2": (0.5, True), "QSF": (1.0, True),
        "QSFG": (0.75, True), "QS5": (0.0, True),
    }  # fmt: skip


# The subscriptions table as an earlier schema.sql made it: is_active, no status.
_EARLIER_SUBSCRIPTIONS = """
CREATE TABLE providers (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(), name VARCHAR(100) NOT NULL UNIQUE,
    provider_type VARCHAR(50) NOT NULL, enabled BOOLEAN NOT NULL DEFAULT TRUE,
    priority INTEGER NOT NULL DEFAULT 100,
    connection_config JSONB NOT NULL DEFAULT '{}'::jsonb,
    rate_limits JSONB NOT NULL DEFAULT '{}'::jsonb,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(), updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE TABLE subscriptions (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    provider_id UUID NOT NULL REFERENCES providers (id) ON DELETE CASCADE,
    instrument_symbol VARCHAR(50) NOT NULL,
    data_types TEXT[] NOT NULL DEFAULT ARRAY['TRADE', 'QUOTE'],
    is_active BOOLEAN NOT NULL DEFAULT TRUE,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(), updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT subscriptions_provider_symbol_key UNIQUE (provider_id, instrument_symbol)
);
"""


async def test_subscription_status_is_migrated_from_is_active_and_kept_in_step(
    services: Services,
) -> None:
    """A database from before ``status``: `feedfleet db init` (apply_schema) keeps every
    row and sets status from is_active. After it the code reads and writes status, and an
    operator editing either column finds the other in step."""
    admin = await db.connect(services.database_url)
    await admin.set_autocommit(True)
    name = f"feedfleet_migrate_{uuid.uuid4().hex[:8]}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    params = conninfo_to_dict(services.database_url)
    params["dbname"] = name
    conn = await db.connect(make_conninfo(**params))  # type: ignore[arg-type]
    try:
        await conn.execute(_EARLIER_SUBSCRIPTIONS)
        cur = await conn.execute(
            "INSERT INTO providers (name, provider_type) VALUES ('p', 'polygon') RETURNING id"
        )
        row = await cur.fetchone()
        assert row is not None
        pid = str(row[0])
        await conn.execute(
            "INSERT INTO subscriptions (provider_id, instrument_symbol, is_active) "
            "VALUES (%s, 'ON', true), (%s, 'OFF', false)",
            (pid, pid),
        )
        await db.apply_schema(conn)

        async def rows() -> list[tuple[str, str, bool]]:
            cur = await conn.execute(
                "SELECT instrument_symbol, status, is_active FROM subscriptions ORDER BY 1"
            )
            return [(r[0], r[1], r[2]) for r in await cur.fetchall()]

        assert await rows() == [("OFF", "inactive", False), ("ON", "active", True)]
        assert [s.symbol for s in await db.active_subscriptions(conn)] == ["ON"]
        # The seed's provider name length and priority default, migrated too.
        cur = await conn.execute(
            "SELECT character_maximum_length, column_default FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = 'providers' "
            "AND column_name IN ('name', 'priority') "
            "ORDER BY column_name"
        )
        assert await cur.fetchall() == [(50, None), (None, "1")]
        # The code: subscribe again brings OFF back; unsubscribe writes status.
        [again] = await db.subscribe(conn, pid, ["OFF"], [DataType.TRADE])
        assert again.status == "active"
        assert await db.unsubscribe(conn, pid, ["ON"]) == 1
        assert await rows() == [("OFF", "active", True), ("ON", "inactive", False)]
        # The coordinator's failover mark leaves an unsubscribed row alone.
        await db.set_subscription_status(conn, [(pid, "OFF"), (pid, "ON")], "failover")
        assert await rows() == [("OFF", "failover", True), ("ON", "inactive", False)]
        # An operator's edits, by either column.
        await conn.execute(
            "UPDATE subscriptions SET is_active = false WHERE instrument_symbol = 'OFF'"
        )
        await conn.execute(
            "UPDATE subscriptions SET status = 'active' WHERE instrument_symbol = 'ON'"
        )
        assert await rows() == [("OFF", "inactive", False), ("ON", "active", True)]
        await conn.execute(
            "UPDATE subscriptions SET is_active = true WHERE instrument_symbol = 'OFF'"
        )
        assert await rows() == [("OFF", "active", True), ("ON", "active", True)]
        with pytest.raises(psycopg.errors.CheckViolation):
            await conn.execute("UPDATE subscriptions SET status = 'paused'")
        # Applying the schema again changes nothing.
        await db.apply_schema(conn)
        assert await rows() == [("OFF", "active", True), ("ON", "active", True)]
    finally:
        await conn.close()
        await admin.execute(f'DROP DATABASE "{name}"')
        await admin.close()
