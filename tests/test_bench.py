"""`python -m tests.bench --quick` end to end with tiny windows, so the benchmark never rots.

Only the shape and the consistency of the report are checked, never a timing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.bench.runner import round_rate

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _ordered(figures: dict[str, Any]) -> None:
    values = [figures[k] for k in ("p50", "p99", "p999", "max")]
    assert all(isinstance(v, float) and v > 0 for v in values), figures
    assert values == sorted(values), figures


@pytest.mark.timeout(300)
def test_quick_bench_reports_consistent_figures(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable, "-m", "tests.bench", "--quick", "--json", str(out),
            "--symbols", "20", "--events-per-frame", "10", "--work-dir", str(tmp_path / "work"),
            # hidden: tiny windows, a two-step ramp, one fixed latency rate
            "--window-s", "1", "--ramp-start", "1000", "--ramp-max", "2000",
            "--latency-rates", "1000", "--providers", "2", "--provider-rate", "500",
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
