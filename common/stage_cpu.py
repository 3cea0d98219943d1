"""CPU time per stage of a worker's hot path, for the benchmark.

With ``FEEDFLEET_STAGE_CPU=1`` in a worker's environment, each stage of the per-batch path
adds the thread CPU time it took (``time.thread_time_ns``: CPU, not wall time, so waiting
and other processes do not count) to ``CLOCK``, and the worker's status report carries the
totals (``metrics.stage_cpu``). The benchmark differences two reports over its window.

Off (the default), ``CLOCK`` is a ``StageClockOff`` whose calls do nothing: a few calls
per batch, never per event. Only synchronous code is timed: what happens inside an
``await`` (the WebSocket receive, the sinks' socket I/O) cannot be told apart from the
other tasks the event loop runs meanwhile, so it stays in the rest of the thread's time.
"""

from __future__ import annotations

import os
import time
from typing import Any

STAGES = ("decode", "quality", "event_build", "journal", "pulsar", "copy", "redis", "receipts")
ENV = "FEEDFLEET_STAGE_CPU"

thread_ns = time.thread_time_ns


class StageClock:
    """Cumulative thread CPU ns per stage (see ``STAGES``).

    ``start()`` reads the clock; ``lap(stage, since)`` counts the time from ``since`` to
    ``stage`` and returns the reading it took, the start of the next stage: one reading
    per stage boundary.
    """

    __slots__ = ("ns",)

    def __init__(self) -> None:
        self.ns: dict[str, int] = dict.fromkeys(STAGES, 0)

    def start(self) -> int:
        return thread_ns()

    def lap(self, stage: str, since_ns: int) -> int:
        now = thread_ns()
        self.ns[stage] += now - since_ns
        return now

    def report(self) -> dict[str, Any] | None:
        """The totals and the calling thread's CPU time so far (the status report runs on
        the event loop's thread, whose time the stages are part of)."""
        return {"thread_ns": thread_ns(), "stages_ns": dict(self.ns)}


class StageClockOff(StageClock):
    """The clock when the benchmark is not asking: reads nothing, counts nothing."""

    def start(self) -> int:
        return 0

    def lap(self, stage: str, since_ns: int) -> int:
        return 0

    def report(self) -> dict[str, Any] | None:
        return None


CLOCK: StageClock = StageClock() if os.environ.get(ENV) == "1" else StageClockOff()
