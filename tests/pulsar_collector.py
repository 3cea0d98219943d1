"""A real pulsar-client consumer for tests, counting unique event ids.

The embedded broker can deliver a message twice, and loses messages with the default
receiver queue under load, so the queue is large and events are keyed by event_id.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
import pulsar

from common.config import PulsarAccess
from common.pulsar_client import new_pulsar_client


@dataclass
class ReceivedEvent:
    doc: dict[str, Any]
    key: str
    properties: dict[str, str]
    receive_ns: int


class PulsarCollector:
    def __init__(self, url: str, topic: str) -> None:
        self.client = new_pulsar_client(PulsarAccess.from_env(url), operation_timeout_seconds=10)
        self.consumer = self.client.subscribe(
            topic,
            f"test-{uuid.uuid4().hex[:8]}",
            receiver_queue_size=100_000,
            initial_position=pulsar.InitialPosition.Earliest,
        )
        self.events: dict[str, ReceivedEvent] = {}
        self.deliveries = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.consumer.receive(timeout_millis=200)
            except pulsar.Timeout:
                continue
            except Exception:
                if self._stop.is_set():
                    return
                time.sleep(0.1)
                continue
            doc = orjson.loads(msg.data())
            self.deliveries += 1
            self.events[doc["event_id"]] = ReceivedEvent(
                doc, msg.partition_key(), msg.properties(), time.time_ns()
            )
            self.consumer.acknowledge(msg)

    async def wait_for(self, count: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while len(self.events) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return len(self.events)

    def close(self) -> None:
        if self._stop.is_set():
            return  # already closed (a test's cleanup may close it again)
        self._stop.set()
        self._thread.join(timeout=5)
        self.consumer.close()
        self.client.close()
