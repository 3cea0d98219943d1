"""Freshness-aware health: what /health concludes from the workers' reports.

The rules on documents (workers/health.py), then the real thing: a worker process whose
loop stops (SIGSTOP, as a starved or stuck worker) is reported ``degraded`` with the reason
within seconds, while its last document still says CONNECTED; the disk its journal is on
shows as a component.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from common import db
from common.config import Settings
from common.model import DataType, iso_ns
from common.provider import ProviderConfig
from tests.faultrig import free_udp_port
from tests.test_api import reporting_worker
from workers import health
from workers.api import build_app
from workers.coordinator import Coordinator

ROOT = Path(__file__).resolve().parents[1]
NOW = 1_800_000_000.0


def _provider(enabled: bool = True, **cc: Any) -> ProviderConfig:
    return ProviderConfig(id="p1", name="p", provider_type="iex", connection_config=cc,
                          enabled=enabled)  # fmt: skip


def _doc(status: str = "CONNECTED", age_s: float | None = 0.5, **metrics: Any) -> dict[str, Any]:
    last = None if age_s is None else iso_ns(int((NOW - age_s) * 1e9))
    return {
        "status": status,
        "last_update": iso_ns(int((NOW - 0.4) * 1e9)),
        "subscribed_symbols": 3,
        "last_error": None,
        "metrics": {"last_event_at": last, "latency_p99_ms": 12.0, "queue_depth": 0} | metrics,
    }


def test_connected_and_fresh_is_ok() -> None:
    assert health.provider_health(_provider(), _doc(), NOW) == health.ProviderHealth("ok", None)


def test_each_kind_of_lag_degrades_with_its_reason() -> None:
    verdict = health.provider_health(_provider(), _doc(latency_p99_ms=104_000.0), NOW)
    assert verdict.health == "degraded"
    assert verdict.reason == "receive -> publish p99 104,000 ms over 5,000 ms"
    verdict = health.provider_health(_provider(), _doc(age_s=61.0), NOW)
    assert verdict.reason == "last record 61s ago (limit 60s)"
    verdict = health.provider_health(_provider(), _doc(queue_depth=10_001), NOW)
    assert verdict.reason == "10,001 waiting in the adapter's queue (limit 10,000)"
    stale = _doc() | {"last_update": iso_ns(int((NOW - 9) * 1e9))}
    verdict = health.provider_health(_provider(), stale, NOW)
    assert verdict.reason == "status report 9s old (worker stalled?)"
    both = health.provider_health(_provider(), _doc(age_s=70.0, queue_depth=20_000), NOW)
    assert both.reason is not None and both.reason.count("; ") == 1


def test_limits_come_from_the_provider_row() -> None:
    lagging = _doc(latency_p99_ms=800.0, age_s=100.0)
    assert health.provider_health(_provider(), lagging, NOW).reason == (
        "last record 100s ago (limit 60s)"
    )
    strict = _provider(max_lag_ms=500, max_event_age_s=None)
    assert health.provider_health(strict, lagging, NOW).reason == (
        "receive -> publish p99 800 ms over 500 ms"
    )
    bad = _provider(max_lag_ms="soon")
    verdict = health.provider_health(bad, _doc(), NOW)
    assert verdict.health == "degraded" and "max_lag_ms must be a number" in str(verdict.reason)
    # no symbols held: a quiet feed is not a late one
    idle = _doc(age_s=500.0) | {"subscribed_symbols": 0}
    assert health.provider_health(_provider(), idle, NOW).health == "ok"


def test_down_disabled_and_rate_limited() -> None:
    down = _doc("ERROR") | {"last_error": "auth refused"}
    assert health.provider_health(_provider(), down, NOW) == health.ProviderHealth(
        "down", "auth refused"
    )
    limited = health.provider_health(_provider(), _doc("RATE_LIMITED"), NOW)
    assert limited.health == "degraded"
    off = health.provider_health(_provider(enabled=False), _doc(), NOW)
    assert off == health.ProviderHealth("disabled", "provider disabled")


def test_pulsar_and_disk_components() -> None:
    def sink(healthy: bool, backlog: int, receipt: str | None) -> dict[str, Any]:
        pulsar = {"healthy": healthy, "backlog": backlog, "last_receipt_at": receipt}
        return {"metrics": {"sinks": {"pulsar": pulsar}}}

    assert health.pulsar_component([])["status"] == "unknown"
    a, b = "2026-12-03T10:00:00.000000000Z", "2026-12-03T10:00:01.000000000Z"
    up = health.pulsar_component([sink(True, 5, a), sink(True, 0, b)])
    assert up == {"status": "up", "workers_connected": 2, "workers_reporting": 2,
                  "backlog": 5, "last_receipt": b}  # fmt: skip
    assert health.pulsar_component([sink(True, 0, a), sink(False, 900, None)])["status"] == (
        "degraded"
    )
    assert health.pulsar_component([sink(False, 900, None)])["status"] == "down"

    gib = 1 << 30
    assert health.disk_status(50 * gib, 100 * gib) == "ok"
    assert health.disk_status(9 * gib, 100 * gib) == "low"  # under 10%
    assert health.disk_status(1 * gib, 5 * gib) == "low"  # under 2 GiB
    assert health.disk_status(2 * gib, 100 * gib) == "critical"  # under 3%
    assert health.disk_status(100 << 20, 1 * gib) == "critical"  # under 512 MiB

    def disk(free: int, total: int, path: str) -> dict[str, Any]:
        return {"metrics": {"disk": {"path": path, "free_bytes": free, "total_bytes": total}}}

    worst = health.disk_component([disk(80 * gib, 100 * gib, "/a"), disk(gib, 3 * gib, "/b")])
    assert (worst["status"], worst["path"], worst["free_ratio"]) == ("low", "/b", 0.3333)
    assert health.disk_component([{"metrics": {}}]) == {"status": "unknown"}


async def test_a_journal_on_a_nearly_full_disk_shows_in_health(
    alone: tuple[Settings, db.Conn],
    tiny_disk: Path,
) -> None:
    settings, conn = alone
    pid = await db.upsert_provider(conn, "tiny", "polygon", {"url": "ws://x"})
    settings = replace(settings, journal_dir=tiny_disk / "journal")
    app = build_app(settings)
    async with TestClient(TestServer(app)) as client, reporting_worker(settings, pid, 10):
        doc = await (await client.get("/health")).json()
    disk = doc["components"]["disk"]
    assert disk["status"] == "critical" and disk["path"] == str(tiny_disk / "journal" / "tiny")
    assert 0 < disk["free_bytes"] <= 4 << 20
    assert doc["status"] == "degraded" and "disk" in doc["reasons"]


async def _health(client: TestClient) -> dict[str, Any]:
    doc: dict[str, Any] = await (await client.get("/health")).json()
    return doc


async def test_a_frozen_worker_turns_degraded_while_its_document_says_connected(
    alone: tuple[Settings, db.Conn],
    tmp_path: Path,
) -> None:
    settings, conn = alone
    name = f"iex-{uuid.uuid4().hex[:5]}"
    symbols = [f"H{name[-5:].upper()}{i}" for i in range(3)]
    udp = free_udp_port()
    config = {"host": "127.0.0.1", "port": udp, "heartbeat_timeout_s": 30,
              "stale_after_s": None, "max_event_age_s": 3}  # fmt: skip
    pid = await db.upsert_provider(conn, name, "iex", config)
    await db.subscribe(conn, pid, symbols, [DataType.TRADE, DataType.QUOTE])
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEEDFLEET_")}
    env.update(
        FEEDFLEET_DATABASE_URL=settings.database_url, FEEDFLEET_REDIS_URL=settings.redis_url,
        FEEDFLEET_PULSAR_URL=settings.pulsar_url, FEEDFLEET_PULSAR_TOPIC=settings.pulsar_topic,
        FEEDFLEET_JOURNAL_DIR=str(tmp_path / "journal"), FEEDFLEET_HOST="health-test",
    )  # fmt: skip
    log = open(tmp_path / "procs.log", "wb")  # noqa: SIM115
    sim = subprocess.Popen(
        [sys.executable, "-m", "simulators", "iex", "--rate", "500", "--dest",
         f"127.0.0.1:{udp}", "--symbols", ",".join(symbols)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    worker = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "worker", name],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    coordinator = Coordinator(settings, poll_s=0.5)
    coordinating = asyncio.create_task(coordinator.run(handle_signals=False))
    try:
        async with TestClient(TestServer(build_app(settings))) as client:

            async def until_health(want: str, timeout: float, why: str = "") -> dict[str, Any]:
                deadline = time.monotonic() + timeout
                while True:
                    doc = await _health(client)
                    mine = doc["providers"][name]
                    if mine["health"] == want and why in (mine["reason"] or ""):
                        return doc
                    assert time.monotonic() < deadline, f"not {want}: {doc['providers'][name]}"
                    await asyncio.sleep(0.25)

            doc = await until_health("ok", 60)
            mine = doc["providers"][name]
            assert mine["status"] == "CONNECTED" and mine["reason"] is None
            assert mine["last_event_age_s"] is not None and mine["last_event_age_s"] < 3
            assert isinstance(mine["queue_depth"], int) and mine["queue_depth"] < 10_000
            assert doc["components"]["pulsar"]["status"] == "up"
            assert doc["components"]["pulsar"]["last_receipt"] is not None
            assert doc["status"] == "healthy"

            os.kill(worker.pid, signal.SIGSTOP)
            doc = await until_health("degraded", 15)
            mine = doc["providers"][name]
            # Its last document still says CONNECTED: only freshness tells.
            assert mine["status"] == "CONNECTED"
            assert "last record" in mine["reason"], mine["reason"]
            assert doc["status"] == "degraded" and f"provider {name}" in doc["reasons"]
            doc = await until_health("degraded", 6, "status report")
            assert doc["providers"][name]["status"] == "CONNECTED"

            os.kill(worker.pid, signal.SIGCONT)
            await until_health("ok", 30)
    finally:
        with_cont = [signal.SIGCONT, signal.SIGKILL]
        for sig in with_cont:
            for proc in (worker, sim):
                if proc.poll() is None:
                    os.kill(proc.pid, sig)
        worker.wait(10)
        sim.wait(10)
        coordinator.stop()
        await asyncio.wait_for(coordinating, 30)
        log.close()
