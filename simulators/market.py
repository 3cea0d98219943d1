"""What every provider simulator shares: a price model, pacing and fault settings."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field, fields

DEMO_SYMBOLS = [
    "AAPL",
    "MSFT",
    "AMZN",
    "GOOGL",
    "META",
    "NVDA",
    "TSLA",
    "JPM",
    "V",
    "JNJ",
    "WMT",
    "PG",
    "XOM",
    "MA",
    "HD",
    "CVX",
    "KO",
    "PEP",
    "BAC",
    "ABBV",
]


def symbol_universe(count: int) -> list[str]:
    """The demo tickers first, then synthetic ones (``SYM0021``...) up to ``count``."""
    names = list(DEMO_SYMBOLS[:count])
    names.extend(f"SYM{i:04d}" for i in range(len(names) + 1, count + 1))
    return names


@dataclass(slots=True)
class SymbolState:
    symbol: str
    price: float
    sequence: int = 0
    trade_id: int = 0


class PriceWalk:
    """A geometric random walk per symbol with a spread of a few basis points.

    Prices are rounded to the cent, bid < ask always; seeded, so runs repeat.
    """

    def __init__(self, symbols: list[str], seed: int = 7) -> None:
        self._rng = random.Random(seed)
        self.states = {s: SymbolState(s, round(self._rng.uniform(20.0, 500.0), 2)) for s in symbols}

    def step(self, symbol: str) -> SymbolState:
        st = self.states[symbol]
        st.price = max(0.01, round(st.price * (1.0 + self._rng.gauss(0.0, 0.0004)), 2))
        st.sequence += 1
        return st

    def trade(self, symbol: str) -> tuple[SymbolState, float, int]:
        st = self.step(symbol)
        st.trade_id += 1
        return st, st.price, self._rng.choice((1, 10, 50, 100, 100, 200, 300, 500))

    def quote(self, symbol: str) -> tuple[SymbolState, float, float, int, int]:
        st = self.step(symbol)
        half = max(0.01, round(st.price * 0.0002, 2))
        bid, ask = round(st.price - half, 2), round(st.price + half, 2)
        return st, bid, ask, self._rng.randint(1, 20), self._rng.randint(1, 20)

    def choice(self, seq: list[str]) -> str:
        return self._rng.choice(seq)


@dataclass(slots=True)
class Faults:
    """Misbehaviour a simulator can be told to show, e.g. ``"refuse_auth,drop_after=500"``.

    Counts are events sent on one connection; 0 or absent means never.
    """

    refuse_auth: bool = False
    drop_after: int = 0
    silent_after: int = 0
    malformed_every: int = 0
    skip_seq_every: int = 0
    rate_limit: bool = False
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str) -> Faults:
        faults = cls()
        known = {f.name for f in fields(cls)} - {"extra"}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, _, value = part.partition("=")
            if name not in known:
                raise ValueError(f"unknown fault {name!r}; known: {sorted(known)}")
            if name in ("refuse_auth", "rate_limit"):
                setattr(faults, name, value.lower() not in ("0", "false", "no"))
            else:
                setattr(faults, name, int(value))
        return faults


class Pacer:
    """Lets a sender keep an average rate (events/s) with sleeps of about a millisecond."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._start = time.monotonic()
        self._sent = 0

    async def wait_for(self, events: int) -> None:
        """Sleep until ``events`` more may be sent at the configured rate."""
        if self.rate <= 0:
            await asyncio.sleep(0)
            return
        self._sent += events
        due = self._start + self._sent / self.rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -1.0:
            # Too far behind (the process was stalled): forget the debt instead of bursting.
            self._start = time.monotonic()
            self._sent = 0
        else:
            await asyncio.sleep(0)
