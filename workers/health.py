"""What ``/health`` concludes from the workers' status documents: per provider, whether it
is fresh, and the state of Pulsar and of the disks the journals live on.

A connected provider can still be far behind: its records wait in a queue of the
adapter's (IEX datagrams, blpapi events), or the worker's loop is starved and its reports
come late. So a provider is ``ok`` only when it is connected and fresh:

- receive -> Pulsar receipt p99 at most ``max_lag_ms`` (connection_config, default 5000);
- the last record at most ``max_event_age_s`` old (default 60; null turns it off, as for
  a feed that is quiet outside market hours), while it holds symbols;
- at most ``max_queue_depth`` records or frames waiting in the adapter (default 10000);
- its status document written within the last ``STALE_REPORT_S`` (a worker whose loop is
  stuck stops reporting long before the document expires).

Otherwise it is ``degraded`` with the reason, ``down`` when not connected, ``disabled``
when its row says so. Pure functions over decoded documents: no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common.model import ConnectionStatus, seconds_since_iso
from common.provider import ProviderConfig, ProviderConfigError

DEFAULT_MAX_LAG_MS = 5000.0
DEFAULT_MAX_EVENT_AGE_S = 60.0
DEFAULT_MAX_QUEUE_DEPTH = 10_000
# A worker writes its document every second: three missed is a worker in trouble.
STALE_REPORT_S = 5.0
# Free space on a journal's disk: below either figure it is low, then critical.
DISK_LOW_RATIO, DISK_LOW_BYTES = 0.10, 2 << 30
DISK_CRITICAL_RATIO, DISK_CRITICAL_BYTES = 0.03, 512 << 20

OK, DEGRADED, DOWN, DISABLED = "ok", "degraded", "down", "disabled"


@dataclass(frozen=True, slots=True)
class ProviderHealth:
    health: str  # ok, degraded, down or disabled
    reason: str | None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def last_event_age_s(doc: dict[str, Any], now_s: float) -> float | None:
    """Seconds since the provider's last record, counted now (not when it was reported)."""
    metrics = doc.get("metrics") or {}
    age = seconds_since_iso(metrics.get("last_event_at"), now_s)
    return None if age is None else round(age, 3)


def provider_health(provider: ProviderConfig, doc: dict[str, Any], now_s: float) -> ProviderHealth:
    """One provider's health from its status document (as the API reads it)."""
    if not provider.enabled:
        return ProviderHealth(DISABLED, "provider disabled")
    status = doc.get("status")
    if status != ConnectionStatus.CONNECTED.value:
        if status == ConnectionStatus.RATE_LIMITED.value:
            return ProviderHealth(DEGRADED, doc.get("last_error") or "rate limited")
        return ProviderHealth(
            DOWN, doc.get("reason") or doc.get("last_error") or f"status {status}"
        )
    reasons = []
    report_age = seconds_since_iso(doc.get("last_update"), now_s)
    if report_age is not None and report_age > STALE_REPORT_S:
        reasons.append(f"status report {report_age:.0f}s old (worker stalled?)")
    try:
        max_lag_ms = provider.optional_number("max_lag_ms", DEFAULT_MAX_LAG_MS)
        max_age_s = provider.optional_number("max_event_age_s", DEFAULT_MAX_EVENT_AGE_S)
        max_queue = provider.optional_number("max_queue_depth", DEFAULT_MAX_QUEUE_DEPTH)
    except ProviderConfigError as exc:
        return ProviderHealth(DEGRADED, f"freshness limits unreadable: {exc}")
    metrics = doc.get("metrics") or {}
    lag_ms = _number(metrics.get("latency_p99_ms"))
    if max_lag_ms is not None and lag_ms is not None and lag_ms > max_lag_ms:
        reasons.append(f"receive -> publish p99 {lag_ms:,.0f} ms over {max_lag_ms:,.0f} ms")
    age = last_event_age_s(doc, now_s)
    holds_symbols = (_number(doc.get("subscribed_symbols")) or 0) > 0
    if max_age_s is not None and holds_symbols and age is not None and age > max_age_s:
        reasons.append(f"last record {age:.0f}s ago (limit {max_age_s:g}s)")
    queued = _number(metrics.get("queue_depth"))
    if max_queue is not None and queued is not None and queued > max_queue:
        reasons.append(f"{queued:,.0f} waiting in the adapter's queue (limit {max_queue:,.0f})")
    if reasons:
        return ProviderHealth(DEGRADED, "; ".join(reasons))
    return ProviderHealth(OK, None)


def pulsar_component(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """Pulsar as the workers see it: connected, the events not yet acknowledged, the last
    receipt. ``unknown`` while no worker reports."""
    sinks = [
        s
        for d in docs
        if isinstance(s := ((d.get("metrics") or {}).get("sinks") or {}).get("pulsar"), dict)
    ]
    receipts = [r for s in sinks if isinstance(r := s.get("last_receipt_at"), str)]
    healthy = [bool(s.get("healthy")) for s in sinks]
    if not sinks:
        status = "unknown"
    elif all(healthy):
        status = "up"
    elif any(healthy):
        status = "degraded"
    else:
        status = "down"
    return {
        "status": status,
        "workers_connected": sum(healthy),
        "workers_reporting": len(sinks),
        "backlog": sum(int(_number(s.get("backlog")) or 0) for s in sinks),
        "last_receipt": max(receipts, default=None),
    }


def disk_status(free_bytes: int, total_bytes: int) -> str:
    ratio = free_bytes / total_bytes if total_bytes else 0.0
    if ratio < DISK_CRITICAL_RATIO or free_bytes < DISK_CRITICAL_BYTES:
        return "critical"
    if ratio < DISK_LOW_RATIO or free_bytes < DISK_LOW_BYTES:
        return "low"
    return "ok"


_DISK_SEVERITY = {"ok": 0, "low": 1, "critical": 2}


def disk_component(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fullest journal disk among the reporting workers (``unknown`` with none)."""
    worst: dict[str, Any] | None = None
    worst_rank = (0, 0.0)
    for doc in docs:
        disk = (doc.get("metrics") or {}).get("disk")
        if not isinstance(disk, dict):
            continue
        free, total = _number(disk.get("free_bytes")), _number(disk.get("total_bytes"))
        if free is None or not total:
            continue
        status = disk_status(int(free), int(total))
        ratio = round(free / total, 4)
        rank = (_DISK_SEVERITY[status], -ratio)
        if worst is None or rank > worst_rank:
            worst_rank = rank
            worst = {
                "status": status,
                "path": disk.get("path"),
                "instance": doc.get("instance_id"),
                "free_bytes": int(free),
                "free_ratio": ratio,
            }
    return worst or {"status": "unknown"}
