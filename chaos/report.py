"""A chaos run's results: per fault and overall, against the targets, as JSON and a table."""

from __future__ import annotations

import itertools
import statistics
from dataclasses import dataclass
from typing import Any

from chaos.faults import DISCONNECTS, KINDS
from chaos.measure import (
    Accounting,
    Timeline,
    availability,
    count_in,
    duplicates,
    percentiles,
    symbol_outcome,
)
from chaos.observe import DbSeen, Seen

S = 1_000_000_000
FLOWING_NS = 2 * S  # "served again": still ticking this close to the window's end
DUPLICATE_WITHIN_NS = S // 2
# Records in flight at a fault were sent just before it: attribute by this much earlier.
ATTRIBUTE_EARLY_NS = S
HANDOVER_LIMIT_MS = 2000.0
FAILBACK_LIMIT_MS = 500.0
AVAILABILITY_TARGET = 0.99
HAND_OVER_ROWS = ("FAILOVER", "FAILBACK")  # provider_connections statuses of a hand-over


@dataclass(frozen=True)
class FaultRun:
    kind: str
    target: str
    t0: int  # injected
    recovered: int  # cleared (t0 for a kill)
    t1: int  # the window's end: the next fault, or the run's end
    settled_s: float | None  # from clearing to every symbol on the primary again (None: not)


@dataclass(frozen=True)
class RunFacts:
    """What the report is computed from, besides the observations."""

    minutes: float
    quick: bool
    symbols: list[str]
    providers: list[dict[str, Any]]  # name, priority, symbol_format, failover_symbols
    primary: str
    primary_id: str
    events_per_symbol_s: float
    failover_grace_s: float
    failback_hold_s: float
    fresh_s: float
    t_ready: int
    t_end: int


def _ms(values: list[int]) -> dict[str, float | None]:
    return {k: None if v is None else round(v / 1e6, 1) for k, v in percentiles(values).items()}


def _first_after(times: list[int], t0: int, t1: int) -> float | None:
    found = [t for t in times if t0 <= t < t1]
    return round((min(found) - t0) / S, 3) if found else None


def fault_entry(
    run: FaultRun, facts: RunFacts, lines: dict[str, Timeline], seen: Seen, db: DbSeen,
    acc: Accounting, priority: dict[str, int],
) -> dict[str, Any]:  # fmt: skip
    t0, t1 = run.t0, run.t1
    outcomes = {
        s: symbol_outcome(lines.get(s, []), t0, run.recovered, t1, facts.primary, FLOWING_NS)
        for s in facts.symbols
    }
    handover = [o.handover_gap_ns for o in outcomes.values() if o.handover_gap_ns is not None]
    failback = [o.failback_gap_ns for o in outcomes.values() if o.failback_gap_ns is not None]
    if run.kind == "coordinator_kill":
        before = [pid for at, pid in db.lock_holders if at < t0]
        old = before[-1] if before else None
        detect = _first_after(
            [at for at, pid in db.lock_holders if pid is not None and pid != old], t0, t1
        )
    else:
        hand_overs = [
            c.at_ns for c in db.connections
            if c.status in HAND_OVER_ROWS and c.provider_id == facts.primary_id
        ]  # fmt: skip
        detect = _first_after([c.at_ns for c in db.assignment_changes] + hand_overs, t0, t1)
    trouble = [
        c.at_ns for c in db.connections
        if c.provider_id == facts.primary_id and c.status not in ("CONNECTED", *HAND_OVER_ROWS)
    ]  # fmt: skip
    noticed = _first_after(trouble, t0, t1)
    served_by: dict[str, int] = {}
    for points in lines.values():
        for p in points:
            if t0 <= p.at_ns < t1:
                served_by[p.provider] = served_by.get(p.provider, 0) + 1
    # The count standing at the fault, and each change inside its window.
    standing = [n for at, n in db.failover_subscriptions if at < t0][-1:]
    failover_subs = standing + [n for at, n in db.failover_subscriptions if t0 <= at < t1]
    lo, hi = t0 - ATTRIBUTE_EARLY_NS, t1 - ATTRIBUTE_EARLY_NS
    return {
        "kind": run.kind,
        "target": run.target,
        "what": KINDS[run.kind].what,
        "injected_at_s": round((t0 - facts.t_ready) / S, 1),
        "held_s": round((run.recovered - t0) / S, 1),
        "window_s": round((t1 - t0) / S, 1),
        "detect_s": detect,
        "worker_noticed_s": noticed,
        "handover_gap_ms": _ms(handover),
        "failback_gap_ms": _ms(failback) if failback else None,
        "failed_over_symbols": sum(1 for o in outcomes.values() if o.failed_over),
        "failed_back_symbols": len(failback),
        "served_again_symbols": sum(1 for o in outcomes.values() if o.served_again),
        "not_served_again": sorted(s for s, o in outcomes.items() if not o.served_again),
        "back_on_primary_s": run.settled_s,
        "served_by": dict(sorted(served_by.items())),
        "failover_flagged_events": count_in(seen.failover_flagged, t0, t1),
        "subscriptions_failover_max": max(failover_subs, default=None),
        "lost_events": count_in(acc.lost_at, lo, hi),
        "gap_events": count_in(acc.gap_at, lo, hi),
        "duplicate_events": sum(
            duplicates(lines.get(s, []), priority, DUPLICATE_WITHIN_NS, t0, t1)
            for s in facts.symbols
        ),
    }


def build(
    facts: RunFacts, runs: list[FaultRun], lines: dict[str, Timeline], seen: Seen, db: DbSeen,
    acc: Accounting, unmatched: dict[str, int], elapsed_s: float,
) -> dict[str, Any]:  # fmt: skip
    priority = {p["name"]: int(p["priority"]) for p in facts.providers}
    faults = [fault_entry(r, facts, lines, seen, db, acc, priority) for r in runs]
    first = runs[0].t0 if runs else facts.t_end
    baseline = []
    for s in facts.symbols:
        points = [p for p in lines.get(s, []) if facts.t_ready <= p.at_ns < first]
        baseline += [b.at_ns - a.at_ns for a, b in itertools.pairwise(points)]
    shares = {s: availability(lines.get(s, []), facts.t_ready, facts.t_end) for s in facts.symbols}
    values = [v for v in shares.values() if v is not None]
    report: dict[str, Any] = {
        "minutes": facts.minutes,
        "quick": facts.quick,
        "elapsed_s": round(elapsed_s, 1),
        "measured_s": round((facts.t_end - facts.t_ready) / S, 1),
        "providers": facts.providers,
        "symbols": facts.symbols,
        "events_per_symbol_s": facts.events_per_symbol_s,
        "failover_grace_s": facts.failover_grace_s,
        "failback_hold_s": facts.failback_hold_s,
        "fresh_s": facts.fresh_s,
        "baseline_gap_ms": _ms(baseline),
        "faults": faults,
        "availability": {
            "min": min(values, default=None),
            "median": statistics.median(values) if values else None,
            "window_s": 1,
            "per_symbol": shares,
        },
        "lost_events_total": acc.lost,
        "gap_events_total": acc.gap,
        "gap_flagged_total": acc.gap_flagged,
        "after_unsubscribe_total": acc.after_unsubscribe,
        "sent_events_total": acc.sent,
        "received_events_total": acc.received,
        "unmatched_received": unmatched,
        "lost_examples": [list(k) for k in acc.lost_examples],
        "pulsar": {
            "unique_events": len(seen.ticks) + seen.dead_lettered,
            "dead_lettered": seen.dead_lettered,
            "deliveries": seen.deliveries,
            "unreadable": seen.unreadable,
        },
        "database_polls": {"ok": db.polls, "failed": db.failed_polls},
    }
    report["targets"] = targets(report)
    report["checks"] = {
        "nothing_lost": acc.lost == 0,
        "served_again_after_each_fault": all(not f["not_served_again"] for f in faults),
    }
    return report


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    faults = report["faults"]

    def worst(kinds: tuple[str, ...], key: str) -> float | None:
        found = [f[key]["p99"] for f in faults
                 if f["kind"] in kinds and f[key] and f[key]["p99"] is not None]  # fmt: skip
        return max(found) if found else None

    def judged(name: str, measured: float | None, limit: float, unit: str, *,
               at_most: bool = True, note: str = "") -> dict[str, Any]:  # fmt: skip
        met = None if measured is None else (measured <= limit if at_most else measured >= limit)
        return {"target": name, "limit": limit, "unit": unit, "measured": measured, "met": met,
                "note": note}  # fmt: skip

    silent_limit = (report["failover_grace_s"] + 2.0) * 1000
    availability = report["availability"]["min"]
    return [
        judged("hand-over gap p99, provider disconnect or worker kill -9",
               worst(DISCONNECTS, "handover_gap_ms"), HANDOVER_LIMIT_MS, "ms"),
        judged("hand-over gap p99, silent provider", worst(("silent",), "handover_gap_ms"),
               silent_limit, "ms", note=f"grace {report['failover_grace_s']:g} s + 2 s"),
        judged("failback gap p99", worst(tuple(KINDS), "failback_gap_ms"), FAILBACK_LIMIT_MS,
               "ms", note="not measured: no symbol failed back" if not any(
                   f["failback_gap_ms"] for f in faults) else ""),
        judged("events lost", float(report["lost_events_total"]), 0.0, "events"),
        judged("availability per symbol (min)", availability, AVAILABILITY_TARGET, "share",
               at_most=False,
               note="" if report["minutes"] >= 10 and not report["quick"]
               else "the target is for a 10-minute run"),
    ]  # fmt: skip


def render(report: dict[str, Any]) -> str:
    def n(value: float | None, digits: int = 0) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    def gaps(g: dict[str, float | None] | None) -> str:
        if not g or g["p50"] is None:
            return "-"
        return f"{n(g['p50'])} / {n(g['p99'])} / {n(g['max'])}"

    providers = ", ".join(f"{p['name']} p{p['priority']}" for p in report["providers"])
    symbols = len(report["symbols"])
    lines = [
        f"## feedfleet chaos: {providers}; {symbols} symbols at "
        f"{report['events_per_symbol_s']:g} ticks/s each; {report['measured_s']:.0f} s measured"
        f"{' (quick)' if report['quick'] else ''}",
        "",
        f"Gaps are per symbol, between fresh events (provider time to consumer under "
        f"{report['fresh_s']:g} s) from any provider, as a Pulsar consumer saw them; "
        f"p50 / p99 / max over the {symbols} symbols. Baseline (before the first fault): "
        f"{gaps(report['baseline_gap_ms'])} ms.",
        "",
        "| fault | target | detect s | hand-over gap ms | failback gap ms | served again "
        "| served by | lost | gap | dup |",
        "|---|---|---:|---:|---:|:---:|---|---:|---:|---:|",
    ]
    for f in report["faults"]:
        by = ", ".join(f"{k} {v:,}" for k, v in f["served_by"].items()) or "-"
        lines.append(
            f"| {f['kind']} | {f['target']} | {n(f['detect_s'], 2)} "
            f"| {gaps(f['handover_gap_ms'])} | {gaps(f['failback_gap_ms'])} "
            f"| {f['served_again_symbols']}/{symbols} | {by} | {f['lost_events']} "
            f"| {f['gap_events']} | {f['duplicate_events']} |"
        )
    a = report["availability"]
    lines += [
        "",
        f"Availability (share of 1 s windows with a fresh event): min "
        f"{n(None if a['min'] is None else a['min'] * 100, 2)}%, median "
        f"{n(None if a['median'] is None else a['median'] * 100, 2)}%.",
        f"Events: {report['sent_events_total']:,} sent by the simulators, "
        f"{report['received_events_total']:,} reached Pulsar, {report['lost_events_total']:,} "
        f"lost, {report['gap_events_total']:,} gap (in flight on a connection that died; "
        f"{report['gap_flagged_total']:,} flagged by the fleet), "
        f"{report['after_unsubscribe_total']:,} sent after an unsubscribe.",
    ]
    unmatched = sum(report["unmatched_received"].values())
    if unmatched:
        lines.append(
            f"WARNING: {unmatched:,} events on Pulsar match nothing the simulators logged "
            f"({report['unmatched_received']}): the loss count cannot be trusted."
        )
    lines += ["", "| target | limit | measured | |", "|---|---:|---:|---|"]
    for t in report["targets"]:
        verdict = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        if t["note"]:
            verdict += f" ({t['note']})"
        digits = 4 if t["unit"] == "share" else 0
        lines.append(
            f"| {t['target']} | {n(t['limit'], digits)} {t['unit']} "
            f"| {n(t['measured'], digits)} | {verdict} |"
        )
    checks = report["checks"]
    lines += [
        "",
        "Checks: nothing lost between simulators and Pulsar: "
        f"{'PASS' if checks['nothing_lost'] else 'FAIL'}; every symbol served again after "
        f"each fault: {'PASS' if checks['served_again_after_each_fault'] else 'FAIL'}.",
    ]
    return "\n".join(lines)
