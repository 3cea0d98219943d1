"""``StatusReporter``: what a worker tells the rest of the fleet, and how often.

- at once, on any change of the session's status, of the symbols the provider refused or
  that went silent, or of the symbols with a recent event: ``worker_instances`` updated
  and the coordinator notified, so it can fail symbols over (or back) within a second;
- every half second: the heartbeat in ``worker_instances``, registering again if the row
  is gone (the database was away long enough for the coordinator to drop it);
- every second: ``provider:{id}:status`` and ``circuit:{provider}`` in Redis, and the
  request count mirrored to ``ratelimit:{provider}:{minute}``;
- on each status change: a ``provider_connections`` row;
- every ten seconds: an ``ingestion_metrics`` row; every ten minutes, partitions ahead.

Neither store is needed to keep ingesting: Redis is a cache and PostgreSQL may be away;
each step fails on its own, is logged once per outage, and is tried again next time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

import orjson
import psycopg
import redis.asyncio as aioredis
import structlog

from common import db, stage_cpu
from common.circuit import CircuitBreaker
from common.model import ConnectionStatus, ProviderStatus, iso_ns
from common.pipeline import Pipeline
from common.provider import ProviderConfigError
from common.redis_keys import (
    CIRCUIT_TTL_S,
    RATELIMIT_TTL_S,
    STATUS_TTL_S,
    circuit_key,
    provider_status_key,
    ratelimit_key,
)
from common.sinks.postgres import PostgresSink
from common.sinks.pulsar import PulsarSink
from workers.session import ProviderSession

log = structlog.get_logger("feedfleet.status")

TICK_S = 0.25
HEARTBEAT_INTERVAL_S = 0.5
PUBLISH_INTERVAL_S = 1.0
# A symbol with a record within this window is "flowing" (what a make-before-break
# failback waits for).
FLOWING_WINDOW_S = 5.0
METRICS_INTERVAL_S = 10.0
PARTITIONS_INTERVAL_S = 600.0


class StatusReporter:
    def __init__(
        self, database_url: str, redis: aioredis.Redis, instance_id: str, host: str,
        session: ProviderSession, pipeline: Pipeline, publisher: PulsarSink,
        circuit: CircuitBreaker,
    ) -> None:  # fmt: skip
        self.database_url = database_url
        self.redis = redis
        self.instance_id = instance_id
        self.host = host
        self.session = session
        self.pipeline = pipeline
        self.publisher = publisher
        self.circuit = circuit
        self.throughput = 0.0
        self.registered = False
        self._conn: db.Conn | None = None
        self._last_rate = (time.monotonic(), 0)
        self._recorded: tuple[ConnectionStatus, str | None] | None = None
        self._requests_reported = 0
        # Live instances of this provider (this one included), for a shared request
        # budget's fallback share while Redis is down; refreshed with each metrics report.
        self.peer_count = 1
        self._adapter_seen: object = None
        self._failing: set[str] = set()  # steps failing now: logged once per outage
        self._pushed: tuple[str, list[str], list[str]] | None = None
        self._pushed_now = False
        self._wanted_since: dict[str, int] = {}

    # ------------------------------------------------------------ the loop

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        last_heartbeat = last_publish = last_metrics = last_partitions = loop.time()
        changed = self.session.changed
        while True:
            now = loop.time()
            self._update_throughput()
            await self._step("instance_state", self.push_state)
            if self._pushed_now:
                last_heartbeat = now  # a push refreshes the heartbeat too
            if now - last_publish >= PUBLISH_INTERVAL_S:
                last_publish = now
                await self._step("redis_status", self.publish)
            await self._step("connection_status", self.record_status)
            due = not self.registered or now - last_heartbeat >= HEARTBEAT_INTERVAL_S
            if due and await self._step("heartbeat", self.heartbeat):
                last_heartbeat = now
            if now - last_metrics >= METRICS_INTERVAL_S:
                last_metrics = now
                if await self._step("metrics", self.write_metrics):
                    self.publisher.latency.reset()
            if now - last_partitions >= PARTITIONS_INTERVAL_S:
                last_partitions = now
                await self._step("partitions", self.ensure_partitions)
            changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), TICK_S)

    async def _step(self, name: str, step: Callable[[], Awaitable[None]]) -> bool:
        try:
            await step()
        except (psycopg.Error, OSError, aioredis.RedisError) as exc:
            if name not in self._failing:
                log.warning("status_step_failed", step=name, error=str(exc))
                self._failing.add(name)
            if isinstance(exc, psycopg.Error):
                await self._drop_db()
            return False
        if name in self._failing:
            log.info("status_step_recovered", step=name)
            self._failing.discard(name)
        return True

    async def _db(self) -> db.Conn:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = await db.connect(self.database_url)
        return self._conn

    async def _drop_db(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    # ------------------------------------------------------------ the steps

    async def register(self) -> None:
        conn = await self._db()
        provider = self.session.provider
        superseded = await db.register_instance(
            conn, self.instance_id, provider.id, self.host, os.getpid()
        )
        if superseded:
            log.info("instances_superseded", instances=superseded)
        self.registered = True
        self._pushed = None  # a new row: push the whole state again

    async def heartbeat(self) -> None:
        if not self.registered:
            await self.register()
            return
        conn = await self._db()
        if not await db.heartbeat_instance(conn, self.instance_id):
            # Dropped as dead while the database was away: come back.
            self.registered = False
            await self.register()

    def instance_state(self) -> tuple[str, list[str], list[str]]:
        """(status, unavailable symbols, flowing symbols), all canonical, sorted."""
        session = self.session
        now_ns = time.time_ns()
        seen = self.pipeline.quality.last_seen
        flowing_after = now_ns - int(FLOWING_WINDOW_S * 1e9)
        wanted = session.wanted
        flowing = sorted(s for s in wanted if seen.get(s, 0) > flowing_after)
        unavailable = set(session.unavailable())
        silence = self._silence_ns()
        since = self._wanted_since
        for symbol in wanted:
            since.setdefault(symbol, now_ns)
        for symbol in [s for s in since if s not in wanted]:
            del since[symbol]
        if silence is not None and session.status is ConnectionStatus.CONNECTED:
            # A symbol quiet past the threshold, or the whole feed quiet with its connection
            # open (which the connection's own heartbeat does not see): fail them over now.
            quiet_after = now_ns - silence
            unavailable.update(s for s in wanted if max(seen.get(s, 0), since[s]) <= quiet_after)
        return session.status.value, sorted(unavailable), flowing

    def _silence_ns(self) -> int | None:
        try:
            threshold = self.session.provider.optional_number("silence_threshold_s")
        except ProviderConfigError:
            return None  # reported by the session's own config checks
        return None if threshold is None else int(threshold * 1e9)

    async def push_state(self) -> None:
        """Tell the coordinator at once when the state it decides on has changed."""
        self._pushed_now = False
        if not self.registered:
            return
        state = self.instance_state()
        if state == self._pushed:
            return
        conn = await self._db()
        if not await db.report_instance_state(conn, self.instance_id, *state):
            self.registered = False
            return
        if self._pushed is not None and state[1] != self._pushed[1]:
            log.info("unavailable_symbols_changed", symbols=state[1])
        self._pushed = state
        self._pushed_now = True

    async def publish(self) -> None:
        provider = self.session.provider
        payload = orjson.dumps(asdict(self.provider_status()) | {"metrics": self.metrics()})
        adapter = self.session.adapter
        if adapter is not self._adapter_seen:
            self._adapter_seen = adapter
            self._requests_reported = 0  # a fresh adapter counts from zero
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(provider_status_key(provider.id), payload, ex=STATUS_TTL_S)
            pipe.set(circuit_key(provider.name), self.circuit.state.value, ex=CIRCUIT_TTL_S)
            sent = adapter.requests_sent() if adapter is not None else 0
            # A shared budget counts in that key itself; otherwise the count is mirrored.
            if adapter is not None and adapter.budget is None and sent > self._requests_reported:
                key = ratelimit_key(provider.name, int(time.time() // 60))
                pipe.incrby(key, sent - self._requests_reported)
                pipe.expire(key, RATELIMIT_TTL_S)
            await pipe.execute()
            self._requests_reported = max(sent, self._requests_reported)

    async def record_status(self) -> None:
        """A ``provider_connections`` row whenever the status (or its error) changes."""
        current = (self.session.status, self.session.last_error)
        if current == self._recorded:
            return
        conn = await self._db()
        await db.record_connection(
            conn, self.session.provider.id, self.instance_id, current[0].value, current[1],
            self.connection_metadata(),
        )  # fmt: skip
        self._recorded = current

    async def write_metrics(self) -> None:
        conn = await self._db()
        provider_id = self.session.provider.id
        await db.insert_metrics(conn, provider_id, self.instance_id, self.metrics())
        await db.connection_heartbeat(conn, provider_id, self.instance_id)
        self.peer_count = max(1, await db.count_live_instances(conn, provider_id, 10.0))

    def connection_metadata(self) -> dict[str, Any]:
        """Where and how this instance connects (provider_connections.connection_metadata)."""
        provider = self.session.provider
        cc = provider.connection_config
        endpoint = cc.get("url") or cc.get("base_url") or cc.get("pcap_path")
        if endpoint is None and cc.get("host") is not None:
            endpoint = f"{cc.get('host')}:{cc.get('port')}"
        return {
            "instance": self.instance_id, "host": self.host, "pid": os.getpid(),
            "provider_type": provider.provider_type, "endpoint": endpoint,
        }  # fmt: skip

    async def ensure_partitions(self) -> None:
        await db.ensure_partitions(await self._db())

    async def final_report(self) -> None:
        """At stop: the last status, row and metrics, then deregister; each on its own.
        A stopped worker ingests nothing: its last documents say a throughput of 0, not
        the rate of its last second (which the API and page would go on showing)."""
        self.throughput = 0.0
        steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("redis_status", self.publish),
            ("connection_status", self.record_status),
            ("metrics", self.write_metrics),
            ("deregister", self._deregister),
        ]
        for name, step in steps:
            try:
                async with asyncio.timeout(5.0):
                    await step()
            except Exception as exc:
                log.warning("shutdown_step_failed", step=name, error=str(exc))
        await self._drop_db()

    async def _deregister(self) -> None:
        await db.remove_instance(await self._db(), self.instance_id)

    # ------------------------------------------------------------ what is reported

    def _update_throughput(self) -> None:
        now = time.monotonic()
        then, count = self._last_rate
        received = self.pipeline.received
        if now - then >= 1.0:
            self.throughput = (received - count) / (now - then)
            self._last_rate = (now, received)

    def provider_status(self) -> ProviderStatus:
        counts = self.pipeline.counts()
        provider = self.session.provider
        return ProviderStatus(
            provider_id=provider.id,
            provider_name=provider.name,
            status=self.session.status,
            last_update=iso_ns(time.time_ns()),
            messages_received=counts.received,
            messages_published=counts.published,
            messages_stored=counts.stored,
            messages_spooled=counts.spooled,
            throughput_per_sec=round(self.throughput, 1),
            subscribed_symbols=self.session.subscribed,
            error_count=self.session.error_count,
            last_error=self.session.last_error,
            backpressure=self.pipeline.backpressure,
            instance_id=self.instance_id,
        )

    def journal_disk(self) -> dict[str, Any] | None:
        """Free space where the journal lives (None when it cannot be read)."""
        path = self.pipeline.journal.directory
        try:
            usage = shutil.disk_usage(path)
        except OSError:
            return None
        return {"path": str(path), "free_bytes": usage.free, "total_bytes": usage.total}

    def metrics(self) -> dict[str, Any]:
        pipeline = self.pipeline
        counts = pipeline.counts()
        publisher = self.publisher
        store = pipeline.store
        assert isinstance(store, PostgresSink)
        journal = pipeline.journal
        latency = publisher.latency.percentiles_ms()
        adapter = self.session.adapter
        now_ns = time.time_ns()
        last_ns = pipeline.last_received_ns
        return {
            **asdict(counts),
            # freshness, for a health that sees a feed falling behind (see workers/health.py)
            "last_event_at": iso_ns(last_ns) if last_ns else None,
            "last_event_age_s": round((now_ns - last_ns) / 1e9, 3) if last_ns else None,
            "queue_depth": adapter.queue_depth() if adapter else 0,
            "spool_depth": max(publisher.backlog, store.backlog),
            "circuit_state": self.circuit.state.value,
            "disk": self.journal_disk(),
            "decode_errors": adapter.decode_errors if adapter else 0,
            "bytes_received": adapter.bytes_received if adapter else 0,
            "error_count": self.session.error_count,
            "throughput_per_sec": round(self.throughput, 1),
            "latency_p50_ms": latency["p50"],
            "latency_p99_ms": latency["p99"],
            "latency_avg_ms": latency["avg"],
            "provider_to_receipt_hdr": publisher.provider_latency.encoded(),
            "pulsar_round_trip_hdr": publisher.round_trip_latency.encoded(),
            "quality_flags": dict(pipeline.quality.flag_counts),
            "journal": {
                "bytes": journal.size_bytes,
                "max_bytes": journal.max_bytes,
                "skipped_bytes": journal.skipped_bytes,
                "error": pipeline.journal_error,
            },
            "database_registered": self.registered,
            "sinks": {
                "pulsar": publisher.counters.as_dict()
                | {
                    "healthy": publisher.healthy,
                    "backlog": publisher.backlog,
                    "last_receipt_at": (
                        iso_ns(publisher.last_receipt_ns) if publisher.last_receipt_ns else None
                    ),
                },
                "postgres": store.counters.as_dict()
                | {
                    "healthy": store.healthy,
                    "backlog": store.backlog,
                    "rows_rejected": store.rows_rejected,
                },
                "redis": {"written": pipeline.cache.written if pipeline.cache else 0},
            },
            # the benchmark's per-stage CPU (FEEDFLEET_STAGE_CPU=1; common/stage_cpu.py)
            **({"stage_cpu": report} if (report := stage_cpu.CLOCK.report()) else {}),
        }
