"""The faults a chaos run injects into the running fleet, and the order it injects them in.

Each fault acts on a real process: a worker or the active coordinator is killed with
SIGKILL (found as ``supervisorctl pid`` finds it), a simulator is stopped (its port then
refuses connections) or told through its faults file to go silent with its socket open or
to drop its connection and refuse the login that follows; the broker and PostgreSQL are
stopped for ``HOLD_S`` and started again. Faults with a hold are cleared after it; kills
clear themselves (supervisord starts the process again).
"""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import dataclass

from chaos.fleet import PRIMARY, ChaosFleet
from chaos.observe import DbWatcher, TopicWatcher

HOLD_S = 10.0


@dataclass(frozen=True)
class FaultKind:
    name: str
    hold_s: float  # 0: a kill, nothing to clear
    what: str


KINDS = {
    k.name: k
    for k in (
        FaultKind("provider_down", HOLD_S, "the primary's simulator stopped: connection refused"),
        FaultKind("worker_kill", 0.0, "kill -9 of the primary's worker"),
        FaultKind("silent", HOLD_S, "the primary's simulator silent, its socket left open"),
        FaultKind("refuse_auth", HOLD_S, "the primary drops the connection, then refuses login"),
        FaultKind("coordinator_kill", 0.0, "kill -9 of the active coordinator"),
        FaultKind("broker_stop", HOLD_S, "the Pulsar broker stopped"),
        FaultKind("postgres_stop", HOLD_S, "PostgreSQL stopped"),
    )
}
QUICK = ("provider_down", "worker_kill", "silent", "coordinator_kill")
# Faults after which a hand-over from the primary is expected, by target kind.
DISCONNECTS = ("provider_down", "worker_kill", "refuse_auth")


def schedule(total_s: float, kinds: tuple[str, ...], min_slot_s: float) -> list[str]:
    """Every kind once, then again from the start while slots of ``min_slot_s`` fit."""
    slots = max(len(kinds), int(total_s // min_slot_s))
    return [kinds[i % len(kinds)] for i in range(slots)]


class Injector:
    def __init__(self, fleet: ChaosFleet, topic: TopicWatcher, database: DbWatcher) -> None:
        self.fleet = fleet
        self.topic = topic
        self.database = database

    async def inject(self, kind: str) -> str:
        """Start the fault; the name of what it hit."""
        fleet = self.fleet
        sim = f"simulator:{PRIMARY.name}-sim"
        if kind == "provider_down":
            await asyncio.to_thread(fleet.stop_program, sim)
            return sim
        if kind == "worker_kill":
            name = f"worker:{PRIMARY.name}"
            pid = await asyncio.to_thread(fleet.kill9, name)
            return f"{name} (pid {pid})"
        if kind == "silent":
            fleet.set_faults(PRIMARY.name, "silent_after=1")
            return sim
        if kind == "refuse_auth":
            fleet.set_faults(PRIMARY.name, "refuse_auth,drop_after=1")
            return sim
        if kind == "coordinator_kill":
            return await self._kill_coordinator()
        if kind == "broker_stop":
            # Our consumer would only spin on a dead connection; it resubscribes after.
            await asyncio.to_thread(self.topic.close)
            await asyncio.to_thread(fleet.stop_program, "broker")
            return "broker"
        if kind == "postgres_stop":
            await asyncio.to_thread(fleet.stop_postgres)
            return "postgresql"
        raise ValueError(f"unknown fault {kind!r}")

    async def clear(self, kind: str) -> None:
        fleet = self.fleet
        if kind == "provider_down":
            await asyncio.to_thread(fleet.start_program, f"simulator:{PRIMARY.name}-sim")
        elif kind in ("silent", "refuse_auth"):
            fleet.set_faults(PRIMARY.name, "")
        elif kind == "broker_stop":
            await asyncio.to_thread(fleet.start_program, "broker")
            await asyncio.to_thread(fleet.wait_for_broker)
            await asyncio.to_thread(self.topic.open)
        elif kind == "postgres_stop":
            await asyncio.to_thread(fleet.start_postgres)

    async def _kill_coordinator(self) -> str:
        holders = self.database.seen.lock_holders
        backend = holders[-1][1] if holders else None
        fleet = self.fleet
        name = fleet.coordinator_with_backend(backend) if backend is not None else None
        if name is None:
            # The lock holder is not known yet: any running one is the active one or
            # its stand-by, and the first started is the likelier holder.
            name = fleet.coordinator_names()[0]
        pid = await asyncio.to_thread(fleet.pid, name)
        if pid:
            os.kill(pid, signal.SIGKILL)
        return f"{name} (pid {pid})"
