"""The ``raw_market_data_ingested`` event: built once per record, shared by all sinks.

Shape (the seed's, plus ``raw_data.data_type``)::

    {"event_id", "timestamp", "provider",
     "raw_data": {"symbol", "price", "volume", "timestamp", "bid", "ask",
                  "provider_specific", "data_type"},
     "metadata": {"ingestion_latency_ms", "provider_sequence", "quality_flags"}}

``event_id`` is a UUID-formatted hash of (provider, stream, sequence, provider time,
data type, ordinal), and of the values where the provider gives no sequence, so replaying
the same provider data yields the same ids and consumers can de-duplicate.
``timestamp`` is the publish-ready time; ``raw_data.timestamp`` the provider's event time.

A record that a sink would refuse (see ``refusal``: a number beyond its column, a symbol
too long, a NUL character, a time or integer out of range) does not become an event: it
becomes a *rejected* one, whose payload holds the reason and the record's values as
received, bound for the dead-letters (Pulsar ``<topic>-dlq`` and ``rejected_records``).
One bad value never blocks a sink, and nothing is dropped silently.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from hashlib import blake2b

import msgspec
import orjson
from msgspec import Raw

from common.model import RawMarketData, iso_ns

EVENT_TYPE = "raw_market_data_ingested"


class Event(msgspec.Struct, gc=False):
    """One event ready for the sinks: its JSON payload and its COPY row (text format).

    A rejected event's payload is the dead-letter document and its ``copy_row`` is empty.
    A msgspec struct (one per tick; made faster than a dataclass), holding no references
    the garbage collector would need to follow.
    """

    event_id: str
    symbol: str
    payload: bytes
    copy_row: bytes
    receive_ns: int
    # When the provider produced it (its timestamp). Latency "provider -> Pulsar receipt"
    # is measured from here.
    origin_ns: int
    # The provider's sequence space and number: the journal keeps them so sequence state
    # (and so gap detection) survives a restart.
    stream: str = ""
    sequence: int | None = None
    rejected: bool = False
    # Set by the journal: unique and increasing, the same on every replay (Pulsar's
    # sequence id, for the broker's de-duplication).
    position: int = 0


def event_id_for(
    provider: str,
    stream: str,
    sequence: int | None,
    timestamp_ns: int,
    data_type: str,
    ordinal: int,
) -> str:
    h = blake2b(
        f"{provider}|{stream}|{sequence}|{timestamp_ns}|{data_type}|{ordinal}".encode(),
        digest_size=16,
    ).hexdigest()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class Refused(ValueError):
    """A record a sink would refuse; the message is the reason as a person reads it."""


# The columns of raw_market_data: NUMERIC(20, 8) prices, NUMERIC(24, 8) volume, BIGINT
# sequence, VARCHAR(50) symbol. A value outside them would make COPY refuse the batch.
PRICE_LIMIT = 1e12
VOLUME_LIMIT = 1e16
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
SYMBOL_MAX_CHARS = 50


def build_events(
    records: list[RawMarketData], publish_ns: int, rejected: list[Event] | None = None
) -> list[Event]:
    """Turn one batch of checked records into events. ``publish_ns`` is read once per batch.

    Records a sink would refuse go to ``rejected`` (when given; else they raise) as
    dead-letter events with the reason.
    """
    publish_iso = iso_ns(publish_ns)
    events: list[Event] = []
    append = events.append
    encode = _encode
    prev_key: tuple[str, int | None] | None = None
    ordinal = 0
    # Records of one read share a receive time and mostly a provider time: format each once.
    last_ts, last_ts_iso = -1, ""
    last_recv, last_recv_iso = -1, ""
    for r in records:
        # Several records from one provider message share its sequence number (a FIX
        # refresh with many entries): the ordinal keeps their ids distinct and stable.
        key = (r.stream, r.provider_sequence)
        ordinal = ordinal + 1 if key == prev_key else 0
        prev_key = key
        # A try block costs nothing until it catches: one bad record costs only itself.
        try:
            dt = r.data_type  # a StrEnum: formats and serializes as its value
            seq = r.provider_sequence
            specific = encode(r.provider_specific)
            specific_text = specific.decode()
            price, volume, bid, ask = r.price, r.volume, r.bid, r.ask
            if (
                (price is not None and not -PRICE_LIMIT < price < PRICE_LIMIT)
                or (bid is not None and not -PRICE_LIMIT < bid < PRICE_LIMIT)
                or (ask is not None and not -PRICE_LIMIT < ask < PRICE_LIMIT)
                or (volume is not None and not -VOLUME_LIMIT < volume < VOLUME_LIMIT)
                or (seq is not None and not INT64_MIN <= seq <= INT64_MAX)
                or "\\u0000" in specific_text
                or symbol_refusal(r.symbol) is not None
            ):
                raise Refused(refusal(r))
            if seq is None:
                # No sequence (polled quotes, bars): the values tell one update from the
                # next, and a replay of the same record still hashes the same.
                content = f"{r.stream}|{price}|{volume}|{bid}|{ask}|{specific_text}"
                event_id = event_id_for(r.provider, content, None, r.timestamp_ns, dt, ordinal)
            else:
                event_id = event_id_for(r.provider, r.stream, seq, r.timestamp_ns, dt, ordinal)
            if r.timestamp_ns != last_ts:
                last_ts_iso = iso_ns(r.timestamp_ns)
                last_ts = r.timestamp_ns
            if r.receive_ns != last_recv:
                last_recv_iso = iso_ns(r.receive_ns)
                last_recv = r.receive_ns
            provider_time = last_ts_iso
            flags = r.quality_flags
            payload = encode(
                _Payload(
                    event_id, publish_iso, r.provider,
                    _RawData(r.symbol, price, volume, provider_time, bid, ask, Raw(specific), dt),
                    _Metadata((publish_ns - r.receive_ns) / 1e6, seq, flags),
                )
            )  # fmt: skip
            row = copy_row(
                event_id, r.symbol, r.provider, provider_time, dt, price, volume, bid, ask,
                specific_text, seq, flags, last_recv_iso,
            )  # fmt: skip
        except Exception as exc:
            if rejected is None:
                raise
            rejected.append(rejected_event(r, ordinal, exc))
            continue
        append(Event(event_id, r.symbol, payload, row, r.receive_ns, r.timestamp_ns, r.stream, seq))
    return events


# The event's JSON document, field by field in its order: encoded from structs, with no
# dicts built per event (1.8 against 3.0 us per payload, measured side by side).
class _RawData(msgspec.Struct, gc=False):
    symbol: str
    price: float | None
    volume: float | None
    timestamp: str
    bid: float | None
    ask: float | None
    provider_specific: Raw
    data_type: str


class _Metadata(msgspec.Struct, gc=False):
    ingestion_latency_ms: float
    provider_sequence: int | None
    quality_flags: list[str]


class _Payload(msgspec.Struct, gc=False):
    event_id: str
    timestamp: str
    provider: str
    raw_data: _RawData
    metadata: _Metadata


# msgspec's JSON encoder, not orjson's, on the per-event path: orjson starts every output
# in a buffer of its own and shrinks it after, which costs several times the encoding when,
# as here, the outputs are kept (about 3 against 0.3 µs for a provider_specific, and 4
# against 1.5 for a payload). For the values providers send the two write the same bytes.
# They differ only outside the range prices and volumes are held to: a float of 1e16 or
# more is written 1e16 (orjson: 1e+16), the same number; an integer beyond 64 bits is
# written exactly, where orjson refused it (PostgreSQL's json and every JSON reader take
# it, so such a record is stored now rather than dead-lettered).
_encode = msgspec.json.Encoder().encode


def refusal(r: RawMarketData) -> str:
    """Why a sink would refuse this record (the checks of ``build_events``, spelled out)."""
    for name, value, limit in (
        ("price", r.price, PRICE_LIMIT), ("bid", r.bid, PRICE_LIMIT),
        ("ask", r.ask, PRICE_LIMIT), ("volume", r.volume, VOLUME_LIMIT),
    ):  # fmt: skip
        if value is not None and not -limit < value < limit:
            return f"{name} {value!r} is outside the column's range (|x| < {limit:g})"
    seq = r.provider_sequence
    if seq is not None and not INT64_MIN <= seq <= INT64_MAX:
        return f"provider_sequence {seq} does not fit 64 bits"
    return symbol_refusal(r.symbol) or "provider_specific holds a NUL character"


@functools.lru_cache(maxsize=65536)
def symbol_refusal(symbol: str) -> str | None:
    """Why ``raw_market_data.symbol`` would refuse this symbol, or None (cached per symbol)."""
    if not symbol:
        return "empty symbol"
    if len(symbol) > SYMBOL_MAX_CHARS:
        return f"symbol of {len(symbol)} characters (at most {SYMBOL_MAX_CHARS})"
    if "\x00" in symbol:
        return "symbol holds a NUL character"
    return None


def rejected_event(r: RawMarketData, ordinal: int, error: Exception) -> Event:
    """A dead-letter event for a record no sink may store as it is."""
    reason = str(error) if isinstance(error, Refused) else f"{type(error).__name__}: {error}"
    event_id = event_id_for(
        r.provider, r.stream,
        None if r.provider_sequence is None else _safe_int(r.provider_sequence),
        _safe_int(r.timestamp_ns),
        str(r.data_type), ordinal,
    )  # fmt: skip
    values = {name: _as_json_value(getattr(r, name)) for name in RawMarketData.__struct_fields__}
    payload = orjson.dumps(
        {
            "event_id": event_id,
            "provider": r.provider,
            "symbol": r.symbol,
            "reason": reason,
            "record": values,
        }
    )
    return Event(
        event_id, r.symbol, payload, b"", r.receive_ns, r.receive_ns, r.stream,
        None, rejected=True,
    )  # fmt: skip


def _safe_int(value: object) -> int:
    """An integer for the id's hash: a bad one (out of range, wrong type) by its text."""
    if isinstance(value, int) and INT64_MIN <= value <= INT64_MAX:
        return value
    return int.from_bytes(blake2b(repr(value).encode(), digest_size=7).digest())


def _as_json_value(value: object) -> object:
    """The value itself where JSON can carry it exactly, else its repr (nothing is lost)."""
    try:
        orjson.dumps(value)
    except TypeError:
        return repr(value)
    if isinstance(value, float) and not -1e308 < value < 1e308:
        return repr(value)  # NaN and infinities would become null
    return value


COPY_COLUMNS = (
    "event_id, symbol, provider, timestamp, data_type, price, volume, bid, ask, "
    "provider_specific, provider_sequence, quality_flags, received_at"
)


def copy_row(
    event_id: str, symbol: str, provider: str, provider_time: str, data_type: str,
    price: float | None, volume: float | None, bid: float | None, ask: float | None,
    specific_json: str, sequence: int | None, flags: list[str], receive_time: str,
) -> bytes:  # fmt: skip
    """One line of COPY text for ``raw_market_data`` (columns in ``COPY_COLUMNS`` order).

    Built as one string and encoded once: this runs for every event.
    """
    specific = specific_json
    if "\\" in specific:
        # COPY text format: backslash is the escape character. orjson never emits raw
        # tabs or newlines (they are escaped inside strings), so only backslashes double.
        specific = specific.replace("\\", "\\\\")
    return (
        f"{event_id}\t{_escape(symbol)}\t{_escape(provider)}\t{provider_time}\t{data_type}\t"
        f"{_NULL if price is None else price}\t{_NULL if volume is None else volume}\t"
        f"{_NULL if bid is None else bid}\t{_NULL if ask is None else ask}\t{specific}\t"
        f"{_NULL if sequence is None else sequence}\t{{{','.join(flags)}}}\t{receive_time}\n"
    ).encode()


_NULL = "\\N"


@functools.lru_cache(maxsize=65536)
def _escape(text: str) -> str:
    """A symbol or provider name as COPY text (cached: the same few hundred recur)."""
    if "\\" in text or "\t" in text or "\n" in text or "\r" in text:
        text = (
            text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")
            .replace("\r", "\\r")
        )  # fmt: skip
    return text


def event_from_journal(
    payload: bytes, receive_ns: int, stream: str, sequence: int | None, *, rejected: bool
) -> Event:
    """Rebuild an ``Event`` from its journal line: same payload, same COPY row."""
    doc = orjson.loads(payload)
    if rejected:
        return Event(
            doc["event_id"], doc["symbol"], payload, b"", receive_ns, receive_ns, stream,
            None, rejected=True,
        )  # fmt: skip
    raw = doc["raw_data"]
    meta = doc["metadata"]
    row = copy_row(
        doc["event_id"], raw["symbol"], doc["provider"], raw["timestamp"], raw["data_type"],
        raw["price"], raw["volume"], raw["bid"], raw["ask"],
        _encode(raw["provider_specific"]).decode(), meta["provider_sequence"],
        meta["quality_flags"], iso_ns(receive_ns),
    )  # fmt: skip
    origin = _iso_to_ns(raw["timestamp"])
    return Event(doc["event_id"], raw["symbol"], payload, row, receive_ns, origin, stream, sequence)


def _iso_to_ns(text: str) -> int:
    moment = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    return int(moment.timestamp()) * 1_000_000_000 + moment.microsecond * 1000
