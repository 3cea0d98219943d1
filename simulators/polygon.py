"""Polygon.io (Massive) stocks WebSocket simulator: the server side of ``common.codecs.polygon``.

Accepts any path (the real client builds ``/{market}``), sends ``connected``, checks the
key, answers subscribe/unsubscribe per channel, then streams T/Q frames at the configured
rate over the subscribed symbols and an AM bar per symbol each minute. Every frame is a
TEXT message holding a JSON array, as the real service sends them. The ``rate_limit`` fault
answers the auth message with ``max_connections`` and closes, as the real service does when
a key has too many connections. ``capture_path`` (``--capture``) also writes every data
frame sent, one per line, as ``feedfleet decode polygon`` reads them: what a test counts as
sent.

REST: ``GET /v3/trades/{ticker}`` serves the trades the simulator made (its tape), with
``timestamp.gte/gt/lte/lt`` (ns), ``limit`` and cursor pagination through ``next_url``, key
in ``apiKey`` or ``Authorization: Bearer``. The market does not stop for a dropped client:
trades of the symbols a ``drop_after`` connection had are made for the time it was away (one
per ``away_trade_ms`` per symbol) when it subscribes them again, so they exist only in the
tape, for the client to backfill.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import time
from dataclasses import dataclass, field
from typing import BinaryIO

import aiohttp
from aiohttp import web

from common.codecs import polygon as codec
from simulators.market import (
    Faults,
    Pacer,
    PriceWalk,
    SentLog,
    SymbolState,
    WebSocketSimulator,
    abort_websocket,
    harness_args,
    run_simulator,
    serve_until_stopped,
    simulator_arg_parser,
    symbols_from_args,
)

REST_RATE_LIMITED = (
    "You've exceeded the maximum requests per minute, please wait or upgrade your "
    "subscription to continue. https://polygon.io/pricing"
)
MAX_CONNECTIONS = (
    "Maximum number of websocket connections exceeded. You have reached the connection limit"
    " for your account. Please contact support at https://polygon.io/contact to increase your"
    " limit."
)


@dataclass
class PolygonSimConfig:
    symbols: list[str]
    rate: float = 1000.0  # events per second per connection
    batch: int = 10  # events per frame
    api_key: str | None = None  # None: any non-empty key is accepted
    faults: Faults = field(default_factory=Faults)
    # Bench support, in Polygon's own fields: each trade's id ``i`` (a string) is its
    # frame's send time in ns, and its SIP time ``t`` that time in ms. Quotes carry ``i``
    # as a list of indicators: they keep their build time and no stamp.
    stamp_send_time: bool = False
    capture_path: str | None = None  # also write every data frame sent here, one per line
    sent_log_dir: str | None = None  # every frame sent, one file per connection (SentLog)
    away_trade_ms: int = 10  # a dropped client's symbols trade this often while it is away
    tape_size: int = 50_000  # trades kept per symbol for /v3/trades
    # A server slow to act on each channel subscribed: the market trades on meanwhile (the tape).
    subscribe_delay_ms: int = 0


class _Connection:
    def __init__(self, sim: PolygonSimulator, ws: web.WebSocketResponse) -> None:
        self.sim = sim
        self.ws = ws
        self.channels: dict[str, set[str]] = {"T": set(), "Q": set(), "A": set(), "AM": set()}
        self.wildcard: set[str] = set()
        self.sent = 0
        self.frames = 0
        self.silent = False
        self.log = sim.sent_log.open()
        # Rebuilt only when the subscriptions change: sorting them for every frame cost
        # the send loop a third of its time.
        self._targets: list[tuple[str, str]] | None = None

    def subscriptions_changed(self) -> None:
        self._targets = None

    def targets(self) -> list[tuple[str, str]]:
        if self._targets is not None:
            return self._targets
        universe = self.sim.config.symbols
        out: list[tuple[str, str]] = []
        for ev in ("T", "Q"):
            syms = universe if ev in self.wildcard else sorted(self.channels[ev] & self.sim.known)
            out.extend((ev, s) for s in syms)
        self._targets = out
        return out


class PolygonSimulator(WebSocketSimulator):
    def __init__(self, config: PolygonSimConfig) -> None:
        super().__init__()
        self.config = config
        self.known = set(config.symbols)
        self.walk = PriceWalk(config.symbols)
        self.connections: list[_Connection] = []
        self.events_sent = 0
        self._capture: BinaryIO | None = None
        self.sent_log = SentLog(config.sent_log_dir)
        # Every trade made, per symbol, oldest first: what /v3/trades serves.
        self.tape: dict[str, collections.deque[dict[str, object]]] = {}
        # Symbols of a dropped connection -> when it dropped (ms): they trade while away.
        self.away: dict[str, int] = {}
        self.rest_requests = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v3/trades/{ticker}", self._trades)
        app.router.add_get("/{tail:.*}", self._handle)  # the WebSocket, on any other path
        return app

    def _record(self, event: dict[str, object]) -> None:
        sym = str(event["sym"])
        tape = self.tape.get(sym)
        if tape is None:
            tape = self.tape[sym] = collections.deque(maxlen=self.config.tape_size)
        tape.append(event)

    def _trade_while_away(self, sym: str, now_ms: int) -> None:
        """The trades ``sym`` made since its client dropped: into the tape only."""
        since = self.away.pop(sym, None)
        if since is None:
            return
        step = max(1, self.config.away_trade_ms)
        for t_ms in range(since + step, now_ms, step):
            event, _ = tick_event(self.walk, "T", sym, t_ms)
            self._record(event)

    async def _trades(self, request: web.Request) -> web.Response:
        """``GET /v3/trades/{ticker}`` from the tape."""
        self.rest_requests += 1
        query = request.query
        auth = request.headers.get("Authorization", "")
        key = query.get("apiKey") or auth.removeprefix("Bearer ").strip()
        expected = self.config.api_key
        if not key or (expected and key != expected):
            body = {"status": "ERROR", "request_id": "sim", "error": "Unknown API Key"}
            return web.json_response(body, status=401)
        if self.config.faults.rate_limit:
            body = {"status": "ERROR", "request_id": "sim", "error": REST_RATE_LIMITED}
            return web.json_response(body, status=429)
        ticker = request.match_info["ticker"]
        try:
            if "cursor" in query:
                gte, lt, offset, limit = (int(v) for v in query["cursor"].split("-"))
            else:
                gte = int(query.get("timestamp.gte") or int(query.get("timestamp.gt", -1)) + 1)
                lt = int(query.get("timestamp.lt") or int(query.get("timestamp.lte", 2**62)) + 1)
                offset, limit = 0, min(50_000, max(1, int(query.get("limit", 1000))))
        except ValueError:
            body = {"status": "ERROR", "request_id": "sim", "error": "bad query parameters"}
            return web.json_response(body, status=400)
        trades = [
            codec.rest_trade(e) for e in self.tape.get(ticker, ())
            if gte <= int(str(e["t"])) * 1_000_000 < lt
        ]  # fmt: skip
        page = trades[offset : offset + limit]
        next_url = None
        if offset + limit < len(trades):
            next_url = (f"http://{request.host}{codec.trades_path(ticker)}"
                        f"?cursor={gte}-{lt}-{offset + limit}-{limit}")  # fmt: skip
        return web.Response(
            body=codec.encode_trades_page(page, next_url), content_type="application/json"
        )

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        if self.config.capture_path:
            self._capture = open(self.config.capture_path, "wb")  # noqa: SIM115 - closed in stop()
        return await super().start(host, port)

    async def stop(self) -> None:
        await super().stop()
        if self._capture is not None:
            self._capture.close()
            self._capture = None

    async def _handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=False, max_msg_size=4 * 1024 * 1024)
        await ws.prepare(request)
        conn = _Connection(self, ws)
        self.connections.append(conn)
        faults = self.config.faults
        sender: asyncio.Task[None] | None = None
        try:
            await ws.send_str(codec.encode_status("connected", "Connected Successfully"))
            authed = False
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.PING:
                    if not conn.silent:
                        await ws.pong(msg.data)
                    continue
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                try:
                    action = codec.decode_client_action(msg.data)
                except codec.CodecError as exc:
                    await ws.send_str(codec.encode_status("error", str(exc)))
                    continue
                if action.action == "auth" and faults.rate_limit:
                    await ws.send_str(codec.encode_status("max_connections", MAX_CONNECTIONS))
                    await ws.close(code=aiohttp.WSCloseCode.POLICY_VIOLATION)
                    break
                if action.action == "auth":
                    key = action.params[0] if action.params else ""
                    expected = self.config.api_key
                    if faults.refuse_auth or not key or (expected and key != expected):
                        await ws.send_str(
                            codec.encode_status("auth_failed", "authentication failed")
                        )
                        await ws.close()
                        break
                    authed = True
                    await ws.send_str(codec.encode_status("auth_success", "authenticated"))
                    sender = asyncio.create_task(self._send_loop(conn))
                elif not authed:
                    await ws.send_str(codec.encode_status("error", "not authorized"))
                elif action.action in ("subscribe", "unsubscribe"):
                    await self._on_subscription(conn, action)
                else:
                    await ws.send_str(
                        codec.encode_status("error", f"unknown action {action.action}")
                    )
        finally:
            if sender is not None:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sender
            self.connections.remove(conn)
            if conn.log is not None:
                conn.log.close()
        return ws

    async def _on_subscription(self, conn: _Connection, action: codec.ClientAction) -> None:
        adding = action.action == "subscribe"
        for channel in action.params:
            if self.config.subscribe_delay_ms:  # each channel takes the server that long
                await asyncio.sleep(self.config.subscribe_delay_ms / 1000)
            try:
                ev, sym = codec.split_channel(channel)
            except codec.CodecError as exc:
                await conn.ws.send_str(codec.encode_status("error", str(exc)))
                continue
            if ev not in conn.channels:
                await conn.ws.send_str(codec.encode_status("error", f"unknown channel {ev}"))
                continue
            if sym == "*":
                (conn.wildcard.add if adding else conn.wildcard.discard)(ev)
            elif adding:
                if ev == "T":
                    self._trade_while_away(sym, int(time.time() * 1000))
                conn.channels[ev].add(sym)
            else:
                conn.channels[ev].discard(sym)
            conn.subscriptions_changed()
            verb = "subscribed to" if adding else "unsubscribed to"
            await conn.ws.send_str(codec.encode_status("success", f"{verb}: {channel}"))

    async def _send_loop(self, conn: _Connection) -> None:
        cfg = self.config
        faults = cfg.faults
        pacer = Pacer(cfg.rate)
        walk = self.walk
        next_bar_ms = (int(time.time() * 1000) // 60_000 + 1) * 60_000
        rr = 0
        while not conn.ws.closed:
            targets = conn.targets()
            if not targets:
                await asyncio.sleep(0.01)
                continue
            events: list[dict[str, object]] = []
            now_ms = time.time_ns() // 1_000_000
            for _ in range(cfg.batch):
                ev, sym = targets[rr % len(targets)]
                rr += 1
                event, st = tick_event(walk, ev, sym, now_ms)
                if ev == "T":
                    self._record(event)
                if faults.skip_seq_every and st.sequence % faults.skip_seq_every == 0:
                    st.sequence += 1
                events.append(event)
            if now_ms >= next_bar_ms:
                events.extend(self._bars(conn, next_bar_ms))
                next_bar_ms += 60_000
            if faults.silent_after and conn.sent >= faults.silent_after:
                conn.silent = True
                await asyncio.sleep(3600)
                continue
            conn.frames += 1
            if cfg.stamp_send_time:
                stamp_send_time(events, time.time_ns())
            if faults.malformed_every and conn.frames % faults.malformed_every == 0:
                await conn.ws.send_str('[{"ev":"T","sym":"BAD","p":')  # truncated JSON
            frame = codec.encode_events(events)
            # TEXT, as the real service sends JSON; send_frame skips a bytes -> str round trip.
            await conn.ws.send_frame(frame, aiohttp.WSMsgType.TEXT)
            if self._capture is not None:
                self._capture.write(frame + b"\n")  # only once the send went through
            if conn.log is not None:
                conn.log.write(frame)
            conn.sent += len(events)
            self.events_sent += len(events)
            if faults.drop_after and conn.sent >= faults.drop_after:
                for ev, sym in targets:
                    if ev == "T":
                        self.away.setdefault(sym, now_ms)
                abort_websocket(conn.ws)
                return
            await pacer.wait_for(len(events))

    def _bars(self, conn: _Connection, end_ms: int) -> list[dict[str, object]]:
        syms = self.config.symbols if "AM" in conn.wildcard else conn.channels["AM"] & self.known
        bars: list[dict[str, object]] = []
        for sym in sorted(syms):
            px = self.walk.states[sym].price
            bars.append(codec.aggregate_event("AM", sym, px, px, px, px, 100,
                                              end_ms - 60_000, end_ms))  # fmt: skip
        return bars


def tick_event(
    walk: PriceWalk, ev: str, sym: str, now_ms: int
) -> tuple[dict[str, object], SymbolState]:
    """The next trade (``ev == "T"``) or quote for ``sym`` from the price walk."""
    if ev == "T":
        st, price, size = walk.trade(sym)
        trade = codec.trade_event(sym, price, size, now_ms, st.sequence, trade_id=str(st.trade_id))
        return trade, st
    st, bid, ask, bid_lots, ask_lots = walk.quote(sym)
    return codec.quote_event(sym, bid, bid_lots, ask, ask_lots, now_ms, st.sequence), st


def stamp_send_time(events: list[dict[str, object]], send_ns: int) -> None:
    """Each trade of a frame about to be sent: ``i`` = ``send_ns`` as a decimal string (a
    trade id is a string in Polygon's protocol) and ``t`` = it in ms. The codec keeps ``i``
    in ``provider_specific``, so a consumer reads the send time to the ns; a worker's own
    provider -> receipt time runs from ``t``, floored to the ms."""
    trade_id = str(send_ns)
    t_ms = send_ns // 1_000_000
    for event in events:
        if event["ev"] == "T":
            event["i"] = trade_id
            event["t"] = t_ms


def build_arg_parser() -> argparse.ArgumentParser:
    p = simulator_arg_parser("polygon", __doc__, port=8765, num_symbols=500, rate=1000.0, batch=10)
    p.add_argument("--api-key", default=None, help="the only key accepted (default: any)")
    p.add_argument(
        "--stamp-send-time", action="store_true",
        help="each trade's id (i) is its send time in ns and its time (t) that in ms",
    )  # fmt: skip
    p.add_argument("--capture", default=None, help="also write each data frame sent to this file")
    harness_args(p)
    return p


async def serve(args: argparse.Namespace) -> None:
    sim = PolygonSimulator(
        PolygonSimConfig(
            symbols=symbols_from_args(args), rate=args.rate, batch=args.batch,
            api_key=args.api_key, faults=Faults.parse(args.faults),
            stamp_send_time=args.stamp_send_time, capture_path=args.capture,
            sent_log_dir=args.sent_log,
        )
    )  # fmt: skip
    await serve_until_stopped(
        sim, args.host, args.port, "polygon simulator on ws://{host}:{port}/stocks",
        faults=sim.config.faults, faults_file=args.faults_file,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    run_simulator(serve, build_arg_parser(), argv)
