"""Recordings of what a provider sent: the frame tap adapters call, and the file format.

An adapter has ``tap``, None unless something records: where its transport reads a frame
it calls ``tap.record(kind, data, receive_ns)`` behind an ``if tap is not None``, so a
worker that records nothing pays one attribute test per read. ``RecordingWriter`` is the
tap ``feedfleet record`` uses; ``RecordingReader`` reads a file back for ``feedfleet
replay``.

File format, version 1: JSON lines in UTF-8, gzip-compressed when the name ends in
``.gz``. Append-only: a line is only ever added, never rewritten.

- line 1, the header: ``{"format": "feedfleet-recording", "version": 1,
  "provider_type", "provider", "provider_id", "connection_config", "instruments":
  [{"symbol", "data_types"}], "started_at", "host"}``. ``connection_config`` is the
  provider row's, less any key that could hold a secret itself (a ``*_env`` key names a
  variable and is kept); ``instruments`` are the canonical symbols subscribed.
- then one line per frame, in the order read: ``{"t": receive time (ns since the epoch),
  "k": kind, "text": the frame as text}`` for WebSocket text frames, ``"b64"`` (base64)
  instead of ``"text"`` for bytes, and ``"src"`` where the kind needs it (the request path
  of an HTTP body, API key left out).

A process killed while recording leaves at most its last line incomplete (plain files are
written a whole line per ``write``; gzip ones are flushed to a decompressible point every
``GZIP_SYNC_S``, so a kill loses at most that much). The reader reports such a torn tail
and everything before it replays.
"""

from __future__ import annotations

import base64
import enum
import gzip
import os
import re
import socket
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import orjson

from common.model import DataType, iso_ns
from common.provider import Instrument, ProviderConfig

FORMAT = "feedfleet-recording"
VERSION = 1
GZIP_SYNC_S = 0.5
READ_CHUNK = 1 << 20

# Keys of connection_config that may hold a secret's value; ``*_env`` keys only name one.
_SECRET_KEY = re.compile(r"(password|passwd|secret|token|api_?key|credentials?)$", re.IGNORECASE)


class FrameKind(enum.StrEnum):
    WEBSOCKET = "websocket"  # one WebSocket message, text or binary (Polygon, Refinitiv)
    HTTP_BODY = "http_body"  # one response body; ``src`` is the request path (Alpha Vantage)
    UDP = "udp"  # one datagram (IEX-TP)
    TCP = "tcp"  # bytes as one read returned them (FIX)
    BLPAPI_EVENT = "blpapi_event"  # one blpapi event as the codec's event line (Bloomberg)


class FrameTap(Protocol):
    """What an adapter hands each frame it reads, with the time it read it."""

    def record(
        self, kind: FrameKind, data: bytes | str, receive_ns: int, source: str | None = None
    ) -> None: ...


class RecordingError(Exception):
    """A file that is not a recording this version can read; the message says why."""


@dataclass(frozen=True, slots=True)
class RecordingHeader:
    provider_type: str
    provider: str
    provider_id: str
    connection_config: dict[str, Any]
    instruments: list[Instrument]
    started_at: str
    host: str
    version: int = VERSION

    @classmethod
    def for_provider(
        cls, provider: ProviderConfig, instruments: list[Instrument]
    ) -> RecordingHeader:
        return cls(
            provider_type=provider.provider_type, provider=provider.name,
            provider_id=provider.id, connection_config=without_secrets(provider.connection_config),
            instruments=list(instruments), started_at=iso_ns(time.time_ns()),
            host=socket.gethostname(),
        )  # fmt: skip

    def to_json(self) -> bytes:
        return orjson.dumps({
            "format": FORMAT, "version": self.version, "provider_type": self.provider_type,
            "provider": self.provider, "provider_id": self.provider_id,
            "connection_config": self.connection_config,
            "instruments": [
                {"symbol": i.symbol, "data_types": sorted(t.value for t in i.data_types)}
                for i in self.instruments
            ],
            "started_at": self.started_at, "host": self.host,
        })  # fmt: skip

    @classmethod
    def from_json(cls, line: bytes) -> RecordingHeader:
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise RecordingError("not a feedfleet recording (the first line is not JSON)") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise RecordingError("not a feedfleet recording (no 'format' header)")
        version = doc.get("version")
        if type(version) is not int or version < 1:
            raise RecordingError(f"recording header has no valid version: {version!r}")
        if version > VERSION:
            raise RecordingError(
                f"recording format version {version} is newer than this feedfleet reads ({VERSION})"
            )
        try:
            instruments = [
                Instrument(str(i["symbol"]), frozenset(DataType(t) for t in i["data_types"]))
                for i in doc.get("instruments", [])
            ]
            config = doc.get("connection_config", {})
            if not isinstance(config, dict):
                raise TypeError("connection_config is not an object")
            return cls(
                provider_type=str(doc["provider_type"]), provider=str(doc["provider"]),
                provider_id=str(doc.get("provider_id", "")), connection_config=config,
                instruments=instruments, started_at=str(doc.get("started_at", "")),
                host=str(doc.get("host", "")), version=version,
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise RecordingError(f"recording header is incomplete: {exc}") from None


def without_secrets(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not _SECRET_KEY.search(k)}


@dataclass(frozen=True, slots=True)
class RecordedFrame:
    receive_ns: int
    kind: FrameKind
    data: bytes | str  # str: a WebSocket text frame, as the adapter read it
    source: str | None = None
    line: int = 0


class RecordingWriter:
    """A ``FrameTap`` that appends each frame to a recording file (created, never
    overwritten)."""

    def __init__(self, path: Path, header: RecordingHeader) -> None:
        self.path = path
        # O_EXCL: an earlier recording is never overwritten by mistake.
        raw: BinaryIO = open(path, "xb", buffering=0)  # noqa: SIM115 - closed in close()
        self._raw = raw
        self._gzip = gzip.GzipFile(fileobj=raw, mode="wb") if path.name.endswith(".gz") else None
        self._synced_at = time.monotonic()
        self.frames = 0
        self.bytes = 0
        self._write(header.to_json() + b"\n")
        self._sync()

    def record(
        self, kind: FrameKind, data: bytes | str, receive_ns: int, source: str | None = None
    ) -> None:
        doc: dict[str, Any] = {"t": receive_ns, "k": kind}
        if isinstance(data, str):
            doc["text"] = data
            self.bytes += len(data.encode())
        else:
            doc["b64"] = base64.b64encode(data).decode("ascii")
            self.bytes += len(data)
        if source is not None:
            doc["src"] = source
        self._write(orjson.dumps(doc) + b"\n")
        self.frames += 1
        if self._gzip is not None and time.monotonic() - self._synced_at >= GZIP_SYNC_S:
            self._sync()

    def _write(self, line: bytes) -> None:
        if self._gzip is not None:
            self._gzip.write(line)
        else:
            self._raw.write(line)  # one write per line: a kill tears at most the last

    def _sync(self) -> None:
        if self._gzip is not None:
            self._gzip.flush(zlib.Z_SYNC_FLUSH)
            self._synced_at = time.monotonic()

    def close(self) -> None:
        if self._gzip is not None:
            self._gzip.close()
        os.fsync(self._raw.fileno())
        self._raw.close()


@dataclass(slots=True)
class ReadProblems:
    """What reading a recording had to leave out, for the replay summary."""

    torn: str | None = None  # the incomplete tail a killed recorder left
    bad_lines: list[str] = field(default_factory=list)


class RecordingReader:
    """Reads a recording: ``header`` at once, then ``frames()``; ``problems`` says what was
    left out once ``frames()`` is exhausted."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.problems = ReadProblems()
        self._gzip_cut = False  # a gzip stream without its end: the recorder was killed
        try:
            self._file: BinaryIO = open(path, "rb")  # noqa: SIM115 - closed in close()
        except OSError as exc:
            raise RecordingError(f"cannot read {path}: {exc.strerror or exc}") from None
        self._lines = self._read_lines()
        first = next(self._lines, None)
        if first is None:
            self.close()
            raise RecordingError(f"{path} is empty or holds no complete header line")
        self.header = RecordingHeader.from_json(first[1])

    def close(self) -> None:
        self._file.close()

    def _chunks(self) -> Iterator[bytes]:
        head = self._file.read(2)
        self._file.seek(0)
        if head != b"\x1f\x8b":
            while chunk := self._file.read(READ_CHUNK):
                yield chunk
            return
        # zlib rather than gzip.GzipFile: a stream cut short by a kill yields what it has.
        inflate = zlib.decompressobj(wbits=31)
        while chunk := self._file.read(READ_CHUNK):
            try:
                yield inflate.decompress(chunk)
            except zlib.error as exc:
                self.problems.torn = f"the compressed data is damaged ({exc}); replayed up to it"
                return
        self._gzip_cut = not inflate.eof

    def _read_lines(self) -> Iterator[tuple[int, bytes]]:
        buffer = b""
        lineno = 0
        for chunk in self._chunks():
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                lineno += 1
                yield lineno, line
        if buffer:
            self.problems.torn = (
                f"line {lineno + 1} is incomplete ({len(buffer)} bytes, no line end): the "
                "recording was cut off there; the frames before it were replayed"
            )
        elif self._gzip_cut and self.problems.torn is None:
            self.problems.torn = "the compressed stream ends early: the recording was cut off"

    def frames(self) -> Iterator[RecordedFrame]:
        for lineno, line in self._lines:
            if not line.strip():
                continue
            frame = _frame(line, lineno)
            if isinstance(frame, str):
                self.problems.bad_lines.append(f"line {lineno}: {frame}")
                continue
            yield frame


def _frame(line: bytes, lineno: int) -> RecordedFrame | str:
    """One frame line, or why it is not one."""
    try:
        doc = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        return f"not JSON ({exc})"
    if not isinstance(doc, dict):
        return "not a JSON object"
    receive_ns, kind, source = doc.get("t"), doc.get("k"), doc.get("src")
    if type(receive_ns) is not int:
        return "no receive time 't'"
    try:
        kind = FrameKind(str(kind))
    except ValueError:
        return f"unknown frame kind {kind!r}"
    if source is not None and not isinstance(source, str):
        return "'src' is not a string"
    data: bytes | str
    if isinstance(doc.get("text"), str):
        data = doc["text"]
    elif isinstance(doc.get("b64"), str):
        try:
            data = base64.b64decode(doc["b64"], validate=True)
        except ValueError:
            return "'b64' is not base64"
    else:
        return "no 'text' or 'b64' data"
    return RecordedFrame(receive_ns, kind, data, source, lineno)
