"""The bench's report: the runs summed up (medians), the targets met or missed, and the
tables printed on stdout. The JSON report is ``summarize``'s dictionary as it is."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

from common.stage_cpu import STAGES
from tests.bench.figures import median, round_rate
from tests.bench.options import BenchOptions
from tests.bench.procstat import Pinning
from tests.bench.services import Services
from tests.bench.step import BACKLOG_GROWTH_S, KEEP_UP_FRACTION, MAX_LAG_P99_MS

# The per-stage table's rows after the stages, in order.
SPLIT_REST = ("receive_and_loop", "other_threads")
STAGE_LABELS = {
    "decode": "decode (frame -> records)",
    "quality": "quality checks",
    "event_build": "event build (id, JSON, COPY row)",
    "journal": "journal append",
    "pulsar": "Pulsar hand-over",
    "copy": "COPY rows",
    "redis": "Redis latest",
    "receipts": "receipts",
    "receive_and_loop": "receive + event loop (main thread less the stages)",
    "other_threads": "other threads (Pulsar client, journal syncs)",
}


@dataclass(frozen=True)
class Target:
    """One target of the benchmark: met when ``value`` is on the right side of ``limit``."""

    key: str
    name: str
    limit: float
    unit: str
    at_least: bool  # True: value >= limit; False: value <= limit ("under": strictly)
    strict: bool = False

    def judge(self, value: float | None, note: str = "") -> dict[str, Any]:
        sign = ">=" if self.at_least else ("<" if self.strict else "<=")
        met: bool | None = None
        if value is not None:
            if self.at_least:
                met = value >= self.limit
            else:
                met = value < self.limit if self.strict else value <= self.limit
        return {
            "key": self.key,
            "name": self.name,
            "target": f"{sign} {self.limit:g}{self.unit}",
            "value": value,
            "met": met,
            "note": note,
        }


RATIO = Target(
    "receive_decode_ratio", "receive + decode, ours / the official client, same run", 3.0,
    "x", at_least=True,
)  # fmt: skip
CPU_AT_STAGE_RATE = Target(
    "cpu_at_20000", "worker CPU per event at 20,000/s, end to end", 11.0, " µs", at_least=False
)
CPU_NATURAL = Target(
    "cpu_at_2000", "worker CPU per event at 2,000/s, natural frames", 25.0, " µs",
    at_least=False,
)  # fmt: skip
P99_AT_10K = Target(
    "receipt_p99_at_10000", "p99 provider -> Pulsar receipt at 10,000/s, worker alone on its "
    "core", 5.0, " ms", at_least=False, strict=True,
)  # fmt: skip


def _latency_entry(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the runs of one latency step's figures."""
    metrics = ("p50", "p99", "p999", "max")
    entry: dict[str, Any] = {m: median(s["receipt_ms"].get(m) for s in steps) for m in metrics}
    entry["consumer"] = {m: median(s["consumer_ms"].get(m) for s in steps) for m in metrics}
    entry["pulsar_round_trip"] = {
        m: median(s["pulsar_round_trip_ms"].get(m) for s in steps) for m in metrics
    }
    entry["received_events_per_s"] = median(s["received_per_s"] for s in steps)
    entry["kept_up_runs"] = sum(1 for s in steps if s["sustained"])
    entry["offered_per_run"] = [s["offered"] for s in steps]
    return entry


def _providers_entry(options: BenchOptions, runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Medians over the runs of the several-providers step; per run, the worst lane."""
    per_run = [r["providers_at_once"] for r in runs if r["providers_at_once"]]
    if not per_run:
        return None

    def worst(lanes: list[dict[str, Any]], key: str) -> float | None:
        values = [lane[key].get("p99") for lane in lanes]
        return None if None in values else max(values)

    return {
        "providers": len(per_run[0]),
        "offered_events_per_s_each": options.provider_rate,
        "kept_up_runs": sum(1 for lanes in per_run if all(lane["sustained"] for lane in lanes)),
        "received_events_per_s_total": median(
            sum(lane["received_per_s"] for lane in lanes) for lanes in per_run
        ),
        "receipt_p99_ms_worst_provider": median(worst(lanes, "receipt_ms") for lanes in per_run),
        "consumer_p99_ms_worst_provider": median(worst(lanes, "consumer_ms") for lanes in per_run),
        "worker_cpu_cores_total": median(
            sum(lane["cpu_cores"].get("worker", 0.0) for lane in lanes) for lanes in per_run
        ),
        "machine_cpu_cores": median(lanes[0]["cpu_cores"].get("machine") for lanes in per_run),
    }


def _split_entry(steps: list[dict[str, Any]]) -> tuple[dict[str, float] | None, dict[str, Any]]:
    """The per-stage split of the run whose total is the median (the lower one of two),
    whole: medians taken key by key would no longer add up. And that step's details."""
    measured = [s for s in steps if s.get("cpu_us_per_event")]
    details: dict[str, Any] = {
        "offered": steps[0]["offered"] if steps else None,
        "totals_per_run": [s["cpu_us_per_event"]["total"] for s in measured],
    }
    if not measured:
        return None, details
    chosen = sorted(measured, key=lambda s: s["cpu_us_per_event"]["total"])[
        (len(measured) - 1) // 2
    ]
    details.update(
        {
            "run": steps.index(chosen) + 1,
            "events_per_frame": chosen["events_per_frame"],
            "received_per_s": chosen["received_per_s"],
            "kept_up": chosen["sustained"],
            "window_s": chosen["window_s"],
            **(chosen["cpu_split"] or {}),
        }
    )
    return chosen["cpu_us_per_event"], details


def pinning_entry(pinning: Pinning, services: Services) -> dict[str, Any]:
    if not pinning.active:
        why = f"{os.cpu_count()} core(s) available" if (os.cpu_count() or 1) < 2 else "--no-pin"
        return {"active": False, "note": f"not pinned ({why})"}
    shared = ["the bench and its consumers", "the simulators", "the replay source"]
    shared += [f"embedded {name}" for name in services.embedded]
    note = (
        f"worker alone on CPU {pinning.worker_cpu}; {', '.join(shared)} on CPU {pinning.other_cpu}"
    )
    if services.external:
        note += f"; not pinned (not started by the bench): {', '.join(services.external)}"
    note += (
        "; in the several-providers step the workers run on every core; the side-by-side "
        "pins its own server and clients (see its note)"
    )
    return {
        "active": True,
        "worker_cpu": pinning.worker_cpu,
        "other_cpu": pinning.other_cpu,
        "on_other_cpu": shared,
        "not_pinned": list(services.external),
        "note": note,
    }


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The four targets, each with its value (None: the step did not run) and verdict."""
    out = []
    compared = report.get("side_by_side") or {}
    ratio = compared.get("ratio")
    out.append(RATIO.judge(ratio, "" if ratio is not None else str(compared.get("note", ""))))
    for target, key, step_key, rate in (
        (CPU_AT_STAGE_RATE, "cpu_us_per_event", "stage_cpu_step", 20_000),
        (CPU_NATURAL, "cpu_us_per_event_at_2000", "stage_cpu_step_at_2000", 2_000),
    ):
        split, step = report.get(key), report.get(step_key) or {}
        if split is None or step.get("offered") != rate:
            offered = step.get("offered")
            note = f"the step ran at {offered:,}/s" if split is not None and offered else ""
            out.append(target.judge(None, note))
            continue
        entry = target.judge(split["total"])
        if not step.get("kept_up"):
            entry["met"] = False
            entry["note"] = "the worker did not keep up with the offered rate"
        out.append(entry)
    at_10k = report["latency_ms"].get("10000")
    pinned = report["pinning"]["active"]
    if at_10k is None or not pinned:
        note = "" if at_10k is None else "the worker was not alone on a core"
        out.append(P99_AT_10K.judge(None, note))
    else:
        entry = P99_AT_10K.judge(
            at_10k["p99"], "from the worker's histogram, which runs from Polygon's t: up to "
            "1 ms pessimistic"
        )  # fmt: skip
        out.append(entry)
    return out


def summarize(
    options: BenchOptions, runs: list[dict[str, Any]], services: Services, pinning: Pinning,
    side_by_side: dict[str, Any] | None,
) -> dict[str, Any]:  # fmt: skip
    max_rate = median(r["max_sustained_events_per_s"] for r in runs) or 0.0
    baseline = median(r["baseline"]["events_per_s"] for r in runs) or 0.0
    rate80 = median(r["rate_at_80pct_of_max"] for r in runs)
    at_max = [r["at_max"] for r in runs if r["at_max"] is not None]
    latency: dict[str, Any] = {}
    for rate in options.latency_rates:
        steps = [r["latency"][str(rate)] for r in runs if str(rate) in r["latency"]]
        latency[str(rate)] = _latency_entry(steps)
    key80 = str(round_rate(rate80)) if rate80 else None
    if key80 is not None and key80 not in latency:
        steps = [r["latency"][str(r["rate_at_80pct_of_max"])] for r in runs
                 if r["rate_at_80pct_of_max"]]  # fmt: skip
        latency[key80] = _latency_entry(steps)
    cores_at_max = {
        k: median(s["cpu_cores"].get(k) for s in at_max)
        for k in (at_max[0]["cpu_cores"] if at_max else {})
    }
    split, split_step = _split_entry([r["stage_cpu"] for r in runs])
    natural, natural_step = _split_entry([r["stage_cpu_natural"] for r in runs])
    report: dict[str, Any] = {
        "max_sustained_events_per_s": max_rate,
        "baseline_events_per_s": baseline,
        "pipeline_to_baseline_ratio": round(max_rate / baseline, 4) if baseline else None,
        "rate_at_80pct_of_max": key80,
        "latency_ms": latency,
        "cpu_s_per_million_events": median(s["cpu_s_per_million_events"] for s in at_max),
        "peak_rss_mb": median(s["peak_rss_mb"] for s in at_max),
        "cpu_cores_at_max": cores_at_max,
        "cpu_us_per_event": split,
        "stage_cpu_step": split_step,
        "cpu_us_per_event_at_2000": natural,
        "stage_cpu_step_at_2000": natural_step,
        "side_by_side": side_by_side,
        "pinning": pinning_entry(pinning, services),
        "providers_at_once": _providers_entry(options, runs),
        "symbols": options.symbols,
        "events_per_frame": options.events_per_frame,
        "runs": options.runs,
        "quick": options.quick,
        "windows_s": {
            "warmup": options.windows.warmup_s,
            "probe": options.windows.probe_s,
            "sustain": options.windows.sustain_s,
            "baseline": options.windows.baseline_s,
        },
        "criteria": {
            "keep_up_fraction": KEEP_UP_FRACTION,
            "backlog_growth_s": BACKLOG_GROWTH_S,
            "max_lag_p99_ms": MAX_LAG_P99_MS,
        },
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "embedded_services": services.embedded,
        "max_capped_by_ramp": any(r["max_capped_by_ramp"] for r in runs),
        "run_details": runs,
    }
    report["targets"] = targets(report)
    return report


def _n(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def render_stage_table(report: dict[str, Any]) -> list[str]:
    columns = [
        (report["cpu_us_per_event"], report["stage_cpu_step"]),
        (report["cpu_us_per_event_at_2000"], report["stage_cpu_step_at_2000"]),
    ]

    def head(step: dict[str, Any]) -> str:
        if step.get("offered") is None:
            return "-"
        frames = step.get("events_per_frame")
        return f"{step['offered']:,}/s" + (f", {frames} events/frame" if frames else "")

    lines = [
        "Worker CPU per event in µs, by stage (thread CPU time, not wall time; stages timed "
        "by the worker, the process and its other threads from /proc):",
        "",
        f"| | {head(columns[0][1])} | {head(columns[1][1])} |",
        "|---|---:|---:|",
    ]
    for key in ("total", *STAGES, *SPLIT_REST):
        label = STAGE_LABELS.get(key, "total (the whole process)")
        cells = [_n(split.get(key), 2) if split else "-" for split, _ in columns]
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    cells = [_n(step.get("main_thread_us"), 2) for _, step in columns]
    lines.append(f"| main thread (= the stages + receive and loop) | {cells[0]} | {cells[1]} |")
    cells = [
        f"{_n(step.get('received_per_s'))}/s, " + ("kept up" if step.get("kept_up") else "MISSED")
        if step.get("received_per_s") is not None
        else "-"
        for _, step in columns
    ]
    lines.append(f"| received; kept up | {cells[0]} | {cells[1]} |")
    cells = [f"±{_n(step.get('tick_us'), 2)}" for _, step in columns]
    lines.append(f"| precision of the /proc figures | {cells[0]} | {cells[1]} |")
    return lines


def render_side_by_side(compared: dict[str, Any] | None) -> list[str]:
    if compared is None:
        return ["Side by side: not measured (tests/bench/side_by_side.py could not be loaded)."]
    ratio, cpu_ratio = compared.get("ratio"), compared.get("cpu_ratio")
    return [
        "Receive + decode, side by side against the same replay source:",
        "",
        "| | official massive client (run, with models) | ours (PolygonAdapter) | ratio |",
        "|---|---:|---:|---:|",
        f"| events/s | {_n(compared.get('official_events_per_s'))} "
        f"| {_n(compared.get('ours_events_per_s'))} "
        f"| {'-' if ratio is None else f'{ratio:.2f}'} (ours / official) |",
        f"| CPU µs per event | {_n(compared.get('official_cpu_us_per_event'), 2)} "
        f"| {_n(compared.get('ours_cpu_us_per_event'), 2)} "
        f"| {'-' if cpu_ratio is None else f'{cpu_ratio:.2f}'} (official / ours) |",
        "",
        f"({compared.get('note', '')})",
    ]


def render_targets(report: dict[str, Any]) -> list[str]:
    lines = ["| target | | value | result |", "|---|---|---:|---|"]
    for t in report["targets"]:
        verdict = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        if t["note"]:
            verdict += f" ({t['note']})"
        lines.append(f"| {t['name']} | {t['target']} | {_n(t['value'], 2)} | {verdict} |")
    return lines


def render_table(report: dict[str, Any]) -> str:
    n = _n
    runs = report["runs"]
    lines = [
        f"## feedfleet bench: {report['symbols']} symbols, {report['events_per_frame']} "
        f"events/frame, median of {runs} run{'s' if runs != 1 else ''}"
        f"{' (quick)' if report['quick'] else ''}",
        "",
        f"Pinning: {report['pinning']['note']}.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| max sustained throughput | {n(report['max_sustained_events_per_s'])} events/s"
        f"{' (ramp cap)' if report['max_capped_by_ramp'] else ''} |",
        f"| baseline: WebSocket receive + JSON parse | {n(report['baseline_events_per_s'])} "
        "events/s |",
        f"| full pipeline / baseline | {n(report['pipeline_to_baseline_ratio'], 3)} |",
        f"| worker CPU per million events (at max) | {n(report['cpu_s_per_million_events'], 1)}"
        " s |",
        f"| worker peak RSS (at max) | {n(report['peak_rss_mb'], 1)} MB |",
        f"| CPU cores busy at max, of {report['machine']['cpus']} | "
        + ", ".join(f"{k} {v:.2f}" for k, v in report["cpu_cores_at_max"].items() if v is not None)
        + " |",
    ]
    multi = report.get("providers_at_once")
    if multi:
        lines.append(
            f"| {multi['providers']} providers at once, "
            f"{n(multi['offered_events_per_s_each'])} events/s each | kept up in "
            f"{multi['kept_up_runs']}/{runs} runs, "
            f"{n(multi['received_events_per_s_total'])} events/s received in all; worst "
            f"provider's p99 {n(multi['receipt_p99_ms_worst_provider'], 2)} ms to receipt, "
            f"{n(multi['consumer_p99_ms_worst_provider'], 2)} ms to the consumer; workers "
            f"{n(multi['worker_cpu_cores_total'], 2)} cores, machine "
            f"{n(multi['machine_cpu_cores'], 2)} |"
        )
    lines += [
        "",
        "Latency in ms: provider -> Pulsar receipt in the worker, measured from each event's "
        "Polygon time t (ms, floored: up to 1 ms pessimistic), and provider -> the consumer, "
        "from each trade's send stamp in i (ns); and the part of the receipt time from "
        "handing the event to the Pulsar client to its receipt (batching, network, broker).",
        "",
        "| offered events/s | kept up | receipt p50 | p99 | p99.9 | max "
        "| consumer p50 | p99 | p99.9 | max | Pulsar round trip p50 | p99 |",
        "|---:|:---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, e in report["latency_ms"].items():
        c, rt = e["consumer"], e["pulsar_round_trip"]
        label = n(float(key))
        if key == str(report.get("rate_at_80pct_of_max")):
            label += " (80% of max)"
        lines.append(
            f"| {label} | {e['kept_up_runs']}/{runs} | {n(e['p50'], 2)} | {n(e['p99'], 2)} "
            f"| {n(e['p999'], 2)} | {n(e['max'], 2)} | {n(c['p50'], 2)} | {n(c['p99'], 2)} "
            f"| {n(c['p999'], 2)} | {n(c['max'], 2)} | {n(rt['p50'], 2)} | {n(rt['p99'], 2)} |"
        )
    lines += ["", *render_stage_table(report)]
    lines += ["", *render_side_by_side(report.get("side_by_side"))]
    lines += ["", "Targets:", "", *render_targets(report)]
    return "\n".join(lines)
