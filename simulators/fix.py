"""FIX 4.4 market-data acceptor: the server side of ``common.codecs.fix``.

Answers a Logon (echoing 98 and 108, and 141=Y when asked), checks the Password (554) if one
is configured, answers each MarketDataRequest (35=V) for a known symbol with a
SnapshotFullRefresh (35=W: bid, offer, last trade) and then streams IncrementalRefresh
(35=X) updates for the subscribed symbols at the configured rate; 263=2 stops a symbol.
Heartbeats, TestRequests, ResendRequests (resent messages with PossDupFlag, admin runs
gap-filled) and Logout come from the codec's session.

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
    rate: float = 200.0  # update messages per second per connection
    batch: int = 1  # symbols per IncrementalRefresh
    comp_id: str = "FIXSIM"
    password: str | None = None  # None: no Password check
    trade_every: int = 3  # every Nth update is a trade, the others quotes
    faults: Faults = field(default_factory=Faults)


class _Connection:
    def __init__(self, sim: FixSimulator, writer: asyncio.StreamWriter) -> None:
        self.sim = sim
        self.writer = writer
        self.session = codec.FixSession(sim.config.comp_id, None, acceptor=True)
        self.subscriptions: dict[str, str] = {}  # symbol -> MDReqID
        self.sent = 0
        self.silent = False
        self.test_requests_seen = 0

    def write(self, data: bytes) -> None:
        if data and not self.silent and not self.writer.is_closing():
            self.writer.write(data)

    def abort(self) -> None:
        self.writer.transport.abort()


class FixSimulator:
    def __init__(self, config: FixSimConfig) -> None:
        self.config = config
        self.known = set(config.symbols)
        self.walk = PriceWalk(config.symbols)
        self.connections: list[_Connection] = []
        self.requests: list[codec.MarketDataRequested] = []
        self.logons: list[codec.LogonReceived] = []
        self.test_requests_seen = 0
        self.resend_requests_seen = 0
        self.events_sent = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._server = await asyncio.start_server(self._handle, host, port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.abort()
        # Aborted transports end each handler's read; cancelling the handler instead would
        # make asyncio's start_server log the cancellation as an error.
        if self._tasks:
            _done, pending = await asyncio.wait(list(self._tasks), timeout=2.0)
            for task in pending:
                task.cancel()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def drop_all(self) -> None:
        """Cut every client connection without a Logout (a network failure)."""
        for conn in list(self.connections):
            conn.abort()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = _Connection(self, writer)
        self.connections.append(conn)
        helpers: list[asyncio.Task[None]] = []
        try:
            while not conn.session.closed:
                data = await reader.read(1 << 16)
                if not data:
                    break
                now = time.time_ns()
                result = conn.session.receive(data, now)
                conn.write(result.outgoing)
                for event in result.events:
                    if isinstance(event, codec.LogonReceived):
                        if not self._on_logon(conn, event, now):
                            break
                        helpers = [asyncio.create_task(self._send_loop(conn)),
                                   asyncio.create_task(self._tick_loop(conn))]  # fmt: skip
                    elif isinstance(event, codec.MarketDataRequested):
                        self._on_request(conn, event, now)
                    elif isinstance(event, codec.TestRequestReceived):
                        conn.test_requests_seen += 1
                        self.test_requests_seen += 1
                    elif isinstance(event, codec.ResendRequested):
                        self.resend_requests_seen += 1
                with contextlib.suppress(OSError, RuntimeError):
                    await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for helper in helpers:
                helper.cancel()
            for helper in helpers:
                with contextlib.suppress(asyncio.CancelledError):
                    await helper
            self.connections.remove(conn)
            writer.close()
            self._tasks.discard(task)

    def _on_logon(self, conn: _Connection, event: codec.LogonReceived, now: int) -> bool:
        self.logons.append(event)
        expected = self.config.password
        if self.config.faults.refuse_auth or (expected is not None and event.password != expected):
            conn.write(conn.session.refuse_logon(now, "Logon rejected: invalid credentials"))
            return False
        conn.write(conn.session.accept_logon(now, reset_seq_num=event.reset_seq_num))
        return True

    def _on_request(self, conn: _Connection, req: codec.MarketDataRequested, now: int) -> None:
        self.requests.append(req)
        session = conn.session
        if req.subscription_type == codec.DISABLE_PREVIOUS:
            for sym, md_req_id in list(conn.subscriptions.items()):
                if md_req_id == req.md_req_id:
                    del conn.subscriptions[sym]
            return
        if self.config.faults.rate_limit:
            conn.write(session.md_reject(now, req.md_req_id, codec.RATE_LIMIT_REASON,
                                         "market data request rate limit exceeded"))  # fmt: skip
            return
        unknown = [s for s in req.symbols if s not in self.known]
        if unknown or not req.symbols:
            conn.write(session.md_reject(now, req.md_req_id, codec.REJECT_UNKNOWN_SYMBOL,
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
            conn.write(session.snapshot(now, sym, entries, req.md_req_id))
            if req.subscription_type == codec.SNAPSHOT_AND_UPDATES:
                conn.subscriptions[sym] = req.md_req_id

    async def _tick_loop(self, conn: _Connection) -> None:
        while not conn.session.closed:
            await asyncio.sleep(TICK_S)
            tick = conn.session.tick(time.time_ns())
            conn.write(tick.outgoing)
            if tick.timed_out:
                conn.abort()
                return

    async def _send_loop(self, conn: _Connection) -> None:
        cfg = self.config
        faults = cfg.faults
        pacer = Pacer(cfg.rate)
        walk = self.walk
        rr = 0
        while not conn.session.closed:
            symbols = sorted(conn.subscriptions)
            if not symbols or conn.silent:
                await asyncio.sleep(0.01)
                continue
            now = time.time_ns()
            entries: list[codec.MDEntry] = []
            for _ in range(min(cfg.batch, len(symbols))):
                sym = symbols[rr % len(symbols)]
                rr += 1
                if cfg.trade_every and rr % cfg.trade_every == 0:
                    st, price, size = walk.trade(sym)
                    entries.append(codec.MDEntry(codec.TRADE, price, size, sym, codec.NEW, now,
                                                 entry_id=str(st.trade_id)))  # fmt: skip
                else:
                    _st, bid, ask, bs, as_ = walk.quote(sym)
                    entries.append(codec.MDEntry(codec.BID, bid, bs * 100, sym, codec.CHANGE, now))
                    entries.append(codec.MDEntry(codec.OFFER, ask, as_ * 100, sym, codec.CHANGE,
                                                 now))  # fmt: skip
            if faults.silent_after and conn.sent >= faults.silent_after:
                conn.silent = True
                continue
            n = conn.sent + 1
            if faults.skip_seq_every and n % faults.skip_seq_every == 0:
                conn.session.skip_out_seq()
            if faults.malformed_every and n % faults.malformed_every == 0:
                conn.write(MALFORMED_FRAME)
            md_req_id = conn.subscriptions.get(entries[0].symbol or "")
            conn.write(conn.session.incremental(now, entries, md_req_id))
            conn.sent = n
            self.events_sent += 1
            if faults.drop_after and conn.sent >= faults.drop_after:
                conn.abort()
                return
            with contextlib.suppress(OSError, RuntimeError):
                await conn.writer.drain()
            await pacer.wait_for(1)


def build_arg_parser() -> argparse.ArgumentParser:
    p = simulator_arg_parser(
        "fix", __doc__, port=9878, num_symbols=500, rate=200.0,
        rate_help="update messages/s per connection", batch=1,
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
