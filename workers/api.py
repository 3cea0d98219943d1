"""The REST API: intent into PostgreSQL, live state out of Redis; never talks to a provider.

Endpoints (the seed's):
  POST /api/v1/providers/{provider_id}/subscribe   body SubscriptionRequest
  GET  /api/v1/providers/{provider_id}/status      ProviderStatus
  PUT  /api/v1/providers/{provider_id}/connect     enable the provider (its worker connects)
  GET  /health                                     HealthResponse
  GET  /metrics                                    MetricsResponse
  GET  /metrics/prometheus                         the Prometheus exposition (common/prometheus.py),
                                                   also /metrics with Accept: text/plain
plus POST .../unsubscribe, GET /api/v1/providers, GET /api/v1/assignments (which instance
serves which symbol, for whom and why: primary, failover, failback), GET /api/v1/instances
(the registered worker instances: host, pid, status, heartbeat) and the status page at
``/`` (workers/status_page.py). ``/health`` also counts the symbols served by a backup provider.
``provider_id`` is the provider's name or uuid. With ``FEEDFLEET_API_TOKEN`` set, the
writing endpoints need ``Authorization: Bearer <token>``.

Every error is JSON, ``{"error": text}`` plus ``"field"`` when one input is to blame: the
API's own, aiohttp's (unknown route, wrong method, body too large) and the HTTP parser's
(a malformed request line, an oversized header), which ``ApiRunner`` answers.
A provider whose worker's report cannot be read (Redis down, a corrupt document) has
status ``UNKNOWN`` and a ``reason``; ``DISCONNECTED`` means no worker is reporting.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import re
import time
from dataclasses import asdict
from typing import Any

import orjson
import psycopg
import psycopg_pool
import redis.asyncio as aioredis
import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from psycopg_pool import AsyncConnectionPool
from redis.exceptions import RedisError

from common import db
from common.config import Settings
from common.model import ConnectionStatus, DataType, ProviderStatus, SubscriptionRequest, iso_ns
from common.prometheus import StatusCollector, render, wants_exposition
from common.provider import ProviderConfig
from common.redis_keys import provider_status_key, ratelimit_key
from workers import health as health_rules
from workers.coordinator import INSTANCE_TIMEOUT_S
from workers.status_page import add_status_page

log = structlog.get_logger("feedfleet.api")

# Used with fullmatch: "$" would also match before a final newline.
SYMBOL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.:/_^=\- ]{0,49}")
MAX_SYMBOLS_PER_REQUEST = 5000
# Not a ConnectionStatus: the worker's report could not be read, so its state is not known.
STATUS_UNKNOWN = "UNKNOWN"

POOL = web.AppKey("pool", AsyncConnectionPool)
REDIS = web.AppKey("redis", aioredis.Redis)
SETTINGS = web.AppKey("settings", Settings)


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, field: str | None = None, *, close: bool = False
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.close = close  # the connection cannot carry another request


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _first_line(text: str, limit: int = 200) -> str:
    """The gist of an aiohttp error message, without the request bytes it may quote."""
    line = text.strip().split("\n", 1)[0]
    line = re.split(r": b['\"]", line, maxsplit=1)[0]
    return line.rstrip(" :.")[:limit]


def _http_exception_error(request: web.Request, exc: web.HTTPException) -> str:
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return f"method {exc.method} not allowed on {request.path}; allowed: {allowed}"
    if isinstance(exc, web.HTTPNotFound):
        return f"no such endpoint: {request.method} {request.path}"
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return f"body too large: at most {request.client_max_size} bytes"
    return exc.reason


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except ApiError as exc:
        body: dict[str, Any] = {"error": exc.message}
        if exc.field:
            body["field"] = exc.field
        resp = _json(body, exc.status)
        if exc.close:
            resp.force_close()
        return resp
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        resp = _json({"error": _http_exception_error(request, exc)}, exc.status)
        if "Allow" in exc.headers:
            resp.headers["Allow"] = exc.headers["Allow"]
        return resp
    except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
        log.warning("api_database_unavailable", error=str(exc))
        return _json({"error": "database unavailable"}, 503)
    except Exception:
        log.exception("api_internal_error", method=request.method, path=request.path)
        return _json({"error": "internal error"}, 500)


def api_tokens(settings: Settings) -> list[str]:
    """The bearer tokens accepted: FEEDFLEET_API_TOKEN, comma-separated for a rotation."""
    return [t.strip() for t in (settings.api_token or "").split(",") if t.strip()]


def refuse_to_serve(settings: Settings) -> str | None:
    """Why the API must not start as configured: open writes on a non-loopback address
    unless FEEDFLEET_API_AUTH=none says so."""
    if api_tokens(settings) or settings.api_auth == "none":
        return None
    host = settings.api_host
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False  # a name or an address that is not ours alone
    if loopback:
        return None
    return (
        f"refusing to serve the API on {host} without a token: set FEEDFLEET_API_TOKEN "
        "(several, comma-separated, during a rotation), or FEEDFLEET_API_AUTH=none to open it"
    )


def _require_token(request: web.Request) -> None:
    tokens = api_tokens(request.app[SETTINGS])
    if not tokens:
        return
    # header bytes that are not UTF-8 arrive as surrogate escapes; compare them as sent
    given = request.headers.get("Authorization", "").encode(errors="surrogateescape")
    # Every token compared, so the time taken does not say which one nearly matched.
    matches = [hmac.compare_digest(given, f"Bearer {t}".encode()) for t in tokens]
    if not any(matches):
        raise ApiError(401, "missing or wrong bearer token")


def parse_subscription_request(body: Any) -> SubscriptionRequest:
    """Validate a SubscriptionRequest body; ApiError(400) names the bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, "body must be a JSON object", "body")
    unknown = set(body) - {"symbols", "data_types"}
    if unknown:
        raise ApiError(400, f"unknown field(s): {', '.join(sorted(unknown))}", sorted(unknown)[0])
    symbols = body.get("symbols")
    if not isinstance(symbols, list) or not symbols:
        raise ApiError(400, "symbols must be a non-empty list of strings", "symbols")
    if len(symbols) > MAX_SYMBOLS_PER_REQUEST:
        raise ApiError(400, f"at most {MAX_SYMBOLS_PER_REQUEST} symbols per request", "symbols")
    for s in symbols:
        if not isinstance(s, str) or not SYMBOL_RE.fullmatch(s):
            raise ApiError(400, f"invalid symbol {s!r}", "symbols")
    raw_types = body.get("data_types", [DataType.TRADE.value, DataType.QUOTE.value])
    if not isinstance(raw_types, list) or not raw_types:
        raise ApiError(400, "data_types must be a non-empty list", "data_types")
    try:
        types = [DataType(t) for t in raw_types]
    except ValueError:
        valid = ", ".join(t.value for t in DataType)
        raise ApiError(400, f"data_types must be among {valid}", "data_types") from None
    return SubscriptionRequest(list(dict.fromkeys(symbols)), list(dict.fromkeys(types)))


async def _body(request: web.Request) -> Any:
    try:
        raw = await request.read()
    except web.RequestPayloadError as exc:  # e.g. a Content-Encoding it does not decode
        cause = exc.__cause__
        detail = cause.message if isinstance(cause, HttpProcessingError) else str(exc)
        # aiohttp drops the connection after a broken body: say so, or a client reuses it
        message = f"body could not be read: {_first_line(detail)}"
        raise ApiError(400, message, "body", close=True) from None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"body is not valid JSON: {exc}", "body") from None


async def _provider(request: web.Request) -> ProviderConfig:
    key = request.match_info["provider_id"]
    if "\x00" in key:  # PostgreSQL text cannot hold NUL, so no provider is named so
        raise ApiError(400, "provider_id must not contain NUL characters", "provider_id")
    async with request.app[POOL].connection() as conn:
        provider = await db.find_provider(conn, key)
    if provider is None:
        raise ApiError(404, f"provider {key!r} not found", "provider_id")
    return provider


async def _status_documents(
    request: web.Request, providers: list[ProviderConfig]
) -> list[bytes | str | None] | None:
    """The workers' raw status documents in one round trip; None when Redis cannot answer."""
    if not providers:
        return []
    try:
        docs: list[bytes | str | None] = await request.app[REDIS].mget(
            [provider_status_key(p.id) for p in providers]
        )
    except (RedisError, OSError) as exc:
        log.warning("api_redis_unavailable", error=str(exc))
        return None
    return docs


def _status_doc(
    provider: ProviderConfig, raw: bytes | str | None, redis_up: bool
) -> dict[str, Any]:
    """One provider's status: the worker's report, DISCONNECTED once it has expired, or
    UNKNOWN (with a reason) when the report cannot be read."""
    doc: Any = None
    if raw:
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            doc = None
    if isinstance(doc, dict) and isinstance(doc.get("status"), str):
        if not provider.enabled:
            doc["status"] = ConnectionStatus.DISCONNECTED.value
        return doc
    status = ProviderStatus(
        provider_id=provider.id,
        provider_name=provider.name,
        status=ConnectionStatus.DISCONNECTED,
        last_update=iso_ns(time.time_ns()),
        last_error=None if provider.enabled else "provider disabled",
    )
    synthesized = asdict(status) | {"metrics": None}
    # a disabled provider is down by intent, whatever Redis holds
    if provider.enabled and (not redis_up or raw):
        synthesized["status"] = STATUS_UNKNOWN
        synthesized["reason"] = "unreadable status document" if redis_up else "redis unavailable"
    elif provider.enabled:
        synthesized["reason"] = "no worker is reporting"
    return synthesized


async def _live_statuses(
    request: web.Request, providers: list[ProviderConfig], *, redis_up: bool = True
) -> tuple[list[dict[str, Any]], bool]:
    """Each provider's status, and whether Redis answered (skipped when known to be down)."""
    raws = await _status_documents(request, providers) if redis_up else None
    if raws is None:
        return [_status_doc(p, None, False) for p in providers], False
    return [_status_doc(p, raw, True) for p, raw in zip(providers, raws, strict=True)], True


async def _live_status(request: web.Request, provider: ProviderConfig) -> dict[str, Any]:
    statuses, _ = await _live_statuses(request, [provider])
    return statuses[0]


# ---------------------------------------------------------------- handlers


async def subscribe(request: web.Request) -> web.Response:
    _require_token(request)
    provider = await _provider(request)
    req = parse_subscription_request(await _body(request))
    async with request.app[POOL].connection() as conn:
        subs = await db.subscribe(conn, provider.id, req.symbols, req.data_types)
    return _json(
        {
            "provider_id": provider.id,
            "provider_name": provider.name,
            "subscribed": [s.symbol for s in subs],
            "data_types": [t.value for t in req.data_types],
        }
    )


async def unsubscribe(request: web.Request) -> web.Response:
    _require_token(request)
    provider = await _provider(request)
    body = await _body(request)
    if isinstance(body, dict) and "data_types" not in body:
        body = body | {"data_types": [DataType.TRADE.value]}
    req = parse_subscription_request(body)
    async with request.app[POOL].connection() as conn:
        count = await db.unsubscribe(conn, provider.id, req.symbols)
    return _json({"provider_id": provider.id, "unsubscribed": count})


async def provider_status(request: web.Request) -> web.Response:
    provider = await _provider(request)
    doc = await _live_status(request, provider)
    doc.pop("metrics", None)
    return _json(doc)


async def connect(request: web.Request) -> web.Response:
    _require_token(request)
    provider = await _provider(request)
    async with request.app[POOL].connection() as conn:
        await db.set_provider_enabled(conn, provider.id, True)
    doc = await _live_status(request, provider)
    doc.pop("metrics", None)
    return _json({"provider_id": provider.id, "enabled": True, "status": doc["status"]}, 202)


async def list_providers(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        providers = await db.list_providers(conn)
    statuses, _ = await _live_statuses(request, providers)
    return _json(
        [
            {k: v for k, v in asdict(p).items() if k != "connection_config"}
            | {"status": s["status"]}
            for p, s in zip(providers, statuses, strict=True)
        ]
    )


async def _gather_provider_states(
    request: web.Request, *, redis_up: bool = True
) -> tuple[list[tuple[ProviderConfig, dict[str, Any]]], bool, bool]:
    """Every provider row with its status; whether the database and Redis answered."""
    try:
        async with request.app[POOL].connection(timeout=2.0) as conn:
            providers = await db.list_providers(conn)
    except (psycopg.OperationalError, psycopg_pool.PoolTimeout):
        return [], False, redis_up
    statuses, redis_up = await _live_statuses(request, providers, redis_up=redis_up)
    states = [(p, s | {"enabled": p.enabled}) for p, s in zip(providers, statuses, strict=True)]
    return states, True, redis_up


async def _gather_providers(
    request: web.Request, *, redis_up: bool = True
) -> tuple[list[dict[str, Any]], bool, bool]:
    """Every provider's status; whether the database and Redis answered."""
    states, db_up, redis_up = await _gather_provider_states(request, redis_up=redis_up)
    return [s for _, s in states], db_up, redis_up


async def list_assignments(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        rows = await db.assignment_report(conn)
    return _json(
        [
            {
                "provider": r["provider"],
                "symbol": r["symbol"],
                "served_by": r["served_by"],
                "instance_id": r["instance_id"],
                "reason": r["reason"],
                "latest": r["latest"],
                "since": r["since"].isoformat(),
            }
            for r in rows
        ]
    )


async def list_instances(request: web.Request) -> web.Response:
    """Every registered worker instance: its provider, host, pid, status and heartbeat."""
    async with request.app[POOL].connection() as conn:
        rows = await db.instance_report(conn, INSTANCE_TIMEOUT_S)
    return _json(
        [
            r
            | {
                "started_at": r["started_at"].isoformat(),
                "status_since": r["status_since"].isoformat(),
                "heartbeat_age_s": round(r["heartbeat_age_s"], 3),
            }
            for r in rows
        ]
    )


async def _failover_state(request: web.Request) -> dict[str, Any] | None:
    """What is served by a backup now; None when the database does not answer."""
    try:
        async with request.app[POOL].connection(timeout=2.0) as conn:
            count, providers = await db.failover_summary(conn)
    except (psycopg.OperationalError, psycopg_pool.PoolTimeout):
        return None
    return {"symbols_in_failover": count, "providers_failed_over": providers}


async def _redis_ping(request: web.Request) -> bool:
    try:
        return bool(await request.app[REDIS].ping())
    except (RedisError, OSError) as exc:
        log.warning("api_redis_unavailable", error=str(exc))
        return False


TROUBLED_COMPONENT = ("down", "degraded", "low", "critical")
TROUBLED = (health_rules.DEGRADED, health_rules.DOWN)


async def _requests_left(
    request: web.Request, providers: list[ProviderConfig]
) -> dict[str, int | None]:
    """This minute's requests left under each provider's requests_per_minute (None: no such
    limit, or Redis did not answer), from the counts the workers keep in Redis."""
    limits: dict[str, int] = {}
    for p in providers:
        limit = p.rate_limits.get("requests_per_minute")
        if isinstance(limit, int | float) and not isinstance(limit, bool) and limit > 0:
            limits[p.name] = int(limit)
    left: dict[str, int | None] = {p.name: None for p in providers}
    if not limits:
        return left
    minute = int(time.time() // 60)
    try:
        used = await request.app[REDIS].mget([ratelimit_key(n, minute) for n in limits])
    except (RedisError, OSError):
        return left
    for (name, limit), count in zip(limits.items(), used, strict=True):
        try:
            left[name] = max(0, limit - int(count or 0))
        except ValueError:
            left[name] = None
    return left


def _provider_entry(
    provider: ProviderConfig, s: dict[str, Any], now_s: float, requests_left: int | None
) -> dict[str, Any]:
    verdict = health_rules.provider_health(provider, s, now_s)
    m = s.get("metrics") or {}
    return {
        "status": s["status"],
        "health": verdict.health,
        "reason": verdict.reason,
        "enabled": s["enabled"],
        "throughput_per_sec": s.get("throughput_per_sec", 0.0),
        "messages_received": s.get("messages_received", 0),
        "subscribed_symbols": s.get("subscribed_symbols", 0),
        "instance_id": s.get("instance_id"),
        "last_event_age_s": health_rules.last_event_age_s(s, now_s),
        "publish_lag_p99_ms": m.get("latency_p99_ms"),
        "queue_depth": m.get("queue_depth", 0),
        "spool_depth": m.get("spool_depth", 0),
        "circuit_state": m.get("circuit_state"),
        "rate_limit_remaining": requests_left,
        "last_update": s.get("last_update"),
        "last_error": s.get("last_error"),
    }


async def health(request: web.Request) -> web.Response:
    """Overall ``healthy`` only when every component is up and every enabled provider is
    connected and fresh (workers/health.py); ``unhealthy`` (503) without the database."""
    # ping first: with Redis down, reading each status would only wait on it again
    states, db_up, redis_up = await _gather_provider_states(
        request, redis_up=await _redis_ping(request)
    )
    now_s = time.time()
    left = await _requests_left(request, [p for p, _ in states]) if redis_up else {}
    providers = {p.name: _provider_entry(p, s, now_s, left.get(p.name)) for p, s in states}
    reporting = [s for _, s in states if isinstance(s.get("metrics"), dict)]
    components = {
        "database": {"status": "up" if db_up else "down"},
        "redis": {"status": "up" if redis_up else "down"},
        "pulsar": health_rules.pulsar_component(reporting),
        "disk": health_rules.disk_component(reporting),
    }
    # "unknown" (nothing reports on it yet) is not counted against the fleet
    troubled = [n for n, c in components.items() if c["status"] in TROUBLED_COMPONENT]
    troubled += [f"provider {n}" for n, e in providers.items() if e["health"] in TROUBLED]
    if not db_up:
        overall = "unhealthy"
    elif troubled:
        overall = "degraded"
    else:
        overall = "healthy"
    body = {
        "status": overall,
        "timestamp": iso_ns(time.time_ns()),
        "reasons": troubled,
        "components": components,
        "providers": providers,
        "failover": await _failover_state(request) if db_up else None,
    }
    return _json(body, 200 if overall != "unhealthy" else 503)


async def metrics(request: web.Request) -> web.Response:
    if wants_exposition(request.headers.get("Accept", "")):
        return await prometheus_metrics(request)
    statuses, _, _ = await _gather_providers(request)
    per_provider = {s["provider_name"]: s.get("metrics") or {} for s in statuses}
    keys = ("received", "journaled", "published", "stored", "spooled", "replayed",
            "dead_lettered", "dropped", "cached", "decode_errors")  # fmt: skip
    totals: dict[str, float] = {
        k: sum(int(m.get(k) or 0) for m in per_provider.values()) for k in keys
    }
    totals["throughput_per_sec"] = round(
        sum(float(m.get("throughput_per_sec") or 0) for m in per_provider.values()), 1
    )
    return _json({"timestamp": iso_ns(time.time_ns()), "totals": totals, "providers": per_provider})


async def prometheus_metrics(request: web.Request) -> web.Response:
    """Every provider's status document as the Prometheus exposition; OpenMetrics when the
    Accept header names it."""
    statuses, db_up, redis_up = await _gather_providers(
        request, redis_up=await _redis_ping(request)
    )
    collector = StatusCollector(lambda: statuses, {"database": db_up, "redis": redis_up})
    body, content_type = render(collector, request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})


# ---------------------------------------------------------------- app


def build_app(settings: Settings) -> web.Application:
    app = web.Application(middlewares=[error_middleware])
    app[SETTINGS] = settings
    app.router.add_post("/api/v1/providers/{provider_id}/subscribe", subscribe)
    app.router.add_post("/api/v1/providers/{provider_id}/unsubscribe", unsubscribe)
    app.router.add_get("/api/v1/providers/{provider_id}/status", provider_status)
    app.router.add_put("/api/v1/providers/{provider_id}/connect", connect)
    app.router.add_get("/api/v1/providers", list_providers)
    app.router.add_get("/api/v1/assignments", list_assignments)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/metrics/prometheus", prometheus_metrics)
    app.router.add_get("/api/v1/instances", list_instances)
    add_status_page(app)
    from workers.openapi import PATH, serve_document  # it describes this module: imports it

    app.router.add_get(PATH, serve_document)

    async def resources(app: web.Application) -> Any:
        pool = AsyncConnectionPool(
            settings.database_url, min_size=1, max_size=5, open=False,
            kwargs={"autocommit": True}, timeout=5.0,
        )  # fmt: skip
        await pool.open(wait=False)
        app[POOL] = pool
        app[REDIS] = aioredis.from_url(
            settings.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0
        )
        yield
        await app[REDIS].aclose()
        await pool.close()

    app.cleanup_ctx.append(resources)
    return app


def _protocol_error(status: int, exc: BaseException | None, message: str | None) -> str:
    if status >= 500:
        return "request timed out" if status == 504 else "internal error"
    if isinstance(exc, LineTooLong):
        return f"bad HTTP request: request line or header longer than {exc.args[1]} bytes"
    return f"bad HTTP request: {_first_line(message or 'malformed')}"


class _JsonErrorRequestHandler(web.RequestHandler):
    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp's own answer is discarded; calling it keeps its logging and its refusal
        # to answer once part of a response has gone out
        super().handle_error(request, status, exc, message)
        resp = _json({"error": _protocol_error(status, exc, message)}, status)
        resp.force_close()
        return resp


class _JsonErrorServer(web.Server):
    def __call__(self) -> web.RequestHandler:
        return _JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)


class ApiRunner(web.AppRunner):
    """An AppRunner whose connections answer HTTP parser errors in the API's JSON shape.

    aiohttp answers a malformed request line or an oversized header in
    ``RequestHandler.handle_error``, before any middleware, with plain text, and has no hook
    for it (aio-libs/aiohttp#3287); this runner serves the app through a subclass that
    overrides it. The raw-socket tests in tests/test_api_errors.py notice if an aiohttp
    upgrade moves this.
    """

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return _JsonErrorServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **server._kwargs,
        )


async def run_api() -> None:
    from common.log import configure_logging

    settings = Settings.from_env()
    configure_logging(settings.log_format, settings.log_level)
    refused = refuse_to_serve(settings)
    if refused is not None:
        raise SystemExit(f"feedfleet api: {refused}")
    runner = ApiRunner(build_app(settings), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.api_host, settings.api_port).start()
    log.info("api_listening", host=settings.api_host, port=settings.api_port)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
