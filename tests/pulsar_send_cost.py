"""Producer-side CPU per message of the ways to hand events to pulsar-client.

``python -m tests.pulsar_send_cost`` (``--messages``, ``--rounds``, ``--rate``; the broker
from ``FEEDFLEET_PULSAR_URL``, else an embedded one started here). It backs the choice in
``common/sinks/pulsar.py`` of the client's private ``Producer._producer.send_async``:
re-run it after a pulsar-client upgrade.

Each way sends the same events as the sink does: a ~600-byte JSON payload, key one of 500
symbols, property ``event_type``, increasing sequence ids, in batches of 50 with a
callback on the last message of each only, through a producer configured like the
sink's, at ``--rate`` messages a second (10,000, the benchmark's per provider; 0: all at
once). The ways run interleaved, round after round, each on a fresh producer and topic,
and the figures are medians over the rounds:

- ``private``: the sink's path, ``_pulsar.MessageBuilder`` and ``Producer._producer``;
- ``public``: ``Producer.send_async(content, callback, properties=, partition_key=,
  sequence_id=)``, which accepts ``None`` as callback and passes it through;
- ``public-schema``: the same with a pass-through ``BytesSchema``, the only cost of
  ``send_async`` its public arguments let us drop (the schema's type check);
- ``public-noop``: a no-op Python callback on every message, what the public API would
  cost if it refused ``None`` (for reference).

Per way: CPU of the sending thread (``time.thread_time_ns``) and of the whole process
(``time.process_time_ns``, which adds the client's IO thread and the callbacks) from the
first send to the last receipt, per message; the broker runs in its own process and is
not counted. And the "hand-over only": the sending thread's CPU up to the client's own
``send_async``, which every way ends with, against a stand-in that does nothing: the part
in which the ways differ, measured without the broker's noise.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pulsar
from pulsar.schema import BytesSchema

from common.embedded import EmbeddedProcess, free_port, pulsar_command
from common.events import EVENT_TYPE, Event
from common.pulsar_client import new_pulsar_client
from common.sinks.pulsar import _message

BATCH = 50
SYMBOLS = [f"S{i:03d}" for i in range(500)]
PROPERTIES = {"event_type": EVENT_TYPE}


@dataclass
class Receipts:
    """Counts batch receipts on the client's IO thread; ``done`` once all are in."""

    expected: int
    failures: int = 0
    done: threading.Event = field(default_factory=threading.Event)

    def callback(self, result: Any, _msg_id: Any) -> None:
        if result != pulsar.Result.Ok:
            self.failures += 1
        self.expected -= 1
        if self.expected <= 0:
            self.done.set()


class PassThroughBytes(BytesSchema):
    """Bytes with no per-message type check (the payloads are bytes already)."""

    def encode(self, data: bytes) -> bytes:
        return data


def _noop(_result: Any, _msg_id: Any) -> None:
    pass


def send_private(producer: Any, group: list[Event], callback: Callable[..., None]) -> None:
    """The sink's way: its own ``_message``, the client's private ``send_async``."""
    send = producer._producer.send_async
    for m in group[:-1]:
        send(_message(m), None)
    send(_message(group[-1]), callback)


def public_sender(
    each: Callable[..., None] | None,
) -> Callable[[Any, list[Event], Callable[..., None]], None]:
    """The public ``send_async``, with ``each`` as the callback of all but the last message
    of a batch (None, or a no-op Python callable)."""

    def send_public(producer: Any, group: list[Event], callback: Callable[..., None]) -> None:
        send = producer.send_async
        for i, m in enumerate(group, 1):
            send(
                m.payload, callback if i == len(group) else each,
                properties=PROPERTIES, partition_key=m.symbol,
                sequence_id=m.position,
            )  # fmt: skip

    return send_public


@dataclass(frozen=True)
class Way:
    name: str
    send: Callable[[Any, list[Event], Callable[..., None]], None]
    schema: Any = None


WAYS = [
    Way("private", send_private),
    Way("public", public_sender(None)),
    Way("public-schema", public_sender(None), PassThroughBytes()),
    Way("public-noop", public_sender(_noop)),
]


@dataclass(frozen=True)
class Cost:
    thread_ns: float  # sending thread, per message
    process_ns: float  # whole process, per message


def payloads(count: int, first_sequence_id: int) -> list[Event]:
    """``count`` events shaped like the sink's (about 600 bytes of JSON each)."""
    out = []
    for i in range(count):
        symbol = SYMBOLS[i % len(SYMBOLS)]
        doc = {
            "event_id": str(uuid.UUID(int=first_sequence_id + i)),
            "timestamp": "2026-01-05T14:30:00.123456789Z",
            "provider": "polygon",
            "raw_data": {
                "symbol": symbol, "price": 187.25 + i % 100 / 100, "volume": 100 + i % 900,
                "timestamp": "2026-01-05T14:30:00.120000000Z", "bid": 187.24, "ask": 187.26,
                "provider_specific": {
                    "ev": "T", "x": 4, "i": f"{52983525029461 + i}", "z": 3, "c": [12, 37],
                    "q": 1_000_000 + i, "trfi": 202, "tape": "C", "exch": "NASDAQ",
                    "trft": 1_767_623_400_119_000_000,
                    "ds": "feed-a", "venue": "XNAS", "y": 1_767_623_400_118_000_000 + i,
                },
                "data_type": "trade",
            },
            "metadata": {
                "ingestion_latency_ms": 1.234, "provider_sequence": 1_000_000 + i,
                "quality_flags": [], "stream": f"T.{symbol}", "host": "ingest-worker-01",
            },
        }  # fmt: skip
        event_id = doc["event_id"]
        # The journal position is the sequence id, as in the sink.
        out.append(Event(
            event_id, symbol, orjson.dumps(doc), b"", 0, 0, position=first_sequence_id + i,
        ))  # fmt: skip
    return out


def measure(client: pulsar.Client, way: Way, messages: list[Event], rate: int) -> Cost:
    """Send ``messages`` through a fresh producer, ``rate`` a second (0: all at once)."""
    topic = f"persistent://public/default/send-cost-{uuid.uuid4().hex[:10]}"
    options: dict[str, Any] = {"schema": way.schema} if way.schema is not None else {}
    # As the sink's producer (common/sinks/pulsar.py), with a queue that never fills.
    producer = client.create_producer(
        topic, block_if_queue_full=True, max_pending_messages=len(messages) + 1000,
        batching_enabled=True, batching_max_publish_delay_ms=1, batching_max_messages=1000,
        send_timeout_millis=0, **options,
    )  # fmt: skip
    groups = [messages[i : i + BATCH] for i in range(0, len(messages), BATCH)]
    receipts = Receipts(len(groups))
    interval = BATCH / rate if rate else 0.0
    gc.collect()
    thread_start, process_start = time.thread_time_ns(), time.process_time_ns()
    next_at = time.monotonic()
    for group in groups:
        way.send(producer, group, receipts.callback)
        if interval:
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    thread_ns = time.thread_time_ns() - thread_start
    if not receipts.done.wait(120):
        raise TimeoutError(f"{way.name}: {receipts.expected} batches without a receipt")
    process_ns = time.process_time_ns() - process_start
    producer.close()
    if receipts.failures:
        raise RuntimeError(f"{way.name}: {receipts.failures} batches failed")
    return Cost(thread_ns / len(messages), process_ns / len(messages))


class NullProducer:
    """Takes a built message and does nothing: the client's side, left out."""

    def send_async(self, _msg: Any, _callback: Any) -> None:
        pass


def measure_handover(way: Way, messages: list[Event]) -> float:
    """Sending-thread CPU per message of ``way`` up to the client's own ``send_async``
    (the same call for every way), without a broker: the part in which they differ."""
    producer = pulsar.Producer()
    producer._producer = NullProducer()
    producer._schema = way.schema or BytesSchema()
    groups = [messages[i : i + BATCH] for i in range(0, len(messages), BATCH)]
    gc.collect()
    start = time.thread_time_ns()
    for group in groups:
        way.send(producer, group, _noop)
    return (time.thread_time_ns() - start) / len(messages)


def check_none_callback(client: pulsar.Client) -> None:
    """The public ``send_async`` takes ``None`` as its callback (it passes it through)."""
    producer = client.create_producer(f"persistent://public/default/send-cost-{uuid.uuid4()}")
    producer.send_async(b"{}", None, properties=PROPERTIES, partition_key="S000", sequence_id=7)
    producer.flush()
    assert producer.last_sequence_id() == 7, producer.last_sequence_id()
    producer.close()


def run(url: str, messages_per_run: int, rounds: int, rate: int) -> None:
    client = new_pulsar_client(
        url, operation_timeout_seconds=30, io_threads=1,
        logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Warn),
    )  # fmt: skip
    try:
        check_none_callback(client)
        print("public Producer.send_async(content, None, ...): accepted, message persisted")
        next_id = 1
        for way in WAYS:  # warm-up, not counted
            measure(client, way, payloads(messages_per_run // 5, next_id), rate)
            next_id += messages_per_run
        costs: dict[str, list[Cost]] = {way.name: [] for way in WAYS}
        handover: dict[str, list[float]] = {way.name: [] for way in WAYS}
        for r in range(rounds):
            # Alternate the order so that no way always runs first.
            order = WAYS if r % 2 == 0 else WAYS[::-1]
            for way in order:
                batch = payloads(messages_per_run, next_id)
                next_id += messages_per_run
                costs[way.name].append(measure(client, way, batch, rate))
                handover[way.name].append(measure_handover(way, batch))
            line = "  ".join(
                f"{n} {c[-1].thread_ns:.0f}/{c[-1].process_ns:.0f}/{handover[n][-1]:.0f}"
                for n, c in costs.items()
            )
            print(f"round {r + 1}: ns/msg thread/process/hand-over  {line}", flush=True)
        pace = f"{rate:,} msg/s" if rate else "all at once"
        report(costs, handover, f"{rounds} interleaved rounds of {messages_per_run:,} messages"
               f" sent {pace}, in batches of {BATCH}")  # fmt: skip
    finally:
        client.close()


def _median_ratio(runs: list[float], base: list[float]) -> float:
    # Ratios within each round, where both ways ran under the same machine load.
    return statistics.median(c / b for c, b in zip(runs, base, strict=True))


def report(costs: dict[str, list[Cost]], handover: dict[str, list[float]], what: str) -> None:
    print(f"\nmedians over {what}; ns per message (x: the median ratio to private per round)")
    print(f"{'way':<14} {'sending thread':>20} {'process':>20} {'hand-over only':>20}")
    threads = {n: [c.thread_ns for c in runs] for n, runs in costs.items()}
    processes = {n: [c.process_ns for c in runs] for n, runs in costs.items()}
    for name in costs:
        cells = [
            f"{statistics.median(series[name]):>12.0f} "
            f"{_median_ratio(series[name], series['private']):>6.2f}x"
            for series in (threads, processes, handover)
        ]
        print(f"{name:<14} " + " ".join(cells))
    extra = statistics.median(handover["public"]) - statistics.median(handover["private"])
    share = extra / statistics.median(processes["private"])
    print(f"public - private hand-over: {extra:.0f} ns/msg, {share:.0%} of private's process CPU")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=20_000, help="per way and round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--rate", type=int, default=10_000, help="msg/s; 0: all at once")
    args = parser.parse_args()
    url = os.environ.get("FEEDFLEET_PULSAR_URL")
    if url:
        run(url, args.messages, args.rounds, args.rate)
        return
    with tempfile.TemporaryDirectory(prefix="send-cost-") as tmp:
        port = free_port()
        broker = EmbeddedProcess(
            pulsar_command(port, Path(tmp) / "pulsar"), port, Path(tmp) / "pulsar.log"
        )
        broker.start()
        try:
            run(f"pulsar://127.0.0.1:{port}", args.messages, args.rounds, args.rate)
        finally:
            broker.stop()


if __name__ == "__main__":
    main()
