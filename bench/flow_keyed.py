"""Flow control's cost and fairness (issue 15, docs/flow-control.md).

Starts its own ``celeriac serve`` on a fresh database and, per scenario, 4 HTTP workers
x 8 threads draining no-op jobs; prints one JSON line per scenario:

- ``plain``: N jobs, no limits anywhere (the plain one-statement claim);
- ``keyed-unlimited``: the same N jobs spread over K keys (``limits: ["bk-<k>"]``), no
  limit defined (flow control not configured: still the plain claim);
- ``keyed-limited``: the same, with ``PUT /limits/bk-*  {"max_running": 2}`` (every key
  limited: the flow-control claim). The issue asks for >= 0.7x ``keyed-unlimited``;
- ``fairness``: A jobs of key ``fa-a`` submitted before B of ``fa-b`` (pattern
  ``fa-*`` with ``max_running: 4``): at which of A's finishes did B's last finish.

    .venv/bin/python bench/flow_keyed.py --jobs 20000 --keys 200 --fair-a 10000 --fair-b 100
    .venv/bin/python bench/flow_keyed.py --database postgresql+psycopg://postgres@127.0.0.1/x
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import free_port, fresh_database, spawn, stop, wait_ready

TASKS = """
from celeriac import Celeriac

app = Celeriac("flowbench")

@app.task(name="flowbench.noop")
def noop(*args) -> None:
    return None
"""
WORKERS, CONCURRENCY = 4, 8


def submit(client: httpx.Client, jobs: list[dict[str, Any]]) -> list[str]:
    ids: list[str] = []
    for offset in range(0, len(jobs), 1000):
        response = client.post("/jobs/batch", json={"jobs": jobs[offset : offset + 1000]})
        assert response.status_code == 202, response.text
        ids += [job["id"] for job in response.json()["jobs"]]
    return ids


def succeeded(client: httpx.Client, queue: str) -> int:
    body = client.get(f"/queues/{queue}").json()
    return int(body["counts"].get("succeeded", 0))


def drain(base: str, workdir: Path, queue: str, total: int, timeout: float) -> float:
    """Start the workers, wait until every job succeeded; seconds from start to last."""
    workers = [
        spawn(
            [
                sys.executable,
                "-m",
                "celeriac",
                "worker",
                "-A",
                "flow_bench_tasks:app",
                "-Q",
                queue,
                "-c",
                str(CONCURRENCY),
                "-l",
                "warning",
                "--server",
                base,
            ],
            f"flow-bench-worker-{index}",
            {"PYTHONPATH": str(workdir)},
        )
        for index in range(WORKERS)
    ]
    started = time.perf_counter()
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            deadline = time.monotonic() + timeout
            while succeeded(client, queue) < total:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{queue}: not drained within {timeout}s")
                time.sleep(0.05)
        return time.perf_counter() - started
    finally:
        for worker in workers:
            stop(worker)


def keyed_jobs(queue: str, total: int, keys: int, with_keys: bool) -> list[dict[str, Any]]:
    jobs = []
    for index in range(total):
        job: dict[str, Any] = {"task": "flowbench.noop", "queue": queue}
        if with_keys:
            job["limits"] = [f"bk-{index % keys}"]
        jobs.append(job)
    return jobs


def finished_at(client: httpx.Client, job_id: str) -> float:
    value = client.get(f"/jobs/{job_id}").json()["finished_at"]
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def run(args: argparse.Namespace, base: str, workdir: Path) -> None:
    with httpx.Client(base_url=base, timeout=120) as client:
        for scenario in ("plain", "keyed-unlimited", "keyed-limited"):
            queue = f"fb_{uuid.uuid4().hex[:8]}"
            if scenario == "keyed-limited":
                client.put("/limits/bk-*", json={"max_running": 2}).raise_for_status()
            submit(client, keyed_jobs(queue, args.jobs, args.keys, scenario != "plain"))
            seconds = drain(base, workdir, queue, args.jobs, args.timeout)
            print(json.dumps({"scenario": scenario, "jobs": args.jobs, "keys": args.keys,
                              "seconds": round(seconds, 2),
                              "jobs_per_s": round(args.jobs / seconds)}), flush=True)  # fmt: skip
        if not args.fair_a or not args.fair_b:
            return
        queue = f"fb_{uuid.uuid4().hex[:8]}"
        client.put("/limits/fa-*", json={"max_running": 4}).raise_for_status()
        job = {"task": "flowbench.noop", "queue": queue}
        a = submit(client, [{**job, "limits": ["fa-a"]} for _ in range(args.fair_a)])
        b = submit(client, [{**job, "limits": ["fa-b"]} for _ in range(args.fair_b)])
        drain(base, workdir, queue, args.fair_a + args.fair_b, args.timeout)
        a_done = sorted(finished_at(client, job_id) for job_id in a)
        b_last = max(finished_at(client, job_id) for job_id in b)
        before = sum(1 for at in a_done if at < b_last)
        print(json.dumps({"scenario": "fairness", "a": args.fair_a, "b": args.fair_b,
                          "a_finished_before_b_last": before}), flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--keys", type=int, default=200)
    parser.add_argument("--fair-a", type=int, default=10_000)
    parser.add_argument("--fair-b", type=int, default=100)
    parser.add_argument("--database", default="sqlite://")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--port", type=int, default=0, help="the service's (default: any free)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="celeriac-flow-bench-"))
    (workdir / "flow_bench_tasks.py").write_text(TASKS)
    with fresh_database(args.database) as database:
        port = args.port or free_port()
        base = f"http://127.0.0.1:{port}"
        env = {"CELERIAC_DATABASE_URL": database, "CELERIAC_LOG_LEVEL": "warning"}
        service = spawn(
            [sys.executable, "-m", "celeriac", "serve", "--no-migrate", "--port", str(port)],
            f"flow-bench-service-{port}", env,
        )  # fmt: skip
        try:
            wait_ready(base)
            run(args, base, workdir)
        finally:
            stop(service)


if __name__ == "__main__":
    main()
