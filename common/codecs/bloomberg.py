"""Bloomberg ``//blp/mktdata`` codec, sans-I/O.

blpapi has no public wire protocol: the library hands the application ``Event`` objects
holding ``Message`` objects. This codec works one step later, on ``MessageSnapshot``
records: plain copies of a message (event type, message type, correlation id values,
content as ``Message.toPy()`` gives it). ``snapshot_event`` makes them from any object
with blpapi's documented ``Message`` methods; ``decode_messages`` turns them into
``RawMarketData`` records and ``StatusMessage`` events. See ``shared/protocols.md`` section 5.

The stand-in library in ``simulators/bloomberg.py`` carries snapshots between its server
and its client half as JSON lines (``encode_event_line`` / ``decode_event_line``). That
line format is ours, not Bloomberg's; it is also the capture format ``decode_capture``
reads, so an operator can dump snapshots from a real session and decode them here.

Sequence numbers: blpapi gives no per-subscription sequence number an application can
check for gaps. Records carry ``provider_sequence=None``; lost data is reported by the
library itself as an ``ADMIN`` ``DataLoss`` message, which the adapter turns into a
``gap`` flag on the next record of each affected symbol.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import orjson

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

PROVIDER = "bloomberg"
SERVICE = "//blp/mktdata"
DEFAULT_TOPIC_SUFFIX = " US Equity"

# Event type names as blpapi.Event spells its constants.
EVENT_TYPE_NAMES = (
    "ADMIN", "SESSION_STATUS", "SUBSCRIPTION_STATUS", "REQUEST_STATUS", "RESPONSE",
    "PARTIAL_RESPONSE", "SUBSCRIPTION_DATA", "SERVICE_STATUS", "TIMEOUT",
    "AUTHORIZATION_STATUS", "RESOLUTION_STATUS", "TOPIC_STATUS", "TOKEN_STATUS", "REQUEST",
)  # fmt: skip

# Message type names (blpapi.Names).
MARKET_DATA_EVENTS = "MarketDataEvents"
SESSION_STARTED = "SessionStarted"
SESSION_STARTUP_FAILURE = "SessionStartupFailure"
SESSION_TERMINATED = "SessionTerminated"
SESSION_CONNECTION_UP = "SessionConnectionUp"
SESSION_CONNECTION_DOWN = "SessionConnectionDown"
SERVICE_OPENED = "ServiceOpened"
SERVICE_OPEN_FAILURE = "ServiceOpenFailure"
SUBSCRIPTION_STARTED = "SubscriptionStarted"
SUBSCRIPTION_FAILURE = "SubscriptionFailure"
SUBSCRIPTION_TERMINATED = "SubscriptionTerminated"
SLOW_CONSUMER_WARNING = "SlowConsumerWarning"
SLOW_CONSUMER_WARNING_CLEARED = "SlowConsumerWarningCleared"
DATA_LOSS = "DataLoss"

TRADE_FIELDS = ("LAST_PRICE", "SIZE_LAST_TRADE", "VOLUME", "TRADE_UPDATE_STAMP_RT")
QUOTE_FIELDS = ("BID", "ASK", "BID_SIZE", "ASK_SIZE", "BID_UPDATE_STAMP_RT", "ASK_UPDATE_STAMP_RT")
# Where the provider's event time is, best first. EVENT_TIME / TIME may be a time of day.
TRADE_TIME_FIELDS = ("TRADE_UPDATE_STAMP_RT", "EVT_TRADE_TIME_RT", "EVENT_TIME", "TIME")
QUOTE_TIME_FIELDS = ("BID_UPDATE_STAMP_RT", "ASK_UPDATE_STAMP_RT", "EVENT_TIME", "TIME")
# Fields mapped onto RawMarketData columns; everything else goes to provider_specific.
_TRADE_MAPPED = frozenset({"LAST_PRICE", "SIZE_LAST_TRADE", "BID", "ASK"})
_QUOTE_MAPPED = frozenset({"BID", "ASK"})

RECAPTYPE_NONE = 0

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_DAY_NS = 86_400 * 1_000_000_000
# How far ahead of our clock a provider's time of day may be and still be read as now: a
# stamp of 00:00:01 read at 23:59:59 is tomorrow's, but one of 09:30 read at 22:00 (a
# recap's last trade) is this morning's, never tomorrow's.
_CLOCK_SKEW_NS = 300 * 1_000_000_000
# Content nested deeper than this is kept as it is (or as text) rather than walked: a
# walk over a value nested past the recursion limit would raise RecursionError.
_MAX_DEPTH = 32


@dataclass(slots=True)
class MessageSnapshot:
    """A plain copy of one blpapi ``Message``, safe to pass between threads."""

    event_type: str
    message_type: str
    correlation_ids: list[Any] = field(default_factory=list)
    elements: dict[str, Any] = field(default_factory=dict)
    recap_type: int = RECAPTYPE_NONE
    # Only the stand-in and captures fill this; real messages are matched by correlation id.
    topic: str = ""


@dataclass(slots=True)
class Reason:
    """blpapi's ``reason`` element: ``{source, errorCode, category, description, subcategory}``."""

    source: str = ""
    category: str = ""
    subcategory: str = ""
    description: str = ""
    error_code: int | None = None

    def __str__(self) -> str:
        parts = [p for p in (self.category, self.subcategory, self.description) if p]
        return ": ".join(parts) or "no reason given"


@dataclass(slots=True)
class StatusMessage:
    """Any non-data message: session, service, subscription or admin status."""

    event_type: str
    message_type: str
    symbols: list[str] = field(default_factory=list)
    correlation_ids: list[Any] = field(default_factory=list)
    reason: Reason | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class DecodedEvent:
    records: list[RawMarketData] = field(default_factory=list)
    statuses: list[StatusMessage] = field(default_factory=list)
    errors: list[DecodeError] = field(default_factory=list)
    skipped: int = 0


@dataclass(slots=True)
class QuoteCache:
    """Last bid and ask per symbol, owned by one connection.

    Bloomberg sends only the fields that changed, so a quote tick often carries one side;
    the other side is carried over from here rather than flagging the quote incomplete.
    """

    sides: dict[str, list[float | None]] = field(default_factory=dict)


@dataclass(slots=True)
class WireEvent:
    """One line of the stand-in's wire (and of a capture): an event and its messages."""

    event_type: str
    messages: list[MessageSnapshot]
    receive_ns: int = 0


@dataclass(slots=True)
class StandInRequest:
    """A client request on the stand-in's wire: ``{"op": ..., ...}``."""

    op: str
    args: dict[str, Any]


# ---------------------------------------------------------------- topics and fields


def topic_for(symbol: str, suffix: str = DEFAULT_TOPIC_SUFFIX) -> str:
    """``"IBM"`` -> ``"IBM US Equity"``; full topics (a yellow key, ``/isin/...``) are kept."""
    if symbol.startswith("/") or " " in symbol:
        return symbol
    return symbol + suffix


def symbol_for_topic(topic: str, suffix: str = DEFAULT_TOPIC_SUFFIX) -> str:
    """The inverse of ``topic_for`` for topics it made; other topics stay whole."""
    if suffix and topic.endswith(suffix) and len(topic) > len(suffix):
        return topic[: -len(suffix)]
    return topic


def fields_for(data_types: Iterable[DataType]) -> list[str]:
    """Fields to subscribe for the wanted data types (trade and/or quote)."""
    wanted = set(data_types)
    out: list[str] = []
    if DataType.TRADE in wanted or not wanted & {DataType.TRADE, DataType.QUOTE}:
        out.extend(TRADE_FIELDS)
    if DataType.QUOTE in wanted:
        out.extend(QUOTE_FIELDS)
    return out


def subscription_options(interval_s: float | None) -> str:
    """The options part of a subscription; ``interval=N`` asks for conflated updates."""
    return f"interval={interval_s:g}" if interval_s else ""


def parse_subscription_string(text: str) -> tuple[str, list[str], dict[str, str]]:
    """``"IBM US Equity?fields=BID,ASK&interval=2"`` -> topic, fields, options.

    The form ``SubscriptionList.add`` builds. A leading ``//blp/mktdata/ticker/`` is dropped.
    """
    topic, _, query = text.partition("?")
    for prefix in (SERVICE + "/ticker/", SERVICE + "/"):
        if topic.startswith(prefix):
            topic = topic[len(prefix) :]
            break
    fields: list[str] = []
    options: dict[str, str] = {}
    for part in filter(None, query.split("&")):
        key, _, value = part.partition("=")
        if key == "fields":
            fields.extend(f.strip() for f in value.split(",") if f.strip())
        else:
            options[key] = unquote(value)
    return unquote(topic), fields, options


# ---------------------------------------------------------------- blpapi objects -> snapshots


def snapshot_event(event: Any, event_type: str) -> tuple[list[MessageSnapshot], list[DecodeError]]:
    """Copy every message of a blpapi ``Event``. Never raises."""
    snaps: list[MessageSnapshot] = []
    errors: list[DecodeError] = []
    try:
        messages = list(event)
    except Exception as exc:  # a broken event object must not stop the reader thread
        return snaps, [DecodeError(f"cannot iterate event: {brief(exc, 100)}", clip(event_type))]
    for msg in messages:
        try:
            snaps.append(snapshot_message(msg, event_type))
        except CodecError as exc:
            errors.append(DecodeError(str(exc), _safe_str(msg)))
    return snaps, errors


def snapshot_message(msg: Any, event_type: str) -> MessageSnapshot:
    """Copy one blpapi ``Message`` through its documented accessors. Raises ``CodecError``."""
    try:
        message_type = str(msg.messageType())
        cids = [_cid_value(cid) for cid in msg.correlationIds()]
        recap = int(msg.recapType()) if hasattr(msg, "recapType") else RECAPTYPE_NONE
        content = _message_content(msg)
    except Exception as exc:
        raise CodecError(f"cannot read message: {brief(exc, 100)}") from exc
    if not isinstance(content, dict):
        raise CodecError(f"message content is {type(content).__name__}, not a sequence")
    return MessageSnapshot(event_type, message_type, cids, content, recap)


def _cid_value(cid: Any) -> Any:
    # Ids the library generated (openService, session identity) can share an integer
    # value with the application's own; keep them apart.
    autogen = getattr(type(cid), "AUTOGEN_TYPE", None)
    if autogen is not None and cid.type() == autogen:
        return f"autogen:{cid.value()}"
    return cid.value()


def _message_content(msg: Any) -> Any:
    # Message.toPy() exists in newer blpapi releases; walk the Element tree otherwise.
    to_py = getattr(msg, "toPy", None)
    if callable(to_py):
        return to_py()
    return _element_to_py(msg.asElement())


def _element_to_py(element: Any) -> Any:
    if element.isComplexType() and not element.isArray():
        return {str(sub.name()): _element_to_py(sub) for sub in element.elements()}
    if element.isNull():
        return None
    if element.isArray():
        out: list[Any] = []
        for i in range(element.numValues()):
            value = element.getValue(i)
            out.append(_element_to_py(value) if hasattr(value, "isComplexType") else value)
        return out
    return element.getValue()


def _safe_str(obj: Any) -> str:
    try:
        return clip(str(obj))
    except Exception:
        return "<unprintable message>"


# ---------------------------------------------------------------- snapshots -> records


def decode_messages(
    snapshots: Iterable[MessageSnapshot],
    receive_ns: int,
    symbols_by_cid: Mapping[Any, str],
    provider: str = PROVIDER,
    quotes: QuoteCache | None = None,
) -> DecodedEvent:
    """Decode the messages of one event. Never raises: bad ones become ``DecodeError``s."""
    out = DecodedEvent()
    for snap in snapshots:
        if snap.event_type == "SUBSCRIPTION_DATA":
            if snap.message_type != MARKET_DATA_EVENTS:
                out.skipped += 1
                continue
            try:
                records = _decode_market_data(snap, receive_ns, symbols_by_cid, provider, quotes)
            except CodecError as exc:
                out.errors.append(DecodeError(str(exc), _snapshot_text(snap)))
                continue
            except Exception as exc:  # content from a library: a message loses only itself
                out.errors.append(unexpected(exc, _snapshot_text(snap)))
                continue
            if records:
                out.records.extend(records)
            else:
                out.skipped += 1
        elif snap.event_type == "TIMEOUT":
            out.skipped += 1
        else:
            try:
                out.statuses.append(_decode_status(snap, symbols_by_cid))
            except Exception as exc:  # as above
                out.errors.append(unexpected(exc, _snapshot_text(snap)))
    return out


def _snapshot_text(snap: MessageSnapshot) -> str:
    """A snapshot for an error report (clip writes datetimes and bounds deep content)."""
    return clip({"messageType": snap.message_type, "correlationIds": snap.correlation_ids,
                 "data": snap.elements})  # fmt: skip


def _symbol(snap: MessageSnapshot, symbols_by_cid: Mapping[Any, str]) -> str:
    for cid in snap.correlation_ids:
        try:
            symbol = symbols_by_cid.get(cid)
        except TypeError:  # an unhashable correlation value
            symbol = None
        if symbol:
            return symbol
    if snap.topic:
        return symbol_for_topic(snap.topic)
    if not snap.correlation_ids:
        raise CodecError("market data message without a correlation id")
    raise CodecError(f"unknown correlation id {brief(snap.correlation_ids[0])}")


def _number(elements: dict[str, Any], key: str, flags: list[str]) -> float | None:
    v = elements.get(key)
    if type(v) is float or type(v) is int:
        return v
    if QualityFlag.MISSING_FIELDS not in flags:
        flags.append(QualityFlag.MISSING_FIELDS)
    return None


def _optional_number(
    elements: dict[str, Any], key: str, flags: list[str] | None = None
) -> float | None:
    """A field Bloomberg may leave out of a tick; flagged only when present but wrong."""
    v = elements.get(key)
    if type(v) is float or type(v) is int:
        return v
    if v is not None and flags is not None and QualityFlag.MISSING_FIELDS not in flags:
        flags.append(QualityFlag.MISSING_FIELDS)
    return None


def _decode_market_data(
    snap: MessageSnapshot,
    receive_ns: int,
    symbols_by_cid: Mapping[Any, str],
    provider: str,
    quotes: QuoteCache | None,
) -> list[RawMarketData]:
    el = snap.elements
    if not isinstance(el, dict):
        raise CodecError(f"message content is {type(el).__name__}, not a sequence")
    symbol = _symbol(snap, symbols_by_cid)
    event_kind = el.get("MKTDATA_EVENT_TYPE")
    has_trade = "LAST_PRICE" in el or "SIZE_LAST_TRADE" in el
    has_quote = "BID" in el or "ASK" in el
    if event_kind == "TRADE":
        want_trade, want_quote = True, False
    elif event_kind == "QUOTE":
        want_trade, want_quote = False, True
    elif event_kind == "SUMMARY" or snap.recap_type != RECAPTYPE_NONE:
        # An initial paint or recap restates the last values; a repeated last trade is
        # not a new trade, so only the quote is taken from it.
        want_trade, want_quote = False, has_quote
    else:
        want_trade, want_quote = has_trade, has_quote
    if not (want_trade or want_quote):
        return []
    out: list[RawMarketData] = []
    if want_trade:
        flags: list[str] = []
        price = _number(el, "LAST_PRICE", flags)
        size = _optional_number(el, "SIZE_LAST_TRADE", flags)
        ts = _event_time(el, TRADE_TIME_FIELDS, receive_ns, flags)
        bid, ask = _optional_number(el, "BID"), _optional_number(el, "ASK")
        specific = _provider_specific(snap, _TRADE_MAPPED)
        trade = RawMarketData(
            symbol, provider, ts, DataType.TRADE, price, size, bid, ask,
            specific, None, "T." + symbol, False, receive_ns, flags,
        )  # fmt: skip
        out.append(trade)
    if want_quote:
        flags = []
        bid, ask = _optional_number(el, "BID", flags), _optional_number(el, "ASK", flags)
        quote_specific = _provider_specific(snap, _QUOTE_MAPPED)
        if quotes is not None:
            sides = quotes.sides.setdefault(symbol, [None, None])
            if bid is None and sides[0] is not None and "BID" not in el:
                bid = sides[0]
                quote_specific["carried"] = "BID"
            if ask is None and sides[1] is not None and "ASK" not in el:
                ask = sides[1]
                quote_specific["carried"] = "ASK"
            sides[0] = bid if bid is not None else sides[0]
            sides[1] = ask if ask is not None else sides[1]
        if (bid is None or ask is None) and QualityFlag.MISSING_FIELDS not in flags:
            flags.append(QualityFlag.MISSING_FIELDS)
        ts = _event_time(el, QUOTE_TIME_FIELDS, receive_ns, flags)
        quote = RawMarketData(
            symbol, provider, ts, DataType.QUOTE, None, None, bid, ask,
            quote_specific, None, "Q." + symbol, False, receive_ns, flags,
        )  # fmt: skip
        out.append(quote)
    return out


def _provider_specific(snap: MessageSnapshot, mapped: frozenset[str]) -> dict[str, Any]:
    specific = {k: _jsonable(v) for k, v in snap.elements.items() if k not in mapped}
    if snap.topic:
        specific["topic"] = snap.topic
    if snap.recap_type != RECAPTYPE_NONE:
        specific["recap_type"] = snap.recap_type
    return specific


def _jsonable(value: Any, depth: int = 0) -> Any:
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dict):
        if depth >= _MAX_DEPTH:
            return clip(value)
        return {as_text(k, "None"): _jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        if depth >= _MAX_DEPTH:
            return clip(value)
        return [_jsonable(v, depth + 1) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _event_time(
    elements: dict[str, Any], keys: tuple[str, ...], receive_ns: int, flags: list[str]
) -> int:
    """Provider event time in ns: the latest ``*_STAMP_RT``, else the first usable fallback
    (``EVENT_TIME``, ``TIME``), else the receive time, flagged ``missing_fields``."""
    stamps: list[int] = []
    fallback: int | None = None
    for key in keys:
        if key not in elements:
            continue
        ns = time_ns(elements[key], receive_ns)
        if ns is None:
            continue
        if key.endswith("_RT"):
            stamps.append(ns)
        elif fallback is None:
            fallback = ns
    if stamps:
        return max(stamps)
    if fallback is not None:
        return fallback
    if QualityFlag.MISSING_FIELDS not in flags:
        flags.append(QualityFlag.MISSING_FIELDS)
    return receive_ns


def time_ns(value: Any, receive_ns: int = 0) -> int | None:
    """A blpapi time value as int ns UTC, or None.

    Accepts ``datetime`` (naive is taken as UTC), a time of day (dated by ``receive_ns``,
    stepping back a day when that would put it in the future), ISO strings and the
    stand-in's tagged forms. Bloomberg datetimes on Server API follow the terminal's
    timezone setting; B-PIPE is expected to send UTC (not confirmed here).
    """
    if isinstance(value, dict) and len(value) == 1:
        value = _untag(value)
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            try:
                value = dt.time.fromisoformat(value)
            except ValueError:
                return None
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return (value - _EPOCH) // dt.timedelta(microseconds=1) * 1000
    if isinstance(value, dt.time):
        if receive_ns <= 0:
            return None
        day_start = receive_ns - receive_ns % _DAY_NS
        offset = (value.hour * 3600 + value.minute * 60 + value.second) * 1_000_000_000
        if value.tzinfo is not None:
            utc_offset = value.utcoffset() or dt.timedelta()
            offset -= utc_offset // dt.timedelta(microseconds=1) * 1000
        ns = day_start + offset + value.microsecond * 1000
        if ns - receive_ns > _DAY_NS // 2:
            ns -= _DAY_NS
        elif receive_ns - ns > _DAY_NS - _CLOCK_SKEW_NS:
            # Just after midnight by the provider's clock, just before it by ours.
            ns += _DAY_NS
        return ns
    return None


def _reason(value: Any) -> Reason | None:
    if isinstance(value, dict):
        code = value.get("errorCode")
        return Reason(
            as_text(value.get("source")),
            as_text(value.get("category")),
            as_text(value.get("subcategory")),
            as_text(value.get("description")),
            code if type(code) is int else None,
        )
    if isinstance(value, str) and value:
        return Reason(description=value)
    return None


def _decode_status(snap: MessageSnapshot, symbols_by_cid: Mapping[Any, str]) -> StatusMessage:
    el = snap.elements if isinstance(snap.elements, dict) else {}
    symbols: list[str] = []
    for cid in snap.correlation_ids:
        try:
            sym = symbols_by_cid.get(cid)
        except TypeError:
            sym = None
        if sym:
            symbols.append(sym)
    if not symbols and snap.topic:
        symbols.append(symbol_for_topic(snap.topic))
    details = {k: _jsonable(v) for k, v in el.items() if k != "reason"}
    return StatusMessage(
        snap.event_type, snap.message_type, symbols, list(snap.correlation_ids),
        _reason(el.get("reason")), details,
    )  # fmt: skip


def failure_kind(reason: Reason | None) -> str:
    """``"auth"``, ``"limit"`` or ``"other"`` for a failure reason.

    Bloomberg documents the reason's shape but not a closed list of categories, so this
    looks at the category and the description text.
    """
    if reason is None:
        return "other"
    category = reason.category.upper()
    text = f"{reason.category} {reason.subcategory} {reason.description}".lower()
    if category in {"NO_AUTH", "NOT_AUTHORIZED", "AUTHORIZATION_FAILURE", "UNAUTHORIZED"} or any(
        word in text for word in ("auth", "entitle", "permission")
    ):
        return "auth"
    if category == "LIMIT" or "limit" in text or "exceed" in text:
        return "limit"
    return "other"


# ---------------------------------------------------------------- the stand-in's line format


def _tag(value: Any) -> Any:
    # JSON has no datetime; tag them so a round trip gives back what toPy() gave.
    if isinstance(value, dt.datetime):
        return {"$datetime": value.isoformat()}
    if isinstance(value, dt.date):
        return {"$date": value.isoformat()}
    if isinstance(value, dt.time):
        return {"$time": value.isoformat()}
    if isinstance(value, dict):
        return {str(k): _tag(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_tag(v) for v in value]
    return value


def _untag(value: Any, depth: int = 0) -> Any:
    if depth >= _MAX_DEPTH:
        return value
    if isinstance(value, dict):
        if len(value) == 1:
            ((key, inner),) = value.items()
            if isinstance(inner, str):
                try:
                    if key == "$datetime":
                        return dt.datetime.fromisoformat(inner)
                    if key == "$date":
                        return dt.date.fromisoformat(inner)
                    if key == "$time":
                        return dt.time.fromisoformat(inner)
                except ValueError:
                    return inner
        return {k: _untag(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_untag(v, depth + 1) for v in value]
    return value


def _snapshot_dict(snap: MessageSnapshot) -> dict[str, Any]:
    out: dict[str, Any] = {
        "messageType": snap.message_type,
        "correlationIds": snap.correlation_ids,
        "data": _tag(snap.elements),
    }
    if snap.recap_type != RECAPTYPE_NONE:
        out["recapType"] = snap.recap_type
    if snap.topic:
        out["topic"] = snap.topic
    return out


def encode_event_line(
    event_type: str, messages: Iterable[MessageSnapshot], receive_ns: int | None = None
) -> bytes:
    """One event as a JSON line (server side of the stand-in, and capture dumps)."""
    body: dict[str, Any] = {
        "eventType": event_type,
        "messages": [_snapshot_dict(m) for m in messages],
    }
    if receive_ns is not None:
        body["receive_ns"] = receive_ns
    return orjson.dumps(body) + b"\n"


def decode_event_line(line: bytes | str) -> WireEvent | DecodeError:
    """Parse one event line. Never raises."""
    try:
        body = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        return DecodeError(f"invalid JSON: {exc}", clip(line))
    if not isinstance(body, dict):
        return DecodeError("event line is not a JSON object", clip(line))
    event_type = body.get("eventType")
    messages = body.get("messages")
    if not isinstance(event_type, str) or not isinstance(messages, list):
        return DecodeError("expected 'eventType' string and 'messages' array", clip(line))
    snaps: list[MessageSnapshot] = []
    for item in messages:
        if not isinstance(item, dict) or not isinstance(item.get("messageType"), str):
            return DecodeError("message without a 'messageType' string", clip(item))
        cids = item.get("correlationIds", [])
        data = item.get("data", {})
        recap = item.get("recapType", RECAPTYPE_NONE)
        topic = item.get("topic", "")
        snaps.append(
            MessageSnapshot(
                event_type,
                item["messageType"],
                cids if isinstance(cids, list) else [cids],
                # Keep a non-object payload as is: decoding reports it, not this parser.
                _untag(data) if isinstance(data, dict) else data,
                recap if type(recap) is int else RECAPTYPE_NONE,
                topic if isinstance(topic, str) else "",
            )
        )
    receive_ns = body.get("receive_ns", 0)
    return WireEvent(event_type, snaps, receive_ns if type(receive_ns) is int else 0)


def encode_request_line(op: str, **args: Any) -> bytes:
    return orjson.dumps({"op": op, **args}) + b"\n"


def decode_request_line(line: bytes | str) -> StandInRequest:
    """Parse one client request line. Raises ``CodecError``."""
    try:
        body = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise CodecError(f"invalid JSON: {exc}") from exc
    if not isinstance(body, dict) or not isinstance(body.get("op"), str):
        raise CodecError("expected an object with an 'op' string")
    op = body.pop("op")
    return StandInRequest(op, body)


def decode_capture(
    data: bytes, *, symbol: str | None = None
) -> Iterator[RawMarketData | CaptureError]:
    """Event lines as ``encode_event_line`` writes them (``feedfleet decode bloomberg``).

    ``symbol`` names the instrument for every correlation id in the file (real sessions
    carry no topic on their messages); otherwise each message's ``topic`` is used.
    """
    quotes = QuoteCache()
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        event = decode_event_line(line)
        if isinstance(event, DecodeError):
            yield CaptureError(f"line {lineno}", event.reason)
            continue
        symbols: dict[Any, str] = {}
        if symbol is not None:
            for snap in event.messages:
                for cid in snap.correlation_ids:
                    if isinstance(cid, int | str):
                        symbols[cid] = symbol
        decoded = decode_messages(event.messages, event.receive_ns, symbols, PROVIDER, quotes)
        for err in decoded.errors:
            yield CaptureError(f"line {lineno}", err.reason)
        yield from decoded.records


# ---------------------------------------------------------------- server side (stand-in)


def market_data_message(
    cid: Any, topic: str, elements: dict[str, Any], *, recap_type: int = RECAPTYPE_NONE
) -> MessageSnapshot:
    return MessageSnapshot("SUBSCRIPTION_DATA", MARKET_DATA_EVENTS, [cid], elements, recap_type,
                           topic)  # fmt: skip


def trade_elements(price: float, size: int, volume: int, stamp: dt.datetime) -> dict[str, Any]:
    return {
        "MKTDATA_EVENT_TYPE": "TRADE", "MKTDATA_EVENT_SUBTYPE": "NEW", "LAST_PRICE": price,
        "SIZE_LAST_TRADE": size, "VOLUME": volume, "TRADE_UPDATE_STAMP_RT": stamp,
    }  # fmt: skip


def quote_elements(
    bid: float, bid_size: int, ask: float, ask_size: int, stamp: dt.datetime
) -> dict[str, Any]:
    return {
        "MKTDATA_EVENT_TYPE": "QUOTE", "BID": bid, "BID_SIZE": bid_size, "ASK": ask,
        "ASK_SIZE": ask_size, "BID_UPDATE_STAMP_RT": stamp, "ASK_UPDATE_STAMP_RT": stamp,
    }  # fmt: skip


def reason_dict(category: str, description: str, *, source: str = "stand-in",
                error_code: int = -1, subcategory: str = "") -> dict[str, Any]:  # fmt: skip
    return {
        "source": source, "errorCode": error_code, "category": category,
        "description": description, "subcategory": subcategory,
    }  # fmt: skip


def status_message(
    event_type: str, message_type: str, elements: dict[str, Any] | None = None,
    cids: list[Any] | None = None,
) -> MessageSnapshot:  # fmt: skip
    return MessageSnapshot(event_type, message_type, list(cids or []), dict(elements or {}))
