"""``feedfleet record`` and ``feedfleet replay`` against real simulators and the real sinks:
a replay gives exactly the records the adapter produced live, stores each event once however
often it runs, and a recording cut off by a kill replays what is whole and says so."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from common import db
from common.model import DataType, RawMarketData
from common.provider import Instrument, ProviderConfig
from common.recording import FrameKind, RecordingError, RecordingReader
from common.redis_keys import latest_key
from simulators.alphavantage import AlphaVantageSimConfig, AlphaVantageSimulator
from simulators.bloomberg import BloombergSimConfig, BloombergSimulator
from simulators.fix import FixSimConfig, FixSimulator
from simulators.iex import IexSimConfig, IexSimulator
from simulators.polygon import PolygonSimConfig, PolygonSimulator
from simulators.refinitiv import RefinitivSimConfig, RefinitivSimulator
from tests.conftest import Services
from tests.pulsar_collector import PulsarCollector
from tests.test_iex_adapter import free_udp_port
from workers.record import record
from workers.replay import replay

KEY_ENV = "FEEDFLEET_TEST_RECORD_POLYGON_KEY"
AV_KEY_ENV = "FEEDFLEET_TEST_RECORD_AV_KEY"
SECRET = "polygon-secret-value"
BOTH = frozenset({DataType.TRADE, DataType.QUOTE})


def key(records: list[RawMarketData]) -> list[tuple[Any, ...]]:
    return [
        (r.symbol, r.data_type, r.price, r.bid, r.ask, r.provider_sequence, r.stream,
         r.timestamp_ns, r.receive_ns)
        for r in records
    ]  # fmt: skip


def polygon_row(port: int, name: str = "polygon-rec") -> ProviderConfig:
    os.environ[KEY_ENV] = SECRET
    return ProviderConfig(
        id=str(uuid.uuid4()), name=name, provider_type="polygon",
        connection_config={"url": f"ws://127.0.0.1:{port}/stocks", "api_key_env": KEY_ENV,
                           "password": "kept-out-of-the-file"},
    )  # fmt: skip


@pytest.fixture
async def polygon() -> AsyncIterator[int]:
    sim = PolygonSimulator(PolygonSimConfig(symbols=["AAA", "BBB", "CCC"], rate=2000, batch=5))
    port = await sim.start()
    try:
        yield port
    finally:
        await sim.stop()


async def record_polygon(port: int, out: Path, frames: int = 20) -> list[RawMarketData]:
    live: list[RawMarketData] = []
    wanted = [Instrument("AAA", BOTH), Instrument("BBB", frozenset({DataType.TRADE}))]
    summary = await record(
        polygon_row(port), wanted, out, max_frames=frames, seconds=20, on_records=live.extend
    )
    assert not summary.failed, summary.ended
    assert summary.frames >= frames
    return live


async def test_polygon_replay_dry_run_gives_the_records_the_adapter_produced(
    polygon: int, tmp_path: Path
) -> None:
    out = tmp_path / "polygon.rec"
    live = await record_polygon(polygon, out)
    assert live and {r.symbol for r in live} == {"AAA", "BBB"}
    assert {(r.symbol, r.data_type) for r in live} >= {("AAA", DataType.QUOTE),
                                                       ("BBB", DataType.TRADE)}  # fmt: skip

    replayed: list[RawMarketData] = []
    summary = await replay(out, settings=None, speed="max", on_records=replayed.extend)

    assert key(replayed) == key(live)
    assert summary.records == len(live) and summary.decode_errors == 0
    assert summary.torn is None and summary.bad_lines == []
    # The file: a versioned header without secrets, then the frames as read.
    text = out.read_text()
    header = orjson.loads(text.split("\n", 1)[0])
    assert header["format"] == "feedfleet-recording" and header["version"] == 1
    assert header["provider_type"] == "polygon" and header["provider"] == "polygon-rec"
    assert header["connection_config"]["api_key_env"] == KEY_ENV
    assert "password" not in header["connection_config"] and SECRET not in text
    assert [i["symbol"] for i in header["instruments"]] == ["AAA", "BBB"]
    reader = RecordingReader(out)
    frames = list(reader.frames())
    reader.close()
    assert len(frames) == summary.frames
    assert {f.kind for f in frames} == {FrameKind.WEBSOCKET}
    assert all(isinstance(f.data, str) for f in frames)


async def test_iex_replay_dry_run_gives_the_records_the_adapter_produced(tmp_path: Path) -> None:
    port = free_udp_port()
    config = IexSimConfig(symbols=["AAPL", "MSFT", "IBM"], destination=("127.0.0.1", port),
                          rate=2000.0, batch=5, heartbeat_s=0.1)  # fmt: skip
    sim = IexSimulator(config)
    await sim.start("127.0.0.1", 0)
    row = ProviderConfig(id="p-iex", name="iex-rec", provider_type="iex",
                         connection_config={"host": "127.0.0.1", "port": port})  # fmt: skip
    live: list[RawMarketData] = []
    out = tmp_path / "iex.rec"
    try:
        summary = await record(
            row, [Instrument("AAPL", BOTH), Instrument("MSFT", frozenset({DataType.QUOTE}))],
            out, max_frames=40, seconds=20, on_records=live.extend,
        )  # fmt: skip
    finally:
        await sim.stop()
    assert not summary.failed, summary.ended
    # The adapter's own filter applied live: IBM never, MSFT quotes only.
    assert {(r.symbol, r.data_type) for r in live} == {
        ("AAPL", DataType.QUOTE), ("AAPL", DataType.TRADE), ("MSFT", DataType.QUOTE)
    }  # fmt: skip

    replayed: list[RawMarketData] = []
    result = await replay(out, settings=None, speed="max", on_records=replayed.extend)

    assert key(replayed) == key(live)
    assert result.frames == summary.frames and result.decode_errors == 0
    reader = RecordingReader(out)
    assert {f.kind for f in reader.frames()} == {FrameKind.UDP}
    reader.close()


async def test_replay_stores_each_event_once_however_often_it_runs(
    polygon: int, tmp_path: Path, services: Services, conn: db.Conn,
    redis_client: aioredis.Redis,
) -> None:  # fmt: skip
    out = tmp_path / "polygon.rec.gz"
    live = await record_polygon(polygon, out, frames=30)
    settings = services.settings()
    name = f"replay-{uuid.uuid4().hex[:8]}"
    collector = PulsarCollector(services.pulsar_url, settings.pulsar_topic)
    try:
        first = await replay(out, settings=settings, speed="max", provider_name=name)
        assert first.acknowledged and first.records == len(live)
        assert first.published == first.stored == len(live) and first.already_stored == 0
        assert await collector.wait_for(len(live), 20) == len(live)
        cur = await conn.execute(
            "SELECT event_id::text, symbol, price, provider_sequence FROM raw_market_data "
            "WHERE provider = %s", (name,),
        )  # fmt: skip
        rows = await cur.fetchall()
        assert len(rows) == len(live)
        assert {r[0] for r in rows} == set(collector.events)
        by_id = {e: doc.doc for e, doc in collector.events.items()}
        assert sorted((r[1], r[3]) for r in rows) == sorted(
            (r.symbol, r.provider_sequence) for r in live
        )
        assert all(by_id[r[0]]["provider"] == name for r in rows)
        latest = await redis_client.get(latest_key("AAA"))
        assert latest is not None and orjson.loads(latest)["event_id"] in by_id

        second = await replay(out, settings=settings, speed="max", provider_name=name)
        assert second.acknowledged and second.stored == len(live)
        assert second.already_stored == len(live)
        cur = await conn.execute(
            "SELECT count(*) FROM raw_market_data WHERE provider = %s", (name,)
        )
        assert (await cur.fetchone()) == (len(live),)
        # Published again with the same ids: a consumer keyed on event_id sees nothing new.
        deadline = asyncio.get_running_loop().time() + 20
        while collector.deliveries < 2 * len(live) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
        assert collector.deliveries == 2 * len(live)
        assert set(collector.events) == {r[0] for r in rows}
    finally:
        collector.close()


async def test_a_torn_recording_replays_what_is_whole_and_says_so(
    polygon: int, tmp_path: Path
) -> None:
    out = tmp_path / "polygon.rec"
    live = await record_polygon(polygon, out)
    whole = out.read_bytes()
    # A kill -9 in the middle of the last line's write.
    out.write_bytes(whole[: whole.rstrip(b"\n").rfind(b"\n") + 40])
    replayed: list[RawMarketData] = []
    summary = await replay(out, settings=None, speed="max", on_records=replayed.extend)
    lines = whole.count(b"\n")
    assert summary.frames == lines - 2  # less the header and the torn last frame
    assert summary.torn is not None and f"line {lines} is incomplete" in summary.torn
    assert replayed and key(replayed) == key(live)[: len(replayed)]
    assert len(replayed) < len(live)
    assert any("torn record" in line for line in summary.lines(dry_run=True))

    # gzip: a compressed recording cut short (its writer killed) replays up to the cut.
    gz = tmp_path / "polygon.rec.gz"
    live_gz = await record_polygon(polygon, gz, frames=60)
    data = gz.read_bytes()
    gz.write_bytes(data[: len(data) * 2 // 3])
    replayed = []
    summary = await replay(gz, settings=None, speed="max", on_records=replayed.extend)
    assert summary.torn is not None
    assert 0 < len(replayed) < len(live_gz)
    assert key(replayed) == key(live_gz)[: len(replayed)]


async def test_a_file_that_is_not_a_recording_is_refused_with_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "not.rec"
    path.write_text('{"ev": "T"}\n')
    with pytest.raises(RecordingError, match="not a feedfleet recording"):
        await replay(path, settings=None)
    path.write_text('{"format": "feedfleet-recording", "version": 9}\n')
    with pytest.raises(RecordingError, match="version 9 is newer"):
        await replay(path, settings=None)


async def _feedfleet(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "workers.cli", *args, env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_the_commands_record_a_provider_row_and_print_its_replay(
    polygon: int, tmp_path: Path, services: Services, conn: db.Conn
) -> None:
    name = f"rec-{uuid.uuid4().hex[:8]}"
    os.environ[KEY_ENV] = SECRET
    provider_id = await db.upsert_provider(
        conn, name, "polygon", {"url": f"ws://127.0.0.1:{polygon}/stocks", "api_key_env": KEY_ENV}
    )
    await db.subscribe(conn, provider_id, ["CCC"], [DataType.TRADE])
    out = tmp_path / "cli.rec"
    env = {"FEEDFLEET_DATABASE_URL": services.database_url}
    code, _, err = await _feedfleet("record", name, "--out", str(out), "--frames", "10",
                                    "--seconds", "30", env=env)  # fmt: skip
    assert code == 0, err
    assert "recorded" in err and "ended by" in err
    code, _, err = await _feedfleet("record", name, "--out", str(out), env=env)
    assert code == 2 and "exists" in err

    code, stdout, err = await _feedfleet("replay", str(out), "--dry-run", "--speed", "max",
                                         env={})  # fmt: skip
    assert code == 0, err
    printed = [orjson.loads(line) for line in stdout.splitlines()]
    assert printed and {p["symbol"] for p in printed} == {"CCC"}
    assert {p["data_type"] for p in printed} == {"TRADE"}
    assert all(p["provider"] == name and "quality_flags" in p for p in printed)
    assert f"{len(printed)} records, 0 decode errors" in err

    code, _, err = await _feedfleet("replay", str(tmp_path / "missing.rec"), "--dry-run", env={})
    assert code == 2 and "cannot read" in err

    sinks = {**env, "FEEDFLEET_REDIS_URL": services.redis_url,
             "FEEDFLEET_PULSAR_URL": services.pulsar_url,
             "FEEDFLEET_PULSAR_TOPIC": services.settings().pulsar_topic}  # fmt: skip
    for already in (0, len(printed)):
        code, _, err = await _feedfleet("replay", str(out), "--speed", "max",
                                        "--provider", f"{name}-again", env=sinks)  # fmt: skip
        assert code == 0, err
        assert f"stored {len(printed)} ({already} already stored)" in err
    cur = await conn.execute(
        "SELECT count(*) FROM raw_market_data WHERE provider = %s", (f"{name}-again",)
    )
    assert (await cur.fetchone()) == (len(printed),)


async def _provider_sim(provider_type: str) -> tuple[Any, dict[str, Any], list[str]]:
    """A running simulator of ``provider_type``, the connection_config reaching it, and the
    symbols to subscribe."""
    if provider_type == "refinitiv":
        ref = RefinitivSimulator(RefinitivSimConfig(["TRI.N", "IBM.N"], rate=2000.0))
        port = await ref.start("127.0.0.1", 0)
        return ref, {"url": f"ws://127.0.0.1:{port}/WebSocket", "user": "feedfleet"}, [
            "TRI.N", "IBM.N"
        ]  # fmt: skip
    if provider_type == "fix":
        fix = FixSimulator(FixSimConfig(["AAPL", "MSFT"]))
        await fix.start("127.0.0.1", 0)
        cc = {"host": "127.0.0.1", "port": fix.port, "sender_comp_id": "RECORDER",
              "target_comp_id": "FIXSIM", "heartbeat_interval": 1}  # fmt: skip
        return fix, cc, ["AAPL", "MSFT"]
    if provider_type == "alphavantage":
        os.environ[AV_KEY_ENV] = "av-key"
        av = AlphaVantageSimulator(AlphaVantageSimConfig(
            symbols=["AAPL", "MSFT"], bar_seconds=0.05, session_start=datetime(2024, 3, 1, 9, 30),
            history_bars=5,
        ))  # fmt: skip
        await av.start("127.0.0.1", 0)
        cc = {"base_url": f"http://127.0.0.1:{av.port}", "api_key_env": AV_KEY_ENV,
              "poll_interval_s": 0.05}  # fmt: skip
        return av, cc, ["AAPL", "MSFT"]
    bbg = BloombergSimulator(BloombergSimConfig(symbols=["AAPL", "MSFT"], rate=3000.0, batch=5))
    port = await bbg.start("127.0.0.1", 0)
    cc = {"blpapi_module": "simulators.bloomberg", "host": "127.0.0.1", "port": port,
          "topic_suffix": " US Equity"}  # fmt: skip
    return bbg, cc, ["AAPL", "MSFT"]


@pytest.mark.parametrize("provider_type", ["refinitiv", "fix", "alphavantage", "bloomberg"])
async def test_every_provider_replays_to_the_records_its_adapter_produced(
    provider_type: str, tmp_path: Path
) -> None:
    sim, cc, symbols = await _provider_sim(provider_type)
    row = ProviderConfig(id="p-rec", name=f"{provider_type}-rec", provider_type=provider_type,
                         connection_config=cc)  # fmt: skip
    wanted = [Instrument(s, frozenset(DataType)) for s in symbols]
    live: list[RawMarketData] = []
    out = tmp_path / f"{provider_type}.rec"
    try:
        summary = await record(row, wanted, out, max_frames=30, seconds=20, on_records=live.extend)
    finally:
        await sim.stop()
    assert not summary.failed, summary.ended
    assert live, summary

    replayed: list[RawMarketData] = []
    result = await replay(out, settings=None, speed="max", on_records=replayed.extend)

    assert key(replayed) == key(live)
    assert result.decode_errors == 0 and result.frames == summary.frames
