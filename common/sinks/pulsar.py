"""Pulsar sink: one message per event, key = symbol, receipts tracked per batch.

pulsar-client is synchronous with its own IO thread. ``send_async`` does not block; its
callback runs on the client's thread, so each batch counts down there and hands the
result to the event loop once (one ``call_soon_threadsafe`` per batch, not per message).
A batch with any failed message is spooled whole: the few that did get through are sent
again, and consumers de-duplicate on ``event_id``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pulsar
import structlog

from common.events import EVENT_TYPE, Event
from common.metrics import LatencyWindow
from common.sinks.base import DurableSink
from common.spool import Spool

log = structlog.get_logger("feedfleet.pulsar")

_OK = pulsar.Result.Ok
_PROPERTIES = {"event_type": EVENT_TYPE}


class _BatchReceipt:
    __slots__ = ("error", "events", "on_done", "remaining")

    def __init__(self, events: list[Event], on_done: Any) -> None:
        self.events = events
        self.remaining = len(events)
        self.error: str | None = None
        self.on_done = on_done

    def callback(self, result: Any, _msg_id: Any) -> None:
        # Runs on the pulsar IO thread; only that one thread calls it, in send order.
        if result != _OK and self.error is None:
            self.error = str(result)
        self.remaining -= 1
        if self.remaining == 0:
            self.on_done(self)


class PulsarSink(DurableSink):
    name = "pulsar"

    def __init__(
        self, url: str, topic: str, spool: Spool, *, producer_name: str | None = None,
        max_pending: int = 100_000, send_timeout_ms: int = 10_000,
    ) -> None:  # fmt: skip
        super().__init__(spool, max_pending=max_pending)
        self.url = url
        self.topic = topic
        self.producer_name = producer_name
        self.send_timeout_ms = send_timeout_ms
        # receive -> receipt, reset every metrics window
        self.latency = LatencyWindow()
        # provider (origin) -> receipt since start, for the benchmark and /metrics
        self.provider_latency = LatencyWindow()
        self._client: pulsar.Client | None = None
        self._producer: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            await self._connect()
        except Exception as exc:
            # The broker may be down at start: everything spools until it is back.
            self._mark_unhealthy(f"connect: {exc}")

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        pulsar_log = logging.getLogger("pulsar")
        pulsar_log.setLevel(logging.WARNING)
        if self._client is None:
            self._client = pulsar.Client(
                self.url, operation_timeout_seconds=10, connection_timeout_ms=5000,
                io_threads=1, logger=pulsar_log,
            )  # fmt: skip
        client = self._client
        self._producer = await loop.run_in_executor(
            None,
            lambda: client.create_producer(
                self.topic,
                producer_name=self.producer_name,
                block_if_queue_full=False,
                max_pending_messages=max(self.max_pending * 2, 1000),
                batching_enabled=True,
                batching_max_publish_delay_ms=1,
                batching_max_messages=1000,
                send_timeout_millis=self.send_timeout_ms,
            ),
        )

    def _send(self, events: list[Event]) -> None:
        producer = self._producer
        if producer is None:
            self._failed(events, "no producer")
            return
        self._send_all(producer, _BatchReceipt(events, self._receipt_from_thread))

    @staticmethod
    def _send_all(producer: Any, receipt: _BatchReceipt) -> None:
        send = producer.send_async
        callback = receipt.callback
        sent = 0
        try:
            for e in receipt.events:
                send(e.payload, callback, properties=_PROPERTIES, partition_key=e.symbol)
                sent += 1
        except Exception as exc:
            # Those never handed over get no callback: count them down here.
            receipt.error = receipt.error or f"send_async: {exc}"
            receipt.remaining -= len(receipt.events) - sent
            if receipt.remaining == 0:
                receipt.on_done(receipt)

    def _receipt_from_thread(self, receipt: _BatchReceipt) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._batch_done, receipt)

    def _batch_done(self, receipt: _BatchReceipt) -> None:
        if receipt.error is not None:
            self._failed(receipt.events, receipt.error)
            return
        now_ns = time.time_ns()
        record = self.latency.record_us
        record_origin = self.provider_latency.record_us
        for e in receipt.events:
            record((now_ns - e.receive_ns) // 1000)
            record_origin((now_ns - e.origin_ns) // 1000)
        self._acked(receipt.events)

    async def deliver(self, events: list[Event]) -> None:
        if self._producer is None:
            await self._connect()
        loop = asyncio.get_running_loop()
        done: asyncio.Future[_BatchReceipt] = loop.create_future()

        def settle(receipt: _BatchReceipt) -> None:
            if not done.done():
                done.set_result(receipt)

        def finish(receipt: _BatchReceipt) -> None:
            loop.call_soon_threadsafe(settle, receipt)

        self._send_all(self._producer, _BatchReceipt(events, finish))
        result = await done
        if result.error is not None:
            raise ConnectionError(f"pulsar send failed: {result.error}")

    async def run(self) -> None:
        await self.replay_loop()

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        producer, client = self._producer, self._client
        self._producer = self._client = None
        if producer is not None:
            try:
                await loop.run_in_executor(None, producer.flush)
                await loop.run_in_executor(None, producer.close)
            except Exception as exc:
                log.warning("pulsar_close_failed", error=str(exc))
        if client is not None:
            await loop.run_in_executor(None, client.close)
