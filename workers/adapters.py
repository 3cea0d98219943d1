"""Which adapter class serves which ``providers.provider_type``.

Imported lazily: a worker loads only its own provider's dependencies (blpapi, simplefix).
"""

from __future__ import annotations

import importlib

from common.provider import ProviderAdapter, ProviderConfigError

ADAPTERS: dict[str, str] = {
    "polygon": "workers.polygon:PolygonAdapter",
    "refinitiv": "workers.refinitiv:RefinitivAdapter",
    "alphavantage": "workers.alphavantage:AlphaVantageAdapter",
    "iex": "workers.iex:IexAdapter",
    "fix": "workers.fix:FixAdapter",
    "bloomberg": "workers.bloomberg:BloombergAdapter",
}


def adapter_class(provider_type: str) -> type[ProviderAdapter]:
    try:
        module_name, _, class_name = ADAPTERS[provider_type].partition(":")
    except KeyError:
        known = ", ".join(sorted(ADAPTERS))
        raise ProviderConfigError(
            f"unknown provider_type {provider_type!r}; known: {known}"
        ) from None
    cls: type[ProviderAdapter] = getattr(importlib.import_module(module_name), class_name)
    return cls
