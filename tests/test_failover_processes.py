"""Failover with the fleet's real processes.

``feedfleet worker`` and ``feedfleet coordinator`` run as OS processes, each in its own
process group as supervisord runs them (``tests/faultrig.py``'s ``Proc``); the providers
are Polygon simulators run as ``python -m simulators polygon``; PostgreSQL, Redis and the
broker are the session's. What is asserted is read where an operator reads it: the
``assignments``, ``subscriptions``, ``provider_connections`` and ``raw_market_data``
tables (and a worker's Redis status, to know it has stored all it received).

Each wait polls for a condition and fails after a generous timeout with what it last saw
and the tail of every process's log, or at once if a process exits unasked. Nothing
asserts how fast a step was; the times are printed (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import orjson
import pytest
import redis.asyncio as aioredis

from common import db
from common.embedded import free_port, wait_for_port
from common.model import DataType
from tests.conftest import Services
from tests.faultrig import Proc

pytestmark = pytest.mark.slow

T = TypeVar("T")

# Generous: on an idle machine a worker is up in 2-3 s and a hand-over takes well under one.
START_S = 60.0
WAIT_S = 30.0
KEY_ENV = "FEEDFLEET_FOP_POLYGON_KEY"
RATE = 300  # events/s per simulator connection: tens per symbol, little CPU on 2 cores
TYPES = [DataType.TRADE, DataType.QUOTE]
HOLD_S = 2.0  # the primary's failback_hold_s in the failback test
# status_since (the database's clock) against received_at (the worker's): one machine,
# one clock; this covers only rounding and the moment between reading and stamping.
CLOCK_SLACK_S = 0.2

# The console script beside the interpreter; outside a venv, the same entry point as a module.
_CLI = Path(sys.executable).with_name("feedfleet")
FEEDFLEET = [str(_CLI)] if _CLI.exists() else [sys.executable, "-m", "workers.cli"]

Row = tuple[str, str, str, bool]  # (reason, serving provider id, instance id, latest)


@dataclass(frozen=True)
class Span:
    """A provider's stored events of one symbol within a time range."""

    count: int
    first: datetime  # received_at, the worker's receive time
    last: datetime
    unflagged: int  # events without the failover flag
    flagged: int  # events with it


class Fleet:
    """One test's processes and its own database and Redis connections; every process is
    stopped and every subscription it made is deactivated on the way out, so a later
    test's coordinator or backup never picks them up."""

    def __init__(self, services: Services, work: Path) -> None:
        self.services = services
        self.work = work
        self.topic = f"persistent://public/default/fop-{uuid.uuid4().hex[:10]}"
        self.procs: list[Proc] = []
        self.hosts: dict[str, str] = {}  # worker process name -> its FEEDFLEET_HOST
        self.provider_ids: list[str] = []
        self.t0 = time.monotonic()
        self._conn: db.Conn | None = None
        self._redis: aioredis.Redis | None = None

    async def __aenter__(self) -> Fleet:
        self._conn = await db.connect(self.services.database_url)
        self._redis = aioredis.from_url(self.services.redis_url)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        await asyncio.gather(*(asyncio.to_thread(p.stop, 30.0) for p in self.procs))
        if self.provider_ids:
            await self.conn.execute(
                "UPDATE subscriptions SET is_active = false WHERE provider_id = ANY(%s::uuid[])",
                (self.provider_ids,),
            )
        await self.conn.close()
        await self.redis.aclose()

    @property
    def conn(self) -> db.Conn:
        assert self._conn is not None
        return self._conn

    @property
    def redis(self) -> aioredis.Redis:
        assert self._redis is not None
        return self._redis

    def log(self, text: str) -> None:
        print(f"[fleet +{time.monotonic() - self.t0:5.1f}s] {text}", flush=True)

    # ------------------------------------------------------------ processes

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEEDFLEET_")}
        env.update(
            FEEDFLEET_DATABASE_URL=self.services.database_url,
            FEEDFLEET_REDIS_URL=self.services.redis_url,
            FEEDFLEET_PULSAR_URL=self.services.pulsar_url,
            FEEDFLEET_PULSAR_TOPIC=self.topic,
            FEEDFLEET_LOG_FORMAT="json",
            PYTHONUNBUFFERED="1",
            **extra,
        )
        env[KEY_ENV] = "fop-key"
        return env

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        proc = Proc(name, argv, env, self.work / "logs" / f"{name}.log")
        proc.start()
        self.procs.append(proc)
        self.log(f"started {name} (pid {proc.pid})")
        return proc

    async def simulator(self, name: str, symbols: list[str]) -> int:
        """A Polygon simulator sending ``symbols``; its port once it listens."""
        port = free_port()
        argv = [sys.executable, "-m", "simulators", "polygon", "--host", "127.0.0.1",
                "--port", str(port), "--symbols", ",".join(symbols),
                "--rate", str(RATE)]  # fmt: skip
        self.start(name, argv, self.env())
        await asyncio.to_thread(wait_for_port, port, START_S)
        return port

    def coordinator(self) -> Proc:
        return self.start("coordinator", [*FEEDFLEET, "coordinator"], self.env())

    def worker(self, provider: str, host: str) -> Proc:
        """``feedfleet worker`` as if on ``host``: one worker per provider per host, each
        host with its own journal directory."""
        env = self.env(FEEDFLEET_HOST=host, FEEDFLEET_JOURNAL_DIR=str(self.work / host))
        name = f"worker-{host}"
        self.hosts[name] = host
        return self.start(name, [*FEEDFLEET, "worker", provider], env)

    async def restart(self, proc: Proc) -> None:
        await asyncio.to_thread(proc.start)
        self.log(f"restarted {proc.name} (pid {proc.pid})")

    def tails(self) -> str:
        return "\n".join(
            f"--- {p.name} ({p.log_path}, {'running' if p.running else 'exited'}):\n{p.tail(8)}"
            for p in self.procs
        )

    # ------------------------------------------------------------ waiting

    async def wait_for(
        self, probe: Callable[[], Awaitable[T]], ok: Callable[[T], bool], what: str,
        timeout: float = WAIT_S,
    ) -> T:  # fmt: skip
        """Poll ``probe`` until ``ok`` holds. Fails after ``timeout`` with what was last
        seen, or at once when a process the test did not stop has exited."""
        start = time.monotonic()
        while True:
            seen = await probe()
            if ok(seen):
                self.log(f"{what}: after {time.monotonic() - start:.1f}s")
                return seen
            gone = [p.name for p in self.procs if p.exit_code() is not None and not p.held]
            if gone:
                why = f"{', '.join(gone)} exited unasked"
            elif time.monotonic() - start > timeout:
                why = f"timed out after {timeout:g}s"
            else:
                await asyncio.sleep(0.2)
                continue
            raise AssertionError(f"{why} waiting for {what}; last seen: {seen!r}\n{self.tails()}")

    async def instance_id(self, proc: Proc) -> str:
        """The worker_instances id the current process of ``proc`` registered under."""
        host = self.hosts[proc.name]

        async def probe() -> str | None:
            cur = await self.conn.execute(
                "SELECT instance_id FROM worker_instances WHERE host = %s AND pid = %s",
                (host, proc.pid),
            )
            row = await cur.fetchone()
            return str(row[0]) if row else None

        found = await self.wait_for(probe, lambda i: i is not None, f"{proc.name} to register",
                                    START_S)  # fmt: skip
        assert found is not None
        return found

    # ------------------------------------------------------------ what the tables say

    async def provider(self, name: str, config: dict[str, Any], priority: int) -> str:
        pid = await db.upsert_provider(self.conn, name, "polygon", config, priority=priority)
        self.provider_ids.append(pid)
        return pid

    async def rows(self, provider_id: str) -> dict[str, set[Row]]:
        """The assignment rows of ``provider_id``'s subscriptions, by symbol."""
        cur = await self.conn.execute(
            "SELECT instrument_symbol, reason, coalesce(serving_provider_id, provider_id)::text, "
            "instance_id, latest FROM assignments WHERE provider_id = %s",
            (provider_id,),
        )
        out: dict[str, set[Row]] = {}
        for symbol, reason, server, instance, latest in await cur.fetchall():
            out.setdefault(symbol, set()).add((reason, server, instance, latest))
        return out

    async def statuses(self, provider_id: str) -> dict[str, str]:
        cur = await self.conn.execute(
            "SELECT instrument_symbol, status FROM subscriptions "
            "WHERE provider_id = %s AND is_active",
            (provider_id,),
        )
        return {str(s): str(st) for s, st in await cur.fetchall()}

    async def instance_status(self, instance_id: str) -> tuple[str, datetime] | None:
        cur = await self.conn.execute(
            "SELECT status, status_since FROM worker_instances WHERE instance_id = %s",
            (instance_id,),
        )
        row = await cur.fetchone()
        return (str(row[0]), row[1]) if row else None

    async def spans(self, provider: str, symbols: list[str], after: datetime) -> dict[str, Span]:
        """Per symbol, the provider's stored events received after ``after``."""
        cur = await self.conn.execute(
            "SELECT symbol, count(*), min(received_at), max(received_at), "
            "count(*) FILTER (WHERE NOT 'failover' = ANY (quality_flags)), "
            "count(*) FILTER (WHERE 'failover' = ANY (quality_flags)) "
            "FROM raw_market_data WHERE provider = %s AND symbol = ANY(%s) AND received_at > %s "
            "GROUP BY symbol",
            (provider, symbols, after),
        )
        return {r[0]: Span(int(r[1]), r[2], r[3], int(r[4]), int(r[5]))
                for r in await cur.fetchall()}  # fmt: skip

    async def stored(self, provider: str) -> int:
        cur = await self.conn.execute(
            "SELECT count(*) FROM raw_market_data WHERE provider = %s", (provider,)
        )
        row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def handovers(self, provider_id: str) -> list[tuple[str, str, datetime]]:
        cur = await self.conn.execute(
            "SELECT status, error_message, created_at FROM provider_connections "
            "WHERE provider_id = %s AND status IN ('FAILOVER', 'FAILBACK') ORDER BY id",
            (provider_id,),
        )
        return [(str(s), str(m), at) for s, m, at in await cur.fetchall()]

    async def status_doc(self, provider_id: str, instance_id: str) -> dict[str, Any] | None:
        """The worker's status document in Redis, if ``instance_id`` wrote the current one."""
        raw = await self.redis.get(f"provider:{provider_id}:status")
        if raw is None:
            return None
        doc: dict[str, Any] = orjson.loads(raw)
        return doc if doc.get("instance_id") == instance_id else None


def _now() -> datetime:
    return datetime.now(UTC)


def _every(symbols: list[str], rows: set[Row]) -> dict[str, set[Row]]:
    return {s: set(rows) for s in symbols}


def _polygon(port: int, **extra: Any) -> dict[str, Any]:
    return {"url": f"ws://127.0.0.1:{port}/stocks", "api_key_env": KEY_ENV,
            "stale_after_s": None, **extra}  # fmt: skip


# ---------------------------------------------------------------- two instances, one provider


async def test_two_instances_split_a_provider_and_a_kill9_moves_its_share(
    services: Services, tmp_path: Path
) -> None:
    """Two ``feedfleet worker`` processes of one provider row on two hosts split its
    symbols; after a kill -9 of one, every symbol is on the survivor and every symbol's
    events reach raw_market_data again, received after the kill."""
    tag = uuid.uuid4().hex[:6]
    name = f"fop-split-{tag}"
    # Enough symbols that rendezvous hashing leaves none of two instances empty-handed
    # (all 16 on one side has a chance of 2 in 65,536).
    symbols = [f"K{tag.upper()}{i:02d}" for i in range(16)]
    async with Fleet(services, tmp_path) as fleet:
        port = await fleet.simulator("polygon-sim", symbols)
        provider_id = await fleet.provider(name, _polygon(port), priority=100)
        await db.subscribe(fleet.conn, provider_id, symbols, TYPES)
        fleet.coordinator()
        a = fleet.worker(name, f"{name}-host-a")
        b = fleet.worker(name, f"{name}-host-b")
        a_id, b_id = await fleet.instance_id(a), await fleet.instance_id(b)

        def split(rows: dict[str, set[Row]]) -> bool:
            if set(rows) != set(symbols) or any(len(r) != 1 for r in rows.values()):
                return False
            held = [next(iter(r)) for r in rows.values()]
            return {r[0] for r in held} == {"primary"} and {r[2] for r in held} == {a_id, b_id}

        before = await fleet.wait_for(
            lambda: fleet.rows(provider_id), split,
            "each symbol on one instance, both instances holding some", START_S,
        )  # fmt: skip
        on_a = sorted(s for s, r in before.items() if next(iter(r))[2] == a_id)
        fleet.log(f"{len(on_a)} symbols on A, {len(symbols) - len(on_a)} on B")
        started = _now()
        await fleet.wait_for(
            lambda: fleet.spans(name, symbols, started), lambda s: set(s) == set(symbols),
            "events of every symbol from both instances",
        )  # fmt: skip

        await asyncio.to_thread(a.kill9)  # returns once the process is gone
        killed = _now()
        fleet.log("kill -9 of worker A")
        await fleet.wait_for(
            lambda: fleet.rows(provider_id),
            lambda r: r == _every(symbols, {("primary", provider_id, b_id, True)}),
            "every symbol assigned to the survivor, B",
        )
        # Only B is alive, so whatever was received after the kill, B received.
        after = await fleet.wait_for(
            lambda: fleet.spans(name, symbols, killed), lambda s: set(s) == set(symbols),
            "events of every symbol received after the kill",
        )  # fmt: skip
        assert set(after) == set(symbols)
        firsts = {s: (after[s].first - killed).total_seconds() for s in on_a}
        fleet.log(f"A's symbols: first event after the kill at +{min(firsts.values()):.2f}s "
                  f"to +{max(firsts.values()):.2f}s")  # fmt: skip


# ---------------------------------------------------------------- failover, an edit, failback


async def test_an_operators_subscription_during_a_failover_fails_back_with_the_rest(
    services: Services, tmp_path: Path
) -> None:
    """P (priority 1) and its backup Q (priority 2, failover_symbols "*"), each with its
    own simulator sending the same canonical symbols (Q names them ``X.O``). P's worker is
    stopped: its symbols fail over to Q. An operator then INSERTs a subscription for P
    with SQL: Q serves it too. P's worker starts again: after P's hold-down every symbol,
    the new one included, is back on P, make-before-break, and each hand-over is in
    provider_connections."""
    tag = uuid.uuid4().hex[:6]
    p_name, q_name = f"fop-p-{tag}", f"fop-q-{tag}"
    symbols = [f"W{tag.upper()}{i}" for i in range(4)]
    new = f"W{tag.upper()}N"  # subscribed mid-failover; same length, so no name holds another
    every = [*symbols, new]
    async with Fleet(services, tmp_path) as fleet:
        p_port = await fleet.simulator("polygon-sim-p", every)
        q_port = await fleet.simulator("polygon-sim-q", [f"{s}.O" for s in every])
        p = await fleet.provider(p_name, _polygon(p_port, failback_hold_s=HOLD_S), priority=1)
        q = await fleet.provider(
            q_name, _polygon(q_port, symbol_format="{symbol}.O", failover_symbols="*"), priority=2
        )
        await db.subscribe(fleet.conn, p, symbols, TYPES)
        fleet.coordinator()
        p_worker = fleet.worker(p_name, f"{p_name}-host")
        q_worker = fleet.worker(q_name, f"{q_name}-host")
        p1, q1 = await fleet.instance_id(p_worker), await fleet.instance_id(q_worker)

        # ---- P serves its symbols; Q is up, holding nothing
        await fleet.wait_for(
            lambda: fleet.rows(p), lambda r: r == _every(symbols, {("primary", p, p1, True)}),
            "P serving its symbols", START_S,
        )  # fmt: skip
        began = _now()
        await fleet.wait_for(
            lambda: fleet.spans(p_name, symbols, began), lambda s: set(s) == set(symbols),
            "P's events for every symbol",
        )  # fmt: skip
        await fleet.wait_for(
            lambda: fleet.instance_status(q1), lambda s: s is not None and s[0] == "CONNECTED",
            "Q's worker CONNECTED", START_S,
        )  # fmt: skip

        # ---- P's worker stopped (supervisorctl stop): its symbols fail over to Q
        await asyncio.to_thread(p_worker.stop, 30.0)
        stopped = _now()
        fleet.log("P's worker stopped (SIGTERM)")
        on_q = {("failover", q, q1, True)}
        await fleet.wait_for(
            lambda: fleet.rows(p), lambda r: r == _every(symbols, on_q),
            "P's symbols on Q's instance, reason failover",
        )  # fmt: skip
        assert await fleet.statuses(p) == dict.fromkeys(symbols, "failover")
        await fleet.wait_for(
            lambda: fleet.spans(q_name, symbols, stopped), lambda s: set(s) == set(symbols),
            "Q's events for every failed-over symbol",
        )  # fmt: skip

        # ---- an operator subscribes P to one more symbol, by hand, during the failover
        await fleet.conn.execute(
            "INSERT INTO subscriptions (provider_id, instrument_symbol, data_types) "
            "VALUES (%s, %s, ARRAY['TRADE', 'QUOTE'])",
            (p, new),
        )
        inserted = _now()
        fleet.log(f"INSERTed a subscription of P to {new}")
        await fleet.wait_for(
            lambda: fleet.rows(p), lambda r: r == _every(every, on_q),
            f"{new} on Q's instance beside the others, reason failover",
        )  # fmt: skip
        assert await fleet.statuses(p) == dict.fromkeys(every, "failover")
        await fleet.wait_for(
            lambda: fleet.spans(q_name, [new], inserted), lambda s: new in s,
            f"Q's events for {new}",
        )  # fmt: skip

        # ---- P's worker starts again: after the hold-down everything comes back to P
        await fleet.restart(p_worker)
        restarted = _now()
        p2 = await fleet.instance_id(p_worker)
        await fleet.wait_for(
            lambda: fleet.rows(p), lambda r: r == _every(every, {("primary", p, p2, True)}),
            "every symbol back on P's new instance, reason primary, Q's rows gone",
            WAIT_S + HOLD_S,
        )  # fmt: skip
        assert await fleet.statuses(p) == dict.fromkeys(every, "active")
        p_back = await fleet.wait_for(
            lambda: fleet.spans(p_name, every, restarted), lambda s: set(s) == set(every),
            "P's events for every symbol after its restart",
        )  # fmt: skip

        # ---- Q has let go of everything: wait until it has stored all it received
        async def q_settled() -> tuple[dict[str, Any] | None, int]:
            return await fleet.status_doc(q, q1), await fleet.stored(q_name)

        docs: list[dict[str, Any]] = []

        def settled(seen: tuple[dict[str, Any] | None, int]) -> bool:
            # Two status documents in a row (one a second) with the same count, and all of
            # it stored: what was in flight when Q unsubscribed has arrived and landed.
            doc, stored = seen
            if doc is None:
                return False
            if not docs or docs[-1].get("last_update") != doc.get("last_update"):
                docs.append(doc)
            if len(docs) < 2:
                return False
            prev, last = docs[-2], docs[-1]
            received = last.get("messages_received")
            return received == prev.get("messages_received") == stored and not last.get(
                "messages_spooled"
            )

        await fleet.wait_for(q_settled, settled, "Q to have stored everything it received")

        # ---- what the tables hold
        q_all = await fleet.spans(q_name, every, began)
        unflagged = {s: sp.unflagged for s, sp in q_all.items() if sp.unflagged}
        assert not unflagged, (
            f"Q's events without the failover flag, per symbol: {unflagged} "
            f"(Q served these symbols only as P's backup); Q's spans: {q_all}"
        )
        p_all = await fleet.spans(p_name, every, began)
        flagged = {s: sp.flagged for s, sp in p_all.items() if sp.flagged}
        assert not flagged, f"P's own events flagged failover, per symbol: {flagged}"

        status = await fleet.instance_status(p2)
        assert status is not None and status[0] == "CONNECTED", status
        connected_since = status[1]
        windows: dict[str, float] = {}
        for s in every:
            first_p, last_q = p_back[s].first, q_all[s].last
            windows[s] = (first_p - last_q).total_seconds()
            waited = (first_p - connected_since).total_seconds()
            assert waited >= HOLD_S - CLOCK_SLACK_S, (
                f"{s}: P's first event came {waited:.2f}s after P's instance was CONNECTED, "
                f"within its {HOLD_S:g}s hold-down"
            )
        fleet.log(
            "failback window per symbol (P's first event minus Q's last; negative = overlap): "
            + ", ".join(f"{s} {w:+.3f}s" for s, w in windows.items())
        )

        # ---- each hand-over has its provider_connections row
        rows = await fleet.handovers(p)
        kinds = [k for k, _, _ in rows]
        margins: dict[str, float] = {}
        for s in every:
            named = [k for k, message, _ in rows if s in message]
            assert "FAILOVER" in named and "FAILBACK" in named, (
                f"{s}: hand-over rows naming it: {named}; all of P's: {rows}"
            )
            assert named.index("FAILOVER") < named.index("FAILBACK"), (s, rows)
            # Make-before-break: Q let go (the FAILBACK row) only once P's first event was in,
            # and had been reported flowing; so by the one clock, strictly after it.
            released = next(at for k, m, at in rows if k == "FAILBACK" and s in m)
            made = (released - p_back[s].first).total_seconds()
            assert made > 0, f"{s}: Q let go {-made:.3f}s before P's first event after restarting"
            margins[s] = made
        for kind, message, _ in rows:
            expect = (f"from {p_name} to {q_name}" if kind == "FAILOVER"
                      else f"from {q_name} to {p_name}")  # fmt: skip
            assert expect in message, (kind, message)
        fleet.log(f"hand-over rows: {kinds}; Q let go after P's first event by "
                  + ", ".join(f"{s} {m:.3f}s" for s, m in margins.items()))  # fmt: skip
