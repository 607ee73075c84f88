"""Core service throughput on this machine: submit (16 concurrent clients), batch submit,
lease+report drain over raw HTTP, and submit-to-running latency.

    .venv/bin/python bench/core.py --database postgresql+psycopg://postgres@127.0.0.1/test \
        --broker redis://127.0.0.1:6379/0

Starts its own `celeriac serve` on a fresh database; prints one JSON line per scenario."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import free_port, fresh_database, wait_ready


@contextmanager
def service(database: str, broker: str, extra_env: dict[str, str] | None = None) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "CELERIAC_DATABASE_URL": database,
        "CELERIAC_BROKER_URL": broker,
        "CELERIAC_REDIS_PREFIX": f"bench{uuid.uuid4().hex[:6]}",
        **(extra_env or {}),
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "service.app:create_app",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base)
        yield base
    finally:
        proc.terminate()
        proc.wait(10)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def submit_concurrent(base: str, total: int, clients: int, queue: str) -> dict[str, Any]:
    latencies: list[float] = []
    per_client = total // clients

    async def one_client() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            for i in range(per_client):
                started = time.perf_counter()
                r = await client.post("/jobs", json={"task": "noop", "args": [i], "queue": queue})
                latencies.append(time.perf_counter() - started)
                assert r.status_code == 202, r.text

    started = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    return {
        "scenario": f"POST /jobs x{clients} clients",
        "jobs": per_client * clients,
        "jobs_per_s": round(per_client * clients / elapsed),
        "p50_ms": round(pct(latencies, 0.5) * 1000, 2),
        "p99_ms": round(pct(latencies, 0.99) * 1000, 2),
    }


def submit_batches(base: str, total: int, size: int, queue: str) -> dict[str, Any]:
    with httpx.Client(base_url=base, timeout=60) as client:
        started = time.perf_counter()
        for offset in range(0, total, size):
            jobs = [{"task": "noop", "args": [offset + i], "queue": queue} for i in range(size)]
            r = client.post("/jobs/batch", json={"jobs": jobs})
            assert r.status_code == 202, r.text
        elapsed = time.perf_counter() - started
    return {
        "scenario": f"POST /jobs/batch of {size}",
        "jobs": total,
        "jobs_per_s": round(total / elapsed),
    }


def drain_raw(base: str, total: int, queue: str, batch: int) -> dict[str, Any]:
    """A minimal HTTP worker (lease batch -> report batch): what the service can serve."""
    done = 0
    with httpx.Client(base_url=base, timeout=60) as client:
        started = time.perf_counter()
        while done < total:
            leased = client.post(
                "/leases", json={"worker": "bench", "queues": [queue], "max_jobs": batch, "wait": 5}
            ).json()["jobs"]
            if not leased:
                break
            reports = [
                {
                    "id": j["id"],
                    "token": j["lease"]["token"],
                    "outcome": "succeeded",
                    "result": j["args"][0],
                }
                for j in leased
            ]
            r = client.post("/leases/report", json={"reports": reports})
            assert r.status_code == 200, r.text
            done += len(leased)
        elapsed = time.perf_counter() - started
    return {
        "scenario": f"drain over HTTP, lease/report batches of {batch}",
        "jobs": done,
        "jobs_per_s": round(done / elapsed),
    }


async def latency(base: str, rounds: int, queue: str) -> dict[str, Any]:
    """Submit with a worker already long-polling; time until the lease answer arrives."""
    samples: list[float] = []
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        for i in range(rounds):
            lease = asyncio.create_task(
                client.post(
                    "/leases",
                    json={"worker": "bench", "queues": [queue], "max_jobs": 1, "wait": 10},
                )
            )
            await asyncio.sleep(0.01)  # let the long-poll reach the service
            started = time.perf_counter()
            await client.post("/jobs", json={"task": "noop", "args": [i], "queue": queue})
            leased = (await lease).json()["jobs"]
            samples.append(time.perf_counter() - started)
            job = leased[0]
            await client.post(
                f"/jobs/{job['id']}/complete", json={"token": job["lease"]["token"], "result": None}
            )
    return {
        "scenario": "submit -> leased by an idle long-polling worker",
        "rounds": rounds,
        "p50_ms": round(pct(samples, 0.5) * 1000, 2),
        "p99_ms": round(pct(samples, 0.99) * 1000, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--database", default="postgresql+psycopg://postgres@127.0.0.1/test")
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--jobs", type=int, default=20000)
    args = parser.parse_args()
    with fresh_database(args.database) as url, service(url, args.broker) as base:
        q = uuid.uuid4().hex[:8]
        results = [
            asyncio.run(submit_concurrent(base, min(args.jobs, 8000), 16, f"s{q}")),
            submit_batches(base, args.jobs, 1000, f"b{q}"),
            drain_raw(base, args.jobs, f"b{q}", 500),
            asyncio.run(latency(base, 200, f"l{q}")),
        ]
    for result in results:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
