"""One Python worker process draining no-op jobs: jobs/s end to end and worker CPU per job.

    .venv/bin/python bench/worker.py --jobs 10000 --concurrency 1            # HTTP, SQLite
    .venv/bin/python bench/worker.py --jobs 50000 --concurrency 64 \
        --database postgresql+psycopg://postgres@127.0.0.1/test --broker redis://127.0.0.1:6379/14

Starts its own `celeriac serve` on a fresh database, submits the jobs (no worker running),
then starts `celeriac worker` (with --broker for the Redis transport when the service runs
on Redis) and samples GET /queues every 100 ms. The rate is the steady state between 5 %
and 95 % of the jobs succeeded in SQL (so it excludes start-up and the tail); the CPU is the
worker's own utime+stime over the same window. Over Redis it also reports the worker's own
pace (``worker_jobs_per_s``: how fast the ready set drains, each job being completed as
soon as it is leased), since SQL then trails by however long the service's ingest takes.
Prints one JSON line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (
    cpu_seconds,
    free_port,
    fresh_database,
    spawn,
    stop,
    wait_ready,
)

TASKS = """
from celeriac import Celeriac

app = Celeriac("bench")

@app.task(name="bench.noop")
def noop() -> None:
    return None

@app.task(name="bench.anoop")
async def anoop() -> None:
    return None
"""


def submit(base: str, total: int, queue: str, task: str) -> None:
    with httpx.Client(base_url=base, timeout=120) as client:
        for offset in range(0, total, 1000):
            size = min(1000, total - offset)
            jobs = [{"task": task, "queue": queue} for _ in range(size)]
            response = client.post("/jobs/batch", json={"jobs": jobs})
            assert response.status_code == 202, response.text


def succeeded(client: httpx.Client, queue: str) -> int:
    for entry in client.get("/queues").json()["queues"]:
        if entry["name"] == queue:
            return int(entry["counts"].get("succeeded", 0))
    return 0


def sample_redis(url: str, key: str, total: int, pid: int, timeout: float) -> dict[str, Any]:
    """The worker's own pace over Redis: how fast the ready set drains (each job is
    completed right after it is leased), between 5 % and 95 % of the jobs."""
    import redis

    client = redis.Redis.from_url(url)
    marks: dict[str, tuple[float, float, int]] = {}
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            done = total - int(client.zcard(key))
            now, cpu = time.perf_counter(), cpu_seconds(pid)
            if "start" not in marks and done >= total * 0.05:
                marks["start"] = (now, cpu, done)
            if done >= total * 0.95:
                marks["end"] = (now, cpu, done)
                break
            time.sleep(0.01)
    finally:
        client.close()
    if "end" not in marks:
        raise TimeoutError(f"the worker did not drain Redis within {timeout}s")
    (t0, c0, n0), (t1, c1, n1) = marks["start"], marks["end"]
    jobs = n1 - n0
    return {
        "worker_jobs_per_s": round(jobs / (t1 - t0)),
        "worker_cpu_us_per_job": round((c1 - c0) / jobs * 1e6, 1),
    }


def wait_indexed(url: str, key: str, total: int) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + 120
        while int(client.zcard(key)) < total:
            if time.monotonic() > deadline:
                raise TimeoutError("the jobs did not reach the Redis ready set")
            time.sleep(0.1)
    finally:
        client.close()


def sample(base: str, total: int, queue: str, pid: int, timeout: float) -> dict[str, Any]:
    """(time, CPU) when 5 % and 95 % of the jobs had succeeded."""
    marks: dict[str, tuple[float, float, int]] = {}
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=base, timeout=30) as client:
        while time.monotonic() < deadline:
            done = succeeded(client, queue)
            now, cpu = time.perf_counter(), cpu_seconds(pid)
            if "start" not in marks and done >= total * 0.05:
                marks["start"] = (now, cpu, done)
            if done >= total * 0.95:
                marks["end"] = (now, cpu, done)
                break
            time.sleep(0.1)
    if "end" not in marks:
        raise TimeoutError(f"the worker did not finish within {timeout}s")
    (t0, c0, n0), (t1, c1, n1) = marks["start"], marks["end"]
    jobs = n1 - n0
    return {
        "jobs_per_s": round(jobs / (t1 - t0)),
        "worker_cpu_us_per_job": round((c1 - c0) / jobs * 1e6, 1),
        "window_jobs": jobs,
    }


def forget_prefix(url: str, prefix: str) -> None:
    """Delete this run's keys (all under the hash tag {prefix}); never a FLUSHDB."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{{{prefix}}}*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
    finally:
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--pool", default="threads")
    parser.add_argument("--database", default="sqlite://")
    parser.add_argument("--broker", default="sql", help="sql, or redis://host:port/db")
    parser.add_argument("--transport", choices=("auto", "http", "redis"), default="auto")
    parser.add_argument("--task", default="bench.noop")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    queue = f"bench_{uuid.uuid4().hex[:8]}"
    prefix = f"bench{uuid.uuid4().hex[:6]}"
    workdir = Path(tempfile.mkdtemp(prefix="celeriac-bench-worker-"))
    (workdir / "bench_worker_tasks.py").write_text(TASKS)
    with fresh_database(args.database) as database:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        env = {
            "CELERIAC_DATABASE_URL": database,
            "CELERIAC_BROKER_URL": args.broker,
            "CELERIAC_REDIS_PREFIX": prefix,
            "CELERIAC_LOG_LEVEL": "warning",
        }
        service = spawn(
            [sys.executable, "-m", "celeriac", "serve", "--no-migrate", "--port", str(port)],
            f"worker-bench-service-{port}", env,
        )  # fmt: skip
        try:
            wait_ready(base)
            submit(base, args.jobs, queue, args.task)
            transport = args.transport
            if transport == "auto":
                transport = "redis" if args.broker.startswith("redis") else "http"
            command = [
                sys.executable, "-m", "celeriac", "worker", "-A", "bench_worker_tasks:app",
                "-Q", queue, "-c", str(args.concurrency), "-l", "warning",
                "--server", base,
            ]  # fmt: skip
            if args.pool != "threads":
                command += ["--pool", args.pool]
            if transport == "redis":
                command += ["--broker", args.broker, "--redis-prefix", prefix]
            ready_key = f"{{{prefix}}}:ready:{queue}"
            if transport == "redis":
                wait_indexed(args.broker, ready_key, args.jobs)
            # BENCH_WORKER_PATH: another copy of the celeriac package, to compare versions.
            extra = os.environ.get("BENCH_WORKER_PATH")
            worker_env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(workdir), extra]))}
            worker = spawn(command, f"worker-bench-worker-{port}", worker_env)
            try:
                figures: dict[str, Any] = {}
                if transport == "redis":
                    figures = sample_redis(
                        args.broker, ready_key, args.jobs, worker.pid, args.timeout
                    )
                figures = {**sample(base, args.jobs, queue, worker.pid, args.timeout), **figures}
            finally:
                stop(worker)
        finally:
            stop(service)
            if args.broker.startswith("redis"):
                forget_prefix(args.broker, prefix)
    print(json.dumps({
        "scenario": f"python worker, {transport} transport, {args.pool} pool",
        "database": args.database.split(":")[0], "broker": args.broker.split(":")[0],
        "jobs": args.jobs, "concurrency": args.concurrency, **figures,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
