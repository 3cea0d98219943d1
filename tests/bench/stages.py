"""A worker's CPU per event, split by stage, from two status reports and two ``/proc``
readings taken over the same window.

The worker (``FEEDFLEET_STAGE_CPU=1``, ``common/stage_cpu.py``) reports its main thread's
CPU time and the part of it each stage of the hot path took, cumulative since it started.
The kernel gives the whole process's CPU (every thread, the ended ones too) and each live
thread's. Per event over the window:

- ``total``: the process's CPU / the events received;
- one key per stage (``decode`` ... ``receipts``);
- ``receive_and_loop``: the main thread's CPU less the stages. The WebSocket receive runs
  in the event loop's callbacks and cannot be told apart from the loop itself;
- ``other_threads``: every thread but the main one: the Pulsar client's own (C++) threads,
  and the executor threads the journal syncs its files on.

The process and thread figures from ``/proc`` come in clock ticks (10 ms at the usual
100 Hz): ``tick_us`` says what one tick is per event in the window, the precision of
``total`` and ``other_threads``. The stages and the main thread are the worker's own
``thread_time_ns`` readings, to the ns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.stage_cpu import STAGES
from tests.bench.procstat import NS_PER_TICK, ThreadCpu, process_cpu_ns, threads_cpu_ns


@dataclass(frozen=True)
class CpuReading:
    """A process's CPU and each of its live threads' at one moment (ns)."""

    process_ns: int
    threads: dict[int, ThreadCpu]

    @classmethod
    def read(cls, pid: int) -> CpuReading:
        return cls(process_cpu_ns(pid), threads_cpu_ns(pid))


@dataclass
class CpuSplit:
    """The worker's CPU per event over one window, whole and by stage (µs)."""

    per_event_us: dict[str, float]
    main_thread_us: float
    events: int
    # one tick of /proc CPU time, per event in this window: the precision of the process
    # and thread figures
    tick_us: float
    # every thread that ran in the window: its id, its name and its CPU per event
    threads: list[dict[str, Any]] = field(default_factory=list)
    # False: the worker reported no stage times (the main thread is then /proc's figure)
    stage_timing: bool = True


def split_cpu(
    pid: int, events: int, first_stages: dict[str, Any] | None,
    last_stages: dict[str, Any] | None, before: CpuReading, after: CpuReading,
) -> CpuSplit | None:  # fmt: skip
    """The split over a window in which the worker ``pid`` received ``events``; the
    ``stage_cpu`` objects of the status reports that open and close the window."""
    if events <= 0:
        return None
    per_ns = 1 / (1000 * events)  # ns of the window -> µs per event
    total_ns = after.process_ns - before.process_ns
    threads: list[dict[str, Any]] = []
    main_proc_ns = 0
    others_ns = 0
    for tid, reading in sorted(after.threads.items()):
        earlier = before.threads.get(tid)
        used = reading.cpu_ns - (earlier.cpu_ns if earlier is not None else 0)
        if used <= 0:
            continue
        threads.append({"tid": tid, "name": reading.name, "us": round(used * per_ns, 3)})
        if tid == pid:
            main_proc_ns = used
        else:
            others_ns += used
    per_event: dict[str, float] = {"total": round(total_ns * per_ns, 3)}
    timed = first_stages is not None and last_stages is not None
    if first_stages is not None and last_stages is not None:
        main_ns = int(last_stages["thread_ns"]) - int(first_stages["thread_ns"])
        stages_ns = {
            stage: int(last_stages["stages_ns"].get(stage, 0))
            - int(first_stages["stages_ns"].get(stage, 0))
            for stage in STAGES
        }
    else:
        main_ns = main_proc_ns
        stages_ns = {}
    for stage, ns in stages_ns.items():
        per_event[stage] = round(ns * per_ns, 3)
    if timed:
        per_event["receive_and_loop"] = round((main_ns - sum(stages_ns.values())) * per_ns, 3)
    per_event["other_threads"] = round(others_ns * per_ns, 3)
    return CpuSplit(
        per_event_us=per_event,
        main_thread_us=round(main_ns * per_ns, 3),
        events=events,
        tick_us=round(NS_PER_TICK * per_ns, 3),
        threads=threads,
        stage_timing=timed,
    )
