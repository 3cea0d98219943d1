"""`python -m tests.bench` (`make bench`): the real pipeline on this machine, measured.

A Polygon simulator -> one worker process -> Pulsar + PostgreSQL COPY + Redis, and a
Pulsar consumer (a thread of this process) that checks every event arrived. Reported, as a
table on stdout and as JSON (``--json FILE``):

- the max sustained throughput: the highest offered rate the worker keeps up with for the
  sustain window (30 s) with nothing spooled, no growing backlog, not running more than a
  second behind (receipt p99 in the window) and nothing lost;
- latency at 1k, 10k and 50k events/s and at 80% of the maximum: provider -> Pulsar receipt
  (the worker's cumulative HDR histogram, differenced over the window) and provider ->
  consumer (an HDR histogram here); "provider" is the simulator's per-frame send stamp;
- worker CPU seconds per million events and peak RSS, at the maximum, and the CPU cores
  each process (worker, simulator, this process with its consumer, broker) and the whole
  machine kept busy there;
- several providers at once (``--providers``, 3, at ``--provider-rate``, 10,000 events/s
  each): one worker and one simulator per provider, each judged on its own;
- a baseline: the same aiohttp WebSocket receive and orjson parse against an unpaced
  simulator, with no normalization and no sinks.

Each figure is the median of ``--runs`` runs (3; ``--quick``: 1 run, shorter windows).

Services come from ``FEEDFLEET_DATABASE_URL`` (a fresh database is created on that server
and dropped afterwards), ``FEEDFLEET_REDIS_URL`` and ``FEEDFLEET_PULSAR_URL`` when set;
otherwise embedded ones run in a temporary directory. Every measurement step starts a
fresh simulator and worker on a fresh topic with ``raw_market_data`` truncated, so each
step is measured from a clean start after its warm-up: 3 s, then until the worker has
worked off the backlog it built while starting (at most 20 s more).

The max is found per run by a 1-2-5 ramp from ``--ramp-start`` with short probe windows,
a bisection between the last rate kept up with and the first one missed, then a
confirmation over the full sustain window (stepping down 15% when it fails).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psycopg
import pulsar
import redis.asyncio as aioredis
from hdrh.histogram import HdrHistogram
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from common import db
from common.codecs import polygon as codec
from common.config import PulsarAccess, Settings
from common.embedded import (
    EmbeddedPostgres,
    EmbeddedProcess,
    free_port,
    pulsar_command,
    redis_command,
    wait_for_port,
)
from common.metrics import new_latency_histogram
from common.model import DataType
from common.pulsar_client import new_pulsar_client
from common.redis_keys import provider_status_key
from simulators.market import symbol_universe

ROOT = Path(__file__).resolve().parents[2]
PROVIDER_NAME = "bench"
KEY_ENV = "FEEDFLEET_BENCH_POLYGON_KEY"
WORKER_HOST = "bench"
LATENCY_RATES = (1_000, 10_000, 50_000)
# Several providers at once: this many workers, each with its own simulator, at this rate.
PROVIDERS_AT_ONCE = 3
PER_PROVIDER_RATE = 10_000
# "Keeps up": the worker received at least this share of the offered rate over the window.
KEEP_UP_FRACTION = 0.95
# "No growing backlog": received - min(published, stored) grew by less than this many
# seconds' worth of the offered rate between the start and the end of the window.
BACKLOG_GROWTH_S = 0.5
# "Keeps up" also means not running behind: a worker that reads at the offered rate but a
# second late (a backlog from its start it never works off) is at its limit, not under it.
MAX_LAG_P99_MS = 1000.0
# The window starts once the worker has worked off what piled up while it started: the
# receipt p99 over one status interval under SETTLED_LAG_MS, or SETTLE_MAX_S after the
# warm-up, whichever comes first (the judge then sees whatever lag is left).
SETTLED_LAG_MS = 100.0
SETTLE_MAX_S = 20.0
HDR_MAX_US = 600_000_000
OVERLOADED_DRAIN_S = 8.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_FFSEND = re.compile(rb'"ffsend":(\d+)')
_EVENT_ID_PREFIX = b'{"event_id":"'


@dataclass(frozen=True)
class Windows:
    warmup_s: float
    probe_s: float  # ramp probes and latency steps
    sustain_s: float  # the confirmation at the maximum
    baseline_s: float
    drain_s: float  # the most a step waits after its simulator stops


FULL = Windows(warmup_s=3.0, probe_s=10.0, sustain_s=30.0, baseline_s=10.0, drain_s=30.0)
QUICK = Windows(warmup_s=2.0, probe_s=4.0, sustain_s=6.0, baseline_s=3.0, drain_s=15.0)


@dataclass(frozen=True)
class BenchOptions:
    symbols: int
    events_per_frame: int
    runs: int
    quick: bool
    windows: Windows
    ramp_start: int
    ramp_max: int
    bisect_steps: int
    latency_rates: tuple[int, ...]
    providers: int
    provider_rate: int
    json_path: Path | None
    work_dir: Path | None


# ---------------------------------------------------------------- small helpers


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    fields = data[data.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def machine_busy_seconds() -> float:
    """CPU time all cores spent not idle since boot (to show how loaded the machine was)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:9]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / _CLK_TCK


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def next_rate(rate: int) -> int:
    """The next step of a 1-2-5 series: 10k -> 20k -> 50k -> 100k."""
    exp = 10 ** math.floor(math.log10(rate))
    mantissa = rate / exp
    if mantissa < 2:
        return 2 * exp
    if mantissa < 5:
        return 5 * exp
    return 10 * exp


def round_rate(rate: float) -> int:
    quantum = 1000 if rate >= 10_000 else 100
    return max(quantum, round(rate / quantum) * quantum)


def hdr_decode(encoded: str | None) -> HdrHistogram:
    hist = new_latency_histogram()
    if encoded:
        hist.decode_and_add(encoded)
    return hist


def percentiles_between(earlier: str | None, later: str | None) -> dict[str, float | None]:
    """Percentiles of what one cumulative histogram recorded between two of its encoded
    snapshots (a worker's status, read twice)."""
    return percentiles_ms(hdr_subtract(hdr_decode(later), hdr_decode(earlier)))


def hdr_subtract(later: HdrHistogram, earlier: HdrHistogram) -> HdrHistogram:
    """What ``later`` recorded after ``earlier`` (both from one cumulative histogram)."""
    out = new_latency_histogram()
    for index in range(later.counts_len):
        count = later.get_count_at_index(index) - earlier.get_count_at_index(index)
        if count > 0:
            out.record_value(later.get_value_from_index(index), count)
    return out


def percentiles_ms(hist: HdrHistogram) -> dict[str, float | None]:
    if hist.get_total_count() == 0:
        return {"p50": None, "p99": None, "p999": None, "max": None, "count": 0}
    return {
        "p50": hist.get_value_at_percentile(50) / 1000,
        "p99": hist.get_value_at_percentile(99) / 1000,
        "p999": hist.get_value_at_percentile(99.9) / 1000,
        "max": hist.get_max_value() / 1000,
        "count": hist.get_total_count(),
    }


def median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


# ---------------------------------------------------------------- services


@dataclass
class Services:
    """PostgreSQL (fresh database), Redis and Pulsar: from the environment or embedded."""

    work_dir: Path
    database_url: str = ""
    redis_url: str = ""
    pulsar_url: str = ""
    embedded: list[str] = field(default_factory=list)
    broker: EmbeddedProcess | None = None
    _procs: list[EmbeddedProcess] = field(default_factory=list)
    _postgres: EmbeddedPostgres | None = None
    _drop: tuple[str, str] | None = None

    def start(self) -> None:
        server_url = os.environ.get("FEEDFLEET_DATABASE_URL")
        if server_url:
            name = f"feedfleet_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
            with psycopg.connect(server_url, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{name}"')
            params = conninfo_to_dict(server_url)
            params["dbname"] = name
            self.database_url = make_conninfo(**params)  # type: ignore[arg-type]
            self._drop = (server_url, name)
        else:
            self._postgres = EmbeddedPostgres(self.work_dir / "pg")
            self._postgres.start()
            self.database_url = self._postgres.create_database("feedfleet_bench")
            self.embedded.append("postgresql")
        redis_url = os.environ.get("FEEDFLEET_REDIS_URL")
        if redis_url:
            self.redis_url = redis_url
        else:
            port = free_port()
            proc = EmbeddedProcess(
                redis_command(port, self.work_dir / "redis"), port, self.work_dir / "redis.log"
            )
            proc.start()
            self._procs.append(proc)
            self.redis_url = f"redis://127.0.0.1:{port}/0"
            self.embedded.append("redis")
        pulsar_url = os.environ.get("FEEDFLEET_PULSAR_URL")
        if pulsar_url:
            self.pulsar_url = pulsar_url
        else:
            port = free_port()
            self.broker = EmbeddedProcess(
                pulsar_command(port, self.work_dir / "pulsar"), port, self.work_dir / "pulsar.log"
            )
            self.broker.start()
            self._procs.append(self.broker)
            self.pulsar_url = f"pulsar://127.0.0.1:{port}"
            self.embedded.append("pulsar")

    @property
    def broker_pid(self) -> int | None:
        proc = self.broker._proc if self.broker is not None else None
        return proc.pid if proc is not None else None

    def close(self) -> None:
        for proc in self._procs:
            proc.stop()
        if self._drop is not None:
            server_url, name = self._drop
            with (
                contextlib.suppress(psycopg.Error),
                psycopg.connect(server_url, autocommit=True) as conn,
            ):
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if self._postgres is not None:
            self._postgres.stop()


# ---------------------------------------------------------------- the consumer


class Consumer:
    """Reads one topic on a thread: unique event ids and provider -> consumer latency.

    The embedded broker may deliver a message twice, so events are counted by event_id.
    Only the id and the ``ffsend`` stamp are read from each payload (no full JSON parse),
    so this thread costs the machine as little as it can.
    """

    def __init__(self, client: pulsar.Client, topic: str) -> None:
        self._consumer: Any = client.subscribe(
            topic,
            f"bench-{uuid.uuid4().hex[:8]}",
            receiver_queue_size=100_000,
            initial_position=pulsar.InitialPosition.Earliest,
        )
        self.ids: set[bytes] = set()
        self.deliveries = 0
        self.unstamped = 0
        self.histogram = new_latency_histogram()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-consumer", daemon=True)
        self._thread.start()

    def start_window(self) -> None:
        self.histogram = new_latency_histogram()

    def _run(self) -> None:
        consumer = self._consumer
        receive = consumer.receive
        ids = self.ids
        search = _FFSEND.search
        since_ack = 0
        last: Any = None
        while not self._stop.is_set():
            try:
                msg = receive(200)
            except pulsar.Timeout:
                if last is not None and since_ack:
                    with contextlib.suppress(Exception):
                        consumer.acknowledge_cumulative(last)
                    since_ack = 0
                continue
            except Exception:
                if self._stop.is_set():
                    return
                time.sleep(0.05)
                continue
            now_ns = time.time_ns()
            data = msg.data()
            self.deliveries += 1
            if data.startswith(_EVENT_ID_PREFIX):
                ids.add(data[13:49])
            else:
                ids.add(str(orjson.loads(data)["event_id"]).encode())
            stamp = search(data)
            if stamp is None:
                self.unstamped += 1
            else:
                latency_us = (now_ns - int(stamp.group(1))) // 1000
                self.histogram.record_value(max(1, min(latency_us, HDR_MAX_US)))
            last = msg
            since_ack += 1
            if since_ack >= 1000:
                with contextlib.suppress(Exception):
                    consumer.acknowledge_cumulative(msg)
                since_ack = 0

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if self._thread.is_alive():
            log("consumer thread did not stop within 10 s")
        with contextlib.suppress(Exception):
            self._consumer.unsubscribe()
        with contextlib.suppress(Exception):
            self._consumer.close()
        self._consumer = None


# ---------------------------------------------------------------- one measurement step


@dataclass(frozen=True)
class Lane:
    """One provider row and its simulator's port: a step runs a simulator and a worker
    per lane. Single-provider steps use the first lane."""

    name: str
    provider_id: str
    sim_port: int


@dataclass(frozen=True)
class Sample:
    """One ``provider:{id}:status`` document, the parts the bench reads."""

    at: float  # the worker's clock when it wrote the status (epoch seconds)
    status: str
    subscribed: int
    received: int
    published: int
    stored: int
    spooled: int
    hdr: str | None  # provider -> Pulsar receipt, since the worker started
    round_trip_hdr: str | None  # handed to the Pulsar client -> receipt, since start

    @classmethod
    def parse(cls, raw: bytes | str) -> Sample:
        doc = orjson.loads(raw)
        m = doc["metrics"]
        return cls(
            at=datetime.fromisoformat(doc["last_update"]).timestamp(),
            status=str(doc["status"]),
            subscribed=int(doc["subscribed_symbols"]),
            received=int(m["received"]),
            published=int(m["published"]),
            stored=int(m["stored"]),
            spooled=int(m["spooled"]),
            hdr=m.get("provider_to_receipt_hdr"),
            round_trip_hdr=m.get("pulsar_round_trip_hdr"),
        )

    @property
    def backlog(self) -> int:
        return self.received - min(self.published, self.stored)


@dataclass
class StepResult:
    label: str
    offered: int
    window_s: float
    sustained: bool = False
    reasons: list[str] = field(default_factory=list)
    received_per_s: float = 0.0
    received: int = 0
    published: int = 0
    stored: int = 0
    stored_rows: int = 0
    consumed_unique: int = 0
    consumer_deliveries: int = 0
    spooled_max: int = 0
    # events still waiting in the journal for a sink once the step drained (0: none left)
    spooled_end: int = 0
    backlog_start: int = 0
    backlog_end: int = 0
    # provider -> receipt p99 of the events acknowledged within the window itself
    window_receipt_p99_ms: float | None = None
    # events received but not yet acknowledged by each sink, at the end of the window
    lag_at_window_end: dict[str, int] = field(default_factory=dict)
    cpu_s_per_million_events: float | None = None
    cpu_cores: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: float | None = None
    receipt_ms: dict[str, float | None] = field(default_factory=dict)
    # the part of receipt_ms from handing an event to the Pulsar client to its receipt
    pulsar_round_trip_ms: dict[str, float | None] = field(default_factory=dict)
    consumer_ms: dict[str, float | None] = field(default_factory=dict)
    elapsed_s: float = 0.0
    worker_exit_code: int | None = None
    phases_s: dict[str, float] = field(default_factory=dict)

    def phase(self, name: str, since: float) -> float:
        now = time.monotonic()
        self.phases_s[name] = round(now - since, 2)
        return now

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}

    def summary(self) -> str:
        verdict = "kept up" if self.sustained else "MISSED (" + "; ".join(self.reasons) + ")"
        p99 = self.receipt_ms.get("p99")
        cp99 = self.consumer_ms.get("p99")
        return (
            f"{self.label} {self.offered:>7,} ev/s offered, {self.window_s:g}s window: "
            f"received {self.received_per_s:,.0f}/s, cpu/M {_fmt(self.cpu_s_per_million_events)}"
            f" s, receipt p99 {_fmt(p99)} ms, consumer p99 {_fmt(cp99)} ms -> {verdict}"
        )


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


class WorkerDied(RuntimeError):
    pass


class Bench:
    def __init__(self, options: BenchOptions, services: Services, work: Path) -> None:
        self.options = options
        self.services = services
        self.work = work
        self.symbols = symbol_universe(options.symbols)
        self.sim_port = free_port()  # the baseline's source
        self.lanes: list[Lane] = []
        self.conn: db.Conn | None = None
        self.redis: aioredis.Redis | None = None
        self.pulsar: pulsar.Client | None = None
        self._coordinator: Any = None
        self._coordinator_task: asyncio.Task[None] | None = None
        self._step_no = 0

    # ------------------------------------------------------------ set-up

    async def setup(self) -> None:
        from workers.coordinator import Coordinator

        svc = self.services
        self.conn = await db.connect(svc.database_url)
        await db.apply_schema(self.conn)
        for i in range(max(1, self.options.providers)):
            name = PROVIDER_NAME if i == 0 else f"{PROVIDER_NAME}-{i + 1}"
            port = free_port()
            provider_id = await db.upsert_provider(
                self.conn, name, "polygon",
                {"url": f"ws://127.0.0.1:{port}/stocks", "api_key_env": KEY_ENV},
            )  # fmt: skip
            await db.subscribe(
                self.conn, provider_id, self.symbols, [DataType.TRADE, DataType.QUOTE]
            )
            self.lanes.append(Lane(name, provider_id, port))
        self.redis = aioredis.from_url(svc.redis_url)
        # A C++ logger: a Python one would be called from the client's threads, up to and
        # during interpreter shutdown.
        self.pulsar = new_pulsar_client(
            PulsarAccess.from_env(svc.pulsar_url), operation_timeout_seconds=10,
            logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Error),
        )  # fmt: skip
        settings = Settings(svc.database_url, svc.redis_url, svc.pulsar_url)
        self._coordinator = Coordinator(settings, poll_s=1.0)
        self._coordinator_task = asyncio.create_task(
            self._coordinator.run(handle_signals=False), name="coordinator"
        )

    async def close(self) -> None:
        if self._coordinator is not None and self._coordinator_task is not None:
            self._coordinator.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._coordinator_task, timeout=10)
        if self.pulsar is not None:
            gc.collect()  # no consumer wrapper may outlive the client closed here
            try:
                self.pulsar.close()
            except Exception as exc:
                log(f"pulsar client close failed: {exc!r}")
            self.pulsar = None
            gc.collect()
        if self.redis is not None:
            await self.redis.aclose()
        if self.conn is not None:
            await self.conn.close()

    # ------------------------------------------------------------ processes

    def _start_simulator(self, rate: int, log_path: Path, port: int) -> subprocess.Popen[bytes]:
        cmd = [
            sys.executable, "-m", "simulators", "polygon", "--port", str(port),
            "--rate", str(rate), "--batch", str(self.options.events_per_frame),
            "--num-symbols", str(self.options.symbols), "--stamp-send-ns",
        ]  # fmt: skip
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for_port(port, timeout=20)
        except TimeoutError:
            _stop(proc, 5)
            raise
        return proc

    def _start_worker(
        self, topic: str, spool_dir: Path, log_path: Path, lane: Lane
    ) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env.update(
            {
                "FEEDFLEET_DATABASE_URL": self.services.database_url,
                "FEEDFLEET_REDIS_URL": self.services.redis_url,
                "FEEDFLEET_PULSAR_URL": self.services.pulsar_url,
                "FEEDFLEET_PULSAR_TOPIC": topic,
                "FEEDFLEET_JOURNAL_DIR": str(spool_dir),
                "FEEDFLEET_HOST": WORKER_HOST,
                KEY_ENV: "bench-key",
            }
        )
        with open(log_path, "ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "workers", lane.name],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

    async def _status(self, lane: Lane) -> Sample | None:
        assert self.redis is not None
        raw = await self.redis.get(provider_status_key(lane.provider_id))
        return Sample.parse(raw) if raw else None

    async def _fresh_status(
        self, after: float, worker: subprocess.Popen[bytes], lane: Lane, timeout: float = 10.0
    ) -> Sample:
        """The first status the worker writes after ``after`` (its clock, epoch seconds).

        An overloaded worker may not write one for seconds: after ``timeout`` the newest
        there is will do (rates use the status' own timestamps).
        """
        deadline = time.monotonic() + timeout
        while True:
            sample = await self._status(lane)
            if sample is not None and sample.at > after:
                return sample
            if worker.poll() is not None:
                raise WorkerDied(f"worker exited with {worker.returncode}")
            if time.monotonic() > deadline:
                if sample is not None:
                    return sample
                raise TimeoutError("no worker status in Redis")
            await asyncio.sleep(0.02)

    # ------------------------------------------------------------ a step

    async def step(
        self, rate: int, window_s: float, label: str, lane: Lane | None = None,
        *, truncate: bool = True,
    ) -> StepResult:  # fmt: skip
        """One provider at ``rate``; ``truncate=False`` when other lanes run beside it."""
        assert self.conn is not None and self.pulsar is not None
        lane = lane or self.lanes[0]
        self._step_no += 1
        started = time.monotonic()
        step_dir = self.work / f"step{self._step_no:03d}-{rate}-{lane.name}"
        step_dir.mkdir(parents=True)
        result = StepResult(label=label, offered=rate, window_s=window_s)
        topic = f"persistent://public/default/bench-{uuid.uuid4().hex[:12]}"
        if truncate:
            await self.conn.execute("TRUNCATE raw_market_data")
        if self.redis is not None:
            await self.redis.delete(provider_status_key(lane.provider_id))
        consumer = await asyncio.to_thread(Consumer, self.pulsar, topic)
        sim: subprocess.Popen[bytes] | None = None
        worker: subprocess.Popen[bytes] | None = None
        try:
            sim = self._start_simulator(rate, step_dir / "simulator.log", lane.sim_port)
            worker = self._start_worker(topic, step_dir / "spool", step_dir / "worker.log", lane)
            await self._measure(
                result, sim, worker, consumer, window_s, result.phase("setup", started), lane
            )
        except (WorkerDied, TimeoutError) as exc:
            result.sustained = False
            result.reasons.append(str(exc))
            if worker is not None:
                tail = (step_dir / "worker.log").read_bytes()[-1500:].decode(errors="replace")
                log(f"worker log tail ({step_dir / 'worker.log'}):\n{tail}")
        finally:
            stopping = time.monotonic()
            if sim is not None:
                _stop(sim, 5)
            if worker is not None:
                # A worker that kept up stops cleanly (and fast); an overloaded one would
                # spend its shutdown drain timeout first: it is killed.
                if result.sustained:
                    await asyncio.to_thread(_stop, worker, 30)
                else:
                    worker.kill()
                    await asyncio.to_thread(worker.wait)
                result.worker_exit_code = worker.returncode
                stopping = result.phase("stop_worker", stopping)
                with contextlib.suppress(psycopg.Error):
                    await db.remove_instance(self.conn, f"{lane.name}@{WORKER_HOST}:{worker.pid}")
            await asyncio.to_thread(consumer.close)
        result.elapsed_s = round(time.monotonic() - started, 1)
        log(result.summary())
        return result

    async def providers_step(self, rate: int, window_s: float, label: str) -> list[StepResult]:
        """Every lane at once, each at ``rate``: one worker and one simulator per provider,
        each judged on its own (kept up, nothing lost) over windows that overlap."""
        assert self.conn is not None
        await self.conn.execute("TRUNCATE raw_market_data")
        steps = [
            self.step(rate, window_s, f"{label} {lane.name}", lane, truncate=False)
            for lane in self.lanes
        ]
        return list(await asyncio.gather(*steps))

    async def _measure(
        self, result: StepResult, sim: subprocess.Popen[bytes], worker: subprocess.Popen[bytes],
        consumer: Consumer, window_s: float, mark: float, lane: Lane,
    ) -> None:  # fmt: skip
        opts = self.options
        n = len(self.symbols)
        # 1. Streaming: the coordinator assigned every symbol and events arrive.
        deadline = time.monotonic() + 30.0
        while True:
            sample = await self._status(lane)
            if sample and sample.subscribed >= n and sample.received > 0:
                break
            if worker.poll() is not None:
                raise WorkerDied(f"worker exited with {worker.returncode} before streaming")
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker not streaming after 30 s (last status {sample})")
            await asyncio.sleep(0.1)
        mark = result.phase("start", mark)
        await asyncio.sleep(opts.windows.warmup_s)
        await self._settle(worker, lane)
        mark = result.phase("warmup", mark)

        # 2. The window, from one fresh status to another; a sample every second.
        pids = {"worker": worker.pid, "simulator": sim.pid, "bench": os.getpid()}
        if self.services.broker_pid is not None:
            pids["broker"] = self.services.broker_pid
        first = await self._fresh_status(time.time(), worker, lane)
        cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        cpu0["machine"] = machine_busy_seconds()
        consumer.start_window()
        samples = [first]
        # The worker writes its status about once a second: the window ends with the first
        # status written once ``window_s`` (less a margin) has passed on its clock.
        end_at = time.monotonic() + window_s - 0.3
        while (remaining := end_at - time.monotonic()) > 0.05:
            await asyncio.sleep(min(1.0, remaining))
            sample = await self._status(lane)
            if sample is not None:
                samples.append(sample)
            if worker.poll() is not None:
                raise WorkerDied(f"worker exited with {worker.returncode} during the window")
        last = await self._fresh_status(first.at + window_s - 0.3, worker, lane)
        mark = result.phase("window", mark)
        cpu1 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        cpu1["machine"] = machine_busy_seconds()
        samples.append(last)
        elapsed = max(last.at - first.at, 1e-3)
        in_window = last.received - first.received
        result.received_per_s = round(in_window / elapsed, 1)
        result.cpu_cores = {k: round((cpu1[k] - cpu0[k]) / elapsed, 3) for k in cpu0}
        result.lag_at_window_end = {
            "pulsar": last.received - last.published,
            "postgres": last.received - last.stored,
        }
        if in_window > 0:
            result.cpu_s_per_million_events = round(
                (cpu1["worker"] - cpu0["worker"]) / in_window * 1e6, 2
            )
        result.spooled_max = max(s.spooled for s in samples)
        head, tail = samples[:3], samples[-3:]
        result.backlog_start = int(statistics.median(s.backlog for s in head))
        result.backlog_end = int(statistics.median(s.backlog for s in tail))
        result.window_receipt_p99_ms = percentiles_between(first.hdr, last.hdr)["p99"]

        # 3. Stop the offered load and let everything drain.
        _stop(sim, 5)
        stopped_at = time.time()
        # A step already missed (too slow, spooling, backlog) gets a shorter drain: its
        # verdict is known, and an overloaded worker may need minutes to empty its spools.
        self._judge_window(result)
        drain_s = self.options.windows.drain_s
        if result.reasons:
            drain_s = min(drain_s, OVERLOADED_DRAIN_S)
        final = await self._drain(worker, stopped_at, drain_s, lane)
        mark = result.phase("drain", mark)
        await self._wait_consumer(consumer, final.received, drain_s)
        mark = result.phase("consumer", mark)
        result.peak_rss_mb = round(peak_rss_mb(worker.pid), 1)
        result.received, result.published, result.stored = (
            final.received, final.published, final.stored,
        )  # fmt: skip
        result.spooled_end = final.spooled
        assert self.conn is not None
        cur = await self.conn.execute(
            "SELECT count(*) FROM raw_market_data WHERE provider = %s", (lane.name,)
        )
        row = await cur.fetchone()
        result.stored_rows = int(row[0]) if row else 0
        result.consumed_unique = len(consumer.ids)
        result.consumer_deliveries = consumer.deliveries
        result.receipt_ms = percentiles_between(first.hdr, final.hdr)
        result.pulsar_round_trip_ms = percentiles_between(
            first.round_trip_hdr, final.round_trip_hdr
        )
        result.consumer_ms = percentiles_ms(consumer.histogram)
        self._judge_totals(result)

    async def _settle(self, worker: subprocess.Popen[bytes], lane: Lane) -> None:
        deadline = time.monotonic() + SETTLE_MAX_S
        previous = await self._fresh_status(time.time(), worker, lane)
        while time.monotonic() < deadline:
            sample = await self._fresh_status(previous.at, worker, lane)
            p99 = percentiles_between(previous.hdr, sample.hdr)["p99"]
            if p99 is not None and p99 < SETTLED_LAG_MS:
                return
            previous = sample

    async def _drain(
        self, worker: subprocess.Popen[bytes], stopped_at: float, drain_s: float, lane: Lane
    ) -> Sample:
        """The first status, after the simulator stopped, with the worker disconnected (so
        it read everything the socket held) and everything received published and stored.
        """
        deadline = time.monotonic() + drain_s
        previous: Sample | None = None
        after = stopped_at
        while True:
            sample = await self._fresh_status(after, worker, lane, timeout=5.0)
            settled = sample.received == sample.published == sample.stored
            if settled and (
                sample.status != "CONNECTED"
                or (previous is not None and previous.received == sample.received)
            ):
                return sample
            previous = sample
            after = sample.at
            if time.monotonic() > deadline:
                return sample

    async def _wait_consumer(self, consumer: Consumer, count: int, drain_s: float) -> None:
        deadline = time.monotonic() + drain_s
        while len(consumer.ids) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.1)

    def _judge_window(self, r: StepResult) -> None:
        reasons = r.reasons
        if r.received_per_s < KEEP_UP_FRACTION * r.offered:
            reasons.append(
                f"received {r.received_per_s:,.0f}/s < {KEEP_UP_FRACTION:.0%} of offered"
            )
        if r.spooled_max > 0:
            reasons.append(f"spooled up to {r.spooled_max:,} events")
        growth = r.backlog_end - r.backlog_start
        if growth > BACKLOG_GROWTH_S * r.offered:
            reasons.append(f"backlog grew {r.backlog_start:,} -> {r.backlog_end:,}")
        lag = r.window_receipt_p99_ms
        if lag is not None and lag > MAX_LAG_P99_MS:
            reasons.append(f"running {lag:,.0f} ms behind (receipt p99)")

    def _judge_totals(self, r: StepResult) -> None:
        reasons = r.reasons
        if not r.received == r.published == r.stored:
            reasons.append(
                f"not drained: received {r.received:,} published {r.published:,} "
                f"stored {r.stored:,}"
            )
        if r.stored_rows != r.stored:
            reasons.append(f"raw_market_data has {r.stored_rows:,} rows, stored {r.stored:,}")
        if r.consumed_unique != r.received:
            reasons.append(f"consumer saw {r.consumed_unique:,} of {r.received:,} events")
        r.sustained = not reasons

    # ------------------------------------------------------------ baseline

    async def baseline(self, *, with_simulator: bool) -> dict[str, Any]:
        """aiohttp WebSocket receive + orjson parse, nothing else.

        The source is the replay server below (pre-encoded simulator frames, sent as fast
        as the socket takes them) so that the receiver, not the sender, is what is
        measured; ``with_simulator`` also measures the unpaced simulator as the source,
        which shows the simulator's own ceiling.
        """
        self._step_no += 1
        step_dir = self.work / f"step{self._step_no:03d}-baseline"
        step_dir.mkdir(parents=True)
        cmd = [
            sys.executable, "-m", "tests.bench", "--replay-server", str(self.sim_port),
            "--symbols", str(self.options.symbols),
            "--events-per-frame", str(self.options.events_per_frame),
        ]  # fmt: skip
        out: dict[str, Any] = {}
        out.update(await self._receive_only(self._start_source(cmd, step_dir / "replay.log")))
        if with_simulator:
            source = self._start_simulator(0, step_dir / "simulator.log", self.sim_port)
            out["simulator_unpaced"] = await self._receive_only(source)
        message = f"baseline: {out['events_per_s']:,.0f} events/s (cpu cores {out['cpu_cores']})"
        if with_simulator:
            sim = out["simulator_unpaced"]
            message += (
                f"; with the unpaced simulator as the source: {sim['events_per_s']:,.0f}"
                f" events/s (cpu cores {sim['cpu_cores']})"
            )
        log(message)
        return out

    def _start_source(self, cmd: list[str], log_path: Path) -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.sim_port, timeout=20)
        except TimeoutError:
            _stop(proc, 5)
            raise
        return proc

    async def _receive_only(self, source: subprocess.Popen[bytes]) -> dict[str, Any]:
        window = self.options.windows
        pids = {"client": os.getpid(), "source": source.pid}
        loads = orjson.loads
        try:
            async with (
                aiohttp.ClientSession() as http,
                http.ws_connect(
                    f"ws://127.0.0.1:{self.sim_port}/stocks", heartbeat=10.0,
                    max_msg_size=16 * 1024 * 1024,
                ) as ws,
            ):  # fmt: skip
                await ws.receive(timeout=10)  # connected
                await ws.send_str(codec.encode_auth("bench-key"))
                await ws.receive(timeout=10)  # auth_success
                channels = [
                    c for s in self.symbols
                    for c in codec.channels_for(s, (DataType.TRADE, DataType.QUOTE))
                ]  # fmt: skip
                for start in range(0, len(channels), 500):
                    await ws.send_str(codec.encode_subscribe(channels[start : start + 500]))
                events = 0
                begin_at = time.monotonic() + window.warmup_s
                end_at = begin_at + window.baseline_s
                t0: float | None = None
                count0 = 0
                cpu0: dict[str, float] = {}
                while True:
                    msg = await ws.receive()
                    if msg.type is not aiohttp.WSMsgType.BINARY and (
                        msg.type is not aiohttp.WSMsgType.TEXT
                    ):
                        raise RuntimeError(f"baseline: websocket {msg.type.name}")
                    items = loads(msg.data)
                    if items and items[0].get("ev") != "status":
                        events += len(items)
                    now = time.monotonic()
                    if t0 is None:
                        if now >= begin_at:
                            t0, count0 = now, events
                            cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
                    elif now >= end_at:
                        elapsed = now - t0
                        cores = {
                            k: round((cpu_seconds(p) - cpu0[k]) / elapsed, 3)
                            for k, p in pids.items()
                        }
                        return {"events_per_s": round((events - count0) / elapsed, 1),
                                "cpu_cores": cores}  # fmt: skip
        finally:
            _stop(source, 5)

    # ------------------------------------------------------------ a run

    async def run_once(self, run_no: int) -> dict[str, Any]:
        opts = self.options
        w = opts.windows
        log(f"run {run_no}/{opts.runs}")
        steps: list[StepResult] = []
        probes: dict[int, StepResult] = {}

        async def probe(rate: int) -> StepResult:
            if rate not in probes:
                result = await self.step(rate, w.probe_s, f"run {run_no} probe")
                probes[rate] = result
                steps.append(result)
            return probes[rate]

        baseline = await self.baseline(with_simulator=run_no == 1)

        # Ramp (1-2-5), then bisect between the last rate kept up with and the first missed.
        lo: int | None = None
        hi: int | None = None
        rate = opts.ramp_start
        while rate <= opts.ramp_max:
            if (await probe(rate)).sustained:
                lo, rate = rate, next_rate(rate)
            else:
                hi = rate
                break
        if lo is None:
            rate = opts.ramp_start
            for _ in range(4):
                rate = round_rate(rate / 2)
                if (await probe(rate)).sustained:
                    lo = rate
                    break
                hi = rate
        capped = hi is None and lo is not None
        for _ in range(opts.bisect_steps):
            if lo is None or hi is None:
                break
            mid = round_rate((lo + hi) / 2)
            if mid <= lo or mid >= hi:
                break
            if (await probe(mid)).sustained:
                lo = mid
            else:
                hi = mid

        # Confirm over the sustain window; step down 15% while it fails.
        max_rate = 0
        at_max: StepResult | None = None
        candidate = lo
        for _ in range(3):
            if candidate is None:
                break
            result = await self.step(candidate, w.sustain_s, f"run {run_no} sustain")
            steps.append(result)
            if result.sustained:
                max_rate, at_max = candidate, result
                break
            candidate = round_rate(candidate * 0.85)

        # Latency at the fixed rates and at 80% of this run's maximum.
        latency: dict[str, StepResult] = {}
        rate80 = round_rate(0.8 * max_rate) if max_rate else None
        wanted = list(opts.latency_rates) + ([rate80] if rate80 else [])
        for r in wanted:
            if str(r) in latency:
                continue
            if r in probes:
                latency[str(r)] = probes[r]
            else:
                result = await self.step(r, w.probe_s, f"run {run_no} latency")
                steps.append(result)
                latency[str(r)] = result

        providers: list[StepResult] = []
        if len(self.lanes) > 1:
            providers = await self.providers_step(
                opts.provider_rate, w.probe_s, f"run {run_no} providers"
            )
        return {
            "run": run_no,
            "providers_at_once": [p.as_json() for p in providers],
            "max_sustained_events_per_s": max_rate,
            "max_capped_by_ramp": capped,
            "rate_at_80pct_of_max": rate80,
            "baseline": baseline,
            "at_max": at_max.as_json() if at_max else None,
            "latency": {k: v.as_json() for k, v in latency.items()},
            "steps": [s.as_json() for s in steps],
        }


def _stop(proc: subprocess.Popen[bytes], timeout: float) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------- report


def _latency_entry(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the runs of one latency step's figures."""
    metrics = ("p50", "p99", "p999", "max")
    entry: dict[str, Any] = {m: median(s["receipt_ms"].get(m) for s in steps) for m in metrics}
    entry["consumer"] = {m: median(s["consumer_ms"].get(m) for s in steps) for m in metrics}
    entry["pulsar_round_trip"] = {
        m: median(s["pulsar_round_trip_ms"].get(m) for s in steps) for m in metrics
    }
    entry["received_events_per_s"] = median(s["received_per_s"] for s in steps)
    entry["kept_up_runs"] = sum(1 for s in steps if s["sustained"])
    entry["offered_per_run"] = [s["offered"] for s in steps]
    return entry


def _providers_entry(options: BenchOptions, runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Medians over the runs of the several-providers step; per run, the worst lane."""
    per_run = [r["providers_at_once"] for r in runs if r["providers_at_once"]]
    if not per_run:
        return None

    def worst(lanes: list[dict[str, Any]], key: str) -> float | None:
        values = [lane[key].get("p99") for lane in lanes]
        return None if None in values else max(values)

    return {
        "providers": len(per_run[0]),
        "offered_events_per_s_each": options.provider_rate,
        "kept_up_runs": sum(1 for lanes in per_run if all(lane["sustained"] for lane in lanes)),
        "received_events_per_s_total": median(
            sum(lane["received_per_s"] for lane in lanes) for lanes in per_run
        ),
        "receipt_p99_ms_worst_provider": median(worst(lanes, "receipt_ms") for lanes in per_run),
        "consumer_p99_ms_worst_provider": median(worst(lanes, "consumer_ms") for lanes in per_run),
        "worker_cpu_cores_total": median(
            sum(lane["cpu_cores"].get("worker", 0.0) for lane in lanes) for lanes in per_run
        ),
        "machine_cpu_cores": median(lanes[0]["cpu_cores"].get("machine") for lanes in per_run),
    }


def summarize(
    options: BenchOptions, runs: list[dict[str, Any]], services: Services
) -> dict[str, Any]:
    max_rate = median(r["max_sustained_events_per_s"] for r in runs) or 0.0
    baseline = median(r["baseline"]["events_per_s"] for r in runs) or 0.0
    rate80 = median(r["rate_at_80pct_of_max"] for r in runs)
    at_max = [r["at_max"] for r in runs if r["at_max"] is not None]
    latency: dict[str, Any] = {}
    for rate in options.latency_rates:
        steps = [r["latency"][str(rate)] for r in runs if str(rate) in r["latency"]]
        latency[str(rate)] = _latency_entry(steps)
    key80 = str(round_rate(rate80)) if rate80 else None
    if key80 is not None and key80 not in latency:
        steps = [r["latency"][str(r["rate_at_80pct_of_max"])] for r in runs
                 if r["rate_at_80pct_of_max"]]  # fmt: skip
        latency[key80] = _latency_entry(steps)
    cores_at_max = {
        k: median(s["cpu_cores"].get(k) for s in at_max)
        for k in (at_max[0]["cpu_cores"] if at_max else {})
    }
    return {
        "max_sustained_events_per_s": max_rate,
        "baseline_events_per_s": baseline,
        "pipeline_to_baseline_ratio": round(max_rate / baseline, 4) if baseline else None,
        "rate_at_80pct_of_max": key80,
        "latency_ms": latency,
        "cpu_s_per_million_events": median(s["cpu_s_per_million_events"] for s in at_max),
        "peak_rss_mb": median(s["peak_rss_mb"] for s in at_max),
        "cpu_cores_at_max": cores_at_max,
        "providers_at_once": _providers_entry(options, runs),
        "symbols": options.symbols,
        "events_per_frame": options.events_per_frame,
        "runs": options.runs,
        "quick": options.quick,
        "windows_s": {
            "warmup": options.windows.warmup_s,
            "probe": options.windows.probe_s,
            "sustain": options.windows.sustain_s,
            "baseline": options.windows.baseline_s,
        },
        "criteria": {
            "keep_up_fraction": KEEP_UP_FRACTION,
            "backlog_growth_s": BACKLOG_GROWTH_S,
            "max_lag_p99_ms": MAX_LAG_P99_MS,
        },
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "embedded_services": services.embedded,
        "max_capped_by_ramp": any(r["max_capped_by_ramp"] for r in runs),
        "run_details": runs,
    }


def render_table(report: dict[str, Any]) -> str:
    def n(value: float | None, digits: int = 0) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    runs = report["runs"]
    lines = [
        f"## feedfleet bench: {report['symbols']} symbols, {report['events_per_frame']} "
        f"events/frame, median of {runs} run{'s' if runs != 1 else ''}"
        f"{' (quick)' if report['quick'] else ''}",
        "",
        "| figure | value |",
        "|---|---|",
        f"| max sustained throughput | {n(report['max_sustained_events_per_s'])} events/s"
        f"{' (ramp cap)' if report['max_capped_by_ramp'] else ''} |",
        f"| baseline: WebSocket receive + JSON parse | {n(report['baseline_events_per_s'])} "
        "events/s |",
        f"| full pipeline / baseline | {n(report['pipeline_to_baseline_ratio'], 3)} |",
        f"| worker CPU per million events (at max) | {n(report['cpu_s_per_million_events'], 1)}"
        " s |",
        f"| worker peak RSS (at max) | {n(report['peak_rss_mb'], 1)} MB |",
        f"| CPU cores busy at max, of {report['machine']['cpus']} | "
        + ", ".join(f"{k} {v:.2f}" for k, v in report["cpu_cores_at_max"].items() if v is not None)
        + " |",
    ]
    multi = report.get("providers_at_once")
    if multi:
        lines.append(
            f"| {multi['providers']} providers at once, "
            f"{n(multi['offered_events_per_s_each'])} events/s each | kept up in "
            f"{multi['kept_up_runs']}/{runs} runs, "
            f"{n(multi['received_events_per_s_total'])} events/s received in all; worst "
            f"provider's p99 {n(multi['receipt_p99_ms_worst_provider'], 2)} ms to receipt, "
            f"{n(multi['consumer_p99_ms_worst_provider'], 2)} ms to the consumer; workers "
            f"{n(multi['worker_cpu_cores_total'], 2)} cores, machine "
            f"{n(multi['machine_cpu_cores'], 2)} |"
        )
    lines += [
        "",
        "Latency in ms: provider send stamp -> Pulsar receipt in the worker, and -> the "
        "consumer; and the part of the receipt time from handing the event to the Pulsar "
        "client to its receipt (batching, network, broker).",
        "",
        "| offered events/s | kept up | receipt p50 | p99 | p99.9 | max "
        "| consumer p50 | p99 | p99.9 | max | Pulsar round trip p50 | p99 |",
        "|---:|:---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, e in report["latency_ms"].items():
        c, rt = e["consumer"], e["pulsar_round_trip"]
        label = n(float(key))
        if key == str(report.get("rate_at_80pct_of_max")):
            label += " (80% of max)"
        lines.append(
            f"| {label} | {e['kept_up_runs']}/{runs} | {n(e['p50'], 2)} | {n(e['p99'], 2)} "
            f"| {n(e['p999'], 2)} | {n(e['max'], 2)} | {n(c['p50'], 2)} | {n(c['p99'], 2)} "
            f"| {n(c['p999'], 2)} | {n(c['max'], 2)} | {n(rt['p50'], 2)} | {n(rt['p99'], 2)} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- the baseline's source


async def serve_replay(port: int, symbols: int, events_per_frame: int) -> None:
    """A Polygon-protocol source that sends pre-encoded frames as fast as the socket takes
    them: the same frames the simulator builds (trades and quotes over the subscribed
    symbols, with ``ffsend``), without the cost of building them."""
    from aiohttp import web

    from simulators.market import PriceWalk
    from simulators.polygon import tick_event

    names = symbol_universe(symbols)
    walk = PriceWalk(names)
    targets = [(ev, sym) for ev in ("T", "Q") for sym in names]
    frames: list[bytes] = []
    rr = 0
    for _ in range(256):
        now_ms = time.time_ns() // 1_000_000
        events: list[dict[str, object]] = []
        for _ in range(events_per_frame):
            ev, sym = targets[rr % len(targets)]
            rr += 1
            event, _ = tick_event(walk, ev, sym, now_ms)
            event["ffsend"] = time.time_ns()
            events.append(event)
        frames.append(codec.encode_events(events))

    async def send(ws: web.WebSocketResponse) -> None:
        i = 0
        while not ws.closed:
            await ws.send_bytes(frames[i % len(frames)])
            i += 1
            if i % 64 == 0:
                await asyncio.sleep(0)  # let pings and client frames through

    async def handle(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=4 * 1024 * 1024)
        await ws.prepare(request)
        await ws.send_str(codec.encode_status("connected", "Connected Successfully"))
        sender: asyncio.Task[None] | None = None
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                action = codec.decode_client_action(msg.data)
                if action.action == "auth":
                    await ws.send_str(codec.encode_status("auth_success", "authenticated"))
                    sender = sender or asyncio.create_task(send(ws))
                else:
                    await ws.send_str(codec.encode_status("success", action.action))
        finally:
            if sender is not None:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                    await sender
        return ws

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


# ---------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tests.bench",
        description="Measure the pipeline on this machine: simulator -> worker -> "
        "Pulsar + PostgreSQL + Redis.",
    )
    p.add_argument("--json", metavar="FILE", default=None, help="write the report as JSON")
    p.add_argument("--quick", action="store_true", help="1 run, short windows (for CI)")
    p.add_argument("--symbols", type=int, default=500, metavar="N", help="default 500")
    p.add_argument("--events-per-frame", type=int, default=50, metavar="N", help="default 50")
    p.add_argument("--providers", type=int, default=PROVIDERS_AT_ONCE, metavar="N",
                   help="providers at once in each run's last step, each with its own worker "
                   f"and simulator (default {PROVIDERS_AT_ONCE}; 1: no such step)")  # fmt: skip
    p.add_argument("--provider-rate", type=int, default=PER_PROVIDER_RATE, metavar="N",
                   help=f"events/s offered to each (default {PER_PROVIDER_RATE:,})")  # fmt: skip
    p.add_argument("--runs", type=int, default=None, metavar="N",
                   help="runs to take the median of (default 3; --quick: 1)")  # fmt: skip
    p.add_argument("--work-dir", default=None, metavar="DIR",
                   help="keep logs and data here (default: a temporary directory)")  # fmt: skip
    # For the smoke test and for exploring; not part of the documented interface.
    p.add_argument("--window-s", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--ramp-start", type=int, default=10_000, help=argparse.SUPPRESS)
    p.add_argument("--ramp-max", type=int, default=500_000, help=argparse.SUPPRESS)
    p.add_argument("--bisect-steps", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--latency-rates", default=None, help=argparse.SUPPRESS)
    p.add_argument("--replay-server", type=int, default=None, help=argparse.SUPPRESS)
    return p


def parse_options(argv: list[str]) -> BenchOptions:
    args = build_parser().parse_args(argv)
    windows = QUICK if args.quick else FULL
    if args.window_s is not None:
        s = args.window_s
        windows = Windows(warmup_s=s, probe_s=s, sustain_s=s, baseline_s=s, drain_s=15.0)
    rates: tuple[int, ...] = LATENCY_RATES
    if args.latency_rates is not None:
        rates = tuple(int(r) for r in args.latency_rates.split(",") if r.strip())
    for name in ("symbols", "events_per_frame", "ramp_start", "ramp_max", "providers",
                 "provider_rate"):  # fmt: skip
        if getattr(args, name) < 1:
            raise SystemExit(f"bench: --{name.replace('_', '-')} must be at least 1")
    return BenchOptions(
        symbols=args.symbols,
        events_per_frame=args.events_per_frame,
        runs=max(1, args.runs if args.runs is not None else (1 if args.quick else 3)),
        quick=args.quick,
        windows=windows,
        ramp_start=args.ramp_start,
        ramp_max=args.ramp_max,
        bisect_steps=args.bisect_steps
        if args.bisect_steps is not None
        else (1 if args.quick else 3),
        latency_rates=rates,
        providers=args.providers,
        provider_rate=args.provider_rate,
        json_path=Path(args.json) if args.json else None,
        work_dir=Path(args.work_dir) if args.work_dir else None,
    )


async def run_bench(options: BenchOptions) -> dict[str, Any]:
    from common.log import configure_logging

    configure_logging("console", "warning")
    if options.work_dir is not None:
        work = options.work_dir.resolve()
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="feedfleet-bench-"))
    services = Services(work)
    bench: Bench | None = None
    try:
        await asyncio.to_thread(services.start)
        log(f"services ready (embedded: {', '.join(services.embedded) or 'none'}); work dir {work}")
        bench = Bench(options, services, work)
        await bench.setup()
        runs = [await bench.run_once(i) for i in range(1, options.runs + 1)]
        return summarize(options, runs, services)
    finally:
        if bench is not None:
            await bench.close()
        await asyncio.to_thread(services.close)
        if options.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str]) -> int:
    import uvloop

    args = build_parser().parse_args(argv)
    if args.replay_server is not None:
        uvloop.run(serve_replay(args.replay_server, args.symbols, args.events_per_frame))
        return 0
    options = parse_options(argv)
    started = time.monotonic()
    report = uvloop.run(run_bench(options))
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    if options.json_path is not None:
        options.json_path.parent.mkdir(parents=True, exist_ok=True)
        options.json_path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    print(render_table(report))
    print(f"\n(elapsed {report['elapsed_s']:.0f} s)")
    return 0
