"""One measurement step's record and verdict: what the worker's status reports said, what
the step measured, and whether the worker kept up.

"Kept up" means, over the window: received at least 95% of the offered rate, nothing
spooled, no growing backlog, not running behind (receipt p99 under a second); and, once
the step drained, nothing lost (received == published == stored == rows == unique ids
consumed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

# "Keeps up": the worker received at least this share of the offered rate over the window.
KEEP_UP_FRACTION = 0.95
# "No growing backlog": received - min(published, stored) grew by less than this many
# seconds' worth of the offered rate between the start and the end of the window.
BACKLOG_GROWTH_S = 0.5
# "Keeps up" also means not running behind: a worker that reads at the offered rate but a
# second late (a backlog from its start it never works off) is at its limit, not under it.
MAX_LAG_P99_MS = 1000.0


@dataclass(frozen=True)
class Sample:
    """One ``provider:{id}:status`` document, the parts the bench reads."""

    at: float  # the worker's clock when it wrote the status (epoch seconds)
    status: str
    subscribed: int
    received: int
    published: int
    stored: int
    spooled: int
    hdr: str | None  # provider -> Pulsar receipt, since the worker started
    round_trip_hdr: str | None  # handed to the Pulsar client -> receipt, since start
    # FEEDFLEET_STAGE_CPU=1: {"thread_ns": n, "stages_ns": {stage: n}}, since start
    stage_cpu: dict[str, Any] | None = None

    @classmethod
    def parse(cls, raw: bytes | str) -> Sample:
        doc = orjson.loads(raw)
        m = doc["metrics"]
        return cls(
            at=datetime.fromisoformat(doc["last_update"]).timestamp(),
            status=str(doc["status"]),
            subscribed=int(doc["subscribed_symbols"]),
            received=int(m["received"]),
            published=int(m["published"]),
            stored=int(m["stored"]),
            spooled=int(m["spooled"]),
            hdr=m.get("provider_to_receipt_hdr"),
            round_trip_hdr=m.get("pulsar_round_trip_hdr"),
            stage_cpu=m.get("stage_cpu"),
        )

    @property
    def backlog(self) -> int:
        return self.received - min(self.published, self.stored)


@dataclass
class StepResult:
    label: str
    offered: int
    window_s: float
    # events per frame the simulator sent (its own default in the natural-frames step)
    events_per_frame: int = 0
    sustained: bool = False
    reasons: list[str] = field(default_factory=list)
    received_per_s: float = 0.0
    received: int = 0
    published: int = 0
    stored: int = 0
    stored_rows: int = 0
    consumed_unique: int = 0
    consumer_deliveries: int = 0
    spooled_max: int = 0
    # events still waiting in the journal for a sink once the step drained (0: none left)
    spooled_end: int = 0
    backlog_start: int = 0
    backlog_end: int = 0
    # provider -> receipt p99 of the events acknowledged within the window itself
    window_receipt_p99_ms: float | None = None
    # events received but not yet acknowledged by each sink, at the end of the window
    lag_at_window_end: dict[str, int] = field(default_factory=dict)
    cpu_s_per_million_events: float | None = None
    cpu_cores: dict[str, float] = field(default_factory=dict)
    # the per-stage CPU steps: the worker's CPU per event in the window (stages.CpuSplit)
    cpu_us_per_event: dict[str, float] | None = None
    cpu_split: dict[str, Any] | None = None
    peak_rss_mb: float | None = None
    receipt_ms: dict[str, float | None] = field(default_factory=dict)
    # the part of receipt_ms from handing an event to the Pulsar client to its receipt
    pulsar_round_trip_ms: dict[str, float | None] = field(default_factory=dict)
    consumer_ms: dict[str, float | None] = field(default_factory=dict)
    elapsed_s: float = 0.0
    worker_exit_code: int | None = None
    phases_s: dict[str, float] = field(default_factory=dict)

    def phase(self, name: str, since: float) -> float:
        now = time.monotonic()
        self.phases_s[name] = round(now - since, 2)
        return now

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def summary(self) -> str:
        verdict = "kept up" if self.sustained else "MISSED (" + "; ".join(self.reasons) + ")"
        p99 = self.receipt_ms.get("p99")
        cp99 = self.consumer_ms.get("p99")
        cpu = self.cpu_us_per_event
        per_event = f", worker {cpu['total']:.2f} µs/event" if cpu else ""
        return (
            f"{self.label} {self.offered:>7,} ev/s offered, {self.window_s:g}s window: "
            f"received {self.received_per_s:,.0f}/s, cpu/M {fmt(self.cpu_s_per_million_events)}"
            f" s{per_event}, receipt p99 {fmt(p99)} ms, consumer p99 {fmt(cp99)} ms "
            f"-> {verdict}"
        )


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def judge_window(r: StepResult) -> None:
    """Why the window missed, if it did: appended to ``r.reasons``."""
    reasons = r.reasons
    if r.received_per_s < KEEP_UP_FRACTION * r.offered:
        reasons.append(f"received {r.received_per_s:,.0f}/s < {KEEP_UP_FRACTION:.0%} of offered")
    if r.spooled_max > 0:
        reasons.append(f"spooled up to {r.spooled_max:,} events")
    growth = r.backlog_end - r.backlog_start
    if growth > BACKLOG_GROWTH_S * r.offered:
        reasons.append(f"backlog grew {r.backlog_start:,} -> {r.backlog_end:,}")
    lag = r.window_receipt_p99_ms
    if lag is not None and lag > MAX_LAG_P99_MS:
        reasons.append(f"running {lag:,.0f} ms behind (receipt p99)")


def judge_totals(r: StepResult) -> None:
    """Whether anything was lost once the step drained; sets the verdict."""
    reasons = r.reasons
    if not r.received == r.published == r.stored:
        reasons.append(
            f"not drained: received {r.received:,} published {r.published:,} stored {r.stored:,}"
        )
    if r.stored_rows != r.stored:
        reasons.append(f"raw_market_data has {r.stored_rows:,} rows, stored {r.stored:,}")
    if r.consumed_unique != r.received:
        reasons.append(f"consumer saw {r.consumed_unique:,} of {r.received:,} events")
    r.sustained = not reasons
