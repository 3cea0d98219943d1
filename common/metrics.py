"""Counters and latency histograms a worker reports (Redis status, /metrics, ingestion_metrics)."""

from __future__ import annotations

import functools
from bisect import bisect_left
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from operator import mul

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


def _recorded_counts(histogram: HdrHistogram) -> tuple[int, memoryview]:
    """The first recorded bucket's index and the counts from it to the last recorded one.

    hdrh's own percentile and mean functions walk all 21,504 buckets in Python (about
    90 ms for the three a status report needs, every second in every worker); the counts
    are a C array, read here through a memoryview, between the recorded minimum and maximum.
    """
    first = histogram.get_counts_array_index(histogram.get_min_value())
    last = histogram.get_counts_array_index(histogram.get_max_value())
    counts = memoryview(histogram.counts).cast("B").cast("L")
    return first, counts[first : min(last, histogram.counts_len - 1) + 1]


def values_at_percentiles(histogram: HdrHistogram, percentiles: Sequence[float]) -> list[int]:
    """What ``get_value_at_percentile`` gives for each percentile, in one pass in C."""
    if histogram.get_total_count() == 0:
        return [0 for _ in percentiles]
    first, counts = _recorded_counts(histogram)
    running = list(accumulate(counts))
    out = []
    for pct in percentiles:
        target = histogram.get_target_count_at_percentile(pct)
        index = first + min(bisect_left(running, target), len(running) - 1)
        value = histogram.get_value_from_index(index)
        if pct:
            out.append(histogram.get_highest_equivalent_value(value))
        else:
            out.append(histogram.get_lowest_equivalent_value(value))
    return out


def mean_value(histogram: HdrHistogram) -> float:
    """What ``get_mean_value`` gives (each bucket at its median equivalent value)."""
    total = histogram.get_total_count()
    if total == 0:
        return 0.0
    first, counts = _recorded_counts(histogram)
    medians = _median_values(histogram.lowest_trackable_value,
                             histogram.highest_trackable_value,
                             histogram.significant_figures)  # fmt: skip
    weighted = sum(map(mul, counts, medians[first : first + len(counts)]))
    return float(weighted) / total


@functools.lru_cache(maxsize=8)
def _median_values(lowest: int, highest: int, digits: int) -> tuple[int, ...]:
    """Each bucket's median equivalent value, by index, for one histogram layout: computed
    once, so a mean is a sum of products in C rather than two hdrh calls per bucket in
    Python (about 10 ms for a window whose latencies spread from 1 to 50 ms)."""
    layout = HdrHistogram(lowest, highest, digits)
    value_at, median = layout.get_value_from_index, layout._hdr_median_equiv_value
    return tuple(median(value_at(i)) for i in range(layout.counts_len))


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
        p50, p99 = values_at_percentiles(h, (50, 99))
        return {
            "avg": round(mean_value(h) / 1000, 3),
            "p50": p50 / 1000,
            "p99": p99 / 1000,
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
