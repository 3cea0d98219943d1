"""Latency histograms: batch recording equals recording one by one."""

from __future__ import annotations

import random

from common.metrics import LatencyWindow, mean_value, values_at_percentiles


def test_record_many_matches_record_one_by_one() -> None:
    rng = random.Random(3)
    values = [rng.choice([0, 5, 5, 5, 120, 9_999, 10**10]) for _ in range(2000)]
    one, many = LatencyWindow(), LatencyWindow()
    for v in values:
        one.histogram.record_value(max(1, min(v, 600_000_000)))
    many.record_many_us(values)
    assert one.histogram.get_total_count() == many.histogram.get_total_count() == 2000
    for pct in (1, 50, 90, 99, 99.9, 100):
        assert one.histogram.get_value_at_percentile(pct) == many.histogram.get_value_at_percentile(
            pct
        )
    max_ms = many.percentiles_ms()["max"]
    assert max_ms is not None and 600_000 <= max_ms < 601_000  # clamped to 10 min
    decoded = LatencyWindow()
    decoded.histogram.decode_and_add(many.encoded())
    assert decoded.histogram.get_total_count() == 2000


def test_a_value_with_a_count_stands_for_that_many_events() -> None:
    batch, each = LatencyWindow(), LatencyWindow()
    batch.record_us(1_500, 50)
    batch.record_us(0, 2)  # below the histogram's floor: counted as 1 µs
    each.record_many_us([1_500] * 50 + [1, 1])
    assert batch.histogram.get_total_count() == 52
    assert batch.percentiles_ms() == each.percentiles_ms()
    assert batch.percentiles_ms()["p50"] == 1.5


def test_fast_percentiles_and_mean_equal_hdrh_own() -> None:
    rng = random.Random(7)
    for values in (
        [rng.randint(1, 600_000_000) for _ in range(3000)],
        [rng.choice([1, 2, 900, 901, 50_000]) for _ in range(500)],
        [123_456],
    ):
        window = LatencyWindow()
        window.record_many_us(values)
        h = window.histogram
        pcts = (0, 1, 25, 50, 90, 99, 99.9, 100)
        assert values_at_percentiles(h, pcts) == [h.get_value_at_percentile(p) for p in pcts]
        assert mean_value(h) == h.get_mean_value()
    empty = LatencyWindow().histogram
    assert values_at_percentiles(empty, (50, 99)) == [0, 0]
    assert mean_value(empty) == 0.0
