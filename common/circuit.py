"""Circuit breaker for a provider connection.

CLOSED: attempts go through. After ``failure_threshold`` consecutive failures it OPENs for
``open_s``; then one HALF_OPEN attempt decides. The worker mirrors the state to Redis
``circuit:{provider}`` (TTL 300 s) for operators; the coordinator does not read it yet
(failover to another provider is not built).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any


class CircuitState(enum.StrEnum):
    CLOSED = "CLOSED"
    OPEN = "OPEN"
    HALF_OPEN = "HALF_OPEN"


@dataclass
class CircuitBreaker:
    failure_threshold: int = 5
    open_s: float = 30.0
    clock: Any = field(default=time.monotonic, repr=False)
    failures: int = 0
    opened_at: float | None = None

    @property
    def state(self) -> CircuitState:
        if self.opened_at is None:
            return CircuitState.CLOSED
        if self.clock() - self.opened_at >= self.open_s:
            return CircuitState.HALF_OPEN
        return CircuitState.OPEN

    def wait_s(self) -> float:
        """Seconds before an attempt is allowed (0.0 when CLOSED or HALF_OPEN)."""
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.open_s - (self.clock() - self.opened_at))

    def record_success(self) -> None:
        self.failures = 0
        self.opened_at = None

    def record_failure(self) -> None:
        self.failures += 1
        if self.state is CircuitState.HALF_OPEN or self.failures >= self.failure_threshold:
            self.opened_at = self.clock()
