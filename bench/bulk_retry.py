"""Bulk retry of many failed jobs (or, with ``--action cancel``, bulk cancel of many queued
ones) on PostgreSQL (issue 16): total time and lock duration.

Makes a fresh PostgreSQL database (``<prefix>_<hex>``), migrates it, inserts N failed (or
queued) jobs straight into SQL, starts ``celeriac serve`` on it with the Redis broker, and
times ``POST /jobs/bulk {"action": "retry"|"cancel", "filter": {"queue": "bench"}}``.
While it runs, a second connection samples ``pg_stat_activity`` every few milliseconds:
the longest-lived transaction of the service that locked or wrote rows (it has a
transaction id) is the longest time any row lock was held, to within the sampling
period. Afterwards it prints the jobs by status and the size of Redis's ready set, then
drops the database and the Redis keys.

    .venv/bin/python bench/bulk_retry.py --jobs 100000 --port 19810
    .venv/bin/python bench/bulk_retry.py --jobs 100000 --port 19810 --action cancel
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
import redis
import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.ids import uuid7  # noqa: E402
from service.migrate import upgrade  # noqa: E402
from service.models import JOBS_TABLE  # noqa: E402

ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
SAMPLE_SECONDS = 0.005


def failed_rows(
    queue: str, count: int, now: datetime, status: str = "failed"
) -> list[dict[str, object]]:
    return [
        dict(id=uuid7(), task="bench.fail", queue=queue, priority=0, status=status, args=[i],
             kwargs={}, attempt=1, max_retries=0, backoff_base=1.0, backoff_max=300.0,
             backoff_jitter=True, timeout=None, run_at=now, expires_at=None,
             cancel_requested=False, created_at=now, started_at=now, finished_at=now,
             error={"type": "Boom", "message": "no"}, result_expired=False)
        for i in range(count)
    ]  # fmt: skip


class Sampler(threading.Thread):
    """The longest transaction of the service's connections seen in pg_stat_activity."""

    def __init__(self, database: str) -> None:
        super().__init__(daemon=True)
        self.database = database
        self.longest = 0.0
        self.what = ""
        self.samples = 0
        self.stop = threading.Event()

    def run(self) -> None:
        query = (
            "SELECT extract(epoch FROM clock_timestamp() - xact_start), left(query, 60)"
            " FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()"
            " AND xact_start IS NOT NULL AND state <> 'idle'"
            # Only transactions that wrote or locked rows (they hold a transaction id).
            " AND backend_xid IS NOT NULL"
            " ORDER BY xact_start LIMIT 1"
        )
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            while not self.stop.is_set():
                row = conn.execute(query, (self.database,)).fetchone()
                if row is not None and float(row[0]) > self.longest:
                    self.longest, self.what = float(row[0]), str(row[1])
                self.samples += 1
                time.sleep(SAMPLE_SECONDS)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--port", type=int, default=19810)
    parser.add_argument("--prefix", default="ops2")
    parser.add_argument(
        "--action", choices=("retry", "cancel"), default="retry",
        help="retry N failed jobs, or cancel N queued ones",
    )  # fmt: skip
    args = parser.parse_args()
    name = f"{args.prefix}_bulk_{secrets.token_hex(4)}"
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    redis_prefix = f"{args.prefix}bulk{secrets.token_hex(3)}"
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    service = None
    try:
        upgrade(url)
        engine = sa.create_engine(url)
        now = datetime.now(UTC) - timedelta(minutes=5)
        started = time.monotonic()
        with engine.begin() as conn:
            for _ in range(0, args.jobs, 10_000):
                status = "failed" if args.action == "retry" else "queued"
                conn.execute(sa.insert(JOBS_TABLE), failed_rows("bench", 10_000, now, status))
            conn.execute(sa.text("ANALYZE jobs"))
        print(f"inserted {args.jobs} jobs in {time.monotonic() - started:.1f} s")
        env = {k: v for k, v in os.environ.items() if not k.startswith("CELERIAC_")}
        env |= {"CELERIAC_DATABASE_URL": url, "CELERIAC_BROKER_URL": "redis://127.0.0.1:6379/0",
                "CELERIAC_REDIS_PREFIX": redis_prefix, "CELERIAC_LOG_LEVEL": "info",
                "PYTHONPATH": str(REPO)}  # fmt: skip
        log = open(f"/tmp/{name}.log", "wb")  # noqa: SIM115 - closed with the process
        service = subprocess.Popen(
            [sys.executable, "-m", "celeriac", "serve", "--no-migrate", "--port", str(args.port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd="/tmp",
        )  # fmt: skip
        base = f"http://127.0.0.1:{args.port}"
        for _ in range(300):
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        sampler = Sampler(name)
        sampler.start()
        started = time.monotonic()
        answer = httpx.post(
            f"{base}/jobs/bulk",
            json={"action": args.action, "filter": {"queue": "bench"}},
            timeout=3600,
        )
        total = time.monotonic() - started
        sampler.stop.set()
        sampler.join()
        print(f"POST /jobs/bulk -> {answer.status_code} {answer.text}")
        print(f"total {total:.2f} s for {args.jobs} jobs ({args.jobs / total:,.0f} jobs/s)")
        print(f"longest transaction seen in pg_stat_activity: {sampler.longest * 1000:.0f} ms "
              f"({sampler.samples} samples, every {SAMPLE_SECONDS * 1000:.0f} ms), "
              f"running {sampler.what!r}")  # fmt: skip
        with engine.connect() as conn:
            counts = dict(
                conn.execute(sa.text("SELECT status, count(*) FROM jobs GROUP BY 1")).all()
            )
        ready = redis.Redis().zcard(f"{{{redis_prefix}}}:ready:bench")
        print(f"jobs by status afterwards: {counts}; in the Redis ready set: {ready}")
        engine.dispose()
    finally:
        if service is not None:
            service.terminate()
            service.wait(30)
        client = redis.Redis()
        for key in client.scan_iter(f"{{{redis_prefix}}}*", count=1000):
            client.delete(key)
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
