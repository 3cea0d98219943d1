"""A harmless change to a provider row must not stop its data.

For every provider: the real coordinator and worker stream every subscribed symbol from
the provider's simulator; an operator then UPDATEs one timeout in the row's
connection_config by a second. The worker rebuilds its adapter for the new row, and every
symbol must get newly received events again, stored in ``raw_market_data``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from psycopg.types.json import Jsonb

from common import db
from common.embedded import free_port
from common.model import DataType
from simulators.alphavantage import AlphaVantageSimConfig, AlphaVantageSimulator
from simulators.bloomberg import BloombergSimConfig, BloombergSimulator
from simulators.fix import FixSimConfig, FixSimulator
from simulators.iex import IexSimConfig, IexSimulator
from simulators.market import Simulator
from simulators.polygon import PolygonSimConfig, PolygonSimulator
from simulators.refinitiv import RefinitivSimConfig, RefinitivSimulator
from tests.conftest import Services
from tests.running import RunningWorker, until
from workers.assignments import load_last_assignment

KEY_ENV = "FEEDFLEET_TEST_RECONFIGURE_KEY"
SYMBOLS_PER_PROVIDER = 4
# These only bound how long a failure takes to be reported; a passing case is much faster.
FLOWING_TIMEOUT_S = 30.0
PICKUP_TIMEOUT_S = 10.0  # NOTIFY wakes the worker; its 1 s poll is the fallback
RESUMED_TIMEOUT_S = 15.0

StartSimulator = Callable[[list[str]], Awaitable[tuple[Simulator, dict[str, Any]]]]


@dataclass(frozen=True)
class Case:
    """One provider's simulator, its row, and the timeout an operator nudges."""

    provider_type: str
    symbol: Callable[[str, int], str]
    start: StartSimulator
    key: str
    before: float
    after: float
    data_types: tuple[DataType, ...] = (DataType.TRADE, DataType.QUOTE)
    rate_limits: dict[str, Any] | None = None


async def _polygon(symbols: list[str]) -> tuple[Simulator, dict[str, Any]]:
    sim = PolygonSimulator(PolygonSimConfig(symbols=symbols, rate=1000))
    port = await sim.start()
    return sim, {"url": f"ws://127.0.0.1:{port}/stocks", "api_key_env": KEY_ENV}


async def _refinitiv(symbols: list[str]) -> tuple[Simulator, dict[str, Any]]:
    sim = RefinitivSimulator(RefinitivSimConfig(symbols=symbols, rate=1000))
    port = await sim.start()
    return sim, {"url": f"ws://127.0.0.1:{port}/WebSocket", "user": "feedfleet"}


async def _alphavantage(symbols: list[str]) -> tuple[Simulator, dict[str, Any]]:
    sim = AlphaVantageSimulator(AlphaVantageSimConfig(symbols=symbols, bar_seconds=0.2))
    port = await sim.start()
    return sim, {
        "base_url": f"http://127.0.0.1:{port}", "api_key_env": KEY_ENV,
        "functions": ["GLOBAL_QUOTE", "TIME_SERIES_INTRADAY"], "interval": "1min",
        "poll_interval_s": 0.5,
    }  # fmt: skip


async def _iex(symbols: list[str]) -> tuple[Simulator, dict[str, Any]]:
    udp = free_port()
    sim = IexSimulator(IexSimConfig(symbols=symbols, destination=("127.0.0.1", udp), rate=1000))
    await sim.start()
    return sim, {"host": "127.0.0.1", "port": udp}


async def _fix(symbols: list[str]) -> tuple[Simulator, dict[str, Any]]:
    sim = FixSimulator(FixSimConfig(symbols=symbols, rate=500))
    port = await sim.start()
    return sim, {
        "host": "127.0.0.1", "port": port, "sender_comp_id": "FEEDFLEET",
        "target_comp_id": "FIXSIM", "heartbeat_interval": 5,
    }  # fmt: skip


async def _bloomberg(symbols: list[str]) -> tuple[Simulator, dict[str, Any]]:
    sim = BloombergSimulator(BloombergSimConfig(symbols=symbols, rate=1000))
    port = await sim.start()
    return sim, {"blpapi_module": "simulators.bloomberg", "host": "127.0.0.1", "port": port}


CASES = [
    Case("polygon", lambda t, i: f"P{t}{i}", _polygon, "heartbeat_s", 10, 11),
    Case("refinitiv", lambda t, i: f"R{t}{i}.N", _refinitiv, "login_timeout_s", 10, 11),
    Case("alphavantage", lambda t, i: f"A{t}{i}", _alphavantage, "request_timeout_s", 10, 11,
         (DataType.TRADE, DataType.AGGREGATE), {"requests_per_second": 50}),
    # The change in the bug report.
    Case("iex", lambda t, i: f"I{t}{i}", _iex, "heartbeat_timeout_s", 5, 6),
    Case("fix", lambda t, i: f"F{t}{i}", _fix, "logon_timeout_s", 10, 11),
    Case("bloomberg", lambda t, i: f"B{t}{i}", _bloomberg, "start_timeout_s", 15, 16),
]  # fmt: skip


def _as_timestamptz(ns: int) -> datetime:
    # Exact to the microsecond, as received_at is stored (a float of ns would round).
    seconds, rem = divmod(ns, 1_000_000_000)
    return datetime.fromtimestamp(seconds, UTC) + timedelta(microseconds=rem // 1000)


async def until_every_symbol_stored(
    conn: db.Conn, running: RunningWorker, provider_name: str, symbols: list[str],
    since_ns: int, what: str, timeout: float,
) -> dict[str, int]:  # fmt: skip
    """Wait until each symbol has a row received after ``since_ns``; the counts per symbol.

    Fails with the per-symbol counts and the worker's state, so a stalled symbol is named.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    since = _as_timestamptz(since_ns)
    worker = running.worker
    while True:
        cur = await conn.execute(
            "SELECT symbol, count(*) FROM raw_market_data "
            "WHERE provider = %s AND received_at > %s GROUP BY symbol",
            (provider_name, since),
        )
        counts = dict.fromkeys(symbols, 0) | {s: n for s, n in await cur.fetchall()}
        if all(counts[s] > 0 for s in symbols):
            return counts
        for role, task in (
            ("worker", running.worker_task),
            ("coordinator", running.coordinator_task),
        ):
            if task.done():
                error = None if task.cancelled() else task.exception()
                raise AssertionError(f"the {role} ended ({error!r}) waiting for {what}")
        if loop.time() > deadline:
            adapter = worker.adapter
            raise AssertionError(
                f"timed out after {timeout:g}s waiting for {what}: rows per symbol {counts}; "
                f"worker {worker.status.value} (last error {worker.last_error!r}), "
                f"{running.received} received in all, adapter "
                f"{type(adapter).__name__} subscribed to "
                f"{sorted(adapter.subscribed) if adapter is not None else None}"
            )
        await asyncio.sleep(0.2)


@pytest.mark.parametrize("case", CASES, ids=[c.provider_type for c in CASES])
async def test_every_symbol_keeps_flowing_after_a_harmless_config_change(
    case: Case, services: Services, conn: db.Conn, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, "test-key")
    tag = uuid.uuid4().hex[:5].upper()
    symbols = [case.symbol(tag, i) for i in range(SYMBOLS_PER_PROVIDER)]
    sim, config = await case.start(symbols)
    config |= {case.key: case.before, "stale_after_s": None}
    name = f"{case.provider_type}-reconf-{tag.lower()}"
    provider_id = await db.upsert_provider(
        conn, name, case.provider_type, config, case.rate_limits or {}
    )
    await db.subscribe(conn, provider_id, symbols, list(case.data_types))
    running = RunningWorker.start(services.settings(), name)
    worker = running.worker
    try:
        await until_every_symbol_stored(
            conn, running, name, symbols, 0, "events for every symbol", FLOWING_TIMEOUT_S
        )
        old_adapter = worker.adapter
        assert old_adapter is not None

        # As an operator would: SQL on the row, not a call into the service.
        await conn.execute(
            "UPDATE providers SET connection_config = connection_config || %s, "
            "updated_at = now() WHERE id = %s",
            (Jsonb({case.key: case.after}), provider_id),
        )
        await until(
            lambda: (
                worker.provider is not None
                and worker.provider.connection_config.get(case.key) == case.after
                and worker.adapter is not None
                and worker.adapter is not old_adapter
                and worker.adapter.config is worker.provider
            ),
            PICKUP_TIMEOUT_S,
            f"the worker to rebuild its adapter for {case.key}={case.after}",
        )
        # Whatever the old adapter read was received before the new one was built.
        changed_ns = time.time_ns()

        await until_every_symbol_stored(
            conn, running, name, symbols, changed_ns,
            f"new events for every symbol after {case.key} {case.before} -> {case.after}",
            RESUMED_TIMEOUT_S,
        )  # fmt: skip
        # The local copy a restart without the database resumes from has the new row too,
        # though the symbols held did not change.
        assert worker.parts is not None
        saved = load_last_assignment(worker.parts.follower.cache_path)
        assert saved is not None
        assert saved[0].connection_config.get(case.key) == case.after
        assert sorted(saved[1]) == sorted(symbols)
    finally:
        await running.stop()
        await sim.stop()
        await db.set_provider_enabled(conn, provider_id, False)
