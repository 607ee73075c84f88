"""Where one round trip's time goes: submit -> result, one idle worker (issue 14).

Against a running ``celeriac serve`` with one idle ``celeriac worker -c 1`` whose app has
a no-op task (``--task``), run N round trips one after the other in two modes:

- ``two-call``: ``POST /jobs``, then ``GET /jobs/{id}?wait=S``;
- ``one-call``: ``POST /jobs?wait=S``.

Each round trip is split with the client's wall clock and the job's own timestamps, which
the service takes from the same host clock before each commit: ``created_at`` (the submit
row is built), ``started_at`` (the lease is granted), ``finished_at`` (the report is
settled). Legs:

- ``send -> created_at``: client send, HTTP, routing and validation of the submit;
- ``created_at -> POST answered`` (two-call only): submit commit and its answer;
- ``created_at -> started_at``: commit, wake the worker's long-poll, lease the job;
- ``started_at -> finished_at``: lease commit and answer, the worker runs the task,
  sends its report, the service reads it up to the settle;
- ``finished_at -> answered``: settle commit, wake the waiter, re-read, answer.

With ``--pid`` (the service's process) it also prints the service's CPU per round trip,
from /proc. With ``--database`` (the service's database, a libpq URL) it also prints the database's
transactions and ``jobs`` index scans per round trip (pg_stat deltas over the mode, maintenance
loops included) and the floor of one durable commit on that server (a one-row INSERT in
a scratch table, dropped after; autocommit).

    python bench/roundtrip_legs.py --base http://127.0.0.1:18960 --n 300 \\
        --database postgresql://postgres@127.0.0.1:5432/rt14
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from datetime import datetime

import httpx

STATS = (
    "SELECT xact_commit, xact_rollback,"
    " (SELECT idx_scan FROM pg_stat_user_tables WHERE relname = 'jobs')"
    " FROM pg_stat_database WHERE datname = current_database()"
)


def ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def one(client: httpx.Client, mode: str, task: str, i: int, wait: float) -> dict[str, float]:
    body = {"task": task, "args": [i]}
    sent = time.time()
    if mode == "two-call":
        posted = client.post("/jobs", json=body)
        posted.raise_for_status()
        answered_post = time.time()
        got = client.get(f"/jobs/{posted.json()['id']}", params={"wait": wait})
    else:
        got = client.post("/jobs", json=body, params={"wait": wait})
        answered_post = float("nan")
    got.raise_for_status()
    answered = time.time()
    job = got.json()
    if job["status"] != "succeeded":
        raise RuntimeError(f"job {job['id']} is {job['status']}")
    created, started, finished = (ts(job[k]) for k in ("created_at", "started_at", "finished_at"))
    return {
        "send -> created_at": created - sent,
        "created_at -> POST answered": answered_post - created,
        "created_at -> started_at": started - created,
        "started_at -> finished_at": finished - started,
        "finished_at -> answered": answered - finished,
        "total": answered - sent,
    }


def pg_stats(database: str | None) -> tuple[int, ...] | None:
    if not database:
        return None
    import psycopg

    time.sleep(11)  # an idle backend flushes its statistics within 10 s (PostgreSQL 15)
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute(STATS).fetchone()
    return tuple(row) if row else None


def commit_floor(database: str, n: int = 200) -> float:
    import psycopg

    with psycopg.connect(database, autocommit=True) as conn:
        # a real table: a temporary one writes no WAL, so its commit is not durable
        conn.execute("CREATE TABLE IF NOT EXISTS rt_floor_probe (x int)")
        times = []
        for i in range(n):
            started = time.perf_counter()
            conn.execute("INSERT INTO rt_floor_probe VALUES (%s)", (i,))
            times.append(time.perf_counter() - started)
        conn.execute("DROP TABLE rt_floor_probe")
    return statistics.median(times)


def cpu_seconds(pid: int | None) -> float:
    """User and system CPU of process ``pid`` so far (0 without one)."""
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(
    base: str, mode: str, n: int, task: str, wait: float, gap: float, database: str | None,
    pid: int | None = None,
) -> None:  # fmt: skip
    rows: list[dict[str, float]] = []
    before = None
    with httpx.Client(base_url=base, timeout=wait + 10) as client:
        for i in range(20):  # warm the connections and the service's caches
            one(client, mode, task, i, wait)
            time.sleep(gap)
        before = pg_stats(database)
        cpu_before = cpu_seconds(pid)
        for i in range(n):
            rows.append(one(client, mode, task, i, wait))
            time.sleep(gap)  # let the worker go back to its long-poll: an idle worker
        cpu = cpu_seconds(pid) - cpu_before
    after = pg_stats(database)
    totals = [r["total"] for r in rows]
    print(f"## {mode}: {n} round trips")
    if pid is not None:  # idle loops included: read it beside another run's, same --gap
        print(f"service CPU per round trip: {cpu / n * 1000:.2f} ms")
    if before and after:
        commits, rollbacks, scans = (b - a for a, b in zip(before, after, strict=True))
        print(
            f"per round trip: {commits / n:.2f} commits, {rollbacks / n:.2f} rollbacks,"
            f" {scans / n:.2f} index scans on jobs"
        )
    print(f"p50 {pct(totals, 0.5) * 1000:.2f} ms  p99 {pct(totals, 0.99) * 1000:.2f} ms")
    print("| leg | median ms | p90 ms |")
    print("|---|---|---|")
    for leg in rows[0]:
        values = [r[leg] for r in rows if r[leg] == r[leg]]
        if values:
            median = statistics.median(values) * 1000
            print(f"| {leg} | {median:.2f} | {pct(values, 0.9) * 1000:.2f} |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="http://127.0.0.1:18960")
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--task", default="rt.noop")
    parser.add_argument("--wait", type=float, default=5.0)
    parser.add_argument("--gap", type=float, default=0.05, help="seconds between trips")
    parser.add_argument("--database", help="libpq URL of the service's database")
    parser.add_argument("--mode", choices=["two-call", "one-call", "both"], default="both")
    parser.add_argument("--pid", type=int, help="the service's process: its CPU per trip")
    args = parser.parse_args()
    modes = ["two-call", "one-call"] if args.mode == "both" else [args.mode]
    for mode in modes:
        run(args.base, mode, args.n, args.task, args.wait, args.gap, args.database, args.pid)
    if args.database:
        print(
            f"one durable commit (INSERT, autocommit): {commit_floor(args.database) * 1000:.2f} ms"
        )


if __name__ == "__main__":
    main()
