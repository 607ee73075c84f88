"""Time limits: when each job's soft and hard limits fall, and the three ways of raising an
exception inside a running task (docs/python.md, "Pools and time limits").

- ``Deadlines``: one thread that calls a function at a moment; only jobs with a limit
  cost anything (a no-op job without limits never touches it).
- ``interruptible_call``: runs a task in the calling thread so that another thread can
  raise an exception in it (``PyThreadState_SetAsyncExc``). The exception arrives when
  the thread next runs Python bytecode: not inside a blocking C call (``time.sleep``, a
  socket read), which finishes first.
- ``AlarmLimits``: for a task in a process's main thread (the solo pool, a processes-pool
  child): ``SIGALRM`` raises in it, and also interrupts blocking calls.

An exception that arrives just as the task returns must not escape into the worker's own
code, so every way of leaving a guarded call swallows a late one (see ``_leave``).
"""

from __future__ import annotations

import ctypes
import heapq
import itertools
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .context import JobContext
from .errors import SoftTimeLimitExceeded, TimeLimitExceeded
from .task import BaseTask

logger = logging.getLogger("celeriac.worker")

AnyTask = BaseTask[Any, Any]
LIMIT_ERRORS = (SoftTimeLimitExceeded, TimeLimitExceeded)


@dataclass(frozen=True)
class TimeLimits:
    """The worker's defaults (``--soft-time-limit``, ``--time-limit``); a task's own
    options take precedence."""

    soft: float | None = None
    hard: float | None = None

    def for_task(self, task: AnyTask | None) -> tuple[float | None, float | None]:
        if task is None:
            return None, None
        options = task.options
        return options.soft_time_limit or self.soft, options.time_limit or self.hard


@dataclass(order=True)
class Deadline:
    when: float
    seq: int
    callback: Callable[[], object] = field(compare=False)
    cancelled: bool = field(default=False, compare=False)

    def cancel(self) -> None:
        self.cancelled = True  # left in the heap; skipped when it falls due


class Deadlines:
    """Calls functions at monotonic moments, from one daemon thread started on first use.
    Callbacks must be quick: they run one after another."""

    def __init__(self) -> None:
        self._heap: list[Deadline] = []
        self._changed = threading.Condition()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def after(self, seconds: float, callback: Callable[[], object]) -> Deadline:
        entry = Deadline(time.monotonic() + seconds, next(self._seq), callback)
        with self._changed:
            heapq.heappush(self._heap, entry)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="celeriac-time-limits", daemon=True
                )
                self._thread.start()
            if self._heap[0] is entry:
                self._changed.notify()
        return entry

    def stop(self) -> None:
        with self._changed:
            self._stopped = True
            self._changed.notify()

    def _run(self) -> None:
        while (entry := self._next()) is not None:
            try:
                entry.callback()
            except Exception:
                logger.exception("time limit handler failed")

    def _next(self) -> Deadline | None:
        with self._changed:
            while not self._stopped:
                while self._heap and self._heap[0].cancelled:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._changed.wait()
                    continue
                delay = self._heap[0].when - time.monotonic()
                if delay <= 0:
                    return heapq.heappop(self._heap)
                self._changed.wait(delay)
            return None


def watch(
    deadlines: Deadlines,
    limits: tuple[float | None, float | None],
    on_soft: Callable[[], object],
    on_hard: Callable[[], object],
) -> list[Deadline]:
    soft, hard = limits
    entries = []
    if soft:
        entries.append(deadlines.after(soft, on_soft))
    if hard:
        entries.append(deadlines.after(hard, on_hard))
    return entries


def unwatch(entries: list[Deadline]) -> None:
    for entry in entries:
        entry.cancel()


# --- raising in another thread ------------------------------------------------------------

try:
    _set_async_exc: Any = ctypes.pythonapi.PyThreadState_SetAsyncExc
except AttributeError:  # not CPython: soft limits in threads become a flag only
    _set_async_exc = None


class _Guard:
    """The thread running one task, while it runs it."""

    __slots__ = ("ident", "lock", "running")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ident = threading.get_ident()
        self.running = True

    def interrupt(self, exc_type: type[BaseException]) -> None:
        with self.lock:
            if self.running and _set_async_exc is not None:
                _set_async_exc(ctypes.c_ulong(self.ident), ctypes.py_object(exc_type))

    def leave(self) -> None:
        with self.lock:
            self.running = False
            if _set_async_exc is not None:  # drop one set but not yet raised
                _set_async_exc(ctypes.c_ulong(self.ident), None)


def interruptible_call(context: JobContext, func: Callable[..., Any], job: dict[str, Any]) -> Any:
    """``func(*args, **kwargs)`` in this thread, interruptible through ``context``."""
    guard = _Guard()
    context.set_interrupter(guard.interrupt)
    try:
        return func(*job["args"], **job["kwargs"])
    finally:
        context.set_interrupter(None)
        _leave(guard.leave)


def _leave(leave: Callable[[], None]) -> None:
    # A pending interrupt is raised at the next Python call: possibly on entering
    # ``leave`` itself, after the task returned. It came too late to matter: call again.
    while True:
        try:
            leave()
            return
        except LIMIT_ERRORS:
            continue


# --- SIGALRM in the main thread ---------------------------------------------------------------


class AlarmLimits:
    """Soft and hard limits for tasks run in the main thread of this process. Install
    once, from the main thread; ``SIGALRM`` is then the worker's."""

    def __init__(self) -> None:
        self._stage: type[BaseException] | None = None
        self._then: float = 0.0  # seconds from the soft limit to the hard one
        signal.signal(signal.SIGALRM, self._on_alarm)

    def call(self, soft: float | None, hard: float | None, func: Callable[[], Any]) -> Any:
        if soft and (not hard or soft < hard):
            first, self._stage, self._then = soft, SoftTimeLimitExceeded, (hard or soft) - soft
        elif hard:
            first, self._stage, self._then = hard, TimeLimitExceeded, 0.0
        else:
            return func()
        signal.setitimer(signal.ITIMER_REAL, first)
        try:
            return func()
        finally:
            _leave(self._disarm)

    def _disarm(self) -> None:
        self._stage = None
        signal.setitimer(signal.ITIMER_REAL, 0)

    def _on_alarm(self, signum: int, frame: object) -> None:
        stage = self._stage
        if stage is None:
            return  # the task had returned already
        if stage is SoftTimeLimitExceeded and self._then:
            self._stage = TimeLimitExceeded
            signal.setitimer(signal.ITIMER_REAL, self._then)
        else:
            self._stage = None
        raise stage(f"the task ran past its {_limit_name(stage)}")


def _limit_name(exc_type: type[BaseException]) -> str:
    return "soft_time_limit" if exc_type is SoftTimeLimitExceeded else "time_limit"
