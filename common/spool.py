"""Append-only local spool for events a durable sink could not take.

One file per (provider, sink): lines of ``<receive_ns>\\t<event JSON>``. The reader's
position is kept in a side file, so a restarted worker resumes replay where it stopped
(a chunk being replayed when it died is sent again: event ids make that harmless).
"""

from __future__ import annotations

import os
from pathlib import Path

from common.events import Event, event_from_payload


class Spool:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset_path = path.with_suffix(".offset")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "ab")  # noqa: SIM115 - held open for the worker's life
        self.read_offset = self._load_offset()
        self.pending = self._count_pending()

    def _load_offset(self) -> int:
        try:
            offset = int(self._offset_path.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0
        return min(offset, self.path.stat().st_size)

    def _count_pending(self) -> int:
        with open(self.path, "rb") as f:
            f.seek(self.read_offset)
            return sum(1 for _ in f)

    @property
    def has_data(self) -> bool:
        return self.pending > 0

    @property
    def size_bytes(self) -> int:
        return self._file.tell() - self.read_offset

    def append(self, events: list[Event]) -> None:
        self._file.write(b"".join(b"%d\t%s\n" % (e.receive_ns, e.payload) for e in events))
        # Reaching the OS is enough to survive a worker crash; fsync per batch would cap
        # the spool at the disk's sync rate exactly when a sink is already struggling.
        self._file.flush()
        self.pending += len(events)

    def read(self, max_events: int) -> tuple[list[Event], int]:
        """The next events to replay and the offset just past them (not yet advanced)."""
        events: list[Event] = []
        with open(self.path, "rb") as f:
            f.seek(self.read_offset)
            offset = self.read_offset
            for line in f:
                if not line.endswith(b"\n"):
                    break  # a line still being written
                offset += len(line)
                receive_ns, _, payload = line.rstrip(b"\n").partition(b"\t")
                try:
                    events.append(event_from_payload(payload, int(receive_ns)))
                except (ValueError, KeyError, TypeError):
                    # A torn line from a crash mid-write: skip it, it was never acked.
                    continue
                if len(events) >= max_events:
                    break
        return events, offset

    def advance(self, offset: int, count: int) -> None:
        self.read_offset = offset
        self.pending = max(0, self.pending - count)
        if self.pending == 0 and self.read_offset >= self._file.tell():
            # Fully replayed: start the file again so it never grows without bound.
            self._file.truncate(0)
            self._file.seek(0)
            self.read_offset = 0
        tmp = self._offset_path.with_suffix(".tmp")
        tmp.write_text(str(self.read_offset))
        os.replace(tmp, self._offset_path)

    def close(self) -> None:
        self._file.close()
