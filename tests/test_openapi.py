"""The OpenAPI document (workers/openapi.py) against the routes and against the live API.

The live test starts ``feedfleet api`` as a process on a real port, against the test
PostgreSQL (a schema of its own, seeded with providers in each state the API reports) and
Redis, with a bearer token, and runs schemathesis from the document the API serves: no
server error, and every status code, content type, header and body as documented; writes
refused without the token, invalid input refused and valid input accepted, other methods
405 with Allow. The run is bounded (a few examples per operation, a fixed seed, no example
database), so CI sees the same cases every time. It uses schemathesis's own runner (all of
its phases: examples, coverage, fuzzing), not its pytest plugin: the plugin's lazy loader,
needed for a schema served by a fixture, sets ``Function._nodeid``, which pytest 9 no
longer has.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import requests
import schemathesis
from hypothesis import strategies as st
from psycopg.conninfo import make_conninfo
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import events

from common import db
from common.config import Settings
from common.embedded import free_port
from common.model import DataType, ProviderStatus
from common.redis_keys import provider_status_key
from tests.conftest import Services
from tests.test_api import reporting_worker
from workers.api import MAX_SYMBOLS_PER_REQUEST, SYMBOL_RE, build_app
from workers.openapi import PATH, build_document, record_properties

TOKEN = "openapi-test-token"
# A connected provider with a worker's report, a disabled one, one whose report is
# unreadable (UNKNOWN) and one enabled with no report (DISCONNECTED).
SEEDED = ("polygon", "refinitiv", "iex", "fix")
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "positive_data_acceptance",
    "ignored_auth",
    "unsupported_method",
    "allow_header_conformance",
]
MAX_EXAMPLES = 12


def test_every_route_is_documented_and_nothing_else() -> None:
    app = build_app(Settings(database_url="", redis_url="", pulsar_url=""))
    routes = {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource}
    # aiohttp's add_get answers HEAD too; the document describes the GET
    heads = {path for method, path in routes if method == "HEAD"}
    assert heads == {path for method, path in routes if method == "GET"}
    documented = {
        (method.upper(), path)
        for path, item in build_document()["paths"].items()
        for method in item
        if method != "parameters"
    }
    assert {route for route in routes if route[0] != "HEAD"} == documented
    assert ("GET", PATH) in documented


def test_the_document_takes_its_limits_and_records_from_the_api() -> None:
    schemas = build_document()["components"]["schemas"]
    symbols = schemas["SubscriptionRequest"]["properties"]["symbols"]
    assert symbols["maxItems"] == MAX_SYMBOLS_PER_REQUEST
    assert symbols["items"]["pattern"] == f"^(?:{SYMBOL_RE.pattern})$"
    assert schemas["DataType"]["enum"] == [t.value for t in DataType]
    status = schemas["ProviderStatus"]
    assert status["required"] == [f.name for f in dataclasses.fields(ProviderStatus)]


def test_a_record_field_without_a_schema_fails_loudly() -> None:
    @dataclass
    class Widened:
        name: str
        tags: list[str]

    assert record_properties(Widened, skip=frozenset({"tags"})) == {"name": {"type": "string"}}
    with pytest.raises(TypeError, match=r"Widened\.tags"):
        record_properties(Widened)


@pytest.fixture
async def api_database(services: Services, conn: db.Conn) -> AsyncIterator[str]:
    """A database URL whose tables are the test's alone, seeded with the SEEDED providers
    (a subscription, a worker instance and its assignment included), and their status
    documents in Redis."""
    schema = f"openapi_{uuid.uuid4().hex[:8]}"
    await conn.execute(f'CREATE SCHEMA "{schema}"')
    url = make_conninfo(services.database_url, options=f"-c search_path={schema}")
    own = await db.connect(url)
    redis = aioredis.from_url(services.redis_url)
    keys: list[str] = []
    try:
        await db.apply_schema(own)
        ids = {}
        for rank, name in enumerate(SEEDED, 1):
            ids[name] = await db.upsert_provider(
                own, name, name, {"url": "ws://127.0.0.1:9"}, {"requests_per_minute": 5},
                priority=rank, enabled=name != "refinitiv",
            )  # fmt: skip
            keys.append(provider_status_key(ids[name]))
        await db.subscribe(own, ids["polygon"], ["AAPL"], [DataType.TRADE])
        instance = "polygon@openapi-test:1"
        await db.register_instance(own, instance, ids["polygon"], "openapi-test", 1)
        await own.execute(
            "INSERT INTO assignments (provider_id, instrument_symbol, instance_id, data_types) "
            "VALUES (%s, 'AAPL', %s, ARRAY['TRADE'])",
            (ids["polygon"], instance),
        )
        async with reporting_worker(services.settings(database_url=url), ids["polygon"], 3):
            await redis.persist(keys[0])  # the report outlives the run, however long
        await redis.set(provider_status_key(ids["iex"]), b"{not json")
        yield url
    finally:
        await redis.delete(*keys)
        await redis.aclose()
        await own.close()
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def live_api(services: Services, api_database: str, tmp_path: Path) -> Iterator[str]:
    """``feedfleet api`` on a free port with a token; its base URL."""
    port = free_port()
    env = {**os.environ, "FEEDFLEET_DATABASE_URL": api_database,
           "FEEDFLEET_REDIS_URL": services.redis_url, "FEEDFLEET_PULSAR_URL": services.pulsar_url,
           "FEEDFLEET_API_HOST": "127.0.0.1", "FEEDFLEET_API_PORT": str(port),
           "FEEDFLEET_API_TOKEN": TOKEN, "FEEDFLEET_LOG_LEVEL": "warning"}  # fmt: skip
    log_path = tmp_path / "api.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "api"], env=env, stdout=log, stderr=log
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if requests.get(base + PATH, timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(10)
    # a handler that raised is logged even when its 500 was not seen by a check
    assert "api_internal_error" not in log_path.read_text()


@dataclass
class SchemathesisRun:
    """What a schemathesis run saw: the status codes each operation answered, and every
    failed check with the curl that reproduces it."""

    statuses: dict[str, set[int]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def run_schemathesis(base_url: str) -> SchemathesisRun:
    config = SchemathesisConfig.from_dict({
        "seed": 13,
        "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
        "auth": {"openapi": {"bearerAuth": {"bearer": TOKEN}}},
        "checks": {"enabled": False} | {name: {"enabled": True} for name in CHECKS},
        "phases": {"stateful": {"enabled": False}},
    })  # fmt: skip
    schema = schemathesis.openapi.from_url(base_url + PATH, config=config)

    @schema.hook
    def before_generate_path_parameters(context: Any, strategy: Any) -> Any:
        if "{provider_id}" not in context.operation.path:
            return strategy
        # most made-up names are 404s: draw the seeded providers as often
        seeded = st.sampled_from(SEEDED).map(lambda name: {"provider_id": name})
        return st.one_of(strategy, seeded)

    run = SchemathesisRun()
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.NonFatalError):
            run.failures.append(f"{event.label}: {event.value!r}")
        elif isinstance(event, events.FatalError):
            run.failures.append(f"schemathesis stopped: {event.exception!r}")
        if not isinstance(event, events.ScenarioFinished):
            continue
        recorder = event.recorder
        seen = run.statuses.setdefault(recorder.label, set())
        seen.update(i.response.status_code for i in recorder.interactions.values() if i.response)
        for check in (c for checks in recorder.checks.values() for c in checks):
            if check.failure_info is not None:
                failure = check.failure_info.failure
                run.failures.append(
                    f"{recorder.label} ({event.phase.value}) {check.name}: {failure.title}\n"
                    f"{failure.message}\n{check.failure_info.code_sample}"
                )
    return run


def test_the_live_api_answers_as_documented(live_api: str) -> None:
    run = run_schemathesis(live_api)
    assert not run.failures, "\n\n".join(dict.fromkeys(run.failures))
    operations = {
        f"{method.upper()} {path}": item[method]
        for path, item in build_document()["paths"].items()
        for method in item
        if method != "parameters"
    }
    # schemathesis leaves out the document's own URL: compared here instead
    served = requests.get(live_api + PATH, timeout=5)
    assert served.json() == build_document()
    assert set(run.statuses) == set(operations) - {f"GET {PATH}"}
    for label, statuses in run.statuses.items():
        operation = operations[label]
        # each answered with success (the seeded providers), and a write without the token
        # was refused
        assert statuses & {200, 202}, (label, statuses)
        assert ("security" in operation) == (401 in statuses), (label, statuses)
        assert statuses - {405} <= {int(code) for code in operation["responses"]}
