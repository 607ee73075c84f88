"""The SQL schema: the system of record. Alembic migrations are checked against this
metadata (``alembic check`` in the tests), so the two never drift."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, TypedDict, cast

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """Stored as naive UTC with microseconds on every backend, returned timezone-aware."""

    impl = sa.DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: sa.Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(sa.DateTime())

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are ambiguous; pass an aware UTC datetime")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


def _only(predicate: str) -> dict[str, Any]:
    """A partial-index predicate for the dialects that have them."""
    return {"postgresql_where": sa.text(predicate), "sqlite_where": sa.text(predicate)}


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


class JobRow(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True)
    task: Mapped[str] = mapped_column(sa.String(128))
    queue: Mapped[str] = mapped_column(sa.String(128))
    priority: Mapped[int] = mapped_column(sa.SmallInteger)
    status: Mapped[str] = mapped_column(sa.String(16))
    args: Mapped[Any] = mapped_column(sa.JSON)
    kwargs: Mapped[Any] = mapped_column(sa.JSON)
    attempt: Mapped[int] = mapped_column(sa.Integer)
    max_retries: Mapped[int] = mapped_column(sa.Integer)
    backoff_base: Mapped[float] = mapped_column(sa.Float)
    backoff_max: Mapped[float] = mapped_column(sa.Float)
    backoff_jitter: Mapped[bool] = mapped_column(sa.Boolean)
    timeout: Mapped[float | None] = mapped_column(sa.Float)
    run_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    lease_token: Mapped[str | None] = mapped_column(sa.String(64))
    lease_worker: Mapped[str | None] = mapped_column(sa.String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The API key (its ``key_id``; "" with auth off or over the Redis protocol) the lease
    # was granted to: a token is only accepted from that key. NULL: granted before leases
    # were bound to keys (migration 0005), accepted from any key until it is settled.
    lease_key: Mapped[str | None] = mapped_column(sa.String(64))
    result: Mapped[Any | None] = mapped_column(sa.JSON)
    error: Mapped[Any | None] = mapped_column(sa.JSON)
    progress: Mapped[Any | None] = mapped_column(sa.JSON)
    cancel_requested: Mapped[bool] = mapped_column(sa.Boolean)
    # Scoped to the API key that submitted it (service.jobs.scoped_idempotency_key);
    # cleared once older than CELERIAC_IDEMPOTENCY_TTL_SECONDS and reused.
    idempotency_key: Mapped[str | None] = mapped_column(sa.String(255), unique=True)
    request_hash: Mapped[str | None] = mapped_column(sa.String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Results and webhooks (docs/results.md, docs/webhooks.md). ``webhook`` is SQL NULL,
    # not JSON null, when absent (none_as_null), so "has a webhook" is a plain IS NOT NULL.
    webhook: Mapped[Any | None] = mapped_column(sa.JSON(none_as_null=True))
    result_ttl: Mapped[float | None] = mapped_column(sa.Float)  # NULL: kept forever
    result_ref: Mapped[str | None] = mapped_column(sa.String(255))  # key in the result store
    # Set when the job succeeds; cleared (and result_expired set) once the cleanup ran.
    result_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    result_expired: Mapped[bool] = mapped_column(sa.Boolean, server_default=sa.false())
    # Flow control (service/flow.py, docs/flow-control.md): the limit keys the job counts
    # against, its unique key (and until when it holds), its debounce key.
    limits: Mapped[Any | None] = mapped_column(sa.JSON(none_as_null=True))
    # Its first limit key: the group the claim skips while that key is full.
    limit_key: Mapped[str | None] = mapped_column(sa.String(128))
    unique_key: Mapped[str | None] = mapped_column(sa.String(255))
    unique_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    debounce_key: Mapped[str | None] = mapped_column(sa.String(255))
    # W3C trace context of the submit (service/tracing.py), handed to the worker with
    # the lease so its span continues the submitter's trace. NULL: none was given.
    traceparent: Mapped[str | None] = mapped_column(sa.String(55))
    # Workflows (service/workflows.py, docs/workflows.md): the workflow the job belongs
    # to (NULL for a plain job: the settle path skips workflows on that alone), and what
    # its lease adds once its parents finished: {"parents": {ref: result},
    # "parent_status": {ref: status}}.
    workflow_id: Mapped[str | None] = mapped_column(sa.String(36))
    parents: Mapped[Any | None] = mapped_column(sa.JSON(none_as_null=True))

    __table_args__ = (
        # Where the database supports it (PostgreSQL, SQLite), the indexes that serve one
        # state are partial: a job changing state then skips them, which keeps the hot
        # status updates cheap. MariaDB gets the same indexes whole.
        # Dispatch: the next ready jobs of one queue, highest priority first, then oldest.
        sa.Index(None, "queue", "status", "priority", "id", **_only("status = 'queued'")),
        # Due scheduled/retrying jobs.
        sa.Index(None, "status", "run_at", **_only("status IN ('scheduled', 'retrying')")),
        # Pending jobs past their expiry.
        sa.Index(None, "status", "expires_at", **_only("expires_at IS NOT NULL")),
        # Leases whose deadline passed.
        sa.Index(None, "status", "lease_expires_at", **_only("status = 'running'")),
        # Listing, newest first, by each filter.
        sa.Index(None, "status", "id"),
        sa.Index(None, "task", "id"),
        sa.Index(None, "queue", "id"),
        # Results due for deletion (only rows still holding one have a value).
        sa.Index(None, "result_expires_at"),
        # Finished in a time window: the dashboard's throughput chart (service/ui).
        sa.Index(None, "finished_at", **_only("finished_at IS NOT NULL")),
    )


JOBS_TABLE = cast(sa.Table, JobRow.__table__)
JOB_COLUMNS = tuple(column.key for column in JOBS_TABLE.columns)


class JobValues(TypedDict, total=False):
    """A job's columns as plain values (the hot paths use these, not ORM objects): any
    subset, typed per column, so mypy checks every read and write."""

    id: str
    task: str
    queue: str
    priority: int
    status: str  # a JobStatus value
    args: Any
    kwargs: Any
    attempt: int
    max_retries: int
    backoff_base: float
    backoff_max: float
    backoff_jitter: bool
    timeout: float | None
    run_at: datetime
    expires_at: datetime | None
    lease_token: str | None
    lease_worker: str | None
    lease_expires_at: datetime | None
    lease_key: str | None
    result: Any | None
    error: Any | None
    progress: Any | None
    cancel_requested: bool
    idempotency_key: str | None
    request_hash: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    webhook: Any | None
    result_ttl: float | None
    result_ref: str | None
    result_expires_at: datetime | None
    result_expired: bool
    limits: list[str] | None
    limit_key: str | None
    unique_key: str | None
    unique_until: datetime | None
    debounce_key: str | None
    workflow_id: str | None
    traceparent: str | None
    parents: Any | None


def values_of(row: JobRow) -> JobValues:
    return cast(JobValues, {key: getattr(row, key) for key in JOB_COLUMNS})


def utcnow() -> datetime:
    return datetime.now(UTC)


class ScheduleRow(Base):
    """A periodic job: a cron expression or a fixed interval, and the job it submits."""

    __tablename__ = "schedules"

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(128), unique=True)
    cron: Mapped[str | None] = mapped_column(sa.String(255))
    every_seconds: Mapped[int | None] = mapped_column(sa.Integer)
    timezone: Mapped[str] = mapped_column(sa.String(64))
    job: Mapped[Any] = mapped_column(sa.JSON)
    enabled: Mapped[bool] = mapped_column(sa.Boolean)
    catch_up: Mapped[str] = mapped_column(sa.String(8))
    start_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    end_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The earliest tick not yet fired; NULL while disabled or after end_at. Every replica
    # finds due schedules through this one index.
    next_fire_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), index=True)
    last_fired_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_job_id: Mapped[str | None] = mapped_column(sa.String(36))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class ScheduleFireRow(Base):
    """One fired tick. The primary key (schedule, tick) is the exactly-once guarantee: the
    row is inserted in the same transaction as the job, so of N replicas racing for one
    tick exactly one commits, and the others' jobs roll back with their duplicate key."""

    __tablename__ = "schedule_fires"

    schedule_id: Mapped[str] = mapped_column(
        sa.String(36), sa.ForeignKey("schedules.id", ondelete="CASCADE"), primary_key=True
    )
    fire_time: Mapped[datetime] = mapped_column(UTCDateTime(), primary_key=True)
    job_id: Mapped[str] = mapped_column(sa.String(36))
    manual: Mapped[bool] = mapped_column(sa.Boolean)
    fired_at: Mapped[datetime] = mapped_column(UTCDateTime())


SCHEDULE_FIRES_TABLE = cast(sa.Table, ScheduleFireRow.__table__)


class WebhookDeliveryRow(Base):
    """The webhook outbox: one row per event to deliver, written in the transaction that
    finished the job, so a crash can delay a callback but never lose it."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True)  # the webhook-id
    job_id: Mapped[str] = mapped_column(
        sa.String(36), sa.ForeignKey("jobs.id", ondelete="CASCADE"), index=True
    )
    event: Mapped[str] = mapped_column(sa.String(32))
    url: Mapped[str] = mapped_column(sa.String(2000))
    status: Mapped[str] = mapped_column(sa.String(16))  # pending delivered failed gone
    attempts: Mapped[int] = mapped_column(sa.Integer)
    # While pending: when the next attempt is due, or until when an attempt in flight
    # holds its claim (a replica that dies mid-attempt lets it fall due again).
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_status_code: Mapped[int | None] = mapped_column(sa.Integer)
    last_error: Mapped[str | None] = mapped_column(sa.Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (
        # Claiming due deliveries, and the delivery loop's next wake-up.
        sa.Index(None, "status", "next_attempt_at"),
    )


class WebhookAttemptRow(Base):
    """One HTTP attempt of a delivery: what the receiver answered, and how fast."""

    __tablename__ = "webhook_attempts"

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True)
    delivery_id: Mapped[str] = mapped_column(
        sa.String(36), sa.ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), index=True
    )
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    status_code: Mapped[int | None] = mapped_column(sa.Integer)
    latency_ms: Mapped[int] = mapped_column(sa.Integer)
    error: Mapped[str | None] = mapped_column(sa.Text)


DELIVERIES_TABLE = cast(sa.Table, WebhookDeliveryRow.__table__)
ATTEMPTS_TABLE = cast(sa.Table, WebhookAttemptRow.__table__)


class WorkerRow(Base):
    """A registered worker process (docs/api.md, Workers). ``expires_at`` is when it counts
    as lost if no heartbeat arrives first: two heartbeat intervals after the last one."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200))  # the name it leases jobs under
    hostname: Mapped[str] = mapped_column(sa.String(255))
    pid: Mapped[int] = mapped_column(sa.Integer)
    queues: Mapped[Any] = mapped_column(sa.JSON)
    concurrency: Mapped[int] = mapped_column(sa.Integer)
    pool: Mapped[str] = mapped_column(sa.String(32))
    version: Mapped[str] = mapped_column(sa.String(64))
    status: Mapped[str] = mapped_column(sa.String(16))  # online | lost
    command: Mapped[str | None] = mapped_column(sa.String(16))  # quiet | shutdown
    running: Mapped[Any] = mapped_column(sa.JSON)  # job ids, as of the last heartbeat
    registered_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    lost_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The API key that registered it ("" with auth off): only that key may heartbeat or
    # deregister it, and losing it ends only the leases that key was granted.
    key_id: Mapped[str] = mapped_column(sa.String(64), server_default="")

    __table_args__ = (
        # The maintenance loop's two questions: who is overdue, and when is the next one due.
        sa.Index(None, "status", "expires_at"),
    )


WORKERS_TABLE = cast(sa.Table, WorkerRow.__table__)


class LimitRow(Base):
    """A named limit, or a pattern (``customer-*``) whose values every matching name takes
    unless that name has a row of its own (docs/flow-control.md)."""

    __tablename__ = "limits"

    name: Mapped[str] = mapped_column(sa.String(200), primary_key=True)
    max_running: Mapped[int | None] = mapped_column(sa.Integer)
    rate_limit: Mapped[int | None] = mapped_column(sa.Integer)
    rate_period: Mapped[float | None] = mapped_column(sa.Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class QueueSettingsRow(Base):
    """A queue's flow control: paused, and its own limit on running jobs and grant rate."""

    __tablename__ = "queue_settings"

    name: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    paused: Mapped[bool] = mapped_column(sa.Boolean)
    max_running: Mapped[int | None] = mapped_column(sa.Integer)
    rate_limit: Mapped[int | None] = mapped_column(sa.Integer)
    rate_period: Mapped[float | None] = mapped_column(sa.Float)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class LimitGrantRow(Base):
    """One lease counted against one limit key: a slot while the job runs under that
    token, and a grant in the rate window until ``granted_at`` falls out of it."""

    __tablename__ = "limit_grants"

    limit_name: Mapped[str] = mapped_column(sa.String(200), primary_key=True)
    job_id: Mapped[str] = mapped_column(sa.String(36), primary_key=True)
    lease_token: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    granted_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (sa.Index(None, "limit_name", "granted_at"),)


# Written through Core: an ORM bulk insert of the same rows (flow control writes a few per
# claim) took about 15% more CPU (issue 14, fifteenth pass).
LIMIT_GRANTS_TABLE = cast(sa.Table, LimitGrantRow.__table__)


class JobKeyRow(Base):
    """The claim on a unique or debounce key: the primary key serialises concurrent
    submits of one key across replicas."""

    __tablename__ = "job_keys"

    kind: Mapped[str] = mapped_column(sa.String(16), primary_key=True)  # unique | debounce
    key: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    job_id: Mapped[str] = mapped_column(sa.String(36))


class JobLogRow(Base):
    """What a task logged during one attempt (issue 16, docs/operations.md "Per-attempt
    job logs"): sent by the worker with its report, bounded by the report's limit.
    Deleted with its job (service/retention.py); no foreign key, as for the other rows
    that hang off a job, so a delete never waits on a cascade."""

    __tablename__ = "job_logs"

    # A release does not count as an attempt, so (job_id, attempt) may repeat.
    id: Mapped[int] = mapped_column(
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    job_id: Mapped[str] = mapped_column(sa.String(36), index=True)
    attempt: Mapped[int] = mapped_column(sa.Integer)
    worker: Mapped[str | None] = mapped_column(sa.String(200))
    outcome: Mapped[str] = mapped_column(sa.String(16))
    # 64 KiB of UTF-8 plus a truncation marker: more than MariaDB's TEXT holds.
    logs: Mapped[str] = mapped_column(
        sa.Text().with_variant(mysql.MEDIUMTEXT(), "mariadb", "mysql")
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class WorkflowRow(Base):
    """A workflow (docs/workflows.md): jobs with dependencies between them, submitted
    together. ``unfinished`` and ``failures`` count its jobs as they finish for good (each
    job once), so the settle that finishes the last one finishes the workflow without a
    scan of its jobs."""

    __tablename__ = "workflows"

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(16))  # running succeeded failed cancelled
    on_failure: Mapped[str] = mapped_column(sa.String(24))  # cancel_dependents | continue
    jobs_total: Mapped[int] = mapped_column(sa.Integer)
    unfinished: Mapped[int] = mapped_column(sa.Integer)
    failures: Mapped[int] = mapped_column(sa.Integer)  # jobs that finished but not succeeded
    cancel_requested: Mapped[bool] = mapped_column(sa.Boolean)
    webhook: Mapped[Any | None] = mapped_column(sa.JSON(none_as_null=True))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class WorkflowJobRow(Base):
    """A job's place in its workflow. ``pending_parents`` counts the parents that have not
    finished: each parent's settle decrements it (the row lock orders concurrent settles),
    and the one that takes it to 0 queues the job, exactly once."""

    __tablename__ = "workflow_jobs"

    job_id: Mapped[str] = mapped_column(sa.String(36), primary_key=True)
    workflow_id: Mapped[str] = mapped_column(sa.String(36))
    ref: Mapped[str] = mapped_column(sa.String(128))
    position: Mapped[int] = mapped_column(sa.Integer)  # in the submitted list
    pending_parents: Mapped[int] = mapped_column(sa.Integer)
    # "one" | "list": the parents' results go first in its args (the Python canvas).
    parents_arg: Mapped[str | None] = mapped_column(sa.String(8))
    # Its first final status has been counted (a job retried by hand counts once).
    settled: Mapped[bool] = mapped_column(sa.Boolean)

    __table_args__ = (sa.UniqueConstraint("workflow_id", "ref"),)


class WorkflowEdgeRow(Base):
    """``child_id`` runs after ``parent_id``; ``position``: the parent's place in the
    child's ``after`` (the order of a chord callback's results)."""

    __tablename__ = "workflow_edges"

    parent_id: Mapped[str] = mapped_column(sa.String(36), primary_key=True)
    child_id: Mapped[str] = mapped_column(sa.String(36), primary_key=True)
    position: Mapped[int] = mapped_column(sa.Integer)

    __table_args__ = (sa.Index(None, "child_id"),)


WORKFLOWS_TABLE = cast(sa.Table, WorkflowRow.__table__)
WORKFLOW_JOBS_TABLE = cast(sa.Table, WorkflowJobRow.__table__)
WORKFLOW_EDGES_TABLE = cast(sa.Table, WorkflowEdgeRow.__table__)
