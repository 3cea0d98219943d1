"""Alpha Vantage adapter: polls ``GET /query`` with aiohttp around ``common.codecs.alphavantage``.

connection_config keys:
  ``base_url``                 default ``https://www.alphavantage.co`` (simulator: ``http://127.0.0.1:8770``)
  ``api_key_env``              name of the environment variable holding the API key
  ``functions``                list of ``GLOBAL_QUOTE`` / ``TIME_SERIES_INTRADAY`` (or ``function``:
                               one name; default both); a symbol is polled only for those giving
                               what its subscription's data_types ask for (GLOBAL_QUOTE: TRADE,
                               TIME_SERIES_INTRADAY: AGGREGATE)
  ``interval``                 intraday bar interval (default ``1min``)
  ``datatype``                 ``json`` or ``csv`` (default ``json``)
  ``outputsize``               ``compact`` (latest 100 bars) or ``full`` (default ``compact``)
  ``extended_hours``           optional bool passed to TIME_SERIES_INTRADAY
  ``poll_interval_s``          time between the starts of two polling cycles (default 60)
  ``request_timeout_s``        per request (default 10)
  ``max_failures``             timeouts / 5xx answers in a row before ProviderDisconnected
                               (default 3)
  ``rate_limit_backoff_s``     first backoff after a throttle answer (default 2, doubling, jittered)
  ``rate_limit_backoff_max_s`` backoff ceiling (default 120)
  ``max_rate_limit_retries``   throttle answers in a row before ProviderRateLimited (default 5)

The provider row's ``rate_limits`` (``requests_per_second/minute/day``) pace every request.

AV answers everything with HTTP 200; what went wrong is in the body:
- throttle texts (per second/minute): status RATE_LIMITED, back off, retry the same request,
  back to CONNECTED on the next good answer; after ``max_rate_limit_retries`` in a row, or
  at once for the daily quota, ProviderRateLimited (daily: retry after midnight US/Eastern);
- invalid key: ProviderAuthError;
- "Error Message" (bad symbol or call), the demo-key text and unknown "Information" texts:
  the symbol is skipped until the next cycle and counted in ``symbol_errors``;
- premium endpoint: that function is dropped until the next connect(), counted too;
- ``{"Global Quote": {}}``: unknown symbol, counted in ``unknown_symbols``.

Nothing is re-emitted: per stream the adapter keeps the newest bar time sent and sends only
newer bars, oldest first; a quote is sent only when price, day volume or day changes.
Without sequence numbers a lost bar can only be seen as a hole in the bar times: a bar more
than one interval after the previous one inside the same regular session is flagged ``gap``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timedelta
from typing import Any

import aiohttp
import structlog

from common.codecs import alphavantage as codec
from common.model import ConnectionStatus, DataType, QualityFlag, RawMarketData
from common.provider import (
    Instrument,
    ProviderAdapter,
    ProviderAuthError,
    ProviderConfig,
    ProviderConfigError,
    ProviderDisconnected,
    ProviderRateLimited,
)
from common.ratelimit import RateLimiter
from common.recording import FrameKind
from common.retry import Backoff

log = structlog.get_logger("feedfleet.alphavantage")


class AlphaVantageAdapter(ProviderAdapter):
    provider_type = "alphavantage"

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config)
        cc = config.connection_config
        self.base_url = str(cc.get("base_url", "https://www.alphavantage.co")).rstrip("/")
        functions: Any = cc.get("functions", cc.get("function"))
        if functions is None:
            functions = [codec.GLOBAL_QUOTE, codec.TIME_SERIES_INTRADAY]
        elif isinstance(functions, str):
            functions = [functions]
        self.functions: list[str] = [str(f) for f in functions]
        self.interval = str(cc.get("interval", "1min"))
        self.datatype = str(cc.get("datatype", "json"))
        self.outputsize = str(cc.get("outputsize", "compact"))
        extended = cc.get("extended_hours")
        self.extended_hours = None if extended is None else bool(extended)
        self.poll_interval_s = config.number("poll_interval_s", 60.0)
        self.request_timeout_s = config.number("request_timeout_s", 10.0)
        self.max_failures = config.integer("max_failures", 3)
        self.max_rate_limit_retries = config.integer("max_rate_limit_retries", 5)
        self.backoff = Backoff(
            base_s=config.number("rate_limit_backoff_s", 2.0),
            max_s=config.number("rate_limit_backoff_max_s", 120.0),
        )
        self._api_key = ""
        self._http: aiohttp.ClientSession | None = None
        self._limiter: RateLimiter | None = None
        self._active_functions: list[str] = []
        self._wake = asyncio.Event()
        self._failures = 0
        # Kept across reconnects so nothing is sent twice.
        self._last_bar: dict[str, tuple[int, str]] = {}  # stream -> (ns, local time)
        self._last_quote: dict[str, tuple[Any, ...]] = {}
        self.requests = 0
        self.symbol_errors = 0
        self.unknown_symbols = 0
        self.rate_limited = 0
        self.timeouts = 0

    def requests_sent(self) -> int:
        return self._limiter.requests if self._limiter is not None else 0

    # ------------------------------------------------------------ lifecycle

    async def connect(self) -> None:
        """Validate the config and open the HTTP session; AV has nothing to log in to."""
        self.connection_status = ConnectionStatus.CONNECTING
        try:
            self._api_key = self.config.secret("api_key_env")
            self._validate()
            if self._limiter is None:
                self._limiter = RateLimiter(self.config.rate_limits)
        except ValueError as exc:
            self._fail(str(exc))
            raise ProviderConfigError(str(exc)) from exc
        except ProviderConfigError as exc:
            self._fail(str(exc))
            raise
        await self._close_session()
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.request_timeout_s)
        )
        self._active_functions = list(self.functions)
        self._failures = 0
        self.connection_status = ConnectionStatus.CONNECTED
        # The poll loop reads self.subscribed each cycle: that is the re-subscribe.
        self._wake.set()

    def _validate(self) -> None:
        bad = [f for f in self.functions if f not in codec.FUNCTIONS]
        if bad or not self.functions:
            raise ProviderConfigError(f"functions {bad or '[]'} not in {list(codec.FUNCTIONS)}")
        if self.interval not in codec.INTERVALS:
            raise ProviderConfigError(f"interval {self.interval!r} not in {list(codec.INTERVALS)}")
        if self.datatype not in codec.DATATYPES:
            raise ProviderConfigError(f"datatype {self.datatype!r} is not json or csv")
        if self.outputsize not in codec.OUTPUTSIZES:
            raise ProviderConfigError(f"outputsize {self.outputsize!r} is not compact or full")
        if self.poll_interval_s < 0 or self.request_timeout_s <= 0 or self.max_failures < 1:
            raise ProviderConfigError("poll_interval_s, request_timeout_s or max_failures invalid")

    async def subscribe(self, instruments: Sequence[Instrument]) -> None:
        for inst in instruments:
            self.subscribed[inst.symbol] = inst
            if not self._functions_for(inst):
                # Not an error of the feed: this provider does not offer that data.
                offered = sorted(
                    {codec.FUNCTION_DATA_TYPE[f] for f in self.functions if f in codec.FUNCTIONS}
                )
                log.warning(
                    "data_types_not_offered", provider=self.config.name, symbol=inst.symbol,
                    asked=sorted(inst.data_types), offered=offered,
                )  # fmt: skip
        self._wake.set()  # poll new symbols now, not at the end of the cycle

    def _functions_for(self, inst: Instrument) -> list[str]:
        """The configured functions that answer with data the subscription asked for."""
        # .get: subscribe() may run before connect() has rejected an unknown function.
        return [f for f in self.functions if codec.FUNCTION_DATA_TYPE.get(f) in inst.data_types]

    async def unsubscribe(self, instruments: Sequence[Instrument]) -> None:
        for inst in instruments:
            self.subscribed.pop(inst.symbol, None)
            prefix = f":{inst.symbol}"
            for table in (self._last_bar, self._last_quote):
                for stream in [s for s in table if s.endswith(prefix) or f"{prefix}:" in s]:
                    del table[stream]

    async def disconnect(self) -> None:
        await self._close_session()
        self.connection_status = ConnectionStatus.DISCONNECTED

    async def _close_session(self) -> None:
        http, self._http = self._http, None
        if http is not None:
            await http.close()

    def _fail(self, message: str) -> None:
        self.connection_status = ConnectionStatus.ERROR
        self.last_error = message

    # ------------------------------------------------------------ polling

    async def stream_batches(self) -> AsyncIterator[list[RawMarketData]]:
        if self._http is None:
            raise ProviderDisconnected("not connected")
        while True:
            cycle_start = time.monotonic()
            self._wake.clear()
            for symbol in sorted(self.subscribed):
                for function in list(self._active_functions):
                    inst = self.subscribed.get(symbol)
                    if inst is None:
                        break
                    if codec.FUNCTION_DATA_TYPE[function] not in inst.data_types:
                        continue
                    records, skip_symbol = await self._poll(self._query(function, symbol))
                    if records:
                        yield records
                    if skip_symbol:
                        break
            if not self._active_functions:
                self._fail("no function left to poll")
                raise ProviderConfigError("every configured function is premium-only")
            remaining = self.poll_interval_s - (time.monotonic() - cycle_start)
            if not self.subscribed:
                remaining = max(remaining, 1.0)  # nothing to poll: wait for a subscribe
            if remaining > 0 and not self._wake.is_set():
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for drops a cancel
                # that comes as the wake is set, and a stopped poller would poll on.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await self._wake.wait()

    def _query(self, function: str, symbol: str) -> codec.Query:
        interval = self.interval if function == codec.TIME_SERIES_INTRADAY else None
        return codec.Query(
            function, symbol, interval, self.datatype, self.outputsize, self.extended_hours
        )

    async def _poll(self, query: codec.Query) -> tuple[list[RawMarketData], bool]:
        """One request (retried while throttled). Returns (new records, skip the symbol)."""
        name = self.config.name
        while True:
            body = await self._fetch(query)
            if body is None:
                return [], False
            receive_ns = time.time_ns()
            if self.tap is not None:  # the request path without the key: encode_query(.., "")
                self.tap.record(FrameKind.HTTP_BODY, body, receive_ns,
                                f"/query?{codec.encode_query(query, '')}")  # fmt: skip
            decoded = codec.decode_response(body, query, receive_ns, name)
            if decoded.errors:
                self.decode_errors += len(decoded.errors)
                for err in decoded.errors[:3]:
                    log.warning(
                        "decode_error", provider=name, symbol=query.symbol,
                        function=query.function, reason=err.reason, raw=err.raw,
                    )  # fmt: skip
            message = decoded.message
            if message is not None and message.kind is codec.MessageKind.RATE_LIMIT:
                await self._throttled(message)
                continue
            if self.connection_status is ConnectionStatus.RATE_LIMITED:
                self.connection_status = ConnectionStatus.CONNECTED
            self.backoff.reset()
            if message is not None:
                return [], self._on_message(message, query)
            if decoded.empty:
                self.unknown_symbols += 1
                log.warning("unknown_symbol", provider=name, symbol=query.symbol,
                            function=query.function)  # fmt: skip
                return [], True
            return self._new_records(decoded.records), False

    async def _fetch(self, query: codec.Query) -> bytes | None:
        """The body, or None after a timeout or 5xx (counted; too many in a row disconnect)."""
        http, limiter = self._http, self._limiter
        if http is None or limiter is None:
            raise ProviderDisconnected("not connected")
        await limiter.acquire()
        if self.budget is not None:
            await self.budget.acquire()  # the key's budget, shared with the other instances
        self.requests += 1
        url = f"{self.base_url}/query?{codec.encode_query(query, self._api_key)}"
        try:
            async with http.get(url) as resp:
                body = await resp.read()
                self.bytes_received += len(body)
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
        except TimeoutError:
            self.timeouts += 1
            self._failed(query, "request timed out")
            return None
        except aiohttp.ClientError as exc:
            self.connection_status = ConnectionStatus.DISCONNECTED
            self.last_error = self._redact(f"{type(exc).__name__}: {exc}")
            raise ProviderDisconnected(self.last_error) from exc
        if status == 200:
            self._failures = 0
            return body
        if status == 429:  # not seen from AV, but a proxy in front of it may say so
            self.connection_status = ConnectionStatus.RATE_LIMITED
            delay = float(retry_after) if retry_after and retry_after.isdigit() else None
            if self.budget is not None:
                await self.budget.hold(delay if delay is not None else self.backoff.next_delay())
            raise ProviderRateLimited("HTTP 429", retry_after_s=delay)
        if status in (401, 403):
            self._fail(f"HTTP {status}")
            raise ProviderAuthError(f"HTTP {status}")
        self._failed(query, f"HTTP {status}")
        return None

    def _failed(self, query: codec.Query, reason: str) -> None:
        self._failures += 1
        log.warning("request_failed", provider=self.config.name, symbol=query.symbol,
                    function=query.function, reason=reason, in_a_row=self._failures)  # fmt: skip
        if self._failures >= self.max_failures:
            self.connection_status = ConnectionStatus.DISCONNECTED
            self.last_error = f"{self._failures} failed requests in a row ({reason})"
            raise ProviderDisconnected(self.last_error)

    async def _throttled(self, message: codec.ApiMessage) -> None:
        self.rate_limited += 1
        self.connection_status = ConnectionStatus.RATE_LIMITED
        self.last_error = message.text
        if message.window == "day":
            until_midnight = _seconds_to_eastern_midnight()
            if self.budget is not None:
                await self.budget.hold(until_midnight)  # the key is spent for every instance
            raise ProviderRateLimited(message.text, retry_after_s=until_midnight)
        if self.backoff.attempt >= self.max_rate_limit_retries:
            raise ProviderRateLimited(message.text, retry_after_s=self.backoff.next_delay())
        delay = self.backoff.next_delay()
        if self.budget is not None:
            await self.budget.hold(delay)  # every instance slows down, not only this one
        log.warning("rate_limited", provider=self.config.name, window=message.window,
                    backoff_s=round(delay, 3), text=message.text)  # fmt: skip
        await asyncio.sleep(delay)

    def _on_message(self, message: codec.ApiMessage, query: codec.Query) -> bool:
        """Handle a non-throttle error answer; True when the symbol is to be skipped."""
        name = self.config.name
        if message.kind is codec.MessageKind.INVALID_KEY:
            self._fail(message.text)
            raise ProviderAuthError(message.text)
        self.symbol_errors += 1
        if message.kind is codec.MessageKind.PREMIUM:
            # The key's plan does not cover this function (or parameter): stop asking.
            if query.function in self._active_functions:
                self._active_functions.remove(query.function)
            log.error("premium_endpoint", provider=name, function=query.function,
                      text=message.text)  # fmt: skip
            return False
        log.warning(
            "symbol_error", provider=name, symbol=query.symbol, function=query.function,
            kind=message.kind.value, text=message.text,
        )  # fmt: skip
        return True

    def _new_records(self, records: list[RawMarketData]) -> list[RawMarketData]:
        """Drop what was sent before; flag holes in a bar series (records come oldest first)."""
        fresh: list[RawMarketData] = []
        for r in records:
            if r.data_type is DataType.AGGREGATE:
                last = self._last_bar.get(r.stream)
                local = str(r.provider_specific.get("time", ""))
                if last is not None:
                    if r.timestamp_ns <= last[0]:
                        continue
                    interval = str(r.provider_specific.get("interval", ""))
                    lost = codec.missing_bars(last[1], local, interval)
                    if lost:
                        r.quality_flags.append(QualityFlag.GAP)
                        r.provider_specific["missing_bars"] = lost
                self._last_bar[r.stream] = (r.timestamp_ns, local)
            else:
                ps = r.provider_specific
                state = (r.price, ps.get("volume"), ps.get("latestDay"))
                if self._last_quote.get(r.stream) == state:
                    continue
                self._last_quote[r.stream] = state
            fresh.append(r)
        return fresh

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text


def _seconds_to_eastern_midnight() -> float:
    """AV's daily quota is assumed to reset at midnight US/Eastern (unconfirmed)."""
    now = datetime.now(codec.EASTERN)
    midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), now.tzinfo)
    return max(1.0, (midnight - now).total_seconds())
