"""FixAdapter against the FIX simulator over real loopback TCP: data, faults, reconnect."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

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
from simulators.fix import FixSimConfig, FixSimulator
from simulators.market import Faults
from workers.fix import FixAdapter

SYMBOLS = ["AAPL", "MSFT", "NVDA"]
BOTH = Instrument("AAPL"), Instrument("MSFT")

SimFactory = Callable[..., Awaitable[FixSimulator]]


@pytest.fixture
async def start_sim() -> AsyncIterator[SimFactory]:
    sims: list[FixSimulator] = []

    async def start(faults: str = "", **kwargs: object) -> FixSimulator:
        sim = FixSimulator(FixSimConfig(SYMBOLS, faults=Faults.parse(faults), **kwargs))  # type: ignore[arg-type]
        await sim.start("127.0.0.1", 0)
        sims.append(sim)
        return sim

    yield start
    for sim in sims:
        await sim.stop()


def adapter_for(sim: FixSimulator, **extra: object) -> FixAdapter:
    cc: dict[str, object] = {
        "host": "127.0.0.1", "port": sim.port, "sender_comp_id": "FEEDFLEET",
        "target_comp_id": "FIXSIM", "heartbeat_interval": 1, "logon_timeout_s": 3,
    }  # fmt: skip
    cc.update(extra)
    return FixAdapter(ProviderConfig("p-fix", "fixsim", "fix", connection_config=cc))


async def collect(
    adapter: FixAdapter, until: Callable[[list[RawMarketData]], bool], timeout: float = 5.0
) -> list[RawMarketData]:
    records: list[RawMarketData] = []

    async def run() -> None:
        async for batch in adapter.stream_batches():
            records.extend(batch)
            if until(records):
                return

    await asyncio.wait_for(run(), timeout)
    return records


def have_both_kinds(symbols: set[str]) -> Callable[[list[RawMarketData]], bool]:
    def check(records: list[RawMarketData]) -> bool:
        seen = {(r.symbol, r.data_type) for r in records}
        return all((s, t) in seen for s in symbols for t in (DataType.QUOTE, DataType.TRADE))

    return check


async def test_happy_path_quotes_and_trades_with_session_sequence(start_sim: SimFactory) -> None:
    sim = await start_sim(rate=400)
    adapter = adapter_for(sim)
    await adapter.connect()
    assert adapter.connection_status is ConnectionStatus.CONNECTED
    await adapter.subscribe(list(BOTH))
    records = await collect(
        adapter, lambda rs: len(rs) >= 60 and have_both_kinds({"AAPL", "MSFT"})(rs)
    )
    assert {r.symbol for r in records} == {"AAPL", "MSFT"}
    [logon] = sim.logons
    assert logon.heartbeat_interval == 1 and logon.reset_seq_num
    assert [(q.subscription_type, q.market_depth, q.update_type, q.entry_types, q.symbols)
            for q in sim.requests] == [
        ("1", 1, "1", ["0", "1", "2"], ["AAPL"]), ("1", 1, "1", ["0", "1", "2"], ["MSFT"]),
    ]  # fmt: skip
    now = time.time_ns()
    for r in records:
        assert r.provider == "fixsim"
        assert abs(r.timestamp_ns - now) < 10 * 10**9 and r.receive_ns >= r.timestamp_ns - 10**6
        assert r.stream.startswith("FIXSIM->FEEDFLEET@")
        assert isinstance(r.provider_sequence, int)
        if r.data_type is DataType.QUOTE:
            assert r.bid is not None and r.ask is not None and 0 < r.bid < r.ask
            assert r.provider_specific["BidSize"] > 0
        else:
            assert r.price is not None and r.price > 0 and r.volume and r.volume > 0
    snapshots = [r for r in records if r.provider_specific["MsgType"] == "W"]
    assert {r.symbol for r in snapshots} == {"AAPL", "MSFT"}
    checker = QualityChecker(stale_after_s=None)
    checker.check(records)
    assert [r.quality_flags for r in records if r.quality_flags] == []
    assert adapter.decode_errors == 0
    await adapter.disconnect()
    assert adapter.connection_status is ConnectionStatus.DISCONNECTED


async def test_unsubscribe_stops_a_symbol(start_sim: SimFactory) -> None:
    sim = await start_sim(rate=400)
    adapter = adapter_for(sim)
    await adapter.connect()
    await adapter.subscribe(list(BOTH))
    await collect(adapter, have_both_kinds({"AAPL", "MSFT"}))
    await adapter.unsubscribe([Instrument("MSFT")])
    assert list(adapter.subscribed) == ["AAPL"]
    await collect(adapter, lambda rs: len(rs) >= 20)  # lets the request reach the simulator
    assert sim.requests[-1].subscription_type == "2" and sim.requests[-1].md_req_id == "MSFT:2"
    later = await collect(adapter, lambda rs: len(rs) >= 40)
    assert {r.symbol for r in later} == {"AAPL"}
    await adapter.disconnect()


async def test_refused_logon_is_auth_error(start_sim: SimFactory) -> None:
    sim = await start_sim("refuse_auth")
    adapter = adapter_for(sim)
    with pytest.raises(ProviderAuthError, match="invalid credentials"):
        await adapter.connect()
    assert adapter.connection_status is ConnectionStatus.ERROR


async def test_password_from_env_is_sent_and_checked(
    start_sim: SimFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = await start_sim(password="s3cret")
    monkeypatch.setenv("FIX_TEST_PASSWORD", "wrong")
    bad = adapter_for(sim, password_env="FIX_TEST_PASSWORD", username="ops")
    with pytest.raises(ProviderAuthError):
        await bad.connect()
    monkeypatch.setenv("FIX_TEST_PASSWORD", "s3cret")
    good = adapter_for(sim, password_env="FIX_TEST_PASSWORD", username="ops")
    await good.connect()
    assert [(e.username, e.password) for e in sim.logons] == [("ops", "wrong"), ("ops", "s3cret")]
    assert good.connection_status is ConnectionStatus.CONNECTED
    await good.disconnect()


async def test_missing_config_is_config_error() -> None:
    adapter = FixAdapter(ProviderConfig("p", "fix", "fix", connection_config={"host": "x"}))
    with pytest.raises(ProviderConfigError, match="port, sender_comp_id, target_comp_id"):
        await adapter.connect()


async def test_md_reject_with_insufficient_bandwidth_is_rate_limited(start_sim: SimFactory) -> None:
    sim = await start_sim("rate_limit")
    adapter = adapter_for(sim)
    await adapter.connect()
    await adapter.subscribe([Instrument("AAPL")])
    with pytest.raises(ProviderRateLimited, match="insufficient bandwidth"):
        await collect(adapter, lambda rs: False)
    assert adapter.connection_status is ConnectionStatus.RATE_LIMITED
    await adapter.disconnect()


async def test_unknown_symbol_reject_is_a_per_symbol_error(start_sim: SimFactory) -> None:
    sim = await start_sim(rate=300)
    adapter = adapter_for(sim)
    await adapter.connect()
    await adapter.subscribe([Instrument("NOPE"), Instrument("AAPL")])
    records = await collect(adapter, lambda rs: len(rs) >= 20 and bool(adapter.symbol_errors))
    assert adapter.symbol_errors == {"NOPE": "unknown symbol: unknown symbol NOPE"}
    assert {r.symbol for r in records} == {"AAPL"}
    assert adapter.connection_status is ConnectionStatus.CONNECTED
    await adapter.disconnect()


async def test_drop_is_disconnect_and_reconnect_restores_subscriptions(
    start_sim: SimFactory,
) -> None:
    sim = await start_sim("drop_after=30", rate=500)
    adapter = adapter_for(sim)
    await adapter.connect()
    await adapter.subscribe(list(BOTH))
    with pytest.raises(ProviderDisconnected, match="closed by the acceptor"):
        await collect(adapter, lambda rs: False)
    assert adapter.connection_status is ConnectionStatus.DISCONNECTED
    # What the worker does: disconnect, connect again; the adapter re-subscribes itself.
    await adapter.disconnect()
    await adapter.connect()
    records = await collect(adapter, lambda rs: {r.symbol for r in rs} == {"AAPL", "MSFT"})
    assert [q.symbols for q in sim.requests] == [["AAPL"], ["MSFT"], ["AAPL"], ["MSFT"]]
    assert len(sim.logons) == 2
    assert records[0].provider_specific["MsgType"] == "W"
    await adapter.disconnect()


async def test_silent_peer_gets_test_request_then_disconnect(start_sim: SimFactory) -> None:
    sim = await start_sim("silent_after=10", rate=200)
    adapter = adapter_for(sim)  # HeartBtInt 1 s: TestRequest at 1.2 s, give up at 2.4 s
    await adapter.connect()
    await adapter.subscribe([Instrument("AAPL")])
    started = time.monotonic()
    with pytest.raises(ProviderDisconnected, match="TestRequest"):
        await collect(adapter, lambda rs: False, timeout=8.0)
    assert time.monotonic() - started < 4.0
    assert sim.test_requests_seen >= 1
    assert adapter.connection_status is ConnectionStatus.DISCONNECTED
    await adapter.disconnect()


async def test_malformed_frames_count_and_the_stream_continues(start_sim: SimFactory) -> None:
    sim = await start_sim("malformed_every=5", rate=500)
    adapter = adapter_for(sim)
    await adapter.connect()
    await adapter.subscribe([Instrument("AAPL")])
    records = await collect(adapter, lambda rs: len(rs) >= 40)
    assert adapter.decode_errors >= 5
    # A garbled frame uses no MsgSeqNum, so the sequence has no holes.
    QualityChecker(stale_after_s=None).check(records)
    assert all(r.quality_flags == [] for r in records)
    await adapter.disconnect()


async def test_skipped_seq_is_resent_request_and_quality_gap(start_sim: SimFactory) -> None:
    sim = await start_sim("skip_seq_every=10", rate=500)
    adapter = adapter_for(sim)
    await adapter.connect()
    await adapter.subscribe([Instrument("AAPL")])
    records = await collect(adapter, lambda rs: len(rs) >= 45)
    assert adapter.sequence_gaps >= 3 and sim.resend_requests_seen >= 3
    checker = QualityChecker(stale_after_s=None)
    checker.check(records)
    gaps = [r for r in records if QualityFlag.GAP in r.quality_flags]
    assert len(gaps) >= 3
    assert checker.flag_counts["duplicate"] == 0 and checker.flag_counts["out_of_order"] == 0
    # The gap-filled number is the one the simulator skipped: seq jumps by exactly 2.
    seqs = [r.provider_sequence or 0 for r in records if r.stream == records[0].stream]
    jumps = [b - a for a, b in itertools.pairwise(seqs) if b - a != 1]
    assert set(jumps) == {2}
    assert adapter.connection_status is ConnectionStatus.CONNECTED
    await adapter.disconnect()


async def test_connect_to_closed_port_is_disconnected() -> None:
    adapter = FixAdapter(ProviderConfig("p", "fix", "fix", connection_config={
        "host": "127.0.0.1", "port": 1, "sender_comp_id": "A", "target_comp_id": "B",
    }))  # fmt: skip
    with pytest.raises(ProviderDisconnected, match="cannot connect"):
        await adapter.connect()
    assert adapter.connection_status is ConnectionStatus.DISCONNECTED
