"""The API answers every bad request with a JSON error, never a 500 or aiohttp's plain text.

Runs the app under ``ApiRunner``, as ``run_api`` does, so the errors aiohttp raises before
any middleware (a malformed request line, an oversized header) are covered too; those are
sent over a raw socket, since aiohttp's client refuses to send them.
"""

from __future__ import annotations

import asyncio
import gzip
import string
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import orjson
import psycopg
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from common import db
from common.model import ConnectionStatus, ProviderStatus, iso_ns
from common.redis_keys import provider_status_key
from tests.conftest import Services
from workers.api import ApiRunner, build_app


class ApiTestServer(TestServer):
    """A TestServer on the production runner, so protocol errors are answered as in prod."""

    async def _make_runner(self, **kwargs: Any) -> web.BaseRunner:
        return ApiRunner(self.app, **kwargs)


@pytest.fixture
async def client(services: Services) -> AsyncIterator[TestClient]:
    async with TestClient(ApiTestServer(build_app(services.settings()))) as c:
        yield c


@pytest.fixture
async def provider(conn: db.Conn) -> AsyncIterator[tuple[str, str]]:
    name = f"err-{uuid.uuid4().hex[:6]}"
    pid = await db.upsert_provider(conn, name, "polygon", {"url": "ws://x"}, enabled=False)
    yield name, pid


async def _error(resp: Any, status: int) -> str:
    """The JSON error text of a response, after checking its status and content type."""
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    doc = await resp.json()
    assert isinstance(doc["error"], str) and doc["error"]
    return str(doc["error"])


async def _raw(port: int, data: bytes) -> tuple[int, dict[str, str], Any]:
    """Send bytes as they are; return status, headers and the JSON body of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5)  # the server closes after an error
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines)}
    assert headers["content-type"].startswith("application/json"), raw
    return int(status_line.split()[1]), headers, orjson.loads(body)


# ------------------------------------------------------------ provider_id


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/providers/a%00b/status"),
        ("PUT", "/api/v1/providers/%00/connect"),
        ("POST", "/api/v1/providers/polygon%00/subscribe"),
    ],
)
async def test_nul_in_provider_id_is_400(client: TestClient, method: str, path: str) -> None:
    resp = await client.request(method, URL(path, encoded=True), json={"symbols": ["AAPL"]})
    assert await _error(resp, 400) == "provider_id must not contain NUL characters"
    assert (await resp.json())["field"] == "provider_id"


@pytest.mark.parametrize(
    "form",
    [
        "urn:uuid:{u}",
        "uuid:{u}",
        "+{h31}",  # int(..., 16) takes a sign
        " {h31}",  # and surrounding whitespace
        "{h16}_{h15}",  # and underscores
        "{h1}-{h31}",  # a hyphen where PostgreSQL takes none
        "{u}-",
        "-{h32}",
    ],
)
async def test_uuid_forms_postgres_refuses_are_names_not_500(
    client: TestClient, provider: tuple[str, str], form: str
) -> None:
    _, pid = provider
    h32 = uuid.UUID(pid).hex
    key = form.format(u=pid, h1=h32[:1], h15=h32[16:31], h16=h32[:16], h31=h32[1:], h32=h32)
    uuid.UUID(key)  # Python takes every one of these
    assert not db._is_uuid(key)
    resp = await client.get(f"/api/v1/providers/{key}/status")
    assert await _error(resp, 404) == f"provider {key!r} not found"


# Braced forms never reach the handler: aiohttp's router keeps "{" and "}" out of a
# path parameter. test_is_uuid_agrees_with_postgres covers them.
@pytest.mark.parametrize("form", ["{u}", "{U}", "{h32}", "{H32}", "{h4dash}"])
async def test_uuid_forms_postgres_accepts_find_the_provider(
    client: TestClient, provider: tuple[str, str], form: str
) -> None:
    name, pid = provider
    h32 = uuid.UUID(pid).hex
    h4dash = "-".join(h32[i : i + 4] for i in range(0, 32, 4))
    key = form.format(u=pid, U=pid.upper(), h32=h32, H32=h32.upper(), h4dash=h4dash)
    resp = await client.get(f"/api/v1/providers/{key}/status")
    assert resp.status == 200
    doc = await resp.json()
    assert doc["provider_id"] == pid and doc["provider_name"] == name


_HEX = "0123456789abcdefABCDEF"
_uuidish = st.builds(
    lambda prefix, digits, cuts, suffix: (
        prefix + "".join(d + ("-" if i in cuts else "") for i, d in enumerate(digits)) + suffix
    ),
    st.sampled_from(["", "{", "{{", "urn:uuid:", "uuid:", " ", "+", "-"]),
    st.text(_HEX, min_size=32, max_size=32) | st.text(_HEX + "_x +", min_size=30, max_size=34),
    st.sets(st.integers(0, 34), max_size=9),
    st.sampled_from(["", "}", "}}", " ", "-", "\n"]),
) | st.text(string.printable, max_size=40)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=_uuidish)
async def test_is_uuid_agrees_with_postgres(conn: db.Conn, text: str) -> None:
    try:
        await conn.execute("SELECT %s::uuid", (text,))
    except psycopg.DataError:
        accepted = False
    else:
        accepted = True
    assert db._is_uuid(text) is accepted, text


# ------------------------------------------------------------ aiohttp's own errors


async def test_unknown_route_is_json_404(client: TestClient) -> None:
    resp = await client.get("/api/v1/nope")
    assert await _error(resp, 404) == "no such endpoint: GET /api/v1/nope"


async def test_wrong_method_is_json_405_with_allow(client: TestClient) -> None:
    resp = await client.post("/health")
    assert await _error(resp, 405) == "method POST not allowed on /health; allowed: GET, HEAD"
    assert resp.headers["Allow"] == "GET,HEAD"
    resp = await client.request("PURGE", "/api/v1/providers/x/status")
    assert await _error(resp, 405) == (
        "method PURGE not allowed on /api/v1/providers/x/status; allowed: GET, HEAD"
    )


async def test_handler_bug_is_json_500(services: Services) -> None:
    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError("secret detail")

    app = build_app(services.settings())
    app.router.add_get("/boom", boom)
    async with TestClient(ApiTestServer(app)) as c:
        resp = await c.get("/boom")
        assert await _error(resp, 500) == "internal error"


async def test_oversized_header_is_json_400(client: TestClient) -> None:
    assert client.server.port is not None
    request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n"
    status, _, doc = await _raw(client.server.port, request)
    assert status == 400
    assert doc["error"] == "bad HTTP request: request line or header longer than 8190 bytes"


@pytest.mark.parametrize(
    "request_line",
    [b"GARBAGE", b"GET", b"G@T /health HTTP/1.1", b"GET /health HTTP/9.x", b"\x16\x03\x01\x02"],
)
async def test_malformed_request_line_is_json_400(client: TestClient, request_line: bytes) -> None:
    assert client.server.port is not None
    status, _, doc = await _raw(client.server.port, request_line + b"\r\nHost: x\r\n\r\n")
    assert status == 400
    assert doc["error"].startswith("bad HTTP request: ") and len(doc["error"]) > 18
    assert "\n" not in doc["error"] and "b'" not in doc["error"]


async def test_bad_chunked_body_is_json_400(client: TestClient, provider: tuple[str, str]) -> None:
    assert client.server.port is not None
    request = (
        f"POST /api/v1/providers/{provider[0]}/subscribe HTTP/1.1\r\nHost: x\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"
    ).encode()
    status, _, doc = await _raw(client.server.port, request)
    assert status == 400
    assert doc["error"].startswith("bad HTTP request: ") and "chunk" in doc["error"]


async def test_bad_gzip_body_is_json_400(client: TestClient, provider: tuple[str, str]) -> None:
    url = f"/api/v1/providers/{provider[0]}/subscribe"
    resp = await client.post(url, data=b"not gzip", headers={"Content-Encoding": "gzip"})
    error = await _error(resp, 400)
    assert error.startswith("body could not be read: ") and "gzip" in error
    assert resp.headers["Connection"] == "close"
    ok = gzip.compress(b'{"symbols": ["AAPL"]}')
    resp = await client.post(url, data=ok, headers={"Content-Encoding": "gzip"})
    assert resp.status == 200


async def test_non_utf8_token_is_json_401(services: Services, provider: tuple[str, str]) -> None:
    app = build_app(services.settings(api_token="s3cret-token"))
    async with TestClient(ApiTestServer(app)) as c:
        assert c.server.port is not None
        request = (
            f"PUT /api/v1/providers/{provider[0]}/connect HTTP/1.1\r\nHost: x\r\n".encode()
            + b"Authorization: Bearer \xff\xfe\r\nConnection: close\r\n\r\n"
        )
        status, _, doc = await _raw(c.server.port, request)
        assert status == 401 and doc["error"] == "missing or wrong bearer token"


# ------------------------------------------------------------ bodies


@pytest.mark.parametrize(
    ("body", "field", "error"),
    [
        (b"", "body", "body is not valid JSON: "),
        (b"\xff\xfe", "body", "body is not valid JSON: "),
        (b"[" * 2000 + b"]" * 2000, "body", "body is not valid JSON: "),
        (b"null", "body", "body must be a JSON object"),
        (b'"AAPL"', "body", "body must be a JSON object"),
        (b'{"symbols": null}', "symbols", "symbols must be a non-empty list of strings"),
        (b'{"symbols": {"AAPL": 1}}', "symbols", "symbols must be a non-empty list of strings"),
        (b'{"symbols": [null]}', "symbols", "invalid symbol None"),
        (b'{"symbols": [["AAPL"]]}', "symbols", "invalid symbol ['AAPL']"),
        (b'{"symbols": [""]}', "symbols", "invalid symbol ''"),
        (b'{"symbols": ["AAPL\\n"]}', "symbols", "invalid symbol 'AAPL\\n'"),
        (b'{"symbols": ["AAPL\\u0000"]}', "symbols", "invalid symbol 'AAPL\\x00'"),
        (b'{"symbols": ["' + b"A" * 51 + b'"]}', "symbols", "invalid symbol 'AAAA"),
        (b'{"symbols": ["AAPL"], "data_types": "TRADE"}', "data_types", "data_types must be a"),
        (b'{"symbols": ["AAPL"], "data_types": [1]}', "data_types", "data_types must be among"),
        (b'{"symbols": ["AAPL"], "data_types": [[]]}', "data_types", "data_types must be among"),
        (b'{"symbols": ["AAPL"], "data_types": [{}]}', "data_types", "data_types must be among"),
        (b'{"symbols": ["AAPL"], "data_types": ["trade"]}', "data_types", "data_types must be"),
    ],
)
async def test_bad_bodies_say_what_is_wrong(
    client: TestClient, provider: tuple[str, str], body: bytes, field: str, error: str
) -> None:
    for action in ("subscribe", "unsubscribe"):
        resp = await client.post(f"/api/v1/providers/{provider[0]}/{action}", data=body)
        assert (await _error(resp, 400)).startswith(error)
        assert (await resp.json())["field"] == field


async def test_too_many_symbols_is_400(client: TestClient, provider: tuple[str, str]) -> None:
    body = {"symbols": [f"S{i}" for i in range(5001)]}
    resp = await client.post(f"/api/v1/providers/{provider[0]}/subscribe", json=body)
    assert await _error(resp, 400) == "at most 5000 symbols per request"


async def test_huge_body_is_json_413(client: TestClient, provider: tuple[str, str]) -> None:
    body = b'{"symbols": ["' + b"A" * (2 * 1024 * 1024) + b'"]}'
    resp = await client.post(f"/api/v1/providers/{provider[0]}/subscribe", data=body)
    assert await _error(resp, 413) == "body too large: at most 1048576 bytes"


async def test_trailing_newline_symbol_is_not_stored(
    client: TestClient, provider: tuple[str, str], conn: db.Conn
) -> None:
    name, pid = provider
    resp = await client.post(f"/api/v1/providers/{name}/subscribe", json={"symbols": ["AAPL\n"]})
    assert await _error(resp, 400) == "invalid symbol 'AAPL\\n'"
    cur = await conn.execute("SELECT count(*) FROM subscriptions WHERE provider_id = %s", (pid,))
    assert await cur.fetchone() == (0,)


async def test_query_parameters_are_ignored_not_500(client: TestClient) -> None:
    resp = await client.get(URL("/health?limit=abc&x=%ZZ&y=%00", encoded=True))
    assert resp.status == 200


# ------------------------------------------------------------ status with Redis down


async def _report(redis_client: aioredis.Redis, pid: str, name: str, status: str) -> None:
    doc = ProviderStatus(pid, name, ConnectionStatus(status), iso_ns(time.time_ns()))
    await redis_client.set(provider_status_key(pid), orjson.dumps(doc), ex=30)


async def test_redis_down_makes_status_unknown_not_disconnected(
    services: Services, provider: tuple[str, str], conn: db.Conn
) -> None:
    name, pid = provider
    await db.set_provider_enabled(conn, pid, True)
    off_name = f"off-{uuid.uuid4().hex[:6]}"
    await db.upsert_provider(conn, off_name, "polygon", {}, enabled=False)
    # A Redis that is down: it hangs up on every connection, and counts them.
    attempts = 0

    async def hang_up(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal attempts
        attempts += 1
        writer.close()

    dead_redis = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = dead_redis.sockets[0].getsockname()[1]
    settings_ = services.settings(redis_url=f"redis://127.0.0.1:{port}/0")
    async with dead_redis, TestClient(ApiTestServer(build_app(settings_))) as c:
        resp = await c.get(f"/api/v1/providers/{name}/status")
        assert (await resp.json())["reason"] == "redis unavailable"
        per_read, attempts = attempts, 0
        assert per_read >= 1
        resp = await c.get("/health")
        # Its PING found Redis down, so no status was read from it after that.
        assert attempts == per_read
        assert resp.status == 200
        doc = await resp.json()
        assert doc["components"]["database"] == {"status": "up"}
        assert doc["components"]["redis"] == {"status": "down"}
        assert doc["status"] == "degraded"
        assert doc["providers"][name]["status"] == "UNKNOWN"
        assert doc["providers"][name]["reason"] == "redis unavailable"
        # a disabled provider is down by intent, whatever Redis says
        assert doc["providers"][off_name]["status"] == "DISCONNECTED"
        doc = await (await c.get(f"/api/v1/providers/{name}/status")).json()
        assert doc["status"] == "UNKNOWN" and doc["reason"] == "redis unavailable"
        listed = await (await c.get("/api/v1/providers")).json()
        assert {p["name"]: p["status"] for p in listed}[name] == "UNKNOWN"
        resp = await c.put(f"/api/v1/providers/{name}/connect")
        assert resp.status == 202 and (await resp.json())["status"] == "UNKNOWN"
        assert (await c.get("/")).status == 200
        assert (await c.get("/metrics")).status == 200


async def test_reported_disconnected_stays_disconnected(
    client: TestClient, provider: tuple[str, str], conn: db.Conn, redis_client: aioredis.Redis
) -> None:
    name, pid = provider
    await db.set_provider_enabled(conn, pid, True)
    await _report(redis_client, pid, name, "DISCONNECTED")
    doc = await (await client.get("/health")).json()
    assert doc["components"]["redis"] == {"status": "up"}
    assert doc["providers"][name]["status"] == "DISCONNECTED"
    assert doc["providers"][name]["health"] == "down"
    assert doc["providers"][name]["reason"] == "status DISCONNECTED"


async def test_unreadable_status_document_is_unknown(
    client: TestClient, provider: tuple[str, str], conn: db.Conn, redis_client: aioredis.Redis
) -> None:
    name, pid = provider
    await db.set_provider_enabled(conn, pid, True)
    for junk in (b"{not json", b"[1, 2]", b'"CONNECTED"', b"{}", b'{"status": 5}'):
        await redis_client.set(provider_status_key(pid), junk, ex=30)
        resp = await client.get(f"/api/v1/providers/{name}/status")
        assert resp.status == 200
        doc = await resp.json()
        assert doc["status"] == "UNKNOWN" and doc["reason"] == "unreadable status document"
        assert (await client.get("/health")).status == 200


# ------------------------------------------------------------ fuzz

_ROUTES = [
    ("POST", "/api/v1/providers/{}/subscribe"),
    ("POST", "/api/v1/providers/{}/unsubscribe"),
    ("GET", "/api/v1/providers/{}/status"),
    ("PUT", "/api/v1/providers/{}/connect"),
    ("GET", "/api/v1/providers"),
    ("GET", "/health"),
    ("GET", "/metrics"),
    ("DELETE", "/api/v1/providers/{}/status"),
    ("GET", "/api/v1/providers/{}/{}"),
    ("PATCH", "/health"),
    ("OPTIONS", "/api/v1/providers/{}/connect"),
]
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=12) | st.sampled_from(["AAPL", "MSFT", "TRADE", "QUOTE", "AAPL\n"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)  # fmt: skip
_bodies = (
    st.binary(max_size=64)
    | _json_values.map(orjson.dumps)
    | st.fixed_dictionaries(
        {"symbols": _json_values}, optional={"data_types": _json_values, "x": _json_values}
    ).map(orjson.dumps)
)
_segments = st.text(max_size=40) | st.sampled_from(
    ["", ".", "..", "%", "%00", "urn:uuid:" + str(uuid.uuid4()), "{" + str(uuid.uuid4())]
)


@settings(
    max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    route=st.sampled_from(_ROUTES),
    segments=st.lists(_segments, min_size=2, max_size=2),
    body=_bodies,
)
async def test_fuzz_routes_never_500_and_always_json(
    client: TestClient, provider: tuple[str, str], route: tuple[str, str], segments: list[str],
    body: bytes,
) -> None:  # fmt: skip
    method, template = route
    # the provider's own name now and then, so valid bodies reach the database
    first = provider[0] if segments[0] == "" else segments[0]
    quoted = [quote(s, safe="") for s in (first, segments[1])]
    url = URL(template.format(*quoted), encoded=True)
    resp = await client.request(method, url, data=body)
    assert resp.status < 500, (method, url, body, await resp.text())
    assert resp.content_type == "application/json", (method, url, await resp.text())
    await resp.json()
