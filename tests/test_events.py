"""The raw_market_data_ingested event: exact shape, deterministic ids, COPY rows."""

from __future__ import annotations

import orjson
import pytest

from common.events import Event, build_events, event_from_journal
from common.model import DataType, RawMarketData, iso_ns

T0 = 1_700_000_000_123_456_789


def trade(seq: int | None = 7, **kw: object) -> RawMarketData:
    base = dict(
        symbol="AAPL", provider="polygon", timestamp_ns=T0, data_type=DataType.TRADE,
        price=187.25, volume=300, provider_specific={"x": 4, "c": [12]},
        provider_sequence=seq, stream="T.AAPL", receive_ns=T0 + 2_500_000,
    )  # fmt: skip
    base.update(kw)
    return RawMarketData(**base)  # type: ignore[arg-type]


def test_event_has_exactly_the_seed_shape() -> None:
    (event,) = build_events([trade()], T0 + 3_000_000)
    doc = orjson.loads(event.payload)
    assert set(doc) == {"event_id", "timestamp", "provider", "raw_data", "metadata"}
    assert set(doc["raw_data"]) == {
        "symbol", "price", "volume", "timestamp", "bid", "ask", "provider_specific", "data_type",
    }  # fmt: skip
    assert set(doc["metadata"]) == {"ingestion_latency_ms", "provider_sequence", "quality_flags"}
    assert doc["raw_data"]["timestamp"] == "2023-11-14T22:13:20.123456Z"
    assert doc["timestamp"] == "2023-11-14T22:13:20.126456Z"
    assert doc["metadata"]["ingestion_latency_ms"] == 0.5
    assert doc["raw_data"]["provider_specific"] == {"x": 4, "c": [12]}
    assert doc["raw_data"]["bid"] is None and doc["raw_data"]["data_type"] == "TRADE"


def test_event_id_is_deterministic_and_distinct() -> None:
    a = build_events([trade(1), trade(2)], T0)
    b = build_events([trade(1), trade(2)], T0 + 10**9)  # replayed later
    assert [e.event_id for e in a] == [e.event_id for e in b]
    assert a[0].event_id != a[1].event_id
    # Entries of one provider message share its sequence: still distinct ids.
    same = build_events([trade(3), trade(3, price=1.0)], T0)
    assert same[0].event_id != same[1].event_id


def test_copy_row_escapes_and_nulls() -> None:
    (event,) = build_events(
        [trade(provider_specific={"note": "a\\b\tc"}, quality_flags=["stale", "gap"])], T0
    )
    cols = event.copy_row.rstrip(b"\n").split(b"\t")
    assert len(cols) == 13
    assert cols[7] == b"\\N" and cols[8] == b"\\N"
    assert cols[11] == b"{stale,gap}"
    assert b"\\\\\\\\b" in cols[9]  # orjson's \\ doubled again for COPY


def test_replayed_event_rebuilds_the_same_row() -> None:
    (event,) = build_events([trade()], T0)
    again = event_from_journal(event.payload, event.receive_ns, "T.AAPL", 7, rejected=False)
    assert (again.event_id, again.copy_row, again.symbol, again.sequence) == (
        event.event_id, event.copy_row, event.symbol, event.sequence,
    )  # fmt: skip


def test_iso_ns() -> None:
    assert iso_ns(0) == "1970-01-01T00:00:00.000000Z"
    assert iso_ns(T0) == "2023-11-14T22:13:20.123456Z"


def test_unsequenced_updates_with_the_same_time_get_distinct_ids() -> None:
    """A polled quote whose price changed but whose timestamp did not is a new event."""
    a = trade(None, stream="GLOBAL_QUOTE:AAPL")
    b = trade(None, stream="GLOBAL_QUOTE:AAPL", price=187.5)
    first = build_events([a], T0)[0].event_id
    second = build_events([b], T0)[0].event_id
    replay = build_events([trade(None, stream="GLOBAL_QUOTE:AAPL")], T0 + 5)[0].event_id
    assert first != second and first == replay
    # Only a field outside price/volume/bid/ask changed (Alpha Vantage's day volume).
    c = trade(None, stream="GLOBAL_QUOTE:AAPL", provider_specific={"volume": 2})
    d = trade(None, stream="GLOBAL_QUOTE:AAPL", provider_specific={"volume": 3})
    assert build_events([c], T0)[0].event_id != build_events([d], T0)[0].event_id


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"price": 1e13}, "price 10000000000000.0 is outside the column's range"),
        ({"price": float("nan")}, "price nan is outside the column's range"),
        ({"bid": float("inf")}, "bid inf is outside the column's range"),
        ({"ask": -1e12}, "ask -1000000000000.0 is outside the column's range"),
        ({"volume": 19999999999999999999999}, "volume 19999999999999999999999 is outside"),
        ({"provider_sequence": 2**63}, "provider_sequence 9223372036854775808 does not fit"),
        ({"symbol": "X" * 51}, "symbol of 51 characters (at most 50)"),
        ({"symbol": "AA\x00PL"}, "symbol holds a NUL character"),
        ({"symbol": ""}, "empty symbol"),
        ({"provider_specific": {"c": "a\x00b"}}, "provider_specific holds a NUL character"),
        ({"provider_specific": {"n": 2**70}}, "TypeError: Integer exceeds 64-bit range"),
        ({"timestamp_ns": 9007199254740993 * 10**6}, "ValueError: year"),
    ],
)
def test_a_value_a_sink_would_refuse_is_rejected_with_its_reason(
    change: dict[str, object], reason: str
) -> None:
    """One bad record becomes a dead-letter; the records beside it are events as usual."""
    rejected: list[Event] = []
    events = build_events([trade(1), trade(2, **change), trade(3)], T0, rejected)
    assert [orjson.loads(e.payload)["metadata"]["provider_sequence"] for e in events] == [1, 3]
    (bad,) = rejected
    doc = orjson.loads(bad.payload)
    assert doc["reason"].startswith(reason), doc["reason"]
    assert bad.rejected and bad.copy_row == b""
    assert doc["provider"] == "polygon" and doc["record"]["provider_sequence"] in (2, 2**63)
    # The dead-letter id is as deterministic as an event's.
    again: list[Event] = []
    build_events([trade(2, **change)], T0 + 10**9, again)
    assert again[0].event_id == bad.event_id


def test_without_a_dead_letter_list_a_bad_record_raises() -> None:
    with pytest.raises(ValueError, match="price"):
        build_events([trade(price=1e13)], T0)


def test_values_at_the_edge_of_the_columns_are_events() -> None:
    rejected: list[Event] = []
    edge = trade(
        price=999_999_999_999.99, volume=9.9e15, symbol="X" * 50, provider_sequence=2**63 - 1
    )
    assert len(build_events([edge], T0, rejected)) == 1 and rejected == []
