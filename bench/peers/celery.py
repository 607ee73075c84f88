"""Celery: Redis broker (db BENCH_REDIS_DB); results in Redis (the next db) or, for the
like-for-like durable case, in PostgreSQL through ``db+postgresql+psycopg://``.

Settings are Celery's defaults — prefork pool, prefetch multiplier 4, JSON, acks early —
with the concurrency each variant names. The worker is ``celery -A peers.celery worker``.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from harness import POSTGRES_URL, QUEUE_DB, RESULT_DB, fresh_database, record_execution, redis_url

from peers.base import System, bin_path

BACKEND = os.environ.get("BENCH_CELERY_BACKEND") or redis_url(RESULT_DB)
QUEUE = "bench"

app = Celery("bench", broker=redis_url(QUEUE_DB), backend=BACKEND)
app.conf.task_default_queue = QUEUE


@app.task(name="bench.noop")
def noop(i: int) -> int:
    return i


@app.task(name="bench.record")
def record(i: int) -> int:
    record_execution(i)
    return i


POOLS = {  # variant -> worker options
    "prefork -c 2, redis results": ["-P", "prefork", "-c", "2"],
    "threads -c 8, redis results": ["-P", "threads", "-c", "8"],
    "prefork -c 2, postgres results": ["-P", "prefork", "-c", "2"],
    "4 nodes x prefork -c 1": ["-P", "prefork", "-c", "1"],
}


class CelerySystem(System):
    name = "celery"

    def setup(self) -> None:
        super().setup()
        self.database: str | None = None
        if "postgres" in self.variant:
            self._db = fresh_database(POSTGRES_URL, migrate=False)
            self.database = self._db.__enter__()
            backend = "db+" + self.database
            self.env["BENCH_CELERY_BACKEND"] = backend
            app.conf.result_backend = backend
            import psycopg

            self.pg = psycopg.connect(self.database.replace("+psycopg", ""), autocommit=True)

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            if self.database:
                self.pg.close()
                self._db.__exit__(None, None, None)

    def worker_command(self, mode: str, index: int) -> list[str]:
        pool = POOLS[self.variant]
        return [
            bin_path("celery"),
            "-A",
            "peers.celery",
            "worker",
            *pool,
            "-Q",
            QUEUE,
            "-n",
            f"bench{index}@%h",
            "--loglevel",
            "WARNING",
        ]

    def enqueue(self, n: int, task: str) -> None:
        target = noop if task == "noop" else record
        for i in range(n):
            target.delay(i)

    def submit_one(self, i: int) -> None:
        noop.delay(i)

    def round_trip(self, i: int) -> None:
        noop.delay(i).get(timeout=10)

    def done_count(self) -> int:
        if self.database:
            try:
                row = self.pg.execute(
                    "SELECT count(*) FROM celery_taskmeta WHERE status = 'SUCCESS'"
                ).fetchone()
            except Exception:  # the worker creates the table with its first result
                return 0
            return int(row[0]) if row else 0
        return int(self._results().dbsize())

    def _results(self) -> Any:
        import redis

        if not hasattr(self, "_results_client"):
            self._results_client = redis.Redis.from_url(redis_url(RESULT_DB))
        return self._results_client


SYSTEM = CelerySystem
