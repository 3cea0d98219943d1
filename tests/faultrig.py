"""A fault rig: the fleet's real processes under steady simulator load, and an account of
every event the simulator sent.

The simulator, the coordinator and the worker run as OS processes, each in its own process
group, as supervisord runs them. The rig injects faults (kill -9 of the worker and a restart
a second later; stopping and starting PostgreSQL, Redis or the broker when the test owns
them), then stops the simulator, waits for the worker to drain and counts four sets:

- SENT: the simulator's own record of what it sent (IEX: its pcap; Polygon: its frame
  capture), as (stream, sequence) keys. IEX numbers every message of a session, so the key
  is the sequence alone; Polygon numbers each symbol, so the key is (symbol, q).
- PUBLISHED: unique event ids consumed from the Pulsar topic.
- STORED: distinct event ids in raw_market_data for the provider.
- FLAGGED: sequence ranges ``raw_data.provider_specific["gap"] = [first, last]`` carried by
  events flagged ``gap``.

RECEIVED is PUBLISHED | STORED | the dead-letters: a kill -9 takes the worker's own count
with it, and an event that reached any of them was received. The rule
(``Outcome.violations``): published == stored (as id sets, counting dead-letters on each
side), every key received was sent, and every key sent but not received lies inside a
flagged range; where nothing may be lost (``allow_flagged_loss=False``) no key may be
missing at all.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson
import psycopg
import pulsar
import redis.asyncio as aioredis

from common import db
from common.codecs import iex as iex_codec
from common.codecs import polygon as polygon_codec
from common.codecs.base import CaptureError
from common.config import PulsarAccess
from common.embedded import (
    EmbeddedPostgres,
    EmbeddedProcess,
    free_port,
    pulsar_command,
    redis_command,
    wait_for_port,
)
from common.model import DataType
from common.pulsar_client import new_pulsar_client
from tests.conftest import Services

ROOT = Path(__file__).resolve().parents[1]
RATE = 3000  # events/s the simulator offers
BATCH = 10  # events per datagram / frame
SYMBOLS = 20
# supervisord restarts an exited program at once; a second is what a restart takes there.
RESTART_DELAY_S = 1.0
# How long published and stored must stay unchanged before the run counts as settled.
QUIET_S = 3.0
POLYGON_KEY_ENV = "FEEDFLEET_FAULTRIG_POLYGON_KEY"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

Key = tuple[str, int]  # (stream key, sequence)


def _log(t0: float, text: str) -> None:
    print(f"[faultrig +{time.monotonic() - t0:5.1f}s] {text}", flush=True)


def _ns(dt: datetime) -> int:
    return (dt - _EPOCH) // timedelta(microseconds=1) * 1000


def _iso_ns(text: str) -> int:
    return _ns(datetime.fromisoformat(text))


def runs(values: Iterable[int], limit: int = 6) -> str:
    """``1-5, 9, 12-40, …``: sorted numbers as ranges, the first ``limit`` of them."""
    out: list[str] = []
    start = prev = None
    for v in sorted(values):
        if prev is not None and v == prev + 1:
            prev = v
            continue
        if start is not None:
            out.append(f"{start}-{prev}" if start != prev else f"{start}")
        start = prev = v
    if start is not None:
        out.append(f"{start}-{prev}" if start != prev else f"{start}")
    more = f", … ({len(out) - limit} more runs)" if len(out) > limit else ""
    return ", ".join(out[:limit]) + more


def key_runs(keys: Iterable[Key], limit: int = 4) -> str:
    """Sequence runs per stream: ``5-7, 9`` for IEX, ``FAB01 12-14; FAB02 13`` per symbol."""
    per_stream: dict[str, list[int]] = defaultdict(list)
    for stream, seq in keys:
        per_stream[stream].append(seq)
    parts = [f"{stream} {runs(seqs, 2)}".strip() for stream, seqs in sorted(per_stream.items())]
    more = f"; … ({len(parts) - limit} more streams)" if len(parts) > limit else ""
    return "; ".join(parts[:limit]) + more


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- processes


class Proc:
    """One OS process in its own process group, its output appended to a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0
        # Set while the rig itself has the process down, so the supervisor leaves it be.
        self.held = False

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.starts += 1
        self.held = False

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def exit_code(self) -> int | None:
        """None while running (or never started)."""
        return None if self.popen is None else self.popen.poll()

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def _signal_group(self, sig: signal.Signals) -> None:
        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)

    def kill9(self) -> None:
        self.held = True
        self._signal_group(signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait(timeout=10)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; the exit code."""
        self.held = True
        if self.popen is None:
            return None
        self._signal_group(signal.SIGTERM)
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            return self.popen.wait(timeout=10)

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])


class OwnPostgres:
    """A PostgreSQL server of the test's own, so stopping it leaves the session's alone."""

    def __init__(self, data_dir: Path) -> None:
        self.server = EmbeddedPostgres(data_dir)
        self.url = ""

    async def start(self) -> None:
        await asyncio.to_thread(self.server.start)
        if not self.url:
            self.url = await asyncio.to_thread(self.server.create_database, "feedfleet")
            conn = await db.connect(self.url)
            try:
                await db.apply_schema(conn)
            finally:
                await conn.close()

    async def stop(self) -> None:
        await asyncio.to_thread(self.server.stop)


class OwnServer:
    """Redis or the broker, run by the test so it may stop and start it."""

    def __init__(self, command: list[str], port: int, log_path: Path) -> None:
        self.process = EmbeddedProcess(command, port, log_path)

    async def start(self) -> None:
        await asyncio.to_thread(self.process.start)

    async def stop(self) -> None:
        await asyncio.to_thread(self.process.stop)


# ---------------------------------------------------------------- what the sinks hold


@dataclass(slots=True)
class Seen:
    """One event as a sink holds it."""

    symbol: str | None
    sequence: int | None
    flags: tuple[str, ...]
    gap: tuple[int, int] | None
    provider_ns: int | None  # raw_data.timestamp: when the simulator sent it
    arrival_ns: int  # first consumed (Pulsar) or committed (PostgreSQL)
    reason: str | None = None  # a dead-letter's


def _gap(value: Any) -> tuple[int, int] | None:
    if isinstance(value, list | tuple) and len(value) == 2 and all(type(v) is int for v in value):
        return int(value[0]), int(value[1])
    return None


def parse_message(doc: Any, arrival_ns: int) -> tuple[str, Seen] | None:
    """An event (``raw_data``) or a dead-letter (``record``, the values as received, and
    ``reason``), bare or inside an envelope; None if neither."""
    if not isinstance(doc, dict):
        return None
    event_id = doc.get("event_id")
    raw, record = doc.get("raw_data"), doc.get("record")
    if isinstance(event_id, str) and isinstance(raw, dict):
        meta = doc.get("metadata") or {}
        specific = raw.get("provider_specific")
        ts = raw.get("timestamp")
        return event_id, Seen(
            raw.get("symbol"),
            meta.get("provider_sequence"),
            tuple(meta.get("quality_flags") or ()),
            _gap(specific.get("gap")) if isinstance(specific, dict) else None,
            _iso_ns(ts) if isinstance(ts, str) else None,
            arrival_ns,
        )
    if isinstance(event_id, str) and isinstance(record, dict):
        seq, ts = record.get("provider_sequence"), record.get("timestamp_ns")
        return event_id, Seen(
            record.get("symbol", doc.get("symbol")),
            seq if type(seq) is int else None,
            tuple(record.get("quality_flags") or ()),
            None,
            ts if type(ts) is int else None,
            arrival_ns,
            str(doc.get("reason") or ""),
        )
    for key in ("event", "payload"):
        inner = doc.get(key)
        if isinstance(inner, str | bytes):
            with contextlib.suppress(orjson.JSONDecodeError):
                inner = orjson.loads(inner)
        found = parse_message(inner, arrival_ns)
        if found is not None:
            return found
    return None


class TopicCollector:
    """Unique events on one Pulsar topic, each with the time it first arrived.

    The receiver queue is large because the embedded broker can lose messages with the
    default queue under load. ``close`` and ``open`` again (a fresh subscription from the
    earliest message) around a broker restart; what was seen is kept.
    """

    def __init__(self, url: str, topic: str) -> None:
        self.url = url
        self.topic = topic
        self.events: dict[str, Seen] = {}
        self.unreadable: list[bytes] = []
        self.deliveries = 0
        self.latest_provider_ns = 0
        self._client: Any = None
        self._consumer: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def open(self) -> None:
        self._client = new_pulsar_client(
            PulsarAccess.from_env(self.url), operation_timeout_seconds=10,
            logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Warn),
        )  # fmt: skip
        self._consumer = self._client.subscribe(
            self.topic, f"faultrig-{uuid.uuid4().hex[:8]}", receiver_queue_size=100_000,
            initial_position=pulsar.InitialPosition.Earliest,
        )  # fmt: skip
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

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
            now = time.time_ns()
            self.deliveries += 1
            data = msg.data()
            try:
                parsed = parse_message(orjson.loads(data), now)
            except orjson.JSONDecodeError:
                parsed = None
            if parsed is None:
                self.unreadable.append(data[:300])
            elif parsed[0] not in self.events:
                event_id, seen = parsed
                self.events[event_id] = seen
                if seen.provider_ns and seen.provider_ns > self.latest_provider_ns:
                    self.latest_provider_ns = seen.provider_ns
            with contextlib.suppress(Exception):
                consumer.acknowledge(msg)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        for closing in (self._consumer, self._client):
            if closing is not None:
                with contextlib.suppress(Exception):
                    closing.close()
        self._consumer = self._client = None


class Query:
    """The rig's own database connection; None instead of an error while the server is down."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]] | None:
        try:
            if self._conn is None or self._conn.closed or self._conn.broken:
                self._conn = await psycopg.AsyncConnection.connect(
                    self.url, autocommit=True, connect_timeout=3
                )
            cur = await self._conn.execute(sql, params)
            return await cur.fetchall()
        except (psycopg.OperationalError, psycopg.InterfaceError):
            await self.close()
            return None

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()


# ---------------------------------------------------------------- the outcome


@dataclass
class Recovery:
    """From the fault's end, per sink: when the first event sent after it arrived (resume),
    and when the last event sent before it arrived (catch-up). None: never."""

    since: str
    resume_s: dict[str, float | None]
    catchup_s: dict[str, float | None]

    @property
    def seconds(self) -> float | None:
        values = [*self.resume_s.values(), *self.catchup_s.values()]
        if not values or any(v is None for v in values):
            return None
        return max(v for v in values if v is not None)

    def __str__(self) -> str:
        def fmt(d: dict[str, float | None]) -> str:
            return " ".join(f"{k} {'never' if v is None else f'{v:.1f}s'}" for k, v in d.items())

        total = self.seconds
        head = "never" if total is None else f"{total:.1f}s"
        return (
            f"recovery {head} after {self.since} "
            f"(resume: {fmt(self.resume_s)}; catch-up: {fmt(self.catchup_s)})"
        )


@dataclass
class Outcome:
    name: str
    feed: str
    sent: dict[Key, int]  # -> send time (ns)
    poison: set[Key]
    published: dict[str, Seen]
    stored: dict[str, Seen]
    dead_topic: dict[str, Seen]
    rejected: dict[str, Seen]  # rejected_records, parsed from their payload
    marks: list[tuple[str, int]]
    exits: list[str]
    problems: list[str]
    worker_report: dict[str, Any] | None
    recovered_from: str | None
    rule_symbols: set[str]
    logs: list[Path]
    unreadable: int = 0
    recovery: Recovery | None = None
    _keys: dict[str, Key] = field(default_factory=dict)

    def __post_init__(self) -> None:
        per_symbol = self.feed == "polygon"
        for source in (self.published, self.stored, self.dead_topic, self.rejected):
            for eid, seen in source.items():
                if seen.symbol in self.rule_symbols and seen.sequence is not None:
                    self._keys[eid] = (seen.symbol if per_symbol else "", seen.sequence)
        self.published_ids = {e for e in self.published if e in self._keys}
        self.stored_ids = {e for e in self.stored if e in self._keys}
        # Events outside the rule (symbols subscribed mid-run).
        self.other_symbols = len({*self.published, *self.stored}.difference(self._keys))
        self.received = {self._keys[e] for e in (*self.published_ids, *self.stored_ids)}
        self.received |= {self._keys[e] for e in self.dead_topic if e in self._keys}
        self.received |= {self._keys[e] for e in self.rejected if e in self._keys}
        self.lost = set(self.sent).difference(self.received)
        ranges: dict[str, list[tuple[int, int]]] = defaultdict(list)
        self.gap_events = 0
        self.gap_without_range = 0
        for eid, key in self._keys.items():
            seen = self.seen(eid)
            if "gap" in seen.flags:
                self.gap_events += 1
                if seen.gap is None:
                    self.gap_without_range += 1
                else:
                    ranges[key[0]].append(seen.gap)
        self.flagged = {k for k in self.lost if _inside(ranges.get(k[0], ()), k[1])}
        self.unexplained = self.lost - self.flagged
        if self.recovered_from is not None:
            if any(name == self.recovered_from for name, _ in self.marks):
                self.recovery = self._recovery(self.recovered_from)
            else:
                self.problems.append(f"no mark {self.recovered_from!r} to measure recovery from")

    def seen(self, event_id: str) -> Seen:
        for source in (self.published, self.stored, self.dead_topic, self.rejected):
            if event_id in source:
                return source[event_id]
        raise KeyError(event_id)

    def ids_of(self, keys: set[Key]) -> set[str]:
        """Every event id, in any sink or dead-letter, that carries one of ``keys``."""
        return {e for e, k in self._keys.items() if k in keys}

    def mark(self, label: str) -> int:
        return next(ns for name, ns in self.marks if name == label)

    def _recovery(self, label: str) -> Recovery:
        t0 = self.mark(label)
        resume: dict[str, float | None] = {}
        catchup: dict[str, float | None] = {}
        for sink, events in (("pulsar", self.published), ("postgres", self.stored)):
            after = [s.arrival_ns for s in events.values() if s.provider_ns and s.provider_ns > t0]
            before = [
                s.arrival_ns for s in events.values() if s.provider_ns and s.provider_ns <= t0
            ]
            resume[sink] = (min(after) - t0) / 1e9 if after else None
            catchup[sink] = max(0.0, (max(before) - t0) / 1e9) if before else 0.0
        return Recovery(label, resume, catchup)

    def arrived_between(self, sink: str, first: str, last: str) -> int:
        """Events that reached ``sink`` (``pulsar`` or ``postgres``) between two marks."""
        a, b = self.mark(first), self.mark(last)
        events = self.published if sink == "pulsar" else self.stored
        return sum(1 for s in events.values() if a <= s.arrival_ns <= b)

    def phases(self, keys: set[Key]) -> str:
        """Where in the timeline the keys were sent: ``before kill: 3 (seq 5-7); …``."""
        bounds = [ns for _, ns in self.marks]
        names = [f"before {self.marks[0][0]}"] + [
            f"{a} → {b}" for (a, _), (b, _) in zip(self.marks, self.marks[1:], strict=False)
        ]
        names.append(f"after {self.marks[-1][0]}")
        buckets: dict[int, list[Key]] = defaultdict(list)
        for key in keys:
            buckets[bisect.bisect_right(bounds, self.sent[key])].append(key)
        return "; ".join(
            f"{names[i]}: {len(ks)} (seq {key_runs(ks)})" for i, ks in sorted(buckets.items())
        )

    def violations(self, *, allow_flagged_loss: bool) -> list[str]:
        out: list[str] = []
        store_side = self.stored_ids | {e for e in self.rejected if e in self._keys}
        publish_side = self.published_ids | {e for e in self.dead_topic if e in self._keys}
        for missing, where in (
            (publish_side - store_side, "published but neither stored nor dead-lettered"),
            (store_side - publish_side, "stored but neither published nor dead-lettered"),
        ):
            if missing:
                keys = {self._keys[e] for e in missing}
                out.append(f"{len(missing)} events {where} (seq {key_runs(keys)})")
        unsent = self.received - set(self.sent)
        if unsent:
            out.append(f"{len(unsent)} received but not sent (seq {key_runs(unsent)})")
        ids_per_key: dict[Key, int] = defaultdict(int)
        for key in self._keys.values():
            ids_per_key[key] += 1
        dup = [k for k, n in ids_per_key.items() if n > 1]
        if dup:
            out.append(f"{len(dup)} sequence numbers under more than one event id")
        if self.unexplained:
            out.append(
                f"{len(self.unexplained)} sent but neither received nor inside a flagged gap: "
                + self.phases(self.unexplained)
            )
        if not allow_flagged_loss and self.flagged:
            out.append(f"{len(self.flagged)} lost where nothing may be lost (flagged as gaps)")
        if not allow_flagged_loss and self.gap_events:
            out.append(f"{self.gap_events} events flagged gap where nothing may be lost")
        if not self.poison and (self.rejected or self.dead_topic):
            out.append(
                f"dead-lettered with no poison sent: {len(self.rejected)} rejected rows, "
                f"{len(self.dead_topic)} on the dead-letter topic"
            )
        if self.unreadable:
            out.append(f"{self.unreadable} unreadable messages on the topics")
        out.extend(f"worker process exited unasked: {e}" for e in self.exits)
        out.extend(self.problems)
        return out

    def summary(self) -> str:
        t0 = self.marks[0][1]
        timeline = ", ".join(f"{n} +{(ns - t0) / 1e9:.1f}s" for n, ns in self.marks)
        report = self.worker_report or {}
        said = "/".join(
            str(report.get(k, "?"))
            for k in ("messages_received", "messages_published", "messages_stored")
        )
        lines = [
            f"{self.name}: sent {len(self.sent)} published {len(self.published_ids)} "
            f"stored {len(self.stored_ids)} received {len(self.received)} "
            f"lost {len(self.lost)} flagged {len(self.flagged)} "
            f"(gap events {self.gap_events}, {self.gap_without_range} without a range) "
            f"unexplained {len(self.unexplained)}",
            f"  {self.recovery or 'recovery: not measured'}",
            f"  dead-lettered: {len(self.rejected)} rejected rows, {len(self.dead_topic)} on "
            f"the dead-letter topic; worker exits unasked: {len(self.exits)}; last worker "
            f"report received/published/stored {said}",
            f"  timeline: {timeline}",
        ]
        if self.lost:
            lines.append(f"  lost by phase: {self.phases(self.lost)}")
        if self.other_symbols:
            lines.append(f"  {self.other_symbols} events of symbols outside the count")
        lines.append("  logs: " + " ".join(str(p) for p in self.logs))
        return "\n".join(lines)

    def check(self, *, allow_flagged_loss: bool) -> None:
        problems = self.violations(allow_flagged_loss=allow_flagged_loss)
        assert not problems, "\n".join([self.summary(), "violations:", *problems])


def _inside(ranges: Iterable[tuple[int, int]], seq: int) -> bool:
    return any(a <= seq <= b for a, b in ranges)


# ---------------------------------------------------------------- the rig


class FaultRig:
    """One provider row, its simulator, the coordinator and the worker, as processes.

    ``feed`` is ``"iex"`` (UDP) or ``"polygon"`` (WebSocket). ``own`` names the services
    the test runs itself (``postgres``, ``redis``, ``broker``) so it may stop them.
    Use as ``async with FaultRig(...) as rig:``; every process is ended on the way out.
    """

    def __init__(
        self, services: Services, work: Path, feed: str, *, name: str,
        own: Iterable[str] = (), poison_at: int = 0, spare_symbols: int = 0,
    ) -> None:  # fmt: skip
        assert feed in ("iex", "polygon"), feed
        self.services = services
        self.work = work
        self.feed = feed
        self.name = name
        self.own = set(own)
        assert self.own <= {"postgres", "redis", "broker"}, self.own
        self.poison_at = poison_at
        tag = uuid.uuid4().hex[:4].upper()
        self.provider = f"fault-{feed}-{tag.lower()}"
        # IEX symbols are at most 8 characters.
        self.symbols = [f"F{tag}{i:02d}" for i in range(SYMBOLS)]
        # Sent by the simulator but subscribed only by ``subscribe_spares``, mid-run; they
        # stay outside the count, since when their data starts to count is fuzzy.
        self.spares = [f"G{tag}{i:02d}" for i in range(spare_symbols)]
        self.topic = f"persistent://public/default/faults-{uuid.uuid4().hex[:10]}"
        self.journal_dir = work / "journal"
        self.capture = work / ("sent.pcap" if feed == "iex" else "sent.jsonl")
        self.t0 = time.monotonic()
        self.marks: list[tuple[str, int]] = []
        self.exits: list[str] = []
        self.problems: list[str] = []
        self.provider_id = ""
        self.database_url = services.database_url
        self.redis_url = services.redis_url
        self.pulsar_url = services.pulsar_url
        self.postgres: OwnPostgres | None = None
        self.servers: dict[str, OwnServer] = {}
        self.query: Query | None = None
        self.redis: aioredis.Redis | None = None
        self.collector: TopicCollector | None = None
        self.dead_letters: TopicCollector | None = None
        self.sim: Proc | None = None
        self.worker: Proc | None = None
        self.coordinator: Proc | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._udp_port = free_udp_port()
        self._ws_port = free_port()

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> FaultRig:
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        await self.close()

    def log(self, text: str) -> None:
        _log(self.t0, text)

    def mark(self, label: str) -> None:
        self.marks.append((label, time.time_ns()))
        self.log(label)

    async def _start(self) -> None:
        if "postgres" in self.own:
            self.postgres = OwnPostgres(self.work / "pg")
            await self.postgres.start()
            self.database_url = self.postgres.url
        if "redis" in self.own:
            port = free_port()
            self.servers["redis"] = OwnServer(
                redis_command(port, self.work / "redis"), port, self.work / "redis.log"
            )
            self.redis_url = f"redis://127.0.0.1:{port}/0"
        if "broker" in self.own:
            port = free_port()
            self.servers["broker"] = OwnServer(
                pulsar_command(port, self.work / "broker"), port, self.work / "broker.log"
            )
            self.pulsar_url = f"pulsar://127.0.0.1:{port}"
        for server in self.servers.values():
            await server.start()
        self.query = Query(self.database_url)
        self.redis = aioredis.from_url(self.redis_url, socket_timeout=2, socket_connect_timeout=2)
        await self._insert_provider()
        self.collector = TopicCollector(self.pulsar_url, self.topic)
        self.dead_letters = TopicCollector(self.pulsar_url, f"{self.topic}-dlq")
        self.collector.open()
        self.dead_letters.open()
        env = self._env()
        logs = self.work / "logs"
        cli = [sys.executable, "-m", "workers.cli"]
        self.coordinator = Proc("coordinator", [*cli, "coordinator"], env, logs / "coordinator.log")
        worker_env = env | {"PGAPPNAME": self.app_name}
        self.worker = Proc("worker", [*cli, "worker", self.provider], worker_env,
                           logs / "worker.log")  # fmt: skip
        self.sim = Proc(f"{self.feed}-sim", self._sim_argv(), env, logs / "sim.log")
        self.mark("start")
        self.coordinator.start()
        if self.feed == "polygon":
            # The simulator sends only what a connection subscribed: it may start first.
            self.sim.start()
            await asyncio.to_thread(wait_for_port, self._ws_port, 20.0)
            self.worker.start()
            await self.wait_worker_ready()
        else:
            # Datagrams reach the worker only once it holds its symbols: start it first so
            # everything sent counts.
            self.worker.start()
            await self.wait_worker_ready()
            self.sim.start()
        self._supervisor = asyncio.create_task(self._supervise())
        self.mark("load")

    @property
    def app_name(self) -> str:
        return f"faultrig-{self.provider}"

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEEDFLEET_")}
        env.update(
            FEEDFLEET_DATABASE_URL=self.database_url,
            FEEDFLEET_REDIS_URL=self.redis_url,
            FEEDFLEET_PULSAR_URL=self.pulsar_url,
            FEEDFLEET_PULSAR_TOPIC=self.topic,
            # The journal replaces the spool; both point at the one directory that outlives
            # a worker restart.
            FEEDFLEET_JOURNAL_DIR=str(self.journal_dir),
            FEEDFLEET_SPOOL_DIR=str(self.journal_dir),
            FEEDFLEET_HOST=f"faultrig-{self.provider}",
            FEEDFLEET_LOG_FORMAT="json",
            PYTHONUNBUFFERED="1",
        )
        env[POLYGON_KEY_ENV] = "faultrig-key"
        return env

    def _sim_argv(self) -> list[str]:
        argv = [
            sys.executable, "-m", "simulators", self.feed, "--host", "127.0.0.1",
            "--symbols", ",".join(self.symbols + self.spares),
            "--rate", str(RATE), "--batch", str(BATCH),
        ]  # fmt: skip
        if self.feed == "polygon":
            return [*argv, "--port", str(self._ws_port), "--capture", str(self.capture)]
        argv += [
            "--port",
            "0",
            "--dest",
            f"127.0.0.1:{self._udp_port}",
            "--pcap",
            str(self.capture),
        ]
        if self.poison_at:
            argv += ["--poison-at", str(self.poison_at)]
        return argv

    async def _insert_provider(self) -> None:
        if self.feed == "iex":
            # A generous silence limit: the worker waits for the simulator at the start.
            config: dict[str, Any] = {
                "host": "127.0.0.1", "port": self._udp_port, "heartbeat_timeout_s": 10,
            }  # fmt: skip
        else:
            config = {
                "url": f"ws://127.0.0.1:{self._ws_port}/stocks",
                "api_key_env": POLYGON_KEY_ENV,
            }
        config["stale_after_s"] = None
        conn = await db.connect(self.database_url)
        try:
            self.provider_id = await db.upsert_provider(conn, self.provider, self.feed, config)
            await db.subscribe(
                conn, self.provider_id, self.symbols, [DataType.TRADE, DataType.QUOTE]
            )
        finally:
            await conn.close()

    async def subscribe_spares(self) -> None:
        conn = await db.connect(self.database_url)
        try:
            await db.subscribe(
                conn, self.provider_id, self.spares, [DataType.TRADE, DataType.QUOTE]
            )
        finally:
            await conn.close()

    async def close(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        for proc in (self.sim, self.worker, self.coordinator):
            if proc is not None and proc.running:
                await asyncio.to_thread(proc.stop, 30.0)
        for collector in (self.collector, self.dead_letters):
            if collector is not None:
                await asyncio.to_thread(collector.close)
        if self.query is not None:
            await self.query.close()
        if self.redis is not None:
            with contextlib.suppress(Exception):
                await self.redis.aclose()
        for server in self.servers.values():
            with contextlib.suppress(Exception):
                await server.stop()
        if self.postgres is not None:
            with contextlib.suppress(Exception):
                await self.postgres.stop()

    # ------------------------------------------------------------ supervision and faults

    async def _supervise(self) -> None:
        """Restart the worker or coordinator when it exits on its own, as supervisord's
        autorestart does, and remember that it did."""
        while True:
            await asyncio.sleep(0.2)
            for proc in (self.worker, self.coordinator):
                if proc is None or proc.held:
                    continue
                code = proc.exit_code()
                if code is None:
                    continue
                line = f"{proc.name} exit code {code} at +{time.monotonic() - self.t0:.1f}s"
                self.exits.append(line)
                self.log(f"{line}; restarting in {RESTART_DELAY_S:g}s; log tail:\n{proc.tail()}")
                proc.held = True
                await asyncio.sleep(RESTART_DELAY_S)
                proc.start()

    async def run_for(self, seconds: float) -> None:
        """Keep the load on for a fixed stretch (the fault's length, or steady state)."""
        await asyncio.sleep(seconds)

    async def kill_worker(self) -> None:
        assert self.worker is not None
        self.worker.kill9()
        self.mark("kill -9")

    async def restart_worker(self) -> None:
        assert self.worker is not None
        self.worker.start()
        self.mark("restart")

    async def stop_service(self, which: str) -> None:
        if which == "broker":
            # A consumer left open across the restart can miss messages; a fresh
            # subscription afterwards reads the topic from its start.
            for collector in (self.collector, self.dead_letters):
                assert collector is not None
                await asyncio.to_thread(collector.close)
        if which == "postgres":
            assert self.postgres is not None
            await self.postgres.stop()
        else:
            await self.servers[which].stop()
        self.mark(f"{which} stopped")

    async def start_service(self, which: str) -> None:
        if which == "postgres":
            assert self.postgres is not None
            await self.postgres.start()
        else:
            await self.servers[which].start()
        self.mark(f"{which} back")
        if which == "broker":
            for collector in (self.collector, self.dead_letters):
                assert collector is not None
                await asyncio.to_thread(collector.open)

    # ------------------------------------------------------------ observing

    async def wait(
        self, predicate: Callable[[], Awaitable[bool]], timeout: float, what: str,
        *, soft: bool = False,
    ) -> float | None:  # fmt: skip
        """Poll until ``predicate`` holds; the seconds it took. On timeout: raise, or with
        ``soft`` note the problem for the final verdict and return None."""
        start = time.monotonic()
        while not await predicate():
            if time.monotonic() - start > timeout:
                message = f"timed out after {timeout:g}s waiting for {what}"
                if not soft:
                    raise AssertionError(f"{message}\n{self._log_tails()}")
                self.problems.append(message)
                self.log(message)
                return None
            await asyncio.sleep(0.2)
        return time.monotonic() - start

    def _log_tails(self) -> str:
        return "\n".join(
            f"{proc.name} log tail ({proc.log_path}):\n{proc.tail(8)}"
            for proc in (self.worker, self.coordinator)
            if proc is not None
        )

    async def worker_report(self) -> dict[str, Any] | None:
        """The current worker process's status document from Redis, if it has written one."""
        assert self.redis is not None and self.worker is not None
        try:
            raw = await self.redis.get(f"provider:{self.provider_id}:status")
        except (aioredis.RedisError, OSError):
            return None
        if raw is None:
            return None
        doc: dict[str, Any] = orjson.loads(raw)
        if not str(doc.get("instance_id", "")).endswith(f":{self.worker.pid}"):
            return None  # a killed predecessor's
        return doc

    async def wait_worker_ready(self) -> None:
        async def ready() -> bool:
            report = await self.worker_report()
            return bool(
                report
                and report.get("status") == "CONNECTED"
                and int(report.get("subscribed_symbols") or 0) >= len(self.symbols)
            )

        took = await self.wait(ready, 60, "the worker CONNECTED and holding every symbol")
        self.log(f"worker ready after {took:.1f}s")

    async def stored_state(self) -> tuple[int, int] | None:
        """(distinct event ids, newest provider time in ns) stored for the provider."""
        assert self.query is not None
        rows = await self.query.rows(
            "SELECT count(DISTINCT event_id), max(timestamp) FROM raw_market_data "
            "WHERE provider = %s",
            (self.provider,),
        )
        if rows is None:
            return None
        count, newest = rows[0]
        return int(count), _ns(newest) if newest is not None else 0

    async def wait_live(self, since: str, timeout: float = 30.0) -> float | None:
        """Soft: both sinks hold an event sent more than a second after mark ``since``."""
        t = next(ns for name, ns in self.marks if name == since) + 1_000_000_000
        assert self.collector is not None
        collector = self.collector

        async def live() -> bool:
            state = await self.stored_state()
            return state is not None and state[1] > t and collector.latest_provider_ns > t

        took = await self.wait(live, timeout, f"events flowing to both sinks after {since}",
                               soft=True)  # fmt: skip
        if took is not None:
            self.log(f"both sinks live again {took:.1f}s after the wait began")
        return took

    # ------------------------------------------------------------ the count

    async def finish(self, *, recovered_from: str | None = None, settle_s: float = 30.0) -> Outcome:
        """Stop the simulator, wait for the worker to drain, count."""
        assert self.sim is not None and self.collector is not None
        await asyncio.to_thread(self.sim.stop, 15.0)
        self.mark("sim stopped")
        await self._settle(settle_s)
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        report = await self.worker_report()
        sent, poison = self._sent()
        if poison:
            # Recovery from a poison value counts from when it was sent.
            first = min(sent[k] for k in poison)
            self.marks.append(("poison sent", first))
            self.marks.sort(key=lambda m: m[1])
        stored = await self._stored()
        rejected = await self._rejected()
        assert self.dead_letters is not None
        outcome = Outcome(
            name=self.name, feed=self.feed, sent=sent, poison=poison,
            published=dict(self.collector.events), stored=stored,
            dead_topic=dict(self.dead_letters.events), rejected=rejected,
            marks=list(self.marks), exits=list(self.exits), problems=list(self.problems),
            worker_report=report, recovered_from=recovered_from,
            rule_symbols=set(self.symbols),
            logs=[p.log_path for p in (self.worker, self.coordinator, self.sim) if p],
            unreadable=len(self.collector.unreadable) + len(self.dead_letters.unreadable),
        )  # fmt: skip
        print(outcome.summary(), flush=True)
        return outcome

    async def _settle(self, timeout: float) -> None:
        """Until published and stored stop growing and agree with what the worker reports."""
        assert self.collector is not None and self.worker is not None
        collector = self.collector
        start = time.monotonic()
        last: tuple[int, int | None] | None = None
        quiet_since = time.monotonic()
        why = "nothing read yet"
        single_process = self.worker.starts == 1
        tolerance = 1 if self.poison_at else 0
        while time.monotonic() - start < timeout:
            await asyncio.sleep(0.5)
            state = await self.stored_state()
            now = (len(collector.events), state[0] if state else None)
            if now != last:
                last, quiet_since = now, time.monotonic()
            report = await self.worker_report()
            published, stored = now
            if stored is None:
                why = "PostgreSQL unreachable"
                continue
            if time.monotonic() - quiet_since < QUIET_S:
                why = f"still growing: published {published}, stored {stored}"
                continue
            if report is None:
                why = "no status from the current worker process"
                continue
            counts = [report.get(k) for k in ("messages_published", "messages_stored")]
            backlog = report.get("messages_spooled") or 0
            if backlog:
                why = f"the worker reports a backlog of {backlog}"
                continue
            # A restarted worker counts only since its start (replays included), so its
            # totals are comparable only when one process did all the work. A dead-lettered
            # poison value may be counted on the worker's side and not in the table.
            if single_process and (
                abs(published - (counts[0] or 0)) > tolerance
                or abs(stored - (counts[1] or 0)) > tolerance
            ):
                why = f"published {published}, stored {stored}; worker says {counts}"
                continue
            self.log(f"settled: published {published}, stored {stored}, worker {counts}")
            return
        problem = f"not drained {timeout:g}s after the simulator stopped: {why}"
        self.problems.append(problem)
        self.log(problem)

    def _sent(self) -> tuple[dict[Key, int], set[Key]]:
        data = self.capture.read_bytes()
        decode = iex_codec.decode_capture if self.feed == "iex" else polygon_codec.decode_capture
        wanted = set(self.symbols)
        per_symbol = self.feed == "polygon"
        sent: dict[Key, int] = {}
        poison: set[Key] = set()
        for item in decode(data):
            if isinstance(item, CaptureError) or item.symbol not in wanted:
                continue
            assert item.provider_sequence is not None
            key = (item.symbol if per_symbol else "", item.provider_sequence)
            sent[key] = item.timestamp_ns
            if item.price is not None and item.price >= 1e12:
                poison.add(key)
        return sent, poison

    async def _stored(self) -> dict[str, Seen]:
        assert self.query is not None
        rows = await self.query.rows(
            "SELECT event_id::text, symbol, provider_sequence, quality_flags, "
            "provider_specific -> 'gap', timestamp, ingestion_timestamp "
            "FROM raw_market_data WHERE provider = %s",
            (self.provider,),
        )
        if rows is None:
            self.problems.append("PostgreSQL unreachable for the final count")
            return {}
        return {
            r[0]: Seen(r[1], r[2], tuple(r[3] or ()), _gap(r[4]), _ns(r[5]), _ns(r[6]))
            for r in rows
        }

    async def _rejected(self) -> dict[str, Seen]:
        out: dict[str, Seen] = {}
        for event_id, symbol, reason, payload, at in await self.rejected_rows():
            try:
                parsed = parse_message(orjson.loads(bytes(payload)), _ns(at))
            except orjson.JSONDecodeError:
                parsed = None
            seen = parsed[1] if parsed else Seen(symbol, None, (), None, None, _ns(at))
            seen.reason = reason or ""
            out[event_id] = seen
        return out

    async def rejected_rows(self) -> list[tuple[Any, ...]]:
        """(event_id, symbol, reason, payload, rejected_at) of the provider's rejected_records."""
        assert self.query is not None
        exists = await self.query.rows("SELECT to_regclass('rejected_records') IS NOT NULL")
        if not exists or not exists[0][0]:
            return []
        rows = await self.query.rows(
            "SELECT event_id::text, symbol, reason, payload, rejected_at FROM rejected_records "
            "WHERE provider = %s",
            (self.provider,),
        )
        return rows or []

    async def listen_backends(self) -> list[tuple[int, str, str]]:
        """(pid, state, query) of the worker's connection that LISTENs, as far as
        pg_stat_activity tells: it shows no subscriptions, only each backend's last statement.

        The worker's connections carry the application name the rig gave it (PGAPPNAME).
        A connection used for nothing but LISTEN shows it as its last statement; one that
        also polls the assignments between notifications (the listener does both) shows
        that poll.
        """
        assert self.query is not None
        rows = await self.query.rows(
            "SELECT pid, coalesce(state, ''), query FROM pg_stat_activity "
            "WHERE application_name = %s",
            (self.app_name,),
        )
        found = [(int(r[0]), str(r[1]), str(r[2])) for r in rows or ()]
        listens = [b for b in found if b[2].lstrip().upper().startswith("LISTEN")]
        return listens or [b for b in found if "from assignments" in b[2].lower()]

    async def terminate_backend(self, pid: int) -> bool:
        assert self.query is not None
        rows = await self.query.rows("SELECT pg_terminate_backend(%s)", (pid,))
        return bool(rows and rows[0][0])

    async def stored_for(self, symbols: list[str]) -> int:
        assert self.query is not None
        rows = await self.query.rows(
            "SELECT count(*) FROM raw_market_data WHERE provider = %s AND symbol = ANY(%s)",
            (self.provider, symbols),
        )
        return int(rows[0][0]) if rows else 0
