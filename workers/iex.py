"""IEX TOPS 1.6 adapter: IEX-TP segments from UDP (unicast or multicast) or a pcap replay,
decoded by ``common.codecs.iex``.

IEX-TP is one-way: no login, no subscription request, no rate limit. "Connecting" binds the
socket (and joins the multicast group); subscriptions filter locally which symbols become
records. The connection is over when System Event C (end of messages) arrives or nothing,
not even a heartbeat, arrives for ``heartbeat_timeout_s``. Gaps between datagrams are
counted here (``sequence_gaps``, ``missing_messages``); the records carry the message
sequence numbers so the quality checker flags them as ``gap`` too.

connection_config keys:
  ``host``                 local address to bind (default ``0.0.0.0``)
  ``port``                 UDP port the feed is sent to (required unless ``pcap_path``)
  ``multicast_group``      join this group (e.g. ``233.215.21.4``); absent: unicast
  ``interface``            local address of the interface to join the group on (default any)
  ``heartbeat_timeout_s``  silence after which the feed counts as gone (default 5)
  ``pcap_path``            replay this capture (pcap/pcapng, .gz too) instead of listening
  ``replay_speed``         ``recorded`` (capture timing) or ``max`` (default ``recorded``)
  ``all_symbols``          true: every symbol becomes a record, subscribed or not
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
import time
from collections.abc import AsyncIterator, Sequence
from typing import BinaryIO, NoReturn

import structlog

from common.codecs import iex as codec
from common.codecs import pcap
from common.codecs.base import CaptureError
from common.model import ConnectionStatus, DataType, RawMarketData
from common.provider import (
    Instrument,
    ProviderAdapter,
    ProviderConfig,
    ProviderConfigError,
    ProviderDisconnected,
)
from common.recording import FrameKind

log = structlog.get_logger("feedfleet.iex")

# Datagrams waiting for the consumer; past this the socket reader drops them, and the
# sequence tracker then reports the loss as a gap.
QUEUE_LIMIT = 100_000
# Datagrams decoded into one batch when several are waiting: a reader that fell behind
# pays the per-batch costs (journal write, sink hand-over, a loop turn) once per this many,
# so it catches up instead of staying behind; one that keeps up sees batches of one.
DATAGRAMS_PER_BATCH = 64
RECEIVE_BUFFER = 8 * 1024 * 1024
REPLAY_CHUNK = 1 << 20


class _Receiver(asyncio.DatagramProtocol):
    def __init__(self, queue: asyncio.Queue[tuple[bytes, int] | None]) -> None:
        self.queue = queue
        self.dropped = 0

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        try:
            self.queue.put_nowait((data, time.time_ns()))
        except asyncio.QueueFull:
            self.dropped += 1

    def error_received(self, exc: Exception) -> None:
        log.warning("udp_error", error=str(exc))

    def connection_lost(self, exc: Exception | None) -> None:
        # Wake a waiting consumer; the queue may be full, then it finds out on its next get.
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(None)


class IexAdapter(ProviderAdapter):
    provider_type = "iex"
    codec_tracks_gaps = True

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config)
        cc = config.connection_config
        self.host = str(cc.get("host", "0.0.0.0"))
        self.port = cc.get("port")
        self.multicast_group = cc.get("multicast_group")
        self.interface = cc.get("interface")
        self.heartbeat_timeout_s = config.number("heartbeat_timeout_s", 5.0)
        self.pcap_path = cc.get("pcap_path")
        self.replay_speed = str(cc.get("replay_speed", "recorded"))
        self.all_symbols = bool(cc.get("all_symbols", False))
        # Kept across reconnects: messages missed while reconnecting are a gap in the session.
        self.tracker = codec.SequenceTracker()
        self.segments_received = 0
        self.heartbeats_received = 0
        self.sequence_gaps = 0
        self.missing_messages = 0
        self.unknown_messages = 0
        self.skipped_messages = 0
        self.events_received = 0
        self.session_ended = False
        self._transport: asyncio.DatagramTransport | None = None
        self._receiver: _Receiver | None = None
        self._queue: asyncio.Queue[tuple[bytes, int] | None] | None = None
        self._closed_queue: asyncio.Queue[tuple[bytes, int] | None] | None = None
        self._replay: BinaryIO | None = None
        self._quote_symbols: set[str] | None = None
        self._trade_symbols: set[str] | None = None
        self._update_filters()

    @property
    def dropped_datagrams(self) -> int:
        return self._receiver.dropped if self._receiver is not None else 0

    def _check_config(self) -> None:
        if self.replay_speed not in ("recorded", "max"):
            raise ProviderConfigError(
                f"connection_config.replay_speed must be 'recorded' or 'max', "
                f"not {self.replay_speed!r}"
            )
        if self.heartbeat_timeout_s <= 0:
            raise ProviderConfigError("connection_config.heartbeat_timeout_s must be positive")
        if self.pcap_path:
            return
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ProviderConfigError("connection_config.port (UDP port) is required")
        if self.multicast_group is not None:
            try:
                group = ipaddress.IPv4Address(str(self.multicast_group))
            except ValueError as exc:
                raise ProviderConfigError(f"multicast_group: {exc}") from None
            if not group.is_multicast:
                raise ProviderConfigError(f"{group} is not a multicast address")

    async def connect(self) -> None:
        self._check_config()
        self.connection_status = ConnectionStatus.CONNECTING
        self.session_ended = False
        if self.pcap_path:
            try:
                self._replay = await asyncio.to_thread(open, str(self.pcap_path), "rb")
            except OSError as exc:
                self.connection_status = ConnectionStatus.ERROR
                self.last_error = str(exc)
                raise ProviderConfigError(f"cannot open pcap_path: {exc}") from exc
            # A replay is a fresh source: its sequence numbers start over.
            self.tracker = codec.SequenceTracker()
        else:
            try:
                sock = self._open_socket()
            except OSError as exc:
                self.connection_status = ConnectionStatus.ERROR
                self.last_error = str(exc)
                raise ProviderDisconnected(f"cannot listen on UDP {self.port}: {exc}") from exc
            self._queue = asyncio.Queue(QUEUE_LIMIT)
            self._receiver = _Receiver(self._queue)
            loop = asyncio.get_running_loop()
            receiver = self._receiver
            self._transport, _ = await loop.create_datagram_endpoint(lambda: receiver, sock=sock)
        self.connection_status = ConnectionStatus.CONNECTED
        log.info(
            "iex_listening",
            provider=self.config.name,
            source=self.pcap_path or f"udp://{self.multicast_group or self.host}:{self.port}",
            symbols=len(self.subscribed),
        )

    def _open_socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            if self.multicast_group is not None:
                # Several listeners may join one group on one port, as multicast intends; a
                # unicast port is ours alone, so another fleet's feed cannot mix into it.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # The kernel may cap the buffer size; the default still works.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            if self.multicast_group is not None:
                group = str(self.multicast_group)
                # Bound to the group, the socket gets only that group's traffic on the port.
                sock.bind((group, int(self.port)))  # type: ignore[arg-type]
                iface = socket.inet_aton(str(self.interface or "0.0.0.0"))
                membership = struct.pack("4s4s", socket.inet_aton(group), iface)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
            else:
                sock.bind((self.host, int(self.port)))  # type: ignore[arg-type]
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    async def subscribe(self, instruments: Sequence[Instrument]) -> None:
        # Nothing to send: the feed carries every symbol, the filter is local.
        for inst in instruments:
            self.subscribed[inst.symbol] = inst
        self._update_filters()

    async def unsubscribe(self, instruments: Sequence[Instrument]) -> None:
        for inst in instruments:
            self.subscribed.pop(inst.symbol, None)
        self._update_filters()

    def _update_filters(self) -> None:
        if self.all_symbols:
            self._quote_symbols = self._trade_symbols = None
            return
        subs = self.subscribed.values()
        self._quote_symbols = {i.symbol for i in subs if DataType.QUOTE in i.data_types}
        self._trade_symbols = {i.symbol for i in subs if DataType.TRADE in i.data_types}

    async def stream_batches(self) -> AsyncIterator[list[RawMarketData]]:
        if self._replay is not None:
            async for batch in self._replay_batches(self._replay):
                yield batch
            return
        queue = self._queue
        if queue is None:
            raise ProviderDisconnected("not connected")
        timeout = self.heartbeat_timeout_s
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), timeout)
            except TimeoutError:
                self._gone(f"no IEX-TP segment, not even a heartbeat, for {timeout:g}s")
            records: list[RawMarketData] = []
            taken = 0
            while item is not None:
                data, receive_ns = item
                self.bytes_received += len(data)
                records += self._decode(data, receive_ns)
                taken += 1
                if self.session_ended or taken == DATAGRAMS_PER_BATCH or queue.empty():
                    break
                item = queue.get_nowait()
            if records:
                yield records
            if item is None:
                self._gone("socket closed")
            if self.session_ended:
                self._gone("end of messages (System Event C)")

    def queue_depth(self) -> int:
        """Datagrams received from the socket and not yet decoded."""
        queue = self._queue or self._closed_queue
        return queue.qsize() if queue is not None else 0

    def take_queued(self) -> list[RawMarketData]:
        """The records in the datagrams received before ``disconnect`` and not yet read."""
        queue, self._closed_queue = self._closed_queue, None
        records: list[RawMarketData] = []
        while queue is not None and not queue.empty():
            item = queue.get_nowait()
            if item is not None:
                self.bytes_received += len(item[0])
                records += self._decode(item[0], item[1])
        return records

    async def _replay_batches(self, file: BinaryIO) -> AsyncIterator[list[RawMarketData]]:
        reader = pcap.PcapReader()
        recorded = self.replay_speed == "recorded"
        first_ts: int | None = None
        start = time.monotonic()
        since_yield = 0
        while True:
            chunk = await asyncio.to_thread(file.read, REPLAY_CHUNK)
            items = reader.feed(chunk) if chunk else reader.close()
            for item in items:
                if isinstance(item, CaptureError):
                    self.decode_errors += 1
                    log.warning(
                        "capture_error",
                        provider=self.config.name,
                        location=item.location,
                        reason=item.reason,
                    )
                    continue
                if recorded and item.timestamp_ns:
                    if first_ts is None:
                        first_ts = item.timestamp_ns
                    delay = (item.timestamp_ns - first_ts) / 1e9 - (time.monotonic() - start)
                    if delay > 0:
                        await asyncio.sleep(delay)
                        since_yield = 0
                records = self._decode(item.payload, time.time_ns())
                if records:
                    yield records
                since_yield += 1
                if since_yield >= 256:  # at max speed, let the rest of the loop run
                    since_yield = 0
                    await asyncio.sleep(0)
            if not chunk:
                self._gone(f"pcap replay finished ({reader.packets} packets)")

    def _decode(self, data: bytes, receive_ns: int) -> list[RawMarketData]:
        if self.tap is not None:  # every datagram passes here: socket, queue left over, pcap
            self.tap.record(FrameKind.UDP, data, receive_ns)
        name = self.config.name
        segment = codec.decode_segment(
            data,
            receive_ns,
            name,
            quote_symbols=self._quote_symbols,
            trade_symbols=self._trade_symbols,
        )
        if segment.errors:
            self.decode_errors += len(segment.errors)
            for err in segment.errors[:3]:
                log.warning("decode_error", provider=name, reason=err.reason, raw=err.raw)
        header = segment.header
        if header is None:
            return []
        self.segments_received += 1
        if header.message_count == 0:
            self.heartbeats_received += 1
        self.unknown_messages += segment.unknown
        self.skipped_messages += segment.skipped
        gap = self.tracker.admit(segment)
        if gap is not None:
            self.sequence_gaps += 1
            self.missing_messages += gap.missing
            log.warning(
                "sequence_gap",
                provider=name,
                stream=gap.stream,
                expected=gap.expected,
                received=gap.received,
                missing=gap.missing,
            )
        if segment.events:
            self._on_events(segment.events)
        return segment.records

    def _on_events(self, events: list[codec.MessageEvent]) -> None:
        self.events_received += len(events)
        name = self.config.name
        for event in events:
            if isinstance(event, codec.SystemEvent):
                log.info("system_event", provider=name, name=event.name, seq=event.sequence)
                if event.event == codec.END_OF_MESSAGES:
                    self.session_ended = True
            elif isinstance(event, codec.TradeBreak):
                log.warning(
                    "trade_break", provider=name, symbol=event.symbol, trade_id=event.trade_id
                )
            elif (
                isinstance(event, codec.TradingStatus | codec.OperationalHalt)
                and event.symbol in self.subscribed
            ):
                log.info("trading_status", provider=name, symbol=event.symbol, status=event.status)

    def _gone(self, reason: str) -> NoReturn:
        self.connection_status = ConnectionStatus.DISCONNECTED
        self.last_error = reason
        raise ProviderDisconnected(reason)

    async def disconnect(self) -> None:
        transport, replay = self._transport, self._replay
        self._transport = self._replay = None
        # Kept for take_queued: datagrams already received are not dropped with the socket.
        if self._queue is not None:
            self._closed_queue = self._queue
        self._queue = None
        if transport is not None:
            transport.close()
            # The socket closes on the loop's next turn: let it, so that a connect right
            # after (a reconnect) can bind the port again, which is ours alone.
            await asyncio.sleep(0)
        if replay is not None:
            replay.close()
        self.connection_status = ConnectionStatus.DISCONNECTED
