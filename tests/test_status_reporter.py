"""``StatusReporter.publish`` against the real Redis: the per-minute request mirror
``ratelimit:{provider}:{minute}`` gets exactly the requests made since the last publish."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from common.circuit import CircuitBreaker
from common.journal import Journal
from common.model import RawMarketData
from common.pipeline import Pipeline
from common.provider import Instrument, ProviderAdapter, ProviderConfig
from common.quality import QualityChecker
from common.redis_keys import RATELIMIT_TTL_S
from common.sinks.postgres import PostgresSink
from common.sinks.pulsar import PulsarSink
from tests.conftest import Services
from workers.session import ProviderSession
from workers.status import StatusReporter


class CountingAdapter(ProviderAdapter):
    """Only counts requests: the adapter is not what these tests are about."""

    provider_type = "counting"

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config)
        self.sent = 0

    def requests_sent(self) -> int:
        return self.sent

    async def connect(self) -> None:
        pass

    async def subscribe(self, instruments: Sequence[Instrument]) -> None:
        pass

    async def unsubscribe(self, instruments: Sequence[Instrument]) -> None:
        pass

    async def stream_batches(self) -> AsyncIterator[list[RawMarketData]]:
        return
        yield []

    async def disconnect(self) -> None:
        pass


@dataclass
class Reporting:
    reporter: StatusReporter
    session: ProviderSession
    journal: Journal

    @property
    def name(self) -> str:
        return self.session.provider.name


def build_reporter(
    services: Services, redis: aioredis.Redis, directory: Path, circuit: CircuitBreaker
) -> Reporting:
    """The worker's own parts (as ``workers.worker.build_parts`` wires them), sinks unstarted:
    ``publish`` only reads their counters."""
    name = f"rl-{uuid.uuid4().hex[:10]}"
    provider = ProviderConfig(id=str(uuid.uuid4()), name=name, provider_type="counting")
    journal = Journal(directory / name, (PulsarSink.name, PostgresSink.name))
    journal.open()
    publisher = PulsarSink(services.pulsar_url, f"unused-{name}", journal)
    store = PostgresSink(services.database_url, journal)
    pipeline = Pipeline(QualityChecker(), journal, publisher, store, None)
    session = ProviderSession(provider, pipeline, circuit, CountingAdapter)
    reporter = StatusReporter(
        services.database_url, redis, f"{name}@test", "test-host", session, pipeline,
        publisher, circuit,
    )  # fmt: skip
    return Reporting(reporter, session, journal)


@pytest.fixture
async def reporting(
    services: Services, redis_client: aioredis.Redis, tmp_path: Path
) -> AsyncIterator[Reporting]:
    built = build_reporter(services, redis_client, tmp_path, CircuitBreaker())
    yield built
    built.journal.close()


def text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def mirrored(redis: aioredis.Redis, name: str) -> dict[str, int]:
    """Every per-minute key of the provider with its count (a publish may cross a minute)."""
    keys = sorted(text(k) for k in await redis.keys(f"ratelimit:{name}:*"))
    return {k: int(text(await redis.get(k))) for k in keys}


async def test_each_publish_adds_exactly_the_new_requests(
    reporting: Reporting, redis_client: aioredis.Redis
) -> None:
    adapter = CountingAdapter(reporting.session.provider)
    reporting.session.adapter = adapter
    publish = reporting.reporter.publish

    await publish()
    assert await mirrored(redis_client, reporting.name) == {}, "no request, no key"

    adapter.sent = 3
    await publish()
    counts = await mirrored(redis_client, reporting.name)
    assert sum(counts.values()) == 3, counts
    for key in counts:
        ttl = await redis_client.ttl(key)
        assert 0 < ttl <= RATELIMIT_TTL_S, f"{key} TTL {ttl}"

    await publish()  # nothing new since: nothing added, not counted twice
    assert sum((await mirrored(redis_client, reporting.name)).values()) == 3

    adapter.sent = 8
    await publish()
    assert sum((await mirrored(redis_client, reporting.name)).values()) == 8


async def test_a_replaced_adapter_counts_from_zero(
    reporting: Reporting, redis_client: aioredis.Redis
) -> None:
    first = CountingAdapter(reporting.session.provider)
    first.sent = 8
    reporting.session.adapter = first
    await reporting.reporter.publish()
    assert sum((await mirrored(redis_client, reporting.name)).values()) == 8

    # A reconnect builds a new adapter whose own count starts again at zero.
    second = CountingAdapter(reporting.session.provider)
    second.sent = 2
    reporting.session.adapter = second
    await reporting.reporter.publish()
    assert sum((await mirrored(redis_client, reporting.name)).values()) == 10

    second.sent = 5
    await reporting.reporter.publish()
    assert sum((await mirrored(redis_client, reporting.name)).values()) == 13


async def test_no_adapter_no_request_count(
    reporting: Reporting, redis_client: aioredis.Redis
) -> None:
    assert reporting.session.adapter is None
    await reporting.reporter.publish()
    assert await mirrored(redis_client, reporting.name) == {}
