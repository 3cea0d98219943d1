"""Every Redis key the fleet writes, with its TTL (the seed's names)."""

from __future__ import annotations

LATEST_TTL_S = 5
STATUS_TTL_S = 30
RATELIMIT_TTL_S = 60
CIRCUIT_TTL_S = 300


def latest_key(symbol: str) -> str:
    return f"latest:{symbol}"


def provider_status_key(provider_id: str) -> str:
    return f"provider:{provider_id}:status"


def ratelimit_key(provider: str, minute: int) -> str:
    return f"ratelimit:{provider}:{minute}"


def circuit_key(provider: str) -> str:
    return f"circuit:{provider}"
