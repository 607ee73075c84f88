"""A processes-pool child: imports the app, then runs one job at a time in its main thread.

Messages over its pipe to the worker (``_procpool``):

    worker → child   ("run", job, soft_limit)   ("cancel", job_id)   ("stop",)
    child → worker   ("ready", pid)   ("progress", job_id, progress)   ("done", report, rss_kb)

A reader thread takes the worker's messages, so a cancel reaches a task busy in the main
thread. The soft time limit is ``SIGALRM`` here; the hard one is the worker killing this
process. If the worker goes away (its end of the pipe closes), so does the child.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import resource
import signal
import threading
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Connection
from queue import SimpleQueue
from typing import Any

from . import _joblog, _logging
from ._execution import AnyTask, LeasedJob, call_task, run_job
from ._limits import AlarmLimits
from ._loader import load_app
from .context import JobContext

logger = logging.getLogger("celeriac.worker")


@dataclass(frozen=True)
class ChildSpec:
    app: str  # module:attribute, imported by the child
    worker: str  # the worker's name, for current_job.worker
    log_level: int
    log_format: str | None
    log_file: str | None


def rss_kb() -> int:
    """Resident memory now (Linux), else the peak so far."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class _Child:
    def __init__(self, spec: ChildSpec, conn: Connection) -> None:
        self.spec = spec
        self.conn = conn
        self.inbox: SimpleQueue[tuple[LeasedJob, float | None] | None] = SimpleQueue()
        self.current: JobContext | None = None
        self._send_lock = threading.Lock()

    def send(self, message: tuple[Any, ...]) -> None:
        with self._send_lock:  # progress may come from the task's own threads
            self.conn.send(message)

    def read(self) -> None:
        try:
            while True:
                message = self.conn.recv()
                if message[0] == "run":
                    self.inbox.put((message[1], message[2]))
                elif message[0] == "cancel":
                    current = self.current
                    if current is not None and current.job_id == message[1]:
                        current.request_cancel()
                else:
                    self.inbox.put(None)
                    return
        except (EOFError, OSError):
            # The worker is gone (killed?): nobody is left to report to or to stop us.
            os._exit(0)

    def serve(self, tasks: dict[str, AnyTask]) -> None:
        alarm = AlarmLimits()
        self.send(("ready", os.getpid()))
        while (item := self.inbox.get()) is not None:
            job, soft = item
            context = JobContext(
                job["id"], job["task"], job["attempt"], job["queue"], self.spec.worker
            )
            if "parents" in job:  # a workflow job (docs/workflows.md)
                context.parents, context.parent_status = job["parents"], job["parent_status"]
            context.on_progress(partial(self._progress, job["id"]))
            self.current = context
            task = tasks.get(job["task"])
            report = run_job(task, job, context, partial(_invoke, alarm, soft))
            self.current = None
            self.send(("done", report, rss_kb()))

    def _progress(self, job_id: str, progress: dict[str, Any]) -> None:
        self.send(("progress", job_id, progress))


def _invoke(
    alarm: AlarmLimits, soft: float | None, task: AnyTask, job: LeasedJob, context: JobContext
) -> Any:
    return alarm.call(soft, None, partial(call_task, task, job, context))


def _configure_logging(spec: ChildSpec) -> None:
    # Watched: after logrotate moves the file away (and SIGHUPs the worker, which
    # reopens its own), a child's next record goes to the new file, with no signal of
    # its own to handle.
    handler: logging.Handler
    if spec.log_file:
        handler = logging.handlers.WatchedFileHandler(spec.log_file, encoding="utf-8")
    else:
        handler = logging.StreamHandler()
    if spec.log_format:  # a %-format string, or "json" (celeriac._logging.JsonFormatter)
        handler.setFormatter(_logging.formatter(spec.log_format, spec.worker))
    logging.basicConfig(level=spec.log_level, handlers=[handler], force=True)
    _joblog.install()  # after basicConfig(force=True), which drops the root's handlers


def child_main(spec: ChildSpec, conn: Connection) -> None:
    """The child process's entry point."""
    # Ctrl-C reaches the whole process group: the worker decides what a signal means
    # (a warm shutdown lets running jobs finish), not each child.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _configure_logging(spec)
    child = _Child(spec, conn)
    app = load_app(spec.app)
    threading.Thread(target=child.read, name="celeriac-child-reader", daemon=True).start()
    child.serve(app.tasks)
