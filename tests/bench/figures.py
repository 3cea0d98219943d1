"""Small arithmetic the bench's steps and report share: latency histograms differenced
and read as percentiles, medians that skip missing figures, and the rate series."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable

from hdrh.histogram import HdrHistogram

from common.metrics import new_latency_histogram, values_at_percentiles


def next_rate(rate: int) -> int:
    """The next step of a 1-2-5 series: 10k -> 20k -> 50k -> 100k."""
    exp = 10 ** math.floor(math.log10(rate))
    mantissa = rate / exp
    if mantissa < 2:
        return 2 * exp
    if mantissa < 5:
        return 5 * exp
    return 10 * exp


def round_rate(rate: float) -> int:
    quantum = 1000 if rate >= 10_000 else 100
    return max(quantum, round(rate / quantum) * quantum)


def hdr_decode(encoded: str | None) -> HdrHistogram:
    hist = new_latency_histogram()
    if encoded:
        hist.decode_and_add(encoded)
    return hist


def percentiles_between(earlier: str | None, later: str | None) -> dict[str, float | None]:
    """Percentiles of what one cumulative histogram recorded between two of its encoded
    snapshots (a worker's status, read twice)."""
    return percentiles_ms(hdr_subtract(hdr_decode(later), hdr_decode(earlier)))


def hdr_subtract(later: HdrHistogram, earlier: HdrHistogram) -> HdrHistogram:
    """What ``later`` recorded after ``earlier`` (both from one cumulative histogram)."""
    out = new_latency_histogram()
    for index in range(later.counts_len):
        count = later.get_count_at_index(index) - earlier.get_count_at_index(index)
        if count > 0:
            out.record_value(later.get_value_from_index(index), count)
    return out


def percentiles_ms(hist: HdrHistogram) -> dict[str, float | None]:
    if hist.get_total_count() == 0:
        return {"p50": None, "p99": None, "p999": None, "max": None, "count": 0}
    # the fleet's own reader of percentiles (hdrh's walks every bucket in Python, each)
    p50, p99, p999 = values_at_percentiles(hist, (50, 99, 99.9))
    return {
        "p50": p50 / 1000,
        "p99": p99 / 1000,
        "p999": p999 / 1000,
        "max": hist.get_max_value() / 1000,
        "count": hist.get_total_count(),
    }


def median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None
