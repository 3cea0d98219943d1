"""`feedfleet run`: the whole fleet under supervisord, on embedded services where needed.

For each of PostgreSQL, Redis and Pulsar: if its ``FEEDFLEET_*_URL`` is set, that server
is used; otherwise an embedded one runs under ``./var/``. The schema is applied, the demo
provider rows and symbols are seeded, and supervisord runs in the foreground with the
environment ``supervisord.conf`` expects. Ctrl-C stops everything.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import shlex
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from common import db
from common.embedded import (
    EmbeddedPostgres,
    free_port,
    port_is_free,
    pulsar_lite_path,
    redis_server_path,
)
from common.model import DataType
from common.project_files import project_file
from simulators.market import DEMO_SYMBOLS
from workers.broker_store import CHECK_INTERVAL_S, BrokerStoreCap, max_bytes_from_env

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class DemoProvider:
    """A provider row `make run` seeds, pointed at its simulator.

    ``{FEEDFLEET_...}`` placeholders in the config are filled from the fleet environment.
    """

    name: str
    provider_type: str
    connection_config: dict[str, object]
    symbols: list[str]
    rate_limits: dict[str, object] = field(default_factory=dict)
    data_types: tuple[DataType, ...] = (DataType.TRADE, DataType.QUOTE)


DEMO_PROVIDERS = [
    DemoProvider(
        "polygon", "polygon",
        {"url": "ws://127.0.0.1:{FEEDFLEET_SIM_POLYGON_PORT}/stocks",
         "rest_url": "http://127.0.0.1:{FEEDFLEET_SIM_POLYGON_PORT}",
         "api_key_env": "POLYGON_API_KEY"},
        list(DEMO_SYMBOLS),
    ),
    DemoProvider(
        "refinitiv", "refinitiv",
        {"url": "ws://127.0.0.1:{FEEDFLEET_SIM_REFINITIV_PORT}/WebSocket", "user": "feedfleet"},
        [f"{s}.N" for s in DEMO_SYMBOLS],
    ),
    DemoProvider(
        "alphavantage", "alphavantage",
        {"base_url": "http://127.0.0.1:{FEEDFLEET_SIM_ALPHAVANTAGE_PORT}",
         "api_key_env": "ALPHAVANTAGE_API_KEY",
         "functions": ["GLOBAL_QUOTE", "TIME_SERIES_INTRADAY"], "interval": "1min",
         "poll_interval_s": 5, "stale_after_s": None},
        list(DEMO_SYMBOLS[:5]),
        rate_limits={"requests_per_second": 5},
        data_types=(DataType.TRADE, DataType.AGGREGATE),
    ),
    DemoProvider(
        "iex", "iex",
        {"host": "127.0.0.1", "port": "{FEEDFLEET_SIM_IEX_PORT}", "heartbeat_timeout_s": 5},
        list(DEMO_SYMBOLS),
    ),
    DemoProvider(
        "fix", "fix",
        {"host": "127.0.0.1", "port": "{FEEDFLEET_SIM_FIX_PORT}", "sender_comp_id": "FEEDFLEET",
         "target_comp_id": "FIXSIM", "heartbeat_interval": 5},
        list(DEMO_SYMBOLS),
    ),
    # blpapi is not on PyPI: the demo runs the adapter on the stand-in library.
    DemoProvider(
        "bloomberg", "bloomberg",
        {"blpapi_module": "simulators.bloomberg", "host": "127.0.0.1",
         "port": "{FEEDFLEET_SIM_BLOOMBERG_PORT}", "silence_timeout_s": 10},
        list(DEMO_SYMBOLS),
    ),
]  # fmt: skip
# The ports that carry UDP (the IEX simulator sends its feed to the worker's port).
UDP_PORTS = {"FEEDFLEET_SIM_IEX_PORT"}
SIMULATOR_PORTS = {
    "FEEDFLEET_SIM_POLYGON_PORT": 8765,
    "FEEDFLEET_SIM_REFINITIV_PORT": 15000,
    "FEEDFLEET_SIM_ALPHAVANTAGE_PORT": 8770,
    "FEEDFLEET_SIM_IEX_PORT": 10378,
    "FEEDFLEET_SIM_FIX_PORT": 9878,
    "FEEDFLEET_SIM_BLOOMBERG_PORT": 8194,
}

# Each worker program's own Prometheus port: supervisord.conf hands the program its
# FEEDFLEET_METRICS_<NAME>_PORT as FEEDFLEET_METRICS_PORT; deploy/prometheus.yml scrapes them.
WORKER_METRICS_PORTS = {
    "polygon": 9401,
    "refinitiv": 9402,
    "alphavantage": 9403,
    "iex": 9404,
    "fix": 9405,
    "bloomberg": 9406,
}


def metrics_port_variable(worker: str) -> str:
    return f"FEEDFLEET_METRICS_{worker.upper()}_PORT"


def _fill(value: object, env: dict[str, str]) -> object:
    if not isinstance(value, str) or "{" not in value:
        return value
    filled = value.format(**env)
    return int(filled) if filled.isdigit() and value.startswith("{") else filled


def _port(preferred: int, *, udp: bool = False) -> int:
    """``preferred`` if nothing holds it (for UDP too where the port carries datagrams:
    IEX's feed), else a free one."""
    free = port_is_free(preferred) and (not udp or port_is_free(preferred, socket.SOCK_DGRAM))
    return preferred if free else free_port()


async def seed_demo(database_url: str, env: dict[str, str]) -> None:
    conn = await db.connect(database_url)
    try:
        await db.apply_schema(conn)
        for rank, demo in enumerate(DEMO_PROVIDERS, 1):
            config = {k: _fill(v, env) for k, v in demo.connection_config.items()}
            provider_id = await db.upsert_provider(
                conn, demo.name, demo.provider_type, config, demo.rate_limits, priority=10 * rank
            )
            await db.subscribe(conn, provider_id, demo.symbols, list(demo.data_types))
    finally:
        await conn.close()


async def _apply_schema(database_url: str) -> None:
    conn = await db.connect(database_url)
    try:
        await db.apply_schema(conn)
    finally:
        await conn.close()


async def seed_demo_from_env() -> None:
    from common.config import Settings

    env = dict(os.environ)
    for name, port in SIMULATOR_PORTS.items():
        env.setdefault(name, str(port))
    await seed_demo(Settings.from_env().database_url, env)


def fleet_environment(var: Path) -> tuple[dict[str, str], EmbeddedPostgres | None]:
    env = dict(os.environ)
    postgres = None
    if not env.get("FEEDFLEET_DATABASE_URL"):
        postgres = EmbeddedPostgres(var / "pg")
        postgres.start()
        env["FEEDFLEET_DATABASE_URL"] = postgres.create_database("feedfleet")
    embed_redis = not env.get("FEEDFLEET_REDIS_URL")
    redis_port = _port(16379) if embed_redis else 0
    if embed_redis:
        env["FEEDFLEET_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
    embed_pulsar = not env.get("FEEDFLEET_PULSAR_URL")
    pulsar_port = _port(16650) if embed_pulsar else 0
    if embed_pulsar:
        env["FEEDFLEET_PULSAR_URL"] = f"pulsar://127.0.0.1:{pulsar_port}"
    for name in ("redis", "pulsar", "log", "journal"):
        (var / name).mkdir(parents=True, exist_ok=True)
    # Its metrics listener would take 0.0.0.0:8080, the API's port. It has no retention
    # settings: workers/broker_store.py caps its store instead.
    (var / "pulsar-lite.toml").write_text("[metrics]\nenabled = false\n")
    env.update(
        {
            "FEEDFLEET_PYTHON": sys.executable,
            "FEEDFLEET_VAR": str(var),
            "FEEDFLEET_SUPERVISOR_USER": getpass.getuser(),
            "FEEDFLEET_EMBED_REDIS": str(embed_redis).lower(),
            "FEEDFLEET_EMBED_PULSAR": str(embed_pulsar).lower(),
            "FEEDFLEET_REDIS_PORT": str(redis_port),
            "FEEDFLEET_PULSAR_PORT": str(pulsar_port),
            "FEEDFLEET_REDIS_SERVER": redis_server_path(),
            "FEEDFLEET_PULSAR_LITE": pulsar_lite_path(),
            "FEEDFLEET_JOURNAL_DIR": str(var / "journal"),
            "FEEDFLEET_SIM_RATE": env.get("FEEDFLEET_SIM_RATE") or "1000",
        }
    )
    for name, port in SIMULATOR_PORTS.items():
        env[name] = env.get(name) or str(_port(port, udp=name in UDP_PORTS))
    for worker, port in WORKER_METRICS_PORTS.items():
        name = metrics_port_variable(worker)
        env[name] = env.get(name) or str(_port(port))
    # Production hosts set FEEDFLEET_DEMO=false: no simulators, no demo rows.
    demo = env.get("FEEDFLEET_DEMO", "true").lower() not in ("0", "false", "no")
    env["FEEDFLEET_DEMO"] = str(demo).lower()
    # The demo's rows are kept a day, not the 7 of a production host (README, Storage).
    if demo:
        env["FEEDFLEET_RETENTION_DAYS"] = env.get("FEEDFLEET_RETENTION_DAYS") or "1"
    # Demo keys for the simulators; a real deployment sets its own.
    env.setdefault("POLYGON_API_KEY", "demo-polygon-key")
    env.setdefault("ALPHAVANTAGE_API_KEY", "demo-alphavantage-key")
    return env, postgres


SERVICE_URLS = ("FEEDFLEET_DATABASE_URL", "FEEDFLEET_REDIS_URL", "FEEDFLEET_PULSAR_URL")
# Where the API listens, with the API's own defaults: what `feedfleet status` reads.
API_ADDRESS = (("FEEDFLEET_API_HOST", "127.0.0.1"), ("FEEDFLEET_API_PORT", "8080"))


def write_env_file(var: Path, env: dict[str, str]) -> Path:
    """``var/env``: the services' URLs and the API's address as ``export`` lines an operator
    can source, so ``psql "$FEEDFLEET_DATABASE_URL"`` reaches this fleet's database, not the
    machine's, and ``feedfleet status`` this fleet's API. Readable by its owner only (a
    production URL may hold a password)."""
    path = var / "env"
    lines = [f"export {name}={shlex.quote(env[name])}\n" for name in SERVICE_URLS if env.get(name)]
    lines += [
        f"export {name}={shlex.quote(env.get(name) or default)}\n" for name, default in API_ADDRESS
    ]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.writelines(lines)
    os.chmod(path, 0o600)
    return path


def run_fleet(var: Path | None = None, config: Path | None = None) -> int:
    var = (var or ROOT / "var").resolve()
    env, postgres = fleet_environment(var)
    try:
        store_cap = None
        if env["FEEDFLEET_EMBED_PULSAR"] == "true" and (cap := max_bytes_from_env(env)):
            store_cap = BrokerStoreCap(var / "pulsar", cap, var)
            store_cap.before_start()
        if env["FEEDFLEET_DEMO"] == "true":
            asyncio.run(seed_demo(env["FEEDFLEET_DATABASE_URL"], env))
        else:
            asyncio.run(_apply_schema(env["FEEDFLEET_DATABASE_URL"]))
        env_file = write_env_file(var, env)
        for name in SERVICE_URLS:
            print(f"feedfleet: {name}={env.get(name, '')}", file=sys.stderr)
        print(
            f"feedfleet: api on http://{env.get('FEEDFLEET_API_HOST', '127.0.0.1')}:"
            f"{env.get('FEEDFLEET_API_PORT', '8080')}/ ; `source {env_file}` in another shell "
            "to reach these with psql and the like; Ctrl-C stops the fleet",
            file=sys.stderr,
        )
        ports = ", ".join(f"{w} {env[metrics_port_variable(w)]}" for w in WORKER_METRICS_PORTS)
        host = env.get("FEEDFLEET_METRICS_HOST") or "127.0.0.1"
        print(f"feedfleet: worker metrics (GET /metrics) on {host}: {ports}", file=sys.stderr)
        conf = config or project_file("supervisord.conf")
        proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(conf)], env=env
        )

        # SIGINT/SIGTERM (Ctrl-C, systemd, kill) go on to supervisord, which stops the fleet
        # before the embedded PostgreSQL is stopped below. A terminal's Ctrl-C reaches it
        # directly as well; a second SIGINT while it is stopping does no harm.
        def forward(signum: int, _frame: object) -> None:
            proc.send_signal(signum)

        signal.signal(signal.SIGINT, forward)
        signal.signal(signal.SIGTERM, forward)
        while store_cap is not None:
            try:
                return proc.wait(timeout=CHECK_INTERVAL_S)
            except subprocess.TimeoutExpired:
                store_cap.check()
        return proc.wait()
    finally:
        if postgres is not None:
            postgres.stop()
