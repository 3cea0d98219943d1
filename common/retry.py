"""Exponential backoff with full jitter, for reconnects and retried requests."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(slots=True)
class Backoff:
    """``next_delay()`` grows ``base_s * 2**attempt`` up to ``max_s``, jittered; ``reset()``
    after a success. Jitter keeps a fleet of workers from reconnecting in lockstep."""

    base_s: float = 0.2
    max_s: float = 30.0
    attempt: int = 0
    _rng: random.Random = field(default_factory=random.Random, repr=False)

    def next_delay(self) -> float:
        ceiling = min(self.max_s, self.base_s * (2**self.attempt))
        self.attempt += 1
        return self._rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0
