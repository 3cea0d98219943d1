"""FIX 4.4 market-data codec, sans-I/O: a session state machine over simplefix.

``FixSession`` is one side of a FIX session (initiator for the adapter, acceptor for the
simulator). Bytes go in with the current time (``receive(data, now_ns)``); records, session
events, decode errors and the bytes to write back come out. It frames messages itself
(BeginString, BodyLength and CheckSum validated, zero-padded BodyLength accepted) and uses
simplefix's ``FixParser``/``FixMessage`` for the tag=value work. It holds the MsgSeqNum
counters in both directions; every time it needs (SendingTime, heartbeat timers) comes in as
an argument. See ``shared/protocols.md`` section 6.

Session rules follow QuickFIX's acceptance scripts (``fixtures/fix44_session_flows.txt``):
a MsgSeqNum above the expected one queues the message and sends ResendRequest
``7=<expected>|16=0``; below it without PossDupFlag ends the session with a Logout; a PossDup
already seen is ignored; SequenceReset GapFill is honoured only in sequence, Reset mode always;
a ResendRequest is answered with resent application messages (``43=Y``, ``122``) and runs of
admin messages replaced by one SequenceReset-GapFill. Timers are QuickFIX's: a Heartbeat after
HeartBtInt without sending, a TestRequest after 1.2 x HeartBtInt without receiving, timed out
after 2.4 x HeartBtInt.

Sequence numbers can outlive the process, as in a FIX engine: ``FixSession.state`` is what to
persist and ``FixSession(state=...)`` continues from it, so a Logon without ResetSeqNumFlag
carries the old numbers and a peer that sent while we were away is asked to resend. Resent
market data (PossDupFlag, OrigSendingTime as its time) is decoded like any other.

Market data: bid/offer entries keep a per-symbol top of book, so each message yields one
QUOTE per symbol touched with both sides when known; trade entries yield TRADEs. Records carry
``provider_sequence`` = MsgSeqNum in ``stream`` = ``SenderCompID->TargetCompID@<Logon time>``
of the Logon that started the sequence space (a reset starts a new one; a persisted session
keeps its stream across restarts). Two FIX facts would make ``QualityChecker`` misread that
sequence, so the codec keeps it honest:
- admin messages (Heartbeat, TestRequest...) use numbers too: when every number between two
  records was received (resent ones included), the later record is marked
  ``sequence_contiguous=False`` (no gap); after numbers that were never received (gap-filled,
  reset) it stays True and is flagged. A GapFill over admin messages handled ahead of a gap
  (the peer's Logon, a ResendRequest) loses nothing; over any other number it may hide
  application messages the peer will not resend, so it counts as lost;
- a message can yield several records with one MsgSeqNum: the 2nd, 3rd... go to the
  sub-streams ``<stream>#2``, ``#3``... (non-contiguous), so they are not flagged duplicate.
"""

from __future__ import annotations

import calendar
import dataclasses
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import simplefix
from simplefix import errors as simplefix_errors

from common.codecs.base import CaptureError, DecodeError, brief, clip
from common.model import DataType, QualityFlag, RawMarketData

PROVIDER = "fix"
BEGIN_STRING = "FIX.4.4"
SOH = b"\x01"

# MsgType (35)
HEARTBEAT = "0"
TEST_REQUEST = "1"
RESEND_REQUEST = "2"
REJECT = "3"
SEQUENCE_RESET = "4"
LOGOUT = "5"
LOGON = "A"
MARKET_DATA_REQUEST = "V"
SNAPSHOT_FULL_REFRESH = "W"
INCREMENTAL_REFRESH = "X"
MARKET_DATA_REQUEST_REJECT = "Y"
ADMIN_TYPES = frozenset({HEARTBEAT, TEST_REQUEST, RESEND_REQUEST, REJECT, SEQUENCE_RESET,
                         LOGOUT, LOGON})  # fmt: skip
# Admin messages whose numbers a checkpoint may call "not a loss" if the peer gap-fills them.
# Not SequenceReset: a GapFill may itself stand for lost numbers.
_LOGGED_ADMIN = ADMIN_TYPES - {SEQUENCE_RESET}

# SubscriptionRequestType (263)
SNAPSHOT_ONLY = "0"
SNAPSHOT_AND_UPDATES = "1"
DISABLE_PREVIOUS = "2"

# MDEntryType (269)
BID = "0"
OFFER = "1"
TRADE = "2"
ENTRY_TYPES_FOR: dict[DataType, tuple[str, ...]] = {
    DataType.QUOTE: (BID, OFFER),
    DataType.TRADE: (TRADE,),
}

# MDUpdateAction (279)
NEW = "0"
CHANGE = "1"
DELETE = "2"

# MDReqRejReason (281). A FIX 4.4 venue has no "rate limited" reason; "insufficient
# bandwidth" is the closest (the venue cannot serve more), so the simulator sends it for
# its rate_limit fault and the adapter treats it as ProviderRateLimited.
REJECT_UNKNOWN_SYMBOL = "0"
REJECT_DUPLICATE_MDREQID = "1"
REJECT_INSUFFICIENT_BANDWIDTH = "2"
REJECT_INSUFFICIENT_PERMISSIONS = "3"
RATE_LIMIT_REASON = REJECT_INSUFFICIENT_BANDWIDTH

HEADER_TAGS = frozenset({8, 9, 35, 34, 43, 49, 52, 56, 97, 115, 122, 128, 10})
# Extra fields of an MD entry kept in provider_specific, under their FIX names.
ENTRY_FIELD_NAMES: dict[int, str] = {
    15: "Currency",
    58: "Text",
    106: "Issuer",
    274: "TickDirection",
    275: "MDMkt",
    276: "QuoteCondition",
    277: "TradeCondition",
    278: "MDEntryID",
    280: "MDEntryRefID",
    282: "MDEntryOriginator",
    288: "MDEntryBuyer",
    289: "MDEntrySeller",
    290: "MDEntryPositionNo",
    299: "QuoteEntryID",
    346: "NumberOfOrders",
    336: "TradingSessionID",
    451: "NetChgPrevDay",
    1003: "TradeID",
}

MAX_BODY_LENGTH = 1 << 20
# Messages held back behind a sequence gap. Past this the gap is given up as lost, so a
# peer that never answers a ResendRequest cannot stall the feed forever.
MAX_QUEUED = 5000
# Numbers of the last admin messages processed, for ``FixSession.checkpoint``.
ADMIN_LOG_SIZE = 1024
# Sent application messages kept for answering ResendRequests (the acceptor's store).
STORE_SIZE = 20000

TEST_REQUEST_FACTOR = 1.2
TIMEOUT_FACTOR = 2.4
# HeartBtInt is a FIX int (int32 in QuickFIX); beyond it the timers' float arithmetic
# overflows, so a Logon asking for more is refused.
MAX_HEARTBEAT_INTERVAL = 2**31 - 1
# SessionRejectReason (373) for what simplefix refuses; anything else is 99 (Other).
_REJECT_REASONS = {"EmptyValueError": "4", "TagNotNumberError": "0"}
# SessionRejectReason (373) values for market data that fails validation (FIX 4.4).
REQUIRED_TAG_MISSING = "1"
VALUE_OUT_OF_RANGE = "5"
INCORRECT_DATA_FORMAT = "6"
GROUP_FIELDS_OUT_OF_ORDER = "15"
INCORRECT_NUM_IN_GROUP = "16"
# More digits than any FIX int field needs, and fewer than int()'s str-conversion limit.
_MAX_INT_DIGITS = 100

_NS = 1_000_000_000
_HALF_DAY = 43200 * _NS


# ---------------------------------------------------------------- time


def format_utc_timestamp(ns: int) -> str:
    """``YYYYMMDD-HH:MM:SS.sss`` (UTCTimestamp, millisecond precision)."""
    seconds, rem = divmod(ns, _NS)
    days, sod = divmod(seconds, 86400)
    y, m, d = _civil_from_days(days)
    hh, rest = divmod(sod, 3600)
    mm, ss = divmod(rest, 60)
    return f"{y:04d}{m:02d}{d:02d}-{hh:02d}:{mm:02d}:{ss:02d}.{rem // 1_000_000:03d}"


def _civil_from_days(z: int) -> tuple[int, int, int]:
    # Howard Hinnant's days-to-civil: no datetime objects on the hot path. His C++ division
    # truncates, hence his `z - 146096` for negative z; Python's // already floors.
    z += 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    y = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    return (y + 1 if m <= 2 else y), m, d


def _uint(text: str | None) -> int | None:
    """A non-negative FIX int field, or None. ``str.isdigit`` alone also passes "²", which
    ``int`` refuses, as it refuses more digits than its conversion limit."""
    if text is None or not text.isdigit() or not text.isascii() or len(text) > _MAX_INT_DIGITS:
        return None
    return int(text)


def parse_utc_date(value: str) -> int | None:
    """``YYYYMMDD`` -> ns at midnight UTC, or None."""
    if len(value) != 8 or not value.isdigit() or not value.isascii():
        return None
    y, m, d = int(value[:4]), int(value[4:6]), int(value[6:8])
    # Year 0 is not a date calendar.timegm can take.
    if not (y >= 1 and 1 <= m <= 12 and 1 <= d <= 31):
        return None
    return calendar.timegm((y, m, d, 0, 0, 0)) * _NS


def parse_utc_time_only(value: str) -> int | None:
    """``HH:MM:SS[.fff...]`` -> ns since midnight, or None."""
    if len(value) < 8 or value[2] != ":" or value[5] != ":" or not value.isascii():
        return None
    hh, mm, ss = value[:2], value[3:5], value[6:8]
    if not (hh.isdigit() and mm.isdigit() and ss.isdigit()):
        return None
    frac = value[9:] if len(value) > 8 and value[8] == "." else ""
    if len(value) > 8 and (value[8] != "." or not frac.isdigit()):
        return None
    ns = ((int(hh) * 60 + int(mm)) * 60 + int(ss)) * _NS
    if frac:
        ns += int(frac[:9].ljust(9, "0"))
    return ns


def parse_utc_timestamp(value: str) -> int | None:
    """``YYYYMMDD-HH:MM:SS[.fff...]`` -> ns since the epoch, or None."""
    if len(value) < 17 or value[8] != "-":
        return None
    day = parse_utc_date(value[:8])
    tod = parse_utc_time_only(value[9:])
    if day is None or tod is None:
        return None
    return day + tod


# ---------------------------------------------------------------- framing


@dataclass(slots=True)
class FixFrame:
    """One framed message: its bytes and where it starts in the input stream."""

    raw: bytes
    offset: int


class FixFramer:
    """Splits a byte stream into checksummed FIX messages, resynchronising after bad bytes.

    ``feed`` yields ``FixFrame`` or ``DecodeError``; a partial message waits for more data.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.consumed = 0  # stream offset of the first buffered byte
        self.error_offset = 0  # stream offset of the last DecodeError's bytes

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def _find_start(self, pos: int) -> int:
        buf = self._buf
        while True:
            start = buf.find(b"8=FIX", pos)
            # "58=FIX..." inside a Text field is not a message start.
            if start <= 0 or not buf[start - 1 : start].isdigit():
                return start
            pos = start + 1

    def feed(self, data: bytes) -> list[FixFrame | DecodeError]:
        buf = self._buf
        buf += data
        out: list[FixFrame | DecodeError] = []
        pos = 0

        def error(reason: str, raw: bytes, at: int) -> None:
            self.error_offset = self.consumed + at
            out.append(DecodeError(reason, clip(raw)))

        while True:
            start = self._find_start(pos)
            if start < 0:
                # Keep a tail that may be the beginning of the next "8=FIX".
                keep = min(4, len(buf) - pos)
                junk = bytes(buf[pos : len(buf) - keep])
                if junk.strip(b"\r\n\x01 "):
                    error("bytes outside any FIX message", junk, pos)
                pos = len(buf) - keep
                break
            if start > pos:
                junk = bytes(buf[pos:start])
                if junk.strip(b"\r\n\x01 "):
                    error("bytes before BeginString", junk, pos)
                pos = start
            end_bs = buf.find(SOH, start)
            if end_bs < 0:
                if len(buf) - start > 32:
                    error("BeginString not terminated", bytes(buf[start:]), start)
                    pos = start + 1
                    continue
                break
            if buf[start + 2 : end_bs] != b"FIX.4.4":
                version = clip(bytes(buf[start + 2 : end_bs]), 20)
                error("unsupported BeginString " + version, bytes(buf[start:end_bs]), start)
                pos = start + 1
                continue
            len_start = end_bs + 1
            end_len = buf.find(SOH, len_start)
            if end_len < 0:
                if len(buf) - len_start > 12:
                    error("BodyLength not terminated", bytes(buf[start:]), start)
                    pos = start + 1
                    continue
                break
            field9 = buf[len_start:end_len]
            if not field9.startswith(b"9=") or not field9[2:].isdigit():
                error("second field is not BodyLength (9)", bytes(field9), start)
                pos = start + 1
                continue
            # Zero padding is allowed, so count the digits after it: more than int()
            # converts would raise, and anything past 8 digits is over the limit anyway.
            digits = field9[2:].lstrip(b"0")
            if len(digits) > 8:
                error("BodyLength too large", bytes(field9[:40]), start)
                pos = start + 1
                continue
            body_length = int(digits or b"0")
            body_start = end_len + 1
            body_end = body_start + body_length
            if body_length > MAX_BODY_LENGTH:
                error(f"BodyLength {body_length} too large", bytes(field9), start)
                pos = start + 1
                continue
            if len(buf) < body_end + 7:
                # Wait for the rest, unless a new message plainly starts inside the body,
                # which means the BodyLength is wrong.
                restart = buf.find(b"\x018=FIX", body_start)
                if restart < 0:
                    break
                error("BodyLength runs past the message", bytes(buf[start:restart]), start)
                pos = restart + 1
                continue
            trailer = buf[body_end : body_end + 7]
            if not (trailer.startswith(b"10=") and trailer[6] == 1 and trailer[3:6].isdigit()):
                end = buf.find(b"\x0110=", body_start)
                error("BodyLength does not end at CheckSum (10)",
                      bytes(buf[start : end + 8 if end > 0 else body_end]), start)  # fmt: skip
                pos = start + 1
                continue
            message = bytes(buf[start : body_end + 7])
            if not message.startswith(b"35=", body_start - start):
                error("third field is not MsgType (35)", message, start)
                pos = body_end + 7
                continue
            checksum = sum(message[: body_end - start]) % 256
            if checksum != int(trailer[3:6]):
                error(f"CheckSum {trailer[3:6].decode()} != computed {checksum:03d}",
                      message, start)  # fmt: skip
                pos = body_end + 7
                continue
            out.append(FixFrame(message, self.consumed + start))
            pos = body_end + 7
        del buf[:pos]
        self.consumed += pos
        return out


def parse_frame(raw: bytes) -> Any:
    """A framed message as a ``simplefix.FixMessage``. Raises ``ValueError`` on bad fields."""
    parser = simplefix.FixParser()
    parser.append_buffer(raw)
    try:
        msg = parser.get_message()
    except (simplefix_errors.ParsingError, ValueError) as exc:
        raise ValueError(f"bad field: {type(exc).__name__} {clip(str(exc), 60)}") from exc
    if msg is None:
        raise ValueError("incomplete message")
    return msg


def first_message_fields(data: bytes) -> dict[int, str] | None:
    """The fields of the first message in a connection's first bytes, so an acceptor can
    pick the session by CompIDs before feeding it: None while incomplete, {} if what comes
    first is not a well-formed message (the session will then refuse it)."""
    for item in FixFramer().feed(data):
        if isinstance(item, DecodeError):
            return {}
        try:
            pairs = _pairs(parse_frame(item.raw))
        except ValueError:
            return {}
        fields: dict[int, str] = {}
        for tag, value in pairs:
            fields.setdefault(tag, value)
        return fields
    return None


def build_message(
    msg_type: str, header: Sequence[tuple[int, str]], body: Iterable[tuple[int, Any]]
) -> bytes:
    """Encode with simplefix: 8, 9 and 35 first, then header and body in order, then 10."""
    msg = simplefix.FixMessage()
    msg.append_pair(8, BEGIN_STRING)
    msg.append_pair(35, msg_type)
    for tag, value in header:
        msg.append_pair(tag, value)
    for tag, value in body:
        msg.append_pair(tag, value)
    out: bytes = msg.encode()
    return out


def pipe_to_soh(text: str) -> bytes:
    """The fixture notation (``|`` for SOH) as wire bytes."""
    return text.replace("|", "\x01").encode("latin-1")


def to_pipes(raw: bytes) -> str:
    return raw.replace(SOH, b"|").decode("latin-1")


def _pairs(msg: Any) -> list[tuple[int, str]]:
    return [(int(t), v.decode("latin-1")) for t, v in msg.pairs]


# ---------------------------------------------------------------- events


@dataclass(slots=True)
class LogonReceived:
    heartbeat_interval: int
    reset_seq_num: bool
    username: str | None = None
    password: str | None = None


@dataclass(slots=True)
class LogoutReceived:
    text: str


@dataclass(slots=True)
class HeartbeatReceived:
    test_req_id: str | None


@dataclass(slots=True)
class TestRequestReceived:
    test_req_id: str


@dataclass(slots=True)
class ResendRequested:
    begin: int
    end: int


@dataclass(slots=True)
class SequenceGap:
    """Incoming MsgSeqNum jumped; a ResendRequest went out (unless one is pending)."""

    expected: int
    received: int


@dataclass(slots=True)
class SequenceResetReceived:
    new_seq_no: int
    gap_fill: bool


@dataclass(slots=True)
class SessionRejectReceived:
    ref_seq_num: int | None
    reason: str | None
    text: str


@dataclass(slots=True)
class MarketDataRequested:
    md_req_id: str
    subscription_type: str
    market_depth: int
    update_type: str | None
    entry_types: list[str]
    symbols: list[str]


@dataclass(slots=True)
class MarketDataRejected:
    """35=Y: the request ``md_req_id`` (for ``symbols``) was refused."""

    md_req_id: str
    reason: str | None
    text: str
    symbols: list[str]


@dataclass(slots=True)
class ApplicationMessage:
    """An application message this codec has no decoder for."""

    msg_type: str
    seq_num: int
    body: list[tuple[int, str]]


@dataclass(slots=True)
class PeerReset:
    """The peer's numbers started over though ours kept them: its Logon had ResetSeqNumFlag
    we did not ask for (the session goes on in a new stream), or a MsgSeqNum below what we
    expect (the session ends; only a Logon with a reset gets past it). Either way what it
    sent from ``lost_from`` on in ``old_stream`` can no longer be asked for."""

    lost_from: int
    old_stream: str


@dataclass(slots=True)
class SessionClosed:
    """The session is over; the transport should be closed after writing ``outgoing``."""

    reason: str


SessionEvent = (
    LogonReceived | LogoutReceived | HeartbeatReceived | TestRequestReceived | ResendRequested
    | SequenceGap | SequenceResetReceived | SessionRejectReceived | MarketDataRequested
    | MarketDataRejected | ApplicationMessage | PeerReset | SessionClosed
)  # fmt: skip


@dataclass(slots=True)
class FixReceived:
    records: list[RawMarketData] = field(default_factory=list)
    events: list[SessionEvent] = field(default_factory=list)
    errors: list[DecodeError] = field(default_factory=list)
    outgoing: bytes = b""
    skipped: int = 0  # MD entries of kinds not turned into records


@dataclass(slots=True)
class FixTick:
    outgoing: bytes = b""
    timed_out: bool = False


@dataclass(slots=True)
class MDEntry:
    """One market-data entry for the server side to encode."""

    entry_type: str
    price: float | None
    size: float | None = None
    symbol: str | None = None
    action: str | None = None  # 279, incremental refresh only
    time_ns: int | None = None  # 272/273
    entry_id: str | None = None


# ---------------------------------------------------------------- market data decoding


@dataclass(slots=True)
class _TopOfBook:
    bid: float | None = None
    bid_size: float | None = None
    ask: float | None = None
    ask_size: float | None = None


def _number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class InvalidMessage:
    """Why a message fails validation, as a session-level Reject (35=3) reports it."""

    reason: str  # SessionRejectReason (373)
    ref_tag: int | None  # RefTagID (371): the tag at fault
    text: str


class MarketDataDecoder:
    """W/X messages -> records, keeping a top of book per symbol.

    The session feeds it messages in sequence order; ``decode_capture`` uses it alone.
    What a message gets wrong is a decode error, and its first fault is kept in
    ``invalid`` for the session's Reject; the entries that do decode are kept (market data
    received is not thrown away for a neighbour's fault).
    """

    def __init__(self, provider: str = PROVIDER) -> None:
        self.provider = provider
        self.books: dict[str, _TopOfBook] = {}
        self.invalid: InvalidMessage | None = None

    def _fault(
        self, out: FixReceived, reason: str, ref_tag: int | None, text: str, raw: str
    ) -> None:
        out.errors.append(DecodeError(text, raw))
        if self.invalid is None:
            self.invalid = InvalidMessage(reason, ref_tag, text)

    def forget(self, symbol: str) -> None:
        self.books.pop(symbol, None)

    def decode(
        self, msg_type: str, pairs: list[tuple[int, str]], receive_ns: int, out: FixReceived
    ) -> list[RawMarketData]:
        """Records of one W or X message, in entry order (QUOTE per symbol at its first
        bid/offer entry). Sequence fields are left for the session to set."""
        self.invalid = None
        snapshot = msg_type == SNAPSHOT_FULL_REFRESH
        header: dict[int, str] = {}
        entries: list[list[tuple[int, str]]] = []
        count: int | None = None
        delimiter = 269 if snapshot else 279
        for tag, value in pairs:
            if count is None:
                if tag == 268:
                    try:
                        count = int(value)
                    except ValueError:
                        self._fault(out, INCORRECT_DATA_FORMAT, 268,
                                    "NoMDEntries (268) not a number", value)  # fmt: skip
                        return []
                elif tag not in header:
                    header[tag] = value
            elif tag == 10:
                break  # the trailer; with 268=0 (an empty book) it follows NoMDEntries
            elif tag == delimiter or not entries:
                if tag != delimiter:
                    text = f"MD entry does not start with tag {delimiter}"
                    self._fault(out, GROUP_FIELDS_OUT_OF_ORDER, tag, text, str(tag))
                entries.append([(tag, value)])
            else:
                entries[-1].append((tag, value))
        if count is None:
            self._fault(out, REQUIRED_TAG_MISSING, 268,
                        f"{msg_type} without NoMDEntries (268)", "")  # fmt: skip
            return []
        if count != len(entries):
            text = f"NoMDEntries is {count} but {len(entries)} entries follow"
            self._fault(out, INCORRECT_NUM_IN_GROUP, 268, text, "")
        poss_dup = header.get(43) == "Y"
        # A resent message's SendingTime is the resend's; OrigSendingTime is when it happened.
        sent_text = (header.get(122) if poss_dup else None) or header.get(52, "")
        sending_ns = parse_utc_timestamp(sent_text) or 0
        default_day = sending_ns - sending_ns % (86400 * _NS) if sending_ns else 0
        default_symbol = header.get(55)
        md_req_id = header.get(262)
        records: list[RawMarketData] = []
        # One QUOTE per symbol per message, updated by each of its bid/offer entries.
        quotes: dict[str, RawMarketData] = {}
        if snapshot and default_symbol is not None:
            self.books[default_symbol] = _TopOfBook()
        symbol = default_symbol
        for entry in entries:
            fields = dict(entry)
            symbol = fields.get(55, symbol)
            if not symbol:
                self._fault(out, REQUIRED_TAG_MISSING, 55, "MD entry without Symbol (55)",
                            _entry_text(entry))  # fmt: skip
                continue
            entry_type = fields.get(269)
            action = NEW if snapshot else fields.get(279)
            flags: list[str] = []
            price = _number(fields.get(270))
            size = _number(fields.get(271))
            t = _entry_time(fields, default_day) or sending_ns or receive_ns
            if sending_ns and t - sending_ns > _HALF_DAY:
                t -= 2 * _HALF_DAY  # an entry time just before midnight, sent just after
            if entry_type in (BID, OFFER):
                book = self.books.get(symbol)
                if book is None:
                    book = self.books[symbol] = _TopOfBook()
                position = fields.get(290)
                if position is not None and position != "1":
                    out.skipped += 1  # deeper levels: only the top of book is kept
                    continue
                if action == DELETE:
                    price = size = None
                elif price is None:
                    flags.append(QualityFlag.MISSING_FIELDS)
                elif action not in (NEW, CHANGE):
                    text = f"unknown MDUpdateAction {brief(action)}"
                    self._fault(out, VALUE_OUT_OF_RANGE, 279, text, _entry_text(entry))
                    continue
                if entry_type == BID:
                    book.bid, book.bid_size = price, size
                else:
                    book.ask, book.ask_size = price, size
                quote = quotes.get(symbol)
                if quote is None:
                    quote = RawMarketData(symbol, self.provider, t, DataType.QUOTE,
                                          receive_ns=receive_ns)  # fmt: skip
                    quote.provider_specific["MsgType"] = msg_type
                    if md_req_id is not None:
                        quote.provider_specific["MDReqID"] = md_req_id
                    if poss_dup:
                        quote.provider_specific["PossDupFlag"] = "Y"
                    quotes[symbol] = quote
                    records.append(quote)
                elif t > quote.timestamp_ns:
                    quote.timestamp_ns = t
                for f in flags:
                    if f not in quote.quality_flags:
                        quote.quality_flags.append(f)
                _add_entry_fields(quote.provider_specific, fields)
            elif entry_type == TRADE:
                if action == DELETE:
                    out.skipped += 1  # a trade bust; not a new trade
                    continue
                if price is None:
                    flags.append(QualityFlag.MISSING_FIELDS)
                specific: dict[str, Any] = {"MsgType": msg_type}
                if md_req_id is not None:
                    specific["MDReqID"] = md_req_id
                if poss_dup:
                    specific["PossDupFlag"] = "Y"
                if not snapshot and action is not None:
                    specific["MDUpdateAction"] = action
                _add_entry_fields(specific, fields)
                trade = RawMarketData(symbol, self.provider, t, DataType.TRADE, price, size,
                                      provider_specific=specific, receive_ns=receive_ns,
                                      quality_flags=flags)  # fmt: skip
                records.append(trade)
            elif entry_type is None:
                self._fault(out, REQUIRED_TAG_MISSING, 269, "MD entry without MDEntryType (269)",
                            _entry_text(entry))  # fmt: skip
            else:
                out.skipped += 1  # index values, session high/low, VWAP...
        for symbol, quote in quotes.items():
            book = self.books[symbol]
            quote.bid, quote.ask = book.bid, book.ask
            spec = quote.provider_specific
            spec["BidSize"], spec["OfferSize"] = book.bid_size, book.ask_size
        return records


def _entry_text(entry: list[tuple[int, str]]) -> str:
    return clip("|".join(f"{t}={v}" for t, v in entry))


def _entry_time(fields: dict[int, str], default_day: int) -> int | None:
    time_text = fields.get(273)
    date_text = fields.get(272)
    if time_text is None:
        transact = fields.get(60)
        return parse_utc_timestamp(transact) if transact else None
    tod = parse_utc_time_only(time_text)
    if tod is None:
        return None
    day = parse_utc_date(date_text) if date_text else default_day
    return (day or default_day) + tod if (day or default_day) else None


def _add_entry_fields(specific: dict[str, Any], fields: dict[int, str]) -> None:
    for tag, value in fields.items():
        name = ENTRY_FIELD_NAMES.get(tag)
        if name is not None:
            specific[name] = value


# ---------------------------------------------------------------- session


@dataclass(frozen=True, slots=True)
class SessionState:
    """What a session keeps across restarts, for its owner to persist (QuickFIX's FileStore
    keeps the two numbers in ``.seqnums``) and hand back to ``FixSession(state=...)``.

    ``next_sender_seq`` / ``next_target_seq``: the MsgSeqNum we send next and the one we
    expect next. ``stream``: the name of the sequence space (set by the Logon that started
    it), so records before and after a restart share it and their event ids. Beside the
    numbers, the record-sequence state: the MsgSeqNum of the last message that gave records
    and whether numbers were lost since, so the first record after a restart is judged a gap
    or not exactly as without the restart. ``admin_seen``: numbers from
    ``next_target_seq`` on already known to be admin messages (see ``FixSession.checkpoint``);
    the peer gap-fills them, and that loses nothing.
    """

    next_sender_seq: int = 1
    next_target_seq: int = 1
    stream: str = ""
    last_record_seq: int | None = None
    numbers_lost: bool = False
    admin_seen: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "next_sender_seq": self.next_sender_seq, "next_target_seq": self.next_target_seq,
            "stream": self.stream, "last_record_seq": self.last_record_seq,
            "numbers_lost": self.numbers_lost, "admin_seen": list(self.admin_seen),
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: Any) -> SessionState:
        """Raises ``ValueError`` unless ``data`` is what ``to_json`` wrote."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        out, into = data.get("next_sender_seq"), data.get("next_target_seq")
        last, stream = data.get("last_record_seq"), data.get("stream", "")
        lost = data.get("numbers_lost", False)
        admin = data.get("admin_seen", [])
        # bool is an int subclass: exact types only.
        if not (type(out) is int and type(into) is int and out >= 1 and into >= 1):
            raise ValueError("next_sender_seq and next_target_seq must be positive integers")
        if last is not None and not (type(last) is int and last >= 1):
            raise ValueError("last_record_seq must be a positive integer or null")
        if not isinstance(stream, str) or not isinstance(lost, bool):
            raise ValueError("stream must be a string and numbers_lost a boolean")
        if not (isinstance(admin, list) and len(admin) <= ADMIN_LOG_SIZE
                and all(type(n) is int and n >= 1 for n in admin)):  # fmt: skip
            raise ValueError("admin_seen must be a list of positive integers")
        return cls(out, into, stream, last, lost, tuple(admin))


class FixSession:
    """One side of a FIX 4.4 session. Not thread-safe; one instance per connection.

    ``acceptor=True`` for a server: it learns ``target_comp_id`` from the first Logon if not
    given, reports ``LogonReceived`` and waits for ``accept_logon``/``refuse_logon``, and keeps
    the last ``store_size`` sent application messages to answer ResendRequests. The initiator
    gap-fills any ResendRequest (re-sending old MarketDataRequests would duplicate
    subscriptions).

    ``state`` continues a session persisted by an earlier process (see ``SessionState``);
    ``self.state`` is what to persist. Sequence numbers, the stream and the acceptor's store
    outlive ``new_connection``; a Logon with ResetSeqNumFlag (either side's) starts over.
    """

    def __init__(
        self,
        sender_comp_id: str,
        target_comp_id: str | None,
        *,
        heartbeat_interval: int = 30,
        acceptor: bool = False,
        provider: str = PROVIDER,
        test_req_id: str = "TEST",
        state: SessionState | None = None,
        store_size: int = STORE_SIZE,
    ) -> None:
        state = state or SessionState()
        self.sender_comp_id = sender_comp_id
        self.target_comp_id = target_comp_id
        self.heartbeat_interval = heartbeat_interval
        self.acceptor = acceptor
        self.test_req_id = test_req_id
        self.store_size = store_size
        self.next_out_seq = state.next_sender_seq
        self.next_in_seq = state.next_target_seq
        self.logged_on = False
        self.closed = False
        self.stream = state.stream
        self.market_data = MarketDataDecoder(provider)
        self.md_requests: dict[str, list[str]] = {}
        self._framer = FixFramer()
        self._logout_sent = False
        self._logon_sent = False
        self._reset_sent = False
        self._logon_gap: int | None = None
        self._queued: dict[int, tuple[str, list[tuple[int, str]], bytes]] = {}
        self._resend_until: int | None = None  # a ResendRequest is pending up to here
        # Numbers above next_in_seq whose admin messages were handled as they came (a Logon
        # or a ResendRequest ahead of a gap, or before a restart): a GapFill over them loses
        # nothing.
        self._admin_ahead: set[int] = set(state.admin_seen)
        self._admin_log: deque[int] = deque(maxlen=ADMIN_LOG_SIZE)
        # MsgSeqNum -> (MsgType, the bytes sent): encoded bytes take a fifth of the memory
        # of field lists, and are parsed again only to answer a ResendRequest.
        self._store: dict[int, tuple[str, bytes]] = {}
        self._last_sent_ns = 0
        self._last_received_ns = 0
        self._test_requests = 0
        self._last_record_seq = state.last_record_seq
        self._numbers_lost = state.numbers_lost

    @property
    def state(self) -> SessionState:
        """The numbers to persist now (cheap: call it after every read)."""
        return SessionState(self.next_out_seq, self.next_in_seq, self.stream,
                            self._last_record_seq, self._numbers_lost,
                            tuple(sorted(self._admin_ahead)))  # fmt: skip

    def checkpoint(self, handed_over: SessionState) -> SessionState:
        """What to persist when the records read up to ``handed_over`` (an earlier
        ``state``) reached the consumer but those read since did not: its incoming side, so
        a restart asks for those records again, with the numbers of the admin messages read
        since (the peer will gap-fill them: not a loss); and the current outgoing number,
        never to be used twice."""
        start = handed_over.next_target_seq
        admin = {n for n in self._admin_log if n >= start}
        admin.update(n for n in self._admin_ahead if n >= start)
        admin.update(handed_over.admin_seen)
        return dataclasses.replace(handed_over, next_sender_seq=self.next_out_seq,
                                   admin_seen=tuple(sorted(admin)))  # fmt: skip

    def _new_sequence_space(self) -> None:
        self._queued.clear()
        self._admin_ahead.clear()
        self._admin_log.clear()
        self._resend_until = None

    # ---------------------------------------------------------------- sending

    def _send(
        self, now_ns: int, msg_type: str, body: Iterable[tuple[int, Any]] = (), *,
        store: bool = False,
    ) -> bytes:  # fmt: skip
        body = [(t, str(v)) for t, v in body if v is not None]
        seq = self.next_out_seq
        self.next_out_seq += 1
        sending_time = format_utc_timestamp(now_ns)
        self._last_sent_ns = now_ns
        raw = build_message(msg_type, self._header(seq, sending_time), body)
        if store and self.acceptor:
            self._store[seq] = (msg_type, raw)
            if len(self._store) > self.store_size:
                # Numbers only grow (the store is emptied on a reset): the first is the oldest.
                del self._store[next(iter(self._store))]
        return raw

    def _header(
        self, seq: int, sending_time: str, orig_sending_time: str | None = None
    ) -> list[tuple[int, str]]:
        # QuickFIX's order: header fields by tag number.
        header = [(34, str(seq))]
        if orig_sending_time is not None:
            header.append((43, "Y"))
        header += [(49, self.sender_comp_id), (52, sending_time),
                   (56, self.target_comp_id or "")]  # fmt: skip
        if orig_sending_time is not None:
            header.append((122, orig_sending_time))
        return header

    def new_connection(self) -> None:
        """Forget transport state before a new connection; sequence numbers are kept."""
        self._framer = FixFramer()
        self.logged_on = self.closed = False
        self._logon_sent = self._logout_sent = False
        # Queued messages will be resent; admin messages handled ahead will be gap-filled.
        self._queued.clear()
        self._resend_until = None
        self._logon_gap = None
        self._test_requests = 0

    def skip_out_seq(self, count: int = 1) -> None:
        """Consume outgoing numbers without sending (a simulator's lost-message fault)."""
        self.next_out_seq += count

    def logon(
        self, now_ns: int, *, reset_seq_num: bool = True, username: str | None = None,
        password: str | None = None,
    ) -> bytes:  # fmt: skip
        """Initiator's Logon (98=0, 108, optional 141=Y, 553, 554). Without a reset it
        carries the numbers kept from before (``state``), and the peer resends what we
        missed."""
        if reset_seq_num:
            self.next_out_seq = 1
            self.next_in_seq = 1
            self._new_sequence_space()
        self._reset_sent = reset_seq_num
        self._logon_sent = True
        self._last_received_ns = now_ns
        return self._send(now_ns, LOGON, [
            (98, 0), (108, self.heartbeat_interval), (141, "Y" if reset_seq_num else None),
            (553, username), (554, password),
        ])  # fmt: skip

    def accept_logon(self, now_ns: int, reset_seq_num: bool = False) -> bytes:
        """Acceptor's Logon reply, echoing EncryptMethod and HeartBtInt."""
        self.logged_on = True
        if reset_seq_num:
            self.next_out_seq = 1
            self._store.clear()
        reply = self._send(now_ns, LOGON, [
            (98, 0), (108, self.heartbeat_interval), (141, "Y" if reset_seq_num else None),
        ])  # fmt: skip
        if self._logon_gap is not None:
            reply += self.resend_request(now_ns, self._logon_gap, 0)
            self._logon_gap = None
        return reply

    def refuse_logon(self, now_ns: int, text: str) -> bytes:
        """A Logout in reply to a Logon: how a FIX acceptor refuses credentials."""
        self.closed = True
        return self._send(now_ns, LOGOUT, [(58, text)])

    def logout(self, now_ns: int, text: str | None = None) -> bytes:
        self._logout_sent = True
        return self._send(now_ns, LOGOUT, [(58, text)])

    def heartbeat(self, now_ns: int, test_req_id: str | None = None) -> bytes:
        return self._send(now_ns, HEARTBEAT, [(112, test_req_id)])

    def test_request(self, now_ns: int, test_req_id: str) -> bytes:
        return self._send(now_ns, TEST_REQUEST, [(112, test_req_id)])

    def resend_request(self, now_ns: int, begin: int, end: int = 0) -> bytes:
        return self._send(now_ns, RESEND_REQUEST, [(7, begin), (16, end)])

    def market_data_request(
        self, now_ns: int, md_req_id: str, symbols: Sequence[str], entry_types: Sequence[str],
        *, subscription_type: str = SNAPSHOT_AND_UPDATES, market_depth: int = 1,
        update_type: str | None = "1",
    ) -> bytes:  # fmt: skip
        """35=V. ``update_type`` 1 = incremental; None leaves 265 out (needed with 263=2)."""
        if subscription_type == DISABLE_PREVIOUS:
            self.md_requests.pop(md_req_id, None)
        else:
            self.md_requests[md_req_id] = list(symbols)
        body: list[tuple[int, Any]] = [
            (262, md_req_id), (263, subscription_type), (264, market_depth), (265, update_type),
            (267, len(entry_types)),
        ]  # fmt: skip
        body += [(269, t) for t in entry_types]
        body.append((146, len(symbols)))
        body += [(55, s) for s in symbols]
        return self._send(now_ns, MARKET_DATA_REQUEST, body, store=True)

    def snapshot(
        self, now_ns: int, symbol: str, entries: Sequence[MDEntry], md_req_id: str | None = None
    ) -> bytes:
        """35=W for one symbol; entries start with 269."""
        body: list[tuple[int, Any]] = [(262, md_req_id), (55, symbol), (268, len(entries))]
        for e in entries:
            body.append((269, e.entry_type))
            body += _entry_body(e)
        return self._send(now_ns, SNAPSHOT_FULL_REFRESH, body, store=True)

    def incremental(
        self, now_ns: int, entries: Sequence[MDEntry], md_req_id: str | None = None
    ) -> bytes:
        """35=X; entries start with 279 and carry their own 55."""
        body: list[tuple[int, Any]] = [(262, md_req_id), (268, len(entries))]
        for e in entries:
            body += [(279, e.action or NEW), (269, e.entry_type), (55, e.symbol)]
            body += _entry_body(e)
        return self._send(now_ns, INCREMENTAL_REFRESH, body, store=True)

    def md_reject(self, now_ns: int, md_req_id: str, reason: str | None, text: str) -> bytes:
        return self._send(now_ns, MARKET_DATA_REQUEST_REJECT,
                          [(262, md_req_id), (281, reason), (58, text)], store=True)  # fmt: skip

    def send_application(
        self, now_ns: int, msg_type: str, body: Iterable[tuple[int, Any]]
    ) -> bytes:
        return self._send(now_ns, msg_type, body, store=True)

    # ---------------------------------------------------------------- timers

    def tick(self, now_ns: int) -> FixTick:
        """Heartbeat / TestRequest / timeout checks; call about every second."""
        out = FixTick()
        if not self.logged_on or self.closed:
            return out
        hb_ns = self.heartbeat_interval * _NS
        silence = now_ns - self._last_received_ns
        if silence >= TIMEOUT_FACTOR * hb_ns:
            self.closed = True
            out.timed_out = True
        elif silence >= TEST_REQUEST_FACTOR * (self._test_requests + 1) * hb_ns:
            self._test_requests += 1
            out.outgoing = self.test_request(now_ns, self.test_req_id)
        elif not self._test_requests and now_ns - self._last_sent_ns >= hb_ns:
            out.outgoing = self.heartbeat(now_ns)
        return out

    def seconds_until_tick(self, now_ns: int) -> float:
        """When ``tick`` may next have something to do (for a read timeout)."""
        if not self.logged_on or self.closed:
            return 1.0
        hb_ns = self.heartbeat_interval * _NS
        due = min(
            self._last_sent_ns + hb_ns,
            self._last_received_ns + int(TEST_REQUEST_FACTOR * (self._test_requests + 1) * hb_ns),
            self._last_received_ns + int(TIMEOUT_FACTOR * hb_ns),
        )
        return max(0.01, (due - now_ns) / _NS)

    # ---------------------------------------------------------------- receiving

    def receive(self, data: bytes, now_ns: int) -> FixReceived:
        """Feed bytes read from the peer; ``now_ns`` is the read time (receive and send)."""
        out = FixReceived()
        parts: list[bytes] = []
        for item in self._framer.feed(data):
            if self.closed:
                break  # nothing after a session end counts
            if isinstance(item, DecodeError):
                out.errors.append(item)
                continue
            self._last_received_ns = now_ns
            try:
                pairs = _pairs(parse_frame(item.raw))
            except ValueError as exc:
                out.errors.append(DecodeError(str(exc), clip(to_pipes(item.raw))))
                self._on_garbled(item.raw, exc, now_ns, out, parts)
                continue
            self._on_message(pairs, item.raw, now_ns, out, parts)
        out.outgoing = b"".join(parts)
        return out

    def _on_garbled(
        self, raw: bytes, exc: ValueError, now_ns: int, out: FixReceived, parts: list[bytes]
    ) -> None:
        """A framed message whose fields do not parse (an empty value, a tag that is not a
        number). At the expected MsgSeqNum its number is consumed and a session Reject sent,
        as a FIX engine does; left unconsumed it would be a gap that every resend of the
        same bytes fails to fill, holding back all that follows."""
        if not self.logged_on or self.closed:
            return
        start = raw.find(b"\x0134=")
        seq = None
        if start >= 0:
            seq = _uint(raw[start + 4 : raw.find(SOH, start + 1)].decode("latin-1"))
        if seq is None or seq != self.next_in_seq:
            return
        self.next_in_seq = seq + 1
        self._numbers_lost = True  # whatever it carried is gone: the next record is a gap
        reason = _REJECT_REASONS.get(type(exc.__cause__).__name__, "99")
        body = [(45, seq), (373, reason), (58, clip(str(exc), 100))]
        parts.append(self._send(now_ns, REJECT, body))
        self._drain(now_ns, out, parts)

    def _on_message(
        self, pairs: list[tuple[int, str]], raw: bytes, now_ns: int, out: FixReceived,
        parts: list[bytes],
    ) -> None:  # fmt: skip
        fields: dict[int, str] = {}
        for tag, value in pairs:
            fields.setdefault(tag, value)
        msg_type = fields.get(35, "")
        seq = _uint(fields.get(34))
        if seq is None:
            out.errors.append(DecodeError("missing or invalid MsgSeqNum (34)",
                                          clip(to_pipes(raw))))  # fmt: skip
            return
        if (
            not self.logged_on
            and msg_type != LOGON
            and not (msg_type == LOGOUT and self._logon_sent)
        ):
            self.closed = True
            out.events.append(SessionClosed(f"first message was {brief(msg_type)}, not a Logon"))
            return
        if self.target_comp_id is None and self.acceptor:
            self.target_comp_id = fields.get(49)
        if fields.get(49) != self.target_comp_id or fields.get(56) != self.sender_comp_id:
            self._close(out, parts, now_ns, "CompID problem", reply=self.logged_on)
            return
        if not self.logged_on:
            if msg_type == LOGON:
                self._on_logon(fields, seq, now_ns, out, parts)
            else:  # a Logout answering our Logon: credentials refused
                out.events.append(LogoutReceived(fields.get(58, "")))
                self.closed = True
                out.events.append(SessionClosed("logon refused: " + fields.get(58, "")))
            return
        self._test_requests = 0
        if msg_type == SEQUENCE_RESET and fields.get(123) != "Y":
            self._on_sequence_reset_mode(fields, now_ns, out, parts)
            return
        if seq > self.next_in_seq:
            if msg_type == RESEND_REQUEST:
                # Answered at once (the FIX rule, and QuickFIX's): a peer that waits for
                # this answer before filling our gap would otherwise wait on us forever.
                self._on_resend_request(fields, now_ns, out, parts)
                self._admin_ahead.add(seq)
            self._queue(seq, msg_type, pairs, raw, now_ns, out, parts)
            return
        if seq < self.next_in_seq:
            if fields.get(43) == "Y":
                return  # a resent copy of something already processed
            text = f"MsgSeqNum too low, expecting {self.next_in_seq} but received {seq}"
            self._close(out, parts, now_ns, text, reply=True)
            return
        self._process(seq, msg_type, pairs, fields, now_ns, out, parts)
        self._drain(now_ns, out, parts)

    def _on_logon(
        self, fields: dict[int, str], seq: int, now_ns: int, out: FixReceived,
        parts: list[bytes],
    ) -> None:  # fmt: skip
        reset = fields.get(141) == "Y"
        try:
            interval = int(fields.get(108, ""))
        except ValueError:
            interval = 0
        if fields.get(98, "0") != "0" or not 0 < interval <= MAX_HEARTBEAT_INTERVAL:
            text = f"Logon needs EncryptMethod 0 and HeartBtInt 1..{MAX_HEARTBEAT_INTERVAL}"
            self._close(out, parts, now_ns, text, reply=True)
            return
        # An initiator that kept its numbers and gets a reset it did not ask for: whatever
        # the peer sent since next_in_seq is gone with its old sequence space.
        lost = None
        if reset and not self.acceptor and not self._reset_sent and self.next_in_seq > 1:
            lost = PeerReset(self.next_in_seq, self.stream)
        if reset:
            self.next_in_seq = 1
            self._new_sequence_space()
        if self.acceptor:
            self.heartbeat_interval = interval
        else:
            self.logged_on = True
        if reset or self._reset_sent or not self.stream:
            # A new sequence space, so a new stream: its numbers start over.
            self.stream = f"{self.target_comp_id}->{self.sender_comp_id}@{fields.get(52, '')}"
            self._last_record_seq = None
            self._numbers_lost = False
        if seq < self.next_in_seq:
            if not self.acceptor:
                out.events.append(PeerReset(self.next_in_seq, self.stream))
            text = f"MsgSeqNum too low, expecting {self.next_in_seq} but received {seq}"
            self._close(out, parts, now_ns, text, reply=True)
            return
        expected = self.next_in_seq
        gap = seq > expected
        if not gap:
            self.next_in_seq = seq + 1
            self._admin_log.append(seq)
        out.events.append(LogonReceived(interval, reset, fields.get(553), fields.get(554)))
        if lost is not None:
            out.events.append(lost)
        if gap:
            # The Logon is processed; the numbers before it (and its own) are asked for
            # again, after our Logon reply when we are the acceptor. The peer gap-fills the
            # Logon's number, which loses nothing.
            out.events.append(SequenceGap(expected, seq))
            self._resend_until = seq
            self._admin_ahead.add(seq)
            if self.acceptor:
                self._logon_gap = expected
            else:
                parts.append(self.resend_request(now_ns, expected, 0))

    def _close(
        self, out: FixReceived, parts: list[bytes], now_ns: int, text: str, *, reply: bool
    ) -> None:
        if reply and not self._logout_sent:
            parts.append(self.logout(now_ns, text))
        self.closed = True
        out.events.append(SessionClosed(text))

    def _on_sequence_reset_mode(
        self, fields: dict[int, str], now_ns: int, out: FixReceived, parts: list[bytes]
    ) -> None:
        new = _uint(fields.get(36))
        if new is None:
            out.errors.append(DecodeError("SequenceReset without a valid NewSeqNo (36)", ""))
            return
        out.events.append(SequenceResetReceived(new, False))
        if new < self.next_in_seq:
            out.errors.append(DecodeError(
                f"SequenceReset to {new} below expected {self.next_in_seq}", ""
            ))  # fmt: skip
            return
        if new > self.next_in_seq:
            self._numbers_lost = True
        self.next_in_seq = new
        for queued in [s for s in self._queued if s < new]:
            del self._queued[queued]
        self._drain(now_ns, out, parts)

    def _queue(
        self, seq: int, msg_type: str, pairs: list[tuple[int, str]], raw: bytes, now_ns: int,
        out: FixReceived, parts: list[bytes],
    ) -> None:  # fmt: skip
        if seq not in self._queued and seq not in self._admin_ahead:
            self._queued[seq] = (msg_type, pairs, raw)
        if self._resend_until is None:
            out.events.append(SequenceGap(self.next_in_seq, seq))
            self._resend_until = seq - 1
            parts.append(self.resend_request(now_ns, self.next_in_seq, 0))
        if len(self._queued) > MAX_QUEUED:
            # The peer is not filling the gap: count it lost and go on from what we have.
            self.next_in_seq = min(self._queued)
            self._numbers_lost = True
            self._resend_until = None
            self._drain(now_ns, out, parts)

    def _drain(self, now_ns: int, out: FixReceived, parts: list[bytes]) -> None:
        queued, admin = self._queued, self._admin_ahead
        while (queued or admin) and not self.closed:
            seq = self.next_in_seq
            if seq in admin:
                admin.discard(seq)  # handled when it came ahead
                self.next_in_seq = seq + 1
                continue
            item = queued.pop(seq, None)
            if item is None:
                break
            msg_type, pairs, _raw = item
            fields: dict[int, str] = {}
            for tag, value in pairs:
                fields.setdefault(tag, value)
            self._process(seq, msg_type, pairs, fields, now_ns, out, parts)
        for stale in [s for s in queued if s < self.next_in_seq]:
            del queued[stale]
        admin.difference_update([s for s in admin if s < self.next_in_seq])
        if self._resend_until is not None and self.next_in_seq > self._resend_until:
            self._resend_until = None
        if queued and self._resend_until is None and not self.closed:
            # Another hole behind the one just filled.
            out.events.append(SequenceGap(self.next_in_seq, min(queued)))
            self._resend_until = min(queued) - 1
            parts.append(self.resend_request(now_ns, self.next_in_seq, 0))

    def _process(
        self, seq: int, msg_type: str, pairs: list[tuple[int, str]], fields: dict[int, str],
        now_ns: int, out: FixReceived, parts: list[bytes],
    ) -> None:  # fmt: skip
        """A message at the expected MsgSeqNum."""
        self.next_in_seq = seq + 1
        if msg_type in _LOGGED_ADMIN:
            self._admin_log.append(seq)
        if msg_type == SEQUENCE_RESET:  # GapFill mode here
            new = _uint(fields.get(36))
            if new is not None and new > seq:
                out.events.append(SequenceResetReceived(new, True))
                self._fill_gap(seq, new, now_ns, out, parts)
            else:
                out.errors.append(DecodeError("GapFill with NewSeqNo not above MsgSeqNum",
                                              clip(fields.get(36, ""))))  # fmt: skip
        elif msg_type in (SNAPSHOT_FULL_REFRESH, INCREMENTAL_REFRESH):
            records = self.market_data.decode(msg_type, pairs, now_ns, out)
            self._sequence(records, seq)
            out.records.extend(records)
            invalid = self.market_data.invalid
            if invalid is not None:
                # FIX 4.4: a message failing validation gets a session-level Reject.
                reject = [(45, seq), (371, invalid.ref_tag), (372, msg_type),
                          (373, invalid.reason), (58, clip(invalid.text, 100))]  # fmt: skip
                parts.append(self._send(now_ns, REJECT, reject))
        elif msg_type == HEARTBEAT:
            out.events.append(HeartbeatReceived(fields.get(112)))
        elif msg_type == TEST_REQUEST:
            req_id = fields.get(112, "")
            out.events.append(TestRequestReceived(req_id))
            parts.append(self.heartbeat(now_ns, req_id))
        elif msg_type == RESEND_REQUEST:
            self._on_resend_request(fields, now_ns, out, parts)
        elif msg_type == LOGOUT:
            out.events.append(LogoutReceived(fields.get(58, "")))
            if not self._logout_sent:
                parts.append(self.logout(now_ns))
            self.closed = True
            out.events.append(SessionClosed("logout: " + fields.get(58, "")))
        elif msg_type == MARKET_DATA_REQUEST_REJECT:
            md_req_id = fields.get(262, "")
            out.events.append(MarketDataRejected(
                md_req_id, fields.get(281), fields.get(58, ""),
                list(self.md_requests.pop(md_req_id, [])),
            ))  # fmt: skip
        elif msg_type == MARKET_DATA_REQUEST:
            out.events.append(_market_data_request(pairs, fields))
        elif msg_type == REJECT:
            out.events.append(SessionRejectReceived(
                _uint(fields.get(45)), fields.get(373), fields.get(58, "")
            ))  # fmt: skip
        elif msg_type == LOGON:
            out.errors.append(DecodeError("Logon while already logged on", ""))
        else:
            body = [(t, v) for t, v in pairs if t not in HEADER_TAGS]
            out.events.append(ApplicationMessage(msg_type, seq, body))

    def _fill_gap(
        self, first: int, new: int, now_ns: int, out: FixReceived, parts: list[bytes]
    ) -> None:
        """GapFill over ``first`` (its own number) up to ``new``. A receiver cannot tell
        skipped admin messages from application messages the peer will not resend, so a
        number we never got counts as lost, unless we know it was admin (handled when it came
        ahead). Messages we hold in the range were really sent and are processed (QuickFIX
        gap-fills application messages it chooses not to resend, and dropping data already
        received would lose it twice)."""
        queued, admin = self._queued, self._admin_ahead
        if first in admin:
            admin.discard(first)
        else:
            self._numbers_lost = True
        while self.next_in_seq < new and not self.closed:
            seq = self.next_in_seq
            if seq in admin:
                admin.discard(seq)
                self.next_in_seq = seq + 1
                continue
            item = queued.pop(seq, None)
            if item is None:
                self._numbers_lost = True
                held = [k for k in (*queued, *admin) if seq < k < new]
                self.next_in_seq = min(held) if held else new
                continue
            msg_type, pairs, _raw = item
            fields: dict[int, str] = {}
            for tag, value in pairs:
                fields.setdefault(tag, value)
            self._process(seq, msg_type, pairs, fields, now_ns, out, parts)

    def _sequence(self, records: list[RawMarketData], seq: int) -> None:
        if not records:
            return
        last = self._last_record_seq
        contiguous = last is None or seq == last + 1 or self._numbers_lost
        self._last_record_seq = seq
        self._numbers_lost = False
        stream = self.stream
        for i, record in enumerate(records):
            record.provider_sequence = seq
            if i == 0:
                record.stream = stream
                record.sequence_contiguous = contiguous
            else:
                record.stream = f"{stream}#{i + 1}"

    def _on_resend_request(
        self, fields: dict[int, str], now_ns: int, out: FixReceived, parts: list[bytes]
    ) -> None:
        begin, end = _uint(fields.get(7)), _uint(fields.get(16))
        if begin is None or end is None:
            out.errors.append(DecodeError("ResendRequest without BeginSeqNo/EndSeqNo", ""))
            return
        last = self.next_out_seq - 1
        if end == 0 or end > last:
            end = last
        out.events.append(ResendRequested(begin, end))
        now_text = format_utc_timestamp(now_ns)
        begin = max(1, begin)
        fill_from: int | None = None
        # What fell out of the store goes in one GapFill, without a walk over its numbers.
        first_kept = min(next(iter(self._store), end + 1), end + 1)
        if begin < first_kept:
            fill_from, begin = begin, first_kept
        for seq in range(begin, end + 1):
            sent = self._store.get(seq)
            if sent is None or sent[0] in ADMIN_TYPES:
                if fill_from is None:
                    fill_from = seq
                continue
            if fill_from is not None:
                parts.append(self._gap_fill(fill_from, seq, now_text))
                fill_from = None
            msg_type, raw = sent
            pairs = _pairs(parse_frame(raw))
            sending_time = next(v for t, v in pairs if t == 52)
            body = [(t, v) for t, v in pairs if t not in HEADER_TAGS]
            parts.append(build_message(msg_type, self._header(seq, now_text, sending_time), body))
        if fill_from is not None:
            parts.append(self._gap_fill(fill_from, end + 1, now_text))
        self._last_sent_ns = now_ns

    def _gap_fill(self, seq: int, new_seq: int, now_text: str) -> bytes:
        return build_message(SEQUENCE_RESET, self._header(seq, now_text, now_text),
                             [(36, str(new_seq)), (123, "Y")])  # fmt: skip


def _entry_body(e: MDEntry) -> list[tuple[int, Any]]:
    body: list[tuple[int, Any]] = [
        (270, _price_text(e.price)),
        (271, _price_text(e.size)),
        (278, e.entry_id),
    ]
    if e.time_ns is not None:
        stamp = format_utc_timestamp(e.time_ns)
        body += [(272, stamp[:8]), (273, stamp[9:])]
    return body


def _price_text(value: float | None) -> str | None:
    if value is None:
        return None
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def _market_data_request(
    pairs: list[tuple[int, str]], fields: dict[int, str]
) -> MarketDataRequested:
    return MarketDataRequested(
        md_req_id=fields.get(262, ""),
        subscription_type=fields.get(263, ""),
        market_depth=_uint(fields.get(264)) or 0,
        update_type=fields.get(265),
        entry_types=[v for t, v in pairs if t == 269],
        symbols=[v for t, v in pairs if t == 55],
    )


# ---------------------------------------------------------------- captures


def decode_capture(
    data: bytes, *, symbol: str | None = None
) -> Iterator[RawMarketData | CaptureError]:
    """Market data in a capture (``feedfleet decode fix``): raw FIX bytes, or one message
    per line with ``|`` or SOH separators (log prefixes before ``8=`` are ignored).

    No session rules: a capture may start mid-session. Errors are located by byte offset
    for raw streams and by line for line captures.
    """
    decoder = MarketDataDecoder()
    line_mode = b"\n" in data and (b"|" in data or b"\x018=FIX" not in data)
    if line_mode:
        for lineno, line in enumerate(data.splitlines(), 1):
            start = line.find(b"8=FIX")
            if start < 0:
                if line.strip() and not line.lstrip().startswith(b"#"):
                    yield CaptureError(f"line {lineno}", "no FIX message on this line")
                continue
            framer = FixFramer()
            wire = line[start:].rstrip().replace(b"|", SOH)
            found = False
            for item in framer.feed(wire):
                if isinstance(item, DecodeError):
                    yield CaptureError(f"line {lineno}", item.reason)
                    continue
                found = True
                yield from _capture_records(decoder, item.raw, f"line {lineno}", symbol)
            if not found and framer.buffered:
                yield CaptureError(f"line {lineno}", "incomplete FIX message")
        return
    framer = FixFramer()
    for item in framer.feed(data):
        if isinstance(item, DecodeError):
            yield CaptureError(f"offset {framer.error_offset}", item.reason)
            continue
        yield from _capture_records(decoder, item.raw, f"offset {item.offset}", symbol)
    if framer.buffered:
        yield CaptureError(f"offset {framer.consumed}", "truncated FIX message at end")


def _capture_records(
    decoder: MarketDataDecoder, raw: bytes, where: str, symbol: str | None
) -> Iterator[RawMarketData | CaptureError]:
    try:
        pairs = _pairs(parse_frame(raw))
    except ValueError as exc:
        yield CaptureError(where, str(exc))
        return
    msg_type = next((v for t, v in pairs if t == 35), "")
    if msg_type not in (SNAPSHOT_FULL_REFRESH, INCREMENTAL_REFRESH):
        return
    out = FixReceived()
    records = decoder.decode(msg_type, pairs, 0, out)
    for err in out.errors:
        yield CaptureError(where, err.reason)
    seq = _uint(next((v for t, v in pairs if t == 34), None))
    sender = next((v for t, v in pairs if t == 49), "")
    target = next((v for t, v in pairs if t == 56), "")
    for i, record in enumerate(records):
        if seq is not None:
            record.provider_sequence = seq
        record.stream = f"{sender}->{target}" + (f"#{i + 1}" if i else "")
        if symbol is None or record.symbol == symbol:
            yield record
