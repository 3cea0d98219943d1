"""The status page at ``/`` as the API serves it, and ``/api/v1/instances`` it reads.

What the page shows in a browser is checked in tests/test_e2e_fleet.py (headless
Chromium against the whole fleet); here, that no provider name or error reaches the page
as markup: the page is static, its data comes as JSON, and its script writes text only.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient, TestServer

from common import db
from tests.conftest import Services
from workers.api import build_app

HOSTILE_NAME = '<img src=x onerror="alert(1)">'
# The DOM sinks that parse a string as HTML or run it as code.
HTML_SINKS = re.compile(
    r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function|"
    r"setAttribute\(\s*[\"']on|\.src\s*="
)


@pytest.fixture
async def client(services: Services) -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(build_app(services.settings()))) as c:
        yield c


@pytest.fixture
async def hostile_provider(conn: db.Conn) -> AsyncIterator[str]:
    """A disabled provider whose name is markup (names and errors are not ours to trust)."""
    name = f"{HOSTILE_NAME[:-1]}{uuid.uuid4().hex[:6]}>"
    pid = await db.upsert_provider(conn, name, "polygon", {"url": "ws://x"}, enabled=False)
    yield name
    await conn.execute("DELETE FROM providers WHERE id = %s", (pid,))


async def test_the_page_is_static_and_provider_names_reach_it_only_as_json(
    client: TestClient, hostile_provider: str
) -> None:
    page = await client.get("/")
    assert page.status == 200 and page.content_type == "text/html"
    html = await page.text()
    assert hostile_provider not in html and "onerror" not in html
    assert '<script src="static/status.js"' in html
    # Whatever markup slipped in could not run: no inline script is allowed.
    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy

    health = await (await client.get("/health")).json()
    assert health["providers"][hostile_provider]["enabled"] is False  # the data path: JSON

    script = await client.get("/static/status.js")
    assert script.status == 200 and script.content_type == "text/javascript"
    source = await script.text()
    assert HTML_SINKS.findall(source) == []
    assert "textContent" in source
    for path in ("health", "metrics", "api/v1/assignments", "api/v1/instances"):
        assert f'"{path}"' in source, path  # what it polls, relative to the page
    css = await client.get("/static/status.css")
    assert css.status == 200 and css.content_type == "text/css"


@pytest.mark.parametrize("path", ["/static/status.html", "/static/..%2fapi.py", "/static/x.js"])
async def test_static_serves_only_the_page_files(client: TestClient, path: str) -> None:
    resp = await client.get(path)
    assert resp.status == 404
    assert "error" in await resp.json()


async def test_instances_lists_each_worker_with_its_host_and_liveness(
    client: TestClient, conn: db.Conn
) -> None:
    name = f"inst-{uuid.uuid4().hex[:6]}"
    pid = await db.upsert_provider(conn, name, "polygon", {"url": "ws://x"}, enabled=False)
    try:
        await db.register_instance(conn, f"{name}@host-a:11", pid, "host-a", 11)
        await db.register_instance(conn, f"{name}@host-b:22", pid, "host-b", 22)
        # host-b's worker stopped heartbeating 10 s ago: registered, no longer live
        await conn.execute(
            "UPDATE worker_instances SET heartbeat_at = now() - interval '10 seconds' "
            "WHERE instance_id = %s",
            (f"{name}@host-b:22",),
        )
        resp = await client.get("/api/v1/instances")
        assert resp.status == 200
        mine = [r for r in await resp.json() if r["provider"] == name]
        assert [(r["instance_id"], r["host"], r["pid"], r["live"]) for r in mine] == [
            (f"{name}@host-a:11", "host-a", 11, True),
            (f"{name}@host-b:22", "host-b", 22, False),
        ]
        assert mine[0]["status"] == "CONNECTING" and mine[0]["heartbeat_age_s"] < 10
        assert mine[1]["heartbeat_age_s"] >= 10
    finally:
        await conn.execute("DELETE FROM providers WHERE id = %s", (pid,))
