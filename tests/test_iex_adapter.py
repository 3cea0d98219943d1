"""IEX adapter against the IEX simulator over real UDP sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from common.codecs import iex as codec
from common.model import ConnectionStatus, DataType, QualityFlag, RawMarketData
from common.provider import (
    Instrument,
    ProviderConfig,
    ProviderConfigError,
    ProviderDisconnected,
)
from common.quality import QualityChecker
from simulators.iex import IexSimConfig, IexSimulator, build_capture
from simulators.market import Faults
from tests.running import until
from workers.adapters import adapter_class
from workers.iex import IexAdapter

SYMBOLS = ["AAPL", "MSFT", "IBM"]
BOTH = frozenset({DataType.TRADE, DataType.QUOTE})


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def make_adapter(**cc: Any) -> IexAdapter:
    config = ProviderConfig(id="p-iex", name="iex-test", provider_type="iex", connection_config=cc)
    return IexAdapter(config)


@contextlib.asynccontextmanager
async def running(
    faults: str = "", *, port: int, dest_host: str = "127.0.0.1", **cfg: Any
) -> AsyncIterator[IexSimulator]:
    settings: dict[str, Any] = {"rate": 2000.0, "batch": 5, "heartbeat_s": 0.1} | cfg
    sim = IexSimulator(
        IexSimConfig(
            symbols=SYMBOLS, destination=(dest_host, port), faults=Faults.parse(faults),
            **settings,
        )
    )  # fmt: skip
    await sim.start("127.0.0.1", 0)
    try:
        yield sim
    finally:
        await sim.stop()


async def collect(adapter: IexAdapter, count: int, timeout: float = 20.0) -> list[RawMarketData]:
    out: list[RawMarketData] = []
    stream = adapter.stream_batches()

    async def run() -> None:
        async for batch in stream:
            out.extend(batch)
            if len(out) >= count:
                return

    try:
        await asyncio.wait_for(run(), timeout)
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
    return out


async def connected(port: int, **cc: Any) -> IexAdapter:
    adapter = make_adapter(host="127.0.0.1", port=port, heartbeat_timeout_s=2.0, **cc)
    await adapter.subscribe(
        [Instrument("AAPL", BOTH), Instrument("MSFT", frozenset({DataType.QUOTE}))]
    )
    await adapter.connect()
    return adapter


async def test_registry_names_the_adapter() -> None:
    assert adapter_class("iex") is IexAdapter
    assert IexAdapter.provider_type == "iex"


async def test_happy_path() -> None:
    port = free_udp_port()
    adapter = await connected(port)
    assert adapter.connection_status is ConnectionStatus.CONNECTED
    before = time.time_ns()
    try:
        async with running(port=port) as sim:
            records = await collect(adapter, 60)
            session = sim.feed.session_id
    finally:
        await adapter.disconnect()
    assert adapter.connection_status is ConnectionStatus.DISCONNECTED
    now = time.time_ns()
    assert {r.symbol for r in records} == {"AAPL", "MSFT"}  # IBM not subscribed
    assert {r.data_type for r in records if r.symbol == "MSFT"} == {DataType.QUOTE}
    assert {r.data_type for r in records if r.symbol == "AAPL"} == {DataType.QUOTE, DataType.TRADE}
    previous = (records[0].provider_sequence or 0) - 1
    for r in records:
        assert r.provider == "iex-test" and r.stream == f"1:{session}"
        # Records after messages that were received but filtered out are not contiguous.
        assert r.sequence_contiguous is (r.provider_sequence == previous + 1)
        previous = r.provider_sequence
        assert before <= r.timestamp_ns <= r.receive_ns <= now
        if r.data_type is DataType.QUOTE:
            assert r.bid is not None and r.ask is not None and 0 < r.bid < r.ask
            assert r.provider_specific["bid_size"] % 100 == 0 and r.price is None
        else:
            assert r.price is not None and r.price > 0 and r.volume is not None and r.volume > 0
            assert r.provider_specific["trade_id"] > 0
    seqs = [r.provider_sequence for r in records]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    # Session open: system events plus directory and trading status per symbol.
    assert adapter.events_received >= 3 + 2 * len(SYMBOLS)
    assert adapter.decode_errors == 0 and adapter.sequence_gaps == 0
    # Other symbols' messages between these records are not gaps.
    QualityChecker(stale_after_s=None).check(records)
    assert not [r for r in records if r.quality_flags]


async def test_heartbeats_keep_an_idle_feed_alive() -> None:
    port = free_udp_port()
    adapter = await connected(port)
    adapter.heartbeat_timeout_s = 0.5
    got: list[RawMarketData] = []

    async def consume() -> None:
        async for batch in adapter.stream_batches():
            got.extend(batch)

    try:
        async with running(port=port, rate=0.0, heartbeat_s=0.1):
            task = asyncio.create_task(consume())
            try:
                # Ten heartbeats 0.1 s apart span about twice the 0.5 s timeout.
                await until(lambda: adapter.heartbeats_received >= 10 or task.done(), 20,
                            "ten heartbeats")  # fmt: skip
                assert not task.done(), f"the idle feed was given up: {task.exception()!r}"
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    finally:
        await adapter.disconnect()
    assert got == []
    assert adapter.segments_received > adapter.heartbeats_received  # plus the session open


async def test_drop_ends_session_then_reconnect_gets_the_next_session() -> None:
    port = free_udp_port()
    adapter = await connected(port)
    async with running("drop_after=40", port=port, session_pause_s=0.3) as sim:
        first_session = sim.feed.session_id
        # Ended by System Event C, not by the 2 s heartbeat timeout of a silent feed.
        with pytest.raises(ProviderDisconnected, match="end of messages"):
            await collect(adapter, 10_000)
        assert adapter.connection_status is ConnectionStatus.DISCONNECTED
        assert adapter.session_ended
        # What the worker does on ProviderDisconnected.
        await adapter.disconnect()
        await adapter.connect()
        assert adapter.connection_status is ConnectionStatus.CONNECTED
        records = await collect(adapter, 10)
        await adapter.disconnect()
    assert set(adapter.subscribed) == {"AAPL", "MSFT"}
    assert {r.symbol for r in records} <= {"AAPL", "MSFT"} and len(records) >= 10
    assert {r.stream for r in records} == {f"1:{first_session + 1}"}
    assert sim.sessions >= 2


async def test_silence_past_heartbeat_timeout_disconnects() -> None:
    port = free_udp_port()
    adapter = await connected(port)
    adapter.heartbeat_timeout_s = 0.4
    got: list[RawMarketData] = []
    try:
        async with running("silent_after=30", port=port) as sim:
            with pytest.raises(ProviderDisconnected, match="not even a heartbeat"):
                async with asyncio.timeout(20):
                    async for batch in adapter.stream_batches():
                        got.extend(batch)
            assert sim.silent
    finally:
        await adapter.disconnect()
    assert got
    # The timeout set on the adapter, not the 2 s it was created with.
    assert adapter.last_error == "no IEX-TP segment, not even a heartbeat, for 0.4s"
    assert adapter.connection_status is ConnectionStatus.DISCONNECTED


async def test_malformed_datagrams_are_counted_and_stream_continues() -> None:
    port = free_udp_port()
    adapter = await connected(port)
    try:
        async with running("malformed_every=2", port=port) as sim:
            records = await collect(adapter, 80)
            malformed = sim.feed.malformed_sent
    finally:
        await adapter.disconnect()
    assert len(records) >= 80
    assert adapter.decode_errors >= 4 and malformed >= adapter.decode_errors
    # Junk datagrams do not move sequence tracking: no false gaps, no lost records.
    assert adapter.sequence_gaps == 0


async def test_skipped_sequence_numbers_are_gaps() -> None:
    port = free_udp_port()
    adapter = await connected(port, all_symbols=True)
    try:
        async with running("skip_seq_every=15", port=port) as sim:
            records = await collect(adapter, 100)
            skipped = sim.feed.sequences_skipped
    finally:
        await adapter.disconnect()
    assert adapter.sequence_gaps >= 3 and adapter.missing_messages == adapter.sequence_gaps
    assert skipped >= adapter.sequence_gaps
    QualityChecker(stale_after_s=None).check(records)
    gaps = [r for r in records if QualityFlag.GAP in r.quality_flags]
    assert len(gaps) == adapter.sequence_gaps
    seqs = [r.provider_sequence or 0 for r in records]
    for r in gaps:
        i = seqs.index(r.provider_sequence or 0)
        assert seqs[i] == seqs[i - 1] + 2  # one sequence number lost before it


async def test_auth_and_rate_limit_faults_do_not_exist_in_iex_tp() -> None:
    for fault in ("refuse_auth", "rate_limit"):
        with pytest.raises(ValueError, match="do not apply to IEX-TP"):
            IexSimulator(IexSimConfig(symbols=SYMBOLS, faults=Faults.parse(fault)))


async def test_simulator_pcap_matches_what_the_adapter_received(tmp_path: Path) -> None:
    port = free_udp_port()
    path = tmp_path / "sent.pcap"
    adapter = await connected(port, all_symbols=True)
    try:
        async with running(port=port, pcap_path=str(path)) as sim:
            live = await collect(adapter, 50)
    finally:
        await adapter.disconnect()
    captured = [r for r in codec.decode_capture(path.read_bytes()) if isinstance(r, RawMarketData)]
    assert len(captured) >= len(live)
    by_seq = {r.provider_sequence: r for r in captured}
    for r in live:
        c = by_seq[r.provider_sequence]
        assert (c.symbol, c.data_type, c.price, c.bid, c.ask, c.timestamp_ns) == (
            r.symbol, r.data_type, r.price, r.bid, r.ask, r.timestamp_ns,
        )  # fmt: skip
    assert sim.datagrams_sent > 0


async def test_pcap_replay_at_max_speed(tmp_path: Path) -> None:
    cfg = IexSimConfig(symbols=SYMBOLS, batch=10, session_id=5)
    path = tmp_path / "session.pcap"
    # Segments 10 s apart: played at the recorded pace, this would take over 200 s.
    capture = build_capture(cfg, 200, start_ns=1_700_000_000_000_000_000, interval_ns=10**10)
    path.write_bytes(capture)
    adapter = make_adapter(pcap_path=str(path), replay_speed="max")
    await adapter.subscribe([Instrument("AAPL", BOTH)])
    await adapter.connect()
    got: list[RawMarketData] = []
    with pytest.raises(ProviderDisconnected, match="pcap replay finished"):
        async with asyncio.timeout(20):
            async for batch in adapter.stream_batches():
                got.extend(batch)
    await adapter.disconnect()
    expected = [r for r in codec.decode_capture(path.read_bytes(), symbol="AAPL")]
    assert [(r.provider_sequence, r.timestamp_ns) for r in got] == [
        (r.provider_sequence, r.timestamp_ns) for r in expected if isinstance(r, RawMarketData)
    ]
    assert len(got) > 50 and {r.symbol for r in got} == {"AAPL"}
    assert adapter.segments_received > 20 and adapter.decode_errors == 0


async def test_pcap_replay_at_recorded_speed(tmp_path: Path) -> None:
    cfg = IexSimConfig(symbols=["AAPL"], batch=10, session_id=5)
    path = tmp_path / "slow.pcap"
    # open and directory, 2 data segments, heartbeat, close: 100 ms apart, 0.4 s end to end.
    capture = build_capture(cfg, 20, start_ns=1_700_000_000_000_000_000, interval_ns=100_000_000)
    path.write_bytes(capture)
    adapter = make_adapter(pcap_path=str(path), replay_speed="recorded", all_symbols=True)
    await adapter.connect()
    started = time.monotonic()
    got: list[RawMarketData] = []
    with pytest.raises(ProviderDisconnected):
        async for batch in adapter.stream_batches():
            got.extend(batch)
    elapsed = time.monotonic() - started
    await adapter.disconnect()
    assert len(got) == 20
    assert elapsed > 0.38  # paced: the close comes 0.4 s after the open


@pytest.mark.parametrize(
    ("cc", "message"),
    [
        ({}, "port"),
        ({"port": 1, "replay_speed": "fast"}, "replay_speed"),
        ({"port": 1, "multicast_group": "10.0.0.1"}, "not a multicast"),
        ({"pcap_path": "/nonexistent/x.pcap"}, "pcap_path"),
    ],
)
async def test_bad_config(cc: dict[str, Any], message: str) -> None:
    adapter = make_adapter(**cc)
    with pytest.raises(ProviderConfigError, match=message):
        await adapter.connect()


async def test_multicast_on_loopback() -> None:
    port = free_udp_port()
    group = "239.255.42.99"
    adapter = make_adapter(
        port=port, multicast_group=group, interface="127.0.0.1", all_symbols=True,
        heartbeat_timeout_s=1.0,
    )  # fmt: skip
    try:
        await adapter.connect()
    except ProviderDisconnected as exc:
        pytest.skip(f"multicast join not possible here: {exc}")
    try:
        async with running(port=port, dest_host=group, multicast_interface="127.0.0.1"):
            records = await collect(adapter, 10)
    except ProviderDisconnected as exc:
        pytest.skip(f"no multicast route on loopback here: {exc}")
    finally:
        await adapter.disconnect()
    assert len(records) >= 10


async def test_a_unicast_port_is_ours_alone() -> None:
    """A second listener on the same unicast port (another fleet on the host) is refused
    instead of sharing the port and mixing the two feeds; a multicast group can be joined
    by both."""
    port = free_udp_port()
    first = make_adapter(host="127.0.0.1", port=port, heartbeat_timeout_s=5.0)
    second = make_adapter(host="127.0.0.1", port=port, heartbeat_timeout_s=5.0)
    await first.connect()
    try:
        with pytest.raises(ProviderDisconnected, match=f"cannot listen on UDP {port}"):
            await second.connect()
        assert second.connection_status is ConnectionStatus.ERROR
    finally:
        await first.disconnect()
    group = {"port": port, "multicast_group": "239.255.42.98", "interface": "127.0.0.1"}
    a, b = make_adapter(**group), make_adapter(**group)
    try:
        await a.connect()
        await b.connect()
    except ProviderDisconnected as exc:
        pytest.skip(f"multicast join not possible here: {exc}")
    finally:
        await a.disconnect()
        await b.disconnect()


def test_the_fleet_moves_the_iex_port_when_its_udp_side_is_taken() -> None:
    from workers.fleet import _port

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        assert _port(port, udp=True) != port  # TCP is free there, UDP is not
        assert _port(port) == port


def _feed_datagrams(count: int) -> list[bytes]:
    """The simulator's own session opening, then ``count`` data segments of 5 messages."""
    from simulators.iex import IexFeed

    feed = IexFeed(IexSimConfig(symbols=SYMBOLS, destination=("127.0.0.1", 9), batch=5))
    now = time.time_ns()
    out = list(feed.open_session(now))
    for _ in range(count):
        out += feed.data_segment(now)[0]
    return out


async def _sent_and_queued(adapter: IexAdapter, port: int, datagrams: list[bytes]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for d in datagrams:
            s.sendto(d, ("127.0.0.1", port))
    await until(lambda: adapter.queue_depth() == len(datagrams), 5, "every datagram queued")


async def test_a_reader_behind_takes_waiting_datagrams_in_one_batch() -> None:
    """A consumer that fell behind catches up: the datagrams already waiting are decoded
    into one batch (up to DATAGRAMS_PER_BATCH), not one batch each, so the per-batch costs
    downstream are paid once for many."""
    from workers.iex import DATAGRAMS_PER_BATCH

    port = free_udp_port()
    adapter = make_adapter(port=port, host="127.0.0.1", all_symbols=True)
    await adapter.connect()
    try:
        datagrams = _feed_datagrams(150)
        await _sent_and_queued(adapter, port, datagrams)
        sizes = []
        stream = adapter.stream_batches()
        async for batch in stream:
            sizes.append(len(batch))
            if adapter.queue_depth() == 0:
                break
        await stream.aclose()  # type: ignore[attr-defined]
        # 5 data messages per data segment; the opening's directory messages are no records
        assert sum(sizes) == 150 * 5
        assert len(sizes) <= -(-len(datagrams) // DATAGRAMS_PER_BATCH)
        assert max(sizes) > 5 * 30
    finally:
        await adapter.disconnect()


async def test_datagrams_queued_at_disconnect_are_taken_not_dropped() -> None:
    port = free_udp_port()
    adapter = make_adapter(port=port, host="127.0.0.1", all_symbols=True)
    await adapter.connect()
    datagrams = _feed_datagrams(40)
    await _sent_and_queued(adapter, port, datagrams)
    assert adapter.queue_depth() == len(datagrams)  # reported while waiting
    await adapter.disconnect()
    records = adapter.take_queued()
    assert len(records) == 40 * 5
    assert [r.provider_sequence for r in records] == sorted(r.provider_sequence for r in records)
    assert adapter.queue_depth() == 0 and adapter.take_queued() == []
