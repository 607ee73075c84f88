"""Where tasks run: the worker's pools (``--pool``), behind one small interface.

- ``threads`` (default): a thread per slot; ``async def`` tasks on one shared event loop.
- ``async``: every task on one event loop; ``def`` tasks in a thread via ``to_thread``.
- ``solo``: one job at a time, in the main thread.
- ``processes`` (``_procpool``): child processes, one job at a time each.

A pool calls ``PoolHost.finish`` exactly once per job it was given (with ``None`` if the
worker failed to run it), and at a hard time limit it may ``abandon`` the job first: that
reports it failed and frees its slot while the task is still running (docs/python.md,
"Pools and time limits", says what each pool can stop).
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from functools import partial
from queue import SimpleQueue
from typing import TYPE_CHECKING, Any, TypeVar

from ._execution import (
    AnyTask,
    AsyncLoop,
    LeasedJob,
    Report,
    arun_job,
    call_task,
    error_info,
    job_failure,
    run_job,
)
from ._leases import ActiveLease
from ._limits import AlarmLimits, Deadline, Deadlines, TimeLimits, interruptible_call, watch
from ._pool import ThreadPool
from .context import JobContext
from .errors import SoftTimeLimitExceeded, TimeLimitExceeded, WorkerShutdown

if TYPE_CHECKING:  # imported where used: the threads pool (the default) never needs it
    import asyncio

logger = logging.getLogger("celeriac.worker")

POOLS = ("threads", "processes", "async", "solo")
T = TypeVar("T")


@dataclass(frozen=True)
class PoolHost:
    """What a pool needs from the worker."""

    tasks: dict[str, AnyTask]
    worker: str
    finish: Callable[[ActiveLease, Report | None], None]
    abandon: Callable[[ActiveLease, Report], bool]
    deadlines: Deadlines
    limits: TimeLimits


def limit_report(
    task: AnyTask, job: LeasedJob, exc_type: type[BaseException], detail: str
) -> Report:
    """The failure of a job stopped at its hard limit (retried unless autoretry_for
    excludes it, and the service still counts the attempt)."""
    exc = exc_type(detail)
    return job_failure(job, error_info(exc_type.__name__, detail), retry=task.options.retries(exc))


class Pool:
    kind = ""

    def __init__(self, size: int, host: PoolHost) -> None:
        self.size = size
        self.host = host

    def start(self) -> None:
        """Start the threads, loop or processes."""

    def submit(self, job: LeasedJob, lease: ActiveLease) -> None:
        raise NotImplementedError

    def serve(self, stopping: threading.Event, done: Callable[[], bool]) -> None:
        """The main thread's share of the work, until the worker may shut down."""
        stopping.wait()

    def wake(self) -> None:
        """Something ``serve``'s ``done`` depends on changed."""

    def interrupt_main(self) -> bool:
        """On a cold shutdown: whether the main thread runs a task that must be broken off."""
        return False

    def stop(self, cold: bool) -> None:
        """After the jobs drained (warm), or at once (cold): let go of the resources."""

    def _watch(
        self,
        task: AnyTask | None,
        job: LeasedJob,
        lease: ActiveLease,
        on_hard: Callable[[], object],
    ) -> list[Deadline]:
        limits = self.host.limits.for_task(task)
        if task is None or limits == (None, None):
            return []
        return watch(
            self.host.deadlines,
            limits,
            on_soft=lambda: lease.context.interrupt(SoftTimeLimitExceeded),
            on_hard=on_hard,
        )

    def _abandon(self, task: AnyTask, job: LeasedJob, lease: ActiveLease) -> bool:
        """Hard limit in a pool that cannot kill what runs the task: report the job now,
        free its slot, and try to stop the task with ``TimeLimitExceeded``."""
        limit = self.host.limits.for_task(task)[1]
        detail = f"the task ran past its time_limit ({limit:g} s) and was abandoned"
        if not self.host.abandon(lease, limit_report(task, job, TimeLimitExceeded, detail)):
            return False  # it finished meanwhile
        logger.error("%s[%s] %s (it may go on running)", job["task"], job["id"], detail)
        lease.context.interrupt(TimeLimitExceeded)
        return True


class ThreadsPool(Pool):
    kind = "threads"

    def __init__(self, size: int, host: PoolHost) -> None:
        super().__init__(size, host)
        self._threads: ThreadPool[tuple[LeasedJob, ActiveLease]] = ThreadPool(
            size, self._run, "celeriac-job"
        )
        self._loop = AsyncLoop()

    def start(self) -> None:
        self._threads.start()

    def submit(self, job: LeasedJob, lease: ActiveLease) -> None:
        self._threads.submit((job, lease))

    def stop(self, cold: bool) -> None:
        self._loop.stop()
        self._threads.stop()

    def _run(self, item: tuple[LeasedJob, ActiveLease]) -> None:
        job, lease = item
        report = None
        try:
            task = self.host.tasks.get(job["task"])
            thread = threading.current_thread()
            timers = self._watch(task, job, lease, lambda: self._hard(task, job, lease, thread))
            invoke = self._invoke_interruptible if timers else self._invoke
            try:
                report = run_job(task, job, lease.context, invoke)
            finally:
                for timer in timers:
                    timer.cancel()
        except Exception:  # a bug here must not leak the slot or kill the thread quietly
            logger.exception("worker error while running job %s", job.get("id"))
        finally:
            self.host.finish(lease, report)

    def _invoke(self, task: AnyTask, job: LeasedJob, context: JobContext) -> Any:
        if task.is_async:
            return self._loop.run(task, job, context)
        return task.func(*job["args"], **job["kwargs"])

    def _invoke_interruptible(self, task: AnyTask, job: LeasedJob, context: JobContext) -> Any:
        if task.is_async:
            return self._loop.run(task, job, context)
        return interruptible_call(context, task.func, job)

    def _hard(
        self, task: AnyTask | None, job: LeasedJob, lease: ActiveLease, thread: threading.Thread
    ) -> None:
        # A thread cannot be killed: give up on it, and keep the pool at full strength.
        if task is not None and self._abandon(task, job, lease) and not task.is_async:
            self._threads.replace(thread)


class DaemonExecutor(Executor):
    """The async pool's executor for ``def`` tasks (not the loop's default, which must be
    a ``ThreadPoolExecutor``): that one joins its threads at interpreter exit, so one task
    stuck forever would keep a cold-shut-down worker alive; these threads are daemons."""

    def __init__(self, size: int, name: str) -> None:
        self._threads: ThreadPool[_Call] = ThreadPool(size, _call, name)
        self._threads.start()

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        self._threads.submit((future, fn, args, kwargs))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._threads.stop()


_Call = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


def _call(item: _Call) -> None:
    future, fn, args, kwargs = item
    if not future.set_running_or_notify_cancel():
        return
    try:
        result = fn(*args, **kwargs)
    except BaseException as exc:  # the caller's to handle, whatever it is
        future.set_exception(exc)
    else:
        future.set_result(result)


class AsyncPool(Pool):
    kind = "async"

    def __init__(self, size: int, host: PoolHost) -> None:
        import asyncio

        super().__init__(size, host)
        self._loop = asyncio.new_event_loop()
        # ``def`` tasks run here; as many threads as slots, so none waits for a thread.
        self._executor = DaemonExecutor(size, "celeriac-job")
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="celeriac-asyncio", daemon=True
        )
        self._running: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: LeasedJob, lease: ActiveLease) -> None:
        self._loop.call_soon_threadsafe(self._spawn, job, lease)

    def stop(self, cold: bool) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
        self._executor.shutdown(wait=False)

    def _spawn(self, job: LeasedJob, lease: ActiveLease) -> None:
        running = self._loop.create_task(self._run(job, lease), name=f"celeriac-{job['id']}")
        self._running.add(running)  # the loop keeps only weak references to tasks
        running.add_done_callback(self._running.discard)

    async def _run(self, job: LeasedJob, lease: ActiveLease) -> None:
        report = None
        try:
            task = self.host.tasks.get(job["task"])
            timers = self._watch(task, job, lease, lambda: task and self._abandon(task, job, lease))
            try:
                report = await arun_job(task, job, lease.context, self._invoke)
            finally:
                for timer in timers:
                    timer.cancel()
        except Exception:
            logger.exception("worker error while running job %s", job.get("id"))
        finally:
            self.host.finish(lease, report)

    async def _invoke(self, task: AnyTask, job: LeasedJob, context: JobContext) -> Any:
        if not task.is_async:
            # asyncio.to_thread, on our executor: the context goes along, so current_job
            # works in the thread too.
            call = partial(
                contextvars.copy_context().run, interruptible_call, context, task.func, job
            )
            return await self._loop.run_in_executor(self._executor, call)
        import asyncio

        current = asyncio.current_task()
        assert current is not None
        cancel = partial(self._loop.call_soon_threadsafe, current.cancel)
        context.on_cancel(cancel)
        context.set_interrupter(lambda _exc_type: cancel())
        try:
            return await task.func(*job["args"], **job["kwargs"])
        finally:
            context.set_interrupter(None)


class SoloPool(Pool):
    """One job at a time in the main thread: nothing to share, nothing to lock, and
    ``SIGALRM`` enforces both limits (a hard one is an exception the task could catch)."""

    kind = "solo"

    def __init__(self, size: int, host: PoolHost) -> None:
        super().__init__(1, host)
        self._items: SimpleQueue[tuple[LeasedJob, ActiveLease] | None] = SimpleQueue()
        self._alarm: AlarmLimits | None = None
        self._in_task = False

    def submit(self, job: LeasedJob, lease: ActiveLease) -> None:
        self._items.put((job, lease))

    def wake(self) -> None:
        self._items.put(None)

    def interrupt_main(self) -> bool:
        return self._in_task

    def serve(self, stopping: threading.Event, done: Callable[[], bool]) -> None:
        self._alarm = AlarmLimits()  # signal handlers belong to the main thread
        while True:
            item = self._items.get()
            if item is not None:
                try:
                    self._run(*item)
                except WorkerShutdown:
                    return  # cold shutdown: the job is released, not reported
            if done():
                return

    def _run(self, job: LeasedJob, lease: ActiveLease) -> None:
        report = None
        try:
            task = self.host.tasks.get(job["task"])
            soft, hard = self.host.limits.for_task(task)
            report = run_job(task, job, lease.context, partial(self._invoke, soft, hard))
        except WorkerShutdown:
            raise  # not finished: the cold shutdown releases it
        except Exception:
            logger.exception("worker error while running job %s", job.get("id"))
        self.host.finish(lease, report)

    def _invoke(
        self,
        soft: float | None,
        hard: float | None,
        task: AnyTask,
        job: LeasedJob,
        context: JobContext,
    ) -> Any:
        assert self._alarm is not None
        self._in_task = True
        try:
            return self._alarm.call(soft, hard, partial(call_task, task, job, context))
        finally:
            self._in_task = False


@dataclass(frozen=True)
class PoolOptions:
    kind: str = "threads"
    app_spec: str | None = None  # module:attribute, for child processes to import
    max_tasks_per_child: int = 0
    max_memory_per_child: int = 0  # KB


def make_pool(size: int, host: PoolHost, options: PoolOptions) -> Pool:
    kind = options.kind
    if kind == "threads":
        return ThreadsPool(size, host)
    if kind == "async":
        return AsyncPool(size, host)
    if kind == "solo":
        return SoloPool(size, host)
    if kind == "processes":
        from ._procpool import ProcessPool

        if not options.app_spec:
            raise ValueError("the processes pool needs the app as module:attribute")
        return ProcessPool(
            size, host, options.app_spec, max_tasks=options.max_tasks_per_child,
            max_memory_kb=options.max_memory_per_child,
        )  # fmt: skip
    raise ValueError(f"unknown pool {kind!r}: choose from {', '.join(POOLS)}")
