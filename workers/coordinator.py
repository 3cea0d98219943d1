"""The coordinator: decides which worker instance holds which symbols.

Only one coordinator acts at a time: it holds a PostgreSQL session advisory lock; a second
one waits for the lock (and takes over within seconds when the first dies, because the
lock goes with its connection). It reads ``providers``, ``subscriptions`` and live
``worker_instances`` on every config notification or every ``poll_s``, and writes only
the differences to ``assignments``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections import defaultdict
from hashlib import blake2b

import psycopg
import structlog

from common import db
from common.config import Settings
from common.provider import ProviderConfig

log = structlog.get_logger("feedfleet.coordinator")

COORDINATOR_LOCK = 0x636F6F72  # "coor"
INSTANCE_TIMEOUT_S = 10.0


def _weight(instance_id: str, symbol: str) -> int:
    return int.from_bytes(blake2b(f"{instance_id}|{symbol}".encode(), digest_size=8).digest())


def assign_symbols(
    subscriptions: list[db.Subscription],
    providers: list[ProviderConfig],
    instances: list[db.LiveInstance],
) -> list[db.Assignment]:
    """Each active subscription of an enabled provider goes to one live instance of it.

    Rendezvous hashing: a symbol moves only when its instance dies or a new instance
    wins it, so adding a host moves about 1/n of the symbols and nothing else.
    """
    enabled = {p.id for p in providers if p.enabled}
    by_provider: dict[str, list[str]] = defaultdict(list)
    for inst in instances:
        by_provider[inst.provider_id].append(inst.instance_id)
    out: list[db.Assignment] = []
    for sub in subscriptions:
        candidates = by_provider.get(sub.provider_id)
        if sub.provider_id not in enabled or not candidates:
            continue
        owner = max(candidates, key=lambda i: _weight(i, sub.symbol))
        out.append(db.Assignment(sub.provider_id, sub.symbol, owner, tuple(sub.data_types)))
    return out


def diff_assignments(
    current: list[db.Assignment], desired: list[db.Assignment]
) -> tuple[list[db.Assignment], list[db.Assignment]]:
    """(rows to delete, rows to insert or update)."""
    cur = {(a.provider_id, a.symbol): a for a in current}
    want = {(a.provider_id, a.symbol): a for a in desired}
    remove = [a for k, a in cur.items() if k not in want]
    upsert = [a for k, a in want.items() if cur.get(k) != a]
    return remove, upsert


class Coordinator:
    def __init__(self, settings: Settings, poll_s: float = 2.0) -> None:
        self.settings = settings
        self.poll_s = poll_s
        self.active = False
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self, *, handle_signals: bool = True) -> None:
        if handle_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
        while not self._stopping.is_set():
            try:
                await self._run_once()
            except (psycopg.Error, OSError) as exc:
                self.active = False
                log.warning("coordinator_db_error", error=str(exc))
                await self._sleep(2.0)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)

    async def _run_once(self) -> None:
        conn = await db.connect(self.settings.database_url)
        try:
            while not self._stopping.is_set():
                cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (COORDINATOR_LOCK,))
                row = await cur.fetchone()
                if row and row[0]:
                    break
                if self.active is not False:
                    log.info("coordinator_standby")
                self.active = False
                await self._sleep(2.0)
            if self._stopping.is_set():
                return
            self.active = True
            log.info("coordinator_active")
            await conn.execute("LISTEN feedfleet_config")
            while not self._stopping.is_set():
                await self.reconcile(conn)
                async for _ in conn.notifies(timeout=self.poll_s, stop_after=1):
                    pass
        finally:
            await conn.close()

    async def reconcile(self, conn: db.Conn) -> int:
        """One pass: compute and write assignments. Returns how many rows changed."""
        await db.delete_dead_instances(conn, older_than_s=INSTANCE_TIMEOUT_S * 6)
        providers = await db.list_providers(conn)
        subscriptions = await db.active_subscriptions(conn)
        instances = await db.live_instances(conn, INSTANCE_TIMEOUT_S)
        desired = assign_symbols(subscriptions, providers, instances)
        remove, upsert = diff_assignments(await db.current_assignments(conn), desired)
        if remove or upsert:
            await db.replace_assignments(conn, remove, upsert)
            log.info("assignments_written", removed=len(remove), upserted=len(upsert),
                     total=len(desired))  # fmt: skip
        return len(remove) + len(upsert)


async def run_coordinator() -> None:
    from common.log import configure_logging

    settings = Settings.from_env()
    configure_logging(settings.log_format, settings.log_level)
    await Coordinator(settings).run()
