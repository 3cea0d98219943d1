"""Alpha Vantage codec: real samples, every answer kind, malformed input, round trips."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.codecs import alphavantage as av
from common.codecs.base import CaptureError, CodecError, DecodeError, clip
from common.model import DataType, QualityFlag, RawMarketData
from tests import SHARED

FIXTURES = SHARED / "fixtures"
# Responses as Alpha Vantage documents and serves them (tests/samples/README.md says where
# each comes from); shared/fixtures holds none for Alpha Vantage.
SAMPLES = Path(__file__).parent / "samples"


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


GLOBAL_QUOTE_MSFT = sample("alphavantage_global_quote_msft.json")
INTRADAY_MSFT = sample("alphavantage_intraday_msft_1min.json")
EXTENDED_CSV = sample("alphavantage_intraday_extended_ibm.csv")  # retired, "time" header
INTRADAY_IBM_5MIN = sample("alphavantage_intraday_ibm_5min.json")
INTRADAY_CSV = sample("alphavantage_intraday_googl_1min.csv")
QUOTE_CSV = sample("alphavantage_global_quote_djia.csv")

Q_MSFT = av.Query(av.GLOBAL_QUOTE, "MSFT")
Q_1MIN = av.Query(av.TIME_SERIES_INTRADAY, "MSFT", "1min")
AFTER = 2_000_000_000_000_000_000  # a receive time long after every sample


def utc_ns(year: int, month: int, day: int, hour: int, minute: int) -> int:
    return int(datetime(year, month, day, hour, minute, tzinfo=UTC).timestamp()) * 1_000_000_000


# ---------------------------------------------------------------- real samples


def test_global_quote_sample() -> None:
    out = av.decode_response(GLOBAL_QUOTE_MSFT, Q_MSFT, AFTER)
    assert out.errors == [] and out.message is None and not out.empty
    (r,) = out.records
    assert r.symbol == "MSFT" and r.provider == "alphavantage"
    assert r.data_type is DataType.TRADE
    assert r.price == 112.13
    assert r.volume is None  # the day's total is not a trade size
    # 2018-10-05 16:00 EDT = 20:00 UTC
    assert r.timestamp_ns == utc_ns(2018, 10, 5, 20, 0)
    assert r.provider_specific == {
        "open": 112.63, "high": 113.17, "low": 110.64, "volume": 29062853,
        "previousClose": 112.79, "change": -0.66, "latestDay": "2018-10-05",
        "changePercent": "-0.5852%", "timestamp_source": "close",
    }  # fmt: skip
    assert r.provider_sequence is None and r.stream == "GLOBAL_QUOTE:MSFT"
    assert r.receive_ns == AFTER and r.quality_flags == []


def test_global_quote_uses_receive_time_while_session_is_open() -> None:
    during = utc_ns(2018, 10, 5, 17, 30)  # 13:30 EDT on the latest trading day
    (r,) = av.decode_response(GLOBAL_QUOTE_MSFT, Q_MSFT, during).records
    assert r.timestamp_ns == during
    assert r.provider_specific["timestamp_source"] == "receive"


def test_intraday_sample_json_oldest_first() -> None:
    out = av.decode_response(INTRADAY_MSFT, Q_1MIN, 5)
    assert out.errors == []
    assert [r.provider_specific["time"] for r in out.records] == [
        "2017-12-18 14:54:00", "2017-12-18 14:55:00", "2017-12-18 14:56:00",
    ]  # fmt: skip
    first = out.records[0]
    assert first.data_type is DataType.AGGREGATE
    assert first.price == 86.4931 and first.volume == 24345.0
    assert first.timestamp_ns == utc_ns(2017, 12, 18, 19, 54)  # EST = UTC-5
    assert first.provider_specific == {
        "open": 86.47, "high": 86.51, "low": 86.47, "close": 86.4931, "interval": "1min",
        "time": "2017-12-18 14:54:00",
    }  # fmt: skip
    assert first.stream == "TIME_SERIES_INTRADAY:MSFT:1min"
    assert first.provider_sequence is None and first.receive_ns == 5


def test_intraday_current_shape_5min() -> None:
    q = av.Query(av.TIME_SERIES_INTRADAY, "IBM", "5min")
    (r,) = av.decode_response(INTRADAY_IBM_5MIN, q, 1).records
    assert r.price == 248.3 and r.volume == 86.0
    assert r.timestamp_ns == utc_ns(2026, 4, 2, 23, 55)  # EDT = UTC-4
    assert r.stream == "TIME_SERIES_INTRADAY:IBM:5min"


def test_intraday_csv_crlf_newest_first() -> None:
    q = av.Query(av.TIME_SERIES_INTRADAY, "GOOGL", "1min", "csv")
    out = av.decode_response(INTRADAY_CSV, q, 1)
    assert out.errors == []
    assert [r.price for r in out.records] == [1130.78, 1132.4301]
    assert out.records[1].timestamp_ns == utc_ns(2019, 2, 4, 21, 0)
    assert out.records[1].volume == 122109.0
    assert out.records[1].provider_specific["high"] == 1132.4301


def test_extended_csv_with_time_header() -> None:
    q = av.Query(av.TIME_SERIES_INTRADAY, "IBM", "1min", "csv")
    out = av.decode_response(EXTENDED_CSV, q, 1)
    assert out.errors == []
    assert [r.provider_specific["time"][-8:] for r in out.records] == [
        "19:57:00", "19:58:00", "20:00:00",
    ]  # fmt: skip
    assert out.records[-1].timestamp_ns == utc_ns(2020, 12, 19, 1, 0)


def test_global_quote_csv() -> None:
    q = av.Query(av.GLOBAL_QUOTE, "DJIA", datatype="csv")
    (r,) = av.decode_response(QUOTE_CSV, q, AFTER).records
    assert r.price == 28321.4707
    assert r.provider_specific["volume"] == 347291416
    assert r.provider_specific["changePercent"] == "-2.3142%"
    assert r.timestamp_ns == utc_ns(2020, 2, 24, 21, 0)


def sample_files() -> list[Path]:
    """Alpha Vantage samples in shared/fixtures when it has any, and ours always."""
    shared = sorted(FIXTURES.glob("alphavantage*")) if FIXTURES.is_dir() else []
    return shared + sorted(SAMPLES.glob("alphavantage*"))


AGG, TRADE = DataType.AGGREGATE, DataType.TRADE
MSFT_1MIN, GOOGL_1MIN, IBM_1MIN, IBM_5MIN = (
    f"TIME_SERIES_INTRADAY:{s}" for s in ("MSFT:1min", "GOOGL:1min", "IBM:1min", "IBM:5min")
)
# Each sample of ours: the symbol to pass (CSV bars carry none) and what decode_capture
# yields, records as (data_type, symbol, timestamp_ns, price, volume, stream).
RECORD_SAMPLES: dict[str, tuple[str | None, list[object]]] = {
    "alphavantage_global_quote_msft.json": (None, [
        (TRADE, "MSFT", utc_ns(2018, 10, 5, 20, 0), 112.13, None, "GLOBAL_QUOTE:MSFT"),
    ]),
    "alphavantage_global_quote_djia.csv": (None, [
        (TRADE, "DJIA", utc_ns(2020, 2, 24, 21, 0), 28321.4707, None, "GLOBAL_QUOTE:DJIA"),
    ]),
    "alphavantage_global_quote_unknown_symbol.json": (None, [
        CaptureError("offset 0", "empty Global Quote (unknown symbol)"),
    ]),
    "alphavantage_intraday_msft_1min.json": (None, [
        (AGG, "MSFT", utc_ns(2017, 12, 18, 19, 54), 86.4931, 24345.0, MSFT_1MIN),
        (AGG, "MSFT", utc_ns(2017, 12, 18, 19, 55), 86.5, 12682.0, MSFT_1MIN),
        (AGG, "MSFT", utc_ns(2017, 12, 18, 19, 56), 86.5, 10494.0, MSFT_1MIN),
    ]),
    "alphavantage_intraday_ibm_5min.json": (None, [
        (AGG, "IBM", utc_ns(2026, 4, 2, 23, 55), 248.3, 86.0, IBM_5MIN),
    ]),
    "alphavantage_intraday_googl_1min.csv": ("GOOGL", [
        (AGG, "GOOGL", utc_ns(2019, 2, 4, 20, 59), 1130.78, 4500.0, GOOGL_1MIN),
        (AGG, "GOOGL", utc_ns(2019, 2, 4, 21, 0), 1132.4301, 122109.0, GOOGL_1MIN),
    ]),
    # The interval is not in the body: it comes from the bars' one-minute spacing.
    "alphavantage_intraday_extended_ibm.csv": ("IBM", [
        (AGG, "IBM", utc_ns(2020, 12, 19, 0, 57), 218.63, 450.0, IBM_1MIN),
        (AGG, "IBM", utc_ns(2020, 12, 19, 0, 58), 218.75, 1491.0, IBM_1MIN),
        (AGG, "IBM", utc_ns(2020, 12, 19, 1, 0), 218.75, 1102.0, IBM_1MIN),
    ]),
}  # fmt: skip
# Error and throttle answers (always HTTP 200): key, kind, window, and the text the
# simulator sends for it, which must be Alpha Vantage's own.
MESSAGE_SAMPLES: dict[str, tuple[str, str, str | None, str]] = {
    "alphavantage_error_invalid_call.json":
        ("Error Message", "invalid_call", None, av.invalid_call_text("TIME_SERIES_INTRADAY")),
    "alphavantage_error_invalid_key.json":
        ("Error Message", "invalid_key", None, av.INVALID_KEY_TEXT),
    "alphavantage_note_per_minute.json":
        ("Note", "rate_limit", "minute", av.RATE_LIMIT_TEXTS["minute"][1]),
    "alphavantage_information_per_day.json":
        ("Information", "rate_limit", "day", av.RATE_LIMIT_TEXTS["day"][1]),
    # Mentions "25 requests per day" too: the per-second window must win.
    "alphavantage_information_per_second.json":
        ("Information", "rate_limit", "second", av.RATE_LIMIT_TEXTS["second"][1]),
    "alphavantage_information_premium.json":
        ("Information", "premium", None, av.PREMIUM_TEXT),
    "alphavantage_information_demo_key.json":
        ("Information", "demo_key", None, av.DEMO_TEXT),
}  # fmt: skip


@pytest.mark.parametrize("path", sample_files(), ids=lambda p: p.name)
def test_sample_files_decode(path: Path) -> None:
    if path.parent != SAMPLES:  # a shared capture: it must at least give records
        items = list(av.decode_capture(path.read_bytes(), symbol="TEST"))
        assert any(isinstance(i, RawMarketData) for i in items), path
        return
    if path.name in MESSAGE_SAMPLES:
        key, kind, _, _ = MESSAGE_SAMPLES[path.name]
        text = orjson.loads(path.read_bytes())[key]
        assert list(av.decode_capture(path.read_bytes())) == [
            CaptureError("offset 0", f"{kind}: {key}: {clip(text)}")
        ]
        return
    symbol, expected = RECORD_SAMPLES[path.name]
    got = [
        (i.data_type, i.symbol, i.timestamp_ns, i.price, i.volume, i.stream)
        if isinstance(i, RawMarketData)
        else i
        for i in av.decode_capture(path.read_bytes(), symbol=symbol)
    ]
    assert got == expected


def test_every_sample_is_checked() -> None:
    names = {p.name for p in SAMPLES.glob("alphavantage*")}
    assert names == set(RECORD_SAMPLES) | set(MESSAGE_SAMPLES)


@pytest.mark.parametrize("name", sorted(MESSAGE_SAMPLES))
def test_documented_error_answers_are_classified(name: str) -> None:
    key, kind, window, simulator_text = MESSAGE_SAMPLES[name]
    body = sample(name)
    text = orjson.loads(body)[key]
    assert simulator_text == text
    # Errors come as JSON whatever was asked for, CSV included.
    for query in (Q_MSFT, Q_1MIN, av.Query(av.TIME_SERIES_INTRADAY, "X", "1min", "csv")):
        out = av.decode_response(body, query, 1)
        assert out.message == av.ApiMessage(key, text, av.MessageKind(kind), window), query
        assert out.records == [] and out.errors == []


# ---------------------------------------------------------------- answers in HTTP 200

MESSAGES = [
    ({"Error Message": av.invalid_call_text("TIME_SERIES_INTRADAY")}, "invalid_call", None),
    ({"Error Message": av.INVALID_KEY_TEXT}, "invalid_key", None),
    ({"Information": av.INVALID_KEY_TEXT}, "invalid_key", None),
    ({"Information": av.RATE_LIMIT_TEXTS["day"][1]}, "rate_limit", "day"),
    (
        {
            "Information": "We have detected your API key as ABC and our standard API rate limit "
            "is 25 requests per day. Please subscribe to any of the premium plans."
        },
        "rate_limit",
        "day",
    ),
    ({"Information": av.RATE_LIMIT_TEXTS["second"][1]}, "rate_limit", "second"),
    ({"Note": av.RATE_LIMIT_TEXTS["minute"][1]}, "rate_limit", "minute"),
    ({"Note": "Thank you for using Alpha Vantage! Please slow down."}, "rate_limit", None),
    ({"Information": av.PREMIUM_TEXT}, "premium", None),
    ({"Information": av.DEMO_TEXT}, "demo_key", None),
    ({"Information": "Something new from Alpha Vantage."}, "information", None),
    # Key order: an Error Message wins over a Note in the same body.
    (
        {"Note": av.RATE_LIMIT_TEXTS["minute"][1], "Error Message": "Invalid API call."},
        "invalid_call",
        None,
    ),
]


@pytest.mark.parametrize(("body", "kind", "window"), MESSAGES)
def test_error_answers_classified(body: dict[str, str], kind: str, window: str | None) -> None:
    for query in (Q_MSFT, Q_1MIN, av.Query(av.TIME_SERIES_INTRADAY, "X", "1min", "csv")):
        out = av.decode_response(orjson.dumps(body, option=orjson.OPT_INDENT_2), query, 1)
        assert out.message is not None, query
        assert out.message.kind.value == kind
        assert out.message.window == window
        assert out.records == [] and out.errors == []


def test_unknown_symbol_empty_global_quote() -> None:
    out = av.decode_response(b'{\n    "Global Quote": {}\n}', Q_MSFT, 1)
    assert out.empty and out.records == [] and out.errors == [] and out.message is None
    csv_out = av.decode_response(av.encode_global_quote(None, "csv"), av.Query(
        av.GLOBAL_QUOTE, "NOPE", datatype="csv"), 1)  # fmt: skip
    assert csv_out.empty and csv_out.errors == []


# ---------------------------------------------------------------- malformed input

MALFORMED = [
    (b"", Q_1MIN, "empty"),
    (b'{"Meta Data": {"1. Information": "Intr', Q_1MIN, "invalid JSON"),
    (b"[1, 2]", Q_1MIN, "not"),  # CSV path: no header columns
    (b'{"Meta Data": {}}', Q_1MIN, "Time Series (1min)"),
    (b'{"Time Series (1min)": []}', Q_1MIN, "Time Series (1min)"),
    (b'{"Something": 1}', Q_MSFT, "Global Quote"),
    (b'{"Global Quote": {"05. price": "1.0", "07. latest trading day": "soon"}}', Q_MSFT,
     "latest trading day"),
    (b"<html>502 Bad Gateway</html>", av.Query(av.GLOBAL_QUOTE, "X", datatype="csv"), "CSV"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "query", "reason"), MALFORMED)
def test_malformed_bodies_give_decode_errors(body: bytes, query: av.Query, reason: str) -> None:
    out = av.decode_response(body, query, 1)
    assert out.records == []
    assert len(out.errors) == 1
    assert reason.lower() in out.errors[0].reason.lower()


def test_bad_bars_are_skipped_or_flagged_and_the_rest_decodes() -> None:
    body = orjson.dumps(
        {
            "Time Series (1min)": {
                "2024-03-01 10:02:00": {"1. open": "1.0", "2. high": "1.2", "3. low": "0.9",
                                        "4. close": "1.1", "5. volume": "100"},
                "2024-03-01 10:01:00": {"1. open": "1.0", "2. high": "n/a", "3. low": "0.9",
                                        "4. close": "1.05", "5. volume": "50"},
                "2024-03-01 10:00:00": "not a bar",
                "yesterday": {"1. open": "1.0", "2. high": "1.0", "3. low": "1.0",
                              "4. close": "1.0", "5. volume": "1"},
                "2024-03-01 09:59:00": {"1. open": "1.0"},
            }
        }
    )  # fmt: skip
    out = av.decode_response(body, Q_1MIN, 1)
    reasons = sorted(e.reason for e in out.errors)
    assert len(reasons) == 2
    assert any("not an object" in r for r in reasons)
    assert any("bad bar time" in r for r in reasons)
    times = [r.provider_specific["time"][-8:] for r in out.records]
    assert times == ["09:59:00", "10:01:00", "10:02:00"]
    missing = [QualityFlag.MISSING_FIELDS in r.quality_flags for r in out.records]
    assert missing == [True, True, False]
    assert out.records[0].price is None and out.records[1].price == 1.05


def test_dst_end_repeated_hour_takes_first_occurrence() -> None:
    q = av.Query(av.TIME_SERIES_INTRADAY, "X", "60min", "csv")
    body = b"timestamp,open,high,low,close,volume\r\n2024-11-03 01:30:00,1,1,1,1,1\r\n"
    (r,) = av.decode_response(body, q, 1).records
    assert r.timestamp_ns == utc_ns(2024, 11, 3, 5, 30)  # 01:30 EDT


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_decode_never_raises_on_random_bytes(data: bytes) -> None:
    for query in (Q_MSFT, Q_1MIN, av.Query(av.TIME_SERIES_INTRADAY, "X", "1min", "csv")):
        out = av.decode_response(data, query, 1)
        assert isinstance(out.records, list) and isinstance(out.errors, list)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(max_size=20), st.text(max_size=20), max_size=5))
def test_decode_never_raises_on_random_objects(obj: dict[str, str]) -> None:
    out = av.decode_response(orjson.dumps(obj), Q_1MIN, 1)
    assert out.message is not None or out.errors


# ---------------------------------------------------------------- round trips


def _bars() -> list[av.Bar]:
    return [
        av.Bar(datetime(2024, 3, 1, 9, 30 + i), 100 + i, 101 + i, 99 + i, 100.5 + i, 1000 * i)
        for i in range(5)
    ]


@pytest.mark.parametrize("datatype", ["json", "csv"])
def test_intraday_round_trip(datatype: str) -> None:
    bars = _bars()
    body = av.encode_intraday("AAPL", "1min", bars, datatype)
    if datatype == "csv":
        assert body.startswith(b"timestamp,open,high,low,close,volume\r\n2024-03-01 09:34:00,")
    q = av.Query(av.TIME_SERIES_INTRADAY, "AAPL", "1min", datatype)
    out = av.decode_response(body, q, 7)
    assert out.errors == []
    assert [r.price for r in out.records] == [b.close for b in bars]
    assert [r.volume for r in out.records] == [float(b.volume) for b in bars]
    assert [r.timestamp_ns for r in out.records] == [av.eastern_to_ns(b.time) for b in bars]
    assert out.records[0].timestamp_ns == utc_ns(2024, 3, 1, 14, 30)


def test_json_and_csv_decode_to_the_same_records() -> None:
    bars = _bars()
    q_json = av.Query(av.TIME_SERIES_INTRADAY, "AAPL", "1min", "json")
    q_csv = av.Query(av.TIME_SERIES_INTRADAY, "AAPL", "1min", "csv")
    a = av.decode_response(av.encode_intraday("AAPL", "1min", bars, "json"), q_json, 1)
    b = av.decode_response(av.encode_intraday("AAPL", "1min", bars, "csv"), q_csv, 1)
    assert a.records == b.records
    quote = av.QuoteSnapshot("AAPL", 10.0, 11.0, 9.5, 10.5, 12345, date(2024, 3, 1), 10.25)
    qa = av.decode_response(
        av.encode_global_quote(quote, "json"), av.Query("GLOBAL_QUOTE", "AAPL"), 1
    )
    qb = av.decode_response(
        av.encode_global_quote(quote, "csv"), av.Query("GLOBAL_QUOTE", "AAPL", datatype="csv"), 1
    )
    assert qa.records == qb.records
    (r,) = qa.records
    assert r.price == 10.5 and r.provider_specific["change"] == 0.25
    assert r.provider_specific["changePercent"] == "2.4390%"
    assert r.provider_specific["volume"] == 12345


def test_query_round_trip_and_server_checks() -> None:
    q = av.Query(av.TIME_SERIES_INTRADAY, "BRK.B", "5min", "csv", "full", True)
    text = av.encode_query(q, "k3y")
    assert text.startswith("function=TIME_SERIES_INTRADAY&symbol=BRK.B&interval=5min")
    assert text.endswith("&datatype=csv&apikey=k3y")
    from urllib.parse import parse_qsl

    assert av.decode_query(dict(parse_qsl(text))) == av.Query(
        av.TIME_SERIES_INTRADAY, "BRK.B", "5min", "csv", "full"
    )
    gq = dict(parse_qsl(av.encode_query(Q_MSFT, "k")))
    assert gq == {"function": "GLOBAL_QUOTE", "symbol": "MSFT", "datatype": "json", "apikey": "k"}
    for bad in (
        {"function": "NOPE", "symbol": "X"},
        {"function": "GLOBAL_QUOTE"},
        {"function": "TIME_SERIES_INTRADAY", "symbol": "X", "interval": "2min"},
        {"function": "GLOBAL_QUOTE", "symbol": "X", "datatype": "xml"},
    ):
        with pytest.raises(CodecError):
            av.decode_query(bad)


def test_missing_bars_only_inside_regular_session() -> None:
    assert av.missing_bars("2024-03-01 10:00:00", "2024-03-01 10:01:00", "1min") == 0
    assert av.missing_bars("2024-03-01 10:00:00", "2024-03-01 10:04:00", "1min") == 3
    assert av.missing_bars("2024-03-01 10:00:00", "2024-03-01 10:15:00", "5min") == 2
    assert av.missing_bars("2024-03-01 19:50:00", "2024-03-01 19:55:00", "1min") == 0
    assert av.missing_bars("2024-03-01 15:59:00", "2024-03-04 09:30:00", "1min") == 0
    assert av.missing_bars("garbage", "2024-03-01 10:04:00", "1min") == 0


def test_next_bar_time_stays_in_the_av_day() -> None:
    assert av.next_bar_time(datetime(2024, 3, 1, 19, 59), "1min") == datetime(2024, 3, 4, 4, 0)
    assert av.next_bar_time(datetime(2024, 3, 1, 9, 30), "5min") == datetime(2024, 3, 1, 9, 35)


# ---------------------------------------------------------------- capture files


def test_decode_capture_json_csv_and_lines() -> None:
    items = list(av.decode_capture(INTRADAY_MSFT))
    assert [i.price for i in items if isinstance(i, RawMarketData)] == [86.4931, 86.5, 86.5]
    assert all(isinstance(i, RawMarketData) and i.symbol == "MSFT" for i in items)

    csv_items = list(av.decode_capture(INTRADAY_CSV, symbol="GOOGL"))
    assert [i.stream for i in csv_items if isinstance(i, RawMarketData)] == [
        "TIME_SERIES_INTRADAY:GOOGL:1min"
    ] * 2
    (no_symbol,) = av.decode_capture(INTRADAY_CSV)
    assert isinstance(no_symbol, CaptureError) and "symbol" in no_symbol.reason

    lines = b"\n".join(
        [
            orjson.dumps(orjson.loads(GLOBAL_QUOTE_MSFT)),
            b'{"Note": "5 calls per minute"}',
            b'{"Global Quote": ',
            orjson.dumps(orjson.loads(INTRADAY_IBM_5MIN)),
        ]
    )
    got = list(av.decode_capture(lines))
    errors = [(i.location, i.reason[:10]) for i in got if isinstance(i, CaptureError)]
    assert errors == [("line 2", "rate_limit"), ("line 3", "invalid JS")]
    assert [(i.symbol, i.price) for i in got if isinstance(i, RawMarketData)] == [
        ("MSFT", 112.13),
        ("IBM", 248.3),
    ]
    quotes = list(av.decode_capture(QUOTE_CSV))
    assert [i.symbol for i in quotes if isinstance(i, RawMarketData)] == ["DJIA"]


def test_intraday_query_options_are_spelled_as_av_expects() -> None:
    base = "function=TIME_SERIES_INTRADAY&symbol=X"
    assert av.encode_query(av.Query(av.TIME_SERIES_INTRADAY, "X"), "k") == (
        f"{base}&interval=1min&outputsize=compact&datatype=json&apikey=k"
    )
    q = av.Query(av.TIME_SERIES_INTRADAY, "X", "5min", extended_hours=False, adjusted=True)
    assert av.encode_query(q, "k") == (
        f"{base}&interval=5min&outputsize=compact&extended_hours=false&adjusted=true"
        "&datatype=json&apikey=k"
    )
    q = av.Query(av.TIME_SERIES_INTRADAY, "X", "5min", extended_hours=True, adjusted=False)
    assert "&extended_hours=true&adjusted=false&" in av.encode_query(q, "k")


@pytest.mark.parametrize(
    ("prev", "cur", "interval", "expected"),
    [
        ("09:30:00", "09:33:00", "1min", 2),  # the open itself is in the session
        ("15:58:00", "16:00:00", "1min", 0),  # 16:00 is after the close
        ("15:55:00", "16:05:00", "5min", 0),  # only one end in the session
        ("10:00:00", "10:12:00", "5min", 1),  # off-grid times: whole bars only
    ],
)
def test_missing_bars_at_the_session_edges(
    prev: str, cur: str, interval: str, expected: int
) -> None:
    got = av.missing_bars(f"2024-03-01 {prev}", f"2024-03-01 {cur}", interval)
    assert got == expected and type(got) is int


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # A null text still names the answer; it must not break classification.
        ({"Information": None}, ("Information", "None", "information", None)),
        ({"Information": "Your API key is invalid."},
         ("Information", "Your API key is invalid.", "invalid_key", None)),
        ({"Information": "Please make requests more sparingly."},
         ("Information", "Please make requests more sparingly.", "rate_limit", "second")),
        ({"Information": "The limit is 5 requests per second."},
         ("Information", "The limit is 5 requests per second.", "rate_limit", "second")),
    ],
)  # fmt: skip
def test_each_message_wording_is_recognised_on_its_own(
    body: dict[str, str | None], expected: tuple[str, str, str, str | None]
) -> None:
    key, text, kind, window = expected
    out = av.decode_response(orjson.dumps(body), Q_MSFT, 1)
    assert out.message == av.ApiMessage(key, text, av.MessageKind(kind), window)


def test_leading_bom_and_blank_lines_are_ignored() -> None:
    body = b"\xef\xbb\xbf\r\n \t" + GLOBAL_QUOTE_MSFT
    assert av.decode_response(body, Q_MSFT, AFTER) == av.decode_response(
        GLOBAL_QUOTE_MSFT, Q_MSFT, AFTER
    )


def test_unreadable_bodies_are_reported_whole() -> None:
    assert av.decode_response(b" \r\n", Q_MSFT, 1).errors == [
        DecodeError("empty response body", "")
    ]
    [err] = av.decode_response(b'{"Global Quote": ', Q_MSFT, 1).errors
    assert err.reason.startswith("invalid JSON: ") and err.raw == '{"Global Quote": '
    assert av.decode_response(b"[1, 2]", Q_1MIN, 1).errors == [
        DecodeError("response is not a JSON object", "[1, 2]")
    ]
    csv_query = av.Query(av.GLOBAL_QUOTE, "X", datatype="csv")
    assert av.decode_response(b"XML output is not offered\n", csv_query, 1).errors == [
        DecodeError("CSV quote header lacks price/latestDay", "XML output is not offered\n")
    ]


def _raw(obj: object) -> str:
    return orjson.dumps(obj).decode()


def test_json_errors_name_the_problem_and_keep_the_bad_part() -> None:
    no_quote = {"Something": 1}
    assert av.decode_response(orjson.dumps(no_quote), Q_MSFT, 1).errors == [
        DecodeError("missing 'Global Quote' object", _raw(no_quote))
    ]
    quote = {"05. price": "1.0", "07. latest trading day": "soon"}
    assert av.decode_response(orjson.dumps({"Global Quote": quote}), Q_MSFT, 1).errors == [
        DecodeError("bad latest trading day 'soon'", _raw(quote))
    ]
    no_series = {"Meta Data": {}}
    any_interval = av.Query(av.TIME_SERIES_INTRADAY, "X")
    assert av.decode_response(orjson.dumps(no_series), any_interval, 1).errors == [
        DecodeError("missing 'Time Series (...)' object", _raw(no_series))
    ]


def test_bars_without_any_symbol_are_an_error() -> None:
    bar = {"1. open": "1", "2. high": "1", "3. low": "1", "4. close": "1", "5. volume": "1"}
    body = {"Time Series (1min)": {"2024-03-01 10:00:00": bar}}
    out = av.decode_response(orjson.dumps(body), av.Query(av.TIME_SERIES_INTRADAY, ""), 1)
    assert out.records == []
    assert out.errors == [
        DecodeError("bars without a symbol (none asked, none in Meta Data)", _raw(body))
    ]


def test_the_asked_interval_wins_and_only_time_series_keys_are_series() -> None:
    def bar(close: str) -> dict[str, str]:
        return {"1. open": "1", "2. high": "9", "3. low": "1", "4. close": close, "5. volume": "5"}

    body = orjson.dumps(
        {
            "Meta Data": {"2. Symbol": "IBM"},
            "Realtime (delayed)": {"2024-03-01 10:00:00": bar("7")},
            "Time Series (5min)": {"2024-03-01 10:00:00": bar("5")},
            "Time Series (1min)": {"2024-03-01 10:00:00": bar("1")},
        }
    )
    [one] = av.decode_response(body, av.Query(av.TIME_SERIES_INTRADAY, "IBM", "1min"), 1).records
    assert (one.price, one.stream) == (1.0, "TIME_SERIES_INTRADAY:IBM:1min")
    # No interval asked: the first series, never a key that only looks like one.
    [first] = av.decode_response(body, av.Query(av.TIME_SERIES_INTRADAY, ""), 1).records
    assert (first.symbol, first.price, first.provider_specific["interval"]) == ("IBM", 5.0, "5min")


def test_quote_failing_unforeseen_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # The last-resort guard: quote building failing in a way nobody foresaw.
    def broken(*args: object) -> RawMarketData:
        raise RuntimeError("boom")

    monkeypatch.setattr(av, "_quote_record", broken)
    quote = orjson.loads(GLOBAL_QUOTE_MSFT)["Global Quote"]
    out = av.decode_response(GLOBAL_QUOTE_MSFT, Q_MSFT, 1)
    assert out.records == []
    assert out.errors == [DecodeError("unexpected RuntimeError: boom", _raw(quote))]


CSV_HEADER = "timestamp,open,high,low,close,volume"
CSV_Q = av.Query(av.TIME_SERIES_INTRADAY, "X", "1min", "csv")


def test_csv_cells_are_read_as_text_however_long_the_file() -> None:
    # A bad value past the first 100 rows must cost its bar, not the whole response.
    rows = [f"2024-03-01 {10 + i // 60:02d}:{i % 60:02d}:00,1,2,0.5,1.5,100" for i in range(120)]
    rows[110] = rows[110].removesuffix("100") + "n/a"
    # An extra trailing field on a row is dropped.
    rows[0] += ",extra"
    out = av.decode_response("\r\n".join([CSV_HEADER, *rows]).encode(), CSV_Q, 1)
    assert out.errors == [] and len(out.records) == 120
    assert [r.volume for r in out.records if r.quality_flags] == [None]
    assert out.records[0].price == 1.5


def test_unreadable_csv_error_gives_the_first_line_of_the_parser_message() -> None:
    short = f'{CSV_HEADER}\n"x,1\n'.encode()
    [err] = av.decode_response(short, CSV_Q, 1).errors
    assert err.raw == short.decode()
    # Only the first line, not the parser's paragraphs of advice.
    assert err.reason.startswith("invalid CSV: could not parse")
    assert "\n" not in err.reason
    long = f'{CSV_HEADER}\n"{"x" * 400}'.encode()
    [err] = av.decode_response(long, CSV_Q, 1).errors
    assert err.raw == long.decode()[:300] + "..."
    assert err.reason.startswith("invalid CSV: could not parse")
    assert len(err.reason) == len("invalid CSV: ") + 200 + len("...")
