"""The FIX 4.4 codec: QuickFIX's acceptance scripts, real venue frames, market data, bad input."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import pytest
import simplefix
from hypothesis import given, settings
from hypothesis import strategies as st

from common.codecs import fix as codec
from common.codecs.base import CaptureError, DecodeError
from common.model import DataType, QualityFlag, RawMarketData
from common.quality import QualityChecker
from tests import SHARED

FIXTURES = SHARED / "fixtures"
SESSION_FLOWS = FIXTURES / "fix44_session_flows.txt"
needs_fixtures = pytest.mark.skipif(
    not SESSION_FLOWS.is_file(), reason=f"shared fixture {SESSION_FLOWS} is absent"
)

T0 = 1_714_842_592_462_000_000  # 2024-05-04T17:09:52.462Z
SEC = 1_000_000_000
PLACEHOLDER_TS = "00000000-00:00:00.000"

# Real frames from shared/protocols.md section 6 whose checksums validate.
LMAX_LOGON = (
    "8=FIX.4.4|9=89|35=A|49=xxx|56=LMXBL|34=1|52=20150215-22:01:05|98=0|108=30|141=Y|"
    "553=xxx|554=###########|10=231|"
)
VENUE_MD_REJECT = (
    "8=FIX.4.4|9=80|35=Y|34=1567|49=T01|52=20151105-13:08:06.797|56=XCxxx|"
    "58=symbol not found|262=0|10=085|"
)


# ---------------------------------------------------------------- helpers


def wire(fields: str) -> bytes:
    """Frame ``35=..|..`` (fixture notation, no 8/9/10) with a correct BodyLength/CheckSum."""
    msg = simplefix.FixMessage()
    for part in fields.strip("|").split("|"):
        tag, _, value = part.partition("=")
        msg.append_pair(int(tag), value)
    if msg.begin_string is None:
        msg.append_pair(8, codec.BEGIN_STRING, header=True)
    out: bytes = msg.encode()
    return out


def fields_of(raw: bytes) -> list[tuple[int, str]]:
    return [(int(t), v.decode()) for t, v in codec.parse_frame(raw).pairs]


def logged_on_client(hb: int = 30, next_in: int = 1) -> codec.FixSession:
    """An initiator FEEDFLEET<->VENUE that has just logged on."""
    s = codec.FixSession("FEEDFLEET", "VENUE", heartbeat_interval=hb)
    s.logon(T0)
    result = s.receive(
        wire(f"35=A|34=1|49=VENUE|52=20240504-17:09:52.462|56=FEEDFLEET|98=0|108={hb}|141=Y"), T0
    )
    assert [type(e) for e in result.events] == [codec.LogonReceived]
    assert s.logged_on and s.next_in_seq == 2
    s.next_in_seq = next_in if next_in > 1 else 2
    return s


def venue(seq: int, body: str, msg_type: str, extra_header: str = "") -> bytes:
    return wire(
        f"35={msg_type}|34={seq}|49=VENUE|52=20240504-17:09:53.000|56=FEEDFLEET|"
        f"{extra_header}{body}"
    )


# ---------------------------------------------------------------- QuickFIX acceptance scripts


def load_scripts() -> dict[str, list[str]]:
    scripts: dict[str, list[str]] = {}
    name = ""
    for line in SESSION_FLOWS.read_text().splitlines():
        m = re.match(r"### quickfix .*/(\S+)\.def", line)
        if m:
            name = m.group(1)
            scripts[name] = []
        elif name and line and not line.startswith("#"):
            scripts[name].append(line)
    return scripts


SCRIPT_NAMES = sorted(load_scripts()) if SESSION_FLOWS.is_file() else ["absent"]


def normalized(pairs: list[tuple[int, str]]) -> str:
    """Fixture form: times as QuickFIX's placeholders, CheckSum dropped (it is a placeholder)."""
    out = []
    for tag, value in pairs:
        if tag == 10:
            continue
        if tag in (52, 122):
            value = PLACEHOLDER_TS
        elif tag == 60:
            value = PLACEHOLDER_TS[:17]
        out.append(f"{tag}={value}")
    return "|".join(out)


@needs_fixtures
@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_quickfix_acceptance_script(name: str) -> None:
    """Run the script against an acceptor session: every E line must come out, BodyLength
    included (our SendingTime has the placeholder's length), and each eDISCONNECT must end
    the session (by Logout, by a too-low MsgSeqNum, or by the TestRequest timeout)."""
    session = codec.FixSession("ISLD", None, acceptor=True)
    now = T0
    pending: list[bytes] = []

    def collect(data: bytes) -> None:
        for item in codec.FixFramer().feed(data):
            assert isinstance(item, codec.FixFrame)
            pending.append(item.raw)

    for line in load_scripts()[name]:
        if line == "iCONNECT":
            continue
        if line.startswith("I"):
            stamp = codec.format_utc_timestamp(now)
            fields = "|".join(
                f"{p.split('=')[0]}={stamp[:17] if p == '60=<TIME>' else stamp}"
                if p.endswith("=<TIME>")
                else p
                for p in line[1:].strip("|").split("|")
            )
            result = session.receive(wire(fields), now)
            assert result.errors == []
            out = result.outgoing
            for event in result.events:
                if isinstance(event, codec.LogonReceived):
                    out += session.accept_logon(now)
                elif isinstance(event, codec.ApplicationMessage):
                    out += session.send_application(now, event.msg_type, event.body)  # echo
            collect(out)
        elif line == "eDISCONNECT":
            for _ in range(200):
                if session.closed:
                    break
                now += SEC // 2
                collect(session.tick(now).outgoing)
            assert session.closed
            assert pending == []
        else:
            for _ in range(200):  # timer-driven output (6_SendTestRequest)
                if pending:
                    break
                now += SEC // 2
                collect(session.tick(now).outgoing)
            assert pending, f"expected {line}"
            got = normalized(fields_of(pending.pop(0)))
            expected = normalized(
                [
                    (int(t), v)
                    for t, _, v in (p.partition("=") for p in line[1:].strip("|").split("|"))
                ]
            )
            assert got == expected


@needs_fixtures
def test_every_fixture_line_is_a_well_formed_fix44_message() -> None:
    """Each I/E line parses; BodyLength in each E line equals ours for the same fields."""
    count = 0
    for lines in load_scripts().values():
        for line in lines:
            if line[:3] not in ("I8=", "E8="):
                continue
            pairs = [p.partition("=") for p in line[1:].strip("|").split("|")]
            assert pairs[0][0] == "8" and pairs[0][2] == "FIX.4.4"
            msg_type = dict((t, v) for t, _, v in pairs)["35"]
            assert msg_type in {"0", "1", "2", "4", "5", "A", "D"}
            if line.startswith("E"):
                assert [t for t, _, _ in pairs][:3] == ["8", "9", "35"]
                body = "|".join(f"{t}={v}" for t, _, v in pairs if t not in ("8", "9", "10"))
                raw = wire(body)
                assert fields_of(raw)[1] == (9, dict((t, v) for t, _, v in pairs)["9"])
            count += 1
    assert count > 60


# What our initiator sends for each admin MsgType of the scripts' incoming (I) lines.
INITIATOR_ENCODERS: dict[str, Callable[[codec.FixSession, dict[int, str]], bytes]] = {
    "A": lambda s, f: s.logon(T0, reset_seq_num=False),
    "0": lambda s, f: s.heartbeat(T0, f.get(112)),
    "1": lambda s, f: s.test_request(T0, f[112]),
    "2": lambda s, f: s.resend_request(T0, int(f[7]), int(f[16])),
    "5": lambda s, f: s.logout(T0, f.get(58)),
}


@needs_fixtures
def test_initiator_messages_match_the_scripts_incoming_lines() -> None:
    """The I lines are what a counterparty initiator sends QuickFIX: ours must be the same
    fields in the same order, with the BodyLength those fields give."""
    seen = set()
    for lines in load_scripts().values():
        for line in lines:
            if not line.startswith("I8="):
                continue
            pairs = [(int(t), v) for t, _, v in (p.partition("=") for p in line[1:-1].split("|"))]
            fields = dict(pairs)
            encode = INITIATOR_ENCODERS.get(fields[35])
            if encode is None or 43 in fields:  # application messages and PossDup copies
                continue
            session = codec.FixSession(fields[49], fields[56],
                                       heartbeat_interval=int(fields.get(108, "30")))  # fmt: skip
            session.next_out_seq = int(fields[34])
            got = fields_of(encode(session, fields))
            assert normalized([f for f in got if f[0] != 9]) == normalized(pairs), line
            # BodyLength: every field after it up to CheckSum, each with its SOH.
            body = normalized(pairs).split("|", 1)[1]
            assert got[1] == (9, str(len(body) + 1)), line
            seen.add(fields[35])
    assert seen == set(INITIATOR_ENCODERS)


# ---------------------------------------------------------------- framing


def test_real_lmax_logon_frames_and_decodes_on_an_acceptor() -> None:
    session = codec.FixSession("LMXBL", None, acceptor=True)
    result = session.receive(codec.pipe_to_soh(LMAX_LOGON), T0)
    assert result.errors == []
    [logon] = result.events
    assert logon == codec.LogonReceived(30, True, "xxx", "###########")
    assert session.target_comp_id == "xxx" and session.heartbeat_interval == 30
    reply = fields_of(session.accept_logon(T0, reset_seq_num=True))
    assert reply[2:] == [
        (35, "A"), (34, "1"), (49, "LMXBL"), (52, "20240504-17:09:52.462"), (56, "xxx"),
        (98, "0"), (108, "30"), (141, "Y"), (10, reply[-1][1]),
    ]  # fmt: skip


def test_real_md_reject_without_reason_maps_back_to_the_requested_symbol() -> None:
    session = codec.FixSession("XCxxx", "T01")
    session.next_in_seq = 1566  # a session carried on from earlier connections
    session.logon(T0, reset_seq_num=False)
    session.receive(wire("35=A|34=1566|49=T01|52=20151105-13:08:06.000|56=XCxxx|98=0|108=30"), T0)
    session.market_data_request(T0, "0", ["EUR/USD"], [codec.BID, codec.OFFER])
    result = session.receive(codec.pipe_to_soh(VENUE_MD_REJECT), T0)
    assert result.errors == []
    assert result.events == [codec.MarketDataRejected("0", None, "symbol not found", ["EUR/USD"])]


def test_framer_handles_byte_by_byte_delivery_and_zero_padded_body_length() -> None:
    raw = codec.pipe_to_soh(LMAX_LOGON)
    padded = raw.replace(b"9=89", b"9=0000089")
    padded = padded[:-4] + f"{sum(padded[:-7]) % 256:03d}".encode() + b"\x01"
    framer = codec.FixFramer()
    frames = [f for i in range(len(raw + padded)) for f in framer.feed((raw + padded)[i : i + 1])]
    assert [type(f) for f in frames] == [codec.FixFrame, codec.FixFrame]
    assert isinstance(frames[1], codec.FixFrame) and frames[1].offset == len(raw)
    assert framer.buffered == 0


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda r: r.replace(b"10=231", b"10=232"), "CheckSum 232 != computed 231"),
        (lambda r: r.replace(b"9=89", b"9=87"), "BodyLength does not end at CheckSum"),
        (lambda r: r.replace(b"8=FIX.4.4", b"8=FIX.4.2"), "unsupported BeginString FIX.4.2"),
        (lambda r: r.replace(b"9=89\x01", b"9=x9\x01"), "second field is not BodyLength"),
        (lambda r: r.replace(b"35=A\x0149=xxx", b"49=xxx\x0135=A"), "third field is not MsgType"),
        (lambda r: b"garbage\x01" + r, "bytes before BeginString"),
    ],
)
def test_bad_frames_are_decode_errors_and_the_next_message_still_decodes(
    mangle: Callable[[bytes], bytes], reason: str
) -> None:
    good = codec.pipe_to_soh(LMAX_LOGON)
    bad = mangle(good)
    items = codec.FixFramer().feed(bad + good)
    errors = [i for i in items if isinstance(i, DecodeError)]
    frames = [i for i in items if isinstance(i, codec.FixFrame)]
    assert errors and errors[0].reason.startswith(reason)
    assert [f.raw for f in frames][-1] == good


def test_body_length_too_long_resyncs_on_the_next_message() -> None:
    good = codec.pipe_to_soh(LMAX_LOGON)
    bad = good.replace(b"9=89", b"9=500")  # past the end of what has arrived
    items = codec.FixFramer().feed(bad + good)
    assert isinstance(items[0], DecodeError)
    assert items[0].reason == "BodyLength runs past the message"
    assert isinstance(items[-1], codec.FixFrame) and items[-1].raw == good


def test_text_containing_8_equals_fix_is_not_a_message_start() -> None:
    raw = wire("35=5|34=2|49=A|52=20240504-17:09:52.462|56=B|58=8=FIX.4.4 is the version")
    items = codec.FixFramer().feed(raw)
    assert len(items) == 1 and isinstance(items[0], codec.FixFrame)


LOGON_RAW = codec.pipe_to_soh(LMAX_LOGON)  # 111 bytes


def to_text(raw: bytes) -> str:
    return raw.decode("latin-1")


def framed(items: list[codec.FixFrame | DecodeError]) -> list[tuple[str, str | int]]:
    return [(i.reason, i.raw) if isinstance(i, DecodeError) else ("frame", i.offset) for i in items]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"  \r\n\x01" + LOGON_RAW, [("frame", 5)]),  # line noise between messages is fine
        (b"XX" + LOGON_RAW, [("bytes before BeginString", "XX"), ("frame", 2)]),
        (b"XXXXXXXX", [("bytes outside any FIX message", "XXXX")]),
        (b"\x01" * 6, []),
        # "58=FIX..." in a Text field (a capture starting mid-message) is no message start.
        (b"58=FIX.4.4 is the version\x0110=123\x01" + LOGON_RAW,
         [("bytes before BeginString", "58=FIX.4.4 is the version\x0110=123\x01"),
          ("frame", 33)]),
        (b"x" * 30 + b"8=FIX.4.4", [("bytes before BeginString", "x" * 30)]),
        (b"x" * 30 + b"8=FIX.4.4\x019=1", [("bytes before BeginString", "x" * 30)]),
        (b"8=FIXT.1.1-with-a-long-name\x01" + LOGON_RAW,
         [("unsupported BeginString FIXT.1.1-with-a-long...", "8=FIXT.1.1-with-a-long-name"),
          ("bytes before BeginString", "=FIXT.1.1-with-a-long-name\x01"), ("frame", 28)]),
        (b"8=FIX.4.4\x019=x9\x0135=A\x01",
         [("second field is not BodyLength (9)", "9=x9"),
          ("bytes outside any FIX message", "=FIX.4.4\x019=x9\x013")]),
        (b"8=FIX.4.4\x019=0\x0110=000\x01" + LOGON_RAW,
         [("third field is not MsgType (35)", "8=FIX.4.4\x019=0\x0110=000\x01"), ("frame", 21)]),
        (LOGON_RAW.replace(b"10=231", b"10=232"),
         [("CheckSum 232 != computed 231", to_text(LOGON_RAW).replace("231", "232"))]),
        # An unterminated field is waited for up to a bound, then given up on.
        (b"8=FIX.4.4" + b"x" * 23, []),
        (b"8=FIX.4.4" + b"x" * 24,
         [("BeginString not terminated", "8=FIX.4.4" + "x" * 24),
          ("bytes outside any FIX message", "=FIX.4.4" + "x" * 20)]),
        (b"8=FIX.4.4\x019=" + b"1" * 10, []),
        (b"8=FIX.4.4\x019=" + b"1" * 11,
         [("BodyLength not terminated", "8=FIX.4.4\x019=" + "1" * 11),
          ("bytes outside any FIX message", "=FIX.4.4\x019=" + "1" * 7)]),
        (b"8=FIX.4.4\x019=123456789\x01" + LOGON_RAW,
         [("BodyLength too large", "9=123456789"),
          ("bytes before BeginString", "=FIX.4.4\x019=123456789\x01"), ("frame", 22)]),
        (b"8=FIX.4.4\x019=12345678\x01" + LOGON_RAW,
         [("BodyLength 12345678 too large", "9=12345678"),
          ("bytes before BeginString", "=FIX.4.4\x019=12345678\x01"), ("frame", 21)]),
        (b"8=FIX.4.4\x019=" + b"9" * 50 + b"\x01" + LOGON_RAW,
         [("BodyLength too large", "9=" + "9" * 38),
          ("bytes before BeginString", "=FIX.4.4\x019=" + "9" * 50 + "\x01"), ("frame", 63)]),
        (b"8=FIX.4.4\x019=000000001048577\x01" + LOGON_RAW,
         [("BodyLength 1048577 too large", "9=000000001048577"),
          ("bytes before BeginString", "=FIX.4.4\x019=000000001048577\x01"), ("frame", 28)]),
        (b"8=FIX.4.4\x019=1048576\x0135=0\x01" + LOGON_RAW * 2,
         [("BodyLength runs past the message", "8=FIX.4.4\x019=1048576\x0135=0"),
          ("frame", 25), ("frame", 136)]),
        (LOGON_RAW + b"8=FIX.4.4\x019=1048576\x0135=0\x01" + LOGON_RAW,
         [("frame", 0), ("BodyLength runs past the message", "8=FIX.4.4\x019=1048576\x0135=0"),
          ("frame", 136)]),
        (LOGON_RAW.replace(b"10=231", b"10=x31") + LOGON_RAW,
         [("BodyLength does not end at CheckSum (10)", to_text(LOGON_RAW).replace("231", "x31")),
          ("bytes before BeginString", to_text(LOGON_RAW[1:]).replace("231", "x31")),
          ("frame", 111)]),
        # After a good message in the same read: the excerpt is the bad message's own.
        (LOGON_RAW + LOGON_RAW.replace(b"10=231", b"10=x31") + LOGON_RAW,
         [("frame", 0),
          ("BodyLength does not end at CheckSum (10)", to_text(LOGON_RAW).replace("231", "x31")),
          ("bytes before BeginString", to_text(LOGON_RAW[1:]).replace("231", "x31")),
          ("frame", 222)]),
        # No CheckSum anywhere after: the excerpt ends where the BodyLength said.
        (b"8=FIX.4.4\x019=5\x0135=0\x01" + b"x" * 10,
         [("BodyLength does not end at CheckSum (10)", "8=FIX.4.4\x019=5\x0135=0\x01"),
          ("bytes outside any FIX message", "=FIX.4.4\x019=5\x0135=0\x01xxxxxx")]),
    ],
)  # fmt: skip
def test_framer_error_reasons_excerpts_and_resync(
    data: bytes, expected: list[tuple[str, str | int]]
) -> None:
    assert framed(codec.FixFramer().feed(data)) == expected


def test_framer_keeps_stream_offsets_across_feeds() -> None:
    framer = codec.FixFramer()
    # A frame is its message's bytes exactly, whatever follows it.
    (frame,) = framer.feed(LOGON_RAW + b"\r\n")
    assert frame == codec.FixFrame(LOGON_RAW, 0)
    assert (framer.consumed, framer.buffered, framer.error_offset) == (111, 2, 0)
    framer = codec.FixFramer()
    assert framer.feed(LOGON_RAW[:20]) == [] and framer.buffered == 20
    assert framed(framer.feed(LOGON_RAW[20:])) == [("frame", 0)]
    assert (framer.consumed, framer.buffered) == (111, 0)
    assert framed(framer.feed(b"zz" + LOGON_RAW)) == [("bytes before BeginString", "zz"),
                                                      ("frame", 113)]  # fmt: skip
    assert (framer.consumed, framer.error_offset) == (224, 111)
    # Junk without a message start: reported, except a tail that may begin "8=FIX".
    assert framed(framer.feed(b"junk junk8=F")) == [("bytes outside any FIX message", "junk jun")]
    assert (framer.consumed, framer.error_offset, framer.buffered) == (232, 224, 4)
    # The next message starts in that tail; the error is located where "k" was.
    assert framed(framer.feed(b"IX.4.4" + LOGON_RAW[9:])) == [("bytes before BeginString", "k"),
                                                              ("frame", 233)]  # fmt: skip
    assert (framer.consumed, framer.error_offset, framer.buffered) == (344, 232, 0)
    # An error located inside a feed, after earlier feeds.
    assert framed(framer.feed(LOGON_RAW + b"yy" + LOGON_RAW))[1] == ("bytes before BeginString",
                                                                     "yy")  # fmt: skip
    assert (framer.consumed, framer.error_offset) == (568, 455)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(min_value=1, max_value=50))
def test_arbitrary_bytes_never_raise(data: bytes, cut: int) -> None:
    session = logged_on_client()
    good = venue(2, "262=r|268=1|279=0|269=2|270=10.5|271=3|55=AAPL", "X")
    for chunk in (data[:cut], data[cut:], b"\x01" + good):
        result = session.receive(chunk, T0)
        assert all(isinstance(e, DecodeError) for e in result.errors)


@given(st.lists(st.sampled_from(list(codec.pipe_to_soh(LMAX_LOGON))), max_size=200))
def test_shuffled_message_bytes_never_raise(data: list[int]) -> None:
    for item in codec.FixFramer().feed(bytes(data)):
        assert isinstance(item, codec.FixFrame | DecodeError)


# ---------------------------------------------------------------- time


@given(st.integers(min_value=0, max_value=4_102_444_800 * SEC))
def test_timestamp_round_trip_to_the_millisecond(ns: int) -> None:
    text = codec.format_utc_timestamp(ns)
    assert len(text) == 21
    assert codec.parse_utc_timestamp(text) == ns - ns % 1_000_000


def test_timestamp_parsing_accepts_seconds_and_micros_and_rejects_junk() -> None:
    assert codec.parse_utc_timestamp("20150215-22:01:05") == 1_424_037_665 * SEC
    assert codec.parse_utc_timestamp("20150215-22:01:05.123456") == 1_424_037_665_123_456_000
    for bad in (
        "",
        "2015021-22:01:05",
        "20151315-22:01:05",
        "20150215 22:01:05",
        "20150215-2a:01:05",
    ):
        assert codec.parse_utc_timestamp(bad) is None


@pytest.mark.parametrize(
    ("ns", "text"),
    [
        (0, "19700101-00:00:00.000"),
        (-1, "19691231-23:59:59.999"),  # before the epoch: the day and second before
        (951_782_400 * SEC, "20000229-00:00:00.000"),  # a leap day of a year % 400 == 0
        (4_107_542_400 * SEC + 5_999_999, "21000301-00:00:00.005"),  # 2100 is no leap year
        (1_709_251_199 * SEC + 999_000_000, "20240229-23:59:59.999"),
        # The first days of an era's fifth 400-year cycle, and a day 30 of the March-based
        # year: where the algorithm's divisions turn over.
        (951_868_800 * SEC, "20000301-00:00:00.000"),
        (952_128_000 * SEC, "20000304-00:00:00.000"),
        (1_711_843_200 * SEC, "20240331-00:00:00.000"),
        (-62_135_596_800 * SEC, "00010101-00:00:00.000"),
        (-62_162_035_200 * SEC, "00000301-00:00:00.000"),
        (-62_162_035_201 * SEC, "00000229-23:59:59.000"),  # the day before an era begins
        (-62_167_219_200 * SEC, "00000101-00:00:00.000"),
    ],
)
def test_format_utc_timestamp_calendar_edges(ns: int, text: str) -> None:
    assert codec.format_utc_timestamp(ns) == text


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("20240229", 1_709_164_800 * SEC),
        ("00010101", -62_135_596_800 * SEC),
        ("99991231", 253_402_214_400 * SEC),
        ("20241231", 1_735_603_200 * SEC),
        ("20240131", 1_706_659_200 * SEC),
        ("00000101", None),
        ("20240001", None),
        ("20241301", None),
        ("20240100", None),
        ("20240132", None),
        ("2024013a", None),
        ("2024011", None),
        ("202401011", None),
        ("\uff12\uff10\uff12\uff14\uff10\uff11\uff10\uff11", None),  # full-width digits
    ],
)
def test_parse_utc_date(text: str, ns: int | None) -> None:
    assert codec.parse_utc_date(text) == ns


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("17:09:52", 61_792 * SEC),
        ("00:00:00", 0),
        ("23:59:60", 86_400 * SEC),  # a leap second
        ("17:09:52.1", 61_792 * SEC + 100_000_000),
        ("17:09:52.000001", 61_792 * SEC + 1_000),
        ("17:09:52.1234567891", 61_792 * SEC + 123_456_789),  # past ns: cut, not rounded
        ("17:09:52.", None),
        ("17:09:52x", None),
        ("17:09:52.1a", None),
        ("17-09-52", None),
        ("17:09-52", None),
        ("17:09:5", None),
        ("1a:09:52", None),
        ("17:0a:52", None),
        ("17:09:5a", None),
        ("\uff11\uff17:09:52", None),
    ],
)
def test_parse_utc_time_only(text: str, ns: int | None) -> None:
    assert codec.parse_utc_time_only(text) == ns


def test_parse_utc_timestamp_needs_both_parts() -> None:
    assert codec.parse_utc_timestamp("20240229-00:00:01") == 1_709_164_801 * SEC
    assert codec.parse_utc_timestamp("20240229-00:00:0") is None  # 16 characters
    assert codec.parse_utc_timestamp("20240229_00:00:01") is None
    assert codec.parse_utc_timestamp("20240200-00:00:01") is None
    assert codec.parse_utc_timestamp("20240229-00:00:0x") is None


@pytest.mark.parametrize(
    ("raw", "result"),
    [
        (b"8=FIX.4.4\x019=5\x0135=0\x0110=000\x01",
         [(8, "FIX.4.4"), (9, "5"), (35, "0"), (10, "000")]),
        # Values are Latin-1 text: every byte maps to one character.
        (b"8=FIX.4.4\x019=11\x0135=0\x0158=\xe9\x0110=000\x01",
         [(8, "FIX.4.4"), (9, "11"), (35, "0"), (58, "\xe9"), (10, "000")]),
        (b"8=FIX.4.4\x019=5\x01", "incomplete message"),
        (b"8=FIX.4.4\x019=10\x0135=0\x01x=1\x0110=000\x01",
         "bad field: TagNotNumberError invalid literal for int() with base 10: b'x'"),
        (b"8=FIX.4.4\x019=10\x0135=0\x01" + b"x" * 30 + b"=1\x0110=000\x01",
         "bad field: TagNotNumberError invalid literal for int() with base 10: b'" + "x" * 18
         + "..."),
        (b"8=FIX.4.4\x019=9\x0135=0\x0158=\x0110=000\x01", "bad field: EmptyValueError 58"),
    ],
)  # fmt: skip
def test_parse_frame_fields_and_refusals(raw: bytes, result: Any) -> None:
    if isinstance(result, str):
        with pytest.raises(ValueError) as info:
            codec.parse_frame(raw)
        assert str(info.value) == result
    else:
        assert codec._pairs(codec.parse_frame(raw)) == result


@pytest.mark.parametrize(
    ("text", "value"),
    [("0", 0), ("0042", 42), ("9" * 100, int("9" * 100)), ("9" * 101, None), (None, None),
     ("", None), ("-1", None), ("+1", None), ("1.0", None), ("\u00b2", None),
     ("\uff11", None)],
)  # fmt: skip
def test_fix_int_fields(text: str | None, value: int | None) -> None:
    assert codec._uint(text) == value


# ---------------------------------------------------------------- session: initiator side


def test_logon_request_carries_heartbeat_reset_and_credentials() -> None:
    s = codec.FixSession("FEEDFLEET", "VENUE", heartbeat_interval=15)
    raw = s.logon(T0, username="user", password="secret")
    assert fields_of(raw)[2:-1] == [
        (35, "A"), (34, "1"), (49, "FEEDFLEET"), (52, "20240504-17:09:52.462"), (56, "VENUE"),
        (98, "0"), (108, "15"), (141, "Y"), (553, "user"), (554, "secret"),
    ]  # fmt: skip
    assert s.next_out_seq == 2


def test_logout_answering_logon_is_a_refusal_with_the_text() -> None:
    s = codec.FixSession("FEEDFLEET", "VENUE")
    s.logon(T0)
    result = s.receive(venue(1, "58=Logon rejected: invalid credentials", "5"), T0)
    assert result.events == [
        codec.LogoutReceived("Logon rejected: invalid credentials"),
        codec.SessionClosed("logon refused: Logon rejected: invalid credentials"),
    ]
    assert s.closed and not s.logged_on and result.outgoing == b""


def test_first_message_not_logon_closes_without_reply() -> None:
    s = codec.FixSession("ISLD", None, acceptor=True)
    result = s.receive(wire("35=0|34=1|49=TW44|52=20240504-17:09:52.462|56=ISLD"), T0)
    assert s.closed and result.outgoing == b""
    assert isinstance(result.events[0], codec.SessionClosed)


def test_wrong_comp_id_ends_the_session_with_logout() -> None:
    s = logged_on_client()
    result = s.receive(wire("35=0|34=2|49=OTHER|52=20240504-17:09:52.462|56=FEEDFLEET"), T0)
    assert s.closed
    assert (58, "CompID problem") in fields_of(result.outgoing)


def test_market_data_request_round_trip_subscribe_and_unsubscribe() -> None:
    client = logged_on_client()
    server = codec.FixSession("VENUE", None, acceptor=True)
    server.receive(codec.FixSession("FEEDFLEET", "VENUE").logon(T0), T0)
    server.accept_logon(T0)
    sub = client.market_data_request(T0, "AAPL:1", ["AAPL"], [codec.BID, codec.OFFER, codec.TRADE])
    body = fields_of(sub)[7:-1]
    assert body == [
        (262, "AAPL:1"), (263, "1"), (264, "1"), (265, "1"), (267, "3"), (269, "0"),
        (269, "1"), (269, "2"), (146, "1"), (55, "AAPL"),
    ]  # fmt: skip
    unsub = client.market_data_request(
        T0, "AAPL:1", ["AAPL"], [codec.TRADE], subscription_type=codec.DISABLE_PREVIOUS,
        update_type=None,
    )  # fmt: skip
    result = server.receive(sub + unsub, T0)
    assert result.errors == []
    assert result.events == [
        codec.MarketDataRequested("AAPL:1", "1", 1, "1", ["0", "1", "2"], ["AAPL"]),
        codec.MarketDataRequested("AAPL:1", "2", 1, None, ["2"], ["AAPL"]),
    ]
    assert client.md_requests == {}


def test_test_request_is_answered_with_heartbeat_carrying_the_id() -> None:
    s = logged_on_client()
    result = s.receive(venue(2, "112=HELLO", "1"), T0)
    assert result.events == [codec.TestRequestReceived("HELLO")]
    out = fields_of(result.outgoing)
    assert (35, "0") in out and (112, "HELLO") in out


def test_silence_sends_test_request_then_times_out() -> None:
    s = logged_on_client(hb=2)
    assert s.tick(T0 + 1 * SEC).outgoing == b""
    heartbeat = s.tick(T0 + 2 * SEC).outgoing  # nothing sent for HeartBtInt
    assert (35, "0") in fields_of(heartbeat)
    tr = s.tick(T0 + 2 * SEC + 400_000_000).outgoing  # 1.2 x HeartBtInt without receiving
    assert (35, "1") in fields_of(tr) and (112, "TEST") in fields_of(tr)
    assert s.tick(T0 + 4 * SEC).outgoing == b""  # no heartbeat while the TestRequest is open
    timeout = s.tick(T0 + 4 * SEC + 800_000_000)
    assert timeout.timed_out and s.closed


def test_test_request_answer_keeps_the_session_alive() -> None:
    s = logged_on_client(hb=2)
    s.tick(T0 + 2_400_000_000)
    s.receive(venue(2, "112=TEST", "0"), T0 + 2_500_000_000)
    assert not s.tick(T0 + 4_800_000_000).timed_out


def test_gap_sends_resend_request_and_queues_until_gap_fill() -> None:
    s = logged_on_client()
    first = s.receive(venue(2, "55=AAPL|268=1|269=2|270=10|271=1", "W"), T0)
    assert [r.provider_sequence for r in first.records] == [2]
    result = s.receive(venue(5, "268=1|279=0|269=2|270=11|271=1|55=AAPL", "X"), T0)
    assert result.records == []
    assert result.events == [codec.SequenceGap(3, 5)]
    assert [(t, v) for t, v in fields_of(result.outgoing) if t in (35, 7, 16)] == [
        (35, "2"), (7, "3"), (16, "0"),
    ]  # fmt: skip
    # A second early message does not repeat the ResendRequest.
    again = s.receive(venue(6, "268=1|279=0|269=2|270=12|271=1|55=AAPL", "X"), T0)
    assert again.outgoing == b"" and again.events == []
    fill = s.receive(venue(3, "36=5|123=Y", "4", "43=Y|122=20240504-17:09:53.000|"), T0)
    assert [r.price for r in fill.records] == [11.0, 12.0]
    assert [r.provider_sequence for r in fill.records] == [5, 6]
    assert s.next_in_seq == 7
    checker = QualityChecker(stale_after_s=None)
    checker.check(first.records + fill.records)
    assert [r.quality_flags for r in first.records + fill.records] == [[], [QualityFlag.GAP], []]


def test_gap_fill_over_queued_messages_still_delivers_them() -> None:
    """QuickFIX answers 7=3|16=0 with one GapFill 34=3|36=6 even over application messages
    it sent; 4 and 5 were received and queued, so they are delivered, not dropped."""
    s = logged_on_client()
    first = s.receive(venue(2, "268=1|279=0|269=2|270=100.02|271=1|55=A", "X"), T0).records
    held = s.receive(
        venue(4, "268=1|279=0|269=2|270=100.04|271=1|55=A", "X")
        + venue(5, "268=1|279=0|269=2|270=100.05|271=1|55=A", "X"),
        T0,
    )
    assert held.records == [] and held.events == [codec.SequenceGap(3, 4)]
    fill = s.receive(venue(3, "36=6|123=Y", "4", "43=Y|122=20240504-17:09:53.000|"), T0)
    assert [(r.price, r.provider_sequence) for r in fill.records] == [(100.04, 4), (100.05, 5)]
    assert s.next_in_seq == 6
    QualityChecker(stale_after_s=None).check(first + fill.records)
    assert [r.quality_flags for r in fill.records] == [[QualityFlag.GAP], []]


def test_unanswered_gap_is_given_up_when_the_queue_is_full(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(codec, "MAX_QUEUED", 3)
    s = logged_on_client()
    first = s.receive(venue(2, "268=1|279=0|269=2|270=100.02|271=1|55=A", "X"), T0).records
    out = s.receive(
        b"".join(venue(n, f"268=1|279=0|269=2|270=100.0{n}|271=1|55=A", "X") for n in range(5, 9)),
        T0,
    )
    assert [r.provider_sequence for r in out.records] == [5, 6, 7, 8]
    assert s.next_in_seq == 9
    QualityChecker(stale_after_s=None).check(first + out.records)
    assert [r.quality_flags for r in out.records] == [[QualityFlag.GAP], [], [], []]


def test_resent_message_fills_the_gap_and_possdup_copies_are_ignored() -> None:
    s = logged_on_client()
    s.receive(venue(3, "268=1|279=0|269=2|270=11|271=1|55=AAPL", "X"), T0)
    resent = s.receive(
        venue(2, "268=1|279=0|269=2|270=10|271=1|55=AAPL", "X", "43=Y|122=20240504-17:09:52.000|"),
        T0,
    )
    assert [r.price for r in resent.records] == [10.0, 11.0]
    assert resent.records[0].provider_specific["PossDupFlag"] == "Y"
    dup = s.receive(venue(3, "268=1|279=0|269=2|270=11|271=1|55=AAPL", "X", "43=Y|"), T0)
    assert dup.records == [] and dup.outgoing == b"" and not s.closed


def test_too_low_without_possdup_logs_out() -> None:
    s = logged_on_client()
    s.receive(venue(2, "", "0") + venue(3, "", "0"), T0)
    result = s.receive(venue(2, "", "0"), T0)
    assert s.closed
    assert (58, "MsgSeqNum too low, expecting 4 but received 2") in fields_of(result.outgoing)


def test_sequence_reset_mode_jumps_and_the_next_record_is_a_gap() -> None:
    s = logged_on_client()
    a = s.receive(venue(2, "268=1|279=0|269=2|270=10|271=1|55=AAPL", "X"), T0).records
    reset = s.receive(venue(0, "36=10", "4"), T0)
    assert reset.events == [codec.SequenceResetReceived(10, False)] and s.next_in_seq == 10
    b = s.receive(venue(10, "268=1|279=0|269=2|270=10|271=1|55=AAPL", "X"), T0).records
    QualityChecker(stale_after_s=None).check(a + b)
    assert b[0].quality_flags == [QualityFlag.GAP]


def test_admin_messages_between_records_are_not_a_gap_and_sub_records_not_duplicates() -> None:
    s = logged_on_client()
    out = s.receive(
        venue(
            2, "55=AAPL|268=3|269=0|270=10.0|271=5|269=1|270=10.2|271=6|269=2|270=10.1|271=1", "W"
        )
        + venue(3, "", "0")
        + venue(4, "112=X", "1")
        + venue(5, "268=2|279=0|269=2|270=10.1|271=1|55=AAPL|279=0|269=2|270=10.15|271=2", "X"),
        T0,
    )
    recs = out.records
    assert [(r.data_type, r.provider_sequence) for r in recs] == [
        (DataType.QUOTE, 2), (DataType.TRADE, 2), (DataType.TRADE, 5), (DataType.TRADE, 5),
    ]  # fmt: skip
    assert recs[2].sequence_contiguous is False  # 3 and 4 were a Heartbeat and a TestRequest
    assert recs[1].stream == recs[0].stream + "#2"
    checker = QualityChecker(stale_after_s=None)
    checker.check(recs)
    assert all(r.quality_flags == [] for r in recs)


# ---------------------------------------------------------------- session: persisted numbers

STREAM = "VENUE->FEEDFLEET@20240504-17:00:00.000"
ORIG = "20240504-17:05:00.000"  # when a resent message was first sent


def resumed_client(next_out: int, next_in: int, last_record: int | None) -> codec.FixSession:
    """An initiator continuing a session persisted by an earlier process."""
    state = codec.SessionState(next_out, next_in, STREAM, last_record)
    return codec.FixSession("FEEDFLEET", "VENUE", state=state)


def trade(seq: int, price: str, extra_header: str = "") -> bytes:
    return venue(seq, f"268=1|279=0|269=2|270={price}|271=1|55=AAPL", "X", extra_header)


def resent(seq: int, price: str) -> bytes:
    return trade(seq, price, f"43=Y|122={ORIG}|")


def test_logon_with_persisted_numbers_carries_them_without_reset() -> None:
    s = resumed_client(7, 20, 18)
    assert [(t, v) for t, v in fields_of(s.logon(T0, reset_seq_num=False)) if t in (34, 141)] == [
        (34, "7")
    ]
    reply = s.receive(venue(20, "98=0|108=30", "A"), T0)
    assert [type(e) for e in reply.events] == [codec.LogonReceived] and reply.outgoing == b""
    records = s.receive(trade(21, "10.5"), T0).records
    # The same sequence space: same stream; 19 and 20 were admin messages, so no gap.
    assert [(r.stream, r.provider_sequence, r.sequence_contiguous) for r in records] == [
        (STREAM, 21, False)
    ]
    assert s.state == codec.SessionState(8, 22, STREAM, 21, False)


def test_gap_at_logon_asks_for_a_resend_and_resent_data_is_recovered_not_a_gap() -> None:
    """Records 5..8 were sent while we were down: the venue's Logon comes as 9, we ask for
    5 onwards, it resends 5..8 (PossDup, OrigSendingTime) and gap-fills its Logon."""
    s = resumed_client(3, 5, 4)
    s.logon(T0, reset_seq_num=False)
    logon = s.receive(venue(9, "98=0|108=30", "A"), T0)
    assert [type(e) for e in logon.events] == [codec.LogonReceived, codec.SequenceGap]
    assert logon.events[1] == codec.SequenceGap(5, 9) and s.logged_on
    assert [(t, v) for t, v in fields_of(logon.outgoing) if t in (35, 34, 7, 16)] == [
        (35, "2"), (34, "4"), (7, "5"), (16, "0"),
    ]  # fmt: skip
    live = s.receive(trade(10, "10.10"), T0)  # new data ahead of the resend: held
    assert live.records == [] and live.outgoing == b""
    answer = s.receive(
        resent(5, "10.05") + resent(6, "10.06") + venue(7, "", "0", f"43=Y|122={ORIG}|")
        + resent(8, "10.08") + venue(9, "36=10|123=Y", "4", f"43=Y|122={ORIG}|"),
        T0,
    )  # fmt: skip
    assert answer.errors == [] and not s.closed
    records = answer.records
    assert [(r.provider_sequence, r.price) for r in records] == [
        (5, 10.05), (6, 10.06), (8, 10.08), (10, 10.10),
    ]  # fmt: skip
    assert [r.provider_specific.get("PossDupFlag") for r in records] == ["Y", "Y", "Y", None]
    # Without entry times a resent record is timed by OrigSendingTime, not the resend.
    assert records[0].timestamp_ns == codec.parse_utc_timestamp(ORIG)
    assert records[3].timestamp_ns == codec.parse_utc_timestamp("20240504-17:09:53.000")
    assert {r.stream for r in records} == {STREAM}
    checker = QualityChecker(stale_after_s=None)
    checker.restore({STREAM: 4})  # what the journal of the earlier process ended with
    checker.check(records)
    assert [r.quality_flags for r in records] == [[], [], [], []]
    assert s.state == codec.SessionState(5, 11, STREAM, 10, False)  # Logon 3, ResendRequest 4


def test_admin_numbers_before_the_first_record_after_a_restart_are_no_gap() -> None:
    """Records up to 4 reached the journal; 5 and 6 were Heartbeats, 7 the venue's Logon."""
    s = resumed_client(3, 7, 4)
    s.logon(T0, reset_seq_num=False)
    s.receive(venue(7, "98=0|108=30", "A"), T0)
    records = s.receive(trade(8, "10.08"), T0).records
    assert [(r.provider_sequence, r.sequence_contiguous) for r in records] == [(8, False)]
    checker = QualityChecker(stale_after_s=None)
    checker.restore({STREAM: 4})  # as the worker does after a restart
    checker.check(records)
    assert records[0].quality_flags == []


def test_checkpoint_asks_again_for_records_not_handed_over_and_knows_their_admin_numbers() -> None:
    """The consumer took records up to 6; a Heartbeat (7), a record (8) and a Heartbeat (9)
    were read but never handed over when the process died."""
    s = resumed_client(3, 5, 4)
    s.logon(T0, reset_seq_num=False)
    journaled = s.receive(venue(5, "98=0|108=30", "A") + trade(6, "10.06"), T0).records
    handed_over = s.state
    s.receive(venue(7, "", "0") + trade(8, "10.08") + venue(9, "", "0"), T0)
    saved = s.checkpoint(handed_over)
    assert saved == codec.SessionState(4, 7, STREAM, 6, False, (7, 9))
    flags = []
    for state in (saved, dataclasses.replace(saved, admin_seen=())):
        again = codec.FixSession("FEEDFLEET", "VENUE", state=state)
        again.logon(T0, reset_seq_num=False)
        assert codec.SequenceGap(7, 10) in again.receive(venue(10, "98=0|108=30", "A"), T0).events
        # QuickFIX's answer: a GapFill over each admin run, the record resent.
        answer = again.receive(
            venue(7, "36=8|123=Y", "4", "43=Y|") + resent(8, "10.08")
            + venue(9, "36=11|123=Y", "4", "43=Y|"),
            T0,
        )  # fmt: skip
        assert [r.provider_sequence for r in answer.records] == [8] and again.next_in_seq == 11
        checker = QualityChecker(stale_after_s=None)
        checker.check(journaled + answer.records)  # what the journal holds, then the resend
        flags.append(answer.records[0].quality_flags)
    # Known admin numbers are no loss; without that knowledge a gap-fill must count as one.
    assert flags == [[], [QualityFlag.GAP]]


def test_gap_fill_over_numbers_never_received_is_a_gap_with_their_range() -> None:
    """A venue that cannot resend market data (gone from its store, or it chooses not to)
    gap-fills it: that much is lost, and the next record says so, with the range."""
    s = resumed_client(3, 5, 4)
    s.logon(T0, reset_seq_num=False)
    s.receive(venue(9, "98=0|108=30", "A"), T0)
    fill = s.receive(venue(5, "36=10|123=Y", "4", f"43=Y|122={ORIG}|"), T0)
    assert fill.events == [codec.SequenceResetReceived(10, True)] and s.next_in_seq == 10
    records = s.receive(trade(10, "10.10"), T0).records
    checker = QualityChecker(stale_after_s=None)
    checker.restore({STREAM: 4})
    checker.check(records)
    assert records[0].quality_flags == [QualityFlag.GAP]
    assert records[0].provider_specific["gap"] == [5, 9]


def test_gap_fill_over_only_the_logon_loses_nothing() -> None:
    s = resumed_client(3, 5, 4)
    s.logon(T0, reset_seq_num=False)
    s.receive(venue(7, "98=0|108=30", "A"), T0)
    out = s.receive(
        resent(5, "10.05") + resent(6, "10.06") + venue(7, "36=8|123=Y", "4", "43=Y|")
        + trade(8, "10.08"),
        T0,
    )  # fmt: skip
    checker = QualityChecker(stale_after_s=None)
    checker.restore({STREAM: 4})
    checker.check(out.records)
    assert [(r.provider_sequence, r.quality_flags) for r in out.records] == [
        (5, []), (6, []), (8, []),
    ]  # fmt: skip


def test_venue_resetting_at_logon_unasked_reports_what_is_lost() -> None:
    s = resumed_client(3, 50, 49)
    s.logon(T0, reset_seq_num=False)
    reply = s.receive(wire("35=A|34=1|49=VENUE|52=20240504-17:10:00.000|56=FEEDFLEET|98=0|"
                           "108=30|141=Y"), T0)  # fmt: skip
    assert reply.events[1:] == [codec.PeerReset(50, STREAM)]
    assert s.next_in_seq == 2 and s.stream == "VENUE->FEEDFLEET@20240504-17:10:00.000"
    assert s.state.last_record_seq is None


def test_venue_numbers_going_back_at_logon_end_the_session_and_report_the_loss() -> None:
    s = resumed_client(3, 50, 49)
    s.logon(T0, reset_seq_num=False)
    reply = s.receive(venue(1, "98=0|108=30", "A"), T0)
    assert s.closed
    assert reply.events == [
        codec.PeerReset(50, STREAM),
        codec.SessionClosed("MsgSeqNum too low, expecting 50 but received 1"),
    ]
    assert (58, "MsgSeqNum too low, expecting 50 but received 1") in fields_of(reply.outgoing)


def test_logon_with_reset_starts_a_new_stream() -> None:
    s = resumed_client(30, 40, 39)
    assert (141, "Y") in fields_of(s.logon(T0))
    reply = s.receive(wire("35=A|34=1|49=VENUE|52=20240504-17:10:00.000|56=FEEDFLEET|98=0|"
                           "108=30|141=Y"), T0)  # fmt: skip
    assert [type(e) for e in reply.events] == [codec.LogonReceived]
    assert s.state == codec.SessionState(
        2, 2, "VENUE->FEEDFLEET@20240504-17:10:00.000", None, False
    )


def test_session_state_json_round_trip_and_refusals() -> None:
    state = codec.SessionState(12, 340, STREAM, 338, True, (341, 345))
    assert codec.SessionState.from_json(state.to_json()) == state
    assert codec.SessionState.from_json({"next_sender_seq": 1, "next_target_seq": 1}) == (
        codec.SessionState()
    )
    refused: list[object] = [
        [],
        {"next_sender_seq": 0, "next_target_seq": 1},
        {"next_sender_seq": True, "next_target_seq": 1},
        {"next_sender_seq": "3", "next_target_seq": 1},
        {"next_sender_seq": 1, "next_target_seq": 1, "last_record_seq": 1.5},
        {"next_sender_seq": 1, "next_target_seq": 1, "stream": 7},
        {"next_sender_seq": 1, "next_target_seq": 1, "numbers_lost": "no"},
        {"next_sender_seq": 1, "next_target_seq": 1, "admin_seen": [0]},
        {"next_sender_seq": 1, "next_target_seq": 1, "admin_seen": 5},
    ]
    for bad in refused:
        with pytest.raises(ValueError):
            codec.SessionState.from_json(bad)


def test_both_sides_ahead_answer_each_others_resend_request_at_once() -> None:
    """Each side's Logon is above what the other expects. Each queues what follows the other's
    Logon, including its ResendRequest; were that answered only in sequence, each would wait
    for the other forever."""
    server = codec.FixSession("VENUE", "FEEDFLEET", acceptor=True,
                              state=codec.SessionState(9, 3))  # fmt: skip
    for _ in range(3):  # 9, 10, 11: market data sent while the client was away
        server.incremental(T0, [codec.MDEntry(codec.TRADE, 10.5, 1, "AAPL", codec.NEW)])
    client = resumed_client(5, 9, 8)  # it used 3 and 4 on a connection the server never saw
    to_server = client.logon(T0, reset_seq_num=False)
    records: list[RawMarketData] = []
    for _ in range(4):  # a few round trips over a perfect wire
        got = server.receive(to_server, T0)
        to_client = got.outgoing
        for event in got.events:
            if isinstance(event, codec.LogonReceived):
                to_client += server.accept_logon(T0)
        back = client.receive(to_client, T0)
        records += back.records
        to_server = back.outgoing
    assert [r.provider_sequence for r in records] == [9, 10, 11]
    assert client.next_in_seq == server.next_out_seq and server.next_in_seq == client.next_out_seq
    assert not (client.closed or server.closed)
    QualityChecker(stale_after_s=None).check(records)
    assert all(r.quality_flags == [] for r in records)


def client_logon(seq: int, reset: bool) -> bytes:
    flag = "|141=Y" if reset else ""
    return wire(f"35=A|34={seq}|49=FEEDFLEET|52=20240504-17:09:52.462|56=VENUE|98=0|108=30{flag}")


def test_acceptor_keeps_numbers_across_connections_and_resends_from_its_store() -> None:
    server = codec.FixSession("VENUE", "FEEDFLEET", acceptor=True)
    server.receive(client_logon(1, reset=True), T0)
    server.accept_logon(T0, reset_seq_num=True)
    entry = [codec.MDEntry(codec.TRADE, 10.5, 1, "AAPL", codec.NEW)]
    sent = [server.incremental(T0 + i * SEC, entry, "AAPL:1") for i in range(3)]  # 2, 3, 4
    server.heartbeat(T0)  # 5
    server.new_connection()  # the client died; the session lives on
    result = server.receive(client_logon(2, reset=False), T0 + 10 * SEC)
    assert [type(e) for e in result.events] == [codec.LogonReceived]
    assert fields_of(server.accept_logon(T0 + 10 * SEC))[3] == (34, "6")
    answer = server.receive(
        wire("35=2|34=3|49=FEEDFLEET|52=20240504-17:10:02.462|56=VENUE|7=2|16=0"), T0 + 10 * SEC
    )
    assert answer.events == [codec.ResendRequested(2, 6)]
    frames = [f for f in codec.FixFramer().feed(answer.outgoing) if isinstance(f, codec.FixFrame)]
    got = [dict(fields_of(f.raw)) for f in frames]
    assert [(g[35], g[34], g[43]) for g in got] == [
        ("X", "2", "Y"), ("X", "3", "Y"), ("X", "4", "Y"), ("4", "5", "Y"),
    ]  # fmt: skip
    # Same body, the original SendingTime as OrigSendingTime.
    for g, original in zip(got, sent, strict=False):
        first = dict(fields_of(original))
        assert g[122] == first[52] and g[270] == first[270] and g[262] == "AAPL:1"
    assert (got[3][36], got[3][123]) == ("7", "Y")  # the heartbeat and the Logon reply


def test_acceptor_reset_logon_empties_the_store() -> None:
    server = codec.FixSession("VENUE", "FEEDFLEET", acceptor=True)
    server.receive(client_logon(1, reset=True), T0)
    server.accept_logon(T0, reset_seq_num=True)
    server.incremental(T0, [codec.MDEntry(codec.TRADE, 10.5, 1, "AAPL", codec.NEW)])
    server.new_connection()
    server.receive(client_logon(1, reset=True), T0)
    assert fields_of(server.accept_logon(T0, reset_seq_num=True))[3] == (34, "1")
    answer = server.receive(
        wire("35=2|34=2|49=FEEDFLEET|52=20240504-17:09:52.462|56=VENUE|7=1|16=0"), T0
    )
    [fill] = [dict(fields_of(f.raw)) for f in codec.FixFramer().feed(answer.outgoing)
              if isinstance(f, codec.FixFrame)]  # fmt: skip
    assert (fill[35], fill[34], fill[36]) == ("4", "1", "2")


def test_store_keeps_the_last_store_size_messages_and_gap_fills_older_ones() -> None:
    server = codec.FixSession("VENUE", "FEEDFLEET", acceptor=True, store_size=2)
    server.receive(client_logon(1, reset=True), T0)
    server.accept_logon(T0, reset_seq_num=True)
    for _ in range(4):  # 2..5; 2 and 3 fall out
        server.incremental(T0, [codec.MDEntry(codec.TRADE, 10.5, 1, "AAPL", codec.NEW)])
    answer = server.receive(
        wire("35=2|34=2|49=FEEDFLEET|52=20240504-17:09:52.462|56=VENUE|7=1|16=0"), T0
    )
    got = [dict(fields_of(f.raw)) for f in codec.FixFramer().feed(answer.outgoing)
           if isinstance(f, codec.FixFrame)]  # fmt: skip
    assert [(g[35], g[34], g.get(36)) for g in got] == [
        ("4", "1", "4"), ("X", "4", None), ("X", "5", None),
    ]  # fmt: skip


def test_first_message_fields_names_the_session_once_a_message_is_complete() -> None:
    logon = client_logon(1, reset=False)
    assert codec.first_message_fields(logon[:30]) is None
    fields = codec.first_message_fields(logon + logon[:10])
    assert fields is not None and (fields[35], fields[49], fields[56]) == (
        "A",
        "FEEDFLEET",
        "VENUE",
    )
    assert codec.first_message_fields(b"GET / HTTP/1.1\r\n\r\n") == {}


# ---------------------------------------------------------------- market data


def test_real_snapshot_body_gives_top_of_book_quote() -> None:
    """The LMAX-style 35=W from protocols.md 6.4, venue tag 106 inside the group."""
    s = logged_on_client()
    body = (
        "55=EUR/USD|262=0|268=2|269=0|270=1.11941|271=1000000|299=0|106=1|"
        "269=1|270=1.11944|271=1000000|299=0|106=1"
    )
    result = s.receive(venue(2, body, "W"), T0 + 5)
    assert result.errors == []
    [quote] = result.records
    assert quote == RawMarketData(
        "EUR/USD", codec.PROVIDER, codec.parse_utc_timestamp("20240504-17:09:53.000") or 0,
        DataType.QUOTE, None, None, 1.11941, 1.11944,
        {"MsgType": "W", "MDReqID": "0", "QuoteEntryID": "0", "Issuer": "1",
         "BidSize": 1000000.0, "OfferSize": 1000000.0},
        2, s.stream, True, T0 + 5, [],
    )  # fmt: skip
    assert s.stream == "VENUE->FEEDFLEET@20240504-17:09:52.462"


def test_an_empty_snapshot_is_an_empty_book_not_an_error() -> None:
    """35=W with 268=0 (no entries, the trailer right after NoMDEntries): no records, no
    errors, and the symbol's book is emptied, so the next bid shows no stale offer."""
    s = logged_on_client()
    full = "55=EUR/USD|262=0|268=2|269=0|270=1.1|271=5|269=1|270=1.2|271=6"
    assert s.receive(venue(2, full, "W"), T0).errors == []
    empty = s.receive(venue(3, "55=EUR/USD|262=0|268=0", "W"), T0 + 1)
    assert (empty.records, empty.errors, empty.skipped) == ([], [], 0)
    update = s.receive(venue(4, "262=0|268=1|279=0|269=0|270=1.05|271=7|55=EUR/USD", "X"), T0 + 2)
    [quote] = update.records
    assert (quote.bid, quote.ask) == (1.05, None)


@pytest.mark.parametrize(
    ("msg_type", "body", "reject", "records"),
    [
        # Two entries announced, one sent: the one sent is still a quote.
        ("W", "55=EUR/USD|268=2|269=0|270=1.1|271=5",
         "45=2|371=268|372=W|373=16|58=NoMDEntries is 2 but 1 entries follow", 1),
        ("W", "55=EUR/USD|268=x|269=0|270=1.1",
         "45=2|371=268|372=W|373=6|58=NoMDEntries (268) not a number", 0),
        ("W", "55=EUR/USD|262=0", "45=2|371=268|372=W|373=1|58=W without NoMDEntries (268)", 0),
        ("W", "55=EUR/USD|268=1|270=1.1|271=5",
         "45=2|371=270|372=W|373=15|58=MD entry does not start with tag 269", 0),
        ("X", "268=1|279=0|269=2|270=1.1|271=5",
         "45=2|371=55|372=X|373=1|58=MD entry without Symbol (55)", 0),
        ("X", "268=1|279=7|269=0|270=1.1|271=5|55=EUR/USD",
         "45=2|371=279|372=X|373=5|58=unknown MDUpdateAction '7'", 0),
        ("X", "268=1|279=0|270=1.1|271=5|55=EUR/USD",
         "45=2|371=269|372=X|373=1|58=MD entry without MDEntryType (269)", 0),
    ],
)  # fmt: skip
def test_market_data_failing_validation_gets_a_session_reject(
    msg_type: str, body: str, reject: str, records: int
) -> None:
    """FIX 4.4: a message that fails validation is answered with 35=3 naming the message
    (RefSeqNum, RefMsgType), the tag at fault (RefTagID) and SessionRejectReason; its number
    is consumed, and what decoded of it is kept."""
    s = logged_on_client()
    result = s.receive(venue(2, body, msg_type), T0 + 1)
    assert len(result.records) == records
    error = result.errors[0]  # the first fault is the one rejected
    [sent] = [f for f in codec.FixFramer().feed(result.outgoing) if isinstance(f, codec.FixFrame)]
    got = fields_of(sent.raw)
    assert dict(got)[35] == "3"
    body_fields = [f"{t}={v}" for t, v in got if t in (45, 371, 372, 373, 58)]
    assert "|".join(body_fields) == reject
    assert error.reason == dict(got)[58]
    assert s.next_in_seq == 3
    # A good message after it is decoded and answered with nothing.
    good = s.receive(venue(3, "262=0|268=1|279=0|269=0|270=1.05|271=7|55=EUR/USD", "X"), T0 + 2)
    assert (len(good.records), good.errors, good.outgoing) == (1, [], b"")


# Whole frames written out by hand: the real 35=W body above under an LMAX-style header, then
# an incremental trade and bid change. BodyLength and CheckSum are literal, not computed here.
LITERAL_MD_CAPTURE = (
    "8=FIX.4.4|9=161|35=W|34=1042|49=LMXBL|52=20150215-22:01:06.123|56=xxx|55=EUR/USD|262=0|"
    "268=2|269=0|270=1.11941|271=1000000|299=0|106=1|269=1|270=1.11944|271=1000000|299=0|106=1|"
    "10=112|\n"
    "8=FIX.4.4|9=171|35=X|34=1043|49=LMXBL|52=20150215-22:01:06.200|56=xxx|262=0|268=2|279=0|"
    "269=2|270=1.11942|271=50000|55=EUR/USD|60=20150215-22:01:06.150|279=1|269=0|270=1.1194|"
    "271=2000000|10=151|\n"
)


def test_literal_market_data_frames_decode_exactly() -> None:
    items = list(codec.decode_capture(LITERAL_MD_CAPTURE.encode()))
    records = [r for r in items if isinstance(r, RawMarketData)]
    assert records == items
    got = [(r.data_type, r.symbol, r.timestamp_ns, r.price, r.volume, r.bid, r.ask,
            r.provider_sequence, r.stream) for r in records]  # fmt: skip
    assert got == [
        (DataType.QUOTE, "EUR/USD", 1_424_037_666_123_000_000, None, None, 1.11941, 1.11944,
         1042, "LMXBL->xxx"),
        # The trade's own TransactTime (60); the entry after it has no 55 and keeps EUR/USD.
        (DataType.TRADE, "EUR/USD", 1_424_037_666_150_000_000, 1.11942, 50000.0, None, None,
         1043, "LMXBL->xxx"),
        (DataType.QUOTE, "EUR/USD", 1_424_037_666_200_000_000, None, None, 1.1194, 1.11944,
         1043, "LMXBL->xxx#2"),
    ]  # fmt: skip
    assert records[2].provider_specific == {
        "MsgType": "X", "MDReqID": "0", "BidSize": 2000000.0, "OfferSize": 1000000.0,
    }  # fmt: skip


def test_binance_style_incremental_trades_default_symbol_to_previous_entry() -> None:
    s = logged_on_client()
    body = (
        "262=t|268=3|279=0|269=2|270=10.00000|271=0.01000|55=BNBBUSD|1003=0|"
        "60=20240504-17:09:52.100|279=0|269=2|270=10.01|271=0.5|1003=1|"
        "279=0|269=2|270=10.02|271=0.25|55=ETHBUSD|1003=2"
    )
    recs = s.receive(venue(2, body, "X"), T0).records
    assert [(r.symbol, r.data_type, r.price, r.volume) for r in recs] == [
        ("BNBBUSD", DataType.TRADE, 10.0, 0.01), ("BNBBUSD", DataType.TRADE, 10.01, 0.5),
        ("ETHBUSD", DataType.TRADE, 10.02, 0.25),
    ]  # fmt: skip
    assert recs[0].timestamp_ns == codec.parse_utc_timestamp("20240504-17:09:52.100")
    assert recs[0].provider_specific == {
        "MsgType": "X", "MDReqID": "t", "MDUpdateAction": "0", "TradeID": "0",
    }  # fmt: skip


def test_incremental_updates_keep_the_other_side_and_entry_times_are_used() -> None:
    s = logged_on_client()
    s.receive(venue(2, "55=AAPL|268=2|269=0|270=100.0|271=5|269=1|270=100.2|271=7", "W"), T0)
    upd = s.receive(
        venue(3, "268=1|279=1|269=0|55=AAPL|270=100.1|271=9|272=20240504|273=17:09:52.900", "X"),
        T0,
    ).records
    [quote] = upd
    assert (quote.bid, quote.ask) == (100.1, 100.2)
    assert quote.provider_specific["BidSize"] == 9.0 and quote.provider_specific["OfferSize"] == 7.0
    assert quote.timestamp_ns == codec.parse_utc_timestamp("20240504-17:09:52.900")
    gone = s.receive(venue(4, "268=1|279=2|269=1|55=AAPL", "X"), T0).records
    assert (gone[0].bid, gone[0].ask) == (100.1, None)
    QualityChecker(stale_after_s=None).check(gone)
    assert QualityFlag.MISSING_FIELDS in gone[0].quality_flags


def test_forgotten_symbol_starts_from_an_empty_book() -> None:
    # After an unsubscribe the old top of book is stale: a later one-sided update must not
    # bring its other side back, while other symbols keep theirs.
    dec = codec.MarketDataDecoder("fix")
    out = codec.FixReceived()
    for sym in ("AAPL", "MSFT"):
        dec.decode("W", fields_of(wire(f"35=W|55={sym}|268=2|269=0|270=10|269=1|270=11")), T0, out)
    dec.forget("AAPL")
    dec.forget("NEVER_SEEN")  # unknown symbols are fine
    offers = "35=X|268=2|279=1|269=1|55=AAPL|270=12|279=1|269=1|55=MSFT|270=13"
    recs = dec.decode("X", fields_of(wire(offers)), T0, out)
    assert [(r.symbol, r.bid, r.ask) for r in recs] == [("AAPL", None, 12.0), ("MSFT", 10.0, 13.0)]
    assert out.errors == []


def test_encoder_output_decodes_to_the_same_values() -> None:
    server = codec.FixSession("VENUE", "FEEDFLEET", acceptor=True)
    server.logged_on = True
    client = logged_on_client()
    t = T0 + 123_000_000
    server.next_out_seq = 2  # after its Logon reply
    raw = server.snapshot(T0, "MSFT", [
        codec.MDEntry(codec.BID, 410.11, 300, time_ns=t),
        codec.MDEntry(codec.OFFER, 410.15, 200, time_ns=t),
        codec.MDEntry(codec.TRADE, 410.12, 50, time_ns=t),
    ], "MSFT:1")  # fmt: skip
    raw += server.incremental(T0, [
        codec.MDEntry(codec.TRADE, 410.13, 25, "MSFT", codec.NEW, t, entry_id="77"),
    ], "MSFT:1")  # fmt: skip
    recs = client.receive(raw, T0).records
    assert [(r.data_type, r.bid, r.ask, r.price, r.volume, r.timestamp_ns) for r in recs] == [
        (DataType.QUOTE, 410.11, 410.15, None, None, t),
        (DataType.TRADE, None, None, 410.12, 50.0, t),
        (DataType.TRADE, None, None, 410.13, 25.0, t),
    ]
    assert recs[2].provider_specific["MDEntryID"] == "77"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("268=2|279=0|269=2|270=1|271=1|55=A", "NoMDEntries is 2 but 1 entries follow"),
        ("268=1|279=0|269=2|270=1|271=1", "MD entry without Symbol (55)"),
        ("268=x|279=0|269=2|270=1", "NoMDEntries (268) not a number"),
        ("262=a", "X without NoMDEntries (268)"),
        ("268=1|279=0|55=A|270=1", "MD entry without MDEntryType (269)"),
        ("268=1|279=7|269=0|55=A|270=1", "unknown MDUpdateAction '7'"),
    ],
)
def test_bad_market_data_is_a_decode_error_not_an_exception(body: str, reason: str) -> None:
    s = logged_on_client()
    result = s.receive(venue(2, body, "X"), T0)
    assert reason in [e.reason for e in result.errors]
    ok = s.receive(venue(3, "268=1|279=0|269=2|270=5|271=1|55=A", "X"), T0)
    assert [r.price for r in ok.records] == [5.0]


def test_unparsable_price_flags_missing_fields() -> None:
    s = logged_on_client()
    [rec] = s.receive(venue(2, "268=1|279=0|269=2|270=abc|271=1|55=A", "X"), T0).records
    assert rec.price is None and rec.quality_flags == [QualityFlag.MISSING_FIELDS]


def test_other_entry_types_and_deeper_levels_are_skipped() -> None:
    s = logged_on_client()
    body = "268=3|279=0|269=7|270=5|55=A|279=0|269=0|270=4|290=2|279=0|269=B|271=100"
    result = s.receive(venue(2, body, "X"), T0)
    assert result.records == [] and result.errors == [] and result.skipped == 3


# ---------------------------------------------------------------- captures


def test_decode_capture_raw_stream_with_offsets() -> None:
    server = codec.FixSession("VENUE", "FEEDFLEET", acceptor=True)
    a = server.incremental(T0, [codec.MDEntry(codec.TRADE, 1.5, 2, "AAA", codec.NEW)])
    b = server.incremental(T0, [codec.MDEntry(codec.TRADE, 2.5, 3, "BBB", codec.NEW)])
    bad = a.replace(b"1.5", b"1.6")
    out = list(codec.decode_capture(a + bad + b))
    assert [type(o) for o in out] == [RawMarketData, CaptureError, RawMarketData]
    assert isinstance(out[1], CaptureError) and out[1].location == f"offset {len(a)}"
    assert [o.price for o in out if isinstance(o, RawMarketData)] == [1.5, 2.5]
    only_b = list(codec.decode_capture(a + b, symbol="BBB"))
    assert [o.symbol for o in only_b if isinstance(o, RawMarketData)] == ["BBB"]


def test_decode_capture_pipe_lines_with_log_prefix() -> None:
    server = codec.FixSession("VENUE", "FEEDFLEET", acceptor=True)
    a = codec.to_pipes(server.incremental(T0, [codec.MDEntry(codec.TRADE, 1.5, 2, "AAA")]))
    data = f"20240504-17:09:52.462 : {a}\nnot fix\n{a.replace('10=', '10=9')}\n".encode()
    out = list(codec.decode_capture(data))
    assert isinstance(out[0], RawMarketData) and out[0].provider_sequence == 1
    assert isinstance(out[1], CaptureError) and out[1].location == "line 2"
    assert isinstance(out[2], CaptureError) and out[2].location == "line 3"
