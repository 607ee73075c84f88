"""A chord of N no-op jobs plus its callback (issue 18, docs/workflows.md): the time from
submit to the callback's result, celeriac beside Celery's chord on Redis, in one run.

- celeriac: ``celeriac serve`` on a fresh PostgreSQL database with Redis as the dispatch
  index, one ``celeriac worker -c 8``; the canvas ``chord(group(noop.s(i) ...),
  count.s())`` is one ``POST /workflows``; the callback is queued by the settle of the
  last member (a counter row in SQL).
- Celery: Redis broker and result backend, ``celery worker -P threads -c 8``; its chord
  counts the header's results in Redis (``chord_unlock`` / the Redis chord counter).

Each system's callback must return N (every member's result reached it, in order); a
chord that fails or does not finish within the timeout is reported as such. Run with
the bench venv (it holds Celery): ``.bench-venv/bin/python bench/workflow_chord.py``
(``make bench`` runs it after the side-by-side bench). Uses Redis dbs
BENCH_CHORD_REDIS_DB (14) and the next one, and its own key names; never FLUSHDB.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from celeriac import Celeriac, chord, group
from harness import POSTGRES_URL, REDIS_HOST, REDIS_PORT, free_port, spawn, stop, wait_ready

REDIS_DB = int(os.environ.get("BENCH_CHORD_REDIS_DB", "14"))
QUEUE = os.environ.get("BENCH_CHORD_QUEUE", "chord-bench")
RESULTS = Path(__file__).resolve().parent / "results" / "workflow_chord.json"

app = Celeriac("chord-bench")


@app.task(name="chord.noop")
def noop(i: int) -> int:
    return i


@app.task(name="chord.count")
def count(values: list[int]) -> int:
    """N if every member's result arrived, in order; -1 otherwise."""
    return len(values) if values == list(range(len(values))) else -1


def _celery_app() -> Any:
    from celery import Celery

    broker = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
    backend = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB + 1}"
    made = Celery("chord-bench", broker=broker, backend=backend)
    made.conf.task_default_queue = QUEUE
    made.conf.result_expires = 600

    @made.task(name="chord.noop")
    def celery_noop(i: int) -> int:
        return i

    @made.task(name="chord.count")
    def celery_count(values: list[int]) -> int:
        return len(values) if values == list(range(len(values))) else -1

    made.bench_tasks = (celery_noop, celery_count)  # type: ignore[attr-defined]
    return made


try:  # the bench venv has Celery; the celeriac worker imports this module too
    celery_app = _celery_app()
except ImportError:
    celery_app = None


@contextmanager
def _postgres() -> Iterator[str]:
    """A fresh database for the service (dropped afterwards), migrated by the service."""
    import sqlalchemy as sa

    name = f"flows18_chord_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    try:
        yield sa.make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()


def run_celeriac(n: int, timeout: float) -> dict[str, Any]:
    port = int(os.environ.get("BENCH_CHORD_PORT", free_port()))
    url = f"http://127.0.0.1:{port}"
    with _postgres() as database:
        env = {
            "CELERIAC_DATABASE_URL": database,
            "CELERIAC_BROKER_URL": f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}",
            "CELERIAC_REDIS_PREFIX": f"chord-{uuid.uuid4().hex[:6]}",
            "CELERIAC_LOG_LEVEL": "warning",
        }
        command = [sys.executable, "-m", "celeriac", "serve", "--port", str(port), "--migrate"]
        service = spawn(command, "chord-celeriac-service", env)
        worker = None
        try:
            wait_ready(url)
            worker = spawn([sys.executable, "-m", "celeriac", "worker", "--app",
                            "workflow_chord:app", "--server", url, "-c", "8", "-Q", QUEUE,
                            "-l", "warning"], "chord-celeriac-worker")  # fmt: skip
            app.configure(server=url)
            warm = chord(group(noop.s(i).set(queue=QUEUE) for i in range(10)),
                         count.s().set(queue=QUEUE)).apply_async()  # fmt: skip
            warm.get(timeout=60)  # the worker is up and leasing
            canvas = chord(group(noop.s(i).set(queue=QUEUE) for i in range(n)),
                           count.s().set(queue=QUEUE))  # fmt: skip
            return _timed(lambda: canvas.apply_async().get(timeout=timeout), n)
        finally:
            if worker is not None:
                stop(worker)
            stop(service)
            app.close()


def run_celery(n: int, timeout: float) -> dict[str, Any]:
    from celery import chord as celery_chord
    from celery import group as celery_group

    assert celery_app is not None
    celery_noop, celery_count = celery_app.bench_tasks
    worker = spawn([sys.executable, "-m", "celery", "-A", "workflow_chord:celery_app", "worker",
                    "-P", "threads", "-c", "8", "-Q", QUEUE, "-n", f"chord{os.getpid()}@%h",
                    "--loglevel", "WARNING"], "chord-celery-worker")  # fmt: skip
    try:
        warm = celery_chord(celery_group(celery_noop.s(i) for i in range(10)), celery_count.s())
        warm.apply_async().get(timeout=60)
        canvas = celery_chord(celery_group(celery_noop.s(i) for i in range(n)), celery_count.s())
        return _timed(lambda: canvas.apply_async().get(timeout=timeout), n)
    finally:
        stop(worker)


def _timed(run: Callable[[], Any], n: int) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        result = run()
    except Exception as exc:  # a stalled or failed chord is a result, reported as such
        return {"seconds": None, "ok": False, "note": f"{type(exc).__name__}: {exc}"[:200]}
    seconds = time.perf_counter() - started
    ok = result == n
    return {"seconds": round(seconds, 3), "ok": ok, "note": "" if ok else f"callback got {result}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=10_000, help="members of the chord's group")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--only", choices=("celeriac", "celery"))
    args = parser.parse_args()
    rows = {}
    if args.only in (None, "celeriac"):
        rows["celeriac (PostgreSQL + Redis index, worker -c 8)"] = run_celeriac(
            args.n, args.timeout
        )
    if args.only in (None, "celery"):
        rows["Celery (Redis broker + results, threads -c 8)"] = run_celery(args.n, args.timeout)
    print(f"\nchord of {args.n:,} no-op jobs + callback: submit → callback result\n")
    print("| system | seconds | callback correct | note |\n|---|---|---|---|")
    for name, row in rows.items():
        seconds = "stalled/failed" if row["seconds"] is None else f"{row['seconds']:.2f}"
        print(f"| {name} | {seconds} | {'yes' if row['ok'] else 'no'} | {row['note']} |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"n": args.n, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
