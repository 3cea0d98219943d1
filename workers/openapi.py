"""The REST API's OpenAPI 3.1 document, served at ``GET /api/openapi.json``.

Built as Python data from what the handlers in workers/api.py validate and answer with:
``SYMBOL_RE`` and ``MAX_SYMBOLS_PER_REQUEST`` for a SubscriptionRequest; ``DataType``,
``ConnectionStatus`` and ``CircuitState`` for their enums; the fields of ``ProviderStatus``
and ``ProviderConfig`` for the records; so a change there changes the document.
tests/test_openapi.py checks that every route of ``build_app()`` is described here and
nothing else is, and runs schemathesis against a live API from the served document.

Documents a worker writes (a provider's status, its metrics, the per-provider part of
``/health``) allow properties beyond those listed: the workers add fields over time.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson
from aiohttp import web

from common.circuit import CircuitState
from common.model import ConnectionStatus, DataType, ProviderStatus
from common.provider import ProviderConfig
from workers.api import MAX_SYMBOLS_PER_REQUEST, STATUS_UNKNOWN, SYMBOL_RE
from workers.coordinator import FAILBACK, FAILOVER, PRIMARY
from workers.status_page import ASSET_TYPES
from workers.status_page import HEADERS as PAGE_HEADERS

PATH = "/api/openapi.json"
BEARER = "bearerAuth"

# The JSON Schema for each annotation the records use (as strings: the model modules use
# postponed annotations). A field of another type fails the import, not a client.
_ANNOTATIONS: dict[str, dict[str, Any]] = {
    "str": {"type": "string"},
    "str | None": {"type": ["string", "null"]},
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "bool": {"type": "boolean"},
    "dict[str, Any]": {"type": "object"},
    "ConnectionStatus": {"$ref": "#/components/schemas/ProviderState"},
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def record_properties(record: type, *, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """A JSON Schema property for each field of a dataclass, from its annotation."""
    properties: dict[str, Any] = {}
    for f in dataclasses.fields(record):
        if f.name in skip:
            continue
        annotation = f.type if isinstance(f.type, str) else f.type.__name__
        if annotation not in _ANNOTATIONS:
            raise TypeError(f"{record.__name__}.{f.name}: no JSON Schema for {annotation!r}")
        properties[f.name] = _ANNOTATIONS[annotation]
    return properties


def _object(
    properties: dict[str, Any], *, required: list[str] | None = None, extra: bool = False
) -> dict[str, Any]:
    """An object schema; ``required`` defaults to every property."""
    return {
        "type": "object",
        "required": list(properties) if required is None else required,
        "properties": properties,
        "additionalProperties": extra,
    }


def _schemas() -> dict[str, Any]:
    data_types = [t.value for t in DataType]
    states = [s.value for s in ConnectionStatus] + [STATUS_UNKNOWN]
    count = {"type": "integer", "minimum": 0}
    symbols = {
        "type": "array",
        "minItems": 1,
        "maxItems": MAX_SYMBOLS_PER_REQUEST,
        # SYMBOL_RE is used with fullmatch; a JSON Schema pattern matches anywhere.
        "items": {"type": "string", "pattern": f"^(?:{SYMBOL_RE.pattern})$"},
        "description": "canonical symbols; repeats are taken once",
    }
    data_type_list = {
        "type": "array",
        "minItems": 1,
        "items": _ref("DataType"),
        "default": [DataType.TRADE.value, DataType.QUOTE.value],
    }
    status_properties = record_properties(ProviderStatus)
    status_properties["reason"] = {
        "type": "string",
        "description": "why the status is UNKNOWN (the worker's report could not be read)",
    }
    metrics_properties: dict[str, Any] = {
        name: count
        for name in ("received", "journaled", "published", "stored", "spooled", "replayed",
                     "dead_lettered", "dropped", "cached", "decode_errors", "bytes_received",
                     "error_count", "queue_depth", "spool_depth")
    }  # fmt: skip
    metrics_properties |= {
        "throughput_per_sec": {"type": "number"},
        "latency_p50_ms": _nullable({"type": "number"}),
        "latency_p99_ms": _nullable({"type": "number"}),
        "latency_avg_ms": _nullable({"type": "number"}),
        "last_event_age_s": _nullable({"type": "number"}),
        "circuit_state": {"enum": [s.value for s in CircuitState]},
        "rate_limit_remaining": _nullable(count),
        "quality_flags": {"type": "object", "additionalProperties": count},
        "journal": {"type": "object"},
        "sinks": {"type": "object", "additionalProperties": {"type": "object"}},
    }
    up_down = {"enum": ["up", "down"]}
    return {
        "Error": {
            **_object(
                {
                    "error": {"type": "string", "minLength": 1},
                    "field": {"type": "string", "minLength": 1, "description": "what is at fault"},
                },
                required=["error"],
            ),
            "description": "every error the API answers, its own and the HTTP layer's",
        },
        "DataType": {"enum": data_types},
        "ProviderState": {
            "enum": states,
            "description": f"{STATUS_UNKNOWN}: the worker's report could not be read",
        },
        "SubscriptionRequest": _object(
            {"symbols": symbols, "data_types": data_type_list}, required=["symbols"]
        ),
        "UnsubscribeRequest": _object(
            {
                "symbols": symbols,
                "data_types": {
                    "type": "array",
                    "minItems": 1,
                    "items": _ref("DataType"),
                    "description": "checked as for a subscription; unsubscribing ignores it",
                },
            },
            required=["symbols"],
        ),
        "SubscribeResponse": _object(
            {
                "provider_id": {"type": "string", "format": "uuid"},
                "provider_name": {"type": "string"},
                "subscribed": {"type": "array", "items": {"type": "string"}},
                "data_types": {"type": "array", "items": _ref("DataType")},
            }
        ),
        "UnsubscribeResponse": _object(
            {
                "provider_id": {"type": "string", "format": "uuid"},
                "unsubscribed": count | {"description": "subscriptions made inactive"},
            }
        ),
        "ConnectResponse": _object(
            {
                "provider_id": {"type": "string", "format": "uuid"},
                "enabled": {"const": True},
                "status": _ref("ProviderState"),
            }
        ),
        "ProviderStatus": {
            **_object(
                status_properties,
                required=[p for p in status_properties if p != "reason"],
                extra=True,
            ),
            "description": "the worker's report (without its metrics), or DISCONNECTED when "
            "none is current, or UNKNOWN with a reason when it cannot be read",
        },
        "ProviderSummary": _object(
            record_properties(ProviderConfig, skip=frozenset({"connection_config"}))
            | {"status": _ref("ProviderState")}
        ),
        "Assignment": _object(
            {
                "provider": {"type": "string"},
                "symbol": {"type": "string"},
                "served_by": _nullable({"type": "string"}),
                "instance_id": {"type": "string"},
                "reason": {"enum": [PRIMARY, FAILOVER, FAILBACK]},
                "latest": {"type": "boolean", "description": "writes latest:{symbol}"},
                "since": {"type": "string", "format": "date-time"},
            }
        ),
        "Instance": _object(
            {
                "instance_id": {"type": "string"},
                "provider": {"type": "string"},
                "host": {"type": "string"},
                "pid": {"type": "integer"},
                "status": {"enum": [s.value for s in ConnectionStatus]},
                "started_at": {"type": "string", "format": "date-time"},
                "status_since": {"type": "string", "format": "date-time"},
                "heartbeat_age_s": {"type": "number", "minimum": 0},
                "live": {"type": "boolean", "description": "heartbeated within the timeout"},
            }
        ),
        "ComponentState": {
            "description": "the older form is the bare string",
            "anyOf": [
                up_down,
                {"type": "object", "required": ["status"], "properties": {"status": up_down}},
            ],
        },
        "HealthResponse": _object(
            {
                "status": {"enum": ["healthy", "degraded", "unhealthy"]},
                "timestamp": {"type": "string", "format": "date-time"},
                "components": {
                    **_object(
                        {
                            "database": _ref("ComponentState"),
                            "redis": _ref("ComponentState"),
                            "pulsar": {
                                "type": "object",
                                "properties": {
                                    "status": {"enum": ["up", "down", "unknown"]},
                                    "backlog": count,
                                    "last_receipt": _nullable({"type": "string"}),
                                },
                            },
                            "disk": {
                                "type": "object",
                                "properties": {
                                    "status": {"enum": ["ok", "low", "critical"]},
                                    "path": {"type": "string"},
                                    "free_bytes": count,
                                    "free_ratio": {"type": "number"},
                                },
                            },
                        },
                        required=["database", "redis"],
                        extra=True,
                    )
                },
                "providers": {"type": "object", "additionalProperties": _ref("ProviderHealth")},
                "failover": _nullable(
                    _object(
                        {
                            "symbols_in_failover": count,
                            "providers_failed_over": {
                                "type": "array",
                                "items": {"type": "string"},
                            },
                        },
                        extra=True,
                    )
                ),
            },
            extra=True,
        ),
        "ProviderHealth": _object(
            {
                "status": _ref("ProviderState"),
                "health": {"enum": ["ok", "degraded", "down", "disabled"]},
                "reason": _nullable({"type": "string"}),
                "enabled": {"type": "boolean"},
                "throughput_per_sec": {"type": "number"},
                "messages_received": count,
                "last_event_age_s": _nullable({"type": "number"}),
                "publish_lag_p99_ms": _nullable({"type": "number"}),
                "queue_depth": count,
                "last_update": {"type": "string"},
                "last_error": _nullable({"type": "string"}),
            },
            required=["status", "enabled"],
            extra=True,
        ),
        "WorkerMetrics": {
            **_object(metrics_properties, required=[], extra=True),
            "description": "a worker's figures as it reported them; {} when none is current",
        },
        "MetricsResponse": _object(
            {
                "timestamp": {"type": "string", "format": "date-time"},
                "totals": {
                    "type": "object",
                    "required": ["received", "published", "stored", "throughput_per_sec"],
                    "additionalProperties": {"type": "number"},
                },
                "providers": {"type": "object", "additionalProperties": _ref("WorkerMetrics")},
            }
        ),
    }


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": _ref("Error")}},
    }


def _ok(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _operations() -> dict[str, Any]:
    provider_id = {
        "name": "provider_id",
        "in": "path",
        "required": True,
        "description": "the provider's name or uuid",
        "schema": {"type": "string", "minLength": 1},
        "example": "polygon",
    }
    bad_id = _error("provider_id holds a NUL character")
    not_found = _error("no provider by that name or uuid")
    unavailable = _error("the database does not answer")
    unauthorized = _error("FEEDFLEET_API_TOKEN is set and the bearer token is missing or wrong")
    bad_body = _error("the body is not valid JSON, or a field is wrong (`field` names it)")
    too_large = _error("the body is larger than the server accepts")

    def body(schema: str) -> dict[str, Any]:
        return {"required": True, "content": {"application/json": {"schema": _ref(schema)}}}

    def writing(operation: dict[str, Any]) -> dict[str, Any]:
        return operation | {"security": [{BEARER: []}]}

    def page_file(*media_types: str) -> dict[str, Any]:
        return {
            "description": "served as shipped",
            "content": {t: {"schema": {"type": "string"}} for t in media_types},
            "headers": {
                name: {"required": True, "schema": {"const": value}}
                for name, value in PAGE_HEADERS.items()
            },
        }

    exposition = {
        media_type: {"schema": {"type": "string"}}
        for media_type in ("text/plain", "application/openmetrics-text")
    }

    return {
        "/api/v1/providers/{provider_id}/subscribe": {
            "parameters": [provider_id],
            "post": writing({
                "operationId": "subscribe",
                "summary": "subscribe the provider to symbols (upserts their data types)",
                "requestBody": body("SubscriptionRequest"),
                "responses": {
                    "200": _ok("subscribed", _ref("SubscribeResponse")),
                    "400": bad_body, "401": unauthorized, "404": not_found,
                    "413": too_large, "503": unavailable,
                },
            }),
        },
        "/api/v1/providers/{provider_id}/unsubscribe": {
            "parameters": [provider_id],
            "post": writing({
                "operationId": "unsubscribe",
                "summary": "make the provider's subscriptions to symbols inactive",
                "requestBody": body("UnsubscribeRequest"),
                "responses": {
                    "200": _ok("unsubscribed", _ref("UnsubscribeResponse")),
                    "400": bad_body, "401": unauthorized, "404": not_found,
                    "413": too_large, "503": unavailable,
                },
            }),
        },
        "/api/v1/providers/{provider_id}/status": {
            "parameters": [provider_id],
            "get": {
                "operationId": "providerStatus",
                "summary": "the provider's live status, from its worker's report in Redis",
                "responses": {
                    "200": _ok("the status", _ref("ProviderStatus")),
                    "400": bad_id, "404": not_found, "503": unavailable,
                },
            },
        },
        "/api/v1/providers/{provider_id}/connect": {
            "parameters": [provider_id],
            "put": writing({
                "operationId": "connect",
                "summary": "enable the provider; its worker connects",
                "responses": {
                    "202": _ok("enabled; the worker connects", _ref("ConnectResponse")),
                    "400": bad_id, "401": unauthorized, "404": not_found, "503": unavailable,
                },
            }),
        },
        "/api/v1/providers": {
            "get": {
                "operationId": "listProviders",
                "summary": "every provider row (without connection_config) and its status",
                "responses": {
                    "200": _ok("by priority, then name",
                               {"type": "array", "items": _ref("ProviderSummary")}),
                    "503": unavailable,
                },
            },
        },
        "/api/v1/assignments": {
            "get": {
                "operationId": "listAssignments",
                "summary": "which instance serves which symbol, for which provider, and why",
                "responses": {
                    "200": _ok("by symbol, provider, instance",
                               {"type": "array", "items": _ref("Assignment")}),
                    "503": unavailable,
                },
            },
        },
        "/health": {
            "get": {
                "operationId": "health",
                "summary": "overall health, components, every provider and failover",
                "responses": {
                    "200": _ok("healthy or degraded", _ref("HealthResponse")),
                    "503": _ok("unhealthy: the database does not answer",
                               _ref("HealthResponse")),
                },
            },
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "each provider's worker figures and their totals; the Prometheus "
                "exposition when Accept prefers text/plain or OpenMetrics",
                "responses": {
                    "200": {
                        "description": "the figures",
                        "content": {"application/json": {"schema": _ref("MetricsResponse")}}
                        | exposition,
                    },
                },
            },
        },
        "/metrics/prometheus": {
            "get": {
                "operationId": "prometheusMetrics",
                "summary": "the Prometheus exposition (OpenMetrics when Accept names it)",
                "responses": {"200": {"description": "text format 0.0.4", "content": exposition}},
            },
        },
        "/api/v1/instances": {
            "get": {
                "operationId": "listInstances",
                "summary": "every registered worker instance: host, pid, status, heartbeat",
                "responses": {
                    "200": _ok("by provider, then instance",
                               {"type": "array", "items": _ref("Instance")}),
                    "503": unavailable,
                },
            },
        },
        "/": {
            "get": {
                "operationId": "statusPage",
                "summary": "the status page; it reads the endpoints above itself",
                "responses": {"200": page_file("text/html")},
            },
        },
        "/static/{name}": {
            "get": {
                "operationId": "statusPageFile",
                "summary": "the status page's script and style sheet",
                "parameters": [{
                    "name": "name", "in": "path", "required": True,
                    "schema": {"enum": sorted(ASSET_TYPES)},
                }],
                "responses": {
                    "200": page_file(*sorted(set(ASSET_TYPES.values()))),
                    "404": _error("no such file"),
                },
            },
        },
        PATH: {
            "get": {
                "operationId": "openapi",
                "summary": "this document",
                "responses": {"200": _ok("OpenAPI 3.1", {"type": "object"})},
            },
        },
    }  # fmt: skip


def build_document() -> dict[str, Any]:
    """The whole OpenAPI document."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "feedfleet",
            "version": "1",
            "description": (
                "Market-data ingestion: intent into PostgreSQL, live state out of Redis. "
                "Every error is JSON (`Error`): an unknown path is 404, another method on "
                "a known path 405 with `Allow`, a malformed HTTP request 400."
            ),
        },
        "paths": _operations(),
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                BEARER: {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "needed when FEEDFLEET_API_TOKEN is set "
                    "(several tokens, comma-separated, are all accepted)",
                },
            },
        },
    }


_DOCUMENT = orjson.dumps(build_document())


async def serve_document(request: web.Request) -> web.Response:
    return web.Response(body=_DOCUMENT, content_type="application/json")
