"""Polygon.io (Massive) stocks WebSocket codec, sans-I/O.

Server frames are JSON arrays of objects dispatched on ``ev``; client frames are
``{"action": ..., "params": ...}``. See ``shared/protocols.md`` section 1. The adapter
(``workers/polygon.py``) and the simulator (``simulators/polygon.py``) both use this
module, so what one writes the other reads.

Field letters are reused across events (``c`` is conditions in T, condition in Q and
close in A/AM), so each event kind has its own decoder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
import orjson
from msgspec import UNSET, UnsetType

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

PROVIDER = "polygon"

# Channel prefix per data type the adapter can ask for.
CHANNEL_FOR_TYPE: dict[DataType, str] = {
    DataType.TRADE: "T",
    DataType.QUOTE: "Q",
    DataType.AGGREGATE: "AM",
}
DATA_EVENTS = frozenset({"T", "Q", "A", "AM"})
# Known event kinds that carry no tick we store (limit-up/down bands, imbalances, index
# values): counted as skipped, never as errors.
SKIPPED_EVENTS = frozenset({"LULD", "NOI", "V", "FMV", "LV"})

_MS = 1_000_000
# Provider fields kept in provider_specific.
_TRADE_EXTRA = ("x", "i", "z", "c", "trfi", "trft")
_QUOTE_EXTRA = ("bx", "bs", "ax", "as", "c", "i", "z")
_NUMBER = (int, float)


@dataclass(slots=True)
class StatusMessage:
    """``{"ev":"status","status":...,"message":...}``."""

    status: str
    message: str


@dataclass(slots=True)
class DecodedFrame:
    records: list[RawMarketData] = field(default_factory=list)
    statuses: list[StatusMessage] = field(default_factory=list)
    errors: list[DecodeError] = field(default_factory=list)
    skipped: int = 0


@dataclass(slots=True)
class ClientAction:
    """A client request as the server sees it."""

    action: str
    params: list[str]


# ---------------------------------------------------------------- client side


def encode_auth(api_key: str) -> str:
    return orjson.dumps({"action": "auth", "params": api_key}).decode()


def encode_subscribe(channels: Iterable[str]) -> str:
    return orjson.dumps({"action": "subscribe", "params": ",".join(channels)}).decode()


def encode_unsubscribe(channels: Iterable[str]) -> str:
    return orjson.dumps({"action": "unsubscribe", "params": ",".join(channels)}).decode()


def channels_for(symbol: str, data_types: Iterable[DataType]) -> list[str]:
    """``T.AAPL``-style channel names; data types Polygon has no channel for are ignored."""
    return [f"{CHANNEL_FOR_TYPE[t]}.{symbol}" for t in data_types if t in CHANNEL_FOR_TYPE]


# ---------------------------------------------------------------- the typed fast path
#
# A frame of well-formed trades, quotes and statuses (nearly every frame) is decoded by
# msgspec straight into these structs, with no dict per event: about twice as fast as
# parsing to dicts and picking fields. The types say exactly what the dict path accepts
# without an error: anything else (a bad or missing field, another event kind, a frame that
# is not an array) fails the typed decode, and the frame is decoded again by the dict path,
# which reports each bad element on its own. Both give the same records (a property test
# holds them to it).

# orjson, on the dict path, reads integers outside [-2**63, 2**64) as floats: the typed
# path leaves any integer outside 64 signed bits to it (msgspec's bounds stop there).
_Int = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
_Symbol = Annotated[str, msgspec.Meta(min_length=1)]
_Time = Annotated[int, msgspec.Meta(gt=0, le=2**63 - 1)]
_Number = _Int | float | None  # int stays int, as on the dict path
# The provider fields kept as they are: the shapes Polygon sends; any other goes by dicts.
_Extra = _Int | float | str | bool | None | list[_Int] | UnsetType


class _Trade(msgspec.Struct, tag_field="ev", tag="T", gc=False):
    sym: _Symbol
    t: _Time
    p: _Number = None
    s: _Number = None
    q: _Int | None = None
    x: _Extra = UNSET
    i: _Extra = UNSET
    z: _Extra = UNSET
    c: _Extra = UNSET
    trfi: _Extra = UNSET
    trft: _Extra = UNSET


class _Quote(msgspec.Struct, tag_field="ev", tag="Q", gc=False):
    sym: _Symbol
    t: _Time
    bp: _Number = None
    ap: _Number = None
    q: _Int | None = None
    bx: _Extra = UNSET
    bs: _Extra = UNSET
    ax: _Extra = UNSET
    as_: _Extra = msgspec.field(default=UNSET, name="as")
    c: _Extra = UNSET
    i: _Extra = UNSET
    z: _Extra = UNSET


class _Status(msgspec.Struct, tag_field="ev", tag="status", gc=False):
    status: str = ""
    message: str = ""


_typed_frame = msgspec.json.Decoder(list[_Trade | _Quote | _Status]).decode


def _decode_typed(items: list[_Trade | _Quote | _Status], out: DecodedFrame, provider: str,
                  receive_ns: int) -> None:  # fmt: skip
    records = out.records
    append = records.append
    trade, quote = DataType.TRADE, DataType.QUOTE
    missing = QualityFlag.MISSING_FIELDS
    for m in items:
        if type(m) is _Trade:
            # provider_specific in _TRADE_EXTRA's order, as the dict path makes it; spelled
            # out field by field, as a loop of getattr over (key, attribute) pairs costs
            # twice as much (1.06 against 0.45 us for a quote's seven)
            specific: dict[str, Any] = {}
            if m.x is not UNSET:
                specific["x"] = m.x
            if m.i is not UNSET:
                specific["i"] = m.i
            if m.z is not UNSET:
                specific["z"] = m.z
            if m.c is not UNSET:
                specific["c"] = m.c
            if m.trfi is not UNSET:
                specific["trfi"] = m.trfi
            if m.trft is not UNSET:
                specific["trft"] = m.trft
            price, size, sym = m.p, m.s, m.sym
            append(RawMarketData(
                sym, provider, m.t * _MS, trade, price, size, None, None, specific, m.q,
                "T." + sym, False, receive_ns,
                [missing] if price is None or size is None else [],
            ))  # fmt: skip
        elif type(m) is _Quote:
            specific = {}
            if m.bx is not UNSET:
                specific["bx"] = m.bx
            if m.bs is not UNSET:
                specific["bs"] = m.bs
            if m.ax is not UNSET:
                specific["ax"] = m.ax
            if m.as_ is not UNSET:
                specific["as"] = m.as_
            if m.c is not UNSET:
                specific["c"] = m.c
            if m.i is not UNSET:
                specific["i"] = m.i
            if m.z is not UNSET:
                specific["z"] = m.z
            bid, ask, sym = m.bp, m.ap, m.sym
            append(RawMarketData(
                sym, provider, m.t * _MS, quote, None, None, bid, ask, specific, m.q,
                "Q." + sym, False, receive_ns,
                [missing] if bid is None or ask is None else [],
            ))  # fmt: skip
        else:
            assert type(m) is _Status
            out.statuses.append(StatusMessage(m.status, m.message))


def decode_frame(data: bytes | str, receive_ns: int, provider: str = PROVIDER) -> DecodedFrame:
    """Decode one server frame. Never raises: bad parts become ``DecodeError`` entries."""
    out = DecodedFrame()
    try:
        typed = _typed_frame(data)
    except Exception:
        # Something the dict path must look at element by element (msgspec says so with
        # ValidationError or DecodeError; anything else it raises on untrusted input is
        # left to the dict path too, which never raises: no frame is lost to it).
        pass
    else:
        _decode_typed(typed, out, provider, receive_ns)
        return out
    return decode_frame_untyped(data, receive_ns, provider)


def decode_frame_untyped(
    data: bytes | str, receive_ns: int, provider: str = PROVIDER
) -> DecodedFrame:
    """``decode_frame`` by way of dicts, element by element: for frames the typed path
    refuses, so that each bad element loses only itself, with its reason."""
    out = DecodedFrame()
    try:
        items = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        out.errors.append(DecodeError(f"invalid JSON: {exc}", clip(data)))
        return out
    if not isinstance(items, list):
        out.errors.append(DecodeError("frame is not a JSON array", clip(data)))
        return out
    records = out.records
    for item in items:
        if not isinstance(item, dict):
            out.errors.append(DecodeError("array element is not an object", clip(item)))
            continue
        ev = item.get("ev")
        if type(ev) is not str:
            # Checked first: an object or array here is unhashable for the lookups below.
            out.errors.append(DecodeError(f"unknown event type {brief(ev)}", clip(item)))
            continue
        decoder = _DECODERS.get(ev)
        if decoder is not None:
            try:
                records.append(decoder(item, provider, receive_ns))
            except CodecError as exc:
                out.errors.append(DecodeError(str(exc), clip(item)))
            except Exception as exc:  # untrusted JSON: an element loses only itself
                out.errors.append(unexpected(exc, item))
        elif ev == "status":
            out.statuses.append(
                StatusMessage(as_text(item.get("status")), as_text(item.get("message")))
            )
        elif ev in SKIPPED_EVENTS:
            out.skipped += 1
        else:
            out.errors.append(DecodeError(f"unknown event type {brief(ev)}", clip(item)))
    return out


def decode_capture(
    data: bytes, *, symbol: str | None = None
) -> Iterator[RawMarketData | CaptureError]:
    """A capture of server frames, one per line (``feedfleet decode polygon``)."""
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        frame = decode_frame(line, 0)
        for err in frame.errors:
            yield CaptureError(f"line {lineno}", err.reason)
        yield from frame.records


def _symbol(item: dict[str, Any]) -> str:
    sym = item.get("sym")
    if type(sym) is not str or not sym:
        raise CodecError("missing or empty 'sym'")
    return sym


def _time_ms(item: dict[str, Any], key: str) -> int:
    t = item.get(key)
    if type(t) is not int or t <= 0:
        raise CodecError(f"missing or invalid timestamp {key!r}")
    return t * _MS


def _number(item: dict[str, Any], key: str, flags: list[str]) -> float | None:
    v: Any = item.get(key)
    if type(v) in _NUMBER:
        return v
    if QualityFlag.MISSING_FIELDS not in flags:
        flags.append(QualityFlag.MISSING_FIELDS)
    return None


def _sequence(item: dict[str, Any]) -> int | None:
    q = item.get("q")
    return q if type(q) is int else None


def _decode_trade(item: dict[str, Any], provider: str, receive_ns: int) -> RawMarketData:
    sym = _symbol(item)
    flags: list[str] = []
    price = _number(item, "p", flags)
    size = _number(item, "s", flags)
    specific = {k: item[k] for k in _TRADE_EXTRA if k in item}
    return RawMarketData(
        sym, provider, _time_ms(item, "t"), DataType.TRADE, price, size, None, None,
        specific, _sequence(item), "T." + sym, False, receive_ns, flags,
    )  # fmt: skip


def _decode_quote(item: dict[str, Any], provider: str, receive_ns: int) -> RawMarketData:
    sym = _symbol(item)
    flags: list[str] = []
    bid = _number(item, "bp", flags)
    ask = _number(item, "ap", flags)
    specific = {k: item[k] for k in _QUOTE_EXTRA if k in item}
    return RawMarketData(
        sym, provider, _time_ms(item, "t"), DataType.QUOTE, None, None, bid, ask,
        specific, _sequence(item), "Q." + sym, False, receive_ns, flags,
    )  # fmt: skip


def _decode_aggregate(item: dict[str, Any], provider: str, receive_ns: int) -> RawMarketData:
    sym = _symbol(item)
    flags: list[str] = []
    close = _number(item, "c", flags)
    volume = _number(item, "v", flags)
    keys = ("o", "h", "l", "c", "vw", "av", "op", "a", "z", "s", "e", "otc")
    specific = {k: item[k] for k in keys if k in item}
    specific["ev"] = item["ev"]
    # Bars carry no sequence; the window start identifies one per symbol and channel.
    return RawMarketData(
        sym, provider, _time_ms(item, "s"), DataType.AGGREGATE, close, volume, None, None,
        specific, None, item["ev"] + "." + sym, False, receive_ns, flags,
    )  # fmt: skip


_DECODERS: dict[str, Callable[[dict[str, Any], str, int], RawMarketData]] = {
    "T": _decode_trade,
    "Q": _decode_quote,
    "A": _decode_aggregate,
    "AM": _decode_aggregate,
}


# ---------------------------------------------------------------- server side


def decode_client_action(data: bytes | str) -> ClientAction:
    """Parse ``{"action": "subscribe", "params": "T.AAPL,Q.*"}``. Raises ``CodecError``."""
    try:
        msg = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise CodecError(f"invalid JSON: {exc}") from exc
    if not isinstance(msg, dict) or not isinstance(msg.get("action"), str):
        raise CodecError("expected an object with an 'action' string")
    params = msg.get("params", "")
    if not isinstance(params, str):
        raise CodecError("'params' must be a string")
    action = msg["action"]
    if action == "auth":
        return ClientAction(action, [params])
    return ClientAction(action, [p.strip() for p in params.split(",") if p.strip()])


def split_channel(channel: str) -> tuple[str, str]:
    """``"T.BRK.A"`` -> ``("T", "BRK.A")``: split on the first dot only, as the client does."""
    ev, _, symbol = channel.partition(".")
    if not ev or not symbol:
        raise CodecError(f"bad channel {channel!r}")
    return ev, symbol


def encode_status(status: str, message: str) -> str:
    return orjson.dumps([{"ev": "status", "status": status, "message": message}]).decode()


def encode_events(events: list[dict[str, Any]]) -> bytes:
    return orjson.dumps(events)


# ---------------------------------------------------------------- REST: v3 trades


@dataclass(slots=True)
class TradesPage:
    """One page of ``GET /v3/trades/{ticker}``: its trades as records, and the next page."""

    records: list[RawMarketData] = field(default_factory=list)
    next_url: str | None = None
    errors: list[DecodeError] = field(default_factory=list)


_REST_TRADE_EXTRA = {"exchange": "x", "id": "i", "tape": "z", "conditions": "c"}


def trades_path(symbol: str) -> str:
    return f"/v3/trades/{symbol}"


def decode_trades_page(
    body: bytes, symbol: str, receive_ns: int, provider: str = PROVIDER
) -> TradesPage:
    """REST trades as the records the WebSocket gives for the same trades: the SIP time cut
    to the millisecond (the WebSocket's ``t``), the same stream, sequence and extras under
    the WebSocket's keys, so each gets the same event id as if it had come live. Flagged
    ``backfill``."""
    page = TradesPage()
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        page.errors.append(DecodeError(f"invalid JSON: {exc}", clip(body)))
        return page
    results = doc.get("results") if isinstance(doc, dict) else None
    if not isinstance(results, list):
        if isinstance(doc, dict) and doc.get("status") == "OK" and "results" not in doc:
            return page  # no trades in the range
        page.errors.append(DecodeError("trades response without a results list", clip(body)))
        return page
    next_url = doc.get("next_url")
    page.next_url = next_url if isinstance(next_url, str) and next_url else None
    for item in results:
        if not isinstance(item, dict):
            page.errors.append(DecodeError("trade is not an object", clip(item)))
            continue
        sip = item.get("sip_timestamp")
        if type(sip) is not int or sip <= 0:
            page.errors.append(DecodeError("trade without a valid sip_timestamp", clip(item)))
            continue
        flags: list[str] = [QualityFlag.BACKFILL]
        price = _number(item, "price", flags)
        size = _number(item, "size", flags)
        seq = item.get("sequence_number")
        specific = {ws: item[rest] for rest, ws in _REST_TRADE_EXTRA.items() if rest in item}
        page.records.append(RawMarketData(
            symbol, provider, sip - sip % _MS, DataType.TRADE, price, size, None, None,
            specific, seq if type(seq) is int else None, "T." + symbol, False, receive_ns,
            flags,
        ))  # fmt: skip
    return page


def rest_trade(event: dict[str, Any]) -> dict[str, Any]:
    """A WebSocket trade event as ``/v3/trades`` lists it (the simulator's tape)."""
    item = {rest: event[ws] for rest, ws in _REST_TRADE_EXTRA.items() if ws in event}
    item.update(
        price=event["p"], size=event["s"], sequence_number=event["q"],
        sip_timestamp=event["t"] * _MS, participant_timestamp=event["t"] * _MS,
    )  # fmt: skip
    return item


def encode_trades_page(trades: list[dict[str, Any]], next_url: str | None) -> bytes:
    doc: dict[str, Any] = {"results": trades, "status": "OK", "request_id": "feedfleet-sim"}
    if next_url:
        doc["next_url"] = next_url
    return orjson.dumps(doc)


def trade_event(
    sym: str, price: float, size: int, t_ms: int, seq: int, *, exchange: int = 4,
    trade_id: str = "1", tape: int = 3, conditions: list[int] | None = None,
) -> dict[str, Any]:  # fmt: skip
    event: dict[str, Any] = {
        "ev": "T", "sym": sym, "i": trade_id, "x": exchange, "p": price, "s": size,
        "t": t_ms, "q": seq, "z": tape,
    }  # fmt: skip
    if conditions:  # Polygon omits "c" when a trade has no conditions
        event["c"] = conditions
    return event


def quote_event(
    sym: str, bid: float, bid_lots: int, ask: float, ask_lots: int, t_ms: int, seq: int,
    *, bid_exchange: int = 4, ask_exchange: int = 7, tape: int = 3,
) -> dict[str, Any]:  # fmt: skip
    return {
        "ev": "Q", "sym": sym, "bx": bid_exchange, "bp": bid, "bs": bid_lots,
        "ax": ask_exchange, "ap": ask, "as": ask_lots, "c": 0, "i": [], "t": t_ms,
        "q": seq, "z": tape,
    }  # fmt: skip


def aggregate_event(
    ev: str, sym: str, o: float, h: float, lo: float, c: float, v: int, start_ms: int,
    end_ms: int, *, accumulated: int = 0, vwap: float | None = None,
) -> dict[str, Any]:  # fmt: skip
    return {
        "ev": ev, "sym": sym, "v": v, "av": accumulated, "op": o, "vw": vwap or c,
        "o": o, "c": c, "h": h, "l": lo, "a": vwap or c, "z": max(1, v // 100),
        "s": start_ms, "e": end_ms,
    }  # fmt: skip
