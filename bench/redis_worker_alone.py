"""The Redis transport's own ceiling: one in-process ``Worker`` draining no-op jobs that
this script put straight into Redis (as the service would), with no service running, so
nothing else competes for the CPU.

    .venv/bin/python bench/redis_worker_alone.py --jobs 50000 --concurrency 64

Loads the ``celeriac_v1`` library into that Redis (``FUNCTION LOAD REPLACE``: the same code
the service loads), uses a key prefix of its own in ``--redis`` (db 14 by default; never
0) and deletes it afterwards. The events the worker appends are not applied anywhere.
Prints one JSON line: jobs/s between 5 % and 95 % drained, and process CPU per job."""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from pathlib import Path

import redis
from celeriac import Celeriac
from celeriac.worker import Worker

LUA = Path(__file__).resolve().parent.parent / "service" / "lua" / "celeriac.lua"


def fill(client: redis.Redis, tag: str, queue: str, total: int) -> None:
    pipe = client.pipeline(transaction=False)
    for i in range(total):
        job_id = str(uuid.uuid4())
        envelope = {"id": job_id, "task": "bench.noop", "args": [], "kwargs": {}, "queue": queue,
                    "priority": 0, "attempt": 1, "max_retries": 3, "timeout": None}  # fmt: skip
        pipe.hset(f"{tag}:job:{job_id}", "env", json.dumps(envelope))
        pipe.zadd(f"{tag}:ready:{queue}", {job_id: 1e13 - i})
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()


def measure(
    client: redis.Redis, key: str, total: int, worker: Worker, out: dict[str, float]
) -> None:
    marks: list[tuple[float, float, int]] = []
    while True:
        done = total - int(client.zcard(key))
        if (not marks and done >= total * 0.05) or done >= total * 0.95:
            marks.append((time.perf_counter(), time.process_time(), done))
            if len(marks) == 2:
                break
        time.sleep(0.005)
    (t0, c0, n0), (t1, c1, n1) = marks
    out["jobs_per_s"] = round((n1 - n0) / (t1 - t0))
    out["cpu_us_per_job"] = round((c1 - c0) / (n1 - n0) * 1e6, 1)
    worker.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=50_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/14")
    args = parser.parse_args()
    client = redis.Redis.from_url(args.redis)
    if client.connection_pool.connection_kwargs.get("db", 0) == 0:
        raise SystemExit("use a Redis database of the bench's own, not 0")
    client.function_load(LUA.read_text(), replace=True)
    prefix, queue = f"alone{uuid.uuid4().hex[:6]}", "bench"
    tag = "{" + prefix + "}"
    app = Celeriac("bench")
    app.task(name="bench.noop")(lambda: None)
    try:
        fill(client, tag, queue, args.jobs)
        worker = Worker(app, queues=[queue], concurrency=args.concurrency, broker=args.redis,
                        redis_prefix=prefix, register=False, poll_wait=1)  # fmt: skip
        figures: dict[str, float] = {}
        watcher = threading.Thread(
            target=measure, args=(client, f"{tag}:ready:{queue}", args.jobs, worker, figures)
        )
        watcher.start()
        worker.run()
        watcher.join()
    finally:
        keys = list(client.scan_iter(match=f"{tag}*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
        client.close()
    print(json.dumps({"scenario": "Redis transport alone (no service)", "jobs": args.jobs,
                      "concurrency": args.concurrency, **figures}))  # fmt: skip


if __name__ == "__main__":
    main()
