"""BloombergAdapter against the blpapi stand-in (simulators/bloomberg.py) over loopback TCP.

The real blpapi cannot be installed here; these tests load ``simulators.bloomberg`` as
the adapter's ``blpapi_module``, so they check the adapter's use of the blpapi API as the
stand-in models it, not Bloomberg's servers.
"""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any, cast

import pytest

from common.model import ConnectionStatus, DataType, QualityFlag, RawMarketData
from common.provider import (
    Instrument,
    ProviderAuthError,
    ProviderConfig,
    ProviderConfigError,
    ProviderDisconnected,
)
from common.quality import QualityChecker
from simulators import bloomberg as standin
from simulators.bloomberg import BloombergSimConfig, BloombergSimulator
from simulators.market import Faults
from tests.running import until
from workers.bloomberg import BloombergAdapter

SYMBOLS = ["AAPL", "MSFT", "JPM"]


def adapter_for(port: int, **extra: Any) -> BloombergAdapter:
    cc = {"blpapi_module": "simulators.bloomberg", "host": "127.0.0.1", "port": port,
          "silence_timeout_s": 3.0, "start_timeout_s": 5.0, **extra}  # fmt: skip
    return BloombergAdapter(ProviderConfig("p-bbg", "bbg-test", "bloomberg", connection_config=cc))


@asynccontextmanager
async def running(
    faults: str = "", *, sim: dict[str, Any] | None = None, **extra: Any
) -> AsyncIterator[tuple[BloombergSimulator, BloombergAdapter]]:
    settings: dict[str, Any] = {"rate": 3000.0, "batch": 5, **(sim or {})}
    config = BloombergSimConfig(symbols=SYMBOLS, faults=Faults.parse(faults), **settings)
    simulator = BloombergSimulator(config)
    port = await simulator.start("127.0.0.1", 0)
    adapter = adapter_for(port, **extra)
    try:
        yield simulator, adapter
    finally:
        await adapter.disconnect()
        await simulator.stop()


async def take(adapter: BloombergAdapter, count: int, timeout: float = 20.0) -> list[RawMarketData]:
    out: list[RawMarketData] = []
    async with asyncio.timeout(timeout), aclosing(stream(adapter)) as batches:
        async for batch in batches:
            out.extend(batch)
            if len(out) >= count:
                break
    return out


def stream(adapter: BloombergAdapter) -> AsyncGenerator[list[RawMarketData], None]:
    # The interface types it as an AsyncIterator; it is an async generator (aclose()).
    return cast(AsyncGenerator[list[RawMarketData], None], adapter.stream_batches())


def instruments(*symbols: str) -> list[Instrument]:
    return [Instrument(s) for s in symbols]


async def test_happy_path_yields_typed_records() -> None:
    before = time.time_ns()
    async with running() as (_sim, adapter):
        await adapter.connect()
        assert adapter.connection_status is ConnectionStatus.CONNECTED
        await adapter.subscribe(instruments("AAPL", "MSFT"))
        records = await take(adapter, 60)
        now = time.time_ns()
        assert {r.symbol for r in records} == {"AAPL", "MSFT"}
        trades = [r for r in records if r.data_type is DataType.TRADE]
        quotes = [r for r in records if r.data_type is DataType.QUOTE]
        assert {r.symbol for r in trades} == {"AAPL", "MSFT"} == {r.symbol for r in quotes}
        for t in trades:
            assert isinstance(t.price, float) and 0.01 <= t.price < 1000
            assert isinstance(t.volume, int) and t.volume > 0
            assert t.provider_specific["MKTDATA_EVENT_TYPE"] == "TRADE"
            assert t.stream == "T." + t.symbol
        for q in quotes:
            assert q.bid is not None and q.ask is not None and q.bid < q.ask
            assert q.stream == "Q." + q.symbol
        for r in records:
            assert r.provider == "bbg-test" and r.provider_sequence is None
            # The stand-in's clock in whole microseconds, then ours.
            assert before - 1_000 <= r.timestamp_ns <= r.receive_ns <= now
            assert r.quality_flags == []
        # The first record per symbol is the initial paint, taken as a quote.
        first = next(r for r in records if r.symbol == "AAPL")
        assert first.data_type is DataType.QUOTE
        assert first.provider_specific["MKTDATA_EVENT_SUBTYPE"] == "INITPAINT"
        checker = QualityChecker(stale_after_s=None)
        checker.check(records)
        assert all(r.quality_flags == [] for r in records)
        assert adapter.decode_errors == 0
        assert adapter.status().subscribed_symbols == 2


async def test_missing_blpapi_is_a_config_error() -> None:
    if importlib.util.find_spec("blpapi") is not None:
        pytest.skip("blpapi is installed here")
    adapter = BloombergAdapter(ProviderConfig("p", "bbg", "bloomberg", connection_config={}))
    with pytest.raises(ProviderConfigError) as info:
        await adapter.connect()
    text = str(info.value)
    assert "blpapi" in text and "not installed" in text
    assert "blpapi.bloomberg.com" in text and "simulators.bloomberg" in text
    other = BloombergAdapter(
        ProviderConfig("p", "bbg", "bloomberg", connection_config={"blpapi_module": "no_such_mod"})
    )
    with pytest.raises(ProviderConfigError, match="no_such_mod"):
        await other.connect()


async def test_refused_auth_is_an_auth_error() -> None:
    async with running("refuse_auth", app_name="feedfleet") as (_sim, adapter):
        with pytest.raises(ProviderAuthError, match="NO_AUTH"):
            await adapter.connect()
        assert adapter.connection_status is ConnectionStatus.ERROR
        assert adapter.last_error is not None and "authorization failed" in adapter.last_error


async def test_wrong_application_name_is_an_auth_error() -> None:
    async with running(sim={"app_name": "right-app"}, app_name="wrong-app") as (_sim, adapter):
        with pytest.raises(ProviderAuthError, match="wrong-app"):
            await adapter.connect()
        assert adapter.connection_status is ConnectionStatus.ERROR


async def test_no_server_is_a_disconnect() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    adapter = adapter_for(port)
    with pytest.raises(ProviderDisconnected, match="IO_ERROR"):
        await adapter.connect()
    assert adapter.connection_status is ConnectionStatus.DISCONNECTED


async def test_slow_consumer_warning_sets_rate_limited_then_clears() -> None:
    sim_cfg = {"slow_consumer_clear_after": 40}
    async with running("rate_limit", sim=sim_cfg) as (_sim, adapter):
        await adapter.connect()
        await adapter.subscribe(instruments("AAPL"))
        seen: list[ConnectionStatus] = []
        total = 0
        async with asyncio.timeout(20), aclosing(stream(adapter)) as batches:
            async for batch in batches:
                total += len(batch)
                seen.append(adapter.connection_status)
                if total >= 100:
                    break
        assert adapter.slow_consumer_warnings == 1
        assert ConnectionStatus.RATE_LIMITED in seen
        assert seen[-1] is ConnectionStatus.CONNECTED  # cleared, and data kept flowing
        assert adapter.last_error is not None and "Cleared" in adapter.last_error


async def test_drop_raises_disconnected_and_reconnect_restores_subscriptions() -> None:
    async with running("drop_after=40") as (_sim, adapter):
        await adapter.connect()
        await adapter.subscribe(instruments("AAPL", "MSFT"))
        got: list[RawMarketData] = []
        with pytest.raises(ProviderDisconnected, match="SessionTerminated"):
            async with asyncio.timeout(20), aclosing(stream(adapter)) as batches:
                async for batch in batches:
                    got.extend(batch)
        assert len(got) >= 40
        assert adapter.connection_status is ConnectionStatus.DISCONNECTED
        # What the worker does: disconnect, connect again; the adapter resubscribes.
        await adapter.disconnect()
        await adapter.connect()
        assert adapter.connection_status is ConnectionStatus.CONNECTED
        again = await take(adapter, 20)
        assert {r.symbol for r in again} == {"AAPL", "MSFT"}
        assert all(r.price or r.bid for r in again)


async def test_silence_raises_disconnected_within_timeout() -> None:
    async with running("silent_after=20", silence_timeout_s=0.5) as (_sim, adapter):
        await adapter.connect()
        await adapter.subscribe(instruments("AAPL"))
        last = time.monotonic()
        got = 0
        # 20 s is far below the 60 s default: only silence_timeout_s ends this in time.
        with pytest.raises(ProviderDisconnected, match="no events"):
            async with asyncio.timeout(20), aclosing(stream(adapter)) as batches:
                async for batch in batches:
                    got += len(batch)
                    last = time.monotonic()
        waited = time.monotonic() - last
        assert got >= 20
        assert waited >= 0.4  # not before the timeout
        assert adapter.last_error == "no events from blpapi for 0.5s"
        assert adapter.connection_status is ConnectionStatus.DISCONNECTED


async def test_malformed_messages_are_counted_and_the_stream_continues() -> None:
    async with running("malformed_every=7") as (_sim, adapter):
        await adapter.connect()
        await adapter.subscribe(instruments("AAPL", "MSFT"))
        records = await take(adapter, 120)
        assert adapter.decode_errors > 0
        flagged = [r for r in records if QualityFlag.MISSING_FIELDS in r.quality_flags]
        assert flagged and all(r.price is None for r in flagged)
        good = [r for r in records if not r.quality_flags]
        assert len(good) > 90  # the stream kept going past each bad message


async def test_data_loss_flags_a_gap_on_the_next_record() -> None:
    async with running("skip_seq_every=10") as (_sim, adapter):
        await adapter.connect()
        await adapter.subscribe(instruments("AAPL", "MSFT"))
        records = await take(adapter, 80)
        QualityChecker(stale_after_s=None).check(records)
        gaps = [r for r in records if QualityFlag.GAP in r.quality_flags]
        assert adapter.data_loss_messages >= 3 and adapter.messages_lost >= 3
        assert gaps and {r.symbol for r in gaps} <= {"AAPL", "MSFT"}
        # One flag per loss report: not every record after it.
        assert len(gaps) <= adapter.data_loss_messages


async def test_bad_security_is_a_per_symbol_error_and_unsubscribe_stops_data() -> None:
    async with running() as (_sim, adapter):
        await adapter.connect()
        await adapter.subscribe(instruments("AAPL", "NOPE"))
        first = await take(adapter, 20)
        assert {r.symbol for r in first} == {"AAPL"}
        assert adapter.subscription_failures == 1
        assert "BAD_SEC" in adapter.symbol_errors["NOPE"]
        assert adapter.connection_status is ConnectionStatus.CONNECTED
        await adapter.unsubscribe(instruments("AAPL"))
        await adapter.subscribe(instruments("MSFT"))
        later: list[RawMarketData] = []
        async with asyncio.timeout(20), aclosing(stream(adapter)) as batches:
            async for batch in batches:
                later.extend(batch)
                msft_at = next((i for i, r in enumerate(later) if r.symbol == "MSFT"), None)
                if msft_at is not None and len(later) - msft_at >= 30:
                    break
        after = later[msft_at:]
        assert {r.symbol for r in after} == {"MSFT"}
        assert set(adapter.subscribed) == {"NOPE", "MSFT"}


async def test_unknown_fields_are_reported_and_trades_only_flow() -> None:
    fields = ["LAST_PRICE", "SIZE_LAST_TRADE", "NO_SUCH_FIELD"]
    async with running(fields=fields, interval_s=1) as (_sim, adapter):
        await adapter.connect()
        await adapter.subscribe([Instrument("JPM", frozenset({DataType.TRADE}))])
        records = await take(adapter, 30)
        assert adapter.field_errors == 1
        # The initial paint carries no bid/ask in these fields, so it yields nothing.
        assert {r.data_type for r in records} == {DataType.TRADE}
        assert all(r.symbol == "JPM" and r.price is not None for r in records)


async def test_disconnect_wakes_a_waiting_stream() -> None:
    async with running() as (_sim, adapter):
        await adapter.connect()  # nothing subscribed: no data will come

        batches = stream(adapter)

        async def consume() -> None:
            async with aclosing(batches):
                async for _batch in batches:
                    pass

        task = asyncio.create_task(consume())
        await until(lambda: batches.ag_await is not None, 10, "the stream to wait for events")
        await adapter.disconnect()
        with pytest.raises(ProviderDisconnected, match="disconnected by the worker"):
            await asyncio.wait_for(task, 20)
        assert adapter.connection_status is ConnectionStatus.DISCONNECTED


async def test_the_stand_ins_bounded_queue_reports_overflow_as_blpapi_does() -> None:
    """blpapi's event queue is bounded: an application that does not keep up gets
    SlowConsumerWarning, loses data events past maxEventQueueSize, and is told how many
    (DataLoss per subscription, eventsDropped on SlowConsumerWarningCleared). What was
    received plus what was reported lost is exactly what the server sent."""
    sent = 300
    config = BloombergSimConfig(symbols=["AAPL"], rate=20_000.0, batch=1,
                                faults=Faults.parse(f"silent_after={sent}"))  # fmt: skip
    simulator = BloombergSimulator(config)
    port = await simulator.start("127.0.0.1", 0)
    options = standin.SessionOptions()
    options.setServerHost("127.0.0.1")
    options.setServerPort(port)
    options.setMaxEventQueueSize(20)
    session = standin.Session(options)
    try:
        assert await asyncio.to_thread(session.start)
        assert await asyncio.to_thread(session.openService, "//blp/mktdata")
        subs = standin.SubscriptionList()
        subs.add("AAPL US Equity", "LAST_PRICE,BID,ASK", None, standin.CorrelationId(7))
        session.subscribe(subs)
        # Nobody reads: the queue fills and the rest of what the server sends is dropped.
        await until(lambda: simulator.events_sent >= sent, 20, "the server to send")
        await until(lambda: session._events_dropped > 0, 20, "the queue to overflow")
        data = warnings = 0
        lost: list[tuple[str, int]] = []
        cleared: list[int] = []
        while True:
            event = await asyncio.to_thread(session.nextEvent, 1000)
            if event.eventType() == standin.Event.TIMEOUT:
                break
            for msg in event:
                kind = str(msg.messageType())
                if event.eventType() == standin.Event.SUBSCRIPTION_DATA:
                    data += 1
                elif kind == "SlowConsumerWarning":
                    warnings += 1
                elif kind == "DataLoss":
                    value = msg.toPy()
                    lost.append((value["source"], value["numMessagesDropped"]))
                    assert msg.correlationIds() == [standin.CorrelationId(7)]
                elif kind == "SlowConsumerWarningCleared":
                    cleared.append(msg.toPy()["eventsDropped"])
        dropped = sum(n for _, n in lost)
        assert warnings == 1 and len(cleared) == 1
        assert dropped > 0 and cleared == [dropped]  # batch=1: one message per event
        assert {source for source, _ in lost} == {"AAPL US Equity"}
        assert data + dropped == sent + 1  # and the initial paint
        assert 10 <= data < sent
    finally:
        session.stop()
        await simulator.stop()


async def test_the_adapter_flags_what_blpapi_dropped_and_says_it_is_behind() -> None:
    """Data keeps coming while the worker is not reading: blpapi's queue overflows. The
    status says so (RATE_LIMITED until SlowConsumerWarningCleared, then CONNECTED), the
    loss is counted, and the next record of the symbol after it is flagged ``gap``."""
    # 1,000/s: the queue overflows while nobody reads, and the adapter drains it once it does.
    async with running(sim={"batch": 1, "rate": 1000.0}, max_event_queue_size=20,
                       max_pending_events=2) as (_sim, adapter):  # fmt: skip
        await adapter.connect()
        await adapter.subscribe(instruments("AAPL"))
        session = adapter._session
        assert session is not None
        await until(lambda: session._events_dropped > 0, 20, "blpapi's queue to overflow")
        records: list[RawMarketData] = []
        statuses: list[ConnectionStatus] = []
        async with asyncio.timeout(30), aclosing(stream(adapter)) as batches:
            async for batch in batches:
                records.extend(batch)
                statuses.append(adapter.connection_status)
                if adapter.events_dropped > 0 and any(
                    QualityFlag.GAP in r.quality_flags for r in records
                ):
                    break
        assert adapter.messages_lost > 0 and adapter.slow_consumer_warnings >= 1
        # eventsDropped comes only with SlowConsumerWarningCleared: the warning was cleared.
        assert adapter.events_dropped > 0
        assert ConnectionStatus.RATE_LIMITED in statuses
        assert (
            ConnectionStatus.CONNECTED in statuses[statuses.index(ConnectionStatus.RATE_LIMITED) :]
        )
        gaps = [r for r in records if QualityFlag.GAP in r.quality_flags]
        assert {r.symbol for r in gaps} == {"AAPL"}
        assert 1 <= len(gaps) <= adapter.data_loss_messages


async def test_a_bad_event_queue_size_is_a_config_error() -> None:
    async with running(max_event_queue_size=0) as (_sim, adapter):
        with pytest.raises(ProviderConfigError, match="max_event_queue_size"):
            await adapter.connect()
        assert adapter.connection_status is ConnectionStatus.ERROR


async def test_events_queued_at_disconnect_are_taken_not_dropped() -> None:
    """Events the reader thread handed over and nobody read yet are decoded after the
    disconnect (ProviderAdapter.take_queued), so a stop does not drop them."""
    async with running() as (_sim, adapter):
        await adapter.connect()
        await adapter.subscribe(instruments("AAPL", "MSFT"))
        read = await take(adapter, 10)
        # Nobody reads now: events pile up in the adapter's queue.
        deadline = time.monotonic() + 10
        while adapter.queue_depth() < 5:
            assert time.monotonic() < deadline, "no events queued"
            await asyncio.sleep(0.05)
        await adapter.disconnect()
        queued = adapter.take_queued()
        assert adapter.take_queued() == [] and adapter.queue_depth() == 0
    assert len(queued) >= 5
    assert {r.symbol for r in queued} <= {"AAPL", "MSFT"}
    # They follow what was read, newest last.
    assert min(r.receive_ns for r in queued) >= max(r.receive_ns for r in read)
