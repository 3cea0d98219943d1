"""What a chaos run measures, as pure functions over what the consumer saw and what the
simulators sent. No I/O here, so each rule is tested on synthetic streams.

Times are int nanoseconds. A *tick* is one unique event as the Pulsar consumer saw it; the
service a downstream consumer gets is judged on *fresh* ticks only (arrived within
``fresh_ns`` of their provider time), so a journal replay after a restart or a backlog
drained after a broker outage does not count as the symbol being served.
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

Key = tuple[str, str, str, int | None, int]  # provider, canonical symbol, type, sequence, µs


@dataclass(frozen=True, slots=True)
class Tick:
    symbol: str  # canonical
    provider: str
    arrival_ns: int  # first delivery to the consumer
    provider_ns: int  # raw_data.timestamp


@dataclass(frozen=True, slots=True)
class Point:
    """A fresh tick on a symbol's timeline."""

    at_ns: int
    provider: str


Timeline = list[Point]


def timelines(ticks: Iterable[Tick], fresh_ns: int) -> dict[str, Timeline]:
    """Per canonical symbol, its fresh ticks in arrival order."""
    out: dict[str, Timeline] = defaultdict(list)
    for t in ticks:
        if t.arrival_ns - t.provider_ns <= fresh_ns:
            out[t.symbol].append(Point(t.arrival_ns, t.provider))
    for points in out.values():
        points.sort(key=lambda p: p.at_ns)
    return dict(out)


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """Nearest-rank p50, p99 and max (over symbols there are few values: no interpolation)."""
    if not values:
        return {"p50": None, "p99": None, "max": None}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]

    return {"p50": rank(50), "p99": rank(99), "max": ordered[-1]}


def _max_gap(points: Timeline, first: int, last: int) -> int:
    """The longest time between consecutive points ``first..last`` (indices, inclusive)."""
    return max((points[i + 1].at_ns - points[i].at_ns for i in range(first, last)), default=0)


@dataclass(frozen=True, slots=True)
class SymbolOutcome:
    """One symbol through one fault window.

    ``handover_gap_ns``: the longest silence from its last tick before the fault up to the
    first tick from a backup (failover), or, if no backup served it, over the window (up
    to the window's end if it never came back). ``failback_gap_ns``: the longest silence
    around the primary's return, from the tick before the primary's first one after the
    failover to the tick after the backup's last one; None when there was no failback.
    """

    handover_gap_ns: int | None
    failback_gap_ns: int | None
    failed_over: bool
    served_again: bool


def symbol_outcome(
    points: Timeline, t0: int, recovered: int, t1: int, primary: str, flowing_ns: int
) -> SymbolOutcome:
    """``t0`` the injection, ``recovered`` when the fault was cleared (``t0`` for a kill),
    ``t1`` the window's end. Served again: a fresh tick after ``recovered`` and still
    ticking within ``flowing_ns`` of ``t1``."""
    times = [p.at_ns for p in points]
    start = bisect.bisect_right(times, t0) - 1  # last tick at or before the fault
    end = bisect.bisect_left(times, t1) - 1  # last tick inside the window
    if start < 0:
        return SymbolOutcome(None, None, False, False)
    served_again = end > start and times[end] > recovered and t1 - times[end] <= flowing_ns
    backup = next((i for i in range(start + 1, end + 1) if points[i].provider != primary), None)
    if backup is None:
        gap = _max_gap(points, start, end)
        if not served_again:
            gap = max(gap, t1 - times[end])  # still out at the window's end: at least this
        return SymbolOutcome(gap, None, False, served_again)
    handover = _max_gap(points, start, backup)
    back = next((i for i in range(backup + 1, end + 1) if points[i].provider == primary), None)
    if back is None:
        return SymbolOutcome(handover, None, True, served_again)
    last_backup = max(i for i in range(backup, end + 1) if points[i].provider != primary)
    failback = _max_gap(points, back - 1, min(max(back, last_backup + 1), end))
    return SymbolOutcome(handover, failback, True, served_again)


def availability(
    points: Timeline, start_ns: int, end_ns: int, window_ns: int = 1_000_000_000
) -> float | None:
    """The share of whole ``window_ns`` windows from ``start_ns`` with at least one tick."""
    windows = (end_ns - start_ns) // window_ns
    if windows <= 0:
        return None
    served = {(p.at_ns - start_ns) // window_ns for p in points if start_ns <= p.at_ns}
    return sum(1 for w in served if w < windows) / windows


def duplicates(
    points: Timeline, priority: Mapping[str, int], within_ns: int, t0: int, t1: int
) -> int:
    """Ticks in [t0, t1) served twice: a provider's tick while a provider of higher priority
    (lower number) also served the symbol within ``within_ns`` of it. Only the redundant
    (lower-priority) side is counted."""
    by_provider: dict[str, list[int]] = defaultdict(list)
    for p in points:
        by_provider[p.provider].append(p.at_ns)
    count = 0
    for p in points:
        if not t0 <= p.at_ns < t1:
            continue
        mine = priority.get(p.provider, 1 << 30)
        for other, times in by_provider.items():
            if other == p.provider or priority.get(other, 1 << 30) >= mine:
                continue
            i = bisect.bisect_left(times, p.at_ns - within_ns)
            if i < len(times) and times[i] <= p.at_ns + within_ns:
                count += 1
                break
    return count


# ---------------------------------------------------------------- sent vs received


@dataclass(frozen=True, slots=True)
class Sent:
    """One record a simulator sent, as its own codec decodes it."""

    key: Key
    provider_ns: int


@dataclass
class Accounting:
    """Every sent record, by what became of it.

    - received: reached Pulsar (the topic or its dead-letter topic);
    - lost: missing although the client read on past it on that connection (a later
      record of the same symbol arrived): received by the fleet and not delivered;
    - gap: sent but never read by anyone, the tail of a connection that died with it in
      flight; ``gap_flagged`` of them the fleet marked with a ``gap`` quality flag;
    - after_unsubscribe: a symbol's tail of at most ``unsubscribe_ns`` on a connection the
      client kept reading: sent after the client had let the symbol go.
    """

    sent: int = 0
    received: int = 0
    lost: int = 0
    gap: int = 0
    gap_flagged: int = 0
    after_unsubscribe: int = 0
    # The provider time of each record counted lost or gap, to put it in a fault's window.
    lost_at: list[int] = field(default_factory=list)
    gap_at: list[int] = field(default_factory=list)
    lost_examples: list[Key] = field(default_factory=list)


def account_connection(
    sent: Sequence[Sent],
    received: set[Key] | Mapping[Key, object],
    flagged: Mapping[tuple[str, str], Sequence[tuple[int, int]]],
    out: Accounting,
    unsubscribe_ns: int = 2_000_000_000,
) -> None:
    """Classify one connection's records (in send order) into ``out``.

    TCP delivers a prefix of what was sent on a connection: a missing record followed by
    a received one on the same connection was read by the client and then lost.
    ``flagged`` holds the ``gap`` ranges the fleet reported, per (provider, symbol).
    """
    last_any = -1
    last_of: dict[str, int] = {}
    for i, s in enumerate(sent):
        if s.key in received:
            last_any = i
            last_of[s.key[1]] = i
    # Per symbol: when its records after the last one received began, and when it last sent.
    tail_from: dict[str, int] = {}
    last_sent: dict[str, int] = {}
    for i, s in enumerate(sent):
        symbol = s.key[1]
        last_sent[symbol] = max(last_sent.get(symbol, s.provider_ns), s.provider_ns)
        if i > last_of.get(symbol, -1) and symbol not in tail_from:
            tail_from[symbol] = s.provider_ns
    for i, s in enumerate(sent):
        out.sent += 1
        if s.key in received:
            out.received += 1
            continue
        provider, symbol, _type, seq, _us = s.key
        if seq is not None and any(a <= seq <= b for a, b in flagged.get((provider, symbol), ())):
            out.gap += 1
            out.gap_flagged += 1
            out.gap_at.append(s.provider_ns)
        elif i < last_of.get(symbol, -1):
            _lost(out, s)
        elif i < last_any:
            # The client read on but this symbol stopped arriving: an unsubscribe race if
            # the simulator stopped sending it soon after, else a live symbol was dropped.
            if last_sent[symbol] - tail_from[symbol] <= unsubscribe_ns:
                out.after_unsubscribe += 1
            else:
                _lost(out, s)
        else:
            out.gap += 1
            out.gap_at.append(s.provider_ns)


def _lost(out: Accounting, s: Sent) -> None:
    out.lost += 1
    out.lost_at.append(s.provider_ns)
    if len(out.lost_examples) < 10:
        out.lost_examples.append(s.key)


def count_in(times: Iterable[int], t0: int, t1: int) -> int:
    return sum(1 for t in times if t0 <= t < t1)
