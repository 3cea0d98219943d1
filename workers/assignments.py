"""``AssignmentFollower``: keeps the session on the provider row and symbols it was given.

It LISTENs for the coordinator's and operators' notifications and polls once a second,
and it outlives the database: when PostgreSQL (or just its LISTEN connection) goes away
it keeps the last provider row and assignments, reconnects with backoff and catches up.
The last known row and assignments are also kept on local disk beside the journal
(``last_assignment.json``), so a worker restarted while the database is down resumes
ingesting what it held; only a change it cannot see waits for the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson
import psycopg
import structlog

from common import db
from common.model import DataType
from common.provider import Instrument, ProviderConfig
from common.retry import Backoff
from workers.session import ProviderSession

log = structlog.get_logger("feedfleet.assignments")

POLL_S = 1.0
# A poll whose assignments are unchanged (by their digest) skips applying them, but they
# are applied again at least this often whatever the digest says.
FULL_SYNC_S = 30.0


class AssignmentFollower:
    def __init__(
        self, database_url: str, instance_id: str, session: ProviderSession, cache_path: Path,
        registered: Callable[[], bool],
    ) -> None:  # fmt: skip
        self.database_url = database_url
        # Until this instance is registered the coordinator cannot have assigned it
        # anything; an empty answer then would only drop what it holds from before.
        self._registered = registered
        self.instance_id = instance_id
        self.session = session
        self.cache_path = cache_path
        self.database_ok = False
        self._saved: bytes | None = None
        # The digest of the assignments last applied, and when (monotonic seconds).
        self._applied: tuple[str, float] | None = None

    async def run(self) -> None:
        backoff = Backoff(base_s=0.5, max_s=10.0)
        while True:
            try:
                conn = await db.connect(self.database_url)
            except (psycopg.Error, OSError) as exc:
                self._lost(exc)
                await asyncio.sleep(backoff.next_delay())
                continue
            try:
                await conn.execute("LISTEN feedfleet_assignments")
                await conn.execute("LISTEN feedfleet_config")
                while True:
                    await self.sync(conn)
                    if not self.database_ok:
                        log.info("database_available")
                    self.database_ok = True
                    backoff.reset()
                    # Wake on a notification, or poll once a second.
                    async for _ in conn.notifies(timeout=POLL_S, stop_after=1):
                        pass
            except (psycopg.Error, OSError) as exc:
                self._lost(exc)
            finally:
                with contextlib.suppress(Exception):
                    await conn.close()
            await asyncio.sleep(backoff.next_delay())

    def _lost(self, exc: BaseException) -> None:
        if self.database_ok:
            log.warning("database_lost_ingesting_on", error=str(exc),
                        symbols=len(self.session.wanted))  # fmt: skip
        self.database_ok = False

    async def sync(self, conn: db.Conn) -> None:
        """Read the row and the assignments once and apply what changed."""
        fresh = await db.find_provider(conn, self.session.provider.name)
        reconfigured = fresh is not None and fresh != self.session.provider
        if fresh is not None and reconfigured:
            await self.session.reconfigure(fresh)
        if not self._registered():
            return
        # Most polls find the assignments as they were: a digest computed by the server
        # tells so without fetching and comparing every symbol (about 8 ms a second for
        # 500 symbols, on the worker's core, which at 2,000 events/s is 4 us per event).
        digest = await db.held_digest(conn, self.instance_id)
        now = time.monotonic()
        if (
            not reconfigured  # the local copy below keeps the row too
            and self._applied is not None
            and self._applied[0] == digest
            and now - self._applied[1] < FULL_SYNC_S
        ):
            return
        held = await db.held_symbols(conn, self.instance_id)
        wanted = {s: h.instrument for s, h in held.items()}
        await self.session.follow(wanted)
        # Events of a symbol held only as a backup carry the failover flag; only the
        # symbol's highest-priority server writes latest:{symbol}.
        pipeline = self.session.pipeline
        # A symbol let go keeps its flag: frames already on their way after the unsubscribe
        # are still a backup's.
        let_go = {s for s in pipeline.quality.failover_symbols if s not in held}
        pipeline.quality.failover_symbols = let_go | {s for s, h in held.items() if h.failover}
        if pipeline.cache is not None:
            pipeline.cache.symbols = {s for s, h in held.items() if h.latest}
        self._save(self.session.provider, wanted)
        self._applied = (digest, now)

    # ------------------------------------------------------------ the local copy

    def _save(self, provider: ProviderConfig, wanted: dict[str, Instrument]) -> None:
        doc = orjson.dumps(
            {
                "provider": asdict(provider),
                "assignments": {
                    s: sorted(str(t) for t in i.data_types) for s, i in sorted(wanted.items())
                },
            }
        )
        if doc == self._saved:
            return
        tmp = self.cache_path.with_suffix(".tmp")
        try:
            tmp.write_bytes(doc)
            os.replace(tmp, self.cache_path)
        except OSError as exc:
            log.warning("assignment_copy_not_saved", error=str(exc))
            return
        self._saved = doc


def load_last_assignment(path: Path) -> tuple[ProviderConfig, dict[str, Instrument]] | None:
    """The row and assignments a previous run saved, or None (none saved, or unreadable)."""
    try:
        doc: dict[str, Any] = orjson.loads(path.read_bytes())
        provider = ProviderConfig(**doc["provider"])
        wanted = {
            symbol: Instrument(symbol, frozenset(DataType(t) for t in types))
            for symbol, types in doc["assignments"].items()
        }
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("assignment_copy_unreadable", path=str(path), error=str(exc))
        return None
    return provider, wanted
