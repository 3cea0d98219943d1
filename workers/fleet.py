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
import signal
import subprocess
import sys
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
from simulators.market import DEMO_SYMBOLS

ROOT = Path(__file__).resolve().parents[1]

DEMO_PROVIDERS: dict[str, tuple[str, dict[str, object], dict[str, object]]] = {
    # name: (provider_type, connection_config, rate_limits); ports come from the env.
    "polygon": (
        "polygon",
        {"url": "ws://127.0.0.1:{FEEDFLEET_SIM_POLYGON_PORT}/stocks",
         "api_key_env": "POLYGON_API_KEY"},
        {},
    ),
}  # fmt: skip


def _port(preferred: int) -> int:
    return preferred if port_is_free(preferred) else free_port()


async def seed_demo(database_url: str, env: dict[str, str]) -> None:
    conn = await db.connect(database_url)
    try:
        await db.apply_schema(conn)
        for priority, (name, (ptype, config, limits)) in enumerate(DEMO_PROVIDERS.items()):
            filled = {k: v.format(**env) if isinstance(v, str) else v for k, v in config.items()}
            provider_id = await db.upsert_provider(
                conn, name, ptype, filled, limits, priority=10 * (priority + 1)
            )
            await db.subscribe(
                conn, provider_id, list(DEMO_SYMBOLS), [DataType.TRADE, DataType.QUOTE]
            )
    finally:
        await conn.close()


async def seed_demo_from_env() -> None:
    from common.config import Settings

    env = dict(os.environ)
    env.setdefault("FEEDFLEET_SIM_POLYGON_PORT", "8765")
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
    for name in ("redis", "pulsar", "log", "spool"):
        (var / name).mkdir(parents=True, exist_ok=True)
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
            "FEEDFLEET_SPOOL_DIR": str(var / "spool"),
            "FEEDFLEET_SIM_POLYGON_PORT": env.get("FEEDFLEET_SIM_POLYGON_PORT") or str(_port(8765)),
            "FEEDFLEET_SIM_RATE": env.get("FEEDFLEET_SIM_RATE") or "1000",
        }
    )
    # Demo keys for the simulators; a real deployment sets its own.
    env.setdefault("POLYGON_API_KEY", "demo-polygon-key")
    return env, postgres


def run_fleet(var: Path | None = None, config: Path | None = None) -> int:
    var = (var or ROOT / "var").resolve()
    env, postgres = fleet_environment(var)
    try:
        asyncio.run(seed_demo(env["FEEDFLEET_DATABASE_URL"], env))
        print(
            f"feedfleet: api on http://{env.get('FEEDFLEET_API_HOST', '127.0.0.1')}:"
            f"{env.get('FEEDFLEET_API_PORT', '8080')}/ ; Ctrl-C stops the fleet",
            file=sys.stderr,
        )
        conf = config or ROOT / "supervisord.conf"
        proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(conf)], env=env
        )
        # SIGTERM (systemd, a CI timeout) must reach supervisord too, so it stops the fleet
        # before the embedded PostgreSQL is stopped below.
        signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                # The terminal sent SIGINT to supervisord too; wait for it to stop its children.
                continue
    finally:
        if postgres is not None:
            postgres.stop()
