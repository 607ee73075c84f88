"""Request and response bodies of HTTP API v1. These models *are* the public contract:
``openapi/openapi.json`` is generated from them and a test fails on any drift."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
)

NAME_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
WorkerName = Annotated[str, StringConstraints(min_length=1, max_length=200)]
Token = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class Strict(BaseModel):
    """Unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


class JobStatus(StrEnum):
    scheduled = "scheduled"
    queued = "queued"
    running = "running"
    retrying = "retrying"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    expired = "expired"


FINISHED = frozenset(
    {JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled, JobStatus.expired}
)


class RetryBackoff(Strict):
    base: float = Field(1.0, ge=0, le=86400, description="seconds before the first retry")
    max: float = Field(300.0, ge=0, le=7 * 86400, description="cap on any one backoff")
    jitter: bool = Field(True, description="randomise each backoff in [0.5, 1] x its value")


WebhookEvent = Literal["succeeded", "failed", "cancelled", "expired"]
WEBHOOK_EVENTS: tuple[WebhookEvent, ...] = ("succeeded", "failed", "cancelled", "expired")


class WebhookSpec(Strict):
    """Where to POST a signed callback when the job reaches one of ``events``
    (docs/webhooks.md)."""

    url: Annotated[str, StringConstraints(min_length=8, max_length=2000)] = Field(
        description="http:// or https:// URL; private addresses are refused unless allowed"
    )
    events: list[WebhookEvent] = Field(
        default_factory=lambda: list(WEBHOOK_EVENTS),
        min_length=1,
        description="final statuses that trigger a callback (default: all of them)",
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("the webhook url must be an absolute http:// or https:// URL")
        return value


class JobSubmit(Strict):
    """One job to submit. Options (everything but task/args/kwargs) never reach the task."""

    task: Name
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    queue: Name = "default"
    priority: int = Field(0, ge=0, le=9, description="0-9, higher runs first within a queue")
    delay: float | None = Field(None, ge=0, le=366 * 86400, description="seconds from now")
    run_at: AwareDatetime | None = Field(None, description="RFC 3339; exclusive with delay")
    expires_at: AwareDatetime | None = Field(None, description="never start after this")
    max_retries: int | None = Field(None, ge=0, le=1000)
    retry_backoff: RetryBackoff | None = None
    timeout: float | None = Field(
        None, gt=0, le=86400, description="seconds a lease lasts before it must be extended"
    )
    webhook: WebhookSpec | None = Field(
        None, description="signed callback on completion (default: the queue's, if any)"
    )
    result_ttl: float | None = Field(
        None,
        ge=0,
        le=366 * 86400,
        description="seconds the result is kept after success (default "
        "CELERIAC_RESULT_EXPIRES_SECONDS); 0 keeps it forever",
    )


class ErrorInfo(Strict):
    type: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    message: Annotated[str, StringConstraints(max_length=65536)] = ""
    traceback: Annotated[str, StringConstraints(max_length=262144)] | None = None


class Job(BaseModel):
    id: str
    task: str
    queue: str
    priority: int
    status: JobStatus
    args: list[Any]
    kwargs: dict[str, Any]
    attempt: int = Field(description="how many times the job has been leased")
    max_retries: int
    retry_backoff: RetryBackoff
    timeout: float | None
    run_at: datetime
    expires_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    result: Any = None
    error: ErrorInfo | None = None
    progress: Any = None
    cancel_requested: bool
    worker: str | None = None
    webhook: WebhookSpec | None = None
    result_ttl: float | None = Field(None, description="seconds; null keeps the result forever")
    result_expires_at: datetime | None = Field(None, description="when the result is deleted")
    result_expired: bool = Field(False, description="the result was deleted; the status stays")
    result_stored: bool = Field(
        False,
        description="the result is in the result store: GET /jobs/{id} and "
        "GET /jobs/{id}/result include it, other responses show null",
    )


class JobBatchSubmit(Strict):
    jobs: list[JobSubmit] = Field(min_length=1)


class JobBatchResult(BaseModel):
    jobs: list[Job]


class JobPage(BaseModel):
    jobs: list[Job]
    next_cursor: str | None


class LeaseRequest(Strict):
    worker: WorkerName
    queues: list[Name] = Field(default_factory=lambda: ["default"], min_length=1, max_length=64)
    max_jobs: int = Field(1, ge=1)
    wait: float = Field(0, ge=0, description="long-poll seconds while nothing is ready")
    lease_seconds: float | None = Field(None, gt=0)


class LeaseClaim(Strict):
    """Lease these jobs if they are still queued (a direct AMQP worker claims
    the id a RabbitMQ message carried)."""

    worker: WorkerName
    ids: list[Annotated[str, StringConstraints(min_length=1, max_length=64)]] = Field(
        min_length=1, max_length=1000
    )
    lease_seconds: float | None = Field(None, gt=0)


class Lease(BaseModel):
    token: str
    expires_at: datetime


class LeasedJob(BaseModel):
    id: str
    task: str
    args: list[Any]
    kwargs: dict[str, Any]
    queue: str
    priority: int
    attempt: int
    max_retries: int
    lease: Lease


class LeaseResponse(BaseModel):
    jobs: list[LeasedJob]


class Heartbeat(Strict):
    token: Token
    progress: Any = None
    lease_seconds: float | None = Field(None, gt=0)


class HeartbeatResponse(BaseModel):
    lease: Lease
    cancel_requested: bool


class Complete(Strict):
    token: Token
    result: Any = None


class Fail(Strict):
    token: Token
    error: ErrorInfo
    retry: bool = Field(True, description="false: fail now whatever retries are left")
    retry_in: float | None = Field(None, ge=0, le=366 * 86400, description="override backoff")


class Release(Strict):
    token: Token


class LeaseRef(Strict):
    id: str
    token: Token
    progress: Any = None


class HeartbeatBatch(Strict):
    leases: list[LeaseRef] = Field(min_length=1)
    lease_seconds: float | None = Field(None, gt=0)


class HeartbeatBatchItem(BaseModel):
    id: str
    ok: bool
    expires_at: datetime | None = None
    cancel_requested: bool = False
    detail: str | None = None


class HeartbeatBatchResponse(BaseModel):
    leases: list[HeartbeatBatchItem]


class Report(Strict):
    id: str
    token: Token
    outcome: Literal["succeeded", "failed", "released"]
    result: Any = None
    error: ErrorInfo | None = None
    retry: bool = True
    retry_in: float | None = Field(None, ge=0, le=366 * 86400)


class ReportBatch(Strict):
    reports: list[Report] = Field(min_length=1)


class ReportItem(BaseModel):
    id: str
    ok: bool
    status: JobStatus | None = None
    detail: str | None = None


class ReportBatchResponse(BaseModel):
    reports: list[ReportItem]


class QueueStats(BaseModel):
    name: str
    counts: dict[str, int]
    oldest_queued_age_seconds: float | None


class QueueList(BaseModel):
    queues: list[QueueStats]


class Health(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)


class DeliveryAttempt(BaseModel):
    at: datetime
    status_code: int | None = Field(description="null: no HTTP answer (see error)")
    latency_ms: int
    error: str | None


class Delivery(BaseModel):
    id: str = Field(description="the webhook-id header: the same on every retry")
    job_id: str
    event: str = Field(description="job.succeeded, job.failed, job.cancelled or job.expired")
    url: str
    status: Literal["pending", "delivered", "failed", "gone"]
    next_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    attempts: list[DeliveryAttempt]


class DeliveryList(BaseModel):
    deliveries: list[Delivery]


class Problem(BaseModel):
    """RFC 9457 problem details, served as application/problem+json."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[dict[str, Any]] | None = None


# --- schedules (periodic jobs) -----------------------------------------------------------

CronText = Annotated[str, StringConstraints(min_length=1, max_length=255)]
ZoneName = Annotated[str, StringConstraints(min_length=1, max_length=64)]
EVERY_MAX = 366 * 86400


class CatchUp(StrEnum):
    """What a schedule does with ticks missed by more than the misfire grace period."""

    skip = "skip"
    once = "once"
    all = "all"


class JobTemplate(Strict):
    """The job a schedule submits at each tick: JobSubmit without delay/run_at (a tick is
    the run time), and with an expiry relative to the submission instead of an instant."""

    task: Name
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    queue: Name = "default"
    priority: int = Field(0, ge=0, le=9, description="0-9, higher runs first within a queue")
    max_retries: int | None = Field(None, ge=0, le=1000)
    retry_backoff: RetryBackoff | None = None
    timeout: float | None = Field(
        None, gt=0, le=86400, description="seconds a lease lasts before it must be extended"
    )
    expires_after: float | None = Field(
        None, gt=0, le=366 * 86400, description="a job not started this many seconds after "
        "its tick fired expires (so a backlog of ticks does not pile up)",
    )  # fmt: skip


class ScheduleCreate(Strict):
    """A periodic job: exactly one of ``cron`` and ``every``."""

    name: Name
    cron: CronText | None = Field(
        None, description="5 fields (minute hour day-of-month month day-of-week), names like "
        "MON-FRI and JAN, or @hourly/@daily/@weekly/@monthly/@yearly",
    )  # fmt: skip
    every: int | None = Field(None, ge=1, le=EVERY_MAX, description="seconds between ticks")
    timezone: ZoneName = Field("UTC", description="IANA zone the cron fields are read in")
    job: JobTemplate
    enabled: bool = True
    catch_up: CatchUp = CatchUp.skip
    start_at: AwareDatetime | None = Field(None, description="no tick before this")
    end_at: AwareDatetime | None = Field(None, description="no tick after this")


class ScheduleUpdate(Strict):
    """Only the fields given change. Setting ``cron`` clears ``every`` and vice versa."""

    cron: CronText | None = None
    every: int | None = Field(None, ge=1, le=EVERY_MAX)
    timezone: ZoneName | None = None
    job: JobTemplate | None = None
    enabled: bool | None = None
    catch_up: CatchUp | None = None
    start_at: AwareDatetime | None = None
    end_at: AwareDatetime | None = None


class Schedule(BaseModel):
    name: str
    cron: str | None
    every: int | None
    timezone: str
    job: JobTemplate
    enabled: bool
    catch_up: CatchUp
    start_at: datetime | None
    end_at: datetime | None
    next_fire_at: datetime | None = Field(description="null while disabled or after end_at")
    last_fired_at: datetime | None
    last_job_id: str | None
    created_at: datetime
    updated_at: datetime


class ScheduleList(BaseModel):
    schedules: list[Schedule]


# --- the worker registry -----------------------------------------------------------------

ShortText = Annotated[str, StringConstraints(max_length=64)]
WorkerCommandName = Literal["quiet", "shutdown"]


class WorkerRegister(Strict):
    """What a worker process says about itself when it starts."""

    name: WorkerName = Field(description="the name it leases jobs under (`worker` of /leases)")
    hostname: Annotated[str, StringConstraints(min_length=1, max_length=255)]
    pid: int = Field(ge=0)
    queues: list[Name] = Field(min_length=1, max_length=64)
    concurrency: int = Field(ge=1, le=100_000)
    pool: Annotated[str, StringConstraints(pattern=r"^[a-z0-9_-]{1,32}$")] = Field(
        description="threads, processes, async, solo, or a name of the worker's own"
    )
    version: ShortText = ""


class WorkerRegistered(BaseModel):
    id: str
    heartbeat_interval: float = Field(
        description="seconds between heartbeats; after two silent intervals the worker is "
        "lost and the jobs it holds are reclaimed"
    )


class WorkerHeartbeat(Strict):
    running: list[Annotated[str, StringConstraints(max_length=64)]] = Field(
        default_factory=list, max_length=100_000, description="ids of the jobs it holds"
    )


class WorkerHeartbeatResponse(BaseModel):
    command: WorkerCommandName | None = Field(
        description="quiet: stop leasing; shutdown: finish running jobs and exit"
    )


class Worker(BaseModel):
    id: str
    name: str
    hostname: str
    pid: int
    queues: list[str]
    concurrency: int
    pool: str
    version: str
    status: Literal["online", "lost"]
    command: WorkerCommandName | None
    running: list[str]
    registered_at: datetime
    last_heartbeat_at: datetime
    lost_at: datetime | None


class WorkerList(BaseModel):
    workers: list[Worker]
