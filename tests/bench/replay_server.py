"""A Polygon-protocol WebSocket source that sends pre-encoded frames as fast as the socket
takes them, so that the receiver, not the sender, is what a benchmark measures.

The frames are those the simulator builds (``simulators.polygon.tick_event``: trades and
quotes, round robin over the symbols' ``T`` and ``Q`` channels), encoded once at start and
sent in a cycle. Each is a TEXT message holding a JSON array, as the real service sends
them.

The protocol, as far as our adapter and the official ``massive`` client need it:

- any path (the official client asks for ``/{market}``, i.e. ``/stocks``);
- ``connected`` on open; ``auth`` with any key -> ``auth_success``; the key names the
  connection in its report;
- ``subscribe`` / ``unsubscribe`` -> one frame with a ``success`` status per channel
  (``subscribed to: T.AAPL``), as the real service answers; data starts after the first
  subscribe and is not filtered by it (every connection gets every frame);
- anything else, or anything before ``auth``, -> an ``error`` status.

No permessage-deflate: the official client (``websockets``) offers it and our adapter
(aiohttp) does not, so the server declines it and both read the same bytes.

``stamp=True``: each trade's ``i`` (the trade id, a string in Polygon's protocol) is the
frame's send time in ns as a decimal string, and its ``t`` that time in ms. Placeholders
are encoded once and replaced as each frame is sent. Quotes keep their build-time ``t``
and their ``i`` (indicators, a list).

When a connection ends, a ``ConnectionReport`` gives what was handed to its socket:
``python -m tests.bench.replay_server --port N [--stamp-send-time]`` prints each as a JSON
line on stdout, so a client can be checked against what it was sent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import aiohttp
import orjson
from aiohttp import web

from common.codecs import polygon as codec
from simulators.market import PriceWalk, symbol_universe
from simulators.polygon import tick_event

FRAMES_IN_CYCLE = 256
# Encoded as JSON strings, replaced as each frame is sent: the ns stays a string (``i``),
# the ms becomes a number (``t``).
_SEND_NS = "__send_ns__"
_SEND_MS = "__send_ms__"
_SEND_NS_JSON = orjson.dumps(_SEND_NS)
_SEND_MS_JSON = orjson.dumps(_SEND_MS)


@dataclass(slots=True)
class ReplayFrames:
    """The encoded frames of one cycle, with the trades and quotes in each."""

    frames: list[bytes]
    trades: list[int]
    quotes: list[int]
    stamp: bool


@dataclass(slots=True)
class ConnectionReport:
    """What one connection was sent. Counted as each frame is handed to the socket, so a
    client cannot have received more; the last frame may not have reached it."""

    key: str = ""
    frames_sent: int = 0
    trades_sent: int = 0
    quotes_sent: int = 0

    @property
    def events_sent(self) -> int:
        return self.trades_sent + self.quotes_sent

    def to_json(self) -> bytes:
        return orjson.dumps({**asdict(self), "events_sent": self.events_sent})


def build_frames(
    symbols: int, events_per_frame: int, *, stamp: bool = False, count: int = FRAMES_IN_CYCLE
) -> ReplayFrames:
    """``count`` frames of ``events_per_frame`` trades and quotes over ``symbols`` symbols."""
    names = symbol_universe(symbols)
    walk = PriceWalk(names)
    targets = [(ev, sym) for ev in ("T", "Q") for sym in names]
    out = ReplayFrames([], [], [], stamp)
    rr = 0
    for _ in range(count):
        now_ms = time.time_ns() // 1_000_000
        events: list[dict[str, object]] = []
        trades = 0
        for _ in range(events_per_frame):
            ev, sym = targets[rr % len(targets)]
            rr += 1
            event, _ = tick_event(walk, ev, sym, now_ms)
            if ev == "T":
                trades += 1
                if stamp:
                    event["i"], event["t"] = _SEND_NS, _SEND_MS
            events.append(event)
        out.frames.append(codec.encode_events(events))
        out.trades.append(trades)
        out.quotes.append(events_per_frame - trades)
    return out


def stamped(frame: bytes, send_ns: int) -> bytes:
    """``frame`` with its trades' placeholders replaced by ``send_ns`` (``i``) and its ms
    (``t``)."""
    return frame.replace(_SEND_NS_JSON, b'"%d"' % send_ns).replace(
        _SEND_MS_JSON, b"%d" % (send_ns // 1_000_000)
    )


def _statuses(status: str, messages: list[str]) -> str:
    return orjson.dumps(
        [{"ev": "status", "status": status, "message": m} for m in messages]
    ).decode()


async def _send_frames(
    ws: web.WebSocketResponse, replay: ReplayFrames, report: ConnectionReport
) -> None:
    frames, trades, quotes = replay.frames, replay.trades, replay.quotes
    cycle = len(frames)
    sent = 0
    while not ws.closed:
        k = sent % cycle
        data = stamped(frames[k], time.time_ns()) if replay.stamp else frames[k]
        # Counted before the send: aiohttp writes the frame before awaiting the drain, so a
        # cancelled send may still have delivered it.
        report.frames_sent += 1
        report.trades_sent += trades[k]
        report.quotes_sent += quotes[k]
        await ws.send_frame(data, aiohttp.WSMsgType.TEXT)
        sent += 1
        if sent % 64 == 0:
            await asyncio.sleep(0)  # let pings and client frames through


async def serve_replay(
    port: int,
    symbols: int,
    events_per_frame: int,
    *,
    stamp: bool = False,
    host: str = "127.0.0.1",
    on_close: Callable[[ConnectionReport], None] | None = None,
) -> None:
    """Serve on ``host:port`` until cancelled; ``on_close`` gets each connection's report."""
    replay = build_frames(symbols, events_per_frame, stamp=stamp)

    async def handle(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=4 * 1024 * 1024, compress=False)
        await ws.prepare(request)
        report = ConnectionReport()
        sender: asyncio.Task[None] | None = None
        authed = False
        try:
            await ws.send_str(codec.encode_status("connected", "Connected Successfully"))
            async for msg in ws:
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    continue
                try:
                    action = codec.decode_client_action(msg.data)
                except codec.CodecError as exc:
                    await ws.send_str(codec.encode_status("error", str(exc)))
                    continue
                if action.action == "auth":
                    report.key = action.params[0] if action.params else ""
                    authed = True
                    await ws.send_str(codec.encode_status("auth_success", "authenticated"))
                elif not authed:
                    await ws.send_str(codec.encode_status("error", "not authorized"))
                elif action.action in ("subscribe", "unsubscribe"):
                    verb = "subscribed to" if action.action == "subscribe" else "unsubscribed to"
                    await ws.send_str(_statuses("success", [f"{verb}: {c}" for c in action.params]))
                    if action.action == "subscribe" and sender is None:
                        sender = asyncio.create_task(_send_frames(ws, replay, report))
                else:
                    await ws.send_str(
                        codec.encode_status("error", f"unknown action {action.action}")
                    )
        except ConnectionError:
            pass  # the client went away mid-answer
        finally:
            if sender is not None:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                    await sender
            if on_close is not None:
                on_close(report)
        return ws

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def _print_report(report: ConnectionReport) -> None:
    sys.stdout.buffer.write(report.to_json() + b"\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    import uvloop

    p = argparse.ArgumentParser(
        prog="python -m tests.bench.replay_server",
        description="Polygon-protocol source of pre-encoded frames, sent as fast as the "
        "socket takes them; one JSON line per ended connection on stdout.",
    )
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--symbols", type=int, default=500, metavar="N", help="default 500")
    p.add_argument("--events-per-frame", type=int, default=50, metavar="N", help="default 50")
    p.add_argument("--stamp-send-time", action="store_true",
                   help="each trade's i: its frame's send time in ns (t: in ms)")  # fmt: skip
    args = p.parse_args(argv)
    uvloop.run(
        serve_replay(
            args.port, args.symbols, args.events_per_frame, stamp=args.stamp_send_time,
            on_close=_print_report,
        )
    )  # fmt: skip


if __name__ == "__main__":
    main()
