"""What every provider simulator shares: a price model, pacing and fault settings."""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from aiohttp import web

DEMO_SYMBOLS = [
    "AAPL",
    "MSFT",
    "AMZN",
    "GOOGL",
    "META",
    "NVDA",
    "TSLA",
    "JPM",
    "V",
    "JNJ",
    "WMT",
    "PG",
    "XOM",
    "MA",
    "HD",
    "CVX",
    "KO",
    "PEP",
    "BAC",
    "ABBV",
]


def symbol_universe(count: int) -> list[str]:
    """The demo tickers first, then synthetic ones (``SYM0021``...) up to ``count``."""
    names = list(DEMO_SYMBOLS[:count])
    names.extend(f"SYM{i:04d}" for i in range(len(names) + 1, count + 1))
    return names


@dataclass(slots=True)
class SymbolState:
    symbol: str
    price: float
    sequence: int = 0
    trade_id: int = 0


class PriceWalk:
    """A geometric random walk per symbol with a spread of a few basis points.

    Prices are rounded to the cent, bid < ask always; seeded, so runs repeat.
    """

    def __init__(self, symbols: list[str], seed: int = 7) -> None:
        self._rng = random.Random(seed)
        self.states = {s: SymbolState(s, round(self._rng.uniform(20.0, 500.0), 2)) for s in symbols}

    def step(self, symbol: str) -> SymbolState:
        st = self.states[symbol]
        st.price = max(0.01, round(st.price * (1.0 + self._rng.gauss(0.0, 0.0004)), 2))
        st.sequence += 1
        return st

    def trade(self, symbol: str) -> tuple[SymbolState, float, int]:
        st = self.step(symbol)
        st.trade_id += 1
        return st, st.price, self._rng.choice((1, 10, 50, 100, 100, 200, 300, 500))

    def quote(self, symbol: str) -> tuple[SymbolState, float, float, int, int]:
        st = self.step(symbol)
        half = max(0.01, round(st.price * 0.0002, 2))
        bid, ask = round(st.price - half, 2), round(st.price + half, 2)
        return st, bid, ask, self._rng.randint(1, 20), self._rng.randint(1, 20)


@dataclass(slots=True)
class Faults:
    """Misbehaviour a simulator can be told to show, e.g. ``"refuse_auth,drop_after=500"``.

    Counts are events sent on one connection; 0 or absent means never.
    """

    refuse_auth: bool = False
    drop_after: int = 0
    silent_after: int = 0
    malformed_every: int = 0
    skip_seq_every: int = 0
    rate_limit: bool = False

    @classmethod
    def parse(cls, spec: str) -> Faults:
        faults = cls()
        known = {f.name for f in fields(cls)}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, _, value = part.partition("=")
            if name not in known:
                raise ValueError(f"unknown fault {name!r}; known: {sorted(known)}")
            if name in ("refuse_auth", "rate_limit"):
                setattr(faults, name, value.lower() not in ("0", "false", "no"))
            else:
                setattr(faults, name, int(value))
        return faults


def harness_args(p: argparse.ArgumentParser) -> None:
    """The options a fault harness drives a running simulator with (see ``SentLog`` and
    ``follow_faults_file``)."""
    p.add_argument("--faults-file", default=None,
                   help="re-read this file's fault spec whenever it changes")  # fmt: skip
    p.add_argument("--sent-log", default=None, metavar="DIR",
                   help="write every frame sent here, one file per connection")  # fmt: skip


async def follow_faults_file(path: str, faults: Faults, interval_s: float = 0.1) -> None:
    """Apply the spec in ``path`` to ``faults`` whenever the file changes, so a harness can
    turn faults on and off in a running simulator without dropping its connections (each
    simulator reads its ``Faults`` on every use). An empty file means no faults; until
    the file exists the command line's faults stand."""
    last: str | None = None
    while True:
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            text = None
        if text is not None and text != last:
            last = text
            try:
                new = Faults.parse(text.replace("\n", ","))
            except ValueError as exc:
                print(f"faults file {path}: {exc}", flush=True)
            else:
                for f in fields(Faults):
                    setattr(faults, f.name, getattr(new, f.name))
                print(f"faults now: {text.strip() or 'none'}", flush=True)
        await asyncio.sleep(interval_s)


class SentLog:
    """Every frame a simulator sends, one file per client connection, each frame on its own
    line as its codec's ``decode_capture`` reads them: the per-symbol account a harness
    holds the fleet to. Per connection, because what was still in flight when a
    connection died is then told apart from a hole in what the client did read.

    Files are named ``<start ns>-<pid>-<n>.cap`` (in start order across restarts) and
    flushed at every frame, so a simulator stopped at any moment leaves whole lines.
    """

    def __init__(self, directory: str | None) -> None:
        self.directory = Path(directory) if directory else None
        self._opened = 0
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)

    def open(self) -> SentFile | None:
        if self.directory is None:
            return None
        self._opened += 1
        name = f"{time.time_ns()}-{os.getpid()}-{self._opened:05d}.cap"
        return SentFile(open(self.directory / name, "ab"))


class SentFile:
    def __init__(self, file: BinaryIO) -> None:
        self._file: BinaryIO | None = file

    def write(self, frame: bytes | str) -> None:
        if self._file is None:
            return
        data = frame.encode() if isinstance(frame, str) else frame
        self._file.write(data if data.endswith(b"\n") else data + b"\n")
        self._file.flush()

    def close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            file.close()


class Pacer:
    """Lets a sender keep an average rate (events/s) with sleeps of about a millisecond."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._start = time.monotonic()
        self._sent = 0

    async def wait_for(self, events: int) -> None:
        """Sleep until ``events`` more may be sent at the configured rate."""
        if self.rate <= 0:
            await asyncio.sleep(0)
            return
        self._sent += events
        due = self._start + self._sent / self.rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -1.0:
            # Too far behind (the process was stalled): forget the debt instead of bursting.
            self._start = time.monotonic()
            self._sent = 0
        else:
            await asyncio.sleep(0)


# ---------------------------------------------------------------- running a simulator


class Simulator(Protocol):
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int: ...

    async def stop(self) -> None: ...


def simulator_arg_parser(
    name: str, description: str | None, *, port: int, num_symbols: int,
    rate: float | None = None, rate_help: str = "events/s per connection",
    batch: int | None = None, batch_help: str = "events per frame", host: str = "127.0.0.1",
    faults_help: str = "e.g. refuse_auth,drop_after=1000",
) -> argparse.ArgumentParser:  # fmt: skip
    """The options every simulator takes; each adds its own after."""
    p = argparse.ArgumentParser(
        prog=f"simulators {name}", description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--host", default=host)
    p.add_argument("--port", type=int, default=port)
    p.add_argument("--symbols", default="", help="comma-separated symbols (default: generated)")
    p.add_argument("--num-symbols", type=int, default=num_symbols)
    if rate is not None:
        p.add_argument("--rate", type=float, default=rate, help=rate_help)
    if batch is not None:
        p.add_argument("--batch", type=int, default=batch, help=batch_help)
    p.add_argument("--faults", default="", help=faults_help)
    return p


def symbols_from_args(args: argparse.Namespace) -> list[str]:
    return [s for s in args.symbols.split(",") if s] or symbol_universe(args.num_symbols)


async def serve_until_stopped(
    sim: Simulator, host: str, port: int, banner: str, *, faults: Faults | None = None,
    faults_file: str | None = None,
) -> None:  # fmt: skip
    """Start, print ``banner`` (``{host}``/``{port}`` filled in), run until SIGINT/SIGTERM.

    Stopping on SIGTERM too lets supervisord stop a simulator cleanly (a pcap being
    written ends on a whole record). With ``faults_file``, ``faults`` follow that file.
    """
    bound = await sim.start(host, port)
    print(banner.format(host=host, port=bound), flush=True)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    follower = None
    if faults is not None and faults_file:
        follower = asyncio.create_task(follow_faults_file(faults_file, faults))
    try:
        await done.wait()
    finally:
        if follower is not None:
            follower.cancel()
        await sim.stop()


def run_simulator(serve: Callable[[argparse.Namespace], Awaitable[None]],
                  parser: argparse.ArgumentParser, argv: list[str] | None) -> None:  # fmt: skip
    import uvloop

    uvloop.run(serve(parser.parse_args(argv)))  # type: ignore[arg-type]


def abort_websocket(ws: web.WebSocketResponse) -> None:
    """Drop the TCP connection without a close frame, as a network failure would."""
    request = ws._req  # aiohttp has no public way to abort
    if request is not None and request.transport is not None:
        request.transport.abort()


class HttpServer:
    """The aiohttp server a WebSocket or HTTP simulator runs its app on."""

    def __init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def serve(self, app: web.Application, host: str, port: int) -> int:
        """Start serving; returns the bound port (``port=0`` picks a free one)."""
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class WebSocketSimulator:
    """What the WebSocket simulators share: the server, its client list, stop and drop.

    Subclasses implement ``_handle`` (one client session) and keep ``connections`` current.
    """

    def __init__(self) -> None:
        self.connections: list[Any] = []  # the subclass's per-client state, each with .ws
        self._server = HttpServer()
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._handle)  # any path, as real clients vary it
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self.port = await self._server.serve(self.app(), host, port)
        return self.port

    async def stop(self) -> None:
        for conn in list(self.connections):
            await conn.ws.close()
        await self._server.close()

    async def drop_all(self) -> None:
        """Close every client connection abruptly (a test's network failure)."""
        for conn in list(self.connections):
            abort_websocket(conn.ws)
