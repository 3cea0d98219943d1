"""Each quality flag, on records built the way codecs build them."""

from __future__ import annotations

from common.model import DataType, QualityFlag, RawMarketData
from common.quality import QualityChecker

T0 = 1_700_000_000_000_000_000


def rec(
    seq: int | None = 1, *, price: float | None = 100.0, bid: float | None = None,
    ask: float | None = None, dt: DataType = DataType.TRADE, ts: int = T0,
    recv: int = T0 + 1_000_000, contiguous: bool = False, symbol: str = "AAPL",
    stream: str | None = None,
) -> RawMarketData:  # fmt: skip
    stream = f"S.{symbol}" if stream is None else stream
    return RawMarketData(
        symbol, "p", ts, dt, price, 10, bid, ask, {}, seq, stream, contiguous, recv
    )


def flags(checker: QualityChecker, *records: RawMarketData) -> list[list[str]]:
    checker.check(list(records))
    return [r.quality_flags for r in records]


def test_clean_records_have_no_flags() -> None:
    assert flags(QualityChecker(), rec(1), rec(2), rec(5)) == [[], [], []]


def test_duplicate_and_out_of_order() -> None:
    got = flags(QualityChecker(), rec(5), rec(5), rec(3), rec(6))
    assert got == [[], [QualityFlag.DUPLICATE], [QualityFlag.OUT_OF_ORDER], []]


def test_gap_only_on_contiguous_streams() -> None:
    qc = QualityChecker()
    assert flags(qc, rec(1, contiguous=True), rec(4, contiguous=True)) == [[], [QualityFlag.GAP]]
    # Polygon sequences are increasing but not contiguous: a jump is normal there.
    assert flags(QualityChecker(), rec(1), rec(4)) == [[], []]


def test_a_gap_carries_its_missing_range() -> None:
    qc = QualityChecker()
    first, after_gap, next_one = (
        rec(1, contiguous=True),
        rec(4, contiguous=True),
        rec(5, contiguous=True),
    )
    qc.check([first, after_gap, next_one])
    assert after_gap.provider_specific == {"gap": [2, 3]}
    assert first.provider_specific == {} and next_one.provider_specific == {}


def test_sequence_state_restored_after_a_restart_flags_the_gap_across_it() -> None:
    before = QualityChecker()
    before.check([rec(1, contiguous=True), rec(2, contiguous=True)])
    saved = before.sequences()
    assert saved == {"S.AAPL": 2}
    after = QualityChecker()  # the restarted worker
    after.restore(saved)
    resumed = rec(9, contiguous=True)
    assert flags(after, resumed, rec(10, contiguous=True)) == [[QualityFlag.GAP], []]
    assert resumed.provider_specific["gap"] == [3, 8]
    # Exactly the next number after a restart is no gap.
    again = QualityChecker()
    again.restore(saved)
    assert flags(again, rec(3, contiguous=True)) == [[]]


def test_stale() -> None:
    qc = QualityChecker(stale_after_s=2.0)
    old = rec(1, recv=T0 + 3_000_000_000)
    assert flags(qc, old) == [[QualityFlag.STALE]]
    assert flags(QualityChecker(stale_after_s=None), rec(1, recv=T0 + 10**12)) == [[]]


def test_crossed_quote() -> None:
    q = rec(1, price=None, bid=10.02, ask=10.01, dt=DataType.QUOTE)
    assert flags(QualityChecker(), q) == [[QualityFlag.CROSSED]]


def test_price_outlier() -> None:
    got = flags(QualityChecker(outlier_fraction=0.1), rec(1, price=100.0), rec(2, price=150.0),
                rec(3, price=151.0))  # fmt: skip
    assert got == [[], [QualityFlag.PRICE_OUTLIER], []]


def test_missing_fields() -> None:
    quote = rec(2, price=None, bid=1.0, dt=DataType.QUOTE)
    got = flags(QualityChecker(), rec(1, price=None), quote)
    assert got == [[QualityFlag.MISSING_FIELDS], [QualityFlag.MISSING_FIELDS]]


def test_failover_symbols() -> None:
    qc = QualityChecker()
    qc.failover_symbols.add("MSFT")
    got = flags(qc, rec(1, symbol="MSFT"), rec(1, symbol="AAPL"))
    assert got == [[QualityFlag.FAILOVER], []]


def test_unsequenced_records_use_provider_time() -> None:
    qc = QualityChecker()
    bars = [rec(None, ts=T0 + 60), rec(None, ts=T0 + 60), rec(None, ts=T0)]
    assert flags(qc, *bars) == [[], [QualityFlag.DUPLICATE], [QualityFlag.OUT_OF_ORDER]]


def test_counts_and_forget() -> None:
    qc = QualityChecker()
    flags(qc, rec(5), rec(5))
    assert qc.flag_counts["duplicate"] == 1
    qc.forget(["AAPL"])
    assert flags(qc, rec(1)) == [[]]


def test_after_a_reconnect_a_jump_is_a_gap_even_where_numbers_may_skip() -> None:
    """Polygon's numbers are not contiguous, so a jump mid-stream is normal; but the first
    record after a reconnect carries what was in flight when the connection died."""
    qc = QualityChecker()
    assert flags(qc, rec(1), rec(4)) == [[], []]
    qc.resume()
    after = rec(9)
    assert flags(qc, after, rec(12)) == [[QualityFlag.GAP], []]
    assert after.provider_specific["gap"] == [5, 8]
    qc.resume()
    assert flags(qc, rec(13)) == [[]]  # nothing missing: no flag


def test_the_next_number_is_no_gap_and_one_missing_number_is() -> None:
    records = [rec(n, contiguous=True) for n in (1, 2, 3, 5, 6)]
    assert flags(QualityChecker(), *records) == [[], [], [], [QualityFlag.GAP], []]
    assert [r.provider_specific for r in records] == [{}, {}, {}, {"gap": [4, 4]}, {}]


def test_after_a_reconnect_the_next_number_is_no_gap_and_one_missing_number_is() -> None:
    qc = QualityChecker()
    flags(qc, rec(1), rec(2))
    qc.resume()
    assert flags(qc, rec(3)) == [[]]
    qc.resume()
    skipped = rec(5)
    assert flags(qc, skipped) == [[QualityFlag.GAP]]
    assert skipped.provider_specific == {"gap": [4, 4]}
    assert qc.flag_counts["gap"] == 1


def test_stale_is_strictly_past_the_threshold() -> None:
    at_limit, past = rec(1, recv=T0 + 2_000_000_000), rec(2, recv=T0 + 2_000_000_001)
    assert flags(QualityChecker(stale_after_s=2.0), at_limit, past) == [[], [QualityFlag.STALE]]


def test_an_outlier_is_strictly_past_the_fraction_either_way() -> None:
    for price, expected in ((110.0, []), (90.0, []), (110.5, [QualityFlag.PRICE_OUTLIER]),
                            (89.5, [QualityFlag.PRICE_OUTLIER])):  # fmt: skip
        got = flags(QualityChecker(outlier_fraction=0.1), rec(1, price=100.0), rec(2, price=price))
        assert got == [[], expected], price


def test_the_default_outlier_fraction_is_ten_percent() -> None:
    # The worker builds its checker without an outlier_fraction: the default is what runs.
    for price, expected in ((110.0, []), (110.5, [QualityFlag.PRICE_OUTLIER])):
        assert flags(QualityChecker(), rec(1, price=100.0), rec(2, price=price)) == [[], expected]


def test_a_locked_quote_is_not_crossed() -> None:
    locked = rec(1, price=None, bid=10.01, ask=10.01, dt=DataType.QUOTE)
    assert flags(QualityChecker(), locked) == [[]]


def test_flag_counts_add_up_over_batches() -> None:
    qc = QualityChecker()
    flags(qc, rec(5), rec(5), rec(5))
    flags(qc, rec(5), rec(4))
    assert {k: v for k, v in qc.flag_counts.items() if v} == {"duplicate": 3, "out_of_order": 1}


def test_last_seen_holds_each_symbols_last_receive_time() -> None:
    qc = QualityChecker()
    flags(qc, rec(1, recv=T0 + 5), rec(1, symbol="MSFT", recv=T0 + 7), rec(2, recv=T0 + 9))
    assert qc.last_seen == {"AAPL": T0 + 9, "MSFT": T0 + 7}


def test_forget_drops_only_the_given_symbols() -> None:
    def bar(symbol: str, ts: int = T0) -> RawMarketData:
        return rec(None, dt=DataType.AGGREGATE, ts=ts, symbol=symbol, stream=f"AM.{symbol}")

    qc = QualityChecker()
    flags(qc, rec(5, price=100.0), rec(5, price=100.0, symbol="MSFT"), bar("AAPL"))
    flags(qc, bar("MSFT"), rec(6, symbol="MSFT", recv=T0 + 7))
    qc.forget(["AAPL"])
    assert qc.sequences() == {"S.MSFT": 6}
    assert qc.last_seen == {"MSFT": T0 + 7}
    # AAPL starts clean: a lower number, an older bar or a far price are not flagged ...
    assert flags(qc, rec(1, price=150.0), bar("AAPL", ts=T0 - 1)) == [[], []]
    # ... while MSFT keeps its sequence, bar time and last price.
    assert flags(qc, rec(6, price=150.0, symbol="MSFT"), bar("MSFT")) == [
        [QualityFlag.DUPLICATE, QualityFlag.PRICE_OUTLIER],
        [QualityFlag.DUPLICATE],
    ]


def test_forget_a_symbol_whose_name_holds_a_dot() -> None:
    qc = QualityChecker()
    flags(qc, rec(7, symbol="BRK.B"))
    qc.forget(["BRK.B"])
    assert qc.sequences() == {}
    assert flags(qc, rec(1, symbol="BRK.B")) == [[]]


def test_forget_a_symbol_that_never_traded_or_never_arrived() -> None:
    qc = QualityChecker()
    flags(qc, rec(1, price=None, bid=1.0, ask=1.1, dt=DataType.QUOTE, symbol="EURUSD"))
    # Only quotes (no last trade price), and one subscribed but silent so far.
    qc.forget(["EURUSD", "SILENT"])
    assert (qc.sequences(), qc.last_seen) == ({}, {})


def test_unsequenced_records_are_ordered_per_stream() -> None:
    qc = QualityChecker()
    # A bar stream and a trade stream of one symbol, and records without a stream name
    # (keyed by symbol): each has its own clock, so an earlier time elsewhere is no disorder.
    got = flags(
        qc,
        rec(None, ts=T0 + 60, stream="AM.AAPL"),
        rec(None, ts=T0, stream="T.AAPL"),
        rec(None, ts=T0 + 60, stream=""),
        rec(None, ts=T0, stream="", symbol="MSFT"),
        rec(None, ts=T0 + 30, stream="AM.AAPL"),
    )
    assert got == [[], [], [], [], [QualityFlag.OUT_OF_ORDER]]


def test_after_a_reconnect_only_each_streams_first_record_is_checked_for_a_jump() -> None:
    qc = QualityChecker()
    flags(qc, rec(1), rec(1, symbol="MSFT"))
    qc.resume()
    # AAPL's first record is next in line; its second jumps, which Polygon's numbers may do
    # mid-stream, though MSFT has not yet sent its first record since the reconnect.
    assert flags(qc, rec(2), rec(6)) == [[], []]
    assert flags(qc, rec(4, symbol="MSFT")) == [[QualityFlag.GAP]]


def test_a_provider_time_before_2000_is_replaced_by_the_receive_time() -> None:
    """A time of day that lost its date (13:30 on 1970-01-01) never reaches a sink: the
    receive time stands in, flagged, with the provider's value kept beside it."""
    tod = 13 * 3600 * 10**9 + 30 * 60 * 10**9
    last_ns_of_1999 = 946_684_800 * 10**9 - 1
    first = rec(1, ts=tod)
    edge = rec(2, ts=last_ns_of_1999)
    ok = rec(3, ts=946_684_800 * 10**9)
    first.quality_flags.append(QualityFlag.MISSING_FIELDS)  # as a codec may have
    assert flags(QualityChecker(stale_after_s=None), first, edge, ok) == [
        [QualityFlag.MISSING_FIELDS], [QualityFlag.MISSING_FIELDS], [],
    ]  # fmt: skip
    assert [r.timestamp_ns for r in (first, edge, ok)] == [
        T0 + 1_000_000, T0 + 1_000_000, 946_684_800 * 10**9,
    ]  # fmt: skip
    assert first.provider_specific == {"provider_timestamp_ns": tod}
    assert edge.provider_specific == {"provider_timestamp_ns": last_ns_of_1999}
    assert ok.provider_specific == {}
    # Not stale: the receive time is the record's time now.
    assert flags(QualityChecker(stale_after_s=1.0), rec(4, ts=tod)) == [
        [QualityFlag.MISSING_FIELDS]
    ]
