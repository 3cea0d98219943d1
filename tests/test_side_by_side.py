"""The side-by-side of the official massive client and our adapter, with short windows, so
it never rots: both clients measured, the ratio theirs, and each counted only events.

No timing is asserted: the machine is shared.
"""

from __future__ import annotations

import math

import pytest

from tests.bench.side_by_side import measure_side_by_side

pytest.importorskip("massive", reason="the bench extra: pip install -e '.[bench]'")


@pytest.mark.timeout(60)
def test_both_clients_are_measured_on_the_same_frames() -> None:
    result = measure_side_by_side(seconds=1.5, runs=1, symbols=50, events_per_frame=50,
                                  warmup_s=0.5)  # fmt: skip

    official, ours = result.official_events_per_s, result.ours_events_per_s
    assert isinstance(official, float) and math.isfinite(official) and official > 0, result
    assert isinstance(ours, float) and math.isfinite(ours) and ours > 0, result
    assert result.ratio == ours / official
    assert len(result.official_runs) == len(result.ours_runs) == 1
    # What each counted came from the server's data frames, and only events were counted:
    # a status or a model counted twice would, over a whole connection, exceed what the
    # server handed to that connection's socket, and the warm-up's events, each looked
    # at, are the trades and quotes sent.
    expected_kinds = {
        "official": {"EquityTrade", "EquityQuote"},
        "ours": {"RawMarketData:TRADE", "RawMarketData:QUOTE"},
    }
    for run in result.official_runs + result.ours_runs:
        assert 0 < run.window_events <= run.total_events <= run.events_sent, run
        assert set(run.kinds) == expected_kinds[run.client], run
        assert run.cpu_us_per_event > 0, run
    assert "server pinned to CPU 0" in result.note or "not pinned" in result.note
