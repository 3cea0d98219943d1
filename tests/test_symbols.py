"""Canonical symbols and the providers' own names for them."""

from __future__ import annotations

import pytest

from common.model import DataType, RawMarketData
from common.provider import Instrument, ProviderConfig, ProviderConfigError
from common.symbols import SymbolMap


def _map(**cc: object) -> SymbolMap:
    return SymbolMap.from_config(ProviderConfig("id", "p", "refinitiv", connection_config=cc))


def test_explicit_names_win_over_the_template() -> None:
    symbols = _map(symbol_map={"BRK.B": "BRKb.N"}, symbol_format="{symbol}.O")
    assert symbols.to_provider("AAPL") == "AAPL.O"
    assert symbols.to_provider("BRK.B") == "BRKb.N"
    assert symbols.to_canonical("AAPL.O") == "AAPL"
    assert symbols.to_canonical("BRKb.N") == "BRK.B"
    assert symbols.to_canonical("MSFT.O") is None  # never asked for: not ours to rename


def test_records_get_the_canonical_symbol_and_keep_the_providers() -> None:
    symbols = _map(symbol_format="{symbol} US Equity")
    wanted = symbols.instruments([Instrument("AAPL", frozenset({DataType.TRADE}))])
    assert list(wanted) == ["AAPL US Equity"]
    record = RawMarketData("AAPL US Equity", "bbg", 1, DataType.TRADE, provider_specific={"a": 1})
    symbols.rename([record])
    assert record.symbol == "AAPL"
    assert record.provider_specific == {"a": 1, "provider_symbol": "AAPL US Equity"}


def test_no_mapping_changes_nothing() -> None:
    symbols = _map()
    record = RawMarketData("AAPL", "p", 1, DataType.TRADE)
    symbols.rename([record])
    assert symbols.identity and record.symbol == "AAPL" and record.provider_specific == {}


@pytest.mark.parametrize(
    "cc",
    [
        {"symbol_map": ["AAPL"]},
        {"symbol_map": {"AAPL": ""}},
        {"symbol_format": "{sym}.O"},
        {"symbol_format": "{symbol}{symbol}"},
        {"symbol_format": 5},
    ],
)
def test_a_bad_mapping_is_a_config_error(cc: dict[str, object]) -> None:
    with pytest.raises(ProviderConfigError, match="symbol_"):
        _map(**cc)
