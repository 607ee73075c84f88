"""The dashboard's overview: every queue's counts, its oldest waiting job, whether it is
paused, and the last hour's throughput and failures in five-minute buckets.

The counts are a GROUP BY over the whole jobs table, which on millions of rows costs
tenths of a second: they are computed at most once per ``TTL_SECONDS`` per process, by
one request while the others wait for it, whatever the number of open dashboards. The
throughput reads only the last hour's finished jobs, through the ``finished_at`` index."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service import flow, jobs
from service.auth import Principal
from service.models import JOBS_TABLE
from service.runtime import Runtime
from service.states import JobStatus

TTL_SECONDS = 5.0
BUCKET_SECONDS = 300
BUCKETS = 12  # an hour
STEP = timedelta(seconds=BUCKET_SECONDS)
Counts = dict[tuple[str, str], int]  # (queue, "succeeded" | "failed") -> jobs
FINISHED_KINDS = {
    JobStatus.succeeded: "succeeded",
    JobStatus.failed: "failed",
    JobStatus.cancelled: "failed",
    JobStatus.expired: "failed",
}


class Overview:
    """The cached overview of one service process (``app.state.ui_overview``)."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._at = 0.0
        self._body: dict[str, Any] | None = None
        self._closed: dict[datetime, Counts] = {}  # counted buckets of the last hour

    async def read(self, runtime: Runtime, principal: Principal) -> dict[str, Any]:
        async with self._lock:
            if self._body is None or time.monotonic() - self._at > TTL_SECONDS:
                now = runtime.clock.now()
                closed = self._closed
                self._body = await runtime.db.read(lambda s: _overview(s, now, closed))
                self._at = time.monotonic()
            body = self._body
        return _visible(body, principal)


def _visible(body: dict[str, Any], principal: Principal) -> dict[str, Any]:
    """Only the queues the caller's key may use."""
    if principal.queues is None:
        return body
    allowed = principal.allows_queue
    return {
        **body,
        "queues": [q for q in body["queues"] if allowed(q["name"])],
        "throughput": {
            **body["throughput"],
            "series": [s for s in body["throughput"]["series"] if allowed(s["queue"])],
        },
    }


def _overview(session: Session, now: datetime, closed: dict[datetime, Counts]) -> dict[str, Any]:
    stats = jobs.queue_stats(session)
    paused = flow.paused_queues(session, [s["name"] for s in stats])
    queues = [
        {
            "name": s["name"],
            "counts": s["counts"],
            "oldest_queued_age_seconds": _age(s["oldest_queued_at"], now),
            "paused": s["name"] in paused,
        }
        for s in stats
    ]
    throughput = _throughput(session, now, closed)
    return {"generated_at": now.isoformat(), "queues": queues, "throughput": throughput}


def _age(since: datetime | None, now: datetime) -> float | None:
    return None if since is None else max((now - since).total_seconds(), 0.0)


def _throughput(session: Session, now: datetime, closed: dict[datetime, Counts]) -> dict[str, Any]:
    """Finished jobs per queue per five minutes over the last hour, split into succeeded
    and failed (failed, cancelled, expired); the last bucket is the one still filling.
    Closed buckets are counted once and kept in ``closed``; only the filling one and any
    not yet counted are read, grouped in SQL."""
    current = _bucket_start(now)
    starts = [current - timedelta(seconds=BUCKET_SECONDS * i) for i in range(BUCKETS)][::-1]
    missing = [b for b in starts[:-1] if b not in closed]
    counted = _count(session, missing[0] if missing else current, current + STEP)
    for bucket in missing:
        closed[bucket] = counted.get(bucket, {})
    for old in [b for b in closed if b < starts[0]]:
        del closed[old]
    filling = counted.get(current, {})
    per_queue: dict[str, dict[str, list[int]]] = {}
    for index, bucket in enumerate(starts):
        counts = filling if bucket == current else closed.get(bucket, {})
        for (queue, kind), count in counts.items():
            empty = {"succeeded": [0] * BUCKETS, "failed": [0] * BUCKETS}
            per_queue.setdefault(queue, empty)[kind][index] += count
    return {
        "start": starts[0].isoformat(),
        "bucket_seconds": BUCKET_SECONDS,
        "series": [{"queue": q, **counts} for q, counts in sorted(per_queue.items())],
    }


def _count(session: Session, start: datetime, end: datetime) -> dict[datetime, Counts]:
    """Finished jobs in [start, end) by five-minute bucket, queue and kind."""
    c = JOBS_TABLE.c
    bucket = _epoch_seconds(session, c.finished_at) / BUCKET_SECONDS
    bucket = sa.func.floor(bucket) if session.get_bind().dialect.name != "sqlite" else bucket
    query = (
        sa.select(bucket.label("bucket"), c.queue, c.status, sa.func.count())
        .where(c.finished_at >= start, c.finished_at < end, c.status.in_(FINISHED_KINDS))
        .group_by(sa.literal_column("bucket"), c.queue, c.status)
    )
    found: dict[datetime, Counts] = {}
    for number, queue, status, count in session.execute(query):
        when = datetime.fromtimestamp(int(number) * BUCKET_SECONDS, tz=UTC)
        key = (queue, FINISHED_KINDS[JobStatus(status)])
        counts = found.setdefault(when, {})
        counts[key] = counts.get(key, 0) + int(count)
    return found


def _epoch_seconds(session: Session, column: Any) -> Any:
    """Whole seconds since 1970 of a naive-UTC timestamp column, per dialect (no session
    time zone involved)."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return sa.func.extract("epoch", column)
    if dialect == "sqlite":  # integer division: already the bucket's floor
        return sa.cast(sa.func.strftime("%s", column), sa.Integer)
    return sa.func.timestampdiff(sa.literal_column("SECOND"), "1970-01-01 00:00:00", column)


def _bucket_start(now: datetime) -> datetime:
    seconds = int(now.timestamp()) // BUCKET_SECONDS * BUCKET_SECONDS
    return datetime.fromtimestamp(seconds, tz=now.tzinfo)
