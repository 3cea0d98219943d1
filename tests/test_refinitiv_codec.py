"""The Refinitiv tr_json2 codec against the real capture, the spec's examples and bad input."""

from __future__ import annotations

from collections import deque
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.codecs import refinitiv as codec
from common.codecs.base import CaptureError, CodecError, DecodeError
from common.model import DataType, QualityFlag, RawMarketData
from common.quality import QualityChecker
from tests import SHARED

FIXTURES = SHARED / "fixtures"
needs_fixtures = pytest.mark.skipif(
    not FIXTURES.is_dir(), reason=f"shared fixtures folder {FIXTURES} is absent"
)

RECEIVE_NS = 1_700_000_000_000_000_000  # 2023-11-14T22:13:20Z


def fixture_lines(name: str) -> list[bytes]:
    return [line for line in (FIXTURES / name).read_bytes().splitlines() if line.strip()]


def ns(iso: str) -> int:
    dt = datetime.fromisoformat(iso).replace(tzinfo=UTC)
    return int(dt.timestamp()) * 1_000_000_000 + dt.microsecond * 1000


def frame(*messages: dict[str, Any]) -> bytes:
    return orjson.dumps(list(messages))


# ---------------------------------------------------------------- the real capture


@needs_fixtures
def test_capture_login_refresh_is_accepted_with_ping_timeout() -> None:
    lines = fixture_lines("refinitiv_ws.jsonl")
    out = codec.ConsumerProtocol().decode(lines[0], RECEIVE_NS)
    assert out.errors == [] and out.records == []
    [login] = out.logins
    assert login.accepted and not login.closed
    assert login.ping_timeout_s == 30.0
    assert login.state.text == "Login accepted by host oaklapi352."
    assert login.elements["MaxMsgSize"] == 65535


@needs_fixtures
def test_capture_refresh_gives_dated_quote_and_no_trade() -> None:
    lines = fixture_lines("refinitiv_ws.jsonl")
    consumer = codec.ConsumerProtocol()
    out = consumer.decode(lines[1], RECEIVE_NS)
    assert out.errors == []
    refresh, update = out.records
    assert refresh.data_type is DataType.QUOTE
    assert (refresh.symbol, refresh.bid, refresh.ask) == ("TRI.N", 44.33, 44.34)
    assert refresh.price is None and refresh.volume is None
    # QUOTE_DATE 2017-11-29 + QUOTIM_MS 68515583 (19:01:55.583 UTC).
    assert refresh.timestamp_ns == ns("2017-11-29T19:01:55.583")
    assert refresh.provider_sequence == 58352
    assert refresh.stream == "Q.TRI.N" and refresh.sequence_contiguous is False
    assert refresh.receive_ns == RECEIVE_NS
    assert refresh.provider_specific["BIDSIZE"] == 10
    assert refresh.provider_specific["ASKSIZE"] == 4
    assert refresh.provider_specific["Type"] == "Refresh"
    assert refresh.quality_flags == []
    # The second message is a Quote update; the live receive time decides its date.
    assert update.provider_specific["UpdateType"] == "Quote"
    assert update.provider_sequence == 58368
    # QUOTIM_MS 68518777 is 19:01:58.777, dated the receive day (2023-11-14).
    assert update.timestamp_ns == ns("2023-11-14T19:01:58.777")
    assert (update.symbol, update.bid, update.ask) == ("TRI.N", 44.33, 44.34)
    assert consumer.ids_by_name == {"TRI.N": 2}


@needs_fixtures
def test_capture_odd_lot_trade_update_yields_no_record() -> None:
    lines = fixture_lines("refinitiv_ws.jsonl")
    consumer = codec.ConsumerProtocol()
    consumer.decode(lines[1], RECEIVE_NS)
    out = consumer.decode(lines[2], RECEIVE_NS)
    # UpdateType Trade but no TRDPRC_1: an odd-lot print (ODD_PRC), not a last-sale trade.
    assert out.errors == [] and out.records == [] and out.skipped == 1


@needs_fixtures
def test_capture_quote_updates_decode_in_order() -> None:
    lines = fixture_lines("refinitiv_ws.jsonl")
    consumer = codec.ConsumerProtocol()
    for line in lines[:3]:
        consumer.decode(line, 0)
    out4 = consumer.decode(lines[3], 0)
    assert out4.skipped == 2  # two Unspecified updates (LULD bands), no quote or trade
    assert [r.provider_sequence for r in out4.records] == [58432, 58448]
    # No receive time: the date comes from the item's Refresh (QUOTE_DATE 2017-11-29).
    assert out4.records[0].timestamp_ns == ns("2017-11-29T19:02:00.061")
    out5 = consumer.decode(lines[4], 0)
    out6 = consumer.decode(lines[5], 0)
    assert all(r.data_type is DataType.QUOTE for r in out5.records + out6.records)
    assert [r.provider_specific["BIDSIZE"] for r in out5.records[:3]] == [9, 8, 7]
    last = out6.records[-1]
    assert (last.bid, last.ask, last.provider_sequence) == (44.33, 44.34, 58768)
    assert last.provider_specific["ASKSIZE"] == 11
    assert last.timestamp_ns == ns("2017-11-29T19:02:01.810")
    QualityChecker(stale_after_s=None).check(out4.records + out5.records + out6.records)
    assert all(r.quality_flags == [] for r in out5.records + out6.records)


@needs_fixtures
def test_decode_capture_of_the_real_session() -> None:
    items = list(codec.decode_capture((FIXTURES / "refinitiv_ws.jsonl").read_bytes()))
    assert not [i for i in items if isinstance(i, CaptureError)]
    records = [i for i in items if isinstance(i, RawMarketData)]
    assert len(records) == 2 + 2 + 12 + 8
    assert {r.symbol for r in records} == {"TRI.N"}
    assert all(r.timestamp.date().isoformat() == "2017-11-29" for r in records)
    seqs = [r.provider_sequence for r in records if r.provider_sequence is not None]
    assert len(seqs) == len(records) and seqs == sorted(seqs)


# ---------------------------------------------------------------- client frames


@needs_fixtures
def test_client_requests_match_the_real_frames() -> None:
    encoded = [
        codec.encode_login("root", app_id="256", position="10.91.161.46"),
        codec.encode_item_request(2, "TRI.N", service=258),
        codec.encode_item_request(2, ["TRI.N", "IBM.N", "T.N"], view=["BID", "ASK", "BIDSIZE"]),
        codec.encode_login(
            None, app_id="555", position="127.0.0.1", token="aBcDeFgHiJkLmNoPqRsTuVwXyZ"
        ),
        codec.encode_pong(),
        codec.encode_close(2),
        codec.encode_login_close(),
    ]
    # The fixture has its keys sorted; so are ours for the comparison. Bytes, not parsed
    # values: 1 == 1.0 == True in Python, but not on the wire.
    assert [orjson.dumps(orjson.loads(e), option=orjson.OPT_SORT_KEYS) for e in encoded] == (
        fixture_lines("refinitiv_ws_client.jsonl")
    )


@needs_fixtures
def test_server_reads_the_real_client_frames() -> None:
    reqs = [codec.decode_requests(line)[0] for line in fixture_lines("refinitiv_ws_client.jsonl")]
    login, single, batch, token, pong, close, login_close = reqs
    assert (login.kind, login.domain, login.ids, login.names) == ("Request", "Login", [1], ["root"])
    assert login.elements == {"ApplicationId": "256", "Position": "10.91.161.46"}
    assert (single.names, single.batch, single.service, single.view) == (
        ["TRI.N"],
        False,
        258,
        None,
    )
    assert (batch.names, batch.batch) == (["TRI.N", "IBM.N", "T.N"], True)
    assert batch.view == ["BID", "ASK", "BIDSIZE"]
    assert token.name_type == "AuthnToken" and token.names == []
    assert token.elements["AuthenticationToken"] == "aBcDeFgHiJkLmNoPqRsTuVwXyZ"
    assert pong.kind == "Pong"
    assert (close.kind, close.ids, close.domain) == ("Close", [2], "MarketPrice")
    assert (login_close.kind, login_close.domain) == ("Close", "Login")


# ---------------------------------------------------------------- the spec's examples


@needs_fixtures
def test_spec_examples() -> None:
    batch, refresh, update, error, ping = fixture_lines("refinitiv_ws_spec_examples.jsonl")
    consumer = codec.ConsumerProtocol()
    out = consumer.decode(batch, RECEIVE_NS)
    [status] = out.statuses
    assert (status.stream_id, status.name) == (2, None)
    assert (status.state.stream, status.state.data) == ("Closed", "Ok")
    assert status.state.text.startswith("Processed 3 total items")

    out = consumer.decode(refresh, RECEIVE_NS)
    [quote] = out.records
    assert (quote.symbol, quote.bid, quote.ask) == ("TRI.N", 0.01, 9000.0)
    assert quote.provider_specific["BIDSIZE"] == 1 and "ASKSIZE" not in quote.provider_specific
    assert quote.timestamp_ns == RECEIVE_NS  # a View without time fields
    assert quote.provider_sequence is None

    out = consumer.decode(update, RECEIVE_NS + 5)
    [quote] = out.records
    assert (quote.bid, quote.ask, quote.provider_specific["BIDSIZE"]) == (401.5, 401.54, 18)
    assert quote.timestamp_ns == RECEIVE_NS + 5

    out = consumer.decode(error, RECEIVE_NS)
    [server_error] = out.server_errors
    assert server_error.stream_id == 0
    assert server_error.text.startswith("JSON Converter Token Type error")
    assert out.errors == []

    assert consumer.decode(ping, RECEIVE_NS).pings == 1
    assert consumer.decode(b'[{"Type":"Ping"}]', RECEIVE_NS).pings == 1
    assert consumer.decode(b'[{"Type":"Pong"}]', RECEIVE_NS).pongs == 1


# ---------------------------------------------------------------- message kinds


def _open(consumer: codec.ConsumerProtocol, name: str = "IBM.N", stream_id: int = 2) -> None:
    fields = {"BID": 10.0, "ASK": 10.02, "BIDSIZE": 3, "ASKSIZE": 4, "QUOTE_DATE": "2024-05-06",
              "QUOTIM_MS": 50_000_000, "TRDPRC_1": 10.01, "TRDVOL_1": 100,
              "TRADE_DATE": "2024-05-06", "TRDTIM_MS": 49_000_000}  # fmt: skip
    consumer.decode(frame(codec.item_refresh(stream_id, name, fields, 100)), RECEIVE_NS)


def test_update_with_trade_and_quote_gives_both_records() -> None:
    consumer = codec.ConsumerProtocol()
    _open(consumer)
    receive = ns("2024-05-06T14:00:00")
    fields = {"TRDPRC_1": 10.03, "TRDVOL_1": 300, "TRDTIM_MS": 50_399_123, "ACVOL_1": 900,
              "BID": 10.02, "ASK": 10.04, "BIDSIZE": 7, "QUOTIM_MS": 50_399_124}  # fmt: skip
    out = consumer.decode(frame(codec.item_update(2, "IBM.N", fields, "QuotesTrade", 116)), receive)
    trade, quote = out.records
    assert trade.data_type is DataType.TRADE
    assert (trade.price, trade.volume) == (10.03, 300.0)
    assert trade.timestamp_ns == ns("2024-05-06T13:59:59.123")
    assert trade.provider_specific["ACVOL_1"] == 900
    assert (trade.stream, trade.provider_sequence) == ("T.IBM.N", 116)
    assert quote.data_type is DataType.QUOTE
    assert (quote.bid, quote.ask) == (10.02, 10.04)
    # ASKSIZE did not change, so the cached value from the Refresh is reported.
    assert (quote.provider_specific["BIDSIZE"], quote.provider_specific["ASKSIZE"]) == (7, 4)
    assert quote.timestamp_ns == ns("2024-05-06T13:59:59.124")
    assert (quote.stream, quote.provider_sequence) == ("Q.IBM.N", 116)


def test_partial_quote_update_is_completed_from_the_cache() -> None:
    consumer = codec.ConsumerProtocol()
    _open(consumer)
    out = consumer.decode(frame(codec.item_update(2, "IBM.N", {"ASKSIZE": 9}, "Quote", 132)),
                          RECEIVE_NS)  # fmt: skip
    [quote] = out.records
    assert (quote.bid, quote.ask, quote.provider_specific["ASKSIZE"]) == (10.0, 10.02, 9)
    # No QUOTIM in the update: the receive time stands in, and the flag says so.
    assert quote.timestamp_ns == RECEIVE_NS
    assert quote.quality_flags == [QualityFlag.MISSING_FIELDS]


def test_update_without_key_uses_the_stream_id() -> None:
    consumer = codec.ConsumerProtocol()
    _open(consumer, "T.N", 7)
    msg = {"ID": 7, "Type": "Update", "Fields": {"TRDPRC_1": 17.5, "TRDVOL_1": 1}}
    [trade] = consumer.decode(frame(msg), RECEIVE_NS).records
    assert (trade.symbol, trade.price, trade.timestamp_ns) == ("T.N", 17.5, RECEIVE_NS)


def test_trade_time_falls_back_to_saltim_and_strings() -> None:
    consumer = codec.ConsumerProtocol()
    _open(consumer)
    receive = ns("2024-05-06T19:05:00")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"SALTIM_MS": 68_518_777}, "2024-05-06T19:01:58.777"),
        ({"TRDTIM_1": "19:01:00"}, "2024-05-06T19:01:00"),
        ({"SALTIM_MS": "19:01:52.565"}, "2024-05-06T19:01:52.565"),
    ]
    for fields, expected in cases:
        msg = codec.item_update(2, "IBM.N", {"TRDPRC_1": 1.0, "TRDVOL_1": 1, **fields}, "Trade", 1)
        [trade] = consumer.decode(frame(msg), receive).records
        assert trade.timestamp_ns == ns(expected), fields


def test_tick_just_before_midnight_read_just_after_keeps_its_day() -> None:
    receive = ns("2024-05-07T00:00:00.100")
    assert codec.nearest_day(86_399_900 * 1_000_000, receive) == ns("2024-05-06T23:59:59.900")
    receive = ns("2024-05-06T23:59:59.900")
    assert codec.nearest_day(100 * 1_000_000, receive) == ns("2024-05-07T00:00:00.100")


def test_time_of_day_forms() -> None:
    assert codec.time_of_day_ns(68520061) == 68_520_061_000_000
    assert codec.time_of_day_ns("19:02:00") == 68_520_000_000_000
    assert codec.time_of_day_ns("19:01:52.565") == 68_512_565_000_000
    assert codec.time_of_day_ns("19:01:52.123456789") == 68_512_123_456_789
    for bad in (None, -1, 86_400_000, "", "19:02", "25:00:00", "ab:cd:ef", "1:2:3.x", 1.5):
        assert codec.time_of_day_ns(bad) is None, bad


def test_update_without_any_date_in_a_capture_is_flagged() -> None:
    consumer = codec.ConsumerProtocol(default_symbol="X.N")
    msg = {"ID": 3, "Type": "Update", "Fields": {"BID": 1.0, "ASK": 1.1, "QUOTIM_MS": 1000}}
    [quote] = consumer.decode(frame(msg), 0).records
    assert quote.symbol == "X.N"
    assert quote.timestamp_ns == 1_000_000_000
    assert QualityFlag.MISSING_FIELDS in quote.quality_flags


def test_login_refusal_and_rate_limit_statuses() -> None:
    consumer = codec.ConsumerProtocol()
    refused = codec.login_status("Closed", "Suspect", "UserUnknownToPermSys", "unknown user")
    [login] = consumer.decode(frame(refused), RECEIVE_NS).logins
    assert login.closed and not login.accepted
    assert (login.state.code, login.state.text) == ("UserUnknownToPermSys", "unknown user")
    _open(consumer, "A.N", 2)
    limited = codec.item_status(2, "A.N", "Closed", "Suspect", "TooManyItems", "too many")
    [status] = consumer.decode(frame(limited), RECEIVE_NS).statuses
    assert status.name == "A.N" and status.state.code in codec.RATE_LIMIT_CODES
    assert "A.N" not in consumer.ids_by_name  # a closed stream is forgotten


def test_status_open_suspect_keeps_the_stream() -> None:
    consumer = codec.ConsumerProtocol()
    _open(consumer, "A.N", 2)
    msg = codec.item_status(2, "A.N", "Open", "Suspect", "None", "source down")
    [status] = consumer.decode(frame(msg), RECEIVE_NS).statuses
    assert status.state.open and consumer.ids_by_name == {"A.N": 2}


def test_a_status_without_state_changes_nothing() -> None:
    """State is optional on a Status: absent, the stream stays as it was (an item is not
    forgotten as closed, a login is not taken for refused)."""
    consumer = codec.ConsumerProtocol()
    _open(consumer, "A.N", 2)
    stateless = {"ID": 2, "Type": "Status", "Key": {"Name": "A.N"}}
    out = consumer.decode(frame(stateless, stateless), RECEIVE_NS)
    assert (out.statuses, out.errors, out.skipped) == ([], [], 2)
    assert consumer.ids_by_name == {"A.N": 2}
    login = consumer.decode(frame({"ID": 1, "Type": "Status", "Domain": "Login"}), RECEIVE_NS)
    assert (login.logins, login.errors, login.skipped) == ([], [], 1)
    # A login Update has no state of its own: not an open stream.
    [update] = consumer.decode(frame({"ID": 1, "Type": "Update", "Domain": "Login"}), 1).logins
    assert update.state == codec.State() and not update.state.open


def test_other_domains_are_skipped() -> None:
    out = codec.ConsumerProtocol().decode(
        frame({"ID": 5, "Type": "Refresh", "Domain": "MarketByPrice", "Key": {"Name": "X"}}), 1
    )
    assert out.records == [] and out.errors == [] and out.skipped == 1


# ---------------------------------------------------------------- stream IDs


def test_batch_ids_single_ids_and_close() -> None:
    consumer = codec.ConsumerProtocol()
    [batch] = consumer.item_requests(["A.N", "B.N", "C.N"], view=["BID", "ASK"])
    assert orjson.loads(batch) == {"ID": 2, "Key": {"Name": ["A.N", "B.N", "C.N"]},
                                   "View": ["BID", "ASK"]}  # fmt: skip
    assert consumer.ids_by_name == {"A.N": 3, "B.N": 4, "C.N": 5}
    [single] = consumer.item_requests(["D.N", "A.N"], service="ELEKTRON_DD")
    assert orjson.loads(single) == {"ID": 6, "Key": {"Name": "D.N", "Service": "ELEKTRON_DD"}}
    assert consumer.close_requests(["B.N", "Z.N"]) == ['{"ID":4,"Type":"Close"}']
    assert "B.N" not in consumer.ids_by_name
    # A Refresh naming another item on an ID corrects the table.
    consumer.decode(frame(codec.item_refresh(5, "E.N", {"BID": 1.0, "ASK": 2.0}, 1)), 1)
    assert consumer.ids_by_name["E.N"] == 5 and "C.N" not in consumer.ids_by_name
    consumer.reset()
    assert consumer.next_id == 2 and consumer.ids_by_name == {}


def test_chunked_batches_keep_ids_apart() -> None:
    consumer = codec.ConsumerProtocol()
    frames = consumer.item_requests([f"S{i}.N" for i in range(5)], batch_size=2)
    assert [orjson.loads(f)["ID"] for f in frames] == [2, 5, 8]
    assert consumer.ids_by_name["S4.N"] == 8  # the last chunk has one name: a single request
    assert consumer.next_id == 9


# ---------------------------------------------------------------- bad input


def test_malformed_input_gives_decode_errors_and_decoding_continues() -> None:
    consumer = codec.ConsumerProtocol()
    _open(consumer)
    assert consumer.decode(b'[{"ID":2,"Type":"Update","Fields":{"BID":', 1).errors
    assert consumer.decode(b"42", 1).errors
    good = codec.item_update(2, "IBM.N", {"BID": 9.0}, "Quote", 5)
    out = consumer.decode(
        frame(
            "not an object",  # type: ignore[arg-type]
            {"ID": 2, "Type": "Bogus"},
            {"ID": "2", "Type": "Update", "Fields": {}},
            {"ID": 99, "Type": "Update", "Fields": {"BID": 1.0}},
            {"ID": 2, "Type": "Update", "Fields": [1, 2]},
            good,
        ),
        1,
    )
    assert len(out.errors) == 5
    assert [r.bid for r in out.records] == [9.0]


def test_bad_field_values_flag_missing_fields() -> None:
    consumer = codec.ConsumerProtocol()
    _open(consumer)
    msg = codec.item_update(2, "IBM.N", {"TRDPRC_1": "n/a", "TRDVOL_1": 5, "BID": None}, "Trade", 9)
    trade, quote = consumer.decode(frame(msg), 1).records
    assert trade.price is None and QualityFlag.MISSING_FIELDS in trade.quality_flags
    assert quote.bid is None and QualityFlag.MISSING_FIELDS in quote.quality_flags


def test_decode_capture_locates_errors_by_line() -> None:
    data = b'\n'.join([
        orjson.dumps([codec.item_refresh(2, "A.N", {"BID": 1.0, "ASK": 1.1}, 1)]),
        b"{broken",
        orjson.dumps([codec.item_update(2, "A.N", {"BID": 1.05}, "Quote", 17)]),
    ])  # fmt: skip
    items = list(codec.decode_capture(data))
    assert [type(i).__name__ for i in items] == ["RawMarketData", "CaptureError", "RawMarketData"]
    assert items[1].location == "line 2"  # type: ignore[union-attr]
    assert items[2].bid == 1.05  # type: ignore[union-attr]


def test_server_rejects_bad_requests() -> None:
    bad_requests = (
        b"{",
        b'{"ID":"2","Key":{"Name":"TRI.N"}}',
        b'{"ID":2}',
        b'{"ID":2,"Key":{"Name":[1]}}',
        b'{"ID":2,"Key":{"Name":"X"},"View":"BID"}',
        b"[3]",
    )
    for bad in bad_requests:
        with pytest.raises(CodecError):
            codec.decode_requests(bad)
    [ping] = codec.decode_requests(b'{"Type":"Ping"}')
    assert ping.kind == "Ping"
    assert [r.ids for r in codec.decode_requests(b'{"ID":[3,4,5],"Type":"Close"}')] == [[3, 4, 5]]


_KEYS = ["ID", "Type", "Key", "Fields", "Name", "BID", "State", "Domain", "TRDPRC_1", "QUOTIM_MS"]
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=5)
)
JSON_VALUES = st.recursive(
    _SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(_KEYS), children, max_size=5)
    ),
    max_leaves=20,
)


@given(JSON_VALUES)
def test_decode_never_raises(value: Any) -> None:
    consumer = codec.ConsumerProtocol(default_symbol="X.N")
    out = consumer.decode(orjson.dumps(value), 1)
    assert isinstance(out, codec.DecodedFrame)


# ---------------------------------------------------------------- round trips


@given(
    bid=st.floats(min_value=0.01, max_value=1e6),
    spread=st.floats(min_value=0.0, max_value=100.0),
    size=st.integers(min_value=0, max_value=10**9),
    ms=st.integers(min_value=0, max_value=86_399_999),
    seq=st.integers(min_value=0, max_value=2**40),
)
def test_server_encode_client_decode_round_trip(
    bid: float, spread: float, size: int, ms: int, seq: int
) -> None:
    consumer = codec.ConsumerProtocol()
    consumer.decode(frame(codec.item_refresh(4, "R.N", {"BID": 1.0, "ASK": 2.0}, 0)), 1)
    fields = {"BID": bid, "ASK": bid + spread, "BIDSIZE": size, "ASKSIZE": size, "QUOTIM_MS": ms,
              "TRDPRC_1": bid, "TRDVOL_1": size, "TRDTIM_MS": ms}  # fmt: skip
    receive = ns("2024-05-06T12:00:00")
    trade, quote = consumer.decode(
        codec.encode_messages([codec.item_update(4, "R.N", fields, "QuotesTrade", seq)]), receive
    ).records
    assert (quote.bid, quote.ask, quote.provider_specific["BIDSIZE"]) == (bid, bid + spread, size)
    assert (trade.price, trade.volume, trade.provider_sequence) == (bid, float(size), seq)
    assert abs(trade.timestamp_ns - receive) <= 43_200 * 1_000_000_000
    assert trade.timestamp_ns % 86_400_000_000_000 == ms * 1_000_000


def test_client_encode_server_decode_round_trip() -> None:
    [req] = codec.decode_requests(codec.encode_login("alice", app_id="7", position="10.0.0.9"))
    assert (req.domain, req.names, req.elements["ApplicationId"]) == ("Login", ["alice"], "7")
    [req] = codec.decode_requests(codec.encode_item_request(9, ["A.N", "B.N"], view=["BID"]))
    assert (req.ids, req.names, req.batch, req.view) == ([9], ["A.N", "B.N"], True, ["BID"])
    [req] = codec.decode_requests(codec.encode_item_request(9, "A.N", streaming=False))
    assert req.streaming is False
    [req] = codec.decode_requests(codec.encode_close([3, 4]))
    assert (req.kind, req.ids) == ("Close", [3, 4])
    login = codec.login_refresh("alice", "7", "10.0.0.9", ping_timeout_s=12)
    [event] = codec.ConsumerProtocol().decode(codec.encode_messages([login]), 1).logins
    assert event.accepted and event.ping_timeout_s == 12.0


def test_sequence_going_backwards_is_flagged_by_quality_checker() -> None:
    consumer = codec.ConsumerProtocol()
    _open(consumer)
    seqs = [132, 148, 148, 140]
    fields = {"BID": 10.0, "QUOTIM_MS": 68_518_777}
    records = [
        consumer.decode(
            frame(codec.item_update(2, "IBM.N", fields, "Quote", s)), RECEIVE_NS
        ).records[0]
        for s in seqs
    ]
    QualityChecker(stale_after_s=None).check(records)
    flags = [r.quality_flags for r in records]
    # Not contiguous: 132 -> 148 is no gap; but repeats and reordering are caught.
    assert flags == [[], [], [QualityFlag.DUPLICATE], [QualityFlag.OUT_OF_ORDER]]


_FIELD_NAMES = [*codec.QUOTE_VIEW, *codec.TRADE_VIEW, "SALTIM", "ACVOL_1"]


@given(
    kind=st.sampled_from(["Refresh", "Update", "Status"]),
    fields=st.dictionaries(st.sampled_from(_FIELD_NAMES), _SCALARS, max_size=8),
    receive=st.integers(0, 2**62),
)
def test_any_field_values_on_a_known_stream_never_raise(
    kind: str, fields: dict[str, Any], receive: int
) -> None:
    consumer = codec.ConsumerProtocol()
    _open(consumer)
    msg = {"ID": 2, "Type": kind, "Fields": fields, "State": {"Stream": "Open"}}
    out = consumer.decode(orjson.dumps([msg]), receive)
    assert out.errors == []
    for record in out.records:
        assert record.symbol == "IBM.N" and isinstance(record.timestamp_ns, int)


# ---------------------------------------------------------------- exact edges


def test_requests_carry_view_and_service_in_batches_and_singles() -> None:
    consumer = codec.ConsumerProtocol()
    frames = consumer.item_requests(["A.N", "B.N", "C.N"], view=["BID"], service=258,
                                    batch_size=2)  # fmt: skip
    assert [orjson.loads(f) for f in frames] == [
        {"ID": 2, "Key": {"Name": ["A.N", "B.N"], "Service": 258}, "View": ["BID"]},
        {"ID": 5, "Key": {"Name": "C.N", "Service": 258}, "View": ["BID"]},
    ]
    # Chunks of one are single requests, one after the other.
    frames = consumer.item_requests(["D.N", "E.N"], batch_size=1)
    assert frames == ['{"ID":6,"Key":{"Name":"D.N"}}', '{"ID":7,"Key":{"Name":"E.N"}}']
    assert consumer.ids_by_name == {"A.N": 3, "B.N": 4, "C.N": 5, "D.N": 6, "E.N": 7}


def test_default_batch_holds_500_names() -> None:
    consumer = codec.ConsumerProtocol()
    names = [f"S{i}.N" for i in range(501)]
    batch, single = consumer.item_requests(names)
    assert orjson.loads(batch)["Key"]["Name"] == names[:500]
    assert orjson.loads(single) == {"ID": 503, "Key": {"Name": "S500.N"}}
    assert consumer.ids_by_name["S499.N"] == 502 and consumer.next_id == 504


def test_any_sequence_of_names_or_ids_encodes_as_an_array() -> None:
    # A batch's items stream on consecutive IDs, so a range is the natural way to close them.
    assert codec.encode_close(range(3, 6)) == '{"ID":[3,4,5],"Type":"Close"}'
    assert codec.encode_item_request(2, deque(["A.N", "B.N"])) == (
        '{"ID":2,"Key":{"Name":["A.N","B.N"]}}'
    )


def test_a_closed_item_no_longer_takes_updates_on_its_id() -> None:
    consumer = codec.ConsumerProtocol()
    _open(consumer, "A.N", 2)
    assert consumer.close_requests(["A.N"]) == ['{"ID":2,"Type":"Close"}']
    late = {"ID": 2, "Type": "Update", "Fields": {"BID": 1.0}}
    out = consumer.decode(frame(late), RECEIVE_NS)
    assert out.records == []
    assert [e.reason for e in out.errors] == ["Update on unknown stream 2 without Key.Name"]


def test_batch_items_numbered_otherwise_by_the_server_keep_both_names() -> None:
    consumer = codec.ConsumerProtocol()
    consumer.item_requests(["A.N", "B.N"])  # expected on IDs 3 and 4
    out = consumer.decode(
        frame(
            codec.item_refresh(3, "B.N", {"BID": 1.0, "ASK": 1.1}, 1),
            codec.item_refresh(4, "A.N", {"BID": 2.0, "ASK": 2.1}, 2),
        ),
        RECEIVE_NS,
    )
    assert [(r.symbol, r.bid) for r in out.records] == [("B.N", 1.0), ("A.N", 2.0)]
    assert consumer.ids_by_name == {"B.N": 3, "A.N": 4}


@pytest.mark.parametrize(("ping", "expected"), [(0, None), (1, 1.0), (-5, None)])
def test_login_ping_timeout_must_be_positive(ping: int, expected: float | None) -> None:
    login = codec.login_refresh("u", "256", "10.0.0.1", ping_timeout_s=ping)
    [event] = codec.ConsumerProtocol().decode(frame(login), RECEIVE_NS).logins
    assert event.ping_timeout_s == expected


def test_a_time_exactly_half_a_day_away_stays_on_the_receive_day() -> None:
    half_day = 43_200 * 1_000_000_000
    midnight = ns("2024-05-07T00:00:00")
    assert codec.nearest_day(half_day, midnight) == ns("2024-05-07T12:00:00")
    assert codec.nearest_day(0, midnight + half_day) == midnight


def test_login_refresh_without_state_is_an_open_ok_login() -> None:
    # The spec's defaults for a Refresh that leaves State out.
    refresh = {"ID": 1, "Type": "Refresh", "Domain": "Login", "Elements": {"PingTimeout": 20}}
    [login] = codec.ConsumerProtocol().decode(frame(refresh), RECEIVE_NS).logins
    assert login.state == codec.State("Open", "Ok", "", "")
    assert login.accepted and not login.closed and login.ping_timeout_s == 20.0


def test_errors_name_the_problem_and_keep_the_bad_part() -> None:
    consumer = codec.ConsumerProtocol()
    assert consumer.decode(b"42", 1).errors == [DecodeError("frame is not a JSON array", "42")]
    [err] = consumer.decode(b'[{"ID":2,', 1).errors
    assert err.reason.startswith("invalid JSON: ") and err.raw == '[{"ID":2,'
    out = consumer.decode(b'["x",5,{"ID":2,"Type":"Bogus"}]', 1)
    assert out.errors == [
        DecodeError("array element is not an object", "x"),
        DecodeError("array element is not an object", "5"),
        DecodeError("unknown message Type 'Bogus'", '{"ID":2,"Type":"Bogus"}'),
    ]


def test_a_message_failing_unforeseen_loses_only_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    # The last-resort guard: record building failing in a way nobody foresaw.
    consumer = codec.ConsumerProtocol()
    _open(consumer, "A.N", 2)
    _open(consumer, "B.N", 3)
    build = consumer._records

    def flaky(kind: str, msg: dict[str, Any], *args: Any) -> None:
        if msg["ID"] == 2:
            raise RuntimeError("boom")
        build(kind, msg, *args)

    monkeypatch.setattr(consumer, "_records", flaky)
    bad = {"ID": 2, "Type": "Update", "Fields": {"BID": 1.0}}
    good = {"ID": 3, "Type": "Update", "Fields": {"BID": 2.0}}
    out = consumer.decode(frame(bad, good), RECEIVE_NS)
    assert out.errors == [DecodeError("unexpected RuntimeError: boom", orjson.dumps(bad).decode())]
    assert [(r.symbol, r.bid) for r in out.records] == [("B.N", 2.0)]


def test_control_messages_are_counted_and_errors_kept() -> None:
    out = codec.ConsumerProtocol().decode(
        frame(
            {"Type": "Ping"}, {"Type": "Pong"}, {"Type": "Ping"}, {"Type": "Pong"},
            {"ID": "7", "Type": "Error", "Text": "bad request"},
            {"ID": 5, "Type": "Refresh", "Domain": "MarketByPrice", "Key": {"Name": "X"}},
            {"ID": 6, "Type": "Refresh", "Domain": "MarketByOrder", "Key": {"Name": "X"}},
        ),
        RECEIVE_NS,
    )  # fmt: skip
    assert (out.pings, out.pongs, out.skipped, out.errors) == (2, 2, 2, [])
    # An ID that is not an integer is no stream ID.
    assert out.server_errors == [codec.ServerError(None, "bad request")]


def test_bad_ids_and_fields_are_named() -> None:
    consumer = codec.ConsumerProtocol()
    _open(consumer)
    bad_id = {"ID": "2", "Type": "Update", "Fields": {}}
    bad_fields = {"ID": 2, "Type": "Update", "Fields": [1]}
    # An Update without Fields changes nothing: skipped, not an error.
    no_fields = {"ID": 2, "Type": "Update"}
    out = consumer.decode(frame(bad_id, bad_fields, no_fields), RECEIVE_NS)
    assert out.errors == [
        DecodeError("missing or non-integer 'ID'", orjson.dumps(bad_id).decode()),
        DecodeError("'Fields' is not an object", orjson.dumps(bad_fields).decode()),
    ]
    assert (out.records, out.skipped) == ([], 1)


def test_refresh_on_a_closed_stream_gives_its_image_then_forgets_the_item() -> None:
    consumer = codec.ConsumerProtocol()
    _open(consumer, "A.N", 2)
    closed = codec.item_refresh(2, "A.N", {"BID": 1.0, "ASK": 1.1}, 5)
    closed["State"] = codec.state("Closed", "Suspect", "gone", "NotFound")
    out = consumer.decode(frame(closed), RECEIVE_NS)
    assert [(r.symbol, r.bid, r.ask) for r in out.records] == [("A.N", 1.0, 1.1)]
    assert consumer.ids_by_name == {}
    late = {"ID": 2, "Type": "Update", "Fields": {"BID": 1.2}}
    assert consumer.decode(frame(late), RECEIVE_NS).errors[0].reason == (
        "Update on unknown stream 2 without Key.Name"
    )


def test_an_empty_or_non_text_key_name_does_not_rename_the_item() -> None:
    consumer = codec.ConsumerProtocol()
    _open(consumer)
    for name in ("", 5):
        msg = {"ID": 2, "Type": "Update", "Key": {"Name": name}, "Fields": {"BID": 9.5}}
        out = consumer.decode(frame(msg), RECEIVE_NS)
        assert [(r.symbol, r.bid) for r in out.records] == [("IBM.N", 9.5)], name
    assert consumer.ids_by_name == {"IBM.N": 2}
