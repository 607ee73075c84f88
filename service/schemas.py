"""Request and response bodies of HTTP API v1. These models *are* the public contract:
``openapi/openapi.json`` is generated from them and a test fails on any drift."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StringConstraints,
)

from service.netguard import URL_MAX_CHARS, check_webhook_url
from service.states import FINISHED, JobStatus

# --- values every request field is held to (docs/api.md, Limits) ---------------------------
# A value is refused at the door (422) unless every backend can store it as it is: a row
# that fails at insert would fail the whole group commit, and one that fails later (a
# maintenance sweep, a webhook) would fail for everyone.

# Text: C0 control characters (U+0000-U+001F) and DEL are refused in one-line fields;
# free text (an error's message, a traceback) may also hold tab, LF and CR. PostgreSQL
# cannot store NUL at all, and a control character in a name, a header or a log line is
# a way to forge the output of whatever displays it.
SINGLE_LINE = r"^[^\x00-\x1f\x7f]*$"
MULTI_LINE = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$"
_SINGLE_LINE_BAD = re.compile(r"[\x00-\x1f\x7f]")
_MULTI_LINE_BAD = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _refuse(found: re.Match[str] | None, allowed: str) -> None:
    if found is not None:
        raise ValueError(
            f"control character U+{ord(found.group()):04X} at position {found.start()}: "
            f"{allowed} are not allowed here"
        )


def _single_line(value: str) -> str:
    _refuse(_SINGLE_LINE_BAD.search(value), "control characters (U+0000-U+001F, U+007F)")
    return value


def _multi_line(value: str) -> str:
    _refuse(
        _MULTI_LINE_BAD.search(value),
        "control characters other than tab, LF and CR (U+0000-U+001F, U+007F)",
    )
    return value


LINE = (AfterValidator(_single_line), Field(json_schema_extra={"pattern": SINGLE_LINE}))
TEXT = (AfterValidator(_multi_line), Field(json_schema_extra={"pattern": MULTI_LINE}))

NAME_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
WorkerName = Annotated[str, StringConstraints(min_length=1, max_length=200), *LINE]
Token = Annotated[str, StringConstraints(min_length=1, max_length=64), *LINE]
# A job id as a worker sends it back: an unknown one is "not found", never an error.
JobRef = Annotated[str, StringConstraints(min_length=1, max_length=64), *LINE]
# The Idempotency-Key header (a header cannot carry an annotated validator's message,
# so this is a pattern): printable, one line, 1..255 characters.
IDEMPOTENCY_KEY_PATTERN = r"^[^\x00-\x1f\x7f]{1,255}$"

# Dates: every instant a client gives must lie in [DATE_MIN, DATE_MAX] once converted to
# UTC. Year 9999 with a negative offset (or year 1 with a positive one) overflows Python's
# datetime on conversion, MariaDB's DATETIME holds years 1000-9999, and deadlines are
# computed as instant + seconds: the margin keeps every such sum representable.
DATE_MIN = datetime(1970, 1, 1, tzinfo=UTC)
DATE_MAX = datetime(9000, 1, 1, tzinfo=UTC)


_RFC3339_START = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}")


def _date_text(value: Any) -> Any:
    # RFC 3339 text only: a bare number, or a numeric string (a query value is always a
    # string), would be read as a Unix time.
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str) or not _RFC3339_START.match(value):
        raise ValueError("give an RFC 3339 date-time string with an offset")
    return value


def _date_in_range(value: datetime) -> datetime:
    try:
        utc = value.astimezone(UTC)
    except OverflowError:
        utc = None
    if utc is None or not DATE_MIN <= utc <= DATE_MAX:
        raise ValueError(
            f"the date must lie between {DATE_MIN:%Y-%m-%dT%H:%M:%SZ} and "
            f"{DATE_MAX:%Y-%m-%dT%H:%M:%SZ} (UTC)"
        )
    return value


SafeDatetime = Annotated[AwareDatetime, BeforeValidator(_date_text), AfterValidator(_date_in_range)]

# Numbers: JSON booleans are not numbers (strict: true/false never become 1/0, nor "1"
# a 1); an integer is a number. A float that is added to a date is bounded where it is
# declared, so now + value never overflows.
Int = StrictInt
Float = StrictFloat
Bool = StrictBool
# Progress a worker reports is stored in the row and served with the job.
PROGRESS_MAX_BYTES = 64 * 1024


def _progress_size(value: Any) -> Any:
    if value is not None:
        size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
        if size > PROGRESS_MAX_BYTES:
            raise ValueError(
                f"progress is {size} bytes of JSON; the limit is {PROGRESS_MAX_BYTES}. "
                "Report a summary; put large data in the result."
            )
    return value


Progress = Annotated[Any, AfterValidator(_progress_size)]
PROGRESS = f"any JSON, at most {PROGRESS_MAX_BYTES} bytes; shown as the job's progress"
LEASE_SECONDS = "seconds the lease lasts (at most CELERIAC_MAX_LEASE_SECONDS)"
# Integer columns are 32-bit signed.
PID_MAX = 2**31 - 1


class Strict(BaseModel):
    """Unknown fields are an error, not silently dropped; floats are finite."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# Defined with the domain (service.states); the HTTP contract names them.
__all__ = ["FINISHED", "JobStatus"]


class RetryBackoff(Strict):
    base: Float = Field(1.0, ge=0, le=86400, description="seconds before the first retry")
    max: Float = Field(300.0, ge=0, le=7 * 86400, description="cap on any one backoff")
    jitter: Bool = Field(True, description="randomise each backoff in [0.5, 1] x its value")


WebhookEvent = Literal["succeeded", "failed", "cancelled", "expired"]
WEBHOOK_EVENTS: tuple[WebhookEvent, ...] = ("succeeded", "failed", "cancelled", "expired")


# Checked whole (service.netguard.check_webhook_url), as delivery will parse it: a URL
# that cannot be delivered to is refused at submit, not retried for days.
WebhookUrl = Annotated[
    str,
    StringConstraints(min_length=8, max_length=URL_MAX_CHARS),
    AfterValidator(check_webhook_url),
    Field(json_schema_extra={"pattern": r"^[^\x00-\x20\x7f]*$"}),
]


class WebhookSpec(Strict):
    """Where to POST a signed callback when the job reaches one of ``events``
    (docs/webhooks.md)."""

    url: WebhookUrl = Field(
        description="http:// or https:// URL with a valid DNS host name, a dotted-quad IPv4 "
        "or a bracketed IPv6 address, no user info; private addresses are refused at "
        "delivery unless allowed"
    )
    events: list[WebhookEvent] = Field(
        default_factory=lambda: list(WEBHOOK_EVENTS),
        min_length=1,
        description="final statuses that trigger a callback (default: all of them)",
    )


class RateSpec(Strict):
    limit: Int = Field(ge=1, le=1_000_000, description="grants at most, in any window of period")
    period: Float = Field(gt=0, le=86400, description="seconds (a sliding window)")


UniqueState = Literal["scheduled", "queued", "running", "retrying", "succeeded", "failed"]


def _unfinished() -> list[UniqueState]:
    return ["scheduled", "queued", "running", "retrying"]


FlowKey = Annotated[str, StringConstraints(min_length=1, max_length=200), *LINE]


class UniqueSpec(Strict):
    key: FlowKey | None = Field(None, description="default: a hash of task, queue, args, kwargs")
    for_: Float | None = Field(
        None, alias="for", ge=0, le=366 * 86400,
        description="seconds after the first submit during which the key holds, whatever "
        "the job's state",
    )  # fmt: skip
    while_: list[UniqueState] = Field(
        default_factory=_unfinished,
        alias="while",
        max_length=6,
        description="the states of the existing job in which the key holds",
    )


class DebounceSpec(Strict):
    key: FlowKey
    period: Float = Field(
        gt=0, le=366 * 86400, description="seconds: the job starts this long after the last submit"
    )


class JobSubmit(Strict):
    """One job to submit. Options (everything but task/args/kwargs) never reach the task."""

    task: Name
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    queue: Name = "default"
    priority: Int = Field(0, ge=0, le=9, description="0-9, higher runs first within a queue")
    delay: Float | None = Field(None, ge=0, le=366 * 86400, description="seconds from now")
    run_at: SafeDatetime | None = Field(None, description="RFC 3339; exclusive with delay")
    expires_at: SafeDatetime | None = Field(None, description="never start after this")
    max_retries: Int | None = Field(None, ge=0, le=1000)
    retry_backoff: RetryBackoff | None = None
    timeout: Float | None = Field(
        None, gt=0, le=86400, description="seconds a lease lasts before it must be extended"
    )
    webhook: WebhookSpec | None = Field(
        None, description="signed callback on completion (default: the queue's, if any)"
    )
    result_ttl: Float | None = Field(
        None,
        ge=0,
        le=366 * 86400,
        description="seconds the result is kept after success (default "
        "CELERIAC_RESULT_EXPIRES_SECONDS); 0 keeps it forever",
    )
    # Flow control (docs/flow-control.md).
    limits: list[Name] | None = Field(
        None, max_length=8, description="limit keys the job counts against (PUT /limits/{name})"
    )
    unique: UniqueSpec | None = Field(
        None, description="no second job while one with the key is in the given states"
    )
    debounce: DebounceSpec | None = Field(
        None, description="a later submit with the key replaces this job while it waits"
    )


class ErrorInfo(Strict):
    type: Annotated[str, StringConstraints(min_length=1, max_length=200), *LINE]
    message: Annotated[str, StringConstraints(max_length=65536), *TEXT] = ""
    traceback: Annotated[str, StringConstraints(max_length=262144), *TEXT] | None = None


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
    limits: list[str] | None = Field(None, description="the limit keys it counts against")
    unique_key: str | None = None
    debounce_key: str | None = None
    blocked_by: list[str] | None = Field(
        None,
        description="GET /jobs/{id} of a queued job: what holds it back now (limit keys with "
        "no room, or queue/<name> for its paused or full queue)",
    )


class AttemptLog(BaseModel):
    attempt: int = Field(description="the attempt number the lease had (1 = the first run)")
    worker: str | None
    outcome: JobStatus = Field(description="the job's status right after this attempt")
    logs: str
    created_at: datetime = Field(description="when the report was settled")


class JobLogs(BaseModel):
    id: str
    attempts: list[AttemptLog] = Field(
        description="oldest first; an attempt whose worker sent no logs is absent"
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
    max_jobs: Int = Field(1, ge=1, description="at most CELERIAC_MAX_LEASE_JOBS")
    wait: Float = Field(
        0, ge=0, description="long-poll seconds while nothing is ready (at most "
        "CELERIAC_MAX_LEASE_WAIT_SECONDS)",
    )  # fmt: skip
    lease_seconds: Float | None = Field(None, gt=0, description=LEASE_SECONDS)


class LeaseClaim(Strict):
    """Lease these jobs if they are still queued (a direct AMQP worker claims
    the id a RabbitMQ message carried)."""

    worker: WorkerName
    ids: list[JobRef] = Field(min_length=1, max_length=1000)
    lease_seconds: Float | None = Field(None, gt=0, description=LEASE_SECONDS)


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
    # Only for a workflow job with parents (docs/workflows.md).
    parents: dict[str, Any] | None = Field(
        None, description="a workflow job's parents' results, by ref (absent for others)"
    )
    parent_status: dict[str, JobStatus] | None = Field(
        None, description="a workflow job's parents' final statuses, by ref"
    )
    traceparent: str | None = Field(
        None,
        description="the W3C trace context its submit gave (absent when none): continue the "
        "trace around the task",
    )


class LeaseResponse(BaseModel):
    jobs: list[LeasedJob]


class Heartbeat(Strict):
    token: Token
    progress: Progress = Field(None, description=PROGRESS)
    lease_seconds: Float | None = Field(None, gt=0, description=LEASE_SECONDS)


class HeartbeatResponse(BaseModel):
    lease: Lease
    cancel_requested: bool


# Per-attempt job logs (service/joblogs.py): what the task logged, bounded.
AttemptLogs = Annotated[
    Annotated[str, StringConstraints(max_length=65536 + 256), *TEXT] | None,
    Field(
        description="what the task logged during this attempt (at most 65,792 characters; "
        "the Python worker keeps 64 KiB and marks the cut); GET /jobs/{id}/logs serves it",
    ),
]


class Complete(Strict):
    token: Token
    result: Any = None
    logs: AttemptLogs = None


class Fail(Strict):
    token: Token
    error: ErrorInfo
    retry: Bool = Field(True, description="false: fail now whatever retries are left")
    retry_in: Float | None = Field(None, ge=0, le=366 * 86400, description="override backoff")
    logs: AttemptLogs = None


class Release(Strict):
    token: Token


class LeaseRef(Strict):
    id: JobRef
    token: Token
    progress: Progress = Field(None, description=PROGRESS)


class HeartbeatBatch(Strict):
    leases: list[LeaseRef] = Field(min_length=1)
    lease_seconds: Float | None = Field(None, gt=0, description=LEASE_SECONDS)


class HeartbeatBatchItem(BaseModel):
    id: str
    ok: bool
    expires_at: datetime | None = None
    cancel_requested: bool = False
    detail: str | None = None


class HeartbeatBatchResponse(BaseModel):
    leases: list[HeartbeatBatchItem]


class Report(Strict):
    id: JobRef
    token: Token
    outcome: Literal["succeeded", "failed", "released"]
    result: Any = None
    error: ErrorInfo | None = None
    retry: Bool = True
    retry_in: Float | None = Field(None, ge=0, le=366 * 86400)
    logs: AttemptLogs = None


class ReportBatch(Strict):
    reports: list[Report] = Field(min_length=1)
    # Report-and-fetch (docs/protocol.md): the worker's next POST /leases in this call.
    next: LeaseRequest | None = Field(
        None, description="lease more jobs once the reports are settled, as POST /leases "
        "with this body would; they come back in `jobs`",
    )  # fmt: skip


class ReportItem(BaseModel):
    id: str
    ok: bool
    status: JobStatus | None = None
    detail: str | None = None


class ReportBatchResponse(BaseModel):
    reports: list[ReportItem]
    jobs: list[LeasedJob] | None = Field(
        None, description="the jobs leased for `next` (absent without it)"
    )


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

CronText = Annotated[str, StringConstraints(min_length=1, max_length=255), *LINE]
ZoneName = Annotated[str, StringConstraints(min_length=1, max_length=64), *LINE]
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
    priority: Int = Field(0, ge=0, le=9, description="0-9, higher runs first within a queue")
    max_retries: Int | None = Field(None, ge=0, le=1000)
    retry_backoff: RetryBackoff | None = None
    timeout: Float | None = Field(
        None, gt=0, le=86400, description="seconds a lease lasts before it must be extended"
    )
    expires_after: Float | None = Field(
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
    every: Int | None = Field(None, ge=1, le=EVERY_MAX, description="seconds between ticks")
    timezone: ZoneName = Field("UTC", description="IANA zone the cron fields are read in")
    job: JobTemplate
    enabled: Bool = True
    catch_up: CatchUp = CatchUp.skip
    start_at: SafeDatetime | None = Field(None, description="no tick before this")
    end_at: SafeDatetime | None = Field(None, description="no tick after this")


class ScheduleUpdate(Strict):
    """Only the fields given change. Setting ``cron`` clears ``every`` and vice versa."""

    cron: CronText | None = None
    every: Int | None = Field(None, ge=1, le=EVERY_MAX)
    timezone: ZoneName | None = None
    job: JobTemplate | None = None
    enabled: Bool | None = None
    catch_up: CatchUp | None = None
    start_at: SafeDatetime | None = None
    end_at: SafeDatetime | None = None


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

ShortText = Annotated[str, StringConstraints(max_length=64), *LINE]
WorkerCommandName = Literal["quiet", "shutdown"]


class WorkerRegister(Strict):
    """What a worker process says about itself when it starts."""

    name: WorkerName = Field(description="the name it leases jobs under (`worker` of /leases)")
    hostname: Annotated[str, StringConstraints(min_length=1, max_length=255), *LINE]
    pid: Int = Field(ge=1, le=PID_MAX, description="the process id (a 32-bit signed integer)")
    queues: list[Name] = Field(min_length=1, max_length=64)
    concurrency: Int = Field(ge=1, le=100_000)
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
    running: list[JobRef] = Field(
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


LIMIT_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$|^[A-Za-z0-9_.:-]{0,127}\*$"
LimitName = Annotated[str, StringConstraints(pattern=LIMIT_PATTERN)]


class LimitSpec(Strict):
    """``PUT /limits/{name}``: either or both; a name ending in ``*`` is a pattern."""

    max_running: Int | None = Field(None, ge=1, le=1_000_000, description="running at once")
    rate: RateSpec | None = None


class Limit(BaseModel):
    name: str
    max_running: int | None
    rate: RateSpec | None
    pattern: bool = Field(description="a name ending in *: the defaults of every match")
    running: int | None = Field(None, description="jobs holding a slot now (not for patterns)")


class LimitList(BaseModel):
    limits: list[Limit]


class QueuePatch(Strict):
    """``PATCH /queues/{name}``: the fields given change; null clears a limit."""

    paused: Bool | None = None
    max_running: Int | None = Field(None, ge=1, le=1_000_000)
    rate: RateSpec | None = None


class QueueView(BaseModel):
    name: str
    paused: bool
    max_running: int | None
    rate: RateSpec | None
    counts: dict[str, int]


# --- bulk actions (POST /jobs/bulk; service/bulk_actions.py) ------------------------------
BULK_IDS_MAX = 1000


class BulkFilter(Strict):
    """Which jobs: every field given must match (at least one is required)."""

    status: JobStatus | list[JobStatus] | None = Field(
        None, description="one status or a list; the action's own statuses when absent"
    )
    queue: Name | None = None
    task: Name | None = None
    finished_before: SafeDatetime | None = Field(
        None, description="only jobs that finished before this instant"
    )
    ids: list[Annotated[str, StringConstraints(min_length=36, max_length=36)]] | None = Field(
        None, max_length=BULK_IDS_MAX, description=f"at most {BULK_IDS_MAX} job ids"
    )


class BulkRequest(Strict):
    action: Literal["retry", "cancel", "delete"] = Field(
        description="retry: failed, cancelled or expired jobs are queued again; cancel: "
        "pending jobs are cancelled, running ones asked to stop; delete: finished jobs are "
        "deleted, with their results and webhook deliveries"
    )
    filter: BulkFilter


class BulkResult(BaseModel):
    matched: int = Field(description="jobs the filter selected among those the action applies to")
    changed: int = Field(description="jobs the action changed (the rest changed meanwhile)")
