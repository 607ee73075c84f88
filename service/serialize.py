"""Rows to response bodies, by hand: the hot paths skip re-validating what we just wrote,
and ``JSONResponse`` writes them with orjson."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from fastapi.responses import JSONResponse as _StandardJSONResponse

from service.models import JobRow, JobValues, utcnow, values_of


class JSONResponse(_StandardJSONResponse):
    """The routers' answer: rendered once, by orjson (a thousand-job batch answer takes a
    millisecond, not twelve). What orjson does not write, the standard library does, with
    the same output: integers beyond 64 bits (a job's args may hold them) and keys that
    are not plain strings. FastAPI does not validate a returned Response against the
    route's ``response_model`` again; the model stays for the OpenAPI document."""

    def render(self, content: Any) -> bytes:
        try:
            return orjson.dumps(content)
        except TypeError:  # orjson.JSONEncodeError included
            return super().render(content)


# The last instant written, with its text: every row of a batch has the same created_at
# and run_at (one datetime object), so a batch's answer formats each once. The held
# reference keeps the object alive, so ``is`` cannot match a new one at the same address.
_last_iso: tuple[datetime | None, str | None] = (None, None)


def iso(value: datetime | None) -> str | None:
    global _last_iso
    if value is None:
        return None
    last = _last_iso  # one read: another thread may replace the pair meanwhile
    if last[0] is value:
        return last[1]
    text = value.isoformat().replace("+00:00", "Z")
    _last_iso = (value, text)
    return text


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
        "limits": row.get("limits"),
        "unique_key": row.get("unique_key"),
        "debounce_key": row.get("debounce_key"),
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
    body = {
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
    if (parents := row.get("parents")) is not None:  # a workflow job: its parents' results
        body.update(parents)
    if (traceparent := row.get("traceparent")) is not None:  # docs/operations.md, Traces
        body["traceparent"] = traceparent
    return body
