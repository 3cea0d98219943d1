"""The Pulsar sink against the real broker: events to the topic, rejected records to
``<topic>-dlq``, acknowledged together, each message with its journal position; a broker
that stops answering, a producer the client gave up and a broker unreachable at start."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import orjson
import pulsar
import pytest
from structlog.testing import CapturingLogger

import common.sinks.pulsar as pulsar_sink
from common.config import PulsarAccess
from common.embedded import free_port, pulsar_command, wait_for_port
from common.events import EVENT_TYPE, Event, build_events
from common.journal import Batch, Journal
from common.model import DataType, RawMarketData
from common.pulsar_client import new_pulsar_client
from common.sinks.pulsar import PulsarSink
from tests.conftest import Services
from tests.pulsar_collector import PulsarCollector
from tests.running import until

T0 = 1_800_000_000_000_000_000
SECOND = 1_000_000_000


def _records(
    n: int, *, start: int = 0, now_ns: int = T0, received_ago_s: int = 0, sent_ago_s: int = 0
) -> list[RawMarketData]:
    return [
        RawMarketData(
            symbol="PLS",
            provider="pulsar-test",
            timestamp_ns=now_ns - sent_ago_s * SECOND + i,
            data_type=DataType.TRADE,
            price=10.0,
            volume=1,
            provider_sequence=i,
            stream="T.PLS",
            receive_ns=now_ns - received_ago_s * SECOND + i,
        )
        for i in range(start, start + n)
    ]


def _append(journal: Journal, records: list[RawMarketData]) -> Batch:
    rejected: list[Event] = []
    return journal.append(build_events(records, T0, rejected), rejected)


def _refused(records: list[RawMarketData]) -> list[RawMarketData]:
    for r in records:
        r.price = 1e13  # outside NUMERIC(20, 8): a dead-letter
    return records


def _ids(*batches: Batch, rejected: bool = False) -> set[str]:
    return {e.event_id for b in batches for e in (b.rejected if rejected else b.events)}


@dataclass
class Received:
    doc: dict[str, object]
    producer_name: str
    properties: dict[str, str]
    key: str
    batch_index: int  # -1 for a message the producer sent on its own


def _receive(url: str, topic: str, count: int, timeout_s: float = 30.0) -> dict[str, Received]:
    """The topic's messages from its start, by event id, with what the broker kept of each
    message's producer (blocking: run it in a thread)."""
    client = new_pulsar_client(PulsarAccess.from_env(url), operation_timeout_seconds=10)
    try:
        consumer = client.subscribe(
            topic,
            f"test-{uuid.uuid4().hex[:8]}",
            receiver_queue_size=10_000,
            initial_position=pulsar.InitialPosition.Earliest,
        )
        got: dict[str, Received] = {}
        deadline = time.monotonic() + timeout_s
        while len(got) < count and time.monotonic() < deadline:
            try:
                msg = consumer.receive(timeout_millis=200)
            except pulsar.Timeout:
                continue
            doc = orjson.loads(msg.data())
            got[doc["event_id"]] = Received(
                doc,
                msg.producer_name(),
                msg.properties(),
                msg.partition_key(),
                msg.message_id().batch_index(),
            )
            consumer.acknowledge(msg)
        return got
    finally:
        client.close()


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def _count(window: pulsar_sink.LatencyWindow) -> int:
    return int(window.histogram.get_total_count())


def _ms(window: pulsar_sink.LatencyWindow, which: str) -> float:
    value = window.percentiles_ms()[which]
    assert value is not None
    return value


async def test_rejected_records_go_to_the_dead_letter_topic(
    services: Services, tmp_path: Path
) -> None:
    """Live batches: events to the topic and rejected records to ``<topic>-dlq`` from
    producers named after the sink, acknowledged together with one receipt, and the
    latencies measured from the receipt."""
    topic = f"persistent://public/default/pls-{uuid.uuid4().hex[:8]}"
    journal = Journal(tmp_path / "j", (PulsarSink.name,))
    journal.open()
    name = f"t-{uuid.uuid4().hex}"
    sink = PulsarSink(services.pulsar_url, topic, journal, producer_name=name)
    await sink.start()
    task = asyncio.create_task(sink.run())
    try:
        await until(lambda: sink.live, 10, "the sink to go live")
        # Received a second ago, sent by the provider two seconds ago.
        now_ns = time.time_ns()
        records = _records(20, now_ns=now_ns, received_ago_s=1, sent_ago_s=2)
        records[4].price = 1e13
        records[9].symbol = "X" * 60
        batch = _append(journal, records)
        # A read whose records were all refused: only the dead-letter's part.
        only_rejected = _append(journal, _refused(_records(2, start=20)))
        assert not only_rejected.events and len(only_rejected.rejected) == 2
        sink.submit(batch)
        sink.submit(only_rejected)
        assert await sink.drained(timeout=30)
        c = sink.counters
        assert (c.acked, c.dead_lettered, c.failures, c.replayed) == (22, 4, 0, 0)
        assert journal.acked(PulsarSink.name) == only_rejected.end

        events = await asyncio.to_thread(_receive, services.pulsar_url, topic, 18)
        dead = await asyncio.to_thread(_receive, services.pulsar_url, f"{topic}-dlq", 4)
        assert set(events) == _ids(batch)
        assert set(dead) == _ids(batch, only_rejected, rejected=True)
        reasons = sorted(str(m.doc["reason"]) for m in dead.values())
        assert all(r.startswith("price 10000000000000.0 is outside") for r in reasons[:3])
        assert reasons[3] == "symbol of 60 characters (at most 50)"
        # A stable producer name per sink (what the broker de-duplicates by), the
        # dead-letter's derived from it.
        assert {m.producer_name for m in events.values()} == {name}
        assert {m.producer_name for m in dead.values()} == {f"{name}-dlq"}
        assert {m.key for m in events.values()} == {"PLS"}
        assert all(m.properties == {"event_type": EVENT_TYPE} for m in events.values())
        # Sent in one go, the events travel in client-side batches, not one frame each.
        assert max(m.batch_index for m in events.values()) > 0

        # One latency per event (dead-letters are not events); receive -> receipt is the
        # second since receipt plus the delivery, provider -> receipt one more second.
        assert _count(sink.latency) == _count(sink.provider_latency) == 18
        assert _count(sink.round_trip_latency) == 18
        assert _ms(sink.latency, "p50") >= 1000
        gap = _ms(sink.provider_latency, "p50") - _ms(sink.latency, "p50")
        assert 990 <= gap <= 1010, gap
        # The hand-over -> receipt part of it: more than nothing, less than the whole.
        assert sink.round_trip_latency.histogram.get_min_value() >= 10
        assert _ms(sink.round_trip_latency, "max") <= _ms(sink.latency, "p50")
    finally:
        await _stop(task)
        await sink.close()


@pytest.fixture
def sink_log(monkeypatch: pytest.MonkeyPatch) -> CapturingLogger:
    """What the sink logs (its module logger), as calls."""
    logger = CapturingLogger()
    monkeypatch.setattr(pulsar_sink, "log", logger)
    return logger


class OwnBroker:
    """A broker of this test's own, so it can be frozen (SIGSTOP) without stalling anyone
    else's: a broker that stops answering, as one that is overloaded or half dead."""

    def __init__(self, work: Path) -> None:
        self.port = free_port()
        self.url = f"pulsar://127.0.0.1:{self.port}"
        self._proc = subprocess.Popen(
            pulsar_command(self.port, work / "pulsar"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def pause(self) -> None:
        os.kill(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self._proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        self.resume()
        self._proc.terminate()
        self._proc.wait(timeout=10)


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[OwnBroker]:
    broker = OwnBroker(tmp_path / "broker")
    yield broker
    broker.stop()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """The sink's monotonic clock (receipt ages), under the test's control."""
    fake = FakeClock()
    monkeypatch.setattr(
        pulsar_sink, "time", SimpleNamespace(monotonic=fake.monotonic, time_ns=time.time_ns)
    )
    return fake


async def test_a_broker_that_stops_answering_is_given_up_and_caught_up_after(
    own_broker: OwnBroker, clock: FakeClock, tmp_path: Path
) -> None:
    """No receipt for ``stall_timeout_s``: the delivery fails (a catch-up's with an error,
    live batches by leaving live), the producers are closed, and once the broker answers
    again the catch-up makes new ones and delivers everything from the journal."""
    topic = f"persistent://public/default/stall-{uuid.uuid4().hex[:8]}"
    events_in = PulsarCollector(own_broker.url, topic)
    dead_in = PulsarCollector(own_broker.url, f"{topic}-dlq")
    journal = Journal(tmp_path / "j", (PulsarSink.name,))
    journal.open()
    backlog = _append(journal, _records(3) + _refused(_records(1, start=3)))
    sink = PulsarSink(
        own_broker.url, topic, journal, producer_name=f"t-{uuid.uuid4().hex}", stall_timeout_s=10
    )
    # Late receipts of batches given up are dropped quietly, not as errors in the loop.
    loop_errors: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: loop_errors.append(ctx))
    await sink.start()
    assert sink.healthy
    first = sink._producer
    own_broker.pause()
    task = asyncio.create_task(sink.run())
    try:
        # 1. The catch-up's delivery of the backlog gets no receipt.
        await until(lambda: len(sink._outstanding) == 1, 10, "the catch-up's delivery sent")
        clock.now += 9.5
        sink._check_stalled()  # the periodic check, before the timeout: nothing to do
        assert sink.counters.failures == 0 and sink.healthy
        clock.now += 0.5
        await until(lambda: sink.counters.failures == 1, 10, "the catch-up to give up")
        assert sink.last_error == "ConnectionError: pulsar send failed: no receipt within 10s"
        assert journal.acked(PulsarSink.name) == 0 and not sink.live
        own_broker.resume()
        await until(lambda: sink.live, 15, "the catch-up to deliver the backlog")
        c = sink.counters
        assert (c.failures, c.replayed, c.acked, c.dead_lettered) == (1, 4, 4, 1)
        assert journal.acked(PulsarSink.name) == backlog.end and sink.healthy
        # The stalled producer was closed (the client must not resend its messages).
        await until(lambda: not first.is_connected(), 10, "the stalled producer closed")

        # 2. A live batch gets no receipt; more than the client's default queue of 1000
        # messages is in flight, which must not block.
        second = sink._producer
        own_broker.pause()
        big = _append(journal, _records(1200, start=10) + _refused(_records(1, start=1300)))
        sink.submit(big)
        clock.now += 9.5
        sink._check_stalled()
        assert sink.live and sink.counters.failures == 1
        clock.now += 0.5
        await until(lambda: sink.counters.failures == 2, 10, "the live batch given up")
        assert sink.last_error == "no receipt within 10s" and not sink.live
        assert journal.acked(PulsarSink.name) == backlog.end
        later = _append(journal, _records(2, start=2000))
        sink.submit(later)  # not live: left to the catch-up
        own_broker.resume()
        await until(lambda: sink.live and sink.caught_up, 15, "the catch-up after the stall")
        c = sink.counters
        assert (c.failures, c.replayed, c.acked, c.dead_lettered) == (2, 1207, 1207, 2)
        await until(lambda: not second.is_connected(), 10, "the stalled producer closed")

        # 3. Nothing is left behind: a check long after the last receipt gives up nothing,
        # and live batches go on being acknowledged.
        quiet = _append(journal, _records(2, start=3000))
        sink.submit(quiet)
        assert await sink.drained(timeout=10)
        clock.now += 60
        sink._check_stalled()
        last = _append(journal, _records(2, start=4000))
        sink.submit(last)
        assert await sink.drained(timeout=10)
        c = sink.counters
        assert (c.failures, c.replayed, c.acked, c.dead_lettered) == (2, 1207, 1211, 2)
        assert sink.healthy and journal.acked(PulsarSink.name) == last.end

        every = _ids(backlog, big, later, quiet, last)
        assert await events_in.wait_for(len(every), 30) == len(every)
        assert set(events_in.events) == every
        assert await dead_in.wait_for(2, 30) == 2
        assert set(dead_in.events) == _ids(backlog, big, rejected=True)
        assert loop_errors == []
    finally:
        asyncio.get_running_loop().set_exception_handler(None)
        own_broker.resume()
        await _stop(task)
        await sink.close()
        events_in.close()
        dead_in.close()


async def test_a_producer_closed_or_missing_is_made_again(
    services: Services, sink_log: CapturingLogger, tmp_path: Path
) -> None:
    """A producer the client has given up for good (closed: every send fails) fails the
    live batch, and the catch-up makes a new pair; so does a pair left half made."""
    topic = f"persistent://public/default/pls-{uuid.uuid4().hex[:8]}"
    journal = Journal(tmp_path / "j", (PulsarSink.name,))
    journal.open()
    backlog = _append(journal, _records(2) + _refused(_records(1, start=2)))
    sink = PulsarSink(services.pulsar_url, topic, journal)  # no name: the broker's
    await sink.start()
    made_at_start = sink._producer, sink._dead_letter
    task = asyncio.create_task(sink.run())
    try:
        await until(lambda: sink.live, 10, "the backlog delivered")
        # The catch-up used the producers start() made rather than new ones.
        assert (sink._producer, sink._dead_letter) == made_at_start
        assert sink.counters.replayed == 3

        # The client closed the events producer (as after a fatal error from the broker).
        sink._producer.close()
        closed = _append(journal, _records(3, start=10))
        sink.submit(closed)
        await until(lambda: sink.live and sink.caught_up, 10, "a new producer")
        c = sink.counters
        # The live batch failed, the first catch-up attempt too (same producer), then new.
        assert (c.failures, c.replayed, c.acked) == (2, 6, 6)
        assert sink._producer is not made_at_start[0]
        assert sink._dead_letter is not made_at_start[1]

        # A pair left half made (the dead-letter's producer could not be made), and a read
        # whose records were all refused: no part of it can be handed over.
        sink._dead_letter = None
        half = _append(journal, _refused(_records(2, start=20)))
        sink.submit(half)
        await until(lambda: sink.live and sink.caught_up, 10, "the pair made again")
        c = sink.counters
        assert (c.failures, c.replayed, c.acked, c.dead_lettered) == (3, 8, 8, 3)
        assert journal.acked(PulsarSink.name) == half.end

        events = await asyncio.to_thread(_receive, services.pulsar_url, topic, 5)
        dead = await asyncio.to_thread(_receive, services.pulsar_url, f"{topic}-dlq", 3)
        assert set(events) == _ids(backlog, closed)
        assert set(dead) == _ids(backlog, half, rejected=True)
        # Unnamed: the broker names each producer, the dead-letter's no differently.
        assert "None-dlq" not in {m.producer_name for m in dead.values()}
        assert not {m.producer_name for m in dead.values()} & {
            m.producer_name for m in events.values()
        }

        # Closing the sink with its events producer already closed: reported, and the
        # dead-letter's producer and the client are closed all the same.
        await _stop(task)
        dead_letter = sink._dead_letter
        sink._producer.close()
        sink_log.calls.clear()
        await sink.close()
        assert [(c.method_name, c.args, c.kwargs) for c in sink_log.calls] == [
            ("warning", ("pulsar_close_failed",), {"error": "Pulsar error: AlreadyClosed"})
        ]
        assert not dead_letter.is_connected()
    finally:
        await _stop(task)
        await sink.close()


async def test_a_broker_unreachable_at_start_leaves_batches_in_the_journal(
    sink_log: CapturingLogger, tmp_path: Path
) -> None:
    """No producer (the connection failed at start): a live batch fails over to the
    catch-up at once, with the reason, and nothing is acknowledged."""
    journal = Journal(tmp_path / "j", (PulsarSink.name,))
    journal.open()
    sink = PulsarSink("localhost:6650", "persistent://public/default/x", journal)  # no scheme
    await sink.start()
    assert not sink.healthy
    assert sink.last_error is not None and sink.last_error.startswith("connect: ")
    task = asyncio.create_task(sink.run())
    try:
        await until(lambda: sink.live, 10, "live over an empty journal")
        batch = _append(journal, _records(3) + _refused(_records(1, start=3)))
        sink.submit(batch)
        assert not sink.live and not sink.healthy
        assert (sink.counters.failures, sink.last_error) == (1, "no producer")
        assert (sink.pending, sink.waiting, journal.acked(PulsarSink.name)) == (0, 4, 0)
    finally:
        await _stop(task)
        await sink.close()
    # No producer was ever made, so closing has none to fail on.
    assert sink_log.calls == []


async def test_close_leaves_a_batch_in_flight_to_the_next_start(
    services: Services, sink_log: CapturingLogger, tmp_path: Path
) -> None:
    """Closing with a batch not yet acknowledged: its cursor stays (a late receipt does
    not count), the client is closed, and the next sink on the journal delivers it."""
    topic = f"persistent://public/default/pls-{uuid.uuid4().hex[:8]}"
    journal = Journal(tmp_path / "j", (PulsarSink.name,))
    journal.open()
    sink = PulsarSink(services.pulsar_url, topic, journal)
    await sink.start()
    task = asyncio.create_task(sink.run())
    await until(lambda: sink.live, 10, "the sink to go live")
    await _stop(task)
    client = sink._client
    assert client is not None
    batch = _append(journal, _records(3))
    sink.submit(batch)
    producers = sink._producer, sink._dead_letter
    await sink.close()  # before any receipt could be handled
    assert journal.acked(PulsarSink.name) == 0
    assert sink.healthy is False and sink.last_error == "worker stopping"
    assert not any(p.is_connected() for p in producers)
    assert sink_log.calls == []  # both producers flushed and closed without a failure
    assert _count(sink.round_trip_latency) == 0 and _count(sink.latency) == 0
    with pytest.raises(pulsar.AlreadyClosed):
        client.create_producer(topic)

    again = PulsarSink(services.pulsar_url, topic, journal)
    await again.start()
    task = asyncio.create_task(again.run())
    try:
        assert await again.drained(timeout=10)
        assert again.counters.replayed == 3
        events = await asyncio.to_thread(_receive, services.pulsar_url, topic, 3)
        assert set(events) == _ids(batch)
    finally:
        await _stop(task)
        await again.close()
