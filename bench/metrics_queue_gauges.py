"""What the queue gauges of ``/metrics`` cost on a million-row jobs table (issue 16):
the metrics' own snapshot (active statuses at every refresh, final ones every 12th)
against ``jobs.queue_stats`` (what ``GET /queues`` reads: every row), on a local
PostgreSQL. 90 % of the jobs succeeded, 5 % failed, 4 % queued, 1 % running, 10 queues.

    .venv/bin/python bench/metrics_queue_gauges.py [rows]

Creates and drops the database ``celeriac_bench_gauges``."""

import sys
import time
from datetime import UTC, datetime

import psycopg
import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.jobs import queue_stats
from service.metrics import QueueSnapshot, _queue_snapshot
from service.migrate import upgrade

ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=test"
NAME = "celeriac_bench_gauges"
URL = f"postgresql+psycopg://postgres@127.0.0.1:5432/{NAME}"
FILL = """
INSERT INTO jobs (id, task, queue, priority, status, args, kwargs, attempt, max_retries,
    backoff_base, backoff_max, backoff_jitter, run_at, cancel_requested, created_at,
    result_expired)
SELECT lpad(i::text, 36, '0'), 'task' || mod(i, 20), 'queue' || mod(i, 10), 0,
    CASE WHEN mod(i, 100) < 90 THEN 'succeeded' WHEN mod(i, 100) < 95 THEN 'failed'
         WHEN mod(i, 100) < 99 THEN 'queued' ELSE 'running' END,
    '[]', '{{}}', 1, 3, 1, 300, true, now() - (i || ' ms')::interval, false,
    now() - (i || ' ms')::interval, false
FROM generate_series(1, {rows}) AS i"""


def timed(what: str, work: "object") -> None:
    started = time.perf_counter()
    work()  # type: ignore[operator]
    print(f"{what}: {1000 * (time.perf_counter() - started):.0f} ms")


def main(rows: int) -> None:
    engine = sa.create_engine(URL)
    with engine.begin() as conn:
        conn.exec_driver_sql(FILL.format(rows=rows))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE jobs")
    with Session(engine) as session:
        for _ in range(3):
            timed(f"{rows} rows, jobs.queue_stats (GET /queues)", lambda: queue_stats(session))
        snapshot: list[QueueSnapshot | None] = [None]
        for final in (True, False, False, True, False):

            def take(final: bool = final) -> None:
                now = datetime.now(UTC)
                snapshot[0] = _queue_snapshot(session, now, snapshot[0], final)

            timed(f"{rows} rows, metrics snapshot (final statuses read: {final})", take)
    engine.dispose()


if __name__ == "__main__":
    with psycopg.connect(ADMIN, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {NAME}")
        admin.execute(f"CREATE DATABASE {NAME}")
    try:
        upgrade(URL)
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)
    finally:
        with psycopg.connect(ADMIN, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {NAME} WITH (FORCE)")
