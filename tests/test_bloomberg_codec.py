"""Bloomberg codec: snapshots of blpapi messages in, records and status events out.

There are no Bloomberg wire captures (blpapi's protocol is proprietary), so the golden
inputs are the message contents Bloomberg's own SDK tests build, as quoted in
shared/protocols.md section 5.3, and tests/samples/bloomberg_mktdata.jsonl: a session
written by hand in our capture format from Bloomberg's documented messages and fields.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from common.codecs import bloomberg as codec
from common.codecs.base import CaptureError, DecodeError
from common.model import DataType, QualityFlag, RawMarketData
from simulators import bloomberg as standin
from tests import SHARED

FIXTURES = SHARED / "fixtures"
SAMPLES = Path(__file__).parent / "samples"
RECEIVE_NS = 1_714_842_592_462_000_000  # 2024-05-04T17:09:52.462Z
SYMBOLS = {7: "IBM"}


def reason(category: str = "IO_ERROR", description: str = "x") -> dict[str, Any]:
    return {"source": "s", "errorCode": 3, "category": category,
            "description": description, "subcategory": "sub"}  # fmt: skip


def data(elements: Any, cids: list[Any] | None = None, recap: int = 0) -> codec.MessageSnapshot:
    return codec.MessageSnapshot(
        "SUBSCRIPTION_DATA", "MarketDataEvents", [7] if cids is None else cids, elements, recap
    )


def decode_one(snap: codec.MessageSnapshot) -> codec.DecodedEvent:
    return codec.decode_messages([snap], RECEIVE_NS, SYMBOLS, "bbg", codec.QuoteCache())


# ---------------------------------------------------------------- market data


def test_sdk_test_tick_last_price_only() -> None:
    # Bloomberg's example test: {"LAST_PRICE": 142.80} with nothing else.
    out = decode_one(data({"LAST_PRICE": 142.80}))
    assert out.errors == [] and out.statuses == []
    (rec,) = out.records
    assert (rec.symbol, rec.provider, rec.data_type) == ("IBM", "bbg", DataType.TRADE)
    assert rec.price == 142.80 and rec.volume is None
    assert rec.timestamp_ns == RECEIVE_NS  # no time field: the receive time stands in
    assert rec.quality_flags == []
    assert rec.provider_sequence is None and rec.sequence_contiguous is False
    assert rec.stream == "T.IBM"


def test_trade_tick_with_stamp() -> None:
    stamp = dt.datetime(2024, 5, 4, 17, 9, 52, 123456, tzinfo=dt.UTC)
    out = decode_one(data(codec.trade_elements(101.25, 300, 12_345, stamp)))
    (rec,) = out.records
    assert rec.data_type is DataType.TRADE
    assert (rec.price, rec.volume) == (101.25, 300)
    assert rec.timestamp_ns == 1_714_842_592_123_456_000
    assert rec.receive_ns == RECEIVE_NS
    assert rec.provider_specific["VOLUME"] == 12_345
    assert rec.provider_specific["MKTDATA_EVENT_TYPE"] == "TRADE"
    assert rec.provider_specific["TRADE_UPDATE_STAMP_RT"] == "2024-05-04T17:09:52.123456+00:00"


def test_quote_tick() -> None:
    stamp = dt.datetime(2024, 5, 4, 17, 9, 52, tzinfo=dt.UTC)
    out = decode_one(data(codec.quote_elements(99.5, 200, 99.52, 300, stamp)))
    (rec,) = out.records
    assert rec.data_type is DataType.QUOTE
    assert (rec.bid, rec.ask, rec.price) == (99.5, 99.52, None)
    assert rec.provider_specific["BID_SIZE"] == 200 and rec.provider_specific["ASK_SIZE"] == 300
    assert rec.timestamp_ns == 1_714_842_592_000_000_000
    assert rec.stream == "Q.IBM" and rec.quality_flags == []


def test_one_sided_quote_carries_the_other_side() -> None:
    quotes = codec.QuoteCache()
    first = codec.decode_messages([data({"BID": 10.0, "ASK": 10.1})], RECEIVE_NS, SYMBOLS,
                                  "bbg", quotes)  # fmt: skip
    second = codec.decode_messages([data({"ASK": 10.2})], RECEIVE_NS, SYMBOLS, "bbg", quotes)
    assert (first.records[0].bid, first.records[0].ask) == (10.0, 10.1)
    rec = second.records[0]
    assert (rec.bid, rec.ask) == (10.0, 10.2)
    assert rec.provider_specific["carried"] == "BID"
    assert rec.quality_flags == []


def test_one_sided_quote_without_history_is_flagged() -> None:
    (rec,) = decode_one(data({"ASK": 10.2})).records
    assert rec.bid is None and rec.ask == 10.2
    assert rec.quality_flags == [QualityFlag.MISSING_FIELDS]


def test_initial_paint_gives_a_quote_not_a_trade() -> None:
    paint = {"MKTDATA_EVENT_TYPE": "SUMMARY", "MKTDATA_EVENT_SUBTYPE": "INITPAINT",
             "LAST_PRICE": 50.0, "BID": 49.9, "ASK": 50.1, "VOLUME": 7}  # fmt: skip
    (rec,) = decode_one(data(paint, recap=1)).records
    assert rec.data_type is DataType.QUOTE
    assert (rec.bid, rec.ask) == (49.9, 50.1)
    assert rec.provider_specific["LAST_PRICE"] == 50.0
    assert rec.provider_specific["recap_type"] == 1


def test_untyped_tick_with_trade_and_quote_fields_gives_both() -> None:
    out = decode_one(data({"LAST_PRICE": 5.0, "SIZE_LAST_TRADE": 10, "BID": 4.9, "ASK": 5.1}))
    kinds = [(r.data_type, r.price, r.bid, r.ask) for r in out.records]
    assert kinds == [(DataType.TRADE, 5.0, 4.9, 5.1), (DataType.QUOTE, None, 4.9, 5.1)]


def test_tick_without_price_fields_is_skipped() -> None:
    out = decode_one(data({"VOLUME": 1000}))
    assert out.records == [] and out.errors == [] and out.skipped == 1


def test_other_subscription_data_message_types_are_skipped() -> None:
    snap = codec.MessageSnapshot("SUBSCRIPTION_DATA", "MarketBarStart", [7], {"OPEN": 1.0})
    out = decode_one(snap)
    assert out.records == [] and out.skipped == 1


# ---------------------------------------------------------------- malformed input


def test_wrong_types_flag_missing_fields() -> None:
    out = decode_one(data({"MKTDATA_EVENT_TYPE": "TRADE", "LAST_PRICE": "n/a",
                           "SIZE_LAST_TRADE": "x"}))  # fmt: skip
    (rec,) = out.records
    assert rec.price is None and rec.volume is None
    assert rec.quality_flags == [QualityFlag.MISSING_FIELDS]
    assert "LAST_PRICE" not in rec.provider_specific  # mapped fields are not repeated
    bools = decode_one(data({"LAST_PRICE": True})).records[0]
    assert bools.price is None and QualityFlag.MISSING_FIELDS in bools.quality_flags


@pytest.mark.parametrize(
    ("snap", "reason_part"),
    [
        (data({"LAST_PRICE": 1.0}, cids=[]), "without a correlation id"),
        (data({"LAST_PRICE": 1.0}, cids=[99]), "unknown correlation id 99"),
        (data({"LAST_PRICE": 1.0}, cids=[[1, 2]]), "unknown correlation id"),
        (data(["LAST_PRICE", 1.0]), "not a sequence"),
        (data("garbage"), "not a sequence"),
    ],
)
def test_undecodable_messages_become_decode_errors(
    snap: codec.MessageSnapshot, reason_part: str
) -> None:
    good = data({"LAST_PRICE": 2.0})
    out = codec.decode_messages([snap, good], RECEIVE_NS, SYMBOLS, "bbg")
    assert len(out.errors) == 1 and reason_part in out.errors[0].reason
    # Decoding went on after the bad message.
    assert [r.price for r in out.records] == [2.0]


@pytest.mark.parametrize(
    "line",
    [b"", b"{", b"[]", b'{"eventType": 1, "messages": []}', b'{"eventType": "ADMIN"}',
     b'{"eventType": "ADMIN", "messages": [1]}',
     b'{"eventType": "ADMIN", "messages": [{"data": {}}]}'],
)  # fmt: skip
def test_bad_event_lines_give_decode_errors(line: bytes) -> None:
    assert isinstance(codec.decode_event_line(line), DecodeError)


def test_bad_request_lines_raise_codec_error() -> None:
    for line in (b"{", b"[]", b'{"op": 3}'):
        with pytest.raises(codec.CodecError):
            codec.decode_request_line(line)


# ---------------------------------------------------------------- status messages


def status(event_type: str, message_type: str, content: dict[str, Any],
           cids: list[Any] | None = None) -> codec.StatusMessage:  # fmt: skip
    snap = codec.MessageSnapshot(event_type, message_type, cids or [], content)
    out = decode_one(snap)
    assert out.records == [] and out.errors == []
    (st,) = out.statuses
    return st


def test_session_status_messages() -> None:
    started = status("SESSION_STATUS", "SessionStarted",
                     {"initialEndpoints": [{"address": "12.34.56.78:8194"}]})  # fmt: skip
    assert started.message_type == codec.SESSION_STARTED and started.reason is None
    assert started.details["initialEndpoints"] == [{"address": "12.34.56.78:8194"}]
    failure = status("SESSION_STATUS", "SessionStartupFailure", {"reason": reason("NO_AUTH")})
    assert failure.reason == codec.Reason("s", "NO_AUTH", "sub", "x", 3)
    assert codec.failure_kind(failure.reason) == "auth"
    ended = status("SESSION_STATUS", "SessionTerminated", {"reason": reason()})
    assert ended.reason is not None and ended.reason.category == "IO_ERROR"
    assert codec.failure_kind(ended.reason) == "other"
    up = status("SESSION_STATUS", "SessionConnectionUp",
                {"server": "12.34.56.78:8194", "serverId": "ny-hostname",
                 "encryptionStatus": "Clear", "compressionStatus": "Uncompressed"})  # fmt: skip
    assert up.details["serverId"] == "ny-hostname"
    down = status("SESSION_STATUS", "SessionConnectionDown",
                  {"server": "12.34.56.78:8194", "serverId": "ny-hostname"})  # fmt: skip
    assert down.message_type == codec.SESSION_CONNECTION_DOWN


def test_service_status_messages() -> None:
    opened = status("SERVICE_STATUS", "ServiceOpened", {"serviceName": "//blp/mktdata"})
    assert opened.details == {"serviceName": "//blp/mktdata"}
    failed = status("SERVICE_STATUS", "ServiceOpenFailure", {"reason": reason("NOT_FOUND")})
    assert failed.reason is not None and failed.reason.category == "NOT_FOUND"


def test_subscription_status_messages() -> None:
    started = status(
        "SUBSCRIPTION_STATUS", "SubscriptionStarted",
        {"exceptions": [{"fieldId": "NOPE", "reason": reason("BAD_FLD", "Unknown Field")}],
         "resubscriptionId": 0, "streamIds": ["1"], "receivedFrom": {"address": "a:1"},
         "reason": "Subscriber made a subscription"},
        [7],
    )  # fmt: skip
    assert started.symbols == ["IBM"]
    assert started.details["exceptions"][0]["fieldId"] == "NOPE"
    assert started.reason == codec.Reason(description="Subscriber made a subscription")
    failed = status("SUBSCRIPTION_STATUS", "SubscriptionFailure",
                    {"reason": reason("BAD_SEC", "Invalid security"), "failureDetails": [],
                     "resubscriptionId": 0}, [7])  # fmt: skip
    assert failed.symbols == ["IBM"] and str(failed.reason) == "BAD_SEC: sub: Invalid security"
    ended = status("SUBSCRIPTION_STATUS", "SubscriptionTerminated", {"reason": reason()}, [7])
    assert ended.message_type == codec.SUBSCRIPTION_TERMINATED and ended.symbols == ["IBM"]


def test_admin_messages() -> None:
    assert status("ADMIN", "SlowConsumerWarning", {}).details == {}
    cleared = status("ADMIN", "SlowConsumerWarningCleared", {"eventsDropped": 123})
    assert cleared.details["eventsDropped"] == 123
    loss = status("ADMIN", "DataLoss", {"id": 1, "source": "s", "numMessagesDropped": 123}, [7])
    assert loss.details["numMessagesDropped"] == 123 and loss.symbols == ["IBM"]


def test_failure_kinds() -> None:
    assert codec.failure_kind(None) == "other"
    assert codec.failure_kind(codec.Reason(description="Not entitled to //blp/mktdata")) == "auth"
    assert codec.failure_kind(codec.Reason(category="LIMIT")) == "limit"
    assert codec.failure_kind(codec.Reason(description="subscription limit exceeded")) == "limit"


def test_timeout_events_are_skipped() -> None:
    out = decode_one(codec.MessageSnapshot("TIMEOUT", "", [], {}))
    assert out.statuses == [] and out.skipped == 1


# ---------------------------------------------------------------- times


def test_time_values() -> None:
    aware = dt.datetime(2024, 5, 4, 13, 9, 52, 5, tzinfo=dt.timezone(dt.timedelta(hours=-4)))
    assert codec.time_ns(aware) == 1_714_842_592_000_005_000
    assert codec.time_ns(dt.datetime(2024, 5, 4, 17, 9, 52)) == 1_714_842_592_000_000_000
    assert codec.time_ns("2024-05-04T17:09:52+00:00") == 1_714_842_592_000_000_000
    assert codec.time_ns({"$datetime": "2024-05-04T17:09:52+00:00"}) == 1_714_842_592_000_000_000
    # A time of day takes the receive date...
    assert codec.time_ns(dt.time(17, 9, 50), RECEIVE_NS) == 1_714_842_590_000_000_000
    # ...and the day before when it would otherwise lie far in the future.
    just_after_midnight = 1_714_780_800_000_000_000 + 5_000_000_000  # 2024-05-04T00:00:05Z
    assert codec.time_ns(dt.time(23, 59, 58), just_after_midnight) == (
        1_714_780_800_000_000_000 - 2_000_000_000
    )
    assert codec.time_ns(dt.time(1, 0), 0) is None
    assert codec.time_ns("not a time") is None and codec.time_ns(3.5) is None


def test_event_time_prefers_latest_stamp_then_fallbacks() -> None:
    el = {"BID": 1.0, "ASK": 1.1, "BID_UPDATE_STAMP_RT": "2024-05-04T17:09:50+00:00",
          "ASK_UPDATE_STAMP_RT": "2024-05-04T17:09:51+00:00", "EVENT_TIME": "17:00:00"}  # fmt: skip
    (rec,) = decode_one(data(el)).records
    assert rec.timestamp_ns == 1_714_842_591_000_000_000
    (rec,) = decode_one(data({"LAST_PRICE": 1.0, "EVENT_TIME": dt.time(17, 9, 50)})).records
    assert rec.timestamp_ns == 1_714_842_590_000_000_000


# ---------------------------------------------------------------- topics, fields, lines


def test_topics_fields_and_subscription_strings() -> None:
    assert codec.topic_for("IBM") == "IBM US Equity"
    assert codec.topic_for("EURUSD Curncy") == "EURUSD Curncy"
    assert codec.topic_for("/isin/US4592001014") == "/isin/US4592001014"
    assert codec.symbol_for_topic("IBM US Equity") == "IBM"
    assert codec.symbol_for_topic("EURUSD Curncy") == "EURUSD Curncy"
    assert codec.fields_for([DataType.TRADE]) == list(codec.TRADE_FIELDS)
    assert codec.fields_for([DataType.QUOTE]) == list(codec.QUOTE_FIELDS)
    assert codec.subscription_options(5) == "interval=5" and codec.subscription_options(None) == ""
    subs = standin.SubscriptionList()
    subs.add("IBM US Equity", ["BID", "ASK"], "interval=2", standin.CorrelationId(1))
    text = subs.topicStringAt(0)
    assert text == "IBM US Equity?fields=BID,ASK&interval=2"
    assert codec.parse_subscription_string(text) == (
        "IBM US Equity",
        ["BID", "ASK"],
        {"interval": "2"},
    )
    assert codec.parse_subscription_string("//blp/mktdata/ticker/IBM US Equity")[0] == (
        "IBM US Equity"
    )


def test_event_line_round_trip() -> None:
    stamp = dt.datetime(2024, 5, 4, 17, 9, 52, 123456, tzinfo=dt.UTC)
    snaps = [
        codec.market_data_message(3, "IBM US Equity", codec.trade_elements(1.5, 2, 3, stamp)),
        codec.MessageSnapshot("SUBSCRIPTION_DATA", "MarketDataEvents", [4],
                              {"EVENT_TIME": dt.time(1, 2, 3), "D": dt.date(2024, 1, 2),
                               "NESTED": {"A": [1, {"B": None}]}}, 1, "X US Equity"),
    ]  # fmt: skip
    line = codec.encode_event_line("SUBSCRIPTION_DATA", snaps, receive_ns=42)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    event = codec.decode_event_line(line)
    assert isinstance(event, codec.WireEvent)
    assert event.event_type == "SUBSCRIPTION_DATA" and event.receive_ns == 42
    assert event.messages == snaps


def test_request_line_round_trip() -> None:
    line = codec.encode_request_line("subscribe", subscriptions=[{"id": 1, "string": "X"}])
    req = codec.decode_request_line(line)
    assert req == codec.StandInRequest("subscribe", {"subscriptions": [{"id": 1, "string": "X"}]})


def test_decode_capture_locates_errors_and_goes_on() -> None:
    stamp = dt.datetime(2024, 5, 4, 17, 9, 52, tzinfo=dt.UTC)
    good = codec.encode_event_line(
        "SUBSCRIPTION_DATA",
        [codec.market_data_message(1, "IBM US Equity", codec.trade_elements(9.5, 100, 100, stamp))],
    )
    orphan = codec.encode_event_line("SUBSCRIPTION_DATA", [data({"LAST_PRICE": 1.0}, cids=[])])
    out = list(codec.decode_capture(b"not json\n\n" + good + orphan + good))
    assert [type(x).__name__ for x in out] == [
        "CaptureError", "RawMarketData", "CaptureError", "RawMarketData"
    ]  # fmt: skip
    first = out[0]
    assert isinstance(first, CaptureError) and first.location == "line 1"
    third = out[2]
    assert isinstance(third, CaptureError) and third.location == "line 4"
    rec = out[1]
    assert isinstance(rec, RawMarketData)
    assert (rec.symbol, rec.price, rec.volume) == ("IBM", 9.5, 100)
    assert rec.timestamp_ns == 1_714_842_592_000_000_000


def test_decode_capture_with_symbol_argument() -> None:
    line = codec.encode_event_line("SUBSCRIPTION_DATA", [data({"LAST_PRICE": 3.0}, cids=[5])])
    (rec,) = codec.decode_capture(line, symbol="VOD LN Equity")
    assert isinstance(rec, RawMarketData) and rec.symbol == "VOD LN Equity" and rec.price == 3.0


# ---------------------------------------------------------------- blpapi objects -> snapshots


def test_snapshot_from_standin_message() -> None:
    stamp = dt.datetime(2024, 5, 4, 17, 9, 52, tzinfo=dt.UTC)
    cid = standin.CorrelationId(7)
    msg = standin.Message(standin.Name("MarketDataEvents"), [cid],
                          codec.trade_elements(4.0, 5, 6, stamp), 0)  # fmt: skip
    event = standin.Event(standin.Event.SUBSCRIPTION_DATA, [msg])
    snaps, errors = codec.snapshot_event(event, "SUBSCRIPTION_DATA")
    assert errors == []
    (snap,) = snaps
    assert snap.correlation_ids == [7] and snap.message_type == "MarketDataEvents"
    assert snap.elements["TRADE_UPDATE_STAMP_RT"] == stamp
    (rec,) = decode_one(snap).records
    assert (rec.price, rec.volume, rec.timestamp_ns) == (4.0, 5, 1_714_842_592_000_000_000)


class ElementOnlyMessage:
    """A message from a blpapi without ``toPy()``: only the Element accessors."""

    def __init__(self, content: dict[str, Any]) -> None:
        self._el = standin.Element(standin.Name("MarketDataEvents"), content)

    def messageType(self) -> standin.Name:
        return standin.Name("MarketDataEvents")

    def correlationIds(self) -> list[standin.CorrelationId]:
        return [standin.CorrelationId(7)]

    def asElement(self) -> standin.Element:
        return self._el


def test_snapshot_walks_elements_without_to_py() -> None:
    content = {"LAST_PRICE": 3.25, "NULL": None, "ARR": [1, 2], "SEQ": {"A": "b"},
               "ARR_SEQ": [{"X": 1}]}  # fmt: skip
    snap = codec.snapshot_message(ElementOnlyMessage(content), "SUBSCRIPTION_DATA")
    assert snap.elements == content and snap.recap_type == 0


def test_autogenerated_correlation_ids_do_not_collide() -> None:
    auto = standin.CorrelationId._generated()
    msg = standin.Message(standin.Name("ServiceOpened"), [auto], {"serviceName": "x"})
    snap = codec.snapshot_message(msg, "SERVICE_STATUS")
    assert snap.correlation_ids == [f"autogen:{auto.value()}"]


def test_broken_message_objects_become_decode_errors() -> None:
    class Broken:
        def messageType(self) -> str:
            raise RuntimeError("boom")

    snaps, errors = codec.snapshot_event([Broken(), ElementOnlyMessage({})], "SUBSCRIPTION_DATA")
    assert len(snaps) == 1 and len(errors) == 1 and "boom" in errors[0].reason
    snaps, errors = codec.snapshot_event(42, "ADMIN")
    assert snaps == [] and "cannot iterate" in errors[0].reason


# ---------------------------------------------------------------- capture files


def capture_files() -> list[Path]:
    """Bloomberg captures in shared/fixtures when it has any, and our samples always."""
    shared = sorted(FIXTURES.glob("bloomberg*")) if FIXTURES.is_dir() else []
    return shared + sorted(SAMPLES.glob("bloomberg*"))


Q, T = DataType.QUOTE, DataType.TRADE
CUSIP = "/cusip/912828GM6@BGN"
# What each sample of ours decodes to: (data_type, symbol, timestamp_ns, price, volume, bid,
# ask, stream, receive_ns).
SAMPLE_RECORDS = {
    "bloomberg_mktdata.jsonl": [
        # Initial paint (SUMMARY, solicited recap): the quote only, at the receive time.
        (Q, "IBM", 1_714_746_600_500_000_000, None, None, 142.74, 142.8, "Q.IBM",
         1_714_746_600_500_000_000),
        # The SDK test's tick, LAST_PRICE alone: a trade without size or time.
        (T, "IBM", 1_714_746_601_000_000_000, 142.8, None, None, None, "T.IBM",
         1_714_746_601_000_000_000),
        (T, "IBM", 1_714_746_601_250_000_000, 142.81, 200, None, None, "T.IBM",
         1_714_746_602_000_000_000),
        # A bid-only quote: the ask comes from the paint.
        (Q, "IBM", 1_714_746_601_250_000_000, None, None, 142.79, 142.8, "Q.IBM",
         1_714_746_602_000_000_000),
        # EVENT_TIME is a time of day, dated by the receive time.
        (Q, CUSIP, 1_714_746_602_125_000_000, None, None, 99.953125, 99.96875, f"Q.{CUSIP}",
         1_714_746_603_000_000_000),
    ],
}  # fmt: skip


@pytest.mark.parametrize("path", capture_files(), ids=lambda p: p.name)
def test_capture_files_decode(path: Path) -> None:
    out = list(codec.decode_capture(path.read_bytes()))
    assert [x for x in out if isinstance(x, CaptureError)] == [], path.name
    records = [x for x in out if isinstance(x, RawMarketData)]
    assert records, path.name
    if path.parent == SAMPLES:
        got = [(r.data_type, r.symbol, r.timestamp_ns, r.price, r.volume, r.bid, r.ask,
                r.stream, r.receive_ns) for r in records]  # fmt: skip
        assert got == SAMPLE_RECORDS[path.name]
        assert all(r.provider_sequence is None and r.quality_flags == [] for r in records)


def test_every_sample_has_expected_records() -> None:
    assert sorted(p.name for p in SAMPLES.glob("bloomberg*")) == sorted(SAMPLE_RECORDS)


def test_sample_session_statuses() -> None:
    statuses: list[codec.StatusMessage] = []
    for line in (SAMPLES / "bloomberg_mktdata.jsonl").read_bytes().splitlines():
        event = codec.decode_event_line(line)
        assert isinstance(event, codec.WireEvent)
        out = codec.decode_messages(event.messages, event.receive_ns, {}, "bbg")
        assert out.errors == []
        statuses += out.statuses
    assert [(s.event_type, s.message_type, s.symbols) for s in statuses] == [
        ("SESSION_STATUS", "SessionConnectionUp", []),
        ("SESSION_STATUS", "SessionStarted", []),
        ("SERVICE_STATUS", "ServiceOpened", []),
        ("SUBSCRIPTION_STATUS", "SubscriptionStarted", ["IBM"]),
        ("SUBSCRIPTION_STATUS", "SubscriptionStarted", [CUSIP]),
        ("ADMIN", "SlowConsumerWarning", []),
        ("ADMIN", "DataLoss", []),
        ("SUBSCRIPTION_STATUS", "SubscriptionTerminated", ["IBM"]),
    ]
    assert statuses[1].details == {"initialEndpoints": [{"address": "12.34.56.78:8194"}]}
    assert statuses[2].details == {"serviceName": "//blp/mktdata"}
    # A field the security does not have is reported in SubscriptionStarted, not a failure.
    [bad_field] = statuses[4].details["exceptions"]
    assert bad_field["fieldId"] == "BID_YIELD"
    assert codec.Reason(description="Subscriber made a subscription") == statuses[3].reason
    assert statuses[6].details["numMessagesDropped"] == 123
    assert statuses[7].reason == codec.Reason(
        "12.34.56.78:8194", "CANCELED", "", "Subscription canceled", 2
    )
