"""IEX TOPS 1.6 over IEX-TP v1 codec, sans-I/O.

One UDP datagram is one IEX-TP segment: a 40-byte header (``<BxHIIHHqqq``) and
``Message Count`` message blocks, each a uint16 length and the message; a heartbeat is a
segment with no messages. All integers little-endian, prices int64 with 4 implied decimals,
timestamps ns since the epoch, symbols 8 bytes space-padded. See ``shared/protocols.md`` 3.2.

Quote Update becomes a QUOTE record, Trade Report a TRADE record. The other TOPS messages
(system events, directory, trading status, halts, short-sale test, official prices, trade
breaks, auctions) become typed events: they describe the market, not ticks. Every message
has a sequence number (First Message Sequence Number + index), contiguous within
``channel:session``.

The adapter (``workers/iex.py``) and the simulator (``simulators/iex.py``) both use this
module; ``SessionEncoder`` is the sender's side.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass, field
from typing import Any

from common.codecs import pcap
from common.codecs.base import CaptureError, CodecError, DecodeError, clip
from common.model import DataType, RawMarketData

PROVIDER = "iex"

VERSION = 1
PROTOCOL_TOPS = 0x8003
PROTOCOL_DEEP = 0x8004

HEADER = struct.Struct("<BxHIIHHqqq")
HEADER_SIZE = HEADER.size  # 40
_BLOCK_LEN = struct.Struct("<H")

# Message layouts including the type byte (skipped with ``x``).
_SYSTEM_EVENT = struct.Struct("<xcq")  # 10
_SECURITY_DIRECTORY = struct.Struct("<xBq8sIqB")  # 31
_TRADING_STATUS = struct.Struct("<xcq8s4s")  # 22
_OPERATIONAL_HALT = struct.Struct("<xcq8s")  # 18
_SHORT_SALE = struct.Struct("<xBq8sc")  # 19
_QUOTE_UPDATE = struct.Struct("<xBq8sIqqI")  # 42
_TRADE_REPORT = struct.Struct("<xBq8sIqq")  # 38, also Trade Break
_OFFICIAL_PRICE = struct.Struct("<xcq8sq")  # 26
_AUCTION = struct.Struct("<xcq8sIqqIcBIqqqq")  # 80

SYSTEM_EVENTS = {
    "O": "start_of_messages",
    "S": "start_of_system_hours",
    "R": "start_of_regular_hours",
    "M": "end_of_regular_hours",
    "E": "end_of_system_hours",
    "C": "end_of_messages",
}
END_OF_MESSAGES = "C"

SALE_CONDITIONS = (
    (0x80, "iso"),
    (0x40, "extended_hours"),
    (0x20, "odd_lot"),
    (0x10, "trade_through_exempt"),
    (0x08, "single_price_cross"),
)
# DEEP-only messages (price levels, security events): known, not decoded on TOPS.
SKIPPED_TYPES = frozenset(b"85E")

_PRICE_SCALE = 10_000


# ---------------------------------------------------------------- events


@dataclass(slots=True)
class SegmentHeader:
    version: int
    protocol_id: int
    channel_id: int
    session_id: int
    payload_length: int
    message_count: int
    stream_offset: int
    first_sequence: int
    send_time_ns: int

    @property
    def stream(self) -> str:
        return f"{self.channel_id}:{self.session_id}"


@dataclass(slots=True)
class SystemEvent:
    """'S': session milestones; ``C`` (end of messages) means nothing more will follow."""

    sequence: int
    timestamp_ns: int
    event: str

    @property
    def name(self) -> str:
        return SYSTEM_EVENTS.get(self.event, "unknown")


@dataclass(slots=True)
class SecurityDirectory:
    sequence: int
    timestamp_ns: int
    symbol: str
    flags: int  # 0x80 test security, 0x40 when issued, 0x20 ETP
    round_lot_size: int
    adjusted_poc_price: float
    luld_tier: int


@dataclass(slots=True)
class TradingStatus:
    sequence: int
    timestamp_ns: int
    symbol: str
    status: str  # H halted, O order acceptance, P paused, T trading
    reason: str


@dataclass(slots=True)
class OperationalHalt:
    sequence: int
    timestamp_ns: int
    symbol: str
    status: str  # O halted, N not halted


@dataclass(slots=True)
class ShortSalePriceTest:
    sequence: int
    timestamp_ns: int
    symbol: str
    in_effect: bool
    detail: str


@dataclass(slots=True)
class OfficialPrice:
    sequence: int
    timestamp_ns: int
    symbol: str
    price_type: str  # Q opening, M closing
    price: float


@dataclass(slots=True)
class TradeBreak:
    """A trade earlier reported under ``trade_id`` is broken (cancelled)."""

    sequence: int
    timestamp_ns: int
    symbol: str
    sale_condition_flags: int
    size: int
    price: float
    trade_id: int


@dataclass(slots=True)
class AuctionInformation:
    sequence: int
    timestamp_ns: int
    symbol: str
    auction_type: str
    paired_shares: int
    reference_price: float
    indicative_clearing_price: float
    imbalance_shares: int
    imbalance_side: str
    extension_number: int
    scheduled_auction_time: int  # epoch seconds
    auction_book_clearing_price: float
    collar_reference_price: float
    lower_auction_collar: float
    upper_auction_collar: float


MessageEvent = (
    SystemEvent
    | SecurityDirectory
    | TradingStatus
    | OperationalHalt
    | ShortSalePriceTest
    | OfficialPrice
    | TradeBreak
    | AuctionInformation
)


@dataclass(slots=True)
class DecodedSegment:
    """One datagram. ``header`` is None when the datagram is not a valid segment at all;
    then its sequence numbers are unknown and it must not move sequence tracking."""

    header: SegmentHeader | None = None
    records: list[RawMarketData] = field(default_factory=list)
    events: list[MessageEvent] = field(default_factory=list)
    errors: list[DecodeError] = field(default_factory=list)
    skipped: int = 0  # known messages not decoded here (DEEP) or filtered out by symbol
    unknown: int = 0  # message types this codec does not know

    @property
    def heartbeat(self) -> bool:
        return self.header is not None and self.header.message_count == 0

    @property
    def end_of_messages(self) -> bool:
        return any(isinstance(e, SystemEvent) and e.event == END_OF_MESSAGES for e in self.events)


# ---------------------------------------------------------------- decoding


def decode_segment(
    data: bytes,
    receive_ns: int,
    provider: str = PROVIDER,
    *,
    quote_symbols: Container[str] | None = None,
    trade_symbols: Container[str] | None = None,
) -> DecodedSegment:
    """Decode one datagram. Never raises: bad parts become ``DecodeError`` entries.

    ``quote_symbols`` / ``trade_symbols`` keep only those symbols' records (None: all).
    """
    out = DecodedSegment()
    size = len(data)
    if size < HEADER_SIZE:
        out.errors.append(
            DecodeError(f"datagram of {size} bytes is shorter than a header", clip(data.hex()))
        )
        return out
    header = SegmentHeader(*HEADER.unpack_from(data))
    if header.version != VERSION:
        out.errors.append(
            DecodeError(
                f"IEX-TP version {header.version}, expected 1", clip(data[:HEADER_SIZE].hex())
            )
        )
        return out
    if HEADER_SIZE + header.payload_length != size:
        reason = f"payload length {header.payload_length} but datagram carries {size - HEADER_SIZE}"
        out.errors.append(DecodeError(reason, clip(data[:HEADER_SIZE].hex())))
        return out
    if header.message_count == 0 and header.payload_length:
        out.errors.append(DecodeError("payload without messages", clip(data[:HEADER_SIZE].hex())))
        return out
    out.header = header
    stream = header.stream
    pos = HEADER_SIZE
    for index in range(header.message_count):
        if pos + 2 > size:
            missing = header.message_count - index
            out.errors.append(
                DecodeError(f"payload ends before message {index} ({missing} missing)", "")
            )
            return out
        (length,) = _BLOCK_LEN.unpack_from(data, pos)
        pos += 2
        end = pos + length
        if length == 0 or end > size:
            out.errors.append(
                DecodeError(
                    f"message {index}: block length {length} overruns the payload",
                    clip(data[pos - 2 : pos + 40].hex()),
                )
            )
            return out
        sequence = header.first_sequence + index
        mtype = data[pos]
        decoder = _DECODERS.get(mtype)
        if decoder is None:
            if mtype in SKIPPED_TYPES:
                out.skipped += 1
            else:
                out.unknown += 1
        else:
            layout, decode = decoder
            if length < layout.size:
                out.errors.append(
                    DecodeError(
                        f"message {chr(mtype)!r} of {length} bytes, needs {layout.size}",
                        clip(data[pos:end].hex()),
                    )
                )
            else:
                try:
                    decode(
                        out,
                        layout.unpack_from(data, pos),
                        sequence,
                        stream,
                        provider,
                        receive_ns,
                        quote_symbols,
                        trade_symbols,
                    )
                except CodecError as exc:
                    out.errors.append(DecodeError(str(exc), clip(data[pos:end].hex())))
        pos = end
    if pos != size:
        out.errors.append(
            DecodeError(f"{size - pos} bytes after the last message", clip(data[pos:].hex()))
        )
    return out


def _symbol(raw: bytes) -> str:
    try:
        symbol = raw.rstrip(b" \x00").decode("ascii")
    except UnicodeDecodeError:
        raise CodecError(f"symbol {raw!r} is not ASCII") from None
    if not symbol or not symbol.isprintable():
        raise CodecError(f"invalid symbol {raw!r}")
    return symbol


def _char(raw: bytes) -> str:
    return raw.decode("latin-1")


def _text(raw: bytes) -> str:
    return raw.decode("latin-1").rstrip(" \x00")


def _timestamp(ts: int) -> int:
    if ts <= 0:
        raise CodecError(f"invalid timestamp {ts}")
    return ts


def _price(raw: int) -> float:
    return raw / _PRICE_SCALE


def sale_conditions(flags: int) -> list[str]:
    return [name for bit, name in SALE_CONDITIONS if flags & bit]


_Fields = tuple[Any, ...]


def _decode_quote(
    out: DecodedSegment,
    f: _Fields,
    seq: int,
    stream: str,
    provider: str,
    receive_ns: int,
    quote_symbols: Container[str] | None,
    trade_symbols: Container[str] | None,
) -> None:
    flags, ts, sym, bid_size, bid_px, ask_px, ask_size = f
    symbol = _symbol(sym)
    if quote_symbols is not None and symbol not in quote_symbols:
        out.skipped += 1
        return
    # An empty side is sent as price 0 and size 0: no price, not a price of zero.
    bid = _price(bid_px) if bid_px else None
    ask = _price(ask_px) if ask_px else None
    specific = {"bid_size": bid_size, "ask_size": ask_size, "flags": flags}
    out.records.append(
        RawMarketData(
            symbol,
            provider,
            _timestamp(ts),
            DataType.QUOTE,
            None,
            None,
            bid,
            ask,
            specific,
            seq,
            stream,
            True,
            receive_ns,
        )
    )


def _decode_trade(
    out: DecodedSegment,
    f: _Fields,
    seq: int,
    stream: str,
    provider: str,
    receive_ns: int,
    quote_symbols: Container[str] | None,
    trade_symbols: Container[str] | None,
) -> None:
    flags, ts, sym, size, price, trade_id = f
    symbol = _symbol(sym)
    if trade_symbols is not None and symbol not in trade_symbols:
        out.skipped += 1
        return
    specific = {
        "trade_id": trade_id,
        "sale_condition_flags": flags,
        "sale_conditions": sale_conditions(flags),
    }
    out.records.append(
        RawMarketData(
            symbol,
            provider,
            _timestamp(ts),
            DataType.TRADE,
            _price(price),
            float(size),
            None,
            None,
            specific,
            seq,
            stream,
            True,
            receive_ns,
        )
    )


def _decode_system_event(out: DecodedSegment, f: _Fields, seq: int, *_: Any) -> None:
    event, ts = f
    out.events.append(SystemEvent(seq, _timestamp(ts), _char(event)))


def _decode_directory(out: DecodedSegment, f: _Fields, seq: int, *_: Any) -> None:
    flags, ts, sym, round_lot, poc, tier = f
    out.events.append(
        SecurityDirectory(seq, _timestamp(ts), _symbol(sym), flags, round_lot, _price(poc), tier)
    )


def _decode_trading_status(out: DecodedSegment, f: _Fields, seq: int, *_: Any) -> None:
    status, ts, sym, reason = f
    out.events.append(
        TradingStatus(seq, _timestamp(ts), _symbol(sym), _char(status), _text(reason))
    )


def _decode_operational_halt(out: DecodedSegment, f: _Fields, seq: int, *_: Any) -> None:
    status, ts, sym = f
    out.events.append(OperationalHalt(seq, _timestamp(ts), _symbol(sym), _char(status)))


def _decode_short_sale(out: DecodedSegment, f: _Fields, seq: int, *_: Any) -> None:
    status, ts, sym, detail = f
    out.events.append(
        ShortSalePriceTest(seq, _timestamp(ts), _symbol(sym), bool(status), _text(detail))
    )


def _decode_official_price(out: DecodedSegment, f: _Fields, seq: int, *_: Any) -> None:
    price_type, ts, sym, price = f
    out.events.append(
        OfficialPrice(seq, _timestamp(ts), _symbol(sym), _char(price_type), _price(price))
    )


def _decode_trade_break(out: DecodedSegment, f: _Fields, seq: int, *_: Any) -> None:
    flags, ts, sym, size, price, trade_id = f
    out.events.append(
        TradeBreak(seq, _timestamp(ts), _symbol(sym), flags, size, _price(price), trade_id)
    )


def _decode_auction(out: DecodedSegment, f: _Fields, seq: int, *_: Any) -> None:
    (atype, ts, sym, paired, ref, icp, imbalance, side, ext, sched, book, collar, lower, upper) = f
    out.events.append(
        AuctionInformation(
            seq,
            _timestamp(ts),
            _symbol(sym),
            _char(atype),
            paired,
            _price(ref),
            _price(icp),
            imbalance,
            _text(side),
            ext,
            sched,
            _price(book),
            _price(collar),
            _price(lower),
            _price(upper),
        )
    )


_DECODERS: dict[int, tuple[struct.Struct, Callable[..., None]]] = {
    0x51: (_QUOTE_UPDATE, _decode_quote),
    0x54: (_TRADE_REPORT, _decode_trade),
    0x53: (_SYSTEM_EVENT, _decode_system_event),
    0x44: (_SECURITY_DIRECTORY, _decode_directory),
    0x48: (_TRADING_STATUS, _decode_trading_status),
    0x4F: (_OPERATIONAL_HALT, _decode_operational_halt),
    0x50: (_SHORT_SALE, _decode_short_sale),
    0x58: (_OFFICIAL_PRICE, _decode_official_price),
    0x42: (_TRADE_REPORT, _decode_trade_break),
    0x41: (_AUCTION, _decode_auction),
}


# ---------------------------------------------------------------- sequence tracking


@dataclass(slots=True)
class SequenceGap:
    stream: str
    expected: int
    received: int

    @property
    def missing(self) -> int:
        return self.received - self.expected


class SequenceTracker:
    """Expected next message sequence per ``channel:session``, across datagrams.

    ``admit`` finds gaps (a segment, heartbeats included, whose first sequence is past the
    expected one), drops messages already seen (duplicate or retransmitted segments), and
    keeps the records' ``sequence_contiguous`` honest for ``QualityChecker``: when the
    messages between two records were received but not turned into records (events, other
    symbols), the jump is not a gap, so that record is marked non-contiguous; after a real
    gap it stays contiguous and the checker flags it.
    """

    def __init__(self) -> None:
        self._next: dict[str, int] = {}
        self._last_record: dict[str, int] = {}
        self._gap_pending: set[str] = set()

    def expected(self, stream: str) -> int | None:
        return self._next.get(stream)

    def admit(self, segment: DecodedSegment) -> SequenceGap | None:
        header = segment.header
        if header is None:
            return None
        stream = header.stream
        first = header.first_sequence
        end = first + header.message_count
        expected = self._next.get(stream)
        gap = None
        if expected is not None and first > expected:
            gap = SequenceGap(stream, expected, first)
            self._gap_pending.add(stream)
        if expected is None or end > expected:
            self._next[stream] = end
        if expected is not None and first < expected:
            segment.records = [r for r in segment.records if r.provider_sequence >= expected]  # type: ignore[operator]
            segment.events = [e for e in segment.events if e.sequence >= expected]
        last = self._last_record.get(stream)
        for record in segment.records:
            seq = record.provider_sequence
            assert seq is not None
            if last is not None and seq > last + 1:
                if stream in self._gap_pending:
                    self._gap_pending.discard(stream)
                else:
                    record.sequence_contiguous = False
            last = seq
        if last is not None:
            self._last_record[stream] = last
        return gap


# ---------------------------------------------------------------- capture files


def decode_capture(
    data: bytes, *, symbol: str | None = None
) -> Iterator[RawMarketData | CaptureError]:
    """A pcap/pcapng capture (gzip or not) of IEX-TP datagrams (``feedfleet decode iex``).

    ``receive_ns`` is the capture time of each packet. Gaps between segments are reported
    as errors at the packet's offset, since they mean the capture lost data.
    """
    wanted = None if symbol is None else {symbol}
    tracker = SequenceTracker()
    for item in pcap.read_udp(data):
        if isinstance(item, CaptureError):
            yield item
            continue
        segment = decode_segment(
            item.payload, item.timestamp_ns, quote_symbols=wanted, trade_symbols=wanted
        )
        for err in segment.errors:
            yield CaptureError(f"offset {item.offset}", err.reason)
        gap = tracker.admit(segment)
        if gap is not None:
            yield CaptureError(
                f"offset {item.offset}",
                f"sequence gap on {gap.stream}: expected {gap.expected}, got {gap.received}",
            )
        yield from segment.records


# ---------------------------------------------------------------- encoding (sender side)


def _sym(symbol: str) -> bytes:
    raw = symbol.encode("ascii")
    if len(raw) > 8:
        raise CodecError(f"symbol {symbol!r} is longer than 8 characters")
    return raw.ljust(8, b" ")


def _px(price: float) -> int:
    return round(price * _PRICE_SCALE)


def encode_system_event(event: str, timestamp_ns: int) -> bytes:
    return _with_type(b"S", _SYSTEM_EVENT, event.encode("latin-1"), timestamp_ns)


def _with_type(mtype: bytes, layout: struct.Struct, *fields: Any) -> bytes:
    return mtype + layout.pack(*fields)[1:]


def encode_security_directory(
    symbol: str,
    timestamp_ns: int,
    *,
    flags: int = 0,
    round_lot_size: int = 100,
    adjusted_poc_price: float = 0.0,
    luld_tier: int = 1,
) -> bytes:
    return _with_type(
        b"D",
        _SECURITY_DIRECTORY,
        flags,
        timestamp_ns,
        _sym(symbol),
        round_lot_size,
        _px(adjusted_poc_price),
        luld_tier,
    )


def encode_trading_status(
    symbol: str, timestamp_ns: int, status: str = "T", reason: str = ""
) -> bytes:
    return _with_type(
        b"H",
        _TRADING_STATUS,
        status.encode("latin-1"),
        timestamp_ns,
        _sym(symbol),
        reason.encode("latin-1").ljust(4, b" "),
    )


def encode_operational_halt(symbol: str, timestamp_ns: int, status: str = "O") -> bytes:
    return _with_type(b"O", _OPERATIONAL_HALT, status.encode("latin-1"), timestamp_ns, _sym(symbol))


def encode_short_sale_price_test(
    symbol: str, timestamp_ns: int, in_effect: bool, detail: str = " "
) -> bytes:
    return _with_type(
        b"P", _SHORT_SALE, int(in_effect), timestamp_ns, _sym(symbol), detail.encode("latin-1")
    )


def encode_quote_update(
    symbol: str,
    timestamp_ns: int,
    bid: float,
    bid_size: int,
    ask: float,
    ask_size: int,
    *,
    flags: int = 0,
) -> bytes:
    return _with_type(
        b"Q",
        _QUOTE_UPDATE,
        flags,
        timestamp_ns,
        _sym(symbol),
        bid_size,
        _px(bid),
        _px(ask),
        ask_size,
    )


def encode_trade_report(
    symbol: str, timestamp_ns: int, price: float, size: int, trade_id: int, *, flags: int = 0
) -> bytes:
    return _with_type(
        b"T", _TRADE_REPORT, flags, timestamp_ns, _sym(symbol), size, _px(price), trade_id
    )


def encode_trade_break(
    symbol: str, timestamp_ns: int, price: float, size: int, trade_id: int, *, flags: int = 0
) -> bytes:
    return _with_type(
        b"B", _TRADE_REPORT, flags, timestamp_ns, _sym(symbol), size, _px(price), trade_id
    )


def encode_official_price(symbol: str, timestamp_ns: int, price_type: str, price: float) -> bytes:
    return _with_type(
        b"X", _OFFICIAL_PRICE, price_type.encode("latin-1"), timestamp_ns, _sym(symbol), _px(price)
    )


def encode_auction_information(
    symbol: str,
    timestamp_ns: int,
    *,
    auction_type: str = "C",
    paired_shares: int = 0,
    reference_price: float = 0.0,
    indicative_clearing_price: float = 0.0,
    imbalance_shares: int = 0,
    imbalance_side: str = "N",
    extension_number: int = 0,
    scheduled_auction_time: int = 0,
    auction_book_clearing_price: float = 0.0,
    collar_reference_price: float = 0.0,
    lower_auction_collar: float = 0.0,
    upper_auction_collar: float = 0.0,
) -> bytes:
    return _with_type(
        b"A",
        _AUCTION,
        auction_type.encode("latin-1"),
        timestamp_ns,
        _sym(symbol),
        paired_shares,
        _px(reference_price),
        _px(indicative_clearing_price),
        imbalance_shares,
        imbalance_side.encode("latin-1"),
        extension_number,
        scheduled_auction_time,
        _px(auction_book_clearing_price),
        _px(collar_reference_price),
        _px(lower_auction_collar),
        _px(upper_auction_collar),
    )


def encode_segment(
    messages: list[bytes],
    *,
    channel_id: int,
    session_id: int,
    stream_offset: int,
    first_sequence: int,
    send_time_ns: int,
    protocol_id: int = PROTOCOL_TOPS,
) -> bytes:
    payload = b"".join(_BLOCK_LEN.pack(len(m)) + m for m in messages)
    header = HEADER.pack(
        VERSION,
        protocol_id,
        channel_id,
        session_id,
        len(payload),
        len(messages),
        stream_offset,
        first_sequence,
        send_time_ns,
    )
    return header + payload


class SessionEncoder:
    """The sender's state for one ``channel:session``: next sequence number and stream offset.

    Sequence numbers start at 1; the stream offset counts payload bytes sent before a segment.
    A heartbeat carries the next sequence number to be sent and sends no payload.
    """

    def __init__(self, channel_id: int, session_id: int, protocol_id: int = PROTOCOL_TOPS) -> None:
        self.channel_id = channel_id
        self.session_id = session_id
        self.protocol_id = protocol_id
        self.next_sequence = 1
        self.stream_offset = 0

    def segment(self, messages: list[bytes], send_time_ns: int) -> bytes:
        data = encode_segment(
            messages,
            channel_id=self.channel_id,
            session_id=self.session_id,
            stream_offset=self.stream_offset,
            first_sequence=self.next_sequence,
            send_time_ns=send_time_ns,
            protocol_id=self.protocol_id,
        )
        self.next_sequence += len(messages)
        self.stream_offset += len(data) - HEADER_SIZE
        return data

    def heartbeat(self, send_time_ns: int) -> bytes:
        return self.segment([], send_time_ns)

    def skip(self, messages: int, payload_bytes: int = 0) -> None:
        """Lose ``messages`` messages, as a receiver behind a lossy network would see it."""
        self.next_sequence += messages
        self.stream_offset += payload_bytes
