"""PostgreSQL, Redis and Pulsar for the bench: from the environment or embedded.

``FEEDFLEET_DATABASE_URL`` names a server on which a fresh database is created and dropped
afterwards; ``FEEDFLEET_REDIS_URL`` and ``FEEDFLEET_PULSAR_URL`` are used as they are.
Whatever is not set runs embedded (``common.embedded``) in the bench's work directory, as a
child of the bench process, so it shares the bench's core when the bench is pinned.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from common.embedded import (
    EmbeddedPostgres,
    EmbeddedProcess,
    free_port,
    pulsar_command,
    redis_command,
)


@dataclass
class Services:
    """PostgreSQL (fresh database), Redis and Pulsar: from the environment or embedded."""

    work_dir: Path
    database_url: str = ""
    redis_url: str = ""
    pulsar_url: str = ""
    embedded: list[str] = field(default_factory=list)
    external: list[str] = field(default_factory=list)
    broker: EmbeddedProcess | None = None
    _procs: list[EmbeddedProcess] = field(default_factory=list)
    _postgres: EmbeddedPostgres | None = None
    _drop: tuple[str, str] | None = None

    def start(self) -> None:
        server_url = os.environ.get("FEEDFLEET_DATABASE_URL")
        if server_url:
            name = f"feedfleet_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
            with psycopg.connect(server_url, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{name}"')
            params = conninfo_to_dict(server_url)
            params["dbname"] = name
            self.database_url = make_conninfo(**params)  # type: ignore[arg-type]
            self._drop = (server_url, name)
            self.external.append("postgresql")
        else:
            self._postgres = EmbeddedPostgres(self.work_dir / "pg")
            self._postgres.start()
            self.database_url = self._postgres.create_database("feedfleet_bench")
            self.embedded.append("postgresql")
        redis_url = os.environ.get("FEEDFLEET_REDIS_URL")
        if redis_url:
            self.redis_url = redis_url
            self.external.append("redis")
        else:
            port = free_port()
            proc = EmbeddedProcess(
                redis_command(port, self.work_dir / "redis"), port, self.work_dir / "redis.log"
            )
            proc.start()
            self._procs.append(proc)
            self.redis_url = f"redis://127.0.0.1:{port}/0"
            self.embedded.append("redis")
        pulsar_url = os.environ.get("FEEDFLEET_PULSAR_URL")
        if pulsar_url:
            self.pulsar_url = pulsar_url
            self.external.append("pulsar")
        else:
            port = free_port()
            self.broker = EmbeddedProcess(
                pulsar_command(port, self.work_dir / "pulsar"), port, self.work_dir / "pulsar.log"
            )
            self.broker.start()
            self._procs.append(self.broker)
            self.pulsar_url = f"pulsar://127.0.0.1:{port}"
            self.embedded.append("pulsar")

    @property
    def broker_pid(self) -> int | None:
        proc = self.broker._proc if self.broker is not None else None
        return proc.pid if proc is not None else None

    def close(self) -> None:
        for proc in self._procs:
            proc.stop()
        if self._drop is not None:
            server_url, name = self._drop
            with (
                contextlib.suppress(psycopg.Error),
                psycopg.connect(server_url, autocommit=True) as conn,
            ):
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if self._postgres is not None:
            self._postgres.stop()
