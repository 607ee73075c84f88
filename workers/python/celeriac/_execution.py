"""Running one leased job and turning what happened into its ``Report``: the outcome in a
form every transport can send (HTTP ``POST /leases/report`` items, Redis ``complete`` /
``fail`` calls) and a processes-pool child can pickle back to the worker."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import sys
import threading
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import _joblog
from ._tracing import task_span
from .context import JobContext, set_current_job
from .errors import Cancelled, Retry, WorkerShutdown
from .task import BaseTask

if TYPE_CHECKING:  # imported where used: a worker running plain functions never needs it
    import asyncio

logger = logging.getLogger("celeriac.worker")

LeasedJob = dict[str, Any]
AnyTask = BaseTask[Any, Any]
# How a pool calls the task: in this thread, on an event loop, under a time limit...
Invoke = Callable[[AnyTask, LeasedJob, JobContext], Any]
AsyncInvoke = Callable[[AnyTask, LeasedJob, JobContext], Awaitable[Any]]

# Field limits of ErrorInfo in the API; longer values would reject the whole batch.
MAX_ERROR_TYPE = 200
MAX_ERROR_MESSAGE = 65536
MAX_TRACEBACK = 262144


@dataclass(frozen=True, slots=True)
class Report:
    """A job's outcome: ``succeeded`` (``result`` is its JSON text, encoded where the task
    ran so an unencodable result fails there), ``failed`` or ``released``."""

    job_id: str
    token: str
    outcome: str
    result: str = "null"
    error: dict[str, Any] | None = None
    retry: bool = True
    retry_in: float | None = None
    # What the task logged during this attempt (celeriac._joblog); None if nothing.
    logs: str | None = None

    @property
    def size(self) -> int:
        """Roughly its encoded length, for batching."""
        extra = len(self.error.get("traceback") or "") + 400 if self.error else 0
        return len(self.result) + extra + len(self.logs or "") + 100


# One encoder: json.dumps with options builds a new one per call.
_encode = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


def dumps(value: Any) -> str:
    return "null" if value is None else _encode(value)


def error_info(type_name: str, message: str, tb: str | None = None) -> dict[str, Any]:
    info: dict[str, Any] = {
        "type": type_name[:MAX_ERROR_TYPE],
        "message": message[:MAX_ERROR_MESSAGE],
    }
    if tb:
        info["traceback"] = tb[-MAX_TRACEBACK:]  # the innermost frames matter most
    return info


def failure(
    job_id: str, token: str, error: dict[str, Any], *, retry: bool, retry_in: float | None = None
) -> Report:
    retry_in = None if retry_in is None else max(0.0, retry_in)
    return Report(job_id, token, "failed", error=error, retry=retry, retry_in=retry_in)


def job_failure(
    job: LeasedJob, error: dict[str, Any], *, retry: bool, retry_in: float | None = None
) -> Report:
    return failure(job["id"], job["lease"]["token"], error, retry=retry, retry_in=retry_in)


def released(job_id: str, token: str) -> Report:
    return Report(job_id, token, "released")


def exception_info(exc: BaseException) -> dict[str, Any]:
    tb = "".join(traceback.format_exception(exc))
    return error_info(type(exc).__name__, str(exc), tb)


def _success(job: LeasedJob, result: Any) -> Report:
    try:
        return Report(job["id"], job["lease"]["token"], "succeeded", dumps(result))
    except (TypeError, ValueError) as exc:  # ValueError: NaN/inf, circular references
        logger.warning("%s[%s] returned a non-JSON result: %s", job["task"], job["id"], exc)
        message = f"{type(result).__name__} result is not JSON-serialisable: {exc}"
        return job_failure(job, error_info("ResultNotSerializable", message), retry=False)


def _unknown(job: LeasedJob) -> Report:
    message = f"no task named {job['task']!r} is registered in this worker"
    logger.error("%s[%s]: %s", job["task"], job["id"], message)
    return job_failure(job, error_info("UnknownTask", message), retry=False)


def call_task(task: AnyTask, job: LeasedJob, context: JobContext) -> Any:
    """The plain way: call the function here (an async one on a loop of its own)."""
    result = task.func(*job["args"], **job["kwargs"])
    if task.is_async:
        import asyncio

        return asyncio.run(result)
    return result


def run_job(task: AnyTask | None, job: LeasedJob, context: JobContext, invoke: Invoke) -> Report:
    """Run ``job`` and return its report; never raises for anything the task does."""
    if task is None:
        return _unknown(job)
    log = _joblog.start_attempt(context)
    set_current_job(context)
    try:
        with task_span(job):
            result = invoke(task, job, context)
    except WorkerShutdown:
        raise  # a cold shutdown of the solo pool: the job is released, not failed
    # Anything the task raises, SystemExit included, is the job's failure, not the worker's.
    except BaseException as exc:
        return with_logs(failed_report(task, job, context, exc), log)
    finally:
        set_current_job(None)
    logger.debug("%s[%s] succeeded", job["task"], job["id"])
    return with_logs(_success(job, result), log)


async def arun_job(
    task: AnyTask | None, job: LeasedJob, context: JobContext, invoke: AsyncInvoke
) -> Report:
    """``run_job`` inside an asyncio task (the async pool)."""
    if task is None:
        return _unknown(job)
    log = _joblog.start_attempt(context)
    set_current_job(context)  # each asyncio task has its own copy of the context
    try:
        with task_span(job):
            result = await invoke(task, job, context)
    except BaseException as exc:
        return with_logs(failed_report(task, job, context, exc), log)
    return with_logs(_success(job, result), log)


def with_logs(report: Report, log: _joblog.AttemptLog) -> Report:
    """The report with what the task logged (the failure's own warning included)."""
    text = log.text()
    return report if text is None else dataclasses.replace(report, logs=text)


def _cancellation(exc: BaseException) -> bool:
    """A future's or an asyncio task's cancellation (asyncio is loaded if one was raised)."""
    aio = sys.modules.get("asyncio")
    if aio is not None and isinstance(exc, aio.CancelledError):
        return True
    return isinstance(exc, concurrent.futures.CancelledError)


def failed_report(task: AnyTask, job: LeasedJob, context: JobContext, exc: BaseException) -> Report:
    if isinstance(exc, Retry):
        _log_failure(job, exc.exc or exc, "retry requested")
        info = exception_info(exc.exc) if exc.exc else error_info("Retry", str(exc))
        return job_failure(job, info, retry=True, retry_in=exc.delay)
    if _cancellation(exc):
        exc = _why_cancelled(context)
    if isinstance(exc, Cancelled):
        _log_failure(job, exc, "cancelled")
        return job_failure(job, exception_info(exc), retry=False)
    retry = task.options.retries(exc)
    _log_failure(job, exc, _retry_outlook(job, retry))
    return job_failure(job, exception_info(exc), retry=retry)


def _why_cancelled(context: JobContext) -> BaseException:
    """An asyncio task is stopped by cancelling it: say what cancelled it."""
    if context.interrupted_by is not None:
        return context.interrupted_by("the task ran past its time limit and was cancelled")
    return Cancelled(f"job {context.job_id} was cancelled")


def _retry_outlook(job: LeasedJob, retry: bool) -> str:
    if not retry:
        return "not retried: not in autoretry_for"
    if job["attempt"] > job["max_retries"]:
        return "no retries left"
    return "will be retried"


def _log_failure(job: LeasedJob, exc: BaseException, consequence: str) -> None:
    logger.warning(
        "%s[%s] attempt %s raised %s: %s (%s)",
        job["task"], job["id"], job["attempt"], type(exc).__name__, exc, consequence,
    )  # fmt: skip


class AsyncLoop:
    """The one event loop, in its own thread, that runs every ``async def`` task of the
    threads pool. The pool thread that leased the slot waits for the coroutine, so
    concurrency stays bounded by the pool, and a cancel request or a time limit cancels
    the asyncio task at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def run(self, task: AnyTask, job: LeasedJob, context: JobContext) -> Any:
        import asyncio

        future = asyncio.run_coroutine_threadsafe(
            _with_context(context, task.func, job), self._running_loop()
        )
        context.on_cancel(future.cancel)
        context.set_interrupter(lambda _exc_type: future.cancel())
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise _why_cancelled(context) from None
        finally:
            context.set_interrupter(None)

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        import asyncio

        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(
                    target=self._loop.run_forever, name="celeriac-asyncio", daemon=True
                )
                self._thread.start()
            return self._loop

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if not thread.is_alive():
            loop.close()


async def _with_context(
    context: JobContext, func: Callable[..., Awaitable[Any]], job: LeasedJob
) -> Any:
    set_current_job(context)  # each asyncio task has its own copy of the context
    return await func(*job["args"], **job["kwargs"])
