"""The Prometheus exposition: a real worker's own metrics port and the API's
/metrics/prometheus, parsed with prometheus_client's parser, against the worker's own
counts; the Accept negotiation of /metrics; the Grafana dashboard's metric names against a
real exposition; HdrHistograms turned into buckets."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from structlog.testing import capture_logs

from common import db
from common.metrics import LatencyWindow
from common.model import DataType
from common.prometheus import LATENCY_BUCKETS_S, latency_buckets, wants_exposition
from simulators.polygon import PolygonSimConfig, PolygonSimulator
from tests.conftest import Services
from tests.running import RunningWorker, until
from tests.test_api import reporting_worker
from tests.test_coordinator import eventually
from workers.api import build_app
from workers.metrics_endpoint import MetricsEndpoint

ROOT = Path(__file__).resolve().parents[1]
KEY_ENV = "FEEDFLEET_TEST_PROMETHEUS_KEY"
TEXT_0_0_4 = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
# What Prometheus 2.x sends when it scrapes.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


@dataclass
class Feed:
    sim: PolygonSimulator
    running: RunningWorker
    provider: str
    metrics_port: int  # the worker's metrics port, once it listens

    @property
    def received(self) -> int:
        return self.running.received


def samples(text: str) -> list[Sample]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(found: Iterable[Sample], name: str, **labels: str) -> float:
    matching = [s.value for s in found if s.name == name and labels.items() <= s.labels.items()]
    assert len(matching) == 1, (name, labels, matching)
    return matching[0]


@pytest.fixture
async def feed(services: Services, conn: db.Conn) -> AsyncIterator[Feed]:
    """A Polygon simulator, a provider row for it, and the real worker (with the real
    coordinator) serving its metrics on a port of its own."""
    os.environ[KEY_ENV] = "test-key"
    tag = uuid.uuid4().hex[:6].upper()
    symbols = [f"P{tag}", f"Q{tag}"]
    sim = PolygonSimulator(PolygonSimConfig(symbols=symbols, rate=1000, batch=10))
    port = await sim.start()
    name = f"prom-{tag.lower()}"
    provider_id = await db.upsert_provider(
        conn, name, "polygon",
        {"url": f"ws://127.0.0.1:{port}/stocks", "api_key_env": KEY_ENV, "stale_after_s": None},
    )  # fmt: skip
    await db.subscribe(conn, provider_id, symbols, [DataType.TRADE, DataType.QUOTE])
    running = RunningWorker.start(services.settings(metrics_port=0), name)
    try:
        worker = running.worker

        def listening() -> bool:
            endpoint = worker.parts.metrics if worker.parts else None
            return endpoint is not None and endpoint.port != 0

        await until(listening, 30, "the worker's metrics port")
        assert worker.parts is not None and worker.parts.metrics is not None
        feed = Feed(sim, running, name, worker.parts.metrics.port)
        await until(lambda: feed.received >= 300, 30, "300 records")
        yield feed
    finally:
        await running.stop()
        await sim.stop()
        await db.set_provider_enabled(conn, provider_id, False)


async def _get(url: str, accept: str | None = None) -> tuple[str, str]:
    headers = {"Accept": accept} if accept is not None else {}
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        return resp.headers["Content-Type"], await resp.text()


async def test_the_workers_own_port_serves_its_counts_at_scrape_time(feed: Feed) -> None:
    url = f"http://127.0.0.1:{feed.metrics_port}/metrics"
    before = feed.received
    content_type, text = await _get(url)
    after = feed.received
    assert content_type == TEXT_0_0_4
    found = samples(text)
    assert before <= value(found, "feedfleet_events_received_total") <= after
    assert {s.labels["provider"] for s in found if "provider" in s.labels} == {feed.provider}
    assert value(found, "feedfleet_up") == 1
    assert value(found, "feedfleet_connection_status", status="CONNECTED") == 1
    assert value(found, "feedfleet_provider_enabled") == 1
    assert value(found, "feedfleet_subscribed_symbols") == 2
    assert value(found, "feedfleet_journal_bytes") > 0
    assert value(found, "feedfleet_quality_flags_total", flag="gap") == 0
    assert value(found, "feedfleet_circuit_state", state="closed") == 1
    assert value(found, "feedfleet_circuit_state", state="open") == 0
    assert 0 <= value(found, "feedfleet_last_event_age_seconds") < 60
    assert value(found, "feedfleet_queue_depth") >= 0
    assert value(found, "feedfleet_spool_depth") >= 0
    # The latency histogram counts exactly the events Pulsar acknowledged (both are read
    # from one status document), cumulatively, bucket by bucket.
    published = value(found, "feedfleet_events_published_total")
    histogram = "feedfleet_provider_to_receipt_seconds"
    buckets = [s for s in found if s.name == f"{histogram}_bucket"]
    assert [s.labels["le"] for s in buckets] == [*(str(b) for b in LATENCY_BUCKETS_S), "+Inf"]
    counts = [s.value for s in buckets]
    assert counts == sorted(counts)
    assert 0 < published == counts[-1] == value(found, f"{histogram}_count")
    assert value(found, f"{histogram}_sum") > 0

    content_type, text = await _get(url, PROMETHEUS_ACCEPT)
    assert content_type == OPENMETRICS and text.endswith("# EOF\n")
    assert value(samples(text), "feedfleet_events_received_total") >= after


async def test_the_api_exposes_every_provider_and_keeps_json_by_default(
    feed: Feed, services: Services
) -> None:
    async with TestClient(TestServer(build_app(services.settings()))) as client:
        before = feed.received

        async def scrape() -> tuple[float, list[Sample], int]:
            """The API's received count for the provider, its samples, and the worker's
            own count right after (which the API's cannot exceed)."""
            resp = await client.get("/metrics/prometheus")
            assert resp.status == 200 and resp.headers["Content-Type"] == TEXT_0_0_4
            found = samples(await resp.text())
            counted = [
                s.value for s in found
                if s.name == "feedfleet_events_received_total"
                and s.labels["provider"] == feed.provider
            ]  # fmt: skip
            # none before the worker's first report
            return (counted[0] if counted else -1.0), found, feed.received

        # The worker publishes its document every second: wait for one written after `before`.
        received, found, after = await eventually(
            scrape, lambda seen: seen[0] >= before, f"the API to report {before} received"
        )
        assert before <= received <= after
        assert value(found, "feedfleet_up", provider=feed.provider) == 1
        assert value(found, "feedfleet_component_up", component="database") == 1
        assert value(found, "feedfleet_component_up", component="redis") == 1

        # /metrics: the exposition when asked for it, as Prometheus and curl ask ...
        for accept, expected in ((PROMETHEUS_ACCEPT, OPENMETRICS), ("text/plain", TEXT_0_0_4)):
            resp = await client.get("/metrics", headers={"Accept": accept})
            assert resp.status == 200 and resp.headers["Content-Type"] == expected
            found = samples(await resp.text())
            assert value(found, "feedfleet_events_received_total", provider=feed.provider) > 0
        # ... and today's JSON otherwise: no Accept, a browser's, JSON named first.
        browser = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
        for headers in ({}, {"Accept": browser}, {"Accept": "application/json, text/plain"}):
            resp = await client.get("/metrics", headers=headers)
            assert resp.status == 200 and resp.content_type == "application/json"
            doc = await resp.json()
            assert set(doc) == {"timestamp", "totals", "providers"}
            assert doc["providers"][feed.provider]["received"] > 0

        # A malformed Accept header is not an error.
        resp = await client.get("/metrics/prometheus", headers={"Accept": "text/plain;q=x;;,"})
        assert resp.status == 200 and resp.headers["Content-Type"] == TEXT_0_0_4


def dashboard_metric_names() -> set[str]:
    dashboard = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"]]
    return {name for expr in exprs for name in re.findall(r"\bfeedfleet_[a-z0-9_]+", expr)}


async def test_every_metric_the_dashboard_queries_is_in_a_real_exposition(
    services: Services, conn: db.Conn, provider: tuple[str, str]
) -> None:
    name, _ = provider
    settings = services.settings()
    async with (
        reporting_worker(settings, name, received=3),
        TestClient(TestServer(build_app(settings))) as client,
    ):
        resp = await client.get("/metrics/prometheus")
        text = await resp.text()
    assert value(samples(text), "feedfleet_events_received_total", provider=name) == 3
    used = dashboard_metric_names()
    # The panels operators expect are there ...
    assert {
        "feedfleet_events_received_total", "feedfleet_provider_to_receipt_seconds_bucket",
        "feedfleet_last_event_age_seconds", "feedfleet_queue_depth", "feedfleet_spool_depth",
        "feedfleet_circuit_state", "feedfleet_decode_errors_total", "feedfleet_up",
    } <= used  # fmt: skip
    # ... and no query names a metric the fleet does not expose, with a value.
    assert used - {s.name for s in samples(text)} == set()


@pytest.fixture
async def provider(conn: db.Conn) -> AsyncIterator[tuple[str, str]]:
    name = f"prom-{uuid.uuid4().hex[:6]}"
    pid = await db.upsert_provider(conn, name, "polygon", {"url": "ws://x"})
    yield name, pid
    await db.set_provider_enabled(conn, pid, False)


async def test_a_busy_metrics_port_is_retried_and_served_once_free(
    services: Services, provider: tuple[str, str]
) -> None:
    name, _ = provider
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    url = f"http://127.0.0.1:{port}/metrics"

    async def scrape() -> str | None:
        try:
            return (await _get(url))[1]
        except aiohttp.ClientError:
            return None

    async with reporting_worker(services.settings(), name, received=2) as parts:
        endpoint = MetricsEndpoint(parts.status, "127.0.0.1", port, retry_s=0.05)
        with capture_logs() as logs:
            task = asyncio.create_task(endpoint.run())
            try:
                await until(
                    lambda: any(e["event"] == "metrics_port_unavailable" for e in logs),
                    10, "the busy port to be reported",
                )  # fmt: skip
                assert not task.done()  # a busy port stops nothing
                blocker.close()
                text = await eventually(scrape, lambda t: t is not None, "the freed port")
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await endpoint.close()
    assert text is not None
    assert value(samples(text), "feedfleet_events_received_total", provider=name) == 2
    assert [e["event"] for e in logs].count("metrics_port_unavailable") == 1  # once, not per try


def test_hdr_histograms_become_cumulative_buckets_in_seconds() -> None:
    window = LatencyWindow()
    # 500 µs sits on a bound; 501 µs is past it; 70 s is past the last finite bound.
    window.record_many_us([400, 500, 501, 1000, 2_000, 60_000_000, 70_000_000])
    buckets, total_s = latency_buckets(window.encoded())
    as_dict = dict(buckets)
    assert as_dict["0.0005"] == 2 and as_dict["0.001"] == 4 and as_dict["0.0025"] == 5
    assert as_dict["30.0"] == 5 and as_dict["60.0"] == 6 and as_dict["+Inf"] == 7
    assert total_s == pytest.approx(130.0044, rel=1e-3)
    empty = [count for _, count in latency_buckets(None)[0]]
    assert empty == [0.0] * (len(LATENCY_BUCKETS_S) + 1)
    assert latency_buckets("not an HdrHistogram")[0] == latency_buckets(None)[0]


@pytest.mark.parametrize(
    ("accept", "exposition"),
    [
        ("", False),
        ("*/*", False),
        ("application/json", False),
        ("application/json, text/plain", False),
        ("text/plain", True),
        ("application/openmetrics-text; version=1.0.0", True),
        (PROMETHEUS_ACCEPT, True),
        ("application/json;q=0.5, text/plain", True),
        ("text/plain;q=0", False),
    ],
)
def test_accept_negotiation(accept: str, exposition: bool) -> None:
    assert wants_exposition(accept) is exposition
