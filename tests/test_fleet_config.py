"""`feedfleet fleet-config`: one host's supervisord file, run by a real supervisord; names
checked against the providers table; every program's log rotated (here and in
supervisord.conf)."""

from __future__ import annotations

import configparser
import getpass
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from common import db
from tests.conftest import Services
from workers.fleet_config import (
    LOG_BACKUPS,
    LOG_MAX_BYTES,
    FleetConfigError,
    HostPlan,
    metrics_ports,
    render,
)

ROOT = Path(__file__).resolve().parents[1]


def _no_fleet_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("FEEDFLEET_")}


def fleet_config(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", "fleet-config", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def _program_names(conf: Path, var: Path) -> set[str]:
    """The programs a real supervisord runs from ``conf``, as `supervisorctl status` lists
    them. The programs get no service URLs: they fail at start, and only their names
    count here."""
    (var / "log").mkdir(parents=True)
    env = _no_fleet_env() | {
        "FEEDFLEET_VAR": str(var),
        "FEEDFLEET_PYTHON": sys.executable,
        "FEEDFLEET_SUPERVISOR_USER": getpass.getuser(),
    }
    supervisord = subprocess.Popen(
        [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(conf)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (var / "supervisor.sock").exists():
            assert supervisord.poll() is None, (var / "log" / "supervisord.log").read_text()
            assert time.monotonic() < deadline, "supervisord made no socket in 30 s"
            time.sleep(0.1)
        status = subprocess.run(
            [sys.executable, "-m", "supervisor.supervisorctl", "-c", str(conf), "status"],
            env=env, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert status.stdout.strip(), status.stderr
        return {line.split()[0] for line in status.stdout.splitlines() if line.strip()}
    finally:
        supervisord.send_signal(signal.SIGTERM)
        supervisord.wait(timeout=60)


async def test_the_file_runs_exactly_the_requested_programs(
    services: Services, conn: db.Conn, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:6]
    first, second, other = f"fc{tag}-a", f"fc{tag}-b", f"fc{tag}-c"
    for name in (first, second, other):
        await db.upsert_provider(conn, name, "polygon", {"url": "ws://127.0.0.1:1/stocks"})
    env = _no_fleet_env() | {"FEEDFLEET_DATABASE_URL": services.database_url}

    conf = tmp_path / "host.conf"
    done = fleet_config(
        "--host", "md-2", "--providers", f"{first},{second}", "--api", "--out", str(conf),
        env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"wrote {conf}; worker metrics ports: {first} 9407, {second} 9408" in done.stderr
    assert _program_names(conf, tmp_path / "var-a") == {
        f"worker:{first}", f"worker:{second}", "api",
    }  # fmt: skip
    text = conf.read_text()
    assert 'environment=FEEDFLEET_HOST="md-2",FEEDFLEET_METRICS_PORT="9407"' in text

    # The coordinators only, printed to stdout: a host that runs no worker.
    only = fleet_config("--host", "md-3", "--coordinator", env=env)
    assert only.returncode == 0, only.stderr
    conf.write_text(only.stdout)
    assert _program_names(conf, tmp_path / "var-b") == {
        "coordinator:coordinator-0", "coordinator:coordinator-1",
    }  # fmt: skip


async def test_a_name_the_database_lacks_is_a_clear_error(
    services: Services, conn: db.Conn, tmp_path: Path
) -> None:
    known = f"fc{uuid.uuid4().hex[:6]}"
    await db.upsert_provider(conn, known, "fix", {"host": "127.0.0.1", "port": 1})
    env = _no_fleet_env() | {"FEEDFLEET_DATABASE_URL": services.database_url}
    out = tmp_path / "host.conf"
    done = fleet_config(
        "--host", "md-2", "--providers", f"{known},nosuch-{known}", "--out", str(out), env=env
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == (
        f"feedfleet fleet-config: no provider row named nosuch-{known} in the database "
        "(SELECT name FROM providers lists them)\n"
    )
    assert not out.exists()


def test_bad_names_are_clear_errors_without_a_database() -> None:
    env = _no_fleet_env()
    bad = fleet_config("--host", "h", "--providers", "polygon,worker:fix", env=env)
    assert bad.returncode == 2
    assert "not a valid provider name: 'worker:fix'" in bad.stderr
    twice = fleet_config("--host", "h", "--providers", "fix,fix", env=env)
    assert (twice.returncode, twice.stderr.strip()) == (
        2, "feedfleet fleet-config: provider named more than once: fix",
    )  # fmt: skip
    host = fleet_config("--host", "a b", "--api", env=env)
    assert host.returncode == 2 and "not a valid host name: 'a b'" in host.stderr
    nothing = fleet_config("--host", "h", env=env)
    assert nothing.returncode == 2 and "nothing to run" in nothing.stderr
    # Without a database the names are checked for their form, and it says so.
    unchecked = fleet_config("--host", "h", "--providers", "polygon", env=env)
    assert unchecked.returncode == 0
    assert "FEEDFLEET_DATABASE_URL is not set: provider names checked for their form only" in (
        unchecked.stderr
    )
    assert "[program:polygon]" in unchecked.stdout


def test_metrics_ports_as_feedfleet_run_gives_them() -> None:
    # The demo's names keep feedfleet run's ports; others follow from 9407, in order.
    assert metrics_ports(["fix", "lse", "polygon", "tse"], {}) == {
        "fix": 9405, "lse": 9407, "polygon": 9401, "tse": 9408,
    }  # fmt: skip
    # FEEDFLEET_METRICS_<NAME>_PORT wins, and the numbers handed out skip it.
    env = {"FEEDFLEET_METRICS_POLYGON_PORT": "9500", "FEEDFLEET_METRICS_TSE_PORT": "9407"}
    assert metrics_ports(["polygon", "lse", "tse"], env) == {
        "polygon": 9500, "lse": 9408, "tse": 9407,
    }  # fmt: skip
    with pytest.raises(FleetConfigError, match="workers given the same metrics port: fix, lse"):
        metrics_ports(["fix", "lse"], {"FEEDFLEET_METRICS_LSE_PORT": "9405"})
    with pytest.raises(FleetConfigError, match="FEEDFLEET_METRICS_LSE_PORT must be a port"):
        metrics_ports(["lse"], {"FEEDFLEET_METRICS_LSE_PORT": "nine"})


def _programs(text: str) -> dict[str, dict[str, str]]:
    parser = configparser.RawConfigParser(strict=False)
    parser.read_string(text)
    return {s: dict(parser.items(s)) for s in parser.sections() if s.startswith("program:")}


def test_every_program_log_is_rotated() -> None:
    plan = HostPlan("h", {"polygon": 9401, "lse": 9407}, api=True, coordinator=True)
    generated = _programs(render(plan, "test"))
    shipped = _programs((ROOT / "supervisord.conf").read_text())
    assert len(generated) == 4 and len(shipped) >= 14
    for name, program in (generated | shipped).items():
        assert program.get("stdout_logfile_maxbytes") == LOG_MAX_BYTES, name
        assert program.get("stdout_logfile_backups") == str(LOG_BACKUPS), name
        # stderr goes to the same, rotated file.
        assert program.get("redirect_stderr") == "true", name
