"""What both durable sinks share: a cursor in the journal, live hand-over, catch-up.

A sink is a reader of the worker's journal (``common/journal.py``) with its own cursor,
the position up to which its backend has acknowledged everything. It runs in one of two
modes:

- **live**: each batch the pipeline journals is handed to the backend at once, from
  memory. A receipt moves the cursor to the batch's end.
- **catching up**: the backend failed, was slow (``max_pending`` events unacknowledged)
  or the worker has just started with a backlog. New batches are not handed over (they
  are in the journal); the catch-up loop reads from the cursor, delivers a chunk, waits
  for its acknowledgement, and goes live again once it reaches the journal's head. It is
  also the probe that finds a failed backend healthy again.

Batches are acknowledged in journal order, so the cursor never passes a batch that was
not delivered. A failure bumps ``generation``: receipts for batches handed over before it
are then ignored, and the catch-up resends from the cursor (the backends de-duplicate by
event id). Records no backend may take as they are (``Batch.rejected``) go to the sink's
dead-letter, in the same delivery.
"""

from __future__ import annotations

import abc
import asyncio
from typing import ClassVar

import structlog

from common.journal import Batch, Journal
from common.metrics import SinkCounters
from common.retry import Backoff

log = structlog.get_logger("feedfleet.sink")


class DurableSink(abc.ABC):
    name: ClassVar[str]

    def __init__(self, journal: Journal, *, max_pending: int, replay_chunk: int = 5000) -> None:
        self.journal = journal
        self.max_pending = max_pending
        self.replay_chunk = replay_chunk
        self.counters = SinkCounters()
        self.pending = 0  # events handed to the backend, not yet acknowledged
        self.generation = 0
        self.live = False  # starts catching up: the journal may hold a backlog
        self.healthy = True
        self.last_error: str | None = None
        # Events journaled but not yet acknowledged by this sink (recovered ones included).
        self.backlog = 0
        self._backoff = Backoff(base_s=0.2, max_s=5.0)
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    # -- called by the pipeline

    def submit(self, batch: Batch) -> None:
        self.backlog += len(batch)
        if not self.live:
            return  # the catch-up loop reads it from the journal
        if self.pending >= self.max_pending:
            self._leave_live(None)
            return
        self.pending += len(batch)
        self._idle.clear()
        self._send(batch, self.generation)

    @abc.abstractmethod
    def _send(self, batch: Batch, generation: int) -> None:
        """Start delivering; later call ``_acked`` or ``_failed`` with the same batch and
        generation."""

    @abc.abstractmethod
    async def deliver(self, batch: Batch) -> None:
        """Deliver and wait for the acknowledgement; raise on failure (used by catch-up)."""

    def _discard_in_flight(self) -> None:  # noqa: B027 - a hook, most sinks need none
        """Forget batches handed over but not yet with the backend (a failure happened)."""

    # -- called by subclasses when a live delivery completes

    def _acked(self, batch: Batch, generation: int) -> None:
        if generation != self.generation:
            return  # handed over before a failure: the catch-up resends it
        n = len(batch)
        self.pending -= n
        self.backlog -= n
        self.counters.acked += n
        self.counters.dead_lettered += len(batch.rejected)
        self.journal.acknowledge(self.name, batch.end)
        if self.pending == 0:
            self._idle.set()

    def _failed(self, batch: Batch, error: str, generation: int) -> None:
        if generation != self.generation:
            return
        self.counters.failures += 1
        self._mark_unhealthy(error)
        self._leave_live(error)

    def _leave_live(self, error: str | None) -> None:
        """Stop taking batches from memory; the catch-up loop goes on from the cursor."""
        if error is not None:
            # Receipts still to come for earlier batches no longer count: resend from the
            # cursor rather than guess which of them the backend has.
            self.generation += 1
            self.pending = 0
            self._discard_in_flight()
            self._idle.set()
        if self.live:
            self.live = False
            self.counters.fell_behind += 1
        self._wake.set()

    def _mark_unhealthy(self, error: str) -> None:
        if self.healthy:
            log.warning("sink_unhealthy", sink=self.name, error=error)
        self.healthy = False
        self.last_error = error

    # -- catch-up

    async def catch_up_loop(self) -> None:
        while True:
            if self.live:
                self._wake.clear()
                await self._wake.wait()
                continue
            # Whatever the live path still has with the backend settles first, so the
            # cursor is where the catch-up starts.
            await self._idle.wait()
            start = self.journal.acked(self.name)
            batch = self.journal.read(start, self.replay_chunk)
            if len(batch) == 0:
                self.journal.acknowledge(self.name, batch.end)
                if batch.end >= self.journal.head:
                    self._go_live()
                continue
            generation = self.generation
            try:
                await self.deliver(batch)
            except Exception as exc:
                self.counters.failures += 1
                self._mark_unhealthy(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(self._backoff.next_delay())
                continue
            self._backoff.reset()
            if generation != self.generation or self.journal.acked(self.name) != start:
                continue  # a failure or a restart of the catch-up meanwhile: read again
            n = len(batch)
            self.backlog = max(0, self.backlog - n)
            self.counters.acked += n
            self.counters.replayed += n
            self.counters.dead_lettered += len(batch.rejected)
            self.journal.acknowledge(self.name, batch.end)

    def _go_live(self) -> None:
        # Synchronous with the read that found the head: no append can fall in between.
        self.live = True
        self.backlog = 0
        if not self.healthy:
            log.info("sink_recovered", sink=self.name, replayed=self.counters.replayed)
            self.healthy = True
            self.last_error = None

    @property
    def waiting(self) -> int:
        """Events waiting in the journal for this sink (0 while it takes batches live)."""
        return 0 if self.live else self.backlog

    @property
    def caught_up(self) -> bool:
        return self.pending == 0 and self.journal.acked(self.name) >= self.journal.head

    async def drained(self, timeout: float) -> bool:
        """Wait until everything journaled is acknowledged (shutdown, tests)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if self.caught_up:
                return True
            await asyncio.sleep(0.02)
        return False

    async def run_catch_up(self) -> None:
        """The catch-up loop, restarted if it ever fails (it must never stop for good)."""
        while True:
            try:
                await self.catch_up_loop()
            except Exception:
                log.exception("catch_up_failed", sink=self.name)
                await asyncio.sleep(1.0)

    @abc.abstractmethod
    async def run(self) -> None:
        """Background work of the sink; runs until cancelled."""

    @abc.abstractmethod
    async def close(self) -> None: ...
