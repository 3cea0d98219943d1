"""Alpha Vantage adapter against the in-process simulator over loopback HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from datetime import datetime, timedelta
from typing import Any, cast

import pytest
import structlog
import structlog.testing

from common.codecs import alphavantage as av
from common.model import ConnectionStatus, DataType, QualityFlag, RawMarketData
from common.provider import (
    Instrument,
    ProviderAuthError,
    ProviderConfig,
    ProviderConfigError,
    ProviderDisconnected,
    ProviderRateLimited,
)
from common.quality import QualityChecker
from simulators.alphavantage import AlphaVantageSimConfig, AlphaVantageSimulator
from simulators.market import Faults
from tests.running import until
from workers.alphavantage import AlphaVantageAdapter

KEY_ENV = "FEEDFLEET_TEST_AV_KEY"
os.environ[KEY_ENV] = "test-key"
SESSION = datetime(2024, 3, 1, 9, 30)  # a Friday, inside the regular session
SYMBOLS = ["AAPL", "MSFT"]
Records = list[RawMarketData]
# What the adapter's two default functions give: GLOBAL_QUOTE trades, intraday bars.
TRADES_AND_BARS = frozenset({DataType.TRADE, DataType.AGGREGATE})


async def start_sim(faults: str = "", **kw: Any) -> AlphaVantageSimulator:
    cfg = AlphaVantageSimConfig(
        symbols=["AAPL", "MSFT", "IBM"], faults=Faults.parse(faults), bar_seconds=0.05,
        session_start=SESSION, history_bars=5, **kw,
    )  # fmt: skip
    sim = AlphaVantageSimulator(cfg)
    await sim.start("127.0.0.1", 0)
    return sim


def make_adapter(
    sim: AlphaVantageSimulator, rate_limits: dict[str, Any] | None = None, **cc: Any
) -> AlphaVantageAdapter:
    connection_config: dict[str, Any] = {
        "base_url": f"http://127.0.0.1:{sim.port}",
        "api_key_env": KEY_ENV,
        "functions": ["GLOBAL_QUOTE", "TIME_SERIES_INTRADAY"],
        "interval": "1min",
        "poll_interval_s": 0.05,
        "request_timeout_s": 2.0,
        "rate_limit_backoff_s": 0.02,
        "rate_limit_backoff_max_s": 0.2,
    }
    connection_config.update(cc)
    config = ProviderConfig(
        id="av-test", name="alphavantage", provider_type="alphavantage",
        connection_config=connection_config, rate_limits=rate_limits or {},
    )  # fmt: skip
    return AlphaVantageAdapter(config)


async def connected(
    sim: AlphaVantageSimulator, symbols: list[str] = SYMBOLS, **cc: Any
) -> AlphaVantageAdapter:
    adapter = make_adapter(sim, **cc)
    await adapter.connect()
    await adapter.subscribe([Instrument(s, TRADES_AND_BARS) for s in symbols])
    return adapter


async def collect(
    adapter: AlphaVantageAdapter, done: Callable[[Records], bool], timeout: float = 20.0
) -> Records:
    out: Records = []
    stream: AsyncIterator[Records] = adapter.stream_batches()
    try:
        async with asyncio.timeout(timeout):
            async for batch in stream:
                out.extend(batch)
                if done(out):
                    break
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
    return out


def bars_of(records: Records, symbol: str) -> Records:
    return [r for r in records if r.data_type is DataType.AGGREGATE and r.symbol == symbol]


def has_bars(n: int) -> Callable[[Records], bool]:
    return lambda rs: all(len(bars_of(rs, s)) >= n for s in SYMBOLS)


# ---------------------------------------------------------------- happy path


@pytest.mark.parametrize("datatype", ["json", "csv"])
async def test_polls_quotes_and_new_bars_only(datatype: str) -> None:
    sim = await start_sim()
    adapter = await connected(sim, datatype=datatype)
    try:
        assert adapter.connection_status is ConnectionStatus.CONNECTED
        records = await collect(adapter, has_bars(9))
    finally:
        await adapter.disconnect()
        await sim.stop()
    assert adapter.connection_status is ConnectionStatus.DISCONNECTED
    for symbol in SYMBOLS:
        bars = bars_of(records, symbol)
        served = {av.eastern_to_ns(b.time): b for b in sim.series[(symbol, "1min")].bars}
        # Every bar is the simulator's, sent once, oldest first, from the first history bar.
        times = [r.timestamp_ns for r in bars]
        assert times == sorted(set(times))
        assert times[0] == av.eastern_to_ns(SESSION)
        for r in bars:
            bar = served[r.timestamp_ns]
            assert r.price == bar.close and r.volume == bar.volume
            assert r.provider_specific["open"] == bar.open
            assert r.provider_specific["high"] >= r.provider_specific["low"]
            assert r.stream == f"TIME_SERIES_INTRADAY:{symbol}:1min"
            assert r.provider_sequence is None and r.provider == "alphavantage"
            assert r.receive_ns > 0 and r.quality_flags == []
        quotes = [r for r in records if r.data_type is DataType.TRADE and r.symbol == symbol]
        assert quotes, symbol
        q = quotes[0]
        assert q.price is not None and q.price > 0 and q.volume is None
        assert q.stream == f"GLOBAL_QUOTE:{symbol}"
        assert q.provider_specific["latestDay"] == "2024-03-01"
        assert q.provider_specific["timestamp_source"] == "close"
        assert q.timestamp_ns == av.eastern_to_ns(datetime(2024, 3, 1, 16, 0))
        # The quote's price is the close of a bar the simulator had served by then.
        assert q.price in {b.close for b in served.values()}
        # A quote goes out only when it changed.
        states = [(r.price, r.provider_specific["volume"]) for r in quotes]
        assert all(a != b for a, b in itertools.pairwise(states))
    checker = QualityChecker(stale_after_s=None)
    # Bars only: the simulated day lies in the past, so every quote carries its 16:00
    # close time and the checker would call the later ones duplicates of the first.
    checker.check([r for r in records if r.data_type is DataType.AGGREGATE])
    assert checker.flag_counts["duplicate"] == 0
    assert checker.flag_counts["out_of_order"] == 0
    assert checker.flag_counts["gap"] == 0


async def test_each_symbol_is_polled_only_for_the_data_it_asked_for() -> None:
    """GLOBAL_QUOTE answers TRADE and the intraday series AGGREGATE: a symbol is asked only
    for what its subscription lists, and one asking for neither is not polled at all (and
    said so)."""
    sim = await start_sim()
    adapter = make_adapter(sim)
    await adapter.connect()
    wanted = {
        "AAPL": frozenset({DataType.TRADE}),
        "MSFT": frozenset({DataType.AGGREGATE}),
        "IBM": TRADES_AND_BARS,
        "NEWSONLY": frozenset({DataType.NEWS}),
    }
    with structlog.testing.capture_logs() as logs:
        await adapter.subscribe([Instrument(s, types) for s, types in wanted.items()])
    assert [(e["event"], e["symbol"], e["asked"], e["offered"]) for e in logs] == [
        ("data_types_not_offered", "NEWSONLY", ["NEWS"], ["AGGREGATE", "TRADE"]),
    ]
    try:
        # Two full cycles: every symbol has been visited at least once after the first.
        records = await collect(adapter, lambda _: sim.queries[av.GLOBAL_QUOTE, "IBM"] >= 2)
    finally:
        await adapter.disconnect()
        await sim.stop()
    assert set(sim.queries) == {
        (av.GLOBAL_QUOTE, "AAPL"), (av.TIME_SERIES_INTRADAY, "MSFT"),
        (av.GLOBAL_QUOTE, "IBM"), (av.TIME_SERIES_INTRADAY, "IBM"),
    }  # fmt: skip
    assert {(r.symbol, r.data_type) for r in records} == {
        ("AAPL", DataType.TRADE), ("MSFT", DataType.AGGREGATE),
        ("IBM", DataType.TRADE), ("IBM", DataType.AGGREGATE),
    }  # fmt: skip


async def test_rate_limits_of_the_provider_row_pace_requests() -> None:
    sim = await start_sim()
    adapter = make_adapter(sim, rate_limits={"requests_per_second": 20}, poll_interval_s=0)
    await adapter.connect()
    await adapter.subscribe([Instrument("AAPL", TRADES_AND_BARS)])
    started = time.monotonic()
    try:
        await collect(adapter, lambda _: adapter.requests >= 30)
    finally:
        await adapter.disconnect()
        await sim.stop()
    # A bucket of 20 allows a burst of 20; the next 10 need half a second.
    assert time.monotonic() - started >= 0.45
    assert sim.requests == adapter.requests


async def test_unknown_symbols_are_counted_and_others_keep_flowing() -> None:
    sim = await start_sim()
    adapter = await connected(sim, ["AAPL", "NOPE"])
    try:
        records = await collect(adapter, lambda rs: len(bars_of(rs, "AAPL")) >= 7)
    finally:
        await adapter.disconnect()
        await sim.stop()
    assert adapter.unknown_symbols >= 1  # {"Global Quote": {}}
    assert not [r for r in records if r.symbol == "NOPE"]
    # NOPE's intraday request is skipped after the empty quote ends its cycle.
    assert adapter.symbol_errors == 0


async def test_connect_needs_the_key_and_a_valid_config() -> None:
    sim = await start_sim()
    try:
        missing = make_adapter(sim, api_key_env="FEEDFLEET_TEST_AV_UNSET")
        with pytest.raises(ProviderConfigError, match="FEEDFLEET_TEST_AV_UNSET"):
            await missing.connect()
        assert missing.connection_status is ConnectionStatus.ERROR
        with pytest.raises(ProviderConfigError, match="interval"):
            await make_adapter(sim, interval="2min").connect()
        with pytest.raises(ProviderConfigError, match="functions"):
            await make_adapter(sim, functions=["TIME_SERIES_DAILY"]).connect()
        with pytest.raises(ProviderConfigError, match="requests_per_minute"):
            await make_adapter(sim, rate_limits={"requests_per_minute": 0}).connect()
    finally:
        await sim.stop()


# ---------------------------------------------------------------- faults


async def test_refuse_auth_raises_auth_error() -> None:
    sim = await start_sim("refuse_auth")
    adapter = await connected(sim)
    try:
        with pytest.raises(ProviderAuthError, match="apikey is invalid"):
            await collect(adapter, lambda _: False)
        assert adapter.connection_status is ConnectionStatus.ERROR
        assert "test-key" not in (adapter.last_error or "")
    finally:
        await adapter.disconnect()
        await sim.stop()


async def test_throttle_sets_rate_limited_backs_off_and_resumes() -> None:
    sim = await start_sim("rate_limit", rate_limit_requests=3, rate_limit_window_s=0.25)
    adapter = await connected(sim, max_rate_limit_retries=20)
    seen: set[ConnectionStatus] = set()

    async def watch() -> None:
        while True:
            seen.add(adapter.connection_status)
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    try:
        records = await collect(adapter, has_bars(12))
    finally:
        watcher.cancel()
        await adapter.disconnect()
        await sim.stop()
    assert adapter.rate_limited >= 2
    assert ConnectionStatus.RATE_LIMITED in seen
    assert len(bars_of(records, "MSFT")) >= 12  # it came back and kept polling
    times = [r.timestamp_ns for r in bars_of(records, "AAPL")]
    assert times == sorted(set(times))  # a retried request sends nothing twice


async def test_persistent_throttle_raises_rate_limited() -> None:
    sim = await start_sim("rate_limit", rate_limit_requests=0)
    adapter = await connected(sim, max_rate_limit_retries=3)
    try:
        with pytest.raises(ProviderRateLimited) as info:
            await collect(adapter, lambda _: False)
    finally:
        await adapter.disconnect()
        await sim.stop()
    assert adapter.rate_limited == 4  # the first answer and three retries
    assert info.value.retry_after_s is not None and info.value.retry_after_s > 0
    assert "per minute" in str(info.value)


async def test_daily_quota_raises_at_once() -> None:
    sim = await start_sim("rate_limit", rate_limit_requests=0, rate_limit_kind="day")
    adapter = await connected(sim)
    try:
        with pytest.raises(ProviderRateLimited, match="per day") as info:
            await collect(adapter, lambda _: False)
        assert adapter.connection_status is ConnectionStatus.RATE_LIMITED
    finally:
        await adapter.disconnect()
        await sim.stop()
    assert adapter.rate_limited == 1
    assert info.value.retry_after_s is not None and info.value.retry_after_s >= 1.0


async def test_drop_disconnects_then_reconnect_restores_subscriptions() -> None:
    sim = await start_sim("drop_after=6")
    adapter = await connected(sim)
    before: Records = []
    try:
        with pytest.raises(ProviderDisconnected):
            async with asyncio.timeout(20):
                async for batch in adapter.stream_batches():
                    before.extend(batch)
        assert adapter.connection_status is ConnectionStatus.DISCONNECTED
        assert before  # the first six answers got through
        # What the worker does: disconnect, connect again (no subscribe call).
        await adapter.disconnect()
        await adapter.connect()
        assert sorted(adapter.subscribed) == SYMBOLS
        after = await collect(adapter, lambda rs: len(bars_of(rs, "MSFT")) >= 1)
    finally:
        await adapter.disconnect()
        await sim.stop()
    assert {r.symbol for r in after} <= set(SYMBOLS)
    last_before = max((r.timestamp_ns for r in bars_of(before, "MSFT")), default=0)
    assert all(r.timestamp_ns > last_before for r in bars_of(after, "MSFT"))


async def test_silent_server_times_out_into_disconnected() -> None:
    sim = await start_sim("silent_after=2")
    adapter = await connected(sim, request_timeout_s=0.2, max_failures=2)
    try:
        # 15 s is below two of the default 10 s request timeouts: only request_timeout_s
        # ends this in time.
        with pytest.raises(ProviderDisconnected, match="2 failed requests in a row"):
            await collect(adapter, lambda _: False, timeout=15)
    finally:
        await adapter.disconnect()
        await sim.stop()
    assert adapter.timeouts == 2
    # AAPL's two answers, then MSFT's quote and bars requests held until they timed out.
    assert adapter.requests == sim.requests == 4
    assert adapter.last_error == "2 failed requests in a row (request timed out)"
    assert adapter.connection_status is ConnectionStatus.DISCONNECTED


async def test_malformed_answers_are_counted_and_polling_goes_on() -> None:
    sim = await start_sim("malformed_every=3")
    adapter = await connected(sim)
    try:
        records = await collect(adapter, has_bars(10))
    finally:
        await adapter.disconnect()
        await sim.stop()
    assert adapter.decode_errors >= 2
    assert len(bars_of(records, "AAPL")) >= 10


async def test_malformed_csv_rows_are_counted() -> None:
    sim = await start_sim("malformed_every=3")
    adapter = await connected(sim, datatype="csv", functions=["TIME_SERIES_INTRADAY"])
    try:
        records = await collect(adapter, has_bars(8))
    finally:
        await adapter.disconnect()
        await sim.stop()
    assert adapter.decode_errors >= 2
    assert all(r.quality_flags == [] for r in records)


async def test_skipped_bars_are_flagged_as_gap() -> None:
    # AV has no sequence numbers, so QualityChecker cannot see the hole by itself: the
    # adapter compares bar times (one interval apart inside the session) and flags gap.
    sim = await start_sim("skip_seq_every=4")
    adapter = await connected(sim, functions=["TIME_SERIES_INTRADAY"])
    try:
        records = await collect(adapter, has_bars(10))
    finally:
        await adapter.disconnect()
        await sim.stop()
    checker = QualityChecker(stale_after_s=None)
    checker.check(records)
    aapl = bars_of(records, "AAPL")
    flagged = [r for r in aapl if QualityFlag.GAP in r.quality_flags]
    assert flagged and checker.flag_counts["gap"] >= 2
    for r in flagged:
        assert r.provider_specific["missing_bars"] == 1
        i = aapl.index(r)
        assert r.timestamp_ns - aapl[i - 1].timestamp_ns == 120 * 1_000_000_000
    unflagged = [r for r in aapl[1:] if QualityFlag.GAP not in r.quality_flags]
    for r in unflagged:
        i = aapl.index(r)
        assert r.timestamp_ns - aapl[i - 1].timestamp_ns == 60 * 1_000_000_000


async def test_premium_function_is_dropped_and_symbol_errors_counted() -> None:
    sim = await start_sim()
    adapter = await connected(sim)
    try:
        premium = av.ApiMessage("Information", av.PREMIUM_TEXT, av.MessageKind.PREMIUM)
        q = av.Query(av.TIME_SERIES_INTRADAY, "AAPL", "1min")
        assert adapter._on_message(premium, q) is False
        assert adapter._active_functions == ["GLOBAL_QUOTE"]
        demo = av.ApiMessage("Information", av.DEMO_TEXT, av.MessageKind.DEMO_KEY)
        assert adapter._on_message(demo, q) is True
        assert adapter.symbol_errors == 2
        records = await collect(adapter, lambda rs: {r.symbol for r in rs} == set(SYMBOLS))
        assert {r.data_type for r in records} == {DataType.TRADE}
    finally:
        await adapter.disconnect()
        await sim.stop()


async def test_subscribe_while_idle_starts_polling_at_once() -> None:
    sim = await start_sim()
    # A cycle far longer than the wait below: IBM is polled on subscribe or not at all.
    adapter = make_adapter(sim, poll_interval_s=300)
    await adapter.connect()
    records: Records = []
    stream = cast(AsyncGenerator[Records, None], adapter.stream_batches())

    async def consume() -> None:
        async for batch in stream:
            records.extend(batch)
            if any(r.symbol == "IBM" for r in records):
                return

    task = asyncio.create_task(consume())
    try:
        # With nothing subscribed the loop's only await is its idle wait for a subscribe.
        await until(lambda: stream.ag_await is not None, 10, "the poll loop to go idle")
        assert sim.requests == 0
        await adapter.subscribe([Instrument("IBM", TRADES_AND_BARS)])
        await until(task.done, 20, "IBM polled without waiting for the 300 s cycle")
        await task
        assert {r.symbol for r in records} == {"IBM"}
        assert records[0].data_type is DataType.TRADE  # GLOBAL_QUOTE is polled first
        assert "GLOBAL_QUOTE:IBM" in adapter._last_quote
        await adapter.unsubscribe([Instrument("IBM", TRADES_AND_BARS)])
        assert adapter.subscribed == {}
        assert not any(":IBM" in s for s in [*adapter._last_bar, *adapter._last_quote])
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await stream.aclose()
        await adapter.disconnect()
        await sim.stop()


def test_every_interval_runs_on_one_simulated_clock() -> None:
    """No series holds a bar after the simulated now, whatever its interval: a 5min or
    60min series once ran on a clock of its own and served bars hours ahead of the 1min
    series' "Last Refreshed"."""
    config = AlphaVantageSimConfig(
        symbols=["IBM"], session_start=SESSION, history_bars=100, bar_seconds=1000.0
    )
    sim = AlphaVantageSimulator(config)
    now = sim.now()
    assert SESSION + timedelta(minutes=99) <= now < SESSION + timedelta(minutes=99, seconds=1)
    times = {i: [b.time for b in sim.bars("IBM", i)] for i in ("1min", "5min", "60min")}
    assert times["1min"][0] == SESSION and times["1min"][-1] == datetime(2024, 3, 1, 11, 9)
    assert len(times["1min"]) == 100
    assert times["5min"][-1] == datetime(2024, 3, 1, 11, 5) and len(times["5min"]) == 20
    assert times["60min"] == [SESSION, datetime(2024, 3, 1, 10, 30)]
    assert sim.quote("IBM").latest_day == SESSION.date()
