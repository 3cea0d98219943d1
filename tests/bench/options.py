"""The benchmark's options (windows, rates, the command line of ``python -m tests.bench``)
and its progress lines on stderr."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

LATENCY_RATES = (1_000, 10_000, 50_000)
# Several providers at once: this many workers, each with its own simulator, at this rate.
PROVIDERS_AT_ONCE = 3
PER_PROVIDER_RATE = 10_000
# The per-stage CPU step's offered rate, and the rate of the step with the simulator's own
# frame sizes (its default batch, as `feedfleet run` starts it).
STAGE_RATE = 20_000
NATURAL_RATE = 2_000


def log(message: str) -> None:
    """A progress line on stderr (stdout carries the report)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Windows:
    warmup_s: float
    probe_s: float  # ramp probes, latency and per-stage CPU steps
    sustain_s: float  # the confirmation at the maximum
    baseline_s: float  # the receive-only baseline and each side-by-side client
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
    stage_rate: int
    natural_rate: int
    pin: bool
    json_path: Path | None
    work_dir: Path | None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tests.bench",
        description="Measure the pipeline on this machine: simulator -> worker -> "
        "Pulsar + PostgreSQL + Redis, its CPU per stage, and receive + decode beside the "
        "official Polygon (Massive) client.",
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
    p.add_argument("--stage-rate", type=int, default=STAGE_RATE, metavar="N",
                   help="events/s offered in the per-stage CPU step "
                   f"(default {STAGE_RATE:,})")  # fmt: skip
    p.add_argument("--no-pin", action="store_true",
                   help="leave every process on every core (default on 2 or more cores: the "
                   "worker on CPU 1, everything else the bench starts on CPU 0)")  # fmt: skip
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
    p.add_argument("--natural-rate", type=int, default=NATURAL_RATE, help=argparse.SUPPRESS)
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
                 "provider_rate", "stage_rate", "natural_rate"):  # fmt: skip
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
        stage_rate=args.stage_rate,
        natural_rate=args.natural_rate,
        pin=not args.no_pin,
        json_path=Path(args.json) if args.json else None,
        work_dir=Path(args.work_dir) if args.work_dir else None,
    )
