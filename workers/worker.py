"""One worker process: one provider row, its session, the journal, the sinks.

``Worker`` builds the parts and starts and stops them; each part is small and lives in
its own module:

- ``ProviderSession`` (``workers/session.py``): connect, stream, reconnect;
- ``AssignmentFollower`` (``workers/assignments.py``): the provider row and the symbols
  the coordinator assigned, through database outages;
- ``StatusReporter`` (``workers/status.py``): Redis status, heartbeats, metrics rows;
- ``MetricsEndpoint`` (``workers/metrics_endpoint.py``), when a metrics port is set: the
  worker's own Prometheus exposition;
- the journal (``common/journal.py``) and the sinks: Pulsar, PostgreSQL COPY, Redis cache.

Start-up needs no database when an earlier run left its provider row and assignments
beside the journal: the worker ingests at once and registers when PostgreSQL answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import psycopg
import redis.asyncio as aioredis
import structlog

from common import db
from common.circuit import CircuitBreaker
from common.config import Settings
from common.fleet_budget import FleetBudget
from common.journal import Journal
from common.model import ConnectionStatus
from common.pipeline import Pipeline
from common.provider import Instrument, ProviderAdapter, ProviderConfig, ProviderConfigError
from common.quality import QualityChecker
from common.retry import Backoff
from common.sinks.postgres import PostgresSink
from common.sinks.pulsar import PulsarSink
from common.sinks.redis import LatestCache
from workers.adapters import adapter_class
from workers.assignments import AssignmentFollower, load_last_assignment
from workers.metrics_endpoint import MetricsEndpoint
from workers.session import ProviderSession
from workers.status import StatusReporter

log = structlog.get_logger("feedfleet.worker")

# How long stopping waits for the worker's own tasks to end before going on without them.
TASKS_STOP_TIMEOUT_S = 10.0
# Records older than this when received are flagged stale, unless the provider row's
# connection_config sets stale_after_s (null turns the check off).
DEFAULT_STALE_AFTER_S = 5.0
# How long start-up tries the database before falling back on the saved assignment.
STARTUP_DB_WAIT_S = 5.0


@dataclass
class WorkerParts:
    """Everything a running worker is made of, fully built (see ``build_parts``)."""

    journal: Journal
    pipeline: Pipeline
    publisher: PulsarSink
    store: PostgresSink
    cache: LatestCache
    redis: aioredis.Redis
    session: ProviderSession
    follower: AssignmentFollower
    status: StatusReporter
    metrics: MetricsEndpoint | None = None  # when settings.metrics_port is set


def stale_after(provider: ProviderConfig) -> float | None:
    try:
        return provider.optional_number("stale_after_s", DEFAULT_STALE_AFTER_S)
    except ProviderConfigError as exc:
        # Only the stale flag depends on it: stream with the default, say so loudly.
        log.error("provider_config_invalid", provider=provider.name, error=str(exc),
                  using=DEFAULT_STALE_AFTER_S)  # fmt: skip
        return DEFAULT_STALE_AFTER_S


def fleet_budget(
    row: ProviderConfig, redis: aioredis.Redis, instances: Callable[[], int]
) -> FleetBudget | None:
    """The provider's per-minute budget shared by its instances, if the row sets one (a
    value the adapter cannot use is left to its own check, which reports it)."""
    value = row.rate_limits.get("requests_per_minute")
    try:
        per_minute = int(float(value)) if value is not None else 0
    except (TypeError, ValueError):
        return None
    if per_minute < 1:
        return None
    return FleetBudget(redis, row.name, per_minute, instances)


def build_parts(
    settings: Settings, provider: ProviderConfig, wanted: dict[str, Instrument],
    instance_id: str,
) -> WorkerParts:  # fmt: skip
    directory = settings.journal_dir / provider.name
    # A cap smaller than a few default segments would be passed inside the first one.
    segment_bytes = max(1024**2, min(64 * 1024**2, settings.journal_max_bytes // 4))
    journal = Journal(
        directory, (PulsarSink.name, PostgresSink.name), fsync=settings.journal_fsync,
        max_bytes=settings.journal_max_bytes, segment_bytes=segment_bytes,
    )  # fmt: skip
    recovered = journal.open()
    quality = QualityChecker(stale_after_s=stale_after(provider))
    quality.restore(recovered.sequences)
    journal.sequence_snapshot = quality.sequences
    publisher = PulsarSink(
        settings.pulsar, settings.pulsar_topic, journal,
        producer_name=f"feedfleet-{provider.name}-{settings.host}",
        stall_timeout_s=settings.pulsar_send_timeout_ms / 1000,
    )  # fmt: skip
    store = PostgresSink(settings.database_url, journal)
    for sink in (publisher, store):
        sink.backlog = recovered.backlog_events[sink.name]
    if any(recovered.backlog_events.values()):
        log.info("journal_backlog_to_replay", **recovered.backlog_events)
    redis = aioredis.from_url(settings.redis_url)
    cache = LatestCache(redis)
    pipeline = Pipeline(quality, journal, publisher, store, cache)
    circuit = CircuitBreaker(failure_threshold=5, open_s=30.0)

    def new_adapter(row: ProviderConfig) -> ProviderAdapter:
        adapter = adapter_class(row.provider_type)(row)
        adapter.use_state_dir(directory)
        adapter.budget = fleet_budget(row, redis, lambda: status.peer_count)
        return adapter

    session = ProviderSession(provider, pipeline, circuit, new_adapter)
    session.wanted = dict(wanted)
    status = StatusReporter(
        settings.database_url, redis, instance_id, settings.host, session, pipeline,
        publisher, circuit,
    )  # fmt: skip
    follower = AssignmentFollower(
        settings.database_url, instance_id, session, directory / "last_assignment.json",
        lambda: status.registered,
    )  # fmt: skip
    metrics = None
    if settings.metrics_port is not None:
        metrics = MetricsEndpoint(status, settings.metrics_host, settings.metrics_port)
    return WorkerParts(journal, pipeline, publisher, store, cache, redis, session, follower,
                       status, metrics)  # fmt: skip


class Worker:
    def __init__(self, settings: Settings, provider_name: str) -> None:
        self.settings = settings
        self.provider_name = provider_name
        self.instance_id = f"{provider_name}@{settings.host}:{os.getpid()}"
        self.parts: WorkerParts | None = None
        self._stopping = asyncio.Event()

    # The parts tests and the bench look at.

    @property
    def pipeline(self) -> Pipeline | None:
        return self.parts.pipeline if self.parts else None

    @property
    def provider(self) -> ProviderConfig | None:
        return self.parts.session.provider if self.parts else None

    @property
    def adapter(self) -> Any:
        return self.parts.session.adapter if self.parts else None

    @property
    def status(self) -> ConnectionStatus:
        return self.parts.session.status if self.parts else ConnectionStatus.DISCONNECTED

    @property
    def last_error(self) -> str | None:
        return self.parts.session.last_error if self.parts else None

    @property
    def throughput(self) -> float:
        return self.parts.status.throughput if self.parts else 0.0

    def stop(self) -> None:
        self._stopping.set()

    async def run(self, *, handle_signals: bool = True) -> None:
        if handle_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
        start = await self._starting_point()
        if start is None:
            return  # stopped before there was anything to run
        provider, wanted = start
        parts = self.parts = build_parts(self.settings, provider, wanted, self.instance_id)
        await parts.publisher.start()
        log.info("worker_started", provider=provider.name, instance=self.instance_id,
                 symbols=len(wanted))  # fmt: skip
        # Startup objects never die: keep them out of every future collection, and collect
        # the young generation less often (each event allocates a few short-lived dicts).
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        tasks = [
            asyncio.create_task(parts.journal.run(), name="journal"),
            asyncio.create_task(parts.publisher.run(), name="pulsar"),
            asyncio.create_task(parts.store.run(), name="postgres"),
            asyncio.create_task(parts.cache.run(), name="redis"),
            asyncio.create_task(parts.session.run(), name="session"),
            asyncio.create_task(parts.follower.run(), name="assignments"),
            asyncio.create_task(parts.status.run(), name="status"),
        ]
        if parts.metrics is not None:
            tasks.append(asyncio.create_task(parts.metrics.run(), name="metrics"))
        stop_wait = asyncio.create_task(self._stopping.wait())
        done, _ = await asyncio.wait([stop_wait, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stop_wait and task.exception() is not None:
                log.error("task_failed", task=task.get_name(), error=repr(task.exception()))
        await self._shutdown(tasks, parts)

    async def _starting_point(self) -> tuple[ProviderConfig, dict[str, Instrument]] | None:
        """The provider row and assignments to start from: the database's if it answers
        within ``STARTUP_DB_WAIT_S``, else the copy an earlier run saved beside the journal,
        else the database's whenever it answers."""
        saved_path = self.settings.journal_dir / self.provider_name / "last_assignment.json"
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + STARTUP_DB_WAIT_S
        backoff = Backoff(base_s=0.5, max_s=10.0)
        while not self._stopping.is_set():
            try:
                conn = await db.connect(self.settings.database_url)
                try:
                    provider = await db.find_provider(conn, self.provider_name)
                    if provider is not None:
                        await db.ensure_partitions(conn)
                        return provider, await db.assigned_instruments(conn, self.instance_id)
                finally:
                    await conn.close()
                log.error("provider_not_found", provider=self.provider_name)
            except (psycopg.Error, OSError) as exc:
                log.warning("database_unavailable", error=str(exc))
                if loop.time() >= give_up_at:
                    saved = load_last_assignment(saved_path)
                    if saved is not None:
                        log.warning("starting_from_saved_assignment", symbols=len(saved[1]))
                        return saved
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff.next_delay())
        return None

    async def _shutdown(self, tasks: list[asyncio.Task[Any]], parts: WorkerParts) -> None:
        log.info("worker_stopping", instance=self.instance_id)
        # The session is the only intake: once it has ended, nothing new is journaled.
        session = next(t for t in tasks if t.get_name() == "session")
        await stop_tasks([session], TASKS_STOP_TIMEOUT_S)
        await parts.session.close()
        unjournaled = parts.pipeline.journal_held()
        if unjournaled:
            # Received, but the disk never had room for them: say exactly how many.
            log.error("events_lost_at_stop_journal_full", events=unjournaled,
                      error=parts.pipeline.journal_error)  # fmt: skip
        # Give in-flight events a bounded chance to be acknowledged; what is left stays in
        # the journal and is replayed by the next start.
        await parts.store.flush()
        drained = await parts.pipeline.drained(timeout=10.0)
        await parts.cache.flush()
        await stop_tasks(tasks, TASKS_STOP_TIMEOUT_S)
        await parts.store.close()
        await parts.publisher.close()
        parts.journal.close()
        await parts.status.final_report()
        if parts.metrics is not None:
            await parts.metrics.close()
        log.info("worker_stopped", drained=drained, **asdict(parts.pipeline.counts()))
        await parts.redis.aclose()

    def metrics_snapshot(self) -> dict[str, Any]:
        assert self.parts is not None
        return self.parts.status.metrics()


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


async def run_worker(provider_name: str, metrics_port: int | None = None) -> None:
    """``metrics_port`` (the CLI's ``--metrics-port``) overrides FEEDFLEET_METRICS_PORT."""
    from common.log import configure_logging

    settings = Settings.from_env()
    if metrics_port is not None:
        settings = replace(settings, metrics_port=metrics_port)
    configure_logging(settings.log_format, settings.log_level)
    structlog.contextvars.bind_contextvars(provider=provider_name)
    await Worker(settings, provider_name).run()
