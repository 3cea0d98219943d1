"""The write-ahead journal: restart, torn tails, a full disk, cursors and clean-up."""

from __future__ import annotations

import asyncio
import errno
import os
import re
import struct
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
from structlog.testing import capture_logs

from common import journal as journal_module
from common.events import Event, build_events
from common.journal import KIND_EVENTS, KIND_STATE, Journal, JournalFull
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


_OPENED: list[Journal] = []


@pytest.fixture(autouse=True)
def _close_journals() -> Iterator[None]:
    """Journals hold raw descriptors (segment, cursors, lock): close them after each test."""
    yield
    while _OPENED:
        _OPENED.pop().close()


def _open(path: Path, **kwargs: object) -> Journal:
    journal = Journal(path, SINKS, **kwargs)  # type: ignore[arg-type]
    journal.open()
    _OPENED.append(journal)
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
    filler.write_bytes(b"x" * 2_500_000)
    journal = _open(tiny_disk / "j", segment_bytes=400_000)  # it fills in the fourth segment
    appended = 0
    with pytest.raises(JournalFull):
        while True:
            journal.append(_events(appended, 20), [])
            appended += 20
    assert re.fullmatch(
        r"journal write failed: \[Errno 28\] "
        r"(No space left on device|short write: \d+ of \d+ bytes)",
        journal.last_error or "",
    ), journal.last_error
    bases = sorted(int(p.stem) for p in (tiny_disk / "j").glob("*.wal"))
    assert len(bases) >= 3
    ends = [*bases[1:], journal.head]
    assert [_segment(tiny_disk / "j", b).stat().st_size for b in bases] == [
        end - base for base, end in zip(bases, ends, strict=True)
    ]  # no half record left behind
    # Cursors are rewritten in place, so they still work on the full disk.
    journal.acknowledge("pulsar", journal.head)
    journal.flush_cursors()
    # Space comes back: appends go on, and everything reads back whole after a restart.
    filler.unlink()
    journal.append(_events(appended, 20), [])
    appended += 20
    assert journal.last_error is None
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


# ---------------------------------------------------------------- on-disk format and recovery


def _rejected(start: int, n: int, stream: str = "T.JRN") -> list[Event]:
    """Dead-letters: records whose price no column can hold."""
    rejected: list[Event] = []
    records = [
        RawMarketData(
            symbol="BAD", provider="journal-test", timestamp_ns=T0 + i,
            data_type=DataType.TRADE, price=1e13, provider_sequence=i, stream=stream,
            receive_ns=T0 + i,
        )
        for i in range(start, start + n)
    ]  # fmt: skip
    assert build_events(records, T0, rejected) == []
    return rejected


def _records_in(segment: Path) -> list[tuple[int, bytes]]:
    """(kind, body) of each record of a segment, read by the documented layout
    ``<length u32><crc32 u32><kind u8>`` then ``length`` bytes of body."""
    data = segment.read_bytes()
    records = []
    offset = 0
    while offset < len(data):
        length, crc, kind = struct.unpack_from("<IIB", data, offset)
        body = data[offset + 9 : offset + 9 + length]
        assert zlib.crc32(body) == crc, f"bad checksum at {offset} of {segment.name}"
        records.append((kind, body))
        offset += 9 + length
    return records


def _segment(directory: Path, base: int) -> Path:
    return directory / f"{base:020d}.wal"


def _cursor_file(position: int) -> bytes:
    """A ``<sink>.ack`` file: the position (u64) and the crc32 of its 8 bytes."""
    return struct.pack("<QI", position, zlib.crc32(position.to_bytes(8, "little")))


def _same(a: list[Event], b: list[Event]) -> None:
    """What a replay must give back: ids, payloads, rows, times, sequence and position."""

    def key(e: Event) -> tuple[object, ...]:
        return (
            e.event_id, e.payload, e.copy_row, e.receive_ns, e.stream, e.sequence,
            e.rejected, e.position,
        )  # fmt: skip

    assert [key(e) for e in a] == [key(e) for e in b]


def test_a_record_on_disk_is_length_checksum_kind_and_body(tmp_path: Path) -> None:
    directory = tmp_path / "journals" / "polygon"  # created with its parents
    journal = _open(directory)
    assert (journal.head, journal.appended_events, journal.last_error) == (0, 0, None)
    assert sorted(p.name for p in directory.iterdir()) == [
        "00000000000000000000.wal", "LOCK", "postgres.ack", "pulsar.ack",
    ]  # fmt: skip
    events, rejected = _events(0, 2), _rejected(10, 2)
    batch = journal.append(events, rejected)
    assert (batch.events, batch.rejected, batch.end, len(batch)) == (
        events, rejected, journal.head, 4,
    )  # fmt: skip
    segment = _segment(directory, 0)
    assert segment.stat().st_size == journal.head
    ((kind, body),) = _records_in(segment)
    assert kind == 1 and segment.read_bytes()[8] == 1  # KIND_EVENTS
    lines = body.split(b"\n")
    assert orjson.loads(lines[0]) == [
        2, [[e.receive_ns, e.sequence, e.stream] for e in events + rejected],
    ]  # fmt: skip
    assert lines[1:] == [e.payload for e in events + rejected] + [b""]
    more = journal.append(_events(2, 3), [])
    assert journal.appended_events == 7 and journal.last_error is None
    # The sequence state opens a segment; the records after it are events only.
    assert [kind for kind, _ in _records_in(segment)] == [KIND_EVENTS, KIND_EVENTS]
    # Positions are unique and increasing, and a replay gives each event the same one.
    positions = [e.position for e in events + rejected + more.events]
    assert positions == sorted(set(positions)) and positions[0] > 0
    back = journal.read(0, 100)
    _same(back.events, events + more.events)
    _same(back.rejected, rejected)
    assert all(e.rejected for e in back.rejected) and not any(e.rejected for e in back.events)


def test_segments_are_named_by_their_first_position(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    journal = _open(directory)
    first = journal.append(_events(0, 5), [])
    journal.segment_bytes = 3 * first.end  # about three records a segment
    bases = [0]
    for i in range(1, 12):
        if journal.head - bases[-1] >= journal.segment_bytes:
            bases.append(journal.head)  # a full segment: the next append starts another
        journal.append(_events(i * 5, 5), [])
    assert len(bases) >= 4
    assert sorted(p.name for p in directory.glob("*.wal")) == [
        _segment(directory, b).name for b in bases
    ]
    ends = [*bases[1:], journal.head]
    assert [_segment(directory, b).stat().st_size for b in bases] == [
        end - base for base, end in zip(bases, ends, strict=True)
    ]
    assert _ids(journal.read(0, 10_000).events) == _ids(_events(0, 60))
    # Data files, not programs: nothing in the directory is executable.
    assert [p.name for p in directory.iterdir() if p.stat().st_mode & 0o111] == []


def test_a_new_segment_opens_with_the_sequence_state(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    journal = _open(directory)
    journal.sequence_snapshot = lambda: {"T.OLD": 7, "T.JRN": 2}
    first = journal.append(_events(0, 3), [])
    journal.segment_bytes = first.end  # a segment that holds exactly that record is full
    second = journal.append(_events(3, 3), _rejected(6, 1))
    assert [kind for kind, _ in _records_in(_segment(directory, 0))] == [KIND_EVENTS]
    records = _records_in(_segment(directory, first.end))
    assert [kind for kind, _ in records] == [KIND_STATE, KIND_EVENTS]
    assert orjson.loads(records[0][1]) == {"T.OLD": 7, "T.JRN": 2}
    back = journal.read(first.end, 100)
    _same(back.events + back.rejected, second.events + second.rejected)
    assert back.end == second.end == journal.head


def test_a_cursor_is_its_position_and_checksum_rewritten_in_place(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    journal = _open(directory)
    ack = directory / "pulsar.ack"
    assert ack.read_bytes() == _cursor_file(0)  # written when created
    batch = journal.append(_events(0, 5), [])
    journal.acknowledge("pulsar", batch.end)
    journal.acknowledge("pulsar", 10)  # a late, older acknowledgement never moves it back
    assert journal.acked("pulsar") == batch.end
    inode = ack.stat().st_ino
    journal.flush_cursors()
    assert ack.read_bytes() == _cursor_file(batch.end)
    assert ack.stat().st_ino == inode  # the same file: no new inode needed on a full disk
    assert (directory / "postgres.ack").read_bytes() == _cursor_file(0)
    journal.close()
    again = Journal(directory, SINKS)
    with capture_logs() as logs:
        assert again.open().backlog_events == {"pulsar": 0, "postgres": 5}
    assert logs == []  # a clean restart raises no alarm
    assert (again.acked("pulsar"), again.acked("postgres")) == (batch.end, 0)


@pytest.mark.parametrize("damage", ["checksum", "short", "past_head", "before_oldest"])
def test_a_damaged_or_stale_cursor_replays_more_never_less(tmp_path: Path, damage: str) -> None:
    directory = tmp_path / "j"
    journal = _open(directory)
    first = journal.append(_events(0, 5), [])
    journal.segment_bytes = first.end
    batches = [first] + [journal.append(_events(i * 5, 5), []) for i in (1, 2)]
    if damage == "before_oldest":
        for sink in SINKS:
            journal.acknowledge(sink, batches[1].end)
        assert journal.collect() == 2
    journal.close()
    oldest = batches[1].end if damage == "before_oldest" else 0
    ack = directory / "pulsar.ack"
    ack.write_bytes(
        {
            "checksum": _cursor_file(first.end)[:8] + b"\0\0\0\0",
            "short": _cursor_file(first.end)[:5],
            "past_head": _cursor_file(batches[-1].end + 1000),  # its tail was cut
            "before_oldest": _cursor_file(0),  # its segments were collected meanwhile
        }[damage]
    )
    again = Journal(directory, SINKS)
    recovered = again.open()
    if damage == "past_head":
        assert again.acked("pulsar") == again.head == batches[-1].end
        assert recovered.backlog_events["pulsar"] == 0
    else:
        assert again.acked("pulsar") == oldest
        expected = _events(10, 5) if oldest else _events(0, 15)
        assert _ids(again.read(oldest, 1000).events) == _ids(expected)
        assert recovered.backlog_events["pulsar"] == len(expected)
    if damage == "short":
        assert ack.read_bytes() == _cursor_file(0)  # made whole again at once


def _framed(body: bytes, kind: int = KIND_EVENTS, crc: int | None = None) -> bytes:
    return struct.pack("<IIB", len(body), zlib.crc32(body) if crc is None else crc, kind) + body


@pytest.mark.parametrize(
    "tail",
    [
        b"\x40\x00\x00\x00\x01",  # part of a header
        _framed(b"[0,[]]\n", crc=12345),  # a whole record whose checksum does not hold
        _framed(b"[0,[]]\n", kind=7),  # a checksum that holds over an unknown kind
    ],
    ids=["part_of_a_header", "bad_checksum", "unknown_kind"],
)
def test_a_tail_that_is_not_a_whole_record_is_cut(tmp_path: Path, tail: bytes) -> None:
    journal = _open(tmp_path / "j")
    journal.append(_events(0, 4), [])
    head = journal.head
    journal.close()
    segment = _segment(tmp_path / "j", 0)
    with open(segment, "ab") as f:
        f.write(tail)
    again = Journal(tmp_path / "j", SINKS)
    with capture_logs() as logs:
        recovered = again.open()
    assert (recovered.truncated_bytes, again.head, segment.stat().st_size) == (
        len(tail), head, head,
    )  # fmt: skip
    assert logs == [
        {
            "event": "journal_torn_tail_cut", "segment": segment.name, "bytes": len(tail),
            "log_level": "warning",
        }
    ]  # fmt: skip
    assert recovered.sequences == {"T.JRN": 3}
    again.append(_events(4, 2), [])
    assert _ids(again.read(0, 100).events) == _ids(_events(0, 6))


def test_a_crash_right_after_starting_a_segment_keeps_the_sequence_state(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    journal = _open(directory)
    journal.sequence_snapshot = lambda: {"T.OLD": 7}
    first = journal.append(_events(0, 5), [])
    journal.segment_bytes = first.end  # every append starts a new segment
    second = journal.append(_events(5, 5), [])
    journal.append(_events(10, 5), [])
    for sink in SINKS:
        journal.acknowledge(sink, first.end)
    assert journal.collect() == 1  # two segments are left
    journal.close()
    last = _segment(directory, second.end)
    with open(last, "r+b") as f:
        f.truncate(5)  # only part of the new segment's first record reached the disk
    again = Journal(directory, SINKS)
    recovered = again.open()
    assert (recovered.truncated_bytes, again.head) == (5, second.end)
    # The state is the segment before's: its state record and its events.
    assert recovered.sequences == {"T.OLD": 7, "T.JRN": 9}
    assert recovered.backlog_events == {"pulsar": 5, "postgres": 5}
    again.sequence_snapshot = lambda: dict(recovered.sequences)  # as the worker restores it
    again.append(_events(20, 2, stream="T.NEW"), [])
    assert [kind for kind, _ in _records_in(last)] == [KIND_STATE, KIND_EVENTS]
    again.close()
    assert Journal(directory, SINKS).open().sequences == {"T.OLD": 7, "T.JRN": 9, "T.NEW": 21}


def test_damage_in_old_segments_costs_only_the_damaged_records(tmp_path: Path) -> None:
    """A flipped byte loses the rest of its segment, a missing segment its bytes, and a
    segment cut short its last record; every other record is read, once, in order."""
    directory = tmp_path / "j"
    journal = _open(directory)
    first = journal.append(_events(0, 5), [])
    journal.segment_bytes = first.end  # one record a segment (after the state record)
    batches = [first] + [journal.append(_events(i * 5, 5), []) for i in range(1, 6)]
    bases = [0] + [b.end for b in batches[:-1]]
    flipped = _segment(directory, bases[1])
    data = bytearray(flipped.read_bytes())
    data[10] ^= 0xFF  # inside its state record
    flipped.write_bytes(bytes(data))
    _segment(directory, bases[2]).unlink()
    cut = _segment(directory, bases[3])
    ((_, state), _) = _records_in(cut)
    state_end = bases[3] + 9 + len(state)
    with open(cut, "r+b") as f:
        f.truncate(state_end - bases[3] + 8)  # 8 bytes: not even a whole header is left
    with capture_logs() as logs:
        batch = journal.read(0, 10_000)
    assert _ids(batch.events) == _ids(_events(0, 5) + _events(20, 10))
    assert journal.skipped_bytes == (bases[3] - bases[1]) + (bases[4] - state_end)
    # Each loss is reported: which segment, from where, how many bytes.
    assert logs == [
        {
            "event": "journal_damaged_bytes_skipped", "segment": segment, "at": at,
            "bytes": end - at, "log_level": "error",
        }
        for segment, at, end in [
            (bases[1], bases[1], bases[2]),
            (bases[2], bases[2], bases[3]),
            (bases[3], state_end, bases[4]),
        ]
    ]  # fmt: skip
    assert batch.end == journal.head


@pytest.mark.parametrize("chunk", [9, 100])
def test_records_longer_than_a_read_chunk_are_read_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    """Segments are read a chunk at a time (4 MiB): a record across a chunk's end is not
    damage. Small chunks here make every record cross one."""
    monkeypatch.setattr(journal_module, "_READ_CHUNK", chunk)
    journal = _open(tmp_path / "j", segment_bytes=2048)
    for i in range(8):
        journal.append(_events(i * 5, 5), [])
    assert len(list((tmp_path / "j").glob("*.wal"))) > 2
    assert _ids(journal.read(0, 10_000).events) == _ids(_events(0, 40))
    got: list[Event] = []
    position = 0
    while position < journal.head:  # a sink catching up a few events at a time
        batch = journal.read(position, 3)
        got += batch.events
        position = batch.end
    assert _ids(got) == _ids(_events(0, 40))
    assert journal.skipped_bytes == 0


def test_a_line_that_cannot_be_rebuilt_costs_only_itself(tmp_path: Path) -> None:
    journal = _open(tmp_path / "j")
    journal.append(_events(0, 2), [])
    journal.close()
    a, b = _events(2, 2)
    meta = orjson.dumps([3, [[e.receive_ns, e.sequence, e.stream] for e in (a, a, b)]])
    bad = orjson.dumps({"event_id": "no-raw-data", "note": "x" * 300})
    body = b"\n".join([meta, a.payload, bad, b.payload, b""])
    with open(_segment(tmp_path / "j", 0), "ab") as f:
        f.write(_framed(body))
    again = _open(tmp_path / "j")
    again.append(_events(4, 1), [])
    with capture_logs() as logs:
        assert _ids(again.read(0, 100).events) == _ids(_events(0, 5))
    assert logs == [
        {
            "event": "journal_line_unreadable", "error": "'raw_data'", "line": bad[:200],
            "log_level": "error",
        }
    ]  # fmt: skip


def test_a_record_whose_metadata_cannot_be_read_is_passed_over(tmp_path: Path) -> None:
    """Its checksum held, so it is no damage to skip past but a bug to report: the reader
    logs it and goes on with the next record."""
    directory = tmp_path / "j"
    journal = _open(directory)
    journal.append(_events(0, 2), [])
    journal.close()
    with open(_segment(directory, 0), "ab") as f:
        f.write(_framed(b"[1, [[1, 2, 3]], 4]\n{}\n"))
    # The next segment, written the same way as the journal does: state, then events.
    (event,) = _events(2, 1)
    body = orjson.dumps([1, [[event.receive_ns, event.sequence, event.stream]]])
    second = _framed(b"{}", KIND_STATE) + _framed(body + b"\n" + event.payload + b"\n")
    _segment(directory, _segment(directory, 0).stat().st_size).write_bytes(second)
    again = _open(directory)
    with capture_logs() as logs:
        assert _ids(again.read(0, 100).events) == _ids(_events(0, 3))
    assert again.skipped_bytes == 0
    assert logs == [
        {
            "event": "journal_record_unreadable", "error": "too many values to unpack (expected 2)",
            "log_level": "error",
        }
    ]  # fmt: skip


def test_a_cursor_that_cannot_be_written_is_written_at_the_next_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It only costs a longer replay after a crash: nothing is raised to the sinks."""
    directory = tmp_path / "j"
    journal = _open(directory)
    batch = journal.append(_events(0, 5), [])
    journal.acknowledge("pulsar", batch.end)

    def failing(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "pwrite", failing)
    with capture_logs() as logs:
        journal.flush_cursors()
    assert (directory / "pulsar.ack").read_bytes() == _cursor_file(0)
    assert logs == [
        {
            "event": "journal_cursor_write_failed", "sink": "pulsar",
            "error": "[Errno 5] Input/output error", "log_level": "warning",
        }
    ]  # fmt: skip
    monkeypatch.undo()
    journal.flush_cursors()
    assert (directory / "pulsar.ack").read_bytes() == _cursor_file(batch.end)


def test_a_read_stops_after_the_record_that_reaches_max_events(tmp_path: Path) -> None:
    """Rejected records count like events, and records are never split."""
    journal = _open(tmp_path / "j")
    batches = [journal.append(_events(i * 2, 2), _rejected(100 + i * 2, 2)) for i in range(3)]
    first = journal.read(0, 4)
    assert (len(first.events), len(first.rejected), len(first), first.end) == (
        2, 2, 4, batches[0].end,
    )  # fmt: skip
    rest = journal.read(first.end, 5)  # five is reached inside the third record
    assert (len(rest), rest.end) == (8, journal.head)
    _same(rest.rejected, batches[1].rejected + batches[2].rejected)
    journal.close()
    again = Journal(tmp_path / "j", SINKS)
    assert again.open().backlog_events == {"pulsar": 12, "postgres": 12}


# ---------------------------------------------------------------- clean-up, cap and full disk


def test_a_segment_goes_as_soon_as_every_cursor_reaches_the_next_one(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    journal = _open(directory, segment_bytes=2048)
    for i in range(12):
        journal.append(_events(i * 5, 5), [])
    bases = sorted(int(p.stem) for p in directory.glob("*.wal"))
    assert len(bases) >= 4
    for sink in SINKS:
        journal.acknowledge(sink, bases[2] - 1)
    assert journal.collect() == 1  # the second segment still holds a byte not acknowledged
    _segment(directory, bases[1]).unlink()  # already gone (removed by hand): no matter
    for sink in SINKS:
        journal.acknowledge(sink, bases[2])  # exactly the start of the third segment
    assert journal.collect() == 1
    assert sorted(int(p.stem) for p in directory.glob("*.wal")) == bases[2:]
    assert journal.size_bytes == journal.head - bases[2]
    for sink in SINKS:
        journal.acknowledge(sink, journal.head)
    assert journal.collect() == len(bases) - 3
    assert journal.collect() == 0
    assert [int(p.stem) for p in directory.glob("*.wal")] == [bases[-1]]


def test_the_cap_takes_records_up_to_exactly_max_bytes(tmp_path: Path) -> None:
    scratch = _open(tmp_path / "scratch")
    for i in range(3):
        scratch.append(_events(i * 5, 5), [])
    cap = scratch.head  # the same three records fill exactly this much
    journal = _open(tmp_path / "j", max_bytes=cap)
    for i in range(3):
        journal.append(_events(i * 5, 5), [])
    with pytest.raises(JournalFull, match=f"^journal is at its cap of {cap} bytes$"):
        journal.append(_events(15, 1), [])
    assert journal.head == cap == _segment(tmp_path / "j", 0).stat().st_size
    assert journal.appended_events == 15


def test_make_room_starts_a_new_segment_only_when_every_sink_has_everything(
    tmp_path: Path,
) -> None:
    """At the cap (or on a full disk) the segment being written is all that is left: once
    both sinks have it, a new segment lets it go and appends go on."""
    directory = tmp_path / "j"
    journal = _open(directory)
    assert not journal.make_room()  # nothing written yet: nothing to free
    first = journal.append(_events(0, 5), [])
    journal.max_bytes = first.end + first.end // 2
    with pytest.raises(JournalFull):
        journal.append(_events(5, 5), [])
    journal.acknowledge("pulsar", first.end)
    assert not journal.make_room()  # postgres still needs the segment
    assert [p.name for p in directory.glob("*.wal")] == [_segment(directory, 0).name]
    journal.acknowledge("postgres", first.end)
    assert journal.make_room()
    assert [p.name for p in directory.glob("*.wal")] == [_segment(directory, first.end).name]
    assert journal.size_bytes == 0
    assert not journal.make_room()  # the new segment is empty
    second = journal.append(_events(5, 5), [])
    assert _ids(journal.read(first.end, 100).events) == _ids(_events(5, 5))
    for sink in SINKS:
        journal.acknowledge(sink, second.end)
    # A new segment that cannot be created frees nothing, and costs nothing.
    _segment(directory, second.end).mkdir()
    assert not journal.make_room()
    _segment(directory, second.end).rmdir()
    assert journal.make_room()
    journal.append(_events(10, 5), [])
    assert _ids(journal.read(second.end, 100).events) == _ids(_events(10, 5))


def test_an_unknown_fsync_policy_is_refused(tmp_path: Path) -> None:
    expected = "fsync must be one of always, interval, never, not 'x'"
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        Journal(tmp_path / "j", SINKS, fsync="x")


def _recording_syncs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Replace fsync/fdatasync with recorders of (which, inode of the file synced)."""
    synced: list[tuple[str, int]] = []

    def recorder(which: str) -> Callable[[int], None]:
        return lambda fd: synced.append((which, os.fstat(fd).st_ino))

    monkeypatch.setattr(os, "fdatasync", recorder("data"))
    monkeypatch.setattr(os, "fsync", recorder("full"))
    return synced


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("always", [("data", 0), ("full", 0), ("data", 1)]),  # every append; a finished segment
        ("interval", [("full", 0)]),  # appends are synced by run(); a finished segment at once
        ("never", []),
    ],
)
def test_what_each_fsync_policy_syncs_while_appending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, policy: str, expected: list[tuple[str, int]]
) -> None:
    synced = _recording_syncs(monkeypatch)
    journal = _open(tmp_path / "j", fsync=policy)
    first = journal.append(_events(0, 5), [])
    journal.segment_bytes = first.end
    journal.append(_events(5, 5), [])
    inodes = [_segment(tmp_path / "j", base).stat().st_ino for base in (0, first.end)]
    assert synced == [(which, inodes[i]) for which, i in expected]


def test_a_failing_sync_stops_neither_a_new_segment_nor_a_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing)
    journal = _open(tmp_path / "j")
    first = journal.append(_events(0, 5), [])
    journal.segment_bytes = first.end
    journal.append(_events(5, 5), [])
    journal.close()
    again = _open(tmp_path / "j")  # the lock was released
    assert _ids(again.read(0, 100).events) == _ids(_events(0, 10))


def test_close_is_harmless_twice_or_before_open(tmp_path: Path) -> None:
    Journal(tmp_path / "never", SINKS).close()
    journal = _open(tmp_path / "j")
    journal.append(_events(0, 5), [])
    journal.close()
    journal.close()
    os.fstat(1)  # no descriptor but its own was closed (stdout is still open)
    assert _ids(_open(tmp_path / "j").read(0, 100).events) == _ids(_events(0, 5))


# ---------------------------------------------------------------- the background loop


def _cursor_in(directory: Path, sink: str) -> int:
    position: int = struct.unpack("<Q", (directory / f"{sink}.ack").read_bytes()[:8])[0]
    return position


async def _until(condition: Callable[[], bool], task: asyncio.Task[None], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while not condition():
        if task.done():
            raise AssertionError(f"the journal loop ended while waiting for {what}: {task!r}")
        assert loop.time() < deadline, f"no {what} within 10 s"
        await asyncio.sleep(0.001)


class _Loop:
    """``Journal.run`` in a task, and a way to know it went round: each ``turn`` moves the
    pulsar cursor by one and waits until the file shows it. Two turns mean at least one
    whole pass (write cursors, clean up, sync) ran after whatever came before."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.task = asyncio.create_task(journal.run(interval_s=0.002))
        self.mark = 0

    async def turns(self, n: int = 2) -> None:
        for _ in range(n):
            self.mark += 1
            self.journal.acknowledge("pulsar", self.mark)
            await _until(self._shown, self.task, "turn")

    def _shown(self) -> bool:
        return _cursor_in(self.journal.directory, "pulsar") == self.mark

    async def stop(self) -> None:
        assert not self.task.done(), self.task
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task


async def test_the_loop_syncs_what_was_written_once_and_collects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced = _recording_syncs(monkeypatch)
    journal = _open(tmp_path / "j", segment_bytes=2048, fsync_interval_s=0.0)
    loop = _Loop(journal)
    await loop.turns()
    assert synced == []  # nothing written, nothing to sync
    journal.append(_events(0, 5), [])
    await loop.turns()
    segment = _segment(tmp_path / "j", 0).stat().st_ino
    assert synced == [("data", segment)]
    await loop.turns()
    assert synced == [("data", segment)]  # synced once, not on every pass
    journal.append(_events(5, 5), [])
    await loop.turns()
    assert synced == [("data", segment)] * 2
    for i in range(2, 12):
        journal.append(_events(i * 5, 5), [])
    for sink in SINKS:
        journal.acknowledge(sink, journal.head)
    await _until(lambda: len(list((tmp_path / "j").glob("*.wal"))) == 1, loop.task, "clean-up")
    await loop.stop()


@pytest.mark.parametrize(
    ("policy", "interval_s", "failing"),
    [("never", 0.0, False), ("interval", 60.0, False), ("interval", 0.0, True)],
    ids=["never", "not_yet", "sync_fails"],
)
async def test_the_loop_syncs_nothing_it_should_not_and_outlives_a_failed_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, policy: str, interval_s: float, failing: bool
) -> None:
    synced = _recording_syncs(monkeypatch)
    if failing:

        def fail(fd: int) -> None:
            synced.append(("failed", fd))
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(os, "fdatasync", fail)
    journal = _open(tmp_path / "j", fsync=policy, fsync_interval_s=interval_s)
    loop = _Loop(journal)
    journal.append(_events(0, 5), [])
    await loop.turns(3)
    assert [which for which, _ in synced] == (["failed"] if failing else [])
    await loop.stop()
