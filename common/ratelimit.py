"""Request rate limiting from a provider row's ``rate_limits``.

``rate_limits`` keys (all optional): ``requests_per_second``, ``requests_per_minute``,
``requests_per_day``. The limiter is a token bucket per window, in process. The per-minute
budget is also the provider's as a whole: ``common.fleet_budget`` shares it between the
provider's instances through Redis ``ratelimit:{provider}:{minute}``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class TokenBucket:
    capacity: float
    refill_per_s: float
    tokens: float
    updated: float

    def take(self, now: float) -> float:
        """Take one token; return 0.0, or the seconds to wait before one is there."""
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.refill_per_s)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.refill_per_s


class RateLimiter:
    """Waits as long as the tightest configured window demands."""

    WINDOWS = {"requests_per_second": 1.0, "requests_per_minute": 60.0, "requests_per_day": 86400.0}

    def __init__(self, rate_limits: dict[str, Any], clock: Any = time.monotonic) -> None:
        self._clock = clock
        now = clock()
        self.buckets: list[TokenBucket] = []
        for key, window in self.WINDOWS.items():
            value = rate_limits.get(key)
            if value is None:
                continue
            limit = float(value)
            if limit <= 0:
                raise ValueError(f"rate_limits.{key} must be positive, got {value!r}")
            self.buckets.append(TokenBucket(limit, limit / window, limit, now))
        self.requests = 0

    def delay(self) -> float:
        """Seconds until the next request may go (0.0 if now); does not take a token."""
        now = self._clock()
        waits = []
        for b in self.buckets:
            tokens = min(b.capacity, b.tokens + (now - b.updated) * b.refill_per_s)
            waits.append(0.0 if tokens >= 1.0 else (1.0 - tokens) / b.refill_per_s)
        return max(waits, default=0.0)

    async def acquire(self) -> None:
        while True:
            wait = self.delay()
            if wait <= 0:
                now = self._clock()
                for b in self.buckets:
                    b.take(now)
                self.requests += 1
                return
            await asyncio.sleep(wait)
