"""Retention soak (issue 16): the jobs table stays flat while many jobs pass through.

Makes a fresh PostgreSQL database (``<prefix>_<hex>``), starts ``celeriac serve`` on it
with the Redis broker and a short retention for every final status, then submits jobs in
batches (``POST /jobs/batch``), leases them and reports them succeeded
(``POST /leases/report``), round after round, and samples ``count(*)`` of the jobs table
after each round. Prints the sizes (min, max, the last rounds) and how long the table
takes to empty after the last round; drops the database and the Redis keys after.

    .venv/bin/python bench/retention_soak.py --jobs 200000 --retention 2s --port 19811
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psycopg
import redis

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.migrate import upgrade  # noqa: E402

ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"


def run_round(client: httpx.Client, queue: str, size: int) -> None:
    jobs = [{"task": "soak.noop", "queue": queue, "args": [i]} for i in range(size)]
    client.post("/jobs/batch", json={"jobs": jobs}).raise_for_status()
    body = {"worker": "soak", "queues": [queue], "max_jobs": size, "wait": 5}
    leased = client.post("/leases", json=body).json()["jobs"]
    reports = [
        {"id": j["id"], "token": j["lease"]["token"], "outcome": "succeeded", "result": 1}
        for j in leased
    ]
    client.post("/leases/report", json={"reports": reports}).raise_for_status()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=200_000)
    parser.add_argument("--round", type=int, default=1000)
    parser.add_argument("--retention", default="2s")
    parser.add_argument("--port", type=int, default=19811)
    parser.add_argument("--prefix", default="ops2")
    args = parser.parse_args()
    name = f"{args.prefix}_soak_{secrets.token_hex(4)}"
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    redis_prefix = f"{args.prefix}soak{secrets.token_hex(3)}"
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    service = None
    try:
        upgrade(url)
        retention = ",".join(
            f"{status}={args.retention}"
            for status in ("succeeded", "failed", "cancelled", "expired")
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("CELERIAC_")}
        env |= {"CELERIAC_DATABASE_URL": url, "CELERIAC_BROKER_URL": "redis://127.0.0.1:6379/0",
                "CELERIAC_REDIS_PREFIX": redis_prefix, "CELERIAC_RETENTION": retention,
                "CELERIAC_RETENTION_INTERVAL_SECONDS": "0.5", "CELERIAC_LOG_LEVEL": "warning",
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
        sizes: list[int] = []
        started = time.monotonic()
        with (
            httpx.Client(base_url=base, timeout=60) as client,
            psycopg.connect(
                f"host=127.0.0.1 port=5432 user=postgres dbname={name}", autocommit=True
            ) as conn,
        ):
            count = "SELECT count(*) FROM jobs"
            for _ in range(args.jobs // args.round):
                run_round(client, "soak", args.round)
                sizes.append(int(conn.execute(count).fetchone()[0]))  # type: ignore[index]
            elapsed = time.monotonic() - started
            emptied = time.monotonic()
            while int(conn.execute(count).fetchone()[0]) > 0:  # type: ignore[index]
                time.sleep(0.2)
            drained = time.monotonic() - emptied
            size = conn.execute("SELECT pg_total_relation_size('jobs')").fetchone()[0]  # type: ignore[index]
        print(f"{args.jobs} jobs in {elapsed:.1f} s ({args.jobs / elapsed:,.0f} jobs/s), "
              f"retention {args.retention}, rounds of {args.round}")  # fmt: skip
        quarter = len(sizes) // 4
        quarters = [max(sizes[i * quarter : (i + 1) * quarter]) for i in range(4)]
        print(f"rows after each round: min {min(sizes)}, max {max(sizes)}; "
              f"max of each quarter {quarters}")  # fmt: skip
        print(f"last 10 rounds: {sizes[-10:]}")
        print(f"emptied {drained:.1f} s after the last round; jobs table + indexes "
              f"{size / 1e6:.1f} MB on disk (dead tuples until autovacuum)")  # fmt: skip
    finally:
        if service is not None:
            service.terminate()
            service.wait(30)
        client_r = redis.Redis()
        for key in client_r.scan_iter(f"{{{redis_prefix}}}*", count=1000):
            client_r.delete(key)
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
