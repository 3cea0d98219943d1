"""The command side in PostgreSQL: every query the worker, coordinator and api make."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from common.model import DataType
from common.project_files import project_file
from common.provider import Instrument, ProviderConfig

SCHEMA_PATH = project_file("schema.sql")
# Serialises concurrent `db init`s (several processes starting at once).
_SCHEMA_LOCK = 0x66656564  # "feed"

Conn = psycopg.AsyncConnection[Any]


async def connect(url: str, *, autocommit: bool = True) -> Conn:
    return await psycopg.AsyncConnection.connect(url, autocommit=autocommit, connect_timeout=10)


async def apply_schema(conn: Conn) -> None:
    sql = SCHEMA_PATH.read_text()
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        await conn.execute(sql.encode())  # several statements: simple query protocol


async def ensure_partitions(conn: Conn, hours_back: int = 2, hours_ahead: int = 24) -> int:
    cur = await conn.execute(
        "SELECT feedfleet_ensure_partitions(%s, %s)", (hours_back, hours_ahead)
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0


# ---------------------------------------------------------------- providers


_PROVIDER_COLUMNS = (
    "id::text AS id, name, provider_type, enabled, priority, connection_config, rate_limits"
)


def _provider(row: dict[str, Any]) -> ProviderConfig:
    return ProviderConfig(
        id=row["id"],
        name=row["name"],
        provider_type=row["provider_type"],
        enabled=row["enabled"],
        priority=row["priority"],
        connection_config=row["connection_config"] or {},
        rate_limits=row["rate_limits"] or {},
    )


def _is_uuid(text: str) -> bool:
    """Whether PostgreSQL's uuid input takes ``text``: 32 hex digits in either case, a hyphen
    allowed after any group of four but the last, the whole optionally in one pair of braces.

    ``uuid.UUID`` alone is too lenient: it also takes ``urn:uuid:``, repeated braces, stray
    hyphens, a sign, whitespace and underscores, which PostgreSQL rejects with an error.
    """
    body = text[1:-1] if text[:1] == "{" and text[-1:] == "}" else text
    groups = body.split("-")
    if any(not g or len(g) % 4 for g in groups):
        return False
    digits = "".join(groups)
    try:
        parsed = uuid.UUID(digits)
    except ValueError:
        return False
    # int(x, 16) behind uuid.UUID forgives what is not a plain hex digit; PostgreSQL does not
    return parsed.hex == digits.lower()


async def find_provider(conn: Conn, name_or_id: str) -> ProviderConfig | None:
    """A provider by name or by uuid (the API accepts either)."""
    column = "id" if _is_uuid(name_or_id) else "name"
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"SELECT {_PROVIDER_COLUMNS} FROM providers WHERE {column} = %s", (name_or_id,)
        )
        row = await cur.fetchone()
    return _provider(row) if row else None


async def list_providers(conn: Conn, *, enabled_only: bool = False) -> list[ProviderConfig]:
    where = "WHERE enabled" if enabled_only else ""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"SELECT {_PROVIDER_COLUMNS} FROM providers {where} ORDER BY priority, name"
        )
        return [_provider(r) for r in await cur.fetchall()]


async def upsert_provider(
    conn: Conn, name: str, provider_type: str, connection_config: dict[str, Any],
    rate_limits: dict[str, Any] | None = None, priority: int = 100, enabled: bool = True,
) -> str:  # fmt: skip
    cur = await conn.execute(
        """
        INSERT INTO providers (name, provider_type, connection_config, rate_limits,
                               priority, enabled)
        VALUES (%s, %s, %s, %s, %s, %s)
        ON CONFLICT (name) DO UPDATE SET provider_type = EXCLUDED.provider_type,
            connection_config = EXCLUDED.connection_config,
            rate_limits = EXCLUDED.rate_limits, priority = EXCLUDED.priority,
            enabled = EXCLUDED.enabled, updated_at = now()
        RETURNING id::text
        """,
        (name, provider_type, Jsonb(connection_config), Jsonb(rate_limits or {}),
         priority, enabled),
    )  # fmt: skip
    row = await cur.fetchone()
    assert row is not None
    return str(row[0])


async def set_provider_enabled(conn: Conn, provider_id: str, enabled: bool) -> None:
    await conn.execute(
        "UPDATE providers SET enabled = %s, updated_at = now() WHERE id = %s",
        (enabled, provider_id),
    )


# ---------------------------------------------------------------- subscriptions


@dataclass(frozen=True, slots=True)
class Subscription:
    provider_id: str
    symbol: str
    data_types: list[str]
    status: str = "active"  # the seed's column: 'active', 'inactive' or 'failover'


async def subscribe(
    conn: Conn, provider_id: str, symbols: list[str], data_types: list[DataType]
) -> list[Subscription]:
    types = [t.value for t in data_types]
    out: list[Subscription] = []
    async with conn.transaction():
        for symbol in symbols:
            cur = await conn.execute(
                """
                INSERT INTO subscriptions (provider_id, instrument_symbol, data_types)
                VALUES (%s, %s, %s)
                ON CONFLICT (provider_id, instrument_symbol) DO UPDATE
                SET data_types = EXCLUDED.data_types, updated_at = now(),
                    status = CASE WHEN subscriptions.status = 'inactive' THEN 'active'
                                  ELSE subscriptions.status END
                RETURNING status
                """,
                (provider_id, symbol, types),
            )
            row = await cur.fetchone()
            out.append(Subscription(provider_id, symbol, types, row[0] if row else "active"))
    return out


async def unsubscribe(conn: Conn, provider_id: str, symbols: list[str]) -> int:
    cur = await conn.execute(
        "UPDATE subscriptions SET status = 'inactive', updated_at = now() "
        "WHERE provider_id = %s AND instrument_symbol = ANY(%s) AND status <> 'inactive'",
        (provider_id, symbols),
    )
    return cur.rowcount


async def active_subscriptions(conn: Conn) -> list[Subscription]:
    cur = await conn.execute(
        "SELECT provider_id::text, instrument_symbol, data_types, status FROM subscriptions "
        "WHERE status <> 'inactive' ORDER BY provider_id, instrument_symbol"
    )
    return [Subscription(r[0], r[1], list(r[2]), r[3]) for r in await cur.fetchall()]


# ---------------------------------------------------------------- worker instances


# Two-key advisory lock space (apart from the single-key locks above): serialises
# registrations of one provider on one host.
_INSTANCE_LOCK = 0x696E7374  # "inst"
# The payload tells the coordinator that only instances changed (see workers/coordinator.py).
_NOTIFY_INSTANCES = "SELECT pg_notify('feedfleet_config', 'worker_instances')"


async def register_instance(
    conn: Conn, instance_id: str, provider_id: str, host: str, pid: int
) -> list[str]:
    """Register a worker; returns the ids of the instances it superseded.

    One worker per provider per host is the deployment rule (its journal directory is per
    provider per host), so another row for the same provider and host with another pid
    is a predecessor that died without deregistering (kill -9, OOM) and was restarted:
    it is removed now instead of staying "live" until its heartbeat times out, which
    left its share of the symbols unserved. The notify goes out at commit, so the
    coordinator moves the symbols at once and reads the new rows when it does.
    """
    async with conn.transaction():
        # Without it, two registering at once each miss the other's uncommitted row.
        await conn.execute(
            "SELECT pg_advisory_xact_lock(%s, hashtext(%s))",
            (_INSTANCE_LOCK, f"{provider_id}@{host}"),
        )
        cur = await conn.execute(
            "DELETE FROM worker_instances WHERE provider_id = %s AND host = %s "
            "AND pid <> %s AND instance_id <> %s RETURNING instance_id",
            (provider_id, host, pid, instance_id),
        )
        superseded = sorted(r[0] for r in await cur.fetchall())
        await conn.execute(
            """
            INSERT INTO worker_instances (instance_id, provider_id, host, pid)
            VALUES (%s, %s, %s, %s)
            ON CONFLICT (instance_id) DO UPDATE SET heartbeat_at = now(), pid = EXCLUDED.pid
            """,
            (instance_id, provider_id, host, pid),
        )
        await conn.execute(_NOTIFY_INSTANCES)
    return superseded


async def heartbeat_instance(conn: Conn, instance_id: str) -> bool:
    """Refresh the instance's row; False when there is none (it was dropped as dead).
    Status changes go through ``report_instance_state``, which notifies."""
    cur = await conn.execute(
        "UPDATE worker_instances SET heartbeat_at = now() WHERE instance_id = %s",
        (instance_id,),
    )
    return cur.rowcount > 0


async def remove_instance(conn: Conn, instance_id: str) -> None:
    """Deregister; the coordinator is notified at commit and moves the symbols at once."""
    async with conn.transaction():
        await conn.execute("DELETE FROM worker_instances WHERE instance_id = %s", (instance_id,))
        await conn.execute(_NOTIFY_INSTANCES)


@dataclass(frozen=True, slots=True)
class LiveInstance:
    """A worker instance whose heartbeat is recent, with the state it last pushed.
    ``unavailable`` and ``flowing`` hold canonical symbols."""

    instance_id: str
    provider_id: str
    host: str
    status: str = "CONNECTED"
    # Seconds, as of the read and by the server's clock (immune to the reader's clock);
    # they differ on every read, so they are no part of equality.
    status_age_s: float = field(default=0.0, compare=False)
    heartbeat_age_s: float = field(default=0.0, compare=False)
    unavailable: frozenset[str] = frozenset()
    flowing: frozenset[str] = frozenset()


async def live_instances(conn: Conn, timeout_s: float) -> list[LiveInstance]:
    cur = await conn.execute(
        """
        SELECT instance_id, provider_id::text, host, status,
               extract(epoch FROM now() - status_since)::float8,
               extract(epoch FROM now() - heartbeat_at)::float8,
               unavailable_symbols, flowing_symbols
        FROM worker_instances
        WHERE heartbeat_at > now() - make_interval(secs => %s) ORDER BY instance_id
        """,
        (timeout_s,),
    )
    return [
        LiveInstance(r[0], r[1], r[2], r[3], max(r[4], 0.0), max(r[5], 0.0), *map(frozenset, r[6:]))
        for r in await cur.fetchall()
    ]


async def count_live_instances(conn: Conn, provider_id: str, timeout_s: float) -> int:
    """How many instances of one provider have heartbeated within ``timeout_s``."""
    cur = await conn.execute(
        "SELECT count(*) FROM worker_instances WHERE provider_id = %s "
        "AND heartbeat_at > now() - make_interval(secs => %s)",
        (provider_id, timeout_s),
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def delete_dead_instances(conn: Conn, older_than_s: float) -> int:
    cur = await conn.execute(
        "DELETE FROM worker_instances WHERE heartbeat_at < now() - make_interval(secs => %s)",
        (older_than_s,),
    )
    return cur.rowcount


async def instance_report(conn: Conn, live_within_s: float) -> list[dict[str, Any]]:
    """Every registered worker instance with its provider's name, for the API; ``live``
    when it heartbeated within ``live_within_s`` (ages by the server's clock)."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            """
            SELECT w.instance_id, p.name AS provider, w.host, w.pid, w.status,
                   w.started_at, w.status_since,
                   greatest(extract(epoch FROM now() - w.heartbeat_at), 0)::float8
                       AS heartbeat_age_s,
                   w.heartbeat_at > now() - make_interval(secs => %s) AS live
            FROM worker_instances w JOIN providers p ON p.id = w.provider_id
            ORDER BY p.name, w.instance_id
            """,
            (live_within_s,),
        )
        return list(await cur.fetchall())


# ---------------------------------------------------------------- assignments


@dataclass(frozen=True, slots=True)
class Assignment:
    """One row: ``instance_id`` serves ``symbol`` (canonical) for ``provider_id``'s
    subscription; ``serving_provider_id`` is that instance's provider (None: the same)."""

    provider_id: str
    symbol: str
    instance_id: str
    data_types: tuple[str, ...]
    reason: str = "primary"  # 'primary', 'failover' (a backup serves it) or 'failback'
    serving_provider_id: str | None = None
    latest: bool = False  # its worker writes latest:{symbol}

    @property
    def server(self) -> str:
        return self.serving_provider_id or self.provider_id


async def current_assignments(conn: Conn) -> list[Assignment]:
    cur = await conn.execute(
        "SELECT provider_id::text, instrument_symbol, instance_id, data_types, reason, "
        "coalesce(serving_provider_id, provider_id)::text, latest FROM assignments"
    )
    return [
        Assignment(r[0], r[1], r[2], tuple(r[3]), r[4], r[5], r[6]) for r in await cur.fetchall()
    ]


async def replace_assignments(
    conn: Conn, remove: list[Assignment], upsert: list[Assignment]
) -> None:
    """Delete and upsert rows in one transaction, each kind as one batch: executemany
    pipelines the statements. Moving 3,000 symbols (3,000 deletes, 3,000 inserts) took
    0.43 s, against 1.6 s with one statement and round trip per row (embedded
    PostgreSQL, 2 shared cores)."""
    async with conn.transaction(), conn.cursor() as cur:
        if remove:
            await cur.executemany(
                "DELETE FROM assignments "
                "WHERE provider_id = %s AND instrument_symbol = %s AND instance_id = %s",
                [(a.provider_id, a.symbol, a.instance_id) for a in remove],
            )
        if upsert:
            await cur.executemany(
                """
                INSERT INTO assignments (provider_id, instrument_symbol, instance_id,
                                         data_types, reason, serving_provider_id, latest)
                VALUES (%s, %s, %s, %s, %s, %s, %s)
                ON CONFLICT (provider_id, instrument_symbol, instance_id) DO UPDATE
                SET data_types = EXCLUDED.data_types, reason = EXCLUDED.reason,
                    serving_provider_id = EXCLUDED.serving_provider_id,
                    latest = EXCLUDED.latest,
                    assigned_at = CASE WHEN assignments.reason = EXCLUDED.reason
                                       THEN assignments.assigned_at ELSE now() END
                """,
                [(a.provider_id, a.symbol, a.instance_id, list(a.data_types), a.reason,
                  a.server, a.latest) for a in upsert],
            )  # fmt: skip
        await cur.execute("SELECT pg_notify('feedfleet_assignments', '')")


async def failover_subscriptions(conn: Conn) -> set[tuple[str, str]]:
    """(provider_id, symbol) of every subscription the coordinator marked 'failover'."""
    cur = await conn.execute(
        "SELECT provider_id::text, instrument_symbol FROM subscriptions WHERE status = 'failover'"
    )
    return {(r[0], r[1]) for r in await cur.fetchall()}


async def set_subscription_status(conn: Conn, keys: Iterable[tuple[str, str]], status: str) -> None:
    """Set ``status`` ('active' or 'failover') on the (provider_id, symbol) subscriptions,
    in one statement (the table's trigger notifies once per statement). An unsubscribed
    ('inactive') row is left alone."""
    pairs = list(keys)
    if not pairs:
        return
    await conn.execute(
        """
        UPDATE subscriptions s SET status = %s
        FROM unnest(%s::uuid[], %s::text[]) AS k(provider_id, symbol)
        WHERE s.provider_id = k.provider_id AND s.instrument_symbol = k.symbol
          AND s.status IS DISTINCT FROM %s AND s.status <> 'inactive'
        """,
        (status, [p for p, _ in pairs], [s for _, s in pairs], status),
    )


async def record_handovers(conn: Conn, rows: list[tuple[str, str, str]]) -> None:
    """``provider_connections`` rows for hand-overs: (provider_id, status, message), the
    status 'FAILOVER' or 'FAILBACK', the message saying what moved, where and why."""
    if not rows:
        return
    async with conn.cursor() as cur:
        await cur.executemany(
            "INSERT INTO provider_connections (provider_id, status, error_message) "
            "VALUES (%s, %s, %s)",
            rows,
        )


async def assignment_report(conn: Conn) -> list[dict[str, Any]]:
    """Every assignment row with provider names, for the API."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            """
            SELECT p.name AS provider, a.instrument_symbol AS symbol, s.name AS served_by,
                   a.instance_id, a.reason, a.latest, a.assigned_at AS since
            FROM assignments a
            JOIN providers p ON p.id = a.provider_id
            LEFT JOIN providers s ON s.id = coalesce(a.serving_provider_id, a.provider_id)
            ORDER BY a.instrument_symbol, p.name, a.instance_id
            """
        )
        return list(await cur.fetchall())


async def failover_summary(conn: Conn) -> tuple[int, list[str]]:
    """(canonical symbols served by a backup, names of the providers they belong to)."""
    cur = await conn.execute(
        """
        SELECT count(DISTINCT s.instrument_symbol),
               coalesce(array_agg(DISTINCT p.name ORDER BY p.name), '{}')
        FROM subscriptions s JOIN providers p ON p.id = s.provider_id
        WHERE s.status = 'failover'
        """
    )
    row = await cur.fetchone()
    return (int(row[0]), list(row[1])) if row else (0, [])


@dataclass(frozen=True, slots=True)
class HeldSymbol:
    """One canonical symbol an instance holds, merged over its assignment rows."""

    instrument: Instrument
    failover: bool  # held only as a backup for other providers
    latest: bool  # this instance writes latest:{symbol}


async def held_digest(conn: Conn, instance_id: str) -> str:
    """A digest of this instance's assignments as ``held_symbols`` reads them: it changes
    whenever what it would return may have."""
    cur = await conn.execute(
        "SELECT count(*)::text || ':' || coalesce(md5(string_agg("
        "    instrument_symbol || '|' || data_types::text || '|' || reason || '|' || latest::text,"
        "    ',' ORDER BY instrument_symbol, reason, data_types)), '') "
        "FROM assignments WHERE instance_id = %s",
        (instance_id,),
    )
    row = await cur.fetchone()
    return str(row[0]) if row else ""


async def held_symbols(conn: Conn, instance_id: str) -> dict[str, HeldSymbol]:
    """What the coordinator gave this instance. A symbol held for several providers (its
    own subscription and as a backup) is one subscription with the union of data types."""
    cur = await conn.execute(
        "SELECT instrument_symbol, data_types, reason, latest FROM assignments "
        "WHERE instance_id = %s",
        (instance_id,),
    )
    merged: dict[str, tuple[set[DataType], bool, bool]] = {}
    for symbol, types, reason, latest in await cur.fetchall():
        known = {DataType(t) for t in types if t in DataType.__members__}
        prior = merged.get(symbol)
        failover = reason == "failover"
        if prior is None:
            merged[symbol] = (known, failover, latest)
        else:
            merged[symbol] = (prior[0] | known, prior[1] and failover, prior[2] or latest)
    return {
        s: HeldSymbol(Instrument(s, frozenset(types)), failover, latest)
        for s, (types, failover, latest) in merged.items()
    }


async def assigned_instruments(conn: Conn, instance_id: str) -> dict[str, Instrument]:
    return {s: h.instrument for s, h in (await held_symbols(conn, instance_id)).items()}


async def report_instance_state(
    conn: Conn, instance_id: str, status: str, unavailable: list[str], flowing: list[str]
) -> bool:
    """Push the worker's state the moment it changes; the coordinator is notified at once.
    False when the instance has no row (dropped as dead)."""
    async with conn.transaction():
        cur = await conn.execute(
            """
            UPDATE worker_instances SET heartbeat_at = now(),
                status_since = CASE WHEN status = %s THEN status_since ELSE now() END,
                status = %s, unavailable_symbols = %s, flowing_symbols = %s
            WHERE instance_id = %s
            """,
            (status, status, unavailable, flowing, instance_id),
        )
        await conn.execute("SELECT pg_notify('feedfleet_config', 'worker_status')")
    return cur.rowcount > 0


# ---------------------------------------------------------------- status and metrics


async def record_connection(
    conn: Conn, provider_id: str, instance_id: str, status: str, error: str | None,
    metadata: dict[str, Any] | None = None,
) -> None:  # fmt: skip
    connected = status == "CONNECTED"
    await conn.execute(
        """
        INSERT INTO provider_connections
            (provider_id, instance_id, status, connected_at, disconnected_at, error_message,
             last_heartbeat, connection_metadata)
        VALUES (%s, %s, %s, CASE WHEN %s THEN now() END, CASE WHEN %s THEN NULL ELSE now() END,
                %s, now(), %s)
        """,
        (provider_id, instance_id, status, connected, connected, error, Jsonb(metadata or {})),
    )


async def connection_heartbeat(conn: Conn, provider_id: str, instance_id: str) -> None:
    """``last_heartbeat`` on the instance's latest provider_connections row."""
    await conn.execute(
        """
        UPDATE provider_connections SET last_heartbeat = now()
        WHERE id = (SELECT max(id) FROM provider_connections
                    WHERE provider_id = %s AND instance_id = %s)
        """,
        (provider_id, instance_id),
    )


async def latest_connection(conn: Conn, provider_id: str) -> tuple[str, datetime] | None:
    cur = await conn.execute(
        "SELECT status, created_at FROM provider_connections WHERE provider_id = %s "
        "ORDER BY id DESC LIMIT 1",
        (provider_id,),
    )
    row = await cur.fetchone()
    return (row[0], row[1]) if row else None


async def insert_metrics(conn: Conn, provider_id: str, instance_id: str, m: dict[str, Any]) -> None:
    await conn.execute(
        """
        INSERT INTO ingestion_metrics
            (provider_id, instance_id, messages_received, messages_published, messages_stored,
             messages_spooled, messages_replayed, messages_dropped, decode_errors, error_count,
             throughput_per_sec, latency_p50_ms, latency_p99_ms,
             messages_ingested, bytes_ingested, errors_count, avg_latency_ms)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
        """,
        (provider_id, instance_id, m["received"], m["published"], m["stored"], m["spooled"],
         m["replayed"], m["dropped"], m["decode_errors"], m["error_count"],
         m["throughput_per_sec"], m["latency_p50_ms"], m["latency_p99_ms"],
         m["received"], m["bytes_received"], m["decode_errors"] + m["error_count"],
         m["latency_avg_ms"]),
    )  # fmt: skip
