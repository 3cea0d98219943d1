"""Canonical symbols and each provider's own names for them.

Operators subscribe canonical symbols (``AAPL``); a provider may call the instrument
``AAPL.O`` (Refinitiv), ``AAPL US Equity`` (Bloomberg) or a venue code. A provider row maps
them in ``connection_config``:

- ``symbol_map``: ``{"AAPL": "AAPL.O"}``, explicit names, checked first;
- ``symbol_format``: ``"{symbol}.O"``, a template for every other canonical symbol
  (default ``"{symbol}"``: the same name).

Adapters only ever see the provider's names; events carry the canonical symbol in
``raw_data.symbol`` and the provider's own in ``provider_specific.provider_symbol`` where
the two differ. Failover needs this: one canonical symbol, served by whichever provider.
"""

from __future__ import annotations

from collections.abc import Iterable

from common.model import RawMarketData
from common.provider import Instrument, ProviderConfig, ProviderConfigError


class SymbolMap:
    def __init__(self, explicit: dict[str, str], template: str = "{symbol}") -> None:
        self.explicit = dict(explicit)
        self.template = template
        self.identity = not explicit and template == "{symbol}"
        self._to_canonical = {v: k for k, v in explicit.items()}

    @classmethod
    def from_config(cls, provider: ProviderConfig) -> SymbolMap:
        cc = provider.connection_config
        explicit = cc.get("symbol_map") or {}
        template = cc.get("symbol_format") or "{symbol}"
        if not isinstance(explicit, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in explicit.items()
        ):
            raise ProviderConfigError(
                "connection_config.symbol_map must map canonical symbols to provider symbols"
            )
        if not isinstance(template, str) or template.count("{symbol}") != 1:
            raise ProviderConfigError(
                'connection_config.symbol_format must hold "{symbol}" once, e.g. "{symbol}.O"'
            )
        try:
            template.format(symbol="X")
        except (KeyError, IndexError, ValueError) as exc:
            raise ProviderConfigError(
                f"connection_config.symbol_format is not a template: {exc}"
            ) from None
        return cls(explicit, template)

    def to_provider(self, canonical: str) -> str:
        name = self.explicit.get(canonical)
        if name is None:
            name = self.template.format(symbol=canonical)
            self._to_canonical.setdefault(name, canonical)
        return name

    def to_canonical(self, provider_symbol: str) -> str | None:
        """The canonical symbol of a name ``to_provider`` made; None for names it never did."""
        if self.identity:
            return provider_symbol
        return self._to_canonical.get(provider_symbol)

    def instruments(self, wanted: Iterable[Instrument]) -> dict[str, Instrument]:
        """Canonical instruments as the provider names them, keyed by the provider's name."""
        out = {}
        for inst in wanted:
            name = self.to_provider(inst.symbol)
            out[name] = Instrument(name, inst.data_types)
        return out

    def rename(self, records: list[RawMarketData]) -> None:
        """Give records their canonical symbol, keeping the provider's in provider_specific."""
        if self.identity:
            return
        to_canonical = self._to_canonical
        for r in records:
            canonical = to_canonical.get(r.symbol)
            if canonical is not None and canonical != r.symbol:
                r.provider_specific = {**r.provider_specific, "provider_symbol": r.symbol}
                r.symbol = canonical
