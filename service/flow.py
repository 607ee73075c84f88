"""Flow control (docs/flow-control.md): named limits and their patterns, queue settings
(pause, a queue's own limits), unique and debounced submits, and the admission check the
lease grant runs inside its transaction.

Plain functions over a ``Session``; the routers and the submit path call them once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from service import errors
from service.db import Database
from service.effects import Dispatch, Effects
from service.flow_redis import arbitrate
from service.idempotency import Submitted
from service.leases import LeaseTerms, filter_only
from service.loops import Pass, Plugin
from service.models import (
    JOBS_TABLE,
    LIMIT_GRANTS_TABLE,
    JobKeyRow,
    JobRow,
    JobValues,
    LimitGrantRow,
    LimitRow,
    QueueSettingsRow,
    UTCDateTime,
    values_of,
)
from service.runtime import Runtime
from service.schemas import DebounceSpec, JobSubmit, LimitSpec, QueuePatch, UniqueSpec
from service.signals import Signals
from service.states import JobStatus

# A queue's own limits count under this key ("/" is in no limit or queue name).
QUEUE_KEY_PREFIX = "queue/"
# job_keys kinds: a unique or debounce claim, and the lock row of a limit key.
UNIQUE, DEBOUNCE, LIMIT_LOCK = "unique", "debounce", "limit"
# How often a submit retries after losing a key's insert race to another replica.
KEY_RACE_RETRIES = 3

log = logging.getLogger("celeriac.flow")


@dataclass(frozen=True, slots=True)
class Rule:
    """What one limit key allows: running at once, and grants per sliding window."""

    max_running: int | None
    rate_limit: int | None
    rate_period: float | None

    @property
    def limits_anything(self) -> bool:
        return self.max_running is not None or self.rate_limit is not None


def queue_key(queue: str) -> str:
    return QUEUE_KEY_PREFIX + queue


def is_pattern(name: str) -> bool:
    return name.endswith("*")


def _rate(limit: int | None, period: float | None) -> dict[str, Any] | None:
    return None if limit is None else {"limit": limit, "period": period}


# --- named limits ----------------------------------------------------------------------


def limit_body(row: LimitRow, running: int | None) -> dict[str, Any]:
    return {
        "name": row.name,
        "max_running": row.max_running,
        "rate": _rate(row.rate_limit, row.rate_period),
        "pattern": is_pattern(row.name),
        "running": None if is_pattern(row.name) else running,
    }


def put_limit(session: Session, name: str, spec: LimitSpec, now: datetime) -> dict[str, Any]:
    """Create or replace a limit (or a pattern's defaults)."""
    if spec.max_running is None and spec.rate is None:
        raise errors.ValidationFailed("give max_running, rate, or both")
    row = session.get(LimitRow, name, with_for_update=True)
    if row is None:
        row = LimitRow(name=name, created_at=now)
        session.add(row)
    row.max_running = spec.max_running
    row.rate_limit = None if spec.rate is None else spec.rate.limit
    row.rate_period = None if spec.rate is None else spec.rate.period
    row.updated_at = now
    session.flush()
    _changed(session.get_bind())  # this process enforces it from its next claim on
    return limit_body(row, running_counts(session, [name]).get(name, 0))


def get_limit(session: Session, name: str) -> dict[str, Any]:
    row = session.get(LimitRow, name)
    if row is None:
        raise errors.NotFound(f"no limit is named {name!r}")
    return limit_body(row, running_counts(session, [name]).get(name, 0))


def delete_limit(session: Session, name: str) -> None:
    row = session.get(LimitRow, name, with_for_update=True)
    if row is None:
        raise errors.NotFound(f"no limit is named {name!r}")
    session.delete(row)
    _changed(session.get_bind())


def list_limits(session: Session) -> list[dict[str, Any]]:
    rows = session.scalars(sa.select(LimitRow).order_by(LimitRow.name)).all()
    running = running_counts(session, [row.name for row in rows if not is_pattern(row.name)])
    return [limit_body(row, running.get(row.name, 0)) for row in rows]


def rules_for(session: Session, names: Collection[str]) -> dict[str, Rule]:
    """The rule of each name that has one: its own row, else the longest pattern it
    matches. Names with neither are unlimited and absent from the answer."""
    if not names:
        return {}
    rules: dict[str, Rule] = {}
    limit_names = [n for n in names if not n.startswith(QUEUE_KEY_PREFIX)]
    if limit_names:
        found = session.scalars(sa.select(LimitRow).where(LimitRow.name.in_(limit_names)))
        rules.update({row.name: _rule(row) for row in found})
        missing = [n for n in limit_names if n not in rules]
        if missing:
            patterns = session.scalars(sa.select(LimitRow).where(LimitRow.name.like("%*"))).all()
            for name in missing:
                match = _longest_match(name, patterns)
                if match is not None:
                    rules[name] = _rule(match)
    queues = [n[len(QUEUE_KEY_PREFIX) :] for n in names if n.startswith(QUEUE_KEY_PREFIX)]
    if queues:
        found_queues = session.scalars(
            sa.select(QueueSettingsRow).where(QueueSettingsRow.name.in_(queues))
        )
        for settings in found_queues:
            rule = _rule(settings)
            if rule.limits_anything:
                rules[queue_key(settings.name)] = rule
    return {name: rule for name, rule in rules.items() if rule.limits_anything}


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every rule and pause, as the claim uses them: read at most every
    ``SNAPSHOT_SECONDS`` per process (two small queries), not per claim. Counting is
    never cached: only what the rules are."""

    exact: dict[str, Rule]
    patterns: list[tuple[str, Rule]]  # (prefix, rule), longest prefix first
    queues: dict[str, Rule]
    paused: frozenset[str]
    read_at: float

    @property
    def configured(self) -> bool:
        return bool(self.exact or self.patterns or self.queues or self.paused)

    def rules_for(self, names: Iterable[str]) -> dict[str, Rule]:
        rules: dict[str, Rule] = {}
        for name in names:
            if name.startswith(QUEUE_KEY_PREFIX):
                rule = self.queues.get(name[len(QUEUE_KEY_PREFIX) :])
            else:
                rule = self.exact.get(name) or next(
                    (r for prefix, r in self.patterns if name.startswith(prefix)), None
                )
            if rule is not None:
                rules[name] = rule
        return rules


SNAPSHOT_SECONDS = 0.5
# How long a key found full is passed by in the claim's candidate query without being
# counted again: a settle in this process frees it at once (``freed``); one on another
# replica is seen within this.
FULL_HINT_SECONDS = 0.5
# How long a key that held jobs back has its next job announced at each settle.
HELD_SECONDS = 5.0
# How long a queue whose jobs named no limits takes the plain claim: a job with limits
# submitted to it meanwhile waits at most this long behind the ones without.
PLAIN_SECONDS = 1.0


@dataclass(slots=True)
class FlowState:
    """What one process knows of flow control, per database engine (a process serves one;
    tests open several): nothing here is the record, only when to look again."""

    # Whether any limit or queue setting exists: until read, assume so (the safe side).
    active: bool = True
    snapshot: Snapshot | None = None
    # Keys found without room: when (monotonic), and until when a rate window keeps them
    # full (None: until a slot frees). A hint for the candidate query only: admission
    # always counts under the keys' locks.
    full: dict[str, tuple[float, datetime | None]] = field(default_factory=dict)
    # Keys that held jobs back (blocked at admission), and when (monotonic): a settle of
    # one of their jobs announces the next (``freed``).
    held: dict[str, float] = field(default_factory=dict)
    # Queues whose last looked-at candidates all named no limits, and when (monotonic):
    # for ``PLAIN_SECONDS`` they are claimed by the plain one-statement claim, of jobs
    # naming no limits, and looked at under flow control only when that comes back short.
    plain: dict[str, float] = field(default_factory=dict)
    # Whether the broker keeps an index, which drops what a claim hands back blocked:
    # then a settle offers the held-back jobs of its keys again. The SQL broker's claim
    # reads the table itself: nothing to offer.
    reoffers: bool = False
    pruned_at: float = 0.0

    def full_keys(self, now: datetime) -> set[str]:
        horizon = time.monotonic() - FULL_HINT_SECONDS
        return {
            key
            for key, (at, until) in self.full.items()
            if at > horizon and (until is None or until > now)
        }

    def plain_now(self, queue: str) -> bool:
        return self.plain.get(queue, 0.0) > time.monotonic() - PLAIN_SECONDS

    def looked(self, queue: str, window: Sequence[JobValues]) -> None:
        """A flow look at ``queue``'s candidates: remember whether they all named no
        limits (the next claims of the queue take the plain path meanwhile)."""
        if window and all(row.get("limit_key") is None for row in window):
            self.plain[queue] = time.monotonic()
        elif window:
            self.plain.pop(queue, None)

    def counted(self, rules: Iterable[str], full: dict[str, datetime | None]) -> None:
        """Admission counted these keys: remember which had no room left."""
        at = time.monotonic()
        for key in rules:
            if key in full:
                self.full[key] = (at, full[key])
            else:
                self.full.pop(key, None)


_STATES: weakref.WeakKeyDictionary[Any, FlowState] = weakref.WeakKeyDictionary()


def state_of(engine: Any) -> FlowState:
    state = _STATES.get(engine)
    if state is None:
        state = _STATES[engine] = FlowState()
    return state


def active(engine: Any) -> bool:
    """Whether the claims on ``engine`` take the flow-control path (any limit, pause or
    queue setting exists, as this process last saw it)."""
    return state_of(engine).active


def limited_queues(engine: Any) -> frozenset[str] | None:
    """While flow control is configured, the direct path (service/pg_direct.py) takes
    only jobs that name no limits, in queues without limits of their own: those queues,
    from a snapshot younger than ``SNAPSHOT_SECONDS``. None without one: the pool's path
    reads the rules again (each claim through it refreshes a stale snapshot)."""
    snap = state_of(engine).snapshot
    if snap is None or time.monotonic() - snap.read_at >= SNAPSHOT_SECONDS:
        return None
    return frozenset(snap.queues)


def snapshot(session: Session) -> Snapshot:
    """The current snapshot, read again when older than ``SNAPSHOT_SECONDS`` (a change
    made in this process drops it at once)."""
    state = state_of(session.get_bind())
    current = state.snapshot
    if current is not None and time.monotonic() - current.read_at < SNAPSHOT_SECONDS:
        return current
    exact, patterns, queues, paused = {}, [], {}, set()
    for limit in session.scalars(sa.select(LimitRow)):
        rule = _rule(limit)
        if not rule.limits_anything:
            continue
        if is_pattern(limit.name):
            patterns.append((limit.name[:-1], rule))
        else:
            exact[limit.name] = rule
    for settings in session.scalars(sa.select(QueueSettingsRow)):
        if _rule(settings).limits_anything:
            queues[settings.name] = _rule(settings)
        if settings.paused:
            paused.add(settings.name)
    patterns.sort(key=lambda item: -len(item[0]))
    current = Snapshot(exact, patterns, queues, frozenset(paused), time.monotonic())
    state.snapshot, state.active = current, current.configured
    return current


def _changed(engine: Any) -> None:
    """A change made here: the next claim reads the rules again, and takes the
    flow-control path from now on."""
    state = state_of(engine)
    state.snapshot, state.active = None, True
    state.full.clear()


def freed(session: Session, rows: Iterable[JobValues], effects: Effects) -> None:
    """Jobs that held slots left ``running`` here: their keys have room again. For each
    key that held jobs back lately, as many of its waiting jobs as slots freed are
    announced again after the commit: a broker's index dropped them when they were handed
    back blocked, and SQL waiters wake for them."""
    state = state_of(session.get_bind())
    slots = _slots_freed(state, rows, effects)
    if slots:
        effects.dispatch += _held_back(session, state, slots)


async def freed_after_commit(db: Database, rows: Iterable[JobValues], effects: Effects) -> None:
    """``freed`` for jobs a statement of the direct path settled (``with_limits``): the
    same in memory, and the held-back jobs to announce read after that statement's
    commit, through the pool (only when a key held jobs back lately). A read that fails
    is logged: the settle stands, and the reconciler offers what stays queued again."""
    state = state_of(db.engine)
    slots = _slots_freed(state, rows, effects)
    if not slots:
        return
    try:
        effects.dispatch += await db.run(lambda session: _held_back(session, state, slots))
    except (SQLAlchemyError, errors.DatabaseUnavailable) as exc:  # the settle stands
        log.warning("announcing the jobs that freed limit slots let through failed: %s", exc)


Slots = dict[tuple[str, str | None], int]  # (queue, first key or None: the queue's) -> freed


def _slots_freed(state: FlowState, rows: Iterable[JobValues], effects: Effects) -> Slots:
    """``freed``'s part in memory: the full keys these jobs were in have room again (SQL
    waiters of their queues wake), and the slots freed per key that held jobs back."""
    if not state.full and not state.held:
        return {}
    horizon = time.monotonic() - HELD_SECONDS
    slots: Slots = {}
    for row in rows:
        key, own = row.get("limit_key"), queue_key(row["queue"])
        was_full = state.full.pop(key or "", None) is not None
        was_full = state.full.pop(own, None) is not None or was_full
        if not state.reoffers:  # SQL dispatch: the claim reads the table; wake its waiters
            if was_full:
                effects.reopened.add(row["queue"])
            continue
        if key and state.held.get(key, 0.0) > horizon:
            pair: tuple[str, str | None] = (row["queue"], key)
        elif state.held.get(own, 0.0) > horizon:
            pair = (row["queue"], None)
        else:
            continue
        slots[pair] = slots.get(pair, 0) + 1
    return slots


def _held_back(session: Session, state: FlowState, slots: Slots) -> list[Dispatch]:
    """The next ready jobs of each (queue, first key), as many as slots freed; a key
    with fewer left holds nothing back any more."""
    jobs = JOBS_TABLE.c
    found: list[Dispatch] = []
    for (queue, key), count in slots.items():
        query = sa.select(jobs.id, jobs.queue, jobs.priority).where(
            jobs.queue == queue, jobs.status == JobStatus.queued
        )
        if key is not None:
            query = query.where(jobs.limit_key == key)
        query = query.order_by(jobs.priority.desc(), jobs.id).limit(count)
        ready = [Dispatch(i, q, p, reoffer=True) for i, q, p in session.execute(query)]
        if len(ready) < count:
            state.held.pop(key if key is not None else queue_key(queue), None)
        found += ready
    return found


def _rule(row: LimitRow | QueueSettingsRow) -> Rule:
    return Rule(row.max_running, row.rate_limit, row.rate_period)


def _longest_match(name: str, patterns: Iterable[LimitRow]) -> LimitRow | None:
    best: LimitRow | None = None
    for pattern in patterns:
        prefix = pattern.name[:-1]
        if name.startswith(prefix) and (best is None or len(prefix) > len(best.name) - 1):
            best = pattern
    return best


def running_counts(session: Session, names: Collection[str]) -> dict[str, int]:
    """Slots held now, per limit key: grants whose job still runs under that lease. A
    dead worker's slot is held until its lease is reclaimed (the job leaves running)."""
    if not names:
        return {}
    grant, job = LimitGrantRow, JobRow
    query = (
        sa.select(grant.limit_name, sa.func.count())
        .join(job, sa.and_(job.id == grant.job_id, job.lease_token == grant.lease_token))
        .where(grant.limit_name.in_(list(names)), job.status == JobStatus.running)
        .group_by(grant.limit_name)
    )
    return {name: count for name, count in session.execute(query)}


Window = dict[str, tuple[int, datetime]]  # per key: grants in its window, the oldest's time


def _granted_in_window(session: Session, rules: dict[str, Rule], now: datetime) -> Window:
    """Grants per key within its own sliding window, and when the oldest of them was
    granted (keys with a rate only)."""
    windows = [
        sa.and_(
            LimitGrantRow.limit_name == name,
            LimitGrantRow.granted_at > now - timedelta(seconds=rule.rate_period or 0.0),
        )
        for name, rule in rules.items()
        if rule.rate_limit is not None
    ]
    if not windows:
        return {}
    query = (
        sa.select(LimitGrantRow.limit_name, sa.func.count(), sa.func.min(LimitGrantRow.granted_at))
        .where(sa.or_(*windows))
        .group_by(LimitGrantRow.limit_name)
    )
    return {name: (count, oldest) for name, count, oldest in session.execute(query)}


# --- queue settings ----------------------------------------------------------------------


def queue_body(session: Session, name: str) -> dict[str, Any]:
    row = session.get(QueueSettingsRow, name)
    query = (
        sa.select(JobRow.status, sa.func.count())
        .where(JobRow.queue == name)
        .group_by(JobRow.status)
    )
    counts = {status: count for status, count in session.execute(query)}
    return {
        "name": name,
        "paused": bool(row and row.paused),
        "max_running": None if row is None else row.max_running,
        "rate": None if row is None else _rate(row.rate_limit, row.rate_period),
        "counts": counts,
    }


def patch_queue(session: Session, name: str, patch: QueuePatch, now: datetime) -> dict[str, Any]:
    """Change the fields the patch names; an explicit null clears a limit."""
    given = patch.model_fields_set
    row = session.get(QueueSettingsRow, name, with_for_update=True)
    if row is None:
        row = QueueSettingsRow(name=name, paused=False)
        session.add(row)
    if "paused" in given:
        if patch.paused is None:
            raise errors.ValidationFailed("paused is true or false, not null")
        row.paused = patch.paused
    if "max_running" in given:
        row.max_running = patch.max_running
    if "rate" in given:
        row.rate_limit = None if patch.rate is None else patch.rate.limit
        row.rate_period = None if patch.rate is None else patch.rate.period
    row.updated_at = now
    session.flush()
    _changed(session.get_bind())
    return queue_body(session, name)


def paused_queues(session: Session, queues: Collection[str]) -> set[str]:
    """Which of ``queues`` are paused: one primary-key look-up."""
    if not queues:
        return set()
    query = sa.select(QueueSettingsRow.name).where(
        QueueSettingsRow.name.in_(list(queues)), QueueSettingsRow.paused.is_(True)
    )
    return set(session.scalars(query))


# --- admission: inside the granting transaction ----------------------------------------


def keys_of(row: JobValues) -> list[str]:
    """The limit keys a job counts against: its own, then its queue's."""
    return [*(row.get("limits") or ()), queue_key(row["queue"])]


# The advisory-lock space of limit keys on PostgreSQL (an arbitrary constant: "cel").
PG_LOCK_SPACE = 0x63656C
# One statement: a transaction lock per key, taken in one stable order (of the keys'
# hashes) so two grants cannot deadlock on each other. Two keys with one hash only
# serialise more than needed.
PG_LOCK_KEYS = sa.text(
    "SELECT count(pg_advisory_xact_lock(:space, h)) FROM (SELECT DISTINCT hashtext(k) AS h"
    " FROM unnest(CAST(:keys AS text[])) AS k ORDER BY h) AS held"
)


def _lock_keys(session: Session, keys: Sequence[str]) -> None:
    """Serialise grants on these keys across replicas, until the transaction ends.
    PostgreSQL: advisory locks. MariaDB: one lock row per key in job_keys, created on
    first use, locked in sorted order. SQLite needs none: its writers are serialised."""
    dialect = session.get_bind().dialect.name
    if dialect == "sqlite":
        return
    if dialect == "postgresql":
        session.execute(PG_LOCK_KEYS, {"space": PG_LOCK_SPACE, "keys": list(keys)})
        return
    existing = set(
        session.scalars(
            sa.select(JobKeyRow.key).where(JobKeyRow.kind == LIMIT_LOCK, JobKeyRow.key.in_(keys))
        )
    )
    for key in sorted(set(keys) - existing):
        _insert_ignoring_conflict(session, LIMIT_LOCK, key)
    session.execute(
        sa.select(JobKeyRow.key)
        .where(JobKeyRow.kind == LIMIT_LOCK, JobKeyRow.key.in_(keys))
        .order_by(JobKeyRow.key)
        .with_for_update()
    ).all()


def _insert_ignoring_conflict(session: Session, kind: str, key: str) -> None:
    values = {"kind": kind, "key": key, "job_id": ""}
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        session.execute(pg_insert(JobKeyRow).values(values).on_conflict_do_nothing())
    else:
        session.execute(sa.insert(JobKeyRow).values(values).prefix_with("IGNORE"))


@dataclass(slots=True)
class Admission:
    """What a grant may take: the candidates with room, in their order; the others stay
    queued and are handed back."""

    admitted: list[JobValues]
    blocked: list[JobValues]
    # key -> rule, for the grant rows the admitted jobs need
    rules: dict[str, Rule]
    # the keys left without room: the claim's next look skips them
    full: set[str] = field(default_factory=set)


def admit(
    session: Session, rows: Sequence[JobValues], now: datetime, want: int | None = None
) -> Admission:
    """The candidates (locked, queued, in grant order) that every limit key has room for:
    fewer than ``max_running`` of its jobs running and fewer than ``rate.limit`` grants
    within the last ``period`` seconds. Paused queues admit nothing. No query when no
    candidate names a limited key; else the keys are locked, then counted."""
    if not rows:
        return Admission([], [], {})
    rows, rules = unpaused_and_rules(snapshot(session), rows)
    if not rules:
        return Admission(list(rows)[:want], [], {})
    _lock_keys(session, sorted(rules))
    running = running_counts(session, list(rules))
    window = _granted_in_window(session, rules, now)
    return admitted(state_of(session.get_bind()), rows, rules, running, window, want)


def unpaused_and_rules(
    snap: Snapshot, rows: Sequence[JobValues]
) -> tuple[list[JobValues], dict[str, Rule]]:
    """The candidates outside paused queues, and the rules of the keys they count against."""
    rows = [row for row in rows if row["queue"] not in snap.paused]
    return rows, snap.rules_for(sorted({key for row in rows for key in keys_of(row)}))


def admitted(
    state: FlowState,
    rows: Sequence[JobValues],
    rules: dict[str, Rule],
    running: dict[str, int],
    window: Window,
    want: int | None,
) -> Admission:
    """``admit``'s decision, once its keys are locked and counted: in order, each
    candidate that every one of its limited keys has room for."""
    granted = {key: count for key, (count, _) in window.items()}
    taken: list[JobValues] = []
    blocked: list[JobValues] = []
    for row in rows:
        if want is not None and len(taken) >= want:
            break  # the rest of the window is neither taken nor counted
        limited = [key for key in keys_of(row) if key in rules]
        if all(_has_room(rules[k], running.get(k, 0), granted.get(k, 0)) for k in limited):
            taken.append(row)
            for key in limited:
                running[key] = running.get(key, 0) + 1
                granted[key] = granted.get(key, 0) + 1
        else:
            blocked.append(row)
    full = {k for k, r in rules.items() if not _has_room(r, running.get(k, 0), granted.get(k, 0))}
    state.counted(rules, _until(full, rules, running, window))
    if blocked and state.reoffers:
        at = time.monotonic()
        state.held.update((key, at) for key in full)
    return Admission(taken, blocked, rules, full)


def _until(
    full: set[str], rules: dict[str, Rule], running: dict[str, int], window: Window
) -> dict[str, datetime | None]:
    """How long each full key stays full without a settle: a key full of running jobs
    until one leaves (None), a key whose rate is used up until its window's oldest
    grant leaves the window."""
    until: dict[str, datetime | None] = {}
    for key in full:
        rule = rules[key]
        if rule.max_running is not None and running.get(key, 0) >= rule.max_running:
            until[key] = None
        elif key in window:
            until[key] = window[key][1] + timedelta(seconds=rule.rate_period or 0.0)
        else:  # granted just now, in this very claim
            until[key] = None
    return until


def _has_room(rule: Rule, running: int, granted: int) -> bool:
    if rule.max_running is not None and running >= rule.max_running:
        return False
    return rule.rate_limit is None or granted < rule.rate_limit


def record_grants(session: Session, admission: Admission, token: str, now: datetime) -> None:
    """Write the grant rows of the jobs just leased under ``token``, and prune the rows
    of these keys that hold nothing any more (out of the window, job not running)."""
    if not admission.rules:
        return
    grants = [
        {"limit_name": key, "job_id": row["id"], "lease_token": token, "granted_at": now}
        for row in admission.admitted
        for key in keys_of(row)
        if key in admission.rules
    ]
    if grants:
        session.execute(sa.insert(LIMIT_GRANTS_TABLE), grants)
    state = state_of(session.get_bind())
    if time.monotonic() - state.pruned_at >= PRUNE_SECONDS:
        state.pruned_at = time.monotonic()
        _prune(session, now)


# The grant rows that hold nothing any more are deleted at most this often per process.
PRUNE_SECONDS = 1.0


def _prune(session: Session, now: datetime) -> None:
    """Delete the grant rows that hold nothing: out of every rate window (the longest
    period of any rule) and no longer running under their token."""
    cutoff = now - timedelta(seconds=longest_period(snapshot(session)))
    session.execute(prune_statement(), {"cutoff": cutoff})


def longest_period(snap: Snapshot) -> float:
    """The longest rate window of any rule, in seconds (0 without rates)."""
    rules = [*snap.exact.values(), *(r for _, r in snap.patterns), *snap.queues.values()]
    return max((rule.rate_period or 0.0 for rule in rules), default=0.0)


def prune_statement() -> sa.Delete:
    """``_prune``'s statement: the rows granted at ``:cutoff`` or before whose job no
    longer runs under their token."""
    grant, job = LIMIT_GRANTS_TABLE.c, JOBS_TABLE.c
    still_running = (
        sa.select(sa.literal(1))
        .where(
            job.id == grant.job_id,
            job.lease_token == grant.lease_token,
            job.status == JobStatus.running,
        )
        .exists()
    )
    cutoff = sa.bindparam("cutoff", type_=UTCDateTime())
    return sa.delete(LIMIT_GRANTS_TABLE).where(grant.granted_at <= cutoff, ~still_running)


def blocked_by(
    session: Session, queue: str, limits: list[str] | None, now: datetime
) -> list[str] | None:
    """For ``GET /jobs/{id}`` of a queued job: the keys without room now (None: none)."""
    keys = [*(limits or ()), queue_key(queue)]
    blocked = [queue_key(queue)] if paused_queues(session, [queue]) else []
    rules = rules_for(session, keys)
    running = running_counts(session, list(rules))
    granted = {key: count for key, (count, _) in _granted_in_window(session, rules, now).items()}
    blocked += [
        key
        for key in keys
        if key in rules
        and key not in blocked
        and not _has_room(rules[key], running.get(key, 0), granted.get(key, 0))
    ]
    return blocked or None


async def blocked(runtime: Runtime, queue: str, limits: list[str] | None) -> list[str] | None:
    now = runtime.clock.now()
    return await runtime.db.read(lambda session: blocked_by(session, queue, limits, now))


# --- unique and debounced submits --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyedSubmit:
    row: JobValues
    existing: bool  # an earlier job answers (200), not a new one (202)


def default_unique_key(spec: JobSubmit) -> str:
    canonical = json.dumps(
        [spec.task, spec.queue, spec.args, spec.kwargs], sort_keys=True, separators=(",", ":")
    )
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def submit_keyed(session: Session, row: JobValues, spec: JobSubmit, now: datetime) -> KeyedSubmit:
    """A submit with ``unique`` or ``debounce``: the existing job it resolves to, or the
    new ``row`` inserted. The key's claim row (job_keys) is locked first, so two replicas'
    submits of one key are serialised; a lost insert race retries (``with_key_retries``)."""
    if spec.unique is not None and spec.debounce is not None:
        raise errors.ValidationFailed("give unique or debounce, not both")
    if spec.unique is not None:
        return _submit_unique(session, row, spec, spec.unique, now)
    assert spec.debounce is not None
    return _submit_debounced(session, row, spec.debounce, now)


def _claimed_job(session: Session, kind: str, key: str) -> tuple[JobKeyRow | None, JobRow | None]:
    claim = session.get(JobKeyRow, (kind, key), with_for_update=True)
    if claim is None:
        return None, None
    return claim, session.get(JobRow, claim.job_id, with_for_update=True)


def _store(session: Session, claim: JobKeyRow | None, kind: str, key: str, row: JobValues) -> None:
    if claim is None:
        session.add(JobKeyRow(kind=kind, key=key, job_id=row["id"]))
    else:
        claim.job_id = row["id"]
    session.execute(sa.insert(JOBS_TABLE), [row])
    session.flush()


def _submit_unique(
    session: Session, row: JobValues, spec: JobSubmit, unique: UniqueSpec, now: datetime
) -> KeyedSubmit:
    key = unique.key or default_unique_key(spec)
    claim, job = _claimed_job(session, UNIQUE, key)
    if job is not None:
        holds_for = job.unique_until is not None and job.unique_until > now
        if job.status in unique.while_ or holds_for:
            return KeyedSubmit(values_of(job), existing=True)
    row["unique_key"] = key
    row["unique_until"] = None if unique.for_ is None else now + timedelta(seconds=unique.for_)
    _store(session, claim, UNIQUE, key, row)
    return KeyedSubmit(row, existing=False)


def _submit_debounced(
    session: Session, row: JobValues, debounce: DebounceSpec, now: datetime
) -> KeyedSubmit:
    """While the job with the key has not come due (``scheduled``), a submit replaces
    its arguments and moves its start to now + period; once due, a new job is made."""
    claim, job = _claimed_job(session, DEBOUNCE, debounce.key)
    start = now + timedelta(seconds=debounce.period)
    if job is not None and job.status == JobStatus.scheduled and job.started_at is None:
        job.args, job.kwargs, job.run_at = row["args"], row["kwargs"], max(start, row["run_at"])
        session.flush()
        return KeyedSubmit(values_of(job), existing=True)
    row["debounce_key"] = debounce.key
    row["run_at"] = max(start, row["run_at"])
    row["status"] = JobStatus.scheduled
    _store(session, claim, DEBOUNCE, debounce.key, row)
    return KeyedSubmit(row, existing=False)


async def submit_with_key(runtime: Runtime, row: JobValues, spec: JobSubmit) -> Submitted:
    """``POST /jobs`` with ``unique`` or ``debounce``, in its own transaction (not the
    group commit: the key's lock decides). Another replica that inserted the same key's
    claim first makes this one look again and find its job."""
    for attempt in range(KEY_RACE_RETRIES):
        try:
            done = await runtime.db.run(
                lambda session: submit_keyed(session, row.copy(), spec, runtime.clock.now())
            )
            break
        except IntegrityError:
            if attempt == KEY_RACE_RETRIES - 1:
                raise
    if not done.existing:
        await runtime.after_submit([done.row])
    return Submitted(done.row, replayed=done.existing)


async def store(runtime: Runtime, row: JobValues, spec: JobSubmit) -> Submitted:
    """Where a single submit's row goes: the group commit, or, with ``unique`` or
    ``debounce``, a transaction of its own."""
    if spec.unique is None and spec.debounce is None:
        return await runtime.submits.submit(row)
    # The key decides whether the submit makes a job, so a retried request finds its
    # job by it: an Idempotency-Key (the SDK sends one with every submit) adds nothing.
    row["idempotency_key"] = row["request_hash"] = None
    return await submit_with_key(runtime, row, spec)


def refuse_keyed_in_batch(specs: Sequence[JobSubmit]) -> None:
    for index, spec in enumerate(specs):
        if spec.unique is not None or spec.debounce is not None:
            raise errors.ValidationFailed(
                f"jobs[{index}]: unique and debounce are for single submits (POST /jobs)"
            )


# --- pause: what a lease request sees ----------------------------------------------------

# How often a waiting long-poll looks again while any flow control is configured.
FLOW_RECHECK_SECONDS = 0.5
# How stale this process's view of the paused queues may be: a pause reaches every
# replica's leases within this (plus one grant), without a query per lease request.
PAUSED_VIEW_SECONDS = 0.5


class PausedView:
    """The paused queues as this process last read them (one query per interval, shared
    by every lease request), updated at once by a PATCH in this process."""

    def __init__(self) -> None:
        self.queues: frozenset[str] = frozenset()
        self.read_at = -1e9
        self._reading: asyncio.Future[None] | None = None

    async def current(self, runtime: Runtime) -> frozenset[str]:
        loop = asyncio.get_running_loop()
        if loop.time() - self.read_at < PAUSED_VIEW_SECONDS:
            return self.queues
        if self._reading is None:
            self._reading = asyncio.ensure_future(self._read(runtime))
        reading = self._reading
        try:
            await asyncio.shield(reading)
        finally:
            if self._reading is reading and reading.done():
                self._reading = None
        return self.queues

    async def _read(self, runtime: Runtime) -> None:
        names, configured = await runtime.db.read(_paused_and_configured)
        self.queues = frozenset(names)
        state_of(runtime.db.engine).active = configured
        self.read_at = asyncio.get_running_loop().time()

    def changed(self, queue: str, paused: bool) -> None:
        self.queues = self.queues | {queue} if paused else self.queues - {queue}


async def active_now(runtime: Runtime) -> bool:
    """``active``, read again once the paused view is older than ``PAUSED_VIEW_SECONDS``.
    For a path that claims nothing through SQL (the Redis protocol's ingest of leases and
    reports): in a service whose workers all lease from Redis, nothing else would ever
    replace the start-up's "assume so", and its events would never take the direct path."""
    await paused_view(runtime).current(runtime)
    return active(runtime.db.engine)


def _paused_and_configured(session: Session) -> tuple[list[str], bool]:
    """The paused queues, and whether any flow control is configured at all."""
    query = sa.select(QueueSettingsRow.name).where(QueueSettingsRow.paused.is_(True))
    paused = list(session.scalars(query))
    some_limit = session.scalars(sa.select(LimitRow.name).limit(1)).first() is not None
    some_queue = session.scalars(sa.select(QueueSettingsRow.name).limit(1)).first() is not None
    return paused, some_limit or some_queue


# One view per runtime (keyed by its Signals: the Runtime dataclass is not hashable).
_views: weakref.WeakKeyDictionary[Signals, PausedView] = weakref.WeakKeyDictionary()


def paused_view(runtime: Runtime) -> PausedView:
    view = _views.get(runtime.signals)
    if view is None:
        view = _views[runtime.signals] = PausedView()
    return view


Release = Callable[[list[JobValues]], Awaitable[None]]


async def lease_unpaused(
    runtime: Runtime,
    queues: Sequence[str],
    max_jobs: int,
    wait: float,
    terms: Callable[[], LeaseTerms],
    release: Release,
) -> list[JobValues]:
    """``Dispatcher.lease`` over the queues that are not paused. With every queue paused
    the request waits for a resume (woken at once by one in this process; another
    replica's is seen within ``PAUSED_VIEW_SECONDS``). Jobs granted after a long wait in
    a queue paused meanwhile are handed back, never returned."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    view = paused_view(runtime)
    while True:
        paused = await view.current(runtime)
        open_queues = [queue for queue in queues if queue not in paused]
        remaining = max(deadline - loop.time(), 0.0)
        if open_queues:
            # Under flow control a slot or a rate window frees without any event a
            # waiter hears (a settle elsewhere, time passing): look again this often.
            flowing = active(runtime.db.engine)
            chunk = min(remaining, FLOW_RECHECK_SECONDS) if flowing else remaining
            started = loop.time()
            rows = await runtime.dispatcher.lease(open_queues, max_jobs, chunk, terms)
            if rows and loop.time() - started > PAUSED_VIEW_SECONDS:
                rows = await _without_paused(runtime, rows, release)
            if rows or loop.time() >= deadline or runtime.signals.draining:
                return rows
            continue
        if remaining <= 0 or runtime.signals.draining:
            return []
        event = runtime.signals.ready_waiter(queues)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), min(remaining, PAUSED_VIEW_SECONDS))
        finally:
            runtime.signals.drop_ready_waiter(queues, event)


async def _without_paused(
    runtime: Runtime, rows: list[JobValues], release: Release
) -> list[JobValues]:
    queues = {row["queue"] for row in rows}
    paused = await runtime.db.read(lambda session: paused_queues(session, queues))
    if not paused:
        return rows
    await release([row for row in rows if row["queue"] in paused])
    return [row for row in rows if row["queue"] not in paused]


async def set_queue(runtime: Runtime, name: str, patch: QueuePatch) -> dict[str, Any]:
    """``PATCH /queues/{name}``; a resume wakes this process's waiting long-polls now,
    and re-announces the queue's ready jobs so other replicas' waiters wake too."""
    now = runtime.clock.now()
    body = await runtime.db.run(lambda session: patch_queue(session, name, patch, now))
    paused_view(runtime).changed(name, body["paused"])
    _changed(runtime.db.engine)
    resumed = "paused" in patch.model_fields_set and not body["paused"]
    await sync_redis(runtime, [name] if resumed else ())
    if resumed:
        runtime.signals.queues_ready([name])
        ready = await runtime.db.read(lambda session: _some_ready(session, name))
        await runtime.broker.publish(ready)
    return body


def _some_ready(session: Session, queue: str) -> list[Dispatch]:
    query = (
        sa.select(JobRow.id, JobRow.queue, JobRow.priority)
        .where(JobRow.queue == queue, JobRow.status == JobStatus.queued)
        .order_by(JobRow.priority.desc(), JobRow.id)
        .limit(RESUME_ANNOUNCE_JOBS)
    )
    return [Dispatch(job_id, q, priority) for job_id, q, priority in session.execute(query)]


# A resume re-publishes this many of the queue's ready jobs: enough to wake every waiting
# long-poll; the index holds them already (re-adding is harmless).
RESUME_ANNOUNCE_JOBS = 100


# --- the Redis worker protocol's copy of the rules ---------------------------------------


def redis_rules(session: Session) -> dict[str, str]:
    """The ``{tag}:flow`` hash the Lua lease reads (service/lua/celeriac.lua): every
    limit and pattern, every queue's own limits, and the paused queues."""
    fields = {"synced": "1"}
    for limit in session.scalars(sa.select(LimitRow)):
        fields[f"rule:{limit.name}"] = _rule_text(_rule(limit))
    for queue in session.scalars(sa.select(QueueSettingsRow)):
        if _rule(queue).limits_anything:
            fields[f"rule:{queue_key(queue.name)}"] = _rule_text(_rule(queue))
        if queue.paused:
            fields[f"paused:{queue.name}"] = "1"
    return fields


def _rule_text(rule: Rule) -> str:
    def text(value: float | None) -> str:
        return "" if value is None else str(int(value))

    period_ms = None if rule.rate_period is None else rule.rate_period * 1000
    return f"{text(rule.max_running)},{text(rule.rate_limit)},{text(period_ms)}"


async def sync_redis(runtime: Runtime, woken: Collection[str] = ()) -> None:
    """Write the rules for the Lua lease (one MULTI: the hash is replaced whole), and wake
    the Redis workers of ``woken`` queues (a resume). Nothing without the protocol."""
    from service.brokers.redis import RedisBroker  # the Redis client is an optional extra

    broker = runtime.broker
    if not isinstance(broker, RedisBroker) or not broker.serve_workers:
        return
    rules = await runtime.db.read(redis_rules)
    fields: dict[Any, Any] = dict(rules)  # redis-py's Mapping is invariant in its key
    key = f"{broker.layout.tag}:flow"
    async with broker.redis.pipeline(transaction=True) as pipe:
        pipe.delete(key)
        pipe.hset(key, mapping=fields)
        for queue in woken:
            pipe.lpush(broker.layout.wake(queue), "1")
        await pipe.execute()


class FlowSync(Plugin):
    """Keeps the Redis protocol's copy of the rules (and pauses) current: after a flush,
    and for changes made through another replica. Changes made here sync at once."""

    name = "flow"

    def __init__(self, runtime: Runtime) -> None:
        self.interval = runtime.settings.reconcile_interval_seconds

    async def run_once(self, runtime: Runtime) -> Pass:
        await sync_redis(runtime)
        return Pass()


# --- the claim under flow control ----------------------------------------------------------

# Candidates looked at per job wanted: enough to find other keys behind a busy one.
FAIRNESS_WINDOW = 4
# Looks per queue and claim: a look that fills a key looks again past it.
CLAIM_LOOKS = 4


def _round_robin(rows: list[JobValues]) -> list[JobValues]:
    """Within a priority, one job of each key in turn (oldest first within a key), so one
    key's backlog does not starve another's jobs (Hatchet's GROUP_ROUND_ROBIN)."""
    seen: dict[tuple[int, str | None], int] = {}
    ranked = []
    for row in rows:  # in (priority desc, id) order
        group = (row["priority"], row.get("limit_key"))
        seen[group] = seen.get(group, 0) + 1
        ranked.append((-row["priority"], seen[group], row["id"], row))
    return [row for *_, row in sorted(ranked, key=lambda item: item[:3])]


def claim_from_queues(
    session: Session, queues: Sequence[str], max_jobs: int, terms: LeaseTerms
) -> list[JobValues]:
    """``leases.claim_from_queues`` under flow control: paused queues and the keys known
    to be full left out of the candidates, a window of candidates ordered round-robin by
    key, then ``admit`` (locks and counts) and the grant, all in the caller's
    transaction."""
    from service import leases  # the claim's building blocks

    snap = snapshot(session)
    hint = state_of(session.get_bind()).full_keys(terms.now)
    shut = {q for q in queues if q in snap.paused or queue_key(q) in hint}
    full_keys = {key for key in hint if not key.startswith(QUEUE_KEY_PREFIX)}
    state = state_of(session.get_bind())
    claimed: list[JobValues] = []
    for queue in queues:
        if queue not in shut and queue not in snap.queues and state.plain_now(queue):
            # A queue whose jobs named no limits at the last look: the plain claim, of
            # jobs naming none; the flow look below only if that came back short.
            claimed += leases.claim_queue(
                session, queue, max_jobs - len(claimed), terms, unlimited_only=True
            )
        for _look in range(CLAIM_LOOKS):
            want = max_jobs - len(claimed)
            if want <= 0 or queue in shut:
                break
            window = _window(session, queue, want, sorted(full_keys), terms)
            state.looked(queue, window)
            admission = admit(session, window, terms.now, want)
            admission = arbitrate(session, admission, terms)  # Redis's slots (flow_redis)
            admission.admitted = leases._grant(session, admission.admitted, terms)
            record_grants(session, admission, terms.token, terms.now)
            claimed.extend(admission.admitted)
            # Keys that filled up in this look: the next look passes them by.
            newly = {k for k in admission.full if k not in full_keys}
            shut |= {k[len(QUEUE_KEY_PREFIX) :] for k in newly if k.startswith(QUEUE_KEY_PREFIX)}
            full_keys |= newly
            if len(window) < want * FAIRNESS_WINDOW or not newly:
                break  # the queue has no more, or nothing changed to look again for
    return claimed


def _window(
    session: Session, queue: str, want: int, skip_keys: list[str], terms: LeaseTerms
) -> list[JobValues]:
    """The next candidates of a queue, locked (SKIP LOCKED), jobs of full keys left out,
    in round-robin order of their keys."""
    from service import leases

    jobs = JOBS_TABLE.c
    query = leases._select((*leases.CLAIM_COLUMNS, "limits", "limit_key")).where(
        jobs.queue == queue, leases.grantable()
    )
    if skip_keys:
        query = query.where(sa.or_(jobs.limit_key.is_(None), jobs.limit_key.not_in(skip_keys)))
    query = (
        query.order_by(jobs.priority.desc(), jobs.id)
        .limit(want * FAIRNESS_WINDOW)
        .with_for_update(skip_locked=True)
    )
    return _round_robin(leases._rows(session, query, leases.claim_params(terms)))


def claim_by_ids(
    session: Session,
    ids: Sequence[str],
    terms: LeaseTerms,
    allows_queue: Callable[[str], bool] | None = None,
) -> list[JobValues]:
    """``leases.claim_by_ids`` under flow control: the broker's candidates, those with
    room granted; the rest stay queued (the dispatcher hands them back)."""
    from service import leases

    if not ids:
        return []
    query = (
        leases._select((*leases.CLAIM_COLUMNS, "limits", "limit_key"))
        .where(JOBS_TABLE.c.id.in_(ids), leases.grantable_by_id())
        .order_by(JOBS_TABLE.c.id)
        .with_for_update()
    )
    found = {row["id"]: row for row in leases._rows(session, query, leases.claim_params(terms))}
    if allows_queue is not None:
        found = {i: row for i, row in found.items() if allows_queue(row["queue"])}
    admission = admit(session, [found[i] for i in ids if i in found], terms.now)
    admission = arbitrate(session, admission, terms)  # Redis's slots (flow_redis)
    admission.admitted = leases._grant(session, admission.admitted, terms)
    record_grants(session, admission, terms.token, terms.now)
    return admission.admitted + instead_of_blocked(session, admission.blocked, terms, allows_queue)


def instead_of_blocked(
    session: Session,
    blocked: Sequence[JobValues],
    terms: LeaseTerms,
    allows_queue: Callable[[str], bool] | None = None,
) -> list[JobValues]:
    """After a claim by ids: as many jobs as it left blocked, from their queues in SQL.
    The broker's index is in age order and cannot skip a full key: what it offered was
    blocked, so take as many from SQL, which passes full keys by. (Its index still holds
    those ids: popped later, they are stale candidates, as usual.)"""
    if not blocked:
        return []
    queues = list(dict.fromkeys(row["queue"] for row in blocked))
    if allows_queue is not None:
        queues = [queue for queue in queues if allows_queue(queue)]
    return claim_from_queues(session, queues, len(blocked), terms)


def record_mirrored(session: Session, ids: Sequence[str], token: str, now: datetime) -> None:
    """The Redis protocol's leases, as their events reach SQL: their grant rows, so that
    HTTP grants count them too (the Lua lease granted them under its own copy)."""
    if not ids or not active(session.get_bind()):
        return
    jobs = JOBS_TABLE.c
    held = sa.and_(jobs.lease_token == token, jobs.status == JobStatus.running)
    query = sa.select(jobs.id, jobs.queue, jobs.limits).where(jobs.id.in_(ids), filter_only(held))
    rows = [cast(JobValues, dict(row)) for row in session.execute(query).mappings()]
    rules = snapshot(session).rules_for({key for row in rows for key in keys_of(row)})
    grants = [
        {"limit_name": key, "job_id": row["id"], "lease_token": token, "granted_at": now}
        for row in rows
        for key in keys_of(row)
        if key in rules
    ]
    if grants:
        session.execute(sa.insert(LIMIT_GRANTS_TABLE), grants)
