"""Pulsar sink: one message per event, key = symbol, receipts tracked per batch.

pulsar-client is synchronous with its own IO thread, and a Python callback per message
costs more than the send itself (the IO thread must take the GIL for each one: measured
here, 58k msg/s with a callback per message against 140k/s without). So only the last
message of each batch carries a callback. That is enough because:

- one producer's receipts arrive and complete in send order, so the last message's
  receipt means every earlier message of the batch was persisted;
- the producer never times a message out (``send_timeout_millis=0``): while the broker is
  away it reconnects and resends by itself, so messages do not fail one by one; failures
  that remain (producer closed) fail every later message too, the last one included.

A broker that is away or slow shows as batches without a receipt: after
``stall_timeout_s`` they are copied to the spool, the sink counts as unhealthy (new events
spool too) and the producer is closed, which fails its stalled messages for good; the
replay loop makes a new producer and resends from the spool in order. Closing rather than
letting the client resend on reconnect keeps one copy of each event in the broker's
pipeline (and the embedded test broker mishandles resends after its restart). Events the
broker took just before it stalled may still arrive twice; consumers de-duplicate on
``event_id``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import _pulsar
import pulsar
import structlog

from common.events import EVENT_TYPE, Event
from common.metrics import LatencyWindow
from common.sinks.base import DurableSink
from common.spool import Spool

log = structlog.get_logger("feedfleet.pulsar")

_OK = pulsar.Result.Ok
_MessageBuilder = _pulsar.MessageBuilder


class _BatchReceipt:
    __slots__ = ("abandoned", "error", "events", "on_done", "replay", "sent_at")

    def __init__(self, events: list[Event], on_done: Callable[[_BatchReceipt], None]) -> None:
        self.events = events
        self.on_done = on_done
        self.sent_at = time.monotonic()
        self.error: str | None = None
        self.abandoned = False  # given up after a stall; a late receipt is then ignored
        self.replay = False  # sent by the replay loop: already in the spool

    def callback(self, result: Any, _msg_id: Any) -> None:
        # On the pulsar IO thread: hand over to the event loop at once.
        if result != _OK:
            self.error = str(result)
        self.on_done(self)


class PulsarSink(DurableSink):
    name = "pulsar"

    def __init__(
        self, url: str, topic: str, spool: Spool, *, max_pending: int = 100_000,
        stall_timeout_s: float = 10.0,
    ) -> None:  # fmt: skip
        super().__init__(spool, max_pending=max_pending)
        self.url = url
        self.topic = topic
        self.stall_timeout_s = stall_timeout_s
        # receive -> receipt, reset every metrics window
        self.latency = LatencyWindow()
        # provider (origin) -> receipt since start, for the benchmark and /metrics
        self.provider_latency = LatencyWindow()
        # the batch's hand-over to the client starting -> its receipt on the event loop,
        # since start, per event: the part of the above spent in the client's batching,
        # the network and the broker
        self.round_trip_latency = LatencyWindow()
        self._client: pulsar.Client | None = None
        self._producer: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Batches sent and not yet acknowledged, oldest first.
        self._outstanding: dict[int, _BatchReceipt] = {}

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            await self._connect()
        except Exception as exc:
            # The broker may be down at start: everything spools until it is back.
            self._mark_unhealthy(f"connect: {exc}")

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        if self._client is None:
            # The client's own console logger: a Python logger makes its threads take the
            # GIL for every line and was seen to abort the process at exit.
            self._client = pulsar.Client(
                self.url, operation_timeout_seconds=10, connection_timeout_ms=5000,
                io_threads=1, logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Warn),
            )  # fmt: skip
        client = self._client
        self._producer = await loop.run_in_executor(
            None,
            lambda: client.create_producer(
                self.topic,
                # Never reached while our own max_pending holds; if it were, blocking is
                # better than a send failing with nobody to hear it.
                block_if_queue_full=True,
                max_pending_messages=self.max_pending * 2 + self.replay_chunk,
                batching_enabled=True,
                batching_max_publish_delay_ms=1,
                batching_max_messages=1000,
                send_timeout_millis=0,
            ),
        )

    def _send(self, events: list[Event]) -> None:
        producer = self._producer
        if producer is None:
            self._failed(events, "no producer")
            return
        receipt = _BatchReceipt(events, self._receipt_from_thread)
        self._outstanding[id(receipt)] = receipt
        self._send_all(producer, receipt)

    @staticmethod
    def _send_all(producer: Any, receipt: _BatchReceipt) -> None:
        # The messages are built with the client's own MessageBuilder and handed to the
        # underlying producer: pulsar.Producer.send_async type-checks ten arguments in
        # Python before building the same message, a fifth of the cost of a send here.
        send = producer._producer.send_async
        events = receipt.events
        try:
            for e in events[:-1]:
                send(_message(e), None)
            send(_message(events[-1]), receipt.callback)
        except Exception as exc:
            # The last message was not handed over, so no callback will come.
            receipt.error = f"send_async: {exc}"
            receipt.on_done(receipt)

    def _receipt_from_thread(self, receipt: _BatchReceipt) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._batch_done, receipt)

    def _batch_done(self, receipt: _BatchReceipt) -> None:
        self._outstanding.pop(id(receipt), None)
        if receipt.abandoned:
            return
        if receipt.error is not None:
            self._failed(receipt.events, receipt.error)
            return
        now_ns = time.time_ns()
        events = receipt.events
        round_trip_us = int((time.monotonic() - receipt.sent_at) * 1e6)
        self.round_trip_latency.record_us(round_trip_us, len(events))
        self.latency.record_many_us([(now_ns - e.receive_ns) // 1000 for e in events])
        self.provider_latency.record_many_us([(now_ns - e.origin_ns) // 1000 for e in events])
        self._acked(receipt.events)

    def _check_stalled(self) -> None:
        """Give up on batches without a receipt for too long (see the module docstring)."""
        if not self._outstanding:
            return
        oldest = next(iter(self._outstanding.values()))
        if time.monotonic() - oldest.sent_at < self.stall_timeout_s:
            return
        self._abandon_outstanding(f"no receipt within {self.stall_timeout_s:g}s")
        producer, self._producer = self._producer, None
        if producer is not None:
            # Closing blocks while the broker is away: not on the event loop.
            asyncio.get_running_loop().run_in_executor(None, _close_quietly, producer)

    def _abandon_outstanding(self, reason: str) -> None:
        stalled = list(self._outstanding.values())
        self._outstanding.clear()
        for receipt in stalled:
            receipt.abandoned = True
            if receipt.replay:
                receipt.error = reason
                receipt.on_done(receipt)  # the replay loop retries from the spool
            else:
                self._failed(receipt.events, reason)

    async def deliver(self, events: list[Event]) -> None:
        if self._producer is None:
            await self._connect()
        loop = asyncio.get_running_loop()
        done: asyncio.Future[_BatchReceipt] = loop.create_future()

        def settle(receipt: _BatchReceipt) -> None:
            self._outstanding.pop(id(receipt), None)
            if not done.done():
                done.set_result(receipt)

        def finish(receipt: _BatchReceipt) -> None:
            loop.call_soon_threadsafe(settle, receipt)

        receipt = _BatchReceipt(events, finish)
        receipt.replay = True
        self._outstanding[id(receipt)] = receipt
        self._send_all(self._producer, receipt)
        result = await done
        if result.error is not None:
            if "Closed" in result.error:
                self._producer = None  # make a new one on the next attempt
            raise ConnectionError(f"pulsar send failed: {result.error}")

    async def run(self) -> None:
        replay = asyncio.create_task(self.replay_loop())
        try:
            while True:
                await asyncio.sleep(0.25)
                self._check_stalled()
        finally:
            replay.cancel()

    async def close(self) -> None:
        # What is still unacknowledged now is replayed by the next start, not lost.
        self._abandon_outstanding("worker stopping")
        loop = asyncio.get_running_loop()
        producer, client = self._producer, self._client
        self._producer = self._client = None
        if producer is not None:
            try:
                await asyncio.wait_for(loop.run_in_executor(None, producer.flush), 10)
                await loop.run_in_executor(None, producer.close)
            except Exception as exc:
                log.warning("pulsar_close_failed", error=str(exc))
        if client is not None:
            await loop.run_in_executor(None, client.close)


def _message(event: Event) -> Any:
    """One event as one Pulsar message: its JSON, ``event_type`` property, symbol key."""
    return (
        _MessageBuilder()
        .content(event.payload)
        .property("event_type", EVENT_TYPE)
        .partition_key(event.symbol)
        .build()
    )


def _close_quietly(producer: Any) -> None:
    try:
        producer.close()
    except Exception as exc:
        log.debug("stalled_producer_close_failed", error=str(exc))
