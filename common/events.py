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
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, datetime
from hashlib import blake2b

import orjson

from common.model import RawMarketData, iso_ns

EVENT_TYPE = "raw_market_data_ingested"


@dataclass(slots=True)
class Event:
    """One event ready for the sinks: its JSON payload and its COPY row (text format)."""

    event_id: str
    symbol: str
    payload: bytes
    copy_row: bytes
    receive_ns: int
    # When the provider produced it: the simulator's send stamp where present, else the
    # provider timestamp. Latency "provider -> Pulsar receipt" is measured from here.
    origin_ns: int


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


def build_events(records: list[RawMarketData], publish_ns: int) -> list[Event]:
    """Turn one batch of checked records into events. ``publish_ns`` is read once per batch."""
    publish_iso = iso_ns(publish_ns)
    events: list[Event] = []
    append = events.append
    dumps = orjson.dumps
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
        dt = r.data_type  # a StrEnum: formats and serializes as its value
        seq = r.provider_sequence
        specific = dumps(r.provider_specific)
        if seq is None:
            # No sequence (polled quotes, bars): the values tell one update from the next,
            # and a replay of the same record still hashes the same.
            content = f"{r.stream}|{r.price}|{r.volume}|{r.bid}|{r.ask}|{specific.decode()}"
            event_id = event_id_for(r.provider, content, None, r.timestamp_ns, dt, ordinal)
        else:
            event_id = event_id_for(r.provider, r.stream, seq, r.timestamp_ns, dt, ordinal)
        if r.timestamp_ns != last_ts:
            last_ts, last_ts_iso = r.timestamp_ns, iso_ns(r.timestamp_ns)
        if r.receive_ns != last_recv:
            last_recv, last_recv_iso = r.receive_ns, iso_ns(r.receive_ns)
        provider_time = last_ts_iso
        flags = r.quality_flags
        payload = dumps(
            {
                "event_id": event_id,
                "timestamp": publish_iso,
                "provider": r.provider,
                "raw_data": {
                    "symbol": r.symbol,
                    "price": r.price,
                    "volume": r.volume,
                    "timestamp": provider_time,
                    "bid": r.bid,
                    "ask": r.ask,
                    "provider_specific": orjson.Fragment(specific),
                    "data_type": dt,
                },
                "metadata": {
                    "ingestion_latency_ms": (publish_ns - r.receive_ns) / 1e6,
                    "provider_sequence": r.provider_sequence,
                    "quality_flags": flags,
                },
            }
        )
        row = copy_row(
            event_id, r.symbol, r.provider, provider_time, dt, r.price, r.volume, r.bid,
            r.ask, specific, r.provider_sequence, flags, last_recv_iso,
        )  # fmt: skip
        origin = r.provider_specific.get("ffsend") or r.timestamp_ns
        append(Event(event_id, r.symbol, payload, row, r.receive_ns, origin))
    return events


COPY_COLUMNS = (
    "event_id, symbol, provider, timestamp, data_type, price, volume, bid, ask, "
    "provider_specific, provider_sequence, quality_flags, received_at"
)


def copy_row(
    event_id: str, symbol: str, provider: str, provider_time: str, data_type: str,
    price: float | None, volume: float | None, bid: float | None, ask: float | None,
    specific_json: bytes, sequence: int | None, flags: list[str], receive_time: str,
) -> bytes:  # fmt: skip
    """One line of COPY text for ``raw_market_data`` (columns in ``COPY_COLUMNS`` order).

    Built as one string and encoded once: this runs for every event.
    """
    specific = specific_json.decode()
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


def event_from_payload(payload: bytes, receive_ns: int) -> Event:
    """Rebuild an ``Event`` from its JSON (spool replay): same payload, same row."""
    doc = orjson.loads(payload)
    raw = doc["raw_data"]
    meta = doc["metadata"]
    row = copy_row(
        doc["event_id"], raw["symbol"], doc["provider"], raw["timestamp"], raw["data_type"],
        raw["price"], raw["volume"], raw["bid"], raw["ask"],
        orjson.dumps(raw["provider_specific"]), meta["provider_sequence"],
        meta["quality_flags"], iso_ns(receive_ns),
    )  # fmt: skip
    origin = raw["provider_specific"].get("ffsend") or _iso_to_ns(raw["timestamp"])
    return Event(doc["event_id"], raw["symbol"], payload, row, receive_ns, origin)


def _iso_to_ns(text: str) -> int:
    moment = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    return int(moment.timestamp()) * 1_000_000_000 + moment.microsecond * 1000
