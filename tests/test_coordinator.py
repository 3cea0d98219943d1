"""Assignment planning, and the coordinator against a real PostgreSQL (failover itself is in
tests/test_failover.py)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import TypeVar

from common import db
from common.model import DataType
from common.provider import ProviderConfig
from tests.conftest import Services
from workers.coordinator import (
    COORDINATOR_LOCK,
    Coordinator,
    Memory,
    State,
    affected_symbols,
    assess_providers,
    diff_assignments,
    plan_assignments,
)

T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T]], ok: Callable[[T], bool], what: str, timeout: float = 15.0
) -> T:
    """Poll ``probe`` until ``ok`` holds; on timeout fail with what was last seen."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        seen = await probe()
        if ok(seen):
            return seen
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}; "
                                 f"last seen: {seen!r}")  # fmt: skip
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running(coordinator: Coordinator) -> AsyncIterator[Coordinator]:
    """Run it in this event loop; always stopped, so no later test finds the lock held."""
    task = asyncio.create_task(coordinator.run(handle_signals=False))
    try:
        yield coordinator
    finally:
        coordinator.stop()
        await asyncio.wait_for(task, 15)


async def lock_queue(conn: db.Conn) -> dict[int, bool]:
    """The coordinator lock as the server sees it: backend pid -> granted."""
    cur = await conn.execute(
        "SELECT pid, granted FROM pg_locks WHERE locktype = 'advisory' AND classid = 0 "
        "AND objid = %s::oid AND objsubid = 1 "
        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        (COORDINATOR_LOCK,),
    )
    return dict(await cur.fetchall())


def _subs(pid: str, n: int) -> list[db.Subscription]:
    return [db.Subscription(pid, f"S{i:03d}", ["TRADE"]) for i in range(n)]


def _assign(
    subs: list[db.Subscription], providers: list[ProviderConfig], instances: list[db.LiveInstance]
) -> list[db.Assignment]:
    return plan_assignments(subs, providers, instances, [], 0.0, Memory()).rows


def test_each_symbol_goes_to_exactly_one_live_instance() -> None:
    providers = [ProviderConfig("p1", "one", "polygon"), ProviderConfig("p2", "two", "iex")]
    inst = [db.LiveInstance("a", "p1", "h1"), db.LiveInstance("b", "p1", "h2"),
            db.LiveInstance("c", "p2", "h1")]  # fmt: skip
    out = _assign(_subs("p1", 200) + _subs("p2", 10), providers, inst)
    assert len(out) == 210
    p1 = [a for a in out if a.provider_id == "p1"]
    counts = {i: sum(a.instance_id == i for a in p1) for i in ("a", "b")}
    assert min(counts.values()) > 60  # spread across hosts, not all on one
    assert {a.instance_id for a in out if a.provider_id == "p2"} == {"c"}


def test_disabled_provider_or_no_instance_gets_nothing() -> None:
    providers = [ProviderConfig("p1", "one", "polygon", enabled=False),
                 ProviderConfig("p2", "two", "iex")]  # fmt: skip
    out = _assign(_subs("p1", 5) + _subs("p2", 5), providers, [db.LiveInstance("a", "p1", "h")])
    assert out == []


def test_an_instance_dying_moves_only_its_symbols() -> None:
    providers = [ProviderConfig("p1", "one", "polygon")]
    three = [db.LiveInstance(i, "p1", "h") for i in ("a", "b", "c")]
    subs = _subs("p1", 300)
    before = {a.symbol: a.instance_id for a in _assign(subs, providers, three)}
    after = {a.symbol: a.instance_id for a in _assign(subs, providers, three[:2])}
    moved = [s for s in before if before[s] != after[s]]
    assert moved and all(before[s] == "c" for s in moved)


def test_diff_assignments() -> None:
    a = db.Assignment("p", "X", "i1", ("TRADE",))
    b = db.Assignment("p", "Y", "i1", ("TRADE",))
    b2 = db.Assignment("p", "Y", "i2", ("TRADE",))
    c = db.Assignment("p", "Z", "i1", ("QUOTE",))
    remove, upsert = diff_assignments([a, b], [b2, c])
    # A move is a new row and the old one's removal: the key includes the instance.
    assert remove == [a, b] and upsert == [b2, c]
    latest = db.Assignment("p", "Z", "i1", ("QUOTE",), latest=True)
    assert diff_assignments([c], [latest]) == ([], [latest])
    assert diff_assignments([c], [c]) == ([], [])


def test_affected_symbols() -> None:
    a, b = db.LiveInstance("a", "p1", "h1"), db.LiveInstance("b", "p1", "h2")
    c = db.LiveInstance("c", "p2", "h1")
    providers = [ProviderConfig("p1", "one", "polygon"), ProviderConfig("p2", "two", "iex")]

    def sigs(instances: list[db.LiveInstance]) -> dict[str, tuple[object, ...]]:
        health = assess_providers(providers, instances, 0.0, Memory())
        return {pid: p.signature() for pid, p in health.providers.items()}

    by_provider = {"p1": {"X", "Y"}, "p2": {"Z"}}
    needy = {"N"}
    known = {i.instance_id: i for i in (a, b, c)}

    def scope(after: list[db.LiveInstance], due: bool = False) -> set[str]:
        return affected_symbols(sigs([a, b, c]), sigs(after), by_provider, needy, known, after,
                                due)  # fmt: skip

    assert scope([b, a, c]) == set()  # order is no change
    assert scope([a, b, c], due=True) == {"N"}  # a grace or hold-down ran out
    assert scope([b, c]) == {"X", "Y", "N"}  # p1 lost an instance: its symbols and the needy
    refused = replace(a, unavailable=frozenset({"Y"}))
    assert scope([refused, b, c]) == {"Y"}
    flowing = replace(c, flowing=frozenset({"N", "Z"}))
    assert scope([a, b, flowing]) == {"N"}  # only a failback waits for a symbol to flow
    down = replace(c, status="DISCONNECTED")
    assert scope([a, b, down]) == {"Z", "N"}  # grace starts: p2's phase changed
    # Several changes in one pass add up, whatever their order.
    assert scope([b, down]) == {"X", "Y", "Z", "N"}
    new = db.LiveInstance("d", "p2", "h3")  # an instance the last pass did not know
    assert scope([new, refused, b, flowing]) == {"Z", "N", "Y"}
    # A provider the last pass did not know (a new row): its symbols.
    more = by_provider | {"p3": {"W"}}
    after_sigs = sigs([a, b, c]) | {"p3": ("new",)}
    assert affected_symbols(sigs([a, b, c]), after_sigs, more, set(), known, [a, b, c],
                            False) == {"W"}  # fmt: skip


async def test_short_pass_ends_where_a_full_pass_would(services: Services, conn: db.Conn) -> None:
    tag = uuid.uuid4().hex[:6]
    pid = await db.upsert_provider(conn, f"short-{tag}", "polygon", {})
    await db.subscribe(conn, pid, [f"S{i:02d}" for i in range(30)], [DataType.TRADE])
    # These instances do not heartbeat: keep them live however slow the machine is.
    coordinator = Coordinator(services.settings(), instance_timeout_s=300)

    async def mine() -> dict[str, str]:
        return {a.symbol: a.instance_id for a in await db.current_assignments(conn)
                if a.provider_id == pid}  # fmt: skip

    await db.register_instance(conn, f"a-{tag}", pid, "h1", 1)
    await coordinator.reconcile(conn)
    for step in (
        lambda: db.register_instance(conn, f"b-{tag}", pid, "h2", 2),
        lambda: db.register_instance(conn, f"c-{tag}", pid, "h3", 3),
        lambda: db.remove_instance(conn, f"a-{tag}"),
        lambda: db.set_provider_enabled(conn, pid, False),
        lambda: db.set_provider_enabled(conn, pid, True),
    ):
        await step()
        assert await coordinator.reconcile(conn, full=False) > 0
    after_short = await mine()
    assert set(after_short) == {f"S{i:02d}" for i in range(30)}
    assert set(after_short.values()) == {f"b-{tag}", f"c-{tag}"}
    await coordinator.reconcile(conn, full=True)
    assert await mine() == after_short


async def test_reconcile_writes_assignments_for_live_instances(
    services: Services, conn: db.Conn
) -> None:
    tag = uuid.uuid4().hex[:6]
    pid = await db.upsert_provider(conn, f"coord-{tag}", "polygon", {})
    await db.subscribe(conn, pid, ["AAA", "BBB"], [DataType.TRADE])
    await db.register_instance(conn, f"w1-{tag}", pid, "h1", 1)
    coordinator = Coordinator(services.settings(), instance_timeout_s=30)  # no heartbeats here
    await coordinator.reconcile(conn)
    mine = await db.assigned_instruments(conn, f"w1-{tag}")
    assert set(mine) == {"AAA", "BBB"}
    assert mine["AAA"].data_types == frozenset({DataType.TRADE})
    # A second instance takes a share; a dead one loses its symbols.
    await db.register_instance(conn, f"w2-{tag}", pid, "h2", 2)
    await coordinator.reconcile(conn)
    both = set(await db.assigned_instruments(conn, f"w1-{tag}")) | set(
        await db.assigned_instruments(conn, f"w2-{tag}")
    )
    assert both == {"AAA", "BBB"}
    await conn.execute(
        "UPDATE worker_instances SET heartbeat_at = now() - interval '1 minute' "
        "WHERE instance_id = %s",
        (f"w1-{tag}",),
    )
    await coordinator.reconcile(conn)
    assert set(await db.assigned_instruments(conn, f"w2-{tag}")) == {"AAA", "BBB"}
    assert await db.assigned_instruments(conn, f"w1-{tag}") == {}
    await db.set_provider_enabled(conn, pid, False)
    await coordinator.reconcile(conn)
    assert await db.assigned_instruments(conn, f"w2-{tag}") == {}


async def test_only_one_coordinator_is_active(services: Services, conn: db.Conn) -> None:
    first, second = Coordinator(services.settings()), Coordinator(services.settings())
    async with running(first):

        async def first_state() -> State:
            return first.state

        await eventually(first_state, lambda s: s is State.ACTIVE, "the first to take the lock")
        async with running(second):

            async def second_state() -> State:
                return second.state

            # STANDBY is set only once the server has refused it the lock.
            await eventually(second_state, lambda s: s is State.STANDBY,
                             "the second to find the lock taken")  # fmt: skip
            await eventually(lambda: lock_queue(conn),
                             lambda q: q == {first.backend_pid: True, second.backend_pid: False},
                             "the first holding the lock and the second queued for it")  # fmt: skip
            assert first.active and not second.active
            first.stop()
            await eventually(second_state, lambda s: s is State.ACTIVE,
                             "the standby to take over once the lock is free")  # fmt: skip
            assert await lock_queue(conn) == {second.backend_pid: True}


async def test_standby_takes_over_when_the_active_ones_connection_is_killed(
    services: Services, conn: db.Conn
) -> None:
    tag = uuid.uuid4().hex[:6].upper()
    pid = await db.upsert_provider(conn, f"takeover-{tag.lower()}", "polygon", {})
    instance = f"w-{tag}"
    before, after = f"B{tag}", f"A{tag}"
    await db.subscribe(conn, pid, [before], [DataType.TRADE])
    await db.register_instance(conn, instance, pid, "h1", 1)
    # The instance does not heartbeat: keep it live however slow the machine is.
    first = Coordinator(services.settings(), instance_timeout_s=300)
    second = Coordinator(services.settings(), instance_timeout_s=300)

    async def states() -> tuple[State, State]:
        return first.state, second.state

    async def assigned() -> set[str]:
        return set(await db.assigned_instruments(conn, instance))

    try:
        async with running(first):
            await eventually(states, lambda s: s[0] is State.ACTIVE, "the first to take the lock")
            await eventually(assigned, lambda a: a == {before}, "the first to assign the symbol")
            async with running(second):
                await eventually(states, lambda s: s == (State.ACTIVE, State.STANDBY),
                                 "one active, one standing by")  # fmt: skip
                killed = first.backend_pid
                await eventually(lambda: lock_queue(conn),
                                 lambda q: q == {killed: True, second.backend_pid: False},
                                 "the standby queued for the lock")  # fmt: skip
                await conn.execute("SELECT pg_terminate_backend(%s)", (killed,))
                # The lock went with the killed connection; the first reconnects and queues.
                await eventually(states, lambda s: s == (State.STANDBY, State.ACTIVE),
                                 "the standby active and the first standing by")  # fmt: skip
                assert first.backend_pid != killed
                await eventually(
                    lambda: lock_queue(conn),
                    lambda q: q == {second.backend_pid: True, first.backend_pid: False},
                    "the first queued behind the new active one",
                )
                # Only the active one writes assignments: a symbol subscribed now is the
                # new active one's work.
                await db.subscribe(conn, pid, [after], [DataType.TRADE])
                await eventually(assigned, lambda a: a == {before, after},
                                 "the new active one to assign a symbol subscribed after the "
                                 "takeover")  # fmt: skip
                assert await states() == (State.STANDBY, State.ACTIVE)
    finally:
        await db.remove_instance(conn, instance)
        await db.set_provider_enabled(conn, pid, False)
