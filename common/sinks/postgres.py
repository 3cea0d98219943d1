"""PostgreSQL sink: batched COPY into ``raw_market_data``.

Events are buffered and copied every ``flush_interval_s`` or every ``max_batch`` rows,
one transaction per COPY; the commit is the acknowledgement. Rows already stored (a
replay after an ambiguous commit) make COPY fail on the primary key; that batch is then
inserted through a staging table with ``ON CONFLICT DO NOTHING``.
"""

from __future__ import annotations

import asyncio
import contextlib

import psycopg
import structlog

from common.events import COPY_COLUMNS, Event
from common.sinks.base import DurableSink
from common.spool import Spool

log = structlog.get_logger("feedfleet.postgres")

_COPY = f"COPY raw_market_data ({COPY_COLUMNS}) FROM STDIN"


class PostgresSink(DurableSink):
    name = "postgres"

    def __init__(
        self, database_url: str, spool: Spool, *, flush_interval_s: float = 0.1,
        max_batch: int = 20_000, max_pending: int = 200_000,
    ) -> None:  # fmt: skip
        super().__init__(spool, max_pending=max_pending)
        self.database_url = database_url
        self.flush_interval_s = flush_interval_s
        self.max_batch = max_batch
        self._buffer: list[Event] = []
        self._conn: psycopg.AsyncConnection | None = None
        self._flush_now = asyncio.Event()
        self.duplicates_skipped = 0
        # The flusher and the replay loop share one connection: one COPY at a time.
        self._copy_lock = asyncio.Lock()

    def _send(self, events: list[Event]) -> None:
        self._buffer.extend(events)
        if len(self._buffer) >= self.max_batch:
            self._flush_now.set()

    async def _connection(self) -> psycopg.AsyncConnection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = await psycopg.AsyncConnection.connect(
                self.database_url, autocommit=True, connect_timeout=5
            )
        return self._conn

    async def deliver(self, events: list[Event]) -> None:
        data = b"".join(e.copy_row for e in events)
        async with self._copy_lock:
            conn = await self._connection()
            try:
                try:
                    async with conn.transaction(), conn.cursor() as cur, cur.copy(_COPY) as copy:
                        await copy.write(data)
                except psycopg.errors.UniqueViolation:
                    await self._insert_skipping_duplicates(conn, data)
            except BaseException:
                # Whatever failed, the connection's state is unknown: never reuse it.
                await self._drop_connection()
                raise

    async def _insert_skipping_duplicates(self, conn: psycopg.AsyncConnection, data: bytes) -> None:
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
        replay = asyncio.create_task(self.replay_loop())
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._flush_now.wait(), self.flush_interval_s)
                self._flush_now.clear()
                await self.flush()
        finally:
            replay.cancel()

    async def flush(self) -> None:
        if not self._buffer:
            return
        batch, self._buffer = self._buffer, []
        try:
            await self.deliver(batch)
        except Exception as exc:
            self._failed(batch, f"{type(exc).__name__}: {exc}")
        else:
            self._acked(batch)

    async def close(self) -> None:
        await self.flush()
        await self._drop_connection()
