"""The job's states and the outcomes that move it between them: the domain's vocabulary,
used by the domain, the brokers and the HTTP schemas alike (docs/architecture.md draws
the state diagram)."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    scheduled = "scheduled"  # stored with a run_at in the future (or a retry's backoff)
    waiting = "waiting"  # a workflow job whose parents have not all finished (not leasable)
    queued = "queued"  # ready: offered to workers
    running = "running"  # leased: a worker holds it under a token with a deadline
    retrying = "retrying"  # failed with attempts left; queued again at run_at
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    expired = "expired"  # its expires_at passed before it started


FINISHED = frozenset(
    {JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled, JobStatus.expired}
)
PENDING = (JobStatus.scheduled, JobStatus.queued, JobStatus.retrying)
RETRYABLE = (JobStatus.failed, JobStatus.cancelled, JobStatus.expired)


class WorkflowStatus(StrEnum):
    """A workflow's (service/workflows.py): running until its last job finished."""

    running = "running"
    succeeded = "succeeded"  # every job succeeded
    failed = "failed"  # some job failed, expired or was cancelled by a failure upstream
    cancelled = "cancelled"  # POST /workflows/{id}/cancel


class Outcome(StrEnum):
    """What a worker reports for a job it holds."""

    succeeded = "succeeded"
    failed = "failed"
    released = "released"  # handed back unstarted: not an attempt


class LeaseProblem(StrEnum):
    """Why a report or heartbeat changed nothing (the problem slugs of docs/api.md)."""

    stale = "stale-lease"  # the token is not the job's current lease (or not this key's)
    not_found = "not-found"  # no such job (the batch answers say "not-found")
