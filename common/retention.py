"""raw_market_data's retention: rows older than the configured age leave the table.

Native hourly partitions: a partition whose whole range ends at or before now minus
``days`` is dropped (mode ``drop``) or detached (mode ``detach``: it stays as a table of
its own, for the operator to archive, e.g. with pg_dump, and drop). The current and the
future partitions cannot qualify, their ranges end after now, and neither can
``raw_market_data_default``, which has no range; in drop mode its rows older than the
cutoff (records whose hour had no partition yet, such as an old backfill) are deleted.
Dropping or detaching a partition briefly locks the parent table, so each waits at most
``LOCK_TIMEOUT``: a partition it could not lock is left for the next pass, never waited
for behind the workers' COPYs.

A TimescaleDB hypertable (the extension installed and raw_market_data not natively
partitioned) is left to TimescaleDB: its retention policy (``drop_chunks`` after ``days``)
and a compression policy (chunks older than a day, segmented by symbol) are set instead,
and TimescaleDB's own job scheduler runs them. Chunks are dropped there, never detached.

The active coordinator runs ``keep_retention`` when it takes over and every 10 minutes
(workers/coordinator.py), as the workers create the partitions ahead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg
import structlog
from psycopg import sql

from common.config import Settings
from common.db import Conn

log = structlog.get_logger("feedfleet.retention")

DROP, DETACH = "drop", "detach"
PARTITIONS, TIMESCALEDB, PLAIN = "partitions", "timescaledb", "plain"
LOCK_TIMEOUT = "2s"
COMPRESS_AFTER = "1 day"

# Every partition of raw_market_data whose range ends at or before the cutoff, oldest
# first. pg_get_expr gives "FOR VALUES FROM ('…') TO ('…')" in this session's time zone,
# which the cast reads back the same way; the default partition ("DEFAULT") and an
# unbounded range ("MAXVALUE") have no quoted upper bound and never match.
_EXPIRED_PARTITIONS = r"""
SELECT c.relname
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
CROSS JOIN LATERAL (
    SELECT (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'TO \(''([^'']+)''\)'))[1] AS upper
) b
WHERE i.inhparent = 'raw_market_data'::regclass
  AND b.upper IS NOT NULL
  AND b.upper::timestamptz <= now() - make_interval(days => %s)
ORDER BY b.upper::timestamptz
"""


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    days: int | None  # None: keep everything
    mode: str = DROP  # DROP or DETACH; native partitions only

    @classmethod
    def from_settings(cls, settings: Settings) -> RetentionPolicy:
        return cls(settings.retention_days, settings.retention_mode)


@dataclass(slots=True)
class RetentionPass:
    """What one pass did: ``removed`` partitions (dropped or detached), ``locked`` ones
    left for the next pass, rows deleted from the default partition, and any TimescaleDB
    policy statements it ran."""

    storage: str
    removed: list[str] = field(default_factory=list)
    locked: list[str] = field(default_factory=list)
    default_rows_deleted: int = 0
    statements: list[str] = field(default_factory=list)


async def storage_kind(conn: Conn) -> str:
    """TIMESCALEDB where the extension is installed and raw_market_data is not a native
    partitioned table (so a hypertable, as schema.sql makes it then), PARTITIONS for native
    partitions, PLAIN otherwise (nothing to do)."""
    cur = await conn.execute(
        """
        SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'),
               EXISTS (SELECT 1 FROM pg_partitioned_table
                       WHERE partrelid = to_regclass('raw_market_data'))
        """
    )
    row = await cur.fetchone()
    timescale, partitioned = (bool(row[0]), bool(row[1])) if row else (False, False)
    if partitioned:
        return PARTITIONS
    return TIMESCALEDB if timescale else PLAIN


def timescale_policy_sql(
    policy: RetentionPolicy, *, compression_enabled: bool, drop_after: str | None
) -> list[str]:
    """The statements that bring the hypertable's policies to ``policy``, given whether
    compression is on and the retention job's current ``drop_after`` (None: no job).
    Nothing when they already agree: a policy is replaced only when it changes."""
    statements: list[str] = []
    if not compression_enabled:
        statements += [
            "ALTER TABLE raw_market_data SET (timescaledb.compress, "
            "timescaledb.compress_segmentby = 'symbol', "
            "timescaledb.compress_orderby = 'timestamp DESC')",
            "SELECT add_compression_policy('raw_market_data', "
            f"compress_after => INTERVAL '{COMPRESS_AFTER}', if_not_exists => true)",
        ]
    wanted = None if policy.days is None else f"{policy.days} days"
    if drop_after == wanted:
        return statements
    if drop_after is not None:
        statements.append("SELECT remove_retention_policy('raw_market_data', if_exists => true)")
    if wanted is not None:
        statements.append(
            f"SELECT add_retention_policy('raw_market_data', drop_after => INTERVAL '{wanted}')"
        )
    return statements


async def _timescale_state(conn: Conn) -> tuple[bool, str | None]:
    cur = await conn.execute(
        "SELECT compression_enabled FROM timescaledb_information.hypertables "
        "WHERE hypertable_name = 'raw_market_data'"
    )
    row = await cur.fetchone()
    cur = await conn.execute(
        "SELECT config ->> 'drop_after' FROM timescaledb_information.jobs "
        "WHERE proc_name = 'policy_retention' AND hypertable_name = 'raw_market_data'"
    )
    job = await cur.fetchone()
    return bool(row and row[0]), job[0] if job else None


async def keep_retention(conn: Conn, policy: RetentionPolicy) -> RetentionPass:
    """One pass of ``policy`` over raw_market_data (see the module's docstring)."""
    kind = await storage_kind(conn)
    done = RetentionPass(kind)
    if kind == TIMESCALEDB:
        compression_enabled, drop_after = await _timescale_state(conn)
        done.statements = timescale_policy_sql(
            policy, compression_enabled=compression_enabled, drop_after=drop_after
        )
        if done.statements:
            async with conn.transaction():
                for statement in done.statements:
                    await conn.execute(statement.encode())
            log.info("retention_policy_set", storage=kind, days=policy.days,
                     statements=done.statements)  # fmt: skip
        return done
    if kind != PARTITIONS or policy.days is None:
        return done
    cur = await conn.execute(_EXPIRED_PARTITIONS, (policy.days,))
    for (name,) in await cur.fetchall():
        if policy.mode == DETACH:
            remove = sql.SQL("ALTER TABLE raw_market_data DETACH PARTITION {}")
        else:
            remove = sql.SQL("DROP TABLE {}")
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
                await conn.execute(remove.format(sql.Identifier(name)))
        except psycopg.errors.LockNotAvailable:
            done.locked.append(name)
            log.warning("retention_partition_locked", partition=name, retry="next pass")
            continue
        done.removed.append(name)
        log.info("retention_partition_removed", partition=name, mode=policy.mode,
                 days=policy.days)  # fmt: skip
    if policy.mode == DROP:
        done.default_rows_deleted = await _trim_default(conn, policy.days)
    return done


async def _trim_default(conn: Conn, days: int) -> int:
    """Rows of the default partition older than the cutoff (deleting takes no lock that
    stops the workers' inserts)."""
    cur = await conn.execute("SELECT to_regclass('raw_market_data_default') IS NOT NULL")
    row = await cur.fetchone()
    if not (row and row[0]):
        return 0
    cur = await conn.execute(
        "DELETE FROM raw_market_data_default WHERE timestamp < now() - make_interval(days => %s)",
        (days,),
    )
    if cur.rowcount:
        log.info("retention_default_rows_deleted", rows=cur.rowcount, days=days)
    return cur.rowcount
