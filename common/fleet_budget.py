"""A provider's per-minute request budget, shared by all its worker instances.

The coordinator spreads one provider's symbols over several instances and hosts, all on
one API key: a limit kept in each process would let N instances make N times the key's
budget. The count lives in Redis, under the seed's ``ratelimit:{provider}:{minute}`` (TTL
60 s), taken with one atomic script; each instance takes a few tokens at a time into a
small local bucket, so most requests do not wait on Redis.

A provider's "slow down" (HTTP 429 with ``Retry-After``, Alpha Vantage's throttle texts)
reaches every instance: ``hold`` sets ``ratelimit:{provider}:hold`` for that long and no
instance takes tokens until it expires.

With Redis down, each instance falls back to its share of the budget: the budget divided
by the provider's live instances (the worker tells it how many there are), counted per
minute in process. Nothing waits on Redis for longer than ``redis_timeout_s``.

A cancel of the task asking (a poller being stopped) always ends it, also when it comes
as a command has just been written to Redis; see ``FleetBudget._ask``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from common.redis_keys import RATELIMIT_TTL_S, ratelimit_key

log = structlog.get_logger()

T = TypeVar("T")

# KEYS[1] the window's counter, KEYS[2] the hold; ARGV: wanted, budget, ttl.
# Returns {granted, hold_ms}: tokens taken (0 when the window is spent or on hold).
_TAKE = """
local hold = redis.call('PTTL', KEYS[2])
if hold > 0 then return {0, hold} end
local wanted = tonumber(ARGV[1])
local used = redis.call('INCRBY', KEYS[1], wanted)
if used == wanted then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
local over = used - tonumber(ARGV[2])
if over > 0 then
    local back = math.min(over, wanted)
    redis.call('DECRBY', KEYS[1], back)
    return {wanted - back, 0}
end
return {wanted, 0}
"""


class FleetBudget:
    """``acquire`` before each request; ``hold`` when the provider says to slow down."""

    def __init__(
        self,
        redis: aioredis.Redis,
        provider: str,
        per_window: int,
        instances: Callable[[], int] = lambda: 1,
        *,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.time,
        redis_timeout_s: float = 0.5,
    ) -> None:
        if per_window < 1:
            raise ValueError(
                f"a shared budget needs at least 1 request per window, not {per_window}"
            )
        self.redis = redis
        self.provider = provider
        self.per_window = per_window
        self.instances = instances
        self.window_s = window_s
        self.clock = clock
        self.redis_timeout_s = redis_timeout_s
        # A second's worth of the budget at a time (at least one): few trips to Redis, and
        # little left unused in a bucket when the window ends.
        self.chunk = max(1, int(per_window * 1.0 / window_s))
        self._script = redis.register_script(_TAKE)
        self._window = -1
        self._local = 0  # tokens taken from Redis, not yet used, in this window
        self._fallback_used = 0  # requests made in this window while Redis was down
        self.fallbacks = 0  # windows in which Redis could not be reached

    def _enter(self, window: int) -> None:
        if window != self._window:
            self._window = window
            self._local = 0
            self._fallback_used = 0

    def _until_next_window(self, now: float) -> float:
        return (self._window + 1) * self.window_s - now + 0.001

    async def acquire(self) -> None:
        """Wait until one more request fits the provider's budget."""
        while True:
            now = self.clock()
            self._enter(int(now // self.window_s))
            if self._local > 0:
                self._local -= 1
                return
            try:
                granted, hold_ms = await self._ask(
                    self._script(
                        keys=[ratelimit_key(self.provider, self._window), self._hold_key()],
                        args=[self.chunk, self.per_window, RATELIMIT_TTL_S],
                    )
                )
            except (RedisError, OSError, TimeoutError) as exc:
                if self._fallback_used < self._share():
                    if self._fallback_used == 0:
                        self.fallbacks += 1
                        log.warning("rate_budget_fallback", provider=self.provider,
                                    share=self._share(), error=str(exc))  # fmt: skip
                    self._fallback_used += 1
                    return
                await asyncio.sleep(self._until_next_window(now))
                continue
            if granted > 0:
                self._local = int(granted) - 1
                return
            wait = int(hold_ms) / 1000 if hold_ms else self._until_next_window(now)
            await asyncio.sleep(wait)

    async def _ask(self, command: Awaitable[T]) -> T:
        """The Redis ``command``'s answer, waited for at most ``redis_timeout_s``.

        The command runs in a task of its own, awaited through ``shield``, so that a cancel
        of ours never passes through redis-py. redis-py (8.1) writes each command inside
        ``asyncio.wait_for`` when the client has a socket timeout (5 s by default), and on
        Python 3.11 ``wait_for`` returns the result and drops the cancel when it arrives
        after the write finished but before ``wait_for`` resumed (CPython gh-86296, fixed
        in 3.12). A poller stopped at that moment went on polling, and whoever awaited its
        end waited for ever. The command is cancelled when we stop waiting for it; it may
        still complete, its answer unread (tokens it took are lost to this window).
        """
        request = asyncio.ensure_future(command)
        try:
            async with asyncio.timeout(self.redis_timeout_s):
                return await asyncio.shield(request)
        finally:
            request.cancel()  # nothing when it has completed

    def _share(self) -> int:
        """This instance's part of the budget while Redis cannot be asked."""
        return max(1, self.per_window // max(1, self.instances()))

    def _hold_key(self) -> str:
        return f"ratelimit:{self.provider}:hold"

    async def hold(self, seconds: float) -> None:
        """The provider asked to slow down: no instance takes tokens for ``seconds``."""
        self._local = 0
        if seconds <= 0:
            return
        try:
            await self._ask(self.redis.set(self._hold_key(), 1, px=max(1, int(seconds * 1000))))
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("rate_budget_hold_not_shared", provider=self.provider, error=str(exc))
