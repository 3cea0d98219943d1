"""``MetricsEndpoint``: a worker's own Prometheus exposition, so a scrape needs no API.

``GET /metrics`` on the worker's metrics port (``FEEDFLEET_METRICS_PORT``, or
``feedfleet worker NAME --metrics-port N``; host ``FEEDFLEET_METRICS_HOST``, 127.0.0.1 by
default) answers with ``StatusReporter``'s status document as of the scrape, through
``common/prometheus.py``: the same series the API's ``/metrics/prometheus`` has for this
provider, without the Redis round trip. OpenMetrics when the Accept header asks for it.

A port that cannot be bound (taken, not allowed) is logged and tried again every few
seconds: the worker goes on ingesting either way.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Any

import structlog
from aiohttp import web

from common.prometheus import StatusCollector, render
from workers.status import StatusReporter

log = structlog.get_logger("feedfleet.metrics_endpoint")

BIND_RETRY_S = 5.0


class MetricsEndpoint:
    def __init__(
        self, reporter: StatusReporter, host: str, port: int, retry_s: float = BIND_RETRY_S
    ) -> None:
        self.reporter = reporter
        self.host = host
        self.port = port  # 0: any free port; ``port`` is the bound one once listening
        self.retry_s = retry_s
        self.collector = StatusCollector(self.documents)
        self._runner: web.AppRunner | None = None

    def documents(self) -> list[dict[str, Any]]:
        """This worker's status document as it would publish it now."""
        reporter = self.reporter
        doc = asdict(reporter.provider_status()) | {"metrics": reporter.metrics()}
        return [doc | {"enabled": reporter.session.provider.enabled}]

    async def _metrics(self, request: web.Request) -> web.Response:
        body, content_type = render(self.collector, request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def run(self) -> None:
        """Listen (retrying a port that cannot be bound), then serve until cancelled."""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self._runner = runner
        logged = False
        while True:
            try:
                site = web.TCPSite(runner, self.host, self.port)
                await site.start()
                break
            except OSError as exc:
                if not logged:
                    log.error("metrics_port_unavailable", host=self.host, port=self.port,
                              error=str(exc), retry_s=self.retry_s)  # fmt: skip
                    logged = True
                await asyncio.sleep(self.retry_s)
        self.port = runner.addresses[0][1]
        log.info("metrics_listening", host=self.host, port=self.port)
        await asyncio.Event().wait()

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
