"""`python -m tests.bench --quick` end to end with tiny windows, so the benchmark never rots;
and the pieces of it that need no processes: the send stamp from simulator to consumer,
the per-stage CPU arithmetic, the quieted coordinator.

Only the shape and the consistency of the report are checked, never a timing.
"""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog

from common.codecs import polygon as codec
from common.events import build_events
from common.stage_cpu import STAGES
from simulators.polygon import stamp_send_time
from tests.bench.consumer import _SEND_STAMP
from tests.bench.figures import round_rate
from tests.bench.procstat import NS_PER_TICK, ThreadCpu
from tests.bench.runner import _coordinator_errors_only
from tests.bench.stages import CpuReading, split_cpu

ROOT = Path(__file__).resolve().parents[1]
SEND_NS = 1_767_225_600_123_456_789  # 2026-01-01T00:00:00.123456789Z


def test_the_send_stamp_travels_in_polygon_fields_to_the_consumer() -> None:
    events = [
        codec.trade_event("AAPL", 190.5, 100, 1_000, 1, trade_id="52983525029461"),
        codec.quote_event("AAPL", 190.4, 2, 190.6, 3, 1_000, 2),
    ]
    stamp_send_time(events, SEND_NS)
    frame = codec.decode_frame(codec.encode_events(events), SEND_NS + 5_000)
    assert not frame.errors
    trade, quote = frame.records
    # The trade: its id is the send time in ns, its time that in ms; the quote keeps its
    # own time and its indicators.
    assert trade.provider_specific["i"] == str(SEND_NS)
    assert trade.timestamp_ns == SEND_NS // 1_000_000 * 1_000_000
    assert quote.timestamp_ns == 1_000 * 1_000_000 and quote.provider_specific["i"] == []
    published = build_events(frame.records, SEND_NS + 9_000)
    stamps = [_SEND_STAMP.search(e.payload) for e in published]
    assert stamps[0] is not None and int(stamps[0].group(1)) == SEND_NS
    assert stamps[1] is None
    # The worker's provider -> receipt time runs from t: floored to the ms.
    assert published[0].origin_ns == SEND_NS // 1_000_000 * 1_000_000


def test_a_small_trade_id_is_no_send_stamp() -> None:
    events = [codec.trade_event("AAPL", 190.5, 100, 1_000, 1, trade_id="52983525029461")]
    frame = codec.decode_frame(codec.encode_events(events), SEND_NS)
    (event,) = build_events(frame.records, SEND_NS)
    assert _SEND_STAMP.search(event.payload) is None


def _stages(thread_ns: int, **stages_ns: int) -> dict[str, Any]:
    return {"thread_ns": thread_ns, "stages_ns": {s: stages_ns.get(s, 0) for s in STAGES}}


def test_the_cpu_split_differences_the_window_and_adds_up() -> None:
    pid, pulsar_io, syncer = 100, 101, 102
    tick = NS_PER_TICK
    before = CpuReading(
        process_ns=50 * tick,
        threads={pid: ThreadCpu("python", 40 * tick), pulsar_io: ThreadCpu("python", 10 * tick)},
    )
    # In the window: the main thread 30 ticks, the Pulsar thread 8, a thread started in it
    # 2; the process 40 in all.
    after = CpuReading(
        process_ns=90 * tick,
        threads={
            pid: ThreadCpu("python", 70 * tick), pulsar_io: ThreadCpu("python", 18 * tick),
            syncer: ThreadCpu("asyncio_0", 2 * tick),
        },
    )  # fmt: skip
    first = _stages(1_000_000, decode=100_000, event_build=300_000)
    last = _stages(1_000_000 + 300_000_000, decode=50_100_000, event_build=120_300_000)
    split = split_cpu(pid, 10_000, first, last, before, after)
    assert split is not None
    us = split.per_event_us
    assert us["total"] == 40 * tick / 1000 / 10_000
    assert us["decode"] == 5.0 and us["event_build"] == 12.0 and us["quality"] == 0.0
    # The main thread's 300 ms less the 170 ms of its stages.
    assert us["receive_and_loop"] == 13.0
    assert split.main_thread_us == 30.0
    assert us["other_threads"] == 10 * tick / 1000 / 10_000
    assert split.tick_us == tick / 1000 / 10_000
    assert [t["tid"] for t in split.threads] == [pid, pulsar_io, syncer]
    assert split.stage_timing
    assert split_cpu(pid, 0, first, last, before, after) is None


def test_without_stage_times_the_main_thread_comes_from_proc() -> None:
    pid, tick = 100, NS_PER_TICK
    before = CpuReading(10 * tick, {pid: ThreadCpu("python", 10 * tick)})
    after = CpuReading(30 * tick, {pid: ThreadCpu("python", 30 * tick)})
    split = split_cpu(pid, 1_000, None, None, before, after)
    assert split is not None and not split.stage_timing
    assert split.main_thread_us == 20 * tick / 1000 / 1_000
    assert set(split.per_event_us) == {"total", "other_threads"}


def test_only_the_coordinators_errors_are_logged() -> None:
    out = io.StringIO()
    saved = structlog.get_config()
    structlog.configure(
        processors=[_coordinator_errors_only, structlog.processors.KeyValueRenderer()],
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    log = structlog.get_logger()

    async def coordinator() -> None:
        log.warning("failover_impossible", symbols=["AAPL"])
        log.error("coordinator_broken")

    async def main() -> None:
        with structlog.contextvars.bound_contextvars(component="bench-coordinator"):
            task = asyncio.create_task(coordinator())
        log.warning("bench_warning")
        await task

    try:
        asyncio.run(main())
    finally:
        structlog.configure(**saved)
    lines = out.getvalue()
    assert "failover_impossible" not in lines
    assert "coordinator_broken" in lines and "bench_warning" in lines


def _ordered(figures: dict[str, Any]) -> None:
    values = [figures[k] for k in ("p50", "p99", "p999", "max")]
    assert all(isinstance(v, float) and v > 0 for v in values), figures
    assert values == sorted(values), figures


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_bench_reports_consistent_figures(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable, "-m", "tests.bench", "--quick", "--json", str(out),
            "--symbols", "20", "--events-per-frame", "10", "--work-dir", str(tmp_path / "work"),
            # hidden: tiny windows, a one-step ramp, one fixed latency rate
            "--window-s", "1", "--ramp-start", "1000", "--ramp-max", "1000",
            "--latency-rates", "1000", "--providers", "2", "--provider-rate", "500",
            "--stage-rate", "2000",
        ],
        cwd=ROOT, capture_output=True, timeout=280,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    assert b"max sustained throughput" in proc.stdout
    report = orjson.loads(out.read_bytes())

    for key in (
        "max_sustained_events_per_s", "baseline_events_per_s", "latency_ms",
        "cpu_s_per_million_events", "peak_rss_mb", "symbols", "events_per_frame", "runs",
        "rate_at_80pct_of_max", "pipeline_to_baseline_ratio", "cpu_cores_at_max",
        "cpu_us_per_event", "cpu_us_per_event_at_2000", "side_by_side", "pinning", "targets",
    ):  # fmt: skip
        assert key in report, key
    assert report["symbols"] == 20
    assert report["events_per_frame"] == 10
    assert report["runs"] == 1
    assert report["baseline_events_per_s"] > 0

    (run,) = report["run_details"]
    # Each provider of the step ran its own worker and stored under its own name.
    lanes = run["providers_at_once"]
    assert [lane["label"].rsplit(" ", 1)[1] for lane in lanes] == ["bench", "bench-2"]
    for step in run["steps"] + lanes:
        # Nothing lost, whether the step kept up or not (a busy machine may miss the
        # offered rate, which is no fault): every event received was published, stored
        # (and is in the table), reached the consumer, and none is left in the journal.
        assert step["received"] > 0, step
        assert step["received"] == step["published"] == step["stored"], step
        assert step["stored_rows"] == step["stored"], step
        assert step["consumed_unique"] == step["received"], step
        assert step["spooled_end"] == 0, step
        assert step["received_per_s"] > 0
        assert step["receipt_ms"]["count"] > 0 and step["consumer_ms"]["count"] > 0
        # Every acknowledged event has both times.
        assert step["pulsar_round_trip_ms"]["count"] == step["receipt_ms"]["count"], step
        # A verdict always says why it missed.
        assert step["sustained"] == (not step["reasons"]), step

    latency = report["latency_ms"]
    assert "1000" in latency
    for entry in latency.values():
        _ordered(entry)
        _ordered(entry["consumer"])
        _ordered(entry["pulsar_round_trip"])
        # The round trip is a part of the provider -> receipt time.
        assert entry["pulsar_round_trip"]["p50"] <= entry["p50"], entry

    multi = report["providers_at_once"]
    assert multi["providers"] == 2 and multi["offered_events_per_s_each"] == 500
    assert multi["received_events_per_s_total"] > 0

    # The figures at the maximum exist exactly when some rate was kept up with; which
    # rate that is depends on the machine.
    max_rate = report["max_sustained_events_per_s"]
    assert run["max_sustained_events_per_s"] == max_rate
    at_max = run["at_max"]
    if max_rate:
        assert at_max["sustained"] and at_max["offered"] == max_rate
        assert report["pipeline_to_baseline_ratio"] == round(
            max_rate / report["baseline_events_per_s"], 4
        )
        assert report["cpu_s_per_million_events"] > 0
        assert report["peak_rss_mb"] > 0
        assert set(report["cpu_cores_at_max"]) >= {"worker", "simulator", "machine"}
        rate80 = report["rate_at_80pct_of_max"]
        assert rate80 == str(round_rate(0.8 * max_rate)) and rate80 in latency
    else:
        assert at_max is None and report["rate_at_80pct_of_max"] is None
        assert report["pipeline_to_baseline_ratio"] == 0
        assert report["cpu_s_per_million_events"] is None and report["peak_rss_mb"] is None
        assert report["cpu_cores_at_max"] == {}

    _check_cpu_split(report["cpu_us_per_event"], report["stage_cpu_step"], offered=2000)
    _check_cpu_split(
        report["cpu_us_per_event_at_2000"], report["stage_cpu_step_at_2000"], offered=2000
    )
    assert report["stage_cpu_step_at_2000"]["events_per_frame"] == 10  # the simulator's own
    assert run["stage_cpu"] in run["steps"] and run["stage_cpu_natural"] in run["steps"]
    assert "by stage" in proc.stdout.decode()

    # The side by side: ratio = ours / official whenever both ran.
    compared = report["side_by_side"]
    assert compared is not None and compared["ours_events_per_s"] > 0, compared
    official = compared["official_events_per_s"]
    if official is not None:
        assert compared["ratio"] == compared["ours_events_per_s"] / official
    else:
        assert compared["ratio"] is None

    two_cores = len(os.sched_getaffinity(0)) >= 2
    assert report["pinning"]["active"] == two_cores
    if two_cores:
        assert report["pinning"]["worker_cpu"] != report["pinning"]["other_cpu"]

    targets = {t["key"]: t for t in report["targets"]}
    assert set(targets) == {
        "receive_decode_ratio", "cpu_at_20000", "cpu_at_2000", "receipt_p99_at_10000",
    }  # fmt: skip
    for t in targets.values():
        assert (t["value"] is None) == (t["met"] is None), t
    assert targets["receive_decode_ratio"]["value"] == compared["ratio"]
    # At 2,000/s: measured; at 20,000/s and 10,000/s: not in this run.
    natural = targets["cpu_at_2000"]
    assert natural["value"] == report["cpu_us_per_event_at_2000"]["total"]
    kept_up = report["stage_cpu_step_at_2000"]["kept_up"]
    assert natural["met"] == (natural["value"] <= 25 and kept_up)
    assert targets["cpu_at_20000"]["value"] is None
    assert targets["receipt_p99_at_10000"]["value"] is None
    assert "Targets:" in proc.stdout.decode()


def _check_cpu_split(split: dict[str, float], step: dict[str, Any], *, offered: int) -> None:
    """Every figure a number >= 0; the stages and the rest of the main thread add up to
    it; the whole process is no less than its main thread (to /proc's precision)."""
    assert step["offered"] == offered and step["stage_timing"], step
    assert set(split) == {"total", *STAGES, "receive_and_loop", "other_threads"}, split
    assert all(isinstance(v, float | int) and v >= 0 for v in split.values()), split
    main = step["main_thread_us"]
    parts = sum(split[s] for s in STAGES) + split["receive_and_loop"]
    assert parts == pytest.approx(main, abs=0.001 * (len(STAGES) + 2)), (split, step)
    assert split["total"] + step["tick_us"] >= main, (split, step)
    assert split["decode"] > 0 and split["event_build"] > 0, split


def test_the_hot_path_measure_times_every_stage_of_every_event() -> None:
    from tests.bench import hot_path

    data = hot_path.frames(4)
    assert len(data) == 4 and all(len(orjson.loads(f)) == 50 for f in data)
    figures = hot_path.measure(data, runs=1)
    assert set(figures) == {"decode", "quality", "event_build"}
    assert all(isinstance(v, float) and v > 0 for v in figures.values()), figures
