"""The fleet a chaos run breaks: the real processes under supervisord, on services it owns.

Services start as `feedfleet run` starts them (``workers.fleet.fleet_environment``), always
embedded, since the run stops PostgreSQL and the broker on purpose. The supervisord
configuration is made from the project's ``supervisord.conf``: its redis, broker,
coordinator, api and worker programs are copied as they are (the coordinator twice, so one
stands by), and three simulators are added whose faults the run switches through a file
and who log every frame they send.

Three providers overlap on the canonical symbols: Polygon as themselves, Refinitiv as
``{symbol}.O``, Bloomberg as ``{symbol} US Equity``; priorities 1, 2, 3, failover on the two
backups, subscriptions on the primary only, so failover is what keeps them served.
"""

from __future__ import annotations

import configparser
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
import uuid
import xmlrpc.client
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import db
from common.embedded import EmbeddedPostgres, free_port, wait_for_port
from common.model import DataType
from common.project_files import project_file

ROOT = Path(__file__).resolve().parents[1]
OWNED_SERVICES = ("FEEDFLEET_DATABASE_URL", "FEEDFLEET_REDIS_URL", "FEEDFLEET_PULSAR_URL")
COORDINATORS = 2


@dataclass(frozen=True)
class ChaosProvider:
    name: str  # the provider row, its worker program and its simulator module
    priority: int
    symbol_format: str  # how this provider spells a canonical symbol
    config: dict[str, Any]  # connection_config; "{port}" is the simulator's port
    failover: bool  # takes failover traffic ("failover_symbols": "*")

    def own(self, symbol: str) -> str:
        return self.symbol_format.format(symbol=symbol)


PROVIDERS = (
    ChaosProvider(
        "polygon", 1, "{symbol}",
        {"url": "ws://127.0.0.1:{port}/stocks", "api_key_env": "POLYGON_API_KEY",
         "heartbeat_s": 2},
        failover=False,
    ),
    ChaosProvider(
        "refinitiv", 2, "{symbol}.O",
        {"url": "ws://127.0.0.1:{port}/WebSocket", "user": "feedfleet",
         "heartbeat_timeout_s": 3},
        failover=True,
    ),
    ChaosProvider(
        "bloomberg", 3, "{symbol} US Equity",
        # Off: the adapter counts an idle session (a backup holding nothing) as silent and
        # would reconnect every timeout; a silent symbol is the worker's to report.
        {"blpapi_module": "simulators.bloomberg", "host": "127.0.0.1", "port": "{port}",
         "silence_timeout_s": 0},
        failover=True,
    ),
)  # fmt: skip
PRIMARY = PROVIDERS[0]


@dataclass(frozen=True)
class FleetOptions:
    symbols: list[str]
    events_per_symbol_s: float  # each symbol's ticks per second (trades and quotes)
    failover_grace_s: float
    failback_hold_s: float
    silence_threshold_s: float


def _pdeathsig() -> None:
    """In the child: SIGTERM when the parent dies, so a killed harness takes supervisord
    (and through it the fleet) down instead of leaving it running."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class ChaosFleet:
    work: Path
    options: FleetOptions
    env: dict[str, str] = field(default_factory=dict)
    postgres: EmbeddedPostgres | None = None
    supervisord: subprocess.Popen[bytes] | None = None
    topic: str = ""
    sim_ports: dict[str, int] = field(default_factory=dict)
    provider_ids: dict[str, str] = field(default_factory=dict)

    @property
    def var(self) -> Path:
        return self.work / "var"

    @property
    def conf(self) -> Path:
        return self.work / "supervisord.conf"

    def sent_log_dir(self, provider: str) -> Path:
        return self.work / "sent" / provider

    def faults_file(self, provider: str) -> Path:
        return self.work / "faults" / f"{provider}.faults"

    @property
    def database_url(self) -> str:
        return self.env["FEEDFLEET_DATABASE_URL"]

    @property
    def pulsar_url(self) -> str:
        return self.env["FEEDFLEET_PULSAR_URL"]

    def own_symbols(self) -> dict[str, dict[str, str]]:
        return {p.name: {s: p.own(s) for s in self.options.symbols} for p in PROVIDERS}

    # ------------------------------------------------------------ start

    def start_services(self) -> None:
        """Embedded PostgreSQL now; Redis and the broker are supervisord programs."""
        from workers.fleet import fleet_environment

        saved = {k: os.environ.pop(k) for k in OWNED_SERVICES if k in os.environ}
        try:
            self.env, self.postgres = fleet_environment(self.var)
        finally:
            os.environ.update(saved)
        self.topic = f"persistent://public/default/chaos-{uuid.uuid4().hex[:8]}"
        self.env.update(
            {
                "FEEDFLEET_PULSAR_TOPIC": self.topic,
                "FEEDFLEET_API_PORT": str(free_port()),
                "FEEDFLEET_LOG_FORMAT": "json",
                "FEEDFLEET_DEMO": "false",
            }
        )
        for p in PROVIDERS:
            self.sim_ports[p.name] = free_port()
            self.sent_log_dir(p.name).mkdir(parents=True, exist_ok=True)
            self.faults_file(p.name).parent.mkdir(parents=True, exist_ok=True)
            self.faults_file(p.name).write_text("")

    async def seed(self) -> None:
        conn = await db.connect(self.database_url)
        try:
            await db.apply_schema(conn)
            for p in PROVIDERS:
                config: dict[str, Any] = {
                    k: (int(v.format(port=self.sim_ports[p.name])) if v == "{port}"
                        else v.format(port=self.sim_ports[p.name]) if isinstance(v, str)
                        else v)
                    for k, v in p.config.items()
                }  # fmt: skip
                config |= {
                    "symbol_format": p.symbol_format,
                    "failover_grace_s": self.options.failover_grace_s,
                    "failback_hold_s": self.options.failback_hold_s,
                    "silence_threshold_s": self.options.silence_threshold_s,
                    # A quiet walk would otherwise flag nothing useful; the run measures gaps.
                    "stale_after_s": None,
                }
                if p.failover:
                    config["failover_symbols"] = "*"
                self.provider_ids[p.name] = await db.upsert_provider(
                    conn, p.name, p.name, config, priority=p.priority
                )
            await db.subscribe(
                conn, self.provider_ids[PRIMARY.name], list(self.options.symbols),
                [DataType.TRADE, DataType.QUOTE],
            )  # fmt: skip
        finally:
            await conn.close()

    def write_conf(self) -> None:
        self.conf.write_text(self.render_conf())

    def render_conf(self) -> str:
        real = configparser.RawConfigParser(strict=False)
        real.optionxform = str  # type: ignore[assignment,method-assign]
        real.read(project_file("supervisord.conf"))
        var = self.var
        out = [
            "; Written by `feedfleet chaos` from supervisord.conf; removed with its work dir.",
            "[unix_http_server]", f"file={var}/supervisor.sock", "chmod=0700", "",
            "[supervisord]", f"logfile={var}/log/supervisord.log",
            f"pidfile={var}/supervisord.pid", f"childlogdir={var}/log",
            "user=%(ENV_FEEDFLEET_SUPERVISOR_USER)s", f"directory={ROOT}", "",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
            "", "[supervisorctl]", f"serverurl=unix://{var}/supervisor.sock", "",
        ]  # fmt: skip

        def copy(section: str, **override: str) -> None:
            items = dict(real.items(section)) | override
            out.append(f"[{section}]")
            out.extend(f"{k}={v}" for k, v in items.items())
            out.append("")

        copy("program:redis")
        copy("program:broker")
        # Two coordinators: one holds the lock, the other stands by for it.
        copy(
            "program:coordinator", numprocs=str(COORDINATORS),
            process_name="%(program_name)s-%(process_num)d",
            stdout_logfile="%(ENV_FEEDFLEET_VAR)s/log/coordinator-%(process_num)d.log",
        )  # fmt: skip
        copy("program:api")
        for p in PROVIDERS:
            copy(f"program:{p.name}")
        out += ["[group:worker]", f"programs={','.join(p.name for p in PROVIDERS)}", ""]
        symbols = self.options.symbols
        # Every symbol ticks (a trade and a quote in turn) events_per_symbol_s times a second.
        rate = max(1.0, self.options.events_per_symbol_s * len(symbols))
        for p in PROVIDERS:
            sim_symbols = [p.own(s) for s in symbols] if p.name == "refinitiv" else symbols
            command = (
                f"%(ENV_FEEDFLEET_PYTHON)s -m simulators {p.name} "
                f"--port {self.sim_ports[p.name]} --symbols {','.join(sim_symbols)} "
                f"--rate {rate:g} --batch 2 --faults-file {self.faults_file(p.name)} "
                f"--sent-log {self.sent_log_dir(p.name)}"
            )
            out += [
                f"[program:{p.name}-sim]", f"command={command}", "priority=20",
                "autorestart=true", f"stdout_logfile={var}/log/{p.name}-sim.log",
                "redirect_stderr=true", "",
            ]  # fmt: skip
        out += ["[group:simulator]", f"programs={','.join(f'{p.name}-sim' for p in PROVIDERS)}"]
        return "\n".join(out) + "\n"

    def start_supervisord(self) -> None:
        self.write_conf()
        log = open(self.var / "log" / "supervisord.out", "ab")  # noqa: SIM115 - the child's
        self.supervisord = subprocess.Popen(
            [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(self.conf)],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_pdeathsig,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.supervisord.poll() is not None:
                raise RuntimeError(f"supervisord exited; see {self.var / 'log'}")
            with contextlib.suppress(OSError, xmlrpc.client.Fault):
                if self.rpc().supervisor.getState()["statename"] == "RUNNING":
                    return
            time.sleep(0.2)
        raise RuntimeError("supervisord did not come up in 30 s")

    def wait_for_broker(self, timeout_s: float = 30.0) -> None:
        wait_for_port(int(self.env["FEEDFLEET_PULSAR_PORT"]), timeout_s)

    # ------------------------------------------------------------ control

    def rpc(self) -> Any:
        """supervisord's XML-RPC interface, which supervisorctl itself drives."""
        from supervisor.xmlrpc import SupervisorTransport

        transport = SupervisorTransport(None, None, f"unix://{self.var}/supervisor.sock")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    def pid(self, name: str) -> int:
        """As ``supervisorctl pid NAME``: 0 when the program is not running."""
        return int(self.rpc().supervisor.getProcessInfo(name)["pid"])

    def state(self, name: str) -> str:
        return str(self.rpc().supervisor.getProcessInfo(name)["statename"])

    def stop_program(self, name: str) -> None:
        with contextlib.suppress(xmlrpc.client.Fault):  # already stopped
            self.rpc().supervisor.stopProcess(name, True)

    def start_program(self, name: str) -> None:
        with contextlib.suppress(xmlrpc.client.Fault):  # already running
            self.rpc().supervisor.startProcess(name, True)

    def stop_group(self, group: str) -> None:
        with contextlib.suppress(xmlrpc.client.Fault):
            self.rpc().supervisor.stopProcessGroup(group, True)

    def kill9(self, name: str) -> int:
        pid = self.pid(name)
        if pid:
            os.kill(pid, signal.SIGKILL)
        return pid

    def set_faults(self, provider: str, spec: str) -> None:
        """The simulator picks the spec up within 0.1 s, connections left as they are."""
        path = self.faults_file(provider)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(spec)
        os.replace(tmp, path)

    def coordinator_names(self) -> list[str]:
        return [f"coordinator:coordinator-{i}" for i in range(COORDINATORS)]

    def coordinator_with_backend(self, backend_pid: int) -> str | None:
        """The coordinator program whose log says it became active on ``backend_pid`` (the
        server side of its connection, which is what pg_locks shows)."""
        found = None
        for i, name in enumerate(self.coordinator_names()):
            path = self.var / "log" / f"coordinator-{i}.log"
            with contextlib.suppress(OSError):
                for line in path.read_text(errors="replace").splitlines():
                    if "coordinator_active" not in line:
                        continue
                    with contextlib.suppress(ValueError, TypeError):
                        doc = json.loads(line)
                        if (
                            doc.get("event") == "coordinator_active"
                            and doc.get("backend_pid") == backend_pid
                        ):
                            found = name
        return found

    def stop_postgres(self) -> None:
        if self.postgres is not None:
            self.postgres.stop()

    def start_postgres(self) -> None:
        if self.postgres is not None:
            self.postgres.start()

    # ------------------------------------------------------------ stop

    def close(self, timeout_s: float = 90.0) -> None:
        """Stop everything this fleet started; safe to call twice, and after a failed start."""
        proc = self.supervisord
        if proc is not None and proc.poll() is None:
            programs = self._program_processes()
            # supervisord stops its programs (workers flush) before it exits.
            with contextlib.suppress(Exception):
                self.rpc().supervisor.shutdown()
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            self._end(programs)
        # Forgotten only once stopped, so a second call after an interrupted first one
        # still stops it.
        self.supervisord = None
        postgres, self.postgres = self.postgres, None
        if postgres is not None:
            postgres.stop()

    def _program_processes(self) -> list[tuple[int, bytes]]:
        """(pid, command line) of every program supervisord runs now."""
        out = []
        with contextlib.suppress(Exception):
            for info in self.rpc().supervisor.getAllProcessInfo():
                pid = int(info["pid"])
                with contextlib.suppress(OSError):
                    out.append((pid, Path(f"/proc/{pid}/cmdline").read_bytes()))
        return out

    @staticmethod
    def _end(programs: list[tuple[int, bytes]]) -> None:
        """SIGKILL any of ``programs`` supervisord left behind, each by its id, and only if
        that id still runs the same command (not a process that reused it)."""
        for pid, cmdline in programs:
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/cmdline").read_bytes() == cmdline:
                    os.kill(pid, signal.SIGKILL)
