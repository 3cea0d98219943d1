"""The private pulsar-client surface the Pulsar sink relies on, checked on the installed
client.

``common/sinks/pulsar.py`` builds each message with ``_pulsar.MessageBuilder`` and hands
it to ``pulsar.Producer._producer.send_async(message, callback_or_None)``, a callback on
the last message of a batch only: cheaper than the public ``Producer.send_async`` (see
``python -m tests.pulsar_send_cost``). Neither name is public, so pyproject.toml bounds
pulsar-client to the versions these tests passed on; an upgrade that changes them fails
here, by name, rather than in the sink at run time.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import _pulsar
import pulsar
import pytest

from common.config import PulsarAccess
from common.events import EVENT_TYPE, Event
from common.pulsar_client import new_pulsar_client
from common.sinks.pulsar import _message
from tests.conftest import Services

BUILDER_METHODS = ("content", "property", "partition_key", "sequence_id", "build")


def _what_to_do(problem: str) -> str:
    return (
        f"{problem} (pulsar-client {pulsar.__version__}). The Pulsar sink "
        "(common/sinks/pulsar.py, _send_all and _message) builds messages with "
        "_pulsar.MessageBuilder and sends them with the private "
        "pulsar.Producer._producer.send_async(message, callback or None). Re-run "
        "`python -m tests.pulsar_send_cost` on this version, then adapt _send_all/_message "
        "to its private surface, or switch them to the public Producer.send_async if it "
        "costs no more; and move the pulsar-client bound in pyproject.toml."
    )


@dataclass(frozen=True)
class Sent:
    payload: bytes
    key: str
    sequence_id: int


@pytest.fixture
def client(services: Services) -> Iterator[pulsar.Client]:
    c = new_pulsar_client(PulsarAccess.from_env(services.pulsar_url), operation_timeout_seconds=10)
    yield c
    c.close()


def _sink_like_producer(client: pulsar.Client, topic: str) -> Any:
    # Configured as the sink's (common/sinks/pulsar.py, _connect).
    return client.create_producer(
        topic, producer_name=f"surface-{uuid.uuid4().hex[:8]}", block_if_queue_full=True,
        batching_enabled=True, batching_max_publish_delay_ms=1, batching_max_messages=1000,
        send_timeout_millis=0,
    )  # fmt: skip


def _built(sent: Sent) -> Any:
    """The message the sink's own ``_message`` builds for an event like ``sent``."""
    event = Event(
        "e", sent.key, sent.payload, b"", 0, 0, position=sent.sequence_id
    )  # fmt: skip
    try:
        return _message(event)
    except Exception as exc:
        pytest.fail(_what_to_do(f"building a message with _pulsar.MessageBuilder failed: {exc!r}"))


def test_message_builder_has_what_the_sink_calls() -> None:
    builder = getattr(_pulsar, "MessageBuilder", None)
    if builder is None:
        pytest.fail(_what_to_do("_pulsar.MessageBuilder is gone"))
    missing = [name for name in BUILDER_METHODS if not callable(getattr(builder, name, None))]
    if missing:
        pytest.fail(_what_to_do(f"_pulsar.MessageBuilder has no {', '.join(missing)}"))
    message = _built(Sent(b"{}", "SYM", 1))
    if not isinstance(message, _pulsar.Message):
        pytest.fail(_what_to_do(f"MessageBuilder.build() returned a {type(message).__name__}"))


def _underlying_send(producer: Any) -> Any:
    underlying = getattr(producer, "_producer", None)
    if underlying is None:
        pytest.fail(_what_to_do("a producer from Client.create_producer has no _producer"))
    send = getattr(underlying, "send_async", None)
    if not callable(send):
        pytest.fail(_what_to_do("Producer._producer has no send_async"))
    return send


def test_producer_has_the_underlying_send_async(services: Services, client: pulsar.Client) -> None:
    topic = f"persistent://public/default/surface-{uuid.uuid4().hex[:8]}"
    producer = _sink_like_producer(client, topic)
    try:
        _underlying_send(producer)
    finally:
        producer.close()


def test_messages_sent_through_it_arrive_intact(services: Services, client: pulsar.Client) -> None:
    """One message without a callback, then one with: both are acknowledged with their own
    sequence id and reach a consumer with payload, key and property. (The Python consumer
    does not show a message's sequence id: it is checked on the broker's receipt, as the
    producer's ``last_sequence_id``, each message flushed alone so that its receipt is
    its own.)"""
    topic = f"persistent://public/default/surface-{uuid.uuid4().hex[:8]}"
    sent = [
        Sent(b'{"event_id": "a", "n": 1}', "AAPL", 7_000_041),
        Sent(b'{"event_id": "b", "n": 2}', "MSFT", 7_000_107),
    ]
    receipts: list[Any] = []
    received_receipt = threading.Event()

    def on_receipt(result: Any, _msg_id: Any) -> None:
        receipts.append(result)
        received_receipt.set()

    producer = _sink_like_producer(client, topic)
    try:
        underlying_send = _underlying_send(producer)
        for message, callback in zip(sent, (None, on_receipt), strict=True):
            try:
                underlying_send(_built(message), callback)
            except Exception as exc:
                kind = "None" if callback is None else "a callable"
                pytest.fail(_what_to_do(f"Producer._producer.send_async(message, {kind}): {exc!r}"))
            if callback is None:
                producer.flush()
            elif not received_receipt.wait(15):
                pytest.fail(_what_to_do("no receipt within 15 s for the message with a callback"))
            last = producer.last_sequence_id()
            assert last == message.sequence_id, _what_to_do(
                f"the broker acknowledged sequence id {last}, not {message.sequence_id}: "
                "MessageBuilder.sequence_id no longer reaches the broker"
            )
        assert receipts == [pulsar.Result.Ok], _what_to_do(f"receipt {receipts}")
    finally:
        producer.close()

    consumer = client.subscribe(
        topic, f"surface-{uuid.uuid4().hex[:8]}", receiver_queue_size=100_000,
        initial_position=pulsar.InitialPosition.Earliest,
    )  # fmt: skip
    got = []
    for _ in sent:
        try:
            msg = consumer.receive(timeout_millis=15_000)
        except pulsar.Timeout:
            break
        got.append((msg.data(), msg.partition_key(), msg.properties()))
        consumer.acknowledge(msg)
    consumer.close()
    expected = [(s.payload, s.key, {"event_type": EVENT_TYPE}) for s in sent]
    assert got == expected, _what_to_do(
        "the messages sent through Producer._producer.send_async (first with None as "
        f"callback) arrived as {got}, not {expected}"
    )
