"""The per-record path: quality flags, event building, hand-off to the sinks.

``process`` is synchronous and does no I/O: sinks take events without waiting (Pulsar
sends asynchronously, PostgreSQL buffers for its next COPY, Redis coalesces). The only
wait is ``wait_for_room``, the backpressure point once both sinks are spooling past
their limit.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from common.events import build_events
from common.model import RawMarketData
from common.quality import QualityChecker
from common.sinks.base import DurableSink
from common.sinks.redis import LatestCache


@dataclass(slots=True)
class PipelineCounts:
    received: int
    published: int
    stored: int
    spooled: int  # events waiting in spools now (max over the durable sinks)
    spooled_total: int
    replayed: int
    dropped: int
    cached: int


class Pipeline:
    def __init__(
        self, quality: QualityChecker, publisher: DurableSink, store: DurableSink,
        cache: LatestCache | None, *, max_spool_bytes: int = 2 * 1024**3,
    ) -> None:  # fmt: skip
        self.quality = quality
        self.publisher = publisher
        self.store = store
        self.cache = cache
        self.max_spool_bytes = max_spool_bytes
        self.received = 0
        # Nothing is dropped by quality today; the counter is kept so a loss would show.
        self.dropped = 0

    def process(self, records: list[RawMarketData]) -> None:
        self.received += len(records)
        self.quality.check(records)
        events = build_events(records, time.time_ns())
        self.publisher.submit(events)
        self.store.submit(events)
        if self.cache is not None:
            self.cache.submit(events)

    @property
    def backpressure(self) -> bool:
        limit = self.max_spool_bytes
        return self.publisher.spool.size_bytes > limit or self.store.spool.size_bytes > limit

    async def wait_for_room(self) -> None:
        while self.backpressure:
            await asyncio.sleep(0.1)

    def counts(self) -> PipelineCounts:
        pub, store = self.publisher.counters, self.store.counters
        return PipelineCounts(
            received=self.received,
            published=pub.acked,
            stored=store.acked,
            spooled=max(self.publisher.spool.pending, self.store.spool.pending),
            spooled_total=pub.spooled + store.spooled,
            replayed=pub.replayed + store.replayed,
            dropped=self.dropped,
            cached=self.cache.written if self.cache else 0,
        )

    async def drained(self, timeout: float) -> bool:
        results = await asyncio.gather(self.publisher.drained(timeout), self.store.drained(timeout))
        return all(results)
