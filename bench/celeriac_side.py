"""celeriac in the side-by-side bench: its tasks, its ``System``, and a minimal worker for
the Redis worker protocol.

The service runs as ``celeriac serve`` on a fresh PostgreSQL database with Redis (db
BENCH_REDIS_DB) as the dispatch index: results are durable in SQL. Variants naming the "SQL
broker" run it on PostgreSQL alone (LISTEN/NOTIFY); "SQLite default" runs it with no
configuration at all in an empty directory (a SQLite file, the SQL broker). Workers:

- ``http worker -c 8``: the Python worker, ``celeriac worker --app celeriac_side:app -c 8``;
- ``redis worker -c 8``: the same worker leasing from Redis (``--broker redis://…``);
- ``redis-protocol``: ``celeriac worker`` has no Redis transport yet, so this file also
  holds a minimal drain loop over the Redis protocol (docs/protocol.md, "Redis protocol"):
  ``FCALL celeriac_v1_lease`` for up to 100 jobs, run them inline, pipeline one
  ``celeriac_v1_complete`` per job, ``BLPOP`` the wake-up list when nothing is ready. A job
  counts as done only once the service has applied its report to SQL.

Run as a script it is that Redis worker: ``python bench/celeriac_side.py redis-worker
--prefix P``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from celeriac import Celeriac

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flow_keyed
from harness import (
    POSTGRES_URL,
    QUEUE_DB,
    REPO,
    free_port,
    fresh_database,
    pct,
    record_execution,
    redis_url,
    spawn,
    stop,
    wait_ready,
)
from peers.base import WARMUP_SUBMITS, Metrics, System, bin_path, chunks, timed_loop

app = Celeriac("bench")


@app.task(name="bench.noop")
def noop(i: int) -> int:
    return i


@app.task(name="bench.record")
def record(i: int) -> int:
    record_execution(i)
    return i


TASKS = {"bench.noop": noop.func, "bench.record": record.func}
SUBMIT_CLIENTS = 16
BATCH = 1000
REDIS_LEASE_BATCH = 100


def service_shape(variant: str) -> tuple[str, str]:
    """(database, broker) of the service a variant runs on: PostgreSQL with Redis as the
    dispatch index unless the variant names the SQL broker or the SQLite default."""
    if variant.startswith("SQLite default"):
        return "sqlite", "sql"
    if "SQL broker" in variant:
        return "postgresql", "sql"
    return "postgresql", "redis"


class CeleriacSystem(System):
    name = "celeriac"
    stop_signals = 2  # a second SIGTERM: cold shutdown, no wait for the long-poll

    def setup(self) -> None:
        super().setup()
        from celeriac.client import Client

        self._stack = ExitStack()
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.prefix = f"bench{uuid.uuid4().hex[:6]}"
        self.database_kind, broker = service_shape(self.variant)
        if self.database_kind == "sqlite":
            self._start_sqlite_default(port)
        else:
            self._start_on_postgresql(port, redis_url(QUEUE_DB) if broker == "redis" else "sql")
        wait_ready(self.base, 60)
        self.client = Client(self.base)
        app.configure(server=self.base)  # what noop.delay() talks to
        self.rows = self._open_rows()

    def _start_on_postgresql(self, port: int, broker: str) -> None:
        self.database = self._stack.enter_context(fresh_database(POSTGRES_URL))
        env = {
            **self.env,
            "CELERIAC_DATABASE_URL": self.database,
            "CELERIAC_BROKER_URL": broker,
            "CELERIAC_REDIS_PREFIX": self.prefix,
            "CELERIAC_LOG_LEVEL": "warning",
        }
        cmd = [bin_path("celeriac"), "serve", "--port", str(port), "--no-migrate"]
        self.service = spawn(cmd, f"celeriac-serve-{os.getpid()}", env)

    def _start_sqlite_default(self, port: int) -> None:
        """``celeriac serve`` with no configuration at all, in an empty directory: its
        default is a SQLite file there (migrated at start) and the SQL broker."""
        workdir = tempfile.mkdtemp(prefix="celeriac-bench-sqlite-")
        self._stack.callback(shutil.rmtree, workdir, True)
        self.database = f"sqlite:///{workdir}/celeriac.db"
        unset = [k for k in os.environ if k.startswith("CELERIAC_")]
        env = {**self.env, "CELERIAC_LOG_LEVEL": "warning"}
        cmd = [bin_path("celeriac"), "serve", "--port", str(port)]
        name = f"celeriac-serve-sqlite-{os.getpid()}"
        self.service = spawn(cmd, name, env, cwd=Path(workdir), unset=unset)

    def _open_rows(self) -> Any:
        """A connection of the bench's own to the service's database, for counting rows."""
        if self.database_kind == "sqlite":
            import sqlite3

            return sqlite3.connect(self.database.removeprefix("sqlite:///"))
        import psycopg

        return psycopg.connect(self.database.replace("+psycopg", ""), autocommit=True)

    def teardown(self) -> None:
        try:
            self.stop_worker()  # workers first (they talk to the service), then the service,
            stop(self.service)  # then what the base class cleans (the bench's Redis dbs)
            self.client.close()
            app.close()
            self.rows.close()
            super().teardown()
        finally:
            self._stack.close()

    def durability(self) -> Metrics:
        """How durable a commit of the service is, as a connection made by the service's
        own ``service.db.create_engine`` sees it (server, database and role settings, URL
        options, connect hooks): PostgreSQL's ``synchronous_commit`` and ``fsync``;
        SQLite's ``synchronous`` pragma."""
        from service.db import create_engine

        engine = create_engine(self.database, pool_size=1)
        try:
            with engine.connect() as conn:
                if self.database_kind == "sqlite":
                    level = conn.exec_driver_sql("PRAGMA synchronous").scalar()
                    names = {0: "off", 1: "normal", 2: "full", 3: "extra"}
                    return {"sqlite_synchronous": names.get(int(level or 0), str(level))}
                commit = conn.exec_driver_sql("SHOW synchronous_commit").scalar()
                fsync = conn.exec_driver_sql("SHOW fsync").scalar()
                return {"pg_synchronous_commit": str(commit), "pg_fsync": str(fsync)}
        finally:
            engine.dispose()

    def service_pids(self) -> list[int]:
        return [self.service.pid]

    def worker_command(self, mode: str, index: int) -> list[str]:
        if self.variant == "redis protocol loop":
            return [
                sys.executable,
                os.path.abspath(__file__),
                "redis-worker",
                "--prefix",
                self.prefix,
            ]
        command = [
            bin_path("celeriac"),
            "worker",
            "--app",
            "celeriac_side:app",
            "--server",
            self.base,
            "-c",
            "8",
            "--loglevel",
            "warning",
            "-n",
            f"bench-{mode}-{index}",
        ]
        if self.variant == "redis worker -c 8":  # the product worker on the Redis protocol
            command += ["--broker", redis_url(QUEUE_DB), "--redis-prefix", self.prefix]
        return command

    def submit_one(self, i: int) -> None:
        noop.delay(i)

    def sequential(self, n: int) -> Metrics:
        """One thread calling ``noop.delay(i)``; then every 2xx is checked to be a row."""
        before = self._count("1 = 1")
        metrics = super().sequential(n)
        rows = self._count("1 = 1") - before
        if rows != n + WARMUP_SUBMITS:
            raise RuntimeError(f"{n + WARMUP_SUBMITS} submits answered 2xx, {rows} rows")
        metrics["committed_rows"] = rows
        return metrics

    def enqueue(self, n: int, task: str) -> None:
        from celeriac.client import job_spec

        for part in chunks(n, BATCH):
            self.client.submit_batch([job_spec(f"bench.{task}", [i]) for i in part])

    def submit_timed(self, n: int) -> Metrics:
        if self.variant == "POST /jobs/batch of 1000":
            from celeriac.client import job_spec

            parts = chunks(n, BATCH)
            specs = [[job_spec("bench.noop", [i]) for i in part] for part in parts]
            metrics = timed_loop(len(specs), lambda k: self.client.submit_batch(specs[k]))
            return {
                "jobs": n,
                "elapsed_s": metrics["elapsed_s"],
                "jobs_per_s": n / metrics["elapsed_s"],
            }
        return self._submit_concurrent(n)

    def _submit_concurrent(self, n: int) -> Metrics:
        """SUBMIT_CLIENTS threads share one blocking ``Client`` (a connection each), as
        the request threads of a web app would."""
        from concurrent.futures import ThreadPoolExecutor

        from celeriac.client import Client

        per_client = n // SUBMIT_CLIENTS
        latencies: list[list[float]] = [[] for _ in range(SUBMIT_CLIENTS)]
        with Client(self.base) as client:

            def one_client(k: int) -> None:
                mine = latencies[k]
                for i in range(k * per_client, (k + 1) * per_client):
                    started = time.perf_counter()
                    client.submit("bench.noop", [i])
                    mine.append(time.perf_counter() - started)

            started = time.perf_counter()
            with ThreadPoolExecutor(SUBMIT_CLIENTS) as pool:
                list(pool.map(one_client, range(SUBMIT_CLIENTS)))
            elapsed = time.perf_counter() - started
        total = per_client * SUBMIT_CLIENTS
        every = [t for mine in latencies for t in mine]
        return {
            "jobs": total,
            "elapsed_s": elapsed,
            "jobs_per_s": total / elapsed,
            "p50_ms": pct(every, 0.5) * 1000,
            "p99_ms": pct(every, 0.99) * 1000,
        }

    def drain(self, n: int) -> Metrics:
        if not os.environ.get("BENCH_PROFILE_RAW"):
            return super().drain(n)
        # run.py --profile: py-spy the service while the worker drains (jobs queued first).
        self.enqueue(n, "noop")
        with self._profiled():
            return self._run_workers(n, "drain", 1)

    def submit(self, n: int) -> Metrics:
        if not os.environ.get("BENCH_PROFILE_RAW"):
            return super().submit(n)
        with self._profiled():
            return self.submit_timed(n)

    @contextmanager
    def _profiled(self) -> Iterator[None]:
        """py-spy on the service (all threads, 200 Hz) into $BENCH_PROFILE_RAW."""
        raw = os.environ["BENCH_PROFILE_RAW"]
        cmd = [py_spy(), "record", "--pid", str(self.service.pid), "--format", "raw",
               "--output", raw, "--rate", "200", "--nonblocking"]  # fmt: skip
        spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # let it attach
        try:
            yield
        finally:
            spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                spy.wait(60)
            except subprocess.TimeoutExpired:
                spy.kill()

    def round_trip(self, i: int) -> None:
        job = self.client.submit("bench.noop", [i])
        job = self.client.get(job["id"], wait=10)
        if job["status"] != "succeeded":
            raise RuntimeError(f"job {job['id']} is {job['status']} after 10 s")
        # where the time goes, on the service's clock: queued -> leased -> reported
        created, started, finished = (
            datetime.fromisoformat(job[k]) for k in ("created_at", "started_at", "finished_at")
        )
        self._stages.append(((started - created).total_seconds(),
                             (finished - started).total_seconds()))  # fmt: skip

    def latency(self, n: int) -> Metrics:
        self._stages: list[tuple[float, float]] = []
        metrics = super().latency(n)
        measured = self._stages[-n:]
        metrics["submit_to_lease_p50_ms"] = pct([a for a, _ in measured], 0.5) * 1000
        metrics["lease_to_report_p50_ms"] = pct([b for _, b in measured], 0.5) * 1000
        return metrics

    # flow control (issue 15): the scenarios are in bench/flow_keyed.py
    def keyed(self, n: int) -> Metrics:
        return flow_keyed.keyed(self, n)

    def plain(self, n: int) -> Metrics:
        return flow_keyed.plain(self, n)

    def fairness(self, n: int) -> Metrics:
        return flow_keyed.fairness(self, n)

    def drain_with_workers(
        self, n: int, count: int, slowest_per_s: float, stall_s: float
    ) -> Metrics:
        """``count`` drain workers started at once; timed as ``drain`` is."""
        return self._run_workers(n, "drain", count, slowest_per_s, stall_s)

    def count_rows(self, where: str) -> int:
        return self._count(where)

    def done_count(self) -> int:
        return self._count("status = 'succeeded'")

    def _count(self, where: str) -> int:
        row = self.rows.execute(f"SELECT count(*) FROM jobs WHERE {where}").fetchone()
        return int(row[0]) if row else 0


SYSTEM = CeleriacSystem


def py_spy() -> str:
    """py-spy from the bench venv, else the project's venv, else PATH."""
    for candidate in (bin_path("py-spy"), str(REPO / ".venv" / "bin" / "py-spy")):
        if os.path.exists(candidate):
            return candidate
    return shutil.which("py-spy") or "py-spy"


def redis_worker(prefix: str, queue: str, batch: int, lease_ms: int) -> None:
    """The minimal Redis-protocol worker: lease, run inline, pipeline the completions."""
    import redis

    client = redis.Redis.from_url(redis_url(QUEUE_DB))
    tag = "{" + prefix + "}"
    events, ready, wake = f"{tag}:events", f"{tag}:ready:{queue}", f"{tag}:wake:{queue}"
    name = f"bench-redis-{os.getpid()}"
    while True:
        leased: list[Any] = client.fcall(
            "celeriac_v1_lease", 2, events, ready, "1", name, batch, lease_ms
        )
        if not leased:
            client.blpop([wake], timeout=1)
            continue
        pipe = client.pipeline(transaction=False)
        for raw in leased:
            job = json.loads(raw)
            result = TASKS[job["task"]](*job["args"], **job["kwargs"])
            pipe.fcall(
                "celeriac_v1_complete",
                2,
                events,
                f"{tag}:job:{job['id']}",
                "1",
                job["id"],
                job["lease"]["token"],
                json.dumps(result),
            )
        pipe.execute()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("redis-worker", help="a minimal Redis-protocol drain loop")
    worker.add_argument("--prefix", required=True, help="CELERIAC_REDIS_PREFIX of the service")
    worker.add_argument("--queue", default="default")
    worker.add_argument("--batch", type=int, default=REDIS_LEASE_BATCH)
    worker.add_argument("--lease-ms", type=int, default=30_000)
    args = parser.parse_args()
    redis_worker(args.prefix, args.queue, args.batch, args.lease_ms)


if __name__ == "__main__":
    main()
