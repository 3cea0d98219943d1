"""`feedfleet fleet-config`: the supervisord configuration of one host of the fleet.

Each host runs its own set of workers against the shared PostgreSQL, Redis and Pulsar;
``supervisord.conf`` runs all six demo providers (and the demo's simulators and embedded
services). This writes a host's own file instead, without editing the shared one:

    feedfleet fleet-config --host md-2 --providers polygon,fix --api --out /etc/feedfleet/md-2.conf
    feedfleet run --var /var/lib/feedfleet --config /etc/feedfleet/md-2.conf

It holds exactly the programs asked for, named as in ``supervisord.conf`` (``worker:NAME``,
``api``, ``coordinator:coordinator-0`` and ``-1``), each with ``FEEDFLEET_HOST`` set to the
host's name, each worker with its Prometheus port as ``feedfleet run`` picks it
(``FEEDFLEET_METRICS_<NAME>_PORT`` at generation time, else 9401-9406 for the demo's six
names, else the next number from 9407 up), and every log rotated by supervisord. Paths and
the interpreter come from the variables ``feedfleet run`` sets (``FEEDFLEET_VAR``,
``FEEDFLEET_PYTHON``, ``FEEDFLEET_SUPERVISOR_USER``), so one file suits any state directory.

Provider names are checked against the ``providers`` table where ``FEEDFLEET_DATABASE_URL``
reaches a database, else for their form only (a note says so).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg

from workers.fleet import WORKER_METRICS_PORTS, metrics_port_variable

# A provider or host name that is safe as a supervisord program name, in its environment=
# values and as a directory name: no ':', '%', quotes, commas, spaces or slashes.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,49}")
# Workers whose name has no port of its own in WORKER_METRICS_PORTS get one from here up.
FIRST_EXTRA_METRICS_PORT = 9407
# supervisord rotates each program's log at this size and keeps this many old ones, so a
# chatty or crash-looping program cannot fill the disk: at most 6 x 50 MB per program.
LOG_MAX_BYTES = "50MB"
LOG_BACKUPS = 5


class FleetConfigError(Exception):
    """Bad names or a database that does not know them: the message says which."""


@dataclass(frozen=True)
class HostPlan:
    """What one host runs: its name, its workers with their Prometheus ports, and whether it
    runs the API and the coordinators."""

    host: str
    workers: dict[str, int]
    api: bool = False
    coordinator: bool = False


def parse_names(text: str) -> list[str]:
    """``a,b`` -> ``["a", "b"]``; a bad or repeated name is an error."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        if not NAME.fullmatch(name):
            raise FleetConfigError(
                f"not a valid provider name: {name!r} (letters, digits, '_', '.', '-'; "
                "at most 50 characters, starting with a letter or digit)"
            )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise FleetConfigError(f"provider named more than once: {', '.join(repeated)}")
    return names


def metrics_ports(names: Sequence[str], environ: Mapping[str, str]) -> dict[str, int]:
    """Each worker's Prometheus port: its ``FEEDFLEET_METRICS_<NAME>_PORT``, else the port
    ``feedfleet run`` gives the demo's names, else the next free number from 9407."""
    ports: dict[str, int] = {}
    for name in names:
        variable = metrics_port_variable(name)
        value = environ.get(variable)
        if value:
            if not value.isdigit() or not 0 < int(value) <= 65535:
                raise FleetConfigError(f"{variable} must be a port number, got {value!r}")
            ports[name] = int(value)
        elif name in WORKER_METRICS_PORTS:
            ports[name] = WORKER_METRICS_PORTS[name]
    taken = set(ports.values()) | set(WORKER_METRICS_PORTS.values())
    port = FIRST_EXTRA_METRICS_PORT
    for name in names:
        if name in ports:
            continue
        while port in taken:
            port += 1
        ports[name] = port
        taken.add(port)
    clashes = sorted(n for n in names if list(ports.values()).count(ports[n]) > 1)
    if clashes:
        raise FleetConfigError(f"workers given the same metrics port: {', '.join(clashes)}")
    return {name: ports[name] for name in names}


def unknown_providers(database_url: str, names: Sequence[str]) -> list[str]:
    """The names that are not rows of ``providers``. Raises OSError-like psycopg errors when
    the database cannot be reached, FleetConfigError when it has no providers table."""
    with psycopg.connect(database_url, connect_timeout=5, autocommit=True) as conn:
        exists = conn.execute("SELECT to_regclass('providers') IS NOT NULL").fetchone()
        if not exists or not exists[0]:
            raise FleetConfigError(
                "the database has no providers table (`feedfleet db init` applies the schema)"
            )
        rows = conn.execute(
            "SELECT name FROM providers WHERE name = ANY(%s)", (list(names),)
        ).fetchall()
    known = {row[0] for row in rows}
    return [n for n in names if n not in known]


def check_against_database(names: Sequence[str], environ: Mapping[str, str]) -> str | None:
    """Raise for names the database does not know; a note when no database could say."""
    url = environ.get("FEEDFLEET_DATABASE_URL")
    if not names:
        return None
    if not url:
        return "FEEDFLEET_DATABASE_URL is not set: provider names checked for their form only"
    try:
        missing = unknown_providers(url, names)
    except psycopg.OperationalError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"database not reachable ({reason}): provider names checked for their form only"
    if missing:
        raise FleetConfigError(
            f"no provider row named {', '.join(missing)} in the database "
            "(SELECT name FROM providers lists them)"
        )
    return None


def _log_lines(name: str) -> list[str]:
    return [
        f"stdout_logfile=%(ENV_FEEDFLEET_VAR)s/log/{name}.log",
        f"stdout_logfile_maxbytes={LOG_MAX_BYTES}",
        f"stdout_logfile_backups={LOG_BACKUPS}",
        "redirect_stderr=true",
    ]


def render(plan: HostPlan, command_line: str) -> str:
    """The supervisord configuration for ``plan``."""
    host_env = f'FEEDFLEET_HOST="{plan.host}"'
    out = [
        f"; feedfleet host {plan.host}: {command_line}",
        "; Run with `feedfleet run --var DIR --config THIS_FILE`, which sets the FEEDFLEET_*",
        "; variables used below; `feedfleet ctl --var DIR status` lists its programs.",
        "",
        "[unix_http_server]",
        "file=%(ENV_FEEDFLEET_VAR)s/supervisor.sock",
        "chmod=0700",
        "chown=%(ENV_FEEDFLEET_SUPERVISOR_USER)s",
        "",
        "[supervisord]",
        "logfile=%(ENV_FEEDFLEET_VAR)s/log/supervisord.log",
        f"logfile_maxbytes={LOG_MAX_BYTES}",
        f"logfile_backups={LOG_BACKUPS}",
        "pidfile=%(ENV_FEEDFLEET_VAR)s/supervisord.pid",
        "childlogdir=%(ENV_FEEDFLEET_VAR)s/log",
        "user=%(ENV_FEEDFLEET_SUPERVISOR_USER)s",
        "directory=%(ENV_FEEDFLEET_VAR)s",
        "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "",
        "[supervisorctl]",
        "serverurl=unix://%(ENV_FEEDFLEET_VAR)s/supervisor.sock",
    ]
    if plan.coordinator:
        out += [
            "",
            "; One coordinator acts, the other waits for its lock and takes over at once.",
            "[program:coordinator]",
            "command=%(ENV_FEEDFLEET_PYTHON)s -m workers.cli coordinator",
            "process_name=%(program_name)s-%(process_num)d",
            "numprocs=2",
            f"environment={host_env}",
            "priority=30",
            "autorestart=true",
            "stopwaitsecs=15",
            *_log_lines("%(program_name)s-%(process_num)d"),
        ]
    if plan.api:
        out += [
            "",
            "[program:api]",
            "command=%(ENV_FEEDFLEET_PYTHON)s -m workers.cli api",
            f"environment={host_env}",
            "priority=30",
            "autorestart=true",
            *_log_lines("api"),
        ]
    for name, port in plan.workers.items():
        out += [
            "",
            f"[program:{name}]",
            f"command=%(ENV_FEEDFLEET_PYTHON)s -m workers {name}",
            f'environment={host_env},FEEDFLEET_METRICS_PORT="{port}"',
            "priority=40",
            "autorestart=true",
            "startsecs=3",
            "; A worker flushes in-flight events and writes DISCONNECTED before it exits.",
            "stopwaitsecs=30",
            *_log_lines(f"worker-{name}"),
        ]
    if plan.workers:
        out += ["", "[group:worker]", f"programs={','.join(plan.workers)}"]
    return "\n".join(out) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="feedfleet fleet-config",
        description="write the supervisord configuration of one host: its workers, and the "
        "API and coordinators if asked (run it with feedfleet run --config FILE)",
    )
    p.add_argument("--host", required=True, help="this host's name (FEEDFLEET_HOST)")
    p.add_argument(
        "--providers", default="", metavar="A,B",
        help="provider rows this host runs a worker for, comma-separated",
    )  # fmt: skip
    p.add_argument("--out", default=None, metavar="FILE", help="write here (default: stdout)")
    p.add_argument("--api", action="store_true", help="run the REST API on this host")
    p.add_argument("--coordinator", action="store_true", help="run the coordinators on this host")
    return p


def main(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> int:
    """Exit status 0, or 2 with the reason on stderr for bad names, a database that does
    not know them, or a file that cannot be written."""
    env = os.environ if environ is None else environ
    args = build_parser().parse_args(list(argv))
    try:
        if not NAME.fullmatch(args.host):
            raise FleetConfigError(f"not a valid host name: {args.host!r}")
        names = parse_names(args.providers)
        if not (names or args.api or args.coordinator):
            raise FleetConfigError("nothing to run: give --providers, --api or --coordinator")
        note = check_against_database(names, env)
        plan = HostPlan(args.host, metrics_ports(names, env), args.api, args.coordinator)
    except FleetConfigError as exc:
        print(f"feedfleet fleet-config: {exc}", file=sys.stderr)
        return 2
    if note:
        print(f"feedfleet fleet-config: {note}", file=sys.stderr)
    # The header says how the file was made (one line, whatever the arguments hold).
    command_line = shlex.join(["feedfleet", "fleet-config", *argv]).replace("\n", " ")
    text = render(plan, command_line)
    if args.out is None:
        sys.stdout.write(text)
        return 0
    try:
        Path(args.out).write_text(text)
    except OSError as exc:
        print(
            f"feedfleet fleet-config: cannot write {args.out}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 2
    ports = ", ".join(f"{n} {p}" for n, p in plan.workers.items()) or "none"
    print(
        f"feedfleet fleet-config: wrote {args.out}; worker metrics ports: {ports}", file=sys.stderr
    )
    return 0
