"""The COPY sink: what it counts as stored is what PostgreSQL holds, once, whatever the
values and however often a batch is delivered."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import orjson

from common import db
from common.events import build_events
from common.journal import Batch, Journal
from common.model import DataType, RawMarketData
from common.sinks.postgres import PostgresSink
from tests.conftest import Services
from tests.running import until

T0 = 1_800_000_000_000_000_000


def _records(provider: str, start: int, n: int, symbol: str = "PGS") -> list[RawMarketData]:
    return [
        RawMarketData(
            symbol=symbol,
            provider=provider,
            timestamp_ns=T0 + i,
            data_type=DataType.TRADE,
            price=10.0,
            volume=1,
            provider_sequence=i,
            stream=f"T.{symbol}",
            receive_ns=T0 + i,
        )
        for i in range(start, start + n)
    ]


def _journal(tmp_path: Path) -> Journal:
    journal = Journal(tmp_path / "journal", (PostgresSink.name,))
    journal.open()
    return journal


async def _stored(conn: db.Conn, provider: str) -> tuple[int, int]:
    cur = await conn.execute(
        "SELECT count(*), count(DISTINCT event_id) FROM raw_market_data WHERE provider = %s",
        (provider,),
    )
    row = await cur.fetchone()
    assert row is not None
    return row[0], row[1]


async def test_overflow_catches_up_from_the_journal_while_flushing(
    services: Services, conn: db.Conn, tmp_path: Path
) -> None:
    """Past max_pending the sink stops taking batches from memory and reads them back."""
    provider = f"pgsink-{uuid.uuid4().hex[:6]}"
    journal = _journal(tmp_path)
    sink = PostgresSink(
        services.database_url, journal, flush_interval_s=0.02, max_batch=4000,
        max_pending=3000,
    )  # fmt: skip
    task = asyncio.create_task(sink.run())
    try:
        await until(lambda: sink.live, 10, "the sink to go live on an empty journal")
        total = 0
        for i in range(40):
            sink.submit(journal.append(build_events(_records(provider, total, 500), T0), []))
            total += 500
            # The first 4,000 arrive at once, past max_pending whatever the timing; after
            # that, flushes and catch-up reads interleave.
            if i >= 7:
                await asyncio.sleep(0.005)
        assert sink.counters.fell_behind > 0  # the overflow really went through the journal
        assert await sink.drained(timeout=60)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sink.close()
    assert await _stored(conn, provider) == (total, total)
    assert sink.counters.acked == total
    assert 0 < sink.counters.replayed < total
    assert journal.acked(PostgresSink.name) == journal.head


async def test_replayed_rows_already_stored_are_not_duplicated(
    services: Services, conn: db.Conn, tmp_path: Path
) -> None:
    provider = f"pgdup-{uuid.uuid4().hex[:6]}"
    events = build_events(_records(provider, 0, 50), T0)
    sink = PostgresSink(services.database_url, _journal(tmp_path))
    await sink.deliver(Batch(events[:30], [], 0))
    await sink.deliver(Batch(events, [], 0))  # an ambiguous commit replayed: 30 already there
    await sink.close()
    assert sink.duplicates_skipped == 30
    assert await _stored(conn, provider) == (50, 50)


async def test_a_value_the_table_refuses_is_dead_lettered_and_the_rest_stored(
    services: Services, conn: db.Conn, tmp_path: Path
) -> None:
    """One poison value in a batch: bisection stores the 99 good rows, rejects one."""
    provider = f"pgpoison-{uuid.uuid4().hex[:6]}"
    events = build_events(_records(provider, 0, 100), T0)
    # A row the pipeline's checks would have caught, forced past them: COPY refuses it.
    events[37].copy_row = events[37].copy_row.replace(b"\t10.0\t", b"\t1e13\t", 1)
    sink = PostgresSink(services.database_url, _journal(tmp_path))
    await sink.deliver(Batch(events, [], 0))
    await sink.close()
    assert await _stored(conn, provider) == (99, 99)
    assert sink.rows_rejected == 1
    cur = await conn.execute(
        "SELECT event_id::text, reason, payload FROM rejected_records WHERE provider = %s",
        (provider,),
    )
    rows = await cur.fetchall()
    assert [r[0] for r in rows] == [events[37].event_id]
    assert "numeric field overflow" in rows[0][1]
    assert orjson.loads(rows[0][2])["event"]["event_id"] == events[37].event_id


async def test_rejected_records_go_to_the_dead_letter_table_once(
    services: Services, conn: db.Conn, tmp_path: Path
) -> None:
    provider = f"pgrej-{uuid.uuid4().hex[:6]}"
    records = _records(provider, 0, 3)
    records[1].price = 1e13
    records[2].symbol = "BAD\x00SYMBOL"
    rejected: list = []
    events = build_events(records, T0, rejected)
    assert len(events) == 1 and len(rejected) == 2
    sink = PostgresSink(services.database_url, _journal(tmp_path))
    await sink.deliver(Batch(events, rejected, 0))
    await sink.deliver(Batch(events, rejected, 0))  # replayed: still once each
    await sink.close()
    assert await _stored(conn, provider) == (1, 1)
    cur = await conn.execute(
        "SELECT symbol, reason FROM rejected_records WHERE provider = %s ORDER BY symbol",
        (provider,),
    )
    assert await cur.fetchall() == [
        ("BAD\\0SYMBOL", "symbol holds a NUL character"),
        ("PGS", "price 10000000000000.0 is outside the column's range (|x| < 1e+12)"),
    ]
