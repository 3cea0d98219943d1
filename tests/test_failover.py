"""Failover and make-before-break failback: the coordinator's plan without a database,
then the real coordinator on real PostgreSQL, then what the API shows of it.

In the database tests no worker process runs: each instance row is kept alive and
updated as a worker does it (``db.register_instance``, a heartbeat every 0.25 s,
``db.report_instance_state``). The coordinator polls only every 300 s, ten times the
longest wait below, so whatever happens within them was driven by notifications and by
its own timers (a grace, a hold-down or a heartbeat running out), not by the poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from common import db
from common.model import DataType
from common.provider import ProviderConfig
from tests.conftest import Services
from tests.test_coordinator import eventually, running
from workers.api import build_app
from workers.coordinator import (
    FAILBACK,
    FAILBACK_ABORTED,
    FAILBACK_STARTED,
    FAILOVER,
    MAX_HOLD_S,
    PRIMARY,
    Coordinator,
    Memory,
    Plan,
    State,
    _Known,
    _name,
    assess_providers,
    failover_policy,
    plan_assignments,
    plan_symbols,
)

# ---------------------------------------------------------------- the plan, pure


def provider(
    pid: str, priority: int = 100, *, enabled: bool = True, **config: Any
) -> ProviderConfig:
    """A provider row; its name is its id in lower case, so ties by name are easy to set."""
    return ProviderConfig(
        pid, pid.lower(), "polygon", enabled=enabled, priority=priority, connection_config=config
    )


@dataclass
class _Instance:
    provider_id: str
    status: str
    since: float
    unavailable: frozenset[str] = frozenset()
    flowing: frozenset[str] = frozenset()


@dataclass
class World:
    """Providers, subscriptions and instances as the coordinator would read them, and
    what it keeps from pass to pass (its rows and memory). Times are seconds."""

    providers: list[ProviderConfig]
    subs: list[db.Subscription]
    instances: dict[str, _Instance] = field(default_factory=dict)
    rows: list[db.Assignment] = field(default_factory=list)
    memory: Memory = field(default_factory=Memory)
    now: float = 0.0

    def start(self, iid: str, pid: str, status: str = "CONNECTED", since: float = -1000.0) -> None:
        self.instances[iid] = _Instance(pid, status, since)

    def report(
        self,
        iid: str,
        status: str | None = None,
        *,
        unavailable: set[str] | None = None,
        flowing: set[str] | None = None,
    ) -> None:
        """What a worker pushes; its status_since moves only when the status changes."""
        inst = self.instances[iid]
        if status is not None and status != inst.status:
            inst.status, inst.since = status, self.now
        if unavailable is not None:
            inst.unavailable = frozenset(unavailable)
        if flowing is not None:
            inst.flowing = frozenset(flowing)

    def kill(self, iid: str) -> None:
        del self.instances[iid]

    def live(self) -> list[db.LiveInstance]:
        return [
            db.LiveInstance(
                iid, i.provider_id, "h", i.status, self.now - i.since, 0.0, i.unavailable, i.flowing
            )
            for iid, i in sorted(self.instances.items())
        ]

    def step(self, now: float) -> Plan:
        self.now = now
        plan = plan_assignments(self.subs, self.providers, self.live(), self.rows, now, self.memory)
        self.check(plan)
        self.rows, self.memory = plan.rows, plan.memory
        return plan

    def check(self, plan: Plan) -> None:
        """What every plan must hold, whatever the test: rows carry their subscription's
        data types and name their server; events and strandings say for whom and why."""
        types = {(s.provider_id, s.symbol): tuple(s.data_types) for s in self.subs}
        for r in plan.rows:
            assert r.data_types == types[(r.provider_id, r.symbol)], r
            assert r.serving_provider_id is not None, r
        for e in plan.events:
            assert (e.provider_id, e.symbol) in types, e
            assert isinstance(e.why, str) and e.why, e
            assert e.detect_s >= 0.0, e
        for key, why in plan.stranded.items():
            assert key in types and isinstance(why, str) and why, (key, why)

    def held(self, symbol: str) -> set[tuple[str, str, str | None, str, bool]]:
        """Rows of ``symbol``: (for whom, reason, serving provider, instance, latest)."""
        return {
            (r.provider_id, r.reason, r.serving_provider_id, r.instance_id, r.latest)
            for r in self.rows
            if r.symbol == symbol
        }


def subs(pid: str, *symbols: str) -> list[db.Subscription]:
    return [db.Subscription(pid, s, ["TRADE"]) for s in symbols]


def kinds(plan: Plan) -> list[tuple[str, str, str, str]]:
    """(kind, symbol, from, to) of the plan's events, in order."""
    return [(e.kind, e.symbol, e.from_provider_id, e.to_provider_id) for e in plan.events]


def test_the_primary_serves_its_symbols() -> None:
    w = World([provider("P", 1), provider("Q", 2, failover_symbols="*")], subs("P", "A", "B"))
    w.start("p1", "P")
    w.start("q1", "Q")
    plan = w.step(0)
    assert w.held("A") == {("P", PRIMARY, "P", "p1", True)}
    assert w.held("B") == {("P", PRIMARY, "P", "p1", True)}
    assert plan.failover == set() and plan.events == [] and plan.stranded == {}


def test_no_live_instance_fails_over_at_once_to_the_best_backup() -> None:
    w = World(
        [
            provider("P", 1),
            provider("QX", 0, enabled=False, failover_symbols="*"),  # disabled
            provider("QC", 3, failover_symbols="*"),
            provider("QB", 2, failover_symbols="*"),  # ties with QA on priority; QA's name wins
            provider("QA", 2, failover_symbols="*"),
        ],
        subs("P", "A"),
    )
    for iid, pid in (("p1", "P"), ("x1", "QX"), ("c1", "QC"), ("b1", "QB"), ("a1", "QA")):
        w.start(iid, pid)
    w.step(0)
    w.kill("p1")
    plan = w.step(0.1)  # no grace for a provider without a live instance
    assert w.held("A") == {("P", FAILOVER, "QA", "a1", True)}
    assert plan.failover == {("P", "A")}
    assert kinds(plan) == [(FAILOVER, "A", "P", "QA")]
    assert plan.events[0].why == "no live instance"


def test_an_unhealthy_provider_keeps_its_symbols_for_its_grace() -> None:
    w = World(
        [provider("P", 1, failover_grace_s=3), provider("Q", 2, failover_symbols="*")],
        subs("P", "A"),
    )
    w.start("p1", "P")
    w.start("q1", "Q")
    w.step(0)
    w.now = 10
    w.report("p1", "DISCONNECTED")
    plan = w.step(10)
    assert w.held("A") == {("P", PRIMARY, "P", "p1", True)}, "moved within the grace"
    assert plan.wake_at == 13  # the coordinator re-plans when the grace runs out
    w.report("p1", "CONNECTING")  # still unhealthy: the grace runs from the first failure
    plan = w.step(12.9)
    assert w.held("A") == {("P", PRIMARY, "P", "p1", True)} and plan.events == []
    plan = w.step(13)
    assert w.held("A") == {("P", FAILOVER, "Q", "q1", True)}
    assert kinds(plan) == [(FAILOVER, "A", "P", "Q")]
    assert plan.events[0].why == "CONNECTING for 3.0 s" and plan.events[0].detect_s == 3.0


def test_back_within_the_grace_nothing_moves() -> None:
    w = World([provider("P", 1), provider("Q", 2, failover_symbols="*")], subs("P", "A"))
    w.start("p1", "P")
    w.start("q1", "Q")
    w.step(0)
    w.now = 5
    w.report("p1", "DISCONNECTED")
    w.step(5)
    w.now = 7
    w.report("p1", "CONNECTED")
    plan = w.step(7)
    assert w.held("A") == {("P", PRIMARY, "P", "p1", True)}
    assert plan.events == [] and plan.wake_at is None
    w.now = 8
    w.report("p1", "DISCONNECTED")  # a new failure gets a new, full grace
    assert w.step(10.9).events == []
    assert kinds(w.step(11)) == [(FAILOVER, "A", "P", "Q")]


def test_an_unavailable_symbol_moves_alone_and_at_once() -> None:
    w = World([provider("P", 1), provider("Q", 2, failover_symbols="*")], subs("P", "A", "B", "C"))
    w.start("p1", "P")
    w.start("q1", "Q")
    w.step(0)
    w.report("p1", unavailable={"B"})
    plan = w.step(0.1)
    assert w.held("A") == w.held("C") == {("P", PRIMARY, "P", "p1", True)}
    assert w.held("B") == {("P", FAILOVER, "Q", "q1", True)}
    assert plan.failover == {("P", "B")}
    assert [(e.symbol, e.why, e.detect_s) for e in plan.events] == [("B", "symbol unavailable", 0)]


def test_another_instance_of_the_provider_comes_before_a_backup() -> None:
    w = World(
        [provider("P", 1), provider("Q", 2, failover_symbols="*")],
        subs("P", *[f"S{i}" for i in range(20)]),
    )
    w.start("p1", "P")
    w.start("p2", "P")
    w.start("q1", "Q")
    w.step(0)
    on_p1 = {r.symbol for r in w.rows if r.instance_id == "p1"}
    assert on_p1 and len(on_p1) < 20
    refused = sorted(on_p1)[0]
    w.report("p1", unavailable={refused})
    plan = w.step(1)
    assert w.held(refused) == {("P", PRIMARY, "P", "p2", True)}
    w.report("p1", "DISCONNECTED")  # p2 is CONNECTED: no grace needed, p1's share moves over
    plan = w.step(2)
    assert {r.instance_id for r in w.rows} == {"p2"}
    assert plan.failover == set() and plan.events == []


def test_a_backup_must_accept_the_symbol() -> None:
    w = World(
        [
            provider("P", 1),
            provider("N", 0),  # no failover_symbols: takes no failover traffic
            provider("Z", 0, failover_symbols=None),  # null: the same
            provider("L", 2, failover_symbols=["MSFT"]),  # a list
            provider("G", 3, failover_symbols="AA*"),
        ],  # a glob
        subs("P", "AAPL", "MSFT", "IBM"),
    )
    for iid, pid in (("p1", "P"), ("n1", "N"), ("z1", "Z"), ("l1", "L"), ("g1", "G")):
        w.start(iid, pid)
    w.step(0)
    w.kill("p1")
    plan = w.step(1)
    assert w.held("MSFT") == {("P", FAILOVER, "L", "l1", True)}
    assert w.held("AAPL") == {("P", FAILOVER, "G", "g1", True)}
    # Nobody takes IBM: P keeps its row, so P resumes as soon as it can.
    assert w.held("IBM") == {("P", PRIMARY, "P", "p1", True)}
    assert plan.stranded == {("P", "IBM"): "no live instance"}
    assert plan.failover == {("P", "MSFT"), ("P", "AAPL")}
    w.start("p2", "P")
    w.step(2)
    assert w.held("IBM") == {("P", PRIMARY, "P", "p2", True)}


def test_failover_policy_from_the_config() -> None:
    assert failover_policy(provider("A")).takes_any is False
    star = failover_policy(provider("A", failover_symbols="*"))
    assert star.accepts("ANY") and (star.grace_s, star.hold_s) == (3.0, 30.0)
    star = failover_policy(provider("A", failover_symbols="*", failback_hold_s=7))
    assert (star.takes_all, star.grace_s, star.hold_s) == (True, 3.0, 7.0)
    glob = failover_policy(
        provider("A", failover_symbols="A*", failover_grace_s=1, failback_hold_s=5)
    )
    assert (
        glob.accepts("AAPL") and not glob.accepts("MSFT") and (glob.grace_s, glob.hold_s) == (1, 5)
    )
    listed = failover_policy(provider("A", failover_symbols=["A*"]))
    assert listed.accepts("A*") and not listed.accepts("AAPL")  # a list is names, not globs
    listed = failover_policy(provider("A", failover_symbols=["B"], failover_grace_s=2,
                                      failback_hold_s=9))  # fmt: skip
    assert (listed.grace_s, listed.hold_s, listed.takes) == (2, 9, frozenset({"B"}))
    bad = failover_policy(provider("A", failover_symbols=7, failover_grace_s="soon"))
    assert not bad.takes_any and bad.grace_s == 3.0
    assert bad.problems == (
        "connection_config.failover_grace_s must be seconds >= 0; using 3",
        'connection_config.failover_symbols must be "*", a glob or a list of symbols; '
        "taking no failover traffic",
    )
    # A bad value is reported whatever the rest of the policy is.
    for spec in ("*", "A*", ["A"]):
        policy = failover_policy(provider("A", failover_symbols=spec, failback_hold_s=-1))
        assert policy.takes_any and policy.hold_s == 30.0
        assert policy.problems == ("connection_config.failback_hold_s must be seconds >= 0; "
                                   "using 30",)  # fmt: skip


def test_backups_that_cannot_serve_the_symbol_are_skipped() -> None:
    w = World(
        [
            provider("P", 1),
            provider("Q1", 2, failover_symbols="*"),  # its only instance is DISCONNECTED
            provider("Q2", 3, failover_symbols="*"),  # refuses the symbol
            provider("Q3", 4, failover_symbols="*"),  # no live instance
            provider("Q4", 5, failover_symbols="*"),
        ],
        subs("P", "A"),
    )
    for iid, pid in (("p1", "P"), ("a1", "Q1"), ("b1", "Q2"), ("d1", "Q4")):
        w.start(iid, pid)
    w.report("a1", "DISCONNECTED")
    w.report("b1", unavailable={"A"})
    w.step(0)
    w.kill("p1")
    w.step(1)
    assert w.held("A") == {("P", FAILOVER, "Q4", "d1", True)}


def test_with_no_backup_the_primary_keeps_its_row() -> None:
    w = World([provider("P", 1)], subs("P", "A"))
    w.start("p1", "P")
    w.step(0)
    w.report("p1", "DISCONNECTED")
    plan = w.step(100)  # long past its grace
    assert w.held("A") == {("P", PRIMARY, "P", "p1", True)}
    assert plan.failover == set() and plan.events == []
    assert plan.stranded == {("P", "A"): "DISCONNECTED for 100.0 s"}
    assert plan.needy == {"A"}  # re-planned when any provider changes: a backup may appear


def _failed_over() -> World:
    """P's symbols A and B served by Q since P's instance died at t=1."""
    w = World(
        [provider("P", 1, failback_hold_s=30), provider("Q", 2, failover_symbols="*")],
        subs("P", "A", "B"),
    )
    w.start("p1", "P")
    w.start("q1", "Q")
    w.step(0)
    w.kill("p1")
    w.step(1)
    assert w.held("A") == w.held("B") == {("P", FAILOVER, "Q", "q1", True)}
    return w


def test_failback_waits_for_the_hold_down_then_makes_before_it_breaks() -> None:
    w = _failed_over()
    w.now = 10
    w.start("p2", "P", since=10)  # P is back, CONNECTED at t=10
    plan = w.step(10)
    assert w.held("A") == {("P", FAILOVER, "Q", "q1", True)}
    assert plan.wake_at == 40
    assert w.step(39.9).events == []
    assert w.held("A") == {("P", FAILOVER, "Q", "q1", True)}
    plan = w.step(40)
    # Make: P's row beside the backup's, which still serves and writes latest.
    both = {("P", FAILOVER, "Q", "q1", True), ("P", FAILBACK, "P", "p2", False)}
    assert w.held("A") == w.held("B") == both
    assert plan.failover == {("P", "A"), ("P", "B")}  # still served by the backup
    assert kinds(plan) == [(FAILBACK_STARTED, "A", "Q", "P"), (FAILBACK_STARTED, "B", "Q", "P")]
    assert plan.waiting == {"A", "B"}
    assert w.step(45).events == [] and w.held("A") == both  # not flowing yet: nothing breaks
    # Break: A flows on P; P's row becomes primary and the backup's goes.
    w.report("p2", flowing={"A"})
    plan = w.step(46)
    assert w.held("A") == {("P", PRIMARY, "P", "p2", True)}
    assert w.held("B") == both
    assert kinds(plan) == [(FAILBACK, "A", "Q", "P")]
    assert plan.events[0].detect_s == 36  # healthy since t=10
    assert plan.failover == {("P", "B")}
    w.report("p2", flowing={"A", "B"})
    plan = w.step(47)
    assert w.held("B") == {("P", PRIMARY, "P", "p2", True)} and plan.failover == set()


def test_the_hold_down_restarts_when_the_provider_fails_during_it() -> None:
    w = _failed_over()
    w.now = 10
    w.start("p2", "P", since=10)
    w.step(10)
    w.now = 20
    w.report("p2", "DISCONNECTED")
    w.step(20)
    w.now = 25
    w.report("p2", "CONNECTED")
    assert w.step(25).wake_at == 55
    assert w.step(54).events == []
    assert kinds(w.step(55))[0] == (FAILBACK_STARTED, "A", "Q", "P")


def _fail_back(w: World, at: float, iid: str) -> None:
    """P (instance ``iid``) back at ``at`` - hold; failback starts at ``at`` and completes."""
    plan = w.step(at)
    assert kinds(plan)[0][0] == FAILBACK_STARTED, kinds(plan)
    w.report(iid, flowing={"A", "B"})
    assert {e.kind for e in w.step(at + 1).events} == {FAILBACK}
    assert w.held("A") == {("P", PRIMARY, "P", iid, True)}


def test_a_provider_failing_again_soon_after_a_failback_gets_a_doubled_hold_down() -> None:
    w = _failed_over()
    w.now = 10
    w.start("p2", "P", since=10)
    _fail_back(w, 40, "p2")  # hold-down 30 s
    w.kill("p2")  # within 5 minutes of that failback
    w.step(100)
    w.now = 110
    w.start("p3", "P", since=110)
    assert w.step(110).wake_at == 170  # 60 s now
    assert w.step(169).events == []
    _fail_back(w, 170, "p3")
    w.kill("p3")
    w.step(200)
    w.now = 210
    w.start("p4", "P", since=210)
    assert w.step(210).wake_at == 330  # 120 s
    _fail_back(w, 330, "p4")
    # Stable for more than 5 minutes after the failback: the next failure is the base again.
    w.kill("p4")
    w.step(700)
    w.now = 710
    w.start("p5", "P", since=710)
    assert w.step(710).wake_at == 740


def test_the_doubled_hold_down_is_capped() -> None:
    w = World(
        [provider("P", 1, failback_hold_s=400), provider("Q", 2, failover_symbols="*")],
        subs("P", "A", "B"),
    )
    w.start("q1", "Q")
    w.step(0)  # P never had an instance: its symbols are on Q from the start
    assert w.held("A") == {("P", FAILOVER, "Q", "q1", True)}
    w.start("p1", "P", since=0)
    _fail_back(w, 400, "p1")
    w.kill("p1")
    w.step(410)
    w.now = 420
    w.start("p2", "P", since=420)
    assert w.step(420).wake_at == 420 + MAX_HOLD_S


def test_a_failback_that_fails_is_abandoned_and_the_hold_down_doubles() -> None:
    w = _failed_over()
    w.now = 10
    w.start("p2", "P", since=10)
    assert kinds(w.step(40))[0][0] == FAILBACK_STARTED
    w.report("p2", unavailable={"A"})  # P refuses A once it subscribes it again
    plan = w.step(41)
    assert w.held("A") == {("P", FAILOVER, "Q", "q1", True)}  # the backup never stopped
    assert (FAILBACK_ABORTED, "A", "P", "Q") in kinds(plan)
    [aborted] = [e for e in plan.events if e.kind == FAILBACK_ABORTED]
    assert (aborted.why, aborted.detect_s) == ("symbol unavailable", 0.0)
    assert w.held("B") == {("P", FAILOVER, "Q", "q1", True), ("P", FAILBACK, "P", "p2", False)}
    # A left P's wanted set, so P no longer reports it; it waits a doubled hold-down from
    # when it was last refused.
    w.report("p2", unavailable=set())
    assert w.step(42).wake_at == 41 + 60
    assert not any(e.symbol == "A" for e in w.step(100).events)
    assert (FAILBACK_STARTED, "A", "Q", "P") in kinds(w.step(101))


def test_a_backup_that_fails_hands_the_symbol_on() -> None:
    w = World(
        [
            provider("P", 1),
            provider("Q", 2, failover_symbols="*"),
            provider("R", 3, failover_symbols="*"),
        ],
        subs("P", "A"),
    )
    for iid, pid in (("p1", "P"), ("q1", "Q"), ("r1", "R")):
        w.start(iid, pid)
    w.step(0)
    w.kill("p1")
    w.step(1)
    w.kill("q1")
    plan = w.step(2)
    assert w.held("A") == {("P", FAILOVER, "R", "r1", True)}
    assert kinds(plan) == [(FAILOVER, "A", "Q", "R")]
    # P is back but in its hold-down; R fails: P takes it at once rather than nobody.
    w.now = 3
    w.start("p2", "P", since=3)
    w.step(3)
    w.kill("r1")
    plan = w.step(4)
    assert w.held("A") == {("P", PRIMARY, "P", "p2", True)}
    assert kinds(plan) == [(FAILBACK, "A", "R", "P")]


def _on_backup(*backups: ProviderConfig) -> World:
    """P's symbol A served by Q (grace 3 s) since P died at t=1; ``backups`` stand by."""
    w = World([provider("P", 1), provider("Q", 2, failover_symbols="*"), *backups], subs("P", "A"))
    w.start("q1", "Q")
    for b in backups:
        w.start(f"{b.id.lower()}1", b.id)
    w.step(0)
    assert w.held("A") == {("P", FAILOVER, "Q", "q1", True)}
    return w


def test_a_backup_hands_on_with_the_reason_and_time_of_its_failure() -> None:
    w = _on_backup(provider("R", 3, failover_symbols=["A"]))  # a list: takes A by name
    w.now = 2
    w.report("q1", "DISCONNECTED")
    plan = w.step(4)  # within Q's grace: A stays on Q although R could take it
    assert w.held("A") == {("P", FAILOVER, "Q", "q1", True)} and plan.events == []
    plan = w.step(5)
    assert w.held("A") == {("P", FAILOVER, "R", "r1", True)}
    [e] = plan.events
    assert (e.kind, e.from_provider_id, e.to_provider_id) == (FAILOVER, "Q", "R")
    assert (e.why, e.detect_s) == ("backup q: DISCONNECTED for 3.0 s", 3.0)


def test_a_backup_refusing_the_symbol_hands_it_on_at_once() -> None:
    w = _on_backup(provider("R", 3, failover_symbols="*"))
    w.report("q1", unavailable={"A"})
    plan = w.step(1)
    assert w.held("A") == {("P", FAILOVER, "R", "r1", True)}
    assert [(e.why, e.detect_s) for e in plan.events] == [("backup q: symbol unavailable", 0.0)]


@pytest.mark.parametrize("change", ["disabled", "removed", "stops taking it"])
def test_a_backup_switched_off_hands_the_symbol_on(change: str) -> None:
    w = _on_backup(provider("R", 3, failover_symbols="*"))
    if change == "removed":
        del w.providers[1]
    elif change == "disabled":
        w.providers[1] = replace(w.providers[1], enabled=False)
    else:
        w.providers[1] = replace(w.providers[1], connection_config={})
    plan = w.step(1)
    assert w.held("A") == {("P", FAILOVER, "R", "r1", True)}
    why = {"disabled": "backup q: provider disabled", "removed": "backup Q: removed"}
    # A backup that no longer takes failover traffic is still UP: it says why not.
    assert [e.why for e in plan.events] == [why.get(change, "backup q: symbol unavailable")]


def test_the_primary_takes_back_at_once_from_a_backup_switched_off() -> None:
    w = _on_backup()
    w.now = 5
    w.start("p1", "P", since=5)  # P back, long before its hold-down ends
    w.step(5)
    w.providers[1] = replace(w.providers[1], enabled=False)
    plan = w.step(6)
    assert w.held("A") == {("P", PRIMARY, "P", "p1", True)}
    [e] = plan.events
    assert (e.kind, e.why, e.detect_s) == (FAILBACK, "backup q cannot serve it", 1.0)


def test_failed_over_symbols_stay_put_across_a_backups_instances() -> None:
    symbols = [f"S{i}" for i in range(20)]
    w = World([provider("P", 1), provider("Q", 2, failover_symbols="*")], subs("P", *symbols))
    w.start("q1", "Q")
    w.start("q2", "Q")
    w.step(0)
    first = {r.symbol: r.instance_id for r in w.rows}
    assert set(first.values()) == {"q1", "q2"}  # spread as the backup's own symbols would be
    for t in (1, 2):
        w.step(t)
        assert {r.symbol: r.instance_id for r in w.rows} == first  # and nothing churns


def test_the_earliest_of_a_grace_and_a_hold_down_wakes_the_coordinator() -> None:
    w = World(
        [
            provider("P", 1, failback_hold_s=30),
            provider("Q", 2, failover_symbols="*"),
            provider("X", 3, failover_grace_s=3),
            provider("Y", 4, failover_grace_s=5),
        ],
        subs("P", "A") + subs("X", "B") + subs("Y", "C"),
    )
    for iid, pid in (("q1", "Q"), ("x1", "X"), ("y1", "Y")):
        w.start(iid, pid)
    w.step(0)
    w.now = 10
    w.start("p1", "P", since=10)  # P's hold-down runs to 40
    w.report("y1", "DISCONNECTED")  # Y's grace to 15
    w.report("x1", "DISCONNECTED")  # X's grace to 13
    assert w.step(10).wake_at == 13


def test_a_disabled_provider_fails_over_and_back_when_enabled() -> None:
    p = provider("P", 1, failback_hold_s=5)
    w = World([p, provider("Q", 2, failover_symbols="*")], subs("P", "A"))
    w.start("p1", "P")
    w.start("q1", "Q")
    w.step(0)
    w.providers[0] = replace(p, enabled=False)
    plan = w.step(1)
    assert w.held("A") == {("P", FAILOVER, "Q", "q1", True)}
    assert plan.events[0].why == "provider disabled"
    w.providers[0] = p
    assert w.step(2).wake_at == 7
    assert kinds(w.step(7)) == [(FAILBACK_STARTED, "A", "Q", "P")]


def test_one_latest_row_per_symbol_across_providers() -> None:
    w = World(
        [provider("P1", 1), provider("P2", 2, failover_symbols="*"), provider("P3", 3)],
        subs("P1", "A") + subs("P2", "A") + subs("P3", "A"),
    )
    for iid, pid in (("a", "P1"), ("b", "P2"), ("c", "P3")):
        w.start(iid, pid)
    w.step(0)
    assert w.held("A") == {
        ("P1", PRIMARY, "P1", "a", True),
        ("P2", PRIMARY, "P2", "b", False),
        ("P3", PRIMARY, "P3", "c", False),
    }
    w.kill("a")
    w.step(1)
    # P2 now serves A twice over (its own and P1's); its own row writes latest.
    assert w.held("A") == {
        ("P1", FAILOVER, "P2", "b", False),
        ("P2", PRIMARY, "P2", "b", True),
        ("P3", PRIMARY, "P3", "c", False),
    }
    w.now = 2
    w.report("b", "DISCONNECTED")  # P2 in its grace: P3 is the one really serving A
    w.step(2)
    assert [r.provider_id for r in w.rows if r.latest] == ["P3"]


# A small world of at most four providers, three instances each and three symbols.
_STATUS = st.sampled_from(["CONNECTED", "CONNECTED", "DISCONNECTED", "CONNECTING", "ERROR"])
_SYMBOLS = ["A", "B", "C"]
_instance = st.tuples(
    _STATUS,
    st.floats(0, 10),
    st.sets(st.sampled_from(_SYMBOLS)),
    st.sets(st.sampled_from(_SYMBOLS)),
)
_provider = st.tuples(
    st.integers(1, 3),  # priority: ties are likely
    st.booleans(),  # enabled
    st.sampled_from([None, "*", "A*", ["B"]]),  # failover_symbols
    st.sets(st.sampled_from(_SYMBOLS)),  # subscribed
    st.lists(_instance, max_size=3),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(_provider, min_size=1, max_size=4), min_size=1, max_size=4))
def test_exactly_one_latest_row_the_best_serving_provider(worlds: list[list[Any]]) -> None:
    """Whatever the states, over a few passes: each subscribed symbol with rows has
    exactly one latest row, never a failback row, and no row of a healthy server (a live
    CONNECTED instance not refusing the symbol) outranks it; each subscription is served
    by one row, plus a failback row only beside a failover one."""
    memory, rows = Memory(), list[db.Assignment]()
    for step, spec in enumerate(worlds):
        now = 10.0 * step
        providers, subscriptions, instances = [], [], []
        for n, (priority, enabled, takes, symbols, insts) in enumerate(spec):
            pid = f"P{n}"
            config = {} if takes is None else {"failover_symbols": takes}
            providers.append(provider(pid, priority, enabled=enabled, failover_grace_s=3, **config))
            subscriptions += subs(pid, *sorted(symbols))
            for k, (status, age, unavailable, flowing) in enumerate(insts):
                instances.append(
                    db.LiveInstance(
                        f"{pid}-{k}",
                        pid,
                        "h",
                        status,
                        age,
                        0.0,
                        frozenset(unavailable),
                        frozenset(flowing),
                    )
                )
        plan = plan_assignments(subscriptions, providers, instances, rows, now, memory)
        rows, memory = plan.rows, plan.memory
        rank = {p.id: (p.priority, p.name) for p in providers}
        healthy = {
            (i.instance_id, s)
            for i in instances
            if i.status == "CONNECTED"
            for s in _SYMBOLS
            if s not in i.unavailable
        }
        enabled_ids = {p.id for p in providers if p.enabled}
        for symbol in _SYMBOLS:
            mine = [r for r in rows if r.symbol == symbol]
            if not mine:
                continue
            latest = [r for r in mine if r.latest]
            assert len(latest) == 1, mine
            assert latest[0].reason != FAILBACK
            serving = [
                r for r in mine
                if r.reason != FAILBACK and r.server in enabled_ids
                and (r.instance_id, symbol) in healthy
            ]  # fmt: skip
            if serving:
                # Where anyone really serves it, latest is with the best of those.
                assert latest[0] in serving, mine
                assert rank[latest[0].server] == min(rank[r.server] for r in serving), mine
        for sub in subscriptions:
            reasons = sorted(
                r.reason for r in rows if (r.provider_id, r.symbol) == (sub.provider_id, sub.symbol)
            )
            assert reasons in ([], [PRIMARY], [FAILOVER], [FAILBACK, FAILOVER]), (sub, reasons)


# ---------------------------------------------------------------- the coordinator, for real

POLL_S = 300.0
WAIT_S = 30.0  # generous: each step takes well under a second when the machine is idle


class FakeWorker:
    """A worker_instances row kept as a worker keeps it, on its own connection."""

    def __init__(self, services: Services, instance_id: str, provider_id: str) -> None:
        self.services = services
        self.instance_id = instance_id
        self.provider_id = provider_id
        self._conn: db.Conn | None = None
        self._beat: asyncio.Task[None] | None = None

    async def __aenter__(self) -> FakeWorker:
        self._conn = await db.connect(self.services.database_url)
        await db.register_instance(
            self._conn, self.instance_id, self.provider_id, f"host-{self.instance_id}", 1
        )
        self._beat = asyncio.create_task(self._heartbeat())
        return self

    async def _heartbeat(self) -> None:
        assert self._conn is not None
        while True:
            await db.heartbeat_instance(self._conn, self.instance_id)
            await asyncio.sleep(0.25)  # the pace of a worker's heartbeat, not a wait for state

    async def report(
        self, status: str, *, unavailable: list[str] | None = None, flowing: list[str] | None = None
    ) -> None:
        assert self._conn is not None
        assert await db.report_instance_state(
            self._conn, self.instance_id, status, unavailable or [], flowing or []
        )

    async def kill(self) -> None:
        """As kill -9: the heartbeats stop, the row stays."""
        if self._beat is not None:
            self._beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beat
            self._beat = None

    async def __aexit__(self, *exc: object) -> None:
        alive = self._beat is not None
        await self.kill()
        assert self._conn is not None
        if alive:
            await db.remove_instance(self._conn, self.instance_id)
        await self._conn.close()


@pytest.fixture
async def coordinator(services: Services) -> AsyncIterator[Coordinator]:
    async with running(Coordinator(services.settings(), poll_s=POLL_S)) as c:

        async def state() -> State:
            return c.state

        await eventually(state, lambda s: s is State.ACTIVE, "the coordinator to be active")
        yield c


Held = dict[str, set[tuple[str, str, str, bool]]]


async def held(conn: db.Conn, provider_id: str) -> Held:
    """Provider's subscriptions' rows by symbol: (reason, serving provider, instance, latest)."""
    out: Held = {}
    for r in await db.current_assignments(conn):
        if r.provider_id == provider_id:
            out.setdefault(r.symbol, set()).add((r.reason, r.server, r.instance_id, r.latest))
    return out


async def statuses(conn: db.Conn, provider_id: str) -> dict[str, str]:
    cur = await conn.execute(
        "SELECT instrument_symbol, status FROM subscriptions WHERE provider_id = %s",
        (provider_id,),
    )
    return dict(await cur.fetchall())


async def handovers(conn: db.Conn, provider_id: str) -> list[tuple[str, str]]:
    cur = await conn.execute(
        "SELECT status, error_message FROM provider_connections "
        "WHERE provider_id = %s AND status IN ('FAILOVER', 'FAILBACK') ORDER BY id",
        (provider_id,),
    )
    return list(await cur.fetchall())


async def _pair(conn: db.Conn, tag: str, symbols: list[str], **primary: Any) -> tuple[str, str]:
    """A primary provider subscribed to ``symbols`` and a backup taking just those."""
    p = await db.upsert_provider(conn, f"fo-p-{tag}", "polygon", primary, priority=1)
    q = await db.upsert_provider(
        conn, f"fo-q-{tag}", "iex", {"failover_symbols": symbols}, priority=2
    )
    await db.subscribe(conn, p, symbols, [DataType.TRADE])
    return p, q


def _all(symbols: list[str], rows: set[tuple[str, str, str, bool]]) -> Held:
    return {s: rows for s in symbols}


async def test_failover_and_make_before_break_failback(
    coordinator: Coordinator, conn: db.Conn, services: Services
) -> None:
    tag = uuid.uuid4().hex[:6]
    symbols = [f"FO{tag}{i}".upper() for i in range(3)]
    p, q = await _pair(conn, tag, symbols, failover_grace_s=0.5, failback_hold_s=1.0)
    async with (
        FakeWorker(services, f"p1-{tag}", p) as p1,
        FakeWorker(services, f"q1-{tag}", q) as q1,
    ):
        await p1.report("CONNECTED")
        await q1.report("CONNECTED")
        primary = _all(symbols, {(PRIMARY, p, p1.instance_id, True)})
        await eventually(
            lambda: held(conn, p), lambda h: h == primary, "P serving its symbols", WAIT_S
        )

        await p1.report("DISCONNECTED")  # over its 0.5 s grace: no notification comes then
        on_backup = _all(symbols, {(FAILOVER, q, q1.instance_id, True)})
        await eventually(
            lambda: held(conn, p),
            lambda h: h == on_backup,
            "every symbol failed over to the backup",
            WAIT_S,
        )
        assert await statuses(conn, p) == dict.fromkeys(symbols, "failover")
        [(status, message)] = await handovers(conn, p)
        assert status == "FAILOVER"
        assert f"from fo-p-{tag} to fo-q-{tag}" in message and all(s in message for s in symbols)
        await _check_api(services, p_name=f"fo-p-{tag}", q_name=f"fo-q-{tag}", symbols=symbols)

        await p1.report("CONNECTED")  # back: after its 1 s hold-down P gets failback rows
        making = _all(
            symbols, {(FAILOVER, q, q1.instance_id, True), (FAILBACK, p, p1.instance_id, False)}
        )
        await eventually(
            lambda: held(conn, p),
            lambda h: h == making,
            "failback rows beside the backup's, latest still with it",
            WAIT_S,
        )
        assert await statuses(conn, p) == dict.fromkeys(symbols, "failover")

        await p1.report("CONNECTED", flowing=symbols)  # the symbols flow on P again
        await eventually(
            lambda: held(conn, p),
            lambda h: h == primary,
            "P primary again and the backup's rows gone",
            WAIT_S,
        )
        assert await statuses(conn, p) == dict.fromkeys(symbols, "active")
        assert [s for s, _ in await handovers(conn, p)] == ["FAILOVER", "FAILBACK"]


async def test_a_dead_worker_fails_over_once_its_heartbeat_times_out(
    coordinator: Coordinator, conn: db.Conn, services: Services
) -> None:
    tag = uuid.uuid4().hex[:6]
    symbols = [f"FK{tag}{i}".upper() for i in range(3)]
    p, q = await _pair(conn, tag, symbols)
    async with (
        FakeWorker(services, f"p1-{tag}", p) as p1,
        FakeWorker(services, f"q1-{tag}", q) as q1,
    ):
        await p1.report("CONNECTED")
        await q1.report("CONNECTED")
        await eventually(
            lambda: held(conn, p),
            lambda h: h == _all(symbols, {(PRIMARY, p, p1.instance_id, True)}),
            "P serving its symbols",
            WAIT_S,
        )
        await p1.kill()  # nobody tells the coordinator: the heartbeat simply stops
        await eventually(
            lambda: held(conn, p),
            lambda h: h == _all(symbols, {(FAILOVER, q, q1.instance_id, True)}),
            "the symbols on the backup after the instance timeout",
            WAIT_S,
        )


async def test_only_the_refused_symbol_fails_over(
    coordinator: Coordinator, conn: db.Conn, services: Services
) -> None:
    tag = uuid.uuid4().hex[:6]
    symbols = [f"FU{tag}{i}".upper() for i in range(3)]
    p, q = await _pair(conn, tag, symbols)
    async with (
        FakeWorker(services, f"p1-{tag}", p) as p1,
        FakeWorker(services, f"q1-{tag}", q) as q1,
    ):
        await p1.report("CONNECTED")
        await q1.report("CONNECTED")
        await eventually(
            lambda: held(conn, p), lambda h: len(h) == 3, "P serving its symbols", WAIT_S
        )
        await p1.report("CONNECTED", unavailable=[symbols[1]])
        want = _all(symbols, {(PRIMARY, p, p1.instance_id, True)})
        want[symbols[1]] = {(FAILOVER, q, q1.instance_id, True)}
        await eventually(
            lambda: held(conn, p),
            lambda h: h == want,
            "the refused symbol alone on the backup",
            WAIT_S,
        )
        assert await statuses(conn, p) == {
            s: "failover" if s == symbols[1] else "active" for s in symbols
        }


async def test_a_standby_coordinator_finishes_a_failback_the_killed_one_began(
    conn: db.Conn, services: Services
) -> None:
    tag = uuid.uuid4().hex[:6]
    symbols = [f"FT{tag}{i}".upper() for i in range(3)]
    p, q = await _pair(conn, tag, symbols, failover_grace_s=0.5, failback_hold_s=0.5)
    first = Coordinator(services.settings(), poll_s=POLL_S)
    second = Coordinator(services.settings(), poll_s=POLL_S)

    async def states() -> tuple[State, State]:
        return first.state, second.state

    async with (
        running(first),
        running(second),
        FakeWorker(services, f"p1-{tag}", p) as p1,
        FakeWorker(services, f"q1-{tag}", q) as q1,
    ):
        await eventually(
            states,
            lambda s: State.ACTIVE in s and State.STANDBY in s,
            "one coordinator active, one standing by",
        )
        active, standby = (first, second) if first.active else (second, first)
        await p1.report("CONNECTED")
        await q1.report("CONNECTED")
        await p1.report("DISCONNECTED")
        await eventually(
            lambda: held(conn, p),
            lambda h: h == _all(symbols, {(FAILOVER, q, q1.instance_id, True)}),
            "the symbols failed over",
            WAIT_S,
        )
        await p1.report("CONNECTED")
        making = _all(
            symbols, {(FAILOVER, q, q1.instance_id, True), (FAILBACK, p, p1.instance_id, False)}
        )
        await eventually(lambda: held(conn, p), lambda h: h == making, "the failback begun", WAIT_S)
        await conn.execute("SELECT pg_terminate_backend(%s)", (active.backend_pid,))
        await eventually(
            states,
            lambda s: standby.state is State.ACTIVE,
            "the standby to take over",
            WAIT_S,
        )
        await p1.report("CONNECTED", flowing=symbols)
        await eventually(
            lambda: held(conn, p),
            lambda h: h == _all(symbols, {(PRIMARY, p, p1.instance_id, True)}),
            "the new coordinator to finish the failback",
            WAIT_S,
        )
        assert await statuses(conn, p) == dict.fromkeys(symbols, "active")


async def test_short_passes_follow_failover_as_a_full_pass_would(
    services: Services, conn: db.Conn
) -> None:
    """Every step's short pass plans only the symbols it affects; a full pass after it
    finds nothing to change."""
    tag = uuid.uuid4().hex[:6]
    symbols = [f"FS{tag}{i}".upper() for i in range(12)]
    p, q = await _pair(conn, tag, symbols, failover_grace_s=0, failback_hold_s=0)
    # Instances here do not heartbeat; they stay live for the whole test.
    coordinator = Coordinator(services.settings(), instance_timeout_s=300)
    p1, p2, q1 = f"p1-{tag}", f"p2-{tag}", f"q1-{tag}"
    for iid, pid in ((p1, p), (p2, p), (q1, q)):
        await db.register_instance(conn, iid, pid, f"h-{iid}", 1)
        await db.report_instance_state(conn, iid, "CONNECTED", [], [])
    await coordinator.reconcile(conn)
    before = await held(conn, p)
    on_p1 = sorted(s for s, rows in before.items() if any(r[2] == p1 for r in rows))
    assert on_p1 and len(on_p1) < len(symbols)

    async def step(change: Any, what: str) -> Held:
        await change
        await coordinator.reconcile(conn, full=False)
        after_short = await held(conn, p)
        assert await coordinator.reconcile(conn, full=True) == 0, f"short pass missed: {what}"
        assert await held(conn, p) == after_short
        return after_short

    h = await step(db.report_instance_state(conn, p1, "CONNECTED", on_p1[:1], []), "refused")
    assert all(r[2] == p2 for r in h[on_p1[0]])  # moved within P
    h = await step(db.report_instance_state(conn, p2, "DISCONNECTED", [], []), "p2 down")
    assert {r[0] for s in symbols for r in h[s] if s != on_p1[0]} == {PRIMARY}
    assert h[on_p1[0]] == {(FAILOVER, q, q1, True)}
    h = await step(db.report_instance_state(conn, p1, "DISCONNECTED", [], []), "all of P down")
    assert h == _all(symbols, {(FAILOVER, q, q1, True)})
    h = await step(db.report_instance_state(conn, p2, "CONNECTED", [], []), "P back")
    assert all({r[0] for r in h[s]} == {FAILOVER, FAILBACK} for s in symbols)
    h = await step(db.report_instance_state(conn, p2, "CONNECTED", [], symbols[:5]), "flowing")
    assert all(h[s] == {(PRIMARY, p, p2, True)} for s in symbols[:5])
    h = await step(db.report_instance_state(conn, p1, "CONNECTED", [], []), "p1 back")
    h = await step(db.report_instance_state(conn, p2, "CONNECTED", [], symbols), "all flowing")
    h = await step(db.report_instance_state(conn, p1, "CONNECTED", [], symbols), "p1 flowing")
    assert all(len(rows) == 1 and next(iter(rows))[0] == PRIMARY for rows in h.values())
    assert await statuses(conn, p) == dict.fromkeys(symbols, "active")
    for iid in (p1, p2, q1):
        await db.remove_instance(conn, iid)


# ---------------------------------------------------------------- the API


async def _check_api(services: Services, *, p_name: str, q_name: str, symbols: list[str]) -> None:
    async with TestClient(TestServer(build_app(services.settings()))) as client:
        resp = await client.get("/api/v1/assignments")
        assert resp.status == 200
        rows = [r for r in await resp.json() if r["provider"] == p_name]
        assert sorted(r["symbol"] for r in rows) == sorted(symbols)
        for r in rows:
            assert r["served_by"] == q_name and r["reason"] == FAILOVER and r["latest"] is True
            assert r["instance_id"].startswith("q1-") and "T" in r["since"]
        resp = await client.get("/health")
        failover = (await resp.json())["failover"]
        assert p_name in failover["providers_failed_over"]
        assert failover["symbols_in_failover"] >= len(symbols)


# ---------------------------------------------------------------- edges of the planner


def test_a_new_coordinator_trusts_how_long_instances_have_been_down() -> None:
    """Without memory the first pass dates a failure by the instances' status_since: an
    instance DISCONNECTED for 100 s is past its 3 s grace now, not 3 s from now."""
    w = World([provider("P", 1), provider("Q", 2, failover_symbols="*")], subs("P", "A"))
    w.start("p1", "P", status="DISCONNECTED", since=-100.0)
    w.start("q1", "Q")
    plan = w.step(0)
    assert w.held("A") == {("P", FAILOVER, "Q", "q1", True)}
    [event] = plan.events
    assert (event.kind, event.why, event.detect_s) == (FAILOVER, "DISCONNECTED for 100.0 s", 100.0)


def test_a_provider_without_any_instance_fails_over_detected_now() -> None:
    w = World([provider("P", 1), provider("Q", 2, failover_symbols="*")], subs("P", "A"))
    w.start("q1", "Q")
    [event] = w.step(5).events
    assert (event.kind, event.why, event.detect_s) == (FAILOVER, "no live instance", 0.0)
    assert w.memory.unhealthy_since == {"P": 5.0}


def test_the_reason_names_every_status_of_the_instances() -> None:
    w = World([provider("P", 1), provider("Q", 2, failover_symbols="*")], subs("P", "A"))
    w.start("p1", "P", status="ERROR", since=-10.0)
    w.start("p2", "P", status="DISCONNECTED", since=-20.0)
    w.start("q1", "Q")
    [event] = w.step(0).events
    assert event.why == "DISCONNECTED/ERROR for 10.0 s"


def test_failing_again_five_minutes_after_a_failback_is_no_flap() -> None:
    """At FLAP_WINDOW_S after the failback (not only beyond it) the hold-down stays the base."""
    w = _failed_over()
    w.now = 10
    w.start("p2", "P", since=10)
    _fail_back(w, 40, "p2")  # starts at 40
    w.kill("p2")
    w.step(40 + 300)
    w.now = 350
    w.start("p3", "P", since=350)
    assert w.step(350).wake_at == 380  # 30 s, not doubled


def test_a_later_loss_under_the_same_failback_brings_the_hold_down_back_to_its_base() -> None:
    """A refused within five minutes of the failback doubles the hold-down; B refused long
    after, under that same failback, is no flap: the hold-down is the base again."""
    w = _failed_over()
    w.now = 10
    w.start("p2", "P", since=10)
    _fail_back(w, 40, "p2")  # completes at 41
    w.now = 50
    w.report("p2", unavailable={"A"})
    w.step(50)
    assert w.held("A") == {("P", FAILOVER, "Q", "q1", True)}
    w.now = 400
    w.report("p2", unavailable={"A", "B"})
    w.step(400)
    w.now = 401
    w.report("p2", unavailable=set())
    assert w.step(401).wake_at == 430  # from the last refusal, the base 30 s


def test_stranded_symbols_stay_on_a_live_instance_not_refusing_them() -> None:
    """Nobody can serve them (P down past its grace, no backup): each keeps a row on one
    of P's live instances that does not refuse it, chosen by symbol, so it resumes there."""
    symbols = [f"S{i}" for i in range(40)]
    w = World([provider("P", 1)], subs("P", *symbols))
    w.start("p1", "P", status="DISCONNECTED", since=-100.0)
    w.start("p2", "P", status="DISCONNECTED", since=-100.0)
    w.start("p3", "P", status="DISCONNECTED", since=-100.0)
    w.report("p3", unavailable=set(symbols))
    plan = w.step(0)
    assert plan.stranded == {("P", s): "DISCONNECTED for 100.0 s" for s in symbols}
    chosen = {s: next(iter(w.held(s)))[3] for s in symbols}
    assert set(chosen.values()) == {"p1", "p2"}  # spread by symbol, never on p3
    assert all(w.held(s) == {("P", PRIMARY, "P", chosen[s], True)} for s in symbols)


def test_a_stranded_failed_over_symbol_keeps_its_backup_row() -> None:
    """P is down and its backup Q dies too, with nobody else to take A: stranded, with P's
    reason, and the row stays with Q's instance for when Q comes back."""
    w = _failed_over()
    w.kill("q1")
    plan = w.step(2)
    assert plan.stranded == {("P", "A"): "no live instance", ("P", "B"): "no live instance"}
    assert w.held("A") == {("P", FAILOVER, "Q", "q1", True)}


def test_a_subscription_of_an_unknown_provider_does_not_hide_the_others() -> None:
    w = World([provider("P", 1)], subs("GONE", "A") + subs("P", "A"))
    w.start("p1", "P")
    w.step(0)
    assert w.held("A") == {("P", PRIMARY, "P", "p1", True)}


def test_latest_goes_to_the_best_serving_provider_by_priority_not_by_id() -> None:
    """Two providers serve A; the one with the better priority writes latest, whatever
    their ids; a disabled one, or one whose instance refuses A, never does."""
    w = World([provider("Z", 1), provider("B", 2)], subs("Z", "A") + subs("B", "A"))
    w.start("z1", "Z")
    w.start("b1", "B")
    w.step(0)
    assert [r.provider_id for r in w.rows if r.latest] == ["Z"]
    w.report("z1", unavailable={"A"})
    w.step(1)
    assert [r.provider_id for r in w.rows if r.latest] == ["B"]
    w.report("z1", unavailable=set())
    w.step(2)
    assert [r.provider_id for r in w.rows if r.latest] == ["Z"]


def test_the_coordinators_known_state_takes_a_plan_for_its_symbols_only() -> None:
    a_row = db.Assignment("P", "A", "p1", ("TRADE",), PRIMARY, "P", latest=True)
    b_row = db.Assignment("P", "B", "p1", ("TRADE",), PRIMARY, "P", latest=True)
    known = _Known.read(subs("P", "A", "B"), [a_row, b_row], set(), 0.0)
    known.stranded = {("P", "A"): "down", ("P", "B"): "down"}
    known.needy, known.waiting = {"A", "B"}, {"A", "B"}
    moved = db.Assignment("P", "A", "p2", ("TRADE",), PRIMARY, "P", latest=True)
    plan = Plan([moved], set(), {}, [], set(), {"A"}, None, Memory())
    known.apply({"A"}, plan)
    assert known.rows == {"A": [moved], "B": [b_row]}
    assert known.stranded == {("P", "B"): "down"}
    assert (known.needy, known.waiting) == ({"B"}, {"A", "B"})


def test_a_plan_forgets_old_refusals_only_of_the_symbols_it_planned() -> None:
    memory = Memory(blocked_at={("P", "A"): 1.0, ("P", "Z"): 2.0})
    live = [db.LiveInstance("p1", "P", "h", "CONNECTED", 100.0, 0.0)]
    health = assess_providers([provider("P", 1)], live, 10.0, memory)
    plan = plan_symbols(subs("P", "A"), [], health, 10.0)
    # A was planned and is not refused now: forgotten; Z was not planned: kept.
    assert plan.memory.blocked_at == {("P", "Z"): 2.0}


def test_names_in_the_log_fall_back_to_the_id() -> None:
    health = assess_providers([provider("P", 1)], [], 0.0, Memory())
    assert (_name(health, "P"), _name(health, "gone-id")) == ("p", "gone-id")


def _latest_of(w: World, symbol: str) -> tuple[str, str | None]:
    [row] = [r for r in w.rows if r.symbol == symbol and r.latest]
    return row.provider_id, row.serving_provider_id


def test_latest_prefers_the_best_server_over_a_primary_row() -> None:
    """P's A is on its backup Q (priority 2); R (priority 3) serves its own A: Q is the
    better server, so P's failover row writes latest, not R's primary one."""
    w = World(
        [provider("P", 1), provider("Q", 2, failover_symbols="*"), provider("R", 3)],
        subs("P", "A") + subs("R", "A"),
    )
    w.start("q1", "Q")
    w.start("r1", "R")
    w.step(0)
    assert _latest_of(w, "A") == ("P", "Q")


def test_latest_never_goes_to_a_disabled_or_removed_server() -> None:
    """P's A stays on Q's row when Q is switched off (or removed) with nobody else to take
    it; R's own A, in its grace, is not serving either: still R's row, not the row of a
    server that is off, writes latest (R outranks Q when Q is disabled; when Q is gone it
    ranks last whatever R's priority)."""
    for r_priority, change in ((1, "disable"), (100, "remove")):
        q = provider("Q", 2, failover_symbols="*")
        w = World([provider("P", 1), q, provider("R", r_priority)], subs("P", "A") + subs("R", "A"))
        w.start("q1", "Q")
        w.start("r1", "R")
        w.step(0)
        assert {h[:4] for h in w.held("A")} == {
            ("P", FAILOVER, "Q", "q1"),
            ("R", PRIMARY, "R", "r1"),
        }
        w.now = 1
        w.report("r1", "DISCONNECTED")  # R in its grace: its row stays, not serving
        if change == "disable":
            w.providers[1] = replace(q, enabled=False)
        else:
            del w.providers[1]
        w.step(1)
        assert {h[:4] for h in w.held("A")} == {
            ("P", FAILOVER, "Q", "q1"),
            ("R", PRIMARY, "R", "r1"),
        }
        assert _latest_of(w, "A") == ("R", "R"), change
