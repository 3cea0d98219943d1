"""Real services for the tests.

PostgreSQL, Redis and the Pulsar broker come from ``FEEDFLEET_DATABASE_URL`` /
``FEEDFLEET_REDIS_URL`` / ``FEEDFLEET_PULSAR_URL`` when set, else embedded ones are
started once per session. Each session gets a fresh database; each test that publishes
uses its own topic.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import psycopg
import pytest
import redis.asyncio as aioredis
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from common import db
from common.config import PulsarAccess, Settings
from common.embedded import (
    EmbeddedPostgres,
    EmbeddedProcess,
    free_port,
    pulsar_command,
    redis_command,
)
from tests import SHARED


@dataclass(frozen=True)
class Services:
    database_url: str
    redis_url: str
    pulsar_url: str
    pulsar_port: int | None  # set when the broker is ours (tests may restart it)
    work_dir: Path

    def settings(self, **overrides: object) -> Settings:
        base = Settings(
            database_url=self.database_url,
            redis_url=self.redis_url,
            pulsar_url=self.pulsar_url,
            # A broker set by FEEDFLEET_PULSAR_URL may want a token or TLS.
            pulsar_access=PulsarAccess.from_env(self.pulsar_url),
            pulsar_topic=f"persistent://public/default/test-{uuid.uuid4().hex[:12]}",
            journal_dir=self.work_dir / f"journal-{uuid.uuid4().hex[:8]}",
        )
        return replace(base, **overrides)  # type: ignore[arg-type]


def _fresh_database(server_url: str) -> tuple[str, str]:
    name = f"feedfleet_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    params = conninfo_to_dict(server_url)
    params["dbname"] = name
    return make_conninfo(**params), name  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    work = tmp_path_factory.mktemp("services")
    started: list[EmbeddedProcess] = []
    postgres: EmbeddedPostgres | None = None

    server_url = os.environ.get("FEEDFLEET_DATABASE_URL")
    if not server_url:
        postgres = EmbeddedPostgres(work / "pg")
        postgres.start()
        server_url = postgres.url()
    database_url, db_name = _fresh_database(server_url)

    redis_url = os.environ.get("FEEDFLEET_REDIS_URL")
    if not redis_url:
        port = free_port()
        proc = EmbeddedProcess(redis_command(port, work / "redis"), port, work / "redis.log")
        proc.start()
        started.append(proc)
        redis_url = f"redis://127.0.0.1:{port}/0"

    pulsar_url = os.environ.get("FEEDFLEET_PULSAR_URL")
    pulsar_port = None
    if not pulsar_url:
        pulsar_port = free_port()
        broker = EmbeddedProcess(
            pulsar_command(pulsar_port, work / "pulsar"), pulsar_port, work / "pulsar.log"
        )
        broker.start()
        started.append(broker)
        pulsar_url = f"pulsar://127.0.0.1:{pulsar_port}"

    async def init() -> None:
        conn = await db.connect(database_url)
        await db.apply_schema(conn)
        await conn.close()

    asyncio.run(init())
    try:
        yield Services(database_url, redis_url, pulsar_url, pulsar_port, work)
    finally:
        for proc in started:
            proc.stop()
        try:
            with psycopg.connect(server_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
        except psycopg.Error:
            pass
        if postgres is not None:
            postgres.stop()


@pytest.fixture
async def conn(services: Services) -> AsyncIterator[db.Conn]:
    c = await db.connect(services.database_url)
    # A query stuck behind a lock fails here with PostgreSQL's reason, not as a test timeout.
    await c.execute("SET statement_timeout = '60s'")
    yield c
    await c.close()


@pytest.fixture
async def redis_client(services: Services) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(services.redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def alone(services: Services, conn: db.Conn) -> AsyncIterator[tuple[Settings, db.Conn]]:
    """Settings and a connection for tables of the test's alone (a schema of its own, alone
    on the search path): /health judges every provider it finds, so the test knows them all.
    A schema rather than a database: dropping a database waits for a checkpoint."""
    schema = f"alone_{uuid.uuid4().hex[:8]}"
    await conn.execute(f'CREATE SCHEMA "{schema}"')
    url = make_conninfo(services.database_url, options=f"-c search_path={schema}")
    own = await db.connect(url)
    try:
        await db.apply_schema(own)
        yield services.settings(database_url=url), own
    finally:
        await own.close()
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def fixtures_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"provider samples not found at {SHARED / 'fixtures'}")
    return SHARED / "fixtures"


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: a real ENOSPC, not a simulated one (needs root, as CI has)."""
    mount = tmp_path / f"tiny-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``make test`` runs two processes), the slow end-to-end tests,
    each a fleet of processes of its own, run one after another in one group, beside the
    others rather than beside each other: two at once on two cores would measure the
    machine, not the code."""
    for item in items:
        # the benchmark's check is on its figures' consistency, not their size: it may share
        if item.get_closest_marker("slow") is not None and "test_bench" not in item.nodeid:
            item.add_marker(pytest.mark.xdist_group("slow"))
