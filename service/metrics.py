"""Prometheus metrics (``GET /metrics``, docs/operations.md): counters and histograms
counted from committed work, and queue gauges read from SQL at most once per
``CELERIAC_METRICS_REFRESH_SECONDS`` however often it is scraped.

Each app has its own registry (made by the app factory; nothing global at import). The
counting is cheap on purpose, as it runs on the hot paths' event loop: the runtime hands
``Metrics`` what a commit did (``service.observe.Observer``), and each event costs a dict
look-up for its labelled child and an increment; per-job finishes and times are plain
counters per (queue, task), made into metric families only at scrape time
(``_JobCollector``: prometheus_client's histograms cost three times as much per job).
Labels come from clients (queue and task
names), so each metric holds at most ``MAX_SERIES`` label sets; beyond that, new ones are
counted under ``OTHER`` rather than grow memory without bound."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.effects import Effects, Ended
from service.models import JOBS_TABLE, JobValues
from service.observe import Observer
from service.states import FINISHED, JobStatus

log = logging.getLogger("celeriac.service")

MAX_SERIES = 2000  # label sets per metric; client-chosen names must not exhaust memory
OTHER = "_other"
UNMATCHED = "(unmatched)"  # requests no route matched: one label, not one per raw path
# Job durations run from milliseconds to hours.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, float("inf"))  # fmt: skip
ERROR_LOG_SECONDS = 60.0
RECLAIM_LOG_LINES = 10  # per commit: a mass reclaim is one summary, not a flood
FINAL = tuple(status.value for status in FINISHED)
jobs_c = JOBS_TABLE.c


class _Children:
    """The labelled children of one metric, cached by label values (``labels()`` checks
    and locks on every call), and capped at ``MAX_SERIES``."""

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self.children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self.children.get(values)
        if child is None:
            if len(self.children) >= MAX_SERIES:
                values = (OTHER,) * len(values)
                child = self.children.get(values)
            if child is None:
                child = self.children[values] = self.metric.labels(*values)
        return child


ACTIVE = tuple(status.value for status in JobStatus if status not in FINISHED)
# The final statuses' counts (the bulk of a table: a scan of every finished row) are
# read this many times less often than the active ones (60 s at the default 5 s).
FINAL_EVERY = 12


@dataclass(frozen=True, slots=True)
class QueueSnapshot:
    """The queue gauges as SQL last answered."""

    counts: dict[str, dict[str, int]]  # queue -> status -> jobs
    oldest_queued: dict[str, datetime]
    taken_at: datetime


def _active_counts() -> sa.Select[Any]:
    return (
        sa.select(jobs_c.queue, jobs_c.status, sa.func.count(), sa.func.min(jobs_c.run_at))
        .where(jobs_c.status.in_(ACTIVE))
        .group_by(jobs_c.queue, jobs_c.status)
    )


def _final_counts() -> sa.Select[Any]:
    return (
        sa.select(jobs_c.queue, jobs_c.status, sa.func.count())
        .where(jobs_c.status.in_(FINAL))
        .group_by(jobs_c.queue, jobs_c.status)
    )


def _queue_snapshot(
    session: Session, now: datetime, previous: QueueSnapshot | None, with_final: bool
) -> QueueSnapshot:
    """Counts per queue and status, and the oldest queued job's due time per queue. The
    active statuses are one GROUP BY over the (status, id) index's active ranges: its
    cost follows the jobs in flight, not the table. The final ones (a scan of every
    finished row) only ``with_final``; else as ``previous`` had them."""
    counts: dict[str, dict[str, int]] = {}
    if with_final:
        for queue, status, count in session.execute(_final_counts()):
            counts.setdefault(queue, {})[status] = count
    elif previous is not None:
        for queue, by_status in previous.counts.items():
            final = {status: n for status, n in by_status.items() if status in FINAL}
            if final:
                counts[queue] = final
    oldest: dict[str, datetime] = {}
    for queue, status, count, earliest in session.execute(_active_counts()):
        counts.setdefault(queue, {})[status] = count
        if status == JobStatus.queued and earliest is not None:
            oldest[queue] = earliest
    return QueueSnapshot(counts, oldest, now)


class _QueueCollector(Collector):
    """Yields the last snapshot's gauges at scrape time."""

    def __init__(self) -> None:
        self.snapshot: QueueSnapshot | None = None

    def collect(self) -> Iterator[Metric]:
        counts = GaugeMetricFamily(
            "celeriac_queue_jobs",
            "Jobs per queue and status, from SQL.",
            labels=["queue", "status"],
        )
        oldest = GaugeMetricFamily(
            "celeriac_queue_oldest_age_seconds",
            "Seconds the oldest queued (ready, unleased) job of the queue has waited; 0 when "
            "none is queued. The latency signal to alert and autoscale on.",
            labels=["queue"],
        )
        snapshot = self.snapshot
        if snapshot is not None:
            for queue in sorted(snapshot.counts):
                for status in JobStatus:
                    counts.add_metric([queue, status.value], snapshot.counts[queue].get(status, 0))
                since = snapshot.oldest_queued.get(queue)
                age = 0.0 if since is None else (snapshot.taken_at - since).total_seconds()
                oldest.add_metric([queue], max(age, 0.0))
        yield counts
        yield oldest


BOUNDS = DURATION_BUCKETS[:-1]  # the finite upper bounds; the last bucket is +Inf
_BOUND_LABELS = [floatToGoString(bound) for bound in BOUNDS]  # type: ignore[no-untyped-call]


class _Buckets:
    """One histogram's counts (per bucket, not cumulative) and sum."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BOUNDS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        seconds = max(seconds, 0.0)  # clocks of two replicas may disagree a little
        self.counts[bisect_left(BOUNDS, seconds)] += 1  # first bound >= seconds: "le"
        self.sum += seconds

    def cumulative(self) -> list[tuple[str, float]]:
        total, shown = 0, []
        for label, count in zip((*_BOUND_LABELS, "+Inf"), self.counts, strict=True):
            total += count
            shown.append((label, float(total)))
        return shown


class _TaskStats:
    __slots__ = ("attempts", "finished", "run", "wait")

    def __init__(self) -> None:
        self.finished: dict[str, int] = {}  # final status -> jobs
        self.attempts: dict[str, int] = {}  # outcome -> attempts
        self.run = _Buckets()
        self.wait = _Buckets()


class _JobCollector(Collector):
    """``celeriac_jobs_finished``, ``celeriac_job_attempts`` and the run and wait
    histograms, per (queue, task): at most ``MAX_SERIES`` pairs, then ``OTHER``."""

    def __init__(self) -> None:
        self.stats: dict[tuple[str, str], _TaskStats] = {}

    def of(self, queue: str, task: str) -> _TaskStats:
        stats = self.stats.get((queue, task))
        if stats is None:
            key = (queue, task) if len(self.stats) < MAX_SERIES else (OTHER, OTHER)
            stats = self.stats.get(key) or self.stats.setdefault(key, _TaskStats())
        return stats

    def collect(self) -> Iterator[Metric]:
        finished = CounterMetricFamily(
            "celeriac_jobs_finished", "Jobs that reached a final status.",
            labels=["queue", "task", "status"])  # fmt: skip
        attempts = CounterMetricFamily(
            "celeriac_job_attempts", "Attempts that ended, by outcome: succeeded, retrying, "
            "failed, cancelled, released (handed back unrun) or reclaimed (lease ran out).",
            labels=["queue", "task", "outcome"])  # fmt: skip
        run = HistogramMetricFamily(
            "celeriac_job_run_seconds", "Seconds from lease to report, per attempt.",
            labels=["queue", "task"])  # fmt: skip
        wait = HistogramMetricFamily(
            "celeriac_job_wait_seconds", "Seconds from due (run_at) to lease, per attempt "
            "(observed when the attempt ends).", labels=["queue", "task"])  # fmt: skip
        for (queue, task), stats in list(self.stats.items()):
            for status, count in stats.finished.items():
                finished.add_metric([queue, task, status], count)
            for outcome, count in stats.attempts.items():
                attempts.add_metric([queue, task, outcome], count)
            for family, buckets in ((run, stats.run), (wait, stats.wait)):
                if any(buckets.counts):
                    family.add_metric([queue, task], buckets.cumulative(), buckets.sum)
        yield from (finished, attempts, run, wait)


class Metrics(Observer):
    """The service's metrics; an ``Observer`` the runtime tells what it committed."""

    def __init__(self, refresh_seconds: float = 5.0) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.refresh_seconds = refresh_seconds
        r = self.registry
        self.jobs_submitted = _Children(Counter(
            "celeriac_jobs_submitted", "Jobs stored by submits (not idempotent replays).",
            ["queue"], registry=r))  # fmt: skip
        # Finishes, attempts and their times: per (queue, task) in plain counters, the
        # cheapest thing to update once per job; shown at scrape time (_JobCollector).
        self.jobs = _JobCollector()
        r.register(self.jobs)
        self.leases_granted = _Children(Counter(
            "celeriac_leases_granted", "Jobs leased to HTTP workers.", ["queue"], registry=r
        ))  # fmt: skip
        self.redis_leases = Counter(
            "celeriac_redis_leases_recorded",
            "Leases taken by Redis-protocol workers, recorded in SQL.", registry=r)  # fmt: skip
        self.leases_reclaimed = _Children(Counter(
            "celeriac_leases_reclaimed", "Leases that ran out (worker dead, stuck or lost).",
            ["queue"], registry=r))  # fmt: skip
        self.webhook_deliveries = _Children(Counter(
            "celeriac_webhook_deliveries", "Webhook delivery attempts by outcome: delivered, "
            "pending (will retry), failed (gave up), gone (410).",
            ["outcome"], registry=r))  # fmt: skip
        self.http_requests = _Children(Counter(
            "celeriac_http_requests", "HTTP requests by method, route template and status.",
            ["method", "route", "status"], registry=r))  # fmt: skip
        self.queues = _QueueCollector()
        r.register(self.queues)
        self._refreshing: asyncio.Future[None] | None = None
        self._refreshed_at = float("-inf")
        self._reads = 0  # successful reads: every FINAL_EVERY-th counts the final statuses
        self._failed_at = float("-inf")

    # --- Observer: called by the runtime after commits ---

    # Each catches its own failure: the runtime calls them before it wakes waiters and
    # publishes, which a bug in counting must never stop.

    def submitted(self, rows: Sequence[JobValues]) -> None:
        try:
            for row in rows:
                self.jobs_submitted(row["queue"]).inc()
        except Exception:
            self._failed("submits")

    def leased(self, rows: Sequence[JobValues]) -> None:
        try:
            for row in rows:
                self.leases_granted(row["queue"]).inc()
        except Exception:
            self._failed("leases")

    def committed(self, effects: Effects) -> None:
        try:
            self._committed(effects)
        except Exception:
            self._failed("a commit's effects")

    def _failed(self, what: str) -> None:
        """Log a counting failure, at most once a minute (with its traceback)."""
        now = time.monotonic()
        if now - self._failed_at >= ERROR_LOG_SECONDS:
            self._failed_at = now
            log.exception("metrics: counting %s failed; the work itself is done", what)

    def _committed(self, effects: Effects) -> None:
        if effects.leases_recorded:
            self.redis_leases.inc(effects.leases_recorded)
        reclaims = 0
        for ended in effects.ended:
            self._ended(ended)
            if ended.reclaimed:
                reclaims += 1
                if reclaims <= RECLAIM_LOG_LINES:
                    _log_reclaim(ended)
        if reclaims > RECLAIM_LOG_LINES:
            log.warning("%d more leases ran out in the same sweep", reclaims - RECLAIM_LOG_LINES)

    def webhook_delivered(self, outcome: str) -> None:
        try:
            self.webhook_deliveries(outcome).inc()
        except Exception:
            self._failed("a webhook delivery")

    def _ended(self, ended: Ended) -> None:
        status = str(ended.status)
        stats = self.jobs.of(ended.queue, ended.task)
        if status in FINAL:
            stats.finished[status] = stats.finished.get(status, 0) + 1
        started = ended.started_at
        if started is None:  # cancelled or expired before any lease
            return
        released = status == JobStatus.queued and not ended.reclaimed
        outcome = "reclaimed" if ended.reclaimed else "released" if released else status
        stats.attempts[outcome] = stats.attempts.get(outcome, 0) + 1
        if ended.reclaimed:
            self.leases_reclaimed(ended.queue).inc()
        if released:  # handed back unrun: it waits (and is counted) again
            return
        if ended.ended_at is not None:
            stats.run.observe((ended.ended_at - started).total_seconds())
        if ended.ready_at is not None:
            stats.wait.observe((started - ended.ready_at).total_seconds())

    # --- queue gauges ---

    async def refresh_queues(
        self, read: Callable[[Callable[[Session], QueueSnapshot]], Awaitable[QueueSnapshot]],
        now: Callable[[], datetime],
    ) -> None:  # fmt: skip
        """Re-read the queue gauges if the last read is older than ``refresh_seconds``;
        concurrent scrapes share one read. A failed read keeps the previous values."""
        loop = asyncio.get_running_loop()
        if self._refreshing is None:
            if loop.time() - self._refreshed_at < self.refresh_seconds:
                return
            self._refreshing = asyncio.ensure_future(self._refresh(read, now))
        await asyncio.shield(self._refreshing)

    async def _refresh(
        self, read: Callable[[Callable[[Session], QueueSnapshot]], Awaitable[QueueSnapshot]],
        now: Callable[[], datetime],
    ) -> None:  # fmt: skip
        previous = self.queues.snapshot
        with_final = self._reads % FINAL_EVERY == 0
        try:
            self.queues.snapshot = await read(
                lambda session: _queue_snapshot(session, now(), previous, with_final)
            )
            self._refreshed_at = asyncio.get_running_loop().time()
            self._reads += 1
        finally:
            self._refreshing = None


def _log_reclaim(ended: Ended) -> None:
    fields = {"job_id": ended.id, "task": ended.task, "queue": ended.queue,
              "attempt": ended.attempt, "worker": ended.worker}  # fmt: skip
    log.warning(
        "job %s (%s, attempt %d): the lease of worker %s ran out; now %s",
        ended.id, ended.task, ended.attempt, ended.worker, ended.status, extra=fields,
    )  # fmt: skip


def key_matches(expected: str, presented: str | None) -> bool:
    """Constant-time comparison of the metrics key."""
    if not expected or not presented:
        return False
    return hmac.compare_digest(expected.encode(), presented.encode("utf-8", "surrogateescape"))


class RequestCounter:
    """ASGI middleware: counts each HTTP request by method, route template (``/jobs/{id}``,
    never the raw path) and status. A request that raised counts as 500."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or UNMATCHED
            self.metrics.http_requests(scope["method"], path, str(status)).inc()
