"""Polygon codec: every message kind, the official samples, malformed frames."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from common.codecs import polygon as codec
from common.codecs.base import CaptureError, DecodeError
from common.events import build_events
from common.model import DataType, QualityFlag, RawMarketData

RECV = 1_700_000_000_000_000_000


def test_official_ws_samples_decode(fixtures_dir: Path) -> None:
    lines = (fixtures_dir / "polygon_ws.jsonl").read_text().splitlines()
    frames = [codec.decode_frame(line, RECV) for line in lines]
    assert [s.status for s in frames[0].statuses] == ["connected"]
    assert frames[1].statuses[0].status == "auth_success"
    assert frames[2].statuses[0].message == "subscribed to: T.AAPL"
    trade = frames[3].records[0]
    assert (trade.symbol, trade.data_type, trade.price, trade.volume) == (
        "AAPL", DataType.TRADE, 161.87, 300,
    )  # fmt: skip
    assert trade.timestamp_ns == 1651684192462 * 1_000_000
    assert trade.provider_sequence == 4009402
    assert trade.provider_specific == {"x": 10, "i": "5096", "z": 3, "c": [14, 41]}
    assert trade.stream == "T.AAPL" and trade.receive_ns == RECV
    # Two trades in one frame; the second has no conditions ("c" absent).
    amzn = frames[4].records
    assert [r.provider_sequence for r in amzn] == [4009408, 4009434]
    assert "c" not in amzn[1].provider_specific
    # The specification's examples (lines 7-12).
    [spec_trade] = frames[6].records
    assert (spec_trade.symbol, spec_trade.price, spec_trade.volume) == ("MSFT", 114.125, 100)
    assert (spec_trade.timestamp_ns, spec_trade.provider_sequence) == (
        1536036818784 * 1_000_000, 3681328,
    )  # fmt: skip
    assert spec_trade.provider_specific == {"x": 4, "i": "12345", "z": 3, "c": [0, 12]}
    [quote] = frames[7].records
    assert (quote.symbol, quote.data_type, quote.bid, quote.ask) == (
        "MSFT", DataType.QUOTE, 114.125, 114.128,
    )  # fmt: skip
    assert quote.price is None and quote.volume is None
    assert (quote.timestamp_ns, quote.provider_sequence, quote.stream) == (
        1536036818784 * 1_000_000, 50385480, "Q.MSFT",
    )  # fmt: skip
    # Sizes are in round lots, kept as sent.
    assert quote.provider_specific == {"bx": 4, "bs": 100, "ax": 7, "as": 160, "c": 0,
                                       "i": [604], "z": 3}  # fmt: skip
    for idx, ev in ((8, "A"), (9, "AM")):
        bar = frames[idx].records[0]
        assert bar.data_type == DataType.AGGREGATE and bar.provider_specific["ev"] == ev
    second = frames[8].records[0]
    assert (second.symbol, second.price, second.volume, second.stream) == (
        "SPCE", 25.39, 200, "A.SPCE",
    )  # fmt: skip
    assert second.timestamp_ns == 1610144868000 * 1_000_000
    am = frames[9].records[0]
    assert (am.symbol, am.price, am.volume) == ("GTE", 0.4486, 4110)
    assert am.timestamp_ns == 1610144640000 * 1_000_000
    assert (am.provider_sequence, am.stream) == (None, "AM.GTE")
    assert am.provider_specific == {
        "ev": "AM", "o": 0.4488, "h": 0.4489, "l": 0.4486, "c": 0.4486, "vw": 0.4488,
        "av": 9470157, "op": 0.4372, "a": 0.4352, "z": 685, "s": 1610144640000,
        "e": 1610144700000,
    }  # fmt: skip
    # LULD and NOI are known kinds we do not store: skipped, not errors.
    assert frames[10].skipped == 1 and frames[11].skipped == 1
    assert all(not f.errors for f in frames)


def test_client_frames_match_official_client(fixtures_dir: Path) -> None:
    # Byte for byte: the fixture is compact JSON with the official client's key order.
    lines = (fixtures_dir / "polygon_ws_client.jsonl").read_text().splitlines()
    assert codec.encode_auth("*****") == lines[0]
    assert codec.encode_subscribe(["T.*", "Q.*", "AM.*"]) == lines[1]
    assert codec.encode_subscribe(["T.AAPL"]) == lines[2]
    assert codec.encode_unsubscribe(["T.AAPL"]) == lines[3]
    assert len(lines) == 4


def test_channels_for_data_types() -> None:
    got = codec.channels_for("BRK.A", [DataType.TRADE, DataType.QUOTE, DataType.NEWS])
    assert got == ["T.BRK.A", "Q.BRK.A"]
    assert codec.split_channel("T.BRK.A") == ("T", "BRK.A")


def test_server_side_round_trip() -> None:
    frame = codec.encode_events(
        [
            codec.trade_event("MSFT", 410.5, 100, 1_700_000_000_123, 7, conditions=[12]),
            codec.quote_event("MSFT", 410.4, 3, 410.6, 5, 1_700_000_000_124, 8),
        ]
    )
    out = codec.decode_frame(frame, RECV)
    assert [(r.data_type, r.price, r.bid, r.ask) for r in out.records] == [
        (DataType.TRADE, 410.5, None, None),
        (DataType.QUOTE, None, 410.4, 410.6),
    ]
    action = codec.decode_client_action(codec.encode_subscribe(["T.MSFT", "Q.*"]))
    assert (action.action, action.params) == ("subscribe", ["T.MSFT", "Q.*"])


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b'[{"ev":"T","sym":"X","p":', "invalid JSON"),
        (b'{"ev":"T"}', "not a JSON array"),
        (b"[1]", "not an object"),
        (b'[{"ev":"ZZ","sym":"X"}]', "unknown event type"),
        (b'[{"ev":"T","p":1.0,"s":1,"t":1}]', "'sym'"),
        (b'[{"ev":"T","sym":"X","p":1.0,"s":1}]', "timestamp"),
        (b'[{"ev":"T","sym":"X","p":1.0,"s":1,"t":"soon"}]', "timestamp"),
    ],
)
def test_malformed_frames_are_errors_not_exceptions(frame: bytes, reason: str) -> None:
    out = codec.decode_frame(frame, RECV)
    assert out.records == []
    assert len(out.errors) == 1 and reason in out.errors[0].reason


def test_bad_elements_do_not_spoil_good_ones() -> None:
    frame = b'[{"ev":"T","sym":"X","p":1.5,"s":2,"t":5,"q":1},{"ev":"T"},"junk"]'
    out = codec.decode_frame(frame, RECV)
    assert [r.price for r in out.records] == [1.5]
    assert len(out.errors) == 2
    # An event type that is not even a string is skipped, not the end of the frame.
    frame = b'[{"ev":{"x":1},"sym":"X"},{"ev":"T","sym":"X","p":2.5,"s":2,"t":5,"q":2}]'
    out = codec.decode_frame(frame, RECV)
    assert [r.price for r in out.records] == [2.5]
    assert [e.reason for e in out.errors] == ['unknown event type {"x":1}']


def test_wrong_typed_price_is_flagged_missing() -> None:
    out = codec.decode_frame(b'[{"ev":"T","sym":"X","p":"1.5","s":2,"t":5,"q":1}]', RECV)
    (rec,) = out.records
    assert rec.price is None and rec.quality_flags == [QualityFlag.MISSING_FIELDS]
    out = codec.decode_frame(b'[{"ev":"Q","sym":"X","bp":true,"ap":2.0,"t":5}]', RECV)
    assert out.records[0].bid is None
    assert out.records[0].quality_flags == [QualityFlag.MISSING_FIELDS]
    # A bar's volume of the wrong type: flagged, the bar kept.
    bar = b'[{"ev":"AM","sym":"X","v":"lots","o":1,"c":2.0,"h":2,"l":1,"s":60000,"e":120000}]'
    out = codec.decode_frame(bar, RECV)
    assert out.errors == []
    (rec,) = out.records
    assert (rec.price, rec.volume) == (2.0, None)
    assert rec.quality_flags == [QualityFlag.MISSING_FIELDS]


def test_bad_client_actions() -> None:
    for data in (b"nope", b"[]", b'{"action":1}', b'{"action":"subscribe","params":[1]}'):
        with pytest.raises(codec.CodecError):
            codec.decode_client_action(data)
    with pytest.raises(codec.CodecError):
        codec.split_channel("TAAPL")


def test_decode_capture_reports_line_numbers() -> None:
    data = b'[{"ev":"T","sym":"X","p":1.5,"s":2,"t":5,"q":1}]\nnot json\n\n[{"ev":"Q"}]\n'
    items = list(codec.decode_capture(data))
    errors = [i for i in items if isinstance(i, CaptureError)]
    assert [e.location for e in errors] == ["line 2", "line 4"]
    assert len(items) - len(errors) == 1


def test_unsubscribe_joins_channels_with_commas() -> None:
    assert codec.encode_unsubscribe(["T.AAPL", "Q.AAPL"]) == (
        '{"action":"unsubscribe","params":"T.AAPL,Q.AAPL"}'
    )


def test_each_event_kind_decodes_to_the_whole_record() -> None:
    # Every field checked at once: the smallest valid time (1 ms), a sequence that is not an
    # int, a missing size / ask / close, and the OTC marker of a bar.
    frame = orjson.dumps(
        [
            {"ev": "T", "sym": "X", "p": 1.5, "t": 1, "q": "7", "x": 4},
            {"ev": "Q", "sym": "X", "bp": 1.25, "t": 2, "q": 9, "bx": 4},
            {"ev": "AM", "sym": "X", "v": 10, "s": 3, "e": 63, "otc": True},
        ]
    )
    out = codec.decode_frame(frame, RECV)
    assert out.errors == []
    missing = [QualityFlag.MISSING_FIELDS]
    # Polygon's "q" is not consecutive per channel, so a jump must not read as a gap.
    assert out.records == [
        RawMarketData("X", "polygon", 1_000_000, DataType.TRADE, 1.5, None, None, None,
                      {"x": 4}, None, "T.X", False, RECV, missing),
        RawMarketData("X", "polygon", 2_000_000, DataType.QUOTE, None, None, 1.25, None,
                      {"bx": 4}, 9, "Q.X", False, RECV, missing),
        RawMarketData("X", "polygon", 3_000_000, DataType.AGGREGATE, None, 10, None, None,
                      {"s": 3, "e": 63, "otc": True, "ev": "AM"}, None, "AM.X", False, RECV,
                      missing),
    ]  # fmt: skip


def _raw(item: Any) -> str:
    return orjson.dumps(item).decode()


@pytest.mark.parametrize(
    ("frame", "errors"),
    [
        (b'{"ev":"T"}', [DecodeError("frame is not a JSON array", '{"ev":"T"}')]),
        (b"[1,[2]]", [DecodeError("array element is not an object", "1"),
                      DecodeError("array element is not an object", "[2]")]),
        (b'[{"ev":5}]', [DecodeError("unknown event type 5", '{"ev":5}')]),
        (b'[{"ev":"ZZ"}]', [DecodeError("unknown event type 'ZZ'", '{"ev":"ZZ"}')]),
        (b'[{"ev":"T","sym":"","t":1}]',
         [DecodeError("missing or empty 'sym'", '{"ev":"T","sym":"","t":1}')]),
        (b'[{"ev":"T","sym":5,"t":1}]',
         [DecodeError("missing or empty 'sym'", '{"ev":"T","sym":5,"t":1}')]),
        (b'[{"ev":"T","sym":"X","t":0}]',
         [DecodeError("missing or invalid timestamp 't'", '{"ev":"T","sym":"X","t":0}')]),
    ],
)  # fmt: skip
def test_errors_name_the_problem_and_keep_the_bad_part(
    frame: bytes, errors: list[DecodeError]
) -> None:
    out = codec.decode_frame(frame, RECV)
    assert out.records == [] and out.errors == errors


def test_invalid_json_error_keeps_the_frame() -> None:
    [err] = codec.decode_frame(b'[{"ev":"T"', RECV).errors
    assert err.reason.startswith("invalid JSON: ") and err.raw == '[{"ev":"T"'


def test_decoder_failure_loses_only_its_element(monkeypatch: pytest.MonkeyPatch) -> None:
    # The last-resort guard: a decoder failing in a way nobody foresaw.
    def broken(item: dict[str, Any], provider: str, receive_ns: int) -> RawMarketData:
        raise RuntimeError("boom")

    monkeypatch.setitem(codec._DECODERS, "A", broken)
    bad = {"ev": "A", "sym": "X", "c": 1.0, "v": 1, "s": 5}
    good = {"ev": "T", "sym": "X", "p": 1.5, "s": 2, "t": 5}
    out = codec.decode_frame(orjson.dumps([bad, good]), RECV)
    assert out.errors == [DecodeError("unexpected RuntimeError: boom", _raw(bad))]
    assert [r.price for r in out.records] == [1.5]


def test_every_known_untracked_event_is_counted_as_skipped() -> None:
    frame = b'[{"ev":"LULD","T":"X"},{"ev":"NOI","T":"X"},{"ev":"V","T":"I:SPX"}]'
    out = codec.decode_frame(frame, RECV)
    assert (out.skipped, out.records, out.errors) == (3, [], [])


# A /v3/trades page in the shape the specification gives (prices, sizes and times made up).
TRADES_PAGE = (
    b'{"results":[{"conditions":[12,37],"exchange":11,"id":"52983525034386",'
    b'"participant_timestamp":1517562000015577000,"price":171.55,"sequence_number":1063,'
    b'"sip_timestamp":1517562000016036581,"size":100,"tape":3},'
    b'{"exchange":4,"id":"7","price":171.56,"sequence_number":1070,'
    b'"sip_timestamp":1517562000999999999,"size":5,"tape":3}],'
    b'"status":"OK","request_id":"a47d1beb8c11b6ae897ab76cdbbf35a3",'
    b'"next_url":"https://api.massive.com/v3/trades/AAPL?cursor=YWN0aXZlPXRydWU"}'
)


def test_a_v3_trades_page_decodes_to_the_records_the_websocket_gives() -> None:
    page = codec.decode_trades_page(TRADES_PAGE, "AAPL", RECV, "poly")
    assert page.errors == []
    assert page.next_url == "https://api.massive.com/v3/trades/AAPL?cursor=YWN0aXZlPXRydWU"
    assert [(r.symbol, r.provider, r.timestamp_ns, r.data_type, r.price, r.volume,
             r.provider_sequence, r.stream, r.receive_ns, r.quality_flags, r.provider_specific)
            for r in page.records] == [
        ("AAPL", "poly", 1517562000016000000, DataType.TRADE, 171.55, 100, 1063, "T.AAPL", RECV,
         [QualityFlag.BACKFILL], {"x": 11, "i": "52983525034386", "z": 3, "c": [12, 37]}),
        ("AAPL", "poly", 1517562000999000000, DataType.TRADE, 171.56, 5, 1070, "T.AAPL", RECV,
         [QualityFlag.BACKFILL], {"x": 4, "i": "7", "z": 3}),
    ]  # fmt: skip


def test_a_backfilled_trade_gets_the_event_id_of_the_live_one() -> None:
    live_event = codec.trade_event("AAPL", 171.55, 100, 1517562000016, 1063, exchange=11,
                                   trade_id="52983525034386", conditions=[12, 37])  # fmt: skip
    [live] = codec.decode_frame(codec.encode_events([live_event]), RECV, "poly").records
    rest = codec.rest_trade(live_event)
    body = codec.encode_trades_page([rest], None)
    [backfilled] = codec.decode_trades_page(body, "AAPL", RECV + 5, "poly").records
    assert backfilled.provider_specific == live.provider_specific
    ids = [build_events([r], RECV)[0].event_id for r in (live, backfilled)]
    assert ids[0] == ids[1]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "invalid JSON"),
        (b'{"status":"ERROR","error":"Unknown API Key"}', "without a results list"),
        (b'{"results":[1]}', "not an object"),
        (b'{"results":[{"price":1.0,"size":1}]}', "sip_timestamp"),
    ],
)
def test_bad_trades_pages_are_errors(body: bytes, reason: str) -> None:
    page = codec.decode_trades_page(body, "AAPL", RECV)
    assert page.records == [] and page.next_url is None
    assert len(page.errors) == 1 and reason in page.errors[0].reason
    # An empty range: OK without results is no error.
    assert codec.decode_trades_page(b'{"status":"OK","request_id":"x"}', "A", RECV).errors == []
