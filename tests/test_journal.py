"""The write-ahead journal: restart, torn tails, a full disk, cursors and clean-up."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import orjson
import pytest

from common.events import Event, build_events
from common.journal import Journal, JournalFull
from common.model import DataType, RawMarketData

T0 = 1_800_000_000_000_000_000
SINKS = ("pulsar", "postgres")


def _events(start: int, n: int, stream: str = "T.JRN") -> list[Event]:
    records = [
        RawMarketData(
            symbol="JRN",
            provider="journal-test",
            timestamp_ns=T0 + i,
            data_type=DataType.TRADE,
            price=10.0 + i,
            volume=1,
            provider_sequence=i,
            stream=stream,
            receive_ns=T0 + i,
        )
        for i in range(start, start + n)
    ]
    return build_events(records, T0)


def _open(path: Path, **kwargs: object) -> Journal:
    journal = Journal(path, SINKS, **kwargs)  # type: ignore[arg-type]
    journal.open()
    return journal


def _ids(events: list[Event]) -> list[str]:
    return [e.event_id for e in events]


def test_a_killed_writer_loses_nothing_and_replays_per_sink(tmp_path: Path) -> None:
    """kill -9 after appending: each sink gets exactly what it had not acknowledged."""
    directory = tmp_path / "j"
    child = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from tests.test_journal import _events, _open
        from pathlib import Path
        journal = _open(Path({str(directory)!r}))
        first = journal.append(_events(0, 100), [])
        journal.append(_events(100, 100), [])
        journal.acknowledge("pulsar", first.end)
        journal.flush_cursors()
        journal.append(_events(200, 50), [])
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr.decode()
    journal = _open(directory)
    pulsar = journal.read(journal.acked("pulsar"), 10_000)
    postgres = journal.read(journal.acked("postgres"), 10_000)
    assert _ids(pulsar.events) == _ids(_events(100, 150))
    assert _ids(postgres.events) == _ids(_events(0, 250))
    assert pulsar.end == postgres.end == journal.head


def test_sequence_state_survives_a_restart_and_a_new_segment(tmp_path: Path) -> None:
    journal = _open(tmp_path / "j", segment_bytes=4096)
    state = {"T.OLD": 7}
    journal.sequence_snapshot = lambda: dict(state)
    for i in range(20):  # several segments, each opened with the state
        journal.append(_events(i * 10, 10), [])
    journal.close()
    again = Journal(tmp_path / "j", SINKS, segment_bytes=4096)
    recovered = again.open()
    assert recovered.sequences == {"T.OLD": 7, "T.JRN": 199}
    assert recovered.backlog_events == {"pulsar": 200, "postgres": 200}


def test_a_torn_tail_is_cut_and_appends_go_on(tmp_path: Path) -> None:
    journal = _open(tmp_path / "j")
    journal.append(_events(0, 10), [])
    head = journal.head
    journal.close()
    segment = next((tmp_path / "j").glob("*.wal"))
    with open(segment, "ab") as f:
        f.write(b"\x40\x00\x00\x00half a record")  # a write cut short by a crash
    again = Journal(tmp_path / "j", SINKS)
    assert again.open().truncated_bytes == 17
    assert again.head == head
    again.append(_events(10, 5), [])
    batch = again.read(0, 1000)
    assert _ids(batch.events) == _ids(_events(0, 15))
    assert again.skipped_bytes == 0


def test_damaged_bytes_in_an_old_segment_are_skipped_not_retried(tmp_path: Path) -> None:
    journal = _open(tmp_path / "j", segment_bytes=2048)
    for i in range(10):
        journal.append(_events(i * 5, 5), [])
    first, second = sorted((tmp_path / "j").glob("*.wal"))[:2]
    lost = journal.count_events(0) - journal.count_events(int(second.stem))
    data = bytearray(first.read_bytes())
    data[40] ^= 0xFF  # inside the first record's body: its checksum no longer holds
    first.write_bytes(bytes(data))
    batch = journal.read(0, 10_000)
    assert journal.skipped_bytes == len(data)
    assert batch.end == journal.head
    assert _ids(batch.events) == _ids(_events(lost, 50 - lost))


def test_segments_go_once_every_sink_has_passed_them(tmp_path: Path) -> None:
    journal = _open(tmp_path / "j", segment_bytes=2048)
    batches = [journal.append(_events(i * 5, 5), []) for i in range(12)]
    segments = len(list((tmp_path / "j").glob("*.wal")))
    assert segments > 3
    journal.acknowledge("pulsar", batches[-1].end)
    assert journal.collect() == 0  # postgres has not passed any
    journal.acknowledge("postgres", batches[5].end)
    assert journal.collect() > 0
    left = journal.read(journal.acked("postgres"), 10_000)
    assert _ids(left.events) == _ids(_events(30, 30))
    journal.acknowledge("postgres", batches[-1].end)
    journal.collect()
    assert len(list((tmp_path / "j").glob("*.wal"))) == 1  # the one being written stays


def test_a_second_worker_cannot_open_the_same_journal(tmp_path: Path) -> None:
    _open(tmp_path / "j")
    with pytest.raises(RuntimeError, match="in use by another worker"):
        _open(tmp_path / "j")


def test_the_size_cap_refuses_an_append_whole(tmp_path: Path) -> None:
    journal = _open(tmp_path / "j", max_bytes=20_000)
    with pytest.raises(JournalFull):
        for i in range(1000):
            journal.append(_events(i * 5, 5), [])
    head = journal.head
    assert sum(p.stat().st_size for p in (tmp_path / "j").glob("*.wal")) == head
    assert len(journal.read(0, 100_000).events) == i * 5


def test_a_full_disk_never_tears_the_journal(tiny_disk: Path) -> None:
    filler = tiny_disk / "filler"
    filler.write_bytes(b"x" * 3_500_000)
    journal = _open(tiny_disk / "j")
    appended = 0
    with pytest.raises(JournalFull):
        while True:
            journal.append(_events(appended, 20), [])
            appended += 20
    assert "[Errno 28]" in (journal.last_error or "")
    segment = next((tiny_disk / "j").glob("*.wal"))
    assert segment.stat().st_size == journal.head  # no half record left behind
    # Cursors are rewritten in place, so they still work on the full disk.
    journal.acknowledge("pulsar", journal.head)
    journal.flush_cursors()
    # Space comes back: appends go on, and everything reads back whole after a restart.
    filler.unlink()
    journal.append(_events(appended, 20), [])
    appended += 20
    journal.close()
    again = Journal(tiny_disk / "j", SINKS)
    recovered = again.open()
    assert recovered.truncated_bytes == 0
    assert recovered.backlog_events == {"pulsar": 20, "postgres": appended}
    assert _ids(again.read(0, 1_000_000).events) == _ids(_events(0, appended))


def test_a_read_held_by_a_full_disk_is_journaled_once_there_is_room(tiny_disk: Path) -> None:
    """The pipeline holds a read the journal could not take and journals it first when
    room comes back, in order; a stop during the outage says how many are only in memory."""
    from common.pipeline import Pipeline
    from common.quality import QualityChecker
    from common.sinks.postgres import PostgresSink
    from common.sinks.pulsar import PulsarSink

    filler = tiny_disk / "filler"
    filler.write_bytes(b"x" * 3_800_000)
    journal = Journal(tiny_disk / "j", (PulsarSink.name, PostgresSink.name))
    journal.open()
    # Sinks that never run: they only count what they are handed.
    pipeline = Pipeline(
        QualityChecker(stale_after_s=None), journal,
        PulsarSink("pulsar://127.0.0.1:1", "t", journal),
        PostgresSink("postgresql://", journal), None,
    )  # fmt: skip
    sent = 0
    while pipeline.journal_error is None:
        pipeline.process(
            [
                RawMarketData(
                    symbol="HLD",
                    provider="held",
                    timestamp_ns=T0 + i,
                    data_type=DataType.TRADE,
                    price=1.0,
                    provider_sequence=i,
                    stream="T.HLD",
                    receive_ns=T0 + i,
                )
                for i in range(sent, sent + 50)
            ]
        )
        sent += 50
    assert pipeline.backpressure and "[Errno 28]" in pipeline.journal_error
    assert pipeline.journal_held() == 50  # still no room
    filler.unlink()
    assert pipeline.journal_held() == 0
    assert pipeline.journal_error is None and journal.appended_events == sent
    sequences = [
        orjson.loads(e.payload)["metadata"]["provider_sequence"]
        for e in journal.read(0, 1_000_000).events
    ]
    assert sequences == list(range(sent))
