"""Alpha Vantage REST simulator: ``GET /query`` answered with ``common.codecs.alphavantage``.

Serves GLOBAL_QUOTE and TIME_SERIES_INTRADAY in JSON or CSV from a PriceWalk. One
simulated clock serves every interval: it starts ``history_bars`` minutes after
``session_start`` (US/Eastern; so a 1min series starts with that many bars) and runs one
simulated minute per ``bar_seconds`` real seconds (default: real time). Each series holds
the bars of its interval up to that clock, inside AV's 04:00-20:00 day on weekdays, so no
bar of any interval lies after another's "Last Refreshed". Errors and throttling are HTTP
200 JSON bodies, as AV sends them, also when CSV was asked for.

Faults (``--faults``), counted over all requests to the server:
  refuse_auth        every request gets the invalid-key "Error Message"
  rate_limit         after ``rate_limit_requests`` requests in ``rate_limit_window_s`` the
                     throttle text of ``rate_limit_kind`` (second/minute/day) until the
                     window rolls over
  malformed_every=N  every N-th response is broken: truncated JSON, then a body without
                     its data key, in turn (CSV: a row whose time does not parse)
  silent_after=N     after N requests, hold every response until the server stops
  drop_after=N       after N answered requests, close the connection without a response
                     on the next ``drop_requests`` requests (2: HTTP clients such as
                     aiohttp retry an idempotent request once on a fresh connection)
  skip_seq_every=N   every N-th bar of each series is never served: AV has no sequence
                     numbers, so the hole shows only as missing bar times
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import random
import time
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from datetime import time as dtime

from aiohttp import web

from common.codecs import alphavantage as codec
from simulators.market import (
    Faults,
    HttpServer,
    PriceWalk,
    run_simulator,
    serve_until_stopped,
    simulator_arg_parser,
    symbols_from_args,
)


@dataclass
class AlphaVantageSimConfig:
    symbols: list[str]
    api_key: str | None = None  # None: any non-empty key is accepted
    faults: Faults = field(default_factory=Faults)
    bar_seconds: float | None = None  # real seconds per simulated minute; None: real time
    session_start: datetime | None = None  # US/Eastern wall time of the first bar
    history_bars: int = 100
    rate_limit_requests: int = 5
    rate_limit_window_s: float = 60.0
    rate_limit_kind: str = "minute"  # second | minute | day
    drop_requests: int = 2
    max_bars: int = 30 * 960  # about 30 days of 1min bars, what "full" returns


@dataclass
class _Series:
    bars: list[codec.Bar] = field(default_factory=list)
    generated: int = 0  # bars made so far, including skipped ones
    next_time: datetime | None = None


def default_session_start(now: datetime | None = None) -> datetime:
    """09:30 US/Eastern of the latest weekday at or before now."""
    day = (now or datetime.now(codec.EASTERN)).date()
    while day.weekday() >= 5:
        day -= timedelta(days=1)
    return datetime.combine(day, dtime(9, 30))


class AlphaVantageSimulator:
    def __init__(self, config: AlphaVantageSimConfig) -> None:
        self.config = config
        self.known = set(config.symbols)
        self.walk = PriceWalk(config.symbols)
        self._rng = random.Random(11)
        self._prev_close = {s: st.price for s, st in self.walk.states.items()}
        self.series: dict[tuple[str, str], _Series] = {}
        self.start_time = config.session_start or default_session_start()
        self.requests = 0
        self.answered = 0
        # Well-formed queries answered, by (function, symbol): what a client asked for.
        self.queries: collections.Counter[tuple[str, str]] = collections.Counter()
        self.request_times: list[float] = []  # wall time of each request's arrival
        self._started = time.monotonic()
        self._window_start = self._started
        self._window_count = 0
        self._drops_left = 0
        self._stopping = asyncio.Event()
        self._server = HttpServer()
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/query", self._handle)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._started = self._window_start = time.monotonic()
        self.port = await self._server.serve(self.app(), host, port)
        return self.port

    async def stop(self) -> None:
        self._stopping.set()  # releases held ("silent") responses
        await self._server.close()

    # ------------------------------------------------------------ requests

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        cfg = self.config
        faults = cfg.faults
        self.requests += 1
        self.request_times.append(time.time())
        if faults.silent_after and self.requests > faults.silent_after:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), 3600)
            return web.Response(status=503)
        if faults.drop_after and (self._drops_left or self.answered >= faults.drop_after):
            if not self._drops_left:
                self._drops_left = cfg.drop_requests
            self._drops_left -= 1
            if not self._drops_left:
                self.answered = 0  # serve drop_after more before the next outage
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=503)  # never reaches the client
        self.answered += 1
        return web.Response(body=self._answer(request), content_type=self._type(request))

    @staticmethod
    def _type(request: web.Request) -> str:
        return "text/csv" if request.query.get("datatype") == "csv" else "application/json"

    def _answer(self, request: web.Request) -> bytes:
        cfg = self.config
        faults = cfg.faults
        key = request.query.get("apikey", "")
        if faults.refuse_auth or not key or (cfg.api_key and key != cfg.api_key):
            return codec.encode_message("Error Message", codec.INVALID_KEY_TEXT)
        if faults.rate_limit and self._throttled():
            msg_key, text = codec.RATE_LIMIT_TEXTS[cfg.rate_limit_kind]
            return codec.encode_message(msg_key, text)
        try:
            query = codec.decode_query(request.query)
        except codec.CodecError:
            function = request.query.get("function", "")
            return codec.encode_message("Error Message", codec.invalid_call_text(function))
        self.queries[query.function, query.symbol] += 1
        if faults.malformed_every and self.answered % faults.malformed_every == 0:
            return self._malformed(query)
        if query.function == codec.GLOBAL_QUOTE:
            quote = self.quote(query.symbol) if query.symbol in self.known else None
            return codec.encode_global_quote(quote, query.datatype)
        if query.symbol not in self.known:
            return codec.encode_message("Error Message", codec.invalid_call_text(query.function))
        assert query.interval is not None
        bars = self.bars(query.symbol, query.interval)
        if query.outputsize == "compact":
            bars = bars[-codec.COMPACT_POINTS :]
        return codec.encode_intraday(
            query.symbol, query.interval, bars, query.datatype, query.outputsize
        )

    def _throttled(self) -> bool:
        now = time.monotonic()
        if now - self._window_start >= self.config.rate_limit_window_s:
            self._window_start, self._window_count = now, 0
        self._window_count += 1
        return self._window_count > self.config.rate_limit_requests

    def _malformed(self, query: codec.Query) -> bytes:
        if query.datatype == "csv":
            return b"timestamp,open,high,low,close,volume\r\nnot-a-time,1.0,1.0,1.0,1.0,1\r\n"
        if (self.answered // self.config.faults.malformed_every) % 2:
            return b'{"Meta Data": {"1. Information": "Intraday (1min)'  # truncated
        return b'{"Meta Data": {}, "Unexpected": {}}'

    # ------------------------------------------------------------ market data

    def now(self) -> datetime:
        """The simulated US/Eastern wall time, one clock for every series."""
        per_minute = self.config.bar_seconds or 60.0
        minutes = self.config.history_bars - 1 + (time.monotonic() - self._started) / per_minute
        return self.start_time + timedelta(minutes=minutes)

    def bars(self, symbol: str, interval: str) -> list[codec.Bar]:
        """The served bars of one series up to simulated now, oldest first."""
        series = self.series.setdefault((symbol, interval), _Series(next_time=self.start_time))
        now = self.now()
        skip_every = self.config.faults.skip_seq_every
        while series.next_time is not None and series.next_time <= now:
            bar = self._make_bar(symbol, series.next_time)
            series.generated += 1
            series.next_time = codec.next_bar_time(series.next_time, interval)
            if skip_every and series.generated % skip_every == 0:
                continue  # made, never served: a hole in the series
            series.bars.append(bar)
        if len(series.bars) > self.config.max_bars:
            del series.bars[: len(series.bars) - self.config.max_bars]
        return series.bars

    def _make_bar(self, symbol: str, at: datetime) -> codec.Bar:
        open_ = self.walk.states[symbol].price
        prices = [self.walk.step(symbol).price for _ in range(4)]
        high = max(open_, *prices)
        low = min(open_, *prices)
        volume = self._rng.choice((100, 300, 1_000, 2_500, 10_000)) * self._rng.randint(1, 20)
        return codec.Bar(at, open_, high, low, prices[-1], volume)

    def quote(self, symbol: str) -> codec.QuoteSnapshot:
        """The day so far, from the symbol's 1min series."""
        bars = self.bars(symbol, "1min")
        last = bars[-1]
        day: date = last.time.date()
        today = [b for b in bars if b.time.date() == day]
        before = [b for b in bars if b.time.date() < day]
        prev_close = before[-1].close if before else self._prev_close[symbol]
        return codec.QuoteSnapshot(
            symbol=symbol, open=today[0].open, high=max(b.high for b in today),
            low=min(b.low for b in today), price=last.close,
            volume=sum(b.volume for b in today), latest_day=day, previous_close=prev_close,
        )  # fmt: skip


def build_arg_parser() -> argparse.ArgumentParser:
    p = simulator_arg_parser(
        "alphavantage", __doc__, port=8770, num_symbols=20,
        faults_help="e.g. rate_limit,malformed_every=7",
    )  # fmt: skip
    p.add_argument("--api-key", default=None, help="the only key accepted (default: any)")
    p.add_argument(
        "--bar-seconds", type=float, default=None,
        help="real seconds per simulated minute (default: real time)",
    )  # fmt: skip
    p.add_argument("--session-start", default=None, help="US/Eastern 'YYYY-MM-DD HH:MM:SS'")
    p.add_argument("--history-bars", type=int, default=100, help="minutes of history")
    p.add_argument("--rate-limit-requests", type=int, default=5)
    p.add_argument("--rate-limit-window-s", type=float, default=60.0)
    p.add_argument("--rate-limit-kind", choices=("second", "minute", "day"), default="minute")
    return p


async def serve(args: argparse.Namespace) -> None:
    start = (
        datetime.strptime(args.session_start, codec.LOCAL_TIME_FORMAT)
        if args.session_start
        else None
    )
    sim = AlphaVantageSimulator(
        AlphaVantageSimConfig(
            symbols=symbols_from_args(args), api_key=args.api_key,
            faults=Faults.parse(args.faults), bar_seconds=args.bar_seconds,
            session_start=start, history_bars=args.history_bars,
            rate_limit_requests=args.rate_limit_requests,
            rate_limit_window_s=args.rate_limit_window_s, rate_limit_kind=args.rate_limit_kind,
        )
    )  # fmt: skip
    await serve_until_stopped(
        sim, args.host, args.port, "alphavantage simulator on http://{host}:{port}/query"
    )


def main(argv: list[str] | None = None) -> None:
    run_simulator(serve, build_arg_parser(), argv)
