"""LSEG / Refinitiv Real-Time WebSocket API codec (subprotocol ``tr_json2``), sans-I/O.

Client requests are single JSON objects; server frames are JSON arrays of messages
dispatched on ``Type`` (``Refresh``, ``Update``, ``Status``, ``Ping``, ``Pong``, ``Error``).
See ``shared/protocols.md`` section 4. The adapter (``workers/refinitiv.py``) uses
:class:`ConsumerProtocol`; the simulator (``simulators/refinitiv.py``) uses the server-side
functions at the bottom, so what one writes the other reads.

Records
  An Update holds only the fields that changed, so the consumer keeps the last BID, ASK,
  BIDSIZE and ASKSIZE of each item stream and a QUOTE record is that cache after the
  update. A message with any of those four fields yields a QUOTE; a message with a numeric
  ``TRDPRC_1`` yields a TRADE (price ``TRDPRC_1``, volume ``TRDVOL_1``); an Update carrying
  both (``UpdateType`` ``QuotesTrade`` or ``Multiple``) yields both. A Refresh is an image,
  not an event: it yields the QUOTE it describes, but its ``TRDPRC_1`` is the last trade
  already printed (often minutes old, and repeated on every reconnect), so it is not a
  TRADE. Odd-lot and irregular trades update ``ODD_PRC``/``IRGPRC`` but not ``TRDPRC_1``
  (the real capture's Trade update) and yield nothing; such messages count as skipped.

Timestamps
  No message carries a full event time. The time of day comes from the message's own
  fields: for a trade ``TRDTIM_MS`` (ms since midnight UTC, time of the ``TRDPRC_1`` trade),
  else ``SALTIM_MS`` (last sale of any kind), else the second-resolution strings
  ``TRDTIM_1`` / ``SALTIM``; for a quote ``QUOTIM_MS``, else ``QUOTIM``. ``*_MS`` fields are
  ints, but some arrive as ``"19:01:52.565"`` strings, so both forms are read. The date is
  the message's ``TRADE_DATE`` / ``QUOTE_DATE`` when present (Refreshes carry them);
  otherwise the UTC day that puts the time nearest the receive time (so a tick stamped
  23:59:59.900 read at 00:00:00.100 lands on the previous day); when there is no receive
  time (capture decoding) the date last seen on that item stream. A message with no time
  field is stamped with its receive time and flagged ``missing_fields``; so is a record
  when no date can be found at all (the pipeline then puts the receive time in place of a
  time of day on 1970-01-01, see ``common.quality``).

Sequences
  ``SeqNumber`` is the provider sequence. It is not contiguous (the real capture steps by
  16), so ``sequence_contiguous`` is False: a jump cannot be called a gap, but duplicates
  and reordering are still detected. Streams are ``T.<RIC>`` and ``Q.<RIC>`` because a
  QuotesTrade update gives both records the same number.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any

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

PROVIDER = "refinitiv"
SUBPROTOCOL = "tr_json2"
LOGIN_ID = 1
DEFAULT_APP_ID = "256"
DEFAULT_PING_TIMEOUT_S = 30.0

QUOTE_FIELDS = ("BID", "ASK", "BIDSIZE", "ASKSIZE")
TRADE_FIELDS = ("TRDPRC_1", "TRDVOL_1")
# Fields a View must include for the records to carry provider times and sequences.
QUOTE_VIEW = (*QUOTE_FIELDS, "QUOTIM_MS", "QUOTIM", "QUOTE_DATE", "SEQNUM_QT")
TRADE_VIEW = (*TRADE_FIELDS, "TRDTIM_MS", "SALTIM_MS", "TRDTIM_1", "TRADE_DATE", "SEQNUM")
TRADE_TIME_FIELDS = ("TRDTIM_MS", "SALTIM_MS", "TRDTIM_1", "SALTIM")
QUOTE_TIME_FIELDS = ("QUOTIM_MS", "QUOTIM")
# Extra provider fields copied to provider_specific when present.
TRADE_EXTRAS = (*TRADE_TIME_FIELDS, "TRADE_DATE", "SEQNUM", "ACVOL_1", "VWAP", "TRD_STATUS")
QUOTE_EXTRAS = ("BIDSIZE", "ASKSIZE", *QUOTE_TIME_FIELDS, "QUOTE_DATE", "SEQNUM_QT")

# State.Code values that mean "too much" rather than "not allowed"; the adapter maps them to
# ProviderRateLimited. TooManyItems is the item-count limit (the closest thing the protocol
# has to a rate limit); the other two are the login-count limits.
RATE_LIMIT_CODES = frozenset({"TooManyItems", "MaxLoginsReached", "ExceededMaxMountsPerUser"})

_NS_PER_MS = 1_000_000
_NS_PER_S = 1_000_000_000
_DAY_NS = 86_400 * _NS_PER_S
_HALF_DAY_NS = _DAY_NS // 2
_NUMBER = (int, float)
_EPOCH_DAY = date(1970, 1, 1)


# ---------------------------------------------------------------- events


@dataclass(slots=True)
class State:
    """A message's ``State``: stream state, data state, code and text."""

    stream: str = ""
    data: str = ""
    code: str = ""
    text: str = ""

    @property
    def open(self) -> bool:
        return self.stream in ("Open", "NonStreaming")


@dataclass(slots=True)
class LoginEvent:
    """A Login-domain Refresh or Status. ``accepted`` when the login stream is open."""

    msg_type: str
    state: State
    ping_timeout_s: float | None = None
    elements: dict[str, Any] = field(default_factory=dict)

    @property
    def accepted(self) -> bool:
        """A Login Refresh on an open stream (Data may be Suspect: the login still stands)."""
        return self.msg_type == "Refresh" and self.state.stream == "Open"

    @property
    def closed(self) -> bool:
        """The server ended (or refused) the login: any stream state other than Open."""
        return self.state.stream != "Open"


@dataclass(slots=True)
class ItemStatus:
    """A Status on an item stream (or a batch request's summary on the batch ID)."""

    stream_id: int
    name: str | None
    state: State


@dataclass(slots=True)
class ServerError:
    """``{"Type":"Error"}``: the server could not parse one of our requests."""

    stream_id: int | None
    text: str


@dataclass(slots=True)
class DecodedFrame:
    records: list[RawMarketData] = field(default_factory=list)
    logins: list[LoginEvent] = field(default_factory=list)
    statuses: list[ItemStatus] = field(default_factory=list)
    server_errors: list[ServerError] = field(default_factory=list)
    errors: list[DecodeError] = field(default_factory=list)
    pings: int = 0
    pongs: int = 0
    skipped: int = 0


# ---------------------------------------------------------------- client requests


def encode_login(
    user: str | None,
    *,
    app_id: str = DEFAULT_APP_ID,
    position: str = "127.0.0.1",
    token: str | None = None,
) -> str:
    """The Login request (ID 1, streaming). With ``token`` the AuthnToken variant."""
    elements = {"ApplicationId": app_id, "Position": position}
    key: dict[str, Any]
    if token is not None:
        elements["AuthenticationToken"] = token
        key = {"NameType": "AuthnToken", "Elements": elements}
    else:
        key = {"Name": user or "", "Elements": elements}
    return orjson.dumps({"ID": LOGIN_ID, "Domain": "Login", "Key": key}).decode()


def encode_item_request(
    stream_id: int,
    names: str | Sequence[str],
    *,
    view: Sequence[str] | None = None,
    service: str | int | None = None,
    streaming: bool = True,
) -> str:
    """A MarketPrice request; a list of names makes it a batch (items get IDs after it)."""
    key: dict[str, Any] = {"Name": names if isinstance(names, str) else list(names)}
    if service is not None:
        key["Service"] = service
    msg: dict[str, Any] = {"ID": stream_id, "Key": key}
    if view:
        msg["View"] = list(view)
    if not streaming:
        msg["Streaming"] = False
    return orjson.dumps(msg).decode()


def encode_close(stream_id: int | Sequence[int], domain: str | None = None) -> str:
    msg: dict[str, Any] = {"ID": stream_id if isinstance(stream_id, int) else list(stream_id)}
    if domain is not None:
        msg["Domain"] = domain
    msg["Type"] = "Close"
    return orjson.dumps(msg).decode()


def encode_login_close() -> str:
    return encode_close(LOGIN_ID, "Login")


def encode_ping() -> str:
    return '{"Type":"Ping"}'


def encode_pong() -> str:
    return '{"Type":"Pong"}'


# ---------------------------------------------------------------- client decoding


@dataclass(slots=True)
class _ItemCache:
    """What an item stream's Updates are applied to."""

    name: str
    quote: dict[str, Any] = field(default_factory=dict)
    trade_date: int | None = None  # ns at UTC midnight
    quote_date: int | None = None


class ConsumerProtocol:
    """The consumer side of one connection: stream IDs, item caches, frame decoding.

    Holds no socket and reads no clock. ``item_requests`` allocates stream IDs (the login
    has ID 1; a batch request at ID n has its k items streamed on n+1..n+k);
    ``decode`` turns a server frame into records and events.
    """

    def __init__(self, provider: str = PROVIDER, default_symbol: str | None = None) -> None:
        self.provider = provider
        self.default_symbol = default_symbol
        self.items: dict[int, _ItemCache] = {}
        self.ids_by_name: dict[str, int] = {}
        self.next_id = LOGIN_ID + 1

    def reset(self) -> None:
        """Forget every stream (a new connection starts from ID 2)."""
        self.items.clear()
        self.ids_by_name.clear()
        self.next_id = LOGIN_ID + 1

    # -- requests

    def item_requests(
        self,
        names: Sequence[str],
        *,
        view: Sequence[str] | None = None,
        service: str | int | None = None,
        batch_size: int = 500,
    ) -> list[str]:
        """Requests opening ``names``; names already open are left alone."""
        wanted = [n for n in dict.fromkeys(names) if n not in self.ids_by_name]
        out: list[str] = []
        for start in range(0, len(wanted), batch_size):
            chunk = wanted[start : start + batch_size]
            request_id = self.next_id
            if len(chunk) == 1:
                self._open(request_id, chunk[0])
                out.append(encode_item_request(request_id, chunk[0], view=view, service=service))
                self.next_id += 1
                continue
            # The server streams batch items on the IDs after the request's, in order; a
            # Refresh's Key.Name corrects the table if a server numbers them otherwise.
            for offset, name in enumerate(chunk, 1):
                self._open(request_id + offset, name)
            out.append(encode_item_request(request_id, chunk, view=view, service=service))
            self.next_id += len(chunk) + 1
        return out

    def close_requests(self, names: Iterable[str]) -> list[str]:
        """One Close per open item (the spec confirms the reply-less single-item form)."""
        out: list[str] = []
        for name in names:
            stream_id = self.ids_by_name.pop(name, None)
            if stream_id is not None:
                self.items.pop(stream_id, None)
                out.append(encode_close(stream_id))
        return out

    def _open(self, stream_id: int, name: str) -> None:
        self.items[stream_id] = _ItemCache(name)
        self.ids_by_name[name] = stream_id

    def _forget(self, stream_id: int) -> None:
        item = self.items.pop(stream_id, None)
        if item is not None and self.ids_by_name.get(item.name) == stream_id:
            del self.ids_by_name[item.name]

    # -- responses

    def decode(self, data: bytes | str, receive_ns: int) -> DecodedFrame:
        """Decode one server frame. Never raises: bad parts become ``DecodeError`` entries."""
        out = DecodedFrame()
        try:
            messages = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            out.errors.append(DecodeError(f"invalid JSON: {exc}", clip(data)))
            return out
        if isinstance(messages, dict):  # the spec's own Ping example is a bare object
            messages = [messages]
        if not isinstance(messages, list):
            out.errors.append(DecodeError("frame is not a JSON array", clip(data)))
            return out
        for msg in messages:
            if not isinstance(msg, dict):
                out.errors.append(DecodeError("array element is not an object", clip(msg)))
                continue
            try:
                self._decode_message(msg, receive_ns, out)
            except CodecError as exc:
                out.errors.append(DecodeError(str(exc), clip(msg)))
            except Exception as exc:  # untrusted JSON: a message loses only itself
                out.errors.append(unexpected(exc, msg))
        return out

    def _decode_message(self, msg: dict[str, Any], receive_ns: int, out: DecodedFrame) -> None:
        kind = msg.get("Type")
        if kind == "Ping":
            out.pings += 1
            return
        if kind == "Pong":
            out.pongs += 1
            return
        if kind == "Error":
            raw_id = msg.get("ID")
            out.server_errors.append(
                ServerError(raw_id if type(raw_id) is int else None, as_text(msg.get("Text")))
            )
            return
        if kind not in ("Refresh", "Update", "Status"):
            raise CodecError(f"unknown message Type {brief(kind)}")
        domain = msg.get("Domain", "MarketPrice")
        if kind == "Status" and not isinstance(msg.get("State"), dict):
            # A Status without State leaves the stream as it was (the spec: State is
            # optional on a Status, absent meaning no change), login stream included.
            out.skipped += 1
            return
        if domain == "Login":
            out.logins.append(_login_event(kind, msg))
            return
        stream_id = msg.get("ID")
        if type(stream_id) is not int:
            raise CodecError("missing or non-integer 'ID'")
        if domain != "MarketPrice":
            out.skipped += 1
            return
        item = self._item_for(stream_id, msg)
        if kind == "Status":
            state = _state(msg)
            out.statuses.append(ItemStatus(stream_id, item.name if item else None, state))
            if item is not None and not state.open:
                self._forget(stream_id)
            return
        if item is None:
            raise CodecError(f"{kind} on unknown stream {stream_id} without Key.Name")
        fields = msg.get("Fields", {})
        if not isinstance(fields, dict):
            raise CodecError("'Fields' is not an object")
        before = len(out.records)
        self._records(kind, msg, fields, item, receive_ns, out.records)
        if len(out.records) == before:
            out.skipped += 1
        if kind == "Refresh" and "State" in msg and not _state(msg).open:
            self._forget(stream_id)

    def _item_for(self, stream_id: int, msg: dict[str, Any]) -> _ItemCache | None:
        key = msg.get("Key")
        name = key.get("Name") if isinstance(key, dict) else None
        item = self.items.get(stream_id)
        if type(name) is str and name:
            if item is None or item.name != name:
                if item is not None:
                    self._forget(stream_id)
                self._open(stream_id, name)
                item = self.items[stream_id]
        elif item is None and self.default_symbol:
            self._open(stream_id, self.default_symbol)
            item = self.items[stream_id]
        return item

    def _records(
        self,
        kind: str,
        msg: dict[str, Any],
        fields: dict[str, Any],
        item: _ItemCache,
        receive_ns: int,
        records: list[RawMarketData],
    ) -> None:
        seq = msg.get("SeqNumber")
        sequence = seq if type(seq) is int else None
        common: dict[str, Any] = {"ID": msg["ID"], "Type": kind}
        if "UpdateType" in msg:
            common["UpdateType"] = msg["UpdateType"]
        trade_date = _date_ns(fields.get("TRADE_DATE"))
        quote_date = _date_ns(fields.get("QUOTE_DATE"))
        if trade_date is not None:
            item.trade_date = trade_date
        if quote_date is not None:
            item.quote_date = quote_date
        if kind == "Refresh" and msg.get("ClearCache") is not False:
            item.quote = {}  # an image replaces what earlier messages left
        cache = item.quote
        has_quote = False
        for name in QUOTE_FIELDS:
            if name in fields:
                cache[name] = fields[name]
                has_quote = True
        trade_price = fields.get("TRDPRC_1")
        if kind == "Update" and "TRDPRC_1" in fields and trade_price is not None:
            flags: list[str] = []
            price = _number(trade_price, flags)
            volume = _number(fields.get("TRDVOL_1"), flags)
            ts = self._timestamp(fields, TRADE_TIME_FIELDS, trade_date, item.trade_date,
                                 receive_ns, flags)  # fmt: skip
            specific = {**common, **{k: fields[k] for k in TRADE_EXTRAS if k in fields}}
            records.append(RawMarketData(
                item.name, self.provider, ts, DataType.TRADE, price, volume, None, None,
                specific, sequence, "T." + item.name, False, receive_ns, flags,
            ))  # fmt: skip
        if has_quote:
            flags = []
            bid = _number(cache.get("BID"), flags)
            ask = _number(cache.get("ASK"), flags)
            ts = self._timestamp(fields, QUOTE_TIME_FIELDS, quote_date, item.quote_date,
                                 receive_ns, flags)  # fmt: skip
            specific = {**common, **{k: fields[k] for k in QUOTE_EXTRAS if k in fields}}
            for size in ("BIDSIZE", "ASKSIZE"):
                if size in cache:
                    specific[size] = cache[size]
            records.append(RawMarketData(
                item.name, self.provider, ts, DataType.QUOTE, None, None, bid, ask,
                specific, sequence, "Q." + item.name, False, receive_ns, flags,
            ))  # fmt: skip

    @staticmethod
    def _timestamp(
        fields: dict[str, Any],
        time_fields: tuple[str, ...],
        message_date: int | None,
        stream_date: int | None,
        receive_ns: int,
        flags: list[str],
    ) -> int:
        tod: int | None = None
        for name in time_fields:
            tod = time_of_day_ns(fields.get(name))
            if tod is not None:
                break
        if tod is None:
            # The provider gave no time: the receive time stands in, and says so.
            if QualityFlag.MISSING_FIELDS not in flags:
                flags.append(QualityFlag.MISSING_FIELDS)
            return receive_ns
        if message_date is not None:
            return message_date + tod
        if receive_ns > 0:
            return nearest_day(tod, receive_ns)
        if stream_date is not None:
            return stream_date + tod
        flags.append(QualityFlag.MISSING_FIELDS)
        return tod


def _login_event(kind: str, msg: dict[str, Any]) -> LoginEvent:
    elements = msg.get("Elements")
    elements = elements if isinstance(elements, dict) else {}
    ping = elements.get("PingTimeout")
    ping_s = float(ping) if isinstance(ping, int | float) and ping > 0 else None
    return LoginEvent(kind, _state(msg), ping_s, elements)


def _state(msg: dict[str, Any]) -> State:
    raw = msg.get("State")
    if not isinstance(raw, dict):
        # A Refresh without State is an open, ok stream (the spec's defaults); an Update
        # carries no state. (A Status without State never gets here: it changes nothing.)
        return State("Open", "Ok") if msg.get("Type") == "Refresh" else State()
    return State(
        as_text(raw.get("Stream")),
        as_text(raw.get("Data")),
        as_text(raw.get("Code")),
        as_text(raw.get("Text")),
    )


def _number(value: Any, flags: list[str]) -> float | None:
    if type(value) in _NUMBER:
        return float(value)
    if QualityFlag.MISSING_FIELDS not in flags:
        flags.append(QualityFlag.MISSING_FIELDS)
    return None


def time_of_day_ns(value: Any) -> int | None:
    """``68520061`` (ms since midnight) or ``"19:02:00"`` / ``"19:01:52.565"`` -> ns."""
    if type(value) is int:
        return value * _NS_PER_MS if 0 <= value < 86_400_000 else None
    # ASCII only: str.isdigit also passes "²", which int() refuses.
    if type(value) is not str or not value.isascii():
        return None
    hms, _, frac = value.strip().partition(".")
    parts = hms.split(":")
    # "HH:MM:SS" is 8 characters; a longer digit run is no time (and int() raises past 4300).
    if len(hms) > 8 or len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    if frac and not frac.isdigit():
        return None
    h, m, s = (int(p) for p in parts)
    if h > 23 or m > 59 or s > 60:
        return None
    frac_ns = int((frac + "000000000")[:9]) if frac else 0
    return (h * 3600 + m * 60 + s) * _NS_PER_S + frac_ns


def _date_ns(value: Any) -> int | None:
    """``"2017-11-29"`` -> ns at that UTC midnight."""
    if type(value) is not str or len(value) != 10:
        return None
    try:
        day = date.fromisoformat(value)
    except ValueError:
        return None
    return (day - _EPOCH_DAY).days * _DAY_NS


def nearest_day(tod_ns: int, receive_ns: int) -> int:
    """The time ``tod_ns`` after a UTC midnight, on the day nearest ``receive_ns``."""
    ts = receive_ns - receive_ns % _DAY_NS + tod_ns
    if ts - receive_ns > _HALF_DAY_NS:
        ts -= _DAY_NS
    elif receive_ns - ts > _HALF_DAY_NS:
        ts += _DAY_NS
    return ts


def decode_capture(
    data: bytes, *, symbol: str | None = None
) -> Iterator[RawMarketData | CaptureError]:
    """A capture of server frames, one per line (``feedfleet decode refinitiv``).

    ``symbol`` names the item of messages that carry neither a known ID nor ``Key.Name``.
    """
    consumer = ConsumerProtocol(default_symbol=symbol)
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        frame = consumer.decode(line, 0)
        for err in frame.errors:
            yield CaptureError(f"line {lineno}", err.reason)
        yield from frame.records


# ---------------------------------------------------------------- server side


@dataclass(slots=True)
class ClientRequest:
    """A client message as the server sees it. ``kind`` is ``Request`` when Type is absent."""

    kind: str
    ids: list[int]
    domain: str = "MarketPrice"
    names: list[str] = field(default_factory=list)
    batch: bool = False
    view: list[str] | None = None
    streaming: bool = True
    name_type: str | None = None
    elements: dict[str, Any] = field(default_factory=dict)
    service: str | int | None = None


def decode_requests(data: bytes | str) -> list[ClientRequest]:
    """Parse one client frame (an object, or a packed array). Raises ``CodecError``."""
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise CodecError(f"invalid JSON: {exc}") from exc
    messages = raw if isinstance(raw, list) else [raw]
    return [_client_request(m) for m in messages]


def _client_request(msg: Any) -> ClientRequest:
    if not isinstance(msg, dict):
        raise CodecError("request is not an object")
    kind = msg.get("Type", "Request")
    if kind in ("Ping", "Pong"):
        return ClientRequest(kind, [])
    raw_id = msg.get("ID")
    if type(raw_id) is int:
        ids = [raw_id]
    elif isinstance(raw_id, list) and raw_id and all(type(i) is int for i in raw_id):
        ids = raw_id
    else:
        raise CodecError("'ID' must be an integer (or a list of them in a Close)")
    domain = msg.get("Domain", "MarketPrice")
    if not isinstance(domain, str):
        raise CodecError("'Domain' must be a string")
    if kind == "Close":
        return ClientRequest(kind, ids, domain)
    if kind != "Request":
        raise CodecError(f"unsupported request Type {brief(kind)}")
    if len(ids) != 1:
        raise CodecError("a request has one integer 'ID'")
    key = msg.get("Key", {})
    if not isinstance(key, dict):
        raise CodecError("'Key' must be an object")
    name = key.get("Name")
    batch = isinstance(name, list)
    if batch:
        if not name or not all(isinstance(n, str) for n in name):
            raise CodecError("batch 'Key.Name' must be a list of strings")
        names = list(name)
    elif isinstance(name, str):
        names = [name]
    elif domain == "Login" and key.get("NameType") == "AuthnToken":
        names = []
    else:
        raise CodecError("'Key.Name' is missing")
    view = msg.get("View")
    if view is not None and not (isinstance(view, list) and all(isinstance(v, str) for v in view)):
        raise CodecError("'View' must be a list of field names")
    elements = key.get("Elements", {})
    return ClientRequest(
        kind, ids, domain, names, batch, view, msg.get("Streaming", True) is not False,
        key.get("NameType"), elements if isinstance(elements, dict) else {}, key.get("Service"),
    )  # fmt: skip


def encode_messages(messages: list[dict[str, Any]]) -> str:
    """A server frame: always an array."""
    return orjson.dumps(messages).decode()


def state(stream: str, data: str, text: str, code: str | None = None) -> dict[str, str]:
    out = {"Stream": stream, "Data": data}
    if code is not None:
        out["Code"] = code
    out["Text"] = text
    return out


def login_refresh(
    user: str, app_id: str, position: str, *, ping_timeout_s: int = 30, host: str = "sim"
) -> dict[str, Any]:
    return {
        "ID": LOGIN_ID, "Type": "Refresh", "Domain": "Login",
        "Key": {"Name": user, "Elements": {
            "AllowSuspectData": 1, "ApplicationId": app_id, "ApplicationName": "ADS",
            "Position": position, "SingleOpen": 1, "SupportBatchRequests": 7,
            "SupportViewRequests": 1, "SupportOMMPost": 1, "SupportStandby": 0,
        }},
        "Elements": {"MaxMsgSize": 65535, "PingTimeout": ping_timeout_s},
        "State": state("Open", "Ok", f"Login accepted by host {host}."),
    }  # fmt: skip


def login_status(stream: str, data: str, code: str, text: str) -> dict[str, Any]:
    return {"ID": LOGIN_ID, "Type": "Status", "Domain": "Login",
            "State": state(stream, data, text, code)}  # fmt: skip


def item_refresh(
    stream_id: int, name: str, fields: dict[str, Any], seq: int, *, service: str = "ELEKTRON_DD"
) -> dict[str, Any]:
    return {
        "ID": stream_id, "Type": "Refresh", "Key": {"Name": name, "Service": service},
        "Fields": fields, "PermData": "AwO9ZWLA",
        "Qos": {"Rate": "TickByTick", "Timeliness": "Realtime"}, "SeqNumber": seq,
        "State": state("Open", "Ok", "All is well"),
    }  # fmt: skip


def item_update(
    stream_id: int, name: str, fields: dict[str, Any], update_type: str, seq: int,
    *, service: str = "ELEKTRON_DD",
) -> dict[str, Any]:  # fmt: skip
    msg: dict[str, Any] = {
        "ID": stream_id, "Type": "Update", "UpdateType": update_type,
        "Key": {"Name": name, "Service": service}, "SeqNumber": seq, "Fields": fields,
    }  # fmt: skip
    if update_type == "Trade":
        msg["DoNotConflate"] = True  # as on the real capture's Trade update
    return msg


def item_status(
    stream_id: int, name: str | None, stream: str, data: str, code: str, text: str
) -> dict[str, Any]:
    msg: dict[str, Any] = {"ID": stream_id, "Type": "Status"}
    if name is not None:
        msg["Key"] = {"Name": name}
    msg["State"] = state(stream, data, text, code)
    return msg


def batch_status(stream_id: int, total: int, ok: int) -> dict[str, Any]:
    text = f"Processed {total} total items from Batch Request. {ok} Ok."
    return {"ID": stream_id, "Type": "Status", "State": state("Closed", "Ok", text)}


def error_message(text: str, stream_id: int = 0) -> dict[str, Any]:
    return {"ID": stream_id, "Type": "Error", "Text": text}


def ping_message() -> dict[str, Any]:
    return {"Type": "Ping"}


def pong_message() -> dict[str, Any]:
    return {"Type": "Pong"}
