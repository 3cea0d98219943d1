"""IEX TOPS 1.6 / IEX-TP codec and the pcap reader/writer."""

from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.codecs import iex, pcap
from common.codecs.base import CaptureError, DecodeError
from common.model import DataType, QualityFlag, RawMarketData
from common.quality import QualityChecker
from simulators.iex import IexSimConfig, build_capture
from simulators.market import Faults
from tests import SHARED

SAMPLES = Path(__file__).parent / "samples"
TS = 1_471_980_632_572_715_948  # the spec example's timestamp, 2016-08-23 19:30:32.572715948
# Quote Update example from the IEX TOPS specification (protocols.md 3.2).
SPEC_QUOTE_HEX = (
    "51 00 ac63c02096866d14 5a49455854202020 e4250000 241d0f0000000000 ec1d0f0000000000 e8030000"
)
SPEC_QUOTE = bytes.fromhex(SPEC_QUOTE_HEX.replace(" ", ""))
# Written field by field from the documented layouts (protocols.md 3.2: little-endian, prices
# int64 with 4 implied decimals, times ns since the epoch), not by our encoder, so a mistake
# made alike in the encoder and the decoder shows here.
TRADE_TS = 1_471_980_632_600_012_345
TRADE_REPORT = bytes.fromhex(
    "54"  # type 'T'
    "60"  # sale condition flags: 0x40 extended hours | 0x20 odd lot
    "39e6602296866d14"  # timestamp 1471980632600012345
    "5a49455854202020"  # symbol "ZIEXT   "
    "25000000"  # size 37
    "3d1d0f0000000000"  # price 990525 = 99.0525
    "968f060000000000"  # trade id 429974
)
SEND_TS = 1_471_980_632_600_020_000
SEGMENT_HEADER = bytes.fromhex(
    "01"  # version 1
    "00"  # reserved
    "0380"  # message protocol id 0x8003 (TOPS 1.6)
    "01000000"  # channel id 1
    "0000c744"  # session id 0x44C70000
    "5400"  # payload length 84 = 2 + 42 + 2 + 38
    "0200"  # message count 2
    "87d6120000000000"  # stream offset 1234567
    "e803000000000000"  # first message sequence number 1000
    "2004612296866d14"  # send time 1471980632600020000
)
SEGMENT = SEGMENT_HEADER + b"\x2a\x00" + SPEC_QUOTE + b"\x26\x00" + TRADE_REPORT


def read_hex_sample(path: Path) -> bytes:
    """A hex dump with ``#`` comments (tests/samples/*.hex) as bytes."""
    lines = (line.partition("#")[0] for line in path.read_text().splitlines())
    return bytes.fromhex("".join("".join(line.split()) for line in lines))


def segment(messages: list[bytes], first: int = 1, session: int = 7) -> bytes:
    return iex.encode_segment(
        messages, channel_id=1, session_id=session, stream_offset=0, first_sequence=first,
        send_time_ns=TS + 1,
    )  # fmt: skip


def test_spec_quote_update_decodes_exactly() -> None:
    out = iex.decode_segment(segment([SPEC_QUOTE], first=5), receive_ns=123)
    assert out.errors == [] and out.unknown == 0
    (quote,) = out.records
    assert quote.symbol == "ZIEXT"
    assert quote.data_type is DataType.QUOTE
    assert quote.timestamp_ns == TS
    assert quote.bid == 99.05 and quote.ask == 99.07
    assert quote.provider_specific == {"bid_size": 9700, "ask_size": 1000, "flags": 0}
    assert (quote.provider_sequence, quote.stream, quote.sequence_contiguous) == (5, "1:7", True)
    assert quote.receive_ns == 123 and quote.provider == "iex"
    assert quote.price is None and quote.volume is None


def test_spec_quote_update_encodes_to_the_same_bytes() -> None:
    assert iex.encode_quote_update("ZIEXT", TS, 99.05, 9700, 99.07, 1000) == SPEC_QUOTE


def test_spec_example_is_the_one_in_protocols_md() -> None:
    doc = SHARED / "protocols.md"
    if not doc.exists():
        pytest.skip(f"{doc} not found (shared folder absent)")
    assert SPEC_QUOTE_HEX in doc.read_text()


def test_trade_report_from_the_layout_decodes_exactly() -> None:
    out = iex.decode_segment(segment([TRADE_REPORT], first=42), receive_ns=7)
    assert out.errors == [] and out.unknown == 0 and out.events == []
    (trade,) = out.records
    assert trade == RawMarketData(
        symbol="ZIEXT", provider="iex", timestamp_ns=TRADE_TS, data_type=DataType.TRADE,
        price=99.0525, volume=37.0, bid=None, ask=None,
        provider_specific={"trade_id": 429974, "sale_condition_flags": 0x60,
                           "sale_conditions": ["extended_hours", "odd_lot"]},
        provider_sequence=42, stream="1:7", sequence_contiguous=True, receive_ns=7,
    )  # fmt: skip


def test_trade_report_encodes_to_the_same_bytes() -> None:
    assert iex.encode_trade_report("ZIEXT", TRADE_TS, 99.0525, 37, 429974, flags=0x60) == (
        TRADE_REPORT
    )


def test_segment_from_the_layout_decodes_exactly() -> None:
    out = iex.decode_segment(SEGMENT, receive_ns=9)
    assert out.errors == [] and out.skipped == 0 and out.unknown == 0
    assert out.header == iex.SegmentHeader(
        version=1, protocol_id=0x8003, channel_id=1, session_id=0x44C70000, payload_length=84,
        message_count=2, stream_offset=1234567, first_sequence=1000, send_time_ns=SEND_TS,
    )  # fmt: skip
    quote, trade = out.records
    assert (quote.data_type, quote.symbol, quote.timestamp_ns) == (DataType.QUOTE, "ZIEXT", TS)
    assert (quote.bid, quote.ask) == (99.05, 99.07)
    assert (trade.data_type, trade.timestamp_ns, trade.price, trade.volume) == (
        DataType.TRADE, TRADE_TS, 99.0525, 37.0,
    )  # fmt: skip
    # Sequence numbers are First Message Sequence Number + index, per channel:session.
    assert [(r.provider_sequence, r.stream) for r in out.records] == [
        (1000, "1:1153892352"), (1001, "1:1153892352"),
    ]  # fmt: skip


def test_segment_encodes_to_the_same_bytes() -> None:
    encoded = iex.encode_segment(
        [SPEC_QUOTE, TRADE_REPORT], channel_id=1, session_id=0x44C70000,
        stream_offset=1234567, first_sequence=1000, send_time_ns=SEND_TS,
    )  # fmt: skip
    assert encoded == SEGMENT


def capture_files() -> list[Path]:
    """IEX captures in shared/fixtures when that folder has any, and our samples always."""
    shared = sorted((SHARED / "fixtures").glob("iex*")) if (SHARED / "fixtures").is_dir() else []
    return shared + sorted(SAMPLES.glob("iex*"))


# What each sample in tests/samples decodes to: (type, symbol, ts, price, volume, bid, ask,
# sequence, stream, receive_ns).
SAMPLE_RECORDS = {
    "iex_tops16.pcap.hex": [
        (DataType.QUOTE, "ZIEXT", TS, None, None, 99.05, 99.07, 1000, "1:1153892352",
         1_471_980_632_600_030_000),
        (DataType.TRADE, "ZIEXT", TRADE_TS, 99.0525, 37.0, None, None, 1001, "1:1153892352",
         1_471_980_632_600_030_000),
    ],
}  # fmt: skip


@pytest.mark.parametrize("path", capture_files(), ids=lambda p: p.name)
def test_capture_files_decode(path: Path) -> None:
    data = read_hex_sample(path) if path.suffix == ".hex" else path.read_bytes()
    items = list(iex.decode_capture(data))
    assert [i for i in items if isinstance(i, CaptureError)] == [], path
    records = [i for i in items if isinstance(i, RawMarketData)]
    assert records, path
    if path.parent == SAMPLES:
        got = [(r.data_type, r.symbol, r.timestamp_ns, r.price, r.volume, r.bid, r.ask,
                r.provider_sequence, r.stream, r.receive_ns) for r in records]  # fmt: skip
        assert got == SAMPLE_RECORDS[path.name]


def test_every_sample_has_expected_records() -> None:
    assert sorted(p.name for p in SAMPLES.glob("iex*")) == sorted(SAMPLE_RECORDS)


def test_sample_capture_carries_the_segment_written_above() -> None:
    (first, heartbeat) = pcap.read_udp(read_hex_sample(SAMPLES / "iex_tops16.pcap.hex"))
    assert isinstance(first, pcap.UdpDatagram) and isinstance(heartbeat, pcap.UdpDatagram)
    assert first.payload == SEGMENT
    assert (first.src, first.dst) == (("10.1.2.3", 10378), ("233.215.21.4", 10378))
    out = iex.decode_segment(heartbeat.payload, 0)
    assert out.heartbeat and out.header is not None
    assert (out.header.first_sequence, out.header.stream_offset) == (1002, 1234567 + 84)


def test_header_layout() -> None:
    data = iex.encode_segment(
        [SPEC_QUOTE], channel_id=1, session_id=0x44C70000, stream_offset=1234,
        first_sequence=99, send_time_ns=TS,
    )  # fmt: skip
    assert len(data) == 40 + 2 + 42
    assert data[:4] == b"\x01\x00\x03\x80"  # version 1, reserved, protocol 0x8003 (TOPS 1.6)
    assert struct.unpack_from("<HH", data, 12) == (44, 1)
    header = iex.decode_segment(data, 0).header
    assert header == iex.SegmentHeader(1, 0x8003, 1, 0x44C70000, 44, 1, 1234, 99, TS)


def test_trade_report() -> None:
    msg = iex.encode_trade_report("AAPL", TS, 187.1234, 300, 429974, flags=0x80 | 0x20)
    assert len(msg) == 38
    (trade,) = iex.decode_segment(segment([msg], first=10), 1).records
    assert trade.data_type is DataType.TRADE
    assert (trade.symbol, trade.price, trade.volume) == ("AAPL", 187.1234, 300.0)
    assert trade.provider_specific == {
        "trade_id": 429974, "sale_condition_flags": 0xA0, "sale_conditions": ["iso", "odd_lot"],
    }  # fmt: skip
    assert trade.provider_sequence == 10 and trade.bid is None


def test_every_event_kind_round_trips() -> None:
    messages = [
        iex.encode_system_event("O", TS),
        iex.encode_security_directory("ZIEXT", TS, flags=0x80, round_lot_size=100,
                                      adjusted_poc_price=99.05, luld_tier=1),
        iex.encode_trading_status("ZIEXT", TS, "H", "T1"),
        iex.encode_operational_halt("ZIEXT", TS, "O"),
        iex.encode_short_sale_price_test("ZIEXT", TS, True, "A"),
        iex.encode_official_price("ZIEXT", TS, "Q", 99.1),
        iex.encode_trade_break("ZIEXT", TS, 99.05, 100, 77, flags=0x40),
        iex.encode_auction_information(
            "ZIEXT", TS, auction_type="O", paired_shares=5000, reference_price=99.0,
            indicative_clearing_price=99.01, imbalance_shares=300, imbalance_side="B",
            extension_number=1, scheduled_auction_time=1471980600,
            auction_book_clearing_price=99.02, collar_reference_price=99.03,
            lower_auction_collar=89.1, upper_auction_collar=108.9,
        ),
        iex.encode_system_event("C", TS),
    ]  # fmt: skip
    assert [len(m) for m in messages] == [10, 31, 22, 18, 19, 26, 38, 80, 10]
    out = iex.decode_segment(segment(messages, first=100), 0)
    assert out.errors == [] and out.records == []
    assert out.events == [
        iex.SystemEvent(100, TS, "O"),
        iex.SecurityDirectory(101, TS, "ZIEXT", 0x80, 100, 99.05, 1),
        iex.TradingStatus(102, TS, "ZIEXT", "H", "T1"),
        iex.OperationalHalt(103, TS, "ZIEXT", "O"),
        iex.ShortSalePriceTest(104, TS, "ZIEXT", True, "A"),
        iex.OfficialPrice(105, TS, "ZIEXT", "Q", 99.1),
        iex.TradeBreak(106, TS, "ZIEXT", 0x40, 100, 99.05, 77),
        iex.AuctionInformation(107, TS, "ZIEXT", "O", 5000, 99.0, 99.01, 300, "B", 1,
                               1471980600, 99.02, 99.03, 89.1, 108.9),
        iex.SystemEvent(108, TS, "C"),
    ]  # fmt: skip
    assert out.events[0].name == "start_of_messages"  # type: ignore[union-attr]
    assert out.end_of_messages


@pytest.mark.parametrize(
    ("field", "text"),
    [(b"T1  ", "T1"), (b"T1\0\0", "T1"), (b"IPO1", "IPO1"), (b"XX  ", "XX"), (b"    ", "")],
)
def test_text_fields_lose_only_their_padding(field: bytes, text: str) -> None:
    # Alpha fields are left-justified and padded with spaces (zero bytes in some captures).
    msg = iex.encode_trading_status("ZIEXT", TS, "H")[:-4] + field
    (event,) = iex.decode_segment(segment([msg]), 0).events
    assert event == iex.TradingStatus(1, TS, "ZIEXT", "H", text)


def test_heartbeat_segment() -> None:
    enc = iex.SessionEncoder(1, 9)
    enc.segment([SPEC_QUOTE, SPEC_QUOTE], TS)
    hb = enc.heartbeat(TS + 5)
    assert len(hb) == 40
    out = iex.decode_segment(hb, 0)
    assert out.heartbeat and out.errors == [] and out.records == []
    assert out.header is not None
    # A heartbeat carries the next sequence number and the current stream offset.
    assert (out.header.first_sequence, out.header.stream_offset) == (3, 88)


def test_heartbeat_and_end_of_messages_only_when_so() -> None:
    data = iex.decode_segment(segment([SPEC_QUOTE, iex.encode_system_event("E", TS)]), 0)
    assert (data.heartbeat, data.end_of_messages) == (False, False)
    assert data.header is not None and data.header.stream == "1:7"
    broken = iex.decode_segment(b"", 0)
    assert (broken.heartbeat, broken.end_of_messages) == (False, False)
    end = iex.decode_segment(segment([iex.encode_system_event("C", TS)]), 0)
    assert (end.heartbeat, end.end_of_messages) == (False, True)


def test_zero_price_side_is_no_price() -> None:
    msg = iex.encode_quote_update("ZIEXT", TS, 0.0, 0, 99.07, 1000)
    (quote,) = iex.decode_segment(segment([msg]), 0).records
    assert quote.bid is None and quote.ask == 99.07


def test_unknown_and_deep_types_are_counted_and_skipped() -> None:
    deep_level = b"8" + bytes(29)
    unknown = b"Z" + bytes(9)
    out = iex.decode_segment(segment([unknown, SPEC_QUOTE, deep_level]), 0)
    assert out.errors == [] and out.unknown == 1 and out.skipped == 1
    assert [r.provider_sequence for r in out.records] == [2]
    out = iex.decode_segment(segment([deep_level, unknown, unknown, deep_level, SPEC_QUOTE]), 0)
    assert (out.unknown, out.skipped, len(out.records)) == (2, 2, 1)
    # Told apart: one unknown message beside three known ones not decoded (DEEP levels).
    out = iex.decode_segment(segment([deep_level, unknown, deep_level, deep_level]), 0)
    assert (out.unknown, out.skipped, out.records) == (1, 3, [])


def test_symbol_filter() -> None:
    other = iex.encode_quote_update("MSFT", TS, 1.0, 1, 2.0, 1)
    trade = iex.encode_trade_report("ZIEXT", TS, 99.0, 1, 1)
    out = iex.decode_segment(
        segment([SPEC_QUOTE, other, trade]), 0, quote_symbols={"ZIEXT"}, trade_symbols=set()
    )
    assert [r.symbol for r in out.records] == ["ZIEXT"] and out.skipped == 2


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "shorter than a header"),
        (segment([SPEC_QUOTE])[:39], "shorter than a header"),
        (b"\x02" + segment([SPEC_QUOTE])[1:], "version 2"),
        (segment([SPEC_QUOTE])[:60], "payload length 44 but datagram carries 20"),
        (segment([SPEC_QUOTE]) + b"\0", "payload length 44 but datagram carries 45"),
    ],
)
def test_bad_datagrams_are_errors_without_header(data: bytes, reason: str) -> None:
    out = iex.decode_segment(data, 0)
    assert out.header is None and out.records == []
    assert len(out.errors) == 1 and reason in out.errors[0].reason


def header_only(payload_length: int, count: int) -> bytes:
    """A segment header claiming ``payload_length`` bytes and ``count`` messages."""
    data = bytearray(segment([]))
    struct.pack_into("<HH", data, 12, payload_length, count)
    return bytes(data)


HEADER_HEX = header_only(44, 1).hex()


@pytest.mark.parametrize(
    ("data", "error", "sequences"),
    [
        (segment([SPEC_QUOTE])[:39],
         DecodeError("datagram of 39 bytes is shorter than a header", HEADER_HEX[:78]), None),
        (b"\x02" + segment([SPEC_QUOTE])[1:],
         DecodeError("IEX-TP version 2, expected 1", "02" + HEADER_HEX[2:]), None),
        (segment([SPEC_QUOTE]) + b"\0",
         DecodeError("payload length 44 but datagram carries 45", HEADER_HEX), None),
        (header_only(3, 0) + b"abc",
         DecodeError("payload without messages", header_only(3, 0).hex()), None),
        # The header is good: what decoded before the damage is kept.
        (header_only(45, 3) + b"\x2a\x00" + SPEC_QUOTE + b"\x01",
         DecodeError("payload ends before message 1 (2 missing)", ""), [1]),
        (header_only(46, 3) + b"\x2a\x00" + SPEC_QUOTE + b"\x01\x00",
         DecodeError("message 1: block length 1 overruns the payload", "0100"), [1]),
        (header_only(2, 1) + b"\x00\x00",
         DecodeError("message 0: block length 0 overruns the payload", "0000"), []),
        (header_only(47, 1) + b"\x2a\x00" + SPEC_QUOTE + b"xyz",
         DecodeError("3 bytes after the last message", "78797a"), [1]),
        (segment([SPEC_QUOTE[:41], SPEC_QUOTE]),
         DecodeError("message 'Q' of 41 bytes, needs 42", SPEC_QUOTE[:41].hex()), [2]),
    ],
)  # fmt: skip
def test_damaged_segments_report_exactly_what_is_wrong(
    data: bytes, error: DecodeError, sequences: list[int] | None
) -> None:
    out = iex.decode_segment(data, 5)
    assert out.errors == [error]
    if sequences is None:
        assert out.header is None and out.records == []
    else:
        assert out.header is not None
        assert [(r.provider_sequence, r.receive_ns) for r in out.records] == [
            (seq, 5) for seq in sequences
        ]


def test_bad_messages_are_errors_and_decoding_continues() -> None:
    short_quote = SPEC_QUOTE[:30]
    bad_symbol = iex.encode_trade_report("ZIEXT", TS, 1.0, 1, 1).replace(
        b"ZIEXT", b"\xff\xfe\xfd\xfc\xfb"
    )
    zero_ts = iex.encode_trade_report("ZIEXT", 0, 1.0, 1, 1)
    out = iex.decode_segment(segment([short_quote, bad_symbol, zero_ts, SPEC_QUOTE]), 0)
    reasons = [e.reason for e in out.errors]
    assert "needs 42" in reasons[0] and "not ASCII" in reasons[1] and "timestamp" in reasons[2]
    assert [r.provider_sequence for r in out.records] == [4]


@pytest.mark.parametrize(
    ("symbol", "ts", "result"),
    [
        (b"ZIEXT\0\0\0", TS, ("ZIEXT", TS)),  # NUL padding is padding too
        (b"BRK.B   ", 1, ("BRK.B", 1)),
        (b"FOX     ", TS, ("FOX", TS)),
        (b" " * 8, TS, "invalid symbol b'        '"),
        (b"\0" * 8, TS, "invalid symbol b'" + "\\x00" * 8 + "'"),
        (b"ZI\x01XT   ", TS, "invalid symbol b'ZI\\x01XT   '"),
        (b"\xffZIEXT  ", TS, "symbol b'\\xffZIEXT  ' is not ASCII"),
        (b"ZIEXT   ", 0, "invalid timestamp 0"),
        (b"ZIEXT   ", -1, "invalid timestamp -1"),
    ],
)  # fmt: skip
def test_trade_symbol_and_timestamp_checks(symbol: bytes, ts: int, result: Any) -> None:
    msg = iex.encode_trade_report("ZIEXT", ts, 1.0, 1, 1)
    msg = msg[:10] + symbol + msg[18:]
    out = iex.decode_segment(segment([msg]), 0)
    if isinstance(result, str):
        assert out.records == [] and out.errors == [DecodeError(result, msg.hex())]
    else:
        assert [(r.symbol, r.timestamp_ns) for r in out.records] == [result]
        assert out.errors == []


def test_block_overrunning_the_payload() -> None:
    data = bytearray(segment([SPEC_QUOTE, SPEC_QUOTE]))
    struct.pack_into("<H", data, 40 + 44, 500)  # second block claims 500 bytes
    out = iex.decode_segment(bytes(data), 0)
    assert len(out.records) == 1
    # The excerpt: the block length and the first 40 bytes of the message.
    assert out.errors == [
        DecodeError(
            "message 1: block length 500 overruns the payload", "f401" + SPEC_QUOTE[:40].hex()
        )
    ]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_raise(data: bytes) -> None:
    out = iex.decode_segment(data, 0)
    assert isinstance(out, iex.DecodedSegment)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=120))
def test_random_payload_after_valid_header_never_raises(payload: bytes) -> None:
    data = bytearray(
        iex.encode_segment(
            [], channel_id=1, session_id=1, stream_offset=0, first_sequence=1, send_time_ns=1
        )
    )
    struct.pack_into("<HH", data, 12, len(payload), 3)
    out = iex.decode_segment(bytes(data) + payload, 0)
    assert out.header is not None


@settings(max_examples=100, deadline=None)
@given(
    st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ.", min_size=1, max_size=8),
    st.integers(1, 2**62), st.integers(0, 10**8), st.integers(0, 2**32 - 1),
    st.integers(1, 10**8), st.integers(0, 2**32 - 1),
)  # fmt: skip
def test_quote_round_trip(
    sym: str, ts: int, bid_px: int, bid_sz: int, ask_px: int, ask_sz: int
) -> None:
    msg = iex.encode_quote_update(sym, ts, bid_px / 1e4, bid_sz, ask_px / 1e4, ask_sz)
    (q,) = iex.decode_segment(segment([msg]), 0).records
    assert (q.symbol, q.timestamp_ns, q.ask) == (sym, ts, ask_px / 1e4)
    assert q.bid == (bid_px / 1e4 if bid_px else None)
    assert (q.provider_specific["bid_size"], q.provider_specific["ask_size"]) == (bid_sz, ask_sz)


# ---------------------------------------------------------------- sequence tracking


def _seg(first: int, count: int, symbol: str = "ZIEXT", session: int = 7) -> iex.DecodedSegment:
    msgs = [iex.encode_quote_update(symbol, TS, 1.0, 1, 2.0, 1) for _ in range(count)]
    return iex.decode_segment(segment(msgs, first=first, session=session), 0)


def test_tracker_finds_gap_and_quality_checker_flags_it() -> None:
    tracker = iex.SequenceTracker()
    records: list[RawMarketData] = []
    for first, count in ((1, 3), (4, 2), (9, 2)):  # 6, 7, 8 lost
        seg = _seg(first, count)
        gap = tracker.admit(seg)
        records.extend(seg.records)
    assert gap == iex.SequenceGap("1:7", 6, 9) and gap.missing == 3
    QualityChecker(stale_after_s=None).check(records)
    assert [r.provider_sequence for r in records if QualityFlag.GAP in r.quality_flags] == [9]


def test_tracker_heartbeat_reveals_gap() -> None:
    tracker = iex.SequenceTracker()
    tracker.admit(_seg(1, 2))
    assert tracker.admit(_seg(5, 0)) == iex.SequenceGap("1:7", 3, 5)
    assert tracker.expected("1:7") == 5


def test_tracker_drops_duplicates_and_new_session_is_not_a_gap() -> None:
    tracker = iex.SequenceTracker()
    tracker.admit(_seg(1, 3))
    dup = _seg(2, 3)  # 2, 3 seen; 4 new
    assert tracker.admit(dup) is None
    assert [r.provider_sequence for r in dup.records] == [4]
    assert tracker.admit(_seg(1, 2, session=8)) is None


def test_tracker_contiguity_duplicates_and_events() -> None:
    # AAPL quotes are kept; MSFT quotes (filtered) and system events ("S") use numbers too.
    def admitted(first: int, kinds: list[str], session: int = 7) -> Any:
        msgs = [iex.encode_system_event("O", TS) if k == "S"
                else iex.encode_quote_update(k, TS, 1.0, 1, 2.0, 1) for k in kinds]  # fmt: skip
        seg = iex.decode_segment(segment(msgs, first=first, session=session), 0,
                                 quote_symbols={"AAPL"})  # fmt: skip
        gap = tracker.admit(seg)
        seqs = [(r.provider_sequence, r.sequence_contiguous) for r in seg.records]
        return gap, seqs, [e.sequence for e in seg.events]

    tracker = iex.SequenceTracker()
    assert tracker.expected("1:7") is None
    # 3 follows 1 with only received, unrecorded messages between: not contiguous, no gap.
    assert admitted(1, ["AAPL", "S", "AAPL", "MSFT"]) == (None, [(1, True), (3, False)], [2])
    assert tracker.expected("1:7") == 5
    # Segments overlapping what was seen: only numbers from the expected one on are new.
    assert admitted(3, ["AAPL", "MSFT", "AAPL", "S"]) == (None, [(5, False)], [6])
    assert admitted(6, ["S", "S"]) == (None, [], [7])
    assert tracker.expected("1:7") == 8
    # An old segment again: nothing new, and the expected number does not go back.
    assert admitted(1, ["AAPL", "S"]) == (None, [], [])
    assert tracker.expected("1:7") == 8
    # After a real gap the next record stays contiguous (so the checker flags it)...
    assert admitted(10, ["MSFT", "AAPL", "S", "AAPL"]) == (
        iex.SequenceGap("1:7", 8, 10), [(11, True), (13, False)], [12],
    )  # fmt: skip
    assert admitted(14, ["AAPL"]) == (None, [(14, True)], [])
    # ...and each session is a stream of its own.
    assert admitted(100, ["AAPL"], session=8) == (None, [(100, True)], [])
    assert (tracker.expected("1:8"), tracker.expected("1:7")) == (101, 15)
    assert tracker.admit(iex.decode_segment(b"", 0)) is None  # no header, nothing to track
    assert tracker.expected("1:7") == 15


def test_filtered_messages_are_not_gaps() -> None:
    tracker = iex.SequenceTracker()
    msgs = [
        iex.encode_quote_update(sym, TS, 1.0, 1, 2.0, 1) for sym in ("AAPL", "MSFT", "MSFT", "AAPL")
    ]
    records: list[RawMarketData] = []
    for first in (1, 5):
        seg = iex.decode_segment(segment(msgs, first=first), 0, quote_symbols={"AAPL"})
        tracker.admit(seg)
        records.extend(seg.records)
    assert [r.provider_sequence for r in records] == [1, 4, 5, 8]
    QualityChecker(stale_after_s=None).check(records)
    assert all(QualityFlag.GAP not in r.quality_flags for r in records)


# ---------------------------------------------------------------- pcap and captures


def test_pcap_round_trip() -> None:
    datagrams = [(TS, segment([SPEC_QUOTE])), (TS + 1500, b"x" * 3)]
    data = pcap.write_udp(datagrams, ("10.1.2.3", 5000), ("233.215.21.4", 10378))
    assert data[:4] == b"\x4d\x3c\xb2\xa1"  # nanosecond magic, little-endian
    items = list(pcap.read_udp(data))
    assert [(i.timestamp_ns, i.payload) for i in items] == datagrams  # type: ignore[union-attr]
    first = items[0]
    assert isinstance(first, pcap.UdpDatagram)
    assert first.src == ("10.1.2.3", 5000) and first.dst == ("233.215.21.4", 10378)
    assert first.offset == 24
    frame = pcap.udp_frame(b"", ("10.1.2.3", 1), ("233.215.21.4", 2))
    assert frame[:6] == bytes.fromhex("01005e571504")  # multicast MAC of the group


def test_pcap_incremental_feed_and_gzip() -> None:
    data = pcap.write_udp([(TS + i, bytes([i]) * 50) for i in range(20)])
    reader = pcap.PcapReader()
    got = []
    for i in range(0, len(data), 7):
        got.extend(reader.feed(data[i : i + 7]))
    assert reader.close() == []
    assert [g.payload for g in got] == [bytes([i]) * 50 for i in range(20)]  # type: ignore[union-attr]
    assert [i.payload for i in pcap.read_udp(gzip.compress(data))] == [g.payload for g in got]  # type: ignore[union-attr]


def test_pcap_microsecond_big_endian_and_linux_cooked() -> None:
    frame = pcap.udp_frame(b"hello", ("1.2.3.4", 1), ("5.6.7.8", 2))
    sll = b"\0\0\0\1\0\6" + bytes(8) + b"\x08\x00" + frame[14:]
    data = struct.pack(">IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 113)
    data += struct.pack(">IIII", 10, 250, len(sll), len(sll)) + sll
    (item,) = pcap.read_udp(data)
    assert isinstance(item, pcap.UdpDatagram)
    assert (item.timestamp_ns, item.payload) == (10_000_250_000, b"hello")


def test_pcapng() -> None:
    frame = pcap.udp_frame(b"payload!", ("1.2.3.4", 1), ("5.6.7.8", 2))

    def block(btype: int, body: bytes) -> bytes:
        body += b"\0" * (-len(body) % 4)
        return struct.pack("<II", btype, len(body) + 12) + body + struct.pack("<I", len(body) + 12)

    shb = block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))
    # Interface with if_tsresol = 9 (nanoseconds).
    idb = block(1, struct.pack("<HHI", 1, 0, 65535) + struct.pack("<HHB3x", 9, 1, 9) + bytes(4))
    ts = 1_700_000_000_123_456_789
    epb = block(
        6, struct.pack("<IIIII", 0, ts >> 32, ts & 0xFFFFFFFF, len(frame), len(frame)) + frame
    )
    other = block(5, b"stats")
    (item,) = pcap.read_udp(shb + idb + other + epb)
    assert isinstance(item, pcap.UdpDatagram)
    assert (item.timestamp_ns, item.payload) == (ts, b"payload!")


def test_pcap_errors_are_located() -> None:
    assert list(pcap.read_udp(b"")) == [CaptureError("offset 0", "empty capture")]
    (bad,) = pcap.read_udp(b"not a capture at all")
    assert isinstance(bad, CaptureError) and "magic" in bad.reason
    data = pcap.write_udp([(TS, b"a" * 10), (TS, b"b" * 10)])
    items = list(pcap.read_udp(data[:-5]))
    assert isinstance(items[0], pcap.UdpDatagram)
    assert items[1] == CaptureError("offset 92", "truncated: 63 bytes left over")
    # A non-UDP packet (ARP) is skipped, not an error.
    arp = bytes(12) + b"\x08\x06" + bytes(28)
    data = pcap.pcap_header() + struct.pack("<IIII", 1, 0, len(arp), len(arp)) + arp
    reader = pcap.PcapReader()
    assert reader.feed(data) == [] and reader.skipped_packets == 1


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_decode_capture_never_raises(data: bytes) -> None:
    for item in iex.decode_capture(pcap.pcap_header() + data):
        assert isinstance(item, RawMarketData | CaptureError)


def test_decode_capture_of_simulator_session() -> None:
    cfg = IexSimConfig(symbols=["AAPL", "MSFT"], batch=5, session_id=40,
                       faults=Faults(malformed_every=3, skip_seq_every=20))  # fmt: skip
    data = build_capture(cfg, 40, start_ns=TS)
    items = list(iex.decode_capture(data))
    records = [i for i in items if isinstance(i, RawMarketData)]
    errors = [i for i in items if isinstance(i, CaptureError)]
    assert len(records) == 40
    assert {r.data_type for r in records} == {DataType.QUOTE, DataType.TRADE}
    assert {r.stream for r in records} == {"1:40"}
    quotes = [r for r in records if r.data_type is DataType.QUOTE]
    assert quotes and all(r.bid is not None and r.ask is not None and r.bid < r.ask for r in quotes)
    assert all(re.fullmatch(r"offset \d+", e.location) for e in errors)
    assert sum("sequence gap" in e.reason for e in errors) == 2
    assert sum("sequence gap" not in e.reason for e in errors) == 2  # two junk datagrams
    aapl = list(iex.decode_capture(data, symbol="AAPL"))
    assert {r.symbol for r in aapl if isinstance(r, RawMarketData)} == {"AAPL"}
