"""IEX TOPS 1.6 simulator: sends IEX-TP segments over UDP, the sender side of ``common.codecs.iex``.

UDP has no connection and IEX-TP no login or subscription, so the simulator does not learn
where to send: it sends to a configured destination, a unicast ``host:port`` (tests use
127.0.0.1) or a multicast group. A session starts with System Events O, S, R, a Security
Directory and a Trading Status per symbol, then Quote Updates and Trade Reports at the
configured rate in segments of ``batch`` messages, with a heartbeat segment after each
second without traffic. Everything sent can also be written to a pcap file.

Faults: ``drop_after=N`` ends the session after N data messages with System Event C (end of
messages), pauses ``session_pause_s`` and starts a new session (session id + 1);
``silent_after=N`` stops sending anything, heartbeats included; ``malformed_every=N`` sends a
truncated or garbled datagram before every Nth data segment; ``skip_seq_every=N`` loses one
sequence number every N data messages. ``refuse_auth`` and ``rate_limit`` do not exist in
IEX-TP (no login, no requests on a multicast feed) and are rejected. ``poison_at=N``
(``--poison-at``) makes the Nth data message of a session a trade at ``POISON_PRICE``, a value
a sink may refuse; it is not in ``Faults``, which every simulator shares.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import socket
import time
from dataclasses import dataclass, field
from typing import BinaryIO

from common.codecs import iex as codec
from common.codecs import pcap
from simulators.market import (
    Faults,
    Pacer,
    PriceWalk,
    run_simulator,
    serve_until_stopped,
    simulator_arg_parser,
    symbols_from_args,
)

# 30 Quote Updates (44 bytes each with the block length) keep a segment inside a 1500-byte frame.
MAX_BATCH = 30
_QUOTE_BLOCK = 2 + 42
# Encodable in IEX-TP (int64 at 1e-4) but past raw_market_data's NUMERIC(20, 8).
POISON_PRICE = 1e13


@dataclass
class IexSimConfig:
    symbols: list[str]
    destination: tuple[str, int] = ("127.0.0.1", 10378)  # unicast host or multicast group
    rate: float = 1000.0  # data messages per second; 0: idle, heartbeats only
    batch: int = 10  # messages per segment
    trade_every: int = 4  # every Nth data message is a Trade Report, the others Quote Updates
    channel_id: int = 1
    session_id: int | None = None  # None: derived from the clock, as real ids look
    heartbeat_s: float = 1.0
    session_pause_s: float = 1.0  # after a drop, silence before the next session starts
    multicast_ttl: int = 1
    multicast_interface: str | None = None  # local address to send multicast from
    pcap_path: str | None = None  # also write every datagram sent here
    faults: Faults = field(default_factory=Faults)
    poison_at: int = 0  # the Nth data message of a session is a trade at POISON_PRICE; 0: never


class IexFeed:
    """The datagrams of a TOPS feed, without sockets or clocks (times are passed in)."""

    def __init__(self, config: IexSimConfig) -> None:
        if config.faults.refuse_auth or config.faults.rate_limit:
            raise ValueError(
                "refuse_auth and rate_limit do not apply to IEX-TP: no login, and a multicast "
                "feed takes no requests to limit"
            )
        if not 1 <= config.batch <= MAX_BATCH:
            raise ValueError(f"batch must be 1..{MAX_BATCH}")
        self.config = config
        self.walk = PriceWalk(config.symbols)
        session = config.session_id
        if session is None:
            session = int(time.time()) & 0x7FFFFFFF
        self.encoder = codec.SessionEncoder(config.channel_id, session)
        self.sessions_opened = 0
        self.session_messages = 0  # data messages in the current session
        self.data_segments = 0
        self.malformed_sent = 0
        self.sequences_skipped = 0
        self._rr = 0

    @property
    def session_id(self) -> int:
        return self.encoder.session_id

    def open_session(self, now_ns: int) -> list[bytes]:
        """System events and the per-symbol directory that start a session."""
        if self.sessions_opened:
            # A session that ended is never resumed: the next one has a new id.
            self.encoder = codec.SessionEncoder(self.config.channel_id, self.session_id + 1)
        self.sessions_opened += 1
        self.session_messages = 0
        self.data_segments = 0
        out = [
            self.encoder.segment(
                [codec.encode_system_event(e, now_ns) for e in ("O", "S", "R")], now_ns
            )
        ]
        per_symbol: list[bytes] = []
        for sym in self.config.symbols:
            price = self.walk.states[sym].price
            per_symbol.append(
                codec.encode_security_directory(sym, now_ns, adjusted_poc_price=price)
            )
            per_symbol.append(codec.encode_trading_status(sym, now_ns, "T"))
        for start in range(0, len(per_symbol), MAX_BATCH):
            out.append(self.encoder.segment(per_symbol[start : start + MAX_BATCH], now_ns))
        return out

    def data_segment(self, now_ns: int) -> tuple[list[bytes], int]:
        """The next data segment, after any junk datagram a fault asks for.

        Returns the datagrams and how many data messages they carry.
        """
        cfg = self.config
        faults = cfg.faults
        symbols = cfg.symbols
        messages: list[bytes] = []
        for _ in range(cfg.batch):
            sym = symbols[self._rr % len(symbols)]
            self._rr += 1
            if cfg.poison_at and self.session_messages + len(messages) + 1 == cfg.poison_at:
                messages.append(codec.encode_trade_report(sym, now_ns, POISON_PRICE, 100, 0))
                continue
            if cfg.trade_every and self._rr % cfg.trade_every == 0:
                st, price, size = self.walk.trade(sym)
                messages.append(codec.encode_trade_report(sym, now_ns, price, size, st.trade_id))
            else:
                _, bid, ask, bid_lots, ask_lots = self.walk.quote(sym)
                messages.append(
                    codec.encode_quote_update(sym, now_ns, bid, bid_lots * 100, ask, ask_lots * 100)
                )
        every = faults.skip_seq_every
        if every and (self.session_messages + len(messages)) // every > (
            self.session_messages // every
        ):
            # The lost message sits before this segment: its number and bytes are gone.
            self.encoder.skip(1, _QUOTE_BLOCK)
            self.sequences_skipped += 1
        segment = self.encoder.segment(messages, now_ns)
        self.data_segments += 1
        self.session_messages += len(messages)
        out = [segment]
        if faults.malformed_every and self.data_segments % faults.malformed_every == 0:
            self.malformed_sent += 1
            # Alternately truncated in flight, and garbled (not IEX-TP version 1).
            truncated = self.malformed_sent % 2
            out.insert(0, segment[: len(segment) // 2] if truncated else b"\xff" + segment[1:])
        return out, len(messages)

    def close_session(self, now_ns: int) -> bytes:
        return self.encoder.segment([codec.encode_system_event("C", now_ns)], now_ns)

    def heartbeat(self, now_ns: int) -> bytes:
        return self.encoder.heartbeat(now_ns)


def build_capture(
    config: IexSimConfig, messages: int, *, start_ns: int, interval_ns: int = 1_000_000
) -> bytes:
    """A pcap of one whole session (open, ``messages`` data messages, heartbeat, close).

    Segments are ``interval_ns`` apart in capture time; faults apply as when sending.
    """
    if not config.symbols:
        raise ValueError("a capture needs at least one symbol")
    feed = IexFeed(config)
    src = ("10.0.0.1", 10000)
    t = start_ns
    out: list[tuple[int, bytes]] = [(t, d) for d in feed.open_session(t)]
    while feed.session_messages < messages:
        t += interval_ns
        datagrams, _ = feed.data_segment(t)
        out.extend((t, d) for d in datagrams)
    t += interval_ns
    out.append((t, feed.heartbeat(t)))
    t += interval_ns
    out.append((t, feed.close_session(t)))
    return pcap.write_udp(out, src, config.destination)


class IexSimulator:
    def __init__(self, config: IexSimConfig) -> None:
        self.config = config
        self.feed = IexFeed(config)
        self.destination = config.destination
        self.datagrams_sent = 0
        self.messages_sent = 0
        self.heartbeats_sent = 0
        self.sessions = 0
        self.silent = False
        self.port = 0
        self._transport: asyncio.DatagramTransport | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._pcap: BinaryIO | None = None
        self._src: tuple[str, int] = ("127.0.0.1", 0)
        self._last_send = 0.0
        self._live = False  # inside a session (heartbeats only then)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Bind the sending socket to ``host:port`` (0: any port) and start the feed."""
        cfg = self.config
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        if ipaddress.IPv4Address(self.destination[0]).is_multicast:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, cfg.multicast_ttl)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
            if cfg.multicast_interface:
                sock.setsockopt(
                    socket.IPPROTO_IP,
                    socket.IP_MULTICAST_IF,
                    socket.inet_aton(cfg.multicast_interface),
                )
        sock.bind((host, port))
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, sock=sock)
        self._transport = transport
        self._src = sock.getsockname()
        self.port = self._src[1]
        if cfg.pcap_path:
            self._pcap = open(cfg.pcap_path, "wb")  # noqa: SIM115 - closed in stop()
            self._pcap.write(pcap.pcap_header())
        self._tasks = [asyncio.create_task(self._run()), asyncio.create_task(self._heartbeats())]
        return self.port

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        if self._pcap is not None:
            self._pcap.close()
            self._pcap = None

    def _send(self, datagram: bytes) -> None:
        assert self._transport is not None
        now_ns = time.time_ns()
        self._transport.sendto(datagram, self.destination)
        self.datagrams_sent += 1
        self._last_send = time.monotonic()
        if self._pcap is not None:
            self._pcap.write(pcap.pcap_record(now_ns, datagram, self._src, self.destination))

    async def _run(self) -> None:
        cfg = self.config
        faults = cfg.faults
        feed = self.feed
        while True:
            for datagram in feed.open_session(time.time_ns()):
                self._send(datagram)
            self.sessions += 1
            self._live = True
            if cfg.rate <= 0 or not cfg.symbols:
                await asyncio.Event().wait()  # idle: the heartbeat task keeps the session alive
            pacer = Pacer(cfg.rate)
            while True:
                datagrams, count = feed.data_segment(time.time_ns())
                for datagram in datagrams:
                    self._send(datagram)
                self.messages_sent += count
                if faults.drop_after and feed.session_messages >= faults.drop_after:
                    self._send(feed.close_session(time.time_ns()))
                    self._live = False
                    await asyncio.sleep(cfg.session_pause_s)
                    break
                if faults.silent_after and feed.session_messages >= faults.silent_after:
                    self.silent = True
                    self._live = False
                    await asyncio.Event().wait()
                await pacer.wait_for(count)

    async def _heartbeats(self) -> None:
        period = self.config.heartbeat_s
        while True:
            await asyncio.sleep(period / 4)
            if self._live and time.monotonic() - self._last_send >= period:
                self._send(self.feed.heartbeat(time.time_ns()))
                self.heartbeats_sent += 1


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def build_arg_parser() -> argparse.ArgumentParser:
    p = simulator_arg_parser(
        "iex", __doc__, port=0, num_symbols=100, rate=1000.0, rate_help="data messages/s (0: idle)",
        batch=10, batch_help=f"messages per segment (max {MAX_BATCH})", host="0.0.0.0",
        faults_help="e.g. drop_after=1000,skip_seq_every=500",
    )  # fmt: skip
    p.add_argument(
        "--dest", default="127.0.0.1:10378", help="HOST:PORT to send to, unicast or multicast"
    )
    p.add_argument("--multicast-interface", default=None, help="local address for multicast")
    p.add_argument("--multicast-ttl", type=int, default=1)
    p.add_argument("--channel", type=int, default=1)
    p.add_argument("--session", type=int, default=None)
    p.add_argument("--heartbeat-s", type=float, default=1.0)
    p.add_argument("--session-pause-s", type=float, default=1.0)
    p.add_argument("--pcap", default=None, help="also write what is sent to this pcap file")
    p.add_argument(
        "--poison-at", type=int, default=0,
        help=f"make the Nth data message of a session a trade at price {POISON_PRICE:g}",
    )  # fmt: skip
    return p


async def serve(args: argparse.Namespace) -> None:
    sim = IexSimulator(
        IexSimConfig(
            symbols=symbols_from_args(args),
            destination=_host_port(args.dest),
            rate=args.rate,
            batch=args.batch,
            channel_id=args.channel,
            session_id=args.session,
            heartbeat_s=args.heartbeat_s,
            session_pause_s=args.session_pause_s,
            multicast_ttl=args.multicast_ttl,
            multicast_interface=args.multicast_interface,
            pcap_path=args.pcap,
            faults=Faults.parse(args.faults),
            poison_at=args.poison_at,
        )
    )
    banner = f"iex simulator sending TOPS 1.6 to udp://{args.dest} from port {{port}}"
    await serve_until_stopped(sim, args.host, args.port, banner)


def main(argv: list[str] | None = None) -> None:
    run_simulator(serve, build_arg_parser(), argv)
