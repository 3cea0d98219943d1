"""Stopping the worker's tasks: a lost cancel does not keep a task running.

Each test runs on an event loop whose clock jumps to the next timer whenever nothing is
ready, so ``stop_tasks``' deadline and its 0.5 s rounds are exact and cost no real time.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine
from typing import Any, TypeVar

from workers.worker import stop_tasks

T = TypeVar("T")


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """Never sleeps: where the loop would wait for its next timer, time moves to it."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        # The loop passes the wait until its next timer to select(); None is no timer at all.
        poll = self._selector.select  # type: ignore[attr-defined]

        def select(timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
            ready: list[tuple[selectors.SelectorKey, int]] = poll(0)
            if not ready:
                if timeout is None:
                    raise RuntimeError("nothing ready and no timer: the test would hang")
                self.now += timeout
            return ready

        self._selector.select = select  # type: ignore[attr-defined]

    def time(self) -> float:
        return self.now


def run(main: Coroutine[Any, Any, T]) -> T:
    loop = VirtualClockLoop()
    try:
        return loop.run_until_complete(main)
    finally:
        loop.close()


def test_a_task_that_loses_a_cancel_is_cancelled_again() -> None:
    async def main() -> None:
        swallowed = 0
        waiting = asyncio.Event()

        async def loses_first_cancel() -> None:
            nonlocal swallowed
            try:
                waiting.set()
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                swallowed += 1  # as asyncio.wait_for on 3.11 can, when its wait completes too
            await asyncio.sleep(3600)

        task = asyncio.create_task(loses_first_cancel(), name="lossy")
        await waiting.wait()
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await stop_tasks([task], timeout_s=5.0) == []
        assert swallowed == 1
        assert task.cancelled()
        # The second round's cancel, after the first round's 0.5 s wait, ended it.
        assert loop.time() - started == 0.5

    run(main())


def test_a_task_that_never_stops_is_named_and_left_behind() -> None:
    async def main() -> None:
        release = False
        cancels = 0
        waiting = asyncio.Event()

        async def stubborn() -> None:
            nonlocal cancels
            while not release:
                try:
                    waiting.set()
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    cancels += 1

        async def polite() -> None:
            await asyncio.sleep(3600)

        tasks = [
            asyncio.create_task(stubborn(), name="stubborn"),
            asyncio.create_task(polite(), name="polite"),
        ]
        await waiting.wait()
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await stop_tasks(tasks, timeout_s=1.0) == ["stubborn"]
        # Two rounds of a cancel and a 0.5 s wait, then the deadline: it gave up there.
        assert cancels == 2
        assert loop.time() - started == 1.0
        assert tasks[1].cancelled()
        release = True
        tasks[0].cancel()
        await tasks[0]

    run(main())
