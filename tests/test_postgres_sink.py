"""The COPY sink under overload: what it counts as stored is what PostgreSQL holds."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from common import db
from common.events import build_events
from common.model import DataType, RawMarketData
from common.sinks.postgres import PostgresSink
from common.spool import Spool
from tests.conftest import Services

T0 = 1_800_000_000_000_000_000


def _batch(provider: str, start: int, n: int) -> list[RawMarketData]:
    return [
        RawMarketData(
            "PGS",
            provider,
            T0 + i,
            DataType.TRADE,
            10.0,
            1,
            None,
            None,
            {},
            i,
            "T.PGS",
            False,
            T0 + i,
        )
        for i in range(start, start + n)
    ]


async def test_overflow_spools_and_replays_while_flushing(
    services: Services, conn: db.Conn, tmp_path: Path
) -> None:
    """Past max_pending new events spool; the replay runs beside the flusher."""
    provider = f"pgsink-{uuid.uuid4().hex[:6]}"
    sink = PostgresSink(
        services.database_url, Spool(tmp_path / "pg.spool"), flush_interval_s=0.02,
        max_batch=4000, max_pending=3000,
    )  # fmt: skip
    task = asyncio.create_task(sink.run())
    try:
        total = 0
        for i in range(40):
            sink.submit(build_events(_batch(provider, total, 500), T0))
            total += 500
            # The first 4,000 arrive at once, past max_pending whatever the timing; after
            # that, flushes and replays interleave.
            if i >= 7:
                await asyncio.sleep(0.005)
        assert sink.counters.spooled > 0  # the overflow really went through the spool
        assert await sink.drained(timeout=60)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sink.close()
    cur = await conn.execute(
        "SELECT count(*), count(DISTINCT provider_sequence) FROM raw_market_data "
        "WHERE provider = %s",
        (provider,),
    )
    assert await cur.fetchone() == (total, total)
    assert sink.counters.acked == total
    assert sink.counters.replayed == sink.counters.spooled


async def test_replayed_rows_already_stored_are_not_duplicated(
    services: Services, conn: db.Conn, tmp_path: Path
) -> None:
    provider = f"pgdup-{uuid.uuid4().hex[:6]}"
    events = build_events(_batch(provider, 0, 50), T0)
    sink = PostgresSink(services.database_url, Spool(tmp_path / "pg.spool"))
    await sink.deliver(events[:30])
    await sink.deliver(events)  # an ambiguous commit replayed: 30 rows already there
    await sink.close()
    assert sink.duplicates_skipped == 30
    cur = await conn.execute(
        "SELECT count(*) FROM raw_market_data WHERE provider = %s", (provider,)
    )
    assert await cur.fetchone() == (50,)
