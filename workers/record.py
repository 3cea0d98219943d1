"""``feedfleet record PROVIDER --out FILE``: capture the frames a provider sends, as read.

How it gets them: it opens its own connection to the provider, with the provider row's
``connection_config`` (from PostgreSQL) and the row's subscribed symbols, through the same
adapter class the worker uses, whose ``tap`` writes every frame it reads to the file
(``common/recording.py``). The other way, a worker writing a capture when asked, was not
taken: a changed provider row makes the worker reconnect, so asking it would disturb the
very feed being recorded, and the file would be written on whichever host runs the worker.
A connection of its own disturbs nothing the fleet does and records from its first frame,
so a replay's codec state (Refinitiv stream names, the FIX session) starts where the
recording does. The cost: it is a second session with the provider. Where a provider allows
only one (FIX CompIDs, a unicast IEX port already bound by the worker), ``--set`` changes
the recording connection's keys (``--set sender_comp_id=REC1``, another ``port``), or
record while the worker is stopped.

The recording connection is not the worker's: FIX keeps its session store in a temporary
directory and logs on with a sequence reset, so the worker's stored numbers are never
touched. Polygon's backfill after a reconnect does not apply: a recording ends when its
connection does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson

from common.model import DataType, RawMarketData
from common.provider import Instrument, ProviderConfig, ProviderError
from common.recording import FrameKind, RecordingHeader, RecordingWriter
from common.symbols import SymbolMap
from workers.adapters import adapter_class

DISCONNECT_TIMEOUT_S = 5.0


@dataclass(slots=True)
class RecordSummary:
    frames: int
    bytes: int
    records: int
    seconds: float
    ended: str  # why the recording stopped
    failed: bool  # the provider ended it (an error), not the limit or the operator


class _CountingTap:
    """The file writer, plus an event once ``max_frames`` frames are in."""

    def __init__(self, writer: RecordingWriter, max_frames: int | None) -> None:
        self.writer = writer
        self.max_frames = max_frames
        self.full = asyncio.Event()

    def record(
        self, kind: FrameKind, data: bytes | str, receive_ns: int, source: str | None = None
    ) -> None:
        self.writer.record(kind, data, receive_ns, source)
        if self.max_frames is not None and self.writer.frames >= self.max_frames:
            self.full.set()


def parse_setting(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``--set``: VALUE as JSON where it parses (numbers, true, lists),
    else as a string. Raises ValueError without ``=``."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, orjson.loads(value)
    except orjson.JSONDecodeError:
        return key, value


async def record(
    provider: ProviderConfig, instruments: list[Instrument], out: Path, *,
    seconds: float | None = None, max_frames: int | None = None,
    on_records: Callable[[list[RawMarketData]], None] | None = None,
    stop: asyncio.Event | None = None,
) -> RecordSummary:  # fmt: skip
    """Record until ``seconds`` have passed, ``max_frames`` frames are in (all frames of the
    read that reached it are kept), ``stop`` is set, or the provider ends the connection.

    ``instruments`` are canonical; ``on_records`` gets what the adapter decoded live, with
    canonical symbols (what the worker's pipeline would have been given)."""
    symbols = SymbolMap.from_config(provider)
    header = RecordingHeader.for_provider(provider, instruments)
    with tempfile.TemporaryDirectory(prefix="feedfleet-record-") as state_dir:
        connection = provider
        if provider.provider_type == "fix":
            # A session of its own: never the worker's store, numbers reset at Logon.
            cc = {**provider.connection_config, "session_store_dir": state_dir,
                  "reset_on_logon": True}  # fmt: skip
            connection = replace(provider, connection_config=cc)
        adapter = adapter_class(provider.provider_type)(connection)
        adapter.use_state_dir(Path(state_dir))
        writer = RecordingWriter(out, header)
        tap = adapter.tap = _CountingTap(writer, max_frames)
        started = time.monotonic()
        records = 0

        async def consume() -> None:
            nonlocal records
            await adapter.connect()
            await adapter.subscribe(list(symbols.instruments(instruments).values()))
            async for batch in adapter.stream_batches():
                symbols.rename(batch)
                records += len(batch)
                if on_records is not None:
                    on_records(batch)
                if tap.full.is_set():
                    return

        ended, failed = "", False
        task = asyncio.create_task(consume())
        waits: list[asyncio.Future[Any]] = [task, asyncio.ensure_future(tap.full.wait())]
        if stop is not None:
            waits.append(asyncio.ensure_future(stop.wait()))
        try:
            done, _ = await asyncio.wait(waits, timeout=seconds, return_when="FIRST_COMPLETED")
            if task in done:
                exc = task.exception()
                if isinstance(exc, ProviderError):
                    ended, failed = f"{type(exc).__name__}: {exc}", True
                elif exc is not None:
                    raise exc
                else:
                    ended = f"{writer.frames} frames"
            elif tap.full.is_set():
                ended = f"{writer.frames} frames"
            elif stop is not None and stop.is_set():
                ended = "stopped"
            else:
                ended = f"{seconds:g} s"
        finally:
            for waiting in waits:
                waiting.cancel()
            with contextlib.suppress(BaseException):
                await task
            with contextlib.suppress(Exception):
                async with asyncio.timeout(DISCONNECT_TIMEOUT_S):
                    await adapter.disconnect()
            writer.close()
        return RecordSummary(writer.frames, writer.bytes, records,
                             time.monotonic() - started, ended, failed)  # fmt: skip


async def _load(name: str, database_url: str) -> tuple[ProviderConfig, list[Instrument]] | str:
    """The provider row and its subscribed (canonical) instruments, or why not."""
    import psycopg

    from common import db

    try:
        conn = await db.connect(database_url)
    except (psycopg.Error, OSError) as exc:
        return f"cannot reach PostgreSQL: {exc}"
    try:
        provider = await db.find_provider(conn, name)
        if provider is None:
            return f"no provider {name!r} in the providers table"
        subscriptions = [s for s in await db.active_subscriptions(conn)
                         if s.provider_id == provider.id]  # fmt: skip
    except psycopg.Error as exc:
        return f"cannot read the provider row: {exc}"
    finally:
        await conn.close()
    instruments = []
    for sub in subscriptions:
        types = frozenset(DataType(t) for t in sub.data_types if t in DataType.__members__)
        instruments.append(Instrument(sub.symbol, types or Instrument(sub.symbol).data_types))
    return provider, instruments


async def record_main(
    name: str, out: Path, seconds: float | None, max_frames: int | None, settings: list[str]
) -> int:
    """The CLI: exit 0 when stopped by the limit or Ctrl-C, 1 when the provider ended the
    recording or it could not start, 2 for bad arguments or an existing file."""
    database_url = os.environ.get("FEEDFLEET_DATABASE_URL")
    if not database_url:
        print("record: FEEDFLEET_DATABASE_URL is not set (`source var/env` sets the running "
              "fleet's)", file=sys.stderr)  # fmt: skip
        return 2
    if out.exists():
        print(f"record: {out} exists; a recording is never overwritten", file=sys.stderr)
        return 2
    try:
        overrides = dict(parse_setting(s) for s in settings)
    except ValueError as exc:
        print(f"record: --set {exc}", file=sys.stderr)
        return 2
    loaded = await _load(name, database_url)
    if isinstance(loaded, str):
        print(f"record: {loaded}", file=sys.stderr)
        return 1
    provider, instruments = loaded
    if overrides:
        provider = replace(provider, connection_config={**provider.connection_config,
                                                        **overrides})  # fmt: skip
    if not instruments:
        print(f"record: {provider.name} has no active subscriptions; recording what the "
              "provider sends unasked", file=sys.stderr)  # fmt: skip
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"recording {provider.name} ({provider.provider_type}, {len(instruments)} symbols) "
          f"to {out} on a connection of its own; Ctrl-C ends it", file=sys.stderr)  # fmt: skip
    try:
        summary = await record(provider, instruments, out, seconds=seconds,
                               max_frames=max_frames, stop=stop)  # fmt: skip
    except ProviderError as exc:
        print(f"record: {provider.name}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"record: cannot write {out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if summary.failed and summary.frames == 0:
        out.unlink(missing_ok=True)  # nothing came: leave no file to remove before a retry
        print(f"record: {provider.name}: {summary.ended}; no file written", file=sys.stderr)
        return 1
    print(f"recorded {summary.frames} frames ({summary.bytes} bytes, {summary.records} "
          f"records) in {summary.seconds:.1f} s to {out}; ended by {summary.ended}",
          file=sys.stderr)  # fmt: skip
    return 1 if summary.failed else 0


def _positive(kind: type[int] | type[float]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
        return value

    return parse


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="feedfleet record",
        description="Record the frames a provider sends, on a connection of its own, with "
        "the provider row's config and subscriptions (FEEDFLEET_DATABASE_URL).",
    )
    parser.add_argument("provider", help="providers.name (or id) of the row to record")
    parser.add_argument(
        "--out", required=True, type=Path, help="the recording to create (.gz: gzip-compressed)"
    )
    parser.add_argument(
        "--seconds",
        type=_positive(float),
        default=None,
        help="stop after this long (default: until Ctrl-C)",
    )
    parser.add_argument(
        "--frames", type=_positive(int), default=None, help="stop once this many frames are in"
    )
    parser.add_argument("--set", dest="settings", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="change a connection_config key for this connection only "
                        "(VALUE is JSON where it parses, else text)")  # fmt: skip
    args = parser.parse_args(argv)
    import uvloop

    return uvloop.run(
        record_main(args.provider, args.out, args.seconds, args.frames, args.settings)
    )
