"""The raw_market_data_ingested event: exact shape, deterministic ids, COPY rows."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import orjson
import pytest

from common.events import INT64_MAX, INT64_MIN, Event, build_events, event_from_journal
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


def test_an_event_is_exactly_this_document_and_copy_row() -> None:
    """Every field of the payload and of the COPY row, by value: consumers read the JSON by
    these names and ``raw_market_data`` takes the row in ``COPY_COLUMNS`` order."""
    record = trade(bid=187.2, ask=187.3, quality_flags=["late", "gap"])
    (event,) = build_events([record], T0 + 3_000_000)
    assert orjson.loads(event.payload) == {
        "event_id": "3de345c6-7e5a-fe70-5696-0c097f2e672c",
        "timestamp": "2023-11-14T22:13:20.126456Z",
        "provider": "polygon",
        "raw_data": {
            "symbol": "AAPL", "price": 187.25, "volume": 300,
            "timestamp": "2023-11-14T22:13:20.123456Z", "bid": 187.2, "ask": 187.3,
            "provider_specific": {"x": 4, "c": [12]}, "data_type": "TRADE",
        },
        "metadata": {
            "ingestion_latency_ms": 0.5, "provider_sequence": 7, "quality_flags": ["late", "gap"],
        },
    }  # fmt: skip
    assert event.copy_row == (
        b"3de345c6-7e5a-fe70-5696-0c097f2e672c\tAAPL\tpolygon\t2023-11-14T22:13:20.123456Z\t"
        b'TRADE\t187.25\t300\t187.2\t187.3\t{"x":4,"c":[12]}\t7\t{late,gap}\t'
        b"2023-11-14T22:13:20.125956Z\n"
    )
    assert (event.symbol, event.receive_ns, event.origin_ns, event.stream, event.sequence) == (
        "AAPL", T0 + 2_500_000, T0, "T.AAPL", 7,
    )  # fmt: skip
    assert not event.rejected


def test_a_quote_without_price_volume_or_sequence_has_nulls() -> None:
    record = trade(None, price=None, volume=None, bid=10.5, ask=10.75, data_type=DataType.QUOTE)
    (event,) = build_events([record], T0 + 2_500_000)
    doc = orjson.loads(event.payload)
    assert (doc["raw_data"]["price"], doc["raw_data"]["volume"]) == (None, None)
    assert (doc["raw_data"]["bid"], doc["raw_data"]["ask"]) == (10.5, 10.75)
    assert doc["raw_data"]["data_type"] == "QUOTE"
    assert doc["metadata"] == {
        "ingestion_latency_ms": 0.0, "provider_sequence": None, "quality_flags": [],
    }  # fmt: skip
    cols = event.copy_row.rstrip(b"\n").split(b"\t")
    assert cols[4:9] == [b"QUOTE", b"\\N", b"\\N", b"10.5", b"10.75"]
    assert cols[10:] == [b"\\N", b"{}", b"2023-11-14T22:13:20.125956Z"]
    assert event.sequence is None


def test_each_record_of_a_read_keeps_its_own_times() -> None:
    """Times are formatted once per run of equal values: a change must still show."""
    s = 1_000_000_000
    times = [(T0, T0 + 1_000), (T0, T0 + 2_000), (T0 + s, T0 + 2_000), (T0, T0 + 1_000)]
    records = [trade(i, timestamp_ns=t, receive_ns=r) for i, (t, r) in enumerate(times)]
    events = build_events(records, T0 + 2 * s)
    docs = [orjson.loads(e.payload) for e in events]
    assert [d["raw_data"]["timestamp"] for d in docs] == [
        "2023-11-14T22:13:20.123456Z", "2023-11-14T22:13:20.123456Z",
        "2023-11-14T22:13:21.123456Z", "2023-11-14T22:13:20.123456Z",
    ]  # fmt: skip
    assert [e.copy_row.rstrip(b"\n").split(b"\t")[12] for e in events] == [
        b"2023-11-14T22:13:20.123457Z", b"2023-11-14T22:13:20.123458Z",
        b"2023-11-14T22:13:20.123458Z", b"2023-11-14T22:13:20.123457Z",
    ]  # fmt: skip
    assert [d["metadata"]["ingestion_latency_ms"] for d in docs] == [
        1999.999, 1999.998, 1999.998, 1999.999,
    ]  # fmt: skip
    assert [e.origin_ns for e in events] == [t for t, _ in times]
    assert [e.receive_ns for e in events] == [r for _, r in times]


@pytest.fixture
def non_utc_host(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The host's local time zone is New York: provider times must not depend on it."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("non_utc_host")
def test_origin_is_the_provider_time_also_after_a_replay() -> None:
    # A provider field that happens to be called like the benchmark's old send stamp is
    # just a provider field: the codec and the events know only the provider's time.
    (event,) = build_events([trade(1, provider_specific={"ffsend": T0 + 77})], T0)
    assert event.origin_ns == T0
    again = event_from_journal(
        event.payload, event.receive_ns, event.stream, event.sequence, rejected=False
    )
    assert again.origin_ns == T0 - 789  # the JSON keeps whole microseconds
    assert (again.receive_ns, again.payload, again.rejected) == (
        event.receive_ns, event.payload, False,
    )  # fmt: skip


def test_a_replayed_event_is_the_same_event() -> None:
    """The journal keeps the payload, receive time, stream and sequence; the rest is rebuilt."""
    record = trade(
        None, price=None, volume=2.5, bid=1.25, ask=1.5, quality_flags=["stale"],
        provider_specific={"note": "a\\b"}, data_type=DataType.QUOTE,
        timestamp_ns=T0 - 789,  # whole microseconds, as the JSON keeps them
    )  # fmt: skip
    (event,) = build_events([record], T0 + 10**9)
    again = event_from_journal(event.payload, event.receive_ns, "T.AAPL", None, rejected=False)
    assert again == event


def test_event_ids_do_not_change_between_releases() -> None:
    """Sinks de-duplicate on the id: a provider's replay after an upgrade must hash as before.

    Events of one message share a sequence (their ordinal tells them apart); a record without
    a sequence hashes its values; dead-letters hash a bad sequence or time by its text."""
    events = build_events(
        [trade(7), trade(7, price=187.5), trade(8), trade(None, stream="GLOBAL_QUOTE:AAPL")], T0
    )
    assert [e.event_id for e in events] == [
        "3de345c6-7e5a-fe70-5696-0c097f2e672c",
        "0d7fb4fc-8d81-0e22-0dae-569d84d1fccc",
        "bacb21b3-1995-6b06-3d64-0c5cc2796775",
        "30fa1820-4a1b-0823-280f-156082dfc4e2",
    ]
    rejected: list[Event] = []
    bad = [
        trade(None, symbol=""),
        trade(2**63),
        trade(INT64_MAX, symbol=""),
        trade(INT64_MIN, symbol=""),
        trade(5, timestamp_ns=9007199254740993 * 10**6),
        trade(5, symbol="", data_type=DataType.QUOTE),
        trade(5, symbol=""),
    ]
    assert build_events(bad, T0, rejected) == []
    assert [e.event_id for e in rejected] == [
        "a49434ca-0c73-a8cf-506a-0038fa445010",
        "5b1a4fce-62cc-5e26-29d1-31786f262352",
        "d26ff5da-d36b-2f3a-c037-33929750b405",
        "4d26fb33-f5fd-e8e8-b68b-963623c5f1eb",
        "db68c647-2edc-4baa-51d2-c8e5af7830a7",
        "1081fd60-5d4d-e907-8634-0e45ddce4a97",
        "976d95bc-761c-9e6a-3203-03019b013e65",
    ]


@pytest.mark.parametrize(
    ("field", "limit"),
    [("price", 1e12), ("bid", 1e12), ("ask", 1e12), ("volume", 1e16)],
)
def test_a_number_at_its_column_limit_is_refused_and_one_below_is_not(
    field: str, limit: float
) -> None:
    """NUMERIC(20, 8) holds |x| < 1e12 and NUMERIC(24, 8) |x| < 1e16, both bounds open."""
    inside = math.nextafter(limit, 0)
    rejected: list[Event] = []
    records = [trade(i, **{field: v}) for i, v in enumerate((limit, -limit, inside, -inside))]
    events = build_events(records, T0, rejected)
    assert [orjson.loads(e.payload)["raw_data"][field] for e in events] == [inside, -inside]
    assert [orjson.loads(e.payload)["reason"] for e in rejected] == [
        f"{field} {limit!r} is outside the column's range (|x| < {limit:g})",
        f"{field} {-limit!r} is outside the column's range (|x| < {limit:g})",
    ]


def test_a_sequence_must_fit_a_bigint() -> None:
    rejected: list[Event] = []
    records = [trade(s) for s in (INT64_MIN - 1, INT64_MIN, INT64_MAX, INT64_MAX + 1)]
    events = build_events(records, T0, rejected)
    assert [e.sequence for e in events] == [INT64_MIN, INT64_MAX]
    assert [e.copy_row.split(b"\t")[10] for e in events] == [
        str(INT64_MIN).encode(), str(INT64_MAX).encode(),
    ]  # fmt: skip
    assert [orjson.loads(e.payload)["reason"] for e in rejected] == [
        f"provider_sequence {INT64_MIN - 1} does not fit 64 bits",
        f"provider_sequence {INT64_MAX + 1} does not fit 64 bits",
    ]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        # Values at the edge of their column are fine: the reason names the bad one.
        ({"provider_sequence": INT64_MAX, "symbol": ""}, "empty symbol"),
        ({"provider_sequence": INT64_MIN, "symbol": ""}, "empty symbol"),
        ({"price": -999_999_999_999.99, "symbol": "Y" * 60}, "symbol of 60 characters"),
        ({"bid": 1.0, "ask": 1e12}, "ask 1000000000000.0 is outside"),
        ({"volume": -1e16, "price": 1.0}, "volume -1e+16 is outside"),
        ({"provider_sequence": None, "symbol": "A\x00"}, "symbol holds a NUL character"),
    ],
)
def test_the_reason_names_the_value_that_is_wrong(change: dict[str, object], reason: str) -> None:
    rejected: list[Event] = []
    assert build_events([trade(**change)], T0, rejected) == []
    assert orjson.loads(rejected[0].payload)["reason"].startswith(reason)


def test_provider_numbers_beyond_64_bits_and_1e16_are_kept_exactly() -> None:
    """A provider field may hold numbers no price may: they reach the event and the row as
    the same numbers (JSON takes any integer; PostgreSQL's json too)."""
    (event,) = build_events([trade(3, provider_specific={"n": 2**70, "f": 1e16})], T0)
    assert b'"provider_specific":{"n":1180591620717411303424,"f":1e16}' in event.payload
    assert b'\t{"n":1180591620717411303424,"f":1e16}\t' in event.copy_row


def test_a_dead_letter_keeps_the_record_as_received() -> None:
    """Whatever JSON cannot carry exactly (NaN, infinities, huge integers) is kept as text;
    the rest keeps its own type, so the record can be fixed and sent again."""
    record = trade(
        9, price=float("nan"), bid=float("-inf"), ask=1e13, volume=-1.5,
        provider_specific={"n": 2**70}, quality_flags=["gap"], stream="T.BAD",
    )  # fmt: skip
    rejected: list[Event] = []
    assert build_events([record], T0, rejected) == []
    (bad,) = rejected
    assert orjson.loads(bad.payload) == {
        "event_id": bad.event_id,
        "provider": "polygon",
        "symbol": "AAPL",
        "reason": "price nan is outside the column's range (|x| < 1e+12)",
        "record": {
            "symbol": "AAPL", "provider": "polygon", "timestamp_ns": T0, "data_type": "TRADE",
            "price": "nan", "volume": -1.5, "bid": "-inf", "ask": 1e13,
            "provider_specific": "{'n': 1180591620717411303424}", "provider_sequence": 9,
            "stream": "T.BAD", "sequence_contiguous": False, "receive_ns": T0 + 2_500_000,
            "quality_flags": ["gap"],
        },
    }  # fmt: skip
    # Routed and timed like any event of its stream, but no sequence (it was not accepted).
    assert (bad.symbol, bad.receive_ns, bad.origin_ns, bad.stream, bad.sequence) == (
        "AAPL", T0 + 2_500_000, T0 + 2_500_000, "T.BAD", None,
    )  # fmt: skip
    assert bad.rejected and bad.copy_row == b""
    again = event_from_journal(bad.payload, bad.receive_ns, "T.BAD", None, rejected=True)
    assert again == bad


def test_dead_letters_of_different_records_have_different_ids() -> None:
    base = {"price": 1e13}
    variants: list[dict[str, object]] = [
        {},
        {"provider": "iex"},
        {"stream": "T.MSFT"},
        {"provider_sequence": 8},
        {"timestamp_ns": T0 + 1},
        {"data_type": DataType.QUOTE},
    ]
    rejected: list[Event] = []
    for change in variants:
        build_events([trade(**(base | change))], T0, rejected)
    # Two bad entries of one provider message (same sequence): told apart by their order.
    build_events([trade(**base), trade(**base)], T0, rejected)
    ids = [e.event_id for e in rejected]
    assert len(set(ids)) == len(variants) + 1 and ids[-2] == ids[0]
