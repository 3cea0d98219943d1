"""The worker's write-ahead journal: what it received, on local disk before any sink.

Every network read's events are appended as one record before the sinks see them, so a
``kill -9`` loses nothing the worker had received. Each durable sink keeps a cursor: the
journal position up to which it is acknowledged. A restarted worker replays, per sink,
everything past that sink's cursor, in order and with the same event ids. A segment is
deleted once every cursor has passed it.

Positions are byte offsets in one logical stream that never restarts (as Kafka's log
offsets); a segment file is named by the position of its first byte. Prior art: Kafka's
log segments and committed offsets, Vector's disk buffers, QuickFIX's FileStore.

Files in the journal directory:

- ``<20-digit position>.wal``: segments. A record is ``<length u32><crc32 u32><kind u8>``
  and ``length`` bytes of body. An ``EVENTS`` body is a JSON line
  ``[n_events, [[receive_ns, sequence, stream], ...]]`` then one payload per line: the
  events', then the rejected records' bound for the dead-letters; a ``STATE`` record
  opens every segment with the last sequence number seen per provider stream, so those
  survive a restart and a gap across it is flagged.
- ``<sink>.ack``: a sink's cursor, 12 bytes rewritten in place (no new file, so it still
  works on a full disk).
- ``LOCK``: an exclusive ``flock`` so two workers never share one journal.

Durability: a record reaches the OS with one ``write`` per read, which survives a process
kill. ``fsync="interval"`` (the default) also syncs to the disk every
``fsync_interval_s`` from a thread, bounding what a power cut can take; ``"always"`` syncs
every append (the rate then is the disk's), ``"never"`` leaves it to the OS.

A failed append (a full disk) is cut back to the previous record, so the journal is never
torn; ``JournalFull`` tells the caller to hold the events and retry. A record that cannot
be parsed when read back (a damaged disk) is skipped to the next segment and counted in
``skipped_bytes``, never retried in a loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import structlog

from common.events import Event, event_from_journal

log = structlog.get_logger("feedfleet.journal")

_HEADER = struct.Struct("<IIB")
_ACK = struct.Struct("<QI")
KIND_SKIPPED = 0  # damaged bytes passed over while reading
KIND_EVENTS = 1
KIND_STATE = 2
_SUFFIX = ".wal"
_READ_CHUNK = 4 * 1024**2
FSYNC_POLICIES = ("always", "interval", "never")


class JournalFull(OSError):
    """An append did not fit on the disk (or under the size cap); nothing was written."""


@dataclass(slots=True)
class Batch:
    """The events of one journal record, as the sinks receive them.

    ``end`` is the journal position just past the record: a sink that has this batch
    acknowledged moves its cursor there. ``rejected`` are records no sink may store as
    they are (see ``events.build_events``); they go to each sink's dead-letter. One batch
    goes to every sink, so it holds no sink's state.
    """

    events: list[Event]
    rejected: list[Event]
    end: int

    def __len__(self) -> int:
        return len(self.events) + len(self.rejected)


@dataclass(slots=True)
class Recovered:
    """What ``Journal.open`` found: the last sequence per stream and the unacked backlog."""

    sequences: dict[str, int] = field(default_factory=dict)
    backlog_events: dict[str, int] = field(default_factory=dict)
    truncated_bytes: int = 0


class Journal:
    def __init__(
        self, directory: Path, sinks: tuple[str, ...], *, segment_bytes: int = 64 * 1024**2,
        max_bytes: int = 2 * 1024**3, fsync: str = "interval", fsync_interval_s: float = 1.0,
    ) -> None:  # fmt: skip
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}, not {fsync!r}")
        self.directory = directory
        self.sinks = sinks
        self.segment_bytes = segment_bytes
        self.max_bytes = max_bytes
        self.fsync = fsync
        self.fsync_interval_s = fsync_interval_s
        self.head = 0  # position just past the last whole record
        self.appended_events = 0
        self.skipped_bytes = 0
        self.last_error: str | None = None
        self._segments: list[int] = []  # base positions, oldest first
        self._fd = -1
        self._lock_fd = -1
        self._acks: dict[str, int] = {}
        self._ack_fds: dict[str, int] = {}
        self._acks_written: dict[str, int] = {}
        self._dirty = False
        self._needs_state = False  # a new segment opens with the sequence state
        # The sequence state written at the top of each new segment (the quality checker's).
        self.sequence_snapshot: Callable[[], dict[str, int]] = dict

    # ------------------------------------------------------------ open and close

    def open(self) -> Recovered:
        """Lock the directory, cut a torn tail, load the cursors, recover sequence state."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.directory / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise RuntimeError(f"journal {self.directory} is in use by another worker") from None
        self._segments = sorted(
            int(p.stem) for p in self.directory.glob(f"*{_SUFFIX}") if p.stem.isdigit()
        )
        recovered = Recovered()
        if not self._segments:
            self._segments = [0]
            self._segment_path(0).touch()
        last = self._segments[-1]
        valid, sequences = self._scan_segment(last)
        path = self._segment_path(last)
        size = path.stat().st_size
        if valid < size:
            recovered.truncated_bytes = size - valid
            log.warning("journal_torn_tail_cut", segment=path.name, bytes=size - valid)
            with open(path, "r+b") as f:
                f.truncate(valid)
        if valid == 0 and len(self._segments) > 1:
            # Rolled just before a crash: the sequence state is in the segment before.
            sequences = self._scan_segment(self._segments[-2])[1]
            self._needs_state = True
        recovered.sequences = sequences
        self.head = last + valid
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        for name in self.sinks:
            self._open_cursor(name)
            recovered.backlog_events[name] = self.count_events(self._acks[name])
        return recovered

    def _open_cursor(self, name: str) -> None:
        fd = os.open(self.directory / f"{name}.ack", os.O_RDWR | os.O_CREAT, 0o644)
        raw = os.pread(fd, _ACK.size, 0)
        position = 0
        if len(raw) == _ACK.size:
            pos, crc = _ACK.unpack(raw)
            if crc == zlib.crc32(pos.to_bytes(8, "little")):
                position = pos
        # A cursor behind the oldest segment (collected meanwhile) or past the head (a cut
        # tail) is brought into range; replaying more is safe, skipping is not.
        self._acks[name] = min(max(position, self._segments[0]), self.head)
        self._acks_written[name] = self._acks[name]
        self._ack_fds[name] = fd
        if len(raw) != _ACK.size:
            self._write_cursor(name)

    def close(self) -> None:
        self.flush_cursors()
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
        for fd in self._ack_fds.values():
            os.close(fd)
        self._ack_fds.clear()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    # ------------------------------------------------------------ writing

    def append(self, events: list[Event], rejected: list[Event]) -> Batch:
        """Write one record with these events; returns the batch for the sinks."""
        if self.head - self._segments[-1] >= self.segment_bytes:
            self._roll()
        prefix = b""
        if self._needs_state:
            state = orjson.dumps(self.sequence_snapshot())
            prefix = _HEADER.pack(len(state), zlib.crc32(state), KIND_STATE) + state
        body = self._encode(events, rejected, self.head + len(prefix) + _HEADER.size)
        header = prefix + _HEADER.pack(len(body), zlib.crc32(body), KIND_EVENTS)
        size = len(header) + len(body)
        if self.head - self._segments[0] + size > self.max_bytes:
            raise JournalFull(f"journal is at its cap of {self.max_bytes} bytes")
        self._write(header, body, size)
        self._needs_state = False
        self.appended_events += len(events) + len(rejected)
        return Batch(events, rejected, self.head)

    @staticmethod
    def _encode(events: list[Event], rejected: list[Event], start: int) -> bytes:
        everything = events + rejected if rejected else events
        position = start
        for e in everything:
            e.position = position
            position += 1
        # One JSON line for what the payloads do not say (receive time, and the stream and
        # sequence that sequence state is rebuilt from), then one payload per line: three
        # times cheaper than formatting a line of fields per event.
        meta = orjson.dumps(
            [len(events), [(e.receive_ns, e.sequence, e.stream) for e in everything]]
        )
        return b"%b\n%b\n" % (meta, b"\n".join([e.payload for e in everything]))

    def _write(self, header: bytes, body: bytes, size: int) -> None:
        start = self.head - self._segments[-1]
        try:
            written = os.writev(self._fd, (header, body))  # no copy of the body to join them
            if written != size:
                raise OSError(28, f"short write: {written} of {size} bytes")
        except OSError as exc:
            # Never leave half a record behind: cut back to where this append began.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, start)
            self.last_error = f"journal write failed: {exc}"
            raise JournalFull(self.last_error) from exc
        self.head += size
        self.last_error = None
        if self.fsync == "always":
            os.fdatasync(self._fd)
        else:
            self._dirty = True

    def _roll(self) -> None:
        base = self.head
        fd = os.open(self._segment_path(base), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        old, self._fd = self._fd, fd
        self._segments.append(base)
        self._needs_state = True
        if self.fsync != "never":
            with contextlib.suppress(OSError):
                os.fsync(old)
        os.close(old)

    # ------------------------------------------------------------ cursors and cleanup

    def acked(self, name: str) -> int:
        return self._acks[name]

    def acknowledge(self, name: str, position: int) -> None:
        """The sink has everything before ``position``; written out by ``flush_cursors``."""
        if position > self._acks[name]:
            self._acks[name] = position

    def flush_cursors(self) -> None:
        for name, position in self._acks.items():
            if self._acks_written.get(name) != position:
                self._write_cursor(name)

    def _write_cursor(self, name: str) -> None:
        position = self._acks[name]
        data = _ACK.pack(position, zlib.crc32(position.to_bytes(8, "little")))
        try:
            os.pwrite(self._ack_fds[name], data, 0)
        except OSError as exc:
            # Only costs a longer replay after a crash: the sinks de-duplicate.
            log.warning("journal_cursor_write_failed", sink=name, error=str(exc))
            return
        self._acks_written[name] = position

    def collect(self) -> int:
        """Delete segments every sink has passed; returns how many."""
        low = min(self._acks.values(), default=self.head)
        removed = 0
        while len(self._segments) > 1 and self._segments[1] <= low:
            base = self._segments.pop(0)
            with contextlib.suppress(FileNotFoundError):
                self._segment_path(base).unlink()
            removed += 1
        return removed

    def make_room(self) -> bool:
        """On a full disk: if every sink has everything, start a new segment so the full
        one can be deleted. True if space was freed."""
        if self.head == self._segments[-1] or min(self._acks.values(), default=0) < self.head:
            return False
        try:
            self._roll()
        except OSError:
            return False
        return self.collect() > 0

    @property
    def size_bytes(self) -> int:
        return self.head - self._segments[0]

    async def run(self, interval_s: float = 0.2) -> None:
        """Write cursors, delete passed segments and sync to disk, until cancelled."""
        loop = asyncio.get_running_loop()
        last_sync = loop.time()
        while True:
            await asyncio.sleep(interval_s)
            self.flush_cursors()
            self.collect()
            if (
                self.fsync == "interval" and self._dirty
                and loop.time() - last_sync >= self.fsync_interval_s
            ):  # fmt: skip
                self._dirty = False
                last_sync = loop.time()
                fd = self._fd
                with contextlib.suppress(OSError):
                    await loop.run_in_executor(None, os.fdatasync, fd)

    # ------------------------------------------------------------ reading

    def read(self, position: int, max_events: int) -> Batch:
        """Whole records from ``position`` until ``max_events`` is reached or the head.

        The batch's ``end`` is the position just past what was read: past ``position``
        even with no events when only state records or damaged bytes were passed over.
        """
        events: list[Event] = []
        rejected: list[Event] = []
        for kind, body, end in self._records(position):
            position = end
            if kind == KIND_EVENTS:
                first = end - len(body)
                for i, (is_rejected, event) in enumerate(_decode_lines(body)):
                    event.position = first + i
                    (rejected if is_rejected else events).append(event)
                if len(events) + len(rejected) >= max_events:
                    break
        return Batch(events, rejected, position)

    def count_events(self, position: int) -> int:
        # Every line but the first (the record's metadata) is one event.
        return sum(
            body.count(b"\n") - 1
            for kind, body, _ in self._records(position)
            if kind == KIND_EVENTS
        )

    def _records(self, position: int) -> Iterator[tuple[int, bytes, int]]:
        """(kind, body, end position) of each whole record from ``position`` to the head.

        Reads a chunk at a time, so a catch-up reading a little at a time from a large
        segment does not read the rest of the segment on every call.
        """
        while position < self.head:
            base = self._segment_of(position)
            index = self._segments.index(base)
            end = self._segments[index + 1] if index + 1 < len(self._segments) else self.head
            try:
                f = open(self._segment_path(base), "rb")  # noqa: SIM115 - closed below
            except FileNotFoundError:
                f = None
            try:
                while position < end:
                    data = b""
                    if f is not None:
                        f.seek(position - base)
                        data = f.read(min(_READ_CHUNK, end - position))
                        need = _HEADER.size + _HEADER.unpack_from(data)[0] if len(data) > 8 else 0
                        if len(data) < need <= end - position:
                            data += f.read(need - len(data))  # one record beyond the chunk
                    offset = 0
                    while (parsed := _parse_record(data, offset)) is not None:
                        kind, body, offset = parsed
                        yield kind, body, position + offset
                    if offset == 0:
                        # Damaged bytes (or a segment gone): skip to the next segment.
                        self.skipped_bytes += end - position
                        log.error("journal_damaged_bytes_skipped", segment=base, at=position,
                                  bytes=end - position)  # fmt: skip
                        position = end
                        yield KIND_SKIPPED, b"", end
                    else:
                        position += offset
            finally:
                if f is not None:
                    f.close()

    def _segment_of(self, position: int) -> int:
        base = self._segments[0]
        for candidate in self._segments:
            if candidate > position:
                break
            base = candidate
        return base

    def _scan_segment(self, base: int) -> tuple[int, dict[str, int]]:
        """The length of the segment's valid prefix and the sequences it ends with."""
        data = self._segment_path(base).read_bytes()
        sequences: dict[str, int] = {}
        offset = 0
        while offset < len(data):
            parsed = _parse_record(data, offset)
            if parsed is None:
                break
            kind, body, offset = parsed
            if kind == KIND_STATE:
                sequences.update(orjson.loads(body))
            elif kind == KIND_EVENTS:
                n_events, meta = orjson.loads(body[: body.index(b"\n")])
                for _receive_ns, seq, stream in meta[:n_events]:
                    if seq is not None:
                        sequences[stream] = seq
        return offset, sequences

    def _segment_path(self, base: int) -> Path:
        return self.directory / f"{base:020d}{_SUFFIX}"


def _parse_record(data: bytes, offset: int) -> tuple[int, bytes, int] | None:
    """(kind, body, offset past it) of the record at ``offset``; None if torn or damaged."""
    if len(data) - offset < _HEADER.size:
        return None
    length, crc, kind = _HEADER.unpack_from(data, offset)
    start = offset + _HEADER.size
    body = data[start : start + length]
    if len(body) != length or zlib.crc32(body) != crc or kind not in (KIND_EVENTS, KIND_STATE):
        return None
    return kind, body, start + length


def _decode_lines(body: bytes) -> Iterator[tuple[bool, Event]]:
    lines = body.split(b"\n")
    try:
        n_events, meta = orjson.loads(lines[0])
    except (ValueError, TypeError) as exc:
        # The record's checksum held, so this is a bug, not a torn write: say so.
        log.error("journal_record_unreadable", error=str(exc))
        return
    for i, ((receive_ns, seq, stream), payload) in enumerate(zip(meta, lines[1:-1], strict=False)):
        rejected = i >= n_events
        try:
            event = event_from_journal(payload, receive_ns, stream, seq, rejected=rejected)
        except (ValueError, KeyError, TypeError) as exc:
            log.error("journal_line_unreadable", error=str(exc), line=payload[:200])
            continue
        yield rejected, event
