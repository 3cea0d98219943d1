"""What both durable sinks share: spool on failure or overload, replay in order.

A record is done only when every durable sink has acknowledged it. While a sink's spool
holds anything, new events go to the spool too, so the sink sees them in order; the
replay loop drains it and is also the probe that finds the sink healthy again.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from typing import ClassVar

import structlog

from common.events import Event
from common.metrics import SinkCounters
from common.retry import Backoff
from common.spool import Spool

log = structlog.get_logger("feedfleet.sink")


class DurableSink(abc.ABC):
    name: ClassVar[str]

    def __init__(self, spool: Spool, *, max_pending: int, replay_chunk: int = 5000) -> None:
        self.spool = spool
        self.max_pending = max_pending
        self.replay_chunk = replay_chunk
        self.counters = SinkCounters()
        self.pending = 0  # handed to the backend, not yet acknowledged
        self.healthy = True
        self.last_error: str | None = None
        self._backoff = Backoff(base_s=0.2, max_s=5.0)
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    # -- called by the pipeline

    def submit(self, events: list[Event]) -> None:
        if self.spool.has_data or not self.healthy or self.pending >= self.max_pending:
            self._to_spool(events)
            return
        self.pending += len(events)
        self._idle.clear()
        self._send(events)

    @abc.abstractmethod
    def _send(self, events: list[Event]) -> None:
        """Start delivering; later call ``_acked`` or ``_failed`` with the same list."""

    @abc.abstractmethod
    async def deliver(self, events: list[Event]) -> None:
        """Deliver and wait for the acknowledgement; raise on failure (used by replay)."""

    # -- called by subclasses when a direct delivery completes

    def _acked(self, events: list[Event]) -> None:
        self.pending -= len(events)
        self.counters.acked += len(events)
        if self.pending == 0:
            self._idle.set()

    def _failed(self, events: list[Event], error: str) -> None:
        self.pending -= len(events)
        self.counters.failures += 1
        self._mark_unhealthy(error)
        self._to_spool(events)
        if self.pending == 0:
            self._idle.set()

    def _mark_unhealthy(self, error: str) -> None:
        if self.healthy:
            log.warning("sink_unhealthy", sink=self.name, error=error)
        self.healthy = False
        self.last_error = error

    def _to_spool(self, events: list[Event]) -> None:
        self.spool.append(events)
        self.counters.spooled += len(events)
        self._wake.set()

    # -- replay

    async def replay_loop(self) -> None:
        while True:
            if not self.spool.has_data:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=1.0)
                continue
            events, offset = self.spool.read(self.replay_chunk)
            if not events:  # only torn lines left
                self.spool.advance(offset, 0)
                continue
            try:
                await self.deliver(events)
            except Exception as exc:
                self.counters.failures += 1
                self._mark_unhealthy(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(self._backoff.next_delay())
                continue
            self._backoff.reset()
            self.spool.advance(offset, len(events))
            self.counters.acked += len(events)
            self.counters.replayed += len(events)
            if not self.spool.has_data and not self.healthy:
                log.info("sink_recovered", sink=self.name, replayed=self.counters.replayed)
                self.healthy = True
                self.last_error = None

    async def drained(self, timeout: float) -> bool:
        """Wait until nothing is in flight and the spool is empty (shutdown, tests)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if self.pending == 0 and not self.spool.has_data:
                return True
            await asyncio.sleep(0.02)
        return False

    @abc.abstractmethod
    async def run(self) -> None:
        """Background work of the sink; runs until cancelled."""

    @abc.abstractmethod
    async def close(self) -> None: ...
