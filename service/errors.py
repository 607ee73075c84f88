"""Typed errors, rendered once as application/problem+json (RFC 9457)."""

from __future__ import annotations

from typing import Any

PROBLEM_JSON = "application/problem+json"


class ProblemError(Exception):
    """An error a client caused or can act on. Subclasses fix status, slug and title."""

    status = 400
    slug = "bad-request"
    title = "Bad request"

    def __init__(
        self,
        detail: str,
        *,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,  # e.g. Retry-After on a 503
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors
        self.headers = headers

    def to_problem(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": f"urn:celeriac:problem:{self.slug}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if self.errors is not None:
            body["errors"] = self.errors
        return body


class BadRequest(ProblemError):
    status, slug, title = 400, "bad-request", "Bad request"


class InvalidJson(ProblemError):
    status, slug, title = 400, "invalid-json", "Request body is not valid JSON"


class InvalidCursor(ProblemError):
    status, slug, title = 400, "invalid-cursor", "Invalid pagination cursor"


class Unauthorized(ProblemError):
    status, slug, title = 401, "unauthorized", "Missing or unknown API key"


class Forbidden(ProblemError):
    status, slug, title = 403, "forbidden", "API key lacks the required scope"


class JobNotFound(ProblemError):
    status, slug, title = 404, "job-not-found", "No such job"


class NotFound(ProblemError):
    status, slug, title = 404, "not-found", "No such resource"


class MethodNotAllowed(ProblemError):
    status, slug, title = 405, "method-not-allowed", "Method not allowed"


class StaleLease(ProblemError):
    status, slug, title = 409, "stale-lease", "The lease token is no longer valid"


class JobFinished(ProblemError):
    status, slug, title = 409, "job-finished", "The job has already finished"


class JobNotRetryable(ProblemError):
    status, slug, title = 409, "job-not-retryable", "Only failed, cancelled or expired jobs retry"


class JobNotFinished(ProblemError):
    status, slug, title = 409, "job-not-finished", "The job has not finished"


class NoWebhook(ProblemError):
    status, slug, title = 409, "no-webhook", "The job has no webhook"


class NoResult(ProblemError):
    status, slug, title = 409, "no-result", "The job has no result"


class ResultExpired(ProblemError):
    status, slug, title = 410, "result-expired", "The result expired and was deleted"


class RequestTimeout(ProblemError):
    status, slug, title = 408, "request-timeout", "The request body arrived too slowly"


class PayloadTooLarge(ProblemError):
    status, slug, title = 413, "payload-too-large", "Payload too large"


class UnsupportedMediaType(ProblemError):
    status, slug, title = 415, "unsupported-media-type", "Send application/json"


class ValidationFailed(ProblemError):
    status, slug, title = 422, "validation-failed", "The request body is not valid"


class JobNotStorable(ProblemError):
    status, slug, title = 422, "job-not-storable", "The database refused a value of the job"


class IdempotencyMismatch(ProblemError):
    status, slug, title = 422, "idempotency-mismatch", "Idempotency-Key reused with another body"


class ServiceUnavailable(ProblemError):
    status, slug, title = 503, "unavailable", "A backing service is unavailable"


class DatabaseUnavailable(ServiceUnavailable):
    """SQL cannot be reached (service/outage.py): sent with Retry-After."""

    slug, title = "database-unavailable", "The database is unreachable"


class ScheduleNotFound(ProblemError):
    status, slug, title = 404, "schedule-not-found", "No such schedule"


class ScheduleExists(ProblemError):
    status, slug, title = 409, "schedule-exists", "A schedule with this name exists"


class WorkerNotFound(ProblemError):
    status, slug, title = 404, "worker-not-found", "No such worker (it may have been purged)"
