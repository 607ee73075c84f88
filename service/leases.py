"""The worker protocol's domain: claim jobs under a lease, extend it, and settle it.

Fencing: every write that settles or extends a lease first locks the rows and checks
(id, token, running, key), so a worker whose lease was reclaimed and re-granted changes
nothing, and a token is only accepted from the API key it was granted to (a token seen by
another tenant, in a log or a shared job, is worth nothing to it).
These are the hot paths, so they read only the columns they need with Core statements and
write each batch with one statement (or one executemany), never row by row through the
ORM. Plain functions over a Session; the caller owns the transaction."""

from __future__ import annotations

import functools
import random
import secrets
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from service import joblogs, workflows
from service.bulk import Recordset, update_each
from service.effects import Dispatch, Ended
from service.effects import Effects as Effects  # re-exported: the domain's callers use it
from service.ids import is_job_id
from service.models import JOBS_TABLE, JobValues, UTCDateTime
from service.pg_direct import Row, Step
from service.states import PENDING, JobStatus, LeaseProblem, Outcome
from service.webhooks import record_finished

if TYPE_CHECKING:
    from service.flow_redis import SlotArbiter
    from service.pg_direct import Direct, DirectPg
    from service.sqlite_direct import DirectSqlite, Run

BATCH_LIMIT = 1000
jobs_c = JOBS_TABLE.c

# What a worker receives with a lease (parents: NULL but for a workflow's jobs).
CLAIM_COLUMNS = ("id", "task", "args", "kwargs", "queue", "priority", "attempt", "max_retries",
                 "timeout", "parents", "traceparent")  # fmt: skip
# What deciding a lease's fate needs: never the (possibly large) arguments or result.
# (webhook and result_ttl decide the outbox row and the result's expiry.)
STATE_COLUMNS = ("id", "status", "queue", "priority", "attempt", "max_retries", "timeout",
                 "run_at", "lease_token", "lease_worker", "lease_key", "cancel_requested",
                 "backoff_base",
                 "backoff_max", "backoff_jitter", "started_at",
                 "webhook", "result_ttl", "task", "workflow_id", "traceparent",
                 "limit_key")  # fmt: skip
# What settling a lease may change: one shape for every row, so one executemany.
SETTLE_COLUMNS = ("status", "result", "error", "attempt", "run_at", "finished_at",
                  "lease_token", "lease_expires_at", "lease_worker", "started_at",
                  "result_ref", "result_expires_at")  # fmt: skip


def new_token() -> str:
    return secrets.token_urlsafe(18)


def _select(columns: Sequence[str]) -> sa.Select[Any]:
    return sa.select(*(jobs_c[name] for name in columns))


@functools.cache
def _by_ids(columns: tuple[str, ...] | None, *, lock: bool = False) -> sa.Select[Any]:
    """``SELECT <columns> (None: all) FROM jobs WHERE id IN :ids [FOR UPDATE]``, built once:
    the ids go as an expanding parameter (``{"ids": [...]}``). Building a select of a few
    dozen columns, and SQLAlchemy walking it for its cache key, took longer than SQLite
    took to run it: about a third of a report's settle."""
    query = (sa.select(JOBS_TABLE) if columns is None else _select(columns)).where(
        jobs_c.id.in_(sa.bindparam("ids", expanding=True))
    )
    return query.with_for_update() if lock else query


def _rows(
    session: Session, query: sa.Select[Any], params: dict[str, Any] | None = None
) -> list[JobValues]:
    # The columns asked for, typed by JobValues (a row of a narrower select has fewer).
    return [cast(JobValues, dict(row._mapping)) for row in session.execute(query, params)]


def _update_each(session: Session, columns: Sequence[str], changes: list[JobValues]) -> None:
    """UPDATE jobs SET <columns> WHERE id = ? for every change, as one statement."""
    update_each(session, columns, changes)


@dataclass(frozen=True, slots=True)
class LeaseTerms:
    worker: str
    token: str
    now: datetime
    lease_seconds: float | None  # None: each job's own timeout, else the default
    default_seconds: float
    # The caller's API key (Principal.key_id): leases are granted to it and extended only
    # for it. "" with auth off, and for the Redis protocol (no API keys there).
    key_id: str = ""
    # Where the service serves the Redis worker protocol: Redis arbitrates the limit
    # slots of HTTP grants too (service/flow_redis.py). None: SQL decides alone.
    slot_arbiter: SlotArbiter | None = None

    def deadline(self, row: JobValues) -> datetime:
        seconds = self.lease_seconds or row["timeout"] or self.default_seconds
        return self.now + timedelta(seconds=seconds)


def grantable() -> sa.ColumnElement[bool]:
    """The one condition a job must meet to be leased: queued, and not past its expiry.
    Every claim (from queues, by ids; in one statement or two) filters with it, so a
    condition added here (flow control) holds for every dispatch path.

    It is SQL over bind parameters, not values: the claim statements are built once per
    shape and reused (building one costs more than running it). ``claim_params`` gives
    the parameters' values for each claim (``now``, ``key_id``, ``worker``, ``token``);
    a condition that needs another value adds it there."""
    return sa.and_(
        jobs_c.status == JobStatus.queued,
        sa.or_(jobs_c.expires_at.is_(None), jobs_c.expires_at > _NOW),
    )


def grantable_by_id() -> sa.ColumnElement[bool]:
    """``grantable()`` for jobs found by their ids (``filter_only``)."""
    return filter_only(grantable())


def filter_only(condition: sa.ColumnElement[bool]) -> sa.ColumnElement[bool]:
    """``condition`` as a filter only, never an index path, for a statement that finds
    jobs by their ids: ``(condition) IS TRUE`` keeps exactly the rows ``condition`` keeps,
    and no index serves it, so the ids (the primary key) are the only way in.

    Why: PostgreSQL runs a statement it has prepared (the direct path's, psycopg's after
    five uses) with a generic plan, made without the values, where ``status = $9`` could
    be any status. Without statistics (a table not yet analyzed; autovacuum off) it
    judged that rare, took the status index for a claim of one id, and read every queued
    job: 21,350 rows and 5.9 ms a claim against 0.04 ms (docs/benchmarks.md, issue 14,
    thirteenth pass). A backlog in one queue slowed every grant in all of them; the
    pool's grant of a flow-control claim read all 20,000 jobs of a keyed drain per grant
    (fourteenth pass)."""
    return condition.is_(sa.true())


_NOW = sa.bindparam("now", type_=UTCDateTime())


def claim_params(terms: LeaseTerms) -> dict[str, Any]:
    """The bind parameters of one claim (see ``grantable``). ``deadline``: the lease's end
    for a job whose own timeout does not decide it."""
    seconds = terms.lease_seconds or terms.default_seconds
    return {
        "now": terms.now,
        "token": terms.token,
        "worker": terms.worker,
        "key_id": terms.key_id,
        "deadline": terms.now + timedelta(seconds=seconds),
    }


# What a claim returns: what the worker receives, and the lease it was granted.
GRANTED_COLUMNS = (*CLAIM_COLUMNS, "lease_token", "lease_expires_at")


def _grants_in_one_statement(session: Session) -> bool:
    """PostgreSQL and SQLite (3.35+) claim and grant in one UPDATE … RETURNING; MariaDB
    has no UPDATE … RETURNING: it selects the rows, then grants them (``_grant``)."""
    return bool(session.get_bind().dialect.update_returning)


def _own_deadline(dialect: str) -> sa.ColumnElement[Any]:
    """``LeaseTerms.deadline`` in SQL for a request without a lease length: the job's
    timeout if it has one, else ``:deadline`` (the default length)."""
    if dialect == "postgresql":
        own = _NOW + sa.type_coerce(
            jobs_c.timeout * sa.literal_column("interval '1 second'"), sa.Interval()
        )
    else:  # SQLite: the text form SQLAlchemy stores, here to the millisecond
        step = sa.func.printf("%+.6f seconds", jobs_c.timeout)
        own = sa.func.strftime("%Y-%m-%d %H:%M:%f", _NOW, step)
    return sa.case((jobs_c.timeout > 0, own), else_=sa.bindparam("deadline", type_=UTCDateTime()))


@functools.cache
def _grant_statement(dialect: str, own_deadlines: bool, unlimited_only: bool) -> sa.Update:
    """Claim and grant in one statement: lock the next ready jobs of ``:claim_queue``
    (SKIP LOCKED; with ``unlimited_only``, of those naming no limits), and turn them into
    running ones under the lease, returning them as granted. One per shape, built once
    (``grantable``). (A broker's candidate ids are claimed in two statements:
    ``claim_by_ids``.)"""
    ready = _select(("id",)).where(grantable(), jobs_c.queue == sa.bindparam("claim_queue"))
    if unlimited_only:
        ready = ready.where(jobs_c.limit_key.is_(None))
    picked = (
        ready.order_by(jobs_c.priority.desc(), jobs_c.id)
        .limit(sa.bindparam("want", type_=sa.Integer()))
        .with_for_update(skip_locked=True)
    )
    deadline = _own_deadline(dialect) if own_deadlines else sa.bindparam("deadline")
    # Picked once, in a materialized CTE: as a plain ``IN (subquery)`` PostgreSQL may
    # scan the subquery again for each row it updates, and each scan, skipping the rows
    # this very statement changed, would pick more jobs than LIMIT says.
    chosen = picked.cte("picked").prefix_with("MATERIALIZED", dialect="postgresql")
    return (
        sa.update(JOBS_TABLE)
        .where(jobs_c.id == chosen.c.id, jobs_c.status == JobStatus.queued)
        .values(
            **_lease_values(
                sa.bindparam("token"), sa.bindparam("worker"), sa.bindparam("key_id"), _NOW
            ),
            lease_expires_at=sa.type_coerce(deadline, UTCDateTime()),
        )
        .returning(*(jobs_c[name] for name in GRANTED_COLUMNS))
    )


def claim_from_queues(
    session: Session, queues: Sequence[str], max_jobs: int, terms: LeaseTerms
) -> list[JobValues]:
    """SQL dispatch: take up to max_jobs ready jobs, queues in the given order, highest
    priority then oldest first. SKIP LOCKED lets concurrent claimers pass each other.
    One statement per queue where the database can (``_grants_in_one_statement``)."""
    from service import flow  # flow control, when any is configured (docs/flow-control.md)

    if flow.active(session.get_bind()):
        return flow.claim_from_queues(session, queues, max_jobs, terms)
    claimed: list[JobValues] = []
    for queue in queues:
        want = max_jobs - len(claimed)
        if want <= 0:
            break
        claimed.extend(claim_queue(session, queue, want, terms))
    return claimed


def claim_queue(
    session: Session, queue: str, want: int, terms: LeaseTerms, *, unlimited_only: bool = False
) -> list[JobValues]:
    """The plain claim of one queue: its next ``want`` ready jobs granted, in one statement
    where the database can. ``unlimited_only``: only jobs that name no limits (flow
    control's fast path for a queue whose jobs name none: ``flow.claim_from_queues``)."""
    if _grants_in_one_statement(session):
        connection = session.connection()
        statement = _grant_statement(
            connection.dialect.name, not terms.lease_seconds, unlimited_only
        )
        params = claim_params(terms) | {"claim_queue": queue, "want": want}
        rows = [
            cast(JobValues, dict(row)) for row in connection.execute(statement, params).mappings()
        ]
        # RETURNING keeps no order: the claim's own.
        return sorted(rows, key=lambda row: (-row["priority"], row["id"]))
    picked = _select(CLAIM_COLUMNS).where(jobs_c.queue == queue, grantable())
    if unlimited_only:
        picked = picked.where(jobs_c.limit_key.is_(None))
    picked = (
        picked.order_by(jobs_c.priority.desc(), jobs_c.id)
        .limit(want)
        .with_for_update(skip_locked=True)
    )
    return _grant(session, _rows(session, picked, claim_params(terms)), terms)


async def claim_queue_direct(
    direct: Direct, queue: str, want: int, terms: LeaseTerms
) -> list[JobValues]:
    """``claim_queue`` (the plain claim, in its one statement) from the event loop on
    PostgreSQL or SQLite (service/pg_direct.py, service/sqlite_direct.py). Its own
    transaction: the caller claims one queue."""
    own_deadlines = not terms.lease_seconds
    dialect = direct.dialect.name
    compiled = direct.compiled(
        ("claim queue", own_deadlines),
        lambda: _grant_statement(dialect, own_deadlines, False),
    )
    rows = await direct.fetch(compiled, claim_params(terms) | {"claim_queue": queue, "want": want})
    return sorted(_granted(rows), key=lambda row: (-row["priority"], row["id"]))


async def claim_ids_direct(
    direct: DirectPg,
    ids: Sequence[str],
    terms: LeaseTerms,
    limited_queues: Collection[str] | None = None,
) -> list[JobValues]:
    """``claim_by_ids`` (for a caller that may use every queue) in one statement from the
    event loop on PostgreSQL: the ids still grantable, granted, in the broker's order.
    ``limited_queues`` (flow control configured): only jobs that name no limits, outside
    these queues (``flow.limited_queues``), which flow control would grant as they are."""
    if not ids:
        return []
    own_deadlines, plain = not terms.lease_seconds, limited_queues is not None
    compiled = direct.compiled(
        ("claim ids", own_deadlines, plain), lambda: _grant_ids_statement(own_deadlines, plain)
    )
    values = claim_params(terms) | {"ids": list(ids)}
    if plain:
        values["limited_queues"] = sorted(limited_queues or ())
    rows = await direct.fetch(compiled, values)
    found = {row["id"]: row for row in _granted(rows)}
    return [found[i] for i in ids if i in found]


def _granted(rows: list[Row]) -> list[JobValues]:
    return cast(list[JobValues], rows)


def _grant_ids_statement(own_deadlines: bool, plain: bool) -> sa.Update:
    """``_grant_statement`` over the ids a broker proposed (``= ANY(:ids)``, an array: one
    plan for any number of ids) instead of the ready jobs of a queue; ``plain``: only
    jobs naming no limits, outside ``:limited_queues``. PostgreSQL only."""
    deadline = _own_deadline("postgresql") if own_deadlines else sa.bindparam("deadline")
    ids = sa.bindparam("ids", type_=postgresql.ARRAY(sa.String()))
    condition = grantable_by_id()
    if plain:
        limited = sa.bindparam("limited_queues", type_=postgresql.ARRAY(sa.String()))
        condition = sa.and_(condition, jobs_c.limit_key.is_(None), jobs_c.queue != sa.all_(limited))
    return (
        sa.update(JOBS_TABLE)
        .where(jobs_c.id == sa.any_(ids), condition)
        .values(
            **_lease_values(
                sa.bindparam("token"), sa.bindparam("worker"), sa.bindparam("key_id"), _NOW
            ),
            lease_expires_at=sa.type_coerce(deadline, UTCDateTime()),
        )
        .returning(*(jobs_c[name] for name in GRANTED_COLUMNS))
    )


def short_means_drained(engine: Any) -> bool:
    """Whether a claim that returns fewer jobs than asked found its queues without ready
    jobs then. Not under flow control: it holds ready jobs back, and lets them go on
    events (a limit's slot freed, a rate window passed) that signal nothing."""
    from service import flow

    return not flow.active(engine)


def claim_by_ids(
    session: Session,
    ids: Sequence[str],
    terms: LeaseTerms,
    allows_queue: Callable[[str], bool] | None = None,
) -> list[JobValues]:
    """Broker dispatch: the broker proposed these ids; SQL decides which are still ready
    (and, for a caller restricted to some queues, which it may have). Locks in id order,
    returns in the broker's order (it encodes priority)."""
    if not ids:
        return []
    from service import flow  # flow control, when any is configured (docs/flow-control.md)

    if flow.active(session.get_bind()):
        return flow.claim_by_ids(session, ids, terms, allows_queue)
    # Two statements here even where one UPDATE … RETURNING could do (claim_from_queues
    # does): measured in one run each, the one-statement claim of a broker's ids drained
    # 1,670 jobs/s against 2,090 for this (docs/benchmarks.md, issue 14).
    params = claim_params(terms) | {"ids": list(ids)}
    found = {row["id"]: row for row in _rows(session, _pick_by_ids(), params)}
    if allows_queue is not None:
        found = {i: row for i, row in found.items() if allows_queue(row["queue"])}
    return _grant(session, [found[i] for i in ids if i in found], terms)


@functools.cache
def _pick_by_ids() -> sa.Select[Any]:
    """``claim_by_ids``'s lock of the proposed jobs still grantable, built once."""
    return (
        _select(CLAIM_COLUMNS)
        .where(jobs_c.id.in_(sa.bindparam("ids", expanding=True)), grantable_by_id())
        .order_by(jobs_c.id)  # as in _grant_statement
        .with_for_update()
    )


def _grant(session: Session, rows: list[JobValues], terms: LeaseTerms) -> list[JobValues]:
    by_deadline: dict[datetime, list[str]] = {}
    for row in rows:
        deadline = terms.deadline(row)
        row["attempt"] += 1
        row["lease_token"] = terms.token
        row["lease_expires_at"] = deadline
        by_deadline.setdefault(deadline, []).append(row["id"])
    # One UPDATE per distinct deadline (usually one), not one per job.
    for deadline, ids in by_deadline.items():
        grant(session, ids, Lease(terms.token, terms.worker, terms.key_id, deadline, terms.now))
    return rows


@dataclass(frozen=True, slots=True)
class Lease:
    """The lease columns one grant writes."""

    token: str
    worker: str
    key_id: str  # "" for the Redis protocol (no API keys there) and with auth off
    expires_at: datetime
    now: datetime


def grant(session: Session, ids: Sequence[str], lease: Lease) -> None:
    """The one statement that turns queued jobs into running ones under ``lease``: every
    dispatch path (HTTP leases from any broker, the Redis worker protocol's leases
    mirrored into SQL) grants through it. A job that is no longer queued (cancelled,
    expired, granted elsewhere) is left alone: its worker's report will be stale."""
    values = {"token": lease.token, "worker": lease.worker, "key_id": lease.key_id,
              "now": lease.now, "deadline": lease.expires_at}  # fmt: skip
    session.execute(_grant_by_ids(), {"ids": list(ids), **values})


@functools.cache
def _grant_by_ids() -> sa.Update:
    """``grant``'s statement, built once (over bind parameters, as ``_grant_statement``)."""
    deadline = sa.bindparam("deadline", type_=UTCDateTime())
    ids: sa.BindParameter[list[str]] = sa.bindparam("ids", expanding=True)
    return (
        sa.update(JOBS_TABLE)
        .where(jobs_c.id.in_(ids), filter_only(jobs_c.status == JobStatus.queued))
        .values(
            **_lease_values(
                sa.bindparam("token"), sa.bindparam("worker"), sa.bindparam("key_id"), _NOW
            ),
            lease_expires_at=deadline,
        )
    )


def _lease_values(token: Any, worker: Any, key_id: Any, now: Any) -> dict[str, Any]:
    """What every grant writes, but the deadline."""
    return {
        "status": JobStatus.running,
        "attempt": jobs_c.attempt + 1,
        "lease_token": token,
        "lease_worker": worker,
        "lease_key": key_id,
        "started_at": now,
    }


# What a grant writes of the lease itself, per job (``grant_mirrored_direct``).
MIRROR_COLUMNS = ("lease_token", "lease_worker", "started_at", "lease_expires_at")


def mirrored(job_id: str, lease: Lease) -> dict[str, Any]:
    """A row of ``grant_mirrored_direct``: ``job_id`` granted under ``lease``."""
    return {"id": job_id, "lease_token": lease.token, "lease_worker": lease.worker,
            "started_at": lease.now, "lease_expires_at": lease.expires_at}  # fmt: skip


async def grant_mirrored_direct(direct: DirectPg, rows: Sequence[Mapping[str, Any]]) -> None:
    """``grant`` for leases granted outside SQL (the Redis protocol's, key ""), each job
    under its own (``mirrored``), in one statement from the event loop on PostgreSQL. As
    ``grant``, a job no longer queued is left alone. Without flow control only: under it,
    a mirrored grant also writes the job's limit slots (``flow.record_mirrored``)."""
    if rows:
        await direct.fetch(*grant_mirrored_step(direct, rows))


def grant_mirrored_step(direct: DirectPg, rows: Sequence[Mapping[str, Any]]) -> Step:
    """``grant_mirrored_direct``'s statement, to run ahead of another in its transaction
    (``settle_succeeded_direct``'s ``first``)."""
    read = _mirror_recordset()
    compiled = direct.compiled("grant mirrored", lambda: _grant_mirrored_statement(read))
    statuses = {"queued": JobStatus.queued, "running": JobStatus.running}
    return compiled, {"rows": read.rows_json(rows), "lease_key": "", **statuses}


@functools.cache
def _mirror_recordset() -> Recordset:
    return Recordset(MIRROR_COLUMNS, key="id")


def _grant_mirrored_statement(read: Recordset) -> sa.TextClause:
    """``grant``'s writes (``_lease_values``) over a recordset of leases."""
    sets = [f"{name} = {value}" for name, value in zip(MIRROR_COLUMNS, read.values, strict=True)]
    sets += ["status = :running", "attempt = jobs.attempt + 1", "lease_key = :lease_key"]
    # Column names come from the table definition, never from input.
    return sa.text(
        f"UPDATE jobs SET {', '.join(sets)} FROM {read.source} "  # noqa: S608
        "WHERE jobs.id = v.id AND jobs.status = :queued"
    )


@dataclass(slots=True)
class LeaseCheck:
    """A (job, token) pair checked against the locked row."""

    id: str
    token: str
    row: JobValues | None = None
    problem: LeaseProblem | None = None


@dataclass(frozen=True, slots=True)
class Grant:
    """A lease granted outside SQL (a Redis worker's) that SQL has not recorded yet."""

    token: str
    worker: str
    now: datetime


def _lock_and_check(
    session: Session,
    pairs: Iterable[tuple[str, str]],
    key_id: str,
    grants: dict[str, Grant] | None = None,
) -> list[LeaseCheck]:
    """A foreign key's report reads exactly as a stale token's: it learns nothing."""
    checks = [LeaseCheck(job_id, token) for job_id, token in pairs]
    # An id that is no job's ("%00" in a path, 300 characters) is "not found" without a
    # query: PostgreSQL refuses NUL in a parameter, and the query would fail the batch.
    ids = list({c.id for c in checks if is_job_id(c.id)})
    query = _by_ids(STATE_COLUMNS, lock=True)
    rows = {row["id"]: row for row in _rows(session, query, {"ids": ids})}
    for state in rows.values():
        grant = (grants or {}).get(state["id"])
        if grant is not None and state["status"] == JobStatus.queued:
            # Granted and settled in one batch: record both with one write.
            state.update({"status": JobStatus.running, "lease_token": grant.token,
                          "lease_worker": grant.worker, "lease_key": "",
                          "started_at": grant.now, "attempt": state["attempt"] + 1})  # fmt: skip
    for check in checks:
        row = rows.get(check.id)
        if row is None:
            check.problem = LeaseProblem.not_found
        elif (
            row["status"] != JobStatus.running
            or row["lease_token"] != check.token
            or row["lease_key"] not in (None, key_id)  # NULL: leased before 0005
        ):
            check.problem = LeaseProblem.stale
        else:
            check.row = row
    return checks


@dataclass(slots=True)
class HeartbeatOutcome:
    id: str
    problem: LeaseProblem | None
    expires_at: datetime | None = None
    cancel_requested: bool = False


def heartbeat(
    session: Session,
    items: Sequence[tuple[str, str, Any]],
    terms: LeaseTerms,
) -> list[HeartbeatOutcome]:
    """Extend leases (and store progress). items: (job id, token, progress or None)."""
    progress = {job_id: p for job_id, _token, p in items}
    outcomes: list[HeartbeatOutcome] = []
    extended: list[JobValues] = []
    reported: list[JobValues] = []
    for check in _lock_and_check(session, ((i, t) for i, t, _p in items), terms.key_id):
        if check.row is None:
            outcomes.append(HeartbeatOutcome(check.id, check.problem))
            continue
        row = check.row
        change: JobValues = {"id": row["id"], "lease_expires_at": terms.deadline(row)}
        if progress[row["id"]] is None:
            extended.append(change)
        else:
            reported.append(change | {"progress": progress[row["id"]]})
        outcomes.append(
            HeartbeatOutcome(row["id"], None, change["lease_expires_at"], row["cancel_requested"])
        )
    _update_each(session, ("lease_expires_at",), extended)
    _update_each(session, ("lease_expires_at", "progress"), reported)
    return outcomes


@dataclass(frozen=True, slots=True)
class Settle:
    """One worker report."""

    id: str
    token: str
    outcome: Outcome
    result: Any = None
    error: dict[str, Any] | None = None
    retry: bool = True
    retry_in: float | None = None
    # The result's key in the result store (``result`` is then None).
    result_ref: str | None = None
    # What the task logged during this attempt (service/joblogs.py).
    logs: str | None = None


@dataclass(slots=True)
class SettleOutcome:
    id: str
    problem: LeaseProblem | None
    status: JobStatus | None = None


def settle(
    session: Session,
    reports: Sequence[Settle],
    now: datetime,
    effects: Effects,
    grants: dict[str, Grant] | None = None,
    *,
    key_id: str = "",
) -> list[SettleOutcome]:
    """Apply worker reports in one pass: lock the rows, check each token, and write all
    new states with one executemany. ``grants``: leases to record on the way (Redis).
    ``key_id``: the reporting API key; "" is the Redis protocol's (or auth off)."""
    outcomes: list[SettleOutcome] = []
    changes: list[JobValues] = []
    logs: list[joblogs.AttemptLog] = []
    checks = _lock_and_check(session, ((r.id, r.token) for r in reports), key_id, grants)
    settled: set[str] = set()
    for report, check in zip(reports, checks, strict=True):
        if check.row is None or check.id in settled:  # a lease settles once per batch too
            outcomes.append(SettleOutcome(check.id, check.problem or LeaseProblem.stale))
            continue
        settled.add(check.id)
        change = _settled(check.row, report, now, effects)
        effects.ended.append(_ended(check.row, change, now))  # for metrics, after commit
        changes.append(change)
        outcomes.append(SettleOutcome(check.id, None, JobStatus(change["status"])))
        if report.logs is not None:
            logs.append(_attempt_log(check.row, change, report.logs))
        if check.row.get("traceparent"):
            effects.trace(check.row)  # its "celeriac settle" span, after commit
    _update_each(session, SETTLE_COLUMNS, changes)
    from service import flow  # flow imports this module

    flow.freed(session, (check.row for check in checks if check.row is not None), effects)
    joblogs.record(session, logs, now)
    # Webhook outbox rows commit with the final states; no query when no job in
    # the batch has a webhook (``change["webhook"]`` comes from STATE_COLUMNS).
    record_finished(session, changes, now, effects)
    if any(change["workflow_id"] for change in changes):  # only jobs of a workflow
        workflows.on_finished(session, changes, now, effects)  # release what waits on them
    return outcomes


def keep_settled(session: Session, effects: Effects, waited: Callable[[str], bool]) -> None:
    """The jobs this transaction finished that a ``?wait=`` in this process waits on
    (``waited``), read whole in the same transaction after their update, into
    ``effects.settled``: the waiter answers with them and reads nothing itself. One
    primary-key query, only when some waiter is here."""
    ids = [job_id for job_id in effects.finished if waited(job_id)]
    if ids:
        for row in _rows(session, _by_ids(None), {"ids": ids}):
            effects.settled[row["id"]] = row


def _attempt_log(row: JobValues, change: JobValues, text: str) -> joblogs.AttemptLog:
    # row["attempt"] as leased: a release lowers the change's, not the attempt that ran.
    worker, status = row["lease_worker"], change["status"]
    return joblogs.AttemptLog(row["id"], row["attempt"], worker, status, text)


def _settled(row: JobValues, report: Settle, now: datetime, effects: Effects) -> JobValues:
    """The new values of a leased job after its worker's report."""
    if report.outcome == Outcome.succeeded:
        return _succeeded(row, report, now, effects)
    if report.outcome == Outcome.released:
        return _released(row, effects, counts_as_attempt=False)
    return _failed(row, report.error, now, effects, retry=report.retry, retry_in=report.retry_in)


def _unleased(row: JobValues, status: JobStatus, error: Any = None) -> JobValues:
    """The columns every transition out of ``running`` writes (SETTLE_COLUMNS)."""
    return {
        "id": row["id"],
        "status": status,
        "result": None,
        "error": error,
        "attempt": row["attempt"],
        "run_at": row["run_at"],
        "finished_at": None,
        "lease_token": None,
        "lease_expires_at": None,
        "lease_worker": row["lease_worker"],
        "started_at": row["started_at"],
        # Not written (not in SETTLE_COLUMNS); read by record_finished.
        "webhook": row["webhook"],
        "workflow_id": row["workflow_id"],  # read by workflows.on_finished
        "result_ref": None,
        "result_expires_at": None,
    }


def _ended(row: JobValues, change: JobValues, now: datetime, *, reclaimed: bool = False) -> Ended:
    """The attempt ``row`` (as locked, before ``change``) ended, as observers see it."""
    return Ended(row["id"], row["queue"], row["task"], change["status"], row["attempt"],
                 row["lease_worker"], row["run_at"], row["started_at"], now, reclaimed,
                 row["lease_token"], bool(row.get("limit_key")))  # fmt: skip


def _finished(change: JobValues, now: datetime, effects: Effects) -> JobValues:
    change["finished_at"] = now
    effects.finished.append(change["id"])
    return change


def _succeeded(row: JobValues, report: Settle, now: datetime, effects: Effects) -> JobValues:
    change = _unleased(row, JobStatus.succeeded)
    change.update(cast(JobValues, _success(report, now)))
    if row["result_ttl"] is not None:  # kept result_ttl seconds
        change["result_expires_at"] = now + timedelta(seconds=row["result_ttl"])
    return _finished(change, now, effects)


# What a success writes that does not depend on the row (``_unleased`` copies the rest,
# which the report leaves as it was): the direct settle writes these, and the result's
# expiry from the row's ``result_ttl`` as ``_succeeded`` computes it.
SUCCESS_COLUMNS = ("status", "result", "error", "finished_at", "lease_token",
                   "lease_expires_at", "result_ref")  # fmt: skip


def _success(report: Settle, now: datetime) -> dict[str, Any]:
    """A large result lives in the result store (``result_ref``, ``result`` None)."""
    return {
        "status": JobStatus.succeeded,
        "result": report.result,
        "error": None,
        "finished_at": now,
        "lease_token": None,
        "lease_expires_at": None,
        "result_ref": report.result_ref,
        "result_expires_at": None,
    }


def settles_directly(report: Settle) -> bool:
    """Whether ``settle_succeeded_direct`` may take this report: a success without logs,
    from an id that could be a job's. (Its job must also name no webhook, workflow or
    limit, which the statement itself checks.)"""
    return report.outcome == Outcome.succeeded and report.logs is None and is_job_id(report.id)


async def settle_succeeded_direct(
    direct: DirectPg,
    reports: Sequence[Settle],
    now: datetime,
    effects: Effects,
    *,
    key_id: str,
    waited: Callable[[str], bool],
    notices: Sequence[tuple[str, str]] = (),
    whole: bool = False,
    with_limits: bool = False,
    first: Sequence[Step] = (),
) -> dict[str, JobValues]:
    """Settle successes (``settles_directly``, distinct ids) in one statement from the
    event loop on PostgreSQL, with ``first`` before it and ``notices`` after it in its
    transaction (a Redis worker's leases and reports read together commit once, and a
    refusal leaves all of it undone): the jobs it settled, as
    they now are (``whole``: every column; else only ``ENDED_COLUMNS``, unless a job is
    waited on here). What it leaves (a stale or foreign token, a job with a webhook or a
    workflow: its settle writes more than its row) is for ``settle``, which answers it as
    it always has. A job that holds limit slots (it names limits, or its queue has its
    own) is left too, unless ``with_limits``: then its caller frees those slots after
    the commit (``flow.freed_after_commit``), as ``settle`` frees them before."""
    read = _success_recordset()
    whole = whole or any(waited(report.id) for report in reports)
    compiled = direct.compiled(
        ("settle succeeded", whole, with_limits),
        lambda: _settle_succeeded_statement(read, whole, with_limits),
    )
    changes = [{"id": r.id, "match_token": r.token, **_success(r, now)} for r in reports]
    rows = await direct.fetch(
        compiled,
        {"rows": read.rows_json(changes), "key_id": key_id, "running": JobStatus.running},
        notices,
        first,
    )
    return _settled_effects(rows, reports, now, effects, whole=whole, waited=waited)


async def settle_succeeded_sqlite(
    direct: DirectSqlite,
    reports: Sequence[Settle],
    now: datetime,
    effects: Effects,
    *,
    key_id: str,
    waited: Callable[[str], bool],
    whole: bool = False,
) -> dict[str, JobValues]:
    """``settle_succeeded_direct`` on SQLite's direct path (service/sqlite_direct.py), for
    a short batch: each success one ``UPDATE … RETURNING`` with the same fencing, all in
    one transaction. A result's expiry is a second statement, computed here from the job's
    ``result_ttl`` as ``settle`` computes it: SQLite's date functions keep milliseconds,
    the stored timestamps microseconds."""
    whole = whole or any(waited(report.id) for report in reports)
    settle_one = direct.compiled(("settle succeeded", whole), lambda: _settle_one_statement(whole))
    expire = direct.compiled("result expires", _result_expires_statement)

    def work(run: Run) -> list[Row]:
        rows: list[Row] = []
        for report in reports:
            values = {f"new_{name}": value for name, value in _success(report, now).items()}
            rows += run(settle_one, {"match_id": report.id, "match_token": report.token,
                                     "key_id": key_id, **values})  # fmt: skip
        for row in rows:
            if row["result_ttl"]:
                row["result_expires_at"] = now + timedelta(seconds=row["result_ttl"])
                run(expire, {"match_id": row["id"], "expires": row["result_expires_at"]})
        return rows

    rows = await direct.transact(work)
    return _settled_effects(rows, reports, now, effects, whole=whole, waited=waited)


def _settled_effects(
    rows: Sequence[Row],
    reports: Sequence[Settle],
    now: datetime,
    effects: Effects,
    *,
    whole: bool,
    waited: Callable[[str], bool],
) -> dict[str, JobValues]:
    """What a direct settle's rows (the jobs it settled) leave to do, in ``effects``."""
    tokens = {report.id: report.token for report in reports}
    settled: dict[str, JobValues] = {}
    for row in cast(list[JobValues], rows):
        job_id = row["id"]
        settled[job_id] = row
        # The attempt as it was: the update left all but the lease's columns alone.
        effects.ended.append(_ended(row | {"lease_token": tokens[job_id]}, row, now))
        effects.finished.append(job_id)
        # Only a whole row stands for the job: a waiter that came while the statement
        # ran (after ``whole`` was decided) is woken without it, and reads the job.
        if whole and waited(job_id):
            effects.settled[job_id] = row
        if row.get("traceparent"):
            effects.trace(row)
    return settled


def _settle_one_statement(whole: bool) -> sa.Update:
    """``_settle_succeeded_statement``'s fencing and writes for one report, in Core (its
    ``RETURNING`` also the job's ``result_ttl``, for the expiry)."""
    columns = list(JOBS_TABLE.columns) if whole else [jobs_c[name] for name in ENDED_COLUMNS]
    if not whole:
        columns.append(jobs_c.result_ttl)
    writes = {
        name: sa.bindparam(f"new_{name}", type_=jobs_c[name].type) for name in SUCCESS_COLUMNS
    }
    return (
        sa.update(JOBS_TABLE)
        .where(
            jobs_c.id == sa.bindparam("match_id"),
            jobs_c.lease_token == sa.bindparam("match_token"),
            jobs_c.status == JobStatus.running,
            sa.or_(jobs_c.lease_key.is_(None), jobs_c.lease_key == sa.bindparam("key_id")),
            jobs_c.webhook.is_(None),
            jobs_c.workflow_id.is_(None),
            jobs_c.limit_key.is_(None),
        )
        .values(**writes, result_expires_at=None)
        .returning(*columns)
    )


def _result_expires_statement() -> sa.Update:
    return (
        sa.update(JOBS_TABLE)
        .where(jobs_c.id == sa.bindparam("match_id"))
        .values(result_expires_at=sa.bindparam("expires", type_=UTCDateTime()))
    )


@functools.cache
def _success_recordset() -> Recordset:
    return Recordset(SUCCESS_COLUMNS, key="id", match=("match_token",))


# What a settle's effects need of a job (``_ended``, tracing): a batch's answer is only
# its outcomes, and returning whole jobs (arguments, results) cost a fifth of its time.
ENDED_COLUMNS = ("id", "queue", "task", "status", "attempt", "lease_worker", "run_at",
                 "started_at", "limit_key", "traceparent")  # fmt: skip


def _settle_succeeded_statement(
    read: Recordset, whole: bool, with_limits: bool
) -> sa.TextualSelect:
    """``settle``'s fencing (the token, ``running``, the caller's key) and its writes for a
    success, over a recordset of reports; only jobs whose settle writes no more (and,
    without ``with_limits``, that name no limits: flow control is not configured)."""
    sets = [f"{name} = {value}" for name, value in zip(SUCCESS_COLUMNS, read.values, strict=True)]
    # NULL without a TTL; as ``_succeeded``'s ``now + timedelta(seconds=result_ttl)``.
    sets.append("result_expires_at = v.finished_at + jobs.result_ttl * interval '1 second'")
    columns = list(JOBS_TABLE.columns) if whole else [jobs_c[name] for name in ENDED_COLUMNS]
    returned = ", ".join(f"jobs.{column.name}" for column in columns)
    # Column names come from the table definition, never from input.
    statement = sa.text(
        f"UPDATE jobs SET {', '.join(sets)} FROM {read.source} "  # noqa: S608
        "WHERE jobs.id = v.id AND jobs.lease_token = v.match_token"
        " AND jobs.status = :running"
        " AND (jobs.lease_key IS NULL OR jobs.lease_key = :key_id)"
        " AND jobs.webhook IS NULL AND jobs.workflow_id IS NULL"
        f"{'' if with_limits else ' AND jobs.limit_key IS NULL'}"
        f" RETURNING {returned}"
    )
    return statement.columns(*columns)


def _released(row: JobValues, effects: Effects, *, counts_as_attempt: bool) -> JobValues:
    """Back to ``queued``. A worker's release never ran the job, so it is not an
    attempt; a reclaimed lease may have run (and killed its worker), so it is."""
    change = _unleased(row, JobStatus.queued)
    if not counts_as_attempt:
        change["attempt"] = max(row["attempt"] - 1, 0)
    effects.dispatch.append(Dispatch(row["id"], row["queue"], row["priority"]))
    return change


def _failed(
    row: JobValues,
    error: dict[str, Any] | None,
    now: datetime,
    effects: Effects,
    *,
    retry: bool,
    retry_in: float | None = None,
) -> JobValues:
    """``cancelled`` if a cancel was asked for, ``retrying`` while attempts are left
    (after the backoff, or the worker's ``retry_in``), else ``failed``."""
    if row["cancel_requested"]:
        return _finished(_unleased(row, JobStatus.cancelled, error), now, effects)
    if retry and row["attempt"] <= row["max_retries"]:
        delay = retry_in if retry_in is not None else backoff(row)
        change = _unleased(row, JobStatus.retrying, error)
        change["run_at"] = now + timedelta(seconds=delay)
        effects.due_at(change["run_at"])
        return change
    return _finished(_unleased(row, JobStatus.failed, error), now, effects)


def backoff(row: JobValues) -> float:
    """Exponential in the attempt number, capped, with optional jitter in [50 %, 100 %]."""
    delay: float = min(row["backoff_max"], row["backoff_base"] * 2 ** max(row["attempt"] - 1, 0))
    return delay * random.uniform(0.5, 1.0) if row["backoff_jitter"] else delay


# --- maintenance: run by every replica; SKIP LOCKED keeps them out of each other's way ---


@dataclass(frozen=True, slots=True)
class Scope:
    """Which jobs a sweep may touch: all but ``skip`` (jobs set aside as unprocessable),
    or ``only`` these (one job at a time, to find the one a batch failed on)."""

    only: tuple[str, ...] | None = None
    skip: frozenset[str] = frozenset()

    def narrow(self, query: sa.Select[Any]) -> sa.Select[Any]:
        if self.only is not None:
            query = query.where(jobs_c.id.in_(self.only))
        if self.skip:
            query = query.where(jobs_c.id.not_in(self.skip))
        return query


EVERY_JOB = Scope()


def _is_due(now: datetime) -> sa.ColumnElement[bool]:
    return sa.and_(
        jobs_c.status.in_((JobStatus.scheduled, JobStatus.retrying)), jobs_c.run_at <= now
    )


def _lease_is_over(now: datetime) -> sa.ColumnElement[bool]:
    return sa.and_(jobs_c.status == JobStatus.running, jobs_c.lease_expires_at < now)


def _is_past_expiry(now: datetime) -> sa.ColumnElement[bool]:
    return sa.and_(jobs_c.status.in_(PENDING), jobs_c.expires_at <= now)


def sweep_candidates(session: Session, now: datetime, scope: Scope, limit: int) -> list[str]:
    """The jobs a sweep would touch now (no locks): what to retry one by one."""
    query = scope.narrow(
        sa.select(jobs_c.id)
        .where(sa.or_(_is_due(now), _lease_is_over(now), _is_past_expiry(now)))
        .order_by(jobs_c.id)
        .limit(limit)
    )
    return list(session.scalars(query))


def promote_due(session: Session, now: datetime, effects: Effects, scope: Scope = EVERY_JOB) -> int:
    """Scheduled and retrying jobs whose time has come become queued."""
    rows = _rows(
        session,
        scope.narrow(_select(("id", "queue", "priority")).where(_is_due(now)))
        .order_by(jobs_c.run_at)
        .limit(BATCH_LIMIT)
        .with_for_update(skip_locked=True),
    )
    if rows:
        session.execute(
            sa.update(JOBS_TABLE)
            .where(jobs_c.id.in_([r["id"] for r in rows]))
            .values(status=JobStatus.queued)
        )
        effects.dispatch.extend(Dispatch(r["id"], r["queue"], r["priority"]) for r in rows)
    return len(rows)


def reclaim_expired_leases(
    session: Session, now: datetime, effects: Effects, scope: Scope = EVERY_JOB
) -> int:
    """A lease whose deadline passed means a dead or stuck worker: run the job again, or
    fail it once it has used every attempt (a job that kills its worker must not loop)."""
    rows = _rows(
        session,
        scope.narrow(_select(STATE_COLUMNS).where(_lease_is_over(now)))
        .limit(BATCH_LIMIT)
        .with_for_update(skip_locked=True),
    )
    changes = [_reclaimed(row, now, effects) for row in rows]
    effects.ended += [_ended(r, c, now, reclaimed=True) for r, c in zip(rows, changes, strict=True)]
    _update_each(session, SETTLE_COLUMNS, changes)
    from service import flow  # flow imports this module

    flow.freed(session, rows, effects)  # their limit slots are free again
    record_finished(session, changes, now, effects)  # webhook outbox
    if any(change["workflow_id"] for change in changes):  # only jobs of a workflow
        workflows.on_finished(session, changes, now, effects)
    return len(rows)


def _reclaimed(row: JobValues, now: datetime, effects: Effects) -> JobValues:
    """The lease ran out (its worker died or stopped heartbeating): queued again, the
    attempt counted; failed once no attempt is left (cancelled if one was asked for)."""
    if row["cancel_requested"] or row["attempt"] > row["max_retries"]:
        error = {
            "type": "LeaseExpired",
            "message": f"worker {row['lease_worker']} stopped heartbeating and the job has "
            "no attempts left",
        }
        return _failed(row, error, now, effects, retry=False)
    return _released(row, effects, counts_as_attempt=True)


EXPIRY_COLUMNS = ("id", "webhook", "queue", "task", "attempt", "workflow_id")


def expire_pending(
    session: Session, now: datetime, effects: Effects, scope: Scope = EVERY_JOB
) -> int:
    rows = _rows(
        session,
        # webhook: the outbox; queue, task, attempt: metrics
        scope.narrow(_select(EXPIRY_COLUMNS).where(_is_past_expiry(now)))
        .limit(BATCH_LIMIT)
        .with_for_update(skip_locked=True),
    )
    ids = [row["id"] for row in rows]
    if ids:
        session.execute(
            sa.update(JOBS_TABLE)
            .where(jobs_c.id.in_(ids), jobs_c.status.in_(PENDING))
            .values(status=JobStatus.expired, finished_at=now)
        )
        effects.finished.extend(ids)
        effects.ended += [Ended(r["id"], r["queue"], r["task"], JobStatus.expired, r["attempt"],
                                ended_at=now) for r in rows]  # fmt: skip
        # Webhook outbox rows commit with the expiry.
        record_finished(session, [row | {"status": JobStatus.expired} for row in rows], now,
                        effects)  # fmt: skip
        if any(row["workflow_id"] for row in rows):  # only jobs of a workflow
            workflows.on_finished(session, [r | {"status": JobStatus.expired} for r in rows],
                                  now, effects)  # fmt: skip
    return len(ids)


def set_aside(session: Session, job_id: str, now: datetime, why: str, effects: Effects) -> bool:
    """Fail a job no sweep can process (its stored values are refused by the database
    when the sweep writes them), so that it stops coming due. Writes only fixed values
    and no webhook delivery (the likely culprit). False if it was not pending or running."""
    error = {"type": "Unprocessable", "message": f"maintenance could not process this job: {why}"}
    done = session.execute(
        sa.update(JOBS_TABLE)
        .where(jobs_c.id == job_id, jobs_c.status.in_((*PENDING, JobStatus.running)))
        .values(
            status=JobStatus.failed,
            error=error,
            finished_at=now,
            lease_token=None,
            lease_expires_at=None,
        )
    )
    if getattr(done, "rowcount", 0) != 1:
        return False
    effects.finished.append(job_id)
    workflows.on_set_aside(session, job_id, now, effects)  # one query; rare path
    return True


def next_deadline(session: Session, skip: frozenset[str] = frozenset()) -> datetime | None:
    """The earliest moment maintenance has work: a due job, an expiring lease or job
    (``skip``: jobs set aside, which would otherwise always be due)."""
    scope = Scope(skip=skip)
    candidates = [
        session.scalar(_earliest(jobs_c.run_at, (JobStatus.scheduled, JobStatus.retrying), scope)),
        session.scalar(_earliest(jobs_c.lease_expires_at, (JobStatus.running,), scope)),
        session.scalar(_earliest(jobs_c.expires_at, PENDING, scope)),
    ]
    present = [c for c in candidates if c is not None]
    return min(present) if present else None


def _earliest(
    column: sa.Column[Any], statuses: Sequence[JobStatus], scope: Scope
) -> sa.Select[Any]:
    """The least ``column`` of the jobs in ``statuses``: a minimum per status, each the
    first entry of the index on ``(status, column)``. One ``status IN (…)`` read every
    job in those statuses instead, at each maintenance pass: 8 ms every 5 s behind a
    backlog of 30,000 queued jobs, growing with it (docs/benchmarks.md, issue 14)."""
    each = [
        scope.narrow(sa.select(sa.func.min(column).label("at")).where(jobs_c.status == status))
        for status in statuses
    ]
    if len(each) == 1:
        return each[0]
    every = sa.union_all(*each).subquery()
    return sa.select(sa.func.min(every.c.at))


def queued_since(
    session: Session, before: datetime | None, limit: int, *, after_id: str = "",
    queue: str | None = None,
) -> list[Dispatch]:  # fmt: skip
    """Queued jobs (ready since ``before``, if given; of ``queue``, if given), in id order
    after ``after_id``: what a dispatch index must hold."""
    query = (
        _select(("id", "queue", "priority"))
        .where(jobs_c.status == JobStatus.queued, jobs_c.id > after_id)
        .order_by(jobs_c.id)
        .limit(limit)
    )
    if before is not None:
        query = query.where(jobs_c.run_at <= before)
    if queue is not None:
        query = query.where(jobs_c.queue == queue)
    return [Dispatch(r["id"], r["queue"], r["priority"]) for r in _rows(session, query)]
