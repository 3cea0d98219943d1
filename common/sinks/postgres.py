"""PostgreSQL sink: batched COPY into ``raw_market_data``, stored exactly once.

Live batches are buffered and copied every ``flush_interval_s`` or every ``max_batch``
rows, one transaction per COPY; the commit is the acknowledgement.

- **Exactly once.** A replayed or retried row (the same ``event_id``) makes the fast COPY
  fail on the primary key; that batch then goes through a staging table and
  ``INSERT … ON CONFLICT DO NOTHING``, so it is stored once.
- **No value blocks the table.** The pipeline already turns what the columns would refuse
  into rejected records. If COPY still refuses a batch for its data (SQLSTATE classes 22,
  23 and 54), the batch is bisected: the good rows are stored and each bad row goes to
  ``rejected_records`` with PostgreSQL's reason. Connection errors are not data errors:
  they fail the batch, and the catch-up retries it.
- Rejected records of a batch are inserted into ``rejected_records`` in the same
  transaction as its rows.
"""

from __future__ import annotations

import asyncio
import contextlib

import orjson
import psycopg
import structlog

from common import stage_cpu
from common.events import COPY_COLUMNS, Event
from common.journal import Batch, Journal
from common.sinks.base import DurableSink

log = structlog.get_logger("feedfleet.postgres")

_COPY = f"COPY raw_market_data ({COPY_COLUMNS}) FROM STDIN"
_DATA_ERROR_CLASSES = ("22", "23", "54")
_INSERT_REJECTED = (
    "INSERT INTO rejected_records (event_id, provider, symbol, reason, payload) "
    "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (event_id) DO NOTHING"
)


def _is_data_error(exc: BaseException) -> bool:
    sqlstate = getattr(exc, "sqlstate", None) or ""
    return sqlstate[:2] in _DATA_ERROR_CLASSES and not isinstance(
        exc, psycopg.errors.UniqueViolation
    )


def _text(value: object, limit: int = 2000) -> str:
    """Any value as text PostgreSQL takes: no NUL characters, bounded length."""
    return str(value).replace("\x00", "\\0")[:limit]


class PostgresSink(DurableSink):
    name = "postgres"

    def __init__(
        self, database_url: str, journal: Journal, *, flush_interval_s: float = 0.1,
        max_batch: int = 20_000, max_pending: int = 200_000,
    ) -> None:  # fmt: skip
        super().__init__(journal, max_pending=max_pending)
        self.database_url = database_url
        self.flush_interval_s = flush_interval_s
        self.max_batch = max_batch
        self._buffer: list[Batch] = []
        self._buffered = 0
        self._conn: psycopg.AsyncConnection | None = None
        self._flush_now = asyncio.Event()
        self.duplicates_skipped = 0
        self.rows_rejected = 0  # rows COPY refused, found by bisection
        # The flusher and the catch-up share one connection: one COPY at a time.
        self._copy_lock = asyncio.Lock()

    def _send(self, batch: Batch, generation: int) -> None:
        # Buffered batches are all of the current generation: a failure discards them.
        self._buffer.append(batch)
        self._buffered += len(batch.events)
        if self._buffered >= self.max_batch:
            self._flush_now.set()

    def _discard_in_flight(self) -> None:
        self._buffer = []
        self._buffered = 0

    async def _connection(self) -> psycopg.AsyncConnection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = await psycopg.AsyncConnection.connect(
                self.database_url, autocommit=True, connect_timeout=5
            )
        return self._conn

    async def deliver(self, batch: Batch) -> None:
        async with self._copy_lock:
            conn = await self._connection()
            try:
                await self._store(conn, batch.events, batch.rejected)
            except BaseException:
                # Whatever failed, the connection's state is unknown: never reuse it.
                await self._drop_connection()
                raise

    async def _store(
        self, conn: psycopg.AsyncConnection, events: list[Event], rejected: list[Event]
    ) -> None:
        clock = stage_cpu.CLOCK
        mark = clock.start()
        data = b"".join([e.copy_row for e in events])
        clock.lap("copy", mark)
        try:
            try:
                if rejected:
                    # The batch's rows and its dead letters: together or not at all.
                    async with conn.transaction(), conn.cursor() as cur:
                        if data:
                            async with cur.copy(_COPY) as copy:
                                await copy.write(data)
                        await self._insert_rejected(cur, _dead_letters(rejected))
                elif data:
                    # One COPY is one statement, atomic on its own in autocommit: no BEGIN
                    # and COMMIT round trips around it, each flush (10 a second).
                    async with conn.cursor() as cur, cur.copy(_COPY) as copy:
                        await copy.write(data)
            except psycopg.errors.UniqueViolation:
                await self._insert_skipping_duplicates(conn, data, rejected)
        except psycopg.Error as exc:
            if not _is_data_error(exc):
                raise
            await self._bisect(conn, events, rejected, exc)

    async def _bisect(
        self, conn: psycopg.AsyncConnection, events: list[Event], rejected: list[Event],
        error: psycopg.Error,
    ) -> None:  # fmt: skip
        if len(events) <= 1:
            bad = [_rejected_row(e, error) for e in events]
            self.rows_rejected += len(bad)
            log.error("row_rejected_by_postgres", count=len(bad), error=_text(error, 300),
                      event_ids=[e.event_id for e in events])  # fmt: skip
            async with conn.transaction(), conn.cursor() as cur:
                await self._insert_rejected(cur, _dead_letters(rejected) + bad)
            return
        half = len(events) // 2
        # The batch's own rejected records go with the first half, once.
        await self._store(conn, events[:half], rejected)
        await self._store(conn, events[half:], [])

    @staticmethod
    async def _insert_rejected(cur: psycopg.AsyncCursor, rejected: list[_DeadLetter]) -> None:
        """Rows of ``rejected_records``: each document names its provider, symbol and reason
        (``events.rejected_event``, ``_rejected_row``)."""
        if not rejected:
            return
        rows = []
        for event_id, document in rejected:
            doc = orjson.loads(document)
            rows.append(
                (event_id, _text(doc["provider"]), _text(doc["symbol"], 200),
                 _text(doc["reason"]), document)
            )  # fmt: skip
        await cur.executemany(_INSERT_REJECTED, rows)

    async def _insert_skipping_duplicates(
        self, conn: psycopg.AsyncConnection, data: bytes, rejected: list[Event]
    ) -> None:
        async with conn.transaction(), conn.cursor() as cur:
            await cur.execute(
                "CREATE TEMP TABLE IF NOT EXISTS raw_market_data_staging "
                "(LIKE raw_market_data INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
            )
            async with cur.copy(
                f"COPY raw_market_data_staging ({COPY_COLUMNS}) FROM STDIN"
            ) as copy:
                await copy.write(data)
            await cur.execute(
                f"INSERT INTO raw_market_data ({COPY_COLUMNS}) "
                f"SELECT {COPY_COLUMNS} FROM raw_market_data_staging ON CONFLICT DO NOTHING"
            )
            inserted = max(cur.rowcount, 0)
            await cur.execute("SELECT count(*) FROM raw_market_data_staging")
            row = await cur.fetchone()
            skipped = (row[0] if row else 0) - inserted
            await self._insert_rejected(cur, _dead_letters(rejected))
        if skipped:
            # Rows already stored by an earlier attempt (a replay after an ambiguous commit).
            self.duplicates_skipped += skipped
            log.info("duplicate_rows_skipped", count=skipped)

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close()
            except Exception as exc:
                log.debug("postgres_close_failed", error=str(exc))

    async def run(self) -> None:
        catch_up = asyncio.create_task(self.run_catch_up())
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._flush_now.wait(), self.flush_interval_s)
                self._flush_now.clear()
                await self.flush()
        finally:
            catch_up.cancel()

    async def flush(self) -> None:
        if not self._buffer:
            return
        clock = stage_cpu.CLOCK
        mark = clock.start()
        batches, self._buffer, self._buffered = self._buffer, [], 0
        generation = self.generation
        merged = Batch(
            [e for b in batches for e in b.events], [e for b in batches for e in b.rejected],
            batches[-1].end,
        )  # fmt: skip
        clock.lap("copy", mark)
        try:
            await self.deliver(merged)
        except Exception as exc:
            self._failed(merged, f"{type(exc).__name__}: {exc}", generation)
        else:
            mark = clock.start()
            self._acked(merged, generation)
            clock.lap("receipts", mark)

    async def close(self) -> None:
        await self.flush()
        await self._drop_connection()


# (event id, dead-letter document): what a rejected_records row is made of.
_DeadLetter = tuple[str, bytes]


def _dead_letters(rejected: list[Event]) -> list[_DeadLetter]:
    return [(e.event_id, e.payload) for e in rejected]


def _rejected_row(event: Event, error: psycopg.Error) -> _DeadLetter:
    """A stored event PostgreSQL refused, as a dead-letter document with its reason."""
    document = orjson.dumps(
        {
            "event_id": event.event_id,
            "provider": orjson.loads(event.payload)["provider"],
            "symbol": event.symbol,
            "reason": f"refused by PostgreSQL: {_text(error, 500)}",
            "event": orjson.Fragment(event.payload),
        }
    )
    return event.event_id, document
