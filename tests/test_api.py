"""The REST API against real PostgreSQL and Redis: each endpoint, 400s and 404s."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from common import db
from common.model import ConnectionStatus, ProviderStatus, iso_ns
from common.redis_keys import provider_status_key
from tests.conftest import Services
from workers.api import build_app


async def _report_status(
    redis_client: aioredis.Redis, pid: str, name: str, received: int, throughput: float,
    metrics: dict[str, Any],
) -> None:  # fmt: skip
    """Write what a connected worker's status loop writes (``Worker._publish_status``)."""
    status = ProviderStatus(
        pid, name, ConnectionStatus.CONNECTED, iso_ns(time.time_ns()),
        messages_received=received, throughput_per_sec=throughput,
    )  # fmt: skip
    doc = asdict(status) | {"metrics": metrics}
    await redis_client.set(provider_status_key(pid), orjson.dumps(doc), ex=30)


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
        ("GET", f"/api/v1/providers/{uuid.uuid4()}/status"),
    ],
)
async def test_unknown_provider_is_404(client: TestClient, method: str, path: str) -> None:
    resp = await client.request(method, path, json={"symbols": ["AAPL"]})
    assert resp.status == 404
    assert "not found" in (await resp.json())["error"]


async def test_status_reads_the_worker_status_from_redis(
    client: TestClient, provider: tuple[str, str], redis_client: aioredis.Redis, conn: db.Conn
) -> None:
    name, pid = provider
    resp = await client.get(f"/api/v1/providers/{name}/status")
    doc = await resp.json()
    assert resp.status == 200 and doc["status"] == "DISCONNECTED"  # no worker has reported
    await db.set_provider_enabled(conn, pid, True)
    await _report_status(redis_client, pid, name, 99, 12.5, {"received": 99})
    doc = await (await client.get(f"/api/v1/providers/{pid}/status")).json()
    assert doc["status"] == "CONNECTED" and doc["messages_received"] == 99
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


async def test_health_and_metrics(
    client: TestClient, provider: tuple[str, str], redis_client: aioredis.Redis
) -> None:
    name, pid = provider
    metrics = {"received": 70, "published": 70, "stored": 69, "throughput_per_sec": 7.0}
    await _report_status(redis_client, pid, name, 70, 7.0, metrics)
    resp = await client.get("/health")
    assert resp.status == 200
    doc = await resp.json()
    assert doc["components"] == {"database": "up", "redis": "up"}
    assert doc["status"] in ("healthy", "degraded")
    assert doc["providers"][name]["throughput_per_sec"] == 7.0
    doc = await (await client.get("/metrics")).json()
    assert doc["providers"][name]["stored"] == 69
    assert doc["totals"]["received"] >= 70
    page = await client.get("/")
    assert page.status == 200 and name in await page.text()


async def test_token_guards_writes(services: Services, provider: tuple[str, str]) -> None:
    app = build_app(services.settings(api_token="s3cret-token"))
    async with TestClient(TestServer(app)) as c:
        url = f"/api/v1/providers/{provider[0]}/subscribe"
        assert (await c.post(url, json={"symbols": ["A"]})).status == 401
        ok = await c.post(url, json={"symbols": ["A"]},
                          headers={"Authorization": "Bearer s3cret-token"})  # fmt: skip
        assert ok.status == 200
        assert (await c.get("/health")).status == 200  # reads stay open
