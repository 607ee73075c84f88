"""Running one leased job and turning what happened into its report (a JSON fragment
of ``POST /leases/report``), in the pool thread that ran it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import threading
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

from .context import JobContext, set_current_job
from .errors import Cancelled, Retry
from .task import BaseTask

logger = logging.getLogger("celeriac.worker")

LeasedJob = dict[str, Any]
AnyTask = BaseTask[Any, Any]

# Field limits of ErrorInfo in the API; longer values would reject the whole batch.
MAX_ERROR_TYPE = 200
MAX_ERROR_MESSAGE = 65536
MAX_TRACEBACK = 262144


def _dumps(report: dict[str, Any]) -> str:
    return json.dumps(report, separators=(",", ":"), allow_nan=False)


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
) -> str:
    report = {"id": job_id, "token": token, "outcome": "failed", "error": error, "retry": retry}
    if retry_in is not None:
        report["retry_in"] = max(0.0, retry_in)
    return _dumps(report)


def _failure(
    job: LeasedJob, error: dict[str, Any], *, retry: bool, retry_in: float | None = None
) -> str:
    return failure(job["id"], job["lease"]["token"], error, retry=retry, retry_in=retry_in)


def released(job_id: str, token: str) -> str:
    return _dumps({"id": job_id, "token": token, "outcome": "released"})


def _exception_info(exc: BaseException) -> dict[str, Any]:
    tb = "".join(traceback.format_exception(exc))
    return error_info(type(exc).__name__, str(exc), tb)


def _success(job: LeasedJob, result: Any) -> str:
    report = {"id": job["id"], "token": job["lease"]["token"], "outcome": "succeeded"}
    try:
        return _dumps({**report, "result": result})
    except (TypeError, ValueError) as exc:  # ValueError: NaN/inf, circular references
        logger.warning("%s[%s] returned a non-JSON result: %s", job["task"], job["id"], exc)
        message = f"{type(result).__name__} result is not JSON-serialisable: {exc}"
        return _failure(job, error_info("ResultNotSerializable", message), retry=False)


class AsyncLoop:
    """The one event loop, in its own thread, that runs every ``async def`` task.

    The pool thread that leased the slot waits for the coroutine, so concurrency stays
    bounded by the pool, and a cancel request cancels the asyncio task at once.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def run(self, func: Callable[..., Awaitable[Any]], job: LeasedJob, context: JobContext) -> Any:
        future = asyncio.run_coroutine_threadsafe(
            _with_context(context, func, job), self._running_loop()
        )
        context.on_cancel(future.cancel)
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise Cancelled(f"job {context.job_id} was cancelled") from None

    def _running_loop(self) -> asyncio.AbstractEventLoop:
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


def run_job(task: AnyTask | None, job: LeasedJob, context: JobContext, loop: AsyncLoop) -> str:
    """Run ``job`` and return its report; never raises for anything the task does."""
    if task is None:
        message = f"no task named {job['task']!r} is registered in this worker"
        logger.error("%s[%s]: %s", job["task"], job["id"], message)
        return _failure(job, error_info("UnknownTask", message), retry=False)
    set_current_job(context)
    try:
        if task.is_async:
            result = loop.run(task.func, job, context)
        else:
            result = task.func(*job["args"], **job["kwargs"])
    except Retry as request:
        _log_failure(job, request.exc or request, "retry requested")
        info = _exception_info(request.exc) if request.exc else error_info("Retry", str(request))
        return _failure(job, info, retry=True, retry_in=request.delay)
    except Cancelled as exc:
        _log_failure(job, exc, "cancelled")
        return _failure(job, _exception_info(exc), retry=False)
    # Anything the task raises, SystemExit included, is the job's failure, not the worker's.
    except BaseException as exc:
        retry = task.options.retries(exc)
        _log_failure(job, exc, _retry_outlook(job, retry))
        return _failure(job, _exception_info(exc), retry=retry)
    finally:
        set_current_job(None)
    logger.debug("%s[%s] succeeded", job["task"], job["id"])
    return _success(job, result)


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
