"""Rows to response bodies, by hand: the hot paths skip re-validating what we just wrote."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from service.models import JobRow, JobValues, utcnow, values_of


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def job_body(row: JobRow) -> dict[str, Any]:
    return values_body(values_of(row))


def values_body(row: JobValues) -> dict[str, Any]:
    return {
        "id": row["id"],
        "task": row["task"],
        "queue": row["queue"],
        "priority": row["priority"],
        "status": row["status"],
        "args": row["args"],
        "kwargs": row["kwargs"],
        "attempt": row["attempt"],
        "max_retries": row["max_retries"],
        "retry_backoff": {
            "base": row["backoff_base"],
            "max": row["backoff_max"],
            "jitter": row["backoff_jitter"],
        },
        "timeout": row["timeout"],
        "run_at": iso(row["run_at"]),
        "expires_at": iso(row["expires_at"]),
        "created_at": iso(row["created_at"]),
        "started_at": iso(row["started_at"]),
        "finished_at": iso(row["finished_at"]),
        "result": row["result"],
        "error": row["error"],
        "progress": row["progress"],
        "cancel_requested": row["cancel_requested"],
        "worker": row["lease_worker"],
        **result_fields(row),
    }


def result_fields(row: JobValues) -> dict[str, Any]:
    """The webhook and the result's lifecycle. A result past its expiry reads as
    expired at once, whether or not the cleanup loop has deleted it yet."""
    expires_at = row["result_expires_at"]
    expired = row["result_expired"] or (expires_at is not None and expires_at <= utcnow())
    fields: dict[str, Any] = {
        "webhook": row["webhook"],
        "result_ttl": row["result_ttl"],
        "result_expires_at": iso(expires_at),
        "result_expired": expired,
        "result_stored": row["result_ref"] is not None and not expired,
    }
    if expired:
        fields["result"] = None
    return fields


def leased_body(row: JobValues) -> dict[str, Any]:
    return {
        "id": row["id"],
        "task": row["task"],
        "args": row["args"],
        "kwargs": row["kwargs"],
        "queue": row["queue"],
        "priority": row["priority"],
        "attempt": row["attempt"],
        "max_retries": row["max_retries"],
        "lease": {"token": row["lease_token"], "expires_at": iso(row["lease_expires_at"])},
    }
