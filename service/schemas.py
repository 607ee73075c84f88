"""Request and response bodies of HTTP API v1. These models *are* the public contract:
``openapi/openapi.json`` is generated from them and a test fails on any drift."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

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


class Problem(BaseModel):
    """RFC 9457 problem details, served as application/problem+json."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[dict[str, Any]] | None = None
