"""One worker process: one provider row, its adapter, the pipeline and the sinks.

Tasks, all on one uvloop loop:
- session: connect, stream, reconnect with backoff behind a circuit breaker;
- assignments: LISTEN + 1 s poll of the symbols the coordinator gave this instance;
- status: ``provider:{id}:status`` in Redis every second, a ``provider_connections`` row
  on each change, a heartbeat in ``worker_instances``, ``ingestion_metrics`` every 10 s;
- sinks: the PostgreSQL COPY flusher, spool replays, the Redis cache flusher.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson
import psycopg
import redis.asyncio as aioredis
import structlog

from common import db
from common.circuit import CircuitBreaker
from common.config import Settings
from common.model import ConnectionStatus, ProviderStatus, iso_ns
from common.pipeline import Pipeline
from common.provider import (
    ProviderAdapter,
    ProviderAuthError,
    ProviderConfig,
    ProviderConfigError,
    ProviderError,
    ProviderRateLimited,
)
from common.quality import QualityChecker
from common.redis_keys import (
    CIRCUIT_TTL_S,
    RATELIMIT_TTL_S,
    STATUS_TTL_S,
    circuit_key,
    provider_status_key,
    ratelimit_key,
)
from common.retry import Backoff
from common.sinks.postgres import PostgresSink
from common.sinks.pulsar import PulsarSink
from common.sinks.redis import LatestCache
from common.spool import Spool
from workers.adapters import adapter_class

log = structlog.get_logger("feedfleet.worker")

METRICS_INTERVAL_S = 10.0
# How long stopping waits for the worker's own tasks to end before going on without them.
TASKS_STOP_TIMEOUT_S = 10.0
HEARTBEAT_INTERVAL_S = 2.0
# Records older than this when received are flagged stale, unless the provider row's
# connection_config sets stale_after_s (null turns the check off).
DEFAULT_STALE_AFTER_S = 5.0


class Worker:
    def __init__(self, settings: Settings, provider_name: str) -> None:
        self.settings = settings
        self.provider_name = provider_name
        self.instance_id = f"{provider_name}@{settings.host}:{os.getpid()}"
        self.provider: ProviderConfig | None = None
        self.adapter: ProviderAdapter | None = None
        self.pipeline: Pipeline | None = None
        self.circuit = CircuitBreaker(failure_threshold=5, open_s=30.0)
        self.status = ConnectionStatus.DISCONNECTED
        self.last_error: str | None = None
        self.error_count = 0
        self._recorded_status: tuple[ConnectionStatus, str | None] | None = None
        self._stopping = asyncio.Event()
        self._reconnect = asyncio.Event()
        self._conn: db.Conn | None = None
        self._redis: aioredis.Redis | None = None
        self._last_rate: tuple[float, int] = (time.monotonic(), 0)
        self.throughput = 0.0
        self._requests_reported = 0

    # ------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        self._stopping.set()

    async def run(self, *, handle_signals: bool = True) -> None:
        if handle_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
        self._conn = await self._connect_db()
        self.provider = await self._wait_for_provider()
        await db.ensure_partitions(self._conn)
        self._redis = aioredis.from_url(self.settings.redis_url)
        spool_dir = Path(self.settings.spool_dir) / self.provider.name
        publisher = PulsarSink(
            self.settings.pulsar_url,
            self.settings.pulsar_topic,
            Spool(spool_dir / "pulsar.spool"),
            stall_timeout_s=self.settings.pulsar_send_timeout_ms / 1000,
        )
        store = PostgresSink(self.settings.database_url, Spool(spool_dir / "postgres.spool"))
        cache = LatestCache(self._redis)
        try:
            stale = self.provider.optional_number("stale_after_s", DEFAULT_STALE_AFTER_S)
        except ProviderConfigError as exc:
            # Only the stale flag depends on it: stream with the default, say so loudly.
            log.error("provider_config_invalid", provider=self.provider.name, error=str(exc),
                      using=DEFAULT_STALE_AFTER_S)  # fmt: skip
            stale = DEFAULT_STALE_AFTER_S
        self.pipeline = Pipeline(QualityChecker(stale_after_s=stale), publisher, store, cache)
        await publisher.start()
        await db.register_instance(
            self._conn, self.instance_id, self.provider.id, self.settings.host, os.getpid()
        )
        log.info("worker_started", provider=self.provider.name, instance=self.instance_id)
        # Startup objects never die: keep them out of every future collection, and collect
        # the young generation less often (each event allocates a few short-lived dicts).
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        tasks = [
            asyncio.create_task(publisher.run(), name="pulsar"),
            asyncio.create_task(store.run(), name="postgres"),
            asyncio.create_task(cache.run(), name="redis"),
            asyncio.create_task(self._session_loop(), name="session"),
            asyncio.create_task(self._assignment_loop(), name="assignments"),
            asyncio.create_task(self._status_loop(), name="status"),
            asyncio.create_task(self._metrics_loop(), name="metrics"),
        ]
        stop_wait = asyncio.create_task(self._stopping.wait())
        done, _ = await asyncio.wait([stop_wait, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stop_wait and task.exception() is not None:
                log.error("task_failed", task=task.get_name(), error=repr(task.exception()))
        await self._shutdown(tasks, publisher, store, cache)

    async def _shutdown(
        self, tasks: list[asyncio.Task[Any]], publisher: PulsarSink, store: PostgresSink,
        cache: LatestCache,
    ) -> None:  # fmt: skip
        log.info("worker_stopping", instance=self.instance_id)
        # The session is the only intake: once it has ended, no event reaches the sinks
        # after their last flush.
        session = next(t for t in tasks if t.get_name() == "session")
        await stop_tasks([session], TASKS_STOP_TIMEOUT_S)
        if self.adapter is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5.0):
                    await self.adapter.disconnect()
        self.status = ConnectionStatus.DISCONNECTED
        # Give in-flight events a bounded chance to be acknowledged; what is left stays in
        # the spools and is replayed by the next start.
        await store.flush()
        assert self.pipeline is not None
        drained = await self.pipeline.drained(timeout=10.0)
        await cache.flush()
        await stop_tasks(tasks, TASKS_STOP_TIMEOUT_S)
        await store.close()
        await publisher.close()
        # Each step on its own: Redis being down must not keep the instance registered.
        assert self._conn is not None
        conn = self._conn
        for step in (
            self._publish_status,
            self._record_status,
            self._write_metrics,
            lambda: db.remove_instance(conn, self.instance_id),
        ):
            try:
                await step()
            except Exception as exc:
                log.warning("shutdown_step_failed", step=getattr(step, "__name__", "?"),
                            error=str(exc))  # fmt: skip
        log.info("worker_stopped", drained=drained, **asdict(self.pipeline.counts()))
        if self._redis is not None:
            await self._redis.aclose()
        if self._conn is not None:
            await self._conn.close()

    async def _connect_db(self) -> db.Conn:
        backoff = Backoff(base_s=0.5, max_s=10.0)
        while True:
            try:
                return await db.connect(self.settings.database_url)
            except psycopg.OperationalError as exc:
                delay = backoff.next_delay()
                log.warning("database_unavailable", error=str(exc), retry_in_s=round(delay, 2))
                await asyncio.sleep(delay)

    async def _wait_for_provider(self) -> ProviderConfig:
        assert self._conn is not None
        while True:
            provider = await db.find_provider(self._conn, self.provider_name)
            if provider is not None:
                return provider
            log.error("provider_not_found", provider=self.provider_name)
            await asyncio.sleep(5.0)

    # ------------------------------------------------------------ provider session

    def _new_adapter(self, provider: ProviderConfig) -> ProviderAdapter:
        return adapter_class(provider.provider_type)(provider)

    async def _session_loop(self) -> None:
        backoff = Backoff(base_s=0.5, max_s=30.0)
        assert self.pipeline is not None
        pipeline = self.pipeline
        while True:
            provider = self.provider
            assert provider is not None
            if not provider.enabled:
                self._set_status(ConnectionStatus.DISCONNECTED, "provider disabled")
                await self._wait_reconnect(5.0)
                continue
            wait = self.circuit.wait_s()
            if wait > 0:
                await self._wait_reconnect(wait)
                continue
            delay = backoff.next_delay()
            try:
                if self.adapter is None or self.adapter.config is not provider:
                    previous = self.adapter.subscribed if self.adapter else {}
                    self.adapter = self._new_adapter(provider)
                    self.adapter.subscribed.update(previous)
                    self._requests_reported = 0
                adapter = self.adapter
                self._set_status(ConnectionStatus.CONNECTING, None)
                await adapter.connect()
                self.circuit.record_success()
                backoff.reset()
                self._set_status(adapter.connection_status, None)
                self._reconnect.clear()
                async for batch in adapter.stream_batches():
                    pipeline.process(batch)
                    # A socket with data buffered returns reads without yielding; let the
                    # sinks, status and assignment tasks run between reads.
                    await asyncio.sleep(0)
                    if adapter.connection_status is not self.status:
                        self._set_status(adapter.connection_status, adapter.last_error)
                    if self._reconnect.is_set():
                        break
                    if pipeline.backpressure:
                        self._set_status(self.status, "backpressure: sinks spooling past limit")
                        await pipeline.wait_for_room()
            except ProviderConfigError as exc:
                self._fail(ConnectionStatus.ERROR, exc)
                delay = 30.0  # an operator has to change the row or the environment
            except ProviderAuthError as exc:
                self._fail(ConnectionStatus.ERROR, exc)
                delay = max(delay, 10.0)
            except ProviderRateLimited as exc:
                self._fail(ConnectionStatus.RATE_LIMITED, exc)
                delay = exc.retry_after_s or max(delay, 5.0)
            except ProviderError as exc:
                self._fail(ConnectionStatus.DISCONNECTED, exc)
            except Exception as exc:
                log.exception("session_crashed", provider=provider.name)
                self._fail(ConnectionStatus.ERROR, exc)
            finally:
                if self.adapter is not None:
                    with contextlib.suppress(Exception):
                        await self.adapter.disconnect()
            await self._wait_reconnect(delay)

    def _fail(self, status: ConnectionStatus, exc: BaseException) -> None:
        self.error_count += 1
        self.circuit.record_failure()
        message = f"{type(exc).__name__}: {exc}"
        log.warning("provider_session_failed", provider=self.provider_name, error=message)
        self._set_status(status, message)

    def _set_status(self, status: ConnectionStatus, error: str | None) -> None:
        self.status = status
        self.last_error = error

    async def _wait_reconnect(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._reconnect.wait(), timeout=seconds)
        self._reconnect.clear()

    # ------------------------------------------------------------ assignments and config

    async def _assignment_loop(self) -> None:
        listen = await self._connect_db()
        await listen.execute("LISTEN feedfleet_assignments")
        await listen.execute("LISTEN feedfleet_config")
        try:
            while True:
                try:
                    await self._sync_config()
                    await self._sync_assignments()
                except (psycopg.Error, OSError) as exc:
                    log.warning("assignment_sync_failed", error=str(exc))
                    self._conn = await self._reconnect_db(self._conn)
                # Wake on a notification, or poll once a second.
                async for _ in listen.notifies(timeout=1.0, stop_after=1):
                    pass
        finally:
            await listen.close()

    async def _reconnect_db(self, conn: db.Conn | None) -> db.Conn:
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        return await self._connect_db()

    async def _sync_config(self) -> None:
        assert self._conn is not None
        fresh = await db.find_provider(self._conn, self.provider_name)
        if fresh is None or self.provider is None or fresh == self.provider:
            return
        log.info("provider_config_changed", provider=fresh.name, enabled=fresh.enabled)
        self.provider = fresh
        self.circuit.record_success()
        self._reconnect.set()
        if self.adapter is not None:
            # Ends a quiet stream at once; the session loop builds a fresh adapter.
            await self.adapter.disconnect()

    async def _sync_assignments(self) -> None:
        assert self._conn is not None and self.pipeline is not None
        wanted = await db.assigned_instruments(self._conn, self.instance_id)
        adapter = self.adapter
        if adapter is None:
            return
        current = adapter.subscribed
        added = [i for s, i in wanted.items() if current.get(s) != i]
        removed = [i for s, i in current.items() if s not in wanted]
        if removed:
            await adapter.unsubscribe(removed)
            self.pipeline.quality.forget(i.symbol for i in removed)
        if added:
            await adapter.subscribe(added)
        if added or removed:
            log.info("assignments_changed", added=len(added), removed=len(removed),
                     total=len(adapter.subscribed))  # fmt: skip

    # ------------------------------------------------------------ status and metrics

    def provider_status(self) -> ProviderStatus:
        assert self.provider is not None and self.pipeline is not None
        counts = self.pipeline.counts()
        return ProviderStatus(
            provider_id=self.provider.id,
            provider_name=self.provider.name,
            status=self.status,
            last_update=iso_ns(time.time_ns()),
            messages_received=counts.received,
            messages_published=counts.published,
            messages_stored=counts.stored,
            messages_spooled=counts.spooled,
            throughput_per_sec=round(self.throughput, 1),
            subscribed_symbols=len(self.adapter.subscribed) if self.adapter else 0,
            error_count=self.error_count,
            last_error=self.last_error,
            backpressure=self.pipeline.backpressure,
            instance_id=self.instance_id,
        )

    def _update_throughput(self) -> None:
        assert self.pipeline is not None
        now = time.monotonic()
        then, count = self._last_rate
        received = self.pipeline.received
        if now - then >= 1.0:
            self.throughput = (received - count) / (now - then)
            self._last_rate = (now, received)

    async def _publish_status(self) -> None:
        assert self._redis is not None and self.provider is not None
        status = self.provider_status()
        payload = orjson.dumps(asdict(status) | {"metrics": self.metrics_snapshot()})
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(provider_status_key(self.provider.id), payload, ex=STATUS_TTL_S)
            pipe.set(circuit_key(self.provider.name), self.circuit.state.value, ex=CIRCUIT_TTL_S)
            sent = self.adapter.requests_sent() if self.adapter is not None else 0
            if sent > self._requests_reported:
                key = ratelimit_key(self.provider.name, int(time.time() // 60))
                pipe.incrby(key, sent - self._requests_reported)
                pipe.expire(key, RATELIMIT_TTL_S)
            await pipe.execute()
            self._requests_reported = max(sent, self._requests_reported)

    async def _record_status(self) -> None:
        """A ``provider_connections`` row whenever the status (or its error) changes."""
        assert self._conn is not None and self.provider is not None
        current = (self.status, self.last_error)
        if current == self._recorded_status:
            return
        await db.record_connection(
            self._conn, self.provider.id, self.instance_id, self.status.value, self.last_error
        )
        self._recorded_status = current

    async def _status_loop(self) -> None:
        last_heartbeat = 0.0
        while True:
            self._update_throughput()
            try:
                await self._publish_status()
            except Exception as exc:  # Redis is a cache: degrade, never stop
                log.warning("status_publish_failed", error=str(exc))
            try:
                await self._record_status()
                if time.monotonic() - last_heartbeat >= HEARTBEAT_INTERVAL_S:
                    assert self._conn is not None
                    await db.heartbeat_instance(self._conn, self.instance_id, self.status.value)
                    last_heartbeat = time.monotonic()
            except (psycopg.Error, OSError) as exc:
                log.warning("status_record_failed", error=str(exc))
                self._conn = await self._reconnect_db(self._conn)
            await asyncio.sleep(1.0)

    def metrics_snapshot(self) -> dict[str, Any]:
        assert self.pipeline is not None
        counts = self.pipeline.counts()
        publisher = self.pipeline.publisher
        assert isinstance(publisher, PulsarSink)
        latency = publisher.latency.percentiles_ms()
        return {
            **asdict(counts),
            "decode_errors": self.adapter.decode_errors if self.adapter else 0,
            "error_count": self.error_count,
            "throughput_per_sec": round(self.throughput, 1),
            "latency_p50_ms": latency["p50"],
            "latency_p99_ms": latency["p99"],
            "provider_to_receipt_hdr": publisher.provider_latency.encoded(),
            "pulsar_round_trip_hdr": publisher.round_trip_latency.encoded(),
            "quality_flags": dict(self.pipeline.quality.flag_counts),
            "sinks": {
                "pulsar": publisher.counters.as_dict() | {"healthy": publisher.healthy},
                "postgres": self.pipeline.store.counters.as_dict()
                | {"healthy": self.pipeline.store.healthy},
                "redis": {"written": self.pipeline.cache.written if self.pipeline.cache else 0},
            },
        }

    async def _write_metrics(self) -> None:
        assert self._conn is not None and self.provider is not None
        await db.insert_metrics(
            self._conn, self.provider.id, self.instance_id, self.metrics_snapshot()
        )

    async def _metrics_loop(self) -> None:
        tick = 0
        while True:
            await asyncio.sleep(METRICS_INTERVAL_S)
            tick += 1
            try:
                await self._write_metrics()
                assert self.pipeline is not None
                publisher = self.pipeline.publisher
                assert isinstance(publisher, PulsarSink)
                publisher.latency.reset()
                if tick % 60 == 0:  # every 10 minutes: keep hourly partitions ahead
                    assert self._conn is not None
                    await db.ensure_partitions(self._conn)
            except (psycopg.Error, OSError) as exc:
                log.warning("metrics_write_failed", error=str(exc))


async def stop_tasks(tasks: list[asyncio.Task[Any]], timeout_s: float) -> list[str]:
    """Cancel the tasks and wait for them, at most ``timeout_s``; the names of any still
    running are logged and returned.

    A cancel is repeated until the task ends: on Python 3.11 ``asyncio.wait_for`` drops a
    cancel that arrives just as the awaited thing completes, and the task then runs on.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    pending = {t for t in tasks if not t.done()}
    while pending and loop.time() < deadline:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.5)
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved, so asyncio does not warn at exit
    names = sorted(t.get_name() for t in pending)
    if names:
        log.error("tasks_did_not_stop", tasks=names)
    return names


async def run_worker(provider_name: str) -> None:
    from common.log import configure_logging

    settings = Settings.from_env()
    configure_logging(settings.log_format, settings.log_level)
    structlog.contextvars.bind_contextvars(provider=provider_name)
    await Worker(settings, provider_name).run()
