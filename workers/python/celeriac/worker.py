"""The Python worker: leases jobs (over HTTP, or straight from Redis), runs them in a pool,
heartbeats their leases and reports outcomes in batches.

Threads: the leaser (asks for as many jobs as there are free slots, plus a prefetch of
``concurrency x (prefetch_multiplier - 1)`` that waits here for a slot, heartbeated like
the rest), the pool's, one heartbeat thread, one reporter and the registry's. The main
thread waits for a signal and then drives the shutdown (the solo pool runs its jobs there
too): the first SIGTERM/SIGINT is warm (stop leasing, hand back prefetched jobs, finish,
report), the second cold (release unfinished jobs and leave).

The transport (``_transport``) and the pool (``_pools``) are chosen at start; nothing
here depends on which.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections import deque
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from . import _joblog
from ._execution import LeasedJob, Report, error_info, failure, released
from ._http import HttpSession
from ._leases import ActiveLease, Heartbeater, LeaseBook, next_beat_in
from ._limits import Deadlines, TimeLimits
from ._loader import spec_of
from ._metrics import MetricsServer, WorkerMetrics
from ._pools import POOLS, Pool, PoolHost, PoolOptions, make_pool
from ._registry import Registry, RegistryHooks
from ._reporting import FetchHooks, Outbox, Reporter
from ._transport import Grant, Transport
from ._transport_http import HttpTransport
from .app import Celeriac
from .context import JobContext
from .errors import CeleriacError, ServerUnreachable, WorkerShutdown, is_transient

logger = logging.getLogger("celeriac.worker")

MAX_BACKOFF = 10.0
# A cold shutdown waits this long for the release reports before leaving anyway.
COLD_REPORT_SECONDS = 5.0
ASYNC_CONCURRENCY = 100  # coroutines are cheap; CPUs say nothing about how many fit
# As Celery's worker_prefetch_multiplier: a -c 8 worker holds up to 32 jobs, so it leases
# (and the service grants) in batches rather than one job per freed slot. Jobs that run
# for minutes want 1: a prefetched job waits behind them while another worker idles.
DEFAULT_PREFETCH_MULTIPLIER = 4
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


Waiting = tuple[LeasedJob, ActiveLease]


class Slots:
    """Pool slots, and the prefetched jobs waiting for one. Only the leaser adds jobs,
    so room it saw stays free until it fills it. A slot a job leaves goes straight to the
    next waiting job. ``changed`` also wakes the main thread during shutdown."""

    def __init__(self, total: int, prefetch: int = 0) -> None:
        self.total = total
        self.prefetch = prefetch
        self.busy = 0
        self.waiting: deque[Waiting] = deque()
        # A lease request is out (the leaser's, or a report's ``next``): one at a time,
        # so the room each saw stays theirs.
        self.asking = False
        self.changed = threading.Condition(threading.RLock())

    def wait_room(self, stopping: threading.Event, quiet: threading.Event) -> int:
        """Once there is room, how many jobs to lease. With a prefetch, the leaser waits
        until a whole pool's worth is free (few large leases, not many of one job), or
        until a slot is idle."""
        with self.changed:
            self.changed.wait_for(
                lambda: (
                    stopping.is_set()
                    or (not quiet.is_set() and not self.asking and self._worth_leasing())
                )
            )
            self.asking = not stopping.is_set()
            return self._room()

    def take_turn(self) -> int:
        """For a report's ``next``: how many jobs to ask for (0: none now, or the leaser
        is asking already). Non-zero holds the leaser off until ``done_asking``."""
        with self.changed:
            if self.asking or not self._worth_leasing() or self._room() <= 0:
                return 0
            self.asking = True
            return self._room()

    def done_asking(self) -> None:
        with self.changed:
            self.asking = False
            self.changed.notify_all()

    def _room(self) -> int:
        return self.total + self.prefetch - self.busy - len(self.waiting)

    def _worth_leasing(self) -> bool:
        return self.busy < self.total or self._room() >= self.total

    def admit(self, jobs: list[Waiting]) -> list[Waiting]:
        """Slots for as many of ``jobs`` as fit, returned to start now; the rest wait."""
        with self.changed:
            now = jobs[: max(0, self.total - self.busy)]
            self.busy += len(now)
            self.waiting.extend(jobs[len(now) :])
            return now

    def release(self, take_next: bool = True) -> Waiting | None:
        """A job left its slot: hand the slot to the next waiting job (returned, for the
        caller to start) or free it."""
        with self.changed:
            following = self.waiting.popleft() if take_next and self.waiting else None
            if following is None:
                self.busy -= 1
            self.changed.notify_all()
            return following

    def drop_waiting(self) -> list[Waiting]:
        """The jobs that never got a slot (a shutdown hands them back)."""
        with self.changed:
            dropped = list(self.waiting)
            self.waiting.clear()
            self.changed.notify_all()
            return dropped

    def wait_for(self, predicate: Callable[[], bool]) -> None:
        with self.changed:
            self.changed.wait_for(predicate)

    def wake(self) -> None:
        with self.changed:
            self.changed.notify_all()


def default_concurrency(pool: str) -> int:
    if pool == "solo":
        return 1
    if pool == "async":
        return ASYNC_CONCURRENCY
    return os.cpu_count() or 1


class Worker:
    """Runs the jobs of ``app``'s tasks from ``queues`` (in priority order), at most
    ``concurrency`` at a time, in a ``pool`` (threads, processes, async or solo).

    ``broker`` (a ``redis://`` URL) leases straight from Redis with the Redis protocol,
    keys under ``{redis_prefix}``; without it, jobs come over HTTP from the app's server.
    ``poll_wait`` is how long one lease request may wait for work; a shutdown ends the
    request in flight rather than waiting it out. Time limits are defaults for tasks
    that set none (docs/python.md, "Pools and time limits"); ``max_tasks_per_child`` and
    ``max_memory_per_child`` (KB) recycle the processes pool's children. ``app_spec``
    (``module:attribute``) is what those children import; by default, found in
    ``sys.modules``.
    """

    def __init__(
        self,
        app: Celeriac,
        *,
        queues: Sequence[str] = ("default",),
        concurrency: int | None = None,
        lease_seconds: float | None = None,
        hostname: str | None = None,
        poll_wait: float = 10.0,
        pool: str = "threads",
        broker: str | None = None,
        redis_prefix: str = "celeriac",
        soft_time_limit: float | None = None,
        time_limit: float | None = None,
        max_tasks_per_child: int = 0,
        max_memory_per_child: int = 0,
        app_spec: str | None = None,
        register: bool = True,
        prefetch_multiplier: int = DEFAULT_PREFETCH_MULTIPLIER,
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
    ) -> None:
        if pool not in POOLS:
            raise ValueError(f"unknown pool {pool!r}: choose from {', '.join(POOLS)}")
        if prefetch_multiplier < 1:
            raise ValueError("prefetch_multiplier must be at least 1 (1: no prefetch)")
        self.app = app
        self.queues = list(queues)
        self.concurrency = 1 if pool == "solo" else concurrency or default_concurrency(pool)
        self.hostname = hostname or f"{os.getpid()}@{socket.gethostname()}"
        self.poll_wait = poll_wait
        self._http = HttpSession(app.server, app.api_key)
        self._transport = self._make_transport(broker, redis_prefix, lease_seconds, poll_wait)
        self._slots = Slots(self.concurrency, self.concurrency * (prefetch_multiplier - 1))
        self._book = LeaseBook()
        self._outbox = Outbox()
        self._deadlines = Deadlines()
        host = PoolHost(
            tasks=app.tasks, worker=self.hostname, finish=self._finish, abandon=self._abandon,
            deadlines=self._deadlines, limits=TimeLimits(soft_time_limit, time_limit),
        )  # fmt: skip
        options = PoolOptions(
            kind=pool, app_spec=app_spec or (spec_of(app) if pool == "processes" else None),
            max_tasks_per_child=max_tasks_per_child, max_memory_per_child=max_memory_per_child,
        )  # fmt: skip
        self._pool: Pool = make_pool(self.concurrency, host, options)
        self._heartbeater = Heartbeater(self._transport, self._book)
        # Report-and-fetch over HTTP (Redis leases are one blocking pop away already):
        # a report asks for jobs when the leaser is not asking already. Not the other
        # way round (the leaser leaving every lease to the reports): measured slower,
        # as a report's answer then waits for the lease and the pool runs dry.
        fetch = None
        if isinstance(self._transport, HttpTransport):
            fetch = FetchHooks(self._take_turn, self._leased_by_report)
        self._reporter = Reporter(
            self._transport, self._outbox, self._book, self._slots.wake, fetch
        )
        self._registry = self._make_registry() if register else None
        self._stopping = threading.Event()
        self._cold = threading.Event()
        self._quiet = threading.Event()
        self._leaser_done = threading.Event()
        self._fatal: Exception | None = None
        # --metrics-port (celeriac._metrics); off, it costs nothing per job. The port is
        # bound here, so that one in use fails the start (OSError), not a thread later.
        self.metrics: WorkerMetrics | None = None
        self._metrics_server: MetricsServer | None = None
        if metrics_port is not None:
            self.metrics = self._make_metrics()
            self._metrics_server = MetricsServer(self.metrics, metrics_host, metrics_port)

    def _make_transport(
        self, broker: str | None, prefix: str, lease_seconds: float | None, poll_wait: float
    ) -> Transport:
        if broker:
            if not broker.startswith(REDIS_SCHEMES):
                raise ValueError(f"--broker must be a redis:// URL, not {broker!r}")
            from ._transport_redis import RedisTransport

            try:
                return RedisTransport(
                    broker, prefix=prefix, worker=self.hostname, queues=self.queues,
                    lease_seconds=lease_seconds, poll_wait=poll_wait,
                )  # fmt: skip
            except ModuleNotFoundError as exc:  # an extra: worker machines on HTTP skip it
                if exc.name != "redis":
                    raise
                raise ValueError(
                    "--broker needs the redis extra (hiredis, and redis-py for TLS or "
                    "connection options), which the SDK installs only when asked: "
                    "pip install 'celeriac[redis]'"
                ) from None
        return HttpTransport(
            self._http, worker=self.hostname, queues=self.queues,
            lease_seconds=lease_seconds, poll_wait=poll_wait,
        )  # fmt: skip

    def _make_metrics(self) -> WorkerMetrics:
        slots = self._slots
        gauges = {
            "celeriac_worker_busy_slots": ("Pool slots running a job.", lambda: slots.busy),
            "celeriac_worker_prefetched_jobs": (
                "Leased jobs waiting for a slot.", lambda: len(slots.waiting)),
            "celeriac_worker_concurrency": ("Pool slots.", lambda: slots.total),
        }  # fmt: skip
        return WorkerMetrics(self.hostname, gauges)

    def _make_registry(self) -> Registry:
        about: dict[str, Any] = {
            "name": self.hostname[:200],
            "hostname": socket.gethostname()[:255] or "unknown",
            "pid": os.getpid(),
            "queues": self.queues,
            "concurrency": self.concurrency,
            "pool": self._pool.kind,
            "version": _version(),
        }
        hooks = RegistryHooks(self._book.job_ids, self.quiet, self.stop)
        return Registry(self._http, about, hooks)

    def run(self) -> int:
        """Work until told to stop; the exit status: 0 after a warm shutdown, 1 after a
        cold one or when the service refuses this worker."""
        self._install_signal_handlers()
        _joblog.install()  # what tasks log is sent with their reports
        logger.info(
            "worker %s: %s transport (%s), %s pool, queues %s, concurrency %d, tasks: %s",
            self.hostname, self._transport.name, self._where(), self._pool.kind,
            ",".join(self.queues), self.concurrency, ", ".join(sorted(self.app.tasks)) or "(none)",
        )  # fmt: skip
        if self._metrics_server is not None:
            self._metrics_server.start()
            logger.info("metrics on http://%s:%d/metrics", *self._metrics_server.address)
        # Daemon threads: after a cold shutdown some may still be blocked in I/O or in a
        # task, and must not keep the process alive.
        self._pool.start()
        _start(self._lease_loop, "celeriac-leaser")
        _start(self._heartbeater.run, "celeriac-heartbeat")
        _start(self._reporter.run, "celeriac-reporter")
        if self._registry is not None:
            _start(self._registry.run, "celeriac-registry")
        self._pool.serve(self._stopping, self._may_leave)
        return self._shutdown()

    def _where(self) -> str:
        return str(getattr(self._transport, "url", self._http.server)).split("@")[-1]

    def stop(self, cold: bool = False) -> None:
        """What a signal does; callable from any thread."""
        if cold:
            self._cold.set()
        first = not self._stopping.is_set()
        self._stopping.set()
        self._slots.wake()
        self._pool.wake()
        if first:
            # A thread of its own: this may run in a signal handler, which must not do
            # I/O or take the outbox's lock itself.
            _start(self._begin_stopping, "celeriac-stopping")

    def _begin_stopping(self) -> None:
        # Held jobs go back now, not after the running ones finish: another worker may
        # run them meanwhile. And an idle worker must not sit out its long-poll.
        self._hand_back_waiting()
        self._transport.end_wait()

    def _hand_back_waiting(self) -> None:
        for _, lease in self._slots.drop_waiting():
            self._release(lease)  # prefetched, never started: straight back to the queue

    def quiet(self) -> None:
        """Lease no more jobs; running ones finish. (The service's ``quiet`` command.)"""
        self._quiet.set()

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # embedded in another program: it calls stop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        signal.signal(signal.SIGQUIT, self._on_quit_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if not self._stopping.is_set():
            logger.info("%s: warm shutdown, finishing %d running jobs", name, self._slots.busy)
            self.stop()
            return
        logger.warning("%s again: cold shutdown, releasing unfinished jobs", name)
        self._stop_cold()

    def _on_quit_signal(self, signum: int, frame: FrameType | None) -> None:
        # As in Celery: SIGQUIT is a cold shutdown at once, without a warm one first.
        logger.warning("SIGQUIT: cold shutdown, releasing unfinished jobs")
        self._stop_cold()

    def _stop_cold(self) -> None:
        self.stop(cold=True)
        if self._pool.interrupt_main():
            raise WorkerShutdown  # break off the task the solo pool runs right here

    # -- leasing ---------------------------------------------------------------------

    def _lease_loop(self) -> None:
        backoff = 0.0
        try:
            while not self._stopping.is_set():
                if self._quiet.is_set():
                    logger.info("quiet: leasing stopped (running jobs go on)")
                free = self._slots.wait_room(self._stopping, self._quiet)
                if self._stopping.is_set():
                    break
                try:
                    grants = self._transport.lease(free)
                except (ServerUnreachable, CeleriacError) as exc:
                    self._slots.done_asking()
                    if self._stopping.is_set():
                        break  # the long-poll was ended for the shutdown
                    if isinstance(exc, CeleriacError) and not is_transient(exc):
                        self._fail(exc)
                        break
                    if self.metrics is not None:
                        self.metrics.lease_failed()
                    backoff = min(MAX_BACKOFF, backoff * 2 or 0.5)
                    logger.warning("leasing failed, retrying in %.1fs: %s", backoff, exc)
                    self._stopping.wait(backoff)
                    continue
                backoff = 0.0
                if grants:
                    self._start_jobs(grants)
                self._slots.done_asking()  # after admitting them: the room is counted
        finally:
            self._leaser_done.set()
            self._slots.wake()
            self._pool.wake()

    def _start_jobs(self, grants: list[Grant]) -> None:
        beats: dict[float, float] = {}  # leases granted together mostly share a length
        leases = []
        for grant in grants:
            job = grant.job
            if grant.lease_left not in beats:
                beats[grant.lease_left] = next_beat_in(grant.lease_left)
            context = JobContext(
                job["id"], job["task"], job["attempt"], job["queue"], self.hostname
            )
            if "parents" in job:  # a workflow job (docs/workflows.md)
                context.parents, context.parent_status = job["parents"], job["parent_status"]
            leases.append(
                ActiveLease(
                    job["id"], grant.token, context, beats[grant.lease_left], grant.lease_seconds
                )
            )
        self._book.add(leases)
        if self._stopping.is_set():
            # Leased while the poll was out: hand them straight back, they never started.
            for lease in leases:
                self._release(lease)
            return
        logger.debug("leased %d jobs", len(leases))
        if self.metrics is not None:
            self.metrics.jobs_leased(len(leases))
        jobs = [(grant.job, lease) for grant, lease in zip(grants, leases, strict=True)]
        for job, lease in self._slots.admit(jobs):
            self._submit(job, lease)

    def _submit(self, job: LeasedJob, lease: ActiveLease) -> None:
        if self.metrics is not None:
            self.metrics.job_started(lease.job_id)
        self._pool.submit(job, lease)

    def _take_turn(self) -> int:
        if self._stopping.is_set() or self._quiet.is_set():
            return 0
        return self._slots.take_turn()

    def _leased_by_report(self, grants: list[Grant]) -> None:
        if grants:
            self._start_jobs(grants)
        self._slots.done_asking()

    def _release(self, lease: ActiveLease) -> None:
        if lease.settle():
            self._outbox.put(released(lease.job_id, lease.token))

    def _fail(self, exc: Exception) -> None:
        logger.error("the service refused this worker, stopping: %s", exc)
        self._fatal = exc
        self.stop()

    # -- what the pools call -----------------------------------------------------------

    def _finish(self, lease: ActiveLease, report: Report | None) -> None:
        """A job left its pool: report it (unless a cold shutdown released it, or its hard
        limit reported it already) and free its slot (unless that happened at the limit)."""
        if report is None:  # the worker failed, not the task: let it run again
            error = error_info("WorkerError", "the worker failed to run the job (see its log)")
            report = failure(lease.job_id, lease.token, error, retry=True)
        if lease.settle():
            self._outbox.put(report)
            if self.metrics is not None:
                self.metrics.job_finished(lease.job_id, lease.context.task, report.outcome)
        if lease.end():
            self._free_slot()

    def _abandon(self, lease: ActiveLease, report: Report) -> bool:
        """A job past its hard limit that its pool cannot stop: report it now and free its
        slot while it goes on running. False if it finished first."""
        if not lease.end():
            return False
        if lease.settle():
            self._outbox.put(report)
        self._free_slot()
        return True

    def _free_slot(self) -> None:
        following = self._slots.release(take_next=not self._stopping.is_set())
        if following is not None:
            self._submit(*following)

    # -- shutdown --------------------------------------------------------------------

    def _may_leave(self) -> bool:
        return self._stopping.is_set() and (self._cold.is_set() or self._drained())

    def _shutdown(self) -> int:
        self._slots.wait_for(lambda: self._cold.is_set() or self._drained())
        if self._cold.is_set():
            return self._cold_shutdown()
        self._hand_back_waiting()  # any admitted while the stop began
        self._outbox.close()
        # Wait for the last reports; a second signal cuts this short too.
        self._slots.wait_for(lambda: self._cold.is_set() or self._reporter.done.is_set())
        if self._cold.is_set():
            self._reporter.give_up.set()
        self._close(cold=False)
        logger.info("worker %s stopped", self.hostname)
        return 1 if self._fatal or self._cold.is_set() else 0

    def _drained(self) -> bool:
        return self._leaser_done.is_set() and self._slots.busy == 0

    def _cold_shutdown(self) -> int:
        self._slots.drop_waiting()  # released below with the rest of the book
        unfinished = [lease for lease in self._book.snapshot() if not lease.settled]
        for lease in unfinished:
            self._release(lease)
            lease.context.request_cancel()  # tasks that check it stop burning CPU
        # The long-poll in flight may bring those very jobs back: let it return, so that
        # what it brings is released too rather than stranded until its lease ends.
        self._leaser_done.wait(self.poll_wait + COLD_REPORT_SECONDS)
        self._outbox.close()
        if not self._reporter.done.wait(COLD_REPORT_SECONDS):
            self._reporter.give_up.set()
        logger.warning("cold shutdown: released %d unfinished jobs", len(unfinished))
        self._close(cold=True)
        return 1

    def _close(self, cold: bool) -> None:
        if self._metrics_server is not None:
            self._metrics_server.stop()
        if self._registry is not None:
            self._registry.stop()
        self._heartbeater.stop()
        self._deadlines.stop()
        self._pool.stop(cold)
        self._transport.close()
        self._http.close()


def _start(target: Callable[[], None], name: str) -> threading.Thread:
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


def _version() -> str:
    from . import __version__

    return __version__[:64]
