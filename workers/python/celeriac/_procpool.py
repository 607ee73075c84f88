"""The processes pool: one child process per slot, each running one job at a time, for
CPU-bound tasks (no GIL to share) and for tasks that must be stoppable.

Each child has a manager thread here that hands it jobs and waits for its answer, its
progress, or its death, whichever comes first (``multiprocessing.connection.wait`` on the
pipe and the process sentinel: no polling). A child that dies mid-job — killed, segfault,
out of memory — fails its job with error type ``WorkerLost`` (retried, like any failure
the service has attempts left for) and is replaced; a job past its hard time limit has
its child killed (``TimeLimitExceeded``). ``max_tasks_per_child`` and
``max_memory_per_child`` (KB) recycle children between jobs.

Children start with ``forkserver`` where the platform has it: the fork server imports the
app once, and each new child is a fork of it, so replacing a child is fast.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from multiprocessing.connection import wait
from queue import SimpleQueue
from typing import Any

from ._child import ChildSpec, child_main
from ._execution import AnyTask, LeasedJob, Report, error_info, job_failure
from ._leases import ActiveLease
from ._limits import Deadline
from ._pools import Pool, PoolHost, limit_report
from .errors import TimeLimitExceeded

logger = logging.getLogger("celeriac.worker")

READY_TIMEOUT = 60.0  # importing a large app can take a while
STOP_TIMEOUT = 5.0
RESTART_BACKOFF = 1.0


class ChildDied(Exception):
    pass


class Child:
    """One child process and the worker's end of its pipe."""

    def __init__(self, ctx: Any, spec: ChildSpec, name: str) -> None:
        self.conn, child_end = ctx.Pipe(duplex=True)
        # Not daemonic: a daemonic process may not start processes of its own, and tasks
        # may want to. The pool stops (or kills) every child itself.
        self.process = ctx.Process(target=child_main, args=(spec, child_end), name=name)
        self.process.start()
        child_end.close()
        self.jobs = 0
        self.rss_kb = 0
        self.killed_for_limit = False
        self._send_lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        pid: int | None = self.process.pid
        return pid

    def wait_ready(self, timeout: float) -> None:
        message = self.receive(timeout)
        if message is None or message[0] != "ready":
            raise ChildDied(f"child {self.pid} did not start (exit code {self.process.exitcode})")

    def send(self, message: tuple[Any, ...]) -> bool:
        try:
            with self._send_lock:  # the manager and the heartbeat thread (cancels) share it
                self.conn.send(message)
            return True
        except OSError:  # it died; the manager finds out from the sentinel
            return False

    def receive(self, timeout: float | None = None) -> tuple[Any, ...] | None:
        """The next message, or None once the child is gone (or ``timeout`` passed)."""
        ready = wait([self.conn, self.process.sentinel], timeout)
        if not ready:
            return None
        # A message sent just before dying is still in the pipe: read it first.
        if self.conn in ready or self.conn.poll():
            try:
                message: tuple[Any, ...] = self.conn.recv()
                return message
            except (EOFError, OSError):
                return None
        return None

    def kill(self, for_limit: bool = False) -> None:
        self.killed_for_limit = self.killed_for_limit or for_limit
        if self.process.is_alive():
            self.process.kill()

    def stop(self) -> None:
        self.send(("stop",))
        self.process.join(STOP_TIMEOUT)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(STOP_TIMEOUT)
        self.conn.close()

    def describe_exit(self) -> str:
        self.process.join(STOP_TIMEOUT)
        code = self.process.exitcode
        if code is not None and code < 0:
            return f"killed by signal {-code}"
        return f"exit code {code}"


class ProcessPool(Pool):
    kind = "processes"

    def __init__(
        self,
        size: int,
        host: PoolHost,
        app_spec: str,
        *,
        max_tasks: int = 0,
        max_memory_kb: int = 0,
    ) -> None:
        super().__init__(size, host)
        self.max_tasks_per_child = max_tasks
        self.max_memory_per_child = max_memory_kb
        self._items: SimpleQueue[tuple[LeasedJob, ActiveLease] | None] = SimpleQueue()
        self._spec = ChildSpec(app_spec, host.worker, *_logging_setup())
        self._ctx = _context(app_spec)
        self._children: dict[int, Child] = {}
        self._lock = threading.Lock()
        self._managers: list[threading.Thread] = []
        self._closing = threading.Event()

    def start(self) -> None:
        for index in range(self.size):
            manager = threading.Thread(
                target=self._manage, args=(index,), name=f"celeriac-child-{index}", daemon=True
            )
            manager.start()
            self._managers.append(manager)

    def submit(self, job: LeasedJob, lease: ActiveLease) -> None:
        self._items.put((job, lease))

    def stop(self, cold: bool) -> None:
        self._closing.set()
        if cold:  # what they run is released already: end it now
            with self._lock:
                for child in self._children.values():
                    child.kill()
        for _ in self._managers:
            self._items.put(None)
        for manager in self._managers:
            manager.join(STOP_TIMEOUT * 2)

    # -- one manager thread per child ----------------------------------------------------

    def _manage(self, index: int) -> None:
        child = self._start_child(index)
        try:
            while (item := self._items.get()) is not None:
                job, lease = item
                report: Report | None = None
                try:
                    report, child = self._run(index, child, job, lease)
                except Exception:
                    logger.exception("worker error while running job %s", job.get("id"))
                finally:
                    self.host.finish(lease, report)
                if child is None or self._worn_out(child):
                    child = self._replace(index, child)
        finally:
            if child is not None:
                child.stop()
            with self._lock:
                self._children.pop(index, None)

    def _start_child(self, index: int) -> Child | None:
        while not self._closing.is_set():
            child = Child(self._ctx, self._spec, f"celeriac-child-{index}")
            with self._lock:
                self._children[index] = child
            try:
                child.wait_ready(READY_TIMEOUT)
                logger.debug("child %d started (pid %s)", index, child.pid)
                return child
            except ChildDied as exc:
                logger.error("%s: retrying in %.0f s", exc, RESTART_BACKOFF)
                child.stop()
                self._closing.wait(RESTART_BACKOFF)
        return None

    def _replace(self, index: int, child: Child | None) -> Child | None:
        if child is not None:
            child.stop()
        return self._start_child(index)

    def _worn_out(self, child: Child) -> bool:
        if self.max_tasks_per_child and child.jobs >= self.max_tasks_per_child:
            logger.info("child %s ran %d jobs: replacing it", child.pid, child.jobs)
            return True
        if self.max_memory_per_child and child.rss_kb > self.max_memory_per_child:
            logger.info("child %s uses %d KB: replacing it", child.pid, child.rss_kb)
            return True
        return False

    def _run(
        self, index: int, child: Child | None, job: LeasedJob, lease: ActiveLease
    ) -> tuple[Report, Child | None]:
        """Run ``job`` on ``child``; returns the report and the child still usable (None:
        it died and must be replaced)."""
        task = self.host.tasks.get(job["task"])
        soft, hard = self.host.limits.for_task(task)
        if child is None or not child.send(("run", job, soft)):
            # Dead before it started the job: a fresh child runs it.
            child = self._replace(index, child)
            if child is None or not child.send(("run", job, soft)):
                return self._lost(task, job, child, "no child process could be started"), None
        running = child
        timer: Deadline | None = None
        if hard:
            timer = self.host.deadlines.after(hard, lambda: running.kill(for_limit=True))
        lease.context.on_cancel(lambda: running.send(("cancel", job["id"])))
        try:
            return self._await(task, job, lease, running)
        finally:
            if timer is not None:
                timer.cancel()

    def _await(
        self, task: AnyTask | None, job: LeasedJob, lease: ActiveLease, child: Child
    ) -> tuple[Report, Child | None]:
        while (message := child.receive()) is not None:
            if message[0] == "progress":
                lease.context.progress = message[2]
            elif message[0] == "done":
                child.jobs += 1
                child.rss_kb = message[2]
                return message[1], child
        return self._lost(task, job, child, child.describe_exit()), None

    def _lost(self, task: AnyTask | None, job: LeasedJob, child: Child | None, how: str) -> Report:
        if child is not None and child.killed_for_limit and task is not None:
            limit = self.host.limits.for_task(task)[1] or 0
            detail = f"the task ran past its time_limit ({limit:g} s): its process was killed"
            logger.error("%s[%s] %s", job["task"], job["id"], detail)
            return limit_report(task, job, TimeLimitExceeded, detail)
        pid = child.pid if child is not None else None
        message = f"the process running the job (pid {pid}) died: {how}"
        logger.error("%s[%s] %s; starting another", job["task"], job["id"], message)
        # Retried: the service decides by the job's attempts whether it runs again.
        return job_failure(job, error_info("WorkerLost", message), retry=True)


def _context(app_spec: str) -> Any:
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" not in methods:
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    # Imported once by the fork server; a failure there is ignored (children import again).
    ctx.set_forkserver_preload(["celeriac._child", app_spec.partition(":")[0]])
    return ctx


def _logging_setup() -> tuple[int, str | None, str | None]:
    """The worker's logging, for its children to write the same way to the same place."""
    root = logging.getLogger()
    log_format: str | None = None
    log_file: str | None = None
    for handler in root.handlers:
        if handler.formatter is not None:
            log_format = handler.formatter._fmt
        if isinstance(handler, logging.FileHandler):
            log_file = handler.baseFilename
    return root.level, log_format, log_file
