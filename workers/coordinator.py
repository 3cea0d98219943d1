"""The coordinator: decides which worker instance holds which symbols, and fails symbols
over to a backup provider and back.

Only one coordinator acts at a time: it holds a PostgreSQL session advisory lock. A second
one stands by queued for that lock in the server, so it takes over the moment the lock is
released, and the lock goes with the first one's connection. The active one reconciles
on every ``feedfleet_config`` notification (a worker registering, deregistering or
pushing its state, a provider or subscription change), at least every ``poll_s``, at the
moment a grace period, a hold-down or an instance's heartbeat runs out, and every
``PENDING_POLL_S`` while a failback is under way. It writes only the differences to
``assignments`` and ``subscriptions.status``.

Failover, per canonical symbol S subscribed for provider P (the contract):

- P serves S (rendezvous hashing over its instances) while it can: enabled, a live
  CONNECTED instance that does not list S as unavailable. Live instances that are all
  unhealthy keep S for ``failover_grace_s``; no live instance, the grace run out or S
  unavailable moves S at once to the best backup (lowest priority number, then name) that
  is enabled, CONNECTED and accepts S (``failover_symbols``). No backup: P keeps its row.
- Failback is make-before-break: once P can serve S and has been healthy for its
  hold-down (``failback_hold_s``, doubled up to 600 s for a provider that fails again
  within 5 minutes of a failback), P gets a 'failback' row beside the backup's; when P's
  instance reports S flowing, P's row becomes 'primary' and the backup's goes.
- One row per canonical symbol has ``latest``: the highest-priority provider serving it.

The decisions are pure functions (``assess_providers``, ``plan_symbols``) over what was
read and a small ``Memory`` the coordinator keeps between passes; ``Coordinator`` reads,
scopes, writes and logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from enum import Enum
from fnmatch import fnmatchcase
from hashlib import blake2b
from typing import Any

import psycopg
import structlog

from common import db
from common.config import Settings
from common.model import ConnectionStatus
from common.provider import ProviderConfig
from common.retention import RetentionPolicy, keep_retention

log = structlog.get_logger("feedfleet.coordinator")

COORDINATOR_LOCK = 0x636F6F72  # "coor"
# Workers heartbeat every 0.5 s, so a worker is dead after missing about four.
INSTANCE_TIMEOUT_S = 2.0
# A standby re-queues for the lock this often, so a connection that died silently (no
# error ever arrives on a blocked query) is found and replaced.
LOCK_RECHECK_S = 30.0
# Notifications arriving this soon after one are handled by the same pass.
COALESCE_S = 0.05
# Passes on instance changes trust what the last full pass read and what the coordinator
# wrote since (it is the only writer of assignments); this bounds how long a change nobody
# announced (a hand edit of assignments) can go unseen.
FULL_RESYNC_S = 60.0
# raw_market_data's retention runs when a coordinator takes over and this often after,
# as often as the workers create the partitions ahead (common/retention.py).
RETENTION_INTERVAL_S = 600.0
# The longest wait between passes while a failback waits for its symbol to flow.
PENDING_POLL_S = 0.5
# The notification payloads that only worker_instances changed (common/db.py sends them):
# an instance came or went, or a worker pushed its status or symbol lists.
INSTANCES_CHANGED = "worker_instances"
WORKER_STATUS = "worker_status"

DEFAULT_GRACE_S = 3.0
DEFAULT_HOLD_S = 30.0
FLAP_WINDOW_S = 300.0  # failing again this soon after a failback doubles the hold-down
MAX_HOLD_S = 600.0

PRIMARY, FAILOVER, FAILBACK = "primary", "failover", "failback"
# Plan events that are not hand-overs: logged, but no provider_connections row.
FAILBACK_STARTED, FAILBACK_ABORTED = "failback_started", "failback_aborted"

UP, GRACE, DOWN = "up", "grace", "down"
CONNECTED = ConnectionStatus.CONNECTED.value


class State(Enum):
    STOPPED = "stopped"
    CONNECTING = "connecting"
    STANDBY = "standby"  # the lock is held elsewhere and this one is queued for it
    ACTIVE = "active"


def _weight(instance_id: str, symbol: str) -> int:
    return int.from_bytes(blake2b(f"{instance_id}|{symbol}".encode(), digest_size=8).digest())


def _rendezvous(instances: Iterable[db.LiveInstance], symbol: str) -> db.LiveInstance | None:
    """The instance that wins ``symbol``: one moves only when its winner dies or a new
    instance wins it, so adding a host moves about 1/n of the symbols and nothing else."""
    return max(instances, key=lambda i: _weight(i.instance_id, symbol), default=None)


# ---------------------------------------------------------------- provider health


@dataclass(frozen=True, slots=True)
class FailoverPolicy:
    """A provider's failover settings (``connection_config``)."""

    grace_s: float = DEFAULT_GRACE_S
    hold_s: float = DEFAULT_HOLD_S
    takes_all: bool = False
    takes: frozenset[str] = frozenset()
    takes_glob: str | None = None
    problems: tuple[str, ...] = field(default=(), compare=False)

    @property
    def takes_any(self) -> bool:
        return self.takes_all or bool(self.takes) or self.takes_glob is not None

    def accepts(self, symbol: str) -> bool:
        if self.takes_all or symbol in self.takes:
            return True
        return self.takes_glob is not None and fnmatchcase(symbol, self.takes_glob)


def failover_policy(provider: ProviderConfig) -> FailoverPolicy:
    """The provider's policy; a bad value falls back to its default (and is reported in
    ``problems``) rather than stopping failover for everyone."""
    config = provider.connection_config
    problems: list[str] = []

    def seconds(key: str, default: float) -> float:
        value = config.get(key)
        if value is None:
            return default
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number) or number < 0:
            problems.append(f"connection_config.{key} must be seconds >= 0; using {default:g}")
            return default
        return number

    grace = seconds("failover_grace_s", DEFAULT_GRACE_S)
    hold = seconds("failback_hold_s", DEFAULT_HOLD_S)
    spec = config.get("failover_symbols")
    if spec == "*":
        return FailoverPolicy(grace, hold, takes_all=True, problems=tuple(problems))
    if isinstance(spec, str):
        return FailoverPolicy(grace, hold, takes_glob=spec, problems=tuple(problems))
    if isinstance(spec, list) and all(isinstance(s, str) for s in spec):
        return FailoverPolicy(grace, hold, takes=frozenset(spec), problems=tuple(problems))
    if spec is not None:
        problems.append('connection_config.failover_symbols must be "*", a glob or a list '
                        "of symbols; taking no failover traffic")  # fmt: skip
    return FailoverPolicy(grace, hold, problems=tuple(problems))


@dataclass(frozen=True, slots=True)
class Memory:
    """What the planner carries from pass to pass; times are the coordinator's clock.

    A provider is in exactly one of ``healthy_since`` and ``unhealthy_since``. A new
    coordinator starts empty and takes the times from the instances' ``status_since``.
    """

    at: float | None = None  # the previous pass
    healthy_since: dict[str, float] = field(default_factory=dict)
    unhealthy_since: dict[str, float] = field(default_factory=dict)
    hold_s: dict[str, float] = field(default_factory=dict)  # where not the provider's base
    # provider -> (when its last failback began, whether a failure since has doubled it)
    failback_at: dict[str, tuple[float, bool]] = field(default_factory=dict)
    # (provider, symbol) failed over -> when the provider was last seen refusing it
    blocked_at: dict[tuple[str, str], float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ProviderHealth:
    """One provider as this pass sees it.

    ``phase``: UP (a live CONNECTED instance), GRACE (live instances, none CONNECTED, for
    less than its grace: its symbols stay), DOWN (disabled, no live instance, or the grace
    has run out). ``since``: healthy since when UP, unhealthy since otherwise.
    """

    provider: ProviderConfig
    policy: FailoverPolicy
    phase: str
    since: float
    why: str  # why it is not UP
    live: tuple[db.LiveInstance, ...]
    connected: tuple[db.LiveInstance, ...]

    @property
    def rank(self) -> tuple[int, str]:
        return self.provider.priority, self.provider.name

    def pick(self, symbol: str, *, tolerant: bool = False) -> db.LiveInstance | None:
        """The instance to serve ``symbol``: a CONNECTED one without it unavailable, or
        with ``tolerant`` during the grace any live one (nothing moves yet)."""
        if self.phase == UP:
            pool = self.connected
        elif self.phase == GRACE and tolerant:
            pool = self.live
        else:
            return None
        return _rendezvous((i for i in pool if symbol not in i.unavailable), symbol)

    def signature(self) -> tuple[object, ...]:
        """What this provider's symbols' plans depend on, besides per-symbol lists."""
        return (
            self.provider.enabled,
            self.phase,
            frozenset(i.instance_id for i in self.live),
            frozenset(i.instance_id for i in self.connected),
        )


@dataclass(frozen=True, slots=True)
class Health:
    providers: dict[str, ProviderHealth]
    backups: tuple[ProviderHealth, ...]  # UP and taking failover traffic, best first
    wake_at: float | None  # when the first grace runs out
    memory: Memory

    def best_backup(
        self, symbol: str, exclude: set[str]
    ) -> tuple[ProviderHealth, db.LiveInstance] | None:
        for backup in self.backups:
            if backup.provider.id in exclude or not backup.policy.accepts(symbol):
                continue
            instance = backup.pick(symbol)
            if instance is not None:
                return backup, instance
        return None


def assess_providers(
    providers: list[ProviderConfig],
    instances: list[db.LiveInstance],
    now: float,
    memory: Memory,
) -> Health:
    """Each provider's phase. A change of health is dated by its instances' status_since
    where that is not before the previous pass (which saw the old state), else (enabled,
    disabled, an instance gone or come) by this pass; a coordinator without memory
    trusts status_since."""
    by_provider: dict[str, list[db.LiveInstance]] = defaultdict(list)
    for inst in instances:
        by_provider[inst.provider_id].append(inst)
    previous = memory.at if memory.at is not None else -math.inf

    def dated(derived: float) -> float:
        return min(derived, now) if derived >= previous and derived > -math.inf else now

    states: dict[str, ProviderHealth] = {}
    healthy: dict[str, float] = {}
    unhealthy: dict[str, float] = {}
    wake_at: float | None = None
    for p in providers:
        policy = failover_policy(p)
        live = tuple(by_provider.get(p.id, ()))
        connected = tuple(i for i in live if i.status == CONNECTED)
        if p.enabled and connected:
            since = memory.healthy_since.get(p.id)
            if since is None:
                since = dated(now - max(i.status_age_s for i in connected))
            healthy[p.id] = since
            states[p.id] = ProviderHealth(p, policy, UP, since, "", live, connected)
            continue
        since = memory.unhealthy_since.get(p.id)
        if since is None:
            since = dated(now - min(i.status_age_s for i in live) if live else -math.inf)
        unhealthy[p.id] = since
        if not p.enabled:
            phase, why = DOWN, "provider disabled"
        elif not live:
            phase, why = DOWN, "no live instance"
        else:
            statuses = "/".join(sorted({i.status for i in live}))
            phase, why = GRACE, f"{statuses} for {now - since:.1f} s"
            if now - since >= policy.grace_s:
                phase = DOWN
            else:
                end = since + policy.grace_s
                wake_at = end if wake_at is None else min(wake_at, end)
        states[p.id] = ProviderHealth(p, policy, phase, since, why, live, connected)
    backups = tuple(
        sorted(
            (s for s in states.values() if s.phase == UP and s.policy.takes_any),
            key=lambda s: s.rank,
        )
    )
    memory = replace(memory, at=now, healthy_since=healthy, unhealthy_since=unhealthy)
    return Health(states, backups, wake_at, memory)


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True, slots=True)
class HandOver:
    """A symbol of ``provider_id``'s subscription changing hands (or a failback
    starting or giving up, which are not hand-overs yet)."""

    kind: str  # FAILOVER, FAILBACK, FAILBACK_STARTED, FAILBACK_ABORTED
    provider_id: str
    symbol: str
    from_provider_id: str
    to_provider_id: str
    why: str
    detect_s: float  # from the failure (or from being ready again) to this decision


@dataclass(frozen=True, slots=True)
class Plan:
    rows: list[db.Assignment]
    failover: set[tuple[str, str]]  # (provider, symbol) served by a backup: status 'failover'
    stranded: dict[tuple[str, str], str]  # neither the provider nor a backup can serve: why
    events: list[HandOver]
    # Symbols not simply with their own providers: re-planned whenever any provider
    # changes, since a recovery or a new backup may move them.
    needy: set[str]
    waiting: set[str]  # symbols whose failback waits for the symbol to flow
    wake_at: float | None  # when the first grace or hold-down runs out
    memory: Memory


@dataclass(frozen=True, slots=True)
class _Row:
    provider_id: str
    instance_id: str
    reason: str
    serving_provider_id: str
    data_types: tuple[str, ...]


class _Planner:
    def __init__(self, health: Health, now: float) -> None:
        self.health = health
        self.now = now
        memory = health.memory
        self.hold = dict(memory.hold_s)
        self.failback_at = dict(memory.failback_at)
        self.blocked: dict[tuple[str, str], float] = {}
        self.rows: list[db.Assignment] = []
        self.failover: set[tuple[str, str]] = set()
        self.stranded: dict[tuple[str, str], str] = {}
        self.events: list[HandOver] = []
        self.needy: set[str] = set()
        self.waiting: set[str] = set()
        self.wake_at = health.wake_at

    def hold_s(self, p: ProviderHealth) -> float:
        return self.hold.get(p.provider.id, p.policy.hold_s)

    def failed_again(self, provider_id: str) -> None:
        """The provider lost a symbol: within FLAP_WINDOW_S of a failback its hold-down
        doubles (once per failback); later than that it is back to its base."""
        last = self.failback_at.get(provider_id)
        if last is None:
            return
        at, counted = last
        if self.now - at >= FLAP_WINDOW_S:
            self.hold.pop(provider_id, None)
            del self.failback_at[provider_id]
        elif not counted:
            p = self.health.providers[provider_id]
            self.hold[provider_id] = min(2 * self.hold_s(p), MAX_HOLD_S)
            self.failback_at[provider_id] = (at, True)

    def event(self, kind: str, p: str, s: str, src: str, dst: str, why: str, t: float) -> None:
        self.events.append(HandOver(kind, p, s, src, dst, why, max(t, 0.0)))

    def symbol(self, symbol: str, subs: list[db.Subscription], rows: list[db.Assignment]) -> None:
        planned: list[_Row] = []
        for sub in subs:
            p = self.health.providers.get(sub.provider_id)
            if p is None:
                continue
            mine = [r for r in rows if r.provider_id == sub.provider_id]
            planned += self.subscription(symbol, p, tuple(sub.data_types), mine)
        self.rows += self.with_latest(symbol, planned)

    def subscription(
        self, symbol: str, p: ProviderHealth, types: tuple[str, ...], mine: list[db.Assignment]
    ) -> list[_Row]:
        key = (p.provider.id, symbol)
        backup_row = next((r for r in mine if r.reason == FAILOVER), None)
        failback_row = next((r for r in mine if r.reason == FAILBACK), None)
        blocked = any(symbol in i.unavailable for i in p.live)
        if backup_row is None:
            out = self.normal(symbol, p, types, mine)
        else:
            out = self.failed_over(symbol, p, types, backup_row, failback_row)
        if any(r.reason == FAILOVER for r in out):
            self.failover.add(key)
            self.needy.add(symbol)
            if blocked:
                self.blocked[key] = self.now
            elif key in self.health.memory.blocked_at:
                self.blocked[key] = self.health.memory.blocked_at[key]
        if key in self.stranded:
            self.needy.add(symbol)
        return out

    def why_not(self, p: ProviderHealth) -> str:
        return p.why if p.phase != UP else "symbol unavailable"

    def normal(
        self, symbol: str, p: ProviderHealth, types: tuple[str, ...], mine: list[db.Assignment]
    ) -> list[_Row]:
        pid = p.provider.id
        own = p.pick(symbol, tolerant=True)
        if own is not None:
            return [_Row(pid, own.instance_id, PRIMARY, pid, types)]
        why = self.why_not(p)
        backup = self.health.best_backup(symbol, {pid})
        if backup is not None:
            q, inst = backup
            self.failed_again(pid)
            detect = self.now - p.since if p.phase != UP else 0.0
            self.event(FAILOVER, pid, symbol, pid, q.provider.id, why, detect)
            return [_Row(pid, inst.instance_id, FAILOVER, q.provider.id, types)]
        if not p.provider.enabled:
            return []  # switched off by an operator, and nobody to stand in
        # Nobody can serve it: keep the provider's own row, so it resumes the moment it can.
        self.stranded[(pid, symbol)] = why
        fallback = _rendezvous([i for i in p.live if symbol not in i.unavailable] or p.live, symbol)
        if fallback is not None:
            return [_Row(pid, fallback.instance_id, PRIMARY, pid, types)]
        return [_Row(pid, r.instance_id, PRIMARY, pid, types) for r in mine[:1]]

    def failed_over(
        self, symbol: str, p: ProviderHealth, types: tuple[str, ...],
        backup_row: db.Assignment, failback_row: db.Assignment | None,
    ) -> list[_Row]:  # fmt: skip
        pid, qid = p.provider.id, backup_row.server
        q = self.health.providers.get(qid)
        q_name = q.provider.name if q is not None else qid
        q_inst = None
        if q is not None and qid != pid and q.provider.enabled and q.policy.accepts(symbol):
            q_inst = q.pick(symbol, tolerant=True)
        own = p.pick(symbol)
        if own is not None:
            memory = self.health.memory
            ready_since = max(
                memory.healthy_since.get(pid, self.now),
                memory.blocked_at.get((pid, symbol), -math.inf),
            )
            waited = self.now - ready_since
            primary = _Row(pid, own.instance_id, PRIMARY, pid, types)
            if q_inst is None:
                # Nothing to make before breaking: the backup cannot serve it either.
                why = f"backup {q_name} cannot serve it"
                self.event(FAILBACK, pid, symbol, qid, pid, why, waited)
                return [primary]
            hold = self.hold_s(p)
            made = failback_row is not None and failback_row.instance_id == own.instance_id
            if made and symbol in own.flowing:
                why = f"flowing again after the {hold:g} s hold-down"
                self.event(FAILBACK, pid, symbol, qid, pid, why, waited)
                return [primary]
            backup = _Row(pid, q_inst.instance_id, FAILOVER, qid, types)
            if failback_row is None and self.now < ready_since + hold:
                end = ready_since + hold
                self.wake_at = end if self.wake_at is None else min(self.wake_at, end)
                return [backup]
            if failback_row is None:
                self.failback_at[pid] = (self.now, False)
                why = f"healthy for the {hold:g} s hold-down"
                self.event(FAILBACK_STARTED, pid, symbol, qid, pid, why, waited)
            self.waiting.add(symbol)
            return [backup, _Row(pid, own.instance_id, FAILBACK, pid, types)]
        why = self.why_not(p)
        if failback_row is not None:
            self.failed_again(pid)
            self.event(FAILBACK_ABORTED, pid, symbol, pid, qid, why, 0.0)
        if q_inst is not None:
            return [_Row(pid, q_inst.instance_id, FAILOVER, qid, types)]
        other = self.health.best_backup(symbol, {pid, qid})
        if other is not None:
            q2, inst = other
            detect = self.now - q.since if q is not None and q.phase != UP else 0.0
            why_q = f"backup {q_name}: {self.why_not(q) if q is not None else 'removed'}"
            self.event(FAILOVER, pid, symbol, qid, q2.provider.id, why_q, detect)
            return [_Row(pid, inst.instance_id, FAILOVER, q2.provider.id, types)]
        self.stranded[(pid, symbol)] = why
        return [_Row(pid, backup_row.instance_id, FAILOVER, qid, types)]

    def with_latest(self, symbol: str, planned: list[_Row]) -> list[db.Assignment]:
        """Exactly one row per symbol writes latest: of those serving it (a failback row
        is not serving yet), the highest-priority server whose instance is CONNECTED and
        not refusing it; a server within its grace only when none is."""
        providers = self.health.providers

        def rank(provider_id: str) -> tuple[int, str]:
            p = providers.get(provider_id)
            return p.rank if p is not None else (2**31, provider_id)

        def serving(r: _Row) -> bool:
            p = providers.get(r.serving_provider_id)
            if p is None or not p.provider.enabled:
                return False
            return any(i.instance_id == r.instance_id and symbol not in i.unavailable
                       for i in p.connected)  # fmt: skip

        latest = min(
            (r for r in planned if r.reason != FAILBACK),
            key=lambda r: (
                not serving(r),
                rank(r.serving_provider_id),
                r.reason != PRIMARY,
                rank(r.provider_id),
            ),
            default=None,
        )
        return [
            db.Assignment(
                r.provider_id,
                symbol,
                r.instance_id,
                r.data_types,
                r.reason,
                r.serving_provider_id,
                latest=r is latest,
            )
            for r in planned
        ]


def plan_symbols(
    subscriptions: list[db.Subscription],
    current: list[db.Assignment],
    health: Health,
    now: float,
) -> Plan:
    """The assignment rows of every canonical symbol among ``subscriptions`` and
    ``current`` (each symbol is planned whole, across all its providers; others are left
    alone, their memory kept). Rows of a symbol nobody subscribes any more are dropped."""
    subs_by_symbol: dict[str, list[db.Subscription]] = defaultdict(list)
    for sub in subscriptions:
        subs_by_symbol[sub.symbol].append(sub)
    rows_by_symbol: dict[str, list[db.Assignment]] = defaultdict(list)
    for row in current:
        rows_by_symbol[row.symbol].append(row)
    planner = _Planner(health, now)
    for symbol, subs in subs_by_symbol.items():
        planner.symbol(symbol, subs, rows_by_symbol.get(symbol, []))
    scope = subs_by_symbol.keys() | rows_by_symbol.keys()
    blocked = {k: t for k, t in health.memory.blocked_at.items() if k[1] not in scope}
    memory = replace(
        health.memory,
        hold_s=planner.hold,
        failback_at=planner.failback_at,
        blocked_at=blocked | planner.blocked,
    )
    return Plan(planner.rows, planner.failover, planner.stranded, planner.events,
                planner.needy, planner.waiting, planner.wake_at, memory)  # fmt: skip


def plan_assignments(
    subscriptions: list[db.Subscription],
    providers: list[ProviderConfig],
    instances: list[db.LiveInstance],
    current: list[db.Assignment],
    now: float,
    memory: Memory,
) -> Plan:
    """The whole decision in one call: ``assess_providers`` then ``plan_symbols``."""
    return plan_symbols(
        subscriptions, current, assess_providers(providers, instances, now, memory), now
    )


def diff_assignments(
    current: list[db.Assignment], desired: list[db.Assignment]
) -> tuple[list[db.Assignment], list[db.Assignment]]:
    """(rows to delete, rows to insert or update), keyed as the table is: for whom, which
    symbol, which instance."""
    cur = {(a.provider_id, a.symbol, a.instance_id): a for a in current}
    want = {(a.provider_id, a.symbol, a.instance_id): a for a in desired}
    remove = [a for k, a in cur.items() if k not in want]
    upsert = [a for k, a in want.items() if cur.get(k) != a]
    return remove, upsert


def affected_symbols(
    before: dict[str, tuple[object, ...]],
    after: dict[str, tuple[object, ...]],
    by_provider: dict[str, set[str]],
    needy: set[str],
    instances_before: dict[str, db.LiveInstance],
    instances_after: list[db.LiveInstance],
    due: bool,
) -> set[str]:
    """The symbols whose plan may differ from the last pass's, given what changed since.

    A provider whose signature changed: its own symbols, and every needy one (it may now
    take or return them). A due grace or hold-down: the needy ones. An instance's lists:
    the symbols that became (un)available, and those that started or stopped flowing
    where a failback may wait for them.
    """
    changed = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
    scope: set[str] = set()
    for provider_id in changed:
        scope |= by_provider.get(provider_id, set())
    if changed or due:
        scope |= needy
    for inst in instances_after:
        old = instances_before.get(inst.instance_id)
        if old is None:
            continue
        if old.unavailable != inst.unavailable:
            scope |= old.unavailable ^ inst.unavailable
        if old.flowing != inst.flowing:
            scope |= (old.flowing ^ inst.flowing) & needy
    return scope


# ---------------------------------------------------------------- the loop


@dataclass(slots=True)
class _Known:
    """What the last passes read and wrote (the coordinator is the only writer of
    assignments and of subscriptions.status)."""

    subs: dict[str, list[db.Subscription]]  # by canonical symbol
    by_provider: dict[str, set[str]]  # provider -> its subscribed symbols
    rows: dict[str, list[db.Assignment]]  # by canonical symbol
    failover: set[tuple[str, str]]  # subscriptions with status 'failover'
    stranded: dict[tuple[str, str], str]
    needy: set[str]
    waiting: set[str]
    signatures: dict[str, tuple[object, ...]]
    instances: dict[str, db.LiveInstance]
    read_at: float  # monotonic time subscriptions and assignments were read

    @classmethod
    def read(
        cls, subscriptions: list[db.Subscription], rows: list[db.Assignment],
        failover: set[tuple[str, str]], read_at: float,
    ) -> _Known:  # fmt: skip
        subs: dict[str, list[db.Subscription]] = defaultdict(list)
        by_provider: dict[str, set[str]] = defaultdict(set)
        for sub in subscriptions:
            subs[sub.symbol].append(sub)
            by_provider[sub.provider_id].add(sub.symbol)
        by_symbol: dict[str, list[db.Assignment]] = defaultdict(list)
        for row in rows:
            by_symbol[row.symbol].append(row)
        return cls(dict(subs), dict(by_provider), dict(by_symbol), failover, {}, set(), set(),
                   {}, {}, read_at)  # fmt: skip

    def apply(self, scope: set[str], plan: Plan) -> None:
        for symbol in scope:
            self.rows.pop(symbol, None)
        for row in plan.rows:
            self.rows.setdefault(row.symbol, []).append(row)
        self.failover = {k for k in self.failover if k[1] not in scope} | plan.failover
        kept = {k: w for k, w in self.stranded.items() if k[1] not in scope}
        self.stranded = kept | plan.stranded
        self.needy = (self.needy - scope) | plan.needy
        self.waiting = (self.waiting - scope) | plan.waiting


class Coordinator:
    def __init__(
        self, settings: Settings, poll_s: float = 2.0,
        instance_timeout_s: float = INSTANCE_TIMEOUT_S,
    ) -> None:  # fmt: skip
        self.settings = settings
        self.poll_s = poll_s
        self.instance_timeout_s = instance_timeout_s
        self.state = State.STOPPED
        # The server process of the connection holding or queued for the lock (pg_locks).
        self.backend_pid: int | None = None
        self._known: _Known | None = None
        self._memory = Memory()
        self._wake_at: float | None = None  # a grace or hold-down runs out
        self._expiry_at: float | None = None  # the first live instance's heartbeat does
        self._problems: dict[str, tuple[str, ...]] = {}
        self._stopping = asyncio.Event()

    @property
    def active(self) -> bool:
        return self.state is State.ACTIVE

    def stop(self) -> None:
        self._stopping.set()

    async def run(self, *, handle_signals: bool = True) -> None:
        if handle_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
        try:
            while not self._stopping.is_set():
                try:
                    await self._run_once()
                except (psycopg.Error, OSError) as exc:
                    self.state, self.backend_pid = State.CONNECTING, None
                    log.warning("coordinator_db_error", error=str(exc))
                    await self._sleep(2.0)
        finally:
            self.state, self.backend_pid = State.STOPPED, None

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)

    async def _unless_stopped(self, task: asyncio.Task[Any], timeout: float | None) -> bool:
        """Wait for ``task``; on stop or timeout cancel it (psycopg then cancels the query
        in the server). True when it ended by itself: its result or error is then ready."""
        stopping = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait(
                {task, stopping}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stopping.cancel()
            if not task.done():
                task.cancel()
        await asyncio.wait({task})
        return not task.cancelled()

    async def _run_once(self) -> None:
        self.state = State.CONNECTING
        conn = await db.connect(self.settings.database_url)
        self.backend_pid = conn.info.backend_pid
        try:
            if not await self._take_lock(conn):
                return
            self.state = State.ACTIVE
            log.info("coordinator_active", backend_pid=self.backend_pid)
            await conn.execute("LISTEN feedfleet_config")
            # Another coordinator may have written since we last did; the health times
            # are taken afresh from the instances' status_since.
            self._known, self._memory, self._wake_at = None, Memory(), None
            changes: set[str] = set()
            retention_at = time.monotonic()  # after the first pass: assignments come first
            while not self._stopping.is_set():
                await self.reconcile(conn, full=self._full_pass_due(changes))
                if time.monotonic() >= retention_at:
                    retention_at = time.monotonic() + RETENTION_INTERVAL_S
                    await self._keep_retention(conn)
                changes = await self._next_changes(conn, self._wait_s())
        finally:
            await conn.close()

    async def _keep_retention(self, conn: db.Conn) -> None:
        """One retention pass; a failure is logged and tried again next time, never a
        reason to give up the lock."""
        try:
            await keep_retention(conn, RetentionPolicy.from_settings(self.settings))
        except psycopg.Error as exc:
            log.warning("retention_failed", error=str(exc))

    async def _take_lock(self, conn: db.Conn) -> bool:
        """Hold the lock (True), or wait in the server's queue for it until stopped (False)."""
        cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (COORDINATOR_LOCK,))
        row = await cur.fetchone()
        if row and row[0]:
            return True
        self.state = State.STANDBY
        log.info("coordinator_standby", backend_pid=self.backend_pid)
        while not self._stopping.is_set():
            wait = asyncio.create_task(
                conn.execute("SELECT pg_advisory_lock(%s)", (COORDINATOR_LOCK,))
            )
            if await self._unless_stopped(wait, LOCK_RECHECK_S):
                wait.result()  # a dead connection raises here
                return True
        return False

    def _full_pass_due(self, changes: set[str]) -> bool:
        if self._known is None or changes - {INSTANCES_CHANGED, WORKER_STATUS}:
            return True
        return time.monotonic() - self._known.read_at >= FULL_RESYNC_S

    def _wait_s(self) -> float:
        """Until the next pass with no notification: the poll, sooner while a failback
        is under way, or when a grace, hold-down or heartbeat runs out."""
        now = time.monotonic()
        wait = self.poll_s
        if (self._known is not None and self._known.waiting) or self._wake_at is not None:
            wait = min(wait, PENDING_POLL_S)
        for at in (self._wake_at, self._expiry_at):
            if at is not None:
                wait = min(wait, max(at - now, 0.01))
        return wait

    async def _next_changes(self, conn: db.Conn, timeout: float) -> set[str]:
        """The payloads of the next notifications, or none after ``timeout`` or on stop.
        Its own (the subscriptions.status it writes fires the table's trigger) are not
        changes to it."""
        own = conn.info.backend_pid

        async def collect() -> set[str]:
            got = {n.payload async for n in conn.notifies(timeout=timeout, stop_after=1)
                   if n.pid != own}  # fmt: skip
            if got:  # a burst (a host's workers restarting) costs one pass, not one each
                got |= {n.payload async for n in conn.notifies(timeout=COALESCE_S)
                        if n.pid != own}  # fmt: skip
            return got

        task = asyncio.create_task(collect())
        if await self._unless_stopped(task, None):
            return task.result()
        return set()

    async def reconcile(self, conn: db.Conn, *, full: bool = True) -> int:
        """One pass: plan and write assignments, statuses and hand-overs. Returns how many
        assignment rows changed.

        A full pass reads everything. Otherwise only the small tables are read (providers,
        live instances) and only the symbols whose inputs changed are planned
        (``affected_symbols``), so it can follow every worker's notification. Measured
        before failover with 6 providers x 2,000 symbols on 2 shared cores: a full pass with
        nothing to change took 0.3-1.0 s (reading, assigning and diffing 12k rows), a
        short one 2-10 ms, and one after an instance of a provider left about 50 ms plus
        writing the moved rows.
        """
        providers = await db.list_providers(conn)
        instances = await db.live_instances(conn, self.instance_timeout_s)
        now = time.monotonic()  # the instances' ages are as of about now
        known = self._known
        if known is not None:
            self._log_instance_changes(list(known.instances.values()), instances)
        health = assess_providers(providers, instances, now, self._memory)
        self._log_policy_problems(health)
        signatures = {pid: p.signature() for pid, p in health.providers.items()}
        whole = full or known is None
        if whole:
            await db.delete_dead_instances(conn, older_than_s=self.instance_timeout_s * 6)
            subscriptions = await db.active_subscriptions(conn)
            current = await db.current_assignments(conn)
            in_failover = await db.failover_subscriptions(conn)
            known = _Known.read(subscriptions, current, in_failover, time.monotonic())
            scope = set(known.subs) | set(known.rows)
            due = True
        else:
            assert known is not None
            due = self._wake_at is not None and now >= self._wake_at
            scope = affected_symbols(known.signatures, signatures, known.by_provider,
                                     known.needy, known.instances, instances, due)  # fmt: skip
            due = due or signatures != known.signatures  # every needy symbol is in scope
        subs = [s for symbol in scope for s in known.subs.get(symbol, ())]
        rows = [r for symbol in scope for r in known.rows.get(symbol, ())]
        plan = plan_symbols(subs, rows, health, now)
        remove, upsert = diff_assignments(rows, plan.rows)
        was = known.failover if whole else {k for k in known.failover if k[1] in scope}
        to_failover, to_active = plan.failover - was, was - plan.failover
        handovers = self._handover_rows(plan.events, health)
        # Forget first: if the write fails, the next pass must read the tables again.
        self._known = None
        if remove or upsert or to_failover or to_active or handovers:
            async with conn.transaction():
                if remove or upsert:
                    await db.replace_assignments(conn, remove, upsert)
                await db.set_subscription_status(conn, to_failover, "failover")
                await db.set_subscription_status(conn, to_active, "active")
                await db.record_handovers(conn, handovers)
        if remove or upsert:
            log.info("assignments_written", removed=len(remove), upserted=len(upsert),
                     planned=len(scope), full=whole)  # fmt: skip
        self._log_plan(plan, known, health)
        if whole:
            known.failover = set()
        known.apply(scope, plan)
        known.signatures = signatures
        known.instances = {i.instance_id: i for i in instances}
        self._known, self._memory = known, plan.memory
        if due:  # the plan saw every pending symbol
            self._wake_at = plan.wake_at
        elif plan.wake_at is not None:
            self._wake_at = min(plan.wake_at, self._wake_at or math.inf)
        oldest = max((i.heartbeat_age_s for i in instances), default=None)
        # A hair after the timeout, so the instance is surely gone when we look.
        self._expiry_at = None if oldest is None else now + self.instance_timeout_s - oldest + 0.05
        return len(remove) + len(upsert)

    # ------------------------------------------------------------ telling people

    @staticmethod
    def _handover_groups(
        events: list[HandOver],
    ) -> dict[tuple[str, str, str, str, str], list[HandOver]]:
        groups: dict[tuple[str, str, str, str, str], list[HandOver]] = defaultdict(list)
        for e in events:
            groups[(e.kind, e.provider_id, e.from_provider_id, e.to_provider_id, e.why)].append(e)
        return groups

    def _handover_rows(self, events: list[HandOver], health: Health) -> list[tuple[str, str, str]]:
        """One provider_connections row per hand-over (a group of symbols moved together
        for one reason): (provider, 'FAILOVER' or 'FAILBACK', what moved, from, to, why)."""
        out = []
        for (kind, pid, src, dst, why), group in self._handover_groups(events).items():
            if kind not in (FAILOVER, FAILBACK):
                continue
            symbols = sorted(e.symbol for e in group)
            listed = ", ".join(symbols[:20])
            if len(symbols) > 20:
                listed += f" and {len(symbols) - 20} more"
            message = (f"{kind} of {len(symbols)} symbol(s) {listed} from {_name(health, src)} "
                       f"to {_name(health, dst)}: {why}")  # fmt: skip
            out.append((pid, kind.upper(), message))
        return out

    def _log_plan(self, plan: Plan, known: _Known, health: Health) -> None:
        for (kind, pid, src, dst, why), group in self._handover_groups(plan.events).items():
            symbols = sorted(e.symbol for e in group)
            detect = round(max(e.detect_s for e in group), 3)
            fields = dict(provider=_name(health, pid), symbols=symbols, count=len(symbols),
                          reason=why, detect_s=detect)  # fmt: skip
            if kind == FAILOVER:
                log.warning("failover", backup=_name(health, dst), previous=_name(health, src),
                            **fields)  # fmt: skip
            elif kind == FAILBACK:
                log.info("failback", backup=_name(health, src), **fields)
            elif kind == FAILBACK_STARTED:
                log.info("failback_started", backup=_name(health, src), **fields)
            else:
                log.warning("failback_aborted", backup=_name(health, dst), **fields)
        fresh: dict[tuple[str, str], list[str]] = defaultdict(list)
        for (pid, symbol), why in plan.stranded.items():
            if (pid, symbol) not in known.stranded:
                fresh[(pid, why)].append(symbol)
        for (pid, why), symbols in fresh.items():
            log.warning("failover_impossible", provider=_name(health, pid),
                        symbols=sorted(symbols), count=len(symbols), reason=why)  # fmt: skip

    def _log_policy_problems(self, health: Health) -> None:
        for pid, p in health.providers.items():
            problems = p.policy.problems
            if self._problems.get(pid, ()) != problems:
                self._problems[pid] = problems
                for problem in problems:
                    log.warning("failover_config_invalid", provider=p.provider.name,
                                problem=problem)  # fmt: skip

    @staticmethod
    def _log_instance_changes(before: list[db.LiveInstance], after: list[db.LiveInstance]) -> None:
        old = {i.instance_id for i in before}
        new = {i.instance_id for i in after}
        if old != new:
            log.info("instances_changed", joined=sorted(new - old), left=sorted(old - new))


def _name(health: Health, provider_id: str) -> str:
    p = health.providers.get(provider_id)
    return p.provider.name if p is not None else provider_id


async def run_coordinator() -> None:
    from common.log import configure_logging

    settings = Settings.from_env()
    configure_logging(settings.log_format, settings.log_level)
    await Coordinator(settings).run()
