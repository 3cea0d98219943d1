"""A dead worker's symbols move at once: superseded on restart, or moved on deregistering.

Real PostgreSQL and the real coordinator, polling only every 300 s and taking an instance
for dead only after as long: anything that happens within the waits below was driven by a
notification, not by the poll or a heartbeat running out.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import pytest

from common import db
from common.model import DataType
from tests.conftest import Services
from tests.test_coordinator import eventually, running
from workers.coordinator import Coordinator, State

POLL_S = 300.0
MOVE_TIMEOUT_S = 20.0  # generous; the move itself takes milliseconds
SYMBOLS = [f"T{i:03d}" for i in range(40)]  # enough that two instances both get some


@pytest.fixture
async def coordinator(services: Services) -> AsyncIterator[Coordinator]:
    # The poll and the instance timeout must be far off, so the waits prove the notification
    # path. The instances here never heartbeat: the 2 s default would expire them.
    assert POLL_S > 10 * MOVE_TIMEOUT_S
    coordinator = Coordinator(services.settings(), poll_s=POLL_S, instance_timeout_s=POLL_S)
    async with running(coordinator) as c:

        async def state() -> State:
            return c.state

        await eventually(state, lambda s: s is State.ACTIVE, "the coordinator to be active")
        yield c


async def _provider(conn: db.Conn, tag: str) -> str:
    pid = await db.upsert_provider(conn, f"takeover-{tag}", "polygon", {})
    await db.subscribe(conn, pid, SYMBOLS, [DataType.TRADE])
    return pid


async def _register(
    conn: db.Conn, instance_id: str, provider_id: str, host: str, pid: int
) -> list[str]:
    """Register as a worker does, then report CONNECTED: a provider still CONNECTING is in
    its failover grace, and the coordinator then passes every 0.5 s with no notification."""
    superseded = await db.register_instance(conn, instance_id, provider_id, host, pid)
    assert await db.report_instance_state(conn, instance_id, "CONNECTED", [], [])
    return superseded


async def _rows(conn: db.Conn, provider_id: str) -> set[str]:
    cur = await conn.execute(
        "SELECT instance_id FROM worker_instances WHERE provider_id = %s", (provider_id,)
    )
    return {r[0] for r in await cur.fetchall()}


async def _wait_owners(conn: db.Conn, provider_id: str, owners: set[str], what: str) -> None:
    """Until every symbol is assigned, and to exactly ``owners`` between them."""

    async def assigned() -> tuple[int, Counter[str]]:
        mine = [a for a in await db.current_assignments(conn) if a.provider_id == provider_id]
        return len({a.symbol for a in mine} & set(SYMBOLS)), Counter(a.instance_id for a in mine)

    await eventually(assigned, lambda a: a[0] == len(SYMBOLS) and set(a[1]) == owners,
                     f"{what} (seen: symbols assigned, per instance)", MOVE_TIMEOUT_S)  # fmt: skip


async def test_a_restarted_worker_supersedes_its_predecessor_on_the_same_host(
    coordinator: Coordinator, conn: db.Conn
) -> None:
    tag = uuid.uuid4().hex[:6]
    pid = await _provider(conn, tag)
    host = f"host-{tag}"
    a, b = f"takeover-{tag}@{host}:1", f"takeover-{tag}@{host}:2"
    assert await _register(conn, a, pid, host, 1) == []
    await _wait_owners(conn, pid, {a}, "all symbols on A")
    # A was kill -9'd; supervisord restarted it as B with a new pid.
    assert await _register(conn, b, pid, host, 2) == [a]
    assert await _rows(conn, pid) == {b}
    await _wait_owners(conn, pid, {b}, "every symbol to move from A to B")


async def test_deregistering_moves_symbols_on_the_notification(
    coordinator: Coordinator, conn: db.Conn
) -> None:
    tag = uuid.uuid4().hex[:6]
    pid = await _provider(conn, tag)
    a, b = f"takeover-{tag}@h1-{tag}:1", f"takeover-{tag}@h2-{tag}:1"
    await _register(conn, a, pid, f"h1-{tag}", 1)
    await _register(conn, b, pid, f"h2-{tag}", 1)
    await _wait_owners(conn, pid, {a, b}, "the symbols split between A and B")
    await db.remove_instance(conn, a)
    # Within MOVE_TIMEOUT_S, far inside the poll interval: the notification did it.
    await _wait_owners(conn, pid, {b}, "A's symbols to move to B")


async def test_an_instance_on_another_host_is_not_superseded(
    coordinator: Coordinator, conn: db.Conn
) -> None:
    tag = uuid.uuid4().hex[:6]
    pid = await _provider(conn, tag)
    other_provider = await db.upsert_provider(conn, f"takeover-other-{tag}", "iex", {})
    a, b = f"takeover-{tag}@h1-{tag}:1", f"takeover-{tag}@h2-{tag}:2"
    assert await _register(conn, a, pid, f"h1-{tag}", 1) == []
    assert await _register(conn, b, pid, f"h2-{tag}", 2) == []
    # Nor one of another provider on the same host.
    c = f"takeover-other-{tag}@h1-{tag}:3"
    assert await _register(conn, c, other_provider, f"h1-{tag}", 3) == []
    assert await _rows(conn, pid) == {a, b}
    assert await _rows(conn, other_provider) == {c}
    await _wait_owners(conn, pid, {a, b}, "the symbols split between A and B")


async def test_registrations_on_one_host_are_serialised(services: Services, conn: db.Conn) -> None:
    """Two registering at once: the later one still sees, and supersedes, the earlier."""
    tag = uuid.uuid4().hex[:6]
    pid = await db.upsert_provider(conn, f"takeover-race-{tag}", "polygon", {})
    host = f"host-{tag}"
    a, b = f"race-{tag}@{host}:1", f"race-{tag}@{host}:2"
    other = await db.connect(services.database_url)
    try:
        async with conn.transaction():  # A's registration stays uncommitted in here
            await db.register_instance(conn, a, pid, host, 1)
            racing = asyncio.create_task(db.register_instance(other, b, pid, host, 2))

            async def waiting_on() -> str | None:
                cur = await conn.execute(
                    "SELECT wait_event FROM pg_stat_activity WHERE pid = %s",
                    (other.info.backend_pid,),
                )
                row = await cur.fetchone()
                return row[0] if row else None

            await eventually(waiting_on, lambda w: w == "advisory",
                             "B's registration to wait for A's to commit")  # fmt: skip
        assert await asyncio.wait_for(racing, 10) == [a]
        assert await _rows(conn, pid) == {b}
    finally:
        await other.close()
