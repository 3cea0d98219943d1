"""Alpha Vantage REST codec, sans-I/O: query strings out, response bodies in.

Every answer is HTTP 200; errors and throttling are JSON objects told apart by key
("Error Message", then "Information", then "Note") and by their text, even when
``datatype=csv`` was asked for. See ``shared/protocols.md`` section 2. The adapter
(``workers/alphavantage.py``) and the simulator (``simulators/alphavantage.py``) both use
this module.

Record mapping:
- ``GLOBAL_QUOTE`` -> ``DataType.TRADE``: ``price`` is "05. price" (the last trade price).
  ``volume`` is left ``None``: "06. volume" is the day's cumulative volume, not the size
  of a trade, and a consumer summing trade volumes would count it once per poll. The day
  volume, open/high/low, previous close, change, change percent and latest trading day
  go in ``provider_specific`` under the CSV column names (the same keys for JSON and
  CSV). AV gives no quote time, so ``timestamp_ns`` is the latest trading day's 16:00
  US/Eastern close, or the receive time if that is earlier (the session is still open);
  ``provider_specific["timestamp_source"]`` says which. There is no bid/ask, so no QUOTE.
- ``TIME_SERIES_INTRADAY`` -> ``DataType.AGGREGATE`` per bar: ``price`` = close,
  ``volume`` = bar volume, ``timestamp_ns`` = the bar's time as AV labels it, read as
  America/New_York (current captures end a 5min day at 19:55, so the label looks like the
  bar's start; an older 1min capture ends at 20:00). ``provider_specific`` holds
  open/high/low/close, the interval and the local ``time`` string.
- AV has no sequence numbers: ``provider_sequence`` is ``None`` and ``stream`` is
  ``"{function}:{symbol}:{interval}"`` (``"GLOBAL_QUOTE:{symbol}"`` for quotes).
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

import orjson
import polars as pl

from common.codecs.base import (
    CaptureError,
    CodecError,
    DecodeError,
    as_text,
    brief,
    clip,
    unexpected,
)
from common.model import DataType, QualityFlag, RawMarketData

PROVIDER = "alphavantage"

GLOBAL_QUOTE = "GLOBAL_QUOTE"
TIME_SERIES_INTRADAY = "TIME_SERIES_INTRADAY"
FUNCTIONS = (GLOBAL_QUOTE, TIME_SERIES_INTRADAY)
# The kind of record each function's answer decodes to: a symbol is polled only for the
# functions giving what its subscription asked for.
FUNCTION_DATA_TYPE: dict[str, DataType] = {
    GLOBAL_QUOTE: DataType.TRADE,
    TIME_SERIES_INTRADAY: DataType.AGGREGATE,
}
INTERVALS: dict[str, int] = {"1min": 60, "5min": 300, "15min": 900, "30min": 1800, "60min": 3600}
DATATYPES = ("json", "csv")
OUTPUTSIZES = ("compact", "full")
COMPACT_POINTS = 100

# AV labels bars "US/Eastern", a link to this zone.
EASTERN = ZoneInfo("America/New_York")
MARKET_CLOSE = time(16, 0)
REGULAR_OPEN = time(9, 30)
LOCAL_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"

ERROR_KEYS = ("Error Message", "Information", "Note")

# Texts as AV sends them (protocols.md 2.4); the simulator answers with these.
INVALID_KEY_TEXT = (
    "the parameter apikey is invalid or missing. Please claim your free API key on "
    "(https://www.alphavantage.co/support/#api-key). It should take less than 20 seconds."
)
RATE_LIMIT_TEXTS: dict[str, tuple[str, str]] = {
    "second": (
        "Information",
        "Thank you for using Alpha Vantage! Please consider spreading out your free API "
        "requests more sparingly (1 request per second). You may subscribe to any of the "
        "premium plans at https://www.alphavantage.co/premium/ to lift the free key rate "
        "limit (25 requests per day), raise the per-second burst limit, and instantly "
        "unlock all premium endpoints",
    ),
    "minute": (
        "Note",
        "Thank you for using Alpha Vantage! Our standard API call frequency is 5 calls per "
        "minute and 500 calls per day. Please visit https://www.alphavantage.co/premium/ if "
        "you would like to target a higher API call frequency.",
    ),
    "day": (
        "Information",
        "Thank you for using Alpha Vantage! Our standard API rate limit is 25 requests per "
        "day. Please subscribe to any of the premium plans at "
        "https://www.alphavantage.co/premium/ to instantly remove all daily rate limits.",
    ),
}
PREMIUM_TEXT = (
    "Thank you for using Alpha Vantage! This is a premium endpoint. You may subscribe to any "
    "of the premium plans at https://www.alphavantage.co/premium/ to instantly unlock all "
    "premium endpoints"
)
DEMO_TEXT = (
    "The **demo** API key is for demo purposes only. Please claim your free API key at "
    "(https://www.alphavantage.co/support/#api-key) to explore our full API offerings. It "
    "takes fewer than 20 seconds, and we are committed to making it free forever."
)


def invalid_call_text(function: str) -> str:
    return (
        "Invalid API call. Please retry or visit the documentation "
        f"(https://www.alphavantage.co/documentation/) for {function}."
    )


class MessageKind(enum.StrEnum):
    INVALID_KEY = "invalid_key"
    RATE_LIMIT = "rate_limit"
    PREMIUM = "premium"
    DEMO_KEY = "demo_key"
    INVALID_CALL = "invalid_call"
    INFORMATION = "information"  # an Information text we do not recognise


@dataclass(slots=True)
class ApiMessage:
    """An error or throttle answer: ``{"Note": "..."}`` and friends."""

    key: str
    text: str
    kind: MessageKind
    # For RATE_LIMIT: "second", "minute" or "day" when the text says which window.
    window: str | None = None


@dataclass(frozen=True, slots=True)
class Query:
    """One ``GET /query`` request, minus the key."""

    function: str
    symbol: str
    interval: str | None = None
    datatype: str = "json"
    outputsize: str = "compact"
    extended_hours: bool | None = None
    adjusted: bool | None = None

    @property
    def stream(self) -> str:
        return stream_name(self.function, self.symbol, self.interval)


@dataclass(slots=True)
class DecodedResponse:
    records: list[RawMarketData] = field(default_factory=list)
    errors: list[DecodeError] = field(default_factory=list)
    message: ApiMessage | None = None
    # GLOBAL_QUOTE for an unknown symbol: {"Global Quote": {}} (not an error).
    empty: bool = False


def stream_name(function: str, symbol: str, interval: str | None = None) -> str:
    return f"{function}:{symbol}:{interval}" if interval else f"{function}:{symbol}"


# ---------------------------------------------------------------- client side


def encode_query(query: Query, api_key: str) -> str:
    """The query string of ``GET /query?...`` (every parameter goes there, the key too)."""
    params: list[tuple[str, str]] = [("function", query.function), ("symbol", query.symbol)]
    if query.function == TIME_SERIES_INTRADAY:
        params.append(("interval", query.interval or "1min"))
        params.append(("outputsize", query.outputsize))
        if query.extended_hours is not None:
            params.append(("extended_hours", "true" if query.extended_hours else "false"))
        if query.adjusted is not None:
            params.append(("adjusted", "true" if query.adjusted else "false"))
    params.append(("datatype", query.datatype))
    params.append(("apikey", api_key))
    return urlencode(params)


def classify_message(obj: Mapping[str, Any]) -> ApiMessage | None:
    """The error or throttle answer in ``obj``, checked by key in AV's order, else None."""
    for key in ERROR_KEYS:
        if key not in obj:
            continue
        text = as_text(obj[key], "None")
        low = text.lower()
        window: str | None = None
        # The key text turns up under "Information" too, so match on the text first.
        if "apikey is invalid" in low or "api key is invalid" in low:
            kind = MessageKind.INVALID_KEY
        elif key == "Error Message":
            kind = MessageKind.INVALID_CALL
        # The burst text also mentions "per day": check the shorter windows first.
        elif "per second" in low or "sparingly" in low:
            kind, window = MessageKind.RATE_LIMIT, "second"
        elif "per minute" in low:
            kind, window = MessageKind.RATE_LIMIT, "minute"
        elif "per day" in low:
            kind, window = MessageKind.RATE_LIMIT, "day"
        elif "premium endpoint" in low:
            kind = MessageKind.PREMIUM
        elif "demo" in low:
            kind = MessageKind.DEMO_KEY
        elif key == "Note":  # every Note seen so far was a throttle
            kind = MessageKind.RATE_LIMIT
        else:
            kind = MessageKind.INFORMATION
        return ApiMessage(key, text, kind, window)
    return None


def decode_response(
    body: bytes, query: Query, receive_ns: int, provider: str = PROVIDER
) -> DecodedResponse:
    """Decode one response body for ``query``. Never raises."""
    out = DecodedResponse()
    text = body.lstrip(b"\xef\xbb\xbf \t\r\n")
    if not text:
        out.errors.append(DecodeError("empty response body", ""))
        return out
    # Errors come as JSON even when CSV was asked for.
    if text[:1] in (b"{", b"["):
        try:
            obj = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            out.errors.append(DecodeError(f"invalid JSON: {exc}", clip(body)))
            return out
        if not isinstance(obj, dict):
            out.errors.append(DecodeError("response is not a JSON object", clip(body)))
            return out
        _decode_json(obj, query, receive_ns, provider, out)
    elif query.function == GLOBAL_QUOTE:
        _decode_quote_csv(text, query, receive_ns, provider, out)
    else:
        _decode_bars_csv(text, query, receive_ns, provider, out)
    return out


def _decode_json(
    obj: dict[str, Any], query: Query, receive_ns: int, provider: str, out: DecodedResponse
) -> None:
    message = classify_message(obj)
    if message is not None:
        out.message = message
        return
    if query.function == GLOBAL_QUOTE:
        quote = obj.get("Global Quote")
        if not isinstance(quote, dict):
            out.errors.append(DecodeError("missing 'Global Quote' object", clip(obj)))
            return
        if not quote:
            out.empty = True
            return
        fields = {name: quote.get(key) for key, name in JSON_QUOTE_KEYS.items()}
        try:
            out.records.append(_quote_record(fields, query, receive_ns, provider))
        except CodecError as exc:
            out.errors.append(DecodeError(str(exc), clip(quote)))
        except Exception as exc:  # untrusted JSON: the quote loses only itself
            out.errors.append(unexpected(exc, quote))
        return
    series_key, series = _find_series(obj, query.interval)
    if not isinstance(series, dict):
        want = f"Time Series ({query.interval})" if query.interval else "Time Series (...)"
        out.errors.append(DecodeError(f"missing {want!r} object", clip(obj)))
        return
    interval = series_key[len("Time Series (") : -1]
    symbol = query.symbol
    if not symbol:
        meta = obj.get("Meta Data")
        symbol = as_text(meta.get("2. Symbol")) if isinstance(meta, dict) else ""
    if not symbol:
        out.errors.append(DecodeError("bars without a symbol (none asked, none in Meta Data)",
                                      clip(obj)))  # fmt: skip
        return
    frame = _series_frame(series, out.errors)
    out.records.extend(_bar_records(frame, symbol, interval, receive_ns, provider, out.errors))


def _find_series(obj: dict[str, Any], interval: str | None) -> tuple[str, Any]:
    if interval:
        key = f"Time Series ({interval})"
        if key in obj:
            return key, obj[key]
    for key, value in obj.items():
        if key.startswith("Time Series (") and key.endswith(")"):
            return key, value
    return "", None


# ---------------------------------------------------------------- quotes

JSON_QUOTE_KEYS = {
    "01. symbol": "symbol",
    "02. open": "open",
    "03. high": "high",
    "04. low": "low",
    "05. price": "price",
    "06. volume": "volume",
    "07. latest trading day": "latestDay",
    "08. previous close": "previousClose",
    "09. change": "change",
    "10. change percent": "changePercent",
}
CSV_QUOTE_COLUMNS = tuple(JSON_QUOTE_KEYS.values())
_QUOTE_NUMBERS = ("open", "high", "low", "volume", "previousClose", "change")


def _read_csv(text: bytes, out: DecodedResponse) -> pl.DataFrame | None:
    """A CSV response as text columns, or None with a decode error when it is not CSV."""
    try:
        return pl.read_csv(text, infer_schema=False, truncate_ragged_lines=True)
    except Exception as exc:  # polars raises several kinds; all mean "not this CSV"
        # Its messages run to several paragraphs of advice: the first line says what.
        first = str(exc).strip().partition("\n")[0]
        out.errors.append(DecodeError(f"invalid CSV: {clip(first, 200)}", clip(text)))
        return None


def _decode_quote_csv(
    text: bytes, query: Query, receive_ns: int, provider: str, out: DecodedResponse
) -> None:
    frame = _read_csv(text, out)
    if frame is None:
        return
    if "price" not in frame.columns or "latestDay" not in frame.columns:
        out.errors.append(DecodeError("CSV quote header lacks price/latestDay", clip(text)))
        return
    if frame.height == 0:
        out.empty = True
        return
    for row in frame.iter_rows(named=True):
        try:
            out.records.append(_quote_record(row, query, receive_ns, provider))
        except CodecError as exc:
            out.errors.append(DecodeError(str(exc), clip(row)))
        except Exception as exc:  # a row loses only itself
            out.errors.append(unexpected(exc, row))


def _quote_record(
    fields: Mapping[str, Any], query: Query, receive_ns: int, provider: str
) -> RawMarketData:
    symbol = query.symbol or fields.get("symbol")
    if not isinstance(symbol, str) or not symbol:
        raise CodecError("quote without a symbol")
    day_text = fields.get("latestDay")
    try:
        day = date.fromisoformat(day_text) if type(day_text) is str else None
    except ValueError:
        day = None
    if day is None:
        raise CodecError(f"bad latest trading day {brief(day_text)}")
    close_ns = eastern_to_ns(datetime.combine(day, MARKET_CLOSE))
    # No quote time from AV: while the day's session is open, the receive time is closer.
    if 0 < receive_ns < close_ns:
        timestamp_ns, source = receive_ns, "receive"
    else:
        timestamp_ns, source = close_ns, "close"
    flags: list[str] = []
    price = to_float(fields.get("price"))
    if price is None:
        flags.append(QualityFlag.MISSING_FIELDS)
    specific: dict[str, Any] = {name: to_float(fields.get(name)) for name in _QUOTE_NUMBERS}
    volume = specific["volume"]
    if volume is not None and volume.is_integer():
        specific["volume"] = int(volume)
    specific["latestDay"] = day.isoformat()
    specific["changePercent"] = fields.get("changePercent")
    specific["timestamp_source"] = source
    return RawMarketData(
        symbol, provider, timestamp_ns, DataType.TRADE, price, None, None, None, specific,
        None, stream_name(GLOBAL_QUOTE, symbol), False, receive_ns, flags,
    )  # fmt: skip


# ---------------------------------------------------------------- intraday bars

JSON_BAR_KEYS = {
    "1. open": "open",
    "2. high": "high",
    "3. low": "low",
    "4. close": "close",
    "5. volume": "volume",
}
BAR_COLUMNS = ("timestamp", "open", "high", "low", "close", "volume")


def _series_frame(series: dict[str, Any], errors: list[DecodeError]) -> pl.DataFrame:
    """The JSON series as a frame of strings, one row per bar (bad bars become errors)."""
    columns: dict[str, list[str | None]] = {name: [] for name in BAR_COLUMNS}
    stamps = columns["timestamp"]
    for stamp, bar in series.items():
        if not isinstance(bar, dict):
            errors.append(DecodeError(f"bar {brief(stamp)} is not an object", clip(bar)))
            continue
        stamps.append(stamp)
        for key, name in JSON_BAR_KEYS.items():
            value = bar.get(key)
            columns[name].append(str(value) if isinstance(value, str | int | float) else None)
    return pl.DataFrame(columns, schema=dict.fromkeys(BAR_COLUMNS, pl.String))


def _decode_bars_csv(
    text: bytes, query: Query, receive_ns: int, provider: str, out: DecodedResponse
) -> None:
    frame = _read_csv(text, out)
    if frame is None:
        return
    # The retired extended-history CSV called the first column "time".
    if "timestamp" not in frame.columns and "time" in frame.columns:
        frame = frame.rename({"time": "timestamp"})
    missing = [c for c in BAR_COLUMNS if c not in frame.columns]
    if missing:
        out.errors.append(DecodeError(f"CSV bars lack columns {missing}", clip(text)))
        return
    if not query.symbol:
        out.errors.append(DecodeError("CSV bars without a symbol: none was asked", clip(text)))
        return
    interval = query.interval or ""
    out.records.extend(
        _bar_records(frame, query.symbol, interval, receive_ns, provider, out.errors)
    )


def _bar_records(
    frame: pl.DataFrame,
    symbol: str,
    interval: str,
    receive_ns: int,
    provider: str,
    errors: list[DecodeError],
) -> list[RawMarketData]:
    """Bars oldest first; rows whose time does not parse become errors."""
    if frame.height == 0:
        return []
    numbers = [pl.col(c).cast(pl.Float64, strict=False) for c in BAR_COLUMNS[1:]]
    frame = frame.select(
        pl.col("timestamp"),
        local_to_us_expr(pl.col("timestamp")).alias("us"),
        *numbers,
    )
    bad = frame.filter(pl.col("us").is_null())
    for stamp in bad["timestamp"].to_list():
        errors.append(DecodeError(f"bad bar time {brief(stamp)}", clip(stamp)))
    frame = frame.filter(pl.col("us").is_not_null()).sort("us")
    stream = stream_name(TIME_SERIES_INTRADAY, symbol, interval)
    records: list[RawMarketData] = []
    for stamp, us, o, h, lo, c, v in frame.iter_rows():
        ns = us * 1000  # a Python int: no int64 overflow past 2262
        flags: list[str] = []
        if o is None or h is None or lo is None or c is None or v is None:
            flags.append(QualityFlag.MISSING_FIELDS)
        specific = {"open": o, "high": h, "low": lo, "close": c, "interval": interval,
                    "time": stamp}  # fmt: skip
        records.append(
            RawMarketData(
                symbol,
                provider,
                ns,
                DataType.AGGREGATE,
                c,
                v,
                None,
                None,
                specific,
                None,
                stream,
                False,
                receive_ns,
                flags,
            )
        )
    return records


def local_to_us_expr(column: pl.Expr) -> pl.Expr:
    """``"YYYY-MM-DD HH:MM:SS"`` in US/Eastern -> UTC epoch µs (null when it does not parse).

    The repeated hour when DST ends takes its first occurrence; a time that does not exist
    (the skipped hour) is null. Microseconds, not ns: polars' ns datetimes span only
    1677-2262 and wrap silently outside it (year 1600 came out as 2184).
    """
    return (
        column.str.strptime(pl.Datetime("us"), LOCAL_TIME_FORMAT, strict=False)
        .dt.replace_time_zone("America/New_York", ambiguous="earliest", non_existent="null")
        .dt.epoch("us")
    )


def eastern_to_ns(local: datetime) -> int:
    """A naive US/Eastern wall time -> UTC epoch ns."""
    aware = local.replace(tzinfo=EASTERN)
    return int(aware.timestamp()) * 1_000_000_000 + aware.microsecond * 1000


def to_float(value: Any) -> float | None:
    if isinstance(value, float | int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.rstrip("%"))
        except ValueError:
            return None
    return None


def missing_bars(prev_time: str, cur_time: str, interval: str) -> int:
    """How many bars should lie between two bar times of one series, but are not there.

    Only counted inside one regular session (09:30-16:00 US/Eastern, same day): outside
    it AV leaves out bars with no trades, so a hole there is normal.
    """
    step = INTERVALS.get(interval)
    try:
        prev = datetime.strptime(prev_time, LOCAL_TIME_FORMAT)
        cur = datetime.strptime(cur_time, LOCAL_TIME_FORMAT)
    except (TypeError, ValueError):
        return 0
    if step is None or prev.date() != cur.date():
        return 0
    if not (_in_regular_session(prev.time()) and _in_regular_session(cur.time())):
        return 0
    between = int((cur - prev).total_seconds()) // step - 1
    return max(0, between)


def _in_regular_session(t: time) -> bool:
    return REGULAR_OPEN <= t < MARKET_CLOSE


# ---------------------------------------------------------------- capture files


def decode_capture(
    data: bytes, *, symbol: str | None = None
) -> Iterator[RawMarketData | CaptureError]:
    """A saved response (JSON or CSV), or JSON responses one per line (``feedfleet decode``).

    The function is recognised from the body. CSV intraday bodies carry no symbol or
    interval: pass ``symbol``; the interval is taken from the bar spacing.
    """
    text = data.strip()
    if text[:1] == b"{":
        try:
            whole = orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
        else:
            yield from _capture_object(whole, "offset 0", symbol)
            return
        # Not one document: one compact response per line.
        for lineno, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                yield CaptureError(f"line {lineno}", f"invalid JSON: {exc}")
                continue
            yield from _capture_object(obj, f"line {lineno}", symbol)
        return
    header = text.split(b"\n", 1)[0].strip().lower()
    if header.startswith(b"symbol"):
        query = Query(GLOBAL_QUOTE, symbol or "", datatype="csv")
    else:
        query = Query(TIME_SERIES_INTRADAY, symbol or "", _interval_from_csv(text), "csv")
        if not symbol:
            yield CaptureError("offset 0", "CSV bars carry no symbol; pass one")
            return
    decoded = decode_response(text, query, 0)
    for err in decoded.errors:
        yield CaptureError("offset 0", err.reason)
    yield from decoded.records


def _capture_object(
    obj: Any, where: str, symbol: str | None
) -> Iterator[RawMarketData | CaptureError]:
    if not isinstance(obj, dict):
        yield CaptureError(where, "not a JSON object")
        return
    message = classify_message(obj)
    if message is not None:
        yield CaptureError(where, f"{message.kind.value}: {message.key}: {clip(message.text)}")
        return
    if "Global Quote" in obj:
        query = Query(GLOBAL_QUOTE, symbol or "")
    else:
        key, _ = _find_series(obj, None)
        interval = key[len("Time Series (") : -1] if key else None
        query = Query(TIME_SERIES_INTRADAY, symbol or "", interval)
    decoded = DecodedResponse()
    _decode_json(obj, query, 0, PROVIDER, decoded)
    for err in decoded.errors:
        yield CaptureError(where, err.reason)
    if decoded.empty:
        yield CaptureError(where, "empty Global Quote (unknown symbol)")
    yield from decoded.records


def _interval_from_csv(text: bytes) -> str | None:
    try:
        frame = pl.read_csv(text, infer_schema=False, n_rows=50, truncate_ragged_lines=True)
        column = "timestamp" if "timestamp" in frame.columns else "time"
        us = frame.select(local_to_us_expr(pl.col(column)).alias("us"))["us"].drop_nulls()
        steps = us.sort().diff().drop_nulls()
        smallest = steps.filter(steps > 0).min()
    except Exception:  # a capture we cannot read still decodes, without an interval
        return None
    if not isinstance(smallest, int):
        return None
    seconds = smallest // 1_000_000
    return next((name for name, step in INTERVALS.items() if step == seconds), None)


# ---------------------------------------------------------------- server side


@dataclass(slots=True)
class Bar:
    """One intraday bar as the simulator holds it; ``time`` is US/Eastern wall time."""

    time: datetime
    open: float
    high: float
    low: float
    close: float
    volume: int


@dataclass(slots=True)
class QuoteSnapshot:
    symbol: str
    open: float
    high: float
    low: float
    price: float
    volume: int
    latest_day: date
    previous_close: float


def decode_query(params: Mapping[str, str]) -> Query:
    """A request's query parameters as the server sees them. Raises ``CodecError``."""
    function = params.get("function", "")
    symbol = params.get("symbol", "")
    if function not in FUNCTIONS:
        raise CodecError(f"unknown function {function!r}")
    if not symbol:
        raise CodecError("missing symbol")
    datatype = params.get("datatype", "json")
    if datatype not in DATATYPES:
        raise CodecError(f"bad datatype {datatype!r}")
    interval = None
    outputsize = params.get("outputsize", "compact")
    if function == TIME_SERIES_INTRADAY:
        interval = params.get("interval", "")
        if interval not in INTERVALS:
            raise CodecError(f"bad interval {interval!r}")
        if outputsize not in OUTPUTSIZES:
            raise CodecError(f"bad outputsize {outputsize!r}")
    return Query(function, symbol, interval, datatype, outputsize)


def encode_message(key: str, text: str) -> bytes:
    return orjson.dumps({key: text}, option=orjson.OPT_INDENT_2)


def _price(value: float) -> str:
    return f"{value:.4f}"


def _quote_values(q: QuoteSnapshot) -> list[str]:
    change = q.price - q.previous_close
    percent = change / q.previous_close * 100.0 if q.previous_close else 0.0
    return [
        q.symbol, _price(q.open), _price(q.high), _price(q.low), _price(q.price), str(q.volume),
        q.latest_day.isoformat(), _price(q.previous_close), _price(change), f"{percent:.4f}%",
    ]  # fmt: skip


def encode_global_quote(quote: QuoteSnapshot | None, datatype: str = "json") -> bytes:
    """``{"Global Quote": {...}}`` or its CSV; ``None`` is the unknown-symbol answer."""
    if datatype == "csv":
        lines = [",".join(CSV_QUOTE_COLUMNS)]
        if quote is not None:
            lines.append(",".join(_quote_values(quote)))
        return ("\r\n".join(lines) + "\r\n").encode()
    body: dict[str, str] = {}
    if quote is not None:
        body = dict(zip(JSON_QUOTE_KEYS, _quote_values(quote), strict=True))
    return orjson.dumps({"Global Quote": body}, option=orjson.OPT_INDENT_2)


def encode_intraday(
    symbol: str, interval: str, bars: list[Bar], datatype: str = "json",
    outputsize: str = "compact",
) -> bytes:  # fmt: skip
    """A TIME_SERIES_INTRADAY body; ``bars`` oldest first, written newest first as AV does."""
    newest_first = bars[::-1]
    if datatype == "csv":
        lines = [",".join(BAR_COLUMNS)]
        lines.extend(
            f"{b.time.strftime(LOCAL_TIME_FORMAT)},{_price(b.open)},{_price(b.high)},"
            f"{_price(b.low)},{_price(b.close)},{b.volume}"
            for b in newest_first
        )
        return ("\r\n".join(lines) + "\r\n").encode()
    meta = {
        "1. Information": f"Intraday ({interval}) open, high, low, close prices and volume",
        "2. Symbol": symbol,
        "3. Last Refreshed": newest_first[0].time.strftime(LOCAL_TIME_FORMAT) if bars else "",
        "4. Interval": interval,
        "5. Output Size": "Compact" if outputsize == "compact" else "Full size",
        "6. Time Zone": "US/Eastern",
    }
    series = {
        b.time.strftime(LOCAL_TIME_FORMAT): {
            "1. open": _price(b.open),
            "2. high": _price(b.high),
            "3. low": _price(b.low),
            "4. close": _price(b.close),
            "5. volume": str(b.volume),
        }
        for b in newest_first
    }
    return orjson.dumps(
        {"Meta Data": meta, f"Time Series ({interval})": series}, option=orjson.OPT_INDENT_2
    )


def next_bar_time(t: datetime, interval: str) -> datetime:
    """The next bar time within AV's 04:00-20:00 US/Eastern day, skipping weekends."""
    nxt = t + timedelta(seconds=INTERVALS[interval])
    if nxt.time() >= time(20, 0) or nxt.date() != t.date():
        day = t.date() + timedelta(days=1)
        while day.weekday() >= 5:
            day += timedelta(days=1)
        nxt = datetime.combine(day, time(4, 0))
    return nxt
