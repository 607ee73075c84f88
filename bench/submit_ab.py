"""Submit A/B for issue 14: one `celeriac serve` started from a source TREE (a checkout,
or `git archive REF | tar -x -C DIR`), on PostgreSQL (database SUBMIT_AB_DB, migrated),
with the SQL or the Redis broker; prints one JSON line per scenario: jobs/s, the
service's CPU ms per job (from /proc) and PostgreSQL commits per job (pg_stat_database,
which lags: read it as a rough count).

    python bench/submit_ab.py TREE BROKER PORT SCENARIO[,SCENARIO...] [JOBS]

BROKER: sql | redis (db 9, a fresh key prefix, deleted after). SCENARIO: seq (one thread
calling Client.submit in a loop: an Idempotency-Key each), seqraw (one thread, raw POST
/jobs without a key), c16 (16 threads sharing one Client), batch (Client.submit_batch of
1,000). The client is the SDK of CLIENT_TREE (default: this checkout), the same for A and
B. Run A and B interleaved (A B A B) and compare CPU per job before wall time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid

CLIENT_TREE = os.environ.get(
    "CLIENT_TREE", os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
sys.path.insert(0, f"{CLIENT_TREE}/workers/python")

import httpx  # noqa: E402
import psycopg  # noqa: E402

DB = os.environ.get("SUBMIT_AB_DB", "submit_bench")
PG = f"postgresql://postgres@127.0.0.1:5432/{DB}"


def server(tree: str, broker: str, port: int) -> tuple[subprocess.Popen[bytes], str]:
    prefix = f"submitab{uuid.uuid4().hex[:6]}"
    env = {
        **os.environ,
        "PYTHONPATH": f"{tree}:{tree}/workers/python",
        "CELERIAC_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{DB}",
        "CELERIAC_BROKER_URL": "sql" if broker == "sql" else "redis://127.0.0.1:6379/9",
        "CELERIAC_REDIS_PREFIX": prefix,
        "CELERIAC_LOG_LEVEL": "warning",
    }
    if os.environ.get("PROFILE_OUT"):
        cmd = [sys.executable, "-m", "cProfile", "-o", os.environ["PROFILE_OUT"], "-m", "celeriac"]
    else:
        cmd = [sys.executable, "-m", "celeriac"]
    cmd += ["serve", "--port", str(port), "--no-migrate"]
    proc = subprocess.Popen(cmd, env=env, cwd="/tmp")
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return proc, prefix
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("server did not start")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def commits(pg: psycopg.Connection) -> int:
    return pg.execute(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (DB,)
    ).fetchone()[0]


def run(base: str, scenario: str, n: int) -> int:
    from celeriac.client import Client, job_spec

    if scenario == "seq":
        with Client(base) as client:
            for i in range(n):
                client.submit("bench.noop", [i])
        return n
    if scenario == "seqraw":  # no idempotency key
        with httpx.Client(base_url=base) as http:
            for i in range(n):
                r = http.post("/jobs", json={"task": "bench.noop", "args": [i]})
                assert r.status_code == 202, r.text
        return n
    if scenario == "c16":
        per = n // 16
        with Client(base) as client:

            def one(k: int) -> None:
                for i in range(per):
                    client.submit("bench.noop", [k * per + i])

            threads = [threading.Thread(target=one, args=(k,)) for k in range(16)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        return per * 16
    if scenario == "batch":
        batches = max(1, n // 1000)
        specs = [[job_spec("bench.noop", [i]) for i in range(1000)] for _ in range(batches)]
        with Client(base) as client:
            for part in specs:
                client.submit_batch(part)
        return batches * 1000
    raise SystemExit(f"unknown scenario {scenario}")


def main() -> None:
    tree, broker, port, scenarios = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    n = int(sys.argv[5]) if len(sys.argv) > 5 else 2000
    with psycopg.connect(PG, autocommit=True) as pg:
        pg.execute("TRUNCATE jobs CASCADE")
        proc, prefix = server(tree, broker, port)
        base = f"http://127.0.0.1:{port}"
        try:
            run(base, scenarios.split(",")[0], 200)  # warm-up
            for scenario in scenarios.split(","):
                time.sleep(1.1)
                c0, t0, cpu0 = commits(pg), time.perf_counter(), cpu_seconds(proc.pid)
                done = run(base, scenario, n)
                elapsed = time.perf_counter() - t0
                cpu = cpu_seconds(proc.pid) - cpu0
                time.sleep(1.1)
                c1 = commits(pg)
                print(
                    json.dumps(
                        {
                            "tree": tree.rsplit("/", 1)[-1],
                            "broker": broker,
                            "scenario": scenario,
                            "jobs": done,
                            "per_s": round(done / elapsed),
                            "ms_per": round(elapsed / done * 1000, 3),
                            "server_cpu_ms_per_job": round(cpu / done * 1000, 3),
                            "commits_per_job": round((c1 - c0) / done, 3),
                        }
                    ),
                    flush=True,
                )
        finally:
            proc.send_signal(2)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
            if broker == "redis":
                import redis

                r = redis.Redis(db=9)
                keys = list(r.scan_iter(f"{{{prefix}}}*", count=1000))
                if keys:
                    r.delete(*keys)


if __name__ == "__main__":
    main()
