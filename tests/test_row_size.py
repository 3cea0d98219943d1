"""raw_market_data keeps only what earns its bytes (README, Storage): a table an earlier
schema.sql made is migrated by applying the schema, without losing a row or a value, and
applying it again changes nothing."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from common import db
from tests.conftest import Services

# raw_market_data as the schema made it before: provider_specific JSONB, ingested_at
# beside ingestion_timestamp, and an index on (provider, timestamp).
_EARLIER_RAW_MARKET_DATA = """
CREATE TABLE raw_market_data (
    event_id UUID NOT NULL, symbol VARCHAR(50) NOT NULL, provider VARCHAR(100) NOT NULL,
    timestamp TIMESTAMPTZ NOT NULL, data_type VARCHAR(20) NOT NULL,
    price NUMERIC(20, 8), volume NUMERIC(24, 8), bid NUMERIC(20, 8), ask NUMERIC(20, 8),
    provider_specific JSONB NOT NULL DEFAULT '{}'::jsonb, provider_sequence BIGINT,
    quality_flags TEXT[] NOT NULL DEFAULT '{}', received_at TIMESTAMPTZ NOT NULL,
    ingested_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (event_id, timestamp, symbol)
) PARTITION BY RANGE (timestamp);
CREATE TABLE raw_market_data_default PARTITION OF raw_market_data DEFAULT;
ALTER TABLE raw_market_data
    ADD COLUMN ingestion_timestamp TIMESTAMPTZ NOT NULL DEFAULT now();
CREATE INDEX idx_raw_data_symbol_time ON raw_market_data (symbol, timestamp DESC);
CREATE INDEX idx_raw_data_provider_time ON raw_market_data (provider, timestamp DESC);
INSERT INTO raw_market_data (event_id, symbol, provider, timestamp, data_type, price,
                             provider_specific, received_at)
VALUES ('00000000-0000-0000-0000-000000000001', 'AAPL', 'polygon', now(), 'QUOTE', 1.5,
        '{"bx": 4, "i": [], "gap": [3, 5]}', now()),
       ('00000000-0000-0000-0000-000000000002', 'MSFT', 'refinitiv', now(), 'TRADE', 2.5,
        '{}', now());
"""


@pytest.fixture
async def earlier(services: Services) -> AsyncIterator[db.Conn]:
    """A database of its own holding the earlier raw_market_data with two rows."""
    name = f"feedfleet_rowsize_{uuid.uuid4().hex[:8]}"
    async with await psycopg.AsyncConnection.connect(services.database_url, autocommit=True) as c:
        await c.execute(f'CREATE DATABASE "{name}"')
    params = conninfo_to_dict(services.database_url)
    params["dbname"] = name
    conn = await db.connect(make_conninfo(**params))  # type: ignore[arg-type]
    await conn.execute(_EARLIER_RAW_MARKET_DATA.encode())
    yield conn
    await conn.close()
    async with await psycopg.AsyncConnection.connect(services.database_url, autocommit=True) as c:
        await c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _shape(conn: db.Conn) -> tuple[dict[str, str], set[str]]:
    cur = await conn.execute(
        "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
        "WHERE attrelid = 'raw_market_data'::regclass AND attnum > 0 AND NOT attisdropped"
    )
    columns = {r[0]: r[1] for r in await cur.fetchall()}
    cur = await conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'raw_market_data'")
    return columns, {r[0] for r in await cur.fetchall()}


async def test_an_earlier_table_is_slimmed_without_losing_a_value(earlier: db.Conn) -> None:
    conn = earlier
    before, _ = await _shape(conn)
    assert before["provider_specific"] == "jsonb" and "ingested_at" in before

    await db.apply_schema(conn)

    columns, indexes = await _shape(conn)
    assert columns["provider_specific"] == "json"
    assert "ingested_at" not in columns and "ingestion_timestamp" in columns
    assert indexes == {"raw_market_data_pkey", "idx_raw_data_symbol_time"}
    cur = await conn.execute(
        "SELECT symbol, provider_specific, provider_specific -> 'gap', price::float8 "
        "FROM raw_market_data ORDER BY event_id"
    )
    assert await cur.fetchall() == [
        ("AAPL", {"bx": 4, "i": [], "gap": [3, 5]}, [3, 5], 1.5),
        ("MSFT", {}, None, 2.5),
    ]
    # A row written after it gets the defaults the table now has.
    await conn.execute(
        "INSERT INTO raw_market_data (event_id, symbol, provider, timestamp, data_type, "
        "received_at) VALUES (gen_random_uuid(), 'NEW', 'p', now(), 'TRADE', now())"
    )
    cur = await conn.execute(
        "SELECT provider_specific::text, ingestion_timestamp IS NOT NULL "
        "FROM raw_market_data WHERE symbol = 'NEW'"
    )
    assert await cur.fetchall() == [("{}", True)]

    await db.apply_schema(conn)  # again: nothing changes, nothing fails
    assert await _shape(conn) == (columns, indexes)
    cur = await conn.execute("SELECT count(*) FROM raw_market_data")
    assert await cur.fetchone() == (3,)


async def test_a_fresh_table_is_made_slim(conn: db.Conn) -> None:
    columns, indexes = await _shape(conn)
    assert columns["provider_specific"] == "json" and "ingested_at" not in columns
    assert "idx_raw_data_provider_time" not in indexes
    # The event's own text is what is stored: orjson's compact form, as written.
    event_id = str(uuid.uuid4())
    await conn.execute(
        "INSERT INTO raw_market_data (event_id, symbol, provider, timestamp, data_type, "
        "provider_specific, received_at) "
        "VALUES (%s, 'SLIM', 'p', now(), 'QUOTE', %s, now())",
        (event_id, '{"bx":4,"bs":1,"i":[],"z":3}'),
    )
    cur = await conn.execute(
        "SELECT provider_specific::text, provider_specific ->> 'bx' FROM raw_market_data "
        "WHERE event_id = %s",
        (event_id,),
    )
    assert await cur.fetchone() == ('{"bx":4,"bs":1,"i":[],"z":3}', "4")
