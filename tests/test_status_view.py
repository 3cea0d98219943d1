"""``feedfleet status`` against a live API (real PostgreSQL and Redis, a worker's own status
report): the rows it prints, ``--watch`` redrawing on a terminal, and the errors for an API
that does not answer or a bad ``--api``."""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import signal
import struct
import sys
import termios
import uuid
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient, TestServer

from common import db
from common.config import Settings
from common.embedded import free_port
from tests.test_api import reporting_worker
from workers.api import build_app
from workers.status_view import fleet_view


@pytest.fixture
async def api(alone: tuple[Settings, db.Conn]) -> AsyncIterator[tuple[Settings, str]]:
    # A schema of its own: with every provider the other tests made, the table would be
    # taller than the terminal, and rich's Live crops what does not fit.
    settings = alone[0]
    async with TestClient(TestServer(build_app(settings), host="127.0.0.1")) as client:
        yield settings, str(client.make_url("")).rstrip("/")


@pytest.fixture
async def provider(alone: tuple[Settings, db.Conn]) -> AsyncIterator[tuple[str, str]]:
    name = f"status-{uuid.uuid4().hex[:6]}"
    pid = await db.upsert_provider(alone[1], name, "polygon", {"url": "ws://x"}, enabled=True)
    yield name, pid


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEEDFLEET_")}
    return env | extra


async def _status(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "workers.cli", "status", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _row(output: str, name: str) -> str:
    """The table row whose first cell is ``name``."""
    lines = [
        line
        for line in output.splitlines()
        if [cell.strip() for cell in line.split("│")[1:2]] == [name]
    ]
    assert len(lines) == 1, output
    return lines[0]


async def test_status_prints_each_provider_and_the_components(
    api: tuple[Settings, str], provider: tuple[str, str]
) -> None:
    settings, url = api
    name, pid = provider
    host, port = url.removeprefix("http://").rsplit(":", 1)
    async with reporting_worker(settings, pid, 42):
        # no --api: the address comes from FEEDFLEET_API_HOST/PORT, as `source var/env` sets
        code, out, err = await _status(env=_env(FEEDFLEET_API_HOST=host, FEEDFLEET_API_PORT=port))
    assert code == 0, err
    row = _row(out, name)
    assert "CONNECTED" in row and "7.0" in row.split()  # the worker's events/s
    assert "healthy" in out or "degraded" in out
    for component in ("PostgreSQL", "Redis"):
        assert "up" in _row(out, component).split(), out


async def test_watch_redraws_on_a_terminal_until_interrupted(
    api: tuple[Settings, str], provider: tuple[str, str]
) -> None:
    settings, url = api
    name, pid = provider
    master, slave = pty.openpty()
    # a wide terminal, so a row is one line
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 220, 0, 0))
    received = bytearray()
    seen = asyncio.Event()
    wanted: list[bytes] = []

    def read() -> None:
        try:
            received.extend(os.read(master, 65536))
        except OSError:
            return
        if wanted and wanted[0] in received:
            seen.set()

    loop = asyncio.get_running_loop()
    loop.add_reader(master, read)
    proc = None
    try:
        async with reporting_worker(settings, pid, 5) as parts:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "workers.cli", "status", "--watch", "--api", url,
                env=_env(TERM="xterm-256color", COLUMNS="220"), stdin=slave, stdout=slave,
                stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            wanted.append(name.encode())
            await asyncio.wait_for(seen.wait(), 30)
            # the worker's next report: the same process draws it, in place
            seen.clear()
            wanted[0] = b"321.5"
            parts.status.throughput = 321.5
            await parts.status.publish()
            await asyncio.wait_for(seen.wait(), 30)
            proc.send_signal(signal.SIGINT)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        loop.remove_reader(master)
        os.close(master)
        os.close(slave)
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert b"\x1b[" in received  # drawn with cursor movement, not printed frame after frame


async def test_an_unreachable_api_is_a_clear_error_and_status_1() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = await _status("--api", url, env=_env())
    assert code == 1 and out == ""
    assert f"feedfleet status: cannot reach the API at {url}" in err
    for bad in ("localhost:8080", "ftp://x", "http://[::1", "http://127.0.0.1:99999"):
        code, _, err = await _status("--api", bad, env=_env())
        assert code == 2, (bad, err)
        assert err.startswith("feedfleet status: --api ") and repr(bad) in err, err
    # from the environment, named as such
    code, _, err = await _status(env=_env(FEEDFLEET_API_PORT="eighty"))
    assert code == 2 and "FEEDFLEET_API_HOST/FEEDFLEET_API_PORT" in err, err


def test_fields_are_read_as_the_api_gives_them_and_missing_ones_stay_empty() -> None:
    health = {
        "status": "degraded",
        "components": {
            "database": {"status": "up"}, "redis": "down",
            "disk": {"status": "low", "path": "/var", "free_bytes": 3 * 2**30, "free_ratio": 0.05},
        },
        "providers": {
            "polygon": {"status": "CONNECTED", "health": "ok", "throughput_per_sec": 950.0,
                        "last_event_age_s": 0.4, "publish_lag_p99_ms": 6.5, "queue_depth": 2,
                        "rate_limit_remaining": None},
            "fix": {"status": "ERROR", "health": "down", "reason": "logon refused",
                    "last_error": "logon refused", "rate_limit_remaining": 4},
        },
        "failover": {"symbols_in_failover": 3, "providers_failed_over": ["fix"]},
    }  # fmt: skip
    metrics = {
        "providers": {
            "polygon": {"circuit_state": "closed", "spool_depth": 12, "latency_p99_ms": 99.0},
            "fix": {"circuit_state": "open", "spooled": 7},
        }
    }  # fmt: skip
    assignments = [
        {"symbol": "AAPL", "served_by": "polygon", "provider": "polygon"},
        {"symbol": "AAPL", "served_by": "polygon", "provider": "fix"},
        {"symbol": "MSFT", "served_by": "polygon", "provider": "fix"},
    ]
    view = fleet_view("http://api", health, metrics, assignments)
    assert view.overall == "degraded" and view.symbols_in_failover == 3
    assert [(c.name, c.status) for c in view.components] == [
        ("PostgreSQL", "up"), ("Redis", "down"), ("Pulsar", None), ("Disk", "low"),
    ]  # fmt: skip
    assert view.components[3].detail == "3.0 GiB free, 5.0%, /var"
    polygon, fix = view.providers
    assert (polygon.name, polygon.events_per_s, polygon.p99_ms) == ("polygon", 950.0, 6.5)
    assert (polygon.circuit, polygon.rate_budget, polygon.spool) == ("closed", "unlimited", 12)
    assert (polygon.symbols, polygon.queue, polygon.last_event_age_s) == (2, 2, 0.4)
    assert (fix.status, fix.health, fix.reason) == ("ERROR", "down", "logon refused")
    assert (fix.circuit, fix.rate_budget, fix.spool, fix.symbols) == ("open", "4", 7, 0)
    assert (fix.events_per_s, fix.p99_ms, fix.last_event_age_s) == (None, None, None)
    # without /metrics and /api/v1/assignments: what /health has, the rest empty
    bare = fleet_view("http://api", health, None, None).providers[0]
    assert (bare.circuit, bare.rate_budget, bare.symbols, bare.spool) == (
        None, "unlimited", None, None,
    )  # fmt: skip
