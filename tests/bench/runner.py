"""`python -m tests.bench` (`make bench`): the real pipeline on this machine, measured.

A Polygon simulator -> one worker process -> Pulsar + PostgreSQL COPY + Redis, and a
Pulsar consumer (a thread of this process) that checks every event arrived. Each run:

1. a baseline: aiohttp WebSocket receive + orjson parse against the replay source
   (``tests.bench.replay_server``), with no normalization and no sinks (``baseline.py``);
2. the max sustained throughput: a 1-2-5 ramp from ``--ramp-start`` with short probe
   windows, a bisection between the last rate kept up with and the first one missed, then
   a confirmation over the sustain window (30 s; stepping down 15% when it fails);
3. latency at 1k, 10k and 50k events/s and at 80% of the maximum: provider -> Pulsar
   receipt (the worker's histogram, from each event's Polygon time ``t``, in ms) and
   provider -> consumer (the consumer's, from each trade's send stamp ``i``, in ns);
4. the worker's CPU per event split by stage at ``--stage-rate`` (20,000/s), the worker
   timing its stages (``FEEDFLEET_STAGE_CPU=1``, ``stages.py``);
5. the same at 2,000/s with the simulator's own frame sizes (its default batch, as
   ``feedfleet run`` starts it);
6. several providers at once (``--providers``, 3, at ``--provider-rate``, 10,000 events/s
   each): one worker and one simulator per provider, each judged on its own.

Before the runs, receive + decode of the official ``massive`` client and of our adapter,
side by side against the same replay source (``side_by_side.py``). Each figure is the
median of ``--runs`` runs (3; ``--quick``: 1 run, shorter windows); ``report.py`` sums it
up as tables on stdout and as JSON (``--json FILE``), with the targets met or missed.

Where the machine has two cores, the worker runs alone on CPU 1 and everything else the
bench starts (simulators, embedded broker, PostgreSQL and Redis, this process with its
consumers) on CPU 0 (``--no-pin``: everything everywhere). Services named in the
environment (``services.py``) are used as they are and not pinned.

Every measurement step starts a fresh simulator and worker on a fresh topic with
``raw_market_data`` truncated, so each step is measured from a clean start after its
warm-up: 3 s, then until the worker has worked off the backlog it built while starting
(at most 20 s more). What "kept up" means is in ``step.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psycopg
import pulsar
import redis.asyncio as aioredis
import structlog
from structlog.typing import EventDict, WrappedLogger

from common import db
from common.config import PulsarAccess, Settings
from common.embedded import free_port
from common.model import DataType
from common.pulsar_client import new_pulsar_client
from common.redis_keys import provider_status_key
from common.stage_cpu import ENV as STAGE_CPU_ENV
from simulators.market import symbol_universe
from simulators.polygon import build_arg_parser as simulator_arg_parser
from tests.bench import processes
from tests.bench.baseline import receive_only
from tests.bench.consumer import Consumer
from tests.bench.figures import next_rate, percentiles_between, percentiles_ms, round_rate
from tests.bench.options import BenchOptions, log, parse_options
from tests.bench.procstat import Pinning, cpu_seconds, machine_busy_seconds, peak_rss_mb
from tests.bench.report import render_table, summarize
from tests.bench.services import Services
from tests.bench.stages import CpuReading, split_cpu
from tests.bench.step import Sample, StepResult, judge_totals, judge_window

PROVIDER_NAME = "bench"
# The window starts once the worker has worked off what piled up while it started: the
# receipt p99 over one status interval under SETTLED_LAG_MS, or SETTLE_MAX_S after the
# warm-up, whichever comes first (the judge then sees whatever lag is left).
SETTLED_LAG_MS = 100.0
SETTLE_MAX_S = 20.0
OVERLOADED_DRAIN_S = 8.0
# The simulator's own frame size when it is given none (as `feedfleet run` starts it).
NATURAL_EVENTS_PER_FRAME: int = simulator_arg_parser().get_default("batch")


@dataclass(frozen=True)
class Lane:
    """One provider row and its simulator's port: a step runs a simulator and a worker
    per lane. Single-provider steps use the first lane."""

    name: str
    provider_id: str
    sim_port: int


class WorkerDied(RuntimeError):
    pass


def _coordinator_errors_only(_: WrappedLogger, method: str, event: EventDict) -> EventDict:
    """Drop the warnings of the coordinator the bench runs: between steps no worker
    serves the bench's symbols, and each poll would list all of them as stranded
    (``failover_impossible``), hundreds of symbols a line."""
    if method not in ("error", "critical", "exception") and (
        structlog.contextvars.get_contextvars().get("component") == "bench-coordinator"
    ):
        raise structlog.DropEvent
    return event


class Bench:
    def __init__(
        self, options: BenchOptions, services: Services, work: Path, pinning: Pinning
    ) -> None:
        self.options = options
        self.services = services
        self.work = work
        self.pinning = pinning
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
                {"url": f"ws://127.0.0.1:{port}/stocks", "api_key_env": processes.KEY_ENV},
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
        # The task copies this context: its log lines carry the component, which
        # _coordinator_errors_only filters on.
        with structlog.contextvars.bound_contextvars(component="bench-coordinator"):
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

    def _start_worker(
        self, topic: str, step_dir: Path, lane: Lane, *, stage_cpu: bool, own_core: bool
    ) -> subprocess.Popen[bytes]:
        svc = self.services
        env = {
            "FEEDFLEET_DATABASE_URL": svc.database_url,
            "FEEDFLEET_REDIS_URL": svc.redis_url,
            "FEEDFLEET_PULSAR_URL": svc.pulsar_url,
            "FEEDFLEET_PULSAR_TOPIC": topic,
            "FEEDFLEET_JOURNAL_DIR": str(step_dir / "spool"),
        }
        if stage_cpu:
            env[STAGE_CPU_ENV] = "1"
        worker = processes.start_worker(lane.name, env, step_dir / "worker.log")
        # At once: the interpreter has not started the Pulsar client's threads yet, and
        # any it has started are moved too.
        if own_core:
            self.pinning.pin_worker(worker.pid)
        else:
            self.pinning.unpin(worker.pid)
        return worker

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
        *, truncate: bool = True, stage_cpu: bool = False, natural_frames: bool = False,
        own_core: bool = True,
    ) -> StepResult:  # fmt: skip
        """One provider at ``rate``; ``truncate=False`` when other lanes run beside it.

        ``stage_cpu``: the worker times its stages and the step splits its CPU per event;
        ``natural_frames``: the simulator sends frames of its own default size;
        ``own_core=False``: the worker may run on every core (several workers at once).
        """
        assert self.conn is not None and self.pulsar is not None
        lane = lane or self.lanes[0]
        self._step_no += 1
        started = time.monotonic()
        step_dir = self.work / f"step{self._step_no:03d}-{rate}-{lane.name}"
        step_dir.mkdir(parents=True)
        frame_events = None if natural_frames else self.options.events_per_frame
        result = StepResult(
            label=label, offered=rate, window_s=window_s,
            events_per_frame=frame_events or NATURAL_EVENTS_PER_FRAME,
        )  # fmt: skip
        topic = f"persistent://public/default/bench-{uuid.uuid4().hex[:12]}"
        if truncate:
            await self.conn.execute("TRUNCATE raw_market_data")
        if self.redis is not None:
            await self.redis.delete(provider_status_key(lane.provider_id))
        consumer = await asyncio.to_thread(Consumer, self.pulsar, topic)
        sim: subprocess.Popen[bytes] | None = None
        worker: subprocess.Popen[bytes] | None = None
        try:
            sim = processes.start_simulator(
                lane.sim_port, rate, self.options.symbols, frame_events, step_dir / "simulator.log"
            )
            worker = self._start_worker(
                topic, step_dir, lane, stage_cpu=stage_cpu, own_core=own_core
            )
            mark = result.phase("setup", started)
            await self._measure(result, sim, worker, consumer, window_s, mark, lane, stage_cpu)
        except (WorkerDied, TimeoutError) as exc:
            result.sustained = False
            result.reasons.append(str(exc))
            if worker is not None:
                tail = (step_dir / "worker.log").read_bytes()[-1500:].decode(errors="replace")
                log(f"worker log tail ({step_dir / 'worker.log'}):\n{tail}")
        finally:
            stopping = time.monotonic()
            if sim is not None:
                processes.stop(sim, 5)
            if worker is not None:
                # A worker that kept up stops cleanly (and fast); an overloaded one would
                # spend its shutdown drain timeout first: it is killed.
                if result.sustained:
                    await asyncio.to_thread(processes.stop, worker, 30)
                else:
                    worker.kill()
                    await asyncio.to_thread(worker.wait)
                result.worker_exit_code = worker.returncode
                stopping = result.phase("stop_worker", stopping)
                instance = f"{lane.name}@{processes.WORKER_HOST}:{worker.pid}"
                # A connection of its own: the several-providers step stops its lanes at
                # once, and transactions of several tasks on one connection nest into each
                # other and can be left open, holding the row locks every later worker's
                # registration then waits for.
                with contextlib.suppress(psycopg.Error, OSError):
                    async with await db.connect(self.services.database_url) as own:
                        await db.remove_instance(own, instance)
            await asyncio.to_thread(consumer.close)
        result.elapsed_s = round(time.monotonic() - started, 1)
        log(result.summary())
        return result

    async def providers_step(self, rate: int, window_s: float, label: str) -> list[StepResult]:
        """Every lane at once, each at ``rate``: one worker and one simulator per provider,
        each judged on its own (kept up, nothing lost) over windows that overlap. The
        workers run on every core: one core for all of them would measure the pinning."""
        assert self.conn is not None
        await self.conn.execute("TRUNCATE raw_market_data")
        steps = [
            self.step(rate, window_s, f"{label} {lane.name}", lane, truncate=False, own_core=False)
            for lane in self.lanes
        ]
        return list(await asyncio.gather(*steps))

    async def _measure(
        self, result: StepResult, sim: subprocess.Popen[bytes], worker: subprocess.Popen[bytes],
        consumer: Consumer, window_s: float, mark: float, lane: Lane, stage_cpu: bool,
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
        first = await self._settle(worker, lane)
        mark = result.phase("warmup", mark)

        # 2. The window, from one fresh status (the one the warm-up ended with, seen within
        # a poll of its writing) to another; a sample every second. The /proc readings are
        # taken as soon as each of the two is seen.
        pids = {"worker": worker.pid, "simulator": sim.pid, "bench": os.getpid()}
        if self.services.broker_pid is not None:
            pids["broker"] = self.services.broker_pid
        threads0 = CpuReading.read(worker.pid) if stage_cpu else None
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
        threads1 = CpuReading.read(worker.pid) if stage_cpu else None
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
        if threads0 is not None and threads1 is not None:
            split = split_cpu(
                worker.pid, in_window, first.stage_cpu, last.stage_cpu, threads0, threads1
            )
            if split is not None:
                result.cpu_us_per_event = split.per_event_us
                result.cpu_split = {k: v for k, v in asdict(split).items() if k != "per_event_us"}
        result.spooled_max = max(s.spooled for s in samples)
        head, tail = samples[:3], samples[-3:]
        result.backlog_start = int(statistics.median(s.backlog for s in head))
        result.backlog_end = int(statistics.median(s.backlog for s in tail))
        result.window_receipt_p99_ms = percentiles_between(first.hdr, last.hdr)["p99"]

        # 3. Stop the offered load and let everything drain.
        processes.stop(sim, 5)
        stopped_at = time.time()
        # A step already missed (too slow, spooling, backlog) gets a shorter drain: its
        # verdict is known, and an overloaded worker may need minutes to empty its spools.
        judge_window(result)
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
        judge_totals(result)

    async def _settle(self, worker: subprocess.Popen[bytes], lane: Lane) -> Sample:
        """Waits until the worker is no longer behind (see SETTLED_LAG_MS); returns the
        fresh status that showed it (or the last one, after SETTLE_MAX_S)."""
        deadline = time.monotonic() + SETTLE_MAX_S
        previous = await self._status(lane) or await self._fresh_status(time.time(), worker, lane)
        while True:
            sample = await self._fresh_status(previous.at, worker, lane)
            p99 = percentiles_between(previous.hdr, sample.hdr)["p99"]
            if (p99 is not None and p99 < SETTLED_LAG_MS) or time.monotonic() >= deadline:
                return sample
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

    # ------------------------------------------------------------ baseline

    async def baseline(self, *, with_simulator: bool) -> dict[str, Any]:
        """aiohttp WebSocket receive + orjson parse, nothing else.

        The source is the replay server (pre-encoded simulator frames, sent as fast as the
        socket takes them) so that the receiver, not the sender, is what is measured;
        ``with_simulator`` also measures the unpaced simulator as the source, which shows
        the simulator's own ceiling.
        """
        opts = self.options
        self._step_no += 1
        step_dir = self.work / f"step{self._step_no:03d}-baseline"
        step_dir.mkdir(parents=True)
        source = processes.start_replay_source(
            self.sim_port, opts.symbols, opts.events_per_frame, step_dir / "replay.log"
        )
        out: dict[str, Any] = {}
        out.update(await receive_only(self.sim_port, self.symbols, opts.windows, source))
        if with_simulator:
            source = processes.start_simulator(
                self.sim_port, 0, opts.symbols, opts.events_per_frame, step_dir / "simulator.log"
            )
            out["simulator_unpaced"] = await receive_only(
                self.sim_port, self.symbols, opts.windows, source
            )
        message = f"baseline: {out['events_per_s']:,.0f} events/s (cpu cores {out['cpu_cores']})"
        if with_simulator:
            sim = out["simulator_unpaced"]
            message += (
                f"; with the unpaced simulator as the source: {sim['events_per_s']:,.0f}"
                f" events/s (cpu cores {sim['cpu_cores']})"
            )
        log(message)
        return out

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

        # The unpaced simulator as a second source only in a full run's first: it shows
        # the simulator's ceiling, which --quick has no use for.
        baseline = await self.baseline(with_simulator=run_no == 1 and not opts.quick)

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

        # The worker's CPU per event by stage: at the fixed rate, and at 2,000/s with the
        # simulator's own frame sizes.
        stage_step = await self.step(
            opts.stage_rate, w.probe_s, f"run {run_no} stage cpu", stage_cpu=True
        )
        natural_step = await self.step(
            opts.natural_rate, w.probe_s, f"run {run_no} stage cpu, natural frames",
            stage_cpu=True, natural_frames=True,
        )  # fmt: skip
        steps += [stage_step, natural_step]

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
            "stage_cpu": stage_step.as_json(),
            "stage_cpu_natural": natural_step.as_json(),
            "steps": [s.as_json() for s in steps],
        }


# ---------------------------------------------------------------- entry point


async def run_bench(
    options: BenchOptions, pinning: Pinning
) -> tuple[list[dict[str, Any]], Services]:
    """The runs, and the services they ran against (already closed)."""
    from common.log import configure_logging

    configure_logging("console", "warning")
    structlog.configure(
        processors=[_coordinator_errors_only, *structlog.get_config()["processors"]]
    )
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
        bench = Bench(options, services, work, pinning)
        await bench.setup()
        runs = [await bench.run_once(i) for i in range(1, options.runs + 1)]
        return runs, services
    finally:
        if bench is not None:
            await bench.close()
        await asyncio.to_thread(services.close)
        if options.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


def side_by_side(options: BenchOptions) -> dict[str, Any] | None:
    """Receive + decode of the official client and of ours (``side_by_side.py``, which
    pins its server and clients itself), or None when that module cannot be loaded."""
    try:
        from tests.bench.side_by_side import measure_side_by_side
    except ImportError as exc:
        log(f"side by side not measured: {exc}")
        return None
    try:
        result = measure_side_by_side(
            options.windows.baseline_s, options.runs, options.symbols, options.events_per_frame
        )
    except RuntimeError as exc:  # a client failed or hung: the rest of the bench still runs
        log(f"side by side failed: {exc}")
        return {"official_events_per_s": None, "ours_events_per_s": None, "ratio": None,
                "note": f"not measured: {exc}"}  # fmt: skip
    figures = asdict(result)
    log(
        f"side by side: official {figures['official_events_per_s']} events/s, ours "
        f"{figures['ours_events_per_s']:,.0f} events/s, ratio {figures['ratio']}"
    )
    return figures


def main(argv: list[str]) -> int:
    import orjson
    import uvloop

    options = parse_options(argv)
    started = time.monotonic()
    # Before this process pins itself: the side-by-side puts its own processes on both
    # cores, and would see only one once this process is on CPU 0.
    compared = side_by_side(options)
    pinning = Pinning.plan(options.pin)
    pinning.pin_self()
    runs, services = uvloop.run(run_bench(options, pinning))
    report = summarize(options, runs, services, pinning, compared)
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    if options.json_path is not None:
        options.json_path.parent.mkdir(parents=True, exist_ok=True)
        options.json_path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    print(render_table(report))
    print(f"\n(elapsed {report['elapsed_s']:.0f} s)")
    return 0
