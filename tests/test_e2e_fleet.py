"""The fleet under supervisord, from nothing: embedded services, simulators, workers,
coordinator and api, as `make run` starts them; its status page in headless Chromium
(tests/browser.py) and `feedfleet status`, on the same run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest

from common.embedded import free_port
from tests.browser import HeadlessPage, chromium_path

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
DEMO = ("polygon", "refinitiv", "alphavantage", "iex", "fix", "bloomberg")
# A provider row named in markup: the page must show it as text and run none of it.
MARKUP_NAME = '<img src=x onerror="window.__xss=1">'
# Each provider row of the status page as shown: name -> [status, instances · hosts].
PAGE_ROWS = (
    "Object.fromEntries([...document.querySelectorAll('#providers tbody tr[data-provider]')]"
    ".map(r => [r.dataset.provider, [r.querySelector('.c-status').textContent,"
    " r.querySelector('.c-instances').textContent]]))"
)
SCREENSHOT_COPY = Path("/tmp/feedfleet-status-page.png")


def _page_shows(rows_test: str) -> str:
    """A page expression: the provider rows when ``rows_test`` (JS over ``rows``) holds."""
    return f"(() => {{ const rows = {PAGE_ROWS}; return ({rows_test}) ? rows : null; }})()"


def _get_json(url: str) -> dict[str, Any] | None:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            doc: dict[str, Any] = orjson.loads(resp.read())
            return doc
    except urllib.error.HTTPError as exc:
        doc = orjson.loads(exc.read())
        return doc
    except OSError:
        return None


def _wait(predicate: Any, timeout: float, what: str, proc: subprocess.Popen[bytes]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        assert proc.poll() is None, f"feedfleet run exited early while waiting for {what}"
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_fleet_comes_up_and_a_stopped_worker_shows_disconnected(tmp_path: Path) -> None:
    chromium_path()  # fails now, saying how to install it, rather than after the fleet
    var = tmp_path / "var"
    api_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEEDFLEET_")}
    env["FEEDFLEET_API_PORT"] = str(api_port)
    log = open(tmp_path / "run.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "run", "--var", str(var)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    health_url = f"http://127.0.0.1:{api_port}/health"
    # As README and deploy/runbook.md write it: the venv's feedfleet, naming the state dir.
    ctl = [str(Path(sys.executable).parent / "feedfleet"), "ctl", "--var", str(var)]
    page: HeadlessPage | None = None
    try:

        def polygon_flowing() -> dict[str, Any] | None:
            doc = _get_json(health_url)
            poly = (doc or {}).get("providers", {}).get("polygon")
            if poly and poly["status"] == "CONNECTED" and poly["throughput_per_sec"] > 0:
                return doc
            return None

        doc = _wait(polygon_flowing, 120, "polygon CONNECTED with throughput", proc)
        components = doc["components"]
        assert components["database"]["status"] == components["redis"]["status"] == "up", doc
        # var/env, sourced in another shell, reaches this fleet's database.
        env_file = var / "env"
        assert env_file.stat().st_mode & 0o777 == 0o600
        sourced = subprocess.run(
            ["bash", "-c", f"source {env_file} && echo $FEEDFLEET_DATABASE_URL"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.strip()  # fmt: skip
        with psycopg.connect(sourced) as conn:
            names = {r[0] for r in conn.execute("SELECT name FROM providers").fetchall()}
        assert {"polygon", "refinitiv", "alphavantage", "iex", "fix", "bloomberg"} <= names

        def all_connected() -> dict[str, Any] | None:
            doc = _get_json(health_url) or {}
            providers = doc.get("providers", {})
            wanted = ("polygon", "refinitiv", "alphavantage", "iex", "fix", "bloomberg")
            ok = all(providers.get(n, {}).get("status") == "CONNECTED" for n in wanted)
            return doc if ok else None

        _wait(all_connected, 60, "every demo provider CONNECTED", proc)

        def every_provider_reached_every_sink() -> bool:
            doc = _get_json(f"http://127.0.0.1:{api_port}/metrics") or {}
            providers = doc.get("providers", {})
            durable = len(providers) == 6 and all(
                (m or {}).get(k, 0) > 0
                for m in providers.values()
                for k in ("received", "published", "stored")
            )
            # latest:{symbol} has one writer, the highest-priority provider serving the
            # symbol: Polygon for the tickers the demo rows share, Refinitiv for its RICs.
            return durable and all(
                (providers[n] or {}).get("cached", 0) > 0 for n in ("polygon", "refinitiv")
            )

        _wait(every_provider_reached_every_sink, 60, "events from each provider in all sinks", proc)

        # The status page in headless Chromium, on this same fleet.
        with psycopg.connect(sourced) as conn:
            conn.execute(
                "INSERT INTO providers (name, provider_type, enabled) "
                "VALUES (%s, 'polygon', false)",
                (MARKUP_NAME,),
            )
        page = HeadlessPage(f"http://127.0.0.1:{api_port}/", tmp_path).start()
        wanted = orjson.dumps([*DEMO, MARKUP_NAME]).decode()
        rows = page.wait_for(
            _page_shows(
                f"{wanted}.every(n => n in rows) && "
                f"{orjson.dumps(DEMO).decode()}.every(n => rows[n][0] === 'CONNECTED') && "
                "rows.polygon[1].startsWith('1 · ')"  # one live instance, and its host
            ),
            30, "every demo provider CONNECTED, polygon's instance and the markup-named row",
        )  # fmt: skip
        assert rows[MARKUP_NAME][0] == "DISCONNECTED", rows  # disabled
        assert page.evaluate(
            "window.__xss === undefined && !document.querySelector('#providers img')"
        ), "a provider's name was parsed as markup"
        page.evaluate("window.loadedBeforeStop = true")  # a reload would forget it
        polls_before = int(page.evaluate("document.body.dataset.polls"))

        # Only the fleet's user may open supervisord's socket.
        assert (var / "supervisor.sock").stat().st_mode & 0o777 == 0o700
        out = subprocess.run([*ctl, "status"], capture_output=True, timeout=60, env=env)
        polygon = [line for line in out.stdout.splitlines() if line.startswith(b"worker:polygon ")]
        assert len(polygon) == 1 and b"RUNNING" in polygon[0], out
        out = subprocess.run(
            [*ctl, "stop", "worker:polygon"], capture_output=True, timeout=60, env=env
        )
        assert b"stopped" in out.stdout, out
        # the page sees it by itself, without a reload
        rows = page.wait_for(
            _page_shows("rows.polygon[0] === 'DISCONNECTED' && rows.polygon[1] === 'none live'"),
            10, "polygon DISCONNECTED with no live instance",
        )  # fmt: skip
        assert rows["refinitiv"][0] == "CONNECTED", rows
        assert page.evaluate("window.loadedBeforeStop === true"), "the page was reloaded"
        assert int(page.evaluate("document.body.dataset.polls")) > polls_before
        screenshot = page.screenshot(var / "status-page.png")
        shutil.copyfile(screenshot, SCREENSHOT_COPY)
        print(f"status page screenshot: {screenshot} (copied to {SCREENSHOT_COPY})")
        page.close()

        # `feedfleet status` in another shell that sourced var/env: the same picture.
        status = subprocess.run(
            ["bash", "-c", f"source {env_file} && {Path(sys.executable).parent}/feedfleet status"],
            capture_output=True, text=True, timeout=60, env=env,
        )  # fmt: skip
        assert status.returncode == 0, status
        first_cells = {line.split("│")[1].strip(): line for line in status.stdout.splitlines()
                       if line.startswith("│")}  # fmt: skip
        shown = {n: line for n, line in first_cells.items() if n in DEMO}
        assert sorted(shown) == sorted(DEMO), status.stdout
        assert "DISCONNECTED" in shown["polygon"].split(), shown
        assert "CONNECTED" in shown["refinitiv"].split(), shown

        def polygon_disconnected() -> dict[str, Any] | None:
            doc = _get_json(health_url) or {}
            poly: dict[str, Any] = doc.get("providers", {}).get("polygon", {})
            return poly if poly.get("status") == "DISCONNECTED" else None

        poly = _wait(polygon_disconnected, 60, "polygon DISCONNECTED", proc)
        # The stopped worker's own last report says so; a report left to expire (after 30 s)
        # would be replaced by one the API makes up, which counts nothing.
        assert poly["messages_received"] > 0, poly
        assert poly["throughput_per_sec"] == 0, poly  # stopped: not its last second's rate
        assert (poly["health"], poly["reason"]) == ("down", "worker stopped"), poly
        metrics = _get_json(f"http://127.0.0.1:{api_port}/metrics") or {}
        poly = metrics["providers"]["polygon"]
        # A clean stop drains: everything received was published and stored.
        assert poly["received"] > 0
        assert poly["received"] == poly["published"] == poly["stored"]
    finally:
        if page is not None:
            page.close()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        finally:
            log.close()
    assert proc.returncode == 0, (tmp_path / "run.log").read_text()[-3000:]
    # Ctrl-C stopped the embedded PostgreSQL too.
    assert not (var / "pg" / "postmaster.pid").exists()
