"""assign_symbols and the coordinator against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid

from common import db
from common.model import DataType
from common.provider import ProviderConfig
from tests.conftest import Services
from workers.coordinator import Coordinator, assign_symbols, diff_assignments


def _subs(pid: str, n: int) -> list[db.Subscription]:
    return [db.Subscription(pid, f"S{i:03d}", ["TRADE"], True) for i in range(n)]


def test_each_symbol_goes_to_exactly_one_live_instance() -> None:
    providers = [ProviderConfig("p1", "one", "polygon"), ProviderConfig("p2", "two", "iex")]
    inst = [db.LiveInstance("a", "p1", "h1"), db.LiveInstance("b", "p1", "h2"),
            db.LiveInstance("c", "p2", "h1")]  # fmt: skip
    out = assign_symbols(_subs("p1", 200) + _subs("p2", 10), providers, inst)
    assert len(out) == 210
    p1 = [a for a in out if a.provider_id == "p1"]
    counts = {i: sum(a.instance_id == i for a in p1) for i in ("a", "b")}
    assert min(counts.values()) > 60  # spread across hosts, not all on one
    assert {a.instance_id for a in out if a.provider_id == "p2"} == {"c"}


def test_disabled_provider_or_no_instance_gets_nothing() -> None:
    providers = [ProviderConfig("p1", "one", "polygon", enabled=False),
                 ProviderConfig("p2", "two", "iex")]  # fmt: skip
    out = assign_symbols(_subs("p1", 5) + _subs("p2", 5), providers,
                         [db.LiveInstance("a", "p1", "h")])  # fmt: skip
    assert out == []


def test_an_instance_dying_moves_only_its_symbols() -> None:
    providers = [ProviderConfig("p1", "one", "polygon")]
    three = [db.LiveInstance(i, "p1", "h") for i in ("a", "b", "c")]
    subs = _subs("p1", 300)
    before = {a.symbol: a.instance_id for a in assign_symbols(subs, providers, three)}
    after = {a.symbol: a.instance_id for a in assign_symbols(subs, providers, three[:2])}
    moved = [s for s in before if before[s] != after[s]]
    assert moved and all(before[s] == "c" for s in moved)


def test_diff_assignments() -> None:
    a = db.Assignment("p", "X", "i1", ("TRADE",))
    b = db.Assignment("p", "Y", "i1", ("TRADE",))
    b2 = db.Assignment("p", "Y", "i2", ("TRADE",))
    c = db.Assignment("p", "Z", "i1", ("QUOTE",))
    remove, upsert = diff_assignments([a, b], [b2, c])
    assert remove == [a] and upsert == [b2, c]


async def test_reconcile_writes_assignments_for_live_instances(
    services: Services, conn: db.Conn
) -> None:
    tag = uuid.uuid4().hex[:6]
    pid = await db.upsert_provider(conn, f"coord-{tag}", "polygon", {})
    await db.subscribe(conn, pid, ["AAA", "BBB"], [DataType.TRADE])
    await db.register_instance(conn, f"w1-{tag}", pid, "h1", 1)
    coordinator = Coordinator(services.settings())
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


async def test_only_one_coordinator_is_active(services: Services) -> None:
    first, second = Coordinator(services.settings()), Coordinator(services.settings())
    t1 = asyncio.create_task(first.run(handle_signals=False))
    for _ in range(100):
        if first.active:
            break
        await asyncio.sleep(0.05)
    t2 = asyncio.create_task(second.run(handle_signals=False))
    await asyncio.sleep(1.0)
    assert first.active and not second.active
    first.stop()
    await asyncio.wait_for(t1, 10)
    for _ in range(100):  # the standby takes over once the lock is free
        if second.active:
            break
        await asyncio.sleep(0.1)
    assert second.active
    second.stop()
    await asyncio.wait_for(t2, 10)
