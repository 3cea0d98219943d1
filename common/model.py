"""The records every part of feedfleet shares.

Times are int64 nanoseconds since the Unix epoch (UTC) everywhere inside the fleet;
ISO strings are made only at the edges (events, API answers).
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec


class DataType(enum.StrEnum):
    TRADE = "TRADE"
    QUOTE = "QUOTE"
    ORDER_BOOK = "ORDER_BOOK"
    NEWS = "NEWS"
    CORPORATE_ACTION = "CORPORATE_ACTION"
    # Time bars (Polygon A/AM, Alpha Vantage intraday series). Not in the seed's list;
    # calling a bar a TRADE would mislead every consumer that sums volume.
    AGGREGATE = "AGGREGATE"


class ConnectionStatus(enum.StrEnum):
    CONNECTED = "CONNECTED"
    CONNECTING = "CONNECTING"
    DISCONNECTED = "DISCONNECTED"
    ERROR = "ERROR"
    RATE_LIMITED = "RATE_LIMITED"


class QualityFlag(enum.StrEnum):
    STALE = "stale"
    OUT_OF_ORDER = "out_of_order"
    DUPLICATE = "duplicate"
    GAP = "gap"
    CROSSED = "crossed"
    PRICE_OUTLIER = "price_outlier"
    MISSING_FIELDS = "missing_fields"
    FAILOVER = "failover"
    # Fetched afterwards from the provider's REST history (missed while disconnected).
    BACKFILL = "backfill"


class RawMarketData(msgspec.Struct, gc=False):
    """One normalized provider record, before it becomes an event.

    ``stream`` names the provider's sequence space the ``provider_sequence`` belongs to
    (for Polygon ``T.AAPL``; for IEX the session id). ``sequence_contiguous`` says whether
    that provider promises consecutive numbers, which is what makes a jump a gap.

    A msgspec struct, not a dataclass: one is made per tick, and a struct is made in a
    quarter of the time. It holds no reference cycles, so the garbage collector need not
    track it (``gc=False``).
    """

    symbol: str
    provider: str
    timestamp_ns: int
    data_type: DataType
    price: float | None = None
    volume: float | None = None
    bid: float | None = None
    ask: float | None = None
    provider_specific: dict[str, Any] = msgspec.field(default_factory=dict)
    provider_sequence: int | None = None
    stream: str = ""
    sequence_contiguous: bool = False
    receive_ns: int = 0
    quality_flags: list[str] = msgspec.field(default_factory=list)

    @property
    def timestamp(self) -> datetime:
        return ns_to_datetime(self.timestamp_ns)


@dataclass(slots=True)
class SubscriptionRequest:
    """Body of ``POST /api/v1/providers/{provider_id}/subscribe``."""

    symbols: list[str]
    data_types: list[DataType] = field(default_factory=lambda: [DataType.TRADE, DataType.QUOTE])


@dataclass(slots=True)
class ProviderStatus:
    """Live state of one provider, as its worker reports it."""

    provider_id: str
    provider_name: str
    status: ConnectionStatus
    last_update: str
    messages_received: int = 0
    messages_published: int = 0
    messages_stored: int = 0
    messages_spooled: int = 0
    throughput_per_sec: float = 0.0
    subscribed_symbols: int = 0
    error_count: int = 0
    last_error: str | None = None
    backpressure: bool = False
    instance_id: str | None = None


def ns_to_datetime(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / 1e9, tz=UTC)


@functools.lru_cache(maxsize=4096)
def _second_prefix(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")


def iso_ns(ns: int) -> str:
    """ISO 8601 UTC with microseconds, e.g. ``2024-05-04T17:09:52.462000Z``.

    On the per-event path: the part up to the second is cached.
    """
    seconds, rem = divmod(ns, 1_000_000_000)
    return f"{_second_prefix(seconds)}.{rem // 1000:06d}Z"


def seconds_since_iso(iso: object, now_s: float) -> float | None:
    """Seconds from an ISO 8601 time (as ``iso_ns`` writes it) to ``now_s``, never
    negative; None for anything that is not such a time (a report is read defensively)."""
    if not isinstance(iso, str):
        return None
    try:
        return max(0.0, now_s - datetime.fromisoformat(iso).timestamp())
    except ValueError:
        return None
