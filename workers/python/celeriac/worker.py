"""The Python worker: leases jobs over HTTP, runs them on a thread pool, heartbeats
their leases and reports outcomes in batches.

Threads: the leaser (``POST /leases`` for exactly as many jobs as there are free pool
threads, so nothing waits here while another worker could run it), the pool, one
heartbeat thread and one reporter. The main thread only waits for a signal and then
drives the shutdown: the first SIGTERM/SIGINT is warm (stop leasing, finish, report),
the second cold (release unfinished jobs and leave).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from ._execution import AsyncLoop, LeasedJob, released, run_job
from ._leases import ActiveLease, Heartbeater, LeaseBook, next_beat_for
from ._pool import ThreadPool
from ._reporting import Outbox, Outcome, Reporter
from .app import Celeriac
from .context import JobContext
from .errors import CeleriacError, ServerUnreachable, is_transient

logger = logging.getLogger("celeriac.worker")

MAX_BACKOFF = 10.0
MAX_LEASE_JOBS = 1000  # the API's limit on one POST /leases
# A cold shutdown waits this long for the release reports before leaving anyway.
COLD_REPORT_SECONDS = 5.0


class Slots:
    """Free pool threads. Only the leaser takes slots, so a count it saw free stays free
    until it takes them. ``changed`` also wakes the main thread during shutdown."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.busy = 0
        self.changed = threading.Condition(threading.RLock())

    def wait_free(self, stopping: threading.Event) -> int:
        with self.changed:
            self.changed.wait_for(lambda: stopping.is_set() or self.busy < self.total)
            return self.total - self.busy

    def take(self) -> None:
        with self.changed:
            self.busy += 1

    def release(self) -> None:
        with self.changed:
            self.busy -= 1
            self.changed.notify_all()

    def wait_for(self, predicate: Callable[[], bool]) -> None:
        with self.changed:
            self.changed.wait_for(predicate)

    def wake(self) -> None:
        with self.changed:
            self.changed.notify_all()


class Worker:
    """Runs the jobs of ``app``'s tasks from ``queues`` (in priority order), at most
    ``concurrency`` at a time. ``poll_wait`` is how long one lease request may wait for
    work; a warm shutdown waits for the request in flight, so it also bounds that."""

    def __init__(
        self,
        app: Celeriac,
        *,
        queues: Sequence[str] = ("default",),
        concurrency: int | None = None,
        lease_seconds: float | None = None,
        hostname: str | None = None,
        poll_wait: float = 10.0,
    ) -> None:
        self.app = app
        self.queues = list(queues)
        self.concurrency = concurrency or os.cpu_count() or 1
        self.lease_seconds = lease_seconds
        self.hostname = hostname or f"{os.getpid()}@{socket.gethostname()}"
        self.poll_wait = poll_wait
        self._client = app.new_client()
        self._slots = Slots(self.concurrency)
        self._book = LeaseBook()
        self._outbox = Outbox()
        self._loop = AsyncLoop()
        self._pool: ThreadPool[tuple[LeasedJob, ActiveLease]] = ThreadPool(
            self.concurrency, self._run_job, "celeriac-job"
        )
        self._heartbeater = Heartbeater(self._client, self._book, lease_seconds)
        self._reporter = Reporter(self._client, self._outbox, self._book, self._slots.wake)
        self._stopping = threading.Event()
        self._cold = threading.Event()
        self._leaser_done = threading.Event()
        self._fatal: Exception | None = None

    def run(self) -> int:
        """Work until told to stop; the exit status: 0 after a warm shutdown, 1 after a
        cold one or when the service refuses this worker."""
        self._install_signal_handlers()
        logger.info(
            "worker %s: server %s, queues %s, concurrency %d, tasks: %s",
            self.hostname, self._client.server, ",".join(self.queues), self.concurrency,
            ", ".join(sorted(self.app.tasks)) or "(none)",
        )  # fmt: skip
        # Daemon threads: after a cold shutdown some may still be blocked in I/O or in a
        # task, and must not keep the process alive.
        self._pool.start()
        _start(self._lease_loop, "celeriac-leaser")
        _start(self._heartbeater.run, "celeriac-heartbeat")
        _start(self._reporter.run, "celeriac-reporter")
        self._stopping.wait()
        return self._shutdown()

    def stop(self, cold: bool = False) -> None:
        """What a signal does; callable from any thread."""
        if cold:
            self._cold.set()
        self._stopping.set()
        self._slots.wake()

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # embedded in another program: it calls stop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self._stopping.is_set():
            logger.warning("%s again: cold shutdown, releasing unfinished jobs", name)
            self.stop(cold=True)
        else:
            logger.info("%s: warm shutdown, finishing %d running jobs", name, self._slots.busy)
            self.stop()

    # -- leasing ---------------------------------------------------------------------

    def _lease_loop(self) -> None:
        backoff = 0.0
        try:
            while not self._stopping.is_set():
                free = self._slots.wait_free(self._stopping)
                if self._stopping.is_set():
                    break
                try:
                    jobs = self._lease(free)
                except (ServerUnreachable, CeleriacError) as exc:
                    if not is_transient(exc):
                        self._fail(exc)
                        break
                    backoff = min(MAX_BACKOFF, backoff * 2 or 0.5)
                    logger.warning("leasing failed, retrying in %.1fs: %s", backoff, exc)
                    self._stopping.wait(backoff)
                    continue
                backoff = 0.0
                self._start_jobs(jobs)
        finally:
            self._leaser_done.set()
            self._slots.wake()

    def _lease(self, max_jobs: int) -> list[LeasedJob]:
        body: dict[str, Any] = {
            "worker": self.hostname,
            "queues": self.queues,
            "max_jobs": min(max_jobs, MAX_LEASE_JOBS),
            "wait": self.poll_wait,
        }
        if self.lease_seconds:
            body["lease_seconds"] = self.lease_seconds
        answer = self._client.request("POST", "/leases", json=body, wait=self.poll_wait)
        jobs: list[LeasedJob] = answer["jobs"]
        logger.debug("leased %d jobs (asked for %d)", len(jobs), max_jobs)
        return jobs

    def _start_jobs(self, jobs: list[LeasedJob]) -> None:
        # Jobs leased together mostly share an expiry: parse each distinct one once.
        beats: dict[str, float] = {}
        for job in jobs:
            token, expires_at = job["lease"]["token"], job["lease"]["expires_at"]
            if expires_at not in beats:
                beats[expires_at] = next_beat_for(expires_at)
            context = JobContext(
                job["id"], job["task"], job["attempt"], job["queue"], self.hostname
            )
            lease = ActiveLease(job["id"], token, context, beats[expires_at])
            self._book.add(lease)
            if self._stopping.is_set():
                # Leased while the poll was out: hand it straight back, it never started.
                self._release(lease)
                continue
            self._slots.take()
            self._pool.submit((job, lease))

    def _release(self, lease: ActiveLease) -> None:
        if lease.settle():
            self._outbox.put(
                Outcome(lease.job_id, lease.token, released(lease.job_id, lease.token))
            )

    def _fail(self, exc: Exception) -> None:
        logger.error("the service refused this worker, stopping: %s", exc)
        self._fatal = exc
        self.stop()

    # -- running ---------------------------------------------------------------------

    def _run_job(self, item: tuple[LeasedJob, ActiveLease]) -> None:
        job, lease = item
        try:
            report = run_job(self.app.tasks.get(job["task"]), job, lease.context, self._loop)
            if lease.settle():  # not already released by a cold shutdown
                self._outbox.put(Outcome(lease.job_id, lease.token, report))
        except Exception:  # a bug here must not leak the slot or kill the pool thread quietly
            logger.exception("worker error while running job %s", job.get("id"))
        finally:
            self._slots.release()

    # -- shutdown --------------------------------------------------------------------

    def _shutdown(self) -> int:
        self._slots.wait_for(lambda: self._cold.is_set() or self._drained())
        if self._cold.is_set():
            return self._cold_shutdown()
        self._outbox.close()
        # Wait for the last reports; a second signal cuts this short too.
        self._slots.wait_for(lambda: self._cold.is_set() or self._reporter.done.is_set())
        if self._cold.is_set():
            self._reporter.give_up.set()
        self._close()
        logger.info("worker %s stopped", self.hostname)
        return 1 if self._fatal or self._cold.is_set() else 0

    def _drained(self) -> bool:
        return self._leaser_done.is_set() and self._slots.busy == 0

    def _cold_shutdown(self) -> int:
        unfinished = [lease for lease in self._book.snapshot() if not lease.settled]
        for lease in unfinished:
            self._release(lease)
            lease.context.request_cancel()  # tasks that check it stop burning CPU
        self._outbox.close()
        if not self._reporter.done.wait(COLD_REPORT_SECONDS):
            self._reporter.give_up.set()
        logger.warning("cold shutdown: released %d unfinished jobs", len(unfinished))
        self._close()
        return 1

    def _close(self) -> None:
        self._heartbeater.stop()
        self._loop.stop()
        self._pool.stop()
        self._client.close()


def _start(target: Callable[[], None], name: str) -> threading.Thread:
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread
