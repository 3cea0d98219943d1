"""What the kernel says about the processes the bench runs: CPU time per process and per
thread, peak memory, the machine's busy time, and pinning to cores (all from ``/proc`` and
``sched_setaffinity``; Linux only, as the bench is)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

_CLK_TCK = os.sysconf("SC_CLK_TCK")
NS_PER_TICK = 1_000_000_000 // _CLK_TCK


def _stat_ticks(path: str) -> int:
    """utime + stime, in clock ticks, of a ``stat`` file (a process's or one thread's)."""
    with open(path, "rb") as f:
        data = f.read()
    # The name in parentheses may hold spaces: the fields start after the last ')'.
    fields = data[data.rindex(b")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads, the ended ones included), from /proc."""
    return _stat_ticks(f"/proc/{pid}/stat") / _CLK_TCK


def process_cpu_ns(pid: int) -> int:
    """As ``cpu_seconds``, in ns (a whole number of clock ticks)."""
    return _stat_ticks(f"/proc/{pid}/stat") * NS_PER_TICK


@dataclass(frozen=True)
class ThreadCpu:
    """One thread's name (``comm``: what it called itself, at most 15 characters) and CPU."""

    name: str
    cpu_ns: int


def threads_cpu_ns(pid: int) -> dict[int, ThreadCpu]:
    """Every live thread of ``pid``, by thread id: its name and utime + stime in ns."""
    out: dict[int, ThreadCpu] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tids:
        # A thread may end between the listing and the reads: it is left out.
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            ticks = _stat_ticks(f"/proc/{pid}/task/{tid}/stat")
            out[int(tid)] = ThreadCpu(name, ticks * NS_PER_TICK)
    return out


def machine_busy_seconds() -> float:
    """CPU time all cores spent not idle since boot (to show how loaded the machine was)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:9]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / _CLK_TCK


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


@dataclass(frozen=True)
class Pinning:
    """Which core the worker gets and which one everything else the bench starts shares.

    None for both when the machine (or this process's CPU set) has fewer than two cores,
    or when pinning was turned off.
    """

    worker_cpu: int | None
    other_cpu: int | None
    all_cpus: frozenset[int] = frozenset()  # what this process could run on at the start

    @classmethod
    def plan(cls, enabled: bool) -> Pinning:
        allowed = sorted(os.sched_getaffinity(0))
        if not enabled or (os.cpu_count() or 1) < 2 or len(allowed) < 2:
            return cls(None, None, frozenset(allowed))
        return cls(worker_cpu=allowed[1], other_cpu=allowed[0], all_cpus=frozenset(allowed))

    @property
    def active(self) -> bool:
        return self.worker_cpu is not None

    def pin_self(self) -> None:
        """This process onto the shared core: every process and thread it starts from now
        on inherits that (the embedded services, the simulators, its consumers)."""
        if self.other_cpu is not None:
            pin_process(os.getpid(), {self.other_cpu})

    def pin_worker(self, pid: int) -> None:
        if self.worker_cpu is not None:
            pin_process(pid, {self.worker_cpu})

    def unpin(self, pid: int) -> None:
        """``pid`` back onto every core (it inherited the shared one from this process)."""
        if self.worker_cpu is not None:
            pin_process(pid, set(self.all_cpus))


def pin_process(pid: int, cpus: set[int]) -> None:
    """Every thread ``pid`` has now onto ``cpus``; threads it starts later inherit it."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return
    for tid in tids:
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(tid, cpus)
