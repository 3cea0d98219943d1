"""``feedfleet status``: the fleet's state as tables in the terminal (rich).

It reads the API, as the status page does: ``/health`` (overall, components, each
provider's status), ``/metrics`` (latency, circuit, rate-limit budget, spool) and
``/api/v1/assignments`` (the symbols each provider's instances hold). Only ``/health`` is
required; a figure the API does not give (an older worker, a failed read) shows as "—".
``--watch`` redraws every 2 s in place. An API that does not answer is a clear error and
exit status 1.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

DASH = "—"
REQUEST_TIMEOUT_S = 5.0
WATCH_INTERVAL_S = 2.0
LAG_WARN_S = 5.0  # the quality check's default stale_after_s
LAG_BAD_S = 30.0
COMPONENTS = (
    ("database", "PostgreSQL"),
    ("redis", "Redis"),
    ("pulsar", "Pulsar"),
    ("disk", "Disk"),
)
STYLES = {
    "healthy": "green", "up": "green", "ok": "green", "connected": "green", "closed": "green",
    "degraded": "yellow", "low": "yellow", "connecting": "yellow", "rate_limited": "yellow",
    "half_open": "yellow",
    "unhealthy": "red", "down": "red", "critical": "red", "error": "red",
    "disconnected": "red", "open": "red",
}  # fmt: skip


class ApiUnreachable(Exception):
    """The API did not answer /health with a status document."""


@dataclass(frozen=True)
class ComponentRow:
    name: str
    status: str | None
    detail: str


@dataclass(frozen=True)
class ProviderRow:
    name: str
    status: str | None
    health: str | None
    reason: str | None
    enabled: bool
    events_per_s: float | None
    p99_ms: float | None
    last_event_age_s: float | None
    circuit: str | None
    rate_budget: str
    spool: int | None
    queue: int | None
    symbols: int | None
    last_error: str | None


@dataclass(frozen=True)
class FleetView:
    api: str
    overall: str
    timestamp: str | None
    components: list[ComponentRow]
    providers: list[ProviderRow]
    symbols_in_failover: int | None


# ---------------------------------------------------------------- reading the documents


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _integer(value: Any) -> int | None:
    number = _number(value)
    return None if number is None else int(number)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _component(name: str, raw: Any) -> ComponentRow:
    """A component as /health gives it: ``"up"`` or ``{"status": "up", ...}``."""
    doc = raw if isinstance(raw, dict) else ({} if raw is None else {"status": raw})
    details: list[str] = []
    if name == "pulsar" and _integer(doc.get("backlog")) is not None:
        details.append(f"backlog {_integer(doc.get('backlog')):,}")
    if name == "disk":
        free = _number(doc.get("free_bytes"))
        if free is not None:
            details.append(f"{free / 2**30:,.1f} GiB free")
        ratio = _number(doc.get("free_ratio"))
        if ratio is not None:
            details.append(f"{ratio:.1%}")
        if doc.get("path"):
            details.append(str(doc["path"]))
    return ComponentRow(name, _text(doc.get("status")), ", ".join(details))


def fleet_view(
    api: str, health: dict[str, Any], metrics: dict[str, Any] | None,
    assignments: list[Any] | None,
) -> FleetView:  # fmt: skip
    """What the tables show, from the API's documents; missing fields become None."""
    components_doc = health.get("components")
    components_doc = components_doc if isinstance(components_doc, dict) else {}
    components = [
        ComponentRow(label, c.status, c.detail)
        for key, label in COMPONENTS
        for c in [_component(key, components_doc.get(key))]
    ]
    health_providers = health.get("providers")
    health_providers = health_providers if isinstance(health_providers, dict) else {}
    metric_providers = (metrics or {}).get("providers")
    metric_providers = metric_providers if isinstance(metric_providers, dict) else {}
    held: dict[str, set[str]] = {}
    for a in assignments or []:
        if isinstance(a, dict) and isinstance(a.get("served_by"), str):
            held.setdefault(a["served_by"], set()).add(str(a.get("symbol")))
    names = list(health_providers) + [n for n in metric_providers if n not in health_providers]
    rows = []
    for name in names:
        h = health_providers.get(name)
        h = h if isinstance(h, dict) else {}
        m = metric_providers.get(name)
        m = m if isinstance(m, dict) else {}
        # /health's count from Redis: null is unlimited; absent, that nobody reported it
        if "rate_limit_remaining" not in h:
            budget = DASH
        elif h["rate_limit_remaining"] is None:
            budget = "unlimited"
        else:
            budget = _fmt(_number(h["rate_limit_remaining"]), 0)
        rows.append(
            ProviderRow(
                name=name,
                status=_text(h.get("status")),
                health=_text(h.get("health")),
                reason=_text(_first(h.get("reason"), h.get("last_error"))),
                enabled=h.get("enabled") is not False,
                events_per_s=_number(
                    _first(h.get("throughput_per_sec"), m.get("throughput_per_sec"))
                ),
                p99_ms=_number(_first(h.get("publish_lag_p99_ms"), m.get("latency_p99_ms"))),
                last_event_age_s=_number(
                    _first(h.get("last_event_age_s"), m.get("last_event_age_s"))
                ),
                circuit=_text(_first(h.get("circuit_state"), m.get("circuit_state"))),
                rate_budget=budget,
                spool=_integer(
                    _first(h.get("spool_depth"), m.get("spool_depth"), m.get("spooled"))
                ),
                queue=_integer(_first(h.get("queue_depth"), m.get("queue_depth"))),
                symbols=len(held.get(name, ())) if assignments is not None else None,
                last_error=_text(h.get("last_error")),
            )
        )
    failover = health.get("failover")
    in_failover = (
        _integer(failover.get("symbols_in_failover")) if isinstance(failover, dict) else None
    )
    return FleetView(
        api=api,
        overall=str(health.get("status") or "unknown"),
        timestamp=_text(health.get("timestamp")),
        components=components,
        providers=rows,
        symbols_in_failover=in_failover,
    )


# ---------------------------------------------------------------- reading the API


def _get(url: str) -> Any:
    """The JSON body of a GET; an HTTP error's JSON body too (/health answers 503 with its
    whole document when the fleet is unhealthy)."""
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as resp:
            return orjson.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return orjson.loads(exc.read())


def read_view(api: str) -> FleetView:
    """The fleet as the API at ``api`` reports it; ApiUnreachable if /health fails."""
    base = api.rstrip("/")
    try:
        health = _get(f"{base}/health")
    except (OSError, orjson.JSONDecodeError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise ApiUnreachable(f"cannot reach the API at {api}: {reason}") from None
    if not isinstance(health, dict) or "providers" not in health:
        raise ApiUnreachable(f"{base}/health did not answer with a status document")
    optional: list[Any] = []
    for path in ("/metrics", "/api/v1/assignments"):
        try:
            optional.append(_get(base + path))
        except (OSError, orjson.JSONDecodeError):
            optional.append(None)
    metrics, assignments = optional
    return fleet_view(
        api,
        health,
        metrics if isinstance(metrics, dict) else None,
        assignments if isinstance(assignments, list) else None,
    )


def default_api_url(env: dict[str, str] | os._Environ[str] = os.environ) -> str:
    """From FEEDFLEET_API_HOST / FEEDFLEET_API_PORT (``var/env`` has the running fleet's),
    as the API itself reads them; a wildcard bind address is reached on loopback."""
    host = env.get("FEEDFLEET_API_HOST") or "127.0.0.1"
    port = env.get("FEEDFLEET_API_PORT") or "8080"
    if host in ("0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


def check_api_url(api: str, given_as: str = "--api") -> str | None:
    """Why ``api`` cannot be used as the API's base URL, or None; ``given_as`` names where
    it came from."""
    try:
        parts = urllib.parse.urlsplit(api)
        port = parts.port  # raises for a port that is not a number in range
    except ValueError as exc:
        return f"{given_as} {api!r} is not a usable URL: {exc}"
    if parts.scheme not in ("http", "https") or not parts.hostname or port == 0:
        return f"{given_as} must be an http:// or https:// URL, not {api!r}"
    return None


# ---------------------------------------------------------------- drawing


def _fmt(value: float | None, digits: int) -> str:
    return DASH if value is None else f"{value:,.{digits}f}"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return DASH
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds // 60:.0f} m {seconds % 60:.0f} s"


def _styled(value: str | None) -> Text:
    if value is None:
        return Text(DASH, style="dim")
    return Text(value, style=STYLES.get(value.lower(), ""))


def _lag_style(age: float | None) -> str:
    if age is not None and age >= LAG_BAD_S:
        return "bold red"
    if age is not None and age >= LAG_WARN_S:
        return "bold yellow"
    return ""


def render(view: FleetView) -> Group:
    header = Text.assemble(
        ("feedfleet ", "bold"), _styled(view.overall),
        f"   {view.api}   {view.timestamp or ''}",
    )  # fmt: skip
    if view.symbols_in_failover:
        header.append(f"   {view.symbols_in_failover} symbols in failover", style="yellow")
    components = Table(title="components", title_justify="left", expand=False)
    for column in ("component", "status", "detail"):
        components.add_column(column)
    for c in view.components:
        components.add_row(c.name, _styled(c.status), Text(c.detail or DASH))
    providers = Table(title="providers", title_justify="left")
    providers.add_column("provider", no_wrap=True)
    providers.add_column("status", no_wrap=True)
    providers.add_column("health")
    for column in ("symbols", "events/s", "p99 ms", "last event", "circuit", "budget",
                   "spool", "queue"):  # fmt: skip
        providers.add_column(
            column, justify="left" if column == "circuit" else "right", no_wrap=True
        )
    providers.add_column("reason / last error", overflow="fold")
    for p in view.providers:
        providers.add_row(
            Text(p.name, style="" if p.enabled else "dim"),
            _styled(p.status),
            _styled(p.health),
            _fmt(p.symbols, 0),
            _fmt(p.events_per_s, 1),
            _fmt(p.p99_ms, 2),
            Text(_age(p.last_event_age_s), style=_lag_style(p.last_event_age_s)),
            _styled(p.circuit),
            p.rate_budget,
            Text(_fmt(p.spool, 0), style="yellow" if p.spool else ""),
            _fmt(p.queue, 0),
            Text(p.reason or p.last_error or ""),  # provider text: never markup
        )
    return Group(header, components, providers)


def _console() -> Console:
    # Piped into a file or another program: wide enough that rows are not folded.
    return Console() if sys.stdout.isatty() else Console(width=200)


def main(api: str | None, watch: bool) -> int:
    given_as = "--api" if api else "FEEDFLEET_API_HOST/FEEDFLEET_API_PORT"
    api = api or default_api_url()
    problem = check_api_url(api, given_as)
    if problem:
        print(f"feedfleet status: {problem}", file=sys.stderr)
        return 2
    console = _console()
    try:
        view = read_view(api)
    except ApiUnreachable as exc:
        print(f"feedfleet status: {exc}", file=sys.stderr)
        return 1
    if not watch:
        console.print(render(view))
        return 0
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a watch ends
        watch_view(api, view, console)
    return 0


def _next_frame(api: str) -> Group | Text:
    try:
        return render(read_view(api))
    except ApiUnreachable as exc:
        # keep watching: the API may be restarting
        stamp = datetime.now().strftime("%H:%M:%S")
        return Text(f"{stamp} {exc}; retrying every {WATCH_INTERVAL_S:g} s", style="red")


def watch_view(api: str, view: FleetView, console: Console) -> None:
    """Redraw every 2 s until interrupted: in place on a terminal, one frame after another
    into a pipe or file (where rich's Live would show only the last)."""
    if not console.is_terminal:
        console.print(render(view))
        while True:
            time.sleep(WATCH_INTERVAL_S)
            console.rule()
            console.print(_next_frame(api))
    with Live(render(view), console=console, auto_refresh=False) as live:
        while True:
            time.sleep(WATCH_INTERVAL_S)
            live.update(_next_frame(api), refresh=True)
