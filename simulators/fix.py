"""FIX 4.4 market-data acceptor: the server side of ``common.codecs.fix``.

Answers a Logon (echoing 98 and 108, and 141=Y when asked), checks the Password (554) if one
is configured, answers each MarketDataRequest (35=V) for a known symbol with a
SnapshotFullRefresh (35=W: bid, offer, last trade) and then streams IncrementalRefresh
(35=X) updates for the subscribed symbols at the configured rate; 263=2 stops a symbol.
Heartbeats, TestRequests, ResendRequests (resent messages with PossDupFlag, admin runs
gap-filled) and Logout come from the codec's session.

Sessions are a venue's: one per client SenderCompID, outliving its connections (see
``SimSession``). A client that drops without a Logout and logs on again without
ResetSeqNumFlag finds the numbers where it left them, the updates generated meanwhile in
the store (the last ``store_size`` messages), and gets them resent when it asks.

Faults (``simulators.market.Faults``): ``refuse_auth`` answers the Logon with a Logout (58);
``rate_limit`` answers every 35=V with 35=Y, MDReqRejReason 2 (insufficient bandwidth, the
closest FIX 4.4 reason); ``drop_after=N`` cuts the TCP connection after N updates;
``silent_after=N`` stops sending anything (heartbeats and TestRequest answers too);
``malformed_every=N`` sends a message with a bad CheckSum before every Nth update (it uses
no sequence number); ``skip_seq_every=N`` skips an outgoing MsgSeqNum before every Nth update.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass, field

from common.codecs import fix as codec
from simulators.market import (
    Faults,
    Pacer,
    PriceWalk,
    run_simulator,
    serve_until_stopped,
    simulator_arg_parser,
    symbols_from_args,
)

# A frame whose body is fine but whose CheckSum is wrong: what line noise looks like.
MALFORMED_FRAME = b"8=FIX.4.4\x019=5\x0135=X\x0110=000\x01"
TICK_S = 0.2


@dataclass
class FixSimConfig:
    symbols: list[str]
    rate: float = 200.0  # update messages per second per session
    batch: int = 1  # symbols per IncrementalRefresh
    comp_id: str = "FIXSIM"
    password: str | None = None  # None: no Password check
    trade_every: int = 3  # every Nth update is a trade, the others quotes
    faults: Faults = field(default_factory=Faults)
    store_size: int = 100_000  # sent messages kept per session to answer ResendRequests


class _Connection:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.sent = 0  # updates written on this connection (the faults count these)
        self.silent = False
        self.aborted = False
        self.test_requests_seen = 0

    def write(self, data: bytes) -> None:
        if data and not self.silent and not self.writer.is_closing():
            self.writer.write(data)

    def abort(self) -> None:
        self.aborted = True
        self.writer.transport.abort()


class SimSession:
    """One client's FIX session. Like a venue's (or a QuickFIX acceptor's with a store) it
    outlives TCP connections: its sequence numbers, the messages it sent (for resends) and
    its subscriptions stay across reconnects, and updates go on being generated, numbered
    and stored while no connection is up. A Logon with ResetSeqNumFlag starts it over; a
    Logout ends its subscriptions."""

    def __init__(self, comp_id: str | None, config: FixSimConfig) -> None:
        self.fix = codec.FixSession(
            config.comp_id, comp_id, acceptor=True, store_size=config.store_size
        )
        self.subscriptions: dict[str, str] = {}  # symbol -> MDReqID
        self.conn: _Connection | None = None  # the connection that holds the session
        # MsgSeqNums of the market data sent (or stored while no connection was up).
        self.market_data_seqs: deque[int] = deque(maxlen=config.store_size)
        self.generated_offline = 0
        self.rr = 0

    def live(self) -> _Connection | None:
        """The connection to write to: logged on and holding the session."""
        conn, fix = self.conn, self.fix
        if conn is None or conn.aborted or not fix.logged_on or fix.closed:
            return None
        return conn


class FixSimulator:
    def __init__(self, config: FixSimConfig) -> None:
        self.config = config
        self.known = set(config.symbols)
        self.walk = PriceWalk(config.symbols)
        self.connections: list[_Connection] = []
        self.sessions: dict[str, SimSession] = {}  # by the client's SenderCompID
        self.requests: list[codec.MarketDataRequested] = []
        self.logons: list[codec.LogonReceived] = []
        self.test_requests_seen = 0
        self.resend_requests_seen = 0
        self.events_sent = 0  # updates numbered, whether a connection was up or not
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._senders: list[asyncio.Task[None]] = []
        self.port = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._server = await asyncio.start_server(self._handle, host, port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for sender in self._senders:
            sender.cancel()
        for conn in list(self.connections):
            conn.abort()
        # Aborted transports end each handler's read; cancelling the handler instead would
        # make asyncio's start_server log the cancellation as an error.
        if self._tasks:
            _done, pending = await asyncio.wait(list(self._tasks), timeout=2.0)
            for task in pending:
                task.cancel()
        for sender in self._senders:
            with contextlib.suppress(asyncio.CancelledError):
                await sender
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def drop_all(self) -> None:
        """Cut every client connection without a Logout (a network failure)."""
        for conn in list(self.connections):
            conn.abort()

    def _session_for(self, fields: dict[int, str], conn: _Connection) -> SimSession:
        comp_id = fields.get(49)
        if not fields or fields.get(35) != codec.LOGON or not comp_id:
            # Not a Logon: a throwaway session refuses it as the FIX rules say.
            throwaway = SimSession(None, self.config)
            throwaway.conn = conn
            return throwaway
        session = self.sessions.get(comp_id)
        if session is None:
            session = self.sessions[comp_id] = SimSession(comp_id, self.config)
            self._senders.append(asyncio.create_task(self._send_loop(session)))
        if session.conn is not None:
            # The newest connection takes the session over: the old one is most likely a
            # client that died without a Logout and whose socket has not failed yet.
            session.conn.abort()
        session.conn = conn
        session.fix.new_connection()
        return session

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = _Connection(writer)
        self.connections.append(conn)
        ticker: asyncio.Task[None] | None = None
        session: SimSession | None = None
        logged_out = False
        try:
            data = b""
            fields: dict[int, str] | None = None
            while fields is None:  # the first message names the session
                chunk = await reader.read(1 << 16)
                if not chunk:
                    return
                data += chunk
                fields = codec.first_message_fields(data)
            session = self._session_for(fields, conn)
            fix = session.fix
            while data and not fix.closed and session.conn is conn:
                now = time.time_ns()
                result = fix.receive(data, now)
                conn.write(result.outgoing)
                for event in result.events:
                    if isinstance(event, codec.LogonReceived):
                        if not self._on_logon(session, event, now):
                            break
                        ticker = asyncio.create_task(self._tick_loop(session, conn))
                    elif isinstance(event, codec.MarketDataRequested):
                        self._on_request(session, event, now)
                    elif isinstance(event, codec.TestRequestReceived):
                        conn.test_requests_seen += 1
                        self.test_requests_seen += 1
                    elif isinstance(event, codec.ResendRequested):
                        self.resend_requests_seen += 1
                    elif isinstance(event, codec.LogoutReceived):
                        logged_out = True
                with contextlib.suppress(OSError, RuntimeError):
                    await writer.drain()
                if fix.closed:
                    break
                data = await reader.read(1 << 16)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if ticker is not None:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
            if session is not None and session.conn is conn:
                session.conn = None
                if logged_out:
                    session.subscriptions.clear()  # a Logout ends the subscriptions
            self.connections.remove(conn)
            writer.close()
            self._tasks.discard(task)

    def _on_logon(self, session: SimSession, event: codec.LogonReceived, now: int) -> bool:
        self.logons.append(event)
        conn = session.conn
        assert conn is not None
        expected = self.config.password
        if self.config.faults.refuse_auth or (expected is not None and event.password != expected):
            conn.write(session.fix.refuse_logon(now, "Logon rejected: invalid credentials"))
            return False
        if event.reset_seq_num:
            # A new sequence space: what was subscribed and stored belonged to the old one.
            session.subscriptions.clear()
            session.market_data_seqs.clear()
        conn.write(session.fix.accept_logon(now, reset_seq_num=event.reset_seq_num))
        return True

    def _on_request(self, session: SimSession, req: codec.MarketDataRequested, now: int) -> None:
        self.requests.append(req)
        fix, conn = session.fix, session.conn
        assert conn is not None
        if req.subscription_type == codec.DISABLE_PREVIOUS:
            for sym, md_req_id in list(session.subscriptions.items()):
                if md_req_id == req.md_req_id:
                    del session.subscriptions[sym]
            return
        if self.config.faults.rate_limit:
            conn.write(fix.md_reject(now, req.md_req_id, codec.RATE_LIMIT_REASON,
                                     "market data request rate limit exceeded"))  # fmt: skip
            return
        unknown = [s for s in req.symbols if s not in self.known]
        if unknown or not req.symbols:
            conn.write(fix.md_reject(now, req.md_req_id, codec.REJECT_UNKNOWN_SYMBOL,
                                     f"unknown symbol {','.join(unknown)}"))  # fmt: skip
            return
        for sym in req.symbols:
            st = self.walk.states[sym]
            half = max(0.01, round(st.price * 0.0002, 2))
            entries = [
                codec.MDEntry(codec.BID, round(st.price - half, 2), 10, time_ns=now),
                codec.MDEntry(codec.OFFER, round(st.price + half, 2), 10, time_ns=now),
                codec.MDEntry(codec.TRADE, st.price, 100, time_ns=now),
            ]
            session.market_data_seqs.append(fix.next_out_seq)
            conn.write(fix.snapshot(now, sym, entries, req.md_req_id))
            if req.subscription_type == codec.SNAPSHOT_AND_UPDATES:
                session.subscriptions[sym] = req.md_req_id

    async def _tick_loop(self, session: SimSession, conn: _Connection) -> None:
        fix = session.fix
        while not fix.closed and session.conn is conn:
            await asyncio.sleep(TICK_S)
            if session.conn is not conn:
                return
            tick = fix.tick(time.time_ns())
            conn.write(tick.outgoing)
            if tick.timed_out:
                conn.abort()
                return

    async def _send_loop(self, session: SimSession) -> None:
        """Updates for the session's subscriptions, for as long as the simulator runs: to the
        connection when one is logged on, else only numbered and stored for a resend."""
        cfg = self.config
        faults = cfg.faults
        pacer = Pacer(cfg.rate)
        walk = self.walk
        fix = session.fix
        while True:
            symbols = sorted(session.subscriptions)
            conn = session.live()
            if not symbols or (conn is not None and conn.silent):
                await asyncio.sleep(0.01)
                continue
            now = time.time_ns()
            entries: list[codec.MDEntry] = []
            for _ in range(min(cfg.batch, len(symbols))):
                sym = symbols[session.rr % len(symbols)]
                session.rr += 1
                if cfg.trade_every and session.rr % cfg.trade_every == 0:
                    st, price, size = walk.trade(sym)
                    entries.append(codec.MDEntry(codec.TRADE, price, size, sym, codec.NEW, now,
                                                 entry_id=str(st.trade_id)))  # fmt: skip
                else:
                    _st, bid, ask, bs, as_ = walk.quote(sym)
                    entries.append(codec.MDEntry(codec.BID, bid, bs * 100, sym, codec.CHANGE, now))
                    entries.append(codec.MDEntry(codec.OFFER, ask, as_ * 100, sym, codec.CHANGE,
                                                 now))  # fmt: skip
            md_req_id = session.subscriptions.get(entries[0].symbol or "")
            if conn is None:
                session.market_data_seqs.append(fix.next_out_seq)
                fix.incremental(now, entries, md_req_id)
                session.generated_offline += 1
                self.events_sent += 1
                await pacer.wait_for(1)
                continue
            if faults.silent_after and conn.sent >= faults.silent_after:
                conn.silent = True
                continue
            n = conn.sent + 1
            if faults.skip_seq_every and n % faults.skip_seq_every == 0:
                fix.skip_out_seq()
            if faults.malformed_every and n % faults.malformed_every == 0:
                conn.write(MALFORMED_FRAME)
            session.market_data_seqs.append(fix.next_out_seq)
            conn.write(fix.incremental(now, entries, md_req_id))
            conn.sent = n
            self.events_sent += 1
            if faults.drop_after and conn.sent >= faults.drop_after:
                conn.abort()
            else:
                with contextlib.suppress(OSError, RuntimeError):
                    await conn.writer.drain()
            await pacer.wait_for(1)


def build_arg_parser() -> argparse.ArgumentParser:
    p = simulator_arg_parser(
        "fix", __doc__, port=9878, num_symbols=500, rate=200.0,
        rate_help="update messages/s per session", batch=1,
        batch_help="symbols per IncrementalRefresh",
    )  # fmt: skip
    p.add_argument("--comp-id", default="FIXSIM", help="our SenderCompID")
    p.add_argument("--password", default=None, help="the only Password accepted (default: any)")
    return p


async def serve(args: argparse.Namespace) -> None:
    sim = FixSimulator(
        FixSimConfig(
            symbols=symbols_from_args(args), rate=args.rate, batch=args.batch,
            comp_id=args.comp_id, password=args.password, faults=Faults.parse(args.faults),
        )
    )  # fmt: skip
    banner = f"fix simulator (FIX.4.4 acceptor {args.comp_id}) on {{host}}:{{port}}"
    await serve_until_stopped(sim, args.host, args.port, banner)


def main(argv: list[str] | None = None) -> None:
    run_simulator(serve, build_arg_parser(), argv)
