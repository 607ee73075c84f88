"""``current_job``: what a running task knows about its job, and how it talks back.

The worker sets a ``JobContext`` in a context variable before calling the task, so
``current_job`` resolves to the right job in every pool thread and in every asyncio task.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any, NoReturn, cast

from .errors import Cancelled, Retry

# Guards the lazy creation of cancel events (rare: only tasks that wait on a cancel).
_event_lock = threading.Lock()


class JobContext:
    """The job being run. Created by the worker; tasks reach it as ``current_job``."""

    # A workflow job's parents' results and final statuses by ref (docs/workflows.md);
    # empty for other jobs. Set by the worker from the lease, never mutated.
    parents: Mapping[str, Any] = MappingProxyType({})
    parent_status: Mapping[str, str] = MappingProxyType({})

    def __init__(self, job_id: str, task: str, attempt: int, queue: str, worker: str) -> None:
        self.job_id = job_id
        self.task = task
        self.attempt = attempt
        self.queue = queue
        self.worker = worker
        # Read by the heartbeat thread; a new dict is assigned whole, never mutated.
        self.progress: dict[str, Any] | None = None
        self._cancelled = False
        # Made only for a task that sleeps on it: an Event per job is a measurable share
        # of a no-op job's cost.
        self._cancel_event: threading.Event | None = None
        self._on_cancel: Callable[[], object] | None = None
        # How the pool stops this task with an exception (a time limit), and which one it
        # used: the task may see a CancelledError instead (asyncio), reported as this.
        self._interrupter: Callable[[type[BaseException]], object] | None = None
        self.interrupted_by: type[BaseException] | None = None
        # A processes-pool child passes progress on to the worker process.
        self._on_progress: Callable[[dict[str, Any]], object] | None = None
        # What the task logs during this attempt (celeriac._joblog), sent with its report.
        self.attempt_log: Any = None

    def __repr__(self) -> str:
        return f"JobContext({self.task} {self.job_id} attempt={self.attempt})"

    def report_progress(
        self, current: float, total: float | None = None, message: str | None = None
    ) -> None:
        """Record progress; it reaches the service with the worker's next heartbeat."""
        self.progress = {"current": current, "total": total, "message": message}
        if self._on_progress is not None:
            self._on_progress(self.progress)

    @property
    def cancel_requested(self) -> bool:
        """True once someone asked to cancel this job, or the worker lost its lease
        (the service handed the job elsewhere): either way, stop as soon as convenient."""
        return self._cancelled

    def raise_if_cancelled(self) -> None:
        if self._cancelled:
            raise Cancelled(f"job {self.job_id} was cancelled")

    def wait_cancelled(self, timeout: float | None = None) -> bool:
        """Sleep up to ``timeout`` seconds, waking early on a cancel; True if cancelled."""
        with _event_lock:
            if self._cancel_event is None:
                self._cancel_event = threading.Event()
                if self._cancelled:
                    self._cancel_event.set()
        return self._cancel_event.wait(timeout)

    def retry(self, exc: BaseException | None = None, delay: float | None = None) -> NoReturn:
        """Give up on this attempt and ask for another (``delay`` s from now if given)."""
        raise Retry(exc, delay)

    def request_cancel(self) -> None:
        """Worker side: flag the cancel, and interrupt an async task right away."""
        with _event_lock:
            self._cancelled = True
            if self._cancel_event is not None:
                self._cancel_event.set()
        if self._on_cancel is not None:
            self._on_cancel()

    def on_cancel(self, callback: Callable[[], object]) -> None:
        """Worker side: how to interrupt this job (cancel its asyncio task)."""
        self._on_cancel = callback
        if self._cancelled:
            callback()

    def on_progress(self, callback: Callable[[dict[str, Any]], object]) -> None:
        """Worker side: also hand each progress report to ``callback``."""
        self._on_progress = callback

    def set_interrupter(self, callback: Callable[[type[BaseException]], object] | None) -> None:
        """Worker side: how to raise an exception in this task while it runs (None: it
        is not running, or cannot be interrupted)."""
        self._interrupter = callback

    def interrupt(self, exc_type: type[BaseException]) -> bool:
        """Worker side: stop the task with ``exc_type`` if its pool can; whether it could."""
        self.interrupted_by = exc_type
        interrupter = self._interrupter
        if interrupter is None:
            return False
        interrupter(exc_type)
        return True


_current: ContextVar[JobContext | None] = ContextVar("celeriac_current_job", default=None)


def get_current_job() -> JobContext | None:
    """The running job, or None outside of a task."""
    return _current.get()


def set_current_job(context: JobContext | None) -> None:
    """Worker side: bind ``context`` in the calling thread or asyncio task."""
    _current.set(context)


class _CurrentJob:
    """Stands in for the ``JobContext`` of whichever job runs in the caller's context."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        context = _current.get()
        if context is None:
            raise RuntimeError("current_job is only available inside a running celeriac task")
        return getattr(context, name)

    def __repr__(self) -> str:
        return f"<current_job {_current.get()!r}>"


# Typed as the real thing so ``current_job.attempt`` type-checks; resolved per access.
current_job = cast(JobContext, _CurrentJob())
