"""The Polygon (Massive) simulator speaks as the real service, and the adapter copes with
what the real service sends: TEXT frames of JSON arrays, ``max_connections`` as the answer
to auth followed by a close, and (kept for older servers) BINARY data frames."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import orjson
import pytest
from aiohttp import web

from common.model import ConnectionStatus, DataType, QualityFlag, RawMarketData
from common.provider import Instrument, ProviderConfig, ProviderDisconnected, ProviderRateLimited
from simulators.market import Faults
from simulators.polygon import MAX_CONNECTIONS, PolygonSimConfig, PolygonSimulator
from workers.polygon import PolygonAdapter

KEY_ENV = "FEEDFLEET_TEST_POLYGON_ADAPTER_KEY"


def adapter_for(url: str) -> PolygonAdapter:
    os.environ[KEY_ENV] = "test-key"
    row = ProviderConfig(
        id=str(uuid.uuid4()), name="polygon-adapter-test", provider_type="polygon",
        connection_config={"url": url, "api_key_env": KEY_ENV},
    )  # fmt: skip
    return PolygonAdapter(row)


@pytest.fixture
async def sim() -> AsyncIterator[tuple[PolygonSimulator, int]]:
    simulator = PolygonSimulator(PolygonSimConfig(symbols=["AAA", "BBB"], rate=500, batch=5))
    port = await simulator.start()
    try:
        yield simulator, port
    finally:
        await simulator.stop()


async def _receive_json(ws: aiohttp.ClientWebSocketResponse) -> tuple[aiohttp.WSMsgType, object]:
    msg = await ws.receive(timeout=10)
    data = orjson.loads(msg.data) if msg.type is aiohttp.WSMsgType.TEXT else msg.data
    return msg.type, data


async def test_the_simulator_sends_every_frame_as_text_json(
    sim: tuple[PolygonSimulator, int],
) -> None:
    _, port = sim
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(f"ws://127.0.0.1:{port}/stocks") as ws,
    ):
        assert await _receive_json(ws) == (
            aiohttp.WSMsgType.TEXT,
            [{"ev": "status", "status": "connected", "message": "Connected Successfully"}],
        )
        await ws.send_str('{"action":"auth","params":"k"}')
        assert (await _receive_json(ws))[1][0]["status"] == "auth_success"  # type: ignore[index]
        await ws.send_str('{"action":"subscribe","params":"T.AAA"}')
        assert (await _receive_json(ws))[1] == [
            {"ev": "status", "status": "success", "message": "subscribed to: T.AAA"}
        ]
        kind, data = await _receive_json(ws)
        assert kind is aiohttp.WSMsgType.TEXT
        assert isinstance(data, list) and len(data) == 5
        assert {(e["ev"], e["sym"]) for e in data} == {("T", "AAA")}


async def test_max_connections_answers_the_auth_and_closes() -> None:
    """As the real service: ``connected``, then ``max_connections`` as the reply to auth
    (what the official client reads after sending it), then a close with 1008."""
    simulator = PolygonSimulator(PolygonSimConfig(symbols=["AAA"], faults=Faults(rate_limit=True)))
    port = await simulator.start()
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(f"ws://127.0.0.1:{port}/stocks") as ws,
        ):
            assert (await _receive_json(ws))[1][0]["status"] == "connected"  # type: ignore[index]
            await ws.send_str('{"action":"auth","params":"k"}')
            assert await _receive_json(ws) == (
                aiohttp.WSMsgType.TEXT,
                [{"ev": "status", "status": "max_connections", "message": MAX_CONNECTIONS}],
            )
            closing = await ws.receive(timeout=10)
            assert closing.type is aiohttp.WSMsgType.CLOSE
            assert closing.data == aiohttp.WSCloseCode.POLICY_VIOLATION

        adapter = adapter_for(f"ws://127.0.0.1:{port}/stocks")
        with pytest.raises(ProviderRateLimited, match="Maximum number of websocket"):
            await adapter.connect()
        assert adapter.connection_status is ConnectionStatus.DISCONNECTED
    finally:
        await simulator.stop()


async def test_the_adapter_reads_text_frames_from_the_simulator(
    sim: tuple[PolygonSimulator, int],
) -> None:
    simulator, port = sim
    adapter = adapter_for(f"ws://127.0.0.1:{port}/stocks")
    await adapter.connect()
    try:
        await adapter.subscribe([Instrument("BBB", frozenset({DataType.TRADE}))])
        batches = adapter.stream_batches()
        records = await anext(batches)
        assert {(r.symbol, r.data_type) for r in records} == {("BBB", DataType.TRADE)}
        assert all(r.price is not None and r.price > 0 for r in records)
    finally:
        await adapter.disconnect()
    assert simulator.events_sent >= len(records) > 0


async def serve_stocks(
    handle: Callable[[web.Request], Awaitable[web.WebSocketResponse]],
) -> tuple[web.AppRunner, str]:
    """A one-route server scripted by ``handle``, on a free port; its runner and URL."""
    app = web.Application()
    app.router.add_get("/stocks", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"ws://127.0.0.1:{runner.addresses[0][1]}/stocks"


async def test_a_server_that_closes_the_socket_is_a_disconnect_not_a_crash() -> None:
    """A close frame's data is its close code (an int): counting it as bytes received once
    crashed the session with a TypeError instead of a reconnect."""

    async def handle(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str('[{"ev":"status","status":"connected","message":"Connected"}]')
        await ws.receive()  # the auth
        await ws.send_str('[{"ev":"status","status":"auth_success","message":"ok"}]')
        await ws.close(code=1001, message=b"going away")
        return ws

    runner, url = await serve_stocks(handle)
    adapter = adapter_for(url)
    try:
        await adapter.connect()
        with pytest.raises(ProviderDisconnected, match="close"):
            await anext(adapter.stream_batches())
        assert adapter.connection_status is ConnectionStatus.DISCONNECTED
    finally:
        await adapter.disconnect()
        await runner.cleanup()


async def test_the_adapter_still_accepts_binary_data_frames() -> None:
    """A server that sends its JSON arrays as BINARY (as this simulator once did) is read
    the same."""
    trade = {"ev": "T", "sym": "CCC", "i": "7", "x": 4, "p": 10.5, "s": 3, "t": 1_700_000_000_000,
             "q": 1}  # fmt: skip

    async def handle(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str('[{"ev":"status","status":"connected","message":"Connected"}]')
        await ws.receive()  # auth
        await ws.send_str('[{"ev":"status","status":"auth_success","message":"authenticated"}]')
        await ws.send_bytes(orjson.dumps([trade]))
        await ws.receive()  # the client's close
        return ws

    runner, url = await serve_stocks(handle)
    adapter = adapter_for(url)
    try:
        await adapter.connect()
        batches = adapter.stream_batches()
        [record] = await anext(batches)
        assert (record.symbol, record.data_type, record.price, record.volume) == (
            "CCC", DataType.TRADE, 10.5, 3.0,
        )  # fmt: skip
        assert record.timestamp_ns == 1_700_000_000_000_000_000
    finally:
        await adapter.disconnect()
        await runner.cleanup()


@pytest.mark.parametrize("subscribe_delay_ms", [0, 150])
async def test_after_a_reconnect_the_missed_trades_are_backfilled_over_rest(
    subscribe_delay_ms: int,
) -> None:
    """The simulator drops the connection; the symbol goes on trading while the client is
    away (into the simulator's tape only). Reconnected, the adapter fetches those trades from
    /v3/trades, page by page, flagged backfill, before live data: every trade the tape holds
    up to the last one received arrives exactly once. A server slow to act on the new
    subscription (trading on meanwhile) loses none either: the backfill runs to its
    confirmation, not to the reconnect."""
    config = PolygonSimConfig(symbols=["AAA"], rate=2000, batch=5, away_trade_ms=5,
                              faults=Faults(drop_after=100),
                              subscribe_delay_ms=subscribe_delay_ms)  # fmt: skip
    simulator = PolygonSimulator(config)
    port = await simulator.start()
    adapter = adapter_for(f"ws://127.0.0.1:{port}/stocks")
    adapter.rest_url = f"http://127.0.0.1:{port}"
    adapter.backfill_page_size = 16
    trades: list[RawMarketData] = []
    try:
        await adapter.connect()
        await adapter.subscribe([Instrument("AAA", frozenset({DataType.TRADE}))])
        with pytest.raises(ProviderDisconnected):
            async for batch in adapter.stream_batches():
                trades.extend(batch)
        live_before = len(trades)
        assert live_before > 0 and adapter.backfilled == 0
        # The outage: the market moves on meanwhile.
        await asyncio.sleep(0.3)
        await adapter.disconnect()
        await adapter.connect()
        async for batch in adapter.stream_batches():
            trades.extend(batch)
            if len(trades) > live_before + adapter.backfilled + 20:
                break
    finally:
        await adapter.disconnect()
        await simulator.stop()
    backfilled = [r for r in trades if QualityFlag.BACKFILL in r.quality_flags]
    assert len(backfilled) == adapter.backfilled >= 40  # 0.3 s at one trade per 5 ms
    assert simulator.rest_requests >= 3  # pages of 16
    # Handed over right after the live trades of before, ahead of the live ones of after.
    assert trades[live_before : live_before + len(backfilled)] == backfilled
    seqs = [r.provider_sequence for r in trades]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    tape = [e["q"] for e in simulator.tape["AAA"]]
    assert seqs == tape[: len(seqs)]  # no trade missing, none twice


async def test_a_connection_lost_while_subscriptions_are_confirmed_loses_nothing() -> None:
    """The server takes 100 ms a channel to confirm three, and drops every connection after
    120 events (40 ms at this rate): the second connection dies before its confirmations.
    What it brought, and what traded while the client was away, still arrive, once: the
    backfill runs anyway, to the moment the connection was lost."""
    symbols = ["AAA", "BBB", "CCC"]
    config = PolygonSimConfig(symbols=symbols, rate=3000, batch=6, away_trade_ms=5,
                              faults=Faults(drop_after=120), subscribe_delay_ms=100)  # fmt: skip
    simulator = PolygonSimulator(config)
    port = await simulator.start()
    adapter = adapter_for(f"ws://127.0.0.1:{port}/stocks")
    adapter.rest_url = f"http://127.0.0.1:{port}"
    trades: list[RawMarketData] = []
    try:
        await adapter.connect()
        await adapter.subscribe([Instrument(s, frozenset({DataType.TRADE})) for s in symbols])
        for _ in range(2):
            with pytest.raises(ProviderDisconnected):
                async for batch in adapter.stream_batches():
                    trades.extend(batch)
            await asyncio.sleep(0.2)
            await adapter.disconnect()
            await adapter.connect()
    finally:
        await adapter.disconnect()
        await simulator.stop()
    assert adapter.backfilled > 0
    for symbol in {r.symbol for r in trades}:
        seqs = [r.provider_sequence for r in trades if r.symbol == symbol]
        tape = [e["q"] for e in simulator.tape[symbol]]
        assert seqs == tape[: len(seqs)], symbol  # no trade missing, none twice
