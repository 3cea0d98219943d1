"""Redis ``latest:{symbol}`` cache (TTL 5 s). A cache: failures degrade, never block.

Only the newest event per symbol matters, so events are coalesced in a dict and written
once per symbol per flush (every 100 ms) in one pipeline.
"""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
import structlog

from common.events import Event
from common.redis_keys import LATEST_TTL_S, latest_key

log = structlog.get_logger("feedfleet.redis")


class LatestCache:
    def __init__(self, client: aioredis.Redis, flush_interval_s: float = 0.1) -> None:
        self.client = client
        self.flush_interval_s = flush_interval_s
        self._latest: dict[str, bytes] = {}
        self.written = 0
        self.errors = 0
        self.healthy = True

    def submit(self, events: list[Event]) -> None:
        latest = self._latest
        for e in events:
            latest[e.symbol] = e.payload

    async def flush(self) -> None:
        if not self._latest:
            return
        batch, self._latest = self._latest, {}
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for symbol, payload in batch.items():
                    pipe.set(latest_key(symbol), payload, ex=LATEST_TTL_S)
                await pipe.execute()
        except Exception as exc:
            self.errors += 1
            if self.healthy:
                log.warning("redis_cache_unavailable", error=str(exc))
            self.healthy = False
            return
        self.healthy = True
        self.written += len(batch)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_s)
            await self.flush()
