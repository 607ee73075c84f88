"""Exceptions raised by the client and understood by the worker."""

from __future__ import annotations

from typing import Any


class CeleriacError(Exception):
    """The service answered with an error: an RFC 9457 ``application/problem+json`` body.

    ``status``/``title``/``detail`` come from that body; ``problem`` keeps all of it
    (``type``, and ``errors`` for validation failures).
    """

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        problem: dict[str, Any],
        *,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status} {title}: {detail}" if detail else f"{status} {title}")
        self.status = status
        self.title = title
        self.detail = detail
        self.problem = problem
        # Seconds, from a Retry-After header (429, 503): when trying again may succeed.
        self.retry_after = retry_after

    @property
    def type(self) -> str:
        return str(self.problem.get("type", "about:blank"))

    @property
    def errors(self) -> list[dict[str, Any]] | None:
        errors = self.problem.get("errors")
        return errors if isinstance(errors, list) else None


class ServerUnreachable(ConnectionError):
    """No HTTP answer at all: connection refused, reset, or timed out."""


class ConnectFailed(ServerUnreachable):
    """The connection could not be opened (refused, no route, name not resolved, connect
    timeout, TLS handshake): the request was never sent, so sending it again is safe."""


class JobFailed(Exception):
    """A job finished without succeeding (failed, cancelled or expired).

    ``job`` is the job as the service returned it; ``error`` its error object (``type``,
    ``message``, ``traceback``) or ``None`` for jobs cancelled or expired before running.
    """

    def __init__(self, job: dict[str, Any]) -> None:
        self.job = job
        self.status: str = job.get("status", "unknown")
        self.error: dict[str, Any] | None = job.get("error")
        reason = f": {self.error.get('type')}: {self.error.get('message')}" if self.error else ""
        super().__init__(f"job {job.get('id')} ({job.get('task')}) {self.status}{reason}")


class Retry(Exception):
    """Raise inside a task (or call ``current_job.retry()``) to ask for another attempt.

    ``exc`` is reported as the attempt's error; ``delay`` (seconds) overrides the backoff.
    The service still enforces ``max_retries``.
    """

    def __init__(self, exc: BaseException | None = None, delay: float | None = None) -> None:
        super().__init__(f"retry requested{f': {exc!r}' if exc else ''}")
        self.exc = exc
        self.delay = delay


class Cancelled(Exception):
    """Raised by ``current_job.raise_if_cancelled()`` once a cancel was requested."""


class SoftTimeLimitExceeded(Exception):
    """Raised inside a task that ran past its ``soft_time_limit``: catch it to clean up
    (what each pool can interrupt: docs/python.md, "Pools and time limits"). Uncaught, it
    fails the attempt like any other exception."""


class TimeLimitExceeded(Exception):
    """The job ran past its hard ``time_limit``: the worker stopped it (the processes pool
    kills the child running it) and reported it failed with this error type."""


class WorkerShutdown(BaseException):
    """Interrupts a task running in the solo pool's main thread on a cold shutdown, so its
    job can be released. A BaseException: task code catching Exception lets it through."""


def is_transient(exc: CeleriacError | ServerUnreachable) -> bool:
    """Worth trying again: no answer, overload, or a server error. Not: a bad key, a
    bad request."""
    return isinstance(exc, ServerUnreachable) or exc.status >= 500 or exc.status == 429
