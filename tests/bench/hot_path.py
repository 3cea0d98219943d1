"""The worker's per-event Python stages in-process, without sockets: decode, quality, build.

``python -m tests.bench.hot_path [--frames N] [--runs N]`` decodes the same pre-encoded
Polygon frames as the replay source (trades and quotes over 500 symbols, 50 a frame), checks
them and builds their events, keeping every output as the worker does until the sinks have
them, and prints the thread CPU per event of each stage (median of the runs) as JSON.

This is how each change to the hot path was measured: run it in a checkout of the code
before the change and in one after, alternating, and compare the medians (a worktree
imports its own code when run from its root: ``cd /tmp/before && python -m
tests.bench.hot_path``). Thread CPU time leaves out waiting, but not a busy machine's
effect on caches: compare runs made one after the other, not across days.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import orjson

from common.codecs import polygon as codec
from common.events import build_events
from common.quality import QualityChecker
from simulators.market import PriceWalk, symbol_universe
from simulators.polygon import tick_event


def frames(count: int, symbols: int = 500, per_frame: int = 50) -> list[bytes]:
    names = symbol_universe(symbols)
    walk = PriceWalk(names)
    targets = [(ev, s) for ev in ("T", "Q") for s in names]
    out: list[bytes] = []
    rr = 0
    for _ in range(count):
        now_ms = time.time_ns() // 1_000_000
        events = []
        for _ in range(per_frame):
            ev, sym = targets[rr % len(targets)]
            rr += 1
            event, _ = tick_event(walk, ev, sym, now_ms)
            events.append(event)
        out.append(orjson.dumps(events))
    return out


def measure(data: list[bytes], runs: int) -> dict[str, float]:
    """Median µs of thread CPU per event for each stage."""
    # As the worker runs: startup objects frozen, young collections rare (and as they
    # were afterwards, for a caller that goes on).
    threshold = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    try:
        return _measure(data, runs)
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


def _measure(data: list[bytes], runs: int) -> dict[str, float]:
    per_stage: dict[str, list[float]] = {"decode": [], "quality": [], "event_build": []}
    for _ in range(runs):
        checker = QualityChecker()
        t0 = time.thread_time_ns()
        decoded = [codec.decode_frame(f, time.time_ns(), "bench").records for f in data]
        t1 = time.thread_time_ns()
        for records in decoded:
            checker.check(records)
        t2 = time.thread_time_ns()
        events = [build_events(records, time.time_ns(), []) for records in decoded]
        t3 = time.thread_time_ns()
        count = sum(len(e) for e in events)
        for stage, ns in (("decode", t1 - t0), ("quality", t2 - t1), ("event_build", t3 - t2)):
            per_stage[stage].append(ns / count / 1000)
        del decoded, events
        gc.collect()
    return {stage: round(statistics.median(v), 3) for stage, v in per_stage.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=200, help="frames of 50 events (200)")
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args(argv)
    print(orjson.dumps(measure(frames(args.frames), args.runs)).decode())


if __name__ == "__main__":
    main()
