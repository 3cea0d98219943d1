"""A headless Chromium tab driven over the DevTools protocol, for the status page's test.

Debian's ``/usr/bin/chromium`` (``make browser`` installs it) runs headless with a
remote-debugging port; JavaScript is evaluated in the live page through aiohttp's
websocket client, so a test sees what the page shows as it updates itself, without a
reload, and takes screenshots of it. Without Chromium the test fails and says how to
install it: a skipped browser test would pass for a page nobody looked at.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

CHROMIUM = Path(os.environ.get("FEEDFLEET_CHROMIUM", "/usr/bin/chromium"))
START_TIMEOUT_S = 60.0
CALL_TIMEOUT_S = 30.0


class JavaScriptError(AssertionError):
    """An expression evaluated in the page raised."""


def chromium_path() -> Path:
    """The Chromium binary; AssertionError saying how to install it when it is missing."""
    if not os.access(CHROMIUM, os.X_OK):
        raise AssertionError(
            f"Chromium not found at {CHROMIUM}: the status page test needs it. "
            "`make browser` (part of `make test`) installs Debian's package: "
            "apt-get update && apt-get install -y chromium"
        )
    return CHROMIUM


class HeadlessPage:
    """One tab of a headless Chromium showing ``url``. Synchronous methods (the fleet test
    is synchronous) over an event loop of its own; use it as a context manager."""

    def __init__(self, url: str, work_dir: Path, *, window: tuple[int, int] = (1400, 900)) -> None:
        self.url = url
        self.work_dir = work_dir
        self.window = window
        self.log_path = work_dir / "chromium.log"
        self._loop = asyncio.new_event_loop()
        self._ids = itertools.count(1)
        self._proc: subprocess.Popen[bytes] | None = None
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None

    def __enter__(self) -> HeadlessPage:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        self.close()

    # ------------------------------------------------------------ lifecycle

    def start(self) -> HeadlessPage:
        """Chromium up, showing the page, and connected to; ``close()`` ends it."""
        try:
            self._launch()
        except BaseException:
            self.close()
            raise
        return self

    def _launch(self) -> None:
        profile = self.work_dir / "chromium-profile"
        profile.mkdir(parents=True, exist_ok=True)
        active_port_file = profile / "DevToolsActivePort"
        active_port_file.unlink(missing_ok=True)  # a previous run's port
        width, height = self.window
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                [str(chromium_path()), "--headless", "--no-sandbox", "--disable-gpu",
                 "--remote-debugging-port=0", f"--user-data-dir={profile}",
                 f"--window-size={width},{height}", "--hide-scrollbars", "--no-first-run",
                 "--no-default-browser-check", "--disable-extensions",
                 "--disable-background-networking", "--disable-dev-shm-usage", self.url],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        port = self._devtools_port(active_port_file)
        self._run(self._connect(port), START_TIMEOUT_S)
        # The window's size includes what headless Chromium counts as its frame: make the
        # page's own viewport the size asked for, as the screenshot's.
        self._run(
            self._call(
                "Emulation.setDeviceMetricsOverride",
                {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            ),
            CALL_TIMEOUT_S,
        )

    def _devtools_port(self, active_port_file: Path) -> int:
        """Chromium writes the port it chose (``--remote-debugging-port=0``) to this file."""
        assert self._proc is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise AssertionError(
                    f"chromium exited with {self._proc.returncode}: {self._log_tail()}"
                )
            text = active_port_file.read_text() if active_port_file.exists() else ""
            if text.strip():
                return int(text.split()[0])
            time.sleep(0.1)
        raise AssertionError(f"chromium did not open its DevTools port: {self._log_tail()}")

    async def _connect(self, port: int) -> None:
        self._http = aiohttp.ClientSession()
        while True:  # the tab is listed once it has been created
            async with self._http.get(f"http://127.0.0.1:{port}/json/list") as resp:
                targets = await resp.json()
            pages = [t for t in targets if t.get("type") == "page"]
            if pages:
                break
            await asyncio.sleep(0.1)
        # max_msg_size 0: a screenshot arrives as one message of several MB
        self._ws = await self._http.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)

    def close(self) -> None:
        if self._loop.is_closed():
            return

        async def disconnect() -> None:
            if self._ws is not None:
                await self._ws.close()
            if self._http is not None:
                await self._http.close()

        try:
            self._run(disconnect(), 10)
        finally:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(timeout=10)
            self._loop.close()

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def _run(self, coro: Any, timeout: float) -> Any:
        return self._loop.run_until_complete(asyncio.wait_for(coro, timeout))

    # ------------------------------------------------------------ the protocol

    async def _call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        assert self._ws is not None, "not connected"
        call_id = next(self._ids)
        await self._ws.send_json({"id": call_id, "method": method, "params": params})
        while True:
            msg = await self._ws.receive()
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise AssertionError(f"DevTools connection ended ({msg.type}): {self._log_tail()}")
            reply: dict[str, Any] = msg.json()
            if reply.get("id") != call_id:
                continue  # an event, or a late reply to an earlier call
            if "error" in reply:
                raise AssertionError(f"{method} failed: {reply['error']}")
            result: dict[str, Any] = reply["result"]
            return result

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-like values only)."""
        result = self._run(
            self._call(
                "Runtime.evaluate",
                {"expression": expression, "returnByValue": True, "awaitPromise": True},
            ),
            CALL_TIMEOUT_S,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise JavaScriptError(details.get("exception", {}).get("description") or details)
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float, what: str) -> Any:
        """Evaluate ``expression`` until its value is truthy, and return it. An expression
        that raises (the page still loading) counts as not yet."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except JavaScriptError as exc:
                value = exc
            if value and not isinstance(value, JavaScriptError):
                return value
            time.sleep(0.25)
        raise AssertionError(f"the page did not show {what} within {timeout}s; last: {value!r}")

    def screenshot(self, path: Path) -> Path:
        """A PNG of the window as it is now."""
        result = self._run(self._call("Page.captureScreenshot", {"format": "png"}), CALL_TIMEOUT_S)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(result["data"]))
        return path
