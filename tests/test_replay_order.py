"""Per-symbol order through the journal, into the real broker and PostgreSQL.

Events of a few interleaved symbols are journaled while the sinks cannot deliver (not
started yet), caught up in several small chunks, then the sinks and the journal are
closed and new ones opened over the same directory: each symbol's events must arrive in
journal order, each once, across the catch-up, the live hand-over and the restart.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import defaultdict
from pathlib import Path

import orjson
import pulsar

from common import db
from common.config import PulsarAccess
from common.events import build_events
from common.journal import Batch, Journal
from common.model import DataType, RawMarketData
from common.pulsar_client import new_pulsar_client
from common.sinks.base import DurableSink
from common.sinks.postgres import PostgresSink
from common.sinks.pulsar import PulsarSink
from tests.conftest import Services
from tests.running import until

T0 = 1_800_000_000_000_000_000
SYMBOLS = ("ORDA", "ORDB", "ORDC")
SINKS = (PulsarSink.name, PostgresSink.name)


class Feed:
    """Records of interleaved symbols, each symbol numbered 1, 2, 3... in send order."""

    def __init__(self, provider: str) -> None:
        self.provider = provider
        self.rng = random.Random(11)
        self.sent: dict[str, int] = defaultdict(int)

    def append(self, journal: Journal) -> Batch:
        records = []
        for _ in range(self.rng.randint(1, 9)):  # uneven records: chunks split runs
            symbol = self.rng.choice(SYMBOLS)
            self.sent[symbol] += 1
            seq = self.sent[symbol]
            records.append(
                RawMarketData(
                    symbol=symbol,
                    provider=self.provider,
                    timestamp_ns=T0 + seq,
                    data_type=DataType.TRADE,
                    price=10.0,
                    volume=1,
                    provider_sequence=seq,
                    stream=f"T.{symbol}",
                    receive_ns=T0 + seq,
                )
            )
        return journal.append(build_events(records, T0), [])

    def expected(self) -> dict[str, list[int]]:
        return {s: list(range(1, self.sent[s] + 1)) for s in SYMBOLS}


def _sinks(services: Services, topic: str, journal: Journal) -> tuple[PulsarSink, PostgresSink]:
    # A new producer name each time: a broker that de-duplicates by producer could
    # otherwise hide a replay from before the cursor.
    publisher = PulsarSink(
        services.pulsar_url, topic, journal, producer_name=f"order-{uuid.uuid4().hex}"
    )
    store = PostgresSink(services.database_url, journal, flush_interval_s=0.02)
    for sink in (publisher, store):
        sink.replay_chunk = 12  # several catch-up deliveries (and transactions)
    return publisher, store


async def _stop(tasks: list[asyncio.Task[None]], sinks: tuple[DurableSink, ...]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for sink in sinks:
        await sink.close()


def _read_topic(url: str, topic: str, expected: int, timeout: float) -> list[tuple[str, int]]:
    """(symbol, sequence) of every message in the topic, in the broker's order."""
    client = new_pulsar_client(PulsarAccess.from_env(url), operation_timeout_seconds=10)
    try:
        consumer = client.subscribe(
            topic,
            f"order-{uuid.uuid4().hex[:8]}",
            receiver_queue_size=100_000,
            initial_position=pulsar.InitialPosition.Earliest,
        )
        got: list[tuple[str, int]] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # Everything was acknowledged before this read: once ``expected`` are in, a
            # short wait is only to see a copy that should not be there.
            wait_ms = 1000 if len(got) < expected else 300
            try:
                msg = consumer.receive(timeout_millis=wait_ms)
            except pulsar.Timeout:
                if len(got) >= expected:
                    break
                continue
            doc = orjson.loads(msg.data())
            assert msg.partition_key() == doc["raw_data"]["symbol"]
            got.append((doc["raw_data"]["symbol"], doc["metadata"]["provider_sequence"]))
            consumer.acknowledge(msg)
        consumer.close()
        return got
    finally:
        client.close()


def _per_symbol(pairs: list[tuple[str, int]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {s: [] for s in SYMBOLS}
    for symbol, seq in pairs:
        out[symbol].append(seq)
    return out


async def test_per_symbol_order_survives_replay_and_restart(
    services: Services, conn: db.Conn, tmp_path: Path
) -> None:
    provider = f"order-{uuid.uuid4().hex[:6]}"
    topic = f"persistent://public/default/order-{uuid.uuid4().hex[:8]}"
    directory = tmp_path / "journal"
    feed = Feed(provider)

    # First run: a backlog journaled before the sinks start, then live batches.
    journal = Journal(directory, SINKS)
    journal.open()
    for _ in range(15):
        feed.append(journal)
    publisher, store = _sinks(services, topic, journal)
    await publisher.start()
    tasks = [asyncio.create_task(s.run()) for s in (publisher, store)]
    try:
        await until(lambda: publisher.live and store.live, 30, "both sinks to catch up")
        for _ in range(5):
            batch = feed.append(journal)
            publisher.submit(batch)
            store.submit(batch)
        assert await publisher.drained(timeout=30)
        assert await store.drained(timeout=30)
        first_run = journal.appended_events
        assert publisher.counters.replayed == store.counters.replayed < first_run
    finally:
        await _stop(tasks, (publisher, store))
    # Journaled after the sinks stopped (still being read, sinks gone), then a restart.
    before_restart = journal.appended_events
    for _ in range(6):
        feed.append(journal)
    backlog = journal.appended_events - before_restart
    first_journal = journal.appended_events
    journal.close()

    journal = Journal(directory, SINKS)
    recovered = journal.open()
    assert recovered.backlog_events == {PulsarSink.name: backlog, PostgresSink.name: backlog}
    publisher, store = _sinks(services, topic, journal)
    await publisher.start()
    for sink in (publisher, store):
        sink.backlog = recovered.backlog_events[sink.name]
    # Submitted before the catch-up ran: these must queue behind the backlog.
    early = 0
    for _ in range(4):
        batch = feed.append(journal)
        early += len(batch)
        publisher.submit(batch)
        store.submit(batch)
    tasks = [asyncio.create_task(s.run()) for s in (publisher, store)]
    try:
        await until(lambda: publisher.live and store.live, 30, "both sinks to catch up")
        for _ in range(4):
            batch = feed.append(journal)
            publisher.submit(batch)
            store.submit(batch)
        assert await publisher.drained(timeout=30)
        assert await store.drained(timeout=30)
    finally:
        await _stop(tasks, (publisher, store))
        journal.close()
    # Resumed at the cursor: only what the first run had not acknowledged was replayed.
    assert publisher.counters.replayed == store.counters.replayed == backlog + early
    assert store.duplicates_skipped == 0

    expected = feed.expected()
    total = sum(len(v) for v in expected.values())
    assert total == first_journal + journal.appended_events

    in_topic = await asyncio.to_thread(_read_topic, services.pulsar_url, topic, total, 30)
    assert _per_symbol(in_topic) == expected, "broker order per symbol"

    cur = await conn.execute(
        "SELECT symbol, provider_sequence, xmin::text::bigint FROM raw_market_data "
        "WHERE provider = %s ORDER BY symbol, provider_sequence",
        (provider,),
    )
    rows = await cur.fetchall()
    assert _per_symbol([(r[0], r[1]) for r in rows]) == expected, "rows per symbol"
    # The table keeps no insertion order, but each delivery is its own transaction: along
    # a symbol's sequence, the inserting transaction never goes back.
    by_symbol: dict[str, list[int]] = defaultdict(list)
    for symbol, _seq, xid in rows:
        by_symbol[symbol].append(xid)
    for symbol, xids in by_symbol.items():
        assert xids == sorted(xids), f"{symbol}: a later event committed before an earlier one"
        assert len(set(xids)) >= 4, f"{symbol}: too few deliveries to show an order"
