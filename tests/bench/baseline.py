"""The baseline: aiohttp WebSocket receive + orjson parse against a Polygon source, with no
normalization and no sinks: what one Python process can take in at all, for scale."""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any

import aiohttp
import orjson

from common.codecs import polygon as codec
from common.model import DataType
from tests.bench.options import Windows
from tests.bench.processes import stop
from tests.bench.procstat import cpu_seconds


async def receive_only(
    port: int, symbols: list[str], windows: Windows, source: subprocess.Popen[bytes]
) -> dict[str, Any]:
    """Events/s received from ``source`` (listening on ``port``) over the baseline window,
    after the warm-up, and the CPU cores this process and the source kept busy; the source
    is stopped on the way out."""
    pids = {"client": os.getpid(), "source": source.pid}
    loads = orjson.loads
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(
                f"ws://127.0.0.1:{port}/stocks", heartbeat=10.0, max_msg_size=16 * 1024 * 1024,
            ) as ws,
        ):  # fmt: skip
            await ws.receive(timeout=10)  # connected
            await ws.send_str(codec.encode_auth("bench-key"))
            await ws.receive(timeout=10)  # auth_success
            channels = [
                c for s in symbols for c in codec.channels_for(s, (DataType.TRADE, DataType.QUOTE))
            ]  # fmt: skip
            for start in range(0, len(channels), 500):
                await ws.send_str(codec.encode_subscribe(channels[start : start + 500]))
            events = 0
            begin_at = time.monotonic() + windows.warmup_s
            end_at = begin_at + windows.baseline_s
            t0: float | None = None
            count0 = 0
            cpu0: dict[str, float] = {}
            while True:
                msg = await ws.receive()
                if msg.type is not aiohttp.WSMsgType.BINARY and (
                    msg.type is not aiohttp.WSMsgType.TEXT
                ):
                    raise RuntimeError(f"baseline: websocket {msg.type.name}")
                items = loads(msg.data)
                if items and items[0].get("ev") != "status":
                    events += len(items)
                now = time.monotonic()
                if t0 is None:
                    if now >= begin_at:
                        t0, count0 = now, events
                        cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
                elif now >= end_at:
                    elapsed = now - t0
                    cores = {
                        k: round((cpu_seconds(p) - cpu0[k]) / elapsed, 3) for k, p in pids.items()
                    }
                    return {"events_per_s": round((events - count0) / elapsed, 1),
                            "cpu_cores": cores}  # fmt: skip
    finally:
        stop(source, 5)
