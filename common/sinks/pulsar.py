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

Messages are built with the client's private ``_pulsar.MessageBuilder`` and handed to
``Producer._producer.send_async`` (``None`` for no callback): the public
``Producer.send_async`` costs 1.2-2.2 µs more per message in Python, 7-30% more process
CPU (``python -m tests.pulsar_send_cost``, medians of 7 interleaved rounds), and drops a
sequence id of 0. So pyproject.toml keeps pulsar-client below 3.14, to the versions
``tests/test_pulsar_private_surface.py`` passed on.

A broker that is away or slow shows as batches without a receipt: after
``stall_timeout_s`` the sink fails them, counts as unhealthy and closes the producer,
which fails its stalled messages for good; the catch-up (``sinks/base.py``) makes a new
producer and resends from the journal in order. Closing rather than letting the client
resend on reconnect keeps one copy of each event in the broker's pipeline (and the
embedded test broker mishandles resends after its restart).

Duplicates: the producer has a stable name per (provider, host) and every message a
sequence id derived from its journal position, the same on every resend, so a broker with
deduplication enabled (``brokerDeduplicationEnabled`` or the namespace policy) drops
replays. Without it, events the broker took just before a stall or a kill may arrive
twice; consumers de-duplicate on ``event_id``.

Rejected records go to ``<topic>-dlq`` through a second producer, acknowledged with the
batch they came in.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import _pulsar
import pulsar
import structlog

from common import stage_cpu
from common.config import PulsarAccess
from common.events import EVENT_TYPE, Event
from common.journal import Batch, Journal
from common.metrics import LatencyWindow
from common.pulsar_client import new_pulsar_client
from common.sinks.base import DurableSink

log = structlog.get_logger("feedfleet.pulsar")

_OK = pulsar.Result.Ok
_MessageBuilder = _pulsar.MessageBuilder


class _BatchReceipt:
    __slots__ = (
        "abandoned", "batch", "error", "generation", "on_done", "parts", "replay", "sent_at",
    )  # fmt: skip

    def __init__(
        self, batch: Batch, generation: int, on_done: Callable[[_BatchReceipt], None]
    ) -> None:
        self.batch = batch
        self.generation = generation
        self.on_done = on_done
        self.sent_at = time.monotonic()
        self.error: str | None = None
        self.abandoned = False  # given up after a stall; a late receipt is then ignored
        self.replay = False  # sent by the catch-up, which waits for it itself
        # Receipts still to come: one for the events, one for the dead-letter's.
        self.parts = int(bool(batch.events)) + int(bool(batch.rejected))

    def callback(self, result: Any, _msg_id: Any) -> None:
        # On the pulsar IO thread (one of them, so the count needs no lock): hand over to
        # the event loop once every part is in.
        # The first error is the reason: a batch given up after a stall has its reason set
        # before its producer is closed, which then fails its messages too.
        if result != _OK and self.error is None:
            self.error = str(result)
        self.parts -= 1
        if self.parts <= 0:
            self.on_done(self)


class PulsarSink(DurableSink):
    name = "pulsar"

    def __init__(
        self, url: str | PulsarAccess, topic: str, journal: Journal, *,
        producer_name: str | None = None, max_pending: int = 100_000,
        stall_timeout_s: float = 10.0,
    ) -> None:  # fmt: skip
        super().__init__(journal, max_pending=max_pending)
        # A bare URL: no token, no CA file (the worker passes its settings' PulsarAccess).
        self.access = url if isinstance(url, PulsarAccess) else PulsarAccess(url)
        self.url = self.access.url
        self.topic = topic
        self.dead_letter_topic = f"{topic}-dlq"
        self.producer_name = producer_name
        self.stall_timeout_s = stall_timeout_s
        # receive -> receipt, reset every metrics window
        self.latency = LatencyWindow()
        # provider (origin) -> receipt since start, for the benchmark and /metrics
        self.provider_latency = LatencyWindow()
        # the batch's hand-over to the client starting -> its receipt on the event loop,
        # since start, per event: the part of the above spent in the client's batching,
        # the network and the broker
        self.round_trip_latency = LatencyWindow()
        self.last_receipt_ns = 0  # when the broker last acknowledged a batch (0: never)
        self._client: pulsar.Client | None = None
        self._producer: Any = None
        self._dead_letter: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Batches sent and not yet acknowledged, oldest first.
        self._outstanding: dict[int, _BatchReceipt] = {}

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            await self._connect()
        except Exception as exc:
            # The broker may be down at start: the journal holds everything until it is back.
            self._mark_unhealthy(f"connect: {exc}")

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        if self._client is None:
            # The client's own console logger: a Python logger makes its threads take the
            # GIL for every line and was seen to abort the process at exit.
            self._client = new_pulsar_client(
                self.access, operation_timeout_seconds=10, connection_timeout_ms=5000,
                io_threads=1, logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Warn),
            )  # fmt: skip
        client = self._client

        def create(topic: str, name: str | None) -> Any:
            return client.create_producer(
                topic,
                producer_name=name,
                # Never reached while our own max_pending holds; if it were, blocking is
                # better than a send failing with nobody to hear it.
                block_if_queue_full=True,
                max_pending_messages=self.max_pending * 2 + self.replay_chunk,
                batching_enabled=True,
                batching_max_publish_delay_ms=1,
                batching_max_messages=1000,
                send_timeout_millis=0,
            )

        name = self.producer_name
        self._producer = await loop.run_in_executor(None, create, self.topic, name)
        self._dead_letter = await loop.run_in_executor(
            None, create, self.dead_letter_topic, f"{name}-dlq" if name else None
        )

    def _send(self, batch: Batch, generation: int) -> None:
        producer = self._producer
        if producer is None:
            self._failed(batch, "no producer", generation)
            return
        receipt = _BatchReceipt(batch, generation, self._receipt_from_thread)
        self._outstanding[id(receipt)] = receipt
        self._send_all(producer, self._dead_letter, receipt)

    @staticmethod
    def _send_all(producer: Any, dead_letter: Any, receipt: _BatchReceipt) -> None:
        # The messages are built with the client's own MessageBuilder and handed to the
        # underlying producer: pulsar.Producer.send_async type-checks ten arguments in
        # Python before building the same message, a fifth of the cost of a send here.
        batch = receipt.batch
        try:
            for group, target in ((batch.events, producer), (batch.rejected, dead_letter)):
                if not group:
                    continue
                send = target._producer.send_async
                for e in group[:-1]:
                    send(_message(e), None)
                send(_message(group[-1]), receipt.callback)
        except Exception as exc:
            # Not every part was handed over, so not every callback will come.
            receipt.error = f"send_async: {exc}"
            receipt.parts = 0
            receipt.on_done(receipt)

    def _receipt_from_thread(self, receipt: _BatchReceipt) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._batch_done, receipt)

    def _batch_done(self, receipt: _BatchReceipt) -> None:
        clock = stage_cpu.CLOCK
        mark = clock.start()
        self._receipt(receipt)
        clock.lap("receipts", mark)

    def _receipt(self, receipt: _BatchReceipt) -> None:
        self._outstanding.pop(id(receipt), None)
        if receipt.abandoned:
            return
        batch = receipt.batch
        if receipt.error is not None:
            self._failed(batch, receipt.error, receipt.generation)
            return
        now_ns = self.last_receipt_ns = time.time_ns()
        events = batch.events
        if events:
            round_trip_us = int((time.monotonic() - receipt.sent_at) * 1e6)
            self.round_trip_latency.record_us(round_trip_us, len(events))
            self.latency.record_many_us([(now_ns - e.receive_ns) // 1000 for e in events])
            self.provider_latency.record_many_us([(now_ns - e.origin_ns) // 1000 for e in events])
        self._acked(batch, receipt.generation)

    def _check_stalled(self) -> None:
        """Give up on batches without a receipt for too long (see the module docstring)."""
        if not self._outstanding:
            return
        oldest = next(iter(self._outstanding.values()))
        if time.monotonic() - oldest.sent_at < self.stall_timeout_s:
            return
        self._abandon_outstanding(f"no receipt within {self.stall_timeout_s:g}s")
        for producer in self._take_producers():
            # Closing blocks while the broker is away: not on the event loop.
            asyncio.get_running_loop().run_in_executor(None, _close_quietly, producer)

    def _take_producers(self) -> list[Any]:
        producers = [p for p in (self._producer, self._dead_letter) if p is not None]
        self._producer = self._dead_letter = None
        return producers

    def _abandon_outstanding(self, reason: str) -> None:
        stalled = list(self._outstanding.values())
        self._outstanding.clear()
        for receipt in stalled:
            receipt.abandoned = True
            if receipt.replay:
                receipt.error = reason
                receipt.on_done(receipt)  # the catch-up retries from the journal
            else:
                self._failed(receipt.batch, reason, receipt.generation)

    async def deliver(self, batch: Batch) -> None:
        if self._producer is None or self._dead_letter is None:
            self._take_producers()  # a half-made pair: make both again
            await self._connect()
        loop = asyncio.get_running_loop()
        done: asyncio.Future[_BatchReceipt] = loop.create_future()

        def settle(receipt: _BatchReceipt) -> None:
            self._outstanding.pop(id(receipt), None)
            if not done.done():
                done.set_result(receipt)

        def finish(receipt: _BatchReceipt) -> None:
            loop.call_soon_threadsafe(settle, receipt)

        receipt = _BatchReceipt(batch, self.generation, finish)
        receipt.replay = True
        if receipt.parts == 0:
            return
        self._outstanding[id(receipt)] = receipt
        self._send_all(self._producer, self._dead_letter, receipt)
        result = await done
        if result.error is not None:
            if "Closed" in result.error:
                self._take_producers()  # make new ones on the next attempt
            raise ConnectionError(f"pulsar send failed: {result.error}")

    async def run(self) -> None:
        catch_up = asyncio.create_task(self.run_catch_up())
        try:
            while True:
                await asyncio.sleep(0.25)
                self._check_stalled()
        finally:
            catch_up.cancel()

    async def close(self) -> None:
        # What is still unacknowledged now is replayed by the next start, not lost.
        self._abandon_outstanding("worker stopping")
        loop = asyncio.get_running_loop()
        client, self._client = self._client, None
        for producer in self._take_producers():
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
        .sequence_id(event.position)
        .build()
    )


def _close_quietly(producer: Any) -> None:
    try:
        producer.close()
    except Exception as exc:
        log.debug("stalled_producer_close_failed", error=str(exc))
