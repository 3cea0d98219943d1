"""A worker and the coordinator running in the test's event loop, and a polling wait."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from common.config import Settings
from workers.coordinator import Coordinator
from workers.worker import Worker


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@dataclass
class RunningWorker:
    """The real coordinator assigning symbols to the real worker of one provider row."""

    worker: Worker
    coordinator: Coordinator
    worker_task: asyncio.Task[None]
    coordinator_task: asyncio.Task[None]

    @classmethod
    def start(cls, settings: Settings, provider_name: str) -> RunningWorker:
        coordinator = Coordinator(settings, poll_s=0.5)
        worker = Worker(settings, provider_name)
        return cls(
            worker,
            coordinator,
            asyncio.create_task(worker.run(handle_signals=False)),
            asyncio.create_task(coordinator.run(handle_signals=False)),
        )

    @property
    def received(self) -> int:
        pipeline = self.worker.pipeline
        return pipeline.received if pipeline is not None else 0

    async def stop(self) -> None:
        self.worker.stop()
        self.coordinator.stop()
        await asyncio.wait_for(
            asyncio.gather(self.worker_task, self.coordinator_task, return_exceptions=True), 60
        )
