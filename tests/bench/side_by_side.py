"""Receive + decode rate of the official Polygon/Massive client and of our adapter, side by
side, against the same local replay server (``tests.bench.replay_server``).

Each client runs in its own process and counts the events it decoded over a window after
a warm-up, then prints its figures as JSON; the runs alternate which client goes first
(official, ours; ours, official; ...), and the medians are reported with their ratio.
Where the machine has two cores or more, the server is pinned to CPU 0 and each client to
CPU 1, so a client never shares its core with the server.

- Official: ``massive.WebSocketClient(...).run(handle_msg)``, its documented mode: the
  ``websockets`` library, the standard ``json`` module, and the models (``EquityTrade``,
  ``EquityQuote``), not ``raw=True``; ``run`` starts its own loop with ``asyncio.run``.
  It counts the model objects its callback receives. ``run`` returns only when the
  connection ends, so the callback raises once the window is over, which ends ``run``.
  The client neither prints nor sleeps per message; it does wrap each receive in
  ``asyncio.wait_for(..., timeout=1)``, which is part of what it costs. It asks for
  ``/stocks`` on the host given as its ``feed`` (here ``127.0.0.1:PORT``, ``secure=False``).
- Ours: ``workers.polygon.PolygonAdapter``, ``connect``, ``subscribe``, then
  ``stream_batches()``: the records as the worker gets them, under uvloop as the worker
  runs (``workers/cli.py``), with the connection config a provider row would have (the
  defaults, so backfill bookkeeping on, as in production). It counts the records.

Both read the same TEXT frames: trades and quotes, as the simulator makes them (the
official client's ``EquityQuote`` reads our quotes as they are), no stamps, no
compression. Both subscribe to the ``T`` and ``Q`` channels of every symbol. The events
of the warm-up are checked one by one (their kinds are reported); the server reports what
it sent on each connection, named by the client's API key, so a client that counted
anything but events would be seen to count more than it was sent.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from common.embedded import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[2]
NOT_INSTALLED = "massive not installed (pip install -e '.[bench]')"
SERVER_CPU, CLIENT_CPU = 0, 1
KEY_ENV = "FEEDFLEET_SIDE_BY_SIDE_KEY"
# A client that has not finished this long after its window should have ended is stuck.
CLIENT_SLACK_S = 60.0


@dataclass(slots=True)
class ClientRun:
    """One client's figures over one window."""

    client: str  # "official" or "ours"
    run: int
    events_per_s: float
    cpu_us_per_event: float  # the client process's CPU time over the window, per event
    cpu_share: float  # that CPU time / the window: below 1, the client waited or was preempted
    window_s: float
    window_events: int
    total_events: int  # counted on the connection, warm-up included
    events_sent: int  # what the server handed to that connection's socket
    kinds: dict[str, int]  # the warm-up's events by kind, each one looked at


@dataclass(slots=True)
class SideBySide:
    """Medians over the runs; ``ratio`` is ours / official. On a shared machine the rates
    move with what else runs; the CPU time per event much less, so ``cpu_ratio`` (official
    / ours CPU per event) is given too."""

    official_events_per_s: float | None
    ours_events_per_s: float
    ratio: float | None
    note: str
    official_cpu_us_per_event: float | None = None
    ours_cpu_us_per_event: float = 0.0
    cpu_ratio: float | None = None
    official_runs: list[ClientRun] = field(default_factory=list)
    ours_runs: list[ClientRun] = field(default_factory=list)


# ---------------------------------------------------------------- client side


class WindowCount:
    """Counts events one batch at a time: a warm-up, in which each event's kind is
    counted, then a window, in which only the batch sizes are added up."""

    def __init__(self, warmup_s: float, window_s: float, kind: Callable[[Any], str]) -> None:
        self.warmup_s = warmup_s
        self.window_s = window_s
        self.kind = kind
        self.kinds: Counter[str] = Counter()
        self.total = 0
        self._begin_at: float | None = None  # end of the warm-up
        self._counting = False  # in the window
        self._t0 = self._t1 = 0.0
        self._cpu0 = self._cpu1 = 0.0
        self._count0 = self._count1 = 0
        self.over = False

    def add(self, batch: Sequence[Any]) -> bool:
        """Count ``batch``; True once the window is over."""
        now = time.monotonic()
        self.total += len(batch)
        if self._counting:
            if now - self._t0 >= self.window_s:
                self._t1, self._cpu1, self._count1 = now, time.process_time(), self.total
                self.over = True
            return self.over
        if self._begin_at is None:
            self._begin_at = now + self.warmup_s  # from the first data
        self.kinds.update(map(self.kind, batch))
        if now >= self._begin_at:
            self._t0, self._cpu0, self._count0 = now, time.process_time(), self.total
            self._counting = True
        return False

    def figures(self) -> dict[str, Any]:
        if not self.over:
            raise RuntimeError(f"the stream ended before the window did ({self.total} events)")
        events = self._count1 - self._count0
        elapsed = self._t1 - self._t0
        return {
            "events_per_s": events / elapsed,
            "cpu_us_per_event": (self._cpu1 - self._cpu0) / events * 1e6 if events else 0.0,
            "cpu_share": (self._cpu1 - self._cpu0) / elapsed,
            "window_s": elapsed,
            "window_events": events,
            "total_events": self.total,
            "kinds": dict(self.kinds),
        }


def channels(symbols: int) -> list[str]:
    from simulators.market import symbol_universe

    return [f"{ev}.{s}" for s in symbol_universe(symbols) for ev in ("T", "Q")]


class _WindowOver(Exception):
    """Raised from the official client's callback: the only way to end ``run``."""


def run_official(
    port: int, key: str, symbols: int, warmup_s: float, window_s: float
) -> dict[str, Any]:
    from massive import WebSocketClient

    count = WindowCount(warmup_s, window_s, lambda m: type(m).__name__)

    def handle_msg(msgs: list[Any]) -> None:
        if count.add(msgs):
            raise _WindowOver

    client = WebSocketClient(
        api_key=key, feed=f"127.0.0.1:{port}", market="stocks", secure=False,
        subscriptions=channels(symbols),
    )  # fmt: skip
    with contextlib.suppress(_WindowOver):
        client.run(handle_msg)
    return count.figures()


async def run_ours(
    port: int, key: str, symbols: int, warmup_s: float, window_s: float
) -> dict[str, Any]:
    from common.log import configure_logging
    from common.model import DataType
    from common.provider import Instrument, ProviderConfig
    from simulators.market import symbol_universe
    from workers.polygon import PolygonAdapter

    configure_logging("console", "warning")
    os.environ[KEY_ENV] = key
    row = ProviderConfig(
        id=str(uuid.uuid4()), name="polygon-side-by-side", provider_type="polygon",
        connection_config={"url": f"ws://127.0.0.1:{port}/stocks", "api_key_env": KEY_ENV},
    )  # fmt: skip
    count = WindowCount(warmup_s, window_s, lambda r: f"{type(r).__name__}:{r.data_type.name}")
    wanted = frozenset({DataType.TRADE, DataType.QUOTE})
    adapter = PolygonAdapter(row)
    await adapter.connect()
    try:
        await adapter.subscribe([Instrument(s, wanted) for s in symbol_universe(symbols)])
        async for batch in adapter.stream_batches():
            if count.add(batch):
                break
    finally:
        await adapter.disconnect()
    return count.figures()


# ---------------------------------------------------------------- the measurement


class ReplayServer:
    """``tests.bench.replay_server`` in a subprocess, and the reports of its connections."""

    def __init__(self, symbols: int, events_per_frame: int, cpu: int | None) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "tests.bench.replay_server", "--port", str(self.port),
                "--symbols", str(symbols), "--events-per-frame", str(events_per_frame),
            ],
            cwd=ROOT, stdout=subprocess.PIPE,
        )  # fmt: skip
        if cpu is not None:
            os.sched_setaffinity(self.proc.pid, {cpu})
        self._sent: dict[str, int] = {}
        self._changed = threading.Condition()
        assert self.proc.stdout is not None
        threading.Thread(target=self._read_reports, args=(self.proc.stdout,), daemon=True).start()
        try:
            wait_for_port(self.port, timeout=30)
        except TimeoutError:
            self.close()
            raise

    def _read_reports(self, out: IO[bytes]) -> None:
        for line in out:
            if not line.startswith(b"{"):
                continue  # not a connection report
            report = orjson.loads(line)
            with self._changed:
                key = report["key"]
                self._sent[key] = self._sent.get(key, 0) + report["events_sent"]
                self._changed.notify_all()

    def events_sent(self, key: str, timeout: float = 10.0) -> int:
        """What the connections authenticated with ``key`` were sent, once they ended."""
        with self._changed:
            if not self._changed.wait_for(lambda: key in self._sent, timeout):
                raise RuntimeError(f"the replay server reported no connection for {key!r}")
            return self._sent[key]

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _run_client(
    client: str, run: int, server: ReplayServer, symbols: int, warmup_s: float,
    window_s: float, cpu: int | None,
) -> ClientRun:  # fmt: skip
    key = f"{client}-run{run}-{uuid.uuid4().hex[:6]}"
    cmd = [
        sys.executable, "-m", "tests.bench.side_by_side", "--client", client,
        "--port", str(server.port), "--key", key, "--symbols", str(symbols),
        "--warmup", str(warmup_s), "--seconds", str(window_s),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if cpu is not None:
        os.sched_setaffinity(proc.pid, {cpu})
    try:
        out, err = proc.communicate(timeout=warmup_s + window_s + CLIENT_SLACK_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError(f"{client} client run {run} did not finish") from None
    # The official client logs to stdout: the figures are the last JSON line.
    lines = [line for line in out.splitlines() if line.startswith(b"{")]
    if proc.returncode != 0 or not lines:
        tail = (err or out).decode(errors="replace")[-2000:]
        raise RuntimeError(f"{client} client run {run} failed ({proc.returncode}): {tail}")
    figures = orjson.loads(lines[-1])
    return ClientRun(client=client, run=run, events_sent=server.events_sent(key), **figures)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def measure_side_by_side(
    seconds: float, runs: int, symbols: int, events_per_frame: int, *, warmup_s: float = 1.0
) -> SideBySide:
    """``runs`` interleaved windows of ``seconds`` per client, after ``warmup_s`` each."""
    official = importlib.util.find_spec("massive") is not None
    pinned = {SERVER_CPU, CLIENT_CPU} <= os.sched_getaffinity(0)
    server_cpu, client_cpu = (SERVER_CPU, CLIENT_CPU) if pinned else (None, None)
    results: dict[str, list[ClientRun]] = {"official": [], "ours": []}
    server = ReplayServer(symbols, events_per_frame, server_cpu)
    try:
        for run in range(1, runs + 1):
            order = ("official", "ours") if run % 2 else ("ours", "official")
            for client in order:
                if client == "official" and not official:
                    continue
                results[client].append(
                    _run_client(client, run, server, symbols, warmup_s, seconds, client_cpu)
                )
    finally:
        server.close()

    ours_rate = _median([r.events_per_s for r in results["ours"]]) or 0.0
    official_rate = _median([r.events_per_s for r in results["official"]])
    ours_cpu = _median([r.cpu_us_per_event for r in results["ours"]]) or 0.0
    official_cpu = _median([r.cpu_us_per_event for r in results["official"]])
    notes = [
        f"medians of {runs} interleaved run(s) of {seconds:g} s after {warmup_s:g} s warm-up",
        f"{symbols} symbols, {events_per_frame} trades and quotes per TEXT frame",
        f"server pinned to CPU {SERVER_CPU}, each client to CPU {CLIENT_CPU}"
        if pinned
        else "not pinned (fewer than 2 CPUs available)",
        "official: WebSocketClient.run (asyncio loop, websockets, json, models); "
        "ours: PolygonAdapter.stream_batches under uvloop",
    ]
    if not official:
        notes.insert(0, NOT_INSTALLED)
    return SideBySide(
        official_events_per_s=official_rate,
        ours_events_per_s=ours_rate,
        ratio=ours_rate / official_rate if official_rate else None,
        note="; ".join(notes),
        official_cpu_us_per_event=official_cpu,
        ours_cpu_us_per_event=ours_cpu,
        cpu_ratio=official_cpu / ours_cpu if official_cpu is not None and ours_cpu else None,
        official_runs=results["official"],
        ours_runs=results["ours"],
    )


def render(result: SideBySide) -> str:
    """The runs, the medians and the ratios, for reading."""

    def number(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = []
    for r in sorted(result.official_runs + result.ours_runs, key=lambda r: r.run):
        lines.append(
            f"run {r.run} {r.client:<8} {r.events_per_s:>10,.0f} events/s "
            f"{r.cpu_us_per_event:6.2f} us CPU/event, CPU share {r.cpu_share:.2f} "
            f"({r.window_events:,} events in {r.window_s:.2f} s; "
            f"{r.total_events:,} counted of {r.events_sent:,} sent)"
        )
    lines += [
        f"official: {number(result.official_events_per_s, ',.0f')} events/s, "
        f"{number(result.official_cpu_us_per_event, '.2f')} us CPU/event",
        f"ours:     {result.ours_events_per_s:,.0f} events/s, "
        f"{result.ours_cpu_us_per_event:.2f} us CPU/event",
        f"ours / official: {number(result.ratio, '.2f')} events/s; "
        f"official / ours CPU per event: {number(result.cpu_ratio, '.2f')}",
        f"note: {result.note}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m tests.bench.side_by_side",
        description="Receive + decode rate of the official massive client and of our "
        "Polygon adapter against the same replay server.",
    )
    p.add_argument("--seconds", type=float, default=5.0, help="window per client run (5)")
    p.add_argument("--runs", type=int, default=3, help="runs of each client (3)")
    p.add_argument("--symbols", type=int, default=500, help="default 500")
    p.add_argument("--events-per-frame", type=int, default=50, help="default 50")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before each window (1)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    # One client run, as measure_side_by_side starts it.
    p.add_argument("--client", choices=("official", "ours"), help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--key", default="side-by-side", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.client is not None:
        client_args = (args.port, args.key, args.symbols, args.warmup, args.seconds)
        if args.client == "official":
            figures = run_official(*client_args)
        else:
            import uvloop

            figures = uvloop.run(run_ours(*client_args))
        sys.stdout.buffer.write(orjson.dumps(figures) + b"\n")
        return
    result = measure_side_by_side(
        args.seconds, max(1, args.runs), args.symbols, args.events_per_frame,
        warmup_s=args.warmup,
    )  # fmt: skip
    print(orjson.dumps(result).decode() if args.json else render(result))


if __name__ == "__main__":
    main()
