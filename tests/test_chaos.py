"""`feedfleet chaos`: its measurements on synthetic event streams, and the quick run end to end.

The measuring rules (gaps, availability windows, duplicates, what counts as lost) are
checked on streams made here, where the right answer is known. The end-to-end test runs
`feedfleet chaos --quick` and asserts only the run's own checks, never a timing.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from chaos.faults import KINDS, QUICK, schedule
from chaos.fleet import PROVIDERS, ChaosFleet, FleetOptions
from chaos.measure import (
    Accounting,
    Point,
    Sent,
    Tick,
    account_connection,
    availability,
    duplicates,
    percentiles,
    symbol_outcome,
    timelines,
)
from chaos.observe import Canon, DbSeen, TopicWatcher
from chaos.report import FaultRun, RunFacts, build, render
from common.codecs import polygon as polygon_codec
from common.model import RawMarketData
from simulators.market import Faults, SentLog, follow_faults_file

ROOT = Path(__file__).resolve().parents[1]
S = 1_000_000_000
MS = 1_000_000


def ticks(provider: str, start_s: float, end_s: float, every_ms: int = 100) -> list[Point]:
    """A provider serving a symbol from ``start_s`` to ``end_s`` inclusive."""
    out = []
    t = int(start_s * S)
    while t <= int(end_s * S):
        out.append(Point(t, provider))
        t += every_ms * MS
    return out


def line(*parts: list[Point]) -> list[Point]:
    return sorted((p for part in parts for p in part), key=lambda p: p.at_ns)


# ---------------------------------------------------------------- gaps


def test_failover_then_failback_break_before_make() -> None:
    points = line(ticks("polygon", 0, 1.0), ticks("refinitiv", 3.5, 10.0),
                  ticks("polygon", 10.2, 20.0))  # fmt: skip
    out = symbol_outcome(points, int(1.05 * S), int(6 * S), 20 * S, "polygon", 2 * S)
    assert out.failed_over and out.served_again
    assert out.handover_gap_ns == int(2.5 * S)  # last primary tick 1.0 -> first backup 3.5
    assert out.failback_gap_ns == int(0.2 * S)  # last backup 10.0 -> primary 10.2


def test_make_before_break_failback_has_no_gap_but_duplicates() -> None:
    points = line(ticks("polygon", 0, 1.0), ticks("refinitiv", 2.0, 10.0),
                  ticks("polygon", 9.05, 20.0))  # fmt: skip
    out = symbol_outcome(points, int(1.05 * S), int(6 * S), 20 * S, "polygon", 2 * S)
    assert out.handover_gap_ns == 1 * S
    assert out.failback_gap_ns is not None and out.failback_gap_ns <= 100 * MS
    # The backup's ticks while the primary was back (9.05..10.0, and 0.5 s either side).
    dup = duplicates(points, {"polygon": 1, "refinitiv": 2}, S // 2, 0, 20 * S)
    assert dup == len([p for p in points if p.provider == "refinitiv" and p.at_ns >= 8.55 * S])
    # The primary is never the redundant one.
    assert duplicates(points, {"polygon": 1, "refinitiv": 2}, S // 2, int(9.5 * S), 20 * S) == 6


def test_gap_is_measured_from_the_last_tick_before_silence_not_the_injection() -> None:
    # The fault is injected at 1.05 s but the primary still ticks until 1.3 s (a silence
    # takes effect a moment later); the gap runs from 1.3 s.
    points = line(ticks("polygon", 0, 1.3), ticks("refinitiv", 4.0, 8.0))
    out = symbol_outcome(points, int(1.05 * S), int(5 * S), 8 * S + 1, "polygon", 2 * S)
    assert out.handover_gap_ns == int(2.7 * S)
    assert out.failback_gap_ns is None and out.failed_over


def test_no_failover_the_outage_is_the_gap() -> None:
    points = line(ticks("polygon", 0, 1.0), ticks("polygon", 4.0, 10.0))
    out = symbol_outcome(points, int(1.05 * S), int(1.05 * S), 10 * S, "polygon", 2 * S)
    assert (out.handover_gap_ns, out.failback_gap_ns) == (3 * S, None)
    assert not out.failed_over and out.served_again


def test_a_symbol_never_served_again_counts_until_the_window_ends() -> None:
    points = ticks("polygon", 0, 1.0)
    out = symbol_outcome(points, int(1.05 * S), int(2 * S), 30 * S, "polygon", 2 * S)
    assert not out.served_again
    assert out.handover_gap_ns == 29 * S
    # Back, but only briefly and long before the window's end: not served again.
    points = line(ticks("polygon", 0, 1.0), ticks("polygon", 5.0, 6.0))
    assert not symbol_outcome(points, S + 1, S + 1, 30 * S, "polygon", 2 * S).served_again


def test_stale_ticks_do_not_serve() -> None:
    fresh = Tick("AAPL", "polygon", arrival_ns=10 * S, provider_ns=10 * S - 5 * MS)
    replayed = Tick("AAPL", "polygon", arrival_ns=12 * S, provider_ns=9 * S)
    later = Tick("AAPL", "refinitiv", arrival_ns=11 * S, provider_ns=11 * S)
    out = timelines([fresh, replayed, later], fresh_ns=S)
    assert out["AAPL"] == [Point(10 * S, "polygon"), Point(11 * S, "refinitiv")]


def test_percentiles_are_nearest_rank() -> None:
    assert percentiles([]) == {"p50": None, "p99": None, "max": None}
    values = list(range(1, 101))
    assert percentiles(values) == {"p50": 50, "p99": 99, "max": 100}
    assert percentiles([3.0, 1.0, 2.0]) == {"p50": 2.0, "p99": 3.0, "max": 3.0}


def test_availability_counts_whole_windows_with_a_tick() -> None:
    points = [Point(int(t * S), "polygon") for t in (0.5, 1.2, 1.9, 3.99, 4.5, -1.0)]
    # Windows [0,1) [1,2) [2,3) [3,4) from start 0, end 4.7 (the partial fifth is not judged).
    assert availability(points, 0, int(4.7 * S)) == 0.75
    assert availability(points, 0, S // 2) is None


# ---------------------------------------------------------------- sent vs received


def sent(symbol: str, seq: int, at_s: float) -> Sent:
    return Sent(("polygon", symbol, "TRADE", seq, int(at_s * 1e6)), int(at_s * S))


def test_accounting_tells_lost_from_in_flight_and_unsubscribed() -> None:
    records = [sent("AAPL", i, i * 0.1) for i in range(1, 11)] + [
        sent("MSFT", i, 1.0 + i * 0.1) for i in range(1, 6)
    ]
    received = {r.key for r in records}
    received.discard(records[3].key)  # AAPL 4: a hole, AAPL 5.. arrived -> lost
    for r in records[12:]:
        received.discard(r.key)  # MSFT 3..5: the connection's tail -> in flight
    acc = Accounting()
    account_connection(records, received, {}, acc)
    assert (acc.sent, acc.received, acc.lost, acc.gap) == (15, 11, 1, 3)
    assert acc.lost_examples == [records[3].key]
    assert acc.lost_at == [records[3].provider_ns]


def test_accounting_symbol_tail_on_a_live_connection() -> None:
    # AAPL stops arriving while MSFT arrives on past it: short tail = an unsubscribe race.
    aapl = [sent("AAPL", i, i * 0.1) for i in range(1, 6)]
    msft = [sent("MSFT", i, 0.6 + i * 0.1) for i in range(1, 6)]
    records = aapl + msft
    received = {r.key for r in records} - {aapl[3].key, aapl[4].key}
    acc = Accounting()
    account_connection(records, received, {}, acc)
    assert (acc.after_unsubscribe, acc.lost, acc.gap) == (2, 0, 0)
    # A long tail while the connection was read is a live symbol dropped: lost.
    long_aapl = [sent("AAPL", i, i * 1.0) for i in range(1, 6)]
    late_msft = [sent("MSFT", 1, 9.0)]
    received = {long_aapl[0].key, late_msft[0].key}
    acc = Accounting()
    account_connection(long_aapl + late_msft, received, {}, acc)
    assert (acc.lost, acc.after_unsubscribe) == (4, 0)


def test_accounting_counts_a_flagged_range_as_gap() -> None:
    records = [sent("AAPL", i, i * 0.1) for i in range(1, 8)]
    received = {r.key for r in records} - {records[2].key, records[3].key}
    acc = Accounting()
    account_connection(records, received, {("polygon", "AAPL"): [(3, 4)]}, acc)
    assert (acc.lost, acc.gap, acc.gap_flagged) == (0, 2, 2)


# ---------------------------------------------------------------- the consumer's parsing


def event(event_id: str, symbol: str, provider: str, ts: str, **extra: object) -> bytes:
    specific = extra.pop("specific", {})
    return orjson.dumps({
        "event_id": event_id, "timestamp": ts, "provider": provider,
        "raw_data": {"symbol": symbol, "price": 1.0, "volume": 1, "timestamp": ts,
                     "bid": None, "ask": None, "provider_specific": specific,
                     "data_type": "TRADE"},
        "metadata": {"ingestion_latency_ms": 1.0, "provider_sequence": extra.get("seq", 7),
                     "quality_flags": extra.get("flags", [])},
    })  # fmt: skip


def test_topic_watcher_keeps_unique_events_by_canonical_symbol() -> None:
    canon = Canon(["AAPL"], {"refinitiv": {"AAPL": "AAPL.O"}})
    watcher = TopicWatcher("pulsar://unused", "t", canon, fresh_ns=S)
    at = 1_700_000_000 * S
    ts = "2023-11-14T22:13:20.000000Z"  # == at
    watcher.take(event("a", "AAPL", "polygon", ts), at + 5 * MS)
    watcher.take(event("a", "AAPL", "polygon", ts), at + 9 * MS)  # redelivered
    # Today's events may carry the provider's own symbol; the contract's carry it aside.
    watcher.take(event("b", "AAPL.O", "refinitiv", ts, flags=["failover"]), at + 6 * MS)
    watcher.take(event("c", "AAPL", "refinitiv", ts,
                       specific={"provider_symbol": "AAPL.O", "gap": [3, 5]},
                       flags=["gap"]), at + 3 * S)  # fmt: skip
    dead = {"event_id": "d", "provider": "polygon", "symbol": "AAPL", "reason": "x",
            "record": {"symbol": "AAPL", "provider": "polygon", "timestamp_ns": at,
                       "data_type": "TRADE", "provider_sequence": 9}}  # fmt: skip
    watcher.take(orjson.dumps(dead), at)
    watcher.take(b"not json", at)
    seen = watcher.seen
    assert [t.symbol for t in seen.ticks] == ["AAPL"] * 3
    assert seen.ticks[0].provider_ns == at and seen.ticks[0].arrival_ns == at + 5 * MS
    assert ("refinitiv", "AAPL", "TRADE", 7, at // 1000) in seen.keys
    assert ("polygon", "AAPL", "TRADE", 9, at // 1000) in seen.keys
    assert seen.gap_ranges[("refinitiv", "AAPL")] == [(3, 5)]
    assert (seen.deliveries, seen.dead_lettered, seen.unreadable) == (6, 1, 1)
    assert len(seen.failover_flagged) == 1
    # The 3 s late one is not fresh: the last fresh tick stays the refinitiv one at +6 ms.
    assert watcher.last_fresh["AAPL"] == (at + 6 * MS, "refinitiv")


# ---------------------------------------------------------------- report and plan


def test_report_has_the_agreed_shape_and_checks() -> None:
    t0, rec, t1 = 10 * S, 20 * S, 40 * S
    lines = {"AAPL": line(ticks("polygon", 0, 10.0), ticks("refinitiv", 12.0, 30.0),
                          ticks("polygon", 30.1, 41.0))}  # fmt: skip
    facts = RunFacts(
        minutes=3.0, quick=True, symbols=["AAPL"],
        providers=[{"name": p.name, "priority": p.priority} for p in PROVIDERS],
        primary="polygon", primary_id="p1", events_per_symbol_s=10.0, failover_grace_s=3.0,
        failback_hold_s=5.0, fresh_s=1.0, t_ready=0, t_end=41 * S,
    )  # fmt: skip
    acc = Accounting(sent=10, received=9, gap=1, gap_at=[int(9.5 * S)])
    seen = TopicWatcher("x", "t", Canon([], {}), S).seen
    runs = [FaultRun("provider_down", "sim", t0, rec, t1, 10.0)]
    report = build(facts, runs, lines, seen, DbSeen(), acc, {}, 50.0)
    for key in ("minutes", "faults", "availability", "lost_events_total", "targets", "checks"):
        assert key in report
    (fault,) = report["faults"]
    for key in ("kind", "target", "detect_s", "handover_gap_ms", "failback_gap_ms",
                "lost_events", "duplicate_events"):  # fmt: skip
        assert key in fault
    assert fault["handover_gap_ms"] == {"p50": 2000.0, "p99": 2000.0, "max": 2000.0}
    assert fault["failback_gap_ms"] == {"p50": 100.0, "p99": 100.0, "max": 100.0}
    assert fault["gap_events"] == 1 and fault["lost_events"] == 0
    assert set(report["availability"]) >= {"min", "median"}
    assert report["checks"] == {"nothing_lost": True, "served_again_after_each_fault": True}
    assert "provider_down" in render(report)


def test_schedules() -> None:
    assert set(QUICK) <= set(KINDS)
    ten = schedule(600, tuple(KINDS), 75.0)
    assert len(ten) == 8 and ten[:7] == list(KINDS) and ten[7] == ten[0]
    assert schedule(60, tuple(KINDS), 75.0) == list(KINDS)


def test_supervisord_config_is_made_from_the_projects(tmp_path: Path) -> None:
    fleet = ChaosFleet(tmp_path, FleetOptions(["AAPL", "MSFT"], 10.0, 3.0, 5.0, 1.5))
    fleet.sim_ports = {p.name: 9000 + i for i, p in enumerate(PROVIDERS)}
    conf = fleet.render_conf()
    for section in ("program:redis", "program:broker", "program:coordinator", "program:api",
                    "program:polygon", "program:refinitiv", "program:bloomberg",
                    "group:worker", "program:polygon-sim", "group:simulator"):  # fmt: skip
        assert f"[{section}]" in conf
    assert "numprocs=2" in conf
    assert "command=%(ENV_FEEDFLEET_PYTHON)s -m workers polygon" in conf
    assert "--symbols AAPL.O,MSFT.O" in conf  # the refinitiv simulator speaks its own names
    assert f"--sent-log {tmp_path}/sent/polygon" in conf


# ---------------------------------------------------------------- simulator support


async def test_faults_file_switches_a_running_simulators_faults(tmp_path: Path) -> None:
    path = tmp_path / "f"
    faults = Faults.parse("drop_after=5")

    async def until(check: Callable[[], bool], what: str) -> None:
        deadline = asyncio.get_running_loop().time() + 10
        while not check():
            assert asyncio.get_running_loop().time() < deadline, f"faults never became {what}"
            await asyncio.sleep(0.01)

    task = asyncio.create_task(follow_faults_file(str(path), faults, interval_s=0.01))
    try:
        await asyncio.sleep(0.05)  # several re-reads of a file that is not there
        assert faults.drop_after == 5  # no file yet: the command line's faults stand
        path.write_text("silent_after=1,refuse_auth")
        await until(lambda: faults.refuse_auth, "the file's")
        assert (faults.silent_after, faults.refuse_auth, faults.drop_after) == (1, True, 0)
        path.write_text("")
        await until(lambda: not faults.refuse_auth, "the defaults")
        assert faults == Faults()
    finally:
        task.cancel()


def test_sent_log_is_what_the_codec_decodes(tmp_path: Path) -> None:
    log = SentLog(str(tmp_path))
    first, second = log.open(), log.open()
    assert first is not None and second is not None
    first.write(polygon_codec.encode_events(
        [polygon_codec.trade_event("AAPL", 1.5, 100, 1_700_000_000_000, 1)]))  # fmt: skip
    first.close()
    second.close()
    files = sorted(tmp_path.glob("*.cap"))
    assert len(files) == 2
    (record,) = list(polygon_codec.decode_capture(files[0].read_bytes()))
    assert isinstance(record, RawMarketData)
    assert (record.symbol, record.provider_sequence) == ("AAPL", 1)
    assert SentLog(None).open() is None


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_chaos_run_loses_nothing_and_serves_every_symbol_again(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    proc = subprocess.run(
        [sys.executable, "-m", "workers.cli", "chaos", "--quick", "--json", str(out),
         "--work-dir", str(tmp_path / "work")],
        cwd=ROOT, capture_output=True, timeout=850,
    )  # fmt: skip
    err = proc.stderr.decode(errors="replace")[-4000:]
    assert out.exists(), err
    report = orjson.loads(out.read_bytes())
    assert [f["kind"] for f in report["faults"]] == list(QUICK)
    assert report["sent_events_total"] > 0, err
    assert not report["unmatched_received"], report["unmatched_received"]
    assert report["checks"]["nothing_lost"], (report["lost_examples"], err)
    assert report["checks"]["served_again_after_each_fault"], [
        (f["kind"], f["not_served_again"]) for f in report["faults"]
    ]
    assert proc.returncode == 0, err
    assert b"Checks:" in proc.stdout
