"""Counters and latency histograms a worker reports (Redis status, /metrics, ingestion_metrics)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from hdrh.histogram import HdrHistogram


@dataclass(slots=True)
class SinkCounters:
    """Per durable sink. ``acked`` counts live and caught-up deliveries."""

    acked: int = 0
    replayed: int = 0  # events delivered by the catch-up from the journal
    failures: int = 0  # failed delivery attempts (batches)
    dead_lettered: int = 0  # rejected records delivered to the sink's dead-letter
    fell_behind: int = 0  # times the sink left live hand-over for catch-up

    def as_dict(self) -> dict[str, int]:
        return {
            "acked": self.acked,
            "replayed": self.replayed,
            "failures": self.failures,
            "dead_lettered": self.dead_lettered,
            "fell_behind": self.fell_behind,
        }


def new_latency_histogram() -> HdrHistogram:
    """Microseconds from 1 µs to 10 min, 3 significant digits."""
    return HdrHistogram(1, 600_000_000, 3)


@dataclass(slots=True)
class LatencyWindow:
    """A latency histogram in microseconds, reset when the owner's window ends."""

    histogram: HdrHistogram = field(default_factory=new_latency_histogram)

    def record_many_us(self, values_us: list[int]) -> None:
        """Record a batch. Events of one read share most of their times, so equal values
        are recorded once with a count (``record_value`` costs about a microsecond)."""
        record = self.histogram.record_value
        for value, count in Counter(values_us).items():
            record(max(1, min(value, 600_000_000)), count)

    def record_us(self, value_us: int, count: int = 1) -> None:
        """One value standing for ``count`` events (a batch that shares one time)."""
        self.histogram.record_value(max(1, min(value_us, 600_000_000)), count)

    def percentiles_ms(self) -> dict[str, float | None]:
        h = self.histogram
        if h.get_total_count() == 0:
            return {"p50": None, "p99": None, "max": None, "avg": None}
        return {
            "avg": round(h.get_mean_value() / 1000, 3),
            "p50": h.get_value_at_percentile(50) / 1000,
            "p99": h.get_value_at_percentile(99) / 1000,
            "max": h.get_max_value() / 1000,
        }

    def encoded(self) -> str | None:
        """The whole histogram, HdrHistogram's compressed base64 form (None when empty)."""
        if self.histogram.get_total_count() == 0:
            return None
        encoded: bytes = self.histogram.encode()
        return encoded.decode()

    def reset(self) -> None:
        self.histogram.reset()
