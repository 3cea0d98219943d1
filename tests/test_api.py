"""The REST API against real PostgreSQL and Redis: each endpoint, 400s and 404s."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from common import db
from common.config import Settings
from common.model import ConnectionStatus, DataType, RawMarketData
from tests.conftest import Services
from workers.api import build_app, refuse_to_serve
from workers.worker import WorkerParts, build_parts


@contextlib.asynccontextmanager
async def reporting_worker(
    settings: Settings, pid: str, received: int
) -> AsyncIterator[WorkerParts]:
    """A worker's own parts, connected with ``received`` trades taken in (not yet delivered:
    its sinks do not run), after its status loop's Redis write (``StatusReporter.publish``).
    The document is the worker's own, so a change of its shape shows here."""
    conn = await db.connect(settings.database_url)
    try:
        provider = await db.find_provider(conn, pid)
    finally:
        await conn.close()
    assert provider is not None
    parts = build_parts(settings, provider, {}, f"{provider.name}@api-test:1")
    try:
        parts.session.status = ConnectionStatus.CONNECTED
        now = time.time_ns()
        parts.pipeline.process([
            RawMarketData("AAPL", provider.name, now + i, DataType.TRADE, price=100.0 + i,
                          volume=1.0, provider_sequence=i + 1, stream="T.AAPL", receive_ns=now)
            for i in range(received)
        ])  # fmt: skip
        parts.status.throughput = 7.0  # what its loop measured over the last second
        await parts.status.publish()
        yield parts
    finally:
        parts.journal.close()
        await parts.redis.aclose()


@pytest.fixture
async def provider(conn: db.Conn) -> AsyncIterator[tuple[str, str]]:
    name = f"api-{uuid.uuid4().hex[:6]}"
    pid = await db.upsert_provider(conn, name, "polygon", {"url": "ws://x"}, enabled=False)
    yield name, pid


@pytest.fixture
async def client(services: Services) -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(build_app(services.settings()))) as c:
        yield c


async def test_subscribe_by_name_and_uuid(
    client: TestClient, provider: tuple[str, str], conn: db.Conn
) -> None:
    name, pid = provider
    resp = await client.post(
        f"/api/v1/providers/{name}/subscribe",
        json={"symbols": ["AAPL", "MSFT"], "data_types": ["TRADE"]},
    )
    assert resp.status == 200
    body = await resp.json()
    assert body["subscribed"] == ["AAPL", "MSFT"] and body["provider_id"] == pid
    resp = await client.post(f"/api/v1/providers/{pid}/subscribe", json={"symbols": ["AAPL"]})
    assert resp.status == 200
    cur = await conn.execute(
        "SELECT instrument_symbol, data_types, is_active FROM subscriptions "
        "WHERE provider_id = %s ORDER BY 1",
        (pid,),
    )
    assert await cur.fetchall() == [
        ("AAPL", ["TRADE", "QUOTE"], True),
        ("MSFT", ["TRADE"], True),
    ]
    resp = await client.post(f"/api/v1/providers/{name}/unsubscribe", json={"symbols": ["MSFT"]})
    assert (await resp.json())["unsubscribed"] == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"not json", "body"),
        (b"[]", "body"),
        (b"{}", "symbols"),
        (b'{"symbols": []}', "symbols"),
        (b'{"symbols": "AAPL"}', "symbols"),
        (b'{"symbols": [42]}', "symbols"),
        (b'{"symbols": ["bad symbol;drop"]}', "symbols"),
        (b'{"symbols": ["AAPL\\n"]}', "symbols"),  # "$" alone would let the newline through
        (b'{"symbols": ["AAPL"], "data_types": ["TICK"]}', "data_types"),
        (b'{"symbols": ["AAPL"], "data_types": []}', "data_types"),
        (b'{"symbols": ["AAPL"], "colour": "red"}', "colour"),
    ],
)
async def test_bad_subscribe_body_is_400_naming_the_field(
    client: TestClient, provider: tuple[str, str], body: bytes, field: str
) -> None:
    resp = await client.post(
        f"/api/v1/providers/{provider[0]}/subscribe",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    assert resp.status == 400
    doc = await resp.json()
    assert doc["field"] == field and doc["error"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/v1/providers/nope/subscribe"),
        ("GET", "/api/v1/providers/nope/status"),
        ("PUT", "/api/v1/providers/nope/connect"),
        ("GET", "/api/v1/providers/5f0c3a9e-7d21-4c55-9a0e-2b8f61d4c7aa/status"),
    ],
)
async def test_unknown_provider_is_404(client: TestClient, method: str, path: str) -> None:
    resp = await client.request(method, path, json={"symbols": ["AAPL"]})
    assert resp.status == 404
    assert "not found" in (await resp.json())["error"]


async def test_status_reads_the_worker_status_from_redis(
    client: TestClient, provider: tuple[str, str], services: Services, conn: db.Conn
) -> None:
    name, pid = provider
    resp = await client.get(f"/api/v1/providers/{name}/status")
    doc = await resp.json()
    assert resp.status == 200 and doc["status"] == "DISCONNECTED"  # no worker has reported
    await db.set_provider_enabled(conn, pid, True)
    async with reporting_worker(services.settings(), pid, 99):
        doc = await (await client.get(f"/api/v1/providers/{pid}/status")).json()
    assert doc["status"] == "CONNECTED" and doc["messages_received"] == 99
    assert doc["provider_id"] == pid and doc["provider_name"] == name
    assert doc["instance_id"] == f"{name}@api-test:1"
    assert doc["throughput_per_sec"] == 7.0
    assert "metrics" not in doc


async def test_connect_enables_the_provider(
    client: TestClient, provider: tuple[str, str], conn: db.Conn
) -> None:
    name, pid = provider
    resp = await client.put(f"/api/v1/providers/{name}/connect")
    assert resp.status == 202
    assert (await resp.json())["enabled"] is True
    found = await db.find_provider(conn, pid)
    assert found is not None and found.enabled


async def test_health_and_metrics(alone: tuple[Settings, db.Conn]) -> None:
    settings, conn = alone
    name = f"api-{uuid.uuid4().hex[:6]}"
    pid = await db.upsert_provider(conn, name, "polygon", {"url": "ws://x"})
    async with TestClient(TestServer(build_app(settings))) as client:
        # Its one provider enabled, and no worker has reported: degraded.
        resp = await client.get("/health")
        doc = await resp.json()
        assert resp.status == 200 and doc["status"] == "degraded"
        assert doc["components"]["database"] == doc["components"]["redis"] == {"status": "up"}
        assert doc["components"]["pulsar"]["status"] == "unknown"  # no worker reports
        assert doc["providers"][name]["status"] == "DISCONNECTED"
        assert doc["providers"][name]["health"] == "down"
        assert doc["providers"][name]["reason"] == "no worker is reporting"
        assert doc["reasons"] == [f"provider {name}"]

        async with reporting_worker(settings, pid, 70) as parts:
            metrics = orjson.loads(orjson.dumps(parts.status.metrics()))
            # Every enabled provider connected: healthy.
            resp = await client.get("/health")
            doc = await resp.json()
            assert resp.status == 200 and doc["status"] == "healthy"
            mine = doc["providers"][name]
            assert mine["status"] == "CONNECTED" and mine["enabled"] is True
            assert mine["messages_received"] == 70 and mine["throughput_per_sec"] == 7.0
            # The worker's figures as it wrote them, and the totals over its one provider.
            doc = await (await client.get("/metrics")).json()
            varying = ("last_event_age_s", "disk")  # read at each report
            published = {k: v for k, v in doc["providers"][name].items() if k not in varying}
            assert published == {k: v for k, v in metrics.items() if k not in varying}
            assert list(doc["providers"]) == [name]
            assert metrics["received"] == metrics["journaled"] == 70
            assert metrics["published"] == metrics["stored"] == 0
            totals = doc["totals"]
            assert (totals["received"], totals["journaled"]) == (70, 70)
            assert (totals["published"], totals["stored"]) == (0, 0)
            assert totals["throughput_per_sec"] == 7.0
            # the page draws itself from /health and /metrics (tests/test_status_page.py)
            assert (await client.get("/")).status == 200


async def test_token_guards_writes(services: Services, provider: tuple[str, str]) -> None:
    app = build_app(services.settings(api_token="s3cret-token"))
    async with TestClient(TestServer(app)) as c:
        url = f"/api/v1/providers/{provider[0]}/subscribe"
        assert (await c.post(url, json={"symbols": ["A"]})).status == 401
        ok = await c.post(url, json={"symbols": ["A"]},
                          headers={"Authorization": "Bearer s3cret-token"})  # fmt: skip
        assert ok.status == 200
        assert (await c.get("/health")).status == 200  # reads stay open


async def test_several_tokens_are_accepted_during_a_rotation(
    services: Services, provider: tuple[str, str]
) -> None:
    app = build_app(services.settings(api_token="new-token, old-token"))
    async with TestClient(TestServer(app)) as c:
        url = f"/api/v1/providers/{provider[0]}/subscribe"
        for token in ("new-token", "old-token"):
            ok = await c.post(url, json={"symbols": ["A"]},
                              headers={"Authorization": f"Bearer {token}"})  # fmt: skip
            assert ok.status == 200, token
        for wrong in ("Bearer new-token, old-token", "Bearer other", "new-token"):
            refused = await c.post(url, json={"symbols": ["A"]},
                                   headers={"Authorization": wrong})  # fmt: skip
            assert refused.status == 401, wrong


@pytest.mark.parametrize(
    ("host", "token", "auth", "refused"),
    [
        ("127.0.0.1", None, "token", False),
        ("::1", None, "token", False),
        ("localhost", None, "token", False),
        ("0.0.0.0", None, "token", True),
        ("10.1.2.3", "", "token", True),
        ("api.internal", None, "token", True),
        ("0.0.0.0", "s3cret", "token", False),
        ("0.0.0.0", None, "none", False),
    ],
)
def test_the_api_refuses_to_serve_open_writes_beyond_loopback(
    services: Services, host: str, token: str | None, auth: str, refused: bool
) -> None:
    settings = services.settings(api_host=host, api_token=token, api_auth=auth)
    problem = refuse_to_serve(settings)
    assert (problem is not None) == refused
    if refused:
        assert problem is not None and host in problem and "FEEDFLEET_API_TOKEN" in problem


def test_feedfleet_api_exits_with_the_reason_on_an_open_address(services: Services) -> None:
    env = {**os.environ, "FEEDFLEET_DATABASE_URL": services.database_url,
           "FEEDFLEET_REDIS_URL": services.redis_url, "FEEDFLEET_PULSAR_URL": services.pulsar_url,
           "FEEDFLEET_API_HOST": "0.0.0.0", "FEEDFLEET_API_PORT": "1"}  # fmt: skip
    env.pop("FEEDFLEET_API_TOKEN", None)
    env.pop("FEEDFLEET_API_AUTH", None)
    proc = subprocess.run([sys.executable, "-m", "workers.cli", "api"], env=env,
                          capture_output=True, timeout=60)  # fmt: skip
    assert proc.returncode == 1
    assert b"refusing to serve the API on 0.0.0.0 without a token" in proc.stderr
