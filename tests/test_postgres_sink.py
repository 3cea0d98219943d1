"""The COPY sink: what it counts as stored is what PostgreSQL holds, once, whatever the
values and however often a batch is delivered."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import orjson
import pytest
from psycopg.conninfo import make_conninfo
from structlog.testing import CapturingLogger

from common import db
from common.events import Event, build_events
from common.journal import Batch, Journal
from common.model import DataType, RawMarketData
from common.sinks import postgres as postgres_sink
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


@pytest.fixture
def sink_log(monkeypatch: pytest.MonkeyPatch) -> CapturingLogger:
    """What the sink logs (its module logger), as calls."""
    logger = CapturingLogger()
    monkeypatch.setattr(postgres_sink, "log", logger)
    return logger


async def _rejected_ids(conn: db.Conn, provider: str) -> list[str]:
    cur = await conn.execute(
        "SELECT event_id::text FROM rejected_records WHERE provider = %s ORDER BY 1", (provider,)
    )
    return [r[0] for r in await cur.fetchall()]


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
    services: Services, conn: db.Conn, sink_log: CapturingLogger, tmp_path: Path
) -> None:
    provider = f"pgdup-{uuid.uuid4().hex[:6]}"
    events = build_events(_records(provider, 0, 50), T0)
    sink = PostgresSink(services.database_url, _journal(tmp_path))
    await sink.deliver(Batch(events[:30], [], 0))
    await sink.deliver(Batch(events, [], 0))  # an ambiguous commit replayed: 30 already there
    assert sink.duplicates_skipped == 30
    # All of it again, now with dead-letters of its own: those are still stored.
    records = _records(provider, 50, 2)
    records[0].price = records[1].price = 1e13
    rejected: list[Event] = []
    assert build_events(records, T0, rejected) == []
    await sink.deliver(Batch(events, rejected, 0))
    await sink.close()
    assert sink.duplicates_skipped == 80
    assert await _stored(conn, provider) == (50, 50)
    assert await _rejected_ids(conn, provider) == sorted(e.event_id for e in rejected)
    assert [(c.method_name, c.args, c.kwargs) for c in sink_log.calls] == [
        ("info", ("duplicate_rows_skipped",), {"count": 30}),
        ("info", ("duplicate_rows_skipped",), {"count": 50}),
    ]


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
    assert rows[0][1].startswith("refused by PostgreSQL: numeric field overflow")
    doc = orjson.loads(rows[0][2])
    assert doc == {
        "event_id": events[37].event_id,
        "provider": provider,
        "symbol": "PGS",
        "reason": rows[0][1],
        "event": orjson.loads(events[37].payload),
    }


async def test_bisection_stores_each_good_row_of_a_small_batch(
    services: Services, conn: db.Conn, sink_log: CapturingLogger, tmp_path: Path
) -> None:
    """Two refused rows side by side in four: each half is split down to single rows, so
    the two good neighbours are stored and only the two bad ones rejected, each reported
    with PostgreSQL's reason, bounded (a bad JSON token makes a 3 kB message)."""
    provider = f"pgpair-{uuid.uuid4().hex[:6]}"
    events = build_events(_records(provider, 0, 4), T0)
    events[1].copy_row = events[1].copy_row.replace(b"\t10.0\t", b"\t1e13\t", 1)
    token = b"x" * 3000
    events[2].copy_row = events[2].copy_row.replace(b"\t{}\t", b'\t{"a": ' + token + b"}\t", 1)
    sink = PostgresSink(services.database_url, _journal(tmp_path))
    await sink.deliver(Batch(events, [], 0))
    await sink.close()
    assert await _stored(conn, provider) == (2, 2)
    assert sink.rows_rejected == 2
    assert await _rejected_ids(conn, provider) == sorted(e.event_id for e in events[1:3])
    cur = await conn.execute(
        "SELECT event_id::text, reason FROM rejected_records WHERE provider = %s", (provider,)
    )
    reasons = dict(await cur.fetchall())
    assert reasons[events[1].event_id].startswith("refused by PostgreSQL: numeric field overflow")
    long_reason = reasons[events[2].event_id]
    assert long_reason.startswith("refused by PostgreSQL: invalid input syntax for type json")
    assert len(long_reason) == len("refused by PostgreSQL: ") + 500
    logged = [
        (c.method_name, c.args, c.kwargs["count"], c.kwargs["event_ids"]) for c in sink_log.calls
    ]
    assert logged == [
        ("error", ("row_rejected_by_postgres",), 1, [events[1].event_id]),
        ("error", ("row_rejected_by_postgres",), 1, [events[2].event_id]),
    ]
    assert sink_log.calls[0].kwargs["error"].startswith("numeric field overflow")
    long_error = sink_log.calls[1].kwargs["error"]
    assert long_error.startswith("invalid input syntax for type json") and len(long_error) == 300


async def test_rejected_records_go_to_the_dead_letter_table_once(
    services: Services, conn: db.Conn, tmp_path: Path
) -> None:
    provider = f"pgrej-{uuid.uuid4().hex[:6]}"
    records = _records(provider, 0, 5)
    records[1].price = 1e13
    records[2].symbol = "BAD\x00SYMBOL"
    records[3].symbol = "L" * 300
    # Text columns take any length, but a dead-letter's fields are bounded all the same.
    long_provider = "P" * 2500
    records[4].provider, records[4].price = long_provider, 1e13
    rejected: list = []
    events = build_events(records, T0, rejected)
    assert len(events) == 1 and len(rejected) == 4
    sink = PostgresSink(services.database_url, _journal(tmp_path))
    await sink.deliver(Batch(events, rejected, 0))
    assert await _rejected_ids(conn, provider) == sorted(e.event_id for e in rejected[:3])
    await sink.deliver(Batch(events, rejected, 0))  # replayed: still once each
    await sink.close()
    assert await _stored(conn, provider) == (1, 1)
    cur = await conn.execute(
        "SELECT symbol, reason FROM rejected_records WHERE provider = %s ORDER BY symbol",
        (provider,),
    )
    price_reason = "price 10000000000000.0 is outside the column's range (|x| < 1e+12)"
    assert await cur.fetchall() == [
        ("BAD\\0SYMBOL", "symbol holds a NUL character"),
        ("L" * 200, "symbol of 300 characters (at most 50)"),
        ("PGS", price_reason),
    ]
    cur = await conn.execute(
        "SELECT provider, reason FROM rejected_records WHERE event_id = %s",
        (rejected[3].event_id,),
    )
    assert await cur.fetchall() == [(long_provider[:2000], price_reason)]


async def test_a_full_buffer_is_copied_at_once(services: Services, tmp_path: Path) -> None:
    """``max_batch`` buffered events are copied without waiting for the flush interval."""
    provider = f"pgfull-{uuid.uuid4().hex[:6]}"
    journal = _journal(tmp_path)
    sink = PostgresSink(services.database_url, journal, flush_interval_s=3600, max_batch=10)
    task = asyncio.create_task(sink.run())
    try:
        await until(lambda: sink.live, 10, "the sink to go live on an empty journal")
        for start in (0, 10):
            # Nine events wait for the interval; the tenth fills the buffer exactly.
            sink.submit(journal.append(build_events(_records(provider, start, 9), T0), []))
            assert await sink.drained(timeout=0.2) is False
            sink.submit(journal.append(build_events(_records(provider, start + 9, 1), T0), []))
            assert await sink.drained(timeout=10), (sink.pending, sink.counters.acked)
        assert sink.counters.acked == 20 and sink.counters.replayed == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sink.close()


async def test_a_batch_blocked_by_a_lock_fails_and_is_retried_not_rejected(
    services: Services, conn: db.Conn, tmp_path: Path
) -> None:
    """A lock timeout is no data error: the live batch fails, nothing goes to the
    dead-letters, and the catch-up stores everything once the lock is gone."""
    provider = f"pglock-{uuid.uuid4().hex[:6]}"
    journal = _journal(tmp_path)
    app = f"pglock-{uuid.uuid4().hex[:6]}"
    url = make_conninfo(services.database_url, options="-c lock_timeout=200", application_name=app)
    # Copies start only when six events are buffered, never on the interval.
    sink = PostgresSink(url, journal, flush_interval_s=3600, max_batch=6)
    task = asyncio.create_task(sink.run())
    batches = []

    def submit(start: int, n: int) -> None:
        batches.append(journal.append(build_events(_records(provider, start, n), T0), []))
        sink.submit(batches[-1])

    try:
        await until(lambda: sink.live, 10, "the sink to go live on an empty journal")
        async with conn.transaction():
            # Another session holds a lock that every insert into the table waits for.
            await conn.execute("LOCK TABLE raw_market_data IN SHARE MODE")
            submit(0, 3)
            submit(3, 3)
            await until(lambda: sink.counters.failures >= 1, 10, "the blocked copy to fail")
            assert not sink.live and sink.healthy is False
            assert sink.last_error == ("LockNotAvailable: canceling statement due to lock timeout")
            submit(6, 3)  # not live: read back from the journal
        await until(lambda: sink.live, 15, "the catch-up once the lock is gone")
        # Live again, with an empty buffer: five events wait, the sixth starts a copy.
        submit(9, 5)
        assert await sink.drained(timeout=0.2) is False
        submit(14, 1)
        assert await sink.drained(timeout=10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sink.close()
    assert await _stored(conn, provider) == (15, 15)
    assert await _rejected_ids(conn, provider) == []
    assert sink.rows_rejected == 0 and sink.counters.acked == 15
    assert journal.acked(PostgresSink.name) == batches[-1].end

    async def sessions() -> int:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app,)
        )
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])

    # Every connection the sink opened (one per failure, then the last) is closed.
    deadline = asyncio.get_running_loop().time() + 10
    while await sessions() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    assert await sessions() == 0
