"""Bloomberg codec: snapshots of blpapi messages in, records and status events out.

There are no Bloomberg wire captures (blpapi's protocol is proprietary), so the golden
inputs are the message contents Bloomberg's own SDK tests build, as quoted in
shared/protocols.md section 5.3, and tests/samples/bloomberg_mktdata.jsonl: a session
written by hand in our capture format from Bloomberg's documented messages and fields.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
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
    # No time field: the receive time stands in, and the flag says so.
    assert rec.timestamp_ns == RECEIVE_NS
    assert rec.quality_flags == [QualityFlag.MISSING_FIELDS]
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
    first = codec.decode_messages([data({"BID": 10.0, "ASK": 10.1, "EVENT_TIME": "17:09:50"})],
                                  RECEIVE_NS, SYMBOLS, "bbg", quotes)  # fmt: skip
    second = codec.decode_messages([data({"ASK": 10.2, "EVENT_TIME": "17:09:51"})], RECEIVE_NS,
                                   SYMBOLS, "bbg", quotes)  # fmt: skip
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


def test_event_type_decides_between_trade_and_quote() -> None:
    # A typed TRADE tick gives a trade only, carrying whatever sides it has (unflagged).
    out = decode_one(data({"MKTDATA_EVENT_TYPE": "TRADE", "LAST_PRICE": 1.0,
                           "SIZE_LAST_TRADE": 3, "BID": 0.9, "ASK": "x",
                           "EVENT_TIME": "17:09:50"}))  # fmt: skip
    (trade,) = out.records
    assert (trade.data_type, trade.price, trade.volume, trade.bid, trade.ask) == (
        DataType.TRADE, 1.0, 3, 0.9, None,
    )  # fmt: skip
    assert trade.provider_specific == {"MKTDATA_EVENT_TYPE": "TRADE", "EVENT_TIME": "17:09:50"}
    assert trade.quality_flags == []
    # A typed QUOTE tick gives a quote only; its LAST_PRICE is kept as provider data.
    (quote,) = decode_one(data({"MKTDATA_EVENT_TYPE": "QUOTE", "LAST_PRICE": 1.0,
                                "BID": 0.9, "ASK": 1.1})).records  # fmt: skip
    assert (quote.data_type, quote.bid, quote.ask, quote.price) == (DataType.QUOTE, 0.9, 1.1, None)
    assert quote.provider_specific == {"MKTDATA_EVENT_TYPE": "QUOTE", "LAST_PRICE": 1.0}
    # A recap without an event type restates values: the quote only.
    recap = codec.MessageSnapshot("SUBSCRIPTION_DATA", "MarketDataEvents", [7],
                                  {"LAST_PRICE": 1.0, "BID": 0.9}, 2, "IBM US Equity")  # fmt: skip
    (quote,) = decode_one(recap).records
    assert (quote.data_type, quote.bid, quote.ask) == (DataType.QUOTE, 0.9, None)
    assert quote.provider_specific == {"LAST_PRICE": 1.0, "topic": "IBM US Equity",
                                       "recap_type": 2}  # fmt: skip
    assert quote.quality_flags == [QualityFlag.MISSING_FIELDS]
    # A recap with only trade fields has nothing new.
    assert decode_one(data({"LAST_PRICE": 1.0}, recap=1)).skipped == 1


def test_size_alone_is_a_trade_without_price() -> None:
    (rec,) = decode_one(data({"SIZE_LAST_TRADE": 40})).records
    assert (rec.data_type, rec.price, rec.volume) == (DataType.TRADE, None, 40)
    assert rec.quality_flags == [QualityFlag.MISSING_FIELDS]


@pytest.mark.parametrize(
    ("size", "volume", "flags"),
    [(7, 7, []), (2.5, 2.5, []), (None, None, []), ("7", None, [QualityFlag.MISSING_FIELDS]),
     (False, None, [QualityFlag.MISSING_FIELDS])],
)  # fmt: skip
def test_trade_size_is_flagged_only_when_present_but_not_a_number(
    size: Any, volume: Any, flags: list[str]
) -> None:
    elements = {"LAST_PRICE": 1.0, "SIZE_LAST_TRADE": size, "EVENT_TIME": "17:09:50"}
    (rec,) = decode_one(data(elements)).records
    assert (rec.price, rec.volume, rec.quality_flags) == (1.0, volume, flags)


def test_quote_cache_carries_the_ask_and_is_per_symbol() -> None:
    quotes = codec.QuoteCache()
    symbols = {7: "IBM", 8: "MSFT"}

    def quote(elements: dict[str, Any], cid: int = 7) -> RawMarketData:
        timed = {**elements, "EVENT_TIME": "17:09:50"}
        (rec,) = codec.decode_messages([data(timed, cids=[cid])], RECEIVE_NS, symbols,
                                       "bbg", quotes).records  # fmt: skip
        return rec

    quote({"BID": 10.0, "ASK": 10.1})
    bid_only = quote({"BID": 10.05})
    assert (bid_only.bid, bid_only.ask, bid_only.quality_flags) == (10.05, 10.1, [])
    assert bid_only.provider_specific == {"carried": "ASK", "EVENT_TIME": "17:09:50"}
    # The carried-over value stays the latest known side.
    ask_only = quote({"ASK": 10.2})
    assert (ask_only.bid, ask_only.ask) == (10.05, 10.2)
    assert ask_only.provider_specific == {"carried": "BID", "EVENT_TIME": "17:09:50"}
    # Another symbol does not borrow IBM's sides.
    other = quote({"BID": 5.0}, cid=8)
    assert (other.bid, other.ask, other.quality_flags) == (5.0, None, [QualityFlag.MISSING_FIELDS])
    # A side sent as null is a cleared side, not one to fill from the cache.
    cleared = quote({"BID": 10.06, "ASK": None})
    assert (cleared.bid, cleared.ask) == (10.06, None)
    assert cleared.quality_flags == [QualityFlag.MISSING_FIELDS]
    assert "carried" not in cleared.provider_specific
    # ...and the cache keeps the last real ask for a later bid-only tick.
    assert (quote({"BID": 10.07}).ask, quotes.sides["IBM"]) == (10.2, [10.07, 10.2])


def test_symbol_from_correlation_ids_then_topic() -> None:
    symbols = {7: "IBM", 8: ""}

    def symbol_of(cids: list[Any], topic: str = "") -> str:
        snap = codec.MessageSnapshot("SUBSCRIPTION_DATA", "MarketDataEvents", cids,
                                     {"LAST_PRICE": 1.0}, 0, topic)  # fmt: skip
        out = codec.decode_messages([snap], RECEIVE_NS, symbols, "bbg")
        assert out.errors == []
        return out.records[0].symbol

    assert symbol_of([99, 7]) == "IBM"  # the first id that names a symbol
    assert symbol_of([7], "MSFT US Equity") == "IBM"
    assert symbol_of([8], "MSFT US Equity") == "MSFT"  # an empty name is no name
    assert symbol_of([[1]], "VOD LN Equity") == "VOD LN Equity"  # unhashable id
    assert symbol_of([], "MSFT US Equity") == "MSFT"


def test_provider_specific_values_are_json_ready() -> None:
    el = {"LAST_PRICE": 1.0, "K": (1, dt.date(2024, 1, 2), dt.time(1, 2, 3)),
          "M": {3: Decimal("1.5"), None: True}, "T": dt.datetime(2024, 1, 2, 3, 4, 5)}  # fmt: skip
    (rec,) = decode_one(data(el)).records
    assert rec.provider_specific == {"K": [1, "2024-01-02", "01:02:03"],
                                     "M": {"3": "1.5", "None": True},
                                     "T": "2024-01-02T03:04:05"}  # fmt: skip


def test_provider_specific_clips_content_past_the_depth_limit() -> None:
    # An element's value is depth 0: containers 32 levels below it are given as their text.
    el = {"LAST_PRICE": 1.0, "L": nest([1], 32), "D": nest({"A": 1}, 32),
          "L31": nest([1], 31), "D31": nest({"A": 1}, 31)}  # fmt: skip
    (rec,) = decode_one(data(el)).records
    assert rec.provider_specific == {"L": nest("[1]", 32), "D": nest('{"A":1}', 32),
                                     "L31": nest([1], 31), "D31": nest({"A": 1}, 31)}  # fmt: skip


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


@pytest.mark.parametrize(
    ("line", "reason", "raw"),
    [
        (b"[1, 2]", "event line is not a JSON object", "[1, 2]"),
        (b'{"eventType": "ADMIN"}', "expected 'eventType' string and 'messages' array",
         '{"eventType": "ADMIN"}'),
        # A bad message is reported by itself, not by the whole line around it.
        (b'{"eventType": "ADMIN", "messages": [{"messageType": 1, "data": {}}]}',
         "message without a 'messageType' string", '{"messageType":1,"data":{}}'),
        (b'{"eventType": "ADMIN", "messages": [7]}', "message without a 'messageType' string",
         "7"),
    ],
)  # fmt: skip
def test_bad_event_lines_say_what_is_wrong_and_show_the_input(
    line: bytes, reason: str, raw: str
) -> None:
    assert codec.decode_event_line(line) == DecodeError(reason, raw)


def test_invalid_json_line_shows_the_line() -> None:
    err = codec.decode_event_line(b'{"eventType": "ADMIN", ')
    assert isinstance(err, DecodeError)
    assert err.reason.startswith("invalid JSON: ")
    assert err.raw == '{"eventType": "ADMIN", '


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


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        # Each of these names a failure by one word only; any of them must be enough.
        (codec.Reason(description="User is not authorized for this service"), "auth"),
        (codec.Reason(subcategory="NO_PERMISSION"), "auth"),
        (codec.Reason(description="Entitlement check failed"), "auth"),
        (codec.Reason(category="NO_AUTH"), "auth"),
        (codec.Reason(category="limit"), "limit"),
        (codec.Reason(description="Daily request limit reached"), "limit"),
        (codec.Reason(description="Maximum number of subscriptions exceeded"), "limit"),
        (codec.Reason("s", "IO_ERROR", "", "Connection lost", 1), "other"),
        (codec.Reason(), "other"),
    ],
)
def test_failure_kind_single_keywords(reason: codec.Reason, kind: str) -> None:
    assert codec.failure_kind(reason) == kind


def test_reason_values() -> None:
    def reason_of(value: Any) -> codec.Reason | None:
        return status("SESSION_STATUS", "SessionTerminated", {"reason": value}).reason

    assert reason_of({"errorCode": "3", "category": 5}) == codec.Reason("", "5", "", "", None)
    assert reason_of({"errorCode": True, "source": None}) == codec.Reason()
    assert reason_of({"errorCode": 0, "description": "d"}) == codec.Reason(
        description="d", error_code=0
    )
    assert reason_of("") is None and reason_of(7) is None and reason_of(None) is None
    assert str(codec.Reason()) == "no reason given"
    assert str(codec.Reason(category="C", description="D")) == "C: D"


def test_status_symbols_and_details() -> None:
    symbols = {7: "IBM", 8: "MSFT", 9: ""}

    def decoded(cids: list[Any], topic: str = "", content: Any = None) -> codec.StatusMessage:
        snap = codec.MessageSnapshot("SUBSCRIPTION_STATUS", "SubscriptionStarted", cids,
                                     {} if content is None else content, 0, topic)  # fmt: skip
        (st,) = codec.decode_messages([snap], RECEIVE_NS, symbols, "bbg").statuses
        return st

    both = decoded([7, [1], 9, 8], "X US Equity")
    assert both.symbols == ["IBM", "MSFT"] and both.correlation_ids == [7, [1], 9, 8]
    assert decoded([99], "X US Equity").symbols == ["X"]
    assert decoded([99]).symbols == []
    odd = decoded([7], content=["not", "a", "sequence"])
    assert (odd.details, odd.reason) == ({}, None)
    stamped = decoded([7], content={"at": dt.datetime(2024, 1, 2), "reason": "r"})
    assert stamped.details == {"at": "2024-01-02T00:00:00"}
    assert stamped.reason == codec.Reason(description="r")


class Unprintable:
    def __str__(self) -> str:
        raise ValueError("no text")


class FailingElements(dict[str, Any]):
    def get(self, *args: Any) -> Any:
        raise ValueError("broken content")


def test_unexpected_failures_lose_only_their_message() -> None:
    snaps = [
        codec.MessageSnapshot("ADMIN", "SlowConsumerWarning", [7], {"x": Unprintable()}),
        data(FailingElements(LAST_PRICE=1.0)),
        data({"LAST_PRICE": 2.0}),
    ]
    out = codec.decode_messages(snaps, RECEIVE_NS, SYMBOLS, "bbg")
    assert [r.price for r in out.records] == [2.0] and out.statuses == []
    assert [e.reason for e in out.errors] == [
        "unexpected ValueError: no text", "unexpected ValueError: broken content",
    ]  # fmt: skip
    assert out.errors[1].raw == (
        '{"messageType":"MarketDataEvents","correlationIds":[7],"data":{"LAST_PRICE":1.0}}'
    )
    # The status message's excerpt too (its content cannot be JSON, so as Python shows it).
    assert out.errors[0].raw.startswith("{'correlationIds': [7], 'data': {'x': <")
    assert out.errors[0].raw.endswith(">}, 'messageType': 'SlowConsumerWarning'}")


def test_market_data_without_correlation_id_or_topic() -> None:
    (err,) = decode_one(data({"LAST_PRICE": 1.0}, cids=[])).errors
    assert err == DecodeError(
        "market data message without a correlation id",
        '{"messageType":"MarketDataEvents","correlationIds":[],"data":{"LAST_PRICE":1.0}}',
    )


def test_decode_error_shows_the_message_as_json() -> None:
    snap = data({"LAST_PRICE": 1.0, "D": {"at": dt.datetime(2024, 1, 1)}}, cids=[99])
    (err,) = decode_one(snap).errors
    assert err == DecodeError(
        "unknown correlation id 99",
        '{"messageType":"MarketDataEvents","correlationIds":[99],'
        '"data":{"LAST_PRICE":1.0,"D":{"at":"2024-01-01T00:00:00"}}}',
    )


def test_skipped_counts_add_up() -> None:
    snaps = [
        codec.MessageSnapshot("TIMEOUT", "", [], {}),
        codec.MessageSnapshot("SUBSCRIPTION_DATA", "MarketBarUpdate", [7], {"LAST_PRICE": 1.0}),
        data({"VOLUME": 5}),
        data({"LAST_PRICE": 1.0}),
        codec.MessageSnapshot("ADMIN", "SlowConsumerWarning", [], {}),
    ]
    out = codec.decode_messages(snaps * 2, RECEIVE_NS, SYMBOLS, "bbg")
    assert (out.skipped, len(out.records), len(out.statuses), out.errors) == (6, 2, 2, [])


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


MIDNIGHT = 1_714_780_800_000_000_000  # 2024-05-04T00:00:00Z


@pytest.mark.parametrize(
    ("value", "receive_ns", "expected"),
    [
        ("17:09:50", RECEIVE_NS, 1_714_842_590_000_000_000),
        ({"$time": "17:09:50.25"}, RECEIVE_NS, 1_714_842_590_250_000_000),
        (dt.time(13, 9, 50, 250_000, tzinfo=dt.timezone(dt.timedelta(hours=-4))), RECEIVE_NS,
         1_714_842_590_250_000_000),
        (dt.time(0, 0, 1, 5), RECEIVE_NS, MIDNIGHT + 1_000_005_000),
        (dt.time(17, 0), -1, None),
        (dt.time(0, 0, 1), 1, 1_000_000_000),  # any positive receive time dates it
        # Exactly half a day ahead is still today; anything later is yesterday's.
        (dt.time(12, 0, 5), MIDNIGHT + 5_000_000_000, MIDNIGHT + 43_205_000_000_000),
        (dt.time(12, 0, 5, 1), MIDNIGHT + 5_000_000_000, MIDNIGHT - 43_194_999_999_000),
        # Stamped just after midnight, read just before it (clocks up to 5 minutes apart):
        # tomorrow's; further ahead it is this morning's, as a recap's last trade time is.
        (dt.time(0, 0, 1), MIDNIGHT - 1_000_000_000, MIDNIGHT + 1_000_000_000),
        (dt.time(0, 4, 58), MIDNIGHT - 1_000_000_000, MIDNIGHT + 298_000_000_000),
        # Exactly five minutes ahead is still today's.
        (dt.time(0, 4, 59), MIDNIGHT - 1_000_000_000, MIDNIGHT - 86_101_000_000_000),
        (dt.time(0, 5, 0), MIDNIGHT - 1_000_000_000, MIDNIGHT - 86_100_000_000_000),
        (dt.time(9, 30), MIDNIGHT + 79_200_000_000_000, MIDNIGHT + 34_200_000_000_000),
        ("2024-05-04", RECEIVE_NS, MIDNIGHT),
        (dt.datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=dt.UTC), 0, -1_000),
        ({"$datetime": "junk"}, RECEIVE_NS, None),
        ({"$time": "17:09:50", "x": 1}, RECEIVE_NS, None),
        (dt.date(2024, 5, 4), RECEIVE_NS, None),
        (1_714_842_590, RECEIVE_NS, None),
    ],
)  # fmt: skip
def test_time_ns_cases(value: Any, receive_ns: int, expected: int | None) -> None:
    assert codec.time_ns(value, receive_ns) == expected


def test_time_of_day_without_receive_time_is_unknown() -> None:
    assert codec.time_ns(dt.time(17, 9, 50)) is None
    assert codec.time_ns("17:09:50") is None


@pytest.mark.parametrize(
    ("times", "expected"),
    [
        # The latest usable stamp wins, wherever it is in the list.
        ({"TRADE_UPDATE_STAMP_RT": "2024-05-04T17:09:52+00:00",
          "EVT_TRADE_TIME_RT": "2024-05-04T17:09:51+00:00", "EVENT_TIME": "17:09:53"},
         1_714_842_592_000_000_000),
        ({"TRADE_UPDATE_STAMP_RT": "junk", "EVT_TRADE_TIME_RT": "2024-05-04T17:09:51+00:00",
          "EVENT_TIME": "17:09:53"}, 1_714_842_591_000_000_000),
        # Without stamps, the first usable fallback.
        ({"EVENT_TIME": "17:09:48", "TIME": "17:09:49"}, 1_714_842_588_000_000_000),
        ({"EVENT_TIME": "junk", "TIME": "17:09:49"}, 1_714_842_589_000_000_000),
        ({"EVENT_TIME": None, "TIME": None}, RECEIVE_NS),
        # Fields of the other kind do not count.
        ({"BID_UPDATE_STAMP_RT": "2024-05-04T17:09:51+00:00"}, RECEIVE_NS),
    ],
)  # fmt: skip
def test_trade_time_fields(times: dict[str, Any], expected: int) -> None:
    (rec,) = decode_one(data({"LAST_PRICE": 1.0, **times})).records
    assert rec.timestamp_ns == expected


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
    assert codec.symbol_for_topic(" US Equity") == " US Equity"  # nothing would be left
    assert codec.symbol_for_topic("IBM US Equity", "") == "IBM US Equity"
    assert codec.symbol_for_topic("VOD LN Equity", " LN Equity") == "VOD"
    assert codec.topic_for("VOD", " LN Equity") == "VOD LN Equity"
    assert codec.fields_for([DataType.TRADE]) == list(codec.TRADE_FIELDS)
    assert codec.fields_for([DataType.QUOTE]) == list(codec.QUOTE_FIELDS)
    # Nothing trade or quote asked for: trades, the least a subscription can carry.
    assert codec.fields_for([]) == list(codec.TRADE_FIELDS)
    assert codec.fields_for([DataType.NEWS]) == list(codec.TRADE_FIELDS)
    assert codec.fields_for([DataType.QUOTE, DataType.TRADE]) == list(
        codec.TRADE_FIELDS + codec.QUOTE_FIELDS
    )
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


def test_event_line_defaults_and_odd_member_types() -> None:
    messages = [
        {"messageType": "MarketDataEvents"},
        {"messageType": "MarketDataEvents", "correlationIds": 5,
         "data": [{"$date": "2024-01-02"}], "recapType": "1", "topic": 5},
        {"messageType": "MarketDataEvents", "data": "garbage", "recapType": True},
    ]  # fmt: skip
    line = orjson.dumps({"eventType": "SUBSCRIPTION_DATA", "messages": messages,
                         "receive_ns": "soon"})  # fmt: skip
    event = codec.decode_event_line(line)
    assert isinstance(event, codec.WireEvent)
    assert event.receive_ns == 0
    empty, odd, text = event.messages
    # Missing members take the snapshot defaults.
    assert empty == codec.MessageSnapshot("SUBSCRIPTION_DATA", "MarketDataEvents", [], {}, 0, "")
    # A single correlation value becomes a list; wrongly typed recap and topic are dropped;
    # a payload that is not an object is kept exactly as sent (decoding reports it).
    assert odd == codec.MessageSnapshot(
        "SUBSCRIPTION_DATA", "MarketDataEvents", [5], [{"$date": "2024-01-02"}], 0, ""
    )
    assert text.elements == "garbage" and text.recap_type == 0
    no_time = codec.decode_event_line(b'{"eventType": "ADMIN", "messages": []}')
    assert no_time == codec.WireEvent("ADMIN", [], 0)


def nest(inner: Any, depth: int) -> Any:
    """``inner`` under ``depth`` containers, dicts and lists in turn."""
    for level in range(depth):
        inner = {"K": inner} if level % 2 else [inner]
    return inner


def test_event_line_untags_up_to_the_depth_limit() -> None:
    tagged = {"$date": "2024-01-02"}
    data = {"AT_LIMIT": nest(tagged, 30), "PAST_LIMIT": nest(tagged, 31)}
    line = orjson.dumps({"eventType": "ADMIN",
                         "messages": [{"messageType": "DataLoss", "data": data}]})  # fmt: skip
    event = codec.decode_event_line(line)
    assert isinstance(event, codec.WireEvent)
    (snap,) = event.messages
    # The data object is depth 0: a value 31 containers below it is the deepest restored.
    assert snap.elements == {
        "AT_LIMIT": nest(dt.date(2024, 1, 2), 30),
        "PAST_LIMIT": nest(tagged, 31),
    }


def test_deeply_nested_event_line_does_not_raise() -> None:
    # Near the JSON parser's own nesting limit, past Python's recursion limit.
    depth = 1000
    nested = b'{"K": [' * (depth // 2) + b"1" + b"]}" * (depth // 2)
    line = b'{"eventType": "ADMIN", "messages": [{"messageType": "DataLoss", "data": {"D": '
    event = codec.decode_event_line(line + nested + b"}}]}")
    assert isinstance(event, codec.WireEvent)
    value = event.messages[0].elements["D"]
    for _ in range(depth // 2):  # walked by hand: == on it would hit the recursion limit
        (value,) = value["K"]
    assert value == 1


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
        assert all(r.provider_sequence is None for r in records)
        # Only a record whose time is the receive time is flagged (the paint, the SDK tick).
        assert [r.quality_flags for r in records] == [
            [QualityFlag.MISSING_FIELDS] if r.timestamp_ns == r.receive_ns else [] for r in records
        ]
        assert sum(1 for r in records if r.quality_flags) == (
            2 if path.name == "bloomberg_mktdata.jsonl" else 0
        )


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
