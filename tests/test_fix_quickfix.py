"""FixAdapter against a real FIX engine: QuickFIX (``quickfix-ssl`` wheel) as the acceptor.

QuickFIX validates everything we send against its FIX44.xml data dictionary (required tags,
group structure, field order in groups, SendingTime accuracy, sequence numbers) and is the
one that frames what we receive, so this checks the codec against an independent
implementation on both directions.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from common.model import ConnectionStatus, DataType, RawMarketData
from common.provider import Instrument, ProviderConfig
from common.quality import QualityChecker
from tests.running import until
from workers.fix import FixAdapter

fix: Any = pytest.importorskip(
    "quickfix", reason="quickfix is not installed (pip install quickfix-ssl)"
)
fix44: Any = pytest.importorskip("quickfix44", reason="quickfix44 comes with quickfix-ssl")

DICTIONARY = Path(sys.prefix) / "share" / "quickfix" / "FIX44.xml"
ACCEPTOR = "QFSERVER"
CLIENT = "FEEDFLEET"
PASSWORD = "qf-pass"


@dataclass
class SeenRequest:
    md_req_id: str
    subscription_type: str
    depth: int
    entry_types: list[str]
    symbols: list[str]


class MarketDataApp(fix.Application):
    """Answers each 35=V with a 35=W and five 35=X updates per symbol.

    QuickFIX calls these from its own thread. ``skip_before_update`` makes QuickFIX skip an
    outgoing MsgSeqNum before that update, so the adapter has a real gap to recover from.
    (Refusing a Logon by raising ``quickfix.RejectLogon`` aborts the process with the
    quickfix-ssl 1.15.1.post4 wheel, so the auth refusal is tested against the simulator.)
    """

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[SeenRequest] = []
        self.passwords: list[str] = []
        self.rejects: list[str] = []
        self.resend_requests: list[tuple[str, str]] = []
        self.skip_before_update: int | None = None
        # Announce this many entries in each snapshot (it carries three): a message that
        # fails validation.
        self.snapshot_count: int | None = None
        self.sent_market_data: list[int] = []  # MsgSeqNums, first sends (not resends)
        self.heartbeats_sent = 0
        self.heartbeats_received = 0
        self.lock = threading.Lock()

    def onCreate(self, sessionID: Any) -> None:  # QuickFIX's callback names
        pass

    def onLogon(self, sessionID: Any) -> None:
        pass

    def onLogout(self, sessionID: Any) -> None:
        pass

    def toAdmin(self, message: Any, sessionID: Any) -> None:
        if message.getHeader().getField(35) == "0":
            with self.lock:
                self.heartbeats_sent += 1

    def fromAdmin(self, message: Any, sessionID: Any) -> None:
        msg_type = message.getHeader().getField(35)
        with self.lock:
            if msg_type == "A":
                self.passwords.append(message.getField(554) if message.isSetField(554) else "")
            elif msg_type == "2":
                self.resend_requests.append((message.getField(7), message.getField(16)))
            elif msg_type == "3":
                self.rejects.append(message.toString().replace("\x01", "|"))
            elif msg_type == "0":
                self.heartbeats_received += 1

    def toApp(self, message: Any, sessionID: Any) -> None:
        header = message.getHeader()
        if header.getField(35) in ("W", "X") and not header.isSetField(43):
            with self.lock:
                self.sent_market_data.append(int(header.getField(34)))

    def fromApp(self, message: Any, sessionID: Any) -> None:
        if message.getHeader().getField(35) != "V":
            return
        entry_group = fix44.MarketDataRequest.NoMDEntryTypes()
        entry_types = []
        for i in range(1, int(message.getField(267)) + 1):
            message.getGroup(i, entry_group)
            entry_types.append(entry_group.getField(269))
        sym_group = fix44.MarketDataRequest.NoRelatedSym()
        symbols = []
        for i in range(1, int(message.getField(146)) + 1):
            message.getGroup(i, sym_group)
            symbols.append(sym_group.getField(55))
        req = SeenRequest(message.getField(262), message.getField(263),
                          int(message.getField(264)), entry_types, symbols)  # fmt: skip
        with self.lock:
            self.requests.append(req)
        if req.subscription_type != "1":
            return
        session = fix.Session.lookupSession(sessionID)
        for sym in symbols:
            refresh = snapshot(req.md_req_id, sym)
            if self.snapshot_count is not None:
                refresh.setField(fix.NoMDEntries(self.snapshot_count))
            fix.Session.sendToTarget(refresh, sessionID)
            for i in range(5):
                if i == self.skip_before_update:
                    session.setNextSenderMsgSeqNum(session.getExpectedSenderNum() + 1)
                fix.Session.sendToTarget(incremental(req.md_req_id, sym, i), sessionID)


def snapshot(md_req_id: str, symbol: str) -> Any:
    msg = fix44.MarketDataSnapshotFullRefresh()
    msg.setField(fix.MDReqID(md_req_id))
    msg.setField(fix.Symbol(symbol))
    for entry_type, px, size in (("0", 99.5, 300), ("1", 99.7, 200), ("2", 99.6, 50)):
        group = fix44.MarketDataSnapshotFullRefresh.NoMDEntries()
        group.setField(fix.MDEntryType(entry_type))
        group.setField(fix.MDEntryPx(px))
        group.setField(fix.MDEntrySize(size))
        msg.addGroup(group)
    return msg


def incremental(md_req_id: str, symbol: str, i: int) -> Any:
    msg = fix44.MarketDataIncrementalRefresh()
    msg.setField(fix.MDReqID(md_req_id))
    group = fix44.MarketDataIncrementalRefresh.NoMDEntries()
    group.setField(fix.MDUpdateAction("1" if i % 2 == 0 else "0"))
    group.setField(fix.MDEntryType("0" if i % 2 == 0 else "2"))
    group.setField(fix.Symbol(symbol))
    group.setField(fix.MDEntryPx(99.5 + i / 100 if i % 2 == 0 else 99.61 + i / 100))
    group.setField(fix.MDEntrySize(100 + i))
    msg.addGroup(group)
    return msg


@dataclass
class RunningAcceptor:
    port: int
    app: MarketDataApp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def running_acceptor(tmp_path: Path, *, persistent: bool) -> AsyncIterator[RunningAcceptor]:
    """``persistent``: a venue's session, as QuickFIX runs one with a FileStore: numbers and
    sent messages kept across the client's reconnects (no reset on logon, logout or
    disconnect). Otherwise every Logon starts afresh, in memory."""
    if not DICTIONARY.is_file():
        pytest.skip(f"quickfix data dictionary {DICTIONARY} is absent")
    port = free_port()
    cfg = tmp_path / "acceptor.cfg"
    reset = "N" if persistent else "Y"
    cfg.write_text(
        "[DEFAULT]\n"
        "ConnectionType=acceptor\n"
        f"SocketAcceptPort={port}\n"
        "SocketAcceptHost=127.0.0.1\n"
        f"FileStorePath={tmp_path / 'store'}\n"
        "StartTime=00:00:00\nEndTime=00:00:00\n"
        f"ResetOnLogon={reset}\nResetOnLogout={reset}\nResetOnDisconnect={reset}\n"
        "UseDataDictionary=Y\n"
        f"DataDictionary={DICTIONARY}\n"
        "ValidateUserDefinedFields=Y\n"
        "[SESSION]\n"
        "BeginString=FIX.4.4\n"
        f"SenderCompID={ACCEPTOR}\n"
        f"TargetCompID={CLIENT}\n"
    )
    app = MarketDataApp()
    settings = fix.SessionSettings(str(cfg))
    store = fix.FileStoreFactory(settings) if persistent else fix.MemoryStoreFactory()
    engine = fix.SocketAcceptor(app, store, settings, fix.ScreenLogFactory(False, False, False))
    engine.start()
    try:
        yield RunningAcceptor(port, app)
    finally:
        # QuickFIX's stop waits for logouts; keep it off the event loop.
        await asyncio.to_thread(engine.stop, True)


@pytest.fixture
async def acceptor(tmp_path: Path) -> AsyncIterator[RunningAcceptor]:
    async with running_acceptor(tmp_path, persistent=False) as running:
        yield running


@pytest.fixture
async def persistent_acceptor(tmp_path: Path) -> AsyncIterator[RunningAcceptor]:
    async with running_acceptor(tmp_path, persistent=True) as running:
        yield running


def adapter_for(port: int, monkeypatch: pytest.MonkeyPatch, **extra: object) -> FixAdapter:
    monkeypatch.setenv("FEEDFLEET_QF_PASSWORD", PASSWORD)
    return FixAdapter(ProviderConfig("p-qf", "quickfix", "fix", connection_config={
        "host": "127.0.0.1", "port": port, "sender_comp_id": CLIENT,
        "target_comp_id": ACCEPTOR, "heartbeat_interval": 1,
        "password_env": "FEEDFLEET_QF_PASSWORD", "logon_timeout_s": 5, **extra,
    }))  # fmt: skip


async def collect(adapter: FixAdapter, count: int, timeout: float = 20.0) -> list[RawMarketData]:
    records: list[RawMarketData] = []

    async def run() -> None:
        async for batch in adapter.stream_batches():
            records.extend(batch)
            if len(records) >= count:
                return

    await asyncio.wait_for(run(), timeout)
    return records


@contextlib.asynccontextmanager
async def reading(
    adapter: FixAdapter,
) -> AsyncIterator[tuple[list[RawMarketData], asyncio.Task[None]]]:
    """The adapter's stream read in the background, as the worker does (so the session
    answers heartbeats), into a list; stopped on the way out."""
    records: list[RawMarketData] = []

    async def run() -> None:
        async for batch in adapter.stream_batches():
            records.extend(batch)

    task = asyncio.create_task(run())
    try:
        yield records, task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_quickfix_acceptor_serves_snapshot_and_updates(
    acceptor: RunningAcceptor, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = time.time_ns()
    adapter = adapter_for(acceptor.port, monkeypatch)
    await adapter.connect()
    assert adapter.connection_status is ConnectionStatus.CONNECTED
    assert acceptor.app.passwords == [PASSWORD]
    await adapter.subscribe([Instrument("AAPL"), Instrument("MSFT")])
    # Per symbol: W gives a QUOTE and a TRADE, then 5 X messages (3 quotes, 2 trades).
    records = await collect(adapter, 14)
    assert acceptor.app.rejects == []
    assert adapter.decode_errors == 0 and adapter.session_rejects == 0
    assert [(r.md_req_id, r.subscription_type, r.depth, r.entry_types, r.symbols)
            for r in acceptor.app.requests] == [
        ("AAPL:1", "1", 1, ["0", "1", "2"], ["AAPL"]),
        ("MSFT:2", "1", 1, ["0", "1", "2"], ["MSFT"]),
    ]  # fmt: skip
    aapl = [r for r in records if r.symbol == "AAPL"]
    assert [(r.data_type, r.bid, r.ask, r.price, r.volume) for r in aapl] == [
        (DataType.QUOTE, 99.5, 99.7, None, None),
        (DataType.TRADE, None, None, 99.6, 50.0),
        (DataType.QUOTE, 99.5, 99.7, None, None),
        (DataType.TRADE, None, None, 99.62, 101.0),
        (DataType.QUOTE, 99.52, 99.7, None, None),
        (DataType.TRADE, None, None, 99.64, 103.0),
        (DataType.QUOTE, 99.54, 99.7, None, None),
    ]
    assert all(r.stream.startswith(f"{ACCEPTOR}->{CLIENT}@") for r in records)
    now = time.time_ns()
    # From SendingTime, in whole milliseconds.
    assert all(before - 10**6 <= r.timestamp_ns <= r.receive_ns <= now for r in records)
    QualityChecker(stale_after_s=None).check(records)
    assert [r.quality_flags for r in records if r.quality_flags] == []

    # Unsubscribe is a 263=2 QuickFIX accepts (no session Reject), and heartbeats go both
    # ways at HeartBtInt 1 without either side timing out.
    await adapter.unsubscribe([Instrument("MSFT")])
    app = acceptor.app
    with app.lock:
        ours, theirs = app.heartbeats_received, app.heartbeats_sent
    async with reading(adapter) as (later, task):
        # Three of ours a second apart outlast the 2.4 s either side allows a silent peer.
        await until(
            lambda: (
                (app.heartbeats_received >= ours + 3 and app.heartbeats_sent >= theirs + 3)
                or task.done()
            ),
            20,
            "three heartbeats each way",
        )
        assert not task.done(), f"the stream ended: {task.exception()!r}"
    assert later == []
    assert acceptor.app.requests[-1].subscription_type == "2"
    assert acceptor.app.requests[-1].md_req_id == "MSFT:2"
    assert acceptor.app.rejects == [] and adapter.session_rejects == 0
    assert adapter.connection_status is ConnectionStatus.CONNECTED
    await adapter.disconnect()


async def test_a_snapshot_failing_validation_gets_a_reject_quickfix_accepts(
    acceptor: RunningAcceptor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QuickFIX sends a 35=W announcing four entries and carrying three: we answer with a
    session-level Reject (35=3, SessionRejectReason 16) that QuickFIX's dictionary accepts
    (it reaches fromAdmin), keep the three entries, and the session goes on."""
    app = acceptor.app
    app.snapshot_count = 4
    adapter = adapter_for(acceptor.port, monkeypatch)
    await adapter.connect()
    await adapter.subscribe([Instrument("AAPL")])
    records = await collect(adapter, 7)
    await until(lambda: len(app.rejects) == 1, 10, "QuickFIX to receive the Reject")
    assert adapter.decode_errors == 1
    snapshot_seq = min(app.sent_market_data)  # the W comes first
    reject = dict(f.split("=", 1) for f in app.rejects[0].strip("|").split("|"))
    assert (reject["35"], reject["45"], reject["371"], reject["372"], reject["373"]) == (
        "3", str(snapshot_seq), "268", "W", "16",
    )  # fmt: skip
    assert reject["58"] == "NoMDEntries is 4 but 3 entries follow"
    # The snapshot's quote and trade, then the five updates.
    assert [r.data_type for r in records[:2]] == [DataType.QUOTE, DataType.TRADE]
    assert records[0].provider_sequence == snapshot_seq
    assert adapter.session_rejects == 0  # QuickFIX found nothing wrong with our Reject
    assert adapter.connection_status is ConnectionStatus.CONNECTED
    await adapter.disconnect()


async def test_quickfix_fills_a_sequence_gap_after_our_resend_request(
    acceptor: RunningAcceptor, monkeypatch: pytest.MonkeyPatch
) -> None:
    acceptor.app.skip_before_update = 2
    adapter = adapter_for(acceptor.port, monkeypatch)
    await adapter.connect()
    await adapter.subscribe([Instrument("AAPL")])
    records = await collect(adapter, 7)
    # We asked from the missing number on (7=5|16=0). QuickFIX answers with one
    # SequenceReset-GapFill 34=5|36=9 over the application messages too; the session still
    # delivers 6-8, which it had received and queued behind the hole.
    assert acceptor.app.resend_requests == [("5", "0")]
    assert adapter.sequence_gaps == 1 and adapter.decode_errors == 0
    assert [r.provider_sequence for r in records] == [2, 2, 3, 4, 6, 7, 8]
    assert [r.price or r.bid for r in records] == [99.5, 99.6, 99.5, 99.62, 99.52, 99.64, 99.54]
    checker = QualityChecker(stale_after_s=None)
    checker.check(records)
    assert [r.quality_flags for r in records] == [[], [], [], [], ["gap"], [], []]
    # The answer to our ResendRequest came before 6-8 were let through; whatever else it
    # held comes before the next message QuickFIX sends (a heartbeat): nothing new.
    session = adapter._session
    assert session is not None
    answered = session.next_in_seq
    async with reading(adapter) as (more, task):
        await until(lambda: session.next_in_seq > answered or task.done(), 20,
                    "the next message from QuickFIX")  # fmt: skip
        assert not task.done(), f"the stream ended: {task.exception()!r}"
    assert more == []
    assert acceptor.app.rejects == [] and adapter.connection_status is ConnectionStatus.CONNECTED
    await adapter.disconnect()


async def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout)


async def test_quickfix_resends_from_its_file_store_what_it_sent_while_we_were_down(
    persistent_acceptor: RunningAcceptor, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """QuickFIX sends application messages while the session is not logged on into its
    store only (``Session::sendRaw``), and answers a ResendRequest from a FileStore with
    them (PossDupFlag, OrigSendingTime), admin runs gap-filled. So a killed adapter's
    successor, logging on from the session store, gets every update back."""
    app = persistent_acceptor.app
    store_dir = str(tmp_path / "fix-store")
    first = adapter_for(persistent_acceptor.port, monkeypatch, session_store_dir=store_dir)
    await first.connect()
    await first.subscribe([Instrument("AAPL")])
    before = await collect(first, 7)  # the 35=W (quote and trade) and five 35=X
    assert first._writer is not None
    first._writer.transport.abort()  # a kill: no Logout, nothing else runs
    del first
    session_id = fix.SessionID("FIX.4.4", ACCEPTOR, CLIENT)
    venue = fix.Session.lookupSession(session_id)
    await wait_until(lambda: not venue.isLoggedOn())
    for i in range(10):
        assert fix.Session.sendToTarget(incremental("AAPL:1", "AAPL", i), session_id)
    with app.lock:
        sent = list(app.sent_market_data)
    assert len(sent) == 16

    second = adapter_for(persistent_acceptor.port, monkeypatch, session_store_dir=store_dir)
    await second.connect()
    after: list[RawMarketData] = []

    async def until_caught_up() -> None:
        async for batch in second.stream_batches():
            after.extend(batch)
            if any(r.provider_sequence == sent[-1] for r in after):
                return

    await asyncio.wait_for(until_caught_up(), 30)
    await second.disconnect()
    assert app.rejects == [] and second.decode_errors == 0 and second.session_rejects == 0
    assert app.passwords == [PASSWORD, PASSWORD]
    assert len(app.resend_requests) == 1 and app.resend_requests[0][1] == "0"
    recovered = [r for r in after if r.provider_sequence in sent[-10:]]
    assert [r.provider_sequence for r in recovered] == sent[-10:]
    assert all(r.provider_specific["PossDupFlag"] == "Y" for r in recovered)
    assert [r.bid if i % 2 == 0 else r.price for i, r in enumerate(recovered)] == [
        round(99.5 + i / 100 if i % 2 == 0 else 99.61 + i / 100, 2) for i in range(10)
    ]
    # Every market-data message QuickFIX numbered reached one adapter or the other.
    assert set(sent) <= {r.provider_sequence for r in before + after}
    assert {r.stream.partition("#")[0] for r in before + after} == {before[0].stream}
    checker = QualityChecker(stale_after_s=None)  # sequences carried over, as the journal does
    checker.check(before)
    checker.check(after)
    assert checker.flag_counts["gap"] == 0
