"""The journal cursor logic every durable sink shares, with a small in-memory backend:
live hand-over, catch-up after a failure, acknowledgements that never jump ahead, and
live batches that never overtake a backlog."""

from __future__ import annotations

import asyncio
from pathlib import Path

from common.events import build_events
from common.journal import Batch, Journal
from common.model import DataType, RawMarketData
from common.sinks.base import DurableSink
from tests.running import until

T0 = 1_800_000_000_000_000_000


class ListSink(DurableSink):
    """Acknowledges on the next loop turn, or fails while ``down``. A catch-up delivery
    waits for ``gate``, so a test can hold the sink mid catch-up."""

    def __init__(self, journal: Journal, name: str) -> None:
        self.name = name  # type: ignore[misc]
        super().__init__(journal, max_pending=1000)
        self.down = False
        self.stored: list[str] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.catch_up_deliveries = 0  # started, whether or not they went through

    def _send(self, batch: Batch, generation: int) -> None:
        def settle() -> None:
            if self.down:
                self._failed(batch, "down", generation)
            else:
                self.stored.extend(e.event_id for e in batch.events)
                self._acked(batch, generation)

        asyncio.get_running_loop().call_soon(settle)

    async def deliver(self, batch: Batch) -> None:
        self.catch_up_deliveries += 1
        await self.gate.wait()
        if self.down:
            raise ConnectionError("down")
        self.stored.extend(e.event_id for e in batch.events)

    async def run(self) -> None:
        await self.run_catch_up()

    async def close(self) -> None:
        pass


def _batch(journal: Journal, start: int) -> Batch:
    records = [
        RawMarketData(
            symbol="SNK",
            provider="sink-test",
            timestamp_ns=T0 + i,
            data_type=DataType.TRADE,
            price=1.0,
            provider_sequence=i,
            stream="T.SNK",
            receive_ns=T0 + i,
        )
        for i in range(start, start + 10)
    ]
    return journal.append(build_events(records, T0), [])


async def test_one_sinks_failure_never_stalls_the_other(tmp_path: Path) -> None:
    """The same batch goes to both sinks; one failing (a new generation) must not make the
    other ignore its own acknowledgements."""
    journal = Journal(tmp_path / "j", ("a", "b"))
    journal.open()
    a, b = ListSink(journal, "a"), ListSink(journal, "b")
    tasks = [asyncio.create_task(s.run()) for s in (a, b)]
    try:
        await until(lambda: a.live and b.live, 5, "both sinks live")
        a.down = True
        for i in range(5):
            batch = _batch(journal, i * 10)
            a.submit(batch)
            b.submit(batch)
            await asyncio.sleep(0)
        await until(lambda: not a.healthy, 5, "sink a to fail")
        assert await b.drained(timeout=5), (b.pending, b.generation)
        assert journal.acked("b") == journal.head and len(b.stored) == 50
        a.down = False
        assert await a.drained(timeout=10)
        # Everything in journal order, each once after the failure was caught up.
        assert a.stored == b.stored and a.counters.replayed == 50
        # Live again in a later generation than b: the batches both take from now on are
        # acknowledged by both (a generation kept on the shared batch once stalled a).
        await until(lambda: a.live, 5, "sink a live again")
        assert a.generation != b.generation
        for i in range(5, 10):
            batch = _batch(journal, i * 10)
            a.submit(batch)
            b.submit(batch)
        assert await a.drained(timeout=5), (a.pending, a.generation)
        assert await b.drained(timeout=5), (b.pending, b.generation)
        assert a.stored == b.stored and len(a.stored) == 100
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _ids(batches: list[Batch]) -> list[str]:
    return [e.event_id for b in batches for e in b.events]


async def test_live_batches_wait_behind_a_backlog_at_start(tmp_path: Path) -> None:
    """A sink starting over a non-empty journal takes nothing from memory until it has
    caught up: batches submitted meanwhile reach the backend after the backlog."""
    journal = Journal(tmp_path / "j", ("a",))
    journal.open()
    backlog = [_batch(journal, i * 10) for i in range(3)]  # journaled before the sink ran
    sink = ListSink(journal, "a")
    sink.replay_chunk = 10  # one record per catch-up delivery
    sink.gate.clear()
    task = asyncio.create_task(sink.run())
    try:
        await until(lambda: sink.catch_up_deliveries == 1, 5, "the catch-up's first delivery")
        live = []
        for i in range(3, 6):
            batch = _batch(journal, i * 10)
            sink.submit(batch)
            live.append(batch)
        assert not sink.live
        sink.gate.set()
        assert await sink.drained(timeout=5), (sink.pending, journal.acked("a"), journal.head)
        assert sink.stored == _ids(backlog + live)
        assert sink.counters.replayed == 60 and sink.live
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_after_a_failure_live_batches_wait_until_the_backlog_is_delivered(
    tmp_path: Path,
) -> None:
    """The backend is back but the catch-up has not reached the head: batches submitted
    now must not overtake the ones still waiting in the journal."""
    journal = Journal(tmp_path / "j", ("a",))
    journal.open()
    sink = ListSink(journal, "a")
    sink.replay_chunk = 10
    task = asyncio.create_task(sink.run())
    try:
        await until(lambda: sink.live, 5, "the sink live on an empty journal")
        first = _batch(journal, 0)
        sink.submit(first)
        assert await sink.drained(timeout=5)
        sink.down = True
        failed = [_batch(journal, i * 10) for i in range(1, 4)]
        for batch in failed:
            sink.submit(batch)
        await until(lambda: not sink.live and sink.counters.failures >= 1, 5, "the failure")
        sink.gate.clear()
        sink.down = False
        mark = sink.catch_up_deliveries
        await until(lambda: sink.catch_up_deliveries > mark, 10, "the catch-up to retry")
        later = []
        for i in range(4, 7):
            batch = _batch(journal, i * 10)
            sink.submit(batch)
            later.append(batch)
        sink.gate.set()
        assert await sink.drained(timeout=5), (sink.pending, journal.acked("a"), journal.head)
        assert sink.stored == _ids([first, *failed, *later])
        assert journal.acked("a") == journal.head
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
