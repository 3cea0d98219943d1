"""What a chaos run watches while it runs: the fleet's Pulsar topic and its PostgreSQL state.

``TopicWatcher`` reads the topic (and its dead-letter topic) on a thread, as any downstream
consumer would, and keeps each unique event once, with the time it first arrived.
``DbWatcher`` polls the assignments, the ``provider_connections`` rows, the subscriptions'
status and the coordinator's advisory lock, and keeps every change with the time it saw it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import psycopg
import pulsar

from chaos.measure import Key, Tick
from common.config import PulsarAccess
from common.pulsar_client import new_pulsar_client

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


def iso_us(text: str) -> int:
    """``2024-05-04T17:09:52.462000Z`` as µs since the epoch, exactly (no float)."""
    return (datetime.fromisoformat(text) - _EPOCH) // _US


class Canon:
    """Maps each provider's own symbols to the canonical ones (the provider rows' mapping),
    so a tick is judged by the symbol an operator subscribed, whoever served it."""

    def __init__(self, symbols: list[str], own: Mapping[str, Mapping[str, str]]) -> None:
        self.symbols = set(symbols)
        self._by_provider = {p: {o: c for c, o in m.items()} for p, m in own.items()}

    def __call__(self, provider: str, symbol: str) -> str:
        if symbol in self.symbols:
            return symbol
        return self._by_provider.get(provider, {}).get(symbol, symbol)


@dataclass
class Seen:
    ticks: list[Tick] = field(default_factory=list)
    keys: set[Key] = field(default_factory=set)
    # ``gap`` ranges the fleet reported, per (provider, canonical symbol).
    gap_ranges: dict[tuple[str, str], list[tuple[int, int]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    failover_flagged: list[int] = field(default_factory=list)  # arrival times
    dead_lettered: int = 0
    unreadable: int = 0
    deliveries: int = 0


class TopicWatcher:
    """Unique events on the fleet's topic and its ``-dlq``. The receiver queue is large:
    the embedded broker can miss messages with the default one. Closed and opened again
    around a broker restart, it resumes its own durable subscription (re-reading the topic
    from the start would delay what it sees next and pass for a gap in the fleet's
    service); what was seen is kept, and redeliveries are dropped by event id."""

    def __init__(self, url: str, topic: str, canon: Canon, fresh_ns: int) -> None:
        self.url = url
        self.topics = [topic, f"{topic}-dlq"]
        self.canon = canon
        self.fresh_ns = fresh_ns
        self.seen = Seen()
        self.ids: set[str] = set()
        # Per canonical symbol: the last fresh tick's arrival and provider (read live).
        self.last_fresh: dict[str, tuple[int, str]] = {}
        self.last_new_ns = 0
        self._lock = threading.Lock()
        self._client: Any = None
        self._consumer: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._subscription = f"chaos-{uuid.uuid4().hex[:8]}"

    def open(self) -> None:
        # The client's own log goes to stderr, and only errors: reconnecting while the
        # broker is stopped on purpose is expected.
        quiet = logging.getLogger("chaos.pulsar")
        quiet.setLevel(logging.ERROR)
        # The client's threads inherit this mask: SIGTERM and SIGINT then reach the main
        # thread only (one landing in a client thread made it abort at exit).
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            self._client = new_pulsar_client(
                PulsarAccess.from_env(self.url), operation_timeout_seconds=10, logger=quiet
            )
            self._consumer = self._client.subscribe(
                self.topics, self._subscription, receiver_queue_size=100_000,
                initial_position=pulsar.InitialPosition.Earliest,
            )  # fmt: skip
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="chaos-consumer", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        for closing in (self._consumer, self._client):
            if closing is not None:
                with contextlib.suppress(Exception):
                    closing.close()
        self._consumer = self._client = None

    def _run(self) -> None:
        consumer = self._consumer
        while not self._stop.is_set():
            try:
                msg = consumer.receive(timeout_millis=200)
            except pulsar.Timeout:
                continue
            except Exception:
                if self._stop.is_set():
                    return
                time.sleep(0.1)
                continue
            self.take(msg.data(), time.time_ns())
            with contextlib.suppress(Exception):
                consumer.acknowledge(msg)

    def take(self, data: bytes, arrival_ns: int) -> None:
        """One delivery: kept if its event id is new."""
        seen = self.seen
        seen.deliveries += 1
        try:
            doc = orjson.loads(data)
            event_id = doc["event_id"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            seen.unreadable += 1
            return
        with self._lock:
            if event_id in self.ids:
                return
            self.ids.add(event_id)
            self.last_new_ns = arrival_ns
            try:
                if "raw_data" in doc:
                    self._event(doc, arrival_ns)
                else:
                    self._dead_letter(doc)
            except (KeyError, TypeError, ValueError):
                seen.unreadable += 1

    def _event(self, doc: dict[str, Any], arrival_ns: int) -> None:
        raw, meta = doc["raw_data"], doc.get("metadata") or {}
        provider = doc["provider"]
        specific = raw.get("provider_specific") or {}
        own = specific.get("provider_symbol") or raw["symbol"]
        symbol = raw["symbol"] if raw["symbol"] in self.canon.symbols else self.canon(provider, own)
        us = iso_us(raw["timestamp"])
        seq = meta.get("provider_sequence")
        self.seen.keys.add((provider, symbol, raw.get("data_type") or "", seq, us))
        tick = Tick(symbol, provider, arrival_ns, us * 1000)
        self.seen.ticks.append(tick)
        flags = meta.get("quality_flags") or ()
        if "gap" in flags:
            gap = specific.get("gap")
            if isinstance(gap, list) and len(gap) == 2:
                self.seen.gap_ranges[(provider, symbol)].append((int(gap[0]), int(gap[1])))
        if "failover" in flags:
            self.seen.failover_flagged.append(arrival_ns)
        if arrival_ns - tick.provider_ns <= self.fresh_ns:
            self.last_fresh[symbol] = (arrival_ns, provider)

    def _dead_letter(self, doc: dict[str, Any]) -> None:
        record = doc["record"]
        provider = record.get("provider") or doc["provider"]
        symbol = self.canon(provider, str(record.get("symbol") or doc.get("symbol")))
        seq = record.get("provider_sequence")
        us = int(record["timestamp_ns"]) // 1000
        self.seen.keys.add((provider, symbol, str(record.get("data_type") or ""), seq, us))
        self.seen.dead_lettered += 1

    def snapshot_keys(self) -> set[Key]:
        with self._lock:
            return set(self.seen.keys)


# ---------------------------------------------------------------- PostgreSQL


@dataclass(frozen=True, slots=True)
class Change:
    at_ns: int  # when it was seen (or, for rows written, when the database stamped them)
    what: str


@dataclass(frozen=True, slots=True)
class ConnectionRow:
    at_ns: int  # created_at
    provider_id: str
    status: str
    message: str | None


@dataclass
class DbSeen:
    assignment_changes: list[Change] = field(default_factory=list)
    connections: list[ConnectionRow] = field(default_factory=list)
    lock_holders: list[tuple[int, int | None]] = field(default_factory=list)  # (at, pid)
    failover_subscriptions: list[tuple[int, int]] = field(default_factory=list)  # (at, n)
    polls: int = 0
    failed_polls: int = 0


def _row_identity(row: dict[str, Any]) -> tuple[Any, ...]:
    """An assignment row as it matters: who, what, served by whom, why, and which is latest
    (``to_jsonb`` keeps this independent of which columns the schema has)."""
    return tuple(
        str(row.get(k))
        for k in ("provider_id", "instrument_symbol", "instance_id", "serving_provider_id",
                  "reason", "latest")
    )  # fmt: skip


class DbWatcher:
    """Polls every ``interval_s``; while PostgreSQL is down it keeps trying."""

    def __init__(self, url: str, lock_key: int, interval_s: float = 0.2) -> None:
        self.url = url
        self.lock_key = lock_key
        self.interval_s = interval_s
        self.seen = DbSeen()
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._assignments: frozenset[tuple[Any, ...]] | None = None
        self._last_connection_id = 0
        self._holder: int | str | None = "unknown"
        self._failover_subs: int | None = None

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self.poll()
                except (psycopg.Error, OSError):
                    self.seen.failed_polls += 1
                    await self._drop()
                await asyncio.sleep(self.interval_s)
        finally:
            await self._drop()

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def poll(self) -> None:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(
                self.url, autocommit=True, connect_timeout=2
            )
        conn = self._conn
        now = time.time_ns()
        cur = await conn.execute("SELECT to_jsonb(a) FROM assignments a")
        rows = [r[0] for r in await cur.fetchall()]
        current = frozenset(_row_identity(r) for r in rows)
        if self._assignments is not None and current != self._assignments:
            added, removed = current - self._assignments, self._assignments - current
            stamps = [
                _iso_ns(r["assigned_at"]) for r in rows
                if _row_identity(r) in added and r.get("assigned_at")
            ]  # fmt: skip
            # The row's own stamp is closer to the decision than this poll, when later than
            # the previous poll.
            at = min([now, *[s for s in stamps if s > now - int(self.interval_s * 2e9)]])
            self.seen.assignment_changes.append(Change(at, f"+{len(added)} -{len(removed)} rows"))
        self._assignments = current
        cur = await conn.execute(
            "SELECT id, provider_id::text, status, error_message, created_at "
            "FROM provider_connections WHERE id > %s ORDER BY id",
            (self._last_connection_id,),
        )
        for row_id, provider_id, status, message, created in await cur.fetchall():
            self._last_connection_id = row_id
            at = (created - _EPOCH) // _US * 1000
            self.seen.connections.append(ConnectionRow(at, provider_id, status, message))
        cur = await conn.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND classid = %s AND objid = %s",
            (self.lock_key >> 32, self.lock_key & 0xFFFFFFFF),
        )
        found = await cur.fetchone()
        holder = int(found[0]) if found else None
        if holder != self._holder:
            self._holder = holder
            self.seen.lock_holders.append((now, holder))
        cur = await conn.execute(
            "SELECT count(*) FROM subscriptions s WHERE to_jsonb(s)->>'status' = 'failover'"
        )
        found = await cur.fetchone()
        failover = int(found[0]) if found else 0
        if failover != self._failover_subs:
            self._failover_subs = failover
            self.seen.failover_subscriptions.append((now, failover))
        self.seen.polls += 1


def _iso_ns(value: Any) -> int:
    if isinstance(value, str):
        return iso_us(value) * 1000
    return 0
