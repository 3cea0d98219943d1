"""``feedfleet replay FILE``: a recording's frames through the real codec and pipeline.

Each frame goes through its provider's codec (``workers/frame_decoders.py``), the provider
row's symbol mapping, the quality checks, event building, a journal and the sinks
(Pulsar, PostgreSQL, Redis ``latest:*``) from the environment's ``FEEDFLEET_*`` URLs, at
the recorded pace or as fast as it goes. ``--dry-run`` stops after the quality checks and
prints the records as ``feedfleet decode`` does, with their quality flags.

Records keep the receive times of the recording, so the stale flag says what it said
live. One frame is one pipeline batch, as one read is live: event ids hash (provider,
stream, sequence, time, type, ordinal within a batch), so a replay of the same file makes
the same ids. PostgreSQL stores each id once (the sink's ``ON CONFLICT DO NOTHING``): a
second replay adds no row and the summary counts them as already stored. Pulsar gets the
events again, with the same ids; the producer's name is fixed per recording and its
sequence ids are the journal positions, which start at 0 in the replay's own journal, so a
broker with deduplication enabled drops a second replay, and consumers de-duplicating on
``event_id`` (as they must anyway) see each event once. The journal lives in a temporary
directory, removed at the end: the file is the source, and replaying it again is safe.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from common.codecs.base import CodecError
from common.config import Settings
from common.journal import Journal
from common.model import RawMarketData
from common.pipeline import Pipeline
from common.provider import ProviderConfigError
from common.quality import QualityChecker
from common.recording import RecordedFrame, RecordingError, RecordingReader
from common.sinks.postgres import PostgresSink
from common.sinks.pulsar import PulsarSink
from common.sinks.redis import LatestCache
from common.symbols import SymbolMap
from workers.frame_decoders import FrameDecoder, frame_decoder

SPEEDS = ("recorded", "max")
# How long the end of a replay waits for the sinks to acknowledge everything.
DRAIN_TIMEOUT_S = 60.0


@dataclass(slots=True)
class ReplaySummary:
    provider: str
    frames: int = 0
    records: int = 0
    decode_errors: int = 0
    quality_flags: dict[str, int] = field(default_factory=dict)
    published: int = 0
    stored: int = 0
    already_stored: int = 0  # rows an earlier replay (or the live worker) had stored
    dead_lettered: int = 0
    acknowledged: bool = True  # every event reached both durable sinks
    torn: str | None = None
    bad_lines: list[str] = field(default_factory=list)

    def lines(self, *, dry_run: bool) -> list[str]:
        flags = ", ".join(f"{k} {v}" for k, v in sorted(self.quality_flags.items()) if v)
        out = [
            f"replayed {self.frames} frames as {self.provider}: {self.records} records, "
            f"{self.decode_errors} decode errors",
            f"quality flags: {flags or 'none'}",
        ]
        if not dry_run:
            out.append(
                f"events published {self.published}, stored {self.stored} "
                f"({self.already_stored} already stored), dead-lettered {self.dead_lettered}"
            )
            if not self.acknowledged:
                out.append(f"not every event was acknowledged within {DRAIN_TIMEOUT_S:g} s; "
                           "replaying the file again is safe")  # fmt: skip
        out.extend(f"skipped {b}" for b in self.bad_lines)
        if self.torn:
            out.append(f"torn record: {self.torn}")
        return out


class _Sinks:
    """The pipeline's journal and sinks for one replay (what ``build_parts`` builds for a
    worker, less the provider session)."""

    def __init__(self, settings: Settings, provider: str, producer: str, quality: QualityChecker,
                 cache: bool) -> None:  # fmt: skip
        self.directory = Path(tempfile.mkdtemp(prefix=f"feedfleet-replay-{provider}-"))
        self.journal = Journal(self.directory, (PulsarSink.name, PostgresSink.name),
                               fsync="never", max_bytes=settings.journal_max_bytes,
                               segment_bytes=64 * 1024**2)  # fmt: skip
        self.journal.open()
        self.journal.sequence_snapshot = quality.sequences
        self.publisher = PulsarSink(
            settings.pulsar_url, settings.pulsar_topic, self.journal, producer_name=producer,
            stall_timeout_s=settings.pulsar_send_timeout_ms / 1000,
        )  # fmt: skip
        self.store = PostgresSink(settings.database_url, self.journal)
        self.redis: Any = None
        self.cache: LatestCache | None = None
        if cache:
            import redis.asyncio as aioredis

            self.redis = aioredis.from_url(settings.redis_url)
            self.cache = LatestCache(self.redis)
        self.pipeline = Pipeline(quality, self.journal, self.publisher, self.store, self.cache)
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.publisher.start()
        self.tasks = [
            asyncio.create_task(self.journal.run()),
            asyncio.create_task(self.publisher.run()),
            asyncio.create_task(self.store.run()),
        ]
        if self.cache is not None:
            self.tasks.append(asyncio.create_task(self.cache.run()))

    async def finish(self, summary: ReplaySummary) -> None:
        from workers.worker import stop_tasks

        try:
            await self.store.flush()
            summary.acknowledged = await self.pipeline.drained(DRAIN_TIMEOUT_S)
            if self.cache is not None:
                await self.cache.flush()
        finally:
            await stop_tasks(self.tasks, 10.0)
            await self.store.close()
            await self.publisher.close()
            self.journal.close()
            if self.redis is not None:
                await self.redis.aclose()
            shutil.rmtree(self.directory, ignore_errors=True)
        counts = self.pipeline.counts()
        summary.published, summary.stored = counts.published, counts.stored
        summary.dead_lettered = counts.dead_lettered
        summary.already_stored = self.store.duplicates_skipped


def producer_name(path: Path, provider: str) -> str:
    """Fixed per recording and provider name: a broker de-duplicating by producer and
    sequence id drops a second replay of the same file."""
    digest = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as f:
        digest.update(f.read(1 << 16))  # the header and the first frames name the file
    return f"feedfleet-replay-{provider}-{digest.hexdigest()}"


async def replay(
    path: Path, *, settings: Settings | None, speed: str = "recorded",
    provider_name: str | None = None, cache: bool = True,
    on_records: Callable[[list[RawMarketData]], None] | None = None,
) -> ReplaySummary:  # fmt: skip
    """Replay ``path``; ``settings`` None is the dry run (decode and quality checks only).
    ``on_records`` gets each frame's records after the quality checks.

    Raises ``RecordingError`` for a file that is not a readable recording and
    ``CodecError`` or ``ProviderConfigError`` for one whose provider cannot be decoded."""
    if speed not in SPEEDS:
        raise ValueError(f"speed must be one of {', '.join(SPEEDS)}, not {speed!r}")
    reader = RecordingReader(path)
    try:
        header = reader.header
        name = provider_name or header.provider
        decoder = frame_decoder(header, name)
        symbols = SymbolMap.from_config(decoder.config)
        symbols.instruments(header.instruments)  # teaches it the names to map back
        from workers.worker import stale_after

        quality = QualityChecker(stale_after_s=stale_after(decoder.config))
        summary = ReplaySummary(name)
        sinks = None
        if settings is not None:
            sinks = _Sinks(settings, name, producer_name(path, name), quality, cache)
            await sinks.start()
        try:
            await _run(reader, decoder, symbols, quality, sinks, speed, summary, on_records)
        finally:
            if sinks is not None:
                await sinks.finish(summary)
        summary.quality_flags = {k: v for k, v in quality.flag_counts.items() if v}
        summary.torn = reader.problems.torn
        summary.bad_lines = reader.problems.bad_lines
        return summary
    finally:
        reader.close()


async def _run(
    reader: RecordingReader, decoder: FrameDecoder, symbols: SymbolMap,
    quality: QualityChecker, sinks: _Sinks | None, speed: str, summary: ReplaySummary,
    on_records: Callable[[list[RawMarketData]], None] | None,
) -> None:  # fmt: skip
    paced = speed == "recorded"
    first_ns: int | None = None
    started = time.monotonic()
    frame: RecordedFrame
    for frame in reader.frames():
        if paced:
            if first_ns is None:
                first_ns = frame.receive_ns
            delay = (frame.receive_ns - first_ns) / 1e9 - (time.monotonic() - started)
            if delay > 0:
                await asyncio.sleep(delay)
        summary.frames += 1
        decoded = decoder.decode(frame)
        summary.decode_errors += len(decoded.errors)
        for reason in decoded.errors:
            print(f"line {frame.line}: {reason}", file=sys.stderr)
        records = decoded.records
        if not records:
            continue
        symbols.rename(records)
        summary.records += len(records)
        if sinks is None:
            quality.check(records)
        else:
            sinks.pipeline.process(records)  # quality checks, events, journal, sinks
            if sinks.pipeline.backpressure:
                await sinks.pipeline.wait_for_room()
        if on_records is not None:
            on_records(records)
        if summary.frames % 256 == 0:
            await asyncio.sleep(0)  # at max speed, let the sinks run


def _print_records(records: list[RawMarketData]) -> None:
    from workers.cli import record_document

    out = sys.stdout.buffer
    for r in records:
        out.write(orjson.dumps({**record_document(r), "quality_flags": r.quality_flags}) + b"\n")
    out.flush()


async def replay_main(
    path: Path, speed: str, provider_name: str | None, dry_run: bool, cache: bool
) -> int:
    """The CLI: exit 0 when all went through, 1 when something did not (decode errors, a
    torn or damaged line, events not acknowledged), 2 for a file it cannot replay."""
    settings = None if dry_run else Settings.from_env()
    try:
        summary = await replay(
            path, settings=settings, speed=speed, provider_name=provider_name, cache=cache,
            on_records=_print_records if dry_run else None,
        )  # fmt: skip
    except (RecordingError, CodecError, ProviderConfigError) as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader has had enough (`... --dry-run | head`), as for `feedfleet decode`.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    for line in summary.lines(dry_run=dry_run):
        print(line, file=sys.stderr)
    failed = summary.decode_errors or summary.torn or summary.bad_lines
    return 1 if failed or not summary.acknowledged else 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="feedfleet replay",
        description="Feed a recording through the codec and the pipeline into the sinks of "
        "FEEDFLEET_DATABASE_URL, FEEDFLEET_REDIS_URL and FEEDFLEET_PULSAR_URL.",
    )
    parser.add_argument("file", type=Path, help="a recording made by feedfleet record")
    parser.add_argument(
        "--speed",
        choices=SPEEDS,
        default="recorded",
        help="recorded: the frames' own pacing (default); max: at once",
    )
    parser.add_argument(
        "--provider",
        default=None,
        metavar="NAME",
        help="the provider name the events carry (default: the recording's)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="decode and check quality only; print the records as JSON lines",
    )
    parser.add_argument("--no-cache", action="store_true",
                        help="leave Redis latest:{symbol} alone (it would show old prices "
                        "as the latest for a moment)")  # fmt: skip
    args = parser.parse_args(argv)
    import uvloop

    return uvloop.run(
        replay_main(args.file, args.speed, args.provider, args.dry_run, not args.no_cache)
    )
