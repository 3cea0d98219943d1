"""The per-stage CPU the benchmark reads (``common/stage_cpu.py``): off by default, and when
on, the pipeline's stages add their thread CPU time and the status report carries it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from common import stage_cpu
from common.circuit import CircuitBreaker
from common.model import DataType, RawMarketData
from tests.conftest import Services
from tests.test_status_reporter import build_reporter


def trades(n: int) -> list[RawMarketData]:
    now = time.time_ns()
    return [
        RawMarketData(
            f"S{i % 50}",
            "stage",
            now - now % 1_000_000,
            DataType.TRADE,
            10.0 + i,
            100.0,
            provider_specific={"x": 4},
            provider_sequence=i,
            stream=f"T.S{i % 50}",
            receive_ns=now,
        )
        for i in range(n)
    ]


def test_the_clock_counts_thread_cpu_not_wall_time() -> None:
    clock = stage_cpu.StageClock()
    mark = clock.start()
    time.sleep(0.05)  # waiting is not CPU
    mark = clock.lap("decode", mark)
    assert clock.ns["decode"] < 20_000_000
    clock.ns["decode"] = 0
    process_before, mark = time.process_time_ns(), clock.start()
    deadline = time.perf_counter() + 0.1
    while time.perf_counter() < deadline:
        pass
    after = clock.lap("decode", mark)
    process_cpu = time.process_time_ns() - process_before
    # This thread's busy loop: most of the process's CPU meanwhile, never more.
    assert process_cpu // 2 <= clock.ns["decode"] <= process_cpu + 1_000_000
    assert clock.ns["decode"] > 5_000_000
    # a lap returns its own reading: the next stage starts where this one ended
    assert after - mark == clock.ns["decode"]
    assert set(clock.ns) == set(stage_cpu.STAGES)


def test_the_clock_off_reads_and_counts_nothing() -> None:
    clock = stage_cpu.StageClockOff()
    assert clock.lap("decode", clock.start()) == 0
    assert set(clock.ns.values()) == {0} and clock.report() is None


async def test_the_status_report_carries_each_stage_only_when_on(
    services: Services, redis_client: aioredis.Redis, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    built = build_reporter(services, redis_client, tmp_path, CircuitBreaker())
    try:
        pipeline = built.reporter.pipeline
        monkeypatch.setattr(stage_cpu, "CLOCK", stage_cpu.StageClockOff())
        pipeline.process(trades(200))
        assert "stage_cpu" not in built.reporter.metrics()

        monkeypatch.setattr(stage_cpu, "CLOCK", stage_cpu.StageClock())
        for _ in range(20):
            pipeline.process(trades(200))
        report = built.reporter.metrics()["stage_cpu"]
        stages = report["stages_ns"]
        assert set(stages) == set(stage_cpu.STAGES)
        for stage in ("quality", "event_build", "journal"):
            assert stages[stage] > 0, stage
        assert all(v >= 0 for v in stages.values())
        # building 4,000 events takes CPU, and the stages are part of the thread's time
        assert stages["event_build"] > 1_000_000
        assert report["thread_ns"] >= sum(stages.values())
    finally:
        built.journal.close()
