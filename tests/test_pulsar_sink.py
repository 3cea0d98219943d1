"""The Pulsar sink against the real broker: events to the topic, rejected records to
``<topic>-dlq``, acknowledged together, each message with its journal position."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from common.events import Event, build_events
from common.journal import Journal
from common.model import DataType, RawMarketData
from common.sinks.pulsar import PulsarSink
from tests.conftest import Services
from tests.pulsar_collector import PulsarCollector
from tests.running import until

T0 = 1_800_000_000_000_000_000


def _records(n: int) -> list[RawMarketData]:
    return [
        RawMarketData(
            symbol="PLS",
            provider="pulsar-test",
            timestamp_ns=T0 + i,
            data_type=DataType.TRADE,
            price=10.0,
            volume=1,
            provider_sequence=i,
            stream="T.PLS",
            receive_ns=T0 + i,
        )
        for i in range(n)
    ]


async def test_rejected_records_go_to_the_dead_letter_topic(
    services: Services, tmp_path: Path
) -> None:
    topic = f"persistent://public/default/pls-{uuid.uuid4().hex[:8]}"
    events_in = PulsarCollector(services.pulsar_url, topic)
    dead_in = PulsarCollector(services.pulsar_url, f"{topic}-dlq")
    journal = Journal(tmp_path / "j", (PulsarSink.name,))
    journal.open()
    sink = PulsarSink(services.pulsar_url, topic, journal, producer_name=f"t-{uuid.uuid4().hex}")
    await sink.start()
    task = asyncio.create_task(sink.run())
    try:
        await until(lambda: sink.live, 10, "the sink to go live")
        records = _records(20)
        records[4].price = 1e13
        records[9].symbol = "X" * 60
        rejected: list[Event] = []
        batch = journal.append(build_events(records, T0, rejected), rejected)
        sink.submit(batch)
        assert await sink.drained(timeout=30)
        assert sink.counters.acked == 20 and sink.counters.dead_lettered == 2
        assert journal.acked(PulsarSink.name) == batch.end
        assert await events_in.wait_for(18, 30) == 18
        assert await dead_in.wait_for(2, 30) == 2
        reasons = sorted(e.doc["reason"] for e in dead_in.events.values())
        assert reasons[0].startswith("price 10000000000000.0 is outside")
        assert reasons[1] == "symbol of 60 characters (at most 50)"
        assert not set(dead_in.events) & set(events_in.events)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sink.close()
        events_in.close()
        dead_in.close()
