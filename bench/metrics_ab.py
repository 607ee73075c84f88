"""Does counting metrics cost the hot paths anything measurable? (issue 16)

Runs the same workload against ``celeriac serve`` with its metrics (A) and with them
replaced by no-ops (B: ``Metrics`` hears nothing, no request counter), alternating
A B A B, and compares the service process's CPU seconds (user + system, from /proc):
counts, not wall time, which other work on the machine skews. The workload: N single
``POST /jobs`` from 8 client threads, then every job leased and reported over HTTP in
batches of 100 (half succeed, half fail for good), all on a fresh SQLite file.

    .venv/bin/python bench/metrics_ab.py [jobs] [rounds] [port]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent


def create_app_without_metrics() -> Any:
    """The app with its metrics replaced by no-ops (the B side)."""
    from service import app as app_module
    from service.metrics import Metrics
    from service.observe import Observer

    class Silent(Metrics, Observer):
        submitted = Observer.submitted  # type: ignore[assignment]
        leased = Observer.leased  # type: ignore[assignment]
        committed = Observer.committed  # type: ignore[assignment]
        webhook_delivered = Observer.webhook_delivered  # type: ignore[assignment]

    class PassThrough:
        def __new__(cls, app: Any, metrics: Any) -> Any:
            return app

    app_module.Metrics = Silent  # type: ignore[misc]
    app_module.RequestCounter = PassThrough  # type: ignore[assignment,misc]
    return app_module.create_app()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve(factory: str, port: int, workdir: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "CELERIAC_DATABASE_URL": f"sqlite:///{workdir}/bench.db",
           "PYTHONPATH": str(ROOT), "CELERIAC_LOG_LEVEL": "warning"}  # fmt: skip
    from service.migrate import upgrade

    upgrade(env["CELERIAC_DATABASE_URL"])
    code = (
        "import uvicorn; uvicorn.run("
        f"{factory!r}, factory=True, host='127.0.0.1', port={port}, log_level='warning')"
    )
    process = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=workdir)
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise SystemExit("the service did not start")
        time.sleep(0.1)


def workload(url: str, jobs: int) -> None:
    with httpx.Client(base_url=url, timeout=30) as http:

        def submit(n: int) -> None:
            body = {"task": "bench.ab", "queue": "ab", "args": [n], "max_retries": 0}
            assert http.post("/jobs", json=body).status_code == 202

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(submit, range(jobs)))
        done = 0
        while done < jobs:
            body = {"worker": "ab", "queues": ["ab"], "max_jobs": 100, "wait": 0}
            leased = http.post("/leases", json=body).json()["jobs"]
            reports = [_report(j) for j in leased]
            answer = http.post("/leases/report", json={"reports": reports})
            assert answer.status_code == 200, answer.text
            done += len(leased)


def _report(job: dict[str, Any]) -> dict[str, Any]:
    """Odd jobs succeed, even ones fail for good."""
    report = {"id": job["id"], "token": job["lease"]["token"]}
    if job["args"][0] % 2:
        return report | {"outcome": "succeeded", "result": 1}
    return report | {"outcome": "failed", "error": {"type": "E", "message": "no"}}


def main() -> None:
    jobs = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    port = int(sys.argv[3]) if len(sys.argv) > 3 else 19750
    sides = {
        "A metrics on ": "service.app:create_app",
        "B metrics off": "bench.metrics_ab:create_app_without_metrics",
    }
    results: dict[str, list[float]] = {side: [] for side in sides}
    for _ in range(rounds):
        for side, factory in sides.items():
            with tempfile.TemporaryDirectory() as workdir:
                process = serve(factory, port, workdir)
                try:
                    before = cpu_seconds(process.pid)
                    workload(f"http://127.0.0.1:{port}", jobs)
                    used = cpu_seconds(process.pid) - before
                finally:
                    process.terminate()
                    process.wait(10)
            results[side].append(used)
            print(f"{side}: {used:.2f} CPU s for {jobs} jobs ({1e6 * used / jobs:.0f} us/job)")
    for side, values in results.items():
        print(f"{side}: median {sorted(values)[len(values) // 2]:.2f} CPU s over {rounds} rounds")


if __name__ == "__main__":
    main()
