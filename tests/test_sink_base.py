"""The journal cursor logic every durable sink shares, with a small in-memory backend:
live hand-over, catch-up after a failure, acknowledgements that never jump ahead, and
live batches that never overtake a backlog."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from structlog.testing import CapturingLogger

from common.events import Event, build_events
from common.journal import Batch, Journal
from common.model import DataType, RawMarketData
from common.sinks import base
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
        self.fail_ends: set[int] = set()  # live batches (by end) refused even when up

    def _send(self, batch: Batch, generation: int) -> None:
        def settle() -> None:
            if self.down or batch.end in self.fail_ends:
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


@pytest.fixture
def sink_log(monkeypatch: pytest.MonkeyPatch) -> CapturingLogger:
    """What the sinks log (the base module's logger), as calls."""
    logger = CapturingLogger()
    monkeypatch.setattr(base, "log", logger)
    return logger


def _calls(logger: CapturingLogger) -> list[tuple[str, tuple[object, ...], dict[str, object]]]:
    return [(c.method_name, c.args, c.kwargs) for c in logger.calls]


def _batch(journal: Journal, start: int, refused: int = 0) -> Batch:
    """Ten records from ``start``; the last ``refused`` of them rejected (dead-letters)."""
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
    for r in records[10 - refused :]:
        r.price = 1e13
    rejected: list[Event] = []
    return journal.append(build_events(records, T0, rejected), rejected)


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
    sink.backlog = 30  # as the worker sets it from what the journal recovered
    sink.replay_chunk = 10  # one record per catch-up delivery
    sink.gate.clear()
    task = asyncio.create_task(sink.run())
    try:
        await until(lambda: sink.catch_up_deliveries == 1, 5, "the catch-up's first delivery")
        # Catching up a backlog is no failure.
        assert sink.healthy is True and sink.last_error is None
        live = []
        for i in range(3, 6):
            batch = _batch(journal, i * 10)
            sink.submit(batch)
            live.append(batch)
        assert not sink.live and sink.waiting == 60
        sink.gate.set()
        sink.gate.clear()  # lets the delivery waiting now through, and only it
        await until(lambda: sink.catch_up_deliveries == 2, 5, "the second delivery")
        assert sink.waiting == 50 and sink.counters.replayed == 10
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


async def test_every_failure_starts_a_generation_whose_late_receipts_do_not_count(
    sink_log: CapturingLogger, tmp_path: Path
) -> None:
    """A live batch fails and the one handed over after it is acknowledged right after:
    that receipt must not move the cursor past the failed batch, at the second failure
    as at the first. The failure is reported until the catch-up has gone through, and
    every count (acknowledged, replayed, dead-lettered, waiting) adds up."""
    journal = Journal(tmp_path / "j", ("a",))
    journal.open()
    sink = ListSink(journal, "a")
    task = asyncio.create_task(sink.run())
    try:
        await until(lambda: sink.live, 5, "the sink live on an empty journal")
        expected = {"acked": 0, "replayed": 0, "dead_lettered": 0, "failures": 0}

        def counts() -> dict[str, int]:
            c = sink.counters
            return {k: getattr(c, k) for k in expected}

        for round_ in (1, 2):
            ok = _batch(journal, round_ * 100, refused=1)
            sink.submit(ok)
            assert await sink.drained(timeout=5)
            expected["acked"] += 10
            expected["dead_lettered"] += 1
            assert counts() == expected

            sink.gate.clear()  # hold the catch-up while the failure is looked at
            failed = _batch(journal, round_ * 100 + 10, refused=1)
            after = _batch(journal, round_ * 100 + 20, refused=1)
            sink.fail_ends = {failed.end}
            mark = sink.catch_up_deliveries
            sink.submit(failed)
            sink.submit(after)  # both settle in the same loop turn, failure first
            await until(lambda: not sink.live, 5, f"failure {round_}")
            expected["failures"] += 1
            assert journal.acked("a") == ok.end and sink.pending == 0
            assert counts() == expected
            assert sink.counters.fell_behind == round_ and sink.waiting == 20
            assert sink.healthy is False and sink.last_error == "down"
            sink.fail_ends = set()
            await until(lambda m=mark: sink.catch_up_deliveries == m + 1, 5, "a catch-up")
            if round_ == 1:
                assert await sink.drained(timeout=0.05) is False
                # The catch-up's first attempt fails too.
                sink.down = True
                sink.gate.set()
                sink.gate.clear()  # only the attempt waiting now goes through
                await until(lambda: sink.counters.failures == 2, 5, "the catch-up failing")
                expected["failures"] += 1
                assert counts() == expected
                assert sink.last_error == "ConnectionError: down" and sink.waiting == 20
                await until(lambda m=mark: sink.catch_up_deliveries == m + 2, 5, "a retry")
                sink.down = False
            sink.gate.set()
            await until(lambda: sink.live, 5, f"the catch-up after failure {round_}")
            expected["acked"] += 20
            expected["replayed"] += 20
            expected["dead_lettered"] += 2
            assert counts() == expected
            assert journal.acked("a") == after.end and sink.healthy is True
            assert sink.last_error is None and sink.waiting == 0
            # The failed batch and the one after it, replayed once, in journal order.
            assert sink.stored[-18:] == _ids([failed, after])
        # Told once per outage (not for the catch-up's own failure), and when it is over.
        assert _calls(sink_log) == [
            ("warning", ("sink_unhealthy",), {"sink": "a", "error": "down"}),
            ("info", ("sink_recovered",), {"sink": "a", "replayed": 20}),
            ("warning", ("sink_unhealthy",), {"sink": "a", "error": "down"}),
            ("info", ("sink_recovered",), {"sink": "a", "replayed": 40}),
        ]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_at_max_pending_the_sink_falls_behind_to_the_journal(tmp_path: Path) -> None:
    """With ``max_pending`` events unacknowledged the next batch is not handed over: the
    sink leaves live (no failure) and the catch-up delivers that batch after the others."""
    journal = Journal(tmp_path / "j", ("a",))
    journal.open()
    sink = ListSink(journal, "a")
    sink.max_pending = 20
    task = asyncio.create_task(sink.run())
    try:
        await until(lambda: sink.live, 5, "the sink live on an empty journal")
        batches = [_batch(journal, i * 10) for i in range(3)]
        for batch in batches:
            sink.submit(batch)  # in one loop turn: no acknowledgement in between
        assert (sink.live, sink.pending, sink.waiting) == (False, 20, 30)
        assert sink.counters.fell_behind == 1 and sink.healthy is True
        assert await sink.drained(timeout=5)
        assert sink.stored == _ids(batches)
        c = sink.counters
        assert (c.acked, c.replayed, c.failures) == (30, 10, 0)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_an_unexpected_catch_up_error_is_logged_and_the_catch_up_started_again(
    sink_log: CapturingLogger, tmp_path: Path
) -> None:
    """The catch-up must never stop for good: an error it does not expect (here a sink the
    journal keeps no cursor for) is logged with the sink's name and the loop is run again."""
    journal = Journal(tmp_path / "j", ("a",))
    journal.open()
    sink = ListSink(journal, "unknown")
    task = asyncio.create_task(sink.run())
    try:
        await until(lambda: len(sink_log.calls) == 2, 5, "the catch-up started twice")
        assert _calls(sink_log) == [("exception", ("catch_up_failed",), {"sink": "unknown"})] * 2
        assert not task.done() and not sink.live
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
