"""Stopping the worker's tasks: a lost cancel does not keep a task running."""

from __future__ import annotations

import asyncio
import contextlib

from workers.worker import stop_tasks


async def test_a_task_that_loses_a_cancel_is_cancelled_again() -> None:
    swallowed = 0

    async def loses_first_cancel() -> None:
        nonlocal swallowed
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            swallowed += 1  # as asyncio.wait_for on 3.11 can, when its wait completes too
        await asyncio.sleep(3600)

    task = asyncio.create_task(loses_first_cancel(), name="lossy")
    await asyncio.sleep(0.01)
    assert await stop_tasks([task], timeout_s=5.0) == []
    assert swallowed == 1
    assert task.cancelled()


async def test_a_task_that_never_stops_is_named_and_left_behind() -> None:
    release = False

    async def stubborn() -> None:
        while not release:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(3600)

    async def polite() -> None:
        await asyncio.sleep(3600)

    tasks = [
        asyncio.create_task(stubborn(), name="stubborn"),
        asyncio.create_task(polite(), name="polite"),
    ]
    await asyncio.sleep(0.01)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await stop_tasks(tasks, timeout_s=1.0) == ["stubborn"]
    assert loop.time() - started < 3.0
    assert tasks[1].cancelled()
    release = True
    tasks[0].cancel()
    await tasks[0]
