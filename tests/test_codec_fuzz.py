"""Codecs never raise: every provider codec's decode entry points under hostile input.

A codec that raises tears the provider session down and loses the records already decoded
from that read, so each property here feeds one entry point random bytes, truncations of
valid messages, structure-aware mutations (valid messages with fields replaced by wrong
types, extreme numbers, NaN/inf, long strings, NUL characters, deep nesting, unknown
message types) and checks that the call returns, that every record is a well-typed
``RawMarketData``, that every error is a ``DecodeError`` with a short reason, and, where a
good message rides along with the bad ones, that the good one still decodes.

Server-side request parsers are documented to raise ``CodecError``; for them the property
is "``CodecError`` or nothing".

Runs are derandomized and use no example database, so CI sees the same cases every time.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gzip
import json
import math
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.codecs import alphavantage as av
from common.codecs import bloomberg as bbg
from common.codecs import fix, iex, pcap, polygon, refinitiv
from common.codecs.base import UNEXPECTED, CaptureError, CodecError, DecodeError
from common.model import DataType, RawMarketData
from tests import SHARED

FIXTURES = SHARED / "fixtures"

FUZZ = settings(
    max_examples=250,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.large_base_example,
    ],
)
FUZZ_SMALL = settings(FUZZ, max_examples=120)

RECEIVE_NS = 1_714_842_592_462_000_000  # 2024-05-04T17:09:52.462Z
SENTINEL = "SENTINEL"
MAX_REASON = 400
MAX_RAW = 320


# ---------------------------------------------------------------- what every output must be


def check_record(r: Any) -> None:
    assert type(r) is RawMarketData
    assert type(r.symbol) is str and r.symbol
    assert type(r.provider) is str and r.provider
    assert type(r.timestamp_ns) is int
    assert type(r.data_type) is DataType
    for value in (r.price, r.volume, r.bid, r.ask):
        # float, or an int where the provider sent one (the numeric tower); never a bool.
        assert value is None or type(value) in (float, int), value
    assert type(r.provider_specific) is dict
    assert r.provider_sequence is None or type(r.provider_sequence) is int
    assert type(r.stream) is str
    assert type(r.sequence_contiguous) is bool
    assert type(r.receive_ns) is int
    assert type(r.quality_flags) is list and all(isinstance(f, str) for f in r.quality_flags)


def check_error(e: Any) -> None:
    assert type(e) is DecodeError
    assert type(e.reason) is str and e.reason
    assert type(e.raw) is str
    assert len(e.reason) <= MAX_REASON, e.reason[:200]
    assert len(e.raw) <= MAX_RAW
    # The last-resort guards answer with this prefix; a case reaching one is a codec bug.
    assert not e.reason.startswith(UNEXPECTED), e.reason


def check_capture_error(e: Any) -> None:
    assert type(e) is CaptureError
    assert type(e.location) is str and type(e.reason) is str
    assert len(e.reason) <= MAX_REASON, e.reason[:200]
    assert not e.reason.startswith(UNEXPECTED), e.reason


def check_all(records: Iterable[Any], errors: Iterable[Any]) -> None:
    for r in records:
        check_record(r)
    for e in errors:
        check_error(e)


def check_capture(items: Iterable[Any]) -> None:
    for item in items:
        if isinstance(item, CaptureError):
            check_capture_error(item)
        else:
            check_record(item)


def has_sentinel(records: Sequence[RawMarketData]) -> bool:
    return any(r.symbol == SENTINEL for r in records)


# ---------------------------------------------------------------- hostile values


# Raw JSON text, inserted verbatim where a value goes.
@dataclass(frozen=True)
class Raw:
    text: str


def to_json(obj: Any) -> str:
    """JSON text that may hold what orjson would refuse to write (ints past 64 bits, raw
    tokens, NaN as ``NaN``: those make the whole frame invalid JSON, also worth a case)."""
    if isinstance(obj, Raw):
        return obj.text
    if isinstance(obj, dict):
        return "{" + ",".join(json.dumps(str(k)) + ":" + to_json(v) for k, v in obj.items()) + "}"
    if isinstance(obj, list | tuple):
        return "[" + ",".join(to_json(v) for v in obj) + "]"
    return json.dumps(obj)


def to_json_bytes(obj: Any) -> bytes:
    return to_json(obj).encode("utf-8", "surrogatepass")


def deep_list(depth: int) -> Raw:
    return Raw("[" * depth + "]" * depth)


def deep_object(depth: int) -> Raw:
    return Raw('{"a":' * depth + "1" + "}" * depth)


JSON_EXTREMES: list[Any] = [
    None, True, False, 0, -1, 1, 9007199254740993, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63),
    -(2**63) - 1, 10**30, -(10**30), Raw("1" + "0" * 400), Raw("-0"), 0.0, -0.0, 1e308, -1e308,
    5e-324, 1.5, 1e13, Raw("1E-400"), math.nan, math.inf, -math.inf, "", "\x00", "a\x00b",
    "NaN", "nan", "inf", "-Infinity", "1e400", "x" * 20_000, "\x00" * 64, "\u00b2", "\u0663",
    "19:01:52.565", "23:59:60.999999999999", "24:00:00", "2024-02-30", "9999-12-31",
    "0001-01-01", "275000-01-01", "-1", "1" * 5000, "2024-05-04 09:30:00", "12.5%", {}, [],
    [None], {"": None}, {"$datetime": "x"}, {"$time": "25:00"},
    {"$datetime": "9999-12-31T23:59:59+14:00"}, deep_list(300), deep_list(950),
    deep_object(600), Raw("[" * 1100 + "]" * 1100),
]  # fmt: skip

_json_leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
weird_json = st.one_of(
    st.sampled_from(JSON_EXTREMES),
    _json_leaf,
    st.recursive(
        _json_leaf,
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
        ),
        max_leaves=6,
    ),
)


@st.composite
def mutated(draw: st.DrawFn, base: Any, vocab: Sequence[str] = ()) -> Any:
    """``base`` with a few values deleted, replaced by wrong types, or added, at any depth;
    ``vocab`` names keys worth adding (fields the codec reads)."""

    def walk(value: Any, depth: int) -> Any:
        if isinstance(value, dict):
            out = dict(value)
            keys = sorted(set(out) | set(vocab), key=str)
            for key in draw(st.lists(st.sampled_from(keys), max_size=4, unique=True)):
                op = draw(st.integers(0, 3))
                current = out.get(key)
                if op == 0:
                    out.pop(key, None)
                elif op == 1 and isinstance(current, dict | list) and depth < 4:
                    out[key] = walk(current, depth + 1)
                else:
                    out[key] = draw(weird_json)
            return out
        if isinstance(value, list) and value:
            out_list = list(value)
            i = draw(st.integers(0, len(out_list) - 1))
            if isinstance(out_list[i], dict | list) and draw(st.booleans()):
                out_list[i] = walk(out_list[i], depth + 1)
            else:
                out_list[i] = draw(weird_json)
            return out_list
        return draw(weird_json)

    return walk(base, 0)


def truncations(data: bytes) -> st.SearchStrategy[bytes]:
    return st.integers(0, len(data)).map(lambda n: data[:n])


@st.composite
def flipped(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with a few bytes overwritten, inserted or removed."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.integers(0, 2))
        pos = draw(st.integers(0, len(buf)))
        byte = draw(st.integers(0, 255))
        if op == 0 and pos < len(buf):
            buf[pos] = byte
        elif op == 1:
            buf.insert(pos, byte)
        elif pos < len(buf):
            del buf[pos]
    return bytes(buf)


def bytes_cases(valid: Sequence[bytes]) -> st.SearchStrategy[bytes]:
    """Random bytes, truncations and byte flips of valid messages."""
    pick = st.sampled_from(list(valid))
    return st.one_of(
        st.binary(max_size=300),
        pick.flatmap(truncations),
        pick.flatmap(flipped),
    )


# ---------------------------------------------------------------- Polygon

POLYGON_VALID: list[dict[str, Any]] = [
    polygon.trade_event("AAPL", 161.87, 300, 1651684192462, 4009402, conditions=[14, 41]),
    polygon.quote_event("MSFT", 114.125, 100, 114.128, 160, 1536036818784, 50385480),
    polygon.aggregate_event(
        "AM", "GTE", 0.4488, 0.4489, 0.4486, 0.4486, 4110, 1610144640000, 1610144700000
    ),
    polygon.aggregate_event("A", "GTE", 1.0, 2.0, 0.5, 1.5, 10, 1610144640000, 1610144641000),
    {"ev": "status", "status": "auth_success", "message": "authenticated"},
    {
        "ev": "LULD",
        "T": "MSFT",
        "h": 218.96,
        "l": 198.11,
        "i": [21],
        "z": 3,
        "t": 1601316752683746,
        "q": 290317,
    },
    {"ev": "V", "val": 3988.5, "T": "I:SPX", "t": 1678220098130},
]
POLYGON_VOCAB = (
    "ev", "sym", "p", "s", "t", "q", "bp", "ap", "c", "v", "status", "message", "trfi", "XX",
)  # fmt: skip
POLYGON_SENTINEL = polygon.trade_event(SENTINEL, 1.0, 1, 1651684192462, 1)


def polygon_valid_frames() -> list[bytes]:
    frames = [polygon.encode_events([e]) for e in POLYGON_VALID]
    frames.append(polygon.encode_events(POLYGON_VALID))
    if (FIXTURES / "polygon_ws.jsonl").is_file():
        frames += [ln for ln in (FIXTURES / "polygon_ws.jsonl").read_bytes().splitlines() if ln]
    return frames


polygon_message = st.one_of(
    st.sampled_from(POLYGON_VALID).flatmap(lambda m: mutated(m, POLYGON_VOCAB)),
    weird_json,
    st.builds(lambda ev: {"ev": ev, "sym": "X"}, weird_json),
)


def check_polygon(frame: polygon.DecodedFrame) -> None:
    check_all(frame.records, frame.errors)
    for status in frame.statuses:
        assert type(status.status) is str and type(status.message) is str
    assert type(frame.skipped) is int


@FUZZ
@given(bytes_cases(polygon_valid_frames()))
def test_polygon_bytes_never_raise(data: bytes) -> None:
    check_polygon(polygon.decode_frame(data, RECEIVE_NS))
    check_polygon(polygon.decode_frame(data.decode("utf-8", "replace"), RECEIVE_NS))


@FUZZ
@given(st.lists(polygon_message, max_size=4))
def test_polygon_bad_elements_lose_only_themselves(messages: list[Any]) -> None:
    data = to_json_bytes([*messages, POLYGON_SENTINEL])
    out = polygon.decode_frame(data, RECEIVE_NS)
    check_polygon(out)
    if not out.errors or not out.errors[0].reason.startswith("invalid JSON"):
        assert has_sentinel(out.records)


def polygon_frame_as_data(frame: polygon.DecodedFrame) -> tuple[Any, ...]:
    """Comparable, NaN included (NaN != NaN), with every value's type kept."""
    return (
        [repr(msgspec.structs.astuple(r)) for r in frame.records],
        [(s.status, s.message) for s in frame.statuses],
        [e.reason for e in frame.errors],
        frame.skipped,
    )


# Fields of the valid events set to values of every JSON type, and left out, so that the
# frames include many the typed path takes as well as many it must hand to the dict path.
polygon_field_values = st.one_of(
    st.integers(-(2**64), 2**64), st.floats(), st.none(), st.booleans(), st.text(max_size=4),
    st.lists(st.integers(0, 99), max_size=2), st.just(msgspec.UNSET),
)  # fmt: skip


POLYGON_TYPED = [e for e in POLYGON_VALID if e["ev"] in ("T", "Q", "status")]


@st.composite
def polygon_varied_event(draw: st.DrawFn) -> dict[str, Any]:
    base = dict(draw(st.sampled_from(POLYGON_TYPED)))
    keys = sorted({k for e in POLYGON_TYPED for k in e} | {"ev", "q", "trfi", "trft"})
    for key in draw(st.lists(st.sampled_from(keys), max_size=2)):
        value = draw(polygon_field_values)
        if value is msgspec.UNSET:
            base.pop(key, None)
        else:
            base[key] = value
    return base


@FUZZ
@given(
    st.lists(polygon_varied_event(), max_size=5)
    | st.lists(st.one_of(polygon_varied_event(), polygon_message), max_size=5)
)
def test_polygon_typed_path_gives_exactly_what_the_dict_path_gives(messages: list[Any]) -> None:
    data = to_json_bytes(messages)
    typed = polygon.decode_frame(data, RECEIVE_NS)
    by_dicts = polygon.decode_frame_untyped(data, RECEIVE_NS)
    assert polygon_frame_as_data(typed) == polygon_frame_as_data(by_dicts)


def test_polygon_typed_path_takes_well_formed_frames() -> None:
    """The fast path is taken where it should be: a frame of valid trades, quotes and
    statuses decodes without falling back (the fallback would give the same records,
    only slower, so nothing else would tell)."""
    frame = POLYGON_TYPED
    assert len(frame) >= 3
    typed = polygon._typed_frame(to_json_bytes(frame))
    assert [type(m).__name__ for m in typed] == [
        {"T": "_Trade", "Q": "_Quote", "status": "_Status"}[e["ev"]] for e in frame
    ]


def test_polygon_known_cases() -> None:
    out = polygon.decode_frame(b'[{"ev":{}}]', RECEIVE_NS)
    assert [e.reason for e in out.errors] == ["unknown event type {}"]
    deep = b'[{"ev":"X","a":' + b"[" * 1000 + b"]" * 1000 + b"}]"
    check_polygon(polygon.decode_frame(deep, RECEIVE_NS))
    out = polygon.decode_frame(
        to_json_bytes([{"ev": "status", "status": deep_list(990), "message": None}]), RECEIVE_NS
    )
    check_polygon(out)


@FUZZ_SMALL
@given(st.lists(bytes_cases(polygon_valid_frames()), max_size=4))
def test_polygon_capture_never_raises(lines: list[bytes]) -> None:
    check_capture(polygon.decode_capture(b"\n".join(lines)))


@FUZZ_SMALL
@given(
    st.one_of(
        st.binary(max_size=200),
        weird_json.map(to_json_bytes),
        mutated({"action": "subscribe", "params": "T.AAPL"}).map(to_json_bytes),
    )
)
def test_polygon_client_actions_raise_only_codec_error(data: bytes) -> None:
    with contextlib.suppress(CodecError):
        polygon.decode_client_action(data)


# ---------------------------------------------------------------- Refinitiv

REFINITIV_QUOTE = {
    "BID": 10.0,
    "ASK": 10.1,
    "BIDSIZE": 5,
    "ASKSIZE": 7,
    "QUOTIM_MS": 68520061,
    "QUOTE_DATE": "2024-05-04",
}
REFINITIV_TRADE = {
    "TRDPRC_1": 10.05,
    "TRDVOL_1": 100,
    "TRDTIM_MS": 68520061,
    "SALTIM": "19:01:52",
    "TRADE_DATE": "2024-05-04",
}
REFINITIV_VALID: list[dict[str, Any]] = [
    refinitiv.login_refresh("user", "256", "127.0.0.1"),
    refinitiv.login_status("Closed", "Suspect", "NotEntitled", "no"),
    refinitiv.item_refresh(2, "IBM.N", {**REFINITIV_QUOTE, **REFINITIV_TRADE}, 16),
    refinitiv.item_update(2, "IBM.N", REFINITIV_QUOTE, "Quote", 32),
    refinitiv.item_update(3, "VOD.L", REFINITIV_TRADE, "Trade", 48),
    refinitiv.item_update(3, "VOD.L", {**REFINITIV_QUOTE, **REFINITIV_TRADE}, "QuotesTrade", 64),
    {"ID": 2, "Type": "Update", "Fields": {"BID": 1.0, "QUOTIM": "19:01:52.565"}},
    refinitiv.item_status(2, "IBM.N", "Closed", "Suspect", "NotFound", "gone"),
    refinitiv.batch_status(4, 2, 2),
    refinitiv.error_message("bad request", 5),
    refinitiv.ping_message(),
    refinitiv.pong_message(),
]
REFINITIV_VOCAB = (
    "ID", "Type", "Domain", "Key", "Name", "Fields", "State", "Stream", "SeqNumber",
    "UpdateType", "ClearCache", "Elements", "PingTimeout", "Text", *refinitiv.QUOTE_VIEW,
    *refinitiv.TRADE_VIEW, "SALTIM", "SALTIM_MS", "TRDTIM_1",
)  # fmt: skip
REFINITIV_SENTINEL = refinitiv.item_update(99, SENTINEL, {"BID": 1.0, "ASK": 1.1}, "Quote", 1)


def refinitiv_consumer() -> refinitiv.ConsumerProtocol:
    consumer = refinitiv.ConsumerProtocol()
    consumer.item_requests(["IBM.N"])  # ID 2
    consumer.item_requests(["VOD.L"])  # ID 3
    return consumer


def refinitiv_valid_frames() -> list[bytes]:
    frames = [refinitiv.encode_messages([m]).encode() for m in REFINITIV_VALID]
    for name in ("refinitiv_ws.jsonl", "refinitiv_ws_spec_examples.jsonl"):
        if (FIXTURES / name).is_file():
            frames += [ln for ln in (FIXTURES / name).read_bytes().splitlines() if ln.strip()]
    return frames


refinitiv_message = st.one_of(
    st.sampled_from(REFINITIV_VALID).flatmap(lambda m: mutated(m, REFINITIV_VOCAB)),
    weird_json,
    st.builds(lambda kind: {"ID": 2, "Type": kind, "Fields": {"BID": 1}}, weird_json),
)


def check_refinitiv(out: refinitiv.DecodedFrame) -> None:
    check_all(out.records, out.errors)
    for login in out.logins:
        assert login.ping_timeout_s is None or type(login.ping_timeout_s) is float
        assert all(type(v) is str for v in (login.state.stream, login.state.text))
    for status in out.statuses:
        assert status.name is None or type(status.name) is str


@FUZZ
@given(st.lists(bytes_cases(refinitiv_valid_frames()), min_size=1, max_size=3))
def test_refinitiv_bytes_never_raise(frames: list[bytes]) -> None:
    consumer = refinitiv_consumer()
    for data in frames:
        check_refinitiv(consumer.decode(data, RECEIVE_NS))
        check_refinitiv(consumer.decode(data.decode("utf-8", "replace"), 0))


@FUZZ
@given(st.lists(refinitiv_message, max_size=4), st.sampled_from([RECEIVE_NS, 0, 1, 2**70]))
def test_refinitiv_bad_messages_lose_only_themselves(messages: list[Any], receive_ns: int) -> None:
    consumer = refinitiv_consumer()
    out = consumer.decode(to_json_bytes([*messages, REFINITIV_SENTINEL]), receive_ns)
    check_refinitiv(out)
    if not out.errors or not out.errors[0].reason.startswith("invalid JSON"):
        assert has_sentinel(out.records)
    # The consumer's state survives whatever came before.
    again = consumer.decode(to_json_bytes([REFINITIV_SENTINEL]), receive_ns)
    check_refinitiv(again)
    assert has_sentinel(again.records)


def test_refinitiv_known_cases() -> None:
    consumer = refinitiv_consumer()
    # Superscript digits pass str.isdigit but not int(); Arabic-Indic ones pass both; int()
    # refuses more than 4300 digits. None is a time: the record takes the receive time.
    for text in ("1\u00b2:00:00", "12:00:00.\u00b2", "\u0661\u0662:00:00", "1" * 5000 + ":0:0"):
        fields = {"BID": 1.0, "QUOTIM": text}
        out = consumer.decode(to_json_bytes([{"ID": 2, "Type": "Update", "Fields": fields}]), 0)
        check_refinitiv(out)
        assert len(out.records) == 1
    out = consumer.decode(
        to_json_bytes(
            [{**refinitiv.login_refresh("u", "1", "p"), "Elements": {"PingTimeout": 10**30}}]
        ),
        0,
    )
    check_refinitiv(out)
    # Text fields nested past the recursion limit (str() of them raises RecursionError).
    deep = deep_list(990)
    out = consumer.decode(
        to_json_bytes(
            [
                {"Type": "Error", "Text": deep},
                {"ID": 2, "Type": "Status", "State": {"Stream": deep, "Text": deep}},
                {"ID": 2, "Type": deep},
                REFINITIV_SENTINEL,
            ]
        ),
        RECEIVE_NS,
    )
    check_refinitiv(out)
    assert has_sentinel(out.records) and len(out.errors) == 1


@FUZZ_SMALL
@given(st.lists(bytes_cases(refinitiv_valid_frames()), max_size=4), st.none() | st.just("X"))
def test_refinitiv_capture_never_raises(lines: list[bytes], symbol: str | None) -> None:
    check_capture(refinitiv.decode_capture(b"\n".join(lines), symbol=symbol))


REFINITIV_REQUESTS: list[dict[str, Any]] = [
    {"ID": 1, "Domain": "Login", "Key": {"Name": "u", "Elements": {"ApplicationId": "256"}}},
    {"ID": 2, "Key": {"Name": ["A", "B"], "Service": "X"}, "View": ["BID"]},
    {"ID": [2, 3], "Type": "Close"},
    {"Type": "Pong"},
]


@FUZZ_SMALL
@given(
    st.one_of(
        st.binary(max_size=200),
        st.lists(
            st.sampled_from(REFINITIV_REQUESTS).flatmap(lambda m: mutated(m, ("ID", "Key"))),
            max_size=3,
        ).map(to_json_bytes),
    )
)
def test_refinitiv_requests_raise_only_codec_error(data: bytes) -> None:
    with contextlib.suppress(CodecError):
        refinitiv.decode_requests(data)


# ---------------------------------------------------------------- Alpha Vantage

AV_QUERIES = [
    av.Query(av.GLOBAL_QUOTE, "MSFT"),
    av.Query(av.GLOBAL_QUOTE, "", datatype="csv"),
    av.Query(av.TIME_SERIES_INTRADAY, "IBM", "5min"),
    av.Query(av.TIME_SERIES_INTRADAY, "", None),
    av.Query(av.TIME_SERIES_INTRADAY, "IBM", "1min", "csv"),
]
AV_QUOTE = av.QuoteSnapshot(
    "MSFT", 112.63, 113.17, 110.64, 112.13, 29062853, dt.date(2018, 10, 5), 112.79
)
AV_BARS = [
    av.Bar(
        dt.datetime(2024, 5, 3, 9, 30) + dt.timedelta(minutes=5 * i),
        10.0 + i,
        11.0 + i,
        9.0 + i,
        10.5 + i,
        100 * i,
    )
    for i in range(3)
]
AV_VALID_BODIES = [
    av.encode_global_quote(AV_QUOTE),
    av.encode_global_quote(AV_QUOTE, "csv"),
    av.encode_global_quote(None),
    av.encode_intraday("IBM", "5min", AV_BARS),
    av.encode_intraday("IBM", "5min", AV_BARS, "csv"),
    av.encode_message("Note", av.RATE_LIMIT_TEXTS["minute"][1]),
    av.encode_message("Error Message", av.invalid_call_text("X")),
]
AV_SENTINEL_STAMP = "2024-05-03 15:55:00"
AV_SENTINEL_BAR = {
    "1. open": "1.0",
    "2. high": "2.0",
    "3. low": "0.5",
    "4. close": "1.5",
    "5. volume": "10",
}

AV_CSV_CELLS = st.sampled_from([
    "", "nan", "NaN", "inf", "-inf", "1e400", "1e13", "9007199254740993", "1" * 400, "x" * 5000,
    "\x00", '"', '"a,b"', "2024-02-30", "9999-12-31", "0001-01-01", "275000-01-01",
    "2024-03-10 02:30:00", "2024-11-03 01:30:00", "2024-05-03 25:00:00", "12%", "\u00b2",
    "2024-05-03 09:30:00.5", "-0", "0x10",
]) | st.text(max_size=12)  # fmt: skip


@st.composite
def av_csv_body(draw: st.DrawFn) -> bytes:
    header, *rows = av.encode_intraday("IBM", "5min", AV_BARS, "csv").decode().split("\r\n")
    if draw(st.booleans()):
        header, *rows = av.encode_global_quote(AV_QUOTE, "csv").decode().split("\r\n")
    cells = [row.split(",") for row in rows if row]
    for _ in range(draw(st.integers(0, 6))):
        row = draw(st.integers(0, len(cells) - 1))
        col = draw(st.integers(0, len(cells[row])))
        cell = draw(AV_CSV_CELLS)
        if col < len(cells[row]):
            cells[row][col] = cell
        else:
            cells[row].append(cell)  # a ragged row
    lines = [header, *(",".join(c) for c in cells)]
    return "\r\n".join(lines).encode("utf-8", "surrogatepass")


def av_json_body() -> st.SearchStrategy[bytes]:
    quote = json.loads(av.encode_global_quote(AV_QUOTE))
    intraday = json.loads(av.encode_intraday("IBM", "5min", AV_BARS))
    vocab = (
        "Global Quote",
        "Time Series (5min)",
        "Time Series (1min)",
        "Meta Data",
        "Error Message",
        "Information",
        "Note",
        *av.JSON_QUOTE_KEYS,
        *av.JSON_BAR_KEYS,
        "2. Symbol",
    )
    return (
        st.sampled_from([quote, intraday]).flatmap(lambda b: mutated(b, vocab)).map(to_json_bytes)
    )


def check_av(out: av.DecodedResponse) -> None:
    check_all(out.records, out.errors)
    if out.message is not None:
        assert type(out.message.text) is str


@FUZZ
@given(
    st.one_of(bytes_cases(AV_VALID_BODIES), av_csv_body(), av_json_body()),
    st.sampled_from(AV_QUERIES),
    st.sampled_from([RECEIVE_NS, 0, 2**63 - 1]),
)
def test_alphavantage_bodies_never_raise(body: bytes, query: av.Query, receive_ns: int) -> None:
    check_av(av.decode_response(body, query, receive_ns))


bar_value = st.one_of(weird_json, mutated(AV_SENTINEL_BAR, tuple(av.JSON_BAR_KEYS)))


@FUZZ
@given(
    st.dictionaries(st.one_of(AV_CSV_CELLS, st.just("2024-05-03 10:00:00")), bar_value, max_size=4)
)
def test_alphavantage_bad_bars_lose_only_themselves(bars: dict[str, Any]) -> None:
    series = {
        **{k: v for k, v in bars.items() if k != AV_SENTINEL_STAMP},
        AV_SENTINEL_STAMP: AV_SENTINEL_BAR,
    }
    body = to_json_bytes({"Meta Data": {"2. Symbol": SENTINEL}, "Time Series (5min)": series})
    query = av.Query(av.TIME_SERIES_INTRADAY, "", "5min")
    out = av.decode_response(body, query, RECEIVE_NS)
    check_av(out)
    if not out.errors or not out.errors[0].reason.startswith("invalid JSON"):
        assert any(r.provider_specific.get("time") == AV_SENTINEL_STAMP for r in out.records)


def test_alphavantage_known_cases() -> None:
    deep = deep_list(990)
    gq = av.Query(av.GLOBAL_QUOTE, "")
    out = av.decode_response(to_json_bytes({"Information": deep}), gq, 0)
    assert out.message is not None and out.message.kind is av.MessageKind.INFORMATION
    quote = {"05. price": "1", "07. latest trading day": deep, "01. symbol": "X"}
    out = av.decode_response(to_json_bytes({"Global Quote": quote}), gq, 0)
    check_av(out)
    assert len(out.errors) == 1 and out.records == []
    intraday = av.Query(av.TIME_SERIES_INTRADAY, "", "5min")
    bars = {"Time Series (5min)": {"2024-05-03 10:00:00": AV_SENTINEL_BAR}}
    out = av.decode_response(to_json_bytes({"Meta Data": {"2. Symbol": deep}, **bars}), intraday, 0)
    check_av(out)
    out = av.decode_response(to_json_bytes(bars), intraday, 0)  # no symbol anywhere
    check_av(out)
    assert out.records == [] and "without a symbol" in out.errors[0].reason
    # Polars' ns datetimes wrap outside 1677-2262: a bar in 1600 must not land in 2184.
    old = {
        "Meta Data": {"2. Symbol": "X"},
        "Time Series (5min)": {
            "1600-01-03 10:00:00": AV_SENTINEL_BAR,
            "9999-12-31 10:00:00": AV_SENTINEL_BAR,
        },
    }
    out = av.decode_response(to_json_bytes(old), intraday, 0)
    check_av(out)
    assert [r.timestamp_ns for r in out.records] == [
        av.eastern_to_ns(dt.datetime(1600, 1, 3, 10)),
        av.eastern_to_ns(dt.datetime(9999, 12, 31, 10)),
    ]


@FUZZ_SMALL
@given(
    st.one_of(
        bytes_cases(AV_VALID_BODIES),
        av_csv_body(),
        av_json_body(),
        st.lists(av_json_body(), max_size=3).map(b"\n".join),
    ),
    st.none() | st.just("IBM"),
)
def test_alphavantage_capture_never_raises(data: bytes, symbol: str | None) -> None:
    check_capture(av.decode_capture(data, symbol=symbol))


@FUZZ_SMALL
@given(
    st.dictionaries(
        st.sampled_from(["function", "symbol", "interval", "datatype", "outputsize", "x"]),
        st.sampled_from([*av.FUNCTIONS, "1min", "csv", "full", ""]) | st.text(),
    )
)
def test_alphavantage_queries_raise_only_codec_error(params: dict[str, str]) -> None:
    with contextlib.suppress(CodecError):
        av.decode_query(params)


# ---------------------------------------------------------------- IEX and pcap

IEX_TS = 1_471_980_632_572_715_948
IEX_MESSAGES = [
    iex.encode_quote_update("ZIEXT", IEX_TS, 99.05, 9700, 99.07, 1000),
    iex.encode_trade_report("ZIEXT", IEX_TS, 99.05, 100, 42),
    iex.encode_trade_break("ZIEXT", IEX_TS, 99.05, 100, 42),
    iex.encode_system_event("C", IEX_TS),
    iex.encode_security_directory("ZIEXT", IEX_TS),
    iex.encode_trading_status("ZIEXT", IEX_TS, "H", "T1"),
    iex.encode_operational_halt("ZIEXT", IEX_TS),
    iex.encode_short_sale_price_test("ZIEXT", IEX_TS, True, "A"),
    iex.encode_official_price("ZIEXT", IEX_TS, "Q", 99.0),
    iex.encode_auction_information("ZIEXT", IEX_TS),
]
IEX_SENTINEL = iex.encode_quote_update(SENTINEL, IEX_TS, 1.0, 1, 1.1, 1)


def iex_segment(messages: list[bytes], first: int = 1) -> bytes:
    return iex.encode_segment(
        messages,
        channel_id=1,
        session_id=7,
        stream_offset=0,
        first_sequence=first,
        send_time_ns=IEX_TS,
    )


IEX_VALID = [iex_segment([m]) for m in IEX_MESSAGES] + [iex_segment(IEX_MESSAGES), iex_segment([])]
INT64_EXTREMES = [0, 1, -1, 2**63 - 1, -(2**63), 2**62, IEX_TS]


@st.composite
def iex_message(draw: st.DrawFn) -> bytes:
    """A message of the right length for its type whose fields hold extreme values."""
    base = bytearray(draw(st.sampled_from(IEX_MESSAGES)))
    # Timestamps (offset 2) and prices sit in int64 slots: write extremes there.
    for _ in range(draw(st.integers(0, 3))):
        offset = draw(st.integers(1, len(base) - 8))
        struct.pack_into("<q", base, offset, draw(st.sampled_from(INT64_EXTREMES)))
    if draw(st.booleans()):
        pos = draw(st.integers(0, len(base) - 1))
        base[pos] = draw(st.integers(0, 255))
    if draw(st.integers(0, 4)) == 0:
        base = base[: draw(st.integers(1, len(base)))]  # shorter than its layout
    return bytes(base)


def check_iex(out: iex.DecodedSegment) -> None:
    check_all(out.records, out.errors)
    for event in out.events:
        assert type(event.sequence) is int and type(event.timestamp_ns) is int


@FUZZ
@given(bytes_cases(IEX_VALID))
def test_iex_bytes_never_raise(data: bytes) -> None:
    out = iex.decode_segment(data, RECEIVE_NS)
    check_iex(out)
    iex.SequenceTracker().admit(out)


@FUZZ
@given(
    st.lists(iex_message(), max_size=5),
    st.sampled_from([1, 2**63 - 10, 0]),
    st.none() | st.just({"ZIEXT", SENTINEL}),
)
def test_iex_bad_messages_lose_only_themselves(
    messages: list[bytes], first: int, symbols: set[str] | None
) -> None:
    data = iex_segment([*messages, IEX_SENTINEL], first=first)
    out = iex.decode_segment(data, RECEIVE_NS, quote_symbols=symbols, trade_symbols=symbols)
    check_iex(out)
    assert has_sentinel(out.records)
    tracker = iex.SequenceTracker()
    tracker.admit(out)
    tracker.admit(iex.decode_segment(iex_segment([IEX_SENTINEL], first=first - 3), RECEIVE_NS))


PCAP_VALID = [
    pcap.write_udp([(IEX_TS, seg) for seg in IEX_VALID[:4]]),
    gzip.compress(pcap.write_udp([(IEX_TS, IEX_VALID[0])])),
]


@FUZZ
@given(bytes_cases(PCAP_VALID), st.integers(1, 64))
def test_pcap_reader_never_raises(data: bytes, chunk: int) -> None:
    check_capture(iex.decode_capture(data))
    reader = pcap.PcapReader()
    for start in range(0, len(data), chunk):
        for item in reader.feed(data[start : start + chunk]):
            if isinstance(item, CaptureError):
                check_capture_error(item)
            else:
                assert type(item.payload) is bytes and type(item.timestamp_ns) is int
    for err in reader.close():
        check_capture_error(err)


@st.composite
def pcap_record_fields(draw: st.DrawFn) -> bytes:
    """A capture whose record headers, link layers and IP/UDP headers hold odd values."""
    header = bytearray(
        pcap.pcap_header(linktype=draw(st.sampled_from([0, 1, 12, 101, 113, 276, 9999])))
    )
    frame = bytearray(pcap.udp_frame(IEX_VALID[0], ("10.0.0.1", 1), ("233.215.21.4", 2)))
    for _ in range(draw(st.integers(0, 4))):
        pos = draw(st.integers(0, min(len(frame) - 1, 60)))
        frame[pos] = draw(st.integers(0, 255))
    sec = draw(st.sampled_from([0, 2**32 - 1, 1_700_000_000]))
    frac = draw(st.sampled_from([0, 2**32 - 1, 999_999_999]))
    record = struct.pack("<IIII", sec, frac, len(frame), len(frame)) + frame
    return bytes(header) + record


@FUZZ_SMALL
@given(pcap_record_fields())
def test_pcap_odd_headers_never_raise(data: bytes) -> None:
    check_capture(iex.decode_capture(data, symbol="ZIEXT"))


# ---------------------------------------------------------------- FIX

FIX_T = "20240504-17:09:53.000"
FIX_WEIRD_VALUES = [
    b"", b"\xb2", b"\xb9\xb2\xb3", b"1" * 5000, b"0" * 30 + b"7", b"9" * 25, b"-1", b"+5",
    b" 5", b"1_000", b"nan", b"inf", b"-inf", b"1e400", b"1e-400", b"NaN", b"99991231",
    b"00000101", b"20240230", b"00000000", b"25:61:61", b"23:59:60.99999999999",
    b"00000000-00:00:00", b"99999999-99:99:99.999", b"\x00", b"=", b"A" * 2000, b"Y", b"N",
    b"0", b"1", b"2", b"3", b"9", b"\xff\xfe", b"8=FIX.4.4",
]  # fmt: skip
FIX_TAGS = [
    7, 16, 34, 35, 36, 43, 45, 49, 52, 55, 56, 58, 60, 95, 96, 108, 112, 122, 123, 141, 262,
    263, 264, 267, 268, 269, 270, 271, 272, 273, 279, 281, 290, 373,
]  # fmt: skip


def fix_wire(fields: Sequence[tuple[int | bytes, bytes]]) -> bytes:
    """A frame with a correct BodyLength and CheckSum around whatever ``fields`` hold."""
    body = b"".join(
        (str(t).encode() if isinstance(t, int) else t) + b"=" + v + b"\x01" for t, v in fields
    )
    head = b"8=FIX.4.4\x019=" + str(len(body)).encode() + b"\x01"
    checksum = sum(head + body) % 256
    return head + body + b"10=%03d\x01" % checksum


def fix_header(msg_type: str, seq: int | bytes) -> list[tuple[int | bytes, bytes]]:
    seq_b = str(seq).encode() if isinstance(seq, int) else seq
    return [
        (35, msg_type.encode()),
        (34, seq_b),
        (49, b"VENUE"),
        (52, FIX_T.encode()),
        (56, b"FEEDFLEET"),
    ]


def fix_fields(text: str) -> list[tuple[int | bytes, bytes]]:
    out: list[tuple[int | bytes, bytes]] = []
    for part in text.strip("|").split("|"):
        tag, _, value = part.partition("=")
        out.append((int(tag), value.encode()))
    return out


FIX_BODIES: list[tuple[str, str]] = [
    (
        "W",
        "262=r|55=EUR/USD|268=2|269=0|270=1.11941|271=1000000|299=0|106=1|269=1|270=1.11944|"
        "271=1000000|290=1",
    ),
    (
        "X",
        "262=r|268=3|279=0|269=2|270=10.0|271=0.01|55=BNB|60=20240504-17:09:52.000|"
        "279=1|269=0|270=9.9|271=3|55=BNB|272=20240504|273=17:09:52.100|"
        "279=2|269=1|55=BNB|290=1",
    ),
    ("Y", "262=0|281=0|58=symbol not found"),
    ("0", "112=TEST"),
    ("1", "112=HELLO"),
    ("2", "7=1|16=0"),
    ("3", "45=2|373=5|58=bad"),
    ("4", "36=5|123=Y"),
    ("4", "36=9"),
    ("V", "262=r|263=1|264=1|265=1|267=2|269=0|269=1|146=1|55=AAPL"),
    ("5", "58=bye"),
    ("A", "98=0|108=30|141=Y"),
    ("U1", "58=custom"),
]


@st.composite
def fix_message(draw: st.DrawFn, seq: int) -> bytes:
    """A well-framed message at ``seq`` whose fields may hold hostile values."""
    msg_type, body_text = draw(st.sampled_from(FIX_BODIES))
    body = fix_fields(body_text)
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.integers(0, 3))
        value = draw(st.sampled_from(FIX_WEIRD_VALUES) | st.binary(max_size=8))
        value = value.replace(b"\x01", b"")
        if op == 0 and body:
            i = draw(st.integers(0, len(body) - 1))
            body[i] = (body[i][0], value)
        elif op == 1 and body:
            del body[draw(st.integers(0, len(body) - 1))]
        elif op == 2:
            body.insert(draw(st.integers(0, len(body))), (draw(st.sampled_from(FIX_TAGS)), value))
        else:
            tag = draw(st.sampled_from([b"", b"x", b"-1", b"1" * 5000, b"\xb2", b"99999"]))
            body.insert(draw(st.integers(0, len(body))), (tag, value))
    seq_field: int | bytes = seq
    if draw(st.integers(0, 9)) == 0:
        seq_field = draw(st.sampled_from(FIX_WEIRD_VALUES))
    return fix_wire(fix_header(msg_type, seq_field) + body)


def fix_client(hb: int = 30) -> fix.FixSession:
    session = fix.FixSession("FEEDFLEET", "VENUE", heartbeat_interval=hb)
    session.logon(RECEIVE_NS)
    logon = fix_wire(fix_header("A", 1) + fix_fields(f"98=0|108={hb}|141=Y"))
    session.receive(logon, RECEIVE_NS)
    assert session.logged_on
    return session


def check_fix(out: fix.FixReceived) -> None:
    check_all(out.records, out.errors)
    assert type(out.outgoing) is bytes


FIX_VALID = [fix_wire(fix_header(t, 2) + fix_fields(b)) for t, b in FIX_BODIES]


@FUZZ
@given(st.lists(bytes_cases(FIX_VALID), min_size=1, max_size=3), st.integers(1, 64))
def test_fix_bytes_never_raise(chunks: list[bytes], cut: int) -> None:
    session = fix_client()
    data = b"".join(chunks)
    for start in range(0, len(data), cut):
        check_fix(session.receive(data[start : start + cut], RECEIVE_NS))
    session.tick(RECEIVE_NS + 100 * 10**9)
    session.seconds_until_tick(RECEIVE_NS)


@FUZZ
@given(st.data())
def test_fix_session_survives_hostile_fields(data: st.DataObject) -> None:
    session = fix_client()
    now = RECEIVE_NS
    for seq in range(2, 2 + data.draw(st.integers(1, 5))):
        msg = data.draw(fix_message(seq))
        now += 10**9
        check_fix(session.receive(msg, now))
        session.tick(now)
        session.seconds_until_tick(now)
        if session.closed:
            break


@FUZZ
@given(
    st.lists(
        st.lists(
            st.tuples(st.sampled_from(FIX_TAGS), st.sampled_from(FIX_WEIRD_VALUES)), max_size=5
        ),
        max_size=3,
    )
)
def test_fix_bad_entries_lose_only_themselves(entries: list[list[tuple[int, bytes]]]) -> None:
    body: list[tuple[int | bytes, bytes]] = [(262, b"r"), (268, str(len(entries) + 1).encode())]
    for entry in entries:
        # An empty value or a raw-data length makes simplefix refuse the whole message, as
        # a FIX engine would; those are message-level cases, covered above.
        fields = [(t, v) for t, v in entry if t not in (95, 96, 268) and v]
        body += [(279, b"0"), (269, b"2"), *fields]
    body += fix_fields(f"279=0|269=2|270=1.5|271=7|55={SENTINEL}")
    session = fix_client()
    out = session.receive(fix_wire(fix_header("X", 2) + body), RECEIVE_NS)
    check_fix(out)
    assert any(r.symbol == SENTINEL and r.price == 1.5 for r in out.records)


@FUZZ_SMALL
@given(st.sampled_from([b"", b"0", b"-5", b"\xb2", b"1" * 5000, b"9" * 400, b"9" * 20, b"nan"]))
def test_fix_acceptor_logon_with_hostile_heartbeat(interval: bytes) -> None:
    session = fix.FixSession("VENUE", None, acceptor=True)
    out = session.receive(
        fix_wire(
            [
                (35, b"A"),
                (34, b"1"),
                (49, b"FEEDFLEET"),
                (52, FIX_T.encode()),
                (56, b"VENUE"),
                (98, b"0"),
                (108, interval),
            ]
        ),
        RECEIVE_NS,
    )
    check_fix(out)
    if any(isinstance(e, fix.LogonReceived) for e in out.events):
        session.accept_logon(RECEIVE_NS)
    for later in (0, 1, 10**9, 10**18):
        session.tick(RECEIVE_NS + later)
        session.seconds_until_tick(RECEIVE_NS + later)


def test_fix_known_cases() -> None:
    # simplefix refuses an empty value (EmptyValueError): a decode error, not a crash.
    raw = fix.pipe_to_soh("8=FIX.4.4|9=42|35=Y|34=7|49=FIXSIM|262=|281=0|58=unknown|10=240|")
    framer = fix.FixFramer()
    [frame] = framer.feed(raw)
    assert isinstance(frame, fix.FixFrame)
    with pytest.raises(ValueError, match="EmptyValueError"):
        fix.parse_frame(frame.raw)
    # In a session its number is consumed with a Reject, so what follows is not held back
    # behind a gap that resends of the same bytes could never fill.
    session = fix_client()
    snapshot = fix_fields(FIX_BODIES[0][1])
    assert len(session.receive(fix_wire(fix_header("W", 2) + snapshot), RECEIVE_NS).records) == 1
    reject = fix_wire([*fix_header("Y", 3), (262, b""), (281, b"0")])
    out = session.receive(reject, RECEIVE_NS)
    check_fix(out)
    assert [e.reason for e in out.errors] == ["bad field: EmptyValueError 262"]
    assert b"\x0135=3\x01" in out.outgoing and b"\x0145=3\x01373=4\x01" in out.outgoing
    out = session.receive(fix_wire(fix_header("W", 4) + snapshot), RECEIVE_NS)
    assert out.errors == [] and out.outgoing == b"" and len(out.records) == 1
    # Contiguous across the skipped number, so the quality check flags the lost message.
    assert out.records[0].sequence_contiguous
    # A superscript digit passes str.isdigit but not int().
    check_fix(session.receive(fix_wire(fix_header("0", b"\xb2")), RECEIVE_NS))
    # BodyLength with more digits than int() converts.
    out = session.receive(b"8=FIX.4.4\x019=" + b"1" * 5000 + b"\x0135=0\x01", RECEIVE_NS)
    check_fix(out)
    assert out.errors[0].reason == "BodyLength too large"
    # A BeginString running on for kilobytes: the reason stays short.
    check_fix(session.receive(b"8=FIX" + b"x" * 5000 + b"\x01", RECEIVE_NS))
    # A year-0 date and a superscript time in an entry: no timestamp, no crash.
    entry = "279=0|269=2|270=1|271=1|55=X|272=00000101|273=1\u00b2:00:00"
    out = session.receive(fix_wire(fix_header("X", 5) + fix_fields(f"268=1|{entry}")), 0)
    check_fix(out)
    assert len(out.records) == 1
    assert fix.parse_utc_date("00000101") is None
    # An acceptor adopts the peer's HeartBtInt: past int32 its timers' arithmetic overflows.
    acceptor = fix.FixSession("VENUE", None, acceptor=True)
    logon = [(35, b"A"), (34, b"1"), (49, b"FEEDFLEET"), (52, FIX_T.encode()), (56, b"VENUE"),
             (98, b"0"), (108, b"9" * 400)]  # fmt: skip
    out = acceptor.receive(fix_wire(logon), RECEIVE_NS)
    assert [type(e) for e in out.events] == [fix.SessionClosed]


@FUZZ_SMALL
@given(
    st.lists(st.one_of(bytes_cases(FIX_VALID), st.builds(lambda: b"")), max_size=4),
    st.booleans(),
    st.none() | st.just("BNB"),
)
def test_fix_capture_never_raises(parts: list[bytes], lines: bool, symbol: str | None) -> None:
    if lines:
        data = b"\n".join(fix.to_pipes(p).encode("latin-1") for p in parts)
    else:
        data = b"".join(parts)
    check_capture(fix.decode_capture(data, symbol=symbol))


# ---------------------------------------------------------------- Bloomberg

BBG_STAMP = dt.datetime(2024, 5, 4, 17, 9, 52, 462000, tzinfo=dt.UTC)
PY_EXTREMES: list[Any] = [
    None, True, 0, -1, 2**63, 10**30, 10**5000, -(10**30), math.nan, math.inf, -math.inf, 1e308,
    5e-324, -0.0, "", "\x00", "x" * 20_000, "\ud800", dt.datetime.min, dt.datetime.max,
    dt.datetime.max.replace(tzinfo=dt.timezone(dt.timedelta(hours=-23))),
    dt.datetime.min.replace(tzinfo=dt.timezone(dt.timedelta(hours=23))), dt.date.max,
    dt.time.max, dt.time(23, 59, tzinfo=dt.timezone(dt.timedelta(hours=-23))),
    dt.time(0, 0, tzinfo=dt.timezone(dt.timedelta(hours=23))), "9999-12-31T23:59:59-23:00",
    "0001-01-01T00:00:00+23:00", "24:00", "23:59:60",
    {"$datetime": "0001-01-01T00:00:00+01:00"}, {"$time": "23:59:59.999999-23:59"}, {1: 2},
    {(1, 2): 3}, [1, [2, [3]]], (1, 2), {1, 2}, b"\xff", object(),
]  # fmt: skip


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def nested_dict(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


PY_EXTREMES += [nested(3000), nested_dict(3000)]
weird_py = st.one_of(
    st.sampled_from(PY_EXTREMES), weird_json.filter(lambda v: not isinstance(v, Raw))
)
BBG_FIELDS = (
    "LAST_PRICE", "SIZE_LAST_TRADE", "BID", "ASK", "VOLUME", "MKTDATA_EVENT_TYPE",
    "TRADE_UPDATE_STAMP_RT", "BID_UPDATE_STAMP_RT", "ASK_UPDATE_STAMP_RT", "EVENT_TIME", "TIME",
    "EVT_TRADE_TIME_RT", "reason",
)  # fmt: skip


@st.composite
def bbg_snapshot(draw: st.DrawFn) -> bbg.MessageSnapshot:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        elements: Any = bbg.trade_elements(142.8, 100, 1000, BBG_STAMP)
    elif kind == 1:
        elements = bbg.quote_elements(142.7, 5, 142.9, 7, BBG_STAMP)
    else:
        elements = {"reason": bbg.reason_dict("LIMIT", "too many")}
    for key in draw(st.lists(st.sampled_from(BBG_FIELDS), max_size=4)):
        elements[key] = draw(weird_py)
    if draw(st.integers(0, 9)) == 0:
        elements = draw(weird_py)
    event_type = draw(
        st.sampled_from(
            [
                "SUBSCRIPTION_DATA",
                "SUBSCRIPTION_DATA",
                "ADMIN",
                "TIMEOUT",
                "SUBSCRIPTION_STATUS",
                "",
            ]
        )
    )
    message_type = draw(
        st.sampled_from([bbg.MARKET_DATA_EVENTS, bbg.SUBSCRIPTION_FAILURE, bbg.DATA_LOSS, "Other"])
    )
    cids = draw(st.lists(st.one_of(st.just(7), weird_py), max_size=2))
    recap = draw(st.sampled_from([0, 1, -1, 2**70]))
    topic = draw(st.sampled_from(["", "IBM US Equity", " US Equity", "/isin/X"]))
    return bbg.MessageSnapshot(event_type, message_type, cids, elements, recap, topic)


BBG_SENTINEL = bbg.market_data_message(8, "", bbg.trade_elements(1.0, 1, 1, BBG_STAMP))


def check_bbg(out: bbg.DecodedEvent) -> None:
    check_all(out.records, out.errors)
    for status in out.statuses:
        assert all(type(s) is str for s in status.symbols)
        assert type(status.details) is dict


@FUZZ
@given(st.lists(bbg_snapshot(), max_size=4), st.sampled_from([RECEIVE_NS, 0, -1, 2**70]))
def test_bloomberg_bad_messages_lose_only_themselves(
    snaps: list[bbg.MessageSnapshot], receive_ns: int
) -> None:
    quotes = bbg.QuoteCache()
    symbols = {7: "IBM", 8: SENTINEL}
    out = bbg.decode_messages([*snaps, BBG_SENTINEL], receive_ns, symbols, "bbg", quotes)
    check_bbg(out)
    assert has_sentinel(out.records)


def test_bloomberg_known_cases() -> None:
    deep, deep_map = nested(3000), nested_dict(3000)
    snaps = [
        bbg.market_data_message(7, "", {"LAST_PRICE": 1.0, "X": deep, "Y": deep_map}),
        bbg.MessageSnapshot("SUBSCRIPTION_DATA", bbg.MARKET_DATA_EVENTS, [deep], {"BID": 1.0}),
        bbg.status_message("ADMIN", bbg.DATA_LOSS, {"reason": {"category": deep}, "z": deep}),
        BBG_SENTINEL,
    ]
    out = bbg.decode_messages(snaps, RECEIVE_NS, {7: "IBM", 8: SENTINEL}, "bbg")
    check_bbg(out)
    assert [r.symbol for r in out.records] == ["IBM", SENTINEL] and len(out.errors) == 1
    line = to_json_bytes(
        {
            "eventType": "SUBSCRIPTION_DATA",
            "messages": [
                {
                    "messageType": bbg.MARKET_DATA_EVENTS,
                    "correlationIds": [7],
                    "data": {"LAST_PRICE": 1.0, "X": deep_list(1000)},
                }
            ],
        }
    )
    event = bbg.decode_event_line(line)
    assert isinstance(event, bbg.WireEvent)
    check_bbg(bbg.decode_messages(event.messages, 0, {7: "IBM"}))


class FakeCid:
    AUTOGEN_TYPE = 3

    def __init__(self, value: Any, kind: int = 1) -> None:
        self._value, self._kind = value, kind

    def value(self) -> Any:
        return self._value

    def type(self) -> int:
        return self._kind


class FakeMessage:
    def __init__(self, content: Any, cids: list[Any], message_type: Any, recap: Any) -> None:
        self.content, self.cids, self.message_type, self.recap = content, cids, message_type, recap

    def messageType(self) -> Any:
        return self.message_type

    def correlationIds(self) -> list[Any]:
        return self.cids

    def recapType(self) -> Any:
        if isinstance(self.recap, Exception):
            raise self.recap
        return self.recap

    def toPy(self) -> Any:
        if isinstance(self.content, Exception):
            raise self.content
        return self.content


@FUZZ_SMALL
@given(
    st.lists(
        st.builds(
            FakeMessage,
            st.one_of(
                st.just(bbg.trade_elements(1.0, 1, 1, BBG_STAMP)),
                weird_py,
                st.just(RuntimeError("boom")),
            ),
            st.lists(st.builds(FakeCid, weird_py, st.sampled_from([1, 3])), max_size=2),
            st.sampled_from([bbg.MARKET_DATA_EVENTS, "X"]) | weird_py,
            st.sampled_from([0, 1, "x", None, 2**70, ValueError("no")]),
        ),
        max_size=3,
    )
)
def test_bloomberg_library_objects_never_raise(messages: list[FakeMessage]) -> None:
    snaps, errors = bbg.snapshot_event(messages, "SUBSCRIPTION_DATA")
    for err in errors:
        check_error(err)
    check_bbg(bbg.decode_messages(snaps, RECEIVE_NS, {7: "IBM"}, "bbg", bbg.QuoteCache()))


def bbg_valid_lines() -> list[bytes]:
    lines = [
        bbg.encode_event_line(
            "SUBSCRIPTION_DATA",
            [
                bbg.market_data_message(
                    7, "IBM US Equity", bbg.trade_elements(142.8, 100, 1000, BBG_STAMP)
                )
            ],
            RECEIVE_NS,
        ),
        bbg.encode_event_line(
            "SUBSCRIPTION_DATA",
            [
                bbg.market_data_message(
                    7, "IBM US Equity", bbg.quote_elements(1.0, 1, 1.1, 2, BBG_STAMP), recap_type=1
                )
            ],
        ),
        bbg.encode_event_line(
            "SUBSCRIPTION_STATUS",
            [
                bbg.status_message(
                    "SUBSCRIPTION_STATUS",
                    bbg.SUBSCRIPTION_FAILURE,
                    {"reason": bbg.reason_dict("BAD_SEC", "unknown")},
                    [7],
                )
            ],
        ),
    ]
    return [line.rstrip(b"\n") for line in lines]


def bbg_mutated_line() -> st.SearchStrategy[bytes]:
    vocab = (
        "eventType",
        "messages",
        "messageType",
        "correlationIds",
        "data",
        "recapType",
        "topic",
        "receive_ns",
        *BBG_FIELDS,
        "$datetime",
        "$time",
    )
    bases = [json.loads(line) for line in bbg_valid_lines()]
    return st.sampled_from(bases).flatmap(lambda b: mutated(b, vocab)).map(to_json_bytes)


@FUZZ
@given(
    st.lists(st.one_of(bytes_cases(bbg_valid_lines()), bbg_mutated_line()), max_size=4),
    st.none() | st.just("IBM"),
)
def test_bloomberg_event_lines_never_raise(lines: list[bytes], symbol: str | None) -> None:
    for line in lines:
        event = bbg.decode_event_line(line)
        if isinstance(event, DecodeError):
            check_error(event)
        else:
            check_bbg(
                bbg.decode_messages(
                    event.messages, event.receive_ns, {7: "IBM"}, "bbg", bbg.QuoteCache()
                )
            )
    check_capture(bbg.decode_capture(b"\n".join(lines), symbol=symbol))


@FUZZ_SMALL
@given(
    st.one_of(
        st.binary(max_size=100),
        weird_json.map(to_json_bytes),
        mutated({"op": "subscribe", "topics": ["IBM"]}).map(to_json_bytes),
    )
)
def test_bloomberg_request_lines_raise_only_codec_error(line: bytes) -> None:
    with contextlib.suppress(CodecError):
        bbg.decode_request_line(line)


# ---------------------------------------------------------------- capture decoders by name


CAPTURE_DECODERS: dict[str, Callable[..., Iterable[Any]]] = {
    "polygon": polygon.decode_capture,
    "refinitiv": refinitiv.decode_capture,
    "alphavantage": av.decode_capture,
    "iex": iex.decode_capture,
    "fix": fix.decode_capture,
    "bloomberg": bbg.decode_capture,
}


@pytest.mark.parametrize("name", sorted(CAPTURE_DECODERS))
@FUZZ_SMALL
@given(st.binary(max_size=400))
def test_every_capture_decoder_takes_random_bytes(name: str, data: bytes) -> None:
    check_capture(CAPTURE_DECODERS[name](data))
