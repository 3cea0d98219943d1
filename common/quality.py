"""Quality flags: what a consumer should know about a record before trusting it.

Nothing is dropped here; flags travel with the event in ``metadata.quality_flags``.
State is per worker: sequences per provider stream, last trade price per symbol.
"""

from __future__ import annotations

from collections.abc import Iterable

from common.model import DataType, QualityFlag, RawMarketData

_STALE = QualityFlag.STALE
_OUT_OF_ORDER = QualityFlag.OUT_OF_ORDER
_DUPLICATE = QualityFlag.DUPLICATE
_GAP = QualityFlag.GAP
_CROSSED = QualityFlag.CROSSED
_OUTLIER = QualityFlag.PRICE_OUTLIER
_MISSING = QualityFlag.MISSING_FIELDS
_FAILOVER = QualityFlag.FAILOVER
_TRADE = DataType.TRADE
_QUOTE = DataType.QUOTE
# No market data is older: a provider time before it is a time of day that lost its date.
EARLIEST_NS = 946_684_800 * 1_000_000_000  # 2000-01-01T00:00:00Z


class QualityChecker:
    """Sets ``quality_flags`` on records in place.

    - stale: provider time more than ``stale_after_s`` before receive time (None: off);
    - duplicate / out_of_order: sequence equal to / below the last one on its stream
      (records without a sequence: their provider timestamp instead);
    - gap: a jump on a stream whose provider promises contiguous numbers; the record's
      ``provider_specific["gap"]`` then holds the missing range ``[first, last]``. The
      last sequence per stream outlives a restart (the journal keeps it: ``restore``), so
      what was sent while no worker listened is flagged too. After a reconnect or restart
      (``resume``) the first jump on *any* sequenced stream is flagged: ticks in flight when
      a connection died are missing even where the provider's numbers may skip (Polygon),
      and there the range is an upper bound;
    - crossed: bid > ask;
    - price_outlier: a trade more than ``outlier_fraction`` away from the symbol's last trade;
    - missing_fields: a trade without price, a quote without bid or ask (codecs add it too);
    - failover: the symbol is served by this provider only because another one failed.

    A provider time before 2000 (a time of day that could not be dated) is never kept: the
    receive time stands in, the record is flagged missing_fields, and the provider's value
    is kept in ``provider_specific["provider_timestamp_ns"]``. A 1970 row would land in the
    table's default partition and break every time query.
    """

    def __init__(self, stale_after_s: float | None = 5.0, outlier_fraction: float = 0.1) -> None:
        self.stale_after_ns = None if stale_after_s is None else int(stale_after_s * 1e9)
        self.outlier_fraction = outlier_fraction
        self.failover_symbols: set[str] = set()
        self._last_seq: dict[str, int] = {}
        # Streams whose next record is the first since a reconnect or restart.
        self._resumed: set[str] = set()
        self._last_time: dict[str, int] = {}
        self._last_price: dict[str, float] = {}
        # Receive time of each symbol's last record: which symbols flow, which went silent.
        self.last_seen: dict[str, int] = {}
        self.flag_counts: dict[str, int] = {f.value: 0 for f in QualityFlag}

    def sequences(self) -> dict[str, int]:
        """The last sequence per stream (the journal writes it at each new segment)."""
        return dict(self._last_seq)

    def restore(self, sequences: dict[str, int]) -> None:
        """Continue from what an earlier run of this worker saw (from the journal)."""
        self._last_seq.update(sequences)

    def resume(self) -> None:
        """The connection was (re)made: check every known stream's next number."""
        self._resumed = set(self._last_seq)

    def forget(self, symbols: Iterable[str]) -> None:
        """Drop state for unsubscribed symbols so a later resubscribe starts clean."""
        gone = set(symbols)
        for table in (self._last_seq, self._last_time):
            # Streams are named "<channel>.<symbol>" (the symbol may itself hold dots).
            for key in [k for k in table if k.partition(".")[2] in gone or k in gone]:
                del table[key]
        for sym in gone:
            self._last_price.pop(sym, None)
            self.last_seen.pop(sym, None)

    def check(self, records: list[RawMarketData]) -> None:
        stale_ns = self.stale_after_ns
        last_seq = self._last_seq
        last_time = self._last_time
        last_price = self._last_price
        failover = self.failover_symbols
        outlier = self.outlier_fraction
        counts = self.flag_counts
        seen = self.last_seen
        resumed = self._resumed
        for r in records:
            seen[r.symbol] = r.receive_ns
            flags = r.quality_flags
            if r.timestamp_ns < EARLIEST_NS:
                r.provider_specific = {
                    **r.provider_specific,
                    "provider_timestamp_ns": r.timestamp_ns,
                }
                r.timestamp_ns = r.receive_ns
                if _MISSING not in flags:
                    flags.append(_MISSING)
            seq = r.provider_sequence
            if seq is not None:
                stream = r.stream
                prev = last_seq.get(stream)
                first_since_resume = False
                if resumed and stream in resumed:
                    resumed.discard(stream)
                    first_since_resume = True
                if prev is None or seq > prev:
                    if (
                        prev is not None
                        and seq > prev + 1
                        and (r.sequence_contiguous or first_since_resume)
                    ):
                        flags.append(_GAP)
                        r.provider_specific = {**r.provider_specific, "gap": [prev + 1, seq - 1]}
                    last_seq[r.stream] = seq
                elif seq == prev:
                    flags.append(_DUPLICATE)
                else:
                    flags.append(_OUT_OF_ORDER)
            else:
                key = r.stream or r.symbol
                prev = last_time.get(key)
                if prev is None or r.timestamp_ns > prev:
                    last_time[key] = r.timestamp_ns
                elif r.timestamp_ns == prev:
                    flags.append(_DUPLICATE)
                else:
                    flags.append(_OUT_OF_ORDER)
            if stale_ns is not None and r.receive_ns - r.timestamp_ns > stale_ns:
                flags.append(_STALE)
            dt = r.data_type
            if dt is _TRADE:
                price = r.price
                if price is None:
                    if _MISSING not in flags:
                        flags.append(_MISSING)
                else:
                    ref = last_price.get(r.symbol)
                    if ref and abs(price - ref) > outlier * ref:
                        flags.append(_OUTLIER)
                    last_price[r.symbol] = price
            elif dt is _QUOTE and (r.bid is None or r.ask is None) and _MISSING not in flags:
                flags.append(_MISSING)
            if r.bid is not None and r.ask is not None and r.bid > r.ask:
                flags.append(_CROSSED)
            if failover and r.symbol in failover:
                flags.append(_FAILOVER)
            for f in flags:
                counts[f] += 1
