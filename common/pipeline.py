"""The per-record path: quality flags, event building, the journal, hand-off to the sinks.

``process`` is synchronous and does no waiting: the batch is appended to the journal (one
``write``), then handed to the sinks, which take it without waiting (Pulsar sends
asynchronously, PostgreSQL buffers for its next COPY, Redis coalesces). The only waits
are in ``wait_for_room``: the journal at its size cap (a sink far behind), or a journal
that cannot be written (a full disk). Then the session stops reading, so the provider
side feels the backpressure, and the events of the read that did not fit are held here
and journaled first once there is room: nothing received is lost.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import structlog

from common import stage_cpu
from common.events import Event, build_events
from common.journal import Journal, JournalFull
from common.model import RawMarketData
from common.quality import QualityChecker
from common.sinks.base import DurableSink
from common.sinks.redis import LatestCache

log = structlog.get_logger("feedfleet.pipeline")


@dataclass(slots=True)
class PipelineCounts:
    received: int
    journaled: int
    published: int
    stored: int
    # Events waiting in the journal for a sink that is catching up (the larger backlog);
    # 0 while both take batches live, whatever is in flight.
    spooled: int
    replayed: int
    dead_lettered: int
    dropped: int
    cached: int


class Pipeline:
    def __init__(
        self, quality: QualityChecker, journal: Journal, publisher: DurableSink,
        store: DurableSink, cache: LatestCache | None,
    ) -> None:  # fmt: skip
        self.quality = quality
        self.journal = journal
        self.publisher = publisher
        self.store = store
        self.cache = cache
        self.received = 0
        self.last_received_ns = 0  # when the last record arrived (0: none yet)
        self.dead_lettered = 0  # records turned into rejected events
        # Nothing is dropped; the counter is kept so a loss would show.
        self.dropped = 0
        # A read's events that the journal could not take yet (disk full, at its cap).
        self._held: tuple[list[Event], list[Event]] | None = None
        self.journal_error: str | None = None

    def process(self, records: list[RawMarketData]) -> None:
        if not records:
            return
        self.received += len(records)
        clock = stage_cpu.CLOCK
        mark = clock.start()
        self.quality.check(records)
        mark = clock.lap("quality", mark)
        rejected: list[Event] = []
        now_ns = self.last_received_ns = time.time_ns()
        events = build_events(records, now_ns, rejected)
        clock.lap("event_build", mark)
        if rejected:
            self.dead_lettered += len(rejected)
        if self._held is not None:
            # Still waiting for room: keep the order, join the held read.
            self._held[0].extend(events)
            self._held[1].extend(rejected)
            return
        self._journal(events, rejected)

    def _journal(self, events: list[Event], rejected: list[Event]) -> bool:
        clock = stage_cpu.CLOCK
        mark = clock.start()
        try:
            batch = self.journal.append(events, rejected)
        except JournalFull as exc:
            if self._held is None:
                log.error("journal_full", error=str(exc), events_held=len(events))
            self._held = (events, rejected)
            self.journal_error = str(exc)
            return False
        self._held = None
        if self.journal_error is not None:
            log.info("journal_writable_again")
            self.journal_error = None
        mark = clock.lap("journal", mark)
        self.publisher.submit(batch)
        mark = clock.lap("pulsar", mark)
        self.store.submit(batch)
        mark = clock.lap("copy", mark)
        if self.cache is not None and events:
            self.cache.submit(events)
        clock.lap("redis", mark)
        return True

    @property
    def backpressure(self) -> bool:
        return self._held is not None or self.journal.size_bytes > self.journal.max_bytes * 0.9

    @property
    def backpressure_reason(self) -> str | None:
        if self.journal_error is not None:
            return f"journal not writable: {self.journal_error}"
        if self.backpressure:
            return "backpressure: journal near its size cap (a sink is far behind)"
        return None

    def journal_held(self) -> int:
        """One more try for a read held back by a full journal (at stop); returns how many
        events are still only in memory."""
        if self._held is not None:
            self.journal.make_room()
            self._journal(*self._held)
        return 0 if self._held is None else len(self._held[0]) + len(self._held[1])

    async def wait_for_room(self) -> None:
        while self.backpressure:
            await asyncio.sleep(0.2)
            self.journal.collect()
            # The segment being written may be all that fills the disk or the cap: once
            # every sink has it, a fresh segment lets it go.
            self.journal.make_room()
            if self._held is not None:
                self._journal(*self._held)

    def counts(self) -> PipelineCounts:
        pub, store = self.publisher.counters, self.store.counters
        return PipelineCounts(
            received=self.received,
            journaled=self.journal.appended_events,
            published=pub.acked,
            stored=store.acked,
            spooled=max(self.publisher.waiting, self.store.waiting),
            replayed=pub.replayed + store.replayed,
            dead_lettered=self.dead_lettered,
            dropped=self.dropped,
            cached=self.cache.written if self.cache else 0,
        )

    async def drained(self, timeout: float) -> bool:
        results = await asyncio.gather(self.publisher.drained(timeout), self.store.drained(timeout))
        return all(results) and self._held is None
